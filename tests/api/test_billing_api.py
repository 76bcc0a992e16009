"""The billing API (统采分签) over HTTP: price catalogs, contracts, statements, credit and debit
notes, exports and the center's views, on SQLite and PostgreSQL.

Who may do what is in test_authorization_matrix.py (BILLING); here: the month's flow end to end
as finance lives it, the files it downloads, and bad input, which must be an RFC 9457 problem
naming the field and leave every billing table as it was.

The month used throughout (tests/fixtures/clock.py puts "now" at 2026-11-02 09:00 Beijing time,
so October is over): one price list from 2026-10-01 (vCPU-hour 10 fen, GiB-hour of memory 5,
SSD GB-hour 0.1, public IP-hour 2) and
- agency a, contract HT-甲-2026-001 (discount 5 %, budget 13.00 yuan): web-1 in system a1 with
  2 vCPU, 4 GiB, 40 GB SSD and one IP from 10-05 08:00 to 10-06 08:00, 24 hours:
  vCPU 2×10×24 = 480, memory 4×5×24 = 480, SSD 40×0.1×24 = 96, IP 2×24 = 48; subtotal 1104,
  discount 5 % = 55.2 → 55, total 1049 fen (80.69 % of the budget: the 80 % alert, not 100 %);
- agency b, contract HT-乙-2026-001 (no discount): db-1 in system b1 with 1 vCPU and 1 GiB from
  10-10 00:00 to 10:00: vCPU 1×10×10 = 100, memory 1×5×10 = 50; total 150 fen.
"""

from __future__ import annotations

import io
import re
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openpyxl import load_workbook

from billing.models import Contract, LifecycleKind
from tests.api.answers import PROBLEM, ok, problem, table_rows
from tests.fixtures.billing import BILLING_TABLES, BillingWorld, local, make_world

# bad input must not even leave an audit event behind
WATCHED_TABLES = [*BILLING_TABLES, "audit_event"]
PRICES = [
    {"resource_class": "vcpu", "unit_price": "10"},
    {"resource_class": "memory_mb", "unit_price": "5"},
    {"resource_class": "storage_gb.ssd", "unit_price": "0.1"},
    {"resource_class": "public_ip", "unit_price": "2"},
]
WEB_1 = {"vcpu": 2, "memory_mb": 4096, "storage_gb.ssd": 40, "public_ip": 1, "instances": 1}
DB_1 = {"vcpu": 1, "memory_mb": 1024, "instances": 1}
A_TOTALS = {"subtotal_amount": 1104, "discount_amount": 55, "total_amount": 1049}
B_TOTALS = {"subtotal_amount": 150, "discount_amount": 0, "total_amount": 150}
NUMBER_A, NUMBER_B = "HT-甲-2026-001", "HT-乙-2026-001"
XLSX = "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"
CREDIT = {"kind": "credit", "amount": 100, "reason": "10月5日网络中断两小时，按合同减免"}


def catalog_body(effective_from: str = "2026-10-01", **changes: Any) -> dict[str, Any]:
    body = {"name": f"价目表 {effective_from}", "effective_from": effective_from, "items": PRICES}
    return body | changes


def contract_body(world: BillingWorld, number: str, agency: str, **changes: Any) -> dict[str, Any]:
    return {
        "number": number,
        "title": f"政务云服务合同 {number}",
        "agency_id": str(world.estate.tid(agency)),
        "service_company_id": str(world.company_id),
        "signed_on": "2026-09-20",
        "starts_on": "2026-10-01",
        "ends_on": "2027-09-30",
        "budget_amount": 100_000_00,
        "billing_contact": "财务科 010-12345678",
    } | changes


@dataclass
class October:
    world: BillingWorld
    catalog: dict[str, Any]
    contract_a: dict[str, Any]
    contract_b: dict[str, Any]

    @property
    def catalogs_path(self) -> str:
        return f"/api/v1/service-companies/{self.world.company_id}/price-catalogs"


def contract_row(world: BillingWorld, contract_id: str) -> Contract:
    with world.db.unit_of_work(write=False) as s:
        row = s.get(Contract, uuid.UUID(contract_id))
        assert row is not None
        return row


