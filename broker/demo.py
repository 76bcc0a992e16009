"""A realistic demo estate: a municipal e-government cloud center, its agencies and systems,
and a user for every role. Everything goes through the services, so it is audited like any change.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

from sqlmodel import Session, col, select

from billing import contracts, prices, rating
from billing.models import Contract, LifecycleEvent
from billing.schemas import ContractCreate, PriceCatalogCreate, PriceItemIn
from broker.core import clock
from broker.core.authz import Principal, Role
from broker.core.db import SessionSource
from broker.core.errors import GovbrokerError
from broker.inventory import providers, sync
from broker.inventory.models import Provider, Server, ServiceCompany
from broker.inventory.schemas import ProviderCreate, ServiceCompanyCreate
from broker.provisioning import catalog, executor
from broker.provisioning import service as provisioning
from broker.provisioning.schemas import CatalogItemCreate, PolicyUpdate, ServerCreate, SizeBounds
from broker.tenancy import auth, users
from broker.tenancy import service as tenancy
from broker.tenancy.models import Tenant, User
from broker.tenancy.schemas import RoleBindingCreate, TenantCreate, UserCreate
from quotas import requests as quota_requests
from quotas import service as quotas

DEMO_PASSWORD = "Demo@2026-gov"  # noqa: S105 - printed to the demo user on purpose

AGENCIES: list[tuple[str, str, str, list[tuple[str, str]]]] = [
    (
        "fgw",
        "市发展和改革委员会",
        "Development and Reform Commission",
        [("fgw-xmsp", "投资项目在线审批监管平台"), ("fgw-xyxx", "公共信用信息平台")],
    ),
    (
        "gaj",
        "市公安局",
        "Public Security Bureau",
        [
            ("gaj-hjgl", "户籍管理系统"),
            ("gaj-jtwf", "交通违法处理平台"),
            ("gaj-spjk", "视频监控联网平台"),
        ],
    ),
    (
        "jyj",
        "市教育局",
        "Education Bureau",
        [("jyj-zsxt", "中小学招生服务平台"), ("jyj-xjgl", "学籍管理系统")],
    ),
    (
        "wjw",
        "市卫生健康委员会",
        "Health Commission",
        [("wjw-qmjk", "全民健康信息平台"), ("wjw-yyyy", "预约挂号统一平台")],
    ),
    (
        "czj",
        "市财政局",
        "Finance Bureau",
        [("czj-yszx", "预算管理一体化系统"), ("czj-fszf", "非税收入收缴系统")],
    ),
    (
        "rsj",
        "市人力资源和社会保障局",
        "Human Resources and Social Security Bureau",
        [("rsj-sbjf", "社会保险缴费系统"), ("rsj-jyfw", "就业服务平台")],
    ),
    (
        "jtj",
        "市交通运输局",
        "Transport Bureau",
        [("jtj-gjdd", "公交智能调度系统"), ("jtj-zfxt", "交通运输综合执法系统")],
    ),
    (
        "sthjj",
        "市生态环境局",
        "Ecology and Environment Bureau",
        [("sthjj-zljc", "环境质量监测平台"), ("sthjj-wrpf", "排污许可管理系统")],
    ),
]


# the center's pool, per resource class
CENTER_LIMITS = {
    "vcpu": 4000,
    "memory_mb": 16 * 1024 * 1024,
    "storage_gb.ssd": 200_000,
    "storage_gb.hdd": 600_000,
    "public_ip": 256,
    "bandwidth_mbps": 20_000,
    "instances": 1200,
}
# each agency's share: a scale applied to a base allotment (big bureaus get more)
AGENCY_SCALE = {"fgw": 2, "gaj": 6, "jyj": 3, "wjw": 4, "czj": 2, "rsj": 3, "jtj": 3, "sthjj": 2}
BASE_ALLOTMENT = {
    "vcpu": 96,
    "memory_mb": 384 * 1024,
    "storage_gb.ssd": 4_000,
    "storage_gb.hdd": 12_000,
    "public_ip": 4,
    "bandwidth_mbps": 400,
    "instances": 30,
}


@dataclass(frozen=True)
class DemoUser:
    username: str
    display_name: str
    role: str
    scope: str


def seed(session: Session) -> list[DemoUser]:
    """Create the demo estate in an empty database; returns the users to print."""
    actor = Principal.system("demo-seed")
    center = tenancy.get_center(session) or tenancy.create_center(
        session,
        actor,
        code="center",
        name_zh="市电子政务云中心",
        name_en="Municipal E-Gov Cloud Center",
    )
    created: list[DemoUser] = []

    def person(username: str, name: str, home: Tenant, role: Role, scope: Tenant) -> None:
        user = users.create_user(
            session,
            actor,
            UserCreate(
                username=username,
                display_name=name,
                tenant_id=home.id,
                email=f"{username}@demo.gov.cn",
                password=DEMO_PASSWORD,
            ),
        )
        users.create_binding(
            session, actor, RoleBindingCreate(user_id=user.id, role=role.value, tenant_id=scope.id)
        )
        created.append(DemoUser(username, name, role.value, scope.name_zh))

    for rc, limit in CENTER_LIMITS.items():
        quotas.set_quota(session, actor, center.id, rc, limit=limit)
    person("admin", "云中心管理员", center, Role.center_admin, center)
    person("auditor", "监理单位审计员", center, Role.auditor, center)
    person("finance", "云中心财务", center, Role.finance, center)
    for code, name_zh, name_en, systems in AGENCIES:
        agency = tenancy.create_tenant(
            session,
            actor,
            TenantCreate(
                parent_id=center.id,
                kind="agency",
                code=code,
                name_zh=name_zh,
                name_en=name_en,
                contact_name=f"{name_zh[1:3]}信息中心",
            ),
        )
        subsystems = [
            tenancy.create_tenant(
                session,
                actor,
                TenantCreate(parent_id=agency.id, kind="system", code=scode, name_zh=sname),
            )
            for scode, sname in systems
        ]
        _allot(session, actor, agency, subsystems, AGENCY_SCALE[code])
        person(f"{code}-admin", f"{name_zh}管理员", agency, Role.agency_admin, agency)
        person(f"{code}-finance", f"{name_zh}财务", agency, Role.finance, agency)
        person(f"{code}-ops", f"{name_zh}运维", agency, Role.member, subsystems[0])
    _pending_requests(session, actor, created)
    return created


def _allot(
    session: Session, actor: Principal, agency: Tenant, systems: list[Tenant], scale: int
) -> None:
    """The agency's quota, and its first system's own slice (the rest share the pool)."""
    for rc, base in BASE_ALLOTMENT.items():
        quotas.set_quota(session, actor, agency.id, rc, limit=base * scale)
    for rc in ("vcpu", "memory_mb", "storage_gb.ssd"):
        quotas.set_quota(session, actor, systems[0].id, rc, limit=BASE_ALLOTMENT[rc] * scale // 2)


def _pending_requests(session: Session, actor: Principal, people: list[DemoUser]) -> None:
    """Two requests waiting on the center's desk."""
    agencies = {t.code: t for t in session.exec(select(Tenant).where(Tenant.kind == "agency"))}
    quota_requests.create(
        session,
        actor,
        tenant_id=agencies["gaj"].id,
        changes={"vcpu": 128, "memory_mb": 524288},
        justification="视频监控联网平台二期扩容，新增200路高清视频解析节点",
    )
    quota_requests.create(
        session,
        actor,
        tenant_id=agencies["wjw"].id,
        changes={"storage_gb.ssd": 6000},
        justification="全民健康信息平台影像数据归档，需增加SSD存储",
    )


