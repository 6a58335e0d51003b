"""Built-in students: fit+evaluate time as data grows (embedding cache on/off), accuracy vs rows."""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import structlog

from service.domain.evaluation import EvalRow, TrainRow
from service.domain.metrics import classification_report
from workers.students import EmbeddingStudent, TfidfStudent, TrainableStudent
from workers.students.embedding import PACKAGED_MODEL, load_sentence_transformer

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
GROWTH = (1_000, 5_000, 20_000)
PER_CLASS: tuple[int | None, ...] = (5, 10, 20, 50, None)  # None: the whole train set
SEEDS = (0, 1, 2, 3, 4)
# FACTS.md: MiniLM + LogisticRegression(C=10), test accuracy at 10 per class vs the full set.
REFERENCE = {"trec": (0.634, 0.900), "sst2": (0.685, 0.815)}
# Prefixes and suffixes that make a TREC question a new text with the same label, to build a
# 20k-row train set from 5,452 questions (the embedding of each variant is computed afresh).
PERTURBATIONS: tuple[Callable[[str], str], ...] = (
    lambda text: text,
    lambda text: f"Quick question : {text}",
    lambda text: text.replace(" ?", " , please ?"),
    lambda text: f"I was wondering : {text}",
    lambda text: f"{text} Thanks .",
)

Record = dict[str, str]


def read(dataset: str, split: str) -> list[Record]:
    with (DATA / dataset / f"{split}.jsonl").open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def train_rows(records: Sequence[Record]) -> list[TrainRow]:
    return [TrainRow(input=r["text"], output=r["label"]) for r in records]


def eval_rows(records: Sequence[Record]) -> list[EvalRow]:
    return [EvalRow(row_id=str(i), input=r["text"], gold=r["label"]) for i, r in enumerate(records)]


def sample_per_class(records: Sequence[Record], per_class: int, seed: int) -> list[Record]:
    """`per_class` rows of every label, each label drawn by its own seeded generator."""
    by_label: dict[str, list[Record]] = {}
    for record in records:
        by_label.setdefault(record["label"], []).append(record)
    return [
        record
        for label in sorted(by_label)
        for record in random.Random(f"{seed}:{label}").sample(
            by_label[label], min(per_class, len(by_label[label]))
        )
    ]


def grow(records: Sequence[Record], size: int) -> list[Record]:
    """The first `size` rows of: every original, then each perturbation of every original."""
    out: list[Record] = []
    seen: set[str] = set()
    for perturb in PERTURBATIONS:
        for record in records:
            text = perturb(record["text"])
            if text not in seen:
                seen.add(text)
                out.append({"text": text, "label": record["label"]})
            if len(out) == size:
                return out
    raise ValueError(f"cannot build {size} distinct rows from {len(records)} originals")


def evaluate(student: TrainableStudent, train: Sequence[Record], test: Sequence[Record]) -> float:
    student.fit(train_rows(train))
    predictions = student.predict(eval_rows(test))
    return classification_report(
        [r["label"] for r in test], [p.predicted for p in predictions]
    ).accuracy


def timed(student: TrainableStudent, train: Sequence[Record], test: Sequence[Record]) -> float:
    started = time.perf_counter()
    evaluate(student, train, test)
    return time.perf_counter() - started


def bench_growth(cache_dir: Path) -> None:
    train, test = read("trec", "train"), read("trec", "test")
    sizes = [*GROWTH, GROWTH[-1] + 200]
    print("\n## Fit + evaluate time per iteration as the train set grows (TREC, 500 test rows)")
    print(
        f"train rows {len(train)} originals; rows beyond that are the originals with a prefix "
        "or suffix added (e.g. 'Quick question : ...'), each a new text to embed.\n"
        "The last row adds 200 rows to 20k: a typical loop iteration.\n"
        "cached: one student across iterations (in-process + SQLite cache), embeds new texts only\n"
        "disk:   a new student each iteration on the warm SQLite file (a fresh worker process)\n"
        "none:   a new student each iteration without a cache (embeds train + test every time)"
    )
    print(
        f"{'rows':>7} {'cached s':>9} {'embedded':>9} {'disk s':>8} {'none s':>8} "
        f"{'none/cached':>12} {'tfidf s':>8}"
    )
    cached = EmbeddingStudent(cache_dir=cache_dir / "growth")
    for size in sizes:
        rows = grow(train, size)
        before = cached.embedded_texts
        cached_s = timed(cached, rows, test)
        embedded = cached.embedded_texts - before
        disk_s = timed(EmbeddingStudent(cache_dir=cache_dir / "growth"), rows, test)
        none_s = timed(EmbeddingStudent(cache_dir=None), rows, test)
        tfidf_s = timed(TfidfStudent(), rows, test)
        print(
            f"{size:>7} {cached_s:>9.2f} {embedded:>9} {disk_s:>8.2f} {none_s:>8.2f} "
            f"{none_s / cached_s:>11.1f}x {tfidf_s:>8.2f}"
        )


def bench_accuracy(dataset: str, per_class: Sequence[int | None], cache_dir: Path) -> None:
    train, test = read(dataset, "train"), read(dataset, "test")
    n_labels = len({r["label"] for r in train})
    low, full = REFERENCE[dataset]
    print(
        f"\n## Test accuracy vs labelled rows per class ({dataset}: {len(train)} train, "
        f"{len(test)} test, {n_labels} classes; seeds {', '.join(map(str, SEEDS))}: mean [min-max])"
    )
    print(f"{'per class':>10} {'rows':>6} {'minilm':>22} {'tfidf':>22} {'FACTS.md minilm':>16}")
    embedding = EmbeddingStudent(cache_dir=cache_dir / dataset)  # one cache: embed each text once
    for k in per_class:
        seeds = SEEDS if k is not None else (0,)
        results: dict[str, list[float]] = {"minilm": [], "tfidf": []}
        size = len(train)
        for seed in seeds:
            rows = train if k is None else sample_per_class(train, k, seed)
            size = len(rows)
            results["minilm"].append(evaluate(embedding, rows, test))
            results["tfidf"].append(evaluate(TfidfStudent(), rows, test))
        cells = []
        for name in ("minilm", "tfidf"):
            values = results[name]
            spread = f"[{min(values):.3f}-{max(values):.3f}]" if len(values) > 1 else ""
            cells.append(f"{statistics.mean(values):.3f} {spread}".rstrip())
        reference = {10: f"{low:.3f}", None: f"{full:.3f}"}.get(k, "")
        label = "all" if k is None else str(k)
        print(f"{label:>10} {size:>6} {cells[0]:>22} {cells[1]:>22} {reference:>16}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--skip-growth", action="store_true", help="accuracy tables only")
    args = parser.parse_args()
    # Per-embed info events would drown the tables; warnings (a cache fallback) still show.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    # The packaged model is local; this only stops huggingface_hub from trying the network.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    load_sentence_transformer(PACKAGED_MODEL)
    print(
        f"# bench/student.py  (MiniLM load {time.perf_counter() - started:.1f} s, once per process)"
    )
    print(f"data: {DATA}; cpu threads: {os.cpu_count()}")
    with tempfile.TemporaryDirectory(prefix="bench-student-") as tmp:
        cache_dir = Path(tmp)
        if not args.skip_growth:
            bench_growth(cache_dir)
        bench_accuracy("trec", PER_CLASS, cache_dir)
        bench_accuracy("sst2", (10, None), cache_dir)
    print(f"\ntotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
