"""Does the loop help? Seed-only vs. the closed loop vs. random augmentation at the same
teacher budget, on real labelled data (../shared/data), with any OpenAI-compatible teacher.

    python bench/efficacy.py --teacher-url http://vllm:8000/v1 --teacher-model Qwen/Qwen2.5-7B-Instruct
    python bench/efficacy.py --fake        # plumbing check only: the fake teacher knows nothing

Each row runs two jobs embedded (SQLite in a temporary directory, steps in-process): the loop
(`--strategy`, default pgkd) and the `random` baseline capped at the tokens the loop spent.
Accuracy is on the test split, for the iteration the job chose by validation (its best).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
sys.path.insert(0, str(REPO))


def _read(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _per_class(rows: list[dict[str, Any]], n: int, seed: int) -> tuple[list[Any], list[Any]]:
    rows = rows[:]
    random.Random(seed).shuffle(rows)
    taken: dict[str, int] = {}
    picked, rest = [], []
    for row in rows:
        if taken.get(row["label"], 0) < n:
            taken[row["label"]] = taken.get(row["label"], 0) + 1
            picked.append(row)
        else:
            rest.append(row)
    return picked, rest


def _dump(rows: list[dict[str, Any]]) -> bytes:
    return "".join(
        json.dumps({"text": r["text"], "label": r["label"]}) + "\n" for r in rows
    ).encode()


def configs(seed: int) -> list[tuple[str, bytes, bytes, bytes]]:
    """(name, seed train, validation, test) for each benchmark row."""
    out = []
    trec = _read(DATA / "trec" / "train.jsonl")
    trec_test = _read(DATA / "trec" / "test.jsonl")
    for n in (5, 10):
        train, rest = _per_class(trec, n, seed)
        val, _ = _per_class(rest, 20, seed + 1)  # TREC ships no validation split
        out.append((f"trec-{n}/class", _dump(train), _dump(val), _dump(trec_test)))
    sst_train, _ = _per_class(_read(DATA / "sst2" / "train.jsonl"), 10, seed)
    sst_val, _ = _per_class(_read(DATA / "sst2" / "val.jsonl"), 100, seed)
    out.append(
        (
            "sst2-10/class",
            _dump(sst_train),
            _dump(sst_val),
            _dump(_read(DATA / "sst2" / "test.jsonl")),
        )
    )
    return out


def run_job(sessions: Any, sender: Any, tenant_id: Any, spec: dict[str, Any]) -> dict[str, Any]:
    from sqlalchemy import select

    from service.jobs import create_job, parse_spec
    from service.models import Iteration, Job
    from service.tasks import SENDER

    with sessions() as session:
        session.info[SENDER] = sender
        job, _ = create_job(session, tenant_id, parse_spec(spec), allow_private_teacher=True)
        session.commit()
        job_id = job.id
    sender.run_until_idle()
    with sessions() as session:
        job = session.get(Job, job_id)
        iterations = {
            it.number: it
            for it in session.scalars(select(Iteration).where(Iteration.job_id == job_id))
        }
        best = iterations.get(job.best_iteration if job.best_iteration is not None else 0)
        base = iterations[0]
        return {
            "status": job.status.value,
            "seed_only": (base.test_metrics or {}).get("accuracy"),
            "best_test": (best.test_metrics or {}).get("accuracy") if best else None,
            "best_iteration": job.best_iteration,
            "tokens": job.tokens_in + job.tokens_out,
            "accepted": job.examples_accepted,
        }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--teacher-url")
    parser.add_argument("--teacher-model")
    parser.add_argument("--api-key-env")
    parser.add_argument("--fake", action="store_true", help="use the fake teacher (plumbing only)")
    parser.add_argument("--strategy", default="pgkd", choices=["pgkd", "llm2llm"])
    parser.add_argument("--student", default="minilm", help="builtin student: minilm or tfidf")
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", help="run only configs whose name contains this")
    args = parser.parse_args()
    if not args.fake and not (args.teacher_url and args.teacher_model):
        parser.error("give --teacher-url and --teacher-model, or --fake")

    from service.auth import get_or_create_tenant
    from service.cli import upgrade_database
    from service.datasets import create_dataset, parse_jsonl
    from service.db import make_engine, session_factory
    from service.logging import configure_logging
    from workers import runtime
    from workers.inline import InlineTaskSender

    configure_logging("WARNING")
    fake = None
    if args.fake:
        from tests.fake_teacher.client import FakeTeacherProcess

        fake = FakeTeacherProcess(latency_ms=0).start()
        args.teacher_url, args.teacher_model = fake.base_url, "fake-teacher"
        print(
            "NOTE: the fake teacher writes word salad from the prompt; this run checks the "
            "plumbing, not whether the loop helps. Give a real teacher for that.\n"
        )
    teacher = {
        "base_url": args.teacher_url,
        "model": args.teacher_model,
        "api_key_env": args.api_key_env,
        "limits": {"max_concurrency": args.concurrency},
    }
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{Path(tmp) / 'bench.db'}"
        upgrade_database(url)
        engine = make_engine(url)
        sessions = session_factory(engine)
        sender = InlineTaskSender()
        runtime.configure(sessions=sessions, sender=sender)
        with sessions() as session:
            tenant_id = get_or_create_tenant(session, "bench").id
            session.commit()
        for name, train, val, test in configs(args.seed):
            if args.only and args.only not in name:
                continue
            with sessions() as session:
                ids = [
                    str(
                        create_dataset(
                            session, tenant_id, f"{name}-{part}", parse_jsonl(data), len(data)
                        ).id
                    )
                    for part, data in (("train", train), ("val", val), ("test", test))
                ]
                session.commit()
            base = {
                "name": name,
                "task": {
                    "kind": "classification",
                    "instructions": "Classify the text: TREC questions by the type of "
                    "answer they expect, SST-2 sentences by sentiment.",
                },
                "datasets": {"train": ids[0], "validation": ids[1], "test": ids[2]},
                "teacher": teacher,
                "student": {"type": "builtin", "model": args.student},
                "stopping": {"patience": args.iterations},
                "seed": args.seed,
            }
            started = time.monotonic()
            loop = run_job(
                sessions,
                sender,
                tenant_id,
                {**base, "strategy": args.strategy, "budget": {"max_iterations": args.iterations}},
            )
            baseline = run_job(
                sessions,
                sender,
                tenant_id,
                {
                    **base,
                    "strategy": "random",
                    "budget": {
                        "max_iterations": args.iterations,
                        "max_tokens": max(loop["tokens"], 1),
                    },
                },
            )
            rows.append((name, loop, baseline, time.monotonic() - started))
            print(f"{name}: done in {time.monotonic() - started:.0f}s", flush=True)
        engine.dispose()
    if fake is not None:
        fake.stop()

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:5.1f}%"

    print(
        f"\nstudent={args.student} strategy={args.strategy} teacher={args.teacher_model} "
        f"iterations={args.iterations}"
    )
    header = (
        f"{'data':<15} {'seed-only':>9} {'loop':>7} {'random':>7} {'loop-seed':>9} "
        f"{'loop-rand':>9} {'tokens loop/rand':>17} {'accepted loop/rand':>18}"
    )
    print(header)
    print("-" * len(header))
    for name, loop, baseline, _ in rows:
        seed_only, lb, rb = loop["seed_only"], loop["best_test"], baseline["best_test"]
        d1 = "-" if None in (seed_only, lb) else f"{100 * (lb - seed_only):+.1f}"
        d2 = "-" if None in (rb, lb) else f"{100 * (lb - rb):+.1f}"
        print(
            f"{name:<15} {pct(seed_only):>9} {pct(lb):>7} {pct(rb):>7} {d1:>9} {d2:>9} "
            f"{loop['tokens']:>8}/{baseline['tokens']:<8} "
            f"{loop['accepted']:>9}/{baseline['accepted']:<8}"
        )
    if args.fake:
        print("\n(fake teacher: plumbing check only — the numbers say nothing about the method)")


if __name__ == "__main__":
    main()
