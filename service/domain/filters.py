"""Candidate filters: schema, labels, length, contamination, exact and near duplicates."""

from __future__ import annotations

import hashlib
import re
import threading
import unicodedata
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Self

import numpy as np
from datasketch import MinHash  # type: ignore[import-untyped, unused-ignore]
from pydantic import BaseModel, Field, PrivateAttr


class Reason(StrEnum):
    """Why a candidate was rejected. Checks that callers add may use codes of their own."""

    SCHEMA_INVALID = "schema_invalid"
    LABEL_INVALID = "label_invalid"
    # One of the labels, but not the one the prompt asked for (`expected_label_check`).
    LABEL_NOT_ASKED = "label_not_asked"
    EMPTY = "empty"
    TOO_SHORT = "too_short"
    TOO_LONG = "too_long"
    CONTAMINATED = "contaminated"
    DUPLICATE = "duplicate"
    NEAR_DUPLICATE = "near_duplicate"
    # For the rationale checks callers add: the rationale's answer differs from the gold output.
    ANSWER_MISMATCH = "answer_mismatch"


class Candidate(BaseModel):
    """A training example the teacher wrote, not yet accepted."""

    key: str = Field(description="Stable id of the candidate within its batch.")
    input: str
    output: str | None = Field(default=None, description="Label (classification) or answer text.")
    rationale: str | None = None
    _fingerprinted: Fingerprinted | None = PrivateAttr(default=None)

    @property
    def fingerprinted(self) -> Fingerprinted:
        """The input's `Fingerprinted` form, made once however many checks consult it (a copy
        with another input makes its own)."""
        # Read from pydantic's dict of private attributes directly: `self._fingerprinted` goes
        # through `BaseModel.__getattr__`, which cost more than the rest of this property
        # (every check of every candidate asks).
        private = self.__pydantic_private__
        assert private is not None
        known: Fingerprinted | None = private.get("_fingerprinted")
        if known is None or known.text is not self.input:
            known = private["_fingerprinted"] = Fingerprinted(self.input)
        return known

    def __eq__(self, other: object) -> bool:
        """Equal fields: the cached `fingerprinted` is not part of a candidate's value."""
        if not isinstance(other, Candidate):
            return NotImplemented
        return type(self) is type(other) and self.__dict__ == other.__dict__

    __hash__ = None  # type: ignore[assignment]  # mutable, as pydantic's models are


class Verdict(BaseModel):
    """The filters' decision on one candidate."""

    key: str
    accepted: bool
    reason: str | None = Field(default=None, description="A `Reason` code when rejected.")
    detail: str | None = Field(
        default=None, description="What matched, for people reading the reason."
    )
    output: str | None = Field(
        default=None,
        description="The output to store: for a classification task the canonical label, "
        "when the candidate wrote it with other case or surrounding spaces.",
    )


class FilterConfig(BaseModel):
    """Settings of the candidate filters; an index must be built with the ones it is used with."""

    min_chars: int = Field(default=3, ge=0)
    max_chars: int = Field(default=2000, ge=1)
    labels: list[str] | None = Field(
        default=None,
        description="Classification label set; a candidate's output must be one of them.",
    )
    near_duplicate_threshold: float = Field(
        default=0.85,
        gt=0,
        le=1,
        description="Estimated Jaccard similarity of character 5-shingles.",
    )
    contamination_threshold: float = Field(default=0.8, gt=0, le=1)
    contamination_ngram: int = Field(
        default=13,
        ge=1,
        description="A candidate sharing this many consecutive words with a protected "
        "text is contaminated (13, as in GPT-3's and Llama's decontamination).",
    )
    contamination_min_words: int = Field(
        default=4,
        ge=1,
        description="A protected text shorter than `contamination_ngram` words counts "
        "as one n-gram of its own length when it has at least this many words.",
    )
    num_perm: int = Field(default=128, ge=2)
    seed: int = 1


# --- text normalization --------------------------------------------------------------------

# Format characters that are invisible yet make two texts differ: soft hyphen, zero-width
# spaces and joiners, bidirectional marks, word joiner, byte-order mark.
_INVISIBLE_RE = re.compile("[\u00ad\u200b-\u200f\u202a-\u202e\u2060-\u2064\ufeff]")
_WORD_RE = re.compile(r"\w+")


def _is_edge_junk(char: str) -> bool:
    return char.isspace() or unicodedata.category(char).startswith("P")


