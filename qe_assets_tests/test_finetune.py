"""Fine-tuning loop: threshold sensor, the none and command backends, the registry."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest
from dagster._core.storage.dagster_run import DagsterRun
from dagster._core.utils import make_new_run_id

from qe_assets.finetune.assets import SKIPPED_MESSAGE, claim_run
from qe_assets.finetune.resource import FineTuneBackendResource
from qe_assets.ingest.queues import FileInbox
from qe_assets.lib.resources import PipelineSettings
from qe_assets.ops.definitions import RELEASE_JOB, build_definitions
from qe_assets.ops.runner import DAGSTER_YAML, run_pipeline
from qe_assets.ops.runs import owner_tags as _owner_tags
from qe_assets.ops.sensors import build_finetune_sensor
from qe_assets.release.export import VersionFiles
from qe_assets.settings import Settings
from qe_assets.store import connect
from qe_assets_tests.runs import checks, materialize, metadata, scalar
from qe_assets_tests.test_cli import qe
from qe_assets_tests.test_pipeline import batch
from qe_assets_tests.test_single_writer import RUN_TIMEOUT, child_env

SCRIPTS = Path(__file__).parent / "scripts"
EXAMPLE = Path(__file__).parent.parent / "examples" / "finetune_trl_lora.py"


def evaluate_sensor(settings: Settings, instance: dg.DagsterInstance, cursor: str | None = None):
    sensor = build_finetune_sensor(RELEASE_JOB, running_by_default=False, interval_seconds=30)
    context = dg.build_sensor_context(
        instance=instance,
        cursor=cursor,
        resources={
            "settings": PipelineSettings(**settings.model_dump()),
            "finetune": FineTuneBackendResource.from_settings(settings),
        },
    )
    return sensor(context), context


def run_requests(result) -> list[dg.RunRequest]:
    if isinstance(result, dg.SensorResult):
        return list(result.run_requests or [])
    return []


def skip_message(result) -> str:
    if isinstance(result, dg.SkipReason):
        return result.skip_message or ""
    assert isinstance(result, dg.SensorResult) and result.skip_reason is not None, result
    return result.skip_reason.skip_message or ""


def processed(settings: Settings, n: int, prefix: str = "e") -> None:
    """n ready samples: ingested, annotated and completed, not yet in a version."""
    FileInbox(settings.inbox_dir).put(batch(prefix, n))
    assert materialize(
        settings, selection=["raw_events", "annotated_samples", "completions"]
    ).success


@pytest.fixture
def small_threshold(settings: Settings) -> Settings:
    return settings.model_copy(update={"finetune_threshold": 20})


def test_sensor_skips_below_threshold_fires_once_and_not_while_in_flight(
    small_threshold: Settings,
) -> None:
    settings = small_threshold
    with dg.instance_for_test() as instance:
        result, _ = evaluate_sensor(settings, instance)
        assert "no database" in skip_message(result)

        processed(settings, 12)
        result, _ = evaluate_sensor(settings, instance)
        assert "12 ready samples, below the threshold of 20" in skip_message(result)

        processed(settings, 10, prefix="f")
        result, _ = evaluate_sensor(settings, instance)
        (request,) = run_requests(result)
        assert request.run_key.startswith("v001@")
        assert request.tags["qe/ready_samples"] == "22"
        cursor = result.cursor

        # Same state again: nothing new is requested.
        again, _ = evaluate_sensor(settings, instance, cursor=cursor)
        assert run_requests(again) == []
        assert "already requested" in skip_message(again)

        # A release run in flight: the sensor waits, whatever the counts say.
        instance.add_run(
            DagsterRun(
                job_name=RELEASE_JOB, run_id=make_new_run_id(), status=dg.DagsterRunStatus.STARTED
            )
        )
        busy, _ = evaluate_sensor(settings, instance)
        assert "still in flight" in skip_message(busy)


def test_whole_loop_events_to_registry_row(small_threshold: Settings) -> None:
    settings = small_threshold
    with dg.instance_for_test() as instance:
        processed(settings, 25)
        result, _ = evaluate_sensor(settings, instance)
        (request,) = run_requests(result)
        # What the daemon does with the request: launch the release job with its tags.
        job = build_definitions(settings).resolve_job_def(RELEASE_JOB)
        run = job.execute_in_process(instance=instance, tags=request.tags)
        assert run.success
        materialized = {
            e.asset_key.to_user_string() for e in run.get_asset_materialization_events()
        }
        # Backend none trains nothing: no model materialized, an observation says why.
        assert materialized == {"tuning_dataset"}
        model = metadata(run, "fine_tuned_model")
        assert (model["dataset_version"], model["status"]) == ("v001", "skipped")
        with connect(settings.database, read_only=True) as conn:
            ((status, message, recipe),) = conn.execute(
                "SELECT status, message, recipe FROM fine_tune_runs"
            ).fetchall()
            lineage = conn.execute(
                """
                SELECT count(DISTINCT s.request_id) FROM fine_tune_runs r
                JOIN dataset_samples d ON d.version = r.dataset_version
                JOIN annotated_samples s USING (sample_id)
                """
            ).fetchall()[0][0]
        assert (status, message) == ("skipped", SKIPPED_MESSAGE)
        recipe = json.loads(recipe)
        assert recipe["version"] == "v001" and recipe["backend"] == "none"
        assert Path(recipe["train_chat_path"]).exists()
        assert lineage == 25  # model ← version ← samples ← request ids
        # The version's samples are consumed: the sensor goes quiet.
        after, _ = evaluate_sensor(settings, instance, cursor=result.cursor)
        assert "no sample ready" in skip_message(after)
        # Materializing again finds no version without a run: nothing happens.
        again = materialize(settings, selection=["fine_tuned_model"])
        assert metadata(again, "fine_tuned_model") == {}


def command_settings(settings: Settings, script: Path) -> Settings:
    return settings.model_copy(
        update={
            "finetune_backend": "command",
            "finetune_command": f"{sys.executable} {script}",
            # The test events complete naively (no LLM here); training on them is asked for.
            "finetune_allow_naive": True,
        }
    )


def test_command_backend_runs_pipes_script_and_records_metrics(settings: Settings) -> None:
    settings = command_settings(settings, SCRIPTS / "pipes_train.py")
    processed(settings, 15)
    result = materialize(settings, selection=["tuning_dataset", "fine_tuned_model"])
    model = metadata(result, "fine_tuned_model")
    assert model["status"] == "succeeded"
    assert model["model_id"] == "/models/v001-command-1"
    assert model["metric/train_loss"] == 0.42
    with connect(settings.database, read_only=True) as conn:
        ((model_id, metrics),) = conn.execute(
            "SELECT model_id, metrics FROM fine_tune_runs"
        ).fetchall()
    metrics = json.loads(metrics)
    assert model_id == "/models/v001-command-1"
    assert metrics["train_records"] + 0 <= 15 and metrics["weight_sum"] > 0


def test_command_backend_failure_is_recorded_and_fails_the_asset(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = command_settings(settings, SCRIPTS / "pipes_train.py")
    processed(settings, 15)
    monkeypatch.setenv("FAKE_TRAIN_FAIL", "1")
    result = materialize(
        settings, selection=["tuning_dataset", "fine_tuned_model"], raise_on_error=False
    )
    assert not result.success
    with connect(settings.database, read_only=True) as conn:
        ((status, message),) = conn.execute("SELECT status, message FROM fine_tune_runs").fetchall()
    assert status == "failed" and "training command failed" in message
    # The reason is the command's own last stderr lines (a progress bar at its final state),
    # also kept whole in the run's folder.
    assert "torch.OutOfMemoryError: out of GPU memory" in message
    assert "loading the model: 100%" in message and "loading the model\r" not in message
    log = Path(settings.data_dir) / "finetune" / "v001-command-1" / "stderr.log"
    assert "out of GPU memory" in log.read_text("utf-8")
    # The next attempt is a new run row for the same version.
    monkeypatch.delenv("FAKE_TRAIN_FAIL")
    retry = materialize(settings, selection=["fine_tuned_model"])
    assert metadata(retry, "fine_tuned_model")["run_id"] == "v001-command-2"


def test_a_bare_python_runs_this_environment_s_interpreter_and_the_reported_base_is_kept(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The documented `QE_FINETUNE_COMMAND="python examples/…"`: `python` on PATH is not this
    environment's (no dagster_pipes there). And the model the command says it adapted is the
    run's base_model, what the gate asks as the baseline."""
    settings = command_settings(settings, SCRIPTS / "pipes_train.py").model_copy(
        update={"finetune_command": f"python {SCRIPTS / 'pipes_train.py'}"}
    )
    monkeypatch.setenv("FAKE_BASE_MODEL", "/models/tiny-base")
    processed(settings, 15)
    model = metadata(
        materialize(settings, selection=["tuning_dataset", "fine_tuned_model"]), "fine_tuned_model"
    )
    assert model["status"] == "succeeded" and model["base_model"] == "/models/tiny-base"
    with connect(settings.database, read_only=True) as conn:
        ((base_model,),) = conn.execute("SELECT base_model FROM fine_tune_runs").fetchall()
    assert base_model == "/models/tiny-base"