@pytest.fixture
def october(db, estate, clients, clock) -> October:  # type: ignore[no-untyped-def]
    """The month of the module docstring: the price list and both contracts made over HTTP by
    the center administrator, the servers' lifecycle events written as provisioning would."""
    world = make_world(db, estate)
    admin = clients["admin"]
    path = f"/api/v1/service-companies/{world.company_id}/price-catalogs"
    catalog = ok(admin.post(path, json=catalog_body()), 201)
    contract_a = ok(
        admin.post(
            "/api/v1/contracts",
            json=contract_body(world, NUMBER_A, "a", budget_amount=1300, discount_pct="5"),
        ),
        201,
    )
    contract_b = ok(admin.post("/api/v1/contracts", json=contract_body(world, NUMBER_B, "b")), 201)
    a, b = contract_row(world, contract_a["id"]), contract_row(world, contract_b["id"])
    world.server("web-1", tenant="a1")
    world.event("web-1", LifecycleKind.created, local(2026, 10, 5, 8), WEB_1, contract=a)
    world.event("web-1", LifecycleKind.deleted, local(2026, 10, 6, 8), {}, contract=a)
    world.server("db-1", tenant="b1")
    kw: dict[str, Any] = {"contract": b, "tenant": "b1", "agency": "b"}
    world.event("db-1", LifecycleKind.created, local(2026, 10, 10), DB_1, **kw)
    world.event("db-1", LifecycleKind.deleted, local(2026, 10, 10, 10), {}, **kw)
    return October(world, catalog, contract_a, contract_b)


def generate(client: Any, month: str = "2026-10", **filters: Any) -> dict[str, dict[str, Any]]:
    """The month's statements (drafted or left final), by contract id."""
    page = ok(client.post("/api/v1/statements/generate", json={"month": month, **filters}))
    assert page["count"] == len(page["data"])
    return {s["contract_id"]: s for s in page["data"]}


@pytest.fixture
def finalized(october: October, clients) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """October generated and agency a's statement finalized by center finance; b's a draft."""
    drafts = generate(clients["finance"])
    statement = drafts[october.contract_a["id"]]
    return ok(clients["finance"].post(f"/api/v1/statements/{statement['id']}/finalize"))


# --- the month's flow ---------------------------------------------------------------------------


def test_catalog_and_contract_are_made_over_http_as_given(october: October, clients):
    catalog = october.catalog
    assert catalog["version"] == 1 and catalog["effective_until"] is None
    # the first day in Beijing time begins at 16:00 UTC the day before
    assert catalog["effective_from"].startswith("2026-09-30T16:00:00")
    assert {i["resource_class"]: i["unit_price"] for i in catalog["items"]} == {
        "memory_mb": "5.000000",
        "public_ip": "2.000000",
        "storage_gb.ssd": "0.100000",
        "vcpu": "10.000000",
    }
    listed = ok(clients["a-member"].get(october.catalogs_path))
    assert [c["id"] for c in listed["data"]] == [catalog["id"]]
    assert (
        ok(clients["b-member"].get(f"/api/v1/price-catalogs/{catalog['id']}"))["id"]
        == (catalog["id"])
    )
    contract = october.contract_a
    assert (contract["number"], contract["status"], contract["currency"]) == (
        NUMBER_A,
        "active",
        "CNY",
    )
    assert (contract["budget_amount"], float(contract["discount_pct"])) == (1300, 5.0)


def test_a_new_price_version_closes_the_one_before(october: October, clients):
    newer = ok(clients["admin"].post(october.catalogs_path, json=catalog_body("2027-01-01")), 201)
    assert newer["version"] == 2
    first = ok(clients["finance"].get(f"/api/v1/price-catalogs/{october.catalog['id']}"))
    assert first["effective_until"] == newer["effective_from"]
    listed = ok(clients["a-admin"].get(october.catalogs_path))
    assert [c["version"] for c in listed["data"]] == [1, 2]


