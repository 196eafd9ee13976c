"""The review page at scale: `python -m qe_assets_bench.review_page`.

1. Page load with a large queue: a store with `--pending` (100k) samples waiting for review, as
   many train samples already annotated (their questions count for recurrence), a third of the
   review samples with a judged LLM proposal. A real `qe serve` process; each page is fetched
   over HTTP (urllib) `--repeat` times after one warm-up, and the median is reported. Target:
   the queue page under 1 s. Exits 1 when missed.
2. A reviewer clearing 100 samples by keyboard in Chromium (Playwright, /usr/bin/chromium):
   a accept for most, r + a note + Enter for every fifth. Reported, not a target (skipped when
   Chromium or Playwright is missing).

The store is written with DuckDB's own SQL (generate_series), not through the pipeline: what is
measured is the page, and 200k samples through the graph would take minutes to set up.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from qe_assets.settings import Settings
from qe_assets.store import connect, ensure_schema
from qe_assets.testing.review_server import serving

TARGET_SECONDS = 1.0
BULK = 2_000
LABELS = ["factuality_error", "incomplete_answer", "low_relevance", "overconfidence"]
DOC = "Refunds are accepted within 30 days of delivery when the item is unused. " * 6


def fill_store(settings: Settings, pending: int, trained: int, questions: int) -> None:
    """`pending` review samples (queued over the last 10 days) and `trained` train samples."""
    labels = "['" + "','".join(LABELS) + "']"
    with connect(settings.database) as conn:
        ensure_schema(conn)
        conn.execute(
            f"""
            INSERT INTO annotated_samples (sample_id, request_id, event_seq, label, labels,
                language, question, original_answer, context_docs, instruction, prompt, score,
                confidence, route, question_key, dedup_key, annotated_at, seq)
            SELECT 'req-' || i || '#' || {labels}[1 + i % 4], 'req-' || i, i,
                   {labels}[1 + i % 4], [{labels}[1 + i % 4]],
                   CASE WHEN i % 3 = 0 THEN 'zh' ELSE 'en' END,
                   'How do I get a refund for order ' || (i % $questions) || '?',
                   'You have 14 days to ask for a refund, order ' || i || '.',
                   [{{'id': 'kb-1', 'content': $doc, 'score': 0.9, 'meta': NULL}},
                    {{'id': 'kb-2', 'content': $doc, 'score': 0.5, 'meta': NULL}}],
                   'Correct the answer.', 'Documents: ' || $doc || ' Question ' || i,
                   0.3, CASE WHEN i < $pending THEN 0.05 + (hash(i) % 500) / 1000.0
                             ELSE 0.6 + (hash(i) % 400) / 1000.0 END,
                   CASE WHEN i < $pending THEN 'review' ELSE 'train' END,
                   md5('q' || (i % $questions)), md5('d' || i),
                   now()::TIMESTAMP - to_minutes(CAST(i % 14400 AS BIGINT)), i + 1
            FROM generate_series(0, $total - 1) AS t(i)
            """,
            {"pending": pending, "total": pending + trained, "questions": questions, "doc": DOC},
        )
        conn.execute(
            """
            INSERT INTO review_queue (sample_id, reason, status, queued_at)
            SELECT sample_id, 'low_confidence', 'pending', annotated_at
            FROM annotated_samples WHERE route = 'review'
            """
        )
        conn.execute(
            """
            INSERT INTO completions (sample_id, completion, mode, status, model, attempts,
                created_at, updated_at, seq, judge_model, judge_original_score,
                judge_completion_score)
            SELECT sample_id, 'A proposed answer that cites the documents.', 'llm', 'proposed',
                   'bench-model', 1, now()::TIMESTAMP, now()::TIMESTAMP, seq, 'bench-judge',
                   1 + hash(seq) % 9, 1 + hash(seq + 1) % 9
            FROM annotated_samples WHERE route = 'review' AND seq % 3 = 0
            """
        )


def timed_get(url: str, repeat: int) -> float:
    """Median seconds of `repeat` GETs after one warm-up."""
    urllib.request.urlopen(url, timeout=60).read()
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        with urllib.request.urlopen(url, timeout=60) as response:
            response.read()
            assert response.status == 200
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def page_loads(workdir: Path, pending: int, repeat: int) -> bool:
    settings = Settings(data_dir=str(workdir / "large"))
    started = time.monotonic()
    fill_store(settings, pending, trained=pending, questions=max(10, pending // 20))
    print(
        f"store: {pending:,} pending + {pending:,} train samples, "
        f"{settings.database.stat().st_size / 1e6:.0f} MB, built in "
        f"{time.monotonic() - started:.1f}s"
    )
    pages = {
        "queue page 1": "/review",
        "queue filtered (label, confidence, judge)": (
            "/review?label=factuality_error&max_confidence=0.3&min_judge_score=3"
        ),
        "queue page 40": "/review?page=40",
        "one sample": "/review/item?pos=0",
    }
    ok = True
    with serving(settings, workdir) as server:
        for name, path in pages.items():
            seconds = timed_get(server.url + path, repeat)
            flag = ""
            if name == "queue page 1":
                ok = seconds < TARGET_SECONDS
                flag = f"  (target < {TARGET_SECONDS:.0f} s: {'met' if ok else 'MISSED'})"
            print(f"  {name:<44} median {seconds * 1000:7.1f} ms{flag}")
    bulk_decision(settings, BULK)
    return ok


def bulk_decision(settings: Settings, count: int) -> None:
    """How long a bulk reject holds the writer lock (a run waits that long at most)."""
    from qe_assets.review import decisions as review
    from qe_assets.review import queue as review_queue
    from qe_assets.store import writer_connection

    with connect(settings.database, read_only=True) as conn:
        ids = review_queue.matching_ids(conn, review_queue.QueueFilter())[:count]
    started = time.perf_counter()
    with writer_connection(settings.database) as conn:
        review.reject(conn, ids, "bench", "bulk")
    elapsed = time.perf_counter() - started
    print(f"  bulk reject of {len(ids):,} samples: writer lock held {elapsed * 1000:.0f} ms")


def clear_by_keyboard(workdir: Path, count: int, screenshots: Path | None = None) -> None:
    from qe_assets.testing.browser import CHROMIUM, CHROMIUM_ARGS

    try:
        from playwright.sync_api import expect, sync_playwright
    except ImportError:
        print("keyboard: skipped (playwright is not installed)")
        return
    if not CHROMIUM.exists():
        print(f"keyboard: skipped ({CHROMIUM} is missing)")
        return
    settings = Settings(data_dir=str(workdir / "small"))
    fill_store(settings, count, trained=0, questions=count)
    with serving(settings, workdir) as server, sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        page = browser.new_page(viewport={"width": 1440, "height": 900})
        expect.set_options(timeout=15_000)
        if screenshots is not None:  # the pictures of docs/review.md
            screenshots.mkdir(parents=True, exist_ok=True)
            page.goto(f"{server.url}/review?reviewer=ann")
            page.screenshot(path=screenshots / "review-queue.png")
            page.goto(f"{server.url}/review/item?pos=0&min_judge_score=1")
            page.screenshot(path=screenshots / "review.png")
        page.goto(f"{server.url}/review/item?pos=0&reviewer=bench")
        started = time.monotonic()
        for i in range(count):
            page.locator("body[data-keys=ready]").wait_for()
            sample = page.locator("#sample-id").inner_text()
            if i % 5 == 4:
                page.keyboard.press("r")
                page.keyboard.type("not grounded")
                page.keyboard.press("Enter")
            else:
                page.keyboard.press("a")
            expect(page.locator(".done")).to_contain_text(sample)
        elapsed = time.monotonic() - started
        expect(page.get_by_text("Nothing left to review here")).to_be_visible()
        browser.close()
    with connect(settings.database, read_only=True) as conn:
        ((left,),) = conn.execute(
            "SELECT count(*) FROM review_queue WHERE status = 'pending'"
        ).fetchall()
    assert left == 0, f"{left} samples still pending"
    print(
        f"keyboard: a reviewer cleared {count} samples in {elapsed:.1f}s "
        f"({elapsed / count * 1000:.0f} ms per decision, page round trip included)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pending", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--keyboard", type=int, default=100, help="0 skips the browser part")
    parser.add_argument(
        "--screenshots", type=Path, help="save the queue and a sample view here (docs/img)"
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="qe-bench-review-") as tmp:
        workdir = Path(tmp)
        print(f"review page, {args.pending:,} pending samples:")
        ok = page_loads(workdir, args.pending, args.repeat)
        if args.keyboard:
            clear_by_keyboard(workdir, args.keyboard, args.screenshots)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
