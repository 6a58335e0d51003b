"""The `distill` entry point. `distill refresh` — the CI step, a client of a remote server —
starts without loading the service's and the workers' code (about a second instead of five);
every other command goes to `workers.cli`."""

from __future__ import annotations

import sys


def main() -> None:
    if sys.argv[1:2] == ["refresh"]:
        from service.refresh_cli import main as refresh

        refresh(sys.argv[2:])
        return
    from workers.cli import main as distill

    distill()
