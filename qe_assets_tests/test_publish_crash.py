"""Crash trials of publishing: `qe versions publish` SIGKILLed mid-upload against a real
S3-compatible server (moto, loopback). After each kill no reader sees a version whose files fail
their sha256 (0 half-published); the next run completes it (0 missing).

3 kills by default; QE_SLOW_TRIALS=N runs N (the issue's trial: 10)."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qe_assets.ingest.queues import FileInbox
from qe_assets.release.export import VersionFiles
from qe_assets.release.publish import open_store, remote_state
from qe_assets.settings import Settings
from qe_assets_tests.runs import materialize
from qe_assets_tests.s3_server import S3Server
from qe_assets_tests.test_cli_operations import clean_environ, qe
from qe_assets_tests.test_pipeline import batch

TRIALS = int(os.environ.get("QE_SLOW_TRIALS") or 0) or 3


def killed_mid_upload(env: dict[str, str], after_files: int, rng: random.Random) -> bool:
    """Start a publish, SIGKILL it once `after_files` uploads have started (plus a few ms, so
    some kills land inside a request); whether it was killed before it finished."""
    process = subprocess.Popen(
        [sys.executable, "-m", "qe_assets.cli", "versions", "publish"],
        env={**clean_environ(), **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stderr is not None
    started = 0
    for line in process.stderr:
        started += line.startswith("uploading ")
        if started >= after_files:
            time.sleep(rng.uniform(0, 0.03))
            process.send_signal(signal.SIGKILL)
            break
    process.wait(60)
    return process.returncode == -signal.SIGKILL


@pytest.mark.timeout(120 + 60 * TRIALS)  # each trial starts two `qe` processes
def test_sigkill_mid_upload_never_leaves_a_half_published_version(
    settings: Settings, s3_env: S3Server, tmp_path: Path
) -> None:
    FileInbox(settings.inbox_dir).put(batch("k", 40))
    assert materialize(settings).success  # v001, checked; its fine-tune row makes it publishable
    bucket = s3_env.bucket("qe-crash")
    sha = hashlib.sha256(
        VersionFiles.at(settings.datasets_dir, "v001").manifest.read_bytes()
    ).hexdigest()
    rng = random.Random(29)
    half_published = missing = killed = 0
    for trial in range(TRIALS):
        url = f"s3://{bucket}/trial{trial}"
        env = {"QE_DATA_DIR": settings.data_dir, "QE_PUBLISH_URL": url, **s3_env.environment()}
        killed += killed_mid_upload(env, rng.randint(1, 13), rng)
        store = open_store(url)
        after_kill = remote_state(store, "v001", sha, deep=True)
        half_published += after_kill.state == "differs"
        qe("versions", "publish", "-q", env=env)
        missing += remote_state(store, "v001", sha, deep=True).state != "matches"
    print(
        f"publish crash trials: {TRIALS} runs, {killed} killed mid-upload, "
        f"{half_published} half-published, {missing} missing after the next run"
    )
    assert killed >= TRIALS - 1  # a kill after the last file may come after the exit
    assert (half_published, missing) == (0, 0)
