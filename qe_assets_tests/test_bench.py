"""The benchmark's anchors do the same work as the pipeline: same prompts, same completions.

If they drifted apart, `make bench` would compare us with something else; here they run on a few
hundred bench-sized events next to a real materialization of the graph.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from qe_assets.ingest.queues import FileInbox
from qe_assets.ops.demo import BENCH_DOC_CHARS, BENCH_DOCS_PER_EVENT, generate_events
from qe_assets.settings import Settings
from qe_assets.testing.openai_server import spawned
from qe_assets_bench.pipeline import anchor_b, anchor_c, anchor_d, build_spec
from qe_assets_tests.runs import materialize

EVENTS = 300


@pytest.fixture
def events(tmp_path: Path) -> Path:
    lines = generate_events(
        EVENTS, seed=11, docs_per_event=BENCH_DOCS_PER_EVENT, doc_chars=BENCH_DOC_CHARS
    )
    path = tmp_path / "events.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def ours(settings: Settings, events: Path) -> pl.DataFrame:
    FileInbox(settings.inbox_dir).put(events.read_text("utf-8").splitlines())
    materialize(settings)
    (version,) = sorted(settings.datasets_dir.glob("rag_quality_tuning_v*[0-9].jsonl"))
    return pl.read_ndjson(version).select(
        pl.col("sample_id").str.split("#").list.first().alias("request_id"),
        "prompt",
        "completion",
        "label",
        "confidence",
    )


def test_anchors_build_our_samples(settings: Settings, events: Path, tmp_path: Path) -> None:
    spec = json.loads(json.dumps(build_spec()))  # as the helpers get it
    expected = ours(settings, events)
    assert expected.height > 50

    anchor_b(events, tmp_path / "b.jsonl", spec)
    anchor_c(events, tmp_path / "c.jsonl", spec)
    d = anchor_d(events, tmp_path / "d.jsonl", spec)
    stored = len({json.loads(line)["request_id"] for line in events.read_text().splitlines()})
    assert d["counts"]["raw_events"] == d["counts"]["annotated_samples"] == stored
    assert set(d["stages"]) == {"raw_events", "annotated_samples", "completions", "tuning_dataset"}

    columns = ["request_id", "prompt", "completion", "label", "confidence"]
    for name in ("b", "c", "d"):
        frame = pl.read_ndjson(tmp_path / f"{name}.jsonl")
        if "request_id" not in frame.columns:
            frame = frame.with_columns(request_id=pl.col("sample_id").str.split("#").list.first())
        got = expected.select("request_id").join(
            frame.select(columns).unique("request_id"), on="request_id", how="left"
        )
        assert got["prompt"].null_count() == 0, name
        assert got.select(columns).equals(expected.select(columns)), name


def test_the_benchmarks_import_nothing_from_the_test_suite() -> None:
    # The shared helpers live in qe_assets.testing; the bench must run from an installed package.
    code = (
        "import importlib, pkgutil, sys, qe_assets_bench as b\n"
        "for m in pkgutil.iter_modules(b.__path__):\n"
        "    importlib.import_module(f'qe_assets_bench.{m.name}')\n"
        "print(sorted(m for m in sys.modules if m.startswith('qe_assets_tests')))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert result.stdout.strip() == "[]"


def test_the_spawned_test_server_answers_the_real_client() -> None:
    import openai

    with spawned(latency=0.0) as server:
        client = openai.OpenAI(api_key="test", base_url=server.base_url, max_retries=0)
        reply = client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hello"}]
        )
        assert reply.choices[0].message.content
        assert server.chat_count == 1


def test_the_bare_training_run_gets_the_recipe_through_pipes_as_the_asset_gives_it(
    tmp_path: Path,
) -> None:
    """training_overhead's (A) hands the TRL script the asset's recipe without Dagster: the
    script must read it as its Pipes extras and its report must land in the messages file."""
    from qe_assets_bench.training_overhead import RECIPE, bare_command

    env_vars = {"QE_TRL_MODEL": "m", "QE_TRL_OUTPUT_DIR": "o", "OPENAI_API_KEY": "k"}
    (tmp_path / "env.json").write_text(json.dumps(env_vars), "utf-8")
    (tmp_path / RECIPE).write_text(json.dumps({"version": "v001", "run_id": "x"}), "utf-8")
    (tmp_path / "runs").mkdir()
    _, env = bare_command(tmp_path)
    assert env["QE_TRL_OUTPUT_DIR"].endswith("bare-models") and "DAGSTER_HOME" not in env
    script = (
        "from dagster_pipes import open_dagster_pipes\n"
        "with open_dagster_pipes() as pipes:\n"
        "    got = pipes.extras['version'] + pipes.extras['run_id']\n"
        "    pipes.report_asset_materialization(metadata={'got': got})\n"
    )
    subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=60)
    messages = (tmp_path / "runs" / "bare.jsonl").read_text("utf-8")
    assert '"v001bare"' in messages