# The ASCII characters `_is_edge_junk` strips: whitespace and the ASCII punctuation of
# Unicode's P categories (not the symbols $ + < = > ^ ` | ~, category S).
_ASCII_EDGE_JUNK = "".join(c for c in map(chr, range(128)) if _is_edge_junk(c))


def normalize_text(s: str) -> str:
    """`s` casefolded, NFKC-normalized, invisible characters dropped, whitespace collapsed to
    single spaces, and punctuation stripped at both ends (inner punctuation stays)."""
    if s.isascii():
        # The same result, with less work for the common case (every example row is hashed
        # on insert): ASCII is NFKC-stable, casefolds as lower(), holds none of the invisible
        # characters, and strip() drops the edge characters _normalize_unicode drops.
        return " ".join(s.lower().split()).strip(_ASCII_EDGE_JUNK)
    return _normalize_unicode(s)


def _normalize_unicode(s: str) -> str:
    """`normalize_text` for any text."""
    # NFKC before and after casefolding: casefolding can produce characters that NFKC changes.
    text = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", s).casefold())
    text = " ".join(_INVISIBLE_RE.sub("", text).split())
    start, end = 0, len(text)
    while start < end and _is_edge_junk(text[start]):
        start += 1
    while end > start and _is_edge_junk(text[end - 1]):
        end -= 1
    return text[start:end]


def _sha256(normalized: str) -> str:
    return hashlib.sha256(normalized.encode("utf-8")).hexdigest()


def text_hash(s: str) -> str:
    """The sha256 hex digest of `normalize_text(s)`: equal for texts that are exact duplicates."""
    return _sha256(normalize_text(s))


class Fingerprinted:
    """A text with what the filters derive from it, each made once: its normalized form, that
    form's sha256 (`text_hash`: exact duplicates, an example's stored input hash) and, when
    first asked for, its MinHash sketch. A candidate is checked for contamination, exact and
    near duplicates, added to the index and stored: without this, each step normalized and
    hashed the text again."""

    __slots__ = ("_sketch", "_sketch_params", "digest", "normalized", "text")

    def __init__(self, text: str) -> None:
        self.text = text
        self.normalized = normalize_text(text)
        self.digest = _sha256(self.normalized)
        self._sketch: _Signature | None = None
        self._sketch_params: tuple[int, int] | None = None


def _fingerprinted(text: str | Fingerprinted) -> Fingerprinted:
    return text if isinstance(text, Fingerprinted) else Fingerprinted(text)


# --- MinHash sketches -----------------------------------------------------------------------

# Near duplicates are measured on character 5-shingles of the text's words joined by single
# spaces (punctuation dropped), not on word 3-shingles. A one-word edit removes up to three word
# 3-shingles, so a 10-word question with one word changed falls to Jaccard ~0.45 and a
# 30-word problem lightly reworded to ~0.67: at 0.85, word shingles catch little beyond exact
# copies, which the hash already catches. Character shingles lose about as many shingles as
# characters edited. Measured on TREC's 5,452 training questions at 0.85: word 3-shingles flag
# 1 pair, character 5-shingles 7 (about half are real rewordings, such as "... play basketball
# at?" / "... for?"); character 3- and 4-shingles flag more pairs of distinct questions.
# The price: one changed number or letter in a long text stays above 0.85 (a GSM8K problem with
# one number changed scores ~0.90), which is what a near duplicate means for diversity.
_SHINGLE_CHARS = 5
# LSH only proposes candidates; each is confirmed on the full signature. Bands are chosen so a
# pair exactly at the threshold is proposed with this probability (datasketch's default
# optimizer would miss about half of them at 0.85).
_LSH_RECALL_AT_THRESHOLD = 0.99


def _words(normalized: str) -> list[str]:
    return _WORD_RE.findall(normalized)


def _stream(normalized: str) -> str:
    """What is shingled: the text's words joined by single spaces (punctuation dropped)."""
    return " ".join(_WORD_RE.findall(normalized))


# A shingle's hash: its 5 code points read as a base-_SHINGLE_BASE number (mod 2^64), then the
# top 32 bits of that times a Fibonacci-hashing multiplier. Both odd 64-bit constants.
_SHINGLE_BASE = np.uint64(0x100000001B3)
_SHINGLE_MIX = np.uint64(0x9E3779B97F4A7C15)
# Between two texts' code points: as many NULs as a shingle has characters after its first, so
# no window of a text reaches the next one. A stream holds no NUL (it is \w+ words and spaces).
_PAD = "\x00" * (_SHINGLE_CHARS - 1)


