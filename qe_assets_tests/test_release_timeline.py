"""A release reads at a glance (issue #30): one timeline, told the same way by the asset pages,
`qe status` and the dashboards; every A/B decision with its threshold and distance; the
dashboards' windows, empty states and one-point charts; `ab_test` refreshed when the rollout
changes. Real DuckDB files, real Dagster runs, the real `qe` CLI, Chromium for the pages."""

from __future__ import annotations

import json
import os
import random
import re
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from qe_assets.ops.definitions import build_definitions, build_resources
from qe_assets.ops.runner import DAGSTER_YAML, run_pipeline
from qe_assets.rollout import timeline
from qe_assets.rollout.assets import quiet_checks
from qe_assets.rollout.registry import start_test
from qe_assets.rollout.sequential import Arms, Policy, decide, distance_to_decision
from qe_assets.service.capture import QualityCapture
from qe_assets.service.producers import write_atomically
from qe_assets.service.rollout import RolloutState, Router
from qe_assets.settings import Settings
from qe_assets.store import connect, ensure_schema
from qe_assets.testing.factories import line, make_event
from qe_assets.web.dashboards import Dashboards
from qe_assets.web.series import AB_LIMIT, read_series
from qe_assets_tests.openai_server import EvalModels, OpenAIServer
from qe_assets_tests.runs import checks, materialize, metadata, scalar
from qe_assets_tests.test_cli import qe
from qe_assets_tests.test_evaluation import BASE, RELEASE, eval_settings  # noqa: F401 (fixture)
from qe_assets_tests.test_finetune import processed
from qe_assets_tests.test_finetune_openai import openai_settings  # noqa: F401 (a fixture)
from qe_assets_tests.test_rollout import AB_RUN, serve

T0 = datetime(2026, 12, 7, 14, 0, 0)


# --- the distance to a decision ---------------------------------------------------------------


def test_a_canary_at_5_percent_needs_about_4000_requests_for_200_answers() -> None:
    """The README's sizing figure: at 5 %, QE_AB_MIN_ANSWERS=200 candidate answers take about
    4,000 requests; with answers in, the estimate follows today's rates."""
    empty = distance_to_decision(Arms(0, 0, 0, 0), 0.05, Policy())
    assert (empty.more_answers, empty.more_requests) == (200, 4000)
    assert empty.text() == (
        "Λ 1.0 of 20 needed; at least 200 more candidate answers at 5% (~4,000 requests) "
        "before any decision"
    )
    # The run: production 30 % low, candidate 20 %.
    halfway = Arms(1900, 570, 100, 20)
    distance = distance_to_decision(halfway, 0.05, Policy())
    assert distance.threshold == 20 and 0 < distance.more_answers < 400
    # The estimate is right at these rates: that many more answers decide.
    k = distance.more_answers
    later = Arms(1900 + 19 * k, 570 + round(19 * k * 0.3), 100 + k, 20 + round(k * 0.2))
    assert decide(later, 0.05, 0, Policy()).decision == "promote"
    assert (
        "no decision in sight"
        in distance_to_decision(Arms(4000, 1200, 200, 60), 0.05, Policy()).text()
    )


def test_a_promotion_leaves_the_candidate_no_share() -> None:
    """docs/tables.md: `share` is the candidate's share after the decision; after a promotion
    it is production, so its candidate share is 0 (rollout.json says 0 too)."""
    promoted = decide(Arms(4000, 1200, 200, 20), 0.05, 0, Policy())
    assert promoted.decision == "promote" and promoted.share == 0.0


# --- the timeline as a pure function ----------------------------------------------------------


def _rows(decisions: list[tuple[str, float, str, int]], promoted: bool) -> timeline.Rows:
    def decision(i: int, kind: str, share: float, by: str, answers: int) -> dict[str, Any]:
        return {
            "decision": kind,
            "share": share,
            "decided_by": by,
            "reason": "passed the gate" if by == "gate" else "looked",
            "decided_at": T0 + timedelta(minutes=10 + i),
            "answers_production": answers * 19,
            "answers_candidate": answers,
            "statistic": 20.4 if kind == "promote" else 2.0,
            "production": BASE,
        }

    return timeline.Rows(
        version={"version": "v001", "sample_count": 120, "created_at": T0},
        runs=[
            {
                "status": "succeeded",
                "model_id": "ft:m1",
                "backend": "openai",
                "job_id": "j1",
                "message": None,
                "created_at": T0 + timedelta(minutes=1),
                "updated_at": T0 + timedelta(minutes=5),
            }
        ],
        evaluation={
            "decision": "promote",
            "win_rate": 1.0,
            "ci_low": 0.931,
            "n": 52,
            "baseline": BASE,
            "reason": "ok",
            "created_at": T0 + timedelta(minutes=8),
        },
        decisions=[decision(i, *d) for i, d in enumerate(decisions)],
        promotion={"model": "ft:m1", "promoted_by": "ab_test", "promoted_at": T0 + timedelta(1)}
        if promoted
        else None,
        production="ft:m1" if promoted else BASE,
    )


