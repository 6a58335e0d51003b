"""The loop strategies by name, and validation of a job's strategy params."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel

from service.domain.spec import TaskSpec
from service.domain.strategies.arte import ARTE, ARTEParams, preference_pairs
from service.domain.strategies.base import (
    CandidateExample,
    Decision,
    EvaluatedRow,
    ExampleKind,
    GenerationTarget,
    IterationOutcome,
    LabelledRow,
    PhaseResult,
    PlanContext,
    ScoredDraft,
    Strategy,
    decide_by_metric,
)
from service.domain.strategies.llm2llm import LLM2LLM, LLM2LLMParams
from service.domain.strategies.pgkd import PGKD, PGKDParams
from service.domain.strategies.random_augment import RandomAugment, RandomAugmentParams
from service.domain.strategies.rationales import Rationales, RationalesParams, answer_matches

STRATEGIES: dict[str, type[Strategy]] = {
    strategy.name: strategy for strategy in (LLM2LLM, PGKD, ARTE, Rationales, RandomAugment)
}


def _strategy_class(name: str) -> type[Strategy]:
    try:
        return STRATEGIES[name]
    except KeyError:
        known = ", ".join(sorted(STRATEGIES))
        raise ValueError(f"strategy: unknown strategy {name!r}, expected one of {known}") from None


def get_strategy(name: str) -> Strategy:
    """A strategy instance by name; ValueError for an unknown name."""
    return _strategy_class(name)()


def validate_params(name: str, raw: Mapping[str, Any], task: TaskSpec | None = None) -> BaseModel:
    """A job's `params` validated by its strategy, and its task kind checked when given.

    Raises ValueError naming each bad field (`params.examples_per_error: ...`).
    """
    strategy = _strategy_class(name)
    if task is not None:
        strategy.check_task(task)
    return strategy.validate_params(raw)


__all__ = [
    "ARTE",
    "LLM2LLM",
    "PGKD",
    "STRATEGIES",
    "ARTEParams",
    "CandidateExample",
    "Decision",
    "EvaluatedRow",
    "ExampleKind",
    "GenerationTarget",
    "IterationOutcome",
    "LLM2LLMParams",
    "LabelledRow",
    "PGKDParams",
    "PhaseResult",
    "PlanContext",
    "RandomAugment",
    "RandomAugmentParams",
    "Rationales",
    "RationalesParams",
    "ScoredDraft",
    "Strategy",
    "answer_matches",
    "decide_by_metric",
    "get_strategy",
    "preference_pairs",
    "validate_params",
]
