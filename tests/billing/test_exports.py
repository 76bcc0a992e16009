"""Statement exports: the CSV, XLSX and PDF finance downloads say what the statement says, to the
fen. PDFs are read back with poppler (pdftotext, pdfinfo, pdftoppm), as a person would see them."""

from __future__ import annotations

import csv
import io
import re
import shutil
import subprocess
from dataclasses import replace
from datetime import UTC, datetime
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

import openpyxl
import pytest
import time_machine

from billing.exports import (
    CSV_HEADER,
    YUAN_FORMAT,
    ExportAdjustment,
    ExportLine,
    ExportStatement,
    adjusted_total_amount,
    class_display_name,
    format_month,
    format_yuan,
    hours_of,
    to_csv,
    to_pdf,
    to_xlsx,
    unit_price_yuan,
    yuan,
)

OCTOBER = 31 * 24 * 3600  # seconds in 2026-10
PRICES = {  # fen per unit-hour (memory per GiB-hour)
    "vcpu": Decimal("3.5"),
    "memory_mb": Decimal("1.25"),
    "storage_gb.ssd": Decimal("0.012"),
    "storage_gb.hdd": Decimal("0.004"),
    "public_ip": Decimal("2"),
    "bandwidth_mbps": Decimal("0.833333"),
}


def rated(server: str, resource_class: str, quantity: int, seconds: int = OCTOBER) -> ExportLine:
    per = 1024 if resource_class == "memory_mb" else 1
    exact = PRICES[resource_class] * quantity * seconds / (3600 * per)
    amount = int(exact.quantize(Decimal(1), rounding=ROUND_HALF_UP))
    return ExportLine(server, resource_class, quantity, seconds, PRICES[resource_class], amount)


def statement(
    lines: tuple[ExportLine, ...], discount_pct: Decimal, **fields: object
) -> ExportStatement:
    subtotal = sum(line.amount for line in lines)
    discount = int((subtotal * discount_pct / 100).quantize(Decimal(1), rounding=ROUND_HALF_UP))
    base = ExportStatement(
        agency_code="RSJ",
        agency_name="市人力资源和社会保障局",
        contract_number="HT-2026-RSJ-001",
        contract_title="2026年度政务云计算资源服务合同",
        service_company_name="星河政务云服务有限公司",
        month="2026-10",
        state="draft",
        currency="CNY",
        lines=lines,
        subtotal_amount=subtotal,
        discount_pct=discount_pct,
        discount_amount=discount,
        total_amount=subtotal - discount,
        generated_at=datetime(2026, 11, 1, 1, 30, tzinfo=UTC),
    )
    return replace(base, **fields)  # type: ignore[arg-type]


def final_rsj() -> ExportStatement:
    lines: list[ExportLine] = []
    for name in ("rsj-web-01", "rsj-web-02", "rsj-db-01"):
        lines += [
            rated(name, "vcpu", 8),
            rated(name, "memory_mb", 16384),
            rated(name, "storage_gb.ssd", 200),
        ]
    lines += [
        rated("rsj-db-01", "storage_gb.hdd", 2000),
        rated("rsj-web-01", "public_ip", 1),
        rated("rsj-web-01", "bandwidth_mbps", 20),
        rated("社保查询前置机", "vcpu", 2, seconds=10 * 24 * 3600 + 1800),
        rated("社保查询前置机", "memory_mb", 1536, seconds=10 * 24 * 3600 + 1800),
        # the monthly cap on the front-end server gives part of its month back; billing writes
        # such lines with quantity 0 and the price of the item
        ExportLine(
            "社保查询前置机", "vcpu", 0, 10 * 24 * 3600 + 1800, PRICES["vcpu"], -1234, kind="cap"
        ),
    ]
    return statement(
        tuple(lines),
        Decimal("5.00"),
        state="final",
        content_hash="3f5a" * 16,
        adjustments=(
            ExportAdjustment("credit", 5000, "10月12日存储故障4小时，按SLA减免", "王芳"),
            ExportAdjustment("debit", 250, "补计10月31日公网IP", "李强"),
        ),
    )