def test_trl_example_dry_run_through_the_command_backend(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("QE_TRL_DRY_RUN", "1")
    settings = command_settings(settings, EXAMPLE)
    processed(settings, 15)
    model = metadata(
        materialize(settings, selection=["tuning_dataset", "fine_tuned_model"]), "fine_tuned_model"
    )
    assert model["status"] == "succeeded"
    assert model["metric/mean_weight"] == pytest.approx(0.75)


def test_none_backend_refuses_a_tampered_version(settings: Settings) -> None:
    processed(settings, 12)
    assert materialize(settings, selection=["tuning_dataset"]).success
    jsonl = next(settings.datasets_dir.glob("*_v001.jsonl"))
    jsonl.write_text(jsonl.read_text() + "\n")
    result = materialize(settings, selection=["fine_tuned_model"], raise_on_error=False)
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure)
    assert "differs from its committed sha256" in failure.step_failure_data.error.message


def test_a_version_failing_the_format_rules_is_never_trained_on(settings: Settings) -> None:
    # Three samples are under the 10-example minimum. Cut without its checks, the version is
    # refused by fine_tuned_model launched on its own instead of trained on ...
    processed(settings, 3)
    cut = materialize(
        settings, selection=dg.AssetSelection.assets("tuning_dataset").without_checks()
    )
    assert metadata(cut, "tuning_dataset")["version"] == "v001"
    alone = materialize(settings, selection=["fine_tuned_model"], raise_on_error=False)
    assert not alone.success
    failure = alone.get_step_failure_events()[0].event_specific_data.error.message  # type: ignore[union-attr]
    assert "v001 breaks the dataset format rules" in failure
    assert "10" in failure
    assert scalar(settings, "SELECT count(*) FROM fine_tune_runs") == 0
    assert not (Path(settings.data_dir) / "finetune").exists()
    # ... the release publishes it again (it has no run), the blocking check fails the run and
    # skips fine_tuned_model, and records the refusal, so the version is not published for ever ...
    release = materialize(
        settings, selection=["tuning_dataset", "fine_tuned_model"], raise_on_error=False
    )
    assert not release.success
    assert metadata(release, "tuning_dataset")["republished"] is True
    assert metadata(release, "fine_tuned_model") == {}
    ((status, message),) = conn_rows(settings, "SELECT status, message FROM fine_tune_runs")
    assert status == "rejected" and message.startswith("dataset_format_valid: 3 examples")
    # ... and the next release cuts v002 from new samples and fine-tunes on it.
    processed(settings, 12, prefix="g")
    model = metadata(
        materialize(settings, selection=["tuning_dataset", "fine_tuned_model"]), "fine_tuned_model"
    )
    assert (model["dataset_version"], model["status"]) == ("v002", "skipped")
    assert not (Path(settings.data_dir) / "finetune" / "v001-none-1").exists()


