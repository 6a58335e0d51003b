"""Chart geometry for the dashboard's server-rendered SVG: pure functions, no I/O.

A chart library would need a JavaScript build or a vendored bundle many times the size of
these three charts (a line with marked points, stacked bars, a heatmap); the templates draw
the shapes computed here, so a page is readable without scripts and testable as HTML.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

# Okabe-Ito: a categorical palette that stays distinct for the common colour-vision deficiencies.
PALETTE = (
    "#E69F00",
    "#56B4E9",
    "#D55E00",
    "#CC79A7",
    "#F0E442",
    "#0072B2",
    "#999999",
    "#000000",
)
ACCEPTED_COLOR = "#009E73"


@dataclass(frozen=True)
class Box:
    """The plot area inside the SVG, in pixels."""

    width: int
    height: int
    left: int
    right: int
    top: int
    bottom: int

    @property
    def x0(self) -> float:
        return float(self.left)

    @property
    def x1(self) -> float:
        return float(self.width - self.right)

    @property
    def y0(self) -> float:
        """The bottom of the plot (SVG y grows downwards)."""
        return float(self.height - self.bottom)

    @property
    def y1(self) -> float:
        return float(self.top)


@dataclass(frozen=True)
class Tick:
    position: float
    label: str


def nice_step(span: float, target_ticks: int = 5) -> float:
    """A round step (1, 2 or 5 times a power of ten) giving about `target_ticks` ticks."""
    if span <= 0 or not math.isfinite(span):
        return 1.0
    raw = span / max(target_ticks, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    for multiple in (1, 2, 5, 10):
        if raw <= multiple * magnitude:
            return float(multiple * magnitude)
    return float(10 * magnitude)  # pragma: no cover - the loop always returns


def _decimals(step: float) -> int:
    return max(0, -math.floor(math.log10(step))) if step < 1 else 0


def _format(value: float, decimals: int) -> str:
    return f"{value:.{decimals}f}"


def value_range(values: Sequence[float], *, unit_interval: bool) -> tuple[float, float, float]:
    """(low, high, step) covering the values with round ends. Metrics (`unit_interval`) stay
    within [0, 1] and zoom in on a narrow band, so small gains between iterations show."""
    if not values:
        return 0.0, 1.0, 0.2
    lo, hi = min(values), max(values)
    if hi - lo < 1e-9:
        lo, hi = lo - 0.05, hi + 0.05
    step = nice_step(hi - lo)
    low = math.floor(lo / step) * step
    high = math.ceil(hi / step) * step
    if unit_interval:
        low, high = max(0.0, low), min(1.0, high)
        if high <= low:
            low, high = 0.0, 1.0
            step = 0.2
    return low, high, step


def _ticks(low: float, high: float, step: float, scale: float, box: Box) -> list[Tick]:
    decimals = _decimals(step)
    ticks = []
    n = round((high - low) / step)
    for i in range(n + 1):
        value = low + i * step
        ticks.append(
            Tick(position=round(box.y0 - (value - low) * scale, 1), label=_format(value, decimals))
        )
    return ticks


def _x_positions(count: int, box: Box) -> list[float]:
    if count == 1:
        return [round((box.x0 + box.x1) / 2, 1)]
    span = (box.x1 - box.x0) / (count - 1)
    return [round(box.x0 + i * span, 1) for i in range(count)]


# --- the student metric per iteration -------------------------------------------------------


@dataclass(frozen=True)
class MetricPoint:
    """One iteration's metric as the chart shows it."""

    iteration: int
    value: float | None
    best: bool = False
    excluded: bool = False
    note: str = ""


@dataclass(frozen=True)
class PlottedPoint:
    iteration: int
    value: float
    x: float
    y: float
    best: bool
    excluded: bool
    label: str
    note: str


