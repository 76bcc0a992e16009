"""Monthly billing statements (统采分签) as the files finance staff download: CSV, XLSX and PDF.

Pure: plain statement data in, file bytes out; reading statements from the database and serving
the files is the caller's part. Money stays integer fen until the moment it is written, where it
becomes yuan as an exact Decimal; nothing here rounds an amount (billing already did), only
hours and sub-fen unit prices are rounded, for display.

CSV and XLSX output depends only on the data given, so the same statements give the same bytes.
"""

from __future__ import annotations

import csv
import io
import re
import zipfile
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import ROUND_HALF_UP, Decimal
from functools import cache
from typing import Any, cast
from xml.sax.saxutils import escape
from zoneinfo import ZoneInfo

from openpyxl import Workbook
from openpyxl.cell.cell import ILLEGAL_CHARACTERS_RE
from openpyxl.styles import Alignment, Font, PatternFill
from openpyxl.utils import get_column_letter
from openpyxl.worksheet.worksheet import Worksheet
from openpyxl.writer.excel import ExcelWriter
from reportlab.lib import colors
from reportlab.lib.enums import TA_CENTER, TA_RIGHT
from reportlab.lib.pagesizes import A4, landscape
from reportlab.lib.styles import ParagraphStyle
from reportlab.lib.units import mm
from reportlab.pdfbase import pdfmetrics
from reportlab.pdfbase.cidfonts import UnicodeCIDFont
from reportlab.pdfgen.canvas import Canvas
from reportlab.platypus import (
    Flowable,
    KeepTogether,
    PageBreak,
    Paragraph,
    SimpleDocTemplate,
    Spacer,
    Table,
    TableStyle,
)

__all__ = [
    "ExportAdjustment",
    "ExportLine",
    "ExportStatement",
    "adjusted_total_amount",
    "adjustment_signed_amount",
    "class_display_name",
    "format_month",
    "format_yuan",
    "hours_of",
    "to_csv",
    "to_pdf",
    "to_xlsx",
    "unit_price_yuan",
    "yuan",
]


@dataclass(frozen=True)
class ExportLine:
    server_name: str
    resource_class: str  # code, e.g. "vcpu", "memory_mb", "storage_gb.ssd"
    quantity: int  # units held (memory_mb in MiB)
    seconds: int  # billed seconds
    unit_price: Decimal  # fen per unit-hour (memory: per GiB-hour), up to 6 decimals
    amount: int  # fen, already rounded by billing
    kind: str = "usage"  # usage | cap | minimum


@dataclass(frozen=True)
class ExportAdjustment:
    kind: str  # credit | debit
    amount: int  # fen, positive
    reason: str
    decided_by: str | None


@dataclass(frozen=True)
class ExportStatement:
    """One contract's statement for one month; `adjustments` are its approved credit and debit
    notes."""

    agency_code: str
    agency_name: str
    contract_number: str
    contract_title: str
    service_company_name: str
    month: str  # "2026-10"
    state: str  # draft | final
    currency: str  # "CNY"
    lines: tuple[ExportLine, ...]
    subtotal_amount: int
    discount_pct: Decimal
    discount_amount: int
    total_amount: int
    adjustments: tuple[ExportAdjustment, ...] = ()
    content_hash: str | None = None
    generated_at: datetime | None = None  # tz-aware UTC; shown in Asia/Shanghai


# ---------------------------------------------------------------------------------------------
# Display values shared by the three formats

SHANGHAI = ZoneInfo("Asia/Shanghai")
TITLE = "政务云服务费用结算单"

_CENT = Decimal("0.01")
_PRICE_PLACES = Decimal("1E-8")  # fen prices carry up to 6 decimals, so yuan needs 8

_CLASS_NAMES = {
    "vcpu": "vCPU",
    "memory_mb": "内存",
    "public_ip": "公网IP",
    "bandwidth_mbps": "带宽",
    "instances": "实例",
}
_CLASS_UNITS = {
    "vcpu": "核",
    "memory_mb": "GiB",  # shown in GiB because memory is priced per GiB-hour
    "public_ip": "个",
    "bandwidth_mbps": "Mbps",
    "instances": "台",
}
_LINE_KINDS = {"usage": "按量", "cap": "封顶减免", "minimum": "保底补足"}
_STATES = {"draft": "草稿", "final": "已定稿"}
_ADJUSTMENT_KINDS = {"credit": "调减（贷项）", "debit": "调增（借项）"}
_UNDECIDED = "未审批"
_NOT_RECORDED = "未记录"


