"""One settings class for the whole service, read from the environment and `.env`."""

from __future__ import annotations

from enum import StrEnum
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

_PLACEHOLDER_SECRETS = {"", "change-me", "changeme", "dev-secret"}


class Environment(StrEnum):
    development = "development"
    production = "production"
    test = "test"


class DatabaseSettings(BaseModel):
    url: str | None = Field(
        None,
        description="SQLAlchemy URL, e.g. postgresql+psycopg://user@host/db. Unset: embedded "
        "SQLite under DISTILL_HOME.",
    )
    pool_size: int = Field(10, ge=1)
    echo: bool = False


class BrokerSettings(BaseModel):
    url: str | None = Field(
        None,
        description="Redis URL for Celery and shared teacher limits. Unset: tasks run in-process.",
    )
    visibility_timeout_s: int = Field(
        7200, ge=5, description="Redis redelivery timeout; longer than the longest task."
    )
    key_prefix: str = Field(
        "",
        description="Prefix of every Redis key (queues, teacher limits), to share one Redis "
        "safely between deployments.",
    )


class ApiSettings(BaseModel):
    max_upload_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="Dataset upload limit.")
    max_page_size: int = Field(500, ge=1)
    allow_private_teacher_urls: bool = Field(
        False,
        description="Let tenants point teachers at any private/loopback address (SSRF guard "
        "off). Operators always can, through the CLI; an embedded server (no DATABASE_URL, no "
        "REDIS_URL) has one user, the operator, and allows them too.",
    )
    # NoDecode: written as a comma-separated list (vllm,10.0.0.5), not as JSON.
    teacher_host_allowlist: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Teacher hosts tenants may use although they are private: host names (the "
        "URL's host, any case), IP addresses or networks (10.0.0.0/8), comma-separated; e.g. "
        "vllm,10.0.0.5 for compose's bundled vLLM. Everything else private stays refused.",
    )
    # NoDecode: written as a comma-separated list (NAME=host,...), not as JSON.
    key_env_allowlist: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Worker environment variables tenants may name as a teacher's or an "
        "endpoint student's api_key_env, each bound to the host its value may be sent to: "
        "NAME=host, comma-separated (VLLM_API_KEY=vllm,OPENAI_API_KEY=api.openai.com); a bare "
        "NAME may be sent to any host. Any other name is refused: the workers send the "
        "variable's value as a bearer token to the tenant's URL. Operators (the CLI) and an "
        "embedded server's one user may name any.",
    )
    local_teacher_url: str | None = Field(
        None,
        description="Base URL of the local teacher this deployment runs (`distill teacher "
        "local --port P` prints it, e.g. http://127.0.0.1:8081/v1): REST jobs with "
        "`teacher: local` use it with the local teacher's defaults. Unset: `teacher: local` "
        "is refused with a 422 over REST.",
    )
    metrics_token: SecretStr | None = Field(
        None,
        description="When set, /metrics answers only `Authorization: Bearer <this token>` "
        "(its labels name teachers). Unset: open, for a scraper inside the cluster.",
    )
    allow_trainer_commands: bool = Field(
        False,
        description="Let tenants set a student trainer_command (a shell command the workers "
        "run). Operators always can, through the CLI.",
    )
    session_max_age_s: int = Field(
        8 * 3600,
        ge=60,
        le=30 * 24 * 3600,
        description="How long a dashboard sign-in lasts; the cookie is signed with "
        "DISTILL_SECRET_KEY.",
    )
    allow_private_webhook_urls: bool = Field(
        False,
        description="Let tenants point webhooks at private/loopback addresses, as "
        "allow_private_teacher_urls does for teachers (and a refreshed endpoint student).",
    )

    @field_validator("teacher_host_allowlist", "key_env_allowlist", mode="before")
    @classmethod
    def _split_hosts(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [host.strip() for host in value.split(",") if host.strip()]
        return value


class WebhookSettings(BaseModel):
    interval_s: float = Field(
        10.0, gt=0, description="How often the periodic task sends the deliveries that are due."
    )
    timeout_s: float = Field(10.0, gt=0, description="Per-attempt timeout of one delivery.")
    max_attempts: int = Field(
        30,
        ge=1,
        description="Attempts before a delivery is marked failed (kept in the log); with the "
        "default delays, 30 attempts span about a day.",
    )
    retry_base_s: float = Field(
        10.0, gt=0, description="First retry delay; doubled per attempt, with jitter."
    )
    retry_max_s: float = Field(3600.0, gt=0, description="Longest delay between two attempts.")


class WorkerSettings(BaseModel):
    reconcile_interval_s: int = Field(
        5, ge=1, description="How often beat runs the reconcile that re-sends lost or stuck work."
    )
    stuck_after_s: int = Field(
        60,
        ge=1,
        description="A running job with no live lease and no progress for this long has its "
        "next step re-sent (a message lost with the broker).",
    )
    lease_s: float = Field(
        20.0,
        ge=1,
        description="A claimed batch or evaluation is renewed every lease_s / 3 by its worker; "
        "one not renewed for lease_s (the worker died) is taken over. Recovery after a crash "
        "takes at most lease_s + reconcile_interval_s.",
    )
    requeue_after_s: float = Field(
        60.0,
        ge=1,
        description="A pending batch nobody claimed for this long is sent again (its message "
        "was lost); a duplicate message is a no-op.",
    )
    max_crashes: int = Field(
        5,
        ge=1,
        description="A batch whose worker crashed or died this many times (a poison batch) "
        "fails with the reason instead of being sent again.",
    )
    teacher_retry_deadline_s: float = Field(
        1800.0,
        ge=0,
        description="A batch whose teacher calls keep failing transiently (down, timing out, "
        "overloaded) is retried with backoff for this long, then fails with the reason; a "
        "phase whose every batch failed so fails its job.",
    )
    teacher_lease_ttl_s: float = Field(
        30.0,
        ge=1,
        description="A teacher concurrency slot held by a worker that died comes back after "
        "this long (live holders renew theirs).",
    )
    cache_dir: Path | None = Field(None, description="Embedding cache; default DISTILL_HOME/cache.")


class Settings(BaseSettings):
    """Every field is listed, with a safe local value, in .env.example."""

    model_config = SettingsConfigDict(
        env_prefix="DISTILL_",
        env_nested_delimiter="__",
        env_file=".env",
        # `.env.example` lists every variable, the unset ones as `NAME=`: empty means unset
        # (not an empty broker URL, which would leave embedded mode, nor a cache in "").
        env_ignore_empty=True,
        extra="ignore",
    )

    environment: Environment = Environment.development
    home: Path = Field(Path(".distill"), description="Embedded database, exports, caches.")
    secret_key: str = Field(
        "change-me",
        description="Encrypts teacher API keys at rest and signs dashboard sessions. Must be "
        "set in production.",
    )
    log_level: str = "INFO"
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    broker: BrokerSettings = Field(default_factory=BrokerSettings)
    api: ApiSettings = Field(default_factory=ApiSettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    webhooks: WebhookSettings = Field(default_factory=WebhookSettings)

    # The two conventional names win when set, so compose files and PaaS add-ons just work.
    database_url_env: str | None = Field(None, validation_alias="DATABASE_URL")
    redis_url_env: str | None = Field(None, validation_alias="REDIS_URL")

    @model_validator(mode="after")
    def _resolve(self) -> Settings:
        if self.database_url_env:
            self.database.url = self.database_url_env
        if self.redis_url_env:
            self.broker.url = self.redis_url_env
        if self.environment is Environment.production and self.secret_key in _PLACEHOLDER_SECRETS:
            raise ValueError("DISTILL_SECRET_KEY must be set to a real secret in production")
        return self

    @property
    def single_user(self) -> bool:
        """Neither a database nor a broker configured: a laptop's embedded server, whose one
        user is the operator (so the guards that protect a deployment from its tenants, like
        the private-address one, do not apply to it)."""
        return self.database.url is None and self.broker.url is None

    @property
    def embedded(self) -> bool:
        """No broker configured: tasks run in-process (the laptop default)."""
        return self.broker.url is None

    @property
    def database_url(self) -> str:
        if self.database.url:
            return self.database.url
        return f"sqlite:///{(self.home / 'distill.db').resolve()}"

    @property
    def cache_dir(self) -> Path:
        return self.worker.cache_dir or self.home / "cache"

    @property
    def exports_dir(self) -> Path:
        return self.home / "exports"


@lru_cache
def get_settings() -> Settings:
    return Settings()