def conn_rows(settings: Settings, query: str) -> list[tuple]:
    with connect(settings.database, read_only=True) as conn:
        return conn.execute(query).fetchall()


# --- a `qe run` killed right after it committed a version ----------------------------------


def kill_after_commit(proc: subprocess.Popen[str], settings: Settings, version: str) -> None:
    """SIGKILL `proc` as soon as `version` is in dataset_versions: the manifest is the last file
    written before the row, so the database is polled only once it exists (the version's chart
    is drawn after the commit, so the kill lands before the checks and the fine-tune)."""
    manifest = settings.datasets_dir / f"rag_quality_tuning_{version}.manifest.json"
    deadline = time.monotonic() + RUN_TIMEOUT
    while True:
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before its kill"
        if manifest.exists():
            with connect(settings.database, read_only=True, wait_seconds=5) as conn:
                query = "SELECT count(*) FROM dataset_versions WHERE version = ?"
                if conn.execute(query, [version]).fetchall() == [(1,)]:
                    break
        time.sleep(0.002)
    proc.kill()
    proc.wait(timeout=30)


def released(settings: Settings) -> list[tuple[str, str, str]]:
    with connect(settings.database, read_only=True) as conn:
        return conn.execute(
            "SELECT dataset_version, status, run_id FROM fine_tune_runs ORDER BY run_id"
        ).fetchall()


