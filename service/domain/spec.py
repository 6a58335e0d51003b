"""The job spec: one document for the CLI's YAML and the REST API, with a published JSON Schema."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from service.domain.teacher import GenerationParams, StructuredMode, TeacherLimits, TeacherPrices


def storable_text(value: str) -> str:
    """Postgres text and JSONB cannot hold NUL, and a lone surrogate cannot be encoded at all."""
    if "\x00" in value:
        raise PydanticCustomError(
            "unstorable_text", "contains a NUL character (\\u0000), which cannot be stored"
        )
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise PydanticCustomError(
            "unstorable_text",
            "contains an unpaired surrogate (\\ud800-\\udfff), which is not valid Unicode",
        ) from None
    return value


# Free text a request may carry into the database: every such field of the API and the spec
# is `Text` (with its column's max_length where it has one), so it fails as a 422, not a 500.
Text = Annotated[str, AfterValidator(storable_text)]

# The loops a job can run; 'random' is the open-loop baseline (random seed rows).
StrategyName = Literal["llm2llm", "pgkd", "arte", "rationales", "random"]


class _Spec(BaseModel):
    # Non-finite floats cannot be stored in JSON(B); every number of the spec is finite.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class TaskKind(StrEnum):
    classification = "classification"
    qa = "qa"  # a checkable answer, GSM8K-style
    generation = "generation"


class TaskSpec(_Spec):
    """What the student must learn."""

    kind: TaskKind = TaskKind.classification
    instructions: Text = Field(..., min_length=1, max_length=8000)
    labels: list[Text] | None = Field(
        None, description="Classification label set; inferred from the train split when omitted."
    )
    input_field: Text = Field("text", min_length=1)
    output_field: Text = Field("label", min_length=1)
    answer_pattern: Text | None = Field(
        None, description="Regex with one group extracting a QA answer; default GSM8K '#### N'."
    )

    @field_validator("labels", mode="before")
    @classmethod
    def _labels_as_text(cls, value: Any) -> Any:
        # Data labels 0/1 or true/false are compared as their text ("0", "True"), so a spec
        # may list them as written in the data.
        if isinstance(value, list):
            return [
                str(v) if isinstance(v, bool | int | float) and not isinstance(v, str) else v
                for v in value
            ]
        return value

    @model_validator(mode="after")
    def _labels_unique(self) -> TaskSpec:
        if self.labels is not None:
            if len(self.labels) < 2:
                raise ValueError("labels: a classification task needs at least two labels")
            if len(set(self.labels)) != len(self.labels):
                raise ValueError("labels: duplicate label")
        return self


class DatasetRefs(_Spec):
    """The tenant's dataset ids or names (REST and CLI), or JSONL paths (`distill run`,
    uploaded before the job is created)."""

    train: Text = Field(..., description="Seed train set.")
    validation: Text | None = Field(
        None, description="Validation set; a held-out slice of train is used when omitted."
    )
    test: Text | None = None


# A teacher served by several servers (replicas of one model): base_url plus these. The gateway
# sends each request to the least loaded one; each has the teacher's limits.
ReplicaUrls = Annotated[
    list[Annotated[Text, Field(max_length=2000)]],
    Field(
        max_length=16,
        description="More base URLs serving the same model (replicas); requests are balanced "
        "over base_url and these by their load, and each has the teacher's limits.",
    ),
]


class TeacherSpec(_Spec):
    """An inline teacher (the CLI creates it); REST jobs may also reference a teacher id."""

    # The limits are the columns of the teacher the inline spec becomes (service/models.py).
    base_url: Text = Field(..., max_length=2000)
    replica_urls: ReplicaUrls = Field(default_factory=list)
    model: Text = Field(..., min_length=1, max_length=500)
    api_key_env: Text | None = Field(
        None,
        max_length=200,
        description="Name of the environment variable holding the key (never the key).",
    )
    limits: TeacherLimits = Field(default_factory=TeacherLimits)
    prices: TeacherPrices = Field(default_factory=TeacherPrices)
    structured_mode: StructuredMode = StructuredMode.auto
    generation: GenerationParams = Field(default_factory=GenerationParams)
    timeout_s: float = Field(120.0, gt=0, le=3600, description="Per-attempt request timeout.")
    max_attempts: int = Field(6, ge=1, le=50)


class StudentType(StrEnum):
    builtin = "builtin"
    endpoint = "endpoint"
    external = "external"


class StudentSpec(_Spec):
    """Where the feedback comes from."""

    type: StudentType = StudentType.builtin
    model: Text = Field(
        "minilm",
        description="builtin: 'minilm' (packaged all-MiniLM-L6-v2), 'tfidf', or a local "
        "sentence-transformers path; endpoint: the served model name.",
    )
    base_url: Text | None = None
    api_key_env: Text | None = None
    trainer_command: Text | None = Field(
        None,
        description="endpoint students: a command run each iteration with the training set "
        "({dataset} or $DISTILL_DATASET, JSONL); it returns once the new checkpoint is served.",
    )

    @model_validator(mode="after")
    def _endpoint_needs_url(self) -> StudentSpec:
        if self.type is StudentType.endpoint and not self.base_url:
            raise ValueError("base_url: an endpoint student needs a base_url")
        if self.trainer_command and self.type is not StudentType.endpoint:
            raise ValueError("trainer_command: only an endpoint student is retrained by a command")
        if self.type is StudentType.builtin and not _builtin_model_name(self.model):
            raise ValueError(
                f"model: {self.model!r} is no built-in student: use 'minilm', 'tfidf', or the "
                "path of a local sentence-transformers directory (e.g. ./models/my-encoder)"
            )
        return self


BUILTIN_MODELS = ("minilm", "tfidf")


def _builtin_model_name(model: str) -> bool:
    """'minilm', 'tfidf', or something written as a path (the directory itself is checked on
    the worker, which is where it must exist)."""
    return (
        model in BUILTIN_MODELS or any(ch in model for ch in "/\\") or model.startswith((".", "~"))
    )


class Budget(_Spec):
    max_iterations: int = Field(3, ge=1, le=1000)
    max_examples: int | None = Field(None, ge=1, description="Accepted examples, whole job.")
    max_examples_per_iteration: int | None = Field(None, ge=1)
    max_tokens: int | None = Field(None, ge=1, description="Teacher tokens in+out, whole job.")
    max_cost_usd: float | None = Field(None, gt=0)


class Metric(StrEnum):
    accuracy = "accuracy"
    macro_f1 = "macro_f1"


class Stopping(_Spec):
    metric: Metric = Metric.accuracy
    patience: int = Field(
        2,
        ge=1,
        description="Stop after this many iterations in a row whose examples were excluded "
        "because they made the student measurably worse on validation or their labels looked "
        "wrong.",
    )
    min_delta: float = Field(
        0.0,
        ge=0,
        description="A validation change smaller than this counts as none: an iteration is "
        "excluded only when measurably worse by more than this, and counts as better only when "
        "measurably better by more.",
    )
    target: float | None = Field(None, gt=0, le=1, description="Stop once reached.")


class FilterSpec(_Spec):
    min_chars: int = Field(3, ge=0)
    max_chars: int = Field(2000, ge=1)
    near_duplicate_threshold: float = Field(0.85, gt=0, le=1)
    contamination_threshold: float = Field(0.8, gt=0, le=1)
    teacher_verification: bool | Literal["sample"] = Field(
        False,
        description="true: the teacher labels every accepted example again, on its own, and "
        "an example it labels otherwise is rejected (a second call per example). 'sample': "
        "the same for a seeded fifth of each batch's accepted examples (at least 10); when 2 "
        "or more and at least a fifth of those disagree, or of all the job verified so far "
        "with them, the rest of the batch is verified too, so a teacher that writes wrong "
        "labels pays for checking all of them and one that does not pays for a fifth.",
    )

    @field_validator("max_chars")
    @classmethod
    def _max_not_below_min(cls, value: int, info: ValidationInfo) -> int:
        min_chars = info.data.get("min_chars")
        if isinstance(min_chars, int) and value < min_chars:
            raise PydanticCustomError(
                "max_below_min",
                "must be at least min_chars ({min_chars}); got {value}",
                {"min_chars": min_chars, "value": value},
            )
        return value


class JobSpec(_Spec):
    """A distillation job, as written in YAML for `distill run` or POSTed to /v1/jobs."""

    name: Text = Field(..., min_length=1, max_length=200)
    strategy: StrategyName = Field(
        ..., description="The loop; 'random' is the open-loop baseline (random seed rows)."
    )
    task: TaskSpec
    datasets: DatasetRefs
    teacher: str | TeacherSpec = Field(
        ...,
        description="A teacher's id or name (GET /v1/teachers), `local` (the server's local "
        "teacher, where it runs one), or an inline teacher.",
    )
    student: StudentSpec = Field(default_factory=StudentSpec)
    budget: Budget = Field(default_factory=Budget)
    stopping: Stopping = Field(default_factory=Stopping)
    filters: FilterSpec = Field(default_factory=FilterSpec)
    params: dict[str, Any] = Field(
        default_factory=dict, description="Strategy parameters, validated by the strategy."
    )
    batch_size: int = Field(
        512,
        ge=1,
        le=2048,
        description="Prompts per generation batch (one task). One worker process already keeps "
        "a teacher at its concurrency limit, and each batch costs a fixed amount of bookkeeping "
        "(bench/job_throughput.py: 512 → within 5% of the gateway alone, 64 → ~1.2x); smaller "
        "batches spread an iteration over more workers.",
    )
    seed: int = 0

    @field_validator("teacher")
    @classmethod
    def _teacher_id_storable(cls, value: str | TeacherSpec) -> str | TeacherSpec:
        # Not `Text | TeacherSpec`: its errors would name the union member after the validator.
        return storable_text(value) if isinstance(value, str) else value


def job_json_schema() -> dict[str, Any]:
    return JobSpec.model_json_schema()