# --- inventory: two service companies, each running a simulated provider ----------------------

COMPANIES = [
    ("zyskj", "政云数科技术有限公司", "Zhengyun Digital Technology Co."),
    ("hbxc", "华北信创云服务有限公司", "North China Xinchuang Cloud Services Co."),
]
PROVIDERS: list[dict[str, Any]] = [
    {
        "name": "kvm-region-1",
        "company": "zyskj",
        "region": "主数据中心",
        "overcommit": {"vcpu": Decimal("4.0"), "memory_mb": Decimal("1.0")},
        "hosts": [
            {"name": f"kvm-{i:02d}", "vcpu": 128, "memory_mb": 1024 * 1024, "cluster": "az1"}
            for i in range(1, 17)
        ],
        "storage": {"ssd": 120_000, "hdd": 400_000},
        "networks": [{"name": "gov-ext", "cidr": "10.16.0.0/16"}],
    },
    {
        "name": "vsphere-dr",
        "company": "hbxc",
        "region": "同城灾备中心",
        "overcommit": {"vcpu": Decimal("4.0"), "memory_mb": Decimal("1.0")},
        "hosts": [
            {"name": f"esxi-{i:02d}", "vcpu": 96, "memory_mb": 768 * 1024, "cluster": "dr-c1"}
            for i in range(1, 9)
        ],
        "storage": {"ssd": 120_000, "hdd": 300_000},
        "networks": [{"name": "dr-vlan-120", "cidr": "10.32.0.0/16"}],
    },
]
# servers that ran before govbroker: (provider, owner tag or None, name, vcpu, memory_mb)
LEGACY_SERVERS: list[tuple[str, str | None, str, int, int]] = [
    ("kvm-region-1", "fgw-xmsp", "xmsp-web-01", 4, 8192),
    ("kvm-region-1", "fgw-xmsp", "xmsp-db-01", 8, 32768),
    ("kvm-region-1", "gaj-hjgl", "hjgl-app-01", 8, 16384),
    ("kvm-region-1", "gaj-spjk", "spjk-media-01", 16, 65536),
    ("kvm-region-1", "jyj-zsxt", "zsxt-web-01", 4, 8192),
    ("kvm-region-1", "wjw-qmjk", "qmjk-etl-01", 8, 32768),
    ("kvm-region-1", "czj-yszx", "yszx-app-01", 8, 16384),
    ("vsphere-dr", "rsj-sbjf", "sbjf-standby-01", 4, 16384),
    ("vsphere-dr", "jtj-gjdd", "gjdd-dr-01", 4, 8192),
    ("vsphere-dr", "sthjj-zljc", "zljc-dr-01", 2, 4096),
    ("kvm-region-1", None, "legacy-oa-01", 4, 8192),
    ("kvm-region-1", None, "legacy-mail-01", 8, 16384),
    ("vsphere-dr", None, "legacy-backup-01", 2, 4096),
]


