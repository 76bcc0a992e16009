"""A realistic demo estate: a municipal e-government cloud center, its agencies and systems,
and a user for every role. Everything goes through the services, so it is audited like any change.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlmodel import Session

from broker.core.authz import Principal, Role
from broker.tenancy import service as tenancy
from broker.tenancy import users
from broker.tenancy.models import Tenant
from broker.tenancy.schemas import RoleBindingCreate, TenantCreate, UserCreate

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
        person(f"{code}-admin", f"{name_zh}管理员", agency, Role.agency_admin, agency)
        person(f"{code}-finance", f"{name_zh}财务", agency, Role.finance, agency)
        person(f"{code}-ops", f"{name_zh}运维", agency, Role.member, subsystems[0])
    return created