def test_the_timeline_tells_a_release_from_cut_to_production() -> None:
    rows = _rows(
        [
            ("start", 0.05, "gate", 0),
            ("continue", 0.05, "ab_test", 150),
            ("promote", 0.0, "ab_test", 200),
        ],
        promoted=True,
    )
    steps = timeline.release_timeline(rows)
    assert [(s.stage, s.status) for s in steps] == [
        ("cut", "done"),
        ("checks", "done"),
        ("fine-tune", "done"),
        ("gate", "done"),
        ("canary", "done"),
        ("A/B test", "done"),
        ("production", "done"),
    ]
    assert steps[3].text.startswith("passed: win rate 1.000, 95 % lower bound 0.931, 52 judged")
    assert steps[4].text.startswith("0% → 5% of traffic, by gate")
    assert steps[5].text == "promote at Λ 20.4 after 4,000 requests (ab_test)"
    assert [m["label"] for m in timeline.events(rows)] == ["share 5%", "promote"]
    # The three renderings say the same steps.
    lines = timeline.text_lines(steps)
    assert len(lines) == 7 and "2026-12-07 14:08:00  passed: win rate 1.000" in lines[3]
    table = timeline.markdown(steps)
    assert table.count("\n") == 8 and "| ✓ | production |" in table
    assert timeline.table(steps)["rows"][6][1] == "production"


def test_a_running_test_shows_its_progress_and_what_production_waits_for() -> None:
    rows = _rows([("start", 0.05, "gate", 0), ("continue", 0.25, "ab_test", 250)], False)
    steps = timeline.release_timeline(rows, "Λ 17.7 of 20 needed")
    assert [s.stage for s in steps][-4:] == ["canary", "canary", "A/B test", "production"]
    assert steps[-2].status == "running" and steps[-2].text.endswith("Λ 17.7 of 20 needed")
    assert steps[-1].text == f"{BASE} stays production until the A/B test decides"


# --- the dashboards' A/B window, empty state and one-point charts ------------------------------


def _store(tmp_path: Path) -> Settings:
    settings = Settings(data_dir=str(tmp_path / "data"))
    with connect(settings.database) as conn:
        ensure_schema(conn)
    return settings


def test_the_ab_panel_shows_the_current_test_after_2000_older_looks(tmp_path: Path) -> None:
    settings = _store(tmp_path)
    with connect(settings.database) as conn:
        conn.execute(
            """
            INSERT INTO ab_decisions (candidate, production, share, answers_production,
                low_production, answers_candidate, low_candidate, rate_production,
                rate_candidate, statistic, decision, reason, decided_by, test_started_at,
                decided_at)
            SELECT 'old', 'base', 0.05, 100 + i, 30, 10 + i, 2, 0.3, 0.2, 1.5, 'continue',
                   'looked', 'ab_test', TIMESTAMP '2026-01-01',
                   TIMESTAMP '2026-01-01' + INTERVAL 1 MINUTE * i
            FROM range(?) t(i)
            """,
            [AB_LIMIT + 100],
        )
        conn.execute(
            "INSERT INTO ab_decisions (candidate, production, share, answers_production, "
            "low_production, answers_candidate, low_candidate, decision, reason, decided_by, "
            "test_started_at, decided_at) VALUES ('old', 'base', 0, 0, 0, 0, 0, 'rollback', "
            "'stop', 'ana', TIMESTAMP '2026-01-01', TIMESTAMP '2026-03-01')"
        )
        start_test(conn, "new", "base", 0.05, "gate", "passed")
        series = read_series(conn, "hour", 24, judge_margin=1.0)
    assert series.ab is not None and series.ab.height == AB_LIMIT
    # The newest look, the current test's start (no rates yet), is in the window.
    assert series.ab["candidate"][-1] == "new" and series.ab["rate_candidate"][-1] is None
    # No answer yet: the panel says which test runs and what it waits for.
    payload = Dashboards(settings, cache_seconds=0).figures("hour", 24)
    (ab,) = [c for c in payload["charts"] if c["id"] == "ab"]
    assert ab["note"].startswith("A/B test running: new at 5% of traffic against base")
    assert "at least 200 more candidate answers at 5% (~4,000 requests)" in ab["note"]
    # The older test's rates are drawn, with Λ's threshold labelled on the chart.
    shapes = ab["figure"]["layout"]["shapes"]
    assert shapes[0]["label"]["text"] == "decision at Λ 20"


