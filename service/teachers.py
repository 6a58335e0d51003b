"""Teacher endpoints: validation, the SSRF guard, and keys that never leave encrypted."""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.domain.spec import TeacherSpec
from service.errors import Conflict, NotFound, ValidationFailed
from service.models import Job, Teacher
from service.secrets import encrypt_secret
from service.settings import Settings

# Names of cloud metadata services. Their addresses are refused anyway (link-local or shared
# address space), but a worker may resolve a name differently than the API did, so the names
# themselves are refused too, wherever they would resolve.
METADATA_HOSTS = frozenset(
    {
        "metadata",
        "metadata.google.internal",
        "metadata.goog",
        "instance-data",
        "instance-data.ec2.internal",
        "metadata.tencentyun.com",
        "metadata.platformequinix.com",
    }
)


def is_private_address(address: str) -> bool:
    """Whether an address is anything but a public unicast one: loopback, private, shared
    (100.64.0.0/10, where Alibaba Cloud's metadata service lives), link-local (cloud
    metadata), benchmarking, documentation, reserved, multicast or unspecified.

    `ipaddress`'s `is_global` is the complete IANA special-purpose registry, so no range is
    listed by hand; an IPv6 address that embeds an IPv4 one (mapped, 6to4, NAT64) is judged
    by the embedded address too, since that is where the packets end up.
    """
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # an IPv6 zone id is not part of it
    if ip.is_multicast or not ip.is_global:
        return True
    if ip in _IETF_PROTOCOL and ip not in _IETF_GLOBAL:
        return True
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            return is_private_address(str(embedded))
    return False


_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
# The registry's 192.0.0.0/24 is not global except two anycast hosts; Python before 3.12.4
# knows only part of it (192.0.0.8 counts as global on 3.11.7).
_IETF_PROTOCOL = ipaddress.IPv4Network("192.0.0.0/24")
_IETF_GLOBAL = frozenset({ipaddress.IPv4Address("192.0.0.9"), ipaddress.IPv4Address("192.0.0.10")})


def is_metadata_host(host: str) -> bool:
    """A cloud metadata service's name (any case, with or without the final dot)."""
    return host.rstrip(".").lower() in METADATA_HOSTS


TEACHER_PRIVATE_HINT = (
    "only an operator can allow such a teacher: add its host to "
    "DISTILL_API__TEACHER_HOST_ALLOWLIST (e.g. vllm,10.0.0.5) or set "
    "DISTILL_API__ALLOW_PRIVATE_TEACHER_URLS=true on the API, or create the job with an inline "
    "teacher through the CLI (distill run / distill jobs create)"
)

# A served student is a model server like a teacher: the same operator settings open it.
STUDENT_PRIVATE_HINT = (
    "only an operator can allow such a student: add its host to "
    "DISTILL_API__TEACHER_HOST_ALLOWLIST or set DISTILL_API__ALLOW_PRIVATE_TEACHER_URLS=true on "
    "the API"
)

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class TeacherUrlPolicy:
    """Which private teacher addresses a deployment lets its tenants use: all of them
    (`allow_all`: an operator said so, or the server's one user is the operator), or only the
    hosts the operator listed (`DISTILL_API__TEACHER_HOST_ALLOWLIST`), so compose's bundled
    `http://vllm:8000/v1` works without opening the whole internal network.

    An allowed host is trusted by its name (or literal address): the workers skip the
    connect-time guard for that teacher, as they do for one the operator created."""

    allow_all: bool = False
    hosts: frozenset[str] = frozenset()
    networks: tuple[IPNetwork, ...] = ()

    @classmethod
    def from_entries(cls, entries: Iterable[str], *, allow_all: bool = False) -> TeacherUrlPolicy:
        hosts: set[str] = set()
        networks: list[IPNetwork] = []
        for entry in entries:
            entry = entry.strip().lower().rstrip(".")
            if not entry:
                continue
            try:  # an address or a network (10.0.0.5, 10.0.0.0/8, fd00::/8)
                networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
            except ValueError:
                hosts.add(entry)
        return cls(allow_all=allow_all, hosts=frozenset(hosts), networks=tuple(networks))

    def allows(self, url: str) -> bool:
        """Whether a tenant may point a teacher at `url` although it may be private."""
        if self.allow_all:
            return True
        host = (urlsplit(url).hostname or "").rstrip(".").lower()
        if not host:
            return False
        if host in self.hosts:
            return True
        try:
            address = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return False
        return any(address in network for network in self.networks)

    def allows_all(self, urls: Iterable[str]) -> bool:
        """Whether every one of a teacher's URLs (base_url and its replicas) is allowed: one
        allow-listed URL must not open the internal network to the others."""
        return all(self.allows(url) for url in urls)


