"""The one settings class. Everything configurable is read here, from GOVBROKER_* variables."""

from __future__ import annotations

import functools
import secrets
from collections.abc import Callable
from pathlib import Path

import structlog
from cryptography.fernet import Fernet
from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

log = structlog.get_logger(__name__)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GOVBROKER_", env_file=None, extra="ignore")

    var_dir: Path = Field(default=Path("./var"), description="Where local state lives")
    database_url: str = Field(default="", description="SQLAlchemy URL; default SQLite in var_dir")
    bind: str = Field(default="127.0.0.1:8000", description="host:port the API listens on")
    secret_key: SecretStr | None = Field(default=None, description="Signs session tokens")
    fernet_key: SecretStr | None = Field(
        default=None, description="Encrypts provider credentials; comma-separate to rotate"
    )
    db_pool_pre_ping: bool = False
    display_timezone: str = "Asia/Shanghai"

    # OIDC bearer tokens (optional)
    oidc_issuer: str | None = None
    oidc_jwks_url: str | None = None
    oidc_audience: str | None = None
    oidc_username_claim: str = "preferred_username"
    oidc_algorithms: list[str] = ["RS256", "ES256", "PS256"]

    # identity
    session_ttl_minutes: int = Field(default=480, ge=5, le=7 * 24 * 60)
    password_min_length: int = Field(default=12, ge=8, le=128)
    password_min_classes: int = Field(default=3, ge=1, le=4)
    lockout_threshold: int = Field(default=5, ge=1, le=100)
    lockout_minutes: int = Field(default=15, ge=1, le=24 * 60)
    api_token_max_days: int = Field(default=365, ge=1, le=3650)
    # argon2 cost; the defaults follow OWASP's recommendation, tests lower them
    argon2_time_cost: int = Field(default=3, ge=1)
    argon2_memory_kib: int = Field(default=65536, ge=8)

    # quota ledger
    reservation_ttl_seconds: int = Field(default=900, ge=10, le=7 * 24 * 3600)
    reservation_max_ttl_seconds: int = Field(default=7 * 24 * 3600, ge=60)
    quota_attachment_max_bytes: int = Field(default=5 * 1024 * 1024, ge=1024)

    # provisioning
    job_workers: int = Field(default=8, ge=1, le=256, description="Jobs run at once per process")
    # a running job whose heartbeat is older than this is taken over by the reconciler
    job_stale_seconds: int = Field(default=900, ge=10, le=24 * 3600)
    # a queued job nobody picked up within this is started by the reconciler
    job_queued_grace_seconds: int = Field(default=60, ge=1, le=3600)
    job_max_attempts: int = Field(default=5, ge=1, le=50)
    # how long a job's quota stays held; longer than any provider needs to build a server
    job_reservation_hours: int = Field(default=6, ge=1, le=72)
    idempotency_hours: int = Field(default=48, ge=24, le=24 * 30)

    # run the periodic jobs inside `serve` (the embedded deployment)
    embedded_scheduler: bool = True
    # how long a scheduler's leadership lease lasts without renewal on SQLite; on PostgreSQL (an
    # advisory lock held by the leader's connection) it sets how often schedulers check, a third
    # of it, and how soon a dead leader's connection is noticed
    scheduler_lease_seconds: int = Field(default=30, ge=3, le=3600)

    # billing months, contract periods and price-list dates are calendar days of this zone
    billing_timezone: str = "Asia/Shanghai"

    # how long a process remembers an API token's principal (0: checked on every request): a
    # revocation made through another replica takes effect within this
    token_memory_seconds: float = Field(default=3.0, ge=0, le=60)
    # how long a process remembers an agency's offered catalog; a change made through govbroker
    # is seen at once whatever this is (see broker.provisioning.catalog)
    offer_memory_seconds: float = Field(default=5.0, ge=0, le=300)

    log_json: bool = False
    log_level: str = "INFO"
    # uvicorn's line per request; off where a proxy in front already logs them
    access_log: bool = True

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        level = value.strip().upper()
        if level not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise ValueError("log_level must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL")
        return level

    @field_validator("bind")
    @classmethod
    def _bind_has_port(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError("bind must look like HOST:PORT, e.g. 127.0.0.1:8000")
        return value

    @property
    def host(self) -> str:
        return self.bind.rpartition(":")[0]

    @property
    def port(self) -> int:
        return int(self.bind.rpartition(":")[2])

    @property
    def effective_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.var_dir / 'govbroker.db').as_posix()}"

    def session_secret(self) -> str:
        if self.secret_key is not None:
            return self.secret_key.get_secret_value()
        return _key_file(self.var_dir / "secret.key", lambda: secrets.token_urlsafe(48))

    def fernet_keys(self) -> list[str]:
        if self.fernet_key is not None:
            return [k.strip() for k in self.fernet_key.get_secret_value().split(",") if k.strip()]
        return [_key_file(self.var_dir / "fernet.key", lambda: Fernet.generate_key().decode())]


def _key_file(path: Path, make: Callable[[], str]) -> str:
    """Read a generated key from var/, creating it (mode 0600) the first time."""
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    value = make()
    # O_EXCL: two processes starting together must not overwrite each other's key
    try:
        fd = path.open("x")
    except FileExistsError:
        return path.read_text().strip()
    with fd:
        path.chmod(0o600)
        fd.write(value + "\n")
    log.warning(
        "generated key file; set the matching GOVBROKER_* variable in production",
        path=str(path),
    )
    return value


@functools.cache
def get_settings() -> Settings:
    return Settings()
