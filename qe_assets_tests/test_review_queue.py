"""The review queue's order, filters, pages and totals (qe_assets.review.queue) on a real DuckDB
file, and `qe review` over it: totals, formats, filters and --all-matching."""

from __future__ import annotations

import contextlib
import json
import os
import select
import subprocess
import sys
from typing import Any

import pytest

from qe_assets.review import queue as review_queue
from qe_assets.review.queue import QueueFilter
from qe_assets.settings import Settings
from qe_assets.store import connect, ensure_schema
from qe_assets_tests.test_cli_operations import qe as run_qe

# id: (label, confidence, judge original/completion scores, question key, hours waiting)
SAMPLES: dict[str, tuple[str, float, tuple[float, float] | None, str, float]] = {
    "a": ("factuality_error", 0.5, None, "qa", 1),  # 3 + 1 + 0 + 0.5 = 4.5
    "b": ("low_relevance", 0.1, None, "qb", 1),  # 1 + 1 + 0 + 0.9 = 2.9
    "c": ("overconfidence", 0.5, (5.0, 5.2), "qc", 1),  # 1.5 + 1.92 + 0 + 0.5 = 3.92
    "d": ("incomplete_answer", 0.5, None, "shared", 1),  # 2 + 1 + ln 8 + 0.5 = 5.58
    "e": ("factuality_error", 0.5, (1.0, 9.0), "qe", 30),  # 3 + 0 + 0 + 0.5 = 3.5
}
ORDER = ["d", "a", "c", "e", "b"]


def insert_sample(conn: Any, sample_id: str, label: str, confidence: float, key: str) -> None:
    conn.execute(
        """
        INSERT INTO annotated_samples (sample_id, request_id, event_seq, label, labels, language,
            question, original_answer, context_docs, instruction, prompt, score, confidence,
            route, question_key, dedup_key, annotated_at)
        VALUES (?, ?, 1, ?, [?], 'en', ?, 'The old answer.', [], 'Fix it.', 'prompt', 0.3, ?,
                'review', ?, ?, now()::TIMESTAMP)
        """,
        [sample_id, sample_id, label, label, f"Question {sample_id}?", confidence, key, sample_id],
    )


@pytest.fixture
def store(settings: Settings) -> Settings:
    with connect(settings.database) as conn:
        ensure_schema(conn)
        for sample_id, (label, confidence, judged, key, hours) in SAMPLES.items():
            insert_sample(conn, sample_id, label, confidence, key)
            conn.execute(
                "INSERT INTO review_queue (sample_id, reason, status, queued_at) VALUES "
                "(?, 'low_confidence', 'pending', now()::TIMESTAMP - to_hours(CAST(? AS BIGINT)))",
                [sample_id, hours],
            )
            if judged is not None:
                conn.execute(
                    """
                    INSERT INTO completions (sample_id, completion, mode, status, model, attempts,
                        created_at, updated_at, seq, judge_model, judge_original_score,
                        judge_completion_score)
                    VALUES (?, 'A proposal.', 'llm', 'proposed', 'm', 1, now()::TIMESTAMP,
                            now()::TIMESTAMP, nextval('completions_seq'), 'j', ?, ?)
                    """,
                    [sample_id, *judged],
                )
        for n in range(7):  # the question of "d" asked seven more times, already trained on
            insert_sample(conn, f"d-again-{n}", "incomplete_answer", 0.9, "shared")
    return settings


def ids(conn: Any, queue_filter: QueueFilter, **kw: int) -> list[str]:
    return [row["sample_id"] for row in review_queue.page(conn, queue_filter, **kw)]


def test_priority_order_and_its_parts(store: Settings) -> None:
    with connect(store.database, read_only=True) as conn:
        rows = review_queue.page(conn, QueueFilter())
        assert [r["sample_id"] for r in rows] == ORDER
        assert [r["priority"] for r in rows] == [5.58, 4.5, 3.92, 3.5, 2.9]
        # Pages are slices of the same order; the total counts the whole filter.
        assert ids(conn, QueueFilter(), limit=2, offset=2) == ["c", "e"]
        assert review_queue.count(conn, QueueFilter()) == 5
        assert review_queue.matching_ids(conn, QueueFilter()) == ORDER