def test_a_version_committed_by_a_killed_qe_run_is_checked_and_fine_tuned_once(
    tmp_path: Path,
) -> None:
    data, home = tmp_path / "data", tmp_path / "dagster_home"
    env = child_env(data, home)
    settings = Settings.from_env(env)
    FileInbox(settings.inbox_dir).put(batch("k", 15))
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "qe_assets.cli", "run", "--cut-version"],
            env=env,
            stdout=log,
            stderr=log,
            text=True,
        )
        kill_after_commit(proc, settings, "v001")
    assert released(settings) == [], "the kill landed after the fine-tune"
    # What the old, non-atomic preparation could leave: a half-written run folder, no recipe.
    half = data / "finetune" / "v001-none-1"
    half.mkdir(parents=True)
    (half / "train.chat.jsonl").write_text('{"messages": [')
    (data / "finetune" / ".v001-none-1.0badf00d.tmp").mkdir()

    # A plain `qe run` (threshold 1000, nothing new): v001 is published again, checked, released.
    run = qe("run", env=env)
    assert "release v001: v001 is committed but its none release never ended" in run.stdout
    assert "check dataset_format_valid: passed" in run.stdout
    assert "check dataset_no_leakage: passed" in run.stdout
    assert released(settings) == [("v001", "skipped", "v001-none-1")]
    recipe = json.loads((half / "recipe.json").read_text())
    assert recipe["version"] == "v001"
    assert len(Path(recipe["train_chat_path"]).read_text().splitlines()) == recipe["train"]
    assert [p.name for p in (data / "finetune").iterdir()] == ["v001-none-1"]
    assert "no sample ready for a new dataset version" in qe("run", env=env).stdout

    # The next version gets its own release, and v001 is not released twice.
    FileInbox(settings.inbox_dir).put(batch("l", 12))
    qe("run", "--cut-version", env=env)
    assert released(settings) == [
        ("v001", "skipped", "v001-none-1"),
        ("v002", "skipped", "v002-none-1"),
    ]


def test_an_older_unreleased_version_is_released_before_a_newer_one(settings: Settings) -> None:
    # v001 committed and not fine-tuned (as a crash after its commit leaves it), 12 samples more
    # ready for v002.
    unchecked = dg.AssetSelection.assets("tuning_dataset").without_checks()
    processed(settings, 12)
    materialize(settings, selection=unchecked)
    processed(settings, 12, prefix="n")
    materialize(settings, selection=unchecked)
    with dg.instance_for_test() as instance:
        result, _ = evaluate_sensor(settings, instance)
        (request,) = run_requests(result)  # 0 ready samples, yet a release is due: v001's
        assert request.tags["qe/dataset_version"] == "v001"
        job = build_definitions(settings).resolve_job_def(RELEASE_JOB)
        force = {"ops": {"tuning_dataset": {"config": {"force": True}}}}  # --cut-version
        for version in ("v001", "v002"):
            run = job.execute_in_process(instance=instance, run_config=force)
            assert metadata(run, "tuning_dataset")["version"] == version
            assert {c.metadata["version"].value for c in checks(run).values()} == {version}
            assert metadata(run, "fine_tuned_model")["dataset_version"] == version
        result, _ = evaluate_sensor(settings, instance)
        assert "no sample ready for a new dataset version" in skip_message(result)
    assert [(v, s) for v, s, _ in released(settings)] == [("v001", "skipped"), ("v002", "skipped")]