def class_display_name(code: str, class_names: Mapping[str, str] | None = None) -> str:
    """The name finance reads for a resource class: the caller's catalog first, then ours, then
    the code itself so an unknown class is still identifiable."""
    if class_names and code in class_names:
        return class_names[code]
    if code in _CLASS_NAMES:
        return _CLASS_NAMES[code]
    family, _, tier = code.partition(".")
    if family == "storage_gb" and tier:
        return f"存储（{tier}）"
    return code


def _class_unit(code: str) -> str:
    if code.startswith("storage_gb"):
        return "GB"
    return _CLASS_UNITS.get(code, "")


def _display_quantity(line: ExportLine) -> Decimal:
    if line.resource_class == "memory_mb":
        # 1024 is a power of two, so the quotient is a terminating decimal: exact, never rounded
        return Decimal(line.quantity) / 1024
    return Decimal(line.quantity)


def yuan(fen: int) -> Decimal:
    """Fen as yuan with exactly two decimals (123456 → Decimal("1234.56")); exact, no rounding."""
    return Decimal(fen).scaleb(-2)


def format_yuan(fen: int, *, grouping: bool = True) -> str:
    """Fen as a yuan string: "1,234.56" (grouping) or "1234.56"."""
    return f"{yuan(fen):,.2f}" if grouping else f"{yuan(fen):.2f}"


def unit_price_yuan(unit_price: Decimal) -> Decimal:
    """A fen-per-unit-hour price in yuan, keeping its sub-fen digits but at least two decimals
    (Decimal("12.5") → 0.125, Decimal("100") → 1.00)."""
    exact = unit_price.scaleb(-2).quantize(_PRICE_PLACES, rounding=ROUND_HALF_UP)
    trimmed = exact.normalize()
    if cast(int, trimmed.as_tuple().exponent) > -2:
        return trimmed.quantize(_CENT)
    return trimmed


def hours_of(seconds: int) -> Decimal:
    """Billed seconds as hours with two decimals, rounded half up (display only)."""
    return (Decimal(seconds) / 3600).quantize(_CENT, rounding=ROUND_HALF_UP)


def adjustment_signed_amount(adjustment: ExportAdjustment) -> int:
    """Fen as the adjustment moves what the agency owes: a credit lowers it, a debit raises it."""
    return -adjustment.amount if adjustment.kind == "credit" else adjustment.amount


def adjusted_total_amount(statement: ExportStatement) -> int:
    """The total in fen after the statement's credit and debit notes."""
    return statement.total_amount + sum(adjustment_signed_amount(a) for a in statement.adjustments)


def format_month(month: str) -> str:
    """The month as finance writes it ("2026-10" → "2026年10月"); anything else as given."""
    match = re.fullmatch(r"(\d{4})-(\d{2})", month)
    if not match:
        return month
    return f"{match[1]}年{int(match[2])}月"


def _format_generated_at(value: datetime | None) -> str:
    if value is None:
        return ""
    if value.tzinfo is None:
        # a naive time would be shown 8 hours off without anyone noticing
        raise ValueError("generated_at must be timezone-aware")
    return value.astimezone(SHANGHAI).strftime("%Y-%m-%d %H:%M:%S") + "（北京时间）"


def _plain(value: Decimal | None) -> str:
    # "f" keeps tiny prices like 1E-7 readable as 0.0000001
    return "" if value is None else f"{value:f}"


def _check(statements: Sequence[ExportStatement]) -> None:
    for statement in statements:
        if statement.currency != "CNY":
            # every figure is labelled 元; anything else would be mislabelled money
            raise ValueError(
                f"statement {statement.contract_number} {statement.month} is in "
                f"{statement.currency}; exports handle CNY only"
            )
        _format_generated_at(statement.generated_at)


@dataclass(frozen=True)
class _Row:
    server_name: str
    class_name: str
    kind_name: str
    quantity: Decimal | None  # None on cap and minimum lines
    unit: str
    hours: Decimal
    unit_price: Decimal | None  # yuan per unit-hour; None on cap and minimum lines
    amount: Decimal  # yuan


# Billing gives these lines quantity 0 and the item's price, but their amount is the gap to the
# monthly cap or minimum, not quantity × hours × price: showing "0 × 744 h × 0.035" would invite
# finance to recompute them. They keep the hours they cover.
_UNPRICED_KINDS = frozenset({"cap", "minimum"})


