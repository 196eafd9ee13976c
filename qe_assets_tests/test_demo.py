"""The demo: the event generator (determinism, realism of the mix, malformed lines, atomic writes)
and `make demo` itself."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from collections import Counter, defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from qe_assets.ingest.events import validate_event
from qe_assets.ops import demo
from qe_assets.ops.demo import generate_events, write_jsonl

N = 3000
BAD_SHARE = 0.05
CJK = re.compile(r"[\u4e00-\u9fff]")
# Spelled out rather than imported, so the test pins the external contract itself.
KNOWN_LABELS = ("factuality_error", "incomplete_answer", "low_relevance", "overconfidence")
LABEL_ALIASES = {"事实性错误", "回答不完整", "相关性低", "可能过度自信", "过度自信"}
SCHEMA_FIELDS = {"request_id", "question", "docs", "answer", "evaluation", "timestamp"}


@cache
def sample() -> tuple[str, ...]:
    # Generated once per session: every realism check reads the same stream.
    return tuple(generate_events(N, seed=11, bad_share=BAD_SHARE))


@cache
def split() -> tuple[list[dict[str, Any]], list[str], list[str]]:
    """(good events as dicts, good lines, bad lines) of `sample()`."""
    events: list[dict[str, Any]] = []
    good: list[str] = []
    bad: list[str] = []
    for line in sample():
        try:
            validate_event(line)
        except ValidationError:
            bad.append(line)
            continue
        events.append(json.loads(line))
        good.append(line)
    return events, good, bad


def test_same_seed_gives_identical_output_and_other_seeds_differ() -> None:
    first = generate_events(200, seed=3, bad_share=0.1)
    assert first == generate_events(200, seed=3, bad_share=0.1)
    assert first != generate_events(200, seed=4, bad_share=0.1)
    assert generate_events(50) == generate_events(50, seed=7)


# sha256 of `python -m qe_assets.ops.demo --count 200 --seed 7 --bad-share 0.05`: the vocabulary
# moved from code into demo_data/vocabulary.json without changing one byte of the output.
PINNED_SHA256 = "298af7c94e073b393161627b129f2c3ac60bfa3e59a093edd2cd289118f5f93f"


def test_the_output_for_a_seed_is_pinned(tmp_path: Path) -> None:
    out = tmp_path / "demo.jsonl"
    assert (
        demo.main(["--count", "200", "--seed", "7", "--bad-share", "0.05", "--out", str(out)]) == 0
    )
    assert hashlib.sha256(out.read_bytes()).hexdigest() == PINNED_SHA256


def test_count_and_line_shape() -> None:
    assert generate_events(0) == []
    lines = sample()
    assert len(lines) == N
    for line in lines:
        assert isinstance(line, str)
        assert "\n" not in line and "\r" not in line
        line.encode("utf-8")  # raises on lone surrogates


def test_good_lines_validate_and_bad_count_matches_share() -> None:
    events, good, bad = split()
    assert len(bad) == round(N * BAD_SHARE)
    assert len(good) == N - len(bad)
    assert len(events) == len(good)


def _bad_kind(line: str) -> str:
    try:
        value = json.loads(line)
    except ValueError:
        return "truncated_json"
    if isinstance(value, list):
        return "json_array"
    if "request_id" not in value:
        return "missing_request_id"
    if not value["request_id"].strip():
        return "blank_request_id"
    if value["evaluation"]["score"] == 1.7:
        return "score_out_of_range"
    if isinstance(value["evaluation"]["score"], str):
        return "score_as_string"
    if not isinstance(value["docs"], list):
        return "docs_not_a_list"
    if any("content" not in doc for doc in value["docs"]):
        return "doc_without_content"
    if value.get("timestamp") == "yesterday":
        return "invalid_timestamp"
    return "unrecognised"


def test_bad_lines_cover_every_kind_evenly() -> None:
    _, _, bad = split()
    kinds = Counter(_bad_kind(line) for line in bad)
    assert set(kinds) == set(demo.BAD_KINDS)
    assert max(kinds.values()) - min(kinds.values()) <= 1  # the kinds cycle


def test_bad_share_rounding_and_extremes() -> None:
    for n, share in ((10, 0.25), (7, 0.5), (20, 1.0), (20, 0.0)):
        lines = generate_events(n, seed=5, bad_share=share)
        failures = 0
        for line in lines:
            try:
                validate_event(line)
            except ValidationError:
                failures += 1
        assert failures == round(n * share), (n, share)


def test_both_languages_present_in_question_docs_and_answer() -> None:
    events, _, _ = split()
    chinese = [e for e in events if CJK.search(e["question"])]
    english = [e for e in events if not CJK.search(e["question"])]
    assert 0.35 < len(chinese) / len(events) < 0.65
    for event in chinese[:200]:
        assert all(CJK.search(doc["content"]) for doc in event["docs"])
        assert CJK.search(event["answer"])
    for event in english[:200]:
        assert not any(CJK.search(doc["content"]) for doc in event["docs"])


def test_labels_mix_english_aliases_messy_empty_and_unknown() -> None:
    events, _, _ = split()
    all_labels = [label for e in events for label in e["evaluation"]["labels"]]
    assert set(KNOWN_LABELS) <= set(all_labels)
    aliases = {label for label in all_labels if label in LABEL_ALIASES}
    assert len(aliases) >= 3
    assert any(label != label.strip().lower() for label in all_labels)  # padded / mixed case
    known = set(KNOWN_LABELS) | set(LABEL_ALIASES)
    assert any(label.strip().lower() not in known for label in all_labels)  # unknown labels
    assert any(e["evaluation"]["labels"] == [] for e in events)
    assert any(len(e["evaluation"]["labels"]) >= 2 for e in events)


def test_scores_checks_and_extra_fields() -> None:
    events, _, _ = split()
    scores = [e["evaluation"]["score"] for e in events]
    assert all(0 <= s < 0.7 and round(s, 3) == s for s in scores)
    assert any(s * 1.5 >= 0.6 for s in scores) and any(s * 1.5 < 0.6 for s in scores)
    for event in events:
        checks = event["evaluation"]["checks"]
        assert isinstance(checks["grounded"], bool) and isinstance(checks["cites_sources"], bool)
        assert isinstance(checks["latency_ms"], int)
    assert any(set(e) - SCHEMA_FIELDS for e in events)


def test_docs_bounds_ids_scores_and_order() -> None:
    events, _, _ = split()
    docs = [doc for e in events for doc in e["docs"]]
    assert all(2 <= len(e["docs"]) <= 8 for e in events)
    assert all(150 <= len(doc["content"]) <= 900 for doc in docs)
    assert all(re.fullmatch(r"kb-\d+", doc["id"]) for doc in docs)
    unscored = sum("score" not in doc for doc in docs) / len(docs)
    assert 0.05 < unscored < 0.15
    scored = [doc["score"] for doc in docs if "score" in doc]
    assert all(round(s, 4) == s for s in scored)
    unsorted = [
        e
        for e in events
        if (s := [d["score"] for d in e["docs"] if "score" in d]) != sorted(s, reverse=True)
    ]
    assert unsorted


def test_custom_doc_bounds_are_respected() -> None:
    lines = generate_events(300, seed=2, doc_chars=(40, 60), docs_per_event=(0, 3))
    counts = set()
    for line in lines:
        event = validate_event(line)
        counts.add(len(event.docs))
        assert all(40 <= len(doc.content) <= 60 for doc in event.docs)
    assert counts == {0, 1, 2, 3}
    heavy = generate_events(
        50, doc_chars=demo.BENCH_DOC_CHARS, docs_per_event=demo.BENCH_DOCS_PER_EVENT
    )
    assert all(len(validate_event(line).docs) >= 3 for line in heavy)


def test_resends_are_identical_lines_and_other_ids_unique() -> None:
    events, good, _ = split()
    by_id: dict[str, list[str]] = defaultdict(list)
    for event, line in zip(events, good, strict=True):
        by_id[event["request_id"]].append(line)
    repeated = {rid: lines for rid, lines in by_id.items() if len(lines) > 1}
    assert 0.005 * N < sum(len(v) - 1 for v in repeated.values()) < 0.04 * N
    for lines in repeated.values():
        assert len(set(lines)) == 1


def test_timestamps_increase_from_start() -> None:
    events, _, _ = split()
    seen: set[str] = set()
    previous = demo.DEFAULT_START
    for event in events:
        if event["request_id"] in seen:  # a re-send carries its original timestamp
            continue
        seen.add(event["request_id"])
        assert event["timestamp"].endswith("Z")
        moment = datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00"))
        assert moment > previous
        previous = moment
    start = datetime(2027, 1, 2, 3, 4, 5)
    naive = generate_events(5, start=start)
    assert naive == generate_events(5, start=start.replace(tzinfo=UTC))
    assert json.loads(naive[0])["timestamp"].startswith("2027-01-02T03:04:")


def test_invalid_arguments_are_rejected() -> None:
    with pytest.raises(ValueError):
        generate_events(-1)
    with pytest.raises(ValueError):
        generate_events(10, bad_share=1.5)
    with pytest.raises(ValueError):
        generate_events(10, doc_chars=(0, 10))
    with pytest.raises(ValueError):
        generate_events(10, docs_per_event=(5, 2))


def test_write_jsonl_writes_all_lines_and_leaves_no_temp_file(tmp_path: Path) -> None:
    lines = generate_events(100, bad_share=0.1)
    target = tmp_path / "inbox" / "events.jsonl"
    assert write_jsonl(target, lines) == 100
    assert target.read_text(encoding="utf-8") == "\n".join(lines) + "\n"
    assert os.listdir(target.parent) == ["events.jsonl"]
    assert write_jsonl(target, iter(lines[:3])) == 3  # replaces, from any iterable
    assert target.read_text(encoding="utf-8").count("\n") == 3


def test_write_jsonl_failure_keeps_previous_file_and_cleans_up(tmp_path: Path) -> None:
    target = tmp_path / "events.jsonl"
    target.write_text("old\n", encoding="utf-8")

    def failing() -> Iterator[str]:
        yield "{}"
        raise RuntimeError("producer crashed")

    with pytest.raises(RuntimeError):
        write_jsonl(target, failing())
    with pytest.raises(ValueError, match="line break"):
        write_jsonl(target, ["{}", "{}\n{}"])
    assert target.read_text(encoding="utf-8") == "old\n"
    assert os.listdir(tmp_path) == ["events.jsonl"]


def test_cli_writes_the_file_and_reports_the_count(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "demo.jsonl"
    args = ["--count", "40", "--seed", "9", "--bad-share", "0.1", "--out", str(out)]
    assert demo.main(args) == 0
    assert "40" in capsys.readouterr().out
    assert out.read_text(encoding="utf-8").splitlines() == generate_events(
        40, seed=9, bad_share=0.1
    )


def test_make_demo_runs_the_whole_graph_and_greets_with_no_failing_check(tmp_path: Path) -> None:
    # The Makefile's own recipe with its default event count, run by this interpreter's
    # environment: `-o` marks the install stamp up to date and BIN points make at the bin folder
    # of the running interpreter, so make runs the demo steps without installing anything.
    root = Path(__file__).resolve().parents[1]
    data = tmp_path / "data"
    bin_dir = f"BIN={Path(sys.executable).parent}"
    run = subprocess.run(
        ["make", "-C", str(root), "-o", ".venv/.installed-core", "demo", bin_dir],
        env={**os.environ, "QE_DATA_DIR": str(data), "DAGSTER_HOME": str(tmp_path / "home")},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "tuning_dataset: " in run.stdout and "version=v001" in run.stdout
    assert f"datasets:  {data}/datasets/" in run.stdout
    assert "rag_quality_tuning_v001.jsonl" in run.stdout
    assert f"database:  {data}/qe.duckdb" in run.stdout
    assert (data / "datasets" / "rag_quality_tuning_v001.manifest.json").exists()
    # A newcomer's first run passes every check: the demo's one burst of events stays under the
    # review backlog limit (QE_MAX_REVIEW_BACKLOG, 1,000 by default).
    checks = [line for line in run.stdout.splitlines() if line.startswith("check ")]
    assert checks and not [line for line in checks if "FAILED" in line], checks
    # The run's review_queue line counts what `qe status` counts: spot checks included.
    queued = re.search(r"review_queue: new_queued=(\d+)", run.stdout)
    waiting = re.search(r"review queue: ([\d,]+) samples waiting", run.stdout)
    assert queued and waiting, run.stdout[-3000:]
    assert int(queued.group(1)) == int(waiting.group(1).replace(",", ""))


def test_make_demo_installs_the_core_and_make_test_adds_the_extras(tmp_path: Path) -> None:
    # What make would do (-n) in a venv where `make demo` already ran: the demo installs nothing
    # more, `make test` adds the test and train extras, and a fresh venv's demo gets the core only.
    root = Path(__file__).resolve().parents[1]
    venv = tmp_path / "venv"
    venv.mkdir()

    def plan(target: str) -> str:
        run = subprocess.run(
            ["make", "-n", "-C", str(root), target, f"VENV={venv}"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert run.returncode == 0, run.stderr
        return run.stdout

    fresh = plan("demo")
    assert "-m venv" in fresh and "pip install -q -e . " in fresh
    assert "[test" not in fresh and "train]" not in fresh
    (venv / ".installed-core").touch()
    assert "pip install" not in plan("demo")
    assert 'pip install -q -e ".[test,train]"' in plan("test")
    assert "-m venv" not in plan("test")