@dataclass(frozen=True)
class LineChart:
    box: Box
    points: list[PlottedPoint]
    path: str
    y_ticks: list[Tick]
    x_ticks: list[Tick]
    secondary_path: str = ""
    secondary_points: list[PlottedPoint] = field(default_factory=list)

    @property
    def best(self) -> PlottedPoint | None:
        return next((p for p in self.points if p.best), None)


def metric_chart(
    points: Sequence[MetricPoint],
    *,
    secondary: Mapping[int, float] | None = None,
    width: int = 1160,
    height: int = 280,
) -> LineChart:
    """One marker per iteration that has a metric, joined in iteration order; `secondary`
    (the test-set metric, when the job has a test set) is drawn as a second line."""
    box = Box(width=width, height=height, left=52, right=24, top=30, bottom=40)
    iterations = [p.iteration for p in points]
    measured = [p for p in points if p.value is not None and math.isfinite(p.value)]
    extra = {k: v for k, v in (secondary or {}).items() if math.isfinite(v)}
    values = [float(p.value) for p in measured if p.value is not None] + list(extra.values())
    low, high, step = value_range(values, unit_interval=all(0 <= v <= 1 for v in values))
    scale = (box.y0 - box.y1) / (high - low)
    xs = dict(zip(iterations, _x_positions(len(iterations), box), strict=True)) if points else {}
    decimals = max(3, _decimals(step))

    def y_of(value: float) -> float:
        return round(box.y0 - (value - low) * scale, 1)

    plotted = [
        PlottedPoint(
            iteration=p.iteration,
            value=float(p.value),
            x=xs[p.iteration],
            y=y_of(float(p.value)),
            best=p.best,
            excluded=p.excluded,
            label=_format(float(p.value), decimals),
            note=p.note,
        )
        for p in measured
        if p.value is not None
    ]
    second = [
        PlottedPoint(
            iteration=i,
            value=v,
            x=xs[i],
            y=y_of(v),
            best=False,
            excluded=False,
            label=_format(v, decimals),
            note="test set",
        )
        for i, v in sorted(extra.items())
        if i in xs
    ]
    return LineChart(
        box=box,
        points=plotted,
        path=_path(plotted),
        y_ticks=_ticks(low, high, step, scale, box),
        x_ticks=[Tick(position=x, label=str(i)) for i, x in xs.items()],
        secondary_path=_path(second),
        secondary_points=second,
    )


def _path(points: Sequence[PlottedPoint]) -> str:
    return " ".join(f"{'M' if i == 0 else 'L'}{p.x},{p.y}" for i, p in enumerate(points))


# --- stacked bars (examples by outcome, tokens) ----------------------------------------------


@dataclass(frozen=True)
class Segment:
    series: str
    value: float
    x: float
    y: float
    width: float
    height: float
    color: str


@dataclass(frozen=True)
class Bar:
    iteration: int
    total: float
    x: float
    width: float
    segments: list[Segment]


@dataclass(frozen=True)
class LegendEntry:
    series: str
    color: str
    total: float


@dataclass(frozen=True)
class BarChart:
    box: Box
    bars: list[Bar]
    y_ticks: list[Tick]
    x_ticks: list[Tick]
    legend: list[LegendEntry]


