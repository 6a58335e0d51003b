"""The throughput benchmark's floor: what a client with no cost of its own gets against the fake
teacher's model, the number the bench's ratios are read against."""

from __future__ import annotations

import pytest

from bench.job_throughput import perfect_client_window


def test_whole_requests_pay_for_the_last_wave() -> None:
    # 2,000 calls at 64 wide: 32 waves of 200 ms, not the 31.25 of N x L / C.
    assert perfect_client_window(2000, 64, 0.2, runs=1) == pytest.approx(6.4)
    assert perfect_client_window(640, 64, 0.2, runs=1) == pytest.approx(2.0)


def test_failures_cost_their_whole_latency_and_the_retries_left_at_the_end() -> None:
    ideal = 2000 * 0.2 / 64
    faults = perfect_client_window(2000, 64, 0.2, error_rate=0.06, runs=50) / ideal
    # Each failed attempt is a whole extra latency (1 / 0.94 of the work, 34 waves of 200 ms)
    # and the last wave's failures add a wave of retries: about 1.11.
    assert 6.8 / ideal < faults < 7.2 / ideal
    assert perfect_client_window(2000, 64, 0.2, error_rate=0.06, runs=5, seed=3) == (
        perfect_client_window(2000, 64, 0.2, error_rate=0.06, runs=5, seed=3)
    )


def test_jitter_leaves_the_mean_latency_and_adds_a_ragged_end() -> None:
    clean = perfect_client_window(2000, 64, 0.2, runs=1)
    jitter = perfect_client_window(2000, 64, 0.2, jitter_s=0.1, runs=20)
    assert clean <= jitter < clean * 1.05