def long_gaj() -> ExportStatement:
    lines: list[ExportLine] = []
    for n in range(1, 31):
        server = f"gaj-node-{n:02d}"
        lines += [
            rated(server, "vcpu", 4 + n % 3),
            rated(server, "memory_mb", 8192),
            rated(server, "storage_gb.ssd", 100 + n),
            rated(server, "bandwidth_mbps", 5),
        ]
    return statement(
        tuple(lines),
        Decimal("3.50"),
        agency_code="GAJ",
        agency_name="市公安局",
        contract_number="HT-2026-GAJ-003",
        contract_title="公安视频云资源租用",
        service_company_name="华东数字政府科技股份有限公司",
    )


@pytest.fixture
def rsj() -> ExportStatement:
    return final_rsj()


@pytest.fixture
def gaj() -> ExportStatement:
    return long_gaj()


def poppler(*args: str) -> str:
    # fail, never skip: a machine without poppler-utils must not pass these tests unread
    assert shutil.which(args[0]), f"{args[0]} missing: scripts/setup.sh installs poppler-utils"
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout


def pdf_text(path: Path) -> str:
    return poppler("pdftotext", "-layout", str(path), "-")


def pdf_pages(path: Path) -> int:
    match = re.search(r"^Pages:\s+(\d+)$", poppler("pdfinfo", str(path)), re.MULTILINE)
    assert match
    return int(match[1])


def page_footers(text: str) -> list[tuple[int, int]]:
    # pdftotext may drop the narrow spaces of "第 1 页 / 共 3 页"
    found = re.findall(r"第\s*(\d+)\s*页\s*/\s*共\s*(\d+)\s*页", text)
    return [(int(n), int(m)) for n, m in found]


def read_csv(data: bytes) -> list[list[str]]:
    return list(csv.reader(io.StringIO(data.decode("utf-8-sig"))))


# --- the fixtures themselves --------------------------------------------------------------------


def test_fixtures_are_consistent_statements(rsj: ExportStatement, gaj: ExportStatement):
    for s in (rsj, gaj):
        assert sum(line.amount for line in s.lines) == s.subtotal_amount
        assert s.subtotal_amount - s.discount_amount == s.total_amount
    assert rsj.total_amount > 100_000  # over 1,000 yuan, so the PDF shows a thousands separator
    assert len(gaj.lines) == 120


# --- shared display values ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fen", "grouped", "plain"),
    [
        (0, "0.00", "0.00"),
        (1, "0.01", "0.01"),
        (5, "0.05", "0.05"),
        (99, "0.99", "0.99"),
        (100, "1.00", "1.00"),
        (123456, "1,234.56", "1234.56"),
        (123456789, "1,234,567.89", "1234567.89"),
        (-5, "-0.05", "-0.05"),
        (-1234, "-12.34", "-12.34"),
        (-123456789, "-1,234,567.89", "-1234567.89"),
    ],
)
def test_fen_are_shown_as_exact_yuan(fen: int, grouped: str, plain: str):
    assert format_yuan(fen) == grouped
    assert format_yuan(fen, grouping=False) == plain
    assert yuan(fen) == Decimal(fen) / 100
    assert str(yuan(fen)) == plain


@pytest.mark.parametrize(
    ("fen_price", "shown"),
    [
        (Decimal("3.5"), "0.035"),
        (Decimal("100"), "1.00"),
        (Decimal("250.000000"), "2.50"),
        (Decimal("0"), "0.00"),
        (Decimal("0.000001"), "0.00000001"),
        (Decimal("0.833333"), "0.00833333"),
        (Decimal("12.345678"), "0.12345678"),
    ],
)
def test_unit_prices_keep_their_sub_fen_digits_in_yuan(fen_price: Decimal, shown: str):
    assert f"{unit_price_yuan(fen_price):f}" == shown


@pytest.mark.parametrize(
    ("seconds", "hours"),
    [(0, "0.00"), (17, "0.00"), (18, "0.01"), (3600, "1.00"), (5399, "1.50"), (OCTOBER, "744.00")],
)
def test_hours_are_rounded_half_up_to_two_decimals(seconds: int, hours: str):
    assert str(hours_of(seconds)) == hours