def seed_inventory(db: SessionSource, var_dir: Path) -> list[sync.Outcome]:
    """Register the demo providers (simulated clouds whose state lives in var_dir), put some
    pre-existing servers on them, sync, and resize one behind govbroker's back so that the
    console has adoption candidates, adopted servers and a drift to show."""
    from drivers.base import ServerSpec

    actor = Principal.system("demo-seed")
    var_dir.mkdir(parents=True, exist_ok=True)
    created: dict[str, uuid.UUID] = {}
    with db.unit_of_work() as session:
        companies = {
            code: providers.create_company(
                session, actor, ServiceCompanyCreate(code=code, name_zh=zh, name_en=en)
            ).id
            for code, zh, en in COMPANIES
        }
        for spec in PROVIDERS:
            state_file = (var_dir / f"sim-{spec['name']}.json").resolve()
            options = {
                "state": f"file:{state_file}",
                "hosts": spec["hosts"],
                "storage": spec["storage"],
                "networks": spec["networks"],
            }
            created[spec["name"]] = providers.create_provider(
                session,
                actor,
                ProviderCreate(
                    kind="simulator",
                    name=spec["name"],
                    region=spec["region"],
                    endpoint=f"sim://{spec['name']}",
                    credentials={"username": "govbroker", "password": uuid.uuid4().hex},
                    service_company_id=companies[spec["company"]],
                    overcommit=spec["overcommit"],
                    options=options,
                ),
            ).id
    drivers = {}
    with db.unit_of_work(write=False) as session:
        for name, pid in created.items():
            provider = session.get(Provider, pid)
            assert provider is not None
            drivers[name] = providers.driver_for(provider)
    by_name: dict[str, str] = {}
    for provider_name, owner, name, vcpu, memory_mb in LEGACY_SERVERS:
        d = drivers[provider_name]
        if d.find_server_by_tag(f"demo-{name}") is None:
            server = d.create_server(
                ServerSpec(
                    name=name,
                    image=d.list_images()[0].external_id,
                    network=d.list_networks()[0].external_id,
                    owner_tag=owner or "",
                    request_tag=f"demo-{name}",
                    vcpu=vcpu,
                    memory_mb=memory_mb,
                )
            )
            if owner is None:
                d.set_owner(server.external_id, None)
            by_name[name] = server.external_id
    outcomes = sync.sync_all(db, trigger="demo", only_due=False, workers=1)
    if "qmjk-etl-01" in by_name:
        drivers["kvm-region-1"].resize(by_name["qmjk-etl-01"], vcpu=16, memory_mb=65536)
        outcomes = sync.sync_all(db, trigger="demo", only_due=False, workers=1)
    return outcomes


