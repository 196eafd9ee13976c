"""The `openai` backend: upload the chat files (or, with `QE_FINETUNE_METHOD=dpo`, the preference
pairs in OpenAI's preference format), create a fine-tuning job, follow it with bounded
polling. The job id is saved before anything waits on it, so a restarted run follows the same job.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from qe_assets.finetune.inputs import TrainingInputs

if TYPE_CHECKING:  # clients come from the resource, which imports openai when it makes one
    import openai

TERMINAL = ("succeeded", "failed", "cancelled")
RUN_ID_KEY = "qe_run_id"

Save = Callable[..., None]


class FineTuneFailed(RuntimeError):
    """The provider ended the job as failed or cancelled; the message is the provider's."""

    def __init__(self, message: str, outcome: JobOutcome) -> None:
        super().__init__(message)
        self.outcome = outcome


class FineTuneStillRunning(RuntimeError):
    """The deadline passed before the job finished; re-running resumes following it."""


@dataclass
class JobOutcome:
    job_id: str
    status: str
    model_id: str | None
    events: list[str] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)


def _upload(client: openai.OpenAI, path: str) -> str:
    with open(path, "rb") as handle:
        return client.files.create(file=handle, purpose="fine-tune").id


def find_job(client: openai.OpenAI, run_id: str) -> str | None:
    """A job created for `run_id` whose id was not saved (a crash right after creating it)."""
    for job in client.fine_tuning.jobs.list(limit=100):
        if (job.metadata or {}).get(RUN_ID_KEY) == run_id:
            return job.id
    return None


def training_files(inputs: TrainingInputs) -> tuple[str, str | None]:
    """(training, validation) files to upload: the chat splits for sft, the version's OpenAI
    preference splits for dpo."""
    if inputs.method == "dpo":
        if inputs.train_openai_preference_path is None:
            raise ValueError(f"{inputs.version}: no preference pairs to train on with dpo")
        return inputs.train_openai_preference_path, inputs.validation_openai_preference_path
    return inputs.train_chat_path, inputs.validation_chat_path


def start_job(client: openai.OpenAI, inputs: TrainingInputs, save: Save) -> str:
    """Upload, create the job, save its id; returns the job id (an existing one if found)."""
    existing = find_job(client, inputs.run_id)
    if existing is not None:
        save(job_id=existing)
        return existing
    train_path, validation_path = training_files(inputs)
    training_file = _upload(client, train_path)
    validation_file = _upload(client, validation_path) if validation_path else None
    save(training_file_id=training_file, validation_file_id=validation_file)
    options: dict[str, Any] = {}
    if inputs.method == "dpo":
        # Preference fine-tuning needs the method named even with no hyperparameters.
        options["method"] = {"type": "dpo", "dpo": {"hyperparameters": inputs.hyperparameters}}
    elif inputs.hyperparameters:
        options["method"] = {
            "type": "supervised",
            "supervised": {"hyperparameters": inputs.hyperparameters},
        }
    if validation_file:
        options["validation_file"] = validation_file
    job = client.fine_tuning.jobs.create(
        model=inputs.base_model,
        training_file=training_file,
        suffix=inputs.suffix,
        metadata={RUN_ID_KEY: inputs.run_id, "dataset_version": inputs.version},
        **options,
    )
    save(job_id=job.id, status="running")
    return job.id


def follow_job(
    client: openai.OpenAI,
    job_id: str,
    *,
    poll_seconds: float,
    deadline_seconds: float,
    on_status: Callable[[str], None] = lambda status: None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> JobOutcome:
    """Poll until the job is terminal or the deadline passes (then FineTuneStillRunning)."""
    deadline = clock() + deadline_seconds
    while True:
        job = client.fine_tuning.jobs.retrieve(job_id)
        on_status(job.status)
        if job.status in TERMINAL:
            break
        if clock() + poll_seconds > deadline:
            raise FineTuneStillRunning(
                f"fine-tuning job {job_id} is still {job.status} after {deadline_seconds:.0f}s; "
                "materialize fine_tuned_model again to keep following it"
            )
        sleep(poll_seconds)
    events = [
        f"{event.level}: {event.message}"
        for event in client.fine_tuning.jobs.list_events(job_id, limit=100).data
    ]
    outcome = JobOutcome(job_id, job.status, job.fine_tuned_model, list(reversed(events)))
    outcome.metrics = {
        "trained_tokens": job.trained_tokens,
        "result_files": list(job.result_files or []),
    }
    if job.status != "succeeded":
        error = job.error
        message = (error.message if error and error.message else None) or f"job {job.status}"
        raise FineTuneFailed(f"fine-tuning job {job_id} {job.status}: {message}", outcome)
    return outcome
