"""Deterministic demo and benchmark quality events for a RAG support assistant.

`generate_events` fabricates what a producer would capture from an internal knowledge-base
assistant: a question, the retrieved chunks, the answer and the evaluator's verdict. Roughly half
of the events are Chinese and half English; the text comes from small vocabularies shipped in
`qe_assets/ops/demo_data/vocabulary.json`, so no network or third-party package is needed, and the
same arguments always give byte-identical lines.

The stream deliberately carries what a real producer sends, so the pipeline gets exercised:

* labels in English and in their Chinese aliases, sometimes padded or oddly cased, sometimes
  several per event, ~3% none and ~2% a label outside the known set;
* ~10% of docs without a retriever score, and docs in retrieval order, not sorted by score;
* ~1% of events with extra top-level fields (``tenant``, ``channel``...) that must be kept;
* ~2% exact re-sends of an earlier line (at-least-once delivery);
* a ``bad_share`` fraction of malformed lines, cycling through the kinds in `BAD_KINDS`.

Sizes: with the default ``doc_chars=(150, 900)`` and ``docs_per_event=(2, 8)`` an event averages
about 3.3 K characters, ~5.6 KB of UTF-8 (Chinese characters take three bytes). Benchmark callers
that want heavier, more production-like events pass more and longer docs:
``docs_per_event=BENCH_DOCS_PER_EVENT, doc_chars=BENCH_DOC_CHARS`` gives ~7.6 KB of UTF-8
(~4.3 K characters) per event. 100,000 default events take a few seconds on one core.

CLI: ``python -m qe_assets.ops.demo --count N --seed S --bad-share F --out PATH``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import tempfile
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from importlib import resources
from pathlib import Path
from random import Random
from typing import Any

from qe_assets.ingest.events import KNOWN_LABELS, LABEL_ALIASES

DEFAULT_START = datetime(2026, 11, 1, tzinfo=UTC)
# Heavier events for benchmarks: ~7-8 KB of UTF-8 each instead of ~5.6 KB.
BENCH_DOCS_PER_EVENT: tuple[int, int] = (3, 9)
BENCH_DOC_CHARS: tuple[int, int] = (200, 1000)

# The label rules live in events.py; the demo writes the same Chinese aliases a producer sends.
_ZH_ALIASES: dict[str, tuple[str, ...]] = {
    label: tuple(alias for alias, canonical in LABEL_ALIASES.items() if canonical == label)
    for label in KNOWN_LABELS
}
# Evaluators flag factual and completeness problems more often than tone.
_LABEL_CUMULATIVE: tuple[float, ...] = (0.32, 0.62, 0.86)  # weights .32 .30 .24 .14

BAD_KINDS: tuple[str, ...] = (
    "truncated_json",
    "missing_request_id",
    "blank_request_id",
    "score_out_of_range",
    "score_as_string",
    "docs_not_a_list",
    "doc_without_content",
    "invalid_timestamp",
    "json_array",
)

_VARIANTS_PER_TOPIC = 4
_SLOT_POOL = 64
# Retries arrive soon after the original, so re-sends copy one of the recent lines.
_RESEND_WINDOW = 200


@dataclass(frozen=True, slots=True)
class _Texts:
    title: str
    questions: tuple[str, ...]
    facts: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class _Language:
    code: str
    joiner: str
    cite_sep: str
    fillers: tuple[str, ...]
    answers: tuple[str, ...]
    vague: tuple[str, ...]
    sure_prefix: str
    plans: tuple[str, ...]
    teams: tuple[str, ...]
    regions: tuple[str, ...]
    amounts: tuple[int, ...]


def _load_vocabulary() -> dict[str, Any]:
    """The generator's texts: demo_data/vocabulary.json, shipped with the package."""
    raw = resources.files("qe_assets.ops.demo_data").joinpath("vocabulary.json").read_text("utf-8")
    return json.loads(raw)