# --- release runs left behind by a dead `qe run` ----------------------------------------------


def dead_owner_tags() -> dict[str, str]:
    """The owner tags `qe run` puts on its runs, made by a real process that has since exited."""
    code = "import json; from qe_assets.ops.runs import owner_tags; print(json.dumps(owner_tags()))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


STALE = [
    dg.DagsterRunStatus.NOT_STARTED,  # execute_in_process created it, the kill came before start
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.CANCELING,
]


def persistent_instance(home: Path) -> dg.DagsterInstance:
    """An instance on disk configured as `qe run` configures a fresh DAGSTER_HOME, which a child
    `qe run` (DAGSTER_HOME=home) shares."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "dagster.yaml").write_text(DAGSTER_YAML)
    return dg.DagsterInstance.from_config(str(home))


def add_stale_release_runs(instance: dg.DagsterInstance) -> list[str]:
    owner = {**dead_owner_tags(), "qe/dataset_version": "v001"}
    run_ids = [make_new_run_id() for _ in STALE]
    for run_id, status in zip(run_ids, STALE, strict=True):
        instance.add_run(DagsterRun(job_name=RELEASE_JOB, run_id=run_id, status=status, tags=owner))
    return run_ids


def statuses(instance: dg.DagsterInstance, run_ids: list[str]) -> set[dg.DagsterRunStatus]:
    return {instance.get_run_by_id(run_id).status for run_id in run_ids}  # type: ignore[union-attr]


def test_the_sensor_fails_release_runs_of_a_dead_qe_run_and_fires(
    small_threshold: Settings, tmp_path: Path
) -> None:
    settings = small_threshold
    processed(settings, 25)
    instance = persistent_instance(tmp_path / "dagster_home")
    stale = add_stale_release_runs(instance)
    # A release run of a live `qe run` (this process) is in flight: the sensor waits for it.
    live = make_new_run_id()
    instance.add_run(
        DagsterRun(
            job_name=RELEASE_JOB,
            run_id=live,
            status=dg.DagsterRunStatus.STARTED,
            tags=_owner_tags(),
        )
    )
    waiting, _ = evaluate_sensor(settings, instance)
    assert f"release run {live} is still in flight" in skip_message(waiting)
    assert statuses(instance, stale) == {dg.DagsterRunStatus.FAILURE}

    instance.report_run_failed(instance.get_run_by_id(live), "done with it")  # type: ignore[arg-type]
    result, _ = evaluate_sensor(settings, instance)
    (request,) = run_requests(result)
    assert request.tags == {"qe/dataset_version": "v001", "qe/ready_samples": "25"}
    # The failed runs' keys are spent (the daemon would drop a request under one of them), but
    # runs of a killed process do not count against the version ...
    assert request.run_key.endswith(f"/retry{len(stale)}")
    # ... while three release runs that failed on their own stop the sensor retrying it.
    for _ in range(3):
        instance.add_run(
            DagsterRun(
                job_name=RELEASE_JOB,
                run_id=make_new_run_id(),
                status=dg.DagsterRunStatus.FAILURE,
                tags={"qe/dataset_version": "v001"},
            )
        )
    stopped, _ = evaluate_sensor(settings, instance)
    assert "3 release runs of v001 failed; not retrying it on my own" in skip_message(stopped)


def test_qe_run_fails_release_runs_of_a_dead_qe_run(settings: Settings, tmp_path: Path) -> None:
    instance = persistent_instance(tmp_path / "dagster_home")
    stale = add_stale_release_runs(instance)
    outcome = run_pipeline(settings, instance=instance)
    assert outcome.success, outcome.error
    assert statuses(instance, stale) == {dg.DagsterRunStatus.FAILURE}
    for run_id in stale:
        assert f"run {run_id} of a killed `qe run` marked failed" in "\n".join(outcome.summary)


def test_a_qe_run_killed_as_its_release_run_is_created_does_not_block_the_sensor(
    tmp_path: Path,
) -> None:
    data, home = tmp_path / "data", tmp_path / "dagster_home"
    env = {**child_env(data, home), "QE_FINETUNE_THRESHOLD": "10"}
    settings = Settings.from_env(env)
    instance = persistent_instance(home)
    FileInbox(settings.inbox_dir).put(batch("r", 15))
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "qe_assets.cli", "run"], env=env, stdout=log, stderr=log
        )
        # Killed the moment its release run exists: usually still NOT_STARTED.
        deadline = time.monotonic() + RUN_TIMEOUT
        while not instance.get_run_records(dg.RunsFilter(job_name=RELEASE_JOB), limit=1):
            assert proc.poll() is None and time.monotonic() < deadline, "ended before its kill"
            time.sleep(0.005)
        proc.kill()
        proc.wait(timeout=30)
    (stale,) = instance.get_run_records(dg.RunsFilter(job_name=RELEASE_JOB))
    print(f"\nthe release run was {stale.dagster_run.status.value} when its `qe run` died")

    result, _ = evaluate_sensor(settings, instance)
    (request,) = run_requests(result)
    assert request.tags["qe/dataset_version"] == "v001"
    assert statuses(instance, [stale.dagster_run.run_id]) == {dg.DagsterRunStatus.FAILURE}
    # What the daemon does with the request, then nothing is left to release.
    job = build_definitions(settings).resolve_job_def(RELEASE_JOB)
    assert job.execute_in_process(instance=instance, tags=request.tags).success
    assert [(v, s) for v, s, _ in released(settings)] == [("v001", "skipped")]


def test_an_interrupted_fine_tune_is_resumed_not_started_again(settings: Settings) -> None:
    processed(settings, 12)
    assert materialize(settings, selection=["tuning_dataset"]).success
    # What a run killed after recording its attempt leaves: a `running` row with its recipe ...
    with connect(settings.database) as conn:
        backend = FineTuneBackendResource.from_settings(settings)
        claim = claim_run(conn, settings, backend, None, lambda _: None)
    assert claim is not None
    folder = Path(settings.data_dir) / "finetune" / claim.run_id
    (folder / "recipe.json").unlink()  # ... and, say, a folder someone half cleaned up.
    model = metadata(materialize(settings, selection=["fine_tuned_model"]), "fine_tuned_model")
    assert (model["run_id"], model["status"]) == ("v001-none-1", "skipped")
    assert released(settings) == [("v001", "skipped", "v001-none-1")]
    assert json.loads((folder / "recipe.json").read_text())["run_id"] == "v001-none-1"


def _run_files(settings: Settings, run_id: str) -> dict[str, bytes]:
    folder = Path(settings.data_dir) / "finetune" / run_id
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.jsonl"))}


def _strip_split_files(settings: Settings, version: str) -> dict[str, bytes]:
    """Make `version` look cut before versions had their per-split folder (manifest without
    `split_files`, no folder, the committed manifest hash updated); returns the folder's records
    and chat files by the names a run gives them."""
    files = VersionFiles.at(settings.datasets_dir, version)
    manifest_path, folder = files.manifest, files.folder
    manifest = json.loads(manifest_path.read_text("utf-8"))
    saved = {
        f"{split}.{kind}": files.split_file(split, fmt, manifest).read_bytes()
        for split in ("train", "validation")
        for kind, fmt in (("chat.jsonl", "chat"), ("records.jsonl", "records"))
    }
    del manifest["split_files"]
    del manifest["files"]["card"]
    manifest_path.write_text(json.dumps(manifest), "utf-8")
    shutil.rmtree(folder)
    digest = hashlib.sha256(manifest_path.read_bytes()).hexdigest()
    with connect(settings.database) as conn:
        conn.execute(
            "UPDATE dataset_versions SET manifest_sha256 = ? WHERE version = ?", [digest, version]
        )
    return saved


def test_a_run_gets_the_version_split_files_and_a_legacy_version_is_split_again(
    settings: Settings,
) -> None:
    # A version with its per-split folder: the run's files are byte-for-byte the folder's.
    processed(settings, 30)
    assert materialize(settings, selection=["tuning_dataset", "fine_tuned_model"]).success
    files = VersionFiles.at(settings.datasets_dir, "v001")
    manifest = json.loads(files.manifest.read_text("utf-8"))
    run = _run_files(settings, "v001-none-1")
    assert run == {
        f"{split}.{kind}": files.split_file(split, fmt, manifest).read_bytes()
        for split in ("train", "validation")
        for kind, fmt in (("chat.jsonl", "chat"), ("records.jsonl", "records"))
    }
    assert all(run.values())  # both splits hold lines at this size
    # Hard links on one file system: a run costs no copy of its version.
    run_folder = Path(settings.data_dir) / "finetune" / "v001-none-1"
    assert (run_folder / "train.chat.jsonl").samefile(files.split_file("train", "chat", manifest))
    # A version cut before the folder existed is split from its flat files, to the same bytes.
    processed(settings, 30, prefix="g")
    cut = materialize(
        settings, selection=dg.AssetSelection.assets("tuning_dataset").without_checks()
    )
    assert metadata(cut, "tuning_dataset")["version"] == "v002"
    expected = _strip_split_files(settings, "v002")
    assert materialize(settings, selection=["fine_tuned_model"]).success
    assert _run_files(settings, "v002-none-1") == {
        name: body for name, body in expected.items() if body
    }


def _log_messages(instance: dg.DagsterInstance, result: dg.ExecuteInProcessResult) -> list[str]:
    return [entry.user_message for entry in instance.all_logs(result.run_id)]


def test_the_fine_tune_reuses_the_format_check_only_on_the_files_it_read(
    settings: Settings,
) -> None:
    not_again = "dataset_format_valid passed on these very files; not parsed again"
    with dg.instance_for_test() as instance:
        # A release run: the blocking check parses every line, the fine-tune trusts its verdict.
        processed(settings, 12)
        release = materialize(
            settings, selection=["tuning_dataset", "fine_tuned_model"], instance=instance
        )
        assert any(not_again in m for m in _log_messages(instance, release))
        stamps = checks(release)["dataset_format_valid"].metadata["checked_files"].value
        assert set(stamps) == {"jsonl", "chat"}
        # v002 passes its check; then its chat file is rewritten with the same bytes (same
        # sha256, a new mtime): the verdict is about other files now, so the lines are parsed.
        processed(settings, 12, prefix="g")
        cut = materialize(settings, selection=["tuning_dataset"], instance=instance)
        assert checks(cut)["dataset_format_valid"].passed
        chat = next(settings.datasets_dir.glob("*_v002.chat.jsonl"))
        body = chat.read_bytes()
        chat.unlink()
        chat.write_bytes(body)
        alone = materialize(settings, selection=["fine_tuned_model"], instance=instance)
        assert metadata(alone, "fine_tuned_model")["status"] == "skipped"
        assert not any(not_again in m for m in _log_messages(instance, alone))


def test_the_release_log_lines_read_plainly(small_threshold: Settings) -> None:
    # What `qe run` and the UI's run log show a newcomer: a path, not a metadata object's repr;
    # "no version cut" once, not twice.
    settings = small_threshold
    with dg.instance_for_test() as instance:
        processed(settings, 12)
        release = materialize(
            settings, selection=["tuning_dataset", "fine_tuned_model"], instance=instance
        )
        recipe = Path(settings.data_dir) / "finetune" / "v001-none-1" / "recipe.json"
        lines = _log_messages(instance, release)
        assert any(line.endswith(f"the recipe is at {recipe}") for line in lines), lines
        assert not any("MetadataValue" in line for line in lines)
        processed(settings, 5, prefix="g")
        below = materialize(settings, selection=["tuning_dataset"], instance=instance, force=False)
        (line,) = [m for m in _log_messages(instance, below) if "no version cut" in m]
        assert line == "no version cut: 5 ready samples, below the threshold of 20", line


def test_the_documented_bare_python_command_runs_in_this_environment(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The docs say QE_FINETUNE_COMMAND="python examples/…": with the venv not on PATH (a fresh
    # clone, never activated), PATH's python lacks dagster-pipes and the train extra; the
    # command must run with the interpreter running Dagster instead.
    settings = command_settings(settings, SCRIPTS / "pipes_train.py").model_copy(
        update={"finetune_command": f"python {SCRIPTS / 'pipes_train.py'}"}
    )
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    processed(settings, 15)
    result = materialize(settings, selection=["tuning_dataset", "fine_tuned_model"])
    assert metadata(result, "fine_tuned_model")["status"] == "succeeded"