def test_finance_generates_finalizes_and_adjusts_the_month(october: October, clients):
    finance, admin = clients["finance"], clients["admin"]
    drafts = generate(finance)
    a, b = drafts[october.contract_a["id"]], drafts[october.contract_b["id"]]
    assert {k: a[k] for k in A_TOTALS} == A_TOTALS
    assert {k: b[k] for k in B_TOTALS} == B_TOTALS
    assert (a["state"], a["content_hash"], a["line_count"]) == ("draft", None, 4)
    assert a["agency_id"] == str(october.world.estate.tid("a"))

    detail = ok(finance.get(f"/api/v1/statements/{a['id']}"))
    assert {ln["resource_class"]: ln["amount"] for ln in detail["lines"]} == {
        "vcpu": 480,
        "memory_mb": 480,
        "storage_gb.ssd": 96,
        "public_ip": 48,
    }
    assert {ln["seconds"] for ln in detail["lines"]} == {24 * 3600}
    assert sum(ln["amount"] for ln in detail["lines"]) == detail["subtotal_amount"]
    assert detail["adjusted_total_amount"] == 1049 and detail["adjustments"] == []

    final = ok(finance.post(f"/api/v1/statements/{a['id']}/finalize"))
    assert final["state"] == "final" and final["finalized_by"] == "finance"
    assert re.fullmatch(r"[0-9a-f]{64}", final["content_hash"] or "")
    assert {k: final[k] for k in A_TOTALS} == A_TOTALS
    # a second run of the month leaves the final statement as it is, hash and all
    again = generate(finance)
    assert again[october.contract_a["id"]]["content_hash"] == final["content_hash"]
    assert again[october.contract_a["id"]]["state"] == "final"
    assert again[october.contract_b["id"]]["state"] == "draft"

    note = ok(finance.post(f"/api/v1/statements/{a['id']}/adjustments", json=CREDIT), 201)
    assert (note["state"], note["requested_by"], note["amount"]) == ("proposed", "finance", 100)
    proposed = ok(finance.get(f"/api/v1/statements/{a['id']}"))
    assert proposed["adjusted_total_amount"] == 1049  # not approved yet
    problem(finance.post(f"/api/v1/adjustments/{note['id']}/approve"), 403)
    approved = ok(admin.post(f"/api/v1/adjustments/{note['id']}/approve"))
    assert (approved["state"], approved["decided_by"]) == ("approved", "admin")
    problem(admin.post(f"/api/v1/adjustments/{note['id']}/reject"), 409)

    after = ok(clients["a-finance"].get(f"/api/v1/statements/{a['id']}"))
    assert after["total_amount"] == 1049 and after["adjusted_total_amount"] == 949
    assert after["content_hash"] == final["content_hash"]
    assert [n["id"] for n in after["adjustments"]] == [note["id"]]
    # the center's spend view counts the approved note, as the burn-down does
    spent = ok(admin.get("/api/v1/billing/spend", params={"month_from": "2026-10"}))["data"]
    by_agency = {r["agency_id"]: r["total_amount"] for r in spent}
    assert by_agency[a["agency_id"]] == 949


def test_a_rejected_note_changes_nothing(finalized, clients):
    sid = finalized["id"]
    note = ok(clients["admin"].post(f"/api/v1/statements/{sid}/adjustments", json=CREDIT), 201)
    rejected = ok(clients["finance"].post(f"/api/v1/adjustments/{note['id']}/reject"))
    assert (rejected["state"], rejected["decided_by"]) == ("rejected", "finance")
    assert ok(clients["admin"].get(f"/api/v1/statements/{sid}"))["adjusted_total_amount"] == 1049


def test_agency_finance_sees_its_own_statements_and_not_the_other_agencys(october, clients):
    drafts = generate(clients["finance"])
    a, b = drafts[october.contract_a["id"]], drafts[october.contract_b["id"]]
    mine = ok(clients["a-finance"].get("/api/v1/statements", params={"month": "2026-10"}))
    assert [s["id"] for s in mine["data"]] == [a["id"]]
    assert ok(clients["a-finance"].get(f"/api/v1/statements/{a['id']}"))["id"] == a["id"]
    problem(clients["a-finance"].get(f"/api/v1/statements/{b['id']}"), 404)
    problem(clients["a-finance"].get(f"/api/v1/statements/{b['id']}/export"), 404)
    everything = ok(clients["finance"].get("/api/v1/statements"))
    assert {s["id"] for s in everything["data"]} == {a["id"], b["id"]}
    contracts = ok(clients["a-finance"].get("/api/v1/contracts"))
    assert [c["number"] for c in contracts["data"]] == [NUMBER_A]


@pytest.mark.parametrize(
    ("user", "agencies"),
    [
        ("admin", {"a", "b"}),
        ("auditor", {"a", "b"}),
        ("finance", {"a", "b"}),
        ("a-admin", {"a"}),
        ("a-finance", {"a"}),
        ("a-auditor", {"a"}),
        ("a-member", set()),
        ("b-admin", {"b"}),
        ("b-member", set()),
    ],
)
def test_statement_and_contract_lists_show_what_billing_read_covers(
    user, agencies, october, clients
):
    generate(clients["finance"])
    agency_of = {str(october.world.estate.tid(c)): c for c in ("a", "b")}
    statements = ok(clients[user].get("/api/v1/statements"))["data"]
    assert {agency_of[s["agency_id"]] for s in statements} == agencies
    contracts = ok(clients[user].get("/api/v1/contracts"))["data"]
    assert {agency_of[c["agency_id"]] for c in contracts} == agencies


