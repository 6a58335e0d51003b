"""The trainer hook: a student whose `fit` runs the user's own training command.

For a fully automatic loop with a GPU trainer: each iteration the worker writes the current
training set as JSONL, runs the configured command with it, and when the command returns
(the new checkpoint is served) evaluates the student behind its endpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import subprocess
from collections.abc import Sequence
from pathlib import Path

import structlog

from service.domain.evaluation import EvalRow, Prediction, TrainRow
from service.domain.spec import TaskSpec
from workers.students.base import Student, StudentConfigurationError

log = structlog.get_logger(__name__)

# A fine-tune can take hours; the hook is bounded so a hung trainer cannot hold a worker forever.
DEFAULT_TIMEOUT_S = 24 * 3600


class CommandTrainedStudent:
    """`fit` = write the dataset, run `command` (its `{dataset}` replaced by the file's path,
    which is also in $DISTILL_DATASET); `predict` = the wrapped endpoint student."""

    def __init__(
        self,
        inner: Student,
        command: str,
        task: TaskSpec,
        workdir: Path,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        self._inner = inner
        self._command = command
        self._task = task
        self._workdir = workdir
        self._timeout_s = timeout_s

    def fit(self, rows: Sequence[TrainRow]) -> None:
        lines = [
            json.dumps({self._task.input_field: r.input, self._task.output_field: r.output})
            for r in rows
        ]
        blob = "\n".join(lines) + "\n"
        digest = hashlib.sha256(blob.encode()).hexdigest()[:16]
        self._workdir.mkdir(parents=True, exist_ok=True)
        path = self._workdir / f"train-{digest}.jsonl"
        path.write_text(blob)
        command = self._command.replace("{dataset}", shlex.quote(str(path)))
        log.info("student.trainer_started", rows=len(rows), dataset=str(path))
        try:
            result = subprocess.run(
                command,
                shell=True,  # the operator's own command line, as written in the job spec
                env={**os.environ, "DISTILL_DATASET": str(path)},
                capture_output=True,
                text=True,
                timeout=self._timeout_s,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise StudentConfigurationError(
                f"trainer command timed out after {self._timeout_s:.0f}s"
            ) from exc
        if result.returncode != 0:
            tail = (result.stderr or result.stdout or "").strip()[-500:]
            raise StudentConfigurationError(
                f"trainer command failed with exit code {result.returncode}: {tail}"
            )
        log.info("student.trainer_finished", dataset=str(path))

    def predict(self, rows: Sequence[EvalRow]) -> list[Prediction]:
        return self._inner.predict(rows)

    def score_demonstration(self, demonstration: str, rows: Sequence[EvalRow]) -> float:
        scorer = getattr(self._inner, "score_demonstration", None)
        if scorer is None:
            raise StudentConfigurationError("the wrapped student cannot score demonstrations")
        return float(scorer(demonstration, rows))

    def close(self) -> None:
        close = getattr(self._inner, "close", None)
        if close is not None:
            close()
