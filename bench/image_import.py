#!/usr/bin/env python3
"""Benchmark: image import + ext4 base build vs a plain `tar -x` + `mkfs.ext4 -d`.

Builds a ~100 MB test image locally (random binaries + text files, one uncompressed OCI
layer), then times:

* boxlite: ImageStore.import_path (verifying every blob) + the disk strategy's first prepare
  (unpack with the safe layer applier, mkfs.ext4 -d, qcow2 overlay);
* baseline: `tar -x` of the same layer + `mkfs.ext4 -d` of the same content.

Prints JSON. ``--png FILE`` draws a bar chart if matplotlib is installed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from boxlite_core.images.builtin import deterministic_layer, write_oci_layout
from boxlite_core.images.store import ImageStore
from boxlite_core.rootfs.base import RootfsContext
from boxlite_core.rootfs.disk import DiskStrategy
from boxlite_core.rootfs.util import ext4_size_for, make_ext4, tree_usage
from boxlite_core.state.db import Database
from boxlite_core.tools import require_tool, run

WORDS = [
    "alpha",
    "beta",
    "gamma",
    "delta",
    "epsilon",
    "micro",
    "vm",
    "box",
    "layer",
    "image",
    "kernel",
    "guest",
    "host",
]


def make_content(root: Path, total_mib: int, seed: int = 7) -> None:
    rng = random.Random(seed)
    binary_mib = total_mib * 6 // 10
    for i in range(binary_mib):
        d = root / "opt" / "bin" / f"d{i % 8}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"blob{i}.bin").write_bytes(os.urandom(1024 * 1024))
    text_bytes = (total_mib - binary_mib) * 1024 * 1024
    n = 0
    while text_bytes > 0:
        d = root / "usr" / "share" / "doc" / f"pkg{n // 100}"
        d.mkdir(parents=True, exist_ok=True)
        line = " ".join(rng.choice(WORDS) for _ in range(12)) + "\n"
        data = (line * (10240 // len(line) + 1))[:10240]
        (d / f"file{n}.txt").write_text(data)
        text_bytes -= len(data)
        n += 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=100)
    ap.add_argument("--png", type=Path)
    args = ap.parse_args()
    tar_bin = require_tool("tar")
    with tempfile.TemporaryDirectory(prefix="bx-bench-") as tmp:
        work = Path(tmp)
        content = work / "content"
        make_content(content, args.size_mib)
        layer = work / "layer.tar"
        deterministic_layer(content, layer)
        layout = work / "layout"
        write_oci_layout(layout, [layer], {"architecture": "amd64", "os": "linux"}, "bench:1")

        home = work / "home"
        store = ImageStore(home, Database(home / "boxlite.db"))
        t0 = time.perf_counter()
        image = store.import_path(layout)
        t1 = time.perf_counter()
        ctx = RootfsContext(home=home, image_store=store)
        DiskStrategy().prepare(image, work / "box", ctx)
        t2 = time.perf_counter()
        DiskStrategy().prepare(image, work / "box2", ctx)
        t3 = time.perf_counter()

        base_dir = work / "baseline"
        base_dir.mkdir()
        b0 = time.perf_counter()
        run([tar_bin, "-x", "-f", layer, "-C", base_dir], timeout=600)
        b1 = time.perf_counter()
        used, inodes = tree_usage(base_dir)
        make_ext4(
            work / "baseline.ext4",
            base_dir,
            ext4_size_for(used, inodes),
            label="baseline",
            inodes=max(inodes * 2, 16384),
        )
        b2 = time.perf_counter()
        shutil.rmtree(base_dir)

        ours = t2 - t0
        baseline = b2 - b0
        result = {
            "content_mib": round(layer.stat().st_size / 2**20, 1),
            "files": inodes - 1,
            "boxlite": {
                "import_s": round(t1 - t0, 3),
                "disk_base_build_s": round(t2 - t1, 3),
                "total_s": round(ours, 3),
                "second_box_prepare_s": round(t3 - t2, 3),
            },
            "baseline": {
                "tar_x_s": round(b1 - b0, 3),
                "mkfs_ext4_d_s": round(b2 - b1, 3),
                "total_s": round(baseline, 3),
            },
            "ratio_boxlite_over_baseline": round(ours / baseline, 2),
        }
    print(json.dumps(result, indent=2))
    if args.png:
        try:
            import matplotlib  # type: ignore[import-not-found]

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt  # type: ignore[import-not-found]
        except ImportError:
            print(
                "matplotlib not installed: skipping --png (pip install matplotlib)", file=sys.stderr
            )
            return 0
        fig, ax = plt.subplots(figsize=(6, 3))
        ax.barh(["boxlite import", "boxlite base build", "tar -x", "mkfs.ext4 -d"],
                [result["boxlite"]["import_s"], result["boxlite"]["disk_base_build_s"],
                 result["baseline"]["tar_x_s"], result["baseline"]["mkfs_ext4_d_s"]])  # fmt: skip
        ax.set_xlabel("seconds")
        ax.set_title(f"{result['content_mib']} MiB image")
        fig.tight_layout()
        fig.savefig(args.png)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