def _rows(statement: ExportStatement, class_names: Mapping[str, str] | None) -> Iterator[_Row]:
    for line in statement.lines:
        priced = line.kind not in _UNPRICED_KINDS
        yield _Row(
            server_name=line.server_name,
            class_name=class_display_name(line.resource_class, class_names),
            kind_name=_LINE_KINDS.get(line.kind, line.kind),
            quantity=_display_quantity(line) if priced else None,
            unit=_class_unit(line.resource_class) if priced else "",
            hours=hours_of(line.seconds),
            unit_price=unit_price_yuan(line.unit_price) if priced else None,
            amount=yuan(line.amount),
        )


def _decider(adjustment: ExportAdjustment) -> str:
    return adjustment.decided_by or _UNDECIDED


def _pct(value: Decimal) -> str:
    return f"{value.quantize(_CENT, rounding=ROUND_HALF_UP)}%"


# ---------------------------------------------------------------------------------------------
# CSV

CSV_HEADER = (
    "行类型",
    "委办局编码",
    "委办局",
    "合同编号",
    "账期",
    "服务器",
    "资源类型",
    "计费方式",
    "数量",
    "单位",
    "时长（小时）",
    "单价（元/单位·小时）",
    "金额（元）",
    "备注",
)
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def _csv_text(value: str) -> str:
    # Excel runs a cell that starts like a formula; server names and reasons are typed by
    # tenants, so such text is quoted (OWASP's advice for CSV injection)
    return "'" + value if value.startswith(_FORMULA_STARTS) else value


def to_csv(
    statements: Sequence[ExportStatement], class_names: Mapping[str, str] | None = None
) -> bytes:
    """One row per statement line, then each statement's subtotal, discount and total rows and
    its adjustments; UTF-8 with a BOM so that Excel reads the Chinese correctly."""
    _check(statements)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(CSV_HEADER)
    for statement in statements:
        ident = [
            _csv_text(statement.agency_code),
            _csv_text(statement.agency_name),
            _csv_text(statement.contract_number),
            statement.month,
        ]
        for row in _rows(statement, class_names):
            writer.writerow(
                [
                    "明细",
                    *ident,
                    _csv_text(row.server_name),
                    _csv_text(row.class_name),
                    row.kind_name,
                    _plain(row.quantity),
                    row.unit,
                    _plain(row.hours),
                    _plain(row.unit_price),
                    _plain(row.amount),
                    "",
                ]
            )
        summaries = [
            ("小计", statement.subtotal_amount, ""),
            ("折扣", -statement.discount_amount, f"折扣率 {_pct(statement.discount_pct)}"),
            ("合计", statement.total_amount, _STATES.get(statement.state, statement.state)),
        ]
        summaries += [
            (
                _ADJUSTMENT_KINDS.get(adjustment.kind, adjustment.kind),
                adjustment_signed_amount(adjustment),
                _csv_text(f"{adjustment.reason}（审批人：{_decider(adjustment)}）"),
            )
            for adjustment in statement.adjustments
        ]
        if statement.adjustments:
            summaries.append(("调整后合计", adjusted_total_amount(statement), ""))
        for label, fen, note in summaries:
            writer.writerow([label, *ident, *[""] * 7, format_yuan(fen, grouping=False), note])
    return buffer.getvalue().encode("utf-8-sig")


# ---------------------------------------------------------------------------------------------
# XLSX

YUAN_FORMAT = "#,##0.00"
HOURS_FORMAT = "0.00"
PRICE_FORMAT = "0.00######"
PCT_FORMAT = "0.00%"

_XLSX_COLUMNS = (
    # title, width
    ("服务器", 30),
    ("资源类型", 16),
    ("计费方式", 12),
    ("数量", 10),
    ("单位", 8),
    ("时长（小时）", 14),
    ("单价（元/单位·小时）", 22),
    ("金额（元）", 18),
)
_BOLD = Font(bold=True)
_HEADER_FILL = PatternFill("solid", fgColor="DDE4EE")
_INVALID_SHEET_CHARS = re.compile(r"[\[\]:*?/\\]")
_SHEET_TITLE_MAX = 31
# a fixed stamp for the zip entries: openpyxl would put the wall-clock time in every one
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)
_NO_DATE = datetime(*_ZIP_TIME)  # noqa: DTZ001 (XLSX document dates are naive UTC)


def _sheet_title(statement: ExportStatement, taken: set[str]) -> str:
    # Excel forbids []:*?/\ and a leading or trailing apostrophe, and compares names
    # case-insensitively
    base = _INVALID_SHEET_CHARS.sub("_", statement.contract_number).strip("'") or "结算单"
    suffixes = ["", f" {statement.month}", *(f" ({n})" for n in range(2, 10_000))]
    for suffix in suffixes:
        title = base[: _SHEET_TITLE_MAX - len(suffix)].rstrip("'") + suffix
        if title.casefold() not in taken:
            taken.add(title.casefold())
            return title
    raise ValueError("too many statements with the same contract number")


