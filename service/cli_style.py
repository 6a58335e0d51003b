"""One look for every `distill` command: typer apps whose flags show no value placeholder.

typer 0.29's rich help prints a type for every option, flags included (`--gzip <bool>`,
`--help <bool>`), although a flag takes no value; click's plain formatter skips flags
(`if not self.is_flag and not self.count`), and so does this. The fix lives in the command
and group classes rather than in a patch of typer's module, so only distill's commands
change; every typer app of the CLI is a `DistillTyper` (the whole-app help test in
tests/unit/test_cli_help.py walks them all).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Annotated, Any

import typer
from typer.core import TyperCommand, TyperGroup, TyperOption


def _without_flag_metavars(params: list[Any]) -> list[Any]:
    for param in params:
        if isinstance(param, TyperOption) and (param.is_flag or param.count):
            # An empty metavar is what the rich formatter prints as the type: nothing.
            param.metavar = ""
    return params


class DistillCommand(TyperCommand):
    def get_params(self, ctx: Any) -> list[Any]:
        return _without_flag_metavars(super().get_params(ctx))


class DistillGroup(TyperGroup):
    def get_params(self, ctx: Any) -> list[Any]:
        return _without_flag_metavars(super().get_params(ctx))


class DistillTyper(typer.Typer):
    """A typer app whose groups and commands are distill's classes; `no_args_is_help` by
    default, so a bare group prints its commands instead of an error."""

    def __init__(self, *, help: str, **kwargs: Any) -> None:
        kwargs.setdefault("no_args_is_help", True)
        super().__init__(cls=DistillGroup, help=help, **kwargs)

    def command(
        self, name: str | None = None, *, cls: type[TyperCommand] | None = None, **kwargs: Any
    ) -> Callable[[Any], Any]:
        return super().command(name, cls=cls or DistillCommand, **kwargs)


# The options and arguments most commands share, with one wording.
TenantOpt = Annotated[
    str,
    typer.Option(
        "--tenant",
        help="The tenant, by name. Each tenant sees only its own keys, datasets, teachers "
        "and jobs.",
    ),
]
JobArg = Annotated[uuid.UUID, typer.Argument(help="The job's id (see `distill jobs list`).")]