def test_class_names_come_from_the_catalog_then_built_ins_then_the_code():
    catalog = {"vcpu": "虚拟CPU", "gpu.a10": "GPU（A10）"}
    assert class_display_name("vcpu", catalog) == "虚拟CPU"
    assert class_display_name("gpu.a10", catalog) == "GPU（A10）"
    assert class_display_name("vcpu") == "vCPU"
    assert class_display_name("memory_mb", catalog) == "内存"
    assert class_display_name("storage_gb.ssd") == "存储（ssd）"
    assert class_display_name("storage_gb.nvme") == "存储（nvme）"
    assert class_display_name("public_ip") == "公网IP"
    assert class_display_name("bandwidth_mbps") == "带宽"
    assert class_display_name("gpu.a10") == "gpu.a10"
    assert class_display_name("storage_gb") == "storage_gb"


def test_months_read_in_chinese():
    assert format_month("2026-10") == "2026年10月"
    assert format_month("2026-03") == "2026年3月"
    assert format_month("next") == "next"


def test_adjusted_total_adds_debits_and_takes_off_credits(rsj: ExportStatement):
    assert adjusted_total_amount(rsj) == rsj.total_amount - 5000 + 250


def test_exports_refuse_a_naive_generation_time_or_another_currency(rsj: ExportStatement):
    naive = replace(rsj, generated_at=datetime(2026, 11, 1, 9, 30))  # noqa: DTZ001
    for export in (to_csv, to_xlsx, to_pdf):
        with pytest.raises(ValueError, match="timezone-aware"):
            export([naive])
        with pytest.raises(ValueError, match="CNY only"):
            export([replace(rsj, currency="USD")])


AWKWARD_FEN = (0, 1, 5, 99, 100, 123456789, 123456789012, -1234)


def test_awkward_amounts_reach_every_format_to_the_fen(rsj: ExportStatement, tmp_path: Path):
    lines = tuple(
        ExportLine(f"srv-{i}", "vcpu", 1, 3600, Decimal(1), fen)
        for i, fen in enumerate(AWKWARD_FEN)
    )
    s = statement(lines, Decimal("0"))
    csv_amounts = [r[12] for r in read_csv(to_csv([s])) if r[0] == "明细"]
    assert csv_amounts == [format_yuan(fen, grouping=False) for fen in AWKWARD_FEN]
    ws = load(to_xlsx([s])).active
    assert ws is not None
    header = find(ws, "金额（元）")
    cells = [ws.cell(row=header.row + 1 + i, column=header.column) for i in range(len(lines))]
    # a double holds a two-decimal value of up to 15 digits exactly
    assert [Decimal(str(c.value)) for c in cells] == [Decimal(fen) / 100 for fen in AWKWARD_FEN]
    path = tmp_path / "awkward.pdf"
    path.write_bytes(to_pdf([s]))
    text = pdf_text(path)
    for expected in ("0.05", "0.99", "1.00", "1,234,567.89", "1,234,567,890.12", "-12.34"):
        assert re.search(rf"(?<![\d,.-]){re.escape(expected)}(?![\d,.])", text), expected


# --- CSV ----------------------------------------------------------------------------------------


def test_csv_is_utf8_with_bom_and_names_agency_contract_and_total(
    rsj: ExportStatement, gaj: ExportStatement
):
    data = to_csv([rsj, gaj])
    assert data.startswith(b"\xef\xbb\xbf")
    rows = read_csv(data)
    assert tuple(rows[0]) == CSV_HEADER
    text = data.decode("utf-8-sig")
    assert "市人力资源和社会保障局" in text and "市公安局" in text
    assert "HT-2026-RSJ-001" in text and "HT-2026-GAJ-003" in text
    totals = {(r[3], r[12]) for r in rows if r[0] == "合计"}
    assert totals == {
        ("HT-2026-RSJ-001", format_yuan(rsj.total_amount, grouping=False)),
        ("HT-2026-GAJ-003", format_yuan(gaj.total_amount, grouping=False)),
    }