def _put(
    ws: Worksheet,
    row: int,
    column: int,
    value: str | Decimal | int | None,
    *,
    number_format: str | None = None,
    bold: bool = False,
) -> None:
    cell = ws.cell(row=row, column=column)
    if isinstance(value, str):
        cell.value = ILLEGAL_CHARACTERS_RE.sub("", value)
        # openpyxl stores a string starting with "=" as a formula; names typed by tenants
        # must stay text
        cell.data_type = "s"
    else:
        # XLSX keeps every number as a binary double (openpyxl writes Decimal with "%.16g"): a
        # two-decimal yuan value below 10^13 round-trips exactly, which is all Excel can hold
        cell.value = value
    if number_format:
        cell.number_format = number_format
    if bold:
        cell.font = _BOLD


def _write_sheet(
    ws: Worksheet, statement: ExportStatement, class_names: Mapping[str, str] | None
) -> None:
    for index, (_, width) in enumerate(_XLSX_COLUMNS, start=1):
        ws.column_dimensions[get_column_letter(index)].width = width
    amount_col = len(_XLSX_COLUMNS)
    label_col = amount_col - 1

    _put(ws, 1, 1, TITLE, bold=True)
    ws.cell(row=1, column=1).font = Font(bold=True, size=14)
    info: list[tuple[str, str]] = [
        ("委办局", statement.agency_name),
        ("委办局编码", statement.agency_code),
        ("合同编号", statement.contract_number),
        ("合同名称", statement.contract_title),
        ("服务商", statement.service_company_name),
        ("账期", format_month(statement.month)),
        ("状态", _STATES.get(statement.state, statement.state)),
        ("生成时间", _format_generated_at(statement.generated_at) or _NOT_RECORDED),
    ]
    if statement.state == "final" and statement.content_hash:
        info.append(("内容摘要（SHA-256）", statement.content_hash))
    row = 2
    for label, value in info:
        _put(ws, row, 1, label, bold=True)
        _put(ws, row, 2, value)
        row += 1

    row += 1
    header_row = row
    for column, (title, _) in enumerate(_XLSX_COLUMNS, start=1):
        _put(ws, header_row, column, title, bold=True)
        cell = ws.cell(row=header_row, column=column)
        cell.fill = _HEADER_FILL
        cell.alignment = Alignment(horizontal="center", vertical="center", wrap_text=True)
    ws.freeze_panes = ws.cell(row=header_row + 1, column=1)
    # printed as finance prints the PDF: landscape, one page wide, the table header on every page
    ws.page_setup.orientation = "landscape"
    ws.page_setup.paperSize = ws.PAPERSIZE_A4
    ws.page_setup.fitToWidth = 1
    ws.page_setup.fitToHeight = 0
    ws.sheet_properties.pageSetUpPr.fitToPage = True
    ws.print_title_rows = f"{header_row}:{header_row}"

    row = header_row + 1
    for line in _rows(statement, class_names):
        _put(ws, row, 1, line.server_name)
        _put(ws, row, 2, line.class_name)
        _put(ws, row, 3, line.kind_name)
        _put(ws, row, 4, line.quantity)
        _put(ws, row, 5, line.unit)
        _put(ws, row, 6, line.hours, number_format=HOURS_FORMAT)
        _put(ws, row, 7, line.unit_price, number_format=PRICE_FORMAT)
        _put(ws, row, 8, line.amount, number_format=YUAN_FORMAT)
        row += 1

    # the figures billing computed, not SUM formulas: the file must say what the statement says
    row += 1
    totals: list[tuple[str, Decimal, str]] = [
        ("小计（元）", yuan(statement.subtotal_amount), YUAN_FORMAT),
        ("折扣率", statement.discount_pct / 100, PCT_FORMAT),
        ("折扣（元）", yuan(-statement.discount_amount), YUAN_FORMAT),
        ("合计（元）", yuan(statement.total_amount), YUAN_FORMAT),
    ]
    for total_label, figure, number_format in totals:
        _put(ws, row, label_col, total_label, bold=True)
        bold = total_label.startswith("合计")
        _put(ws, row, amount_col, figure, number_format=number_format, bold=bold)
        row += 1

    if statement.adjustments:
        row += 1
        _put(ws, row, 1, "调整（贷项/借项）", bold=True)
        row += 1
        for column, title in enumerate(("类型", "金额（元）", "审批人", "原因"), start=1):
            _put(ws, row, column, title, bold=True)
            ws.cell(row=row, column=column).fill = _HEADER_FILL
        row += 1
        for adjustment in statement.adjustments:
            _put(ws, row, 1, _ADJUSTMENT_KINDS.get(adjustment.kind, adjustment.kind))
            _put(ws, row, 2, yuan(adjustment_signed_amount(adjustment)), number_format=YUAN_FORMAT)
            _put(ws, row, 3, _decider(adjustment))
            _put(ws, row, 4, adjustment.reason)
            row += 1
        row += 1
        _put(ws, row, label_col, "调整后合计（元）", bold=True)
        _put(
            ws,
            row,
            amount_col,
            yuan(adjusted_total_amount(statement)),
            number_format=YUAN_FORMAT,
            bold=True,
        )


