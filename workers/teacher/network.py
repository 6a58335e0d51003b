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
from collections.abc import Iterable, Sequence
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aiohttp
import httpcore2
import httpx2
from aiohttp.abc import AbstractResolver, ResolveResult

from service.teachers import is_metadata_host, is_private_address


class PrivateAddressError(OSError):
    """A tenant's server (teacher, endpoint student) resolves only to addresses it may not
    reach."""


def refuse_metadata_host(host: str) -> None:
    """PrivateAddressError for a cloud metadata service's name, before it is resolved."""
    if is_metadata_host(host):
        raise PrivateAddressError(
            f"{host} is a cloud metadata service: refused for a server a tenant configured"
        )


def public_addresses(host: str, addresses: Sequence[str]) -> list[str]:
    """The public unicast ones of the addresses `host` resolved to, in order; none left is a
    PrivateAddressError that names them all."""
    public = [a for a in addresses if not is_private_address(a)]
    if not public:
        raise PrivateAddressError(
            f"{host} resolves to {', '.join(sorted(set(addresses)))}: private, loopback or "
            "link-local addresses are refused for a server a tenant configured (an operator "
            "can allow them)"
        )
    return public


class PublicOnlyResolver(AbstractResolver):
    """aiohttp's default resolver with every non-public address removed."""

    def __init__(self, inner: AbstractResolver | None = None) -> None:
        self._inner = inner or aiohttp.DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        refuse_metadata_host(host)
        found = await self._inner.resolve(host, port, family)
        public = set(public_addresses(host, [str(r["host"]) for r in found]))
        return [r for r in found if str(r["host"]) in public]

    async def close(self) -> None:
        await self._inner.close()


class PublicOnlyBackend(httpcore2.SyncBackend):
    """The same guard for the synchronous SDK client (httpx2 over httpcore2) that an endpoint
    student a tenant configured is reached with: every connection, redirects included, goes
    to a public address its name resolved to, or fails with `PrivateAddressError`. TLS still
    names the URL's host (httpcore2 takes the SNI name from the request, not from here)."""

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore2.NetworkStream:
        refuse_metadata_host(host)
        try:
            found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise httpcore2.ConnectError(str(exc)) from exc
        public = public_addresses(host, list(dict.fromkeys(str(info[4][0]) for info in found)))
        failure: httpcore2.ConnectError | httpcore2.ConnectTimeout | None = None
        for address in public:
            try:
                return super().connect_tcp(address, port, timeout, local_address, socket_options)
            except (httpcore2.ConnectError, httpcore2.ConnectTimeout) as exc:
                failure = exc
        assert failure is not None
        raise failure


def public_only_http_client(timeout_s: float) -> httpx2.Client:
    """An httpx2 client for the `openai` SDK whose connections `PublicOnlyBackend` checks.
    httpx2's transport takes no network backend, so its connection pool is replaced by one
    built the same way with ours (`_pool` is the attribute its requests go through). No proxy
    from the environment: a proxy would resolve the name itself, past the check."""
    transport = httpx2.HTTPTransport(trust_env=False)
    transport._pool = httpcore2.ConnectionPool(
        ssl_context=httpx2.create_ssl_context(trust_env=False),
        max_connections=100,
        max_keepalive_connections=20,
        keepalive_expiry=5.0,
        network_backend=PublicOnlyBackend(),
    )
    return httpx2.Client(transport=transport, timeout=timeout_s, trust_env=False)


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