# --- self-service: the catalog, each agency's company, a few servers built through the broker ---

# which company's provider serves which agency (统采分签: each agency contracts with one)
AGENCY_COMPANY = {"rsj": "hbxc", "jtj": "hbxc", "sthjj": "hbxc"}
APPROVAL = {"gaj": (16, 65536)}  # requests above 16 vCPU or 64 GiB wait for the agency admin
DEMO_REQUESTS: list[tuple[str, str, dict[str, Any]]] = [
    # (requesting member, system, request)
    (
        "fgw-ops",
        "fgw-xmsp",
        {"name": "xmsp-web-02", "flavor": "s1.medium", "image": "kylin-v10-sp3"},
    ),
    (
        "jyj-ops",
        "jyj-zsxt",
        {
            "name": "zsxt-app-02",
            "vcpu": 4,
            "memory_mb": 8192,
            "image": "uos-server-20",
            "disks": [{"size_gb": 200, "tier": "hdd"}],
        },
    ),
    (
        "gaj-ops",
        "gaj-hjgl",
        {"name": "hjgl-ai-01", "vcpu": 32, "memory_mb": 131072, "image": "kylin-v10-sp3"},
    ),
]


# 统一采购: each company's price list, fen per unit-hour (memory per GiB-hour)
PRICE_LISTS: dict[str, dict[str, str]] = {
    "zyskj": {
        "vcpu": "6.5",
        "memory_mb": "3.2",
        "storage_gb.ssd": "0.12",
        "storage_gb.hdd": "0.04",
        "public_ip": "1.4",
        "bandwidth_mbps": "0.9",
    },
    "hbxc": {
        "vcpu": "6.2",
        "memory_mb": "3.5",
        "storage_gb.ssd": "0.11",
        "storage_gb.hdd": "0.045",
        "public_ip": "1.5",
        "bandwidth_mbps": "0.8",
    },
}
DISCOUNTS = {"gaj": "5", "rsj": "3"}


def seed_billing(db: SessionSource) -> int:
    """Price lists from the first of this month and one contract per agency (分签) with the
    company that serves it, running to the end of next year; returns the contracts signed."""
    actor = Principal.system("demo-seed")
    today = clock.now().astimezone(rating.zone()).date()
    first = today.replace(day=1)
    signed = 0
    with db.unit_of_work() as session:
        company_of = {c.code: c for c in session.exec(select(ServiceCompany))}
        for code, unit_prices in PRICE_LISTS.items():
            prices.create_catalog(
                session,
                actor,
                company_of[code].id,
                PriceCatalogCreate(
                    name=f"{company_of[code].name_zh} {first.year} 年框架协议价",
                    effective_from=first,
                    items=[
                        PriceItemIn(resource_class=rc, unit_price=Decimal(p))
                        for rc, p in unit_prices.items()
                    ],
                ),
            )
        for agency in session.exec(select(Tenant).where(Tenant.kind == "agency")):
            company = company_of[AGENCY_COMPANY.get(agency.code, "zyskj")]
            contracts.create_contract(
                session,
                actor,
                ContractCreate(
                    number=f"HT-{first.year}-{agency.code.upper()}-01",
                    title=f"{agency.name_zh}政务云服务合同",
                    agency_id=agency.id,
                    service_company_id=company.id,
                    signed_on=first,
                    starts_on=first,
                    ends_on=first.replace(year=first.year + 1, month=12, day=31),
                    budget_amount=50_000_000,
                    discount_pct=Decimal(DISCOUNTS.get(agency.code, "0")),
                    billing_contact=f"{agency.name_zh}财务科",
                ),
            )
            signed += 1
    return signed