def test_burndown_shows_the_spend_and_the_80_percent_alert(finalized, october, clients):
    path = f"/api/v1/contracts/{october.contract_a['id']}/burndown"
    burn = ok(clients["a-admin"].get(path))
    assert (burn["number"], burn["budget_amount"], burn["spent_amount"]) == (NUMBER_A, 1300, 1049)
    assert (burn["remaining_amount"], burn["spent_pct"]) == (251, "80.69")
    assert burn["months"] == [
        {"month": "2026-10", "state": "final", "amount": 1049, "cumulative_amount": 1049}
    ]
    assert [(x["threshold_pct"], x["spent_amount"]) for x in burn["alerts"]] == [(80, 1049)]
    roomy = ok(clients["auditor"].get(f"/api/v1/contracts/{october.contract_b['id']}/burndown"))
    assert roomy["spent_amount"] == 150 and roomy["alerts"] == []


def test_spend_groups_by_agency_company_and_month(october, clients):
    generate(clients["finance"])
    rows = ok(clients["auditor"].get("/api/v1/billing/spend"))["data"]
    company = str(october.world.company_id)
    tid = october.world.estate.tid
    assert sorted(
        (r["agency_id"], r["service_company_id"], r["month"], r["statements"], r["total_amount"])
        for r in rows
    ) == sorted(
        [
            (str(tid("a")), company, "2026-10", 1, 1049),
            (str(tid("b")), company, "2026-10", 1, 150),
        ]
    )
    later = ok(clients["admin"].get("/api/v1/billing/spend", params={"month_from": "2026-11"}))
    assert later["data"] == []
    for user in ("a-admin", "a-finance", "b-admin"):
        problem(clients[user].get("/api/v1/billing/spend"), 403)


def test_usage_no_contract_pays_for_is_shown_to_the_center(october, clients):
    w = october.world
    w.server("loose", tenant=None)
    w.event(
        "loose", LifecycleKind.created, local(2026, 10, 1), {"vcpu": 1}, tenant=None, agency=None
    )
    w.event("loose", LifecycleKind.deleted, local(2026, 10, 1, 3), {}, tenant=None, agency=None)
    generate(clients["finance"])
    rows = ok(clients["finance"].get("/api/v1/billing/unassigned", params={"month": "2026-10"}))
    assert [
        (r["server_name"], r["resource_class"], r["seconds"], r["amount"]) for r in rows["data"]
    ] == [("loose", "vcpu", 3 * 3600, 30)]
    problem(clients["a-admin"].get("/api/v1/billing/unassigned", params={"month": "2026-10"}), 403)


# --- exports ------------------------------------------------------------------------------------


def _pdf_text(content: bytes, tmp_path: Path) -> str:
    pdf = tmp_path / "statement.pdf"
    pdf.write_bytes(content)
    done = subprocess.run(
        ["pdftotext", "-layout", str(pdf), "-"], capture_output=True, check=True, timeout=60
    )
    return done.stdout.decode()


def _download(resp: Any, media: str, stem: str) -> bytes:
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith(media), resp.headers
    disposition = resp.headers["content-disposition"]
    assert disposition.startswith("attachment;")
    # the ASCII fallback and the exact UTF-8 name (RFC 6266 / RFC 5987)
    assert f"filename*=UTF-8''{quote(stem)}" in disposition, disposition
    assert all(ord(ch) < 128 for ch in disposition)
    return resp.content  # type: ignore[no-any-return]


def test_one_statement_downloads_as_csv_xlsx_and_pdf(finalized, tmp_path, clients):
    client, sid = clients["a-finance"], finalized["id"]
    url = f"/api/v1/statements/{sid}/export"

    body = _download(
        client.get(url, params={"format": "csv"}), "text/csv", f"{NUMBER_A}-2026-10.csv"
    )
    assert body.startswith(b"\xef\xbb\xbf")
    text = body.decode("utf-8-sig")
    assert NUMBER_A in text and "甲局" in text and "10.49" in text

    body = _download(client.get(url, params={"format": "xlsx"}), XLSX, f"{NUMBER_A}-2026-10.xlsx")
    book = load_workbook(io.BytesIO(body))
    assert len(book.sheetnames) == 1
    cells = [c for row in book.worksheets[0].iter_rows(values_only=True) for c in row if c]
    assert NUMBER_A in cells and "甲局" in cells

    body = _download(client.get(url), "application/pdf", f"{NUMBER_A}-2026-10.pdf")
    assert body.startswith(b"%PDF")
    text = _pdf_text(body, tmp_path)
    assert "甲局" in text and NUMBER_A in text and "10.49" in text


