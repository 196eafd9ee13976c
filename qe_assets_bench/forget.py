"""Peak memory of `qe forget`'s superseding cut: `python -m qe_assets_bench.forget --data-dir DIR
[--version v001] [--chunk-lines N]`.

Cuts a copy of the version without one of its samples (the first of its train split) under a
spare version name, in this process, and prints the wall time and the peak RSS
(`ru_maxrss`); the copy is removed afterwards. `--chunk-lines 1000000000` reads each split file
in one piece, as `qe forget` did before the cut streamed (docs/performance.md). Run each size in a
fresh process: the peak is the process's.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import time
from pathlib import Path

from qe_assets.release.export import VersionFiles, manifest_temp
from qe_assets.release.forget import FORGET_CHUNK_LINES, cut_superseding


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, required=True, help="a QE_DATA_DIR with a version")
    parser.add_argument("--version", default="v001")
    parser.add_argument("--chunk-lines", type=int, default=FORGET_CHUNK_LINES)
    args = parser.parse_args(argv)
    datasets = args.data_dir / "datasets"
    files = VersionFiles.at(datasets, args.version)
    manifest = json.loads(files.manifest.read_text("utf-8"))
    first = files.split_file("train", "records", manifest)
    with open(first, encoding="utf-8") as handle:
        sample = json.loads(handle.readline())["sample_id"]
    spare = "v999"
    start = time.perf_counter()
    cut, kept = cut_superseding(
        datasets, args.version, spare, [sample], {}, "bench", args.chunk_lines
    )
    elapsed = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    size_mb = sum(p.stat().st_size for p in files.folder.iterdir()) / 1e6
    print(
        f"{args.version}: {manifest['counts']['samples']} samples, split files {size_mb:.0f} MB; "
        f"chunk {args.chunk_lines} lines: kept {kept} in {elapsed:.1f} s, peak RSS {peak_mb:.0f} MB"
    )
    spare_files = VersionFiles.at(datasets, spare)
    for path in (*spare_files.all(), manifest_temp(spare_files)):
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    assert cut["counts"]["samples"] == kept
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