def stacked_bars(
    columns: Sequence[tuple[int, Mapping[str, float]]],
    series: Sequence[str],
    *,
    colors: Mapping[str, str] | None = None,
    width: int = 570,
    height: int = 240,
) -> BarChart:
    """One bar per iteration, its segments stacked bottom-up in `series` order."""
    box = Box(width=width, height=height, left=60, right=20, top=14, bottom=40)
    colors = dict(colors or {})
    palette = iter(PALETTE * (1 + len(series) // len(PALETTE)))
    color_of = {s: colors.get(s) or next(palette) for s in series}
    totals = [sum(max(float(v), 0.0) for v in values.values()) for _, values in columns]
    top = max(totals, default=0.0)
    step = nice_step(top) if top > 0 else 1.0
    high = math.ceil(top / step) * step if top > 0 else step * 5
    scale = (box.y0 - box.y1) / high
    count = len(columns)
    slot = (box.x1 - box.x0) / max(count, 1)
    bar_width = round(min(48.0, slot * 0.6), 1)
    bars = []
    for index, (iteration, values) in enumerate(columns):
        center = box.x0 + slot * (index + 0.5)
        x = round(center - bar_width / 2, 1)
        base = box.y0
        segments = []
        for name in series:
            value = max(float(values.get(name, 0.0)), 0.0)
            if value <= 0:
                continue
            h = value * scale
            base -= h
            segments.append(
                Segment(
                    series=name,
                    value=value,
                    x=x,
                    y=round(base, 1),
                    width=bar_width,
                    height=round(h, 1),
                    color=color_of[name],
                )
            )
        bars.append(
            Bar(
                iteration=iteration,
                total=sum(s.value for s in segments),
                x=x,
                width=bar_width,
                segments=segments,
            )
        )
    legend = [
        LegendEntry(series=s, color=color_of[s], total=sum(float(v.get(s, 0)) for _, v in columns))
        for s in series
    ]
    return BarChart(
        box=box,
        bars=bars,
        y_ticks=_ticks(0.0, high, step, scale, box),
        x_ticks=[Tick(position=round(b.x + b.width / 2, 1), label=str(b.iteration)) for b in bars],
        legend=legend,
    )


# --- per-class heatmap ---------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    row: str
    iteration: int
    value: float | None
    x: float
    y: float
    width: float
    height: float
    fill: str
    text_color: str
    label: str


@dataclass(frozen=True)
class Heatmap:
    width: int
    height: int
    left: int
    top: int
    cell_width: float
    cell_height: float
    cells: list[Cell]
    rows: list[Tick]
    columns: list[Tick]


# Light to dark blue (ColorBrewer "Blues" ends): a single hue reads as "more" without a legend
# of hues, and survives greyscale printing.
_LOW = (247, 251, 255)
_HIGH = (8, 48, 107)
_MISSING = "#eeeeee"


def shade(value: float) -> str:
    t = min(max(value, 0.0), 1.0)
    r, g, b = (round(lo + (hi - lo) * t) for lo, hi in zip(_LOW, _HIGH, strict=True))
    return f"#{r:02x}{g:02x}{b:02x}"


def heatmap(
    rows: Sequence[str],
    iterations: Sequence[int],
    values: Mapping[tuple[str, int], float],
    *,
    max_width: int = 900,
) -> Heatmap:
    """Rows (classes) by iterations; each cell shaded by its value in [0, 1]."""
    label_chars = min(max((len(r) for r in rows), default=4), 28)
    left = 16 + label_chars * 7
    top = 28
    cell_width = round(min(64.0, max(28.0, (max_width - left - 8) / max(len(iterations), 1))), 1)
    cell_height = 22.0
    cells = []
    for r_index, row in enumerate(rows):
        for c_index, iteration in enumerate(iterations):
            value = values.get((row, iteration))
            cells.append(
                Cell(
                    row=row,
                    iteration=iteration,
                    value=value,
                    x=round(left + c_index * cell_width, 1),
                    y=round(top + r_index * cell_height, 1),
                    width=cell_width,
                    height=cell_height,
                    fill=_MISSING if value is None else shade(value),
                    text_color="#ffffff" if value is not None and value > 0.55 else "#111111",
                    label="-" if value is None else f"{value:.2f}",
                )
            )
    return Heatmap(
        width=int(left + cell_width * len(iterations) + 8),
        height=int(top + cell_height * len(rows) + 8),
        left=left,
        top=top,
        cell_width=cell_width,
        cell_height=cell_height,
        cells=cells,
        rows=[
            Tick(position=round(top + (i + 0.5) * cell_height, 1), label=_short(r))
            for i, r in enumerate(rows)
        ],
        columns=[
            Tick(position=round(left + (i + 0.5) * cell_width, 1), label=str(it))
            for i, it in enumerate(iterations)
        ],
    )


def _short(text: str, limit: int = 28) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
