"""The one exception hierarchy. api/ maps each class to an RFC 9457 problem exactly once.

No HTTP status codes here: services speak the domain's language, the API layer translates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class FieldError:
    """One thing wrong with one input field; `field` is a dotted path such as `body.parent_id`."""

    field: str
    message: str
    code: str = "invalid"


class GovbrokerError(Exception):
    """Base of every error a service raises on purpose."""

    slug = "error"
    title = "Request failed"

    def __init__(
        self,
        detail: str,
        errors: list[FieldError] | None = None,
        *,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.errors = errors or []
        self.extra = extra or {}

    @classmethod
    def field(cls, name: str, message: str, code: str = "invalid") -> GovbrokerError:
        """The error is about one input field: say which, and why."""
        return cls(f"{name}: {message}", [FieldError(name, message, code)])


class Unauthenticated(GovbrokerError):
    slug = "unauthenticated"
    title = "Authentication required"


class NotFound(GovbrokerError):
    """Missing, or outside the caller's scope: another tenant's objects look absent."""

    slug = "not-found"
    title = "Not found"


class Forbidden(GovbrokerError):
    slug = "forbidden"
    title = "Not allowed"


class Conflict(GovbrokerError):
    slug = "conflict"
    title = "Conflict with the current state"


class Invalid(GovbrokerError):
    slug = "invalid"
    title = "Invalid input"


class Locked(GovbrokerError):
    """The account is locked after repeated failed logins."""

    slug = "account-locked"
    title = "Account locked"


class Unavailable(GovbrokerError):
    """A dependency (database, provider) cannot answer now; retrying later may work."""

    slug = "unavailable"
    title = "Service unavailable"


@dataclass(frozen=True)
class OverLimit:
    """One shortfall: `resource_class` at tenant `tenant_code` (a `level`) would pass its limit."""

    resource_class: str
    tenant_id: str
    tenant_code: str
    level: str
    limit: int
    usage: int
    requested: int
    # limit: would exceed it; expired / not_yet_valid: outside the validity window;
    # no_quota: nothing was ever assigned at this level
    reason: str = "limit"

    @property
    def shortfall(self) -> int:
        return self.usage + self.requested - self.limit


def describe(o: OverLimit) -> str:
    where = f"{o.resource_class} at {o.level} {o.tenant_code}"
    if o.reason == "expired":
        return f"{where}: the quota has expired"
    if o.reason == "not_yet_valid":
        return f"{where}: the quota is not valid yet"
    if o.reason == "no_quota":
        return f"{where}: no quota assigned"
    return f"{where}: limit {o.limit}, in use {o.usage}, requested {o.requested}"


class QuotaExceeded(GovbrokerError):
    """Every shortfall at once, so the caller sees which class at which level and by how much."""

    slug = "quota-exceeded"
    title = "Quota exceeded"

    def __init__(self, over: list[OverLimit]) -> None:
        self.over = over
        parts = [describe(o) for o in over]
        super().__init__("; ".join(parts) or "quota exceeded")