def test_a_started_test_without_answers_is_not_no_test_yet(tmp_path: Path) -> None:
    settings = _store(tmp_path)
    with connect(settings.database) as conn:
        start_test(conn, "cand", "base", 0.05, "gate", "passed")
    payload = Dashboards(settings, cache_seconds=0).figures("hour", 24)
    (ab,) = [c for c in payload["charts"] if c["id"] == "ab"]
    assert ab["figure"] is None
    assert ab["empty"].startswith("A/B test running: cand at 5% of traffic against base since")
    assert "0 candidate and 0 production answers so far" in ab["empty"]


def test_one_point_charts_get_a_readable_time_axis_and_labels(tmp_path: Path) -> None:
    settings = _store(tmp_path)
    with connect(settings.database) as conn:
        conn.execute(
            "INSERT INTO model_evaluations VALUES ('e1', 'ft:gpt-4o-mini:qe:abc', 'base', 'v001', "
            "52, 52, 0, 0, 0, 1.0, 0.931, 'promote', 'ok', 'judge', '{}', 0, 0, 0.0, NULL, "
            "'production', TIMESTAMP '2026-12-07 14:08:26.148', false, 1)"
        )
    payload = Dashboards(settings, cache_seconds=0).figures("hour", 24)
    (chart,) = [c for c in payload["charts"] if c["id"] == "evaluations"]
    layout, (trace,) = chart["figure"]["layout"], chart["figure"]["data"]
    # ± one bucket around the single point, not a sub-millisecond zoom.
    low, high = (datetime.fromisoformat(x) for x in layout["xaxis"]["range"])
    assert high - low == timedelta(hours=2)
    assert layout["shapes"][0]["label"]["text"] == "50 %: as good as production"
    assert trace["text"] == ["ft:gpt-4o-mini:qe:abc: passed the gate"]
    assert trace["mode"] == "lines+markers+text"


# --- the whole release in real Dagster runs ---------------------------------------------------


@pytest.fixture
def canary_release(
    eval_settings: Settings,  # noqa: F811
    openai_server: OpenAIServer,
    tmp_path: Path,
) -> tuple[Settings, str, dg.DagsterInstance]:
    """A real release with QE_ROLLOUT=canary into a persistent Dagster instance: the gate
    passes the candidate and starts its canary at 50 %."""
    settings = eval_settings.model_copy(
        # A half share and fewer answers keep the live part short (the 5 % sizing is above).
        update={"rollout_mode": "canary", "ab_ramp": [0.5], "ab_min_answers": 100}
    )
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text(DAGSTER_YAML)  # as `qe run` and `qe ui` write it
    instance = dg.DagsterInstance.from_config(str(home))
    processed(settings, 120)
    openai_server.responder = EvalModels({"ft:": 3, BASE: 1})
    result = materialize(settings, selection=RELEASE, instance=instance, raise_on_error=False)
    candidate = metadata(result, "model_evaluation")["candidate"]
    return settings, candidate, instance


def _latest_ab_test(instance: dg.DagsterInstance) -> dict[str, Any]:
    event = instance.get_latest_materialization_event(dg.AssetKey("ab_test"))
    assert event is not None and event.asset_materialization is not None
    return {k: v.value for k, v in event.asset_materialization.metadata.items()}


