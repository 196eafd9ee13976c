"""The Dagster UI in a real browser: `dagster dev` against a temp DAGSTER_HOME, Debian's
/usr/bin/chromium driven by Playwright (no browser download).

Shows the whole asset graph, launches both jobs with clicks (qe_pipeline ingests the demo events
waiting in the inbox; qe_release cuts v001 and runs the dataset checks) and reads the checks'
results on the tuning_dataset asset page. Screenshots land in the test's tmp_path.

`make test` installs chromium; without it the test skips locally and fails under CI.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import pytest

from qe_assets.ops.demo import generate_events, write_jsonl
from qe_assets.ops.runner import prepare_dagster_home
from qe_assets.settings import Settings
from qe_assets.testing.browser import CHROMIUM, CHROMIUM_ARGS
from qe_assets_tests.conftest import free_port
from qe_assets_tests.dagster_dev import DagsterDev

if TYPE_CHECKING:  # imported in the test, so a missing package skips (or fails under CI)
    from playwright.sync_api import Page

pytestmark = [pytest.mark.browser, pytest.mark.timeout(420)]

ASSETS = (
    "raw_events",
    "annotated_samples",
    "completions",
    "tuning_dataset",
    "fine_tuned_model",
    "model_evaluation",
    "ab_test",
)
# The README's picture of the graph, rewritten from this test with QE_DOCS_SCREENSHOTS=1.
DOCS_SHOT = Path(__file__).resolve().parents[1] / "docs" / "img" / "asset-graph.png"
# The code location's name in the UI's URLs (/locations/<name>/...), set in workspace.yaml.
LOCATION = "qe_assets"
CHECKS = (
    "dataset_format_valid",
    "preference_format_valid",
    "dataset_no_leakage",
    "label_distribution",
    "label_drift",
)
DEMO_EVENTS = 300
RUN_TIMEOUT = 150.0  # seconds per run; both jobs run in process and take a few seconds here
UI_TIMEOUT_MS = 30_000


def _unavailable(reason: str) -> NoReturn:
    """Skip on a developer machine; under CI (`make test` installs everything) fail instead."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set: `make test` must have installed it)")
    pytest.skip(reason)


@pytest.fixture
def browser_available() -> None:
    """Checked before dagster dev starts, so a skip costs nothing."""
    if not CHROMIUM.exists():
        _unavailable(f"{CHROMIUM} is missing (Debian package `chromium`)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        _unavailable("the playwright Python package is missing (pip install -e '.[test]')")


@pytest.fixture
def dagster_dev(
    browser_available: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[DagsterDev]:
    data_dir = tmp_path / "data"
    write_jsonl(data_dir / "inbox" / "demo.jsonl", generate_events(DEMO_EVENTS, seed=11))
    home = tmp_path / "dagster_home"
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    # dagster.yaml as `make ui` writes it: one writer-pool slot, no telemetry.
    prepare_dagster_home(Settings(data_dir=str(data_dir)))
    # A developer's QE_QUEUE_URL or OPENAI_API_KEY must not reach this server.
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("QE_", "OPENAI_", "DAGSTER_"))
    }
    # The test clicks the jobs itself: the sensors that would run them hands-free stay off.
    env.update(
        QE_DATA_DIR=str(data_dir),
        QE_FINETUNE_THRESHOLD="20",
        QE_QUEUE_SENSOR_RUNNING="false",
        QE_FINETUNE_SENSOR_RUNNING="false",
    )
    server = DagsterDev(home, env, tmp_path / "dagster_dev.log")
    try:
        server.start(timeout=90)
        yield server
    finally:
        server.stop()
        print(f"\ndagster dev log: {server.log_path}")


