"""Job spec files: YAML read the way a spec author means it."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer

from service.cli import load_spec_file


def test_yes_no_on_off_stay_strings_and_true_false_are_booleans(tmp_path: Path) -> None:
    spec = tmp_path / "job.yaml"
    spec.write_text("task:\n  labels: [yes, no, on, off]\nflag: true\nother: False\n")
    raw = load_spec_file(spec)
    assert raw["task"]["labels"] == ["yes", "no", "on", "off"]
    assert raw["flag"] is True and raw["other"] is False


def test_a_key_given_twice_is_an_error_naming_the_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = tmp_path / "job.yaml"
    spec.write_text("name: a\nstrategy: pgkd\nname: b\n")
    with pytest.raises(typer.Exit) as exited:
        load_spec_file(spec)
    assert exited.value.exit_code == 2
    err = capsys.readouterr().err
    assert "duplicate key 'name'" in err and "line 3" in err