@pytest.mark.parametrize(
    ("queue_filter", "expected"),
    [
        (QueueFilter(label="factuality_error"), ["a", "e"]),
        (QueueFilter(max_confidence=0.2), ["b"]),
        (QueueFilter(min_confidence=0.2, max_confidence=0.5), ["d", "a", "c", "e"]),
        (QueueFilter(max_judge_score=6.0), ["c"]),
        (QueueFilter(min_age_hours=24), ["e"]),
        (QueueFilter(max_age_hours=2), ["d", "a", "c", "b"]),
        (QueueFilter(language="zh"), []),
        (QueueFilter(reason="spot_check"), []),
        (QueueFilter(status="accepted"), []),
        (QueueFilter(status=None, label="low_relevance"), ["b"]),
    ],
)
def test_filters(store: Settings, queue_filter: QueueFilter, expected: list[str]) -> None:
    with connect(store.database, read_only=True) as conn:
        assert ids(conn, queue_filter) == expected
        assert review_queue.count(conn, queue_filter) == len(expected)


def test_filter_from_form_values_names_the_bad_field() -> None:
    parsed = review_queue.filter_from({"status": "all", "max_confidence": "0.4", "label": " "})
    assert parsed == QueueFilter(status=None, max_confidence=0.4)
    assert parsed.describe() == "max_confidence=0.4"
    with pytest.raises(ValueError, match="max_confidence must be a number, got 'low'"):
        review_queue.filter_from({"max_confidence": "low"})
    with pytest.raises(ValueError, match="reason must be one of"):
        review_queue.filter_from({"reason": "whatever"})