def _dismiss_community_dialog(page: Page) -> None:
    """A fresh instance greets its first visitor with a newsletter dialog, shortly after the
    first page loads; the instance remembers the "Skip". Waiting for it here keeps it from
    popping up in the middle of a later click (the locator handler covers any other time)."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    dialog = page.get_by_text("Join the Dagster community")
    try:
        dialog.wait_for(timeout=15_000)
    except PlaywrightTimeout:
        return
    # The locator handler may see the dialog first and click "Skip" itself.
    with contextlib.suppress(PlaywrightTimeout):
        page.get_by_role("button", name="Skip").click(timeout=5_000)
    dialog.wait_for(state="hidden")


def _expand_all_groups(page: Page) -> None:
    """Graph settings (gear) → "Expand all groups", so every asset node is drawn."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    # The navigation has a settings button too: wait until the graph's controls are drawn, so
    # the last settings button on the page is the graph's.
    page.locator("button:has([aria-label='zoom_in'])").wait_for()
    for _ in range(3):
        page.locator("button:has([aria-label='settings'])").last.click()
        item = page.get_by_role("menuitem", name=re.compile("(Expand|Collapse) all groups"))
        try:
            if "Expand" in item.inner_text(timeout=5_000):
                item.click(timeout=5_000)
        except PlaywrightTimeout:
            continue  # the menu closed under us (a dialog came up): open it again
        finally:
            page.keyboard.press("Escape")
            item.wait_for(state="hidden")  # the menu fades out; keep it out of screenshots
        if page.get_by_text(ASSETS[0], exact=True).is_visible():
            return
    raise AssertionError("could not expand the asset groups of the lineage graph")


def _launch_job(page: Page, server: DagsterDev, job: str, shot: Path) -> dict[str, Any]:
    """Open the job's page and click "Materialize all"; wait (GraphQL) for the run the toast
    announced to finish, then open its run page and screenshot it."""
    from playwright.sync_api import expect

    known = {run["runId"] for run in server.runs()}
    page.goto(f"{server.url}/jobs")
    page.get_by_role("link", name=job).first.click()
    expect(page.get_by_role("heading", name=re.compile(job))).to_be_visible()
    page.get_by_role("button", name="Materialize all").click()
    toast = page.get_by_text(re.compile(r"Launched run [0-9a-f]{8}"))
    expect(toast).to_be_visible()
    announced = re.search(r"[0-9a-f]{8}", toast.inner_text())
    assert announced is not None
    run = server.wait_for_run(job, known, timeout=RUN_TIMEOUT)
    assert run["runId"].startswith(announced.group(0)), (run, announced.group(0))
    assert run["status"] == "SUCCESS", f"{job} run {run['runId']}: {run['status']}"
    page.goto(f"{server.url}/runs/{run['runId']}")
    expect(page.get_by_text("Success", exact=True).first).to_be_visible()
    # The step list and the event log load after the header.
    expect(page.get_by_text(re.compile(r"^Succeeded \([1-9]\d*\)$"))).to_be_visible()
    expect(page.get_by_text("RUN_SUCCESS", exact=True)).to_be_visible()
    page.screenshot(path=shot)
    return run


