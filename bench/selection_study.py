"""Which rows should a loop show a teacher that writes near what it is shown? A study with no
teacher and no job: selections of real pool rows, scored by the efficacy benchmark's judge.

    python -m bench.selection_study                       # TREC, SST-2, HWU64; 3 seeds
    python -m bench.selection_study --data hwu64 --policies uniform,covered-half
    python -m bench.selection_study --policies uniform,contrast-rotate --budget-per-class 40

The efficacy benchmark's retrieval teacher (bench/retrieval_teacher.py) answers a prompt with
the unused pool rows of the asked label nearest to the texts the prompt shows, and so does the
outside check the loops are measured by. Then what a loop shows the teacher decides what data it
gets. This study replays the loops' spending rule on the same splits (K = 5 seed rows per
class, budget 10 x classes, 3 rounds, each round's share = what is left over the rounds left,
labels weighted 0.25 + their error rate on the steering rows, as
`strategies/base.py::shares_by_weakness`), with a balanced logistic regression on MiniLM
embeddings as the student that finds the mistakes, and picks, per label, the nearest unused pool
rows to each *anchor* the policy shows:

- `uniform`: no anchors; pool rows drawn uniformly over the labels (untargeted augmentation
  with a perfect teacher);
- `near-seed`: every seed row, labels even (what the `random` strategy asks for);
- `mistakes-third` / `mistakes-half`: the steering validation rows the student gets wrong (a
  label with none: its steering rows, else its seed rows), the steering rows being a third
  that alternates with another while the last third is never shown (an earlier product) or a
  half that alternates with the other;
- `covered-third` / `covered-half` / `covered-fifths` / `covered-rotate`: every steering
  validation row of the label, a wrong one weighing twice a right one (what LLM2LLM asks for),
  the steering rows being a third that alternates with another while one third is never
  shown, a half that alternates with the other, two fifths that alternate while one fifth is
  never shown, or thirds in rotation (each round the next third, so every row steers once in
  three rounds: the product now, `service/domain/selection.py::validation_roles`);
- `covered-all`: the same with every validation row steering every round (no rows left to judge
  the data: an upper bound, not a product option);
- `contrast-rotate`: `covered-rotate`, where a third of what a wrong row is asked for (rounded)
  is the nearest pool rows of the label the student predicted for it (LLM2LLM's contrast
  examples: the boundary drawn from both sides).

Prints the mean gap closed, (score - seed only) / (full train - seed only), per data set.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from bench.efficacy import CACHE, data_folder, split_data
from bench.retrieval_teacher import EmbeddingTable, minilm_encoder

POLICIES = (
    "uniform",
    "near-seed",
    "mistakes-third",
    "mistakes-half",
    "covered-third",
    "covered-half",
    "covered-fifths",
    "covered-rotate",
    "covered-all",
    "contrast-rotate",
)
# contrast-rotate: this share of a wrong row's examples goes to the label the student predicted
# (what LLM2LLM asks for, `strategies/base.py::CONTRAST_SHARE`); 1/2 closed less than 1/3.
CONTRAST = 1 / 3
ROUNDS = 3
FLOOR = 0.25
WRONG_WEIGHT = 2


def fit(x: NDArray[np.float32], y: list[str]) -> Any:
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=10.0, max_iter=3000, class_weight="balanced")
    model.fit(x, y)
    return model


def apportion(total: int, weights: dict[Any, float]) -> dict[Any, int]:
    """Largest remainders, as `strategies/base.py::apportion` (ties by key order)."""
    mass = sum(weights.values())
    if total <= 0 or mass <= 0:
        return dict.fromkeys(weights, 0)
    exact = {k: total * w / mass for k, w in weights.items()}
    shares = {k: math.floor(v) for k, v in exact.items()}
    order = sorted(exact, key=lambda k: -(exact[k] - shares[k]))
    for k in order[: total - sum(shares.values())]:
        shares[k] += 1
    return shares


@dataclass
class Setting:
    """One data set and seed: embeddings of its seed, validation, pool and test rows."""

    name: str
    seed: int
    embed: EmbeddingTable
    budget_per_class: int = 10

    def __post_init__(self) -> None:
        split = split_data(self.name, 5, self.seed)
        self.labels = sorted({r["label"] for r in split.train})
        self.sx = self.embed([r["text"] for r in split.seeds])
        self.sy = np.array([r["label"] for r in split.seeds])
        self.vx = self.embed([r["text"] for r in split.validation])
        self.vy = np.array([r["label"] for r in split.validation])
        self.px = self.embed([r["text"] for r in split.pool])
        self.py = np.array([r["label"] for r in split.pool])
        self.tx = self.embed([r["text"] for r in split.test])
        self.ty = np.array([r["label"] for r in split.test])
        self.budget = self.budget_per_class * len(self.labels)
        self.by_label = {label: np.where(self.py == label)[0] for label in self.labels}
        rng = np.random.RandomState(self.seed)
        self.part: dict[int, NDArray[np.int64]] = {}
        for n in (2, 3, 5):  # stratified parts of the validation set, drawn with the seed
            part = np.zeros(len(self.vy), dtype=np.int64)
            turn = 0
            for label in self.labels:
                rows = np.where(self.vy == label)[0]
                rng.shuffle(rows)
                for i in rows:
                    part[i] = turn % n
                    turn += 1
            self.part[n] = part

    def score(self, added: list[int]) -> float:
        x = np.vstack([self.sx, self.px[added]]) if added else self.sx
        y = list(self.sy) + list(self.py[added])
        return float(np.mean(fit(x, y).predict(self.tx) == self.ty))

    def full(self) -> float:
        return self.score(list(range(len(self.py))))

    def steering(self, policy: str, round_: int) -> NDArray[np.bool_]:
        turn = round_ % 2
        mask: NDArray[np.bool_]  # numpy's stubs type an array comparison as Any
        if policy.endswith("-all"):
            mask = np.ones(len(self.vy), dtype=bool)
        elif policy.endswith("-half"):
            mask = self.part[2] == turn
        elif policy.endswith("-rotate"):
            mask = self.part[3] == round_ % 3
        elif policy.endswith("-fifths"):
            mask = (self.part[5] < 4) & (self.part[5] % 2 == turn)
        else:
            mask = self.part[3] == turn  # thirds: the last one never steers
        return mask


def select(setting: Setting, policy: str, seed: int) -> list[int]:
    """The pool rows `policy` gets over ROUNDS rounds."""
    rng = random.Random(seed)
    used: set[int] = set()
    added: list[int] = []

    def nearest(anchor: NDArray[np.float32], label: str, n: int) -> None:
        fresh = [i for i in setting.by_label[label] if i not in used]
        order = np.argsort(-(setting.px[fresh] @ anchor), kind="stable")[:n]
        picked = [fresh[i] for i in order]
        used.update(picked)
        added.extend(picked)

    for round_ in range(ROUNDS):
        share = (setting.budget - len(added)) // (ROUNDS - round_)
        if policy == "uniform":
            for label, n in apportion(share, dict.fromkeys(setting.labels, 1.0)).items():
                fresh = [int(i) for i in setting.by_label[label] if i not in used]
                picked = rng.sample(fresh, min(n, len(fresh)))
                used.update(picked)
                added.extend(picked)
            continue
        if policy == "near-seed":
            weights = dict.fromkeys(setting.labels, 1.0)
            steer = np.zeros(len(setting.vy), dtype=bool)
            predicted = setting.vy
        else:
            x = np.vstack([setting.sx, setting.px[added]]) if added else setting.sx
            predicted = fit(x, list(setting.sy) + list(setting.py[added])).predict(setting.vx)
            steer = setting.steering(policy, round_)
            weights = {}
            for label in setting.labels:
                mine = steer & (setting.vy == label)
                error = float(np.mean(predicted[mine] != label)) if mine.any() else 0.0
                weights[label] = FLOOR + error
        for label, n in apportion(share, weights).items():
            mine = steer & (setting.vy == label)
            wrong = [setting.vx[i] for i in np.where(mine & (predicted != label))[0]]
            right = [setting.vx[i] for i in np.where(mine & (predicted == label))[0]]
            seeds = [setting.sx[i] for i in np.where(setting.sy == label)[0]]
            if policy == "near-seed":
                anchors = [(v, 1.0) for v in seeds]
            elif policy.startswith("mistakes"):
                anchors = [(v, 1.0) for v in (wrong or right or seeds)]
            else:
                anchors = [(v, float(WRONG_WEIGHT)) for v in wrong] + [(v, 1.0) for v in right]
                anchors = anchors or [(v, 1.0) for v in seeds]
            counts = apportion(n, {i: w for i, (_, w) in enumerate(anchors)})
            wrong_predicted = [predicted[i] for i in np.where(mine & (predicted != label))[0]]
            for i, (anchor, _) in enumerate(anchors):
                if not counts[i]:
                    continue
                if policy.startswith("contrast") and i < len(wrong):
                    other = round(counts[i] * CONTRAST)
                    if other:
                        nearest(anchor, str(wrong_predicted[i]), other)
                    if counts[i] - other:
                        nearest(anchor, label, counts[i] - other)
                else:
                    nearest(anchor, label, counts[i])
    return added


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default="trec,sst2,hwu64")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument(
        "--budget-per-class",
        type=int,
        default=10,
        help="rows added per class (10: the efficacy benchmark's budget); larger budgets show "
        "what the 70%% target would take",
    )
    args = parser.parse_args()
    policies = [p for p in args.policies.split(",") if p]
    unknown = sorted(set(policies) - set(POLICIES))
    if unknown:
        parser.error(f"unknown policies: {', '.join(unknown)} (known: {', '.join(POLICIES)})")
    names = [n for n in args.data.split(",") if n]
    missing = [str(data_folder(n)) for n in names if not (data_folder(n) / "train.jsonl").exists()]
    if missing:
        parser.error(f"missing data: {', '.join(missing)} (the study reads ../shared/data)")
    embed = EmbeddingTable(minilm_encoder(), CACHE / "embeddings.npz")
    print(
        f"Selection study: K=5, budget {args.budget_per_class} x classes, {ROUNDS} rounds, "
        f"{args.seeds} seed(s); "
        "gap closed, mean [per seed]"
    )
    for name in names:
        full: float | None = None
        gaps: dict[str, list[float]] = {p: [] for p in policies}
        for seed in range(args.seeds):
            setting = Setting(name, seed, embed, args.budget_per_class)
            full = setting.full() if full is None else full
            base = setting.score([])
            for policy in policies:
                gaps[policy].append(
                    (setting.score(select(setting, policy, seed)) - base) / (full - base)
                )
            embed.save()
        print(f"{name} (full train {100 * (full or 0):.1f}%)")
        for policy, values in gaps.items():
            detail = "/".join(f"{100 * g:.0f}" for g in values)
            print(f"  {policy:<16} {100 * statistics.mean(values):5.1f}%  [{detail}]", flush=True)


if __name__ == "__main__":
    main()
