"""The connect-time SSRF guard of an endpoint student a tenant configured: every connection goes
to a public address its name resolved to (a name can resolve elsewhere after the job was
created), through the `openai` SDK's own client."""

from __future__ import annotations

import socket
from typing import Any

import httpcore2
import pytest

from service.domain.evaluation import EvalRow
from service.domain.spec import TaskKind, TaskSpec
from workers.students.base import StudentConfigurationError
from workers.students.endpoint import EndpointStudent
from workers.teacher.network import PrivateAddressError, PublicOnlyBackend


@pytest.mark.parametrize(
    ("host", "says"),
    [
        ("localhost", "resolves to"),
        ("127.0.0.1", "resolves to 127.0.0.1"),
        ("10.1.2.3", "resolves to 10.1.2.3"),
        ("169.254.169.254", "resolves to 169.254.169.254"),
        ("metadata.google.internal", "cloud metadata"),
    ],
)
def test_a_private_or_metadata_host_is_refused_before_connecting(host: str, says: str) -> None:
    with pytest.raises(PrivateAddressError, match=says):
        PublicOnlyBackend().connect_tcp(host, 80, timeout=1)


def test_only_the_public_addresses_a_name_resolves_to_are_connected_to(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A name that resolves to the metadata service and to a public address (a rebinding
    # attempt that mixes them): only the public one is tried.
    def resolve(host: str, port: int, *args: Any, **kwargs: Any) -> list[Any]:
        return [
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("169.254.169.254", port)),
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.215.14", port)),
        ]

    tried: list[str] = []

    def connect(self: Any, host: str, port: int, *args: Any, **kwargs: Any) -> Any:
        tried.append(host)
        raise httpcore2.ConnectError("unreachable here")

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    monkeypatch.setattr(httpcore2.SyncBackend, "connect_tcp", connect)
    with pytest.raises(httpcore2.ConnectError):
        PublicOnlyBackend().connect_tcp("student.example", 443, timeout=1)
    assert tried == ["93.184.215.14"]


def test_an_endpoint_student_of_a_tenant_stops_with_the_reason() -> None:
    task = TaskSpec(kind=TaskKind.classification, instructions="Classify.", labels=["a", "b"])
    student = EndpointStudent(
        task, base_url="http://localhost:9/v1", model="s", max_retries=0, public_only=True
    )
    try:
        with pytest.raises(StudentConfigurationError, match="localhost resolves to"):
            student.predict([EvalRow(row_id="r1", input="some text", gold="a")])
    finally:
        student.close()