def _shingle_hashes(streams: Sequence[str]) -> tuple[Any, Any]:
    """Every stream's character 5-shingles as 32-bit hashes, in one numpy pass over all of
    them: (the hashes, each stream's count of them). A stream of 1-4 characters is one shingle
    of its own (padded with NULs); an empty one has none.

    Hand-written rather than one `set` of substrings and one crc32 per shingle (datasketch's
    `update_batch` way): for a short text that Python loop was most of its sketch, and a worker
    sketches every seed row and accepted example of a job, and every candidate. A shingle that
    occurs twice in a text is hashed twice; its minimum is the same, so the sketch is the
    sketch of the set."""
    lengths = np.fromiter(map(len, streams), dtype=np.int64, count=len(streams))
    counts = np.where(
        lengths >= _SHINGLE_CHARS, lengths - (_SHINGLE_CHARS - 1), np.minimum(lengths, 1)
    )
    if not counts.any():
        return np.zeros(0, dtype=np.uint32), counts
    codes = np.frombuffer((_PAD.join(streams) + _PAD).encode("utf-32-le"), dtype=np.uint32)
    # The window at every position, with slices (a window across two texts is dropped below).
    positions = len(codes) - (_SHINGLE_CHARS - 1)
    hashes = codes[:positions].astype(np.uint64)
    for j in range(1, _SHINGLE_CHARS):
        hashes *= _SHINGLE_BASE
        hashes += codes[j : j + positions]
    if len(streams) > 1:
        offsets = np.zeros(len(streams), dtype=np.int64)
        np.cumsum(lengths[:-1] + len(_PAD), out=offsets[1:])
        firsts = np.zeros(len(streams), dtype=np.int64)
        np.cumsum(counts[:-1], out=firsts[1:])
        total = int(firsts[-1] + counts[-1])
        hashes = hashes[np.repeat(offsets - firsts, counts) + np.arange(total, dtype=np.int64)]
    else:
        hashes = hashes[: int(counts[0])]
    return ((hashes * _SHINGLE_MIX) >> np.uint64(32)).astype(np.uint32), counts


