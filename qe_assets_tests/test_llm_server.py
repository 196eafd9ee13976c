"""The fake server speaks enough of the files and fine-tuning API for the real openai client."""

from __future__ import annotations

import json

import openai
import pytest

from qe_assets_tests.openai_server import OpenAIServer, Reply


@pytest.fixture
def client(openai_server: OpenAIServer) -> openai.OpenAI:
    return openai.OpenAI(api_key="sk-test-ft", base_url=openai_server.base_url, max_retries=0)


def test_upload_then_fine_tune_to_success(
    client: openai.OpenAI, openai_server: OpenAIServer
) -> None:
    data = b'{"messages": [{"role": "user", "content": "hi"}]}\n'
    uploaded = client.files.create(file=("train.jsonl", data), purpose="fine-tune")
    assert uploaded.id.startswith("file-") and uploaded.bytes == len(data)
    assert (uploaded.filename, uploaded.purpose, uploaded.status) == (
        "train.jsonl",
        "fine-tune",
        "processed",
    )
    assert openai_server.file_content(uploaded.id) == data
    validation = client.files.create(file=("val.jsonl", data), purpose="fine-tune")

    job = client.fine_tuning.jobs.create(
        model="gpt-4o-mini-2024-07-18",
        training_file=uploaded.id,
        validation_file=validation.id,
        suffix="qe",
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2}}},
    )
    assert job.id.startswith("ftjob-") and job.status == "validating_files"
    assert job.hyperparameters.n_epochs == 2
    assert job.validation_file == validation.id
    assert client.fine_tuning.jobs.retrieve(job.id).status == "running"
    done = client.fine_tuning.jobs.retrieve(job.id)
    assert done.status == "succeeded"
    assert done.fine_tuned_model == f"ft:gpt-4o-mini-2024-07-18:qe:{job.id}"
    assert client.fine_tuning.jobs.retrieve(job.id).status == "succeeded"  # stays there

    page = client.fine_tuning.jobs.list_events(job.id, limit=2)
    assert [e.message for e in page.data] == ["Job status: succeeded", "Job status: running"]
    assert page.has_more
    events = list(client.fine_tuning.jobs.list_events(job.id, limit=2))  # follows `after`
    assert [e.message for e in events][-1].startswith("Created fine-tuning job")
    assert all(e.object == "fine_tuning.job.event" and e.level == "info" for e in events)
    assert [j.id for j in client.fine_tuning.jobs.list()] == [job.id]


def test_failing_and_cancelled_jobs(client: openai.OpenAI, openai_server: OpenAIServer) -> None:
    # A well-formed file (the server checks each line's keys): the job fails by its script.
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    line = json.dumps({"messages": messages}).encode()
    uploaded = client.files.create(file=("t.jsonl", line + b"\n"), purpose="fine-tune")
    openai_server.job_script = ["validating_files", "failed"]
    failing = client.fine_tuning.jobs.create(model="base", training_file=uploaded.id)
    failed = client.fine_tuning.jobs.retrieve(failing.id)
    assert failed.status == "failed" and failed.error is not None
    assert (failed.error.code, failed.error.param) == ("invalid_training_file", "training_file")
    assert failed.fine_tuned_model is None

    openai_server.job_script = ["validating_files", "running", "running", "succeeded"]
    job = client.fine_tuning.jobs.create(model="base", training_file=uploaded.id)
    assert client.fine_tuning.jobs.cancel(job.id).status == "cancelled"
    assert client.fine_tuning.jobs.retrieve(job.id).status == "cancelled"

    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.jobs.retrieve("ftjob-missing")
    with pytest.raises(openai.BadRequestError):
        client.fine_tuning.jobs.create(model="base", training_file="file-missing")


def test_chat_faults_reach_the_client_as_the_real_api_would(
    client: openai.OpenAI, openai_server: OpenAIServer
) -> None:
    messages = [{"role": "user", "content": "q"}]
    openai_server.plan(Reply.truncated(), Reply.status_error(400))
    truncated = client.chat.completions.create(model="m", messages=messages)  # type: ignore[arg-type]
    assert truncated.choices[0].finish_reason == "length"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="m", messages=messages)  # type: ignore[arg-type]
    answer = client.chat.completions.create(model="m", messages=messages)  # type: ignore[arg-type]
    assert answer.usage is not None and answer.usage.prompt_tokens == 1
    assert openai_server.prompt_counts().total() == 3
