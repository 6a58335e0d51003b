"""Teacher API keys at rest: Fernet-encrypted with a key derived from DISTILL_SECRET_KEY."""

from __future__ import annotations

import base64
import hashlib
import os

from cryptography.fernet import Fernet, InvalidToken

from service.settings import get_settings


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