def teacher_url_policy(settings: Settings) -> TeacherUrlPolicy:
    """The deployment's policy for tenants' teacher URLs (teachers, inline job teachers, a
    refreshed endpoint student)."""
    return TeacherUrlPolicy.from_entries(
        settings.api.teacher_host_allowlist,
        allow_all=settings.api.allow_private_teacher_urls or settings.single_user,
    )


def check_base_url(
    url: str,
    *,
    allow_private: bool,
    field: str = "base_url",
    private_hint: str = TEACHER_PRIVATE_HINT,
) -> None:
    """Reject URLs a tenant must not point a worker at (cloud metadata, the internal network).

    Teachers, webhooks and a refreshed endpoint student share it; `field` names the request
    field in the error, `private_hint` says who can allow a private address."""
    try:
        parts = urlsplit(url)
        port = parts.port  # raises on a port that is not a number in 0-65535
    except ValueError as exc:
        raise ValidationFailed(
            f"{field} is not a valid URL: {exc}",
            details=[{"field": field, "message": str(exc)}],
        ) from None
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise ValidationFailed(
            f"{field} must be an http(s) URL",
            details=[{"field": field, "message": f"got {url!r}"}],
        )
    if allow_private:
        return
    if is_metadata_host(parts.hostname):
        raise ValidationFailed(
            "base_url names a cloud metadata service; a tenant's teacher cannot point there",
            details=[{"field": "base_url", "message": parts.hostname}],
            code="private_address",
        )
    try:
        infos = socket.getaddrinfo(parts.hostname, port or 443, proto=socket.IPPROTO_TCP)
    except socket.gaierror as exc:
        raise ValidationFailed(
            f"{field} host does not resolve",
            details=[{"field": field, "message": str(exc)}],
        ) from exc
    except (UnicodeError, ValueError) as exc:
        # The IDNA codec refuses a label over 63 characters or an empty one; a NUL in the
        # name is a ValueError: a host name no resolver would take, so the user's error.
        raise ValidationFailed(
            f"{field} host is not a valid host name",
            details=[{"field": field, "message": str(exc)}],
        ) from None
    for info in infos:
        if is_private_address(str(info[4][0])):
            raise ValidationFailed(
                f"{field} points at a private, loopback or link-local address; {private_hint}",
                details=[{"field": field, "message": f"{parts.hostname} → {info[4][0]}"}],
                code="private_address",
            )


def create_teacher(
    session: Session,
    tenant_id: uuid.UUID,
    spec: TeacherSpec,
    *,
    name: str,
    api_key: str | None = None,
    allow_private: bool,
) -> Teacher:
    """A teacher row from `spec`, every field of it: the REST body, the CLI's options and an
    inline job teacher all arrive as a TeacherSpec (tests/unit/test_teacher_fields.py keeps
    TeacherCreate's fields the same), so none can be validated and then dropped."""
    check_base_url(spec.base_url, allow_private=allow_private)
    replicas = _checked_replicas(spec.base_url, spec.replica_urls, allow_private=allow_private)
    teacher = Teacher(
        tenant_id=tenant_id,
        name=name,
        base_url=spec.base_url.rstrip("/"),
        replica_urls=replicas,
        model=spec.model,
        api_key_encrypted=encrypt_secret(api_key) if api_key else None,
        api_key_env=spec.api_key_env,
        limits=spec.limits.model_dump(mode="json"),
        prices=spec.prices.model_dump(mode="json"),
        generation=spec.generation.model_dump(mode="json"),
        structured_mode=spec.structured_mode.value,
        timeout_s=spec.timeout_s,
        max_attempts=spec.max_attempts,
        # Workers hold a tenant's teacher to public addresses at connect time as well, so a
        # name that resolves elsewhere later (DNS rebinding) or a redirect cannot reach inside.
        allow_private_network=allow_private,
    )
    # Added inside the savepoint, so a rollback also expunges it from the session.
    with _unique_name(session, name):
        session.add(teacher)
        session.flush()
    return teacher


