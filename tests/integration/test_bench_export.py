"""bench/export.py still runs (on a few thousand rows: the targets that do not depend on
scale are checked; the insert rate needs the full run, `python -m bench.export`)."""

from __future__ import annotations

from bench.export import run


def test_the_export_bench_runs_end_to_end() -> None:
    result = run(rows=3000, batch=1000, fmt="jsonl")
    targets = result["targets"]
    assert targets["reinsert_adds_nothing"] and result["reinsert"]["rows_added"] == 0
    assert targets["export_rows"] and targets["ttfb_s"] and targets["rss_growth_mb"], result
    assert result["insert"]["stored"] == 3000 and result["insert"]["copy_in_rows_s"] > 0
    assert result["copy"]["lines"] == 3000 and result["export"]["bytes"] > result["copy"]["bytes"]
    assert all(value and value > 0 for value in result["ratios"].values()), result["ratios"]
