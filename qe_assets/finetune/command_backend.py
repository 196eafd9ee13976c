"""The `command` backend: a user's training command run through Dagster Pipes.

The command receives the recipe (dataset paths, split files, base model, hyperparameters,
weighting) as Pipes extras and reports its metrics and the model it produced with
`report_asset_materialization(metadata={"model_id" or "model_path": ..., ...})`.
"""

from __future__ import annotations

import codecs
import os
import shlex
import signal
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import dagster as dg
from dagster._core.errors import DagsterPipesExecutionError  # not exported by dagster

from qe_assets.finetune.inputs import TrainingInputs
from qe_assets.finetune.k8s import K8sTarget, run_in_pod

MODEL_KEYS = ("model_id", "model_path")
# A bare interpreter name at the head of the command means this environment's interpreter: the
# documented `python examples/…` would otherwise find the system python, which lacks the
# packages installed here (dagster_pipes first), and fail before training anything.
INTERPRETERS = frozenset({"python", "python3", f"python3.{sys.version_info.minor}"})
STDERR_TAIL_LINES = 12
STDERR_TAIL_CHARS = 1200


def command_argv(command: str) -> list[str]:
    """The command as argv, a bare `python`/`python3` replaced by `sys.executable`."""
    argv = shlex.split(command)
    if argv and argv[0] in INTERPRETERS:
        argv[0] = sys.executable
    return argv


def stderr_tail(lines: Sequence[str]) -> str:
    """The last lines the command wrote to stderr, progress bars' carriage returns resolved to
    their final state, cut to a size a table cell and a log line can hold."""
    shown = [line.rsplit("\r", 1)[-1].rstrip() for line in lines]
    text = "\n".join(line for line in shown if line)
    return text[-STDERR_TAIL_CHARS:]


def run_command(
    context: dg.AssetExecutionContext,
    command: str,
    inputs: TrainingInputs,
    k8s: K8sTarget | None = None,
) -> dict[str, Any]:
    """Run the command (a local subprocess, or a Kubernetes pod with `k8s`); returns the
    metadata it reported (values unwrapped). A failed command raises with the exception the
    script reported through Pipes, when it reported one, and the last lines of its stderr."""
    if k8s is not None:
        return _reported(_run_in_pod(context, command, inputs, k8s))
    tail: deque[str] = deque(maxlen=STDERR_TAIL_LINES)
    log_path = Path(inputs.train_chat_path).parent / "stderr.log"
    try:
        invocation = run_pipes_subprocess(
            context, command_argv(command), inputs.recipe(), log_path, tail
        )
    except DagsterPipesExecutionError as exc:
        reported = reported_exception(context)
        last = stderr_tail(tail)
        detail = f": {reported}" if reported else ""
        # The script's own words when it reported an exception through Pipes; its stderr when
        # it died before it could (an import error, a crash in a library, out of memory).
        detail += f"\n--- last lines of stderr ({log_path}) ---\n{last}" if last else ""
        raise RuntimeError(f"{exc}{detail}") from exc
    return _reported(invocation)


def _run_in_pod(
    context: dg.AssetExecutionContext, command: str, inputs: TrainingInputs, k8s: K8sTarget
) -> dg.PipesClientCompletedInvocation:
    train = Path(inputs.train_chat_path)
    if not train.is_absolute():
        raise RuntimeError(
            "QE_FINETUNE_K8S needs an absolute QE_DATA_DIR: the pod finds the recipe's files "
            f"on its data volume by their absolute paths, and {train} is relative"
        )
    data_dir = str(train.parents[2])  # <data>/finetune/<run_id>/train.chat.jsonl
    try:
        return run_in_pod(context, k8s, command, inputs.recipe(), data_dir)
    except DagsterPipesExecutionError as exc:
        reported = reported_exception(context)
        raise RuntimeError(f"{exc}: {reported}" if reported else str(exc)) from exc


def _reported(invocation: dg.PipesClientCompletedInvocation) -> dict[str, Any]:
    reported: dict[str, Any] = {}
    for result in invocation.get_results():
        for key, value in (getattr(result, "metadata", None) or {}).items():
            reported[key] = getattr(value, "value", value)
    return reported


def run_pipes_subprocess(
    context: dg.AssetExecutionContext,
    argv: list[str],
    extras: dict[str, Any],
    log_path: Path,
    tail: deque[str],
) -> dg.PipesClientCompletedInvocation:
    """`PipesSubprocessClient.run`, but with the command's stderr read here: every line is
    passed on to this process's stderr (the run's log shows it as before), appended to
    `log_path` for the post-mortem, and the last ones kept in `tail` for the failure message.
    (Dagster's client either forwards stderr untouched or pipes it without reading it, which
    blocks a chatty command once the pipe is full.)"""
    with dg.open_pipes_session(
        context=context,
        context_injector=dg.PipesTempFileContextInjector(),
        message_reader=dg.PipesTempFileMessageReader(),
        extras=extras,
    ) as session:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        process = subprocess.Popen(
            argv,
            env={**os.environ, **session.get_bootstrap_env_vars()},
            stderr=subprocess.PIPE,
        )
        assert process.stderr is not None
        # The reader owns the log and closes it at the stream's end: a child the command left
        # behind may hold its stderr open past the wait below and still write to it.
        reader = threading.Thread(
            target=_copy_stderr, args=(process.stderr, log_path, tail), daemon=True
        )
        reader.start()
        try:
            process.wait()
        except dg.DagsterExecutionInterruptedError:
            context.log.info("[pipes] execution interrupted, sending SIGINT to subprocess.")
            process.send_signal(signal.SIGINT)
            process.wait(timeout=20)
            raise
        finally:
            reader.join(timeout=5)
        if process.returncode != 0:
            raise DagsterPipesExecutionError(
                f"External execution process failed with code {process.returncode}"
            )
    return dg.PipesClientCompletedInvocation(session)


def _copy_stderr(stream: IO[bytes], log_path: Path, tail: deque[str]) -> None:
    """Pass each chunk on as it comes (a progress bar redraws with carriage returns and no
    newline for minutes), append it to `log_path`, and keep the finished lines in `tail`."""
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    pending = ""
    with open(log_path, "ab") as log:
        while chunk := stream.read1(65536):  # type: ignore[attr-defined]
            text = decoder.decode(chunk)
            sys.stderr.write(text)
            sys.stderr.flush()
            log.write(chunk)
            log.flush()  # read by the failure message and a post-mortem while it runs
            *lines, pending = (pending + text).split("\n")
            tail.extend(lines)
            pending = pending[-4096:]  # a bar redrawn in place: only its last state matters
    if pending:
        tail.append(pending)


def model_of(reported: dict[str, Any]) -> str | None:
    for key in MODEL_KEYS:
        if reported.get(key):
            return str(reported[key])
    return None


def reported_exception(context: dg.AssetExecutionContext) -> str | None:
    """The last exception the external process reported when closing Pipes, e.g. a missing
    setting of the training script, as "Class: message"."""
    for record in reversed(
        context.instance.all_logs(context.run.run_id, of_type=dg.DagsterEventType.ENGINE_EVENT)
    ):
        event = record.dagster_event
        data = event.engine_event_data if event is not None else None
        if data is not None and data.error is not None and "pipes closed" in (event.message or ""):
            return data.error.message.strip()
    return None