def test_the_month_downloads_as_one_workbook_with_a_sheet_per_contract(finalized, clients):
    resp = clients["finance"].get(
        "/api/v1/statements/export", params={"month": "2026-10", "format": "xlsx"}
    )
    book = load_workbook(io.BytesIO(_download(resp, XLSX, "statements-2026-10.xlsx")))
    assert len(book.sheetnames) == 2
    numbers = set()
    for sheet in book.worksheets:
        cells = {c for row in sheet.iter_rows(values_only=True) for c in row if c}
        numbers |= cells & {NUMBER_A, NUMBER_B}
    assert numbers == {NUMBER_A, NUMBER_B}
    # an agency's own finance gets a workbook of its own statements only
    own = clients["a-finance"].get(
        "/api/v1/statements/export", params={"month": "2026-10", "format": "csv"}
    )
    text = _download(own, "text/csv", "statements-2026-10.csv").decode("utf-8-sig")
    assert NUMBER_A in text and NUMBER_B not in text


def test_exports_carry_approved_notes_only(finalized, clients):
    sid = finalized["id"]
    note = ok(clients["finance"].post(f"/api/v1/statements/{sid}/adjustments", json=CREDIT), 201)
    url = f"/api/v1/statements/{sid}/export"
    before = clients["admin"].get(url, params={"format": "csv"}).content.decode("utf-8-sig")
    assert CREDIT["reason"] not in before
    ok(clients["admin"].post(f"/api/v1/adjustments/{note['id']}/approve"))
    after = clients["admin"].get(url, params={"format": "csv"}).content.decode("utf-8-sig")
    assert CREDIT["reason"] in after and "9.49" in after


def test_contract_numbers_with_quotes_or_breaks_give_a_well_formed_file_name(october, clients):
    """A contract number is free text; the header must still be one well-formed line."""
    odd = 'HT "2026" 甲;\tx'
    made = ok(
        clients["admin"].post(
            "/api/v1/contracts", json=contract_body(october.world, odd, "a", starts_on="2026-10-02")
        ),
        201,
    )
    generate(clients["finance"], contract_id=made["id"])
    (sid,) = [
        s["id"]
        for s in ok(clients["finance"].get("/api/v1/statements"))["data"]
        if s["contract_id"] == made["id"]
    ]
    resp = clients["finance"].get(f"/api/v1/statements/{sid}/export", params={"format": "csv"})
    assert resp.status_code == 200
    disposition = resp.headers["content-disposition"]
    fallback = re.fullmatch(
        r'attachment; filename="([^"]*)"; filename\*=UTF-8\'\'(\S+)', disposition
    )
    assert fallback is not None, disposition
    assert all(32 <= ord(ch) < 127 for ch in fallback[1]), disposition


# --- bad input: a problem naming the field, nothing written -------------------------------------


def refused(
    db: Any, client: Any, method: str, path: str, status: int, field: str | None, **kwargs: Any
) -> dict[str, Any]:
    before = table_rows(db, WATCHED_TABLES)
    body = problem(client.request(method, path, **kwargs), status, field)
    assert table_rows(db, WATCHED_TABLES) == before, f"{method} {path} was refused but wrote"
    return body


def one_item(**item: Any) -> dict[str, Any]:
    """Catalog changes: a single item, vCPU at 10 fen unless `item` says otherwise."""
    return {"items": [{"resource_class": "vcpu", "unit_price": "10"} | item]}


# (json changes to the catalog body, status, field)
BAD_CATALOGS = [
    pytest.param({"effective_from": "2026-10-01"}, 409, "effective_from", id="same day"),
    pytest.param({"effective_from": "2026-09-15"}, 409, "effective_from", id="earlier"),
    pytest.param({"effective_from": "2026-13-01"}, 422, "effective_from", id="no such day"),
    pytest.param(
        one_item(resource_class="gpu", unit_price="1"),
        422,
        "items.0.resource_class",
        id="unknown class",
    ),
    pytest.param(
        {"items": [*PRICES, {"resource_class": "vcpu", "unit_price": "11"}]},
        422,
        "items",
        id="class priced twice",
    ),
    pytest.param(one_item(unit_price="-1"), 422, "items.0.unit_price", id="negative price"),
    pytest.param(
        one_item(unit_price="0.0000001"),
        422,
        "items.0.unit_price",
        id="price below a millionth of a fen",
    ),
    pytest.param(
        one_item(monthly_cap_amount=-5), 422, "items.0.monthly_cap_amount", id="negative cap"
    ),
    pytest.param(
        one_item(monthly_cap_amount=100, monthly_min_amount=200),
        422,
        "items.0.monthly_min_amount",
        id="minimum above cap",
    ),
    pytest.param({"items": []}, 422, "items", id="no items"),
    pytest.param({"name": "  "}, 422, "name", id="blank name"),
    pytest.param({"currency": "USD"}, 422, "currency", id="unknown field"),
]


@pytest.mark.parametrize(("changes", "status", "field"), BAD_CATALOGS)
def test_bad_price_catalogs_are_refused_naming_the_field(
    changes, status, field, october, clients, db
):
    body = catalog_body("2027-01-01") | changes
    refused(db, clients["admin"], "POST", october.catalogs_path, status, field, json=body)