def qe(store: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    env = {"QE_DATA_DIR": store.data_dir, "QE_REVIEWER": "cli"}
    return run_qe("review", *args, env=env, code=None)


def test_cli_list_totals_and_formats(store: Settings) -> None:
    table = qe(store, "list", "--limit", "2")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split()[:3] == ["sample_id", "priority", "reason"]
    assert [line.split()[0] for line in lines[1:3]] == ["d", "a"]
    assert lines[-1].startswith("2 of 5 (status=pending)")
    assert not any(dtype in table.stdout for dtype in ("str", "f64", "---"))  # no Polars dtypes
    csv = qe(store, "list", "--format", "csv", "--label", "factuality_error").stdout
    assert csv.splitlines()[0].startswith("sample_id,priority,reason,status,label")
    assert [line.split(",")[0] for line in csv.splitlines()[1:]] == ["a", "e"]
    rows = [json.loads(x) for x in qe(store, "list", "--format", "json").stdout.splitlines()]
    assert [r["sample_id"] for r in rows] == ORDER and rows[2]["judge"] == "5->5.2"
    page = qe(store, "list", "--limit", "2", "--offset", "2").stdout
    assert page.splitlines()[-1].startswith("3-4 of 5")


def test_cli_all_matching_asks_for_the_count(store: Settings) -> None:
    asked = qe(store, "reject", "--all-matching", "--label", "factuality_error", "--note", "x")
    assert asked.returncode == 2
    assert asked.stderr.strip() == (
        "qe: would reject 2 pending samples (status=pending, label=factuality_error): "
        "add --yes to confirm"
    )
    mixed = qe(store, "reject", "a", "--label", "factuality_error")
    assert mixed.returncode == 2 and "not both" in mixed.stderr
    assert mixed.stderr.startswith("usage: qe review reject")
    bare = qe(store, "accept", "--max-confidence", "0.2")
    assert bare.returncode == 2 and "only with --all-matching" in bare.stderr
    with connect(store.database, read_only=True) as conn:
        assert review_queue.count(conn, QueueFilter()) == 5  # nothing decided so far
    done = qe(
        store, "reject", "--all-matching", "--label", "factuality_error", "--yes", "--note", "x"
    )
    assert done.returncode == 0 and "rejected 2 sample(s) as cli" in done.stdout
    none = qe(store, "accept", "--all-matching", "--label", "factuality_error", "--yes")
    assert none.returncode == 1 and "no pending sample matches" in none.stderr
    with connect(store.database, read_only=True) as conn:
        decided = conn.execute(
            "SELECT sample_id, status, reviewer, note FROM review_queue WHERE status <> 'pending' "
            "ORDER BY 1"
        ).fetchall()
    assert decided == [("a", "rejected", "cli", "x"), ("e", "rejected", "cli", "x")]


def test_cli_all_matching_skips_what_another_reviewer_decided(store: Settings) -> None:
    """Another reviewer rejects a sample while `--all-matching` waits at its y/N prompt: the
    bulk accept leaves that decision alone and says it skipped one."""
    import pty

    from qe_assets.review import decisions as review
    from qe_assets.store import writer_connection

    env = {k: v for k, v in os.environ.items() if not k.startswith("QE_")}
    env.update(QE_DATA_DIR=store.data_dir, QE_REVIEWER="cli")
    leader, follower = pty.openpty()  # a terminal, so qe asks y/N
    process = subprocess.Popen(
        [sys.executable, "-m", "qe_assets.cli", "review", "accept", "--all-matching"],
        env=env,
        stdin=follower,
        stdout=follower,
        stderr=follower,  # where Python writes input()'s prompt at a terminal
    )
    os.close(follower)
    try:
        asked = b""
        while b"[y/N]" not in asked:
            assert select.select([leader], [], [], 30)[0], f"qe did not ask: {asked!r}"
            chunk = os.read(leader, 1024)
            assert chunk, "qe exited before asking"
            asked += chunk
        assert b"Accept 5 pending samples" in asked
        with writer_connection(store.database) as conn:
            review.reject(conn, "a", "bo", "no")
        os.write(leader, b"y\n")
        process.wait(timeout=60)
        out = asked.decode()
        with contextlib.suppress(OSError):  # EIO once qe has exited and the terminal is gone
            while chunk := os.read(leader, 1024):
                out += chunk.decode()
    finally:
        if process.poll() is None:
            process.kill()
        os.close(leader)
    assert process.returncode == 0, out
    assert out.replace("\r", "").strip().splitlines()[-1] == (
        "accepted 4 sample(s) as cli; 1 skipped: decided by someone else meanwhile, "
        "their decision stands"
    )
    with connect(store.database, read_only=True) as conn:
        rows = dict(
            conn.execute("SELECT sample_id, status || ' ' || reviewer FROM review_queue").fetchall()
        )
        kept = conn.execute("SELECT status FROM completions WHERE sample_id = 'a'").fetchall()
    assert rows == {"a": "rejected bo", **{s: "accepted cli" for s in "bcde"}}
    assert kept == [("rejected",)]


def test_out_of_range_ages_and_pages_are_refused_or_capped(store: Settings) -> None:
    """An age DuckDB cannot turn into an interval is a 400 naming the field (it was a CAST
    overflow, a 500); a page or position past any queue is an empty page, not an OFFSET
    overflow."""
    from qe_assets.web.app import create_app
    from qe_assets_tests.review_server import Client, in_thread

    with in_thread(create_app(store)) as url:
        client = Client(url)
        for query in ("min_age_hours=1e12", "max_age_hours=1e7", "min_age_hours=-1"):
            field, value = query.split("=")
            status, page = client.request(f"/review?{query}")
            assert status == 400, query
            assert f"{field} must be from 0 to 1e+06 hours, got {float(value)!r}" in page
        assert client.request("/review/item?pos=0&min_age_hours=1e12")[0] == 400
        assert client.request("/review?min_age_hours=1e6")[0] == 200  # the bound itself
        huge = "9" * 30
        status, page = client.request(f"/review?page={huge}")
        assert status == 200 and "Review queue" in page
        status, page = client.request(f"/review/item?pos={huge}")
        assert status == 200
    listed = qe(store, "list", "--offset", huge)
    assert listed.returncode == 0 and "Traceback" not in listed.stderr
    assert listed.stdout.strip().splitlines()[-1].startswith("0-")


def test_judge_check_is_a_reason_everywhere(store: Settings) -> None:
    """`judge_check` (the judge's approvals held for a person) filters like the other reasons:
    in the queue, on the page (its dropdown offers it) and in `qe review`."""
    from qe_assets.review.calibration import JUDGE_CHECK
    from qe_assets.web.app import create_app
    from qe_assets_tests.review_server import Client, in_thread

    with connect(store.database) as conn:
        conn.execute("UPDATE review_queue SET reason = ? WHERE sample_id = 'c'", [JUDGE_CHECK])
    assert review_queue.filter_from({"reason": JUDGE_CHECK}).reason == JUDGE_CHECK
    with in_thread(create_app(store)) as url:
        status, page = Client(url).request(f"/review?reason={JUDGE_CHECK}")
    assert status == 200
    assert f'<option value="{JUDGE_CHECK}" selected>' in page.replace("  ", " ")
    assert page.count("Question ") == 1 and "Question c?" in page
    listed = qe(store, "list", "--reason", JUDGE_CHECK, "--format", "json")
    assert listed.returncode == 0, listed.stderr
    assert [json.loads(x)["sample_id"] for x in listed.stdout.splitlines()] == ["c"]


def test_accepting_a_judge_rejected_sample_is_no_verdict_on_the_judge(store: Settings) -> None:
    """Accepting a sample whose LLM completion the judge rejected keeps the naive text, not the
    judged one: the row loses its judge columns and judge calibration does not count it as
    "judge said no, person said yes"; the page says what accept keeps. An accepted proposal
    the judge scored stays a measurement."""
    from qe_assets.review import decisions as review
    from qe_assets.review.calibration import judge_agreement
    from qe_assets.store import writer_connection
    from qe_assets.web.app import create_app
    from qe_assets_tests.review_server import Client, in_thread

    with connect(store.database) as conn:
        conn.execute(
            """
            INSERT INTO completions (sample_id, completion, mode, status, model, attempts,
                created_at, updated_at, seq, judge_model, judge_original_score,
                judge_completion_score, judge_verdict)
            VALUES ('a', 'A rewrite the judge disliked.', 'llm', 'rejected_by_judge', 'm', 1,
                    now()::TIMESTAMP, now()::TIMESTAMP, nextval('completions_seq'), 'j', 6, 4,
                    '{"original": 6, "completion": 4}')
            """
        )
    with in_thread(create_app(store)) as url:
        status, page = Client(url).request("/review/item?pos=1")  # "a" ranks second
    assert status == 200 and "A rewrite the judge disliked." in page
    assert "accept exports the naive one" in page
    with writer_connection(store.database) as conn:
        review.accept(conn, ["a", "e"], "ann")  # "e": a proposal the judge scored 1 -> 9
        rows = conn.execute(
            "SELECT sample_id, mode, status, completion, judge_model, judge_original_score, "
            "judge_completion_score, judge_verdict FROM completions ORDER BY 1"
        ).fetchall()
        calibration = judge_agreement(conn, margin=1.0, window=100)
    by_id = {row[0]: row[1:] for row in rows}
    mode, status, text, *judge = by_id["a"]
    assert (mode, status, judge) == ("naive", "ok", [None, None, None, None])
    assert text.endswith("The old answer.") and text != "The old answer."
    assert by_id["e"][:2] == ("llm", "ok") and by_id["e"][3:6] == ("j", 1.0, 9.0)
    assert calibration.overall.decisions == 1 and calibration.overall.both_ok == 1
    assert calibration.overall.human_only == 0
    # A row accepted that way before its judge columns were cleared is not counted either.
    with writer_connection(store.database) as conn:
        conn.execute(
            "UPDATE completions SET judge_model = 'j', judge_original_score = 6, "
            "judge_completion_score = 4 WHERE sample_id = 'a'"
        )
        assert judge_agreement(conn, margin=1.0, window=100).overall.decisions == 1