def test_csv_line_amounts_add_up_to_each_subtotal(rsj: ExportStatement, gaj: ExportStatement):
    rows = read_csv(to_csv([rsj, gaj]))
    for s in (rsj, gaj):
        mine = [r for r in rows[1:] if r[3] == s.contract_number]
        details = [r for r in mine if r[0] == "明细"]
        assert len(details) == len(s.lines)
        (subtotal,) = [r for r in mine if r[0] == "小计"]
        (discount,) = [r for r in mine if r[0] == "折扣"]
        (total,) = [r for r in mine if r[0] == "合计"]
        assert (
            sum(Decimal(r[12]) for r in details) == Decimal(subtotal[12]) == yuan(s.subtotal_amount)
        )
        assert Decimal(discount[12]) == -yuan(s.discount_amount)
        assert discount[13] == f"折扣率 {s.discount_pct}%"
        assert Decimal(subtotal[12]) + Decimal(discount[12]) == Decimal(total[12])


def test_csv_lines_show_class_names_memory_in_gib_hours_and_prices(rsj: ExportStatement):
    rows = read_csv(to_csv([rsj], {"vcpu": "虚拟CPU"}))
    by_server_class = {(r[5], r[6]): r for r in rows if r[0] == "明细"}
    memory = by_server_class[("rsj-web-01", "内存")]
    assert memory[8:12] == ["16", "GiB", "744.00", "0.0125"]
    assert by_server_class[("社保查询前置机", "内存")][8:11] == ["1.5", "GiB", "240.50"]
    assert by_server_class[("rsj-web-01", "存储（ssd）")][8:10] == ["200", "GB"]
    assert by_server_class[("rsj-web-01", "带宽")][11] == "0.00833333"
    (cap,) = [r for r in rows if r[7] == "封顶减免"]
    # its amount is the gap to the cap, not quantity × hours × price, so those are left out
    assert cap[5] == "社保查询前置机" and cap[8:13] == ["", "", "240.50", "", "-12.34"]
    assert ("rsj-web-01", "虚拟CPU") in by_server_class


def test_csv_lists_adjustments_and_the_adjusted_total(rsj: ExportStatement):
    rows = read_csv(to_csv([rsj]))
    credit = next(r for r in rows if r[0] == "调减（贷项）")
    debit = next(r for r in rows if r[0] == "调增（借项）")
    adjusted = next(r for r in rows if r[0] == "调整后合计")
    assert credit[12] == "-50.00" and "按SLA减免" in credit[13] and "王芳" in credit[13]
    assert debit[12] == "2.50"
    assert Decimal(adjusted[12]) == yuan(rsj.total_amount - 5000 + 250)


def test_csv_quotes_text_that_excel_would_run_as_a_formula(rsj: ExportStatement):
    evil = ExportLine('=HYPERLINK("http://x","点我")', "vcpu", 1, 3600, Decimal(1), 1)
    rows = read_csv(to_csv([replace(rsj, lines=(evil,))]))
    (line,) = [r for r in rows if r[0] == "明细"]
    assert line[5] == "'" + evil.server_name
    # amounts are numbers, so a negative one stays as it is
    assert next(r for r in rows if r[0] == "折扣")[12].startswith("-")


# --- XLSX ---------------------------------------------------------------------------------------


def load(data: bytes) -> openpyxl.Workbook:
    return openpyxl.load_workbook(io.BytesIO(data))


def find(ws, value: str):
    for row in ws.iter_rows():
        for cell in row:
            if cell.value == value:
                return cell
    raise AssertionError(f"{value!r} not on sheet {ws.title}")


def right_of(ws, cell, offset: int = 1):
    return ws.cell(row=cell.row, column=cell.column + offset)


