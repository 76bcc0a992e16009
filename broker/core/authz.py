"""Roles, what each may do, and the principal a request acts as.

Pure data and pure functions: `broker.tenancy.authz.authorize` adds the database facts (tenant
status) on top. A role binding covers its tenant and every descendant; tenants carry a
materialised path (`/<center>/<agency>/<system>/`), so "covers" is a prefix test in Python and a
`LIKE 'prefix%'` in SQL.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from sqlalchemy import ColumnElement, false, or_, true


class Role(StrEnum):
    center_admin = "center_admin"
    agency_admin = "agency_admin"
    member = "member"
    finance = "finance"
    auditor = "auditor"


# Actions are "<object>.<verb>"; anything that is not ".read" is a write.
_READ_COMMON = {"tenant.read", "quota.read"}
ROLE_ACTIONS: dict[Role, frozenset[str]] = {
    Role.center_admin: frozenset({"*"}),
    Role.agency_admin: frozenset(
        _READ_COMMON
        | {
            "system.manage",
            "user.read",
            "user.manage",
            "rolebinding.read",
            "rolebinding.manage",
            "quota.split",
            "quota.request",
            "server.read",
            "server.manage",
            "server.approve",
            "billing.read",
            "billing.export",
        }
    ),
    Role.member: frozenset(_READ_COMMON | {"user.read", "server.read", "server.manage"}),
    # statements are drafted, finalized and adjusted by finance at the center (checked there)
    Role.finance: frozenset(_READ_COMMON | {"billing.read", "billing.export", "statement.manage"}),
    Role.auditor: frozenset(
        _READ_COMMON
        | {
            "user.read",
            "rolebinding.read",
            "audit.read",
            "server.read",
            "inventory.read",
            "billing.read",
            "billing.export",
        }
    ),
}

# Which roles a holder of a role may hand out (inside its own scope): no escalation.
GRANTABLE: dict[Role, frozenset[Role]] = {
    Role.center_admin: frozenset(Role),
    Role.agency_admin: frozenset({Role.agency_admin, Role.member, Role.finance}),
}


def is_write(action: str) -> bool:
    return not action.endswith(".read")


def role_allows(role: Role, action: str) -> bool:
    allowed = ROLE_ACTIONS[role]
    return "*" in allowed or action in allowed


@dataclass(frozen=True)
class Grant:
    role: Role
    tenant_id: uuid.UUID | None
    tenant_path: str

    def covers(self, path: str) -> bool:
        return path.startswith(self.tenant_path)


@dataclass(frozen=True)
class Principal:
    """Who is acting: a user (by session, API token or OIDC) or the system itself (CLI, jobs)."""

    user_id: uuid.UUID | None
    username: str
    grants: tuple[Grant, ...] = ()
    auth_method: str = "system"
    token_id: uuid.UUID | None = None
    home_tenant_id: uuid.UUID | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @classmethod
    def system(cls, name: str = "system") -> Principal:
        """Acts with center_admin rights over everything; used by the CLI and scheduled jobs."""
        return cls(user_id=None, username=name, grants=(Grant(Role.center_admin, None, "/"),))

    def can(self, action: str, path: str) -> bool:
        return any(role_allows(g.role, action) for g in self.grants if g.covers(path))

    def sees(self, path: str) -> bool:
        """Any binding over a tenant lets its holder know the tenant exists."""
        return any(g.covers(path) for g in self.grants)

    def prefixes(self, action: str) -> list[str]:
        """The subtree roots where `action` is allowed (redundant nested ones dropped)."""
        roots = sorted({g.tenant_path for g in self.grants if role_allows(g.role, action)})
        kept: list[str] = []
        for p in roots:
            if not any(p.startswith(k) for k in kept):
                kept.append(p)
        return kept

    def scope_filter(self, action: str, path_column: Any) -> ColumnElement[bool]:
        """SQL condition: rows whose tenant path lies where `action` is allowed."""
        prefixes = self.prefixes(action)
        if "/" in prefixes:
            return true()
        if not prefixes:
            return false()
        return or_(*[path_column.startswith(p) for p in prefixes])

    @property
    def is_center_admin(self) -> bool:
        return any(
            g.role is Role.center_admin and g.tenant_path.count("/") <= 2 for g in self.grants
        )
