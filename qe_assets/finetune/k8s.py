"""Training where the GPU is: the `command` backend's command run as a Kubernetes pod through
Dagster Pipes (dagster-k8s' `PipesK8sClient`), when QE_FINETUNE_K8S is set.

The pod gets the recipe as Pipes extras like the local subprocess does; its messages come back
through the pod's logs. The recipe names files under QE_DATA_DIR and the adapter is written
under QE_TRL_OUTPUT_DIR, so both must be on a volume the pod mounts at the same absolute paths
(`data_claim`: a PersistentVolumeClaim, e.g. ReadWriteMany NFS or a CSI bucket mount).

QE_FINETUNE_K8S is a JSON object, checked when the settings load:
`image` (required: an image with the train extra and the training script), `namespace`
("default"), `gpus` (1; 0 for a CPU pod), `data_claim` and `data_path` (the claim holding the
data folder, mounted at `data_path`, default the absolute QE_DATA_DIR), `node_selector`,
`service_account`, `env` (extra variables, e.g. QE_TRL_MODEL).

Checked offline only (test_k8s.py builds and validates the pod against the Kubernetes API
models); it has not been run on a cluster here.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from qe_assets.settings import K8sTarget, parse_target  # noqa: F401 (checked with the settings)


def pod_spec(target: K8sTarget, data_dir: str) -> dict[str, Any]:
    """The base pod spec: GPU limits, the data volume, node placement. No restarts: a failed
    training is a failed run, retried by qe as a new attempt."""
    container: dict[str, Any] = {"name": "train"}
    if target.gpus:
        container["resources"] = {"limits": {"nvidia.com/gpu": str(target.gpus)}}
    spec: dict[str, Any] = {"restart_policy": "Never", "containers": [container]}
    if target.data_claim:
        mount = target.data_path or str(Path(data_dir).resolve())
        container["volume_mounts"] = [{"name": "qe-data", "mount_path": mount}]
        spec["volumes"] = [
            {"name": "qe-data", "persistent_volume_claim": {"claim_name": target.data_claim}}
        ]
    if target.node_selector:
        spec["node_selector"] = dict(target.node_selector)
    if target.service_account:
        spec["service_account_name"] = target.service_account
    return spec


def pod_body(target: K8sTarget, command: str, data_dir: str, env: dict[str, str]) -> Any:
    """The V1Pod dagster-k8s would create (validated against the Kubernetes API models): what
    `qe` checks offline before any cluster is asked."""
    from dagster_k8s.pipes import build_pod_body

    return build_pod_body(
        pod_name="qe-train-check",
        image=target.image,
        command=shlex.split(command),
        env_vars={**target.env, **env},
        base_pod_meta={"labels": {"app.kubernetes.io/part-of": "qe-assets"}},
        base_pod_spec=pod_spec(target, data_dir),
    )


def run_in_pod(
    context: Any, target: K8sTarget, command: str, extras: dict[str, Any], data_dir: str
) -> Any:
    """Run the command in a pod and wait for it; returns the Pipes invocation."""
    from dagster_k8s import PipesK8sClient

    return PipesK8sClient().run(
        context=context,
        extras=extras,
        image=target.image,
        # The image's own interpreter: `python` there is not this machine's.
        command=shlex.split(command),
        namespace=target.namespace,
        env=dict(target.env),
        base_pod_meta={"labels": {"app.kubernetes.io/part-of": "qe-assets"}},
        base_pod_spec=pod_spec(target, data_dir),
    )