def _fixed_zip_times(data: bytes) -> bytes:
    out = io.BytesIO()
    with (
        zipfile.ZipFile(io.BytesIO(data)) as source,
        zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as target,
    ):
        for info in source.infolist():
            entry = zipfile.ZipInfo(info.filename, date_time=_ZIP_TIME)
            entry.compress_type = zipfile.ZIP_DEFLATED
            entry.external_attr = info.external_attr
            target.writestr(entry, source.read(info.filename))
    return out.getvalue()


def to_xlsx(
    statements: Sequence[ExportStatement], class_names: Mapping[str, str] | None = None
) -> bytes:
    """One sheet per statement, named by its contract number: a header block, the lines,
    the totals billing computed and the adjustments."""
    _check(statements)
    workbook = Workbook()
    if workbook.active is not None:  # the blank sheet a new workbook starts with
        workbook.remove(workbook.active)
    taken: set[str] = set()
    for statement in statements:
        _write_sheet(workbook.create_sheet(_sheet_title(statement, taken)), statement, class_names)
    if not statements:
        empty = workbook.create_sheet("结算单")
        _put(empty, 1, 1, TITLE, bold=True)
        _put(empty, 2, 1, "（无结算单）")

    # document dates from the data, not the clock, so equal statements give equal files;
    # XLSX keeps them as naive UTC
    stamps = [s.generated_at for s in statements if s.generated_at is not None]
    stamp = max(stamps).astimezone(UTC).replace(tzinfo=None) if stamps else _NO_DATE
    workbook.properties.created = stamp
    workbook.properties.modified = stamp
    workbook.properties.title = TITLE
    workbook.properties.creator = "govbroker"

    buffer = io.BytesIO()
    # ExcelWriter instead of Workbook.save, which stamps "modified" with the wall clock
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        ExcelWriter(workbook, archive).write_data()
    return _fixed_zip_times(buffer.getvalue())


# ---------------------------------------------------------------------------------------------
# PDF

PDF_FONT = "STSong-Light"
# Latin text and figures are set in a standard PDF font: its metrics are exact in every reader,
# whereas the Latin glyphs a reader substitutes for STSong-Light come out unevenly spaced
LATIN_FONT = "Helvetica"
HASH_FONT = "Courier"
_LATIN_RUN = re.compile(r"([\x20-\x7e\u00b7]+)")  # also "·", which STSong-Light lacks
_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_PAGE = landscape(A4)
_MARGIN = 15 * mm
_INK = colors.HexColor("#44505C")
_GRID = colors.HexColor("#9AA5B1")
_HEADER_BG = colors.HexColor("#DDE4EE")
_ZEBRA_BG = colors.HexColor("#F4F6F9")
_SEP = "　"  # ideographic space between subtitle parts


@cache
def _register_font() -> None:
    # one of reportlab's built-in CID fonts: nothing to download or ship, but it is not embedded,
    # so the reader's own Song font draws it (Chinese Windows and macOS have one; a Linux box
    # without CJK fonts shows boxes)
    pdfmetrics.registerFont(UnicodeCIDFont(PDF_FONT))


def _runs(text: str) -> Iterator[tuple[str, str]]:
    """(text, font) pieces: Chinese in STSong-Light, everything ASCII in the Latin font."""
    for index, part in enumerate(_LATIN_RUN.split(_CONTROL_CHARS.sub("", text))):
        if part:
            yield part, LATIN_FONT if index % 2 else PDF_FONT


def _markup(text: str, latin_font: str = LATIN_FONT) -> str:
    # Paragraph reads its text as markup: a server named "<db>" must print as it is
    return "".join(
        f'<font name="{latin_font}">{escape(part)}</font>' if font == LATIN_FONT else escape(part)
        for part, font in _runs(text)
    )


