"""schemathesis, every check, over every operation of the API in production mode: a bounded,
deterministic run (the long one is `make conformance`)."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from bench.openapi_conformance import run_schemathesis
from service.cli import upgrade_database
from tests.conftest import fresh_database

# Few examples per operation, a fixed seed and deterministic generation: the same requests
# every run. Schemathesis's coverage phase (boundaries, missing and extra parameters, wrong
# media types, undeclared methods) runs in full whatever the number.
# About 2,000 requests: ~20 s on an idle 2-core machine, several times that under load (the
# timeout is the hard bound; the time is printed, not asserted, so load cannot fail it).
MAX_EXAMPLES = 2
SEED = 11


@pytest.mark.timeout(600)
def test_schemathesis_finds_no_failure_with_every_check(tmp_path: Path) -> None:
    with fresh_database("distill_conformance") as url:
        upgrade_database(url, quiet=True)
        started = time.monotonic()
        result = run_schemathesis(
            url, max_examples=MAX_EXAMPLES, seed=SEED, cwd=tmp_path, capture=True
        )
        elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stdout[-30000:] + result.stderr[-5000:]
    cases = re.search(r"(\d+) generated, (\d+) passed", result.stdout)
    assert cases is not None and int(cases[2]) > 0, result.stdout[-5000:]
    phases = re.findall(r"(\w+) \(in ([\d.]+)s\)", result.stdout)
    print(f"schemathesis: {cases[0]} in {elapsed:.0f} s; phases {phases}")