def test_ui_graph_launch_and_checks(dagster_dev: DagsterDev, tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    server = dagster_dev
    shots = {
        name: tmp_path / f"{name}.png"
        for name in ("graph", "graph_fit", "pipeline_run", "release_run", "checks", "graph_after")
    }

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        page = browser.new_page(viewport={"width": 1920, "height": 1080})
        try:
            page.set_default_timeout(UI_TIMEOUT_MS)
            expect.set_options(timeout=UI_TIMEOUT_MS)
            # A fresh instance greets the first visit with a newsletter dialog; dismiss it
            # whenever it shows up in front of an action.
            page.add_locator_handler(
                page.get_by_text("Join the Dagster community"),
                lambda: page.get_by_role("button", name="Skip").click(),
            )

            # 1. The asset graph: every group expanded, every asset shown.
            page.goto(f"{server.url}/asset-groups")
            expect(page.get_by_text("Global asset lineage")).to_be_visible()
            _dismiss_community_dialog(page)
            page.get_by_role("button", name="Hide navigation").click()
            page.locator("button:has([aria-label='panel_show_right'])").click()
            _expand_all_groups(page)
            for asset in ASSETS:
                expect(page.get_by_text(asset, exact=True)).to_be_visible()
            page.screenshot(path=shots["graph"])

            # Loaded again, the expanded graph is fitted to the window: the README's picture.
            page.reload()
            for asset in ASSETS:
                expect(page.get_by_text(asset, exact=True)).to_be_visible()
            page.screenshot(path=shots["graph_fit"])

            # The location's URLs resolve under its short name (workspace.yaml).
            names = [e["name"] for e in server.location_entries()]
            assert names == [LOCATION], names
            page.goto(f"{server.url}/locations/{LOCATION}/asset-groups/pipeline")
            expect(page.get_by_text("raw_events", exact=True).first).to_be_visible()

            # 2. Launch the pipeline from the UI: ingests the inbox, annotates, completes.
            _launch_job(page, server, "qe_pipeline", shots["pipeline_run"])

            # 3. Launch the release: cuts v001 and runs the dataset checks.
            _launch_job(page, server, "qe_release", shots["release_run"])

            # 4. The checks' results on the asset page.
            page.goto(f"{server.url}/assets/tuning_dataset")
            page.get_by_role("tab", name=re.compile("^Checks")).click()
            expect(page.get_by_text(f"Checks ({len(CHECKS)})")).to_be_visible()
            for check in CHECKS:
                # A row of the checks list: the status icon, the name, its latest status.
                row = page.locator("div").filter(has_text=re.compile(rf"^(?:{check})+Succeeded$"))
                expect(row.first).to_be_visible()
            expect(page.get_by_text("Passed", exact=True).first).to_be_visible()
            page.screenshot(path=shots["checks"])

            # 5. The graph again: everything materialized, every check passed.
            page.goto(f"{server.url}/asset-groups")
            page.locator("button:has([aria-label='panel_show_right'])").click()
            _expand_all_groups(page)
            expect(page.get_by_text(f"{len(CHECKS)} / {len(CHECKS)} Passed")).to_be_visible()
            page.screenshot(path=shots["graph_after"])
        except Exception:
            failure = tmp_path / "failure.png"
            page.screenshot(path=failure)
            print(f"\nscreenshot at the failure: {failure}")
            raise
        finally:
            browser.close()

    for name, path in shots.items():
        assert path.stat().st_size > 10_000, path
        print(f"screenshot {name}: {path}")
    if os.environ.get("QE_DOCS_SCREENSHOTS"):
        shutil.copyfile(shots["graph_fit"], DOCS_SHOT)


def test_qe_ui_serves_without_the_venv_on_path(tmp_path: Path) -> None:
    """`make ui` on a fresh clone: `qe ui` by absolute path, PATH without the venv, started
    outside the project directory. It runs the dagster of its own environment."""
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "QE_DATA_DIR": str(tmp_path / "data"),
    }
    if os.environ.get("PYTHONPATH"):  # a worktree tested against the shared venv
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    dev = DagsterDev(tmp_path / "dagster_home", env, tmp_path / "qe-ui.log")
    qe = Path(sys.executable).with_name("qe")
    review_port = free_port()
    command = [str(qe), "ui", "--host", "127.0.0.1", "--port", str(dev.port)]
    try:
        dev.start(command=[*command, "--review-port", str(review_port)], cwd=tmp_path)
        assert "DAGSTER_HOME=" in dev.log_tail() and f"127.0.0.1:{dev.port}" in dev.log_tail()
        # The review page of `qe serve` runs beside it (no database yet: it says so).
        assert review_page_status(review_port) == 404
        assert (tmp_path / "dagster_home" / "dagster.yaml").exists()
        assert dev.process is not None
        # Dagster (and so the dashboards links in the assets' metadata) gets the review port
        # asked for, not the default 8787.
        started = _descendants(dev.process.pid)
        served_at = {_environ(pid).get("QE_SERVE_URL") for pid in _dagster_pids(started)}
        assert served_at == {f"http://127.0.0.1:{review_port}"}, served_at
    finally:
        dev.stop()
    # Stopped cleanly: nothing it started (webserver, daemon, code server, review page) lives on.
    deadline = time.monotonic() + 10
    while (left := [p for p in started if _alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"left running: {left}"


def review_page_status(port: int) -> int:
    """The review page's HTTP status (waiting up to 10 s for it to listen); a 404 must be the
    page saying that there is no database yet."""
    deadline = time.monotonic() + 10
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/review", timeout=10) as page:
                return int(page.status)
        except urllib.error.HTTPError as exc:
            assert exc.code != 404 or "no database" in exc.read().decode()
            return exc.code
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _descendants(root: int) -> list[int]:
    """Every live process below `root`, whatever process group or session it leads (`qe ui`
    starts each child in a session of its own, so that stopping it reaches its whole tree)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue  # gone meanwhile
        fields = text.rsplit(")", 1)[1].split()
        if fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _dagster_pids(pids: list[int]) -> list[int]:
    """The dagster processes (webserver, daemon, code server) among `pids`."""
    found = []
    for pid in pids:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"dagster" in cmdline:
            found.append(pid)
    assert found, "no dagster process below qe ui"
    return found


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {k.decode(): v.decode(errors="replace") for k, v in pairs}
