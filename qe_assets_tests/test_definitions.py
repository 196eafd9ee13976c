"""The code location loads, and every asset is documented for the UI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from qe_assets.ops.definitions import build_definitions
from qe_assets.ops.runner import prepare_dagster_home
from qe_assets.settings import Settings, SettingsError


def test_definitions_load_and_every_asset_is_described(settings: Settings) -> None:
    defs = build_definitions(settings)
    repo = defs.get_repository_def()
    assert repo.get_job("qe_pipeline")
    for assets_def in repo.assets_defs_by_key.values():
        for key in assets_def.keys:
            spec = assets_def.specs_by_key[key]
            assert spec.description, key
            assert spec.group_name and spec.group_name != "default", key
            assert spec.kinds, key


def test_workspace_module_loads_with_dagster_cli(tmp_path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "dagster", "definitions", "validate", "-w", "workspace.yaml"],
        capture_output=True,
        text=True,
        env={"QE_DATA_DIR": str(tmp_path), "PATH": "", "HOME": str(tmp_path)},
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]


def test_importing_the_definitions_builds_nothing_and_touches_no_disk(tmp_path: Path) -> None:
    # A bad setting fails when Dagster loads the code location, not at import; and neither the
    # import nor building the definitions creates the data directory.
    data_dir = tmp_path / "data"
    code = (
        "import qe_assets.ops.definitions as d, dagster as dg, sys\n"
        "assert not isinstance(d.defs, dg.Definitions)\n"
        "try:\n"
        "    d.defs()\n"
        "except Exception as exc:\n"
        "    print(type(exc).__name__, exc)\n"
        "    sys.exit(0)\n"
        "sys.exit('a bad setting loaded')\n"
    )
    env = {"QE_DATA_DIR": str(data_dir), "QE_MIN_CONFIDENCE": "1.7", "HOME": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "QE_MIN_CONFIDENCE" in result.stdout
    build_definitions(Settings.from_env({"QE_DATA_DIR": str(data_dir)}))
    assert not data_dir.exists()


def test_bad_configuration_fails_at_load_with_the_variable_named() -> None:
    with pytest.raises(SettingsError, match="QE_MIN_CONFIDENCE"):
        Settings.from_env({"QE_MIN_CONFIDENCE": "1.7"})
    with pytest.raises(SettingsError, match="QE_QUEUE_URL"):
        Settings.from_env({"QE_QUEUE_URL": "localhost:6379"})
    with pytest.raises(SettingsError, match="QE_FINETUNE_THRESHOLD must be an integer"):
        Settings.from_env({"QE_FINETUNE_THRESHOLD": "lots"})
    with pytest.raises(SettingsError, match="QE_DUCKDB_MEMORY_LIMIT must be a size"):
        Settings.from_env({"QE_DUCKDB_MEMORY_LIMIT": "lots"})


def test_the_duckdb_memory_limit_reaches_the_pipelines_connections(tmp_path: Path) -> None:
    settings = Settings.from_env(
        {"QE_DATA_DIR": str(tmp_path), "QE_DUCKDB_MEMORY_LIMIT": "256 MiB"}
    )
    resource = build_definitions(settings).resources["duckdb"]
    with resource.get_connection() as conn:
        (limit,) = conn.execute("SELECT current_setting('memory_limit')").fetchall()[0]
    assert limit == "256.0 MiB"


def test_defaults_follow_the_contract() -> None:
    s = Settings.from_env({})
    assert (s.capture_threshold, s.min_confidence, s.finetune_threshold) == (0.7, 0.6, 1000)
    assert s.finetune_backend == "none"
    assert str(s.database) == "data/qe.duckdb"
    assert str(Settings.from_env({"QE_DATA_DIR": "/x"}).database) == "/x/qe.duckdb"
    assert str(Settings.from_env({"QE_DUCKDB_PATH": "/y/db.duckdb"}).database) == "/y/db.duckdb"


def test_the_dagster_home_fails_runs_that_never_start(settings: Settings) -> None:
    # Under the daemon, a run created but never started (its process died) is failed by run
    # monitoring after start_timeout_seconds; `qe run` and the sensor reap them headlessly.
    instance = dg.DagsterInstance.from_config(str(prepare_dagster_home(settings)))
    assert instance.run_monitoring_enabled
    assert instance.run_monitoring_start_timeout_seconds == 180


def test_the_code_location_is_named_qe_assets() -> None:
    # The UI's URLs carry the location's name (/locations/qe_assets/asset-groups/...): the
    # workspace names it, not its default "qe_assets.definitions:defs"; pyproject agrees.
    from dagster._core.workspace.load import location_origins_from_yaml_paths

    root = Path(__file__).resolve().parents[1]
    origins = location_origins_from_yaml_paths([str(root / "workspace.yaml")])
    assert [origin.location_name for origin in origins] == ["qe_assets"]
    assert 'code_location_name = "qe_assets"' in (root / "pyproject.toml").read_text()
