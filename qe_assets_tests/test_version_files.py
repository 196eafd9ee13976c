"""A version is usable without the database: its split ships in its own files with a dataset card
that the real `datasets` package loads, and its preference pairs (TRL and OpenAI formats) hold
only pairs whose chosen side is trustworthy."""

from __future__ import annotations

import json
import os
from pathlib import Path

import datasets
import pytest

from qe_assets.ingest.queues import FileInbox
from qe_assets.ingest.validation import preference_line_problem
from qe_assets.ops.definitions import build_resources
from qe_assets.release.assets import cut_version
from qe_assets.release.export import VersionFiles
from qe_assets.review import decisions as review
from qe_assets.settings import Settings
from qe_assets.store import connect
from qe_assets_tests.openai_server import ChatRequest, OpenAIServer, Reply
from qe_assets_tests.runs import checks, materialize, metadata
from qe_assets_tests.test_llm import JUDGE_MARKER, llm
from qe_assets_tests.test_pipeline import batch, run_checks

APPROVED = '{"score_a": 2, "score_b": 9, "reason": "grounded"}'
REFUSED = '{"score_a": 5, "score_b": 5, "reason": "no better"}'


def judge_every_third_refused(request: ChatRequest) -> Reply | None:
    """Approves the rewrite of question i unless i % 3 == 0 (then it is never exported)."""
    if JUDGE_MARKER not in request.prompt:
        return None
    number = int(request.prompt.split("number ")[1].split("?")[0])
    return Reply.ok(REFUSED if number % 3 == 0 else APPROVED)


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text("utf-8").splitlines()]


