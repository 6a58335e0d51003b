"""Connect-time SSRF guard for teachers a tenant configured.

The API refuses a tenant's base URL that resolves to a private address when the teacher is
created or changed, but a name can resolve elsewhere later (DNS rebinding) and a server can
redirect. For such teachers the gateway's HTTP client resolves through `PublicOnlyResolver`,
which drops every address that is not public unicast (`ipaddress`'s `is_global`: private,
shared, loopback, link-local, reserved, ...), refuses cloud metadata names, fails when
nothing else is left, and does not follow redirects. aiohttp's resolver hook is the one place where
the address that will be connected to is known; no library wraps it.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import TypeVar
from urllib.parse import urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult

from service.teachers import is_metadata_host, is_private_address


class PrivateAddressError(OSError):
    """The teacher's host resolves only to addresses a tenant may not reach."""


class PublicOnlyResolver(AbstractResolver):
    """aiohttp's default resolver with every non-public address removed."""

    def __init__(self, inner: AbstractResolver | None = None) -> None:
        self._inner = inner or aiohttp.DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        if is_metadata_host(host):
            raise PrivateAddressError(
                f"{host} is a cloud metadata service: refused for a teacher a tenant configured"
            )
        found = await self._inner.resolve(host, port, family)
        public = [r for r in found if not is_private_address(str(r["host"]))]
        if not public:
            addresses = ", ".join(sorted({str(r["host"]) for r in found}))
            raise PrivateAddressError(
                f"{host} resolves to {addresses}: private, loopback or link-local addresses "
                "are refused for a teacher a tenant configured (an operator can allow them)"
            )
        return public

    async def close(self) -> None:
        await self._inner.close()


E = TypeVar("E", bound=BaseException)


def cause_of_type(exc: BaseException, kind: type[E]) -> E | None:
    """The first exception of `kind` in `exc`'s cause/context chain (the SDK and aiohttp wrap
    the one that tells what happened), or None."""
    seen: BaseException | None = exc
    for _ in range(10):
        if seen is None:
            return None
        if isinstance(seen, kind):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def private_address_error(exc: BaseException) -> PrivateAddressError | None:
    """The PrivateAddressError behind an exception, if any."""
    return cause_of_type(exc, PrivateAddressError)


def literal_private_host(url: str) -> str | None:
    """The URL's host when it is a private IP literal (which no resolver sees) or a cloud
    metadata service's name, else None."""
    host = urlsplit(url).hostname
    if host is None:
        return None
    if is_metadata_host(host):
        return host
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None  # a name: the resolver checks what it resolves to
    return host if is_private_address(host) else None