def seed_self_service(db: SessionSource) -> list[str]:
    """Import each provider's catalog, offer custom sizes, bind every agency to its service
    company, and put a few requests through the broker; returns one line per request."""
    actor = Principal.system("demo-seed")
    with db.unit_of_work(write=False) as session:
        provider_rows = list(session.exec(select(Provider)))
        company_of = {c.code: c.id for c in session.exec(select(ServiceCompany))}
    for provider in provider_rows:
        catalog.import_items(db, actor, provider.id)
        with db.unit_of_work() as session:
            catalog.create_item(
                session,
                actor,
                provider.id,
                CatalogItemCreate(
                    kind="size",
                    code="custom",
                    name_zh="自定义规格",
                    size=SizeBounds(max_vcpu=64, max_memory_mb=262144),
                ),
            )
    with db.unit_of_work() as session:
        for agency in session.exec(select(Tenant).where(Tenant.kind == "agency")):
            company = company_of[AGENCY_COMPANY.get(agency.code, "zyskj")]
            vcpu, memory_mb = APPROVAL.get(agency.code, (None, None))
            catalog.set_policy(
                session,
                actor,
                agency.id,
                PolicyUpdate(
                    service_company_id=company,
                    approval_vcpu=vcpu,
                    approval_memory_mb=memory_mb,
                ),
            )
    seed_billing(db)
    lines: list[str] = []
    for username, system_code, request in DEMO_REQUESTS:
        with db.unit_of_work(write=False) as session:
            user = session.exec(select(User).where(User.username == username)).one()
            system = session.exec(select(Tenant).where(Tenant.code == system_code)).one()
            principal = auth.load_principal(session, user, method="session")
        try:
            submitted = provisioning.request_server(
                db, principal, ServerCreate(system_id=system.id, **request), key=None
            )
        except GovbrokerError as exc:
            lines.append(f"{request['name']}: refused ({exc.detail})")
            continue
        state = submitted.state
        if submitted.claimed is not None:
            state = executor.run(db, submitted.claimed) or state
        lines.append(f"{request['name']}: {state}")
    date_history(db)
    return lines


def date_history(db: SessionSource) -> int:
    """Demo data only: the seeded estate has been running since the first of the month, so its
    statements have hours to show on the first visit. Servers adopted before their agency
    signed are bound to its contract, and every seeded lifecycle event is dated back, one
    server after another from the 1st at 08:00; returns the events moved."""
    now = clock.now()
    start = rating.month_bounds(rating.month_of(now))[0] + timedelta(hours=8)
    moved = 0
    with db.unit_of_work() as session:
        contract_of = {c.agency_id: c.id for c in session.exec(select(Contract))}
        offsets: dict[uuid.UUID, timedelta] = {}
        for event in session.exec(select(LifecycleEvent).order_by(col(LifecycleEvent.at))):
            server = session.get(Server, event.server_id)
            if server is None or event.metered_at is not None:
                continue
            if event.agency_id is not None and event.contract_id is None:
                event.contract_id = contract_of.get(event.agency_id)
                if server.tenant_id is not None and server.contract_id is None:
                    server.contract_id = event.contract_id
                    session.add(server)
            offsets.setdefault(event.server_id, timedelta(hours=5 * len(offsets)))
            # a server's events keep their order, a minute apart
            event.at = min(start + offsets[event.server_id], now)
            offsets[event.server_id] += timedelta(minutes=1)
            session.add(event)
            moved += 1
    return moved
