"""The review page in a real browser: `qe serve` on a free loopback port, Debian's
/usr/bin/chromium driven by Playwright (as test_ui_browser.py), the real DuckDB file.

A reviewer sets their name, decides ten samples by keyboard (accepts, and rejects with a note),
edits one, and bulk-rejects a filter after a confirmation that states the count; the DuckDB rows
then show exactly those decisions, each with reviewer and note. With QE_DOCS_SCREENSHOTS=1 the
sample view is also saved as docs/img/review.png.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from qe_assets.settings import Settings
from qe_assets.store import connect
from qe_assets.testing.factories import line, make_event
from qe_assets_tests.review_server import review_store, serving
from qe_assets_tests.test_ui_browser import CHROMIUM, CHROMIUM_ARGS, browser_available

if TYPE_CHECKING:
    from playwright.sync_api import Page

pytestmark = [pytest.mark.browser, pytest.mark.timeout(300)]
__all__ = ["browser_available"]  # the fixture, imported for its use below
DOCS_SHOT = Path(__file__).resolve().parents[1] / "docs" / "img" / "review.png"
EDITED = "A careful answer written by a person."


def decide_by_keyboard(page: Page, key: str, note: str | None = None) -> str:
    """Decide the sample on screen with `key` (and a note); returns its id once the next
    sample's page has loaded."""
    from playwright.sync_api import expect

    page.locator("body[data-keys=ready]").wait_for()
    sample = page.locator("#sample-id").inner_text()
    page.keyboard.press(key)
    if note is not None:
        page.keyboard.type(note)
        page.keyboard.press("Enter")
    expect(page.locator(".done")).to_contain_text(sample)
    return sample


def rows(settings: Settings) -> dict[str, tuple]:
    with connect(settings.database, read_only=True) as conn:
        found = conn.execute(
            """
            SELECT q.sample_id, q.status, q.reviewer, q.note, c.mode, c.status, c.completion,
                   q.reviewed_at IS NOT NULL
            FROM review_queue q LEFT JOIN completions c USING (sample_id)
            WHERE q.status <> 'pending'
            """
        ).fetchall()
    return {r[0]: r[1:] for r in found}


def pending_with_label(settings: Settings, label: str) -> list[str]:
    with connect(settings.database, read_only=True) as conn:
        found = conn.execute(
            "SELECT sample_id FROM review_queue JOIN annotated_samples USING (sample_id) "
            "WHERE status = 'pending' AND label = ?",
            [label],
        ).fetchall()
    return sorted(r[0] for r in found)


