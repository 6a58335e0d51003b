"""Labelled data the tests write themselves, so a fresh clone needs nothing beside it.

A question-classification set with TREC's six coarse labels (ABBR, DESC, ENTY, HUM, LOC,
NUM): every question is a label's opener ("Who ...", "Where ...", "How many ...") around a
topic drawn at random from a few hundred words, so texts are varied (thousands of distinct
questions, few near-duplicates of each other) and a student can still learn the labels. The
same arguments always give the same rows. Tests that measure the real public sets instead
read them from ../shared/data and are marked `shared_data` (tests/conftest.py).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final

QUESTION_LABELS: Final = ("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM")

# `{t}` is a topic of a few random words; `{a}` an invented acronym.
_OPENERS: Final[Mapping[str, Sequence[str]]] = {
    "ABBR": (
        "What does {a} stand for in {t} ?",
        "What is the abbreviation {a} short for when people discuss {t} ?",
        "What is the full form of {a} , as used for {t} ?",
        "What do the letters {a} mean on a {t} label ?",
    ),
    "DESC": (
        "How does {t} work ?",
        "Why is {t} important to people ?",
        "What is the meaning of {t} ?",
        "How did {t} develop over time ?",
        "What causes {t} to change ?",
        "What is the difference between {t} and its rivals ?",
    ),
    "ENTY": (
        "What kind of animal is drawn on {t} ?",
        "Which plant is used to make {t} ?",
        "What colour is {t} usually painted ?",
        "What instrument is played at {t} ?",
        "What food is served with {t} ?",
        "Which sport is played near {t} ?",
    ),
    "HUM": (
        "Who invented {t} ?",
        "Who wrote the first book about {t} ?",
        "Which person founded {t} ?",
        "Who was the first woman to lead {t} ?",
        "What is the name of the man who designed {t} ?",
        "Who played the main role in the film about {t} ?",
    ),
    "LOC": (
        "Where is {t} found ?",
        "In which country was {t} built ?",
        "What city is home to {t} ?",
        "Where did {t} first appear ?",
        "Which river flows past {t} ?",
        "On what continent is {t} located ?",
    ),
    "NUM": (
        "How many {t} are there in the world ?",
        "How much did {t} cost in total ?",
        "In what year did {t} begin ?",
        "How far is it from here to {t} ?",
        "How long does {t} last ?",
        "What percentage of people use {t} ?",
    ),
}

_TOPIC_WORDS: Final = tuple(
    [
        "ancient",
        "amber",
        "anchor",
        "apple",
        "arctic",
        "arrow",
        "autumn",
        "badge",
        "bakery",
        "balcony",
        "bamboo",
        "banner",
        "barley",
        "basket",
        "beacon",
        "bicycle",
        "blanket",
        "bridge",
        "bronze",
        "bucket",
        "cabin",
        "canal",
        "candle",
        "canyon",
        "carpet",
        "castle",
        "cathedral",
        "cedar",
        "cellar",
        "chapel",
        "chariot",
        "cherry",
        "chimney",
        "circus",
        "citadel",
        "clock",
        "clover",
        "coastal",
        "cobalt",
        "comet",
        "copper",
        "coral",
        "cotton",
        "crater",
        "crystal",
        "dairy",
        "delta",
        "desert",
        "diamond",
        "dragon",
        "eastern",
        "ember",
        "emerald",
        "engine",
        "falcon",
        "ferry",
        "festival",
        "fjord",
        "forest",
        "fortress",
        "fountain",
        "garden",
        "garnet",
        "glacier",
        "granite",
        "harbor",
        "harvest",
        "hazel",
        "highland",
        "honey",
        "horizon",
        "island",
        "ivory",
        "jade",
        "jasmine",
        "kettle",
        "lagoon",
        "lantern",
        "lavender",
        "ledger",
        "lemon",
        "library",
        "lighthouse",
        "linen",
        "lunar",
        "maple",
        "marble",
        "market",
        "meadow",
        "mercury",
        "meteor",
        "mill",
        "mirror",
        "monastery",
        "mosaic",
        "mountain",
        "museum",
        "northern",
        "oasis",
        "ocean",
        "olive",
        "opal",
        "orchard",
        "palace",
        "paper",
        "pebble",
        "pepper",
        "pilgrim",
        "pine",
        "planet",
        "plaza",
        "porcelain",
        "quarry",
        "quartz",
        "railway",
        "rainbow",
        "raven",
        "reef",
        "ribbon",
        "river",
        "saddle",
        "saffron",
        "salt",
        "sapphire",
        "satellite",
        "scarlet",
        "silver",
        "silk",
        "southern",
        "spice",
        "stadium",
        "steam",
        "summit",
        "temple",
        "theater",
        "thunder",
        "timber",
        "tower",
        "tulip",
        "tunnel",
        "valley",
        "velvet",
        "village",
        "vineyard",
        "violet",
        "volcano",
        "walnut",
        "western",
        "whale",
        "willow",
        "windmill",
        "winter",
        "wool",
        "zinc",
    ]
)
_TOPIC_NOUNS: Final = tuple(
    [
        "bridge",
        "railway",
        "festival",
        "museum",
        "tower",
        "canal",
        "engine",
        "clock",
        "garden",
        "market",
        "palace",
        "stadium",
        "telescope",
        "vaccine",
        "alphabet",
        "calendar",
        "compass",
        "printing",
        "press",
        "radio",
        "satellite",
        "telephone",
        "treaty",
        "university",
        "voyage",
        "expedition",
        "harbor",
        "lighthouse",
        "library",
        "orchestra",
        "parliament",
    ]
)


# Openers that say nothing of the label: a student must learn such a question from its topic
# words, which lean towards a label without deciding it. They keep a few-shot student as wrong
# as on TREC (about half right at 5 questions per class), so the loops have mistakes to mine.
_VAGUE_OPENERS: Final = (
    "Tell me about {t} .",
    "What is known about {t} ?",
    "I read something about {t} , what was it ?",
    "Can you say something on {t} ?",
    "Question about {t} please .",
    "Is there anything interesting about {t} ?",
)
_VAGUE_SHARE: Final = 0.45
# Each label's own share of the topic words (the others are common to all labels).
_LEANING: Final = 0.6


def _label_words(label: str) -> Sequence[str]:
    index = QUESTION_LABELS.index(label)
    return _TOPIC_WORDS[index :: len(QUESTION_LABELS)]


def _topic(label: str, rng: random.Random) -> str:
    """A few adjectives/nouns before a head noun: short enough to read, random enough that
    two questions rarely share more than their opener."""
    pool = _label_words(label) if rng.random() < _LEANING else _TOPIC_WORDS
    words = rng.sample(pool, rng.randint(1, 3))
    return " ".join([*words, rng.choice(_TOPIC_NOUNS)])


def _acronym(rng: random.Random) -> str:
    return "".join(rng.choice("ABCDEFGHIJKLMNOPRSTUVW") for _ in range(rng.randint(2, 5)))


def _question(label: str, rng: random.Random) -> str:
    vague = rng.random() < _VAGUE_SHARE
    opener = rng.choice(_VAGUE_OPENERS if vague else _OPENERS[label])
    return opener.format(t=_topic(label, rng), a=_acronym(rng))


def question_rows(
    per_label: int, *, seed: int | str = 0, labels: Sequence[str] = QUESTION_LABELS
) -> list[dict[str, str]]:
    """`per_label` distinct questions of each label (label by label), as {"text", "label"}.
    Texts never repeat within one call; different seeds give mostly different texts."""
    rng = random.Random(f"questions:{seed}")
    seen: set[str] = set()
    rows: list[dict[str, str]] = []
    for label in labels:
        made = 0
        while made < per_label:
            text = _question(label, rng)
            if text in seen:
                continue
            seen.add(text)
            rows.append({"text": text, "label": label})
            made += 1
    return rows


def question_splits(
    sizes: Mapping[str, int], *, seed: int | str = 0
) -> dict[str, list[dict[str, str]]]:
    """Disjoint splits (e.g. {"train": 800, "test": 80}) of `n` questions per label each:
    no text appears in two splits, so a split used as held-out data is never contaminated
    unless a test plants the overlap itself."""
    total = sum(sizes.values())
    pool = question_rows(total, seed=seed)
    by_label: dict[str, list[dict[str, str]]] = {}
    for row in pool:
        by_label.setdefault(row["label"], []).append(row)
    splits: dict[str, list[dict[str, str]]] = {}
    start = 0
    for name, n in sizes.items():
        splits[name] = [
            row for label in QUESTION_LABELS for row in by_label[label][start : start + n]
        ]
        random.Random(f"order:{seed}:{name}").shuffle(splits[name])
        start += n
    return splits


def to_jsonl(rows: Iterable[Mapping[str, Any]]) -> bytes:
    """NDJSON bytes, one object per line, as an upload takes them."""
    return "".join(json.dumps(dict(row)) + "\n" for row in rows).encode()


def question_slice(per_class: int, val_per_class: int, seed: int = 0) -> tuple[bytes, bytes]:
    """A seed set and a validation set (NDJSON bytes) of `per_class` and `val_per_class`
    questions per label, disjoint."""
    splits = question_splits({"train": per_class, "validation": val_per_class}, seed=seed)
    return to_jsonl(splits["train"]), to_jsonl(splits["validation"])


# -- arithmetic word problems in GSM8K's answer format ------------------------------------------

_NAMES: Final = ("Mia", "Tom", "Anna", "Ravi", "Lena", "Omar", "Sofia", "Ken", "Ada", "Luis")
_ITEMS: Final = ("pencils", "apples", "stamps", "marbles", "books", "tickets", "bricks", "cards")


def arithmetic_rows(n: int, *, seed: int | str = 0) -> list[dict[str, str]]:
    """`n` word problems as {"question", "answer"}: the reasoning carries GSM8K's calculator
    annotations (`<<3*12=36>>`) and the last line is `#### <number>`, with thousands written
    "1,080" as GSM8K writes them in about one row in ten."""
    rng = random.Random(f"arithmetic:{seed}")
    rows = []
    for i in range(n):
        name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
        boxes, each = rng.randint(2, 40), rng.randint(3, 90)
        if i % 10 == 0:
            boxes, each = rng.randint(30, 90), rng.randint(40, 120)  # a total past 1,000
        given = rng.randint(1, boxes * each - 1)
        total, left = boxes * each, boxes * each - given
        written = f"{left:,}"
        rows.append(
            {
                "question": (
                    f"{name} has {boxes} boxes with {each} {item} each. {name} gives away "
                    f"{given} {item}. How many {item} does {name} have left?"
                ),
                "answer": (
                    f"{name} has {boxes} * {each} = <<{boxes}*{each}={total}>>{total} {item}.\n"
                    f"After giving away {given}, {name} has {total} - {given} = "
                    f"<<{total}-{given}={left}>>{left} {item} left.\n#### {written}"
                ),
            }
        )
    return rows
