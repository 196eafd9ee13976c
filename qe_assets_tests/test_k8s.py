"""Training in a Kubernetes pod through Dagster Pipes (QE_FINETUNE_K8S), checked offline: the
settings are validated when they load and the pod dagster-k8s would create is built and checked
against the Kubernetes API models. Nothing here talks to a cluster."""

from __future__ import annotations

import re

import pytest

from qe_assets.finetune.k8s import parse_target, pod_body
from qe_assets.finetune.resource import FineTuneBackendResource
from qe_assets.settings import Settings, SettingsError

pytest.importorskip("dagster_k8s", reason="the k8s extra: pip install -e '.[k8s]'")

TARGET = {
    "image": "registry.example/qe-train:1",
    "namespace": "ml",
    "gpus": 2,
    "data_claim": "qe-data",
    "node_selector": {"gpu": "a100"},
    "env": {"QE_TRL_MODEL": "Qwen/Qwen2.5-0.5B-Instruct"},
}


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ('{"namespace": "ml"}', "QE_FINETUNE_K8S.image: Field required"),
        ('{"image": "x", "gpu": 1}', "QE_FINETUNE_K8S.gpu: Extra inputs are not permitted"),
        ('{"image": "x", "gpus": -1}', "QE_FINETUNE_K8S.gpus"),
        ('["x"]', "QE_FINETUNE_K8S must be a JSON object"),
    ],
)
def test_a_bad_pod_target_fails_at_load_time_naming_the_key(value: str, message: str) -> None:
    with pytest.raises(SettingsError, match=re.escape(message)):
        Settings.from_env({"QE_FINETUNE_K8S": value})


def test_the_resource_refuses_a_bad_target_too() -> None:
    with pytest.raises(ValueError, match=r"QE_FINETUNE_K8S\.image"):
        FineTuneBackendResource(backend="command", command="python train.py", k8s={"gpus": 1})


def test_the_pod_runs_the_command_on_gpus_with_the_data_volume_at_the_same_path() -> None:
    target = parse_target(TARGET)
    assert target is not None
    pod = pod_body(
        target,
        "python examples/finetune_trl_lora.py",
        "/srv/qe/data",
        {"DAGSTER_PIPES_CONTEXT": "ctx", "DAGSTER_PIPES_MESSAGES": "msgs"},
    )
    (container,) = pod.spec.containers
    assert container.image == "registry.example/qe-train:1"
    # The image's own interpreter: no path of this machine leaks into the pod.
    assert container.command == ["python", "examples/finetune_trl_lora.py"]
    assert container.resources.limits == {"nvidia.com/gpu": "2"}
    (mount,) = container.volume_mounts
    assert (mount.name, mount.mount_path) == ("qe-data", "/srv/qe/data")
    (volume,) = pod.spec.volumes
    assert volume.persistent_volume_claim.claim_name == "qe-data"
    assert pod.spec.restart_policy == "Never" and pod.spec.node_selector == {"gpu": "a100"}
    env = {e.name: e.value for e in container.env}
    assert env["QE_TRL_MODEL"] == "Qwen/Qwen2.5-0.5B-Instruct" and env["DAGSTER_PIPES_CONTEXT"]
    assert pod.metadata.labels["app.kubernetes.io/part-of"] == "qe-assets"


def test_a_cpu_pod_asks_for_no_gpu_and_mounts_nothing_unasked() -> None:
    target = parse_target({"image": "qe-train:cpu", "gpus": 0})
    assert target is not None
    pod = pod_body(target, "python train.py", "/srv/qe/data", {})
    (container,) = pod.spec.containers
    assert container.resources is None and container.volume_mounts is None
    assert parse_target({}) is None
