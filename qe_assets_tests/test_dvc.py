"""`qe versions dvc`: a `.dvc` file whose outs are in the store's DVC remote layout, so that
`dvc pull` (the real `dvc`, when it is on PATH) restores a published version in a Git checkout."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from qe_assets.release.dvc import dvc_object
from qe_assets_tests.s3_server import S3Server
from qe_assets_tests.test_cli_operations import qe
from qe_assets_tests.test_pipeline import batch


def released(tmp_path: Path, url: str) -> dict[str, str]:
    env = {"QE_DATA_DIR": str(tmp_path / "data"), "QE_PUBLISH_URL": url}
    events = tmp_path / "events.jsonl"
    events.write_text("\n".join(batch("d", 12)) + "\n")
    qe("enqueue", str(events), env=env)
    qe("run", "--cut-version", "--quiet", env=env)
    return env


def test_dvc_file_points_at_copies_in_the_remote_layout(tmp_path: Path) -> None:
    remote = tmp_path / "published"
    env = released(tmp_path, f"file://{remote}")
    checkout = tmp_path / "checkout"
    out = qe("versions", "dvc", "v001", "--out", str(checkout), env=env).stdout
    assert f"dvc remote add -d qe {remote / 'dvc'}" in out
    outs = yaml.safe_load((checkout / "rag_quality_tuning_v001.dvc").read_text())["outs"]
    datasets = tmp_path / "data" / "datasets"
    assert len(outs) == 13  # 12 files and the manifest
    for entry in outs:
        local = (datasets / entry["path"]).read_bytes()
        assert hashlib.md5(local, usedforsecurity=False).hexdigest() == entry["md5"]
        assert (remote / dvc_object(entry["md5"])).read_bytes() == local
    # Not published: says so.
    missing = qe("versions", "dvc", "v009", env=env, code=1)
    assert "v009 is not published" in missing.stderr


# `make test` installs DVC into .venv-dvc (`make dvc`) and names it in QE_TEST_DVC: there the
# real `dvc pull` always runs. Elsewhere (`make test-fast`, a bare pytest) .venv-dvc or a `dvc`
# on PATH is used when present.
DVC_VENV = Path(__file__).resolve().parents[1] / ".venv-dvc" / "bin" / "dvc"


def _dvc() -> str | None:
    named = os.environ.get("QE_TEST_DVC")
    if named:
        return named  # required: a missing file fails the test below, never skips it
    return str(DVC_VENV) if DVC_VENV.exists() else shutil.which("dvc")


@pytest.mark.skipif(
    _dvc() is None,
    reason="no dvc: `make dvc` installs it into .venv-dvc (`make test` does), or set QE_TEST_DVC",
)
def test_dvc_pull_restores_a_version_from_s3(tmp_path: Path, s3_env: S3Server) -> None:
    dvc = _dvc()
    assert dvc is not None and Path(dvc).exists(), f"QE_TEST_DVC={dvc}: no such file (make dvc)"
    bucket = s3_env.bucket("qe-dvc")
    env = released(tmp_path, f"s3://{bucket}/ds")
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    run_env = {**os.environ, **s3_env.environment()}

    def run(*command: str) -> None:
        subprocess.run(command, cwd=checkout, env=run_env, check=True, capture_output=True)

    run("git", "init", "-q")
    run(dvc, "init", "-q")
    qe("versions", "dvc", "v001", "--out", str(checkout), env=env)
    run(dvc, "remote", "add", "-d", "qe", f"s3://{bucket}/ds/dvc")
    run(dvc, "remote", "modify", "qe", "endpointurl", s3_env.endpoint)
    run(dvc, "pull", "-q")
    datasets = tmp_path / "data" / "datasets"
    for path in datasets.rglob("*"):
        if path.is_file():
            restored = checkout / path.relative_to(datasets)
            assert restored.read_bytes() == path.read_bytes(), restored