def test_xlsx_has_one_sheet_per_statement_named_by_contract_number(
    rsj: ExportStatement, gaj: ExportStatement
):
    wb = load(to_xlsx([rsj, gaj]))
    assert wb.sheetnames == ["HT-2026-RSJ-001", "HT-2026-GAJ-003"]
    ws = wb["HT-2026-RSJ-001"]
    assert right_of(ws, find(ws, "委办局")).value == "市人力资源和社会保障局"
    assert right_of(ws, find(ws, "合同编号")).value == "HT-2026-RSJ-001"
    assert right_of(ws, find(ws, "账期")).value == "2026年10月"
    assert right_of(ws, find(ws, "状态")).value == "已定稿"
    assert right_of(ws, find(ws, "生成时间")).value == "2026-11-01 09:30:00（北京时间）"
    assert right_of(ws, find(ws, "内容摘要（SHA-256）")).value == rsj.content_hash
    draft = wb["HT-2026-GAJ-003"]
    assert right_of(draft, find(draft, "状态")).value == "草稿"
    assert all(cell.value != "内容摘要（SHA-256）" for row in draft.iter_rows() for cell in row)


def test_xlsx_totals_are_the_exact_yuan_billing_computed(rsj: ExportStatement):
    ws = load(to_xlsx([rsj])).active
    assert ws is not None
    for label, fen in [
        ("小计（元）", rsj.subtotal_amount),
        ("折扣（元）", -rsj.discount_amount),
        ("合计（元）", rsj.total_amount),
        ("调整后合计（元）", adjusted_total_amount(rsj)),
    ]:
        cell = right_of(ws, find(ws, label))
        assert cell.data_type == "n" and cell.number_format == YUAN_FORMAT
        assert Decimal(str(cell.value)) == Decimal(fen) / 100
    pct = right_of(ws, find(ws, "折扣率"))
    assert Decimal(str(pct.value)) == Decimal("0.05") and pct.number_format == "0.00%"


def test_xlsx_line_table_has_bold_header_frozen_panes_and_number_formats(rsj: ExportStatement):
    ws = load(to_xlsx([rsj])).active
    assert ws is not None
    header = find(ws, "金额（元）")
    assert header.font.b and find(ws, "服务器").font.b
    assert ws.freeze_panes == f"A{header.row + 1}"
    assert ws.print_title_rows == f"${header.row}:${header.row}"
    assert ws.page_setup.orientation == "landscape"
    assert ws.column_dimensions["A"].width >= 20
    first = header.row + 1
    rows = list(ws.iter_rows(min_row=first, max_row=first + len(rsj.lines) - 1))
    amounts = [row[header.column - 1] for row in rows]
    assert all(c.number_format == YUAN_FORMAT for c in amounts)
    assert sum(Decimal(str(c.value)) for c in amounts) == yuan(rsj.subtotal_amount)
    assert rows[0][5].number_format == "0.00" and rows[0][5].value == 744
    assert rows[1][1].value == "内存" and rows[1][3].value == 16 and rows[1][4].value == "GiB"
    cap = next(row for row in rows if row[2].value == "封顶减免")
    assert Decimal(str(cap[header.column - 1].value)) == Decimal("-12.34")
    assert cap[3].value is None and cap[6].value is None


def test_xlsx_sheet_names_are_made_valid_and_unique(rsj: ExportStatement):
    long_number = "HT/2026:RSJ*[01]?" + "X" * 40
    sheets = [
        replace(rsj, contract_number=long_number),
        replace(rsj, contract_number=long_number, month="2026-11"),
        replace(rsj, contract_number=long_number, month="2026-11"),
        replace(rsj, contract_number="'"),
    ]
    names = load(to_xlsx(sheets)).sheetnames
    assert len({n.casefold() for n in names}) == 4
    for name in names:
        assert len(name) <= 31 and not set(name) & set("[]:*?/\\")
    assert names[0].startswith("HT_2026_RSJ__01__")
    assert names[1].endswith(" 2026-11") and names[2].endswith(" (2)")
    assert names[3] == "结算单"


def test_xlsx_keeps_formula_like_names_as_text(rsj: ExportStatement):
    evil = ExportLine("=cmd|' /C calc'!A0", "vcpu", 1, 3600, Decimal(1), 1)
    ws = load(to_xlsx([replace(rsj, lines=(evil,))])).active
    assert ws is not None
    cell = find(ws, evil.server_name)
    assert cell.data_type == "s"


