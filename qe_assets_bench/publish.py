"""Publishing throughput: `python -m qe_assets_bench.publish [--events 100000] [--out DIR]`.

Cuts a real version from N generated events (`qe run --cut-version`, the pipeline bench's
events), then publishes it with `qe versions publish` to a moto S3 server on loopback (its own
process, reached through boto3) and to a `file://` directory, and reports MB/s (uploaded bytes /
wall time of the publishing pass: hashing, upload and verification). A second pass shows the
cost of an idempotent re-run (nothing uploaded)."""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from qe_assets_bench.pipeline import QE, SEED, generate, place_in_inbox, qe_env


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _publish(env: dict[str, str], *versions: str) -> tuple[float, str]:
    started = time.monotonic()
    done = subprocess.run(
        [str(QE), "versions", "publish", "-q", *versions],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    wall = time.monotonic() - started
    if done.returncode != 0:
        raise SystemExit(f"publish failed: {done.stderr.strip()}")
    return wall, done.stdout.strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qe_assets_bench.publish")
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--out", type=Path, help="work directory (default: a temp dir, removed)")
    parser.add_argument(
        "--all-train",
        action="store_true",
        help="every event a training sample (no review routing, spot checks or evaluation "
        "hold-out), so N events make a version of about N samples",
    )
    args = parser.parse_args(argv)
    work = args.out or Path(tempfile.mkdtemp(prefix="qe-bench-publish-"))
    work.mkdir(parents=True, exist_ok=True)
    data = work / "data"
    try:
        if not (data / "datasets").exists():
            source = work / f"events_{args.events}.jsonl"
            generate(source, args.events, SEED)
            place_in_inbox(source, data)
            started = time.monotonic()
            env = qe_env(data)
            if args.all_train:
                env |= {"QE_MIN_CONFIDENCE": "0", "QE_SPOT_CHECK_SHARE": "0", "QE_EVAL_SHARE": "0"}
            subprocess.run([str(QE), "run", "--cut-version", "--quiet"], env=env, check=True)
            print(f"cut: {time.monotonic() - started:.1f} s")
        files = [p for p in (data / "datasets").rglob("*") if p.is_file()]
        total = sum(p.stat().st_size for p in files)
        samples = sum(1 for _ in next((data / "datasets").glob("*_v001.jsonl")).open("rb"))
        print(f"version v001: {samples} samples, {len(files)} files, {total / 1e6:.1f} MB")
        port = _port()
        with open(work / "moto.log", "wb") as log:
            server = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            time.sleep(3)
            aws = {
                "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}",
                "AWS_ACCESS_KEY_ID": "bench",
                "AWS_SECRET_ACCESS_KEY": "bench-secret",
                "AWS_DEFAULT_REGION": "us-east-1",
            }
            import boto3

            boto3.client(
                "s3",
                endpoint_url=aws["AWS_ENDPOINT_URL_S3"],
                aws_access_key_id="bench",
                aws_secret_access_key="bench-secret",
                region_name="us-east-1",
            ).create_bucket(Bucket="bench")
            for url in ("s3://bench/datasets", f"file://{work / 'published'}"):
                env = {**qe_env(data), **aws, "QE_PUBLISH_URL": url}
                wall, line = _publish(env)
                reported = re.search(r"([\d.]+) MB/s", line)
                print(
                    f"{url.split(':')[0]}: first pass {wall:.1f} s wall, {total / 1e6 / wall:.1f} "
                    f"MB/s of wall time; the pass itself: "
                    f"{reported.group(1) if reported else '?'} MB/s"
                )
                wall, line = _publish(env, "v001")
                print(f"{url.split(':')[0]}: re-run (verify only) {wall:.1f} s: {line}")
        finally:
            server.terminate()
            server.wait(10)
    finally:
        if args.out is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
