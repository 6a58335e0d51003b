"""How numbers, money and times read on the dashboard (Jinja filters)."""

from __future__ import annotations

import math
from datetime import UTC, datetime

from jinja2 import Environment

NONE = "–"  # noqa: RUF001 - an en dash, for a value that does not exist (yet)


def money(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return NONE
    if value == 0:
        return "$0"
    if abs(value) >= 1:
        return f"${value:,.2f}"
    if abs(value) >= 0.01:
        return f"${value:.4f}"
    return f"${value:.3g}"


def tokens(value: int | float | None) -> str:
    if value is None:
        return NONE
    n = float(value)
    if abs(n) < 1000:
        return f"{int(n)}"
    if abs(n) < 1_000_000:
        return f"{n / 1000:.1f}k"
    return f"{n / 1_000_000:.2f}M"


def metric(value: float | None, digits: int = 3) -> str:
    if value is None or not math.isfinite(value):
        return NONE
    return f"{value:.{digits}f}"


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def when(moment: datetime | None) -> str:
    if moment is None:
        return NONE
    return _aware(moment).astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def ago(moment: datetime | None, now: datetime | None = None) -> str:
    if moment is None:
        return NONE
    seconds = ((now or datetime.now(UTC)) - _aware(moment)).total_seconds()
    if seconds < 0:
        seconds = 0
    if seconds < 60:
        return f"{int(seconds)} s ago"
    if seconds < 3600:
        return f"{int(seconds // 60)} min ago"
    if seconds < 86400:
        return f"{int(seconds // 3600)} h ago"
    return _aware(moment).astimezone(UTC).strftime("%Y-%m-%d")


def duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return NONE
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {rest} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"


def words(value: str | None) -> str:
    return NONE if not value else value.replace("_", " ")


def install(env: Environment) -> None:
    env.filters.update(
        money=money,
        tokens=tokens,
        metric=metric,
        when=when,
        ago=ago,
        duration=duration,
        words=words,
    )