def test_csv_and_xlsx_bytes_depend_only_on_the_statements(
    rsj: ExportStatement, gaj: ExportStatement
):
    with time_machine.travel(datetime(2030, 1, 1, tzinfo=UTC), tick=False):
        first = (to_csv([rsj, gaj]), to_xlsx([rsj, gaj]))
    with time_machine.travel(datetime(2031, 6, 15, 12, 34, 56, tzinfo=UTC), tick=False):
        second = (to_csv([rsj, gaj]), to_xlsx([rsj, gaj]))
    assert first == second


def test_nothing_to_export_gives_a_header_or_an_empty_document():
    assert read_csv(to_csv([])) == [list(CSV_HEADER)]
    assert load(to_xlsx([])).sheetnames == ["结算单"]
    assert to_pdf([]).startswith(b"%PDF")


# --- PDF ----------------------------------------------------------------------------------------


def test_pdf_shows_agency_contract_and_total(rsj: ExportStatement, tmp_path: Path):
    path = tmp_path / "rsj.pdf"
    path.write_bytes(to_pdf([rsj]))
    text = pdf_text(path)
    assert "政务云服务费用结算单" in text
    for expected in (
        "市人力资源和社会保障局",
        "HT-2026-RSJ-001",
        "2026年度政务云计算资源服务合同",
        "星河政务云服务有限公司",
        "2026年10月",
        "已定稿",
        format_yuan(rsj.total_amount),
        format_yuan(rsj.subtotal_amount),
        format_yuan(adjusted_total_amount(rsj)),
        "-12.34",
        "按SLA减免",
        rsj.content_hash,
    ):
        assert expected in text, expected
    assert "," in format_yuan(rsj.total_amount)
    pages = pdf_pages(path)
    assert page_footers(text) == [(n, pages) for n in range(1, pages + 1)]


def test_pdf_of_a_long_statement_spans_pages_numbered_of_the_total(
    gaj: ExportStatement, tmp_path: Path
):
    path = tmp_path / "gaj.pdf"
    path.write_bytes(to_pdf([gaj]))
    text = pdf_text(path)
    pages = pdf_pages(path)
    assert pages >= 2
    assert page_footers(text) == [(n, pages) for n in range(1, pages + 1)]
    # the table header is repeated on every page and every line is there
    assert text.count("单价（元/单位·小时）") == pages
    assert all(f"gaj-node-{n:02d}" in text for n in range(1, 31))
    assert format_yuan(gaj.total_amount) in text and "草稿" in text
    assert "内容摘要" not in text  # drafts have no content hash


def test_pdf_numbers_pages_per_statement_each_on_new_pages(
    rsj: ExportStatement, gaj: ExportStatement, tmp_path: Path
):
    counts = {}
    for name, s in (("rsj", rsj), ("gaj", gaj)):
        alone = tmp_path / f"{name}.pdf"
        alone.write_bytes(to_pdf([s]))
        counts[name] = pdf_pages(alone)
    path = tmp_path / "both.pdf"
    path.write_bytes(to_pdf([rsj, gaj]))
    footers = page_footers(pdf_text(path))
    assert footers == [(n, counts[name]) for name in counts for n in range(1, counts[name] + 1)]
    assert pdf_pages(path) == counts["rsj"] + counts["gaj"]


def test_pdf_prints_markup_like_names_as_they_are(rsj: ExportStatement, tmp_path: Path):
    odd = ExportLine("<b>db&amp;1</b>", "vcpu", 1, 3600, Decimal(1), 1)
    path = tmp_path / "odd.pdf"
    path.write_bytes(to_pdf([replace(rsj, lines=(odd,))]))
    assert "<b>db&amp;1</b>" in pdf_text(path)


def test_pdf_first_page_renders_to_an_image(gaj: ExportStatement, tmp_path: Path):
    path = tmp_path / "gaj.pdf"
    path.write_bytes(to_pdf([gaj]))
    poppler("pdftoppm", "-png", "-r", "80", "-f", "1", "-l", "1", str(path), str(tmp_path / "p"))
    (png,) = tmp_path.glob("p*.png")
    assert png.read_bytes().startswith(b"\x89PNG") and png.stat().st_size > 20_000