def _style(name: str, size: float, **extra: Any) -> ParagraphStyle:
    return ParagraphStyle(
        name, fontName=PDF_FONT, fontSize=size, leading=size * 1.3, wordWrap="CJK", **extra
    )


class _Styles:
    def __init__(self) -> None:
        self.title = _style("title", 17, alignment=TA_CENTER, spaceAfter=1 * mm)
        self.subtitle = _style("subtitle", 10.5, alignment=TA_CENTER, spaceAfter=2.5 * mm)
        self.cell = _style("cell", 8.5)
        self.cell_center = _style("cell_center", 8.5, alignment=TA_CENTER)
        self.head = _style("head", 8.5, alignment=TA_CENTER)
        self.info_label = _style("info_label", 9.5, textColor=_INK)
        self.info = _style("info", 9.5)
        self.section = _style("section", 10.5, spaceBefore=2 * mm, spaceAfter=1.5 * mm)
        self.small = _style("small", 7, textColor=_INK)
        self.total_label = _style("total_label", 10, alignment=TA_RIGHT)
        self.total = _style("total", 10, alignment=TA_RIGHT)
        self.grand_total = _style("grand_total", 12, alignment=TA_RIGHT)


def _p(text: str, style: ParagraphStyle) -> Paragraph:
    return Paragraph(_markup(text), style)


def _draw_runs(canvas: Canvas, x: float, y: float, text: str, size: float, right: bool) -> None:
    runs = list(_runs(text))
    if right:
        x -= sum(pdfmetrics.stringWidth(part, font, size) for part, font in runs)
    for part, font in runs:
        canvas.setFont(font, size)
        canvas.drawString(x, y, part)
        x += pdfmetrics.stringWidth(part, font, size)


