"""What the wrapper adds to training: `python -m qe_assets_bench.training_overhead`.

The same tiny model, the same prepared files, the same steps, two ways, each a whole process
timed from outside (wall seconds, start to exit), alternated A B A B … so a drift of the machine
hits both:

(A) bare: `python examples/finetune_trl_lora.py`, the TRL script alone, handed the recipe the
    asset prepared (its Pipes extras, in the environment) and writing its report to a file;
(B) the asset: a fresh process that materializes `fine_tuned_model` through Dagster (the real
    definitions and resources), which prepares the version's files (links, the recipe), runs
    the same script through Pipes with the `command` backend, and records the run in DuckDB.
    Each run starts from a copy of the same state: a dataset version cut, nothing trained.

Prints min/median/max of each and of the ratio B/A pair by pair; the target is a median ratio
≤ 1.10. Exits 1 when it is missed. `--keep DIR` keeps the prepared state and prints the two
commands, to time them with another tool.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET = 1.10
ROOT = Path(__file__).resolve().parent.parent
STATE = "data"  # the prepared data dir (a version cut, nothing trained), copied for each B run
SETTINGS = "settings.json"
RECIPE = "recipe.json"


def prepare_state(workdir: Path, events: int, steps: int) -> None:
    """The tiny model, a dataset version, and the recipe the asset prepares for it (from one
    warm-up run of the asset on a copy, which also checks that it trains)."""
    from qe_assets_bench.local_model import HYPERPARAMETERS, prepare

    hyper = {**HYPERPARAMETERS, "max_steps": steps}
    prepared = prepare(workdir, events, finetune_hyperparameters=hyper)
    assert Path(prepared.settings.data_dir) == workdir / STATE
    (workdir / SETTINGS).write_text(prepared.settings.model_dump_json(), "utf-8")
    env = {k: os.environ[k] for k in ("QE_TRL_MODEL", "QE_TRL_OUTPUT_DIR", "OPENAI_API_KEY")}
    (workdir / "env.json").write_text(json.dumps(env), "utf-8")
    warm = run_asset(workdir, "warm")
    recipe = json.loads(next((warm / "finetune").glob("*/recipe.json")).read_text("utf-8"))
    (workdir / RECIPE).write_text(json.dumps(recipe), "utf-8")
    write_commands(workdir)


def write_commands(workdir: Path) -> None:
    """bare.sh (A) and asset.sh (B): each one whole process, as any timing tool runs them."""
    command, env = bare_command(workdir)
    exports = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items())
    script = f"#!/bin/sh\n{exports}exec {shlex.join(command)} >/dev/null 2>&1\n"
    (workdir / "bare.sh").write_text(script, "utf-8")
    asset = [sys.executable, "-m", "qe_assets_bench.training_overhead", "--asset", str(workdir)]
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    script = (
        f"#!/bin/sh\nexport PYTHONPATH={shlex.quote(path)}\n"
        f"exec {shlex.join(asset)} >/dev/null 2>&1\n"
    )
    (workdir / "asset.sh").write_text(script, "utf-8")
    for name in ("bare.sh", "asset.sh"):
        (workdir / name).chmod(0o755)


def _env(workdir: Path) -> dict[str, str]:
    return {**os.environ, **json.loads((workdir / "env.json").read_text("utf-8"))}


def run_asset(workdir: Path, name: str) -> Path:
    """(B) once, in this process: a copy of the state, `fine_tuned_model` materialized."""
    from qe_assets.settings import Settings
    from qe_assets.testing.runs import materialize, metadata

    data = workdir / "runs" / name
    shutil.rmtree(data, ignore_errors=True)
    shutil.copytree(workdir / STATE, data, symlinks=True)
    settings = Settings.model_validate_json((workdir / SETTINGS).read_text("utf-8"))
    settings = settings.model_copy(update={"data_dir": str(data)})
    os.environ.update(_env(workdir))
    os.environ["QE_TRL_OUTPUT_DIR"] = str(data / "models")
    result = materialize(settings, selection=["fine_tuned_model"])
    status = metadata(result, "fine_tuned_model").get("status")
    if status != "succeeded":
        raise SystemExit(f"fine_tuned_model did not train: {status}")
    return data


def bare_command(workdir: Path) -> tuple[list[str], dict[str, str]]:
    """(A): the script with the asset's recipe as its Pipes context, its report to a file. Only
    the variables it reads, and the locale and PATH, are passed on."""
    from dagster_pipes import encode_param

    from qe_assets_bench.local_model import SFT_SCRIPT

    recipe = json.loads((workdir / RECIPE).read_text("utf-8"))
    recipe["run_id"] = "bare"
    context = {
        "asset_keys": ["fine_tuned_model"],
        "code_version_by_asset_key": None,
        "provenance_by_asset_key": None,
        "partition_key": None,
        "partition_key_range": None,
        "partition_time_window": None,
        "run_id": "bare",
        "job_name": None,
        "retry_number": 0,
        "extras": recipe,
    }
    own = json.loads((workdir / "env.json").read_text("utf-8"))
    env = {
        **{k: os.environ[k] for k in ("PATH", "HOME", "LANG") if k in os.environ},
        **own,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        # The script imports qe_assets.finetune.fitting: this checkout's.
        "PYTHONPATH": str(ROOT),
        "QE_TRL_OUTPUT_DIR": str(workdir / "runs" / "bare-models"),
        "DAGSTER_PIPES_CONTEXT": encode_param({"data": context}),
        "DAGSTER_PIPES_MESSAGES": encode_param({"path": str(workdir / "runs" / "bare.jsonl")}),
    }
    return [sys.executable, str(SFT_SCRIPT)], env


def timed(script: Path) -> float:
    started = time.monotonic()
    subprocess.run([str(script)], check=True)
    return time.monotonic() - started


def spread(values: list[float], unit: str = "s") -> str:
    return (
        f"median {statistics.median(values):.2f}{unit} (min {min(values):.2f}, "
        f"max {max(values):.2f}, {len(values)} runs)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=120)
    parser.add_argument("--steps", type=int, default=15, help="training steps (max_steps)")
    parser.add_argument("--runs", type=int, default=3, help="runs of each, after one warm-up")
    parser.add_argument("--keep", type=Path, help="prepare the state here and keep it")
    parser.add_argument("--asset", type=Path, help="run (B) once on a kept state")
    args = parser.parse_args(argv)
    if args.asset:
        run_asset(args.asset, f"asset-{os.getpid()}")
        return 0
    workdir = args.keep or Path(tempfile.mkdtemp(prefix="qe-bench-training-"))
    try:
        prepare_state(workdir, args.events, args.steps)
        bare, asset = workdir / "bare.sh", workdir / "asset.sh"
        timed(bare)  # warm-up: the page cache holds the model and the packages for both
        a_times: list[float] = []
        b_times: list[float] = []
        for _ in range(args.runs):
            a_times.append(timed(bare))
            b_times.append(timed(asset))
        ratios = [b / a for a, b in zip(a_times, b_times, strict=True)]
        print(f"tiny model, {args.steps} steps, the same prepared files")
        print(f"(A) bare TRL script:             {spread(a_times)}")
        print(f"(B) fine_tuned_model via Dagster: {spread(b_times)}")
        print(f"B/A pair by pair: {spread(ratios, '')}")
        overhead = statistics.median(b_times) - statistics.median(a_times)
        print(f"wrapper overhead: {overhead:+.2f} s on the medians")
        if args.keep:
            print(f"(A): {bare}\n(B): {asset}")
        if statistics.median(ratios) > TARGET:
            print(f"MISSED: the wrapper adds {statistics.median(ratios) - 1:.1%} (target <= 10%)")
            return 1
        return 0
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