def test_a_price_change_cannot_reach_back_into_rated_time(october, clients, db):
    generate(clients["finance"])  # rates October: db-1's last rated second is 10-10 10:00
    path = october.catalogs_path
    body = catalog_body("2026-10-08")
    refused(db, clients["admin"], "POST", path, 409, "effective_from", json=body)
    # after the last rated second nothing billed changes: allowed, and it closes version 1
    assert ok(clients["admin"].post(path, json=catalog_body("2026-10-20")), 201)["version"] == 2


def test_catalogs_of_a_company_that_does_not_exist_are_404(october, clients, db):
    path = f"/api/v1/service-companies/{uuid.uuid4()}/price-catalogs"
    refused(db, clients["admin"], "POST", path, 404, None, json=catalog_body("2027-01-01"))
    refused(db, clients["admin"], "GET", path, 404, None)
    refused(db, clients["admin"], "GET", f"/api/v1/price-catalogs/{uuid.uuid4()}", 404, None)


# (json changes to a new contract of agency a, status, field)
BAD_CONTRACTS = [
    pytest.param({"number": NUMBER_A}, 409, "number", id="duplicate number"),
    pytest.param({"ends_on": "2026-09-30"}, 422, "ends_on", id="ends before it starts"),
    pytest.param({"signed_on": "2027-10-01"}, 422, "signed_on", id="signed after it ended"),
    pytest.param({"discount_pct": "100"}, 422, "discount_pct", id="discount 100"),
    pytest.param({"discount_pct": "150"}, 422, "discount_pct", id="discount 150"),
    pytest.param({"discount_pct": "-1"}, 422, "discount_pct", id="negative discount"),
    pytest.param({"discount_pct": "1.005"}, 422, "discount_pct", id="discount to 3 places"),
    pytest.param({"budget_amount": -1}, 422, "budget_amount", id="negative budget"),
    pytest.param({"budget_amount": 12.5}, 422, "budget_amount", id="fractional fen"),
    pytest.param({"agency_id": "{missing}"}, 422, "agency_id", id="no such agency"),
    pytest.param({"agency_id": "{a1}"}, 422, "agency_id", id="a system, not an agency"),
    pytest.param({"service_company_id": "{missing}"}, 422, "service_company_id", id="no company"),
    pytest.param({"starts_on": "2026-02-30"}, 422, "starts_on", id="no such day"),
    pytest.param({"number": ""}, 422, "number", id="empty number"),
    pytest.param({"status": "active"}, 422, "status", id="unknown field"),
]


@pytest.mark.parametrize(("changes", "status", "field"), BAD_CONTRACTS)
def test_bad_contracts_are_refused_naming_the_field(changes, status, field, october, clients, db):
    refs = {"missing": str(uuid.uuid4()), "a1": str(october.world.estate.tid("a1"))}
    changes = {k: v.format(**refs) if isinstance(v, str) else v for k, v in changes.items()}
    body = contract_body(october.world, "HT-甲-2026-002", "a") | changes
    refused(db, clients["admin"], "POST", "/api/v1/contracts", status, field, json=body)


def test_a_suspended_agency_cannot_sign(october, clients, db):
    b = october.world.estate.tid("b")
    ok(clients["admin"].patch(f"/api/v1/tenants/{b}", json={"status": "suspended"}))
    body = contract_body(october.world, "HT-乙-2026-002", "b")
    refused(db, clients["admin"], "POST", "/api/v1/contracts", 409, "agency_id", json=body)


# (json of the PATCH, status, field)
BAD_CONTRACT_EDITS = [
    pytest.param({"ends_on": "2026-09-01"}, 422, "ends_on", id="ends before it starts"),
    pytest.param({"title": None}, 422, "title", id="title blanked"),
    pytest.param({"budget_amount": None}, 422, "budget_amount", id="budget blanked"),
    pytest.param({"discount_pct": "100"}, 422, "discount_pct", id="discount 100"),
    pytest.param({"status": "expired"}, 422, "status", id="unknown status"),
    pytest.param({"number": "HT-X"}, 422, "number", id="number is fixed"),
]


@pytest.mark.parametrize(("body", "status", "field"), BAD_CONTRACT_EDITS)
def test_bad_contract_edits_are_refused_naming_the_field(body, status, field, october, clients, db):
    path = f"/api/v1/contracts/{october.contract_a['id']}"
    refused(db, clients["admin"], "PATCH", path, status, field, json=body)


def test_a_terminated_contract_stays_terminated(october, clients, db):
    path = f"/api/v1/contracts/{october.contract_a['id']}"
    assert ok(clients["admin"].patch(path, json={"status": "terminated"}))["status"] == "terminated"
    refused(db, clients["admin"], "PATCH", path, 409, "status", json={"status": "active"})


