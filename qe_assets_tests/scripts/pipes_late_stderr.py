"""A stand-in training command that leaves a child behind holding its stderr, which writes a
line there after the command itself has exited (as a data loader worker or a compile server
can)."""

import subprocess
import sys

from dagster_pipes import open_dagster_pipes

with open_dagster_pipes() as pipes:
    subprocess.Popen(["sh", "-c", "sleep 7; echo late-line-from-a-child >&2"], stderr=sys.stderr)
    pipes.report_asset_materialization(
        metadata={"model_path": f"/models/{pipes.extras['run_id']}", "train_loss": 0.1}
    )