def test_a_canary_release_reads_the_same_everywhere(
    canary_release: tuple[Settings, str, dg.DagsterInstance],
) -> None:
    settings, candidate, instance = canary_release
    # The gate says what it did: passed, canary started; nothing promoted.
    run = instance.get_runs(limit=1)[0]
    gate = _gate_check(instance, run.run_id)
    assert gate.passed and gate.description.startswith(
        "passed the gate; canary started at 50% of traffic (ab_test decides): "
    )
    assert gate.metadata["decision"].value == "passed"
    assert gate.metadata["promoted"].value is False
    # model_evaluation: passed, and what it leads to (not "promote").
    evaluation = instance.get_latest_materialization_event(dg.AssetKey("model_evaluation"))
    assert evaluation is not None and evaluation.asset_materialization is not None
    meta = {k: v.value for k, v in evaluation.asset_materialization.metadata.items()}
    assert meta["decision"] == "passed" and "canary started at 50% of traffic" in meta["outcome"]
    assert "| ✓ | gate |" in meta["release_timeline"]

    # ab_test agrees with rollout.json at once (no ingest run yet): the gate reported it.
    ab = _latest_ab_test(instance)
    state = json.loads(Path(settings.data_dir, "rollout.json").read_text())
    assert (ab["candidate"], ab["current_share"]) == (state["candidate"], state["share"])
    assert ab["current_share"] == 0.5 and ab["changed_by"] == "gate"
    assert ab["decision"] == "continue" and ab["decision_threshold"] == 20.0
    assert ab["progress"] == (
        "Λ 1.0 of 20 needed; at least 100 more candidate answers at 50% (~200 requests) "
        "before any decision"
    )
    assert "| ✓ | canary |" in ab["release_timeline"]

    # qe status: the base model named, the canary and its share, the timeline.
    env = {"QE_DATA_DIR": settings.data_dir, "QE_FINETUNE_BASE_MODEL": BASE}
    status = qe("status", env=env).stdout
    assert f"production model: {BASE} (the base model; none promoted yet)" in status
    assert f"latest evaluation: {candidate} vs {BASE}: passed the gate, win rate" in status
    assert f"rollout: canary {candidate} at 50% of traffic against {BASE} since " in status
    timeline_lines = status.split("release timeline:\n")[1].splitlines()[:7]
    assert [line.split()[1] for line in timeline_lines] == [
        "cut",
        "checks",
        "fine-tune",
        "gate",
        "canary",
        "A/B",
        "production",
    ]

    # Live traffic through the real capture API until the test decides.
    capture = QualityCapture(settings)
    router = Router(Path(settings.data_dir, "rollout.json"), default=BASE, check_seconds=0)
    rng = random.Random(30)
    decisions = []
    for look in range(8):
        serve(capture, router, {BASE: 0.3, candidate: 0.1}, 300, rng, f"look{look}")
        result = materialize(settings, selection=AB_RUN, instance=instance)
        ab = metadata(result, "ab_test")
        decisions.append(ab["decision"])
        if ab["decision"] != "continue":
            break
        assert " of 20 needed" in ab["progress"]
        assert ab["candidate_low_score_rate"].endswith(f" of {ab['answers_candidate']:,})")
        harm = checks(result)["candidate_not_worse"]
        assert "of 20 needed to decide" in harm.description
    assert decisions[-1] == "promote", decisions
    assert (
        "| ✓ | production |" in ab["release_timeline"] and "promote at Λ" in ab["release_timeline"]
    )
    # The promote row records share 0, as rollout.json does.
    assert (
        scalar(settings, "SELECT share FROM ab_decisions ORDER BY decision_id DESC LIMIT 1") == 0.0
    )
    assert json.loads(Path(settings.data_dir, "rollout.json").read_text())["share"] == 0.0
    assert checks(result)["candidate_not_worse"].metadata["decision"].value == "promote"

    # After the test: the check says no test is running, with nothing to plot.
    later = materialize(settings, selection=AB_RUN, instance=instance)
    harm = checks(later)["candidate_not_worse"]
    assert harm.passed and harm.description.startswith("no test running")
    assert not harm.metadata
    assert (
        "rollout: no candidate has traffic; every request goes to " + candidate
        in qe("status", env=env).stdout
    )

    # ... once: the next ingest runs (`qe run`, the queue sensor) leave the check out.
    harm_key = dg.AssetCheckKey(dg.AssetKey("ab_test"), "candidate_not_worse")
    outcome = run_pipeline(settings, instance=instance)
    assert outcome.success, outcome.error
    assert "candidate_not_worse" not in _check_evaluations(instance, outcome.run_id)
    assert "judge_agreement" in _check_evaluations(instance, outcome.run_id)  # the others run
    assert _materialized(instance, outcome.run_id) >= {"raw_events", "ab_test"}
    Path(settings.data_dir, "inbox", "waiting.jsonl").write_bytes(line(make_event()) + b"\n")
    request = _sensor_request(settings, instance)
    assert request.asset_check_keys is not None and harm_key not in request.asset_check_keys
    assert dg.AssetKey("ab_test") in (request.asset_selection or [])
    # A new test (here a person's canary in rollout.json) brings the check back.
    write_atomically(
        Path(settings.data_dir, "rollout.json"),
        RolloutState(production=candidate, candidate="ft:next", share=0.05).to_json().encode(),
    )
    assert quiet_checks(instance, settings) == frozenset()
    assert _sensor_request(settings, instance).asset_check_keys is None