@pytest.mark.parametrize(
    "month",
    [
        pytest.param("2026-13", id="month 13"),
        pytest.param("2026-1", id="one digit"),
        pytest.param("2026-00", id="month 0"),
        pytest.param("26-10", id="two-digit year"),
        pytest.param("2026-12", id="future"),
        pytest.param("2027-01", id="next year"),
        pytest.param("1999-12", id="before any billing"),
        # str.isdigit and \d take full-width digits; a month must be ASCII
        pytest.param("２０２６-10", id="full-width digits"),
    ],
)
def test_months_that_are_malformed_or_to_come_cannot_be_generated(month, october, clients, db):
    body = {"month": month}
    refused(db, clients["finance"], "POST", "/api/v1/statements/generate", 422, "month", json=body)


@pytest.mark.parametrize("month", ["2026-13", "2026-1", "2026-00", "26-10", "2026-10-01"])
def test_malformed_months_cannot_be_exported(month, october, clients, db):
    params = {"month": month, "format": "csv"}
    refused(db, clients["finance"], "GET", "/api/v1/statements/export", 422, "month", params=params)


@pytest.mark.parametrize(
    ("path", "params", "field"),
    [
        ("/api/v1/statements", {"month": "2026-1"}, "month"),
        ("/api/v1/statements", {"state": "void"}, "state"),
        ("/api/v1/statements", {"agency_id": "a"}, "agency_id"),
        ("/api/v1/statements/export", {}, "month"),
        ("/api/v1/statements/export", {"month": "2026-10", "format": "docx"}, "format"),
        ("/api/v1/contracts", {"status": "expired"}, "status"),
        ("/api/v1/billing/spend", {"month_from": "2026-1"}, "month_from"),
        ("/api/v1/billing/spend", {"month_to": "1999-12"}, "month_to"),
        ("/api/v1/billing/unassigned", {}, "month"),
        ("/api/v1/billing/unassigned", {"month": "2026-13"}, "month"),
    ],
)
def test_bad_query_parameters_are_refused_naming_them(path, params, field, october, clients, db):
    refused(db, clients["admin"], "GET", path, 422, field, params=params)


def test_generating_for_an_agency_or_contract_that_does_not_exist_names_the_field(
    october, clients, db
):
    """A body that names something that is not there is an invalid reference: 422 naming the
    field, as everywhere else in the API (test_authorization_matrix.py's rule)."""
    for name in ("agency_id", "contract_id"):
        body = {"month": "2026-10", name: str(uuid.uuid4())}
        refused(db, clients["finance"], "POST", "/api/v1/statements/generate", 422, name, json=body)


def test_finalizing_twice_is_a_conflict(finalized, clients, db):
    path = f"/api/v1/statements/{finalized['id']}/finalize"
    refused(db, clients["admin"], "POST", path, 409, None)


def test_a_month_that_is_not_over_cannot_be_finalized(october, clients, db):
    november = generate(clients["finance"], "2026-11")
    statement = november[october.contract_a["id"]]
    assert statement["state"] == "draft"
    path = f"/api/v1/statements/{statement['id']}/finalize"
    refused(db, clients["finance"], "POST", path, 409, None)


def test_drafts_take_no_credit_or_debit_notes(october, clients, db):
    draft = generate(clients["finance"])[october.contract_a["id"]]
    path = f"/api/v1/statements/{draft['id']}/adjustments"
    refused(db, clients["finance"], "POST", path, 409, None, json=CREDIT)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"amount": 0}, "amount"),
        ({"amount": -100}, "amount"),
        ({"amount": "1.5"}, "amount"),
        ({"kind": "refund"}, "kind"),
        ({"reason": "ok"}, "reason"),
        ({"approver": "admin"}, "approver"),
    ],
)
def test_bad_notes_are_refused_naming_the_field(changes, field, finalized, clients, db):
    path = f"/api/v1/statements/{finalized['id']}/adjustments"
    refused(db, clients["finance"], "POST", path, 422, field, json=CREDIT | changes)