class _StatementCanvas(Canvas):
    """Holds every page until the end, so that each page's footer can say how many pages its
    statement has ("第 N 页 / 共 M 页", counted per statement: each one is printed, signed and
    filed on its own)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pages: list[dict[str, Any]] = []
        # set by _StatementStart; immutable values only, as the page snapshots share them
        self.section = -1
        self.section_label = ""
        self.section_draft = False

    def start_section(self, index: int, label: str, draft: bool) -> None:
        self.section = index
        self.section_label = label
        self.section_draft = draft

    def showPage(self) -> None:
        self._pages.append(dict(self.__dict__))
        self._startPage()

    def save(self) -> None:
        totals = Counter(page["section"] for page in self._pages)
        seen: Counter[int] = Counter()
        for page in self._pages:
            self.__dict__.update(page)
            seen[self.section] += 1
            self._decorate(seen[self.section], totals[self.section])
            super().showPage()
        super().save()

    def _decorate(self, number: int, total: int) -> None:
        width, height = _PAGE
        if self.section_draft:
            self.saveState()
            # drawn over the content, hence faint: a draft must not be paid as a bill
            self.setFillColor(colors.Color(0.8, 0.1, 0.1, alpha=0.12))
            self.setFont(PDF_FONT, 140)
            self.translate(width / 2, height / 2)
            self.rotate(25)
            self.drawCentredString(0, -50, "草稿")
            self.restoreState()
        self.saveState()
        self.setFillColor(_INK)
        _draw_runs(self, _MARGIN, 9 * mm, self.section_label, 8, right=False)
        _draw_runs(self, width - _MARGIN, 9 * mm, f"第 {number} 页 / 共 {total} 页", 8, right=True)
        self.setStrokeColor(_GRID)
        self.setLineWidth(0.5)
        self.line(_MARGIN, 12 * mm, width - _MARGIN, 12 * mm)
        self.restoreState()


class _StatementStart(Flowable):
    """Takes no room; tells the canvas which statement the pages from here on belong to."""

    def __init__(self, index: int, label: str, draft: bool) -> None:
        super().__init__()
        self.index = index
        self.label = label
        self.draft = draft

    def wrap(self, availWidth: float, availHeight: float) -> tuple[float, float]:
        return (0, 0)

    def draw(self) -> None:
        cast(_StatementCanvas, self.canv).start_section(self.index, self.label, self.draft)


# widths in points; they add up to A4 landscape less the margins
_PDF_COLUMNS = (
    ("序号", 30),
    ("服务器", 196),
    ("资源类型", 90),
    ("计费方式", 58),
    ("数量", 60),
    ("单位", 40),
    ("时长（小时）", 70),
    ("单价（元/单位·小时）", 110),
    ("金额（元）", 100),
)
_NUMBER_COLUMNS = (0, 4, 6, 7, 8)


def _info_table(statement: ExportStatement, styles: _Styles, width: float) -> Table:
    cells = [
        ("委办局", f"{statement.agency_name}（{statement.agency_code}）"),
        ("服务商", statement.service_company_name),
        ("合同编号", statement.contract_number),
        ("合同名称", statement.contract_title),
        ("账期", format_month(statement.month)),
        ("状态", _STATES.get(statement.state, statement.state)),
        ("生成时间", _format_generated_at(statement.generated_at) or _NOT_RECORDED),
        ("币种", "人民币（元）"),
    ]
    rows = []
    for i in range(0, len(cells), 2):
        row: list[Paragraph] = []
        for label, value in cells[i : i + 2]:
            row += [_p(label, styles.info_label), _p(value, styles.info)]
        rows.append(row)
    label_w = 22 * mm
    value_w = width / 2 - label_w
    table = Table(rows, colWidths=[label_w, value_w, label_w, value_w])
    table.setStyle(
        TableStyle(
            [
                ("VALIGN", (0, 0), (-1, -1), "TOP"),
                ("LINEABOVE", (0, 0), (-1, 0), 0.8, _GRID),
                ("LINEBELOW", (0, -1), (-1, -1), 0.8, _GRID),
                ("TOPPADDING", (0, 0), (-1, -1), 2.5),
                ("BOTTOMPADDING", (0, 0), (-1, -1), 2.5),
            ]
        )
    )
    return table


def _lines_table(
    statement: ExportStatement, styles: _Styles, class_names: Mapping[str, str] | None
) -> Table:
    data: list[list[Any]] = [[_p(title, styles.head) for title, _ in _PDF_COLUMNS]]
    for number, row in enumerate(_rows(statement, class_names), start=1):
        data.append(
            [
                str(number),
                _p(row.server_name, styles.cell),
                _p(row.class_name, styles.cell),
                row.kind_name,
                _plain(row.quantity),
                _p(row.unit, styles.cell_center),
                f"{row.hours:,.2f}",
                _plain(row.unit_price),
                f"{row.amount:,.2f}",
            ]
        )
    if len(data) == 1:
        data.append(["", _p("（本月无计费明细）", styles.cell), "", "", "", "", "", "", ""])
    table = Table(data, colWidths=[w for _, w in _PDF_COLUMNS], repeatRows=1)
    commands: list[tuple[Any, ...]] = [
        ("FONT", (0, 0), (-1, -1), PDF_FONT, 8.5),
        ("BACKGROUND", (0, 0), (-1, 0), _HEADER_BG),
        ("ROWBACKGROUNDS", (0, 1), (-1, -1), [colors.white, _ZEBRA_BG]),
        ("GRID", (0, 0), (-1, -1), 0.4, _GRID),
        ("VALIGN", (0, 0), (-1, -1), "MIDDLE"),
        ("ALIGN", (3, 1), (3, -1), "CENTER"),
        ("TOPPADDING", (0, 0), (-1, -1), 2),
        ("BOTTOMPADDING", (0, 0), (-1, -1), 2),
    ]
    for column in _NUMBER_COLUMNS:
        commands += [
            ("FONT", (column, 1), (column, -1), LATIN_FONT, 8.5),
            ("ALIGN", (column, 1), (column, -1), "RIGHT"),
        ]
    table.setStyle(TableStyle(commands))
    return table


def _totals_table(statement: ExportStatement, styles: _Styles) -> Table:
    rows = [
        [_p("小计", styles.total_label), _p(format_yuan(statement.subtotal_amount), styles.total)],
        [
            _p(f"折扣（{_pct(statement.discount_pct)}）", styles.total_label),
            _p(format_yuan(-statement.discount_amount), styles.total),
        ],
        [
            _p("合计（元）", styles.grand_total),
            _p(format_yuan(statement.total_amount), styles.grand_total),
        ],
    ]
    table = Table(rows, colWidths=[110, 100], hAlign="RIGHT")
    table.setStyle(
        TableStyle(
            [
                ("LINEABOVE", (0, 2), (-1, 2), 0.8, colors.black),
                ("TOPPADDING", (0, 0), (-1, -1), 2),
                ("BOTTOMPADDING", (0, 0), (-1, -1), 2),
            ]
        )
    )
    return table


def _adjustments_table(statement: ExportStatement, styles: _Styles, width: float) -> Table:
    columns = (("类型", 90), ("金额（元）", 100), ("审批人", 100))
    reason_w = width - sum(w for _, w in columns)
    data: list[list[Any]] = [
        [_p(title, styles.head) for title, _ in columns] + [_p("原因", styles.head)]
    ]
    for adjustment in statement.adjustments:
        data.append(
            [
                _ADJUSTMENT_KINDS.get(adjustment.kind, adjustment.kind),
                format_yuan(adjustment_signed_amount(adjustment)),
                _p(_decider(adjustment), styles.cell),
                _p(adjustment.reason, styles.cell),
            ]
        )
    table = Table(data, colWidths=[w for _, w in columns] + [reason_w], repeatRows=1)
    table.setStyle(
        TableStyle(
            [
                ("FONT", (0, 0), (-1, -1), PDF_FONT, 8.5),
                ("FONT", (1, 1), (1, -1), LATIN_FONT, 8.5),
                ("BACKGROUND", (0, 0), (-1, 0), _HEADER_BG),
                ("GRID", (0, 0), (-1, -1), 0.4, _GRID),
                ("VALIGN", (0, 0), (-1, -1), "MIDDLE"),
                ("ALIGN", (1, 1), (1, -1), "RIGHT"),
            ]
        )
    )
    return table


def _adjusted_total_table(statement: ExportStatement, styles: _Styles) -> Table:
    row = [
        _p("调整后合计（元）", styles.grand_total),
        _p(format_yuan(adjusted_total_amount(statement)), styles.grand_total),
    ]
    table = Table([row], colWidths=[140, 100], hAlign="RIGHT")
    table.setStyle(TableStyle([("LINEABOVE", (0, 0), (-1, 0), 0.8, colors.black)]))
    return table


def _signatures(styles: _Styles, width: float) -> Table:
    blank = "_" * 26
    row = [
        _p(f"委办局确认（盖章）：{blank}", styles.info),
        _p(f"服务商确认（盖章）：{blank}", styles.info),
        _p(f"日期：{'_' * 18}", styles.info),
    ]
    return Table([row], colWidths=[width * 0.38, width * 0.38, width * 0.24])


def _statement_story(
    index: int,
    statement: ExportStatement,
    styles: _Styles,
    class_names: Mapping[str, str] | None,
    width: float,
) -> list[Flowable]:
    month = format_month(statement.month)
    state = _STATES.get(statement.state, statement.state)
    label = f"{statement.agency_name} | {statement.contract_number} | {month} | {state}"
    story: list[Flowable] = [
        _StatementStart(index, label, statement.state == "draft"),
        _p(TITLE, styles.title),
        _p(f"{month}{_SEP}{state}", styles.subtitle),
        _info_table(statement, styles, width),
        Spacer(0, 4 * mm),
        _lines_table(statement, styles, class_names),
        Spacer(0, 2 * mm),
        KeepTogether([_totals_table(statement, styles)]),
    ]
    if statement.adjustments:
        story.append(
            KeepTogether(
                [
                    _p("调整（贷项/借项）", styles.section),
                    _adjustments_table(statement, styles, width),
                    Spacer(0, 1 * mm),
                    _adjusted_total_table(statement, styles),
                ]
            )
        )
    tail: list[Flowable] = [Spacer(0, 5 * mm), _signatures(styles, width)]
    if statement.state == "final" and statement.content_hash:
        digest = escape(_CONTROL_CHARS.sub("", statement.content_hash))
        tail += [
            Spacer(0, 2 * mm),
            Paragraph(
                f'内容摘要（<font name="{LATIN_FONT}">SHA-256</font>）：'
                f'<font name="{HASH_FONT}">{digest}</font>',
                styles.small,
            ),
        ]
    story.append(KeepTogether(tail))
    return story


def to_pdf(
    statements: Sequence[ExportStatement], class_names: Mapping[str, str] | None = None
) -> bytes:
    """A4 landscape, each statement from a new page, pages numbered per statement."""
    _check(statements)
    _register_font()
    styles = _Styles()
    buffer = io.BytesIO()
    doc = SimpleDocTemplate(
        buffer,
        pagesize=_PAGE,
        leftMargin=_MARGIN,
        rightMargin=_MARGIN,
        topMargin=_MARGIN,
        bottomMargin=18 * mm,
        title=TITLE,
        subject=", ".join(sorted({s.month for s in statements})),
        creator="govbroker",
        author="govbroker",
    )
    story: list[Flowable] = []
    for index, statement in enumerate(statements):
        if index:
            story.append(PageBreak())
        story += _statement_story(index, statement, styles, class_names, doc.width)
    if not statements:
        story = [_p(TITLE, styles.title), _p("（无结算单）", styles.subtitle)]
    doc.build(story, canvasmaker=_StatementCanvas)
    return buffer.getvalue()
