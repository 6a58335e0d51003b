"""The whole `distill` command tree: every command, argument and option says what it is for,
no flag shows a value placeholder, and docs/cli.md is the reference the app generates."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import typer
import typer.main
from typer.core import TyperArgument, TyperOption
from typer.testing import CliRunner

from tests.conftest import REPO
from workers.cli import app
from workers.cli_reference import render_reference


def _walk(command: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    yield path, command
    for name, sub in sorted(getattr(command, "commands", {}).items()):
        yield from _walk(sub, (*path, name))


COMMANDS = list(_walk(typer.main.get_command(app)))
IDS = [" ".join(path) or "distill" for path, _ in COMMANDS]


def test_the_tree_has_the_commands_the_api_has() -> None:
    paths = {path for path, _ in COMMANDS}
    for resource, verbs in {
        "teachers": ("create", "list", "show", "delete", "local"),
        "datasets": ("upload", "list", "show", "delete"),
        "keys": ("create", "list", "revoke"),
        "jobs": ("create", "list", "show", "pause", "resume", "cancel", "delete"),
        "exports": ("list", "show"),
    }.items():
        for verb in verbs:
            assert (resource, verb) in paths, (resource, verb)
    assert {("export",), ("run",), ("refresh",), ("teacher", "local")} <= paths


@pytest.mark.parametrize(("path", "command"), COMMANDS, ids=IDS)
def test_every_command_and_parameter_has_help(path: tuple[str, ...], command: Any) -> None:
    assert (command.help or "").strip(), f"{IDS[COMMANDS.index((path, command))]}: no help"
    ctx = typer.Context(command, info_name=path[-1] if path else "distill")
    params = command.get_params(ctx)
    assert any(isinstance(p, TyperOption) and "--help" in p.opts for p in params)
    for param in params:
        assert isinstance(param, TyperArgument | TyperOption), param
        assert (param.help or "").strip(), f"{' '.join(path)} {param.name}: no help"
        if isinstance(param, TyperOption) and param.is_flag:
            assert not param.display_type_rich(ctx), f"{' '.join(path)} {param.opts}: metavar"


@pytest.mark.parametrize(("path", "command"), COMMANDS, ids=IDS)
def test_the_rendered_help_shows_no_flag_metavar(path: tuple[str, ...], command: Any) -> None:
    result = CliRunner(env={"COLUMNS": "200"}).invoke(app, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output
    assert "<bool>" not in result.output, result.output


def test_docs_cli_md_is_the_generated_reference() -> None:
    current = (REPO / "docs" / "cli.md").read_text()
    assert current == render_reference(), (
        "docs/cli.md is out of date: regenerate it with `python -m workers.cli_reference`"
    )
