"""Final-answer extraction and answer checking for QA tasks with a checkable answer (GSM8K)."""

from __future__ import annotations

import math
import re

# A number as written in text: optional minus, thousands separated by commas or not, optional
# decimals. The look-behind keeps "5-3" from yielding "-3" and "v2" or ".5" from yielding a number.
_NUMBER = r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"
_NUMBER_RE = re.compile(_NUMBER)
# Markers that introduce a final answer; group 1 is the rest of their line, captured in a
# look-ahead so that finditer also finds a second marker on the same line.
_GSM8K_MARKER_RE = re.compile(r"####(?=([^\n]*))")
_ANSWER_IS_RE = re.compile(r"\bthe\s+(?:final\s+)?answer\s+is\b(?=([^\n]*))", re.IGNORECASE)
_SENTENCE_END_RE = re.compile(r"[.!?](?:\s|$)")
# Strict syntax for normalize_number: float() alone would also take "nan", "inf" and "1_000".
_NUMERIC_RE = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")


def _undecorate(text: str) -> str:
    return text.strip().rstrip(".").replace(",", "").replace("$", "").strip()


def _tidy(answer: str) -> str:
    """A numeric answer without its decoration ("$1,000." -> "1000"); any other answer unchanged."""
    bare = _undecorate(answer)
    return bare if _NUMERIC_RE.fullmatch(bare) else answer


def _answer_after_marker(tail: str) -> str | None:
    """The answer in the first sentence after a marker: its first number, else the sentence."""
    sentence = _SENTENCE_END_RE.split(tail, maxsplit=1)[0]
    number = _NUMBER_RE.search(sentence)
    if number is not None:
        return _tidy(number.group(0))
    answer = sentence.strip(" \t:*_$")
    return answer or None


def extract_answer(text: str, pattern: str | None = None) -> str | None:
    """The final answer written in a model output, or None when there is none.

    With `pattern` (a regex, normally with one group): the first match's group 1 (or the whole
    match when the pattern has no group). Without it, in order: the number after GSM8K's
    `#### ` marker (its first occurrence, as lm-evaluation-harness's strict match does, so a
    student that runs on into a new question is read at its first answer); the text after the last
    "the answer is"; the last number in the text. Answers are stripped, and numbers come back
    without thousands commas, currency sign or sentence-final period ("$1,000." -> "1000").
    """
    if pattern is not None:
        match = re.search(pattern, text)
        if match is None:
            return None
        value = match.group(1) if match.re.groups else match.group(0)
        return _tidy(value.strip()) if value is not None else None
    marker = _GSM8K_MARKER_RE.search(text)
    if marker is not None and (answer := _answer_after_marker(marker.group(1))) is not None:
        return answer
    answer_is = list(_ANSWER_IS_RE.finditer(text))
    # The last "the answer is" wins: models restate the question's numbers before concluding.
    if answer_is and (answer := _answer_after_marker(answer_is[-1].group(1))) is not None:
        return answer
    numbers = _NUMBER_RE.findall(text)
    return _tidy(numbers[-1]) if numbers else None


def normalize_number(s: str) -> float | None:
    """`s` as a number when it is one ("$1,000." -> 1000.0), else None."""
    bare = _undecorate(s)
    return float(bare) if _NUMERIC_RE.fullmatch(bare) else None


def answers_match(
    predicted: str | None,
    gold: str,
    *,
    rel_tol: float = 1e-6,
    abs_tol: float = 1e-6,
) -> bool:
    """Whether a predicted answer equals the gold one.

    Numerically (within the tolerances) when both parse as numbers, so "1,000" matches "1000.0";
    otherwise as strings, ignoring case and runs of whitespace. A missing prediction never matches.
    """
    if predicted is None:
        return False
    predicted_number, gold_number = normalize_number(predicted), normalize_number(gold)
    if predicted_number is not None and gold_number is not None:
        return math.isclose(predicted_number, gold_number, rel_tol=rel_tol, abs_tol=abs_tol)
    return " ".join(predicted.casefold().split()) == " ".join(gold.casefold().split())


def gold_answer(answer_field: str) -> str:
    """The final answer of a gold answer field.

    A GSM8K field is reasoning followed by a last line `#### 72`: the text after the last marker,
    tidied like `extract_answer`'s numbers. A field without a marker is taken to be the
    answer itself (other QA data sets store only the answer), stripped.
    """
    _, marker, final = answer_field.rpartition("####")
    answer = final.strip() if marker else answer_field.strip()
    return _tidy(answer)
