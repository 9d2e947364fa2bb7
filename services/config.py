"""fitscope's settings, read from the environment (prefix ``FITSCOPE_``) and nothing else.

No I/O happens at import: call :func:`get_settings`. Secrets (database passwords) live only in
the URLs given through the environment; nothing here has a default password.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.safe_text import redact_url  # noqa: F401 - the one redaction function, imported from here too

_BROKER_SCHEMES = ("redis", "rediss", "valkey", "valkeys")


class ConfigError(ValueError):
    """A setting a user got wrong; the message is one sentence naming the variable and the fix."""


class Settings(BaseSettings):
    """Every knob of the service. Each field is ``FITSCOPE_<NAME>`` in the environment."""

    model_config = SettingsConfigDict(env_prefix="FITSCOPE_", extra="ignore", frozen=True)

    home: Path = Field(Path(".fitscope"), description="Folder for the default SQLite file and broker data.")
    database_url: str | None = Field(None, description="SQLAlchemy URL; default: SQLite under `home`.")
    broker_url: str | None = Field(None, description="redis:// URL; default: the embedded Valkey broker.")
    embedded_broker_port: int = Field(6479, ge=1, le=65535)
    bind_host: str = Field("127.0.0.1", description="Address the embedded broker and dashboard listen on.")
    dashboard_port: int = Field(8501, ge=1, le=65535)
    max_trials_per_experiment: int = Field(10_000, ge=1, le=1_000_000)
    max_trial_memory_mb: int = Field(
        4096, ge=16, le=10_000_000, description="Largest estimated peak memory of one trial (services/admission.py); "
        "a spec with a larger trial is refused at submit, and a worker refuses one it cannot hold.")
    max_spec_bytes: int = Field(1_000_000, ge=1_000)
    data_root: Path | None = Field(
        None, description="A folder whose CSV files any spec may name, besides the files in the spec's own folder.")
    allow_any_csv_path: bool = Field(
        False, description="Let a spec name a CSV file anywhere this process can read (off: its folder or data_root).")
    max_csv_bytes: int = Field(50_000_000, ge=1_000, description="Largest CSV data set a spec may name.")
    max_csv_rows: int = Field(1_000_000, ge=2, description="Most data rows in a CSV data set.")
    max_csv_columns: int = Field(1000, ge=2, description="Most columns in a CSV data set.")
    visibility_timeout_s: int = Field(
        24 * 3600, ge=60, description="Longer than the longest trial, or Redis re-delivers a running one."
    )
    max_attempts: int = Field(3, ge=1, le=100, description="Runs of one trial before it is marked failed.")
    metrics_flush_s: float = Field(
        1.0, ge=0, le=3600, description="Seconds between writes of a running trial's epoch rows; 0 = every epoch.")
    worker_concurrency: int | None = Field(
        None, ge=1, le=256, description="Training processes per worker; default one per usable CPU (the "
        "affinity mask and a container's CPU quota, services/cpus.py).")
    torch_threads: int = Field(1, ge=1, le=256, description="Threads per training process.")
    checkpoint_every_epochs: int = Field(
        10, ge=0, le=1_000_000, description="A running trial checkpoints every this many epochs; 0 = never by count.")
    checkpoint_every_s: float = Field(
        30.0, ge=0, le=86_400,
        description="... or when this many seconds passed since its last one; 0 = never by time.")
    checkpoint_url: str | None = Field(
        None, description="file:///shared/dir for checkpoint bytes; default: in the database.")
    db_retry_delays_s: tuple[float, ...] = Field(
        (1.0, 2.0, 4.0, 8.0, 15.0, 30.0), min_length=1, max_length=32,
        description="Seconds between the tries of a database write that failed (the last repeats), e.g. [1, 2, 4].")
    db_wait_s: float = Field(
        900.0, ge=0, le=86_400, description="A write waits this long in all for the database before its job "
        "is re-queued (it then resumes from its checkpoint, at the cost of one attempt).")
    heartbeat_s: float = Field(10.0, gt=0, le=3600, description="Seconds between a worker's heartbeats.")
    worker_lost_after_s: float = Field(
        60.0, gt=0, le=86_400, description="A worker silent this long is lost; its running trials are re-queued.")
    fuse: bool = Field(True, description="Train compatible trials of a grid together as one batched model.")
    fuse_max_trials: int = Field(64, ge=1, le=4096, description="Most trials in one fused job.")
    fuse_min_trials: int = Field(
        8, ge=2, le=4096, description="Fewest trials in a fused job split off to keep more of the workers' "
        "training processes busy.")
    submitted_by: str | None = Field(None, max_length=200, pattern=r"^[^\x00]*$",
                                     description="Who submits, recorded on each experiment.")

    # Dashboard sign-in with OpenID Connect (services/signin.py checks them together). Required when the
    # dashboard listens beyond loopback; the signed-in user is then who submits, cancels and re-queues.
    oidc_server_metadata_url: str | None = Field(
        None, max_length=2000, description="The identity provider's .well-known/openid-configuration URL.")
    oidc_client_id: str | None = Field(None, max_length=500, description="The dashboard's client id at the provider.")
    oidc_client_secret: SecretStr | None = Field(None, description="The dashboard's client secret at the provider.")
    oidc_redirect_uri: str | None = Field(
        None, max_length=2000, description="The dashboard's public address + /oauth2callback, as registered.")
    oidc_cookie_secret: SecretStr | None = Field(
        None, description="Random text (32+ characters) that signs the dashboard's sign-in cookie.")

    @field_validator("oidc_server_metadata_url", "oidc_client_id", "oidc_client_secret", "oidc_redirect_uri",
                     "oidc_cookie_secret", "worker_concurrency", mode="before")
    @classmethod
    def _unset_when_empty(cls, value):
        # docker-compose passes an unset variable as "" (${VAR:-}); that means "not configured".
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        try:
            url = make_url(value)
        except (ArgumentError, ValueError):  # ValueError: a port that is not a number
            raise ValueError(
                f"FITSCOPE_DATABASE_URL={redact_url(value)!r} is not a database URL; "
                "use sqlite:///path/to/file.db or postgresql+psycopg://user@host:5432/dbname"
            ) from None
        if url.get_backend_name() not in ("sqlite", "postgresql"):
            raise ValueError(
                f"FITSCOPE_DATABASE_URL uses {url.get_backend_name()!r}, which fitscope does not support; "
                "use sqlite:///path/to/file.db or postgresql+psycopg://user@host:5432/dbname"
            )
        if url.drivername == "postgresql":
            # Bare postgresql:// means psycopg2 to SQLAlchemy, which we do not install.
            value = str(url.set(drivername="postgresql+psycopg").render_as_string(hide_password=False))
        return value

    @field_validator("broker_url")
    @classmethod
    def _check_broker_url(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        scheme, sep, rest = value.partition("://")
        if not sep or scheme not in _BROKER_SCHEMES or not rest:
            raise ValueError(
                f"FITSCOPE_BROKER_URL={redact_url(value)!r} is not a Redis URL; "
                "use redis://host:6379/0 (or unset it to use the embedded broker)"
            )
        parts = urlsplit(value)
        try:
            parts.port  # noqa: B018 - raises ValueError for a port that is not a number from 0 to 65535
        except ValueError:
            raise ValueError(f"FITSCOPE_BROKER_URL={redact_url(value)!r} has a port that is not a number from 1 "
                             "to 65535; use redis://host:6379/0") from None
        if parts.path.strip("/") and not parts.path.strip("/").isdigit():
            # The path is shown only when no password can hide in it (an unescaped "/" or "@" in one).
            ending = "does not end" if "@" in value else f"ends in {parts.path!r},"
            raise ValueError(f"FITSCOPE_BROKER_URL={redact_url(value)!r} {ending} not a database "
                             "number; use redis://host:6379/0")
        return value.replace("valkey", "redis", 1) if scheme.startswith("valkey") else value

    @field_validator("checkpoint_url")
    @classmethod
    def _check_checkpoint_url(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        parts = urlsplit(value)
        if parts.scheme != "file" or parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
            raise ValueError(
                f"FITSCOPE_CHECKPOINT_URL={redact_url(value)!r} is not a file:// URL of an absolute folder; use "
                "file:///shared/dir (a folder every worker can reach) or unset it to keep checkpoints in the database"
            )
        return value

    @field_validator("db_retry_delays_s")
    @classmethod
    def _check_delays(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if any(not (0 < delay <= 3600) for delay in value):
            raise ValueError("FITSCOPE_DB_RETRY_DELAYS_S must list seconds above 0 and at most 3600, e.g. [1, 2, 4]")
        return value

    @model_validator(mode="after")
    def _check_lost_after(self) -> Settings:
        # A worker is called lost only after missing at least two beats in a row.
        if self.worker_lost_after_s < 3 * self.heartbeat_s:
            raise ValueError(
                f"FITSCOPE_WORKER_LOST_AFTER_S ({self.worker_lost_after_s:g} s) must be at least 3 x "
                f"FITSCOPE_HEARTBEAT_S ({self.heartbeat_s:g} s), or live workers are called lost between two "
                f"beats; raise it to {3 * self.heartbeat_s:g} or lower FITSCOPE_HEARTBEAT_S")
        return self

    @property
    def effective_database_url(self) -> str:
        """The database URL in force: the configured one or SQLite under ``home``."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.home / 'fitscope.db').resolve()}"

    @property
    def effective_worker_concurrency(self) -> int:
        """Training processes per worker: FITSCOPE_WORKER_CONCURRENCY, or one per usable CPU (at most 256)."""
        if self.worker_concurrency is not None:
            return self.worker_concurrency
        from services.cpus import usable_cpus

        return min(256, usable_cpus())

    @property
    def uses_embedded_broker(self) -> bool:
        return self.broker_url is None

    @property
    def effective_broker_url(self) -> str:
        """The broker URL in force: the configured one or the embedded Valkey's."""
        if self.broker_url:
            return self.broker_url
        from services.broker import read_broker_password

        # The password `fitscope up` keeps in FITSCOPE_HOME, so every command of this home gets in.
        password = read_broker_password(self.home)
        auth = f":{password}@" if password else ""
        return f"redis://{auth}{self.bind_host}:{self.embedded_broker_port}/0"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Read the settings once per process; a bad value raises :class:`ConfigError` with one sentence."""
    return make_settings()


def make_settings(**overrides) -> Settings:
    """The environment's settings with ``overrides`` (field names, e.g. database_url=...) on top;
    a bad value raises :class:`ConfigError` with one sentence."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError(_first_message(exc)) from None


def _first_message(exc: ValidationError) -> str:
    error = exc.errors()[0]
    message = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
    if message.startswith("FITSCOPE_"):
        return message
    field = ".".join(str(part) for part in error.get("loc", ()))
    given = error.get("input")  # shown so "nan" or "1e3" explain the message; never for URLs (passwords)
    shown = (f", got {given!r}" if isinstance(given, str) and len(given) <= 40 and not field.endswith("url")
             and "secret" not in field else "")
    return f"FITSCOPE_{field.upper()}: {message}{shown}"