def _frozen(fields: dict[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}


_VOCABULARY = _load_vocabulary()
_LANGUAGES: tuple[_Language, ...] = tuple(
    _Language(**_frozen(lang)) for lang in _VOCABULARY["languages"]
)
# One entry per knowledge-base topic: one _Texts per language (in _LANGUAGES order), same facts.
_TOPICS: tuple[tuple[_Texts, ...], ...] = tuple(
    tuple(_Texts(**_frozen(topic[lang.code])) for lang in _LANGUAGES)
    for topic in _VOCABULARY["topics"]
)
UNKNOWN_LABELS: tuple[str, ...] = tuple(_VOCABULARY["unknown_labels"])
_EXTRA_FIELDS: tuple[dict[str, Any], ...] = tuple(_VOCABULARY["extra_fields"])


_JSON_ESCAPED = re.compile(r'["\\\x00-\x1f]')  # what json.dumps escapes with ensure_ascii=False


@dataclass(frozen=True, slots=True)
class _Corpus:
    """One knowledge-base article long enough to cut any allowed chunk from many offsets.

    Doc contents are slices of `text`. Serialising them was most of the cost of an event, so the
    article is JSON-escaped once and a slice's JSON is the matching slice of `escaped`.
    """

    text: str
    starts: tuple[int, ...]  # sentence starts from which a chunk of maximum length still fits
    escaped: str
    escape_at: tuple[int, ...]  # positions in `text` of the characters JSON escapes...
    escape_extra: tuple[int, ...]  # ...and the characters escaping added before each one

    @classmethod
    def build(cls, text: str, starts: tuple[int, ...]) -> _Corpus:
        positions: list[int] = []
        extra = [0]
        for match in _JSON_ESCAPED.finditer(text):
            positions.append(match.start())
            extra.append(extra[-1] + len(json.dumps(match.group(), ensure_ascii=False)) - 3)
        return cls(
            text=text,
            starts=starts,
            escaped=json.dumps(text, ensure_ascii=False)[1:-1],
            escape_at=tuple(positions),
            escape_extra=tuple(extra),
        )

    def escaped_offset(self, position: int) -> int:
        return position + self.escape_extra[bisect_left(self.escape_at, position)]


@dataclass(frozen=True, slots=True)
class _Chunk:
    """A retrievable chunk start; its id is stable, like a row of a real KB index."""

    doc_id: str
    corpus: _Corpus
    start: int
    escaped_start: int


def _slot_pool(rng: Random, lang: _Language) -> list[dict[str, Any]]:
    # Drawing slot values once into a pool keeps the per-event cost at a single draw.
    pool: list[dict[str, Any]] = []
    for _ in range(_SLOT_POOL):
        day = datetime(2026, 1, 1) + timedelta(days=rng.randrange(300))
        pool.append(
            {
                "plan": rng.choice(lang.plans),
                "team": rng.choice(lang.teams),
                "region": rng.choice(lang.regions),
                "amount": rng.choice(lang.amounts),
                "days": rng.choice((7, 14, 30, 60, 90)),
                "hours": rng.choice((8, 10, 12, 24)),
                "n": rng.randint(3, 15),
                "limit": rng.choice((60, 120, 600, 1200, 6000)),
                "date": day.strftime("%Y-%m-%d"),
            }
        )
    return pool


def _build_corpus(
    rng: Random,
    lang: _Language,
    texts: _Texts,
    slots: list[dict[str, Any]],
    max_chars: int,
) -> _Corpus:
    # Twice the longest chunk plus slack leaves plenty of distinct sentence-aligned offsets.
    target = 2 * max_chars + 400
    parts: list[str] = [texts.title]
    offsets: list[int] = [0]
    length = len(texts.title)
    separator = "\n\n"
    deck: list[str] = []
    while length < target:
        if not deck:
            # Dealing shuffled decks spreads repeats evenly instead of clustering one fact.
            deck = list(texts.facts) * 3 + list(lang.fillers)
            rng.shuffle(deck)
        sentence = deck.pop().format(topic=texts.title, **rng.choice(slots))
        parts.append(separator)
        length += len(separator)
        offsets.append(length)
        parts.append(sentence)
        length += len(sentence)
        # Occasional paragraph breaks, like the markdown articles chunks are cut from.
        separator = "\n\n" if rng.random() < 0.15 else lang.joiner
    text = "".join(parts)
    starts = tuple(o for o in offsets if o + max_chars <= len(text))
    return _Corpus.build(text, starts)


# (chunk, end of the content in chunk.corpus.text, score or None): a doc before it is rendered.
_DocSpec = tuple[_Chunk, int, float | None]
_ENCODER = json.JSONEncoder(ensure_ascii=False)  # json.dumps builds a new encoder per call


@dataclass(slots=True)
class _Event:
    head: dict[str, Any]  # the fields serialised before "docs"
    docs: list[_DocSpec]
    tail: dict[str, Any]  # the fields serialised after "docs"

    def as_dict(self) -> dict[str, Any]:
        docs: list[dict[str, Any]] = []
        for chunk, end, score in self.docs:
            doc: dict[str, Any] = {
                "id": chunk.doc_id,
                "content": chunk.corpus.text[chunk.start : end],
            }
            if score is not None:
                doc["score"] = score
            docs.append(doc)
        return {**self.head, "docs": docs, **self.tail}

    def to_json(self) -> str:
        """Exactly `json.dumps(self.as_dict(), ensure_ascii=False)`, several times faster."""
        # One flat join: every concatenation or f-string would copy the long contents again.
        parts: list[str] = [_ENCODER.encode(self.head)[:-1], ', "docs": [']
        separator = '{"id": "'
        for chunk, end, score in self.docs:
            corpus = chunk.corpus
            parts += (
                separator,
                chunk.doc_id,
                '", "content": "',
                corpus.escaped[chunk.escaped_start : corpus.escaped_offset(end)],
                '"}' if score is None else f'", "score": {score!r}}}',
            )
            separator = ', {"id": "'
        parts += ("], ", _ENCODER.encode(self.tail)[1:])
        return "".join(parts)


class _Generator:
    def __init__(
        self,
        seed: int,
        doc_chars: tuple[int, int],
        docs_per_event: tuple[int, int],
    ) -> None:
        self.rng = Random(seed)
        self.seed = seed
        self.doc_lo, self.doc_hi = doc_chars
        self.docs_lo, self.docs_hi = docs_per_event
        self.slots = [_slot_pool(self.rng, lang) for lang in _LANGUAGES]
        # chunks[lang][topic]: every chunk start of every variant article, so one draw picks a doc.
        self.chunks: list[list[list[_Chunk]]] = []
        next_id = 1
        for li, lang in enumerate(_LANGUAGES):
            per_topic: list[list[_Chunk]] = []
            for topic in _TOPICS:
                chunks: list[_Chunk] = []
                for _ in range(_VARIANTS_PER_TOPIC):
                    corpus = _build_corpus(self.rng, lang, topic[li], self.slots[li], self.doc_hi)
                    for at in corpus.starts:
                        chunks.append(
                            _Chunk(f"kb-{next_id}", corpus, at, corpus.escaped_offset(at))
                        )
                        next_id += 1
                per_topic.append(chunks)
            self.chunks.append(per_topic)

    # Random.randrange/choice are pure Python and dominate the profile; int(random() * k) draws
    # the same distribution (bar a 2**-53 bias) an order of magnitude faster.

    def _labels(self, li: int) -> tuple[list[str], set[str]]:
        rng = self.rng
        rand = rng.random
        roll = rand()
        if roll < 0.03:
            canonical: list[str] = []
        else:
            first = KNOWN_LABELS[bisect_right(_LABEL_CUMULATIVE, rand())]
            extra = 0 if roll < 0.80 else (1 if roll < 0.95 else 2)
            rest = [label for label in KNOWN_LABELS if label != first]
            canonical = [first, *rng.sample(rest, extra)] if extra else [first]
        labels: list[str] = []
        for label in canonical:
            # Chinese evaluators mostly emit the aliases; English ones occasionally do too.
            if rand() < (0.75 if li == 1 else 0.08):
                aliases = _ZH_ALIASES[label]
                text = aliases[int(rand() * len(aliases))]
                if rand() < 0.03:
                    text = f" {text} "
            else:
                text = label
                messy = rand()
                if messy < 0.03:
                    text = f" {label.title()} "
                elif messy < 0.05:
                    text = label.upper()
                elif messy < 0.07:
                    text = f"{label} "
            labels.append(text)
        if rand() < 0.02:
            unknown = UNKNOWN_LABELS[int(rand() * len(UNKNOWN_LABELS))]
            if labels and rand() < 0.5:
                labels.insert(0, unknown)
            else:
                labels.append(unknown)
        return labels, set(canonical)

    def event(self, index: int, timestamp: str) -> _Event:
        rng = self.rng
        rand = rng.random
        n_topics = len(_TOPICS)
        li = 0 if rand() < 0.5 else 1
        lang = _LANGUAGES[li]
        ti = int(rand() * n_topics)
        texts = _TOPICS[ti][li]
        slots = self.slots[li][int(rand() * _SLOT_POOL)]
        labels, canonical = self._labels(li)
        # Triangular around 0.45 puts about half of the events on each side of the 0.4 line
        # where score * 1.5 crosses the default 0.6 confidence gate.
        score = min(699, int(rng.triangular(0, 700, 450))) / 1000

        off_topic_share = 0.55 if "low_relevance" in canonical else 0.15
        chunks_by_topic = self.chunks[li]
        docs: list[_DocSpec] = []
        doc_lo, span = self.doc_lo, self.doc_hi - self.doc_lo + 1
        for _ in range(self.docs_lo + int(rand() * (self.docs_hi - self.docs_lo + 1))):
            # One uniform draw decides both whether the doc is off topic and, rescaled, which
            # topic; likewise below for whether it has a score and the score itself.
            roll = rand()
            off_topic = roll < off_topic_share
            topic = min(n_topics - 1, int(roll / off_topic_share * n_topics)) if off_topic else ti
            chunks = chunks_by_topic[topic]
            chunk = chunks[int(rand() * len(chunks))]
            end = chunk.start + doc_lo + int(rand() * span)
            roll = rand()
            doc_score: float | None = None
            if roll >= 0.10:
                low, high = (0.08, 0.55) if off_topic else (0.45, 0.97)
                doc_score = round(low + (high - low) * (roll - 0.10) / 0.90, 4)
            docs.append((chunk, end, doc_score))

        if "incomplete_answer" in canonical and rand() < 0.7:
            answer = lang.vague[int(rand() * len(lang.vague))]
        else:
            source = _TOPICS[int(rand() * n_topics)][li] if "low_relevance" in canonical else texts
            facts = source.facts
            answer = lang.answers[int(rand() * len(lang.answers))].format(
                fact=facts[int(rand() * len(facts))].format(**slots),
                fact2=facts[int(rand() * len(facts))].format(**slots),
                team=slots["team"],
            )
        if "overconfidence" in canonical:
            answer = lang.sure_prefix + answer
        cites = bool(docs) and rand() < 0.6
        if cites:
            picked = rng.sample(docs, min(len(docs), 1 + int(rand() * 2)))
            answer += lang.cite_sep + "".join(f"[{d[0].doc_id}]" for d in picked)

        head: dict[str, Any] = {
            "request_id": f"demo-{self.seed}-{index:07d}",
            "timestamp": timestamp,
            "question": texts.questions[int(rand() * len(texts.questions))].format(**slots),
        }
        tail: dict[str, Any] = {
            "answer": answer,
            "evaluation": {
                "score": score,
                "labels": labels,
                "checks": {
                    "grounded": rand() < (0.3 if "factuality_error" in canonical else 0.85),
                    "cites_sources": cites,
                    "latency_ms": int(rng.lognormvariate(7.0, 0.45)),
                },
            },
        }
        if rand() < 0.01:
            tail.update(_EXTRA_FIELDS[int(rand() * len(_EXTRA_FIELDS))])
        return _Event(head, docs, tail)

    def corrupt(self, event: dict[str, Any], kind: str) -> str:
        """A malformed line of the given kind, still valid UTF-8 text on one line."""
        rng = self.rng
        if kind == "truncated_json":
            text = json.dumps(event, ensure_ascii=False)
            # Cutting anywhere before the final brace leaves the object unterminated.
            return text[: rng.randrange(len(text) // 4, len(text) - 1)]
        if kind == "json_array":
            return json.dumps([event], ensure_ascii=False)
        broken: dict[str, Any] = json.loads(json.dumps(event))
        match kind:
            case "missing_request_id":
                del broken["request_id"]
            case "blank_request_id":
                broken["request_id"] = "  "
            case "score_out_of_range":
                broken["evaluation"]["score"] = 1.7
            case "score_as_string":
                broken["evaluation"]["score"] = "0.4"
            case "docs_not_a_list":
                broken["docs"] = ", ".join(d["id"] for d in broken["docs"]) or "kb-1"
            case "doc_without_content":
                if not broken["docs"]:
                    broken["docs"].append({"id": "kb-1", "content": ""})
                del broken["docs"][rng.randrange(len(broken["docs"]))]["content"]
            case "invalid_timestamp":
                broken["timestamp"] = "yesterday"
            case _:
                raise ValueError(f"unknown bad kind: {kind}")
        return json.dumps(broken, ensure_ascii=False)


def _check_range(name: str, bounds: tuple[int, int], minimum: int) -> None:
    low, high = bounds
    if not minimum <= low <= high:
        raise ValueError(f"{name} must satisfy {minimum} <= min <= max, got {bounds!r}")


def generate_events(
    n: int,
    *,
    seed: int = 7,
    bad_share: float = 0.0,
    doc_chars: tuple[int, int] = (150, 900),
    docs_per_event: tuple[int, int] = (2, 8),
    start: datetime | None = None,
) -> list[str]:
    """n JSON lines (str, no trailing newline), deterministic for a given seed.

    ``round(n * bad_share)`` lines are malformed (kinds cycle through `BAD_KINDS`); the rest are
    valid events, ~2% of them exact re-sends of an earlier line. Timestamps start at ``start``
    (default 2026-11-01T00:00:00Z; naive datetimes are taken as UTC) and advance 0.5-5 s per line.
    Sizes are in the module docstring; benchmarks wanting ~7-8 KB per event pass more and longer
    docs, e.g. ``docs_per_event=BENCH_DOCS_PER_EVENT, doc_chars=BENCH_DOC_CHARS``.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not 0.0 <= bad_share <= 1.0:
        raise ValueError(f"bad_share must be within [0, 1], got {bad_share}")
    _check_range("doc_chars", doc_chars, 1)
    _check_range("docs_per_event", docs_per_event, 0)
    if start is None:
        start = DEFAULT_START
    elif start.tzinfo is None:
        start = start.replace(tzinfo=UTC)
    start = start.astimezone(UTC).replace(tzinfo=None)

    gen = _Generator(seed, doc_chars, docs_per_event)
    rng = gen.rng
    rand = rng.random
    bad_positions = set(rng.sample(range(n), round(n * bad_share)))
    lines: list[str] = []
    originals: list[str] = []
    elapsed_ms = 0
    bad_seen = 0
    for index in range(n):
        elapsed_ms += 500 + int(rand() * 4500)
        if index not in bad_positions and originals and rand() < 0.02:
            first = max(0, len(originals) - _RESEND_WINDOW)
            lines.append(originals[first + int(rand() * (len(originals) - first))])
            continue
        moment = start + timedelta(milliseconds=elapsed_ms)
        event = gen.event(index, moment.isoformat(timespec="milliseconds") + "Z")
        if index in bad_positions:
            lines.append(gen.corrupt(event.as_dict(), BAD_KINDS[bad_seen % len(BAD_KINDS)]))
            bad_seen += 1
        else:
            line = event.to_json()
            originals.append(line)
            lines.append(line)
    return lines


def write_jsonl(path: Path, lines: Iterable[str]) -> int:
    """Write lines as JSONL atomically; returns the number of lines written.

    The temporary sibling does not end in ``.jsonl``, so an inbox scanner never picks up a
    half-written file, and ``os.replace`` makes the whole file appear at once.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    count = 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as fh:
            # mkstemp creates the file 0600; consumers running as another user must read it.
            os.chmod(tmp_name, 0o644)
            for line in lines:
                if "\n" in line or "\r" in line:
                    # An embedded newline would silently split one record into two.
                    raise ValueError(f"line {count + 1} contains a line break")
                fh.write(line)
                fh.write("\n")
                count += 1
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    # The rename itself is only durable once the directory entry is on disk.
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return count


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m qe_assets.ops.demo", description="Write deterministic demo quality events."
    )
    parser.add_argument("--count", type=int, default=1000, help="number of lines (default 1000)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--bad-share", type=float, default=0.0, help="share of malformed lines")
    parser.add_argument(
        "--doc-chars", type=int, nargs=2, default=(150, 900), metavar=("MIN", "MAX")
    )
    parser.add_argument(
        "--docs-per-event", type=int, nargs=2, default=(2, 8), metavar=("MIN", "MAX")
    )
    parser.add_argument("--out", type=Path, required=True, help="JSONL file to write")
    args = parser.parse_args(argv)
    try:
        lines = generate_events(
            args.count,
            seed=args.seed,
            bad_share=args.bad_share,
            doc_chars=tuple(args.doc_chars),
            docs_per_event=tuple(args.docs_per_event),
        )
    except ValueError as exc:
        parser.error(str(exc))
    written = write_jsonl(args.out, lines)
    print(f"wrote {written} lines to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
