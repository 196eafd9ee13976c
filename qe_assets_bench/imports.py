"""`qe import phoenix` at scale (issue #31): 10,000 judged traces from a local Phoenix.

A real Phoenix server (`.venv-phoenix`, `make phoenix`; QE_TEST_PHOENIX names its `phoenix`)
receives N RAG traces (CHAIN root, RETRIEVER with three documents, LLM; Chinese text) through
the OpenTelemetry SDK's batch OTLP exporter and one judgement per trace through
`POST /v1/span_annotations` (a third of them low). Then the importer runs in a child process,
once per page size, into a fresh data directory each: wall time, events written, and the child's
peak RSS (memory follows the page size, not the number of traces). Target: ≤ 60 s for 10,000
traces on 2 cores.

`python -m qe_assets_bench.imports [--traces 10000] [--page-sizes 100,500]`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from qe_assets.testing.phoenix_server import PHOENIX_VARIABLE, PhoenixServer, phoenix_executable

TARGET_SECONDS = 60.0
PROJECT = "bench"

CHILD = """
import json, resource, sys, time
from qe_assets.imports.phoenix import import_phoenix
from qe_assets.settings import Settings
start = time.perf_counter()
outcome = import_phoenix(Settings.from_env())
elapsed = time.perf_counter() - start
print(json.dumps({"seconds": elapsed, "emitted": outcome.emitted, "read": outcome.read,
                  "pages": outcome.pages,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def load(server: PhoenixServer, traces: int) -> tuple[int, float]:
    """Send `traces` judged traces; the number judged low, and the seconds loading took."""
    specs = [
        {
            "question": f"年假可以结转吗?第{n}号问题,关于带薪休假的规定。",
            "answer": f"不可以,年假当年有效。({n})",
            "docs": [
                {
                    "id": f"kb-{n}-{d}",
                    "content": f"员工手册第{d}章:年假最多结转五天。",
                    "score": 0.9 - d / 10,
                }
                for d in range(3)
            ],
            "model": "qwen-rag-7b",
            "metadata": {"app": {"request_id": f"bench-{n}"}},
        }
        for n in range(traces)
    ]
    notes = [
        {
            "trace": n,
            "name": "correctness",
            "score": 0.2 if n % 3 == 0 else 0.9,
            "label": "incorrect" if n % 3 == 0 else "correct",
            "explanation": "judge",
        }
        for n in range(traces)
    ]
    start = time.perf_counter()
    ids = server.send(PROJECT, specs)
    # Phoenix stores exported spans asynchronously; judge the roots once they are all stored
    # (a judgement of a span not stored yet is refused).
    deadline = time.monotonic() + 1800
    while server.root_count(PROJECT) < traces and time.monotonic() < deadline:
        time.sleep(2)
    server.annotate(PROJECT, ids, notes)
    return sum(1 for n in range(traces) if n % 3 == 0), time.perf_counter() - start


def run_import(server: PhoenixServer, workdir: Path, page_size: int) -> dict[str, float]:
    env = {
        **os.environ,
        "QE_DATA_DIR": str(workdir / f"data-{page_size}"),
        "QE_PHOENIX_URL": server.url,
        "QE_PHOENIX_PROJECT": PROJECT,
        "QE_IMPORT_SETTLE": "0s",
        "QE_IMPORT_REQUEST_ID_KEY": "app.request_id",
        "QE_IMPORT_PAGE_SIZE": str(page_size),
    }
    result = subprocess.run(
        [sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise SystemExit(f"import failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--traces", type=int, default=10_000)
    parser.add_argument("--page-sizes", default="100,500")
    args = parser.parse_args()
    executable = phoenix_executable()
    if executable is None:
        raise SystemExit(
            f"{PHOENIX_VARIABLE} is unset: `make phoenix`, then point it at "
            ".venv-phoenix/bin/phoenix (`make bench` does)"
        )
    with tempfile.TemporaryDirectory(prefix="qe-bench-imports-") as tmp:
        workdir = Path(tmp)
        server = PhoenixServer(executable, workdir / "phoenix")
        server.start()
        try:
            low, seconds = load(server, args.traces)
            print(
                f"phoenix import: loaded {args.traces} judged traces ({low} low) over OTLP "
                f"in {seconds:.1f} s"
            )
            for page_size in (int(p) for p in args.page_sizes.split(",")):
                got = run_import(server, workdir, page_size)
                verdict = "PASS" if got["seconds"] <= TARGET_SECONDS else "FAIL"
                print(
                    f"phoenix import: {int(got['read'])} traces, {int(got['emitted'])} events "
                    f"in {got['seconds']:.1f} s at page size {page_size} "
                    f"({got['read'] / got['seconds']:.0f} traces/s, {int(got['pages'])} pages), "
                    f"peak RSS {got['peak_rss_mb']:.0f} MB — target ≤ {TARGET_SECONDS:.0f} s: "
                    f"{verdict}"
                )
                if got["emitted"] != low:
                    raise SystemExit(f"expected {low} events, got {got['emitted']}")
        finally:
            server.stop()


if __name__ == "__main__":
    main()