def _check_evaluations(instance: dg.DagsterInstance, run_id: str) -> list[str]:
    return [
        record.dagster_event.event_specific_data.check_name  # type: ignore[union-attr]
        for record in instance.all_logs(run_id)
        if record.dagster_event is not None
        and record.dagster_event.event_type_value == "ASSET_CHECK_EVALUATION"
    ]


def _materialized(instance: dg.DagsterInstance, run_id: str) -> set[str]:
    return {
        record.dagster_event.asset_key.to_user_string()  # type: ignore[union-attr]
        for record in instance.all_logs(run_id)
        if record.dagster_event is not None and record.dagster_event.is_step_materialization
    }


def _sensor_request(settings: Settings, instance: dg.DagsterInstance) -> dg.RunRequest:
    """The queue sensor's run request, evaluated against the real definitions."""
    defs = build_definitions(settings)
    sensor = defs.get_sensor_def("queue_sensor")
    resources = build_resources(settings)
    context = dg.build_sensor_context(
        instance=instance,
        definitions=defs,
        resources={key: resources[key] for key in ("settings", "queue")},
    )
    result = sensor(context)
    assert isinstance(result, dg.SensorResult) and result.run_requests, result
    return result.run_requests[0]


def _gate_check(instance: dg.DagsterInstance, run_id: str) -> dg.AssetCheckEvaluation:
    for record in instance.all_logs(run_id):
        event = record.dagster_event
        if event is None or event.event_type_value != "ASSET_CHECK_EVALUATION":
            continue
        data = event.event_specific_data
        if data.check_name == "candidate_beats_production":  # type: ignore[union-attr]
            return data  # type: ignore[return-value]
    raise AssertionError("no candidate_beats_production evaluation in the release run")


def test_a_person_changing_the_rollout_refreshes_ab_test(
    canary_release: tuple[Settings, str, dg.DagsterInstance],
) -> None:
    settings, candidate, instance = canary_release
    home = Path(instance.root_directory)
    env = {"QE_DATA_DIR": settings.data_dir, "QE_REVIEWER": "ana", "DAGSTER_HOME": str(home)}
    qe("models", "rollout", candidate, "--share", "0.25", "--reason", "looks fine", env=env)
    ab = _latest_ab_test(dg.DagsterInstance.from_config(str(home)))
    assert (ab["current_share"], ab["changed_by"]) == (0.25, "ana")
    assert ab["change"].startswith(f"rollout: {candidate} at 25% of traffic")
    qe("models", "rollback", "--reason", "complaints", env=env)
    ab = _latest_ab_test(dg.DagsterInstance.from_config(str(home)))
    assert (ab["current_share"], ab["decision"]) == (0.0, "none")
    assert "| rollback after 0 requests (ana: complaints) |" in ab["release_timeline"]


# --- the pages in Chromium --------------------------------------------------------------------