@pytest.fixture
def v001(
    settings: Settings, openai_server: OpenAIServer, monkeypatch: pytest.MonkeyPatch
) -> tuple[Settings, VersionFiles]:
    """30 samples regenerated and judged (20 approved), one human edit, one accepted naive."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-version-files")
    # Proposals off: the accepted review sample keeps its naive completion (no preference pair).
    settings = llm(settings, openai_server, llm_judge=True, llm_propose_review=False)
    openai_server.responder = judge_every_third_refused
    FileInbox(settings.inbox_dir).put(batch("a", 30) + batch("low", 2, score=0.2))
    assert materialize(settings, selection=["raw_events", "annotated_samples", "completions"])
    with connect(settings.database) as conn:
        low = sorted(
            r[0]
            for r in conn.execute(
                "SELECT sample_id FROM annotated_samples WHERE route = 'review'"
            ).fetchall()
        )
        review.edit(conn, low[0], "A careful answer written by a person.", "ana")
        review.accept(conn, low[1], "ana")
    result = materialize(settings)
    assert metadata(result, "tuning_dataset")["preference_pairs"] == 21
    assert checks(result)["preference_format_valid"].passed
    return settings, VersionFiles.at(settings.datasets_dir, "v001")


def test_datasets_loads_the_split_and_every_format_from_the_version_folder(
    v001: tuple[Settings, VersionFiles],
) -> None:
    settings, files = v001
    manifest = json.loads(files.manifest.read_text("utf-8"))
    records = datasets.load_dataset(str(files.folder))
    assert set(records) == {"train", "validation"}
    counts = {split: records[split].num_rows for split in records}
    assert counts == {s: manifest["counts"][s] for s in ("train", "validation")}
    assert sum(counts.values()) == 22 and counts["validation"] > 0
    with connect(settings.database, read_only=True) as conn:
        stored = dict(conn.execute("SELECT sample_id, split FROM dataset_samples").fetchall())
    assert {r["sample_id"]: split for split in records for r in records[split]} == stored
    # The split files hold exactly the whole file's lines.
    whole = sorted(files.jsonl.read_text("utf-8").splitlines())
    parts = [
        files.split_file(s, "records", manifest).read_text("utf-8") for s in ("train", "validation")
    ]
    assert sorted("".join(parts).splitlines()) == whole
    chat = datasets.load_dataset(str(files.folder), "chat")
    assert {s: chat[s].num_rows for s in chat} == counts
    assert chat["train"][0]["messages"][-1]["role"] == "assistant"


def test_preference_pairs_are_the_trusted_corrections_against_the_original_answers(
    v001: tuple[Settings, VersionFiles],
) -> None:
    settings, files = v001
    manifest = json.loads(files.manifest.read_text("utf-8"))
    assert manifest["preference"]["chosen_from"] == {"human": 1, "llm": 20}
    assert manifest["files"]["preference"]["lines"] == 21
    pairs = lines(files.preference)
    with connect(settings.database, read_only=True) as conn:
        truth = {
            prompt: (completion, original, mode)
            for prompt, completion, original, mode in conn.execute(
                "SELECT s.prompt, c.completion, s.original_answer, c.mode "
                "FROM completions c JOIN annotated_samples s USING (sample_id) "
                "WHERE c.status = 'ok'"
            ).fetchall()
        }
    for pair in pairs:
        assert pair["prompt"][-1]["role"] == "user"
        completion, original, mode = truth[pair["prompt"][-1]["content"]]
        assert mode in ("human", "llm")  # the accepted naive one never forms a pair
        assert pair["chosen"] == [{"role": "assistant", "content": completion}]
        assert pair["rejected"] == [{"role": "assistant", "content": original}]
    preference = datasets.load_dataset(str(files.folder), "preference")
    assert sum(preference[s].num_rows for s in preference) == 21
    openai_lines = [
        line
        for split in ("train", "validation")
        for line in lines(files.split_file(split, "openai_preference", manifest))
    ]
    assert len(openai_lines) == 21
    assert all(preference_line_problem(line, "openai") is None for line in openai_lines)
    assert {line["preferred_output"][0]["content"] for line in openai_lines} == {
        pair["chosen"][0]["content"] for pair in pairs
    }


def test_a_version_without_pairs_still_loads_and_has_empty_preference_files(
    settings: Settings,
) -> None:
    FileInbox(settings.inbox_dir).put(batch("n", 15))
    result = materialize(settings)  # naive completions only
    assert checks(result)["preference_format_valid"].passed
    files = VersionFiles.at(settings.datasets_dir, "v001")
    assert files.preference.read_bytes() == b""
    card = (files.folder / "README.md").read_text("utf-8")
    assert "config_name: preference" not in card and "config_name: chat" in card
    assert datasets.load_dataset(str(files.folder))["train"].num_rows > 0


def test_the_preference_check_blocks_a_broken_pair_file(
    v001: tuple[Settings, VersionFiles],
) -> None:
    settings, files = v001
    manifest = json.loads(files.manifest.read_text("utf-8"))
    path = files.split_file("train", "openai_preference", manifest)
    broken = lines(path)
    broken[0]["preferred_output"] = broken[0]["non_preferred_output"]
    del broken[1]["input"]
    path.write_text("".join(json.dumps(x) + "\n" for x in broken), "utf-8")
    evaluation = run_checks(settings)["preference_format_valid"]
    assert not evaluation.passed
    description = evaluation.description or ""
    assert f"rag_quality_tuning_v001/{path.name}" in description
    assert path.name == f"train-{manifest['fingerprint']}.openai_preference.jsonl"
    assert "preferred_output and non_preferred_output are the same answer on lines 1" in description
    assert "keys other than input" in description


@pytest.mark.parametrize(
    ("line", "flavour", "problem"),
    [
        ({"prompt": [], "chosen": [], "rejected": []}, "trl", "prompt is not a non-empty list"),
        (
            {
                "prompt": [{"role": "user", "content": "q"}],
                "chosen": [{"role": "user", "content": "a"}],
                "rejected": [{"role": "assistant", "content": "b"}],
            },
            "trl",
            "chosen is not exactly one assistant message",
        ),
        (
            {
                "input": {"messages": [{"role": "assistant", "content": "q"}]},
                "preferred_output": [{"role": "assistant", "content": "a"}],
                "non_preferred_output": [{"role": "assistant", "content": "b"}],
            },
            "openai",
            "input does not end with a user message",
        ),
        (
            {
                "input": {"messages": [{"role": "user", "content": "q"}]},
                "preferred_output": [{"role": "assistant", "content": " "}],
                "non_preferred_output": [{"role": "assistant", "content": "b"}],
            },
            "openai",
            "preferred_output holds empty or missing content",
        ),
    ],
)
def test_preference_line_rules(line: dict, flavour: str, problem: str) -> None:
    assert (preference_line_problem(line, flavour) or "").startswith(problem)


def test_the_rejected_answer_of_a_pair_is_redacted(
    settings: Settings, openai_server: OpenAIServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-version-files")
    # Proposals off: the accepted review sample keeps its naive completion (no preference pair).
    settings = llm(settings, openai_server, llm_judge=True, llm_propose_review=False)
    openai_server.responder = judge_every_third_refused
    events = [
        {**json.loads(x), "answer": f"Mail bo.li{i}@example.com for it."}
        for i, x in enumerate(batch("p", 15))
    ]
    FileInbox(settings.inbox_dir).put([json.dumps(e) for e in events])
    result = materialize(settings)
    assert checks(result)["preference_format_valid"].passed
    files = VersionFiles.at(settings.datasets_dir, "v001")
    pairs = lines(files.preference)
    assert len(pairs) == 10  # 15 rewrites, every third refused by the judge
    assert {p["rejected"][0]["content"] for p in pairs} == {"Mail [EMAIL] for it."}
    manifest = json.loads(files.manifest.read_text("utf-8"))
    path = files.split_file("train", "openai_preference", manifest)
    assert "@example.com" not in path.read_text("utf-8")


def test_two_folders_of_one_name_load_their_own_rows_through_one_cache(tmp_path: Path) -> None:
    """Issue #26 item 11: `datasets` caches a local folder by its name and its card's patterns, so
    `rag_quality_tuning_v001` of two data dirs loaded the rows of whichever was loaded first.
    The per-split files carry the fingerprint of the folder's data, so each loads its own."""
    loaded = {}
    for name, events in (("one", 12), ("two", 14)):
        settings = Settings(data_dir=str(tmp_path / name), spot_check_share=0.0, eval_share=0.0)
        FileInbox(settings.inbox_dir).put(batch(name, events))
        stages = ["raw_events", "annotated_samples", "completions"]
        assert materialize(settings, selection=stages).success
        assert cut_version(build_resources(settings)["duckdb"], settings) is not None
        files = VersionFiles.at(settings.datasets_dir, "v001")
        records = datasets.load_dataset(str(files.folder))
        loaded[name] = (
            sorted(r["prompt"] for split in records for r in records[split]),
            sorted(json.loads(x)["prompt"] for x in files.jsonl.read_text("utf-8").splitlines()),
        )
    for name, (rows, written) in loaded.items():
        assert rows == written and len(rows) > 0, name
    assert loaded["one"][0] != loaded["two"][0]


def test_the_tests_use_their_own_huggingface_cache() -> None:
    # A machine whose ~/.cache/huggingface holds another project's `rag_quality_tuning_v002`
    # must not change what these tests load (conftest points HF_HOME at a session folder).
    home = Path(os.environ["HF_HOME"])
    assert Path(datasets.config.HF_DATASETS_CACHE).is_relative_to(home)
    assert not home.is_relative_to(Path.home() / ".cache")


def test_a_failed_write_on_the_writing_thread_fails_the_cut_and_leaves_no_file(
    tmp_path: Path,
) -> None:
    import polars as pl

    from qe_assets.release.export import VersionWriter

    records = pl.DataFrame({"sample_id": ["a", "b"], "prompt": ["p", "q"]})
    chat = pl.Series(["{}", "{}"])
    splits = pl.Series(["train", "validation"])
    with pytest.raises(ValueError, match="closed file"), VersionWriter(tmp_path, "v001") as writer:
        writer.write(records, chat, splits)
        # What a failing disk looks like to the writing thread: its next write raises.
        writer._sinks["chat"].handle.close()
        writer.write(records, chat, splits)
        writer.publish({"version": "v001"}, lambda manifest: "card")
    assert list(tmp_path.iterdir()) == []