def _band_params(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows): the longest bands that still propose a pair at `threshold` reliably."""
    for rows in range(num_perm // 2, 0, -1):
        bands = num_perm // rows
        if 1 - (1 - threshold**rows) ** bands >= _LSH_RECALL_AT_THRESHOLD:
            return bands, rows
    return num_perm, 1


class _Signature:
    """A text's MinHash values: what datasketch's `MinHash.hashvalues` holds, without the
    object around them (the permutations, the hash function), which the index never needs."""

    __slots__ = ("hashvalues",)

    def __init__(self, hashvalues: Any) -> None:
        self.hashvalues = hashvalues


class _Sketcher:
    """Makes MinHash signatures that share one set of permutations.

    A candidate is checked against the dedup index and the contamination guard and then added
    to the dedup index: three sketches of the same text, each the costliest step of a filter
    pass (profiled: most of a generation worker's CPU). Sketchers with the same permutations
    share one bounded cache of recent sketches, so a text is sketched once. Sketches are never
    changed after they are made, so sharing them is safe."""

    _cache: dict[tuple[int, int], OrderedDict[str, _Signature | None]] = {}
    _cache_size = 4096
    _lock = threading.Lock()

    def __init__(self, num_perm: int, seed: int) -> None:
        # The shingles come hashed (`_shingle_hashes`); datasketch's affine schemes pre-mix
        # input hashes with MurmurHash3's finalizer before permuting them, so a plain
        # multiplicative hash does not bias the permutations.
        self._template = MinHash(num_perm=num_perm, seed=seed, hashfunc=_hashed)
        self._params = (num_perm, seed)
        self._permute = _permuter(self._template)

    def _compute(self, streams: list[str]) -> list[_Signature | None]:
        hashes, counts = _shingle_hashes(streams)
        if self._permute is not None:
            return self._permute(hashes, counts)
        sketches: list[_Signature | None] = []
        start = 0
        for count in counts.tolist():
            sketch = None
            if count:
                minhash = self._template.copy()
                minhash.update_batch(hashes[start : start + count].tolist())
                sketch = _Signature(minhash.hashvalues)
                start += count
            sketches.append(sketch)
        return sketches

    def sketch_of(self, text: Fingerprinted) -> _Signature | None:
        """`sketch` of a fingerprinted text, kept on it for the next check."""
        if text._sketch_params != self._params:
            text._sketch = self.sketch(text.normalized)
            text._sketch_params = self._params
        return text._sketch

    def sketch(self, normalized: str) -> _Signature | None:
        """The MinHash of a normalized text, or None when it has no words to compare."""
        cache = self._cache.setdefault(self._params, OrderedDict())
        if normalized in cache:
            cache.move_to_end(normalized)
            return cache[normalized]
        sketch = self._compute([_stream(normalized)])[0]
        cache[normalized] = sketch
        while len(cache) > self._cache_size:
            cache.popitem(last=False)
        return sketch

    def sketch_all(self, texts: Iterable[Fingerprinted]) -> None:
        """Sketch many texts at once (an index built from a job's seed rows, or brought up to
        date with other workers' examples): one numpy pass over a chunk of texts' shingles
        instead of a pass per text, which for a short text is mostly fixed cost (5,000 TREC
        questions: 0.12 s against 0.2 s). Each text keeps its sketch (`sketch_of`)."""
        cache = self._cache.setdefault(self._params, OrderedDict())
        missing: dict[str, list[Fingerprinted]] = {}
        for text in texts:
            if text._sketch_params == self._params:
                continue
            if text.normalized in cache:
                self.sketch_of(text)
            else:
                missing.setdefault(text.normalized, []).append(text)
        if not missing:
            return
        sketches = self._compute([_stream(n) for n in missing])
        for (normalized, waiting), sketch in zip(missing.items(), sketches, strict=True):
            for text in waiting:
                text._sketch, text._sketch_params = sketch, self._params
            cache[normalized] = sketch
        while len(cache) > self._cache_size:
            cache.popitem(last=False)


# (shingle x permutation) values computed in one numpy pass: 1,024 x 128 x 4 bytes stays in
# the CPU's cache (16,384 rows made the bulk path slower than one text at a time).
_PERMUTE_ROWS = 1024


def _hashed(value: int) -> int:
    """The template's hash function: a shingle arrives as its hash (`_shingle_hashes`)."""
    return value


def _permuter(template: Any) -> Callable[[Any, Any], list[_Signature | None]] | None:
    """Sketches of many texts' shingle hashes (flat, with each text's count), value for value
    what `template` (a MinHash of datasketch's affine schemes) makes with one `update_batch`
    per text; None when this datasketch computes another way or a trial sketch differs (then
    datasketch sketches).

    Hand-written because datasketch sketches one set at a time (its `bulk` loops over
    `update_batch`): this applies datasketch's own pieces (the MurmurHash3 pre-mix, its
    permutations) to the shingles of a chunk of texts in one array, and takes each text's
    minimum with `np.minimum.reduceat`."""
    try:
        from datasketch.minhash import (  # type: ignore[import-untyped, unused-ignore]
            _SCHEME_DTYPES,
            _SCHEME_WIDTHS,
            _fmix,
        )
    except ImportError:
        return None
    scheme = getattr(template, "scheme", None)
    if scheme not in _SCHEME_WIDTHS:
        return None
    dtype, width = _SCHEME_DTYPES[scheme], _SCHEME_WIDTHS[scheme]
    a, b = template.permutations
    empty = template.hashvalues

    def permute(hashes: Any, counts: Any) -> list[_Signature | None]:
        sizes: list[int] = counts.tolist()
        sketches: list[_Signature | None] = [None] * len(sizes)
        first = row = 0
        while first < len(sizes):
            end, rows = first, 0
            while end < len(sizes) and (not rows or rows + sizes[end] <= _PERMUTE_ROWS):
                rows += sizes[end]
                end += 1
            sketched = [i for i in range(first, end) if sizes[i]]
            first = end
            if not sketched:
                continue
            flat = hashes[row : row + rows].astype(dtype, copy=False)
            row += rows
            offsets = np.zeros(len(sketched), dtype=np.int64)
            np.cumsum([sizes[i] for i in sketched[:-1]], out=offsets[1:])
            permuted = _fmix(flat.reshape(-1, 1), width) * a + b
            minima = np.minimum(np.minimum.reduceat(permuted, offsets, axis=0), empty)
            for i, values in zip(sketched, minima, strict=True):
                sketches[i] = _Signature(values)
        return sketches

    trials = [[7], [1, 2, 3, 2**31, 2**32 - 1], []]
    made = permute(
        np.array([v for trial in trials for v in trial], dtype=np.uint32),
        np.array([len(trial) for trial in trials], dtype=np.int64),
    )
    for trial, sketch in zip(trials, made, strict=True):
        if not trial:
            if sketch is not None:
                return None
            continue
        minhash = template.copy()
        minhash.update_batch(trial)
        if sketch is None or not np.array_equal(sketch.hashvalues, minhash.hashvalues):
            return None
    return permute


class _Bands:
    """Banded LSH over MinHash signatures: two signatures are candidates when they agree on
    every value of at least one band of `rows` consecutive values.

    What datasketch's MinHashLSH does with in-memory storage, for the same bands, so the same
    candidates; written here because its insert (a byte-swapped copy and a storage call per
    band) cost as much as sketching the text, and a worker indexes every seed row and every
    accepted example of a job (each process, for every job it runs). A band's key here is a
    slice of the signature's bytes: one `tobytes` per signature, one dict lookup per band.
    A bucket is the one ordinal it holds until a second arrives, then a list: nearly every
    bucket holds one, and a list for each (16 per text at the default threshold) was most of
    an insert's cost (5,000 TREC questions: 4.4 us per insert against 10.4).
    """

    def __init__(self, threshold: float, num_perm: int) -> None:
        bands, self._rows = _band_params(threshold, num_perm)
        self._tables: list[dict[bytes, int | list[int]]] = [{} for _ in range(bands)]

    def insert(self, ordinal: int, hashvalues: Any) -> None:
        raw = hashvalues.tobytes()
        width = self._rows * hashvalues.itemsize
        start = 0
        for table in self._tables:
            key = raw[start : start + width]
            start += width
            bucket = table.get(key)
            if bucket is None:
                table[key] = ordinal
            elif isinstance(bucket, int):
                table[key] = [bucket, ordinal]
            else:
                bucket.append(ordinal)

    def query(self, hashvalues: Any) -> set[int]:
        # Inlined loop: every candidate queries two indexes, and a generator's overhead per
        # band was most of the query's cost.
        found: set[int] = set()
        raw = hashvalues.tobytes()
        width = self._rows * hashvalues.itemsize
        start = 0
        for table in self._tables:
            bucket = table.get(raw[start : start + width])
            if bucket is not None:
                if isinstance(bucket, int):
                    found.add(bucket)
                else:
                    found.update(bucket)
            start += width
        return found


class _NearIndex:
    """Texts' MinHash signatures behind an LSH index; answers with the most similar one."""

    def __init__(self, threshold: float, num_perm: int) -> None:
        self._threshold = threshold
        self._lsh = _Bands(threshold, num_perm)
        self._signatures: list[Any] = []
        self._keys: list[str] = []

    def add(self, key: str, sketch: _Signature) -> None:
        ordinal = len(self._keys)
        self._lsh.insert(ordinal, sketch.hashvalues)
        self._signatures.append(sketch.hashvalues)
        self._keys.append(key)

    def best_match(self, sketch: _Signature) -> tuple[str, float] | None:
        """The key and estimated Jaccard of the most similar text at or above the threshold.

        Ties go to the text added first, so the answer does not depend on set iteration order.
        """
        ordinals = sorted(self._lsh.query(sketch.hashvalues))
        if not ordinals:
            return None
        signatures = np.stack([self._signatures[ordinal] for ordinal in ordinals])
        similarities = (signatures == sketch.hashvalues).mean(axis=1)
        best = int(np.argmax(similarities))
        similarity = float(similarities[best])
        if similarity < self._threshold:
            return None
        return self._keys[ordinals[best]], similarity


def _keyed(texts: Iterable[str] | Mapping[str, str]) -> Iterator[tuple[str | None, str]]:
    if isinstance(texts, Mapping):
        yield from texts.items()
    else:
        for text in texts:
            yield None, text


class _TextIndex(ABC):
    """Texts under keys: their normalized hashes for exact matches, their MinHash signatures
    for near matches at the threshold a subclass picks from the config."""

    def __init__(self, config: FilterConfig) -> None:
        self.config = config
        self._sketcher = _Sketcher(config.num_perm, config.seed)
        self._exact: dict[str, str] = {}
        self._near = _NearIndex(self._threshold(config), config.num_perm)

    @staticmethod
    @abstractmethod
    def _threshold(config: FilterConfig) -> float:
        """The near-match threshold this kind of index takes from the config."""

    @classmethod
    def build(cls, texts: Iterable[str] | Mapping[str, str], config: FilterConfig) -> Self:
        """An index of `texts`: a mapping of key (e.g. row id) to text, or bare texts, which are
        keyed by their `text_hash`."""
        index = cls(config)
        index.add_all(_keyed(texts))
        return index

    def __len__(self) -> int:
        return len(self._exact)

    def sketch_all(self, texts: Iterable[Fingerprinted]) -> None:
        """Sketch texts about to be checked against this index in one pass (each keeps its
        sketch for every index with the same settings: `_Sketcher.sketch_all`)."""
        self._sketcher.sketch_all(texts)

    def add_all(self, texts: Iterable[tuple[str | None, str | Fingerprinted]]) -> None:
        """Index each (key, text) (a None key: the text's hash), sketched together (see
        `_Sketcher.sketch_all`); a text already indexed keeps its first key."""
        keyed = [(key, _fingerprinted(text)) for key, text in texts]
        self._sketcher.sketch_all(text for _, text in keyed)
        for key, text in keyed:
            self._add(key, text)

    def _add(self, key: str | None, text: Fingerprinted) -> str | None:
        """Index a text; its key, or None when the same text is already indexed."""
        digest = text.digest
        if digest in self._exact:
            return None
        key = digest if key is None else key
        self._exact[digest] = key
        sketch = self._sketcher.sketch_of(text)
        if sketch is not None:
            self._near.add(key, sketch)
        return key

    def _exact_match(self, text: Fingerprinted) -> str | None:
        return self._exact.get(text.digest)

    def _near_match(self, text: Fingerprinted) -> tuple[str, float] | None:
        sketch = self._sketcher.sketch_of(text)
        return None if sketch is None else self._near.best_match(sketch)


class DedupIndex(_TextIndex):
    """The texts already accepted, for exact and near-duplicate checks (kept in memory).

    Exact duplicates are texts with the same `text_hash`; near duplicates have an estimated
    Jaccard similarity of character 5-shingles at or above `config.near_duplicate_threshold`.
    """

    @staticmethod
    def _threshold(config: FilterConfig) -> float:
        return config.near_duplicate_threshold

    def add(self, key: str, text: str | Fingerprinted) -> None:
        """Index `text` under `key`; a text already indexed keeps its first key."""
        self._add(key, _fingerprinted(text))

    def duplicate_of(self, text: str | Fingerprinted) -> str | None:
        """The key of an indexed text with the same normalized form."""
        return self._exact_match(_fingerprinted(text))

    def near_duplicate_of(self, text: str | Fingerprinted) -> tuple[str, float] | None:
        """The key and estimated Jaccard of the most similar indexed text above the threshold."""
        return self._near_match(_fingerprinted(text))

    def check(self, text: str | Fingerprinted) -> tuple[str | None, str | None]:
        """(reason, detail) when `text` duplicates an indexed text, else (None, None)."""
        text = _fingerprinted(text)
        if (key := self.duplicate_of(text)) is not None:
            return Reason.DUPLICATE, f"same normalized text as {key}"
        if (match := self.near_duplicate_of(text)) is not None:
            key, similarity = match
            return Reason.NEAR_DUPLICATE, f"estimated Jaccard {similarity:.2f} with {key}"
        return None, None


class ContaminationGuard(_TextIndex):
    """The validation and test texts that must never leak into training data.

    A text is contaminated when it equals a protected text after normalization, is a near
    duplicate of one (estimated Jaccard >= `config.contamination_threshold`), or contains
    `config.contamination_ngram` consecutive words of one. A protected text shorter than that is
    one n-gram of its own length, matched when the candidate contains the whole of it, provided it
    has at least `config.contamination_min_words` words: shorter phrases recur innocently (on
    SST-2, 3-word test phrases such as "it's painful" occur inside unrelated training reviews,
    while no 4-word one does) and are left to the exact and near-duplicate checks.
    """

    def __init__(self, config: FilterConfig) -> None:
        super().__init__(config)
        # n-gram length -> n-gram (words joined by spaces) -> key of the first protected text.
        self._ngrams: dict[int, dict[str, str]] = {}

    @staticmethod
    def _threshold(config: FilterConfig) -> float:
        return config.contamination_threshold

    def _add(self, key: str | None, text: Fingerprinted) -> str | None:
        added = super()._add(key, text)
        words = _words(text.normalized)
        size = min(len(words), self.config.contamination_ngram)
        if added is None or size < self.config.contamination_min_words:
            return added
        grams = self._ngrams.setdefault(size, {})
        for start in range(len(words) - size + 1):
            grams.setdefault(" ".join(words[start : start + size]), added)
        return added

    def check(self, text: str | Fingerprinted) -> tuple[str | None, str | None]:
        """(Reason.CONTAMINATED, which check matched) for a contaminated text, else (None, None)."""
        text = _fingerprinted(text)
        if (key := self._exact_match(text)) is not None:
            return Reason.CONTAMINATED, f"same normalized text as protected text {key}"
        if (match := self._near_match(text)) is not None:
            key, similarity = match
            return (
                Reason.CONTAMINATED,
                f"near duplicate of protected text {key} (estimated Jaccard {similarity:.2f})",
            )
        words = _words(text.normalized)
        # Longest n-grams first, then left to right: one deterministic answer per text.
        for size in sorted(self._ngrams, reverse=True):
            grams = self._ngrams[size]
            for start in range(len(words) - size + 1):
                gram = " ".join(words[start : start + size])
                if (key := grams.get(gram)) is not None:
                    return (
                        Reason.CONTAMINATED,
                        f"shares the {size}-word sequence {gram!r} with protected text {key}",
                    )
        return None, None


# --- the checks -----------------------------------------------------------------------------


@dataclass(frozen=True)
class FilterContext:
    """What a check may consult besides the candidate."""

    config: FilterConfig
    dedup: DedupIndex
    guard: ContaminationGuard | None


Check = Callable[[Candidate, FilterContext], Verdict | None]
"""A filter step: None to let the candidate through, or a rejecting Verdict (see `reject`)."""


def reject(candidate: Candidate, reason: str, detail: str | None = None) -> Verdict:
    return Verdict(
        key=candidate.key, accepted=False, reason=reason, detail=detail, output=candidate.output
    )


def _shorten(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _case_insensitive_matches(output: str, labels: Sequence[str]) -> list[str]:
    folded = output.strip().casefold()
    return [label for label in labels if label.casefold() == folded]


# Quotes and sentence punctuation a teacher may wrap a label in ("positive.", "'LOC'").
_LABEL_WRAPPING = " \t\n\r.,;:!?\"'`*_()[]{}«»“”\u2018\u2019"


def canonical_label(output: str, labels: Sequence[str]) -> str | None:
    """The label `output` names: exactly after stripping whitespace, else the one label equal
    ignoring case, else the same after stripping surrounding quotes and punctuation. None when
    there is no such label or several (e.g. "yes" and "Yes" are both labels)."""
    for candidate in (output.strip(), output.strip(_LABEL_WRAPPING)):
        if candidate in labels:
            return candidate
        matches = _case_insensitive_matches(candidate, labels)
        if matches:
            return matches[0] if len(matches) == 1 else None
    return None


def check_schema(candidate: Candidate, ctx: FilterContext) -> Verdict | None:
    """The input must have content; a classification candidate must carry an output."""
    if not candidate.fingerprinted.normalized:
        return reject(candidate, Reason.EMPTY, "input has no content")
    if ctx.config.labels is not None:
        if candidate.output is None:
            return reject(candidate, Reason.SCHEMA_INVALID, "output missing: the task has labels")
        if not candidate.output.strip():
            return reject(candidate, Reason.EMPTY, "output is blank")
    return None


def check_label(candidate: Candidate, ctx: FilterContext) -> Verdict | None:
    """A classification candidate's output must be one of the labels (after canonicalization)."""
    labels = ctx.config.labels
    if labels is None or candidate.output is None or candidate.output in labels:
        return None
    matches = _case_insensitive_matches(candidate.output, labels)
    if len(matches) > 1:
        detail = f"{_shorten(candidate.output)!r} matches several labels ignoring case: {matches}"
    else:
        detail = f"{_shorten(candidate.output)!r} is not one of the {len(labels)} labels"
    return reject(candidate, Reason.LABEL_INVALID, detail)


def expected_label_check(expected: Mapping[str, str]) -> Check:
    """Reject a candidate whose (canonical) label is not the one its prompt asked for;
    `expected` maps candidate keys to that label, and a key it lacks is not checked.

    Every classification prompt asks for examples "each labelled X". An example labelled Y
    comes from a teacher that strayed or lies: either its text is X's and its label is wrong,
    or its text is Y's and it is not what the target paid for. Which of the two cannot be told
    here, and a wrong label is the worst thing a training set can hold, so it is rejected, both
    labels in the detail. It catches a mislabelling teacher on any number of labels, where the
    student-based label check (`selection.label_agreement`) needs ten or more."""

    def check_expected_label(candidate: Candidate, _: FilterContext) -> Verdict | None:
        asked = expected.get(candidate.key)
        if asked is None or candidate.output is None or candidate.output == asked:
            return None
        return reject(
            candidate,
            Reason.LABEL_NOT_ASKED,
            f"asked for {_shorten(asked)!r}, labelled {_shorten(candidate.output)!r}",
        )

    return check_expected_label


def check_length(candidate: Candidate, ctx: FilterContext) -> Verdict | None:
    """The input's length in characters, surrounding whitespace excluded, must be in bounds."""
    length = len(candidate.input.strip())
    if length < ctx.config.min_chars:
        return reject(candidate, Reason.TOO_SHORT, f"{length} < {ctx.config.min_chars} characters")
    if length > ctx.config.max_chars:
        return reject(candidate, Reason.TOO_LONG, f"{length} > {ctx.config.max_chars} characters")
    return None


def check_contamination(candidate: Candidate, ctx: FilterContext) -> Verdict | None:
    """The input must not copy a validation or test text (see `ContaminationGuard`)."""
    if ctx.guard is None:
        return None
    reason, detail = ctx.guard.check(candidate.fingerprinted)
    return None if reason is None else reject(candidate, reason, detail)


def check_duplicate(candidate: Candidate, ctx: FilterContext) -> Verdict | None:
    """The input must differ, after normalization, from every text accepted so far."""
    key = ctx.dedup.duplicate_of(candidate.fingerprinted)
    if key is None:
        return None
    return reject(candidate, Reason.DUPLICATE, f"same normalized text as {key}")


def check_near_duplicate(candidate: Candidate, ctx: FilterContext) -> Verdict | None:
    """The input must not be a near duplicate of a text accepted so far."""
    match = ctx.dedup.near_duplicate_of(candidate.fingerprinted)
    if match is None:
        return None
    key, similarity = match
    return reject(
        candidate, Reason.NEAR_DUPLICATE, f"estimated Jaccard {similarity:.2f} with {key}"
    )


DEFAULT_CHECKS: tuple[Check, ...] = (
    check_schema,
    check_label,
    check_length,
    check_contamination,
    check_duplicate,
    check_near_duplicate,
)

# The settings an index or guard was built with; a filter call must use the same ones.
_INDEX_SETTINGS = {
    "near_duplicate_threshold",
    "contamination_threshold",
    "contamination_ngram",
    "contamination_min_words",
    "num_perm",
    "seed",
}


def _require_index_settings(config: FilterConfig, built_with: FilterConfig, what: str) -> None:
    if config.model_dump(include=_INDEX_SETTINGS) != built_with.model_dump(include=_INDEX_SETTINGS):
        raise ValueError(f"the {what} was built with other similarity settings than `config`")


def filter_candidates(
    candidates: Iterable[Candidate],
    *,
    config: FilterConfig,
    dedup: DedupIndex,
    guard: ContaminationGuard | None = None,
    checks: Sequence[Check] = DEFAULT_CHECKS,
) -> list[Verdict]:
    """One Verdict per candidate, in order; the accepted ones are added to `dedup` as they pass.

    Each candidate's output is first mapped to its canonical label (classification tasks); the
    checks then run in order and the first rejection wins. Duplicates are judged on the input
    only: a second example with the same input is redundant (same output) or contradicts the first
    (another output) and is rejected either way. Because accepted candidates join the index at
    once, the later of two near-identical candidates in one batch is the one rejected.
    """
    _require_index_settings(config, dedup.config, "dedup index")
    if guard is not None:
        _require_index_settings(config, guard.config, "contamination guard")
    ctx = FilterContext(config=config, dedup=dedup, guard=guard)
    candidates = list(candidates)
    # Each candidate is sketched for the contamination and near-duplicate checks; one numpy
    # pass over the whole batch costs a fraction of one pass per text (`_Sketcher.sketch_all`),
    # and the fingerprints are made here, before any copy below, which shares them.
    dedup.sketch_all(candidate.fingerprinted for candidate in candidates)
    verdicts: list[Verdict] = []
    for candidate in candidates:
        if config.labels is not None and candidate.output is not None:
            label = canonical_label(candidate.output, config.labels)
            if label is not None and label != candidate.output:
                candidate = candidate.model_copy(update={"output": label})
        verdict = _first_rejection(candidate, ctx, checks)
        if verdict is None:
            dedup.add(candidate.key, candidate.fingerprinted)
            verdict = Verdict(key=candidate.key, accepted=True, output=candidate.output)
        verdicts.append(verdict)
    return verdicts


def _first_rejection(
    candidate: Candidate, ctx: FilterContext, checks: Sequence[Check]
) -> Verdict | None:
    for check in checks:
        verdict = check(candidate, ctx)
        if verdict is None:
            continue
        if verdict.accepted:
            name = getattr(check, "__name__", repr(check))
            raise ValueError(f"check {name} returned an accepted verdict; checks only reject")
        return verdict
    return None
