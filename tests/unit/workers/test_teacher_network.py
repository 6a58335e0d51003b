"""The connect-time SSRF guard: only public addresses for a teacher a tenant configured."""

from __future__ import annotations

import asyncio
import socket

import pytest
from aiohttp.abc import AbstractResolver, ResolveResult

from workers.teacher.network import (
    PrivateAddressError,
    PublicOnlyResolver,
    literal_private_host,
    private_address_error,
)
from workers.teacher.retry import classify_error


class _Fixed(AbstractResolver):
    def __init__(self, *addresses: str) -> None:
        self.addresses = addresses

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        return [
            ResolveResult(hostname=host, host=a, port=port, family=family, proto=0, flags=0)
            for a in self.addresses
        ]

    async def close(self) -> None:
        return None


def _resolve(*addresses: str) -> list[str]:
    resolver = PublicOnlyResolver(_Fixed(*addresses))
    return [str(r["host"]) for r in asyncio.run(resolver.resolve("teacher.example", 443))]


def test_public_addresses_pass_and_private_ones_are_dropped() -> None:
    assert _resolve("93.184.216.34") == ["93.184.216.34"]
    assert _resolve("10.0.0.7", "93.184.216.34") == ["93.184.216.34"]


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "10.1.2.3",
        "192.168.0.1",
        "169.254.169.254",
        "::1",
        "fe80::1%eth0",
        "100.100.100.200",  # Alibaba Cloud's metadata service, in shared address space
        "100.64.0.1",  # carrier-grade NAT (RFC 6598)
        "198.18.0.1",  # benchmarking (RFC 2544)
        "192.0.0.8",  # IETF protocol assignments
        "::ffff:10.0.0.1",  # IPv4-mapped private address
        "2002:a00:1::1",  # 6to4 of 10.0.0.1
        "64:ff9b::a9fe:a9fe",  # NAT64 of 169.254.169.254
        "fd00:ec2::254",  # AWS's IPv6 metadata address (unique local)
    ],
)
def test_a_name_that_resolves_only_inside_is_refused(address: str) -> None:
    with pytest.raises(PrivateAddressError, match=r"teacher\.example resolves to"):
        _resolve(address)


def test_ip_literals_are_checked_without_a_resolver() -> None:
    assert literal_private_host("http://169.254.169.254/v1") == "169.254.169.254"
    assert literal_private_host("http://100.100.100.200/v1") == "100.100.100.200"
    assert literal_private_host("http://[::1]:8000/v1") == "::1"
    assert literal_private_host("https://93.184.216.34/v1") is None
    assert literal_private_host("https://api.openai.com/v1") is None


def test_a_refused_address_is_a_permanent_error_however_deeply_wrapped() -> None:
    inner = PrivateAddressError("teacher.example resolves to 127.0.0.1")
    try:
        try:
            raise inner
        except PrivateAddressError as exc:
            raise ConnectionError("cannot connect") from exc
    except ConnectionError as outer:
        assert private_address_error(outer) is inner
        verdict = classify_error(outer)
    assert verdict.error_code == "private_address"
    assert verdict.permanent and not verdict.retryable


@pytest.mark.parametrize(
    "url",
    [
        "http://metadata.google.internal/computeMetadata/v1",
        "http://metadata/computeMetadata/v1",
        "http://instance-data/latest",
        "http://METADATA.GOOGLE.INTERNAL./v1",
    ],
)
def test_metadata_service_names_are_refused_whatever_they_resolve_to(url: str) -> None:
    assert literal_private_host(url) is not None
