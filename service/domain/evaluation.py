"""Rows a student is trained and evaluated on, and the predictions it returns."""

from __future__ import annotations

from pydantic import BaseModel, Field


class TrainRow(BaseModel):
    input: str
    output: str


class EvalRow(BaseModel):
    row_id: str
    input: str
    gold: str | None = None


class Prediction(BaseModel):
    """One student answer for one evaluation row."""

    row_id: str
    predicted: str | None = Field(None, description="Label or answer; None when unparseable.")
    confidence: float | None = Field(None, ge=0, le=1)
    probabilities: dict[str, float] | None = None
    raw: str | None = None
    correct: bool | None = None
    error: str | None = None
