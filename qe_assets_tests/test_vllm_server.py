"""QE_MODEL_SERVER=vllm: `vllm serve BASE --enable-lora` as a managed subprocess, each adapter
loaded by its served name through `/v1/load_lora_adapter`.

This machine has no GPU and no vLLM: real vLLM is never run here. A stand-in `vllm` executable
(and a stand-in `nvidia-smi` listing one GPU) put first on PATH takes the `serve` arguments,
records them, and runs the project's OpenAI-compatible test server on the port it was given;
that server has the runtime LoRA loading route and lists the loaded adapters in /v1/models, as
vLLM does. Everything else is real: the settings check, the resource, the materializations and
the gate asking for `model_rag_qa_v001` and `model_rag_qa_base` there."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from qe_assets.finetune.serving.folders import ServingError
from qe_assets.finetune.serving.resource import ModelServerResource, vllm_state
from qe_assets.finetune.serving.vllm_engine import VllmServer, max_lora_rank
from qe_assets.settings import Settings, SettingsError
from qe_assets_tests.openai_server import EvalModels, OpenAIServer
from qe_assets_tests.runs import materialize, metadata
from qe_assets_tests.test_finetune import SCRIPTS, command_settings, processed

BASE = "/models/tiny-base"
STAND_IN = '''#!{python}
"""A stand-in `vllm`: records how it was started, then serves the test server there."""
import json, os, sys
args = sys.argv[1:]
with open(os.environ["VLLM_STAND_IN_RECORD"], "a") as record:
    runtime = os.environ.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING")
    record.write(json.dumps({{"argv": args, "runtime_lora": runtime, "pid": os.getpid()}}) + "\\n")
if os.environ.get("VLLM_STAND_IN_FAIL"):
    print("INFO loading model", file=sys.stderr)
    print("RuntimeError: Failed to infer device type", file=sys.stderr)
    sys.exit(1)
assert args[0] == "serve" and "--enable-lora" in args
name = args[args.index("--served-model-name") + 1]
quality = json.dumps({{"model_rag_qa_v": 3, name: 1}})
os.execv(sys.executable, [sys.executable, "-m", "qe_assets.testing.openai_server",
    "--port", args[args.index("--port") + 1], "--served-model", name, "--eval-models", quality])
'''
NVIDIA_SMI = "#!/bin/sh\necho 'GPU 0: Stand-in GPU (UUID: GPU-0)'\n"


def executable(folder: Path, name: str, text: str) -> None:
    path = folder / name
    path.write_text(text, "utf-8")
    path.chmod(0o755)


@pytest.fixture
def stand_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """PATH with the stand-in `vllm` and `nvidia-smi` first; returns the record of its starts."""
    folder = tmp_path / "bin"
    folder.mkdir()
    executable(folder, "vllm", STAND_IN.format(python=sys.executable))
    executable(folder, "nvidia-smi", NVIDIA_SMI)
    record = tmp_path / "vllm-starts.jsonl"
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("VLLM_STAND_IN_RECORD", str(record))
    # The stand-in runs `python -m qe_assets…` of this checkout.
    root = str(Path(__file__).parent.parent)
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    )
    return record


def starts(record: Path) -> list[dict]:
    return [json.loads(line) for line in record.read_text("utf-8").splitlines()]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_without_vllm_or_a_gpu_the_settings_refuse_it_saying_what_to_set(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SettingsError) as refused:
        Settings.from_env({"QE_MODEL_SERVER": "vllm", "PATH": str(empty)})
    message = str(refused.value)
    assert "\n" not in message and "vLLM is not installed (no `vllm` on PATH)" in message
    assert "set QE_MODEL_SERVER=external with QE_MODEL_SERVER_URL" in message
    assert "QE_MODEL_SERVER=transformers" in message
    # vLLM there, but no GPU.
    executable(empty, "vllm", "#!/bin/sh\nexit 0\n")
    with pytest.raises(SettingsError, match=r"no GPU here \(`nvidia-smi -L` lists none\): set"):
        Settings.from_env({"QE_MODEL_SERVER": "vllm", "PATH": str(empty)})


def test_this_machine_refuses_vllm_at_load_time() -> None:
    """No GPU and no vLLM here: the real environment is refused, in one line."""
    with pytest.raises(SettingsError, match="QE_MODEL_SERVER=vllm starts vLLM on this machine"):
        Settings.from_env({"QE_MODEL_SERVER": "vllm"})


def test_max_lora_rank_is_one_of_vllm_s_choices(tmp_path: Path) -> None:
    folders = []
    for rank in (4, 24):
        folder = tmp_path / f"r{rank}"
        folder.mkdir()
        (folder / "adapter_config.json").write_text(json.dumps({"r": rank}), "utf-8")
        folders.append(folder)
    assert max_lora_rank(folders[:1]) == 8 and max_lora_rank(folders) == 32


def test_the_gate_starts_vllm_loads_the_adapter_by_name_and_stops_it(
    settings: Settings,
    openai_server: OpenAIServer,
    stand_in: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-vllm")
    monkeypatch.setenv("FAKE_BASE_MODEL", BASE)
    monkeypatch.setenv("QE_TRL_OUTPUT_DIR", str(tmp_path / "models"))
    checked = Settings.from_env({"QE_MODEL_SERVER": "vllm"})  # the stand-ins pass the check
    assert checked.model_server == "vllm"
    configured = command_settings(settings, SCRIPTS / "pipes_adapter_stub.py").model_copy(
        update={
            "model_server": "vllm",
            "openai_base_url": openai_server.base_url,  # the judge's endpoint, not vLLM's
            "eval_share": 0.5,
            "eval_min_items": 20,
            "eval_judge_model": "judge",
            "llm_max_retries": 1,
            "llm_concurrency": 8,
        }
    )
    openai_server.responder = EvalModels({"": 1})  # the judge only
    processed(configured, 120)
    result = materialize(
        configured,
        selection=["tuning_dataset", "fine_tuned_model", "model_evaluation"],
        raise_on_error=False,
    )
    adapter = str((tmp_path / "models" / "v001-command-1").resolve())
    assert metadata(result, "fine_tuned_model")["base_model"] == BASE
    assert vllm_state(Path(configured.data_dir) / "served") == (
        BASE,
        {"model_rag_qa_v001": adapter},
    )
    meta = metadata(result, "model_evaluation")
    assert meta["decision"] == "passed" and meta["failed"] == 0, meta
    ((started,),) = [starts(stand_in)]
    argv = started["argv"]
    assert argv[:2] == ["serve", BASE] and started["runtime_lora"] == "True"
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    assert argv[argv.index("--max-lora-rank") + 1] == "32"  # r=24, rounded up
    assert argv[argv.index("--served-model-name") + 1] == "model_rag_qa_base"
    assert not alive(started["pid"])  # stopped when the comparisons ended
    # The judge was asked on its own endpoint; the served models never were.
    asked = {r.json()["model"] for r in openai_server.chat_requests()}
    assert asked == {"judge"}


def test_a_vllm_that_dies_fails_with_the_end_of_its_log(
    stand_in: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 8}), "utf-8")
    monkeypatch.setenv("VLLM_STAND_IN_FAIL", "1")
    server = VllmServer(BASE, {"model_rag_qa_v001": str(adapter)}, tmp_path / "served")
    with pytest.raises(ServingError, match=r"vllm serve exited: .*Failed to infer device type"):
        server.start(ready_seconds=30)
    assert server.process is not None and server.process.poll() == 1


def test_the_resource_serves_every_adapter_of_the_newest_base_and_stops(
    stand_in: Path, tmp_path: Path
) -> None:
    import urllib.request

    folders = []
    for version in ("v001", "v002"):
        folder = tmp_path / "models" / version
        folder.mkdir(parents=True)
        (folder / "adapter_config.json").write_text(json.dumps({"r": 16}), "utf-8")
        folders.append(folder)
    resource = ModelServerResource(kind="vllm", data_dir=str(tmp_path / "data"))
    with pytest.raises(ServingError, match="no adapter registered yet"), resource.serving():
        pass
    first = resource.register(str(folders[0]), "v001", "/models/old-base")
    resource.register(str(folders[0]), "v001", BASE)
    resource.register(str(folders[1]), "v002", BASE)
    assert first is not None and (first.name, first.base_name) == (
        "model_rag_qa_v001",
        "model_rag_qa_base",
    )
    with resource.serving() as url, urllib.request.urlopen(f"{url}/models", timeout=10) as answer:
        listed = {m["id"] for m in json.loads(answer.read())["data"]}
    assert listed == {"model_rag_qa_base", "model_rag_qa_v001", "model_rag_qa_v002"}
    (started,) = starts(stand_in)
    assert started["argv"][1] == BASE and not alive(started["pid"])