def test_the_proposer_cannot_decide_its_own_note(finalized, clients, db):
    sid = finalized["id"]
    note = ok(clients["admin"].post(f"/api/v1/statements/{sid}/adjustments", json=CREDIT), 201)
    for decision in ("approve", "reject"):
        path = f"/api/v1/adjustments/{note['id']}/{decision}"
        refused(db, clients["admin"], "POST", path, 403, None)
    refused(
        db, clients["admin"], "POST", f"/api/v1/adjustments/{note['id']}/maybe", 422, "decision"
    )


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/api/v1/contracts/{missing}", None),
        ("PATCH", "/api/v1/contracts/{missing}", {"title": "续签"}),
        ("GET", "/api/v1/contracts/{missing}/burndown", None),
        ("GET", "/api/v1/statements/{missing}", None),
        ("GET", "/api/v1/statements/{missing}/export", None),
        ("POST", "/api/v1/statements/{missing}/finalize", None),
        ("POST", "/api/v1/statements/{missing}/adjustments", CREDIT),
        ("POST", "/api/v1/adjustments/{missing}/approve", None),
        ("POST", "/api/v1/adjustments/{missing}/reject", None),
        ("GET", "/api/v1/price-catalogs/{missing}", None),
    ],
)
def test_unknown_ids_are_404(method, path, body, october, clients, db):
    url = path.format(missing=uuid.uuid4())
    refused(db, clients["admin"], method, url, 404, None, json=body)


def test_malformed_ids_are_refused_naming_them(october, clients, db):
    refused(db, clients["admin"], "GET", "/api/v1/statements/not-an-id", 422, "statement_id")
    refused(db, clients["admin"], "GET", "/api/v1/contracts/12/burndown", 422, "contract_id")


def test_exporting_a_month_without_statements_is_404(october, clients, db):
    params = {"month": "2026-09", "format": "pdf"}
    refused(db, clients["finance"], "GET", "/api/v1/statements/export", 404, None, params=params)


# --- random bodies ------------------------------------------------------------------------------

JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=10), children, max_size=3)
    ),
    max_leaves=10,
)
PLAUSIBLE = [
    "2026-10",
    "2026-11",
    "2026-13",
    "2026-10-01",
    "2027-01-01",
    "2026-09-30",
    "credit",
    "debit",
    "vcpu",
    "memory_mb",
    "active",
    "terminated",
    "99.99",
    "100",
    "-1",
    "0.1",
    NUMBER_A,
]

# (method, path template, fields of the input model)
RANDOM_TARGETS = [
    pytest.param(
        "POST",
        "{catalogs}",
        ["name", "effective_from", "bill_compute_when_off", "items"],
        id="POST price-catalogs",
    ),
    pytest.param(
        "POST",
        "/api/v1/contracts",
        [
            "number",
            "title",
            "agency_id",
            "service_company_id",
            "signed_on",
            "starts_on",
            "ends_on",
            "budget_amount",
            "discount_pct",
            "billing_contact",
        ],
        id="POST contracts",
    ),
    pytest.param(
        "PATCH",
        "/api/v1/contracts/{contract}",
        ["title", "ends_on", "budget_amount", "discount_pct", "billing_contact", "status"],
        id="PATCH contract",
    ),
    pytest.param(
        "POST",
        "/api/v1/statements/generate",
        ["month", "agency_id", "contract_id"],
        id="POST generate",
    ),
    pytest.param(
        "POST",
        "/api/v1/statements/{statement}/adjustments",
        ["kind", "amount", "reason"],
        id="POST adjustments",
    ),
]


@pytest.mark.parametrize(("method", "path", "fields"), RANDOM_TARGETS)
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_random_bodies_never_get_a_server_error(
    method, path, fields, data, finalized, october, clients, db
):
    """Junk, or the real field names with junk or plausible values: a success or a problem+json
    4xx that wrote nothing, never a 500."""
    w = october.world
    ids = [str(w.company_id), str(w.estate.tid("a")), str(w.estate.tid("a1"))]
    ids += [october.contract_a["id"], october.contract_b["id"], str(uuid.uuid4())]
    item = st.fixed_dictionaries(
        {"resource_class": st.sampled_from(["vcpu", "gpu", "public_ip"]), "unit_price": JSON_VALUES}
    )
    values = (
        JSON_VALUES
        | st.sampled_from(PLAUSIBLE + ids)
        | st.integers(min_value=-2, max_value=10**6)
        | st.lists(item, max_size=3)
    )
    shaped = st.dictionaries(
        st.sampled_from(fields) | st.text(max_size=8), values, max_size=len(fields) + 1
    )
    body = data.draw(JSON_VALUES | shaped, label="body")
    url = path.format(
        catalogs=october.catalogs_path,
        contract=october.contract_a["id"],
        statement=finalized["id"],
    )
    before = table_rows(db, WATCHED_TABLES)
    resp = clients["admin"].request(method, url, json=body)
    assert resp.status_code < 500, f"{method} {url} {body!r}: {resp.status_code} {resp.text}"
    if resp.status_code >= 400:
        assert resp.headers["content-type"].startswith(PROBLEM), resp.headers
        assert table_rows(db, WATCHED_TABLES) == before, f"{method} {url} {body!r}: wrote"
