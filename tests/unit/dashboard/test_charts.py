"""The dashboard's chart geometry, number formats and selection words: pure code."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from service.dashboard import charts, formatting
from service.dashboard.views import selection, words_for_reason
from service.domain.statuses import IterationStatus
from service.models import Iteration


def test_one_point_per_measured_iteration_in_order_with_the_best_marked() -> None:
    chart = charts.metric_chart(
        [
            charts.MetricPoint(0, 0.40),
            charts.MetricPoint(1, 0.55, best=True),
            charts.MetricPoint(2, 0.50, excluded=True, note="excluded: regressed"),
            charts.MetricPoint(3, None),  # still running: no point yet
        ]
    )
    assert [p.iteration for p in chart.points] == [0, 1, 2]
    assert [t.label for t in chart.x_ticks] == ["0", "1", "2", "3"]
    assert chart.best is not None and chart.best.iteration == 1
    assert [p.excluded for p in chart.points] == [False, False, True]
    xs = [p.x for p in chart.points]
    assert xs == sorted(xs) and chart.box.x0 <= xs[0] and xs[-1] <= chart.box.x1
    # Higher is up (SVG y grows downwards), and every point is inside the plot.
    by_iteration = {p.iteration: p for p in chart.points}
    assert by_iteration[1].y < by_iteration[2].y < by_iteration[0].y
    assert all(chart.box.y1 <= p.y <= chart.box.y0 for p in chart.points)
    assert chart.path.startswith("M") and chart.path.count("L") == 2


def test_the_metric_axis_zooms_in_but_stays_within_zero_and_one() -> None:
    low, high, step = charts.value_range([0.61, 0.64, 0.66], unit_interval=True)
    assert 0.55 <= low <= 0.61 and 0.66 <= high <= 0.7 and step in (0.01, 0.02)
    assert charts.value_range([0.0, 1.0], unit_interval=True) == (0.0, 1.0, 0.2)
    low, high, _ = charts.value_range([0.98, 1.0], unit_interval=True)
    assert high == 1.0
    low, high, _ = charts.value_range([0.5], unit_interval=True)  # one value: a band around it
    assert low < 0.5 < high


def test_stacked_bars_stack_each_series_in_order() -> None:
    chart = charts.stacked_bars(
        [(1, {"accepted": 30, "rejected: duplicate": 5}), (2, {"accepted": 10})],
        ["accepted", "rejected: duplicate"],
        colors={"accepted": charts.ACCEPTED_COLOR},
    )
    first, second = chart.bars
    assert (first.iteration, first.total, second.total) == (1, 35, 10)
    bottom, top = first.segments
    assert (bottom.series, top.series) == ("accepted", "rejected: duplicate")
    assert bottom.color == charts.ACCEPTED_COLOR and top.color != bottom.color
    assert top.y + top.height == pytest.approx(bottom.y, abs=0.2)  # stacked, no gap
    assert bottom.y + bottom.height == pytest.approx(chart.box.y0, abs=0.2)
    assert bottom.height / top.height == pytest.approx(6, rel=0.05)
    assert [e.total for e in chart.legend] == [40, 5]
    assert charts.stacked_bars([], ["accepted"]).bars == []


def test_heatmap_cells_are_shaded_by_value() -> None:
    heat = charts.heatmap(
        ["HUM", "LOC"], [0, 1], {("HUM", 0): 0.0, ("HUM", 1): 1.0, ("LOC", 0): 0.5}
    )
    cells = {(c.row, c.iteration): c for c in heat.cells}
    assert len(cells) == 4
    assert cells[("HUM", 0)].fill == charts.shade(0.0) != cells[("HUM", 1)].fill
    assert cells[("LOC", 1)].value is None and cells[("LOC", 1)].label == "-"
    assert cells[("HUM", 1)].text_color == "#ffffff"  # readable on the dark end
    assert [t.label for t in heat.columns] == ["0", "1"]


def _iteration(number: int, **values: object) -> Iteration:
    it = Iteration(number=number, status=IterationStatus.completed, included=True, regressed=False)
    for key, value in values.items():
        setattr(it, key, value)
    return it


def test_selection_uses_the_decision_rules_words_when_it_has_them() -> None:
    assert selection(_iteration(0)) == (False, "seed-only baseline")
    assert selection(_iteration(1)) == (False, "included")
    excluded, why = selection(_iteration(2, included=False, regressed=True))
    assert excluded and "lowered the metric" in why
    running = _iteration(3, status=IterationStatus.generating)
    assert selection(running) == (False, "in progress")
    stated = _iteration(4, included=False)
    stated.selection_reason = "excluded: macro-F1 0.51 < 0.55 (best so far)"  # type: ignore[attr-defined]
    assert selection(stated) == (True, "excluded: macro-F1 0.51 < 0.55 (best so far)")


def test_stop_reasons_read_as_words() -> None:
    assert words_for_reason("max_iterations") == "the iteration budget was used up"
    assert words_for_reason("patience; no example accepted from 4 teacher calls (x=4)") == (
        "the metric stopped improving (patience ran out); no example accepted from 4 teacher "
        "calls (x=4)"
    )
    assert words_for_reason("teacher error http_401: bad key") == "teacher error http_401: bad key"
    assert words_for_reason(None) is None


def test_numbers_read_well() -> None:
    assert formatting.money(0) == "$0"
    assert formatting.money(0.000123) == "$0.000123"
    assert formatting.money(0.0123) == "$0.0123"
    assert formatting.money(1234.5) == "$1,234.50"
    assert formatting.tokens(999) == "999"
    assert formatting.tokens(21886) == "21.9k"
    assert formatting.tokens(3_400_000) == "3.40M"
    assert formatting.duration(0.02) == "20 ms"
    assert formatting.duration(75) == "1 min 15 s"
    assert formatting.metric(None) == formatting.NONE
    now = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
    assert formatting.ago(now - timedelta(minutes=5), now) == "5 min ago"
