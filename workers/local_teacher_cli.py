"""`distill teacher local`: run the zero-configuration local teacher in the foreground."""

from __future__ import annotations

import signal
from pathlib import Path
from types import FrameType
from typing import Annotated

import typer
import yaml

from workers.teacher.local import (
    LOCAL_TEACHER_DEFAULTS,
    Backend,
    LocalTeacherDefaults,
    LocalTeacherError,
    LocalTeacherNotInstalledError,
    LocalTeacherServer,
)

teacher_app = typer.Typer(help="Teachers that distill runs itself.", no_args_is_help=True)


@teacher_app.callback()
def _teacher_group() -> None:
    """Teachers that distill runs itself."""


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    # `kill`, systemd and container runtimes stop us with SIGTERM; unwinding through the
    # context manager stops the server too instead of orphaning it in its own process group.
    raise SystemExit(128 + signum)


def spec_snippet(base_url: str, defaults: LocalTeacherDefaults = LOCAL_TEACHER_DEFAULTS) -> str:
    """The `teacher:` block of a job spec that uses the server at `base_url`."""
    teacher = defaults.teacher_spec(base_url)
    body = {"teacher": teacher.model_dump(mode="json", exclude_none=True)}
    return yaml.safe_dump(body, sort_keys=False)


@teacher_app.command("local")
def local(
    port: Annotated[
        int | None, typer.Option(help="Loopback port; a free one is picked when omitted.")
    ] = None,
    home: Annotated[
        Path | None,
        typer.Option(help="Where the model and the server log live; default DISTILL_HOME."),
    ] = None,
    threads: Annotated[
        int | None,
        typer.Option(min=1, help="CPU threads; default all available but one, at most 8."),
    ] = None,
    backend: Annotated[
        Backend | None,
        typer.Option(
            help="The runtime: xllamacpp (prebuilt wheel) or llama-cpp-python (compiled); "
            "default xllamacpp when installed."
        ),
    ] = None,
) -> None:
    """Serve Gemma 3 270M (llama.cpp) on loopback until Ctrl-C, for jobs with no API key.

    The model is small and writes weak data: it makes distill runnable anywhere, not good.
    Point the job at vLLM or a hosted API for real work.
    """
    if home is None:
        from service.settings import get_settings

        home = get_settings().home
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    server = LocalTeacherServer(home, port=port, n_threads=threads, backend=backend)
    typer.echo("starting the local teacher (the first start assembles a 253 MB model)...")
    try:
        server.start()
    except LocalTeacherNotInstalledError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=2) from exc
    except LocalTeacherError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=1) from exc
    try:
        typer.echo(
            f"local teacher ready: base_url {server.base_url}  model {server.model}  "
            f"({server.backend})"
        )
        typer.echo(f"server log: {server.log_path}")
        typer.echo("use it in a job spec (no API key needed):\n")
        typer.echo(spec_snippet(server.base_url, server.defaults))
        typer.echo("Ctrl-C stops it.")
        try:
            returncode = server.wait()
        except KeyboardInterrupt:
            typer.echo("\nstopping the local teacher")
            return
        typer.echo(f"error: {server.failure_message(returncode)}", err=True)
        raise typer.Exit(code=1)
    finally:
        server.stop()