@pytest.mark.browser
@pytest.mark.timeout(420)
def test_the_timeline_on_the_asset_page_and_the_dashboards_in_chromium(
    canary_release: tuple[Settings, str, dg.DagsterInstance], tmp_path: Path
) -> None:
    from playwright.sync_api import expect, sync_playwright

    from qe_assets.testing.browser import CHROMIUM, CHROMIUM_ARGS
    from qe_assets_tests.dagster_dev import DagsterDev
    from qe_assets_tests.test_ui_browser import _dismiss_community_dialog
    from qe_assets_tests.test_web_dashboards import served_dashboards

    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing (Debian package `chromium`)")
    settings, candidate, instance = canary_release
    capture = QualityCapture(settings)
    router = Router(Path(settings.data_dir, "rollout.json"), default=BASE, check_seconds=0)
    rng = random.Random(7)
    for look in range(2):  # two looks, still deciding: the test is running
        serve(capture, router, {BASE: 0.3, candidate: 0.25}, 120, rng, f"ui{look}")
        materialize(settings, selection=AB_RUN, instance=instance)
    shots = Path(os.environ.get("SCREENSHOTS_DIR") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QE_", "OPENAI_", "DAGSTER_"))}
    env.update(
        QE_DATA_DIR=settings.data_dir,
        QE_QUEUE_SENSOR_RUNNING="false",
        QE_FINETUNE_SENSOR_RUNNING="false",
    )
    home = Path(instance.root_directory)
    dev = DagsterDev(home, env, tmp_path / "dagster_dev.log")
    with served_dashboards(settings) as dashboards, sync_playwright() as playwright:
        dev.start(timeout=120)
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1800, "height": 1100})
        page.set_default_timeout(30_000)
        expect.set_options(timeout=30_000)
        try:
            # The ab_test asset page: the timeline in its latest materialization's metadata.
            page.goto(f"{dev.url}/assets/ab_test")
            _dismiss_community_dialog(page)
            expect(page.get_by_text("release_timeline").first).to_be_visible()
            expect(page.get_by_text("progress").first).to_be_visible()
            expect(page.get_by_text(re.compile(r"Λ \d+\.\d of 20 needed")).first).to_be_visible()
            page.screenshot(path=shots / "ab_test_asset_page.png", full_page=True)
            shown = page.get_by_role("button", name=re.compile("Show Markdown"))
            if shown.count():
                # Markdown metadata opens in a dialog: the timeline's table, rendered.
                row = page.locator("tr").filter(has_text="release_timeline")
                row.get_by_role("button", name=re.compile("Show Markdown")).first.click()
            dialog_or_page = page.locator("table").filter(has_text="fine-tune").last
            expect(dialog_or_page).to_be_visible()
            for stage in ("cut", "checks", "gate", "canary", "A/B test", "production"):
                expect(dialog_or_page.get_by_text(stage, exact=True).first).to_be_visible()
            page.locator("tr").filter(has_text="release_timeline").last.screenshot(
                path=shots / "ab_test_timeline.png"
            )

            # The dashboards: the timeline panel and the A/B chart with its marks.
            page.goto(dashboards + "?bucket=hour")
            page.wait_for_selector("body[data-charts-rendered]")
            panel = page.locator("section#timeline")
            assert panel.get_attribute("data-state") == "rendered"
            rows = panel.locator("tbody tr")
            assert rows.count() == 7
            assert rows.nth(3).inner_text().split("\t")[1] == "gate"
            assert rows.nth(5).get_attribute("data-status") == "running"
            ab = page.locator("section#ab")
            assert ab.get_attribute("data-state") == "rendered"
            assert (
                ab.locator("p.note")
                .inner_text()
                .startswith(f"A/B test running: {candidate} at 50% of traffic")
            )
            labels = ab.locator("svg text").all_text_contents()
            assert "decision at Λ 20" in labels and "share 50%" in labels, labels
            panel.screenshot(path=shots / "dashboards_timeline.png")
            ab.screenshot(path=shots / "dashboards_ab.png")
            page.screenshot(path=shots / "dashboards_page.png", full_page=True)
        except Exception:
            page.screenshot(path=shots / "failure.png", full_page=True)
            raise
        finally:
            browser.close()
            dev.stop()


def test_a_lone_bucket_of_grouped_bars_fills_its_bucket_side_by_side() -> None:
    """The hour view of a young store: one bucket. Its bars get the bucket's width (Plotly
    would draw them a millisecond wide inside the ± one-bucket range), side by side."""
    from qe_assets.web.dashboards import _one_point_range

    at = "2026-12-07T16:00:00"
    figure = {
        "data": [{"type": "bar", "name": n, "x": [at], "y": [1]} for n in ("a", "b")],
        "layout": {"barmode": "group", "xaxis": {"type": "date"}},
    }
    hour = 3_600_000
    shaped = _one_point_range(figure, timedelta(hours=1))
    assert [t["width"] for t in shaped["data"]] == [0.4 * hour, 0.4 * hour]
    assert [t["offset"] for t in shaped["data"]] == [-0.4 * hour, 0.0]
    assert shaped["layout"]["xaxis"]["range"] == ["2026-12-07T15:00:00", "2026-12-07T17:00:00"]
