"""The base of every input model: unknown fields and NUL characters are refused, field by field."""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator


def _has_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return any(_has_nul(v) for v in value)
    return False


class Input(BaseModel):
    """Refuses unknown fields (a typo must not be silently ignored), NUL characters (PostgreSQL
    cannot store them), and explicit nulls for the fields named in `not_null` (a PATCH may leave a
    field out, but may not blank a required one)."""

    model_config = ConfigDict(extra="forbid")
    not_null: ClassVar[frozenset[str]] = frozenset()

    @field_validator("*", mode="before")
    @classmethod
    def _refuse_nul_and_null(cls, value: Any, info: ValidationInfo) -> Any:
        if value is None and info.field_name in cls.not_null:
            raise ValueError("may be left out, but not set to null")
        if _has_nul(value):
            raise ValueError("must not contain NUL characters")
        return value