def test_review_by_keyboard_edit_and_bulk_reject(
    browser_available: None, settings: Settings, tmp_path: Path
) -> None:
    from playwright.sync_api import expect, sync_playwright

    store = review_store(settings, low=24)
    with serving(store, tmp_path) as server, sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        page = browser.new_page(viewport={"width": 1440, "height": 900})
        page.set_default_timeout(15_000)
        expect.set_options(timeout=15_000)
        try:
            # The reviewer's name, kept in a cookie.
            page.goto(f"{server.url}/review")
            page.get_by_label("Reviewer").fill("ann")
            page.get_by_role("button", name="Set").click()
            expect(page.locator("#total")).to_contain_text("24 pending in all")
            # Open the first sample with the keyboard; j/k move and come back.
            page.keyboard.press("j")
            page.keyboard.press("k")
            page.keyboard.press("Enter")
            first = page.locator("#sample-id").inner_text()
            page.keyboard.press("j")
            expect(page.locator("#sample-id")).not_to_have_text(first)
            page.keyboard.press("k")
            expect(page.locator("#sample-id")).to_have_text(first)
            if os.environ.get("QE_DOCS_SCREENSHOTS"):
                page.screenshot(path=tmp_path / "review.png")
            # Ten decisions by keyboard: every third a reject with a note.
            decided: dict[str, tuple[str, str | None]] = {}
            started = time.monotonic()
            for i in range(10):
                if i % 3 == 2:
                    note = f"wrong fact {i}"
                    decided[decide_by_keyboard(page, "r", note)] = ("rejected", note)
                else:
                    decided[decide_by_keyboard(page, "a")] = ("accepted", None)
            print(f"\n10 samples decided by keyboard in {time.monotonic() - started:.2f}s")
            # An edit: e, select the proposal, type, Ctrl+Enter.
            edited = page.locator("#sample-id").inner_text()
            page.keyboard.press("e")
            page.keyboard.press("Control+A")
            page.keyboard.type(EDITED)
            page.keyboard.press("Control+Enter")
            expect(page.locator(".done")).to_contain_text(f"edited {edited}")
            # A bulk reject by filter, confirmed with its count.
            bulk = pending_with_label(store, "low_relevance")
            assert bulk
            page.goto(f"{server.url}/review")
            page.locator("#filters select[name=label]").select_option("low_relevance")
            page.get_by_role("button", name="Filter").click()
            expect(page.locator("#total")).to_contain_text(f"of {len(bulk)} matching")
            page.locator("#bulk select[name=bulk_action]").select_option("reject")
            page.locator("#bulk input[name=note]").fill("off topic, all of them")
            page.locator("#bulk-submit").click()
            expect(page.locator("#count")).to_have_text(
                re.compile(rf"^Reject {len(bulk)} pending samples matching .*label=low_relevance")
            )
            page.locator("#confirm-button").click()
            expect(page.locator(".done")).to_contain_text(f"rejected {len(bulk)} samples")
            expect(page.locator("#progress tr.me")).to_contain_text("ann")
        except Exception:
            page.screenshot(path=tmp_path / "failure.png")
            print(f"\nscreenshot at the failure: {tmp_path / 'failure.png'}")
            raise
        finally:
            browser.close()
    if os.environ.get("QE_DOCS_SCREENSHOTS"):
        DOCS_SHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tmp_path / "review.png", DOCS_SHOT)

    stored = rows(store)
    expected = {
        **{sid: (status, "ann", note) for sid, (status, note) in decided.items()},
        edited: ("edited", "ann", None),
        **{sid: ("rejected", "ann", "off topic, all of them") for sid in bulk},
    }
    assert {sid: row[:3] for sid, row in stored.items()} == expected
    assert all(row[6] for row in stored.values())  # every decision has its time
    for sid, (status, _, _) in expected.items():
        mode, completion_status, completion = stored[sid][3:6]
        if status == "accepted":
            assert (mode, completion_status) == ("naive", "ok") and completion
        elif status == "edited":
            assert (mode, completion_status, completion) == ("human", "ok", EDITED)
        else:
            assert completion_status == "rejected"


def test_chinese_text_renders_with_a_cjk_font(
    browser_available: None, settings: Settings, tmp_path: Path
) -> None:
    # Half the demo is Chinese. Without a CJK font Chromium draws every Han character as the
    # same empty box, so two different characters give the same pixels; with one they differ.
    # `make system-deps` installs fonts-noto-cjk.
    from playwright.sync_api import expect, sync_playwright

    event = make_event(
        "zh-1",
        question="退货政策是什么？",
        answer="可以在三十天内退货。",
        evaluation={"score": 0.2, "labels": ["事实性错误"]},
    )
    store = review_store(settings, low=0, train=0, extra=[line(event).decode()])
    with serving(store, tmp_path) as server, sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        try:
            page = browser.new_page(bypass_csp=True)
            page.goto(f"{server.url}/review/item?pos=0")
            question = page.locator("p.question")
            expect(question).to_have_text("退货政策是什么？")
            shots = []
            for character in ("中", "文"):
                question.evaluate("(element, text) => { element.textContent = text; }", character)
                shots.append(question.screenshot())
        finally:
            browser.close()
    assert len(set(shots)) == 2, "Han characters render as boxes: install fonts-noto-cjk"
