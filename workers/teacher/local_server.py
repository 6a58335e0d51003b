"""`python -m workers.teacher.local_server`: llama.cpp's own HTTP server, from the xllamacpp wheel.

xllamacpp ships llama.cpp prebuilt (CPU features picked for portability, with LLGuidance for
JSON Schema output), so the zero-configuration teacher needs no compiler. Its `Server` runs
llama.cpp's C++ server — the same OpenAI-compatible `/v1/chat/completions` and `/v1/models`
a `llama-server` binary answers — inside this process, listening on host:port. This module
only fills in its parameters and keeps the process alive until SIGTERM or Ctrl-C; it runs in a
process of its own (started by `LocalTeacherServer`) so that the native server's log lines go
to its log file, not through the job's progress bars.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import Any

# Sampling defaults for requests that do not set them. DRY ("don't repeat yourself") penalises
# a continuation that repeats a sequence already written: the 270M model otherwise loops on one
# sentence until max_tokens, which cuts its JSON short. JSON punctuation is a sequence breaker,
# so the structure the schema forces is not penalised.
DRY_MULTIPLIER = 0.8


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True, type=Path, help="The GGUF file.")
    parser.add_argument("--alias", required=True, help="The model name clients ask for.")
    parser.add_argument(
        "--chat-config",
        required=True,
        type=Path,
        help="A tokenizer_config.json-shaped file whose chat_template is used.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", required=True, type=int)
    parser.add_argument("--n-ctx", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--parallel", type=int, default=1, help="Requests decoded at once.")
    return parser


def build_params(args: argparse.Namespace) -> Any:
    """xllamacpp's CommonParams for `args` (the fields of llama-server's command line)."""
    import xllamacpp

    params = xllamacpp.CommonParams()
    params.model.path = str(args.model)
    # A set of names: a plain string would be read as a set of one-letter aliases.
    params.model_alias = {args.alias}
    config = json.loads(args.chat_config.read_text(encoding="utf-8"))
    params.chat_template = config["chat_template"]
    params.use_jinja = True
    params.hostnames = [args.host]
    params.port = args.port
    params.n_ctx = args.n_ctx
    params.n_parallel = args.parallel
    params.cpuparams.n_threads = args.threads
    params.cpuparams_batch.n_threads = args.threads
    params.sampling.dry_multiplier = DRY_MULTIPLIER
    return params


def _stop(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    import xllamacpp

    signal.signal(signal.SIGTERM, _stop)
    print(f"xllamacpp {xllamacpp.__version__}: {xllamacpp.get_system_info()}", flush=True)
    server = xllamacpp.Server(build_params(args))  # loads the model, then listens
    print(f"listening on {server.listening_address} as {args.alias}", flush=True)
    try:
        while True:
            signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        del server  # its destructor stops the HTTP loop and frees the model
        sys.stdout.flush()


if __name__ == "__main__":
    main()