def _checked_replicas(
    base_url: str, replica_urls: Sequence[str], *, allow_private: bool
) -> list[str]:
    """Each replica URL passes the same checks as base_url; none repeats another."""
    seen = {base_url.rstrip("/")}
    replicas: list[str] = []
    for i, url in enumerate(replica_urls):
        field = f"replica_urls[{i}]"
        check_base_url(url, allow_private=allow_private, field=field)
        url = url.rstrip("/")
        if url in seen:
            raise ValidationFailed(
                f"{field} repeats a URL of this teacher",
                details=[{"field": field, "message": url}],
            )
        seen.add(url)
        replicas.append(url)
    return replicas


@contextlib.contextmanager
def _unique_name(session: Session, name: str) -> Iterator[None]:
    """A savepoint for adding or changing a teacher: a taken name is a 409, and the rollback
    leaves the session usable."""
    try:
        with session.begin_nested():
            yield
    except IntegrityError as exc:
        raise Conflict(
            f"a teacher named {name!r} already exists",
            details=[{"field": "name", "message": "must be unique"}],
        ) from exc


def get_teacher(session: Session, tenant_id: uuid.UUID, teacher_id: uuid.UUID) -> Teacher:
    teacher = session.get(Teacher, teacher_id)
    if teacher is None or teacher.tenant_id != tenant_id:
        raise NotFound(f"teacher {teacher_id} not found")
    return teacher


def find_teacher(session: Session, tenant_id: uuid.UUID, ref: str) -> Teacher | None:
    """The tenant's teacher with this id or, failing that, this name (names are unique per
    tenant); None when there is neither."""
    with contextlib.suppress(ValueError, NotFound):
        return get_teacher(session, tenant_id, uuid.UUID(ref))
    return session.scalar(
        select(Teacher).where(Teacher.tenant_id == tenant_id, Teacher.name == ref)
    )


def teacher_not_found(
    ref: str, *, field: str = "teacher", local_hint: str = ""
) -> ValidationFailed:
    """The 422 for a job spec's teacher that names nothing: which field, and where to look."""
    return ValidationFailed(
        f"{field}: no teacher with the id or name {ref!r}; GET /v1/teachers lists yours, "
        f"POST /v1/teachers creates one, or give an inline teacher (base_url, model){local_hint}",
        details=[{"field": field, "message": f"teacher not found: {ref}"}],
        code="teacher_not_found",
    )


def update_teacher(
    session: Session, teacher: Teacher, changes: dict[str, Any], *, allow_private: bool
) -> Teacher:
    if "base_url" in changes and changes["base_url"] is not None:
        check_base_url(changes["base_url"], allow_private=allow_private)
    replicas = None
    if changes.get("replica_urls") is not None:
        replicas = _checked_replicas(
            changes.get("base_url") or teacher.base_url,
            changes["replica_urls"],
            allow_private=allow_private,
        )
    session.flush()  # anything pending stays outside the savepoint below
    # Changed inside the savepoint, so a rollback also expires the changed attributes.
    with _unique_name(session, changes.get("name") or teacher.name):
        if "base_url" in changes and changes["base_url"] is not None:
            teacher.base_url = changes["base_url"].rstrip("/")
            teacher.allow_private_network = allow_private
        if replicas is not None:
            teacher.replica_urls = replicas
            teacher.allow_private_network = allow_private
        if "api_key" in changes:
            key = changes["api_key"]
            teacher.api_key_encrypted = encrypt_secret(key) if key else None
        for field in (
            "name",
            "model",
            "api_key_env",
            "structured_mode",
            "timeout_s",
            "max_attempts",
        ):
            if field in changes and changes[field] is not None:
                setattr(teacher, field, changes[field])
        for field in ("limits", "prices", "generation"):
            if field in changes and changes[field] is not None:
                setattr(teacher, field, changes[field].model_dump(mode="json"))
        session.flush()
    return teacher


def delete_teacher(session: Session, teacher: Teacher) -> None:
    in_use = session.scalar(select(Job.id).where(Job.teacher_id == teacher.id).limit(1))
    if in_use is not None:
        raise Conflict(
            f"teacher {teacher.id} is used by job {in_use}: delete that job first (DELETE "
            "/v1/jobs/{id} once it has finished), or rename the teacher with PATCH"
        )
    session.delete(teacher)
    session.flush()
