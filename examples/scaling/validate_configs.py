"""Check the scale-out examples against the config schemas of the installed Dagster libraries.

    python examples/scaling/validate_configs.py

Validates each `dagster-*.yaml` as a Dagster instance config, then the config of every pluggable
class it names (storage, run launcher, compute log manager) against that class's own schema, and
the `execution: config:` files against the executor they are for. For the K8sRunLauncher it also
builds, offline, the Kubernetes Job a run would get (`--show-k8s-job` prints it), so the raw
Kubernetes fields (node selector, volumes, resources) are checked by the kubernetes client's own
models. It connects to nothing: no PostgreSQL, cluster or broker is needed. A file whose library
is not installed is reported as skipped (install dagster-k8s / dagster-celery / dagster-aws, all
0.29.27 for dagster 1.13.27, to check it). Uses Dagster's internal config functions, so it is
tied to the pinned release.
"""

from __future__ import annotations

import importlib
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
INSTANCE_FILES = ["dagster-postgres.yaml", "dagster-k8s.yaml", "dagster-celery.yaml"]
# file → (module, executor attribute)
EXECUTOR_FILES = {
    "run-config-k8s-executor.yaml": ("dagster_k8s", "k8s_job_executor"),
    "celery-worker.yaml": ("dagster_celery", "celery_executor"),
}
# The examples read these from the environment; placeholders are enough to validate types.
PLACEHOLDER_ENV = {
    "DAGSTER_PG_HOST": "postgres.internal",
    "DAGSTER_PG_PORT": "5432",
    "DAGSTER_PG_USERNAME": "dagster",
    "DAGSTER_PG_PASSWORD": "placeholder",
    "DAGSTER_PG_DB": "dagster",
    "DAGSTER_CELERY_BROKER_URL": "redis://redis.internal:6379/1",
    "DAGSTER_CELERY_BACKEND_URL": "redis://redis.internal:6379/2",
}


class Skip(Exception):
    pass


def _load_class(module: str, name: str) -> type:
    try:
        return getattr(importlib.import_module(module), name)
    except ModuleNotFoundError as exc:
        raise Skip(f"{exc.name} is not installed") from None


def _check(schema: object, value: object, what: str) -> None:
    from dagster._config import process_config, resolve_to_config_type

    result = process_config(resolve_to_config_type(schema), value)  # ty: ignore
    if not result.success:
        errors = "; ".join(e.message for e in result.errors or [])
        raise ValueError(f"{what}: {errors}")


def check_instance_file(path: Path) -> None:
    from dagster._core.instance.config import dagster_instance_config

    # Validates the instance-level schema (concurrency, run_monitoring, storage, ...).
    dagster_instance_config(str(path.parent), path.name)
    config = yaml.safe_load(path.read_text())
    plugged: list[tuple[str, str, str, object]] = []
    if "postgres" in config.get("storage", {}):
        cfg = config["storage"]["postgres"]
        plugged.append(("storage", "dagster_postgres", "DagsterPostgresStorage", cfg))
    for key in ("run_launcher", "compute_logs", "run_coordinator"):
        if key in config:
            block = config[key]
            plugged.append((key, block["module"], block["class"], block.get("config") or {}))
    for key, module, name, cfg in plugged:
        klass = _load_class(module, name)
        _check(klass.config_type(), cfg, f"{key} ({module}.{name})")  # ty: ignore
        if name == "K8sRunLauncher":
            render_k8s_run_job(path)


def render_k8s_run_job(path: Path) -> dict[str, Any]:
    """The Kubernetes Job manifest the K8sRunLauncher of `path` would create for a run."""
    import kubernetes
    from dagster import DagsterRun
    from dagster._config import process_config, resolve_to_config_type
    from dagster_k8s import K8sRunLauncher
    from dagster_k8s.container_context import K8sContainerContext
    from dagster_k8s.job import construct_dagster_k8s_job

    config = yaml.safe_load(path.read_text())["run_launcher"]["config"]
    with tempfile.TemporaryDirectory() as tmp:
        # A kubeconfig that names an unreachable cluster: the launcher only parses it.
        kubeconfig = Path(tmp) / "kubeconfig"
        cluster = {"name": "offline", "cluster": {"server": "https://127.0.0.1:9"}}
        user = {"name": "offline", "user": {"token": "none"}}
        context = {"name": "offline", "context": {"cluster": "offline", "user": "offline"}}
        kubeconfig.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "current-context": "offline",
                    "clusters": [cluster],
                    "users": [user],
                    "contexts": [context],
                }
            )
        )
        config = {**config, "load_incluster_config": False, "kubeconfig_file": str(kubeconfig)}
        processed = process_config(resolve_to_config_type(K8sRunLauncher.config_type()), config)
        launcher = K8sRunLauncher(**processed.value)  # ty: ignore
    run = DagsterRun(job_name="qe_pipeline", run_id="00000000-0000-0000-0000-000000000000")
    run_context = K8sContainerContext.create_for_run(run, launcher, include_run_tags=True)
    job = construct_dagster_k8s_job(
        run_context.get_k8s_job_config(
            job_image="registry.example/qe-assets:1", run_launcher=launcher
        ),
        ["dagster", "api", "execute_run", "..."],
        "dagster-run-00000000",
        user_defined_k8s_config=run_context.run_k8s_config,
    )
    return kubernetes.client.ApiClient().sanitize_for_serialization(job)


def check_executor_file(path: Path, module: str, attribute: str) -> None:
    executor = _load_class(module, attribute)
    config = yaml.safe_load(path.read_text())["execution"]["config"]
    _check(executor.config_schema.config_type, config, f"{module}.{attribute}")  # ty: ignore


def main() -> int:
    for name, value in PLACEHOLDER_ENV.items():
        os.environ.setdefault(name, value)
    if "--show-k8s-job" in sys.argv[1:]:
        print(yaml.safe_dump(render_k8s_run_job(HERE / "dagster-k8s.yaml"), sort_keys=False))
        return 0
    failed = 0
    checks = [(name, check_instance_file, ()) for name in INSTANCE_FILES]
    checks += [(name, check_executor_file, args) for name, args in EXECUTOR_FILES.items()]
    for name, check, args in checks:
        try:
            check(HERE / name, *args)
            print(f"ok       {name}")
        except Skip as exc:
            print(f"skipped  {name}: {exc}")
        except Exception as exc:
            failed += 1
            print(f"INVALID  {name}: {exc}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
