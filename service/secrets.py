"""Teacher API keys at rest (Fernet-encrypted with a key derived from DISTILL_SECRET_KEY), and
which worker environment variables a tenant may name as a key."""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from cryptography.fernet import Fernet, InvalidToken

from service.errors import ValidationFailed
from service.settings import Settings, get_settings


def _fernet() -> Fernet:
    digest = hashlib.sha256(get_settings().secret_key.encode()).digest()
    return Fernet(base64.urlsafe_b64encode(digest))


def encrypt_secret(plain: str) -> str:
    return _fernet().encrypt(plain.encode()).decode()


def decrypt_secret(token: str) -> str:
    try:
        return _fernet().decrypt(token.encode()).decode()
    except InvalidToken as exc:
        raise RuntimeError(
            "cannot decrypt a stored teacher key: DISTILL_SECRET_KEY changed since it was stored"
        ) from exc


def resolve_api_key(encrypted: str | None, env_name: str | None) -> str | None:
    """The key a worker sends: the encrypted one, else the named environment variable."""
    if encrypted:
        return decrypt_secret(encrypted)
    if env_name:
        return os.environ.get(env_name)
    return None


KEY_ENV_HINT = (
    "only an operator can let tenants name a worker environment variable: list it, with the "
    "host it may be sent to, in DISTILL_API__KEY_ENV_ALLOWLIST (e.g. VLLM_API_KEY=vllm), or "
    "send the key itself as api_key (stored encrypted)"
)


@dataclass(frozen=True, slots=True)
class KeyEnvPolicy:
    """Which worker environment variables a tenant may name as an `api_key_env`, and where
    their values may go.

    The workers send the named variable's value as a bearer token to the teacher's (or the
    endpoint student's) URL, and the tenant chose that URL: naming DISTILL_SECRET_KEY,
    DATABASE_URL or the operator's OPENAI_API_KEY next to a server of their own would hand
    them the deployment's secrets. So a tenant may name only what the operator listed
    (`DISTILL_API__KEY_ENV_ALLOWLIST`), each name bound to the hosts it may be sent to
    (`NAME=host`; a bare `NAME`: any host). `allow_all`: the operator's own CLI, or an embedded
    server's one user."""

    allow_all: bool = False
    hosts: Mapping[str, frozenset[str] | None] = field(default_factory=dict)

    @classmethod
    def from_entries(cls, entries: Iterable[str], *, allow_all: bool = False) -> KeyEnvPolicy:
        hosts: dict[str, frozenset[str] | None] = {}
        for entry in entries:
            name, _, host = entry.strip().partition("=")
            name, host = name.strip(), host.strip().lower().rstrip(".")
            if not name:
                continue
            if not host or hosts.get(name, frozenset()) is None:
                hosts[name] = None  # a bare NAME: any host
            else:
                hosts[name] = (hosts.get(name) or frozenset()) | {host}
        return cls(allow_all=allow_all, hosts=hosts)

    def check(self, name: str | None, urls: Sequence[str], *, field: str) -> None:
        """Refuse `name` (422 naming `field`) unless the operator let tenants send it to every
        one of `urls`."""
        if name is None or self.allow_all:
            return
        if name not in self.hosts:
            raise ValidationFailed(
                f"{field}: {name!r} is not a variable tenants may name; {KEY_ENV_HINT}",
                details=[{"field": field, "message": f"{name} is not in the allow-list"}],
                code="key_env_not_allowed",
            )
        allowed = self.hosts[name]
        if allowed is None:
            return
        for url in urls:
            host = (urlsplit(url).hostname or "").rstrip(".").lower()
            if host not in allowed:
                raise ValidationFailed(
                    f"{field}: {name!r} may be sent only to {', '.join(sorted(allowed))}, not "
                    f"to {host or url!r}; {KEY_ENV_HINT}",
                    details=[{"field": field, "message": f"{name} is not for {host or url}"}],
                    code="key_env_not_allowed",
                )


OPERATOR_KEY_ENVS = KeyEnvPolicy(allow_all=True)


def key_env_policy(settings: Settings) -> KeyEnvPolicy:
    """The deployment's policy for the `api_key_env` of tenants' teachers and students."""
    return KeyEnvPolicy.from_entries(settings.api.key_env_allowlist, allow_all=settings.single_user)
