"""Crash-test worker: runs the pipeline in a real process that the test kills with SIGKILL.

Two ways to start it:

* `python crash_worker.py run [direct|dagster]`: one run in this process, configured by the QE_*
  environment; progress markers go to stdout as JSON lines.
* `python crash_worker.py serve`: a zygote. It imports qe_assets, Dagster, DuckDB and Polars once,
  then reads one JSON command per stdin line, `{"env": {...}, "mode": "direct"|"dagster"}`, and
  forks a child per command that runs the pipeline with that environment. The zygote writes
  `{"event": "started", "pid": ...}` and, once the child is gone, `{"event": "exited", "pid": ...,
  "signal": ...|null, "code": ...|null}`. Forking from a preloaded parent (what multiprocessing's
  forkserver does) saves the ~2-5 s Dagster import per run, so a CI run affords more kills; the
  child is still a separate OS process, and SIGKILL takes it down with no cleanup at all.

Fork safety: the zygote imports only libraries that start no threads (see `PRELOAD`) and runs no
pipeline code itself, so it is single-threaded when it forks (checked through /proc before every
fork); each child imports qe_assets and Polars itself.

`direct` mode runs the same functions the assets run, in the same order and with the same
connection handling (`writer_session` per stage, `duckdb_writer` elsewhere): ingest every queue →
annotate → complete → release while one is due (`readiness.release_while_due`, as `qe run` does):
publish the version (`next_release`: a committed one never released, else a new cut), then the
fine-tune with backend `none` (`claim_run`, then the `skipped` row). With another backend (the
gate's trials) the fine-tune records a model and `model_evaluation`'s body (`evaluate_candidate`)
evaluates it; a release whose gate never ended only evaluates. `dagster` mode runs
`qe_assets.ops.runner.run_pipeline(..., cut_version=True)` (what `qe run --cut-version` does)
against
DAGSTER_HOME.

Markers (`{"event": "phase", "phase": ..., "pid": ..., "t": monotonic}`) are written with one
`os.write` each, so lines from the zygote and its children never interleave within a line.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dagster_duckdb import DuckDBResource

    from qe_assets.settings import Settings

# What the zygote imports before forking: the heavy libraries that start no threads at import.
# Polars does start threads when imported (jemalloc, its spill cleaner), and qe_assets imports
# Polars, so those are imported by each child instead (~0.7 s, against ~2-5 s for all of it).
PRELOAD = ("dagster", "dagster_duckdb", "duckdb", "pydantic", "redis", "openai")

PHASES = (
    "boot",
    "ingest",
    "annotate",
    "complete",
    "export",
    "finetune",
    "evaluate",
    "decided",
    "done",
)


def emit(message: dict[str, Any]) -> None:
    os.write(1, (json.dumps(message) + "\n").encode())


def mark(phase: str) -> None:
    emit({"event": "phase", "phase": phase, "pid": os.getpid(), "t": time.monotonic()})


def run_direct(settings: Settings) -> None:
    from dagster_duckdb import DuckDBResource

    from qe_assets.annotate.assets import annotate_config, annotate_pending
    from qe_assets.annotate.complete import complete_next_batch
    from qe_assets.ingest.assets import IngestReport, ingest_pending
    from qe_assets.ingest.resource import drained_queues
    from qe_assets.lib.resources import duckdb_writer, writer_session
    from qe_assets.release.readiness import release_while_due

    settings.database.parent.mkdir(parents=True, exist_ok=True)  # as the first writer would
    resource = DuckDBResource(database=str(settings.database))

    def batch_done(report: IngestReport) -> None:
        mark("ingest_batch")

    mark("ingest")
    with writer_session(resource) as session:
        for queue in drained_queues(settings):
            ingest_pending(
                queue,
                session.connection,
                batch_size=settings.ingest_batch_size,
                on_batch=batch_done,
            )
    mark("annotate")
    with writer_session(resource) as session:
        annotate_pending(
            session.connection,
            annotate_config(settings),
            batch_size=settings.ingest_batch_size,
            spot_share=settings.spot_check_share,
        )
    mark("complete")
    while True:
        with duckdb_writer(resource) as conn:
            scanned, _ = complete_next_batch(conn, settings.ingest_batch_size)
        if not scanned:
            break
    mark("export")
    release_while_due(
        settings, lambda decision: release_direct(resource, settings, decision), cut_version=True
    )
    mark("done")


def release_direct(resource: DuckDBResource, settings: Settings, decision: Any) -> bool:
    """What one release run does, without Dagster and its checks: publish (or cut) the version,
    then fine-tune on it with backend `none`, or, with another backend (the gate's trials),
    record a trained model (`ft:<base>:qe:<version>`) and evaluate it as `model_evaluation`
    does; a release whose gate never ended (`decision.gate`) only evaluates, as `qe run`."""
    from qe_assets.finetune.assets import SKIPPED_MESSAGE, claim_run
    from qe_assets.finetune.resource import FineTuneBackendResource
    from qe_assets.lib.resources import duckdb_writer
    from qe_assets.release.assets import next_release
    from qe_assets.store.finetune_runs import save_run

    backend = FineTuneBackendResource.from_settings(settings)
    # model_evaluation runs after a fine-tune that made a model, or alone for an unfinished gate.
    evaluate = decision.gate is not None
    if decision.gate is None:
        next_release(resource, settings, force=True)  # as `qe run --cut-version`
        mark("finetune")  # the version is committed: a kill from here on is "right after a commit"
        with duckdb_writer(resource) as conn:
            claim = claim_run(conn, settings, backend, None, lambda _: None)
        if claim is not None:
            with duckdb_writer(resource) as conn:
                if backend.configured:  # the fine-tune job is not under test: its model is
                    model = f"ft:{settings.finetune_base_model}:qe:{claim.version}"
                    save_run(conn, claim.run_id, status="succeeded", model_id=model)
                    evaluate = True
                else:
                    save_run(conn, claim.run_id, status="skipped", message=SKIPPED_MESSAGE)
    if evaluate:
        evaluate_direct(resource, settings, backend)
    return True


class _Log:
    def info(self, message: str) -> None:
        pass

    warning = info


def evaluate_direct(resource: DuckDBResource, settings: Settings, backend: Any) -> None:
    """`model_evaluation`'s body (`evaluate_candidate`): compare, then commit the decision with
    its promotion."""
    from qe_assets.evaluation.assets import evaluate_candidate
    from qe_assets.lib.resources import OpenAIResource

    openai = OpenAIResource(
        api_key=os.environ.get("OPENAI_API_KEY"),
        base_url=settings.openai_base_url,
        timeout_seconds=settings.llm_timeout_seconds,
        max_retries=settings.llm_max_retries,
    )
    mark("evaluate")
    evaluate_candidate(_Log(), f"direct-{os.getpid()}", resource, settings, backend, openai)
    mark("decided")  # the decision and its promotion are committed


def run_dagster(settings: Settings) -> None:
    from qe_assets.ops.runner import run_pipeline

    mark("ingest")  # run_pipeline has no hooks: the whole run is one phase from outside
    outcome = run_pipeline(settings, cut_version=True)
    if not outcome.success:
        emit({"event": "failed", "pid": os.getpid(), "error": outcome.error})
        os._exit(1)
    mark("done")


def run_once(mode: str) -> None:
    mark("boot")
    from qe_assets.settings import Settings

    settings = Settings.from_env()
    if mode == "dagster":
        run_dagster(settings)
    else:
        run_direct(settings)


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def serve() -> None:
    # The zygote stays single-threaded, which is what makes fork safe here (see the docstring).
    for module in PRELOAD:
        importlib.import_module(module)
    for line in sys.stdin:
        if not line.strip():
            continue
        command = json.loads(line)
        if _threads() != 1:
            emit({"event": "error", "error": f"zygote has {_threads()} threads; refusing to fork"})
            continue
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                os.environ.update(command["env"])
                run_once(command.get("mode", "direct"))
            except BaseException as exc:  # report, then exit without running the zygote's code
                emit({"event": "failed", "pid": os.getpid(), "error": repr(exc)})
                code = 1
            os._exit(code)
        emit({"event": "started", "pid": pid})
        _, status = os.waitpid(pid, 0)
        emit(
            {
                "event": "exited",
                "pid": pid,
                "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
                "code": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
            }
        )


def main(argv: list[str]) -> int:
    if argv[:1] == ["serve"]:
        serve()
        return 0
    if argv[:1] == ["run"]:
        run_once(argv[1] if len(argv) > 1 else "direct")
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
