#!/usr/bin/env python3
"""Benchmark: what a layered image costs at import and at its first box, per compression.

Builds a local image of ``--layers`` layers (``--files`` small files each, in 100-file
directories under one shared tree, so every layer merges with the ones below it), once with
gzip layers and once with zstd layers, and times:

* ``import_s``: ``ImageStore.import_path`` — blob copy + the decode check every import makes
  now (each layer decoded to its end and compared with its diff ID);
* ``check_s``: that decode check alone (``compression.check_layer`` over every layer);
* ``merged_unpack_s``: every layer applied into one directory (``disk``/``merged``);
* ``overlay_unpack_s``: every layer unpacked into its own directory on top of the ones below
  (``layers``: lookups through the lower layers' directories).

Prints JSON and writes it to ``--out`` (default reports/bench-layer-unpack.json). Needs root
for the overlay part only when a layer holds whiteouts (this image has none).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from boxlite_core.images.compression import check_layer
from boxlite_core.images.layers import apply_layers_merged, unpack_layer_for_overlay
from boxlite_core.images.store import ImageStore
from boxlite_core.state.db import Database
from boxlite_testing.oci import oci_layout_files, write_dir

REPORT = Path(__file__).resolve().parents[1] / "reports" / "bench-layer-unpack.json"


def layer_tar(k: int, files: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in ("usr", "usr/lib"):
            info = tarfile.TarInfo(name)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        for i in range(files):
            if i % 100 == 0:
                info = tarfile.TarInfo(f"usr/lib/p{k}_{i // 100}")
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            data = (f"layer {k} file {i}\n" * 40).encode()
            info = tarfile.TarInfo(f"usr/lib/p{k}_{i // 100}/f{i}")
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def measure(work: Path, tars: list[bytes], codec: str) -> dict[str, float]:
    layout = write_dir(oci_layout_files(tars, ref=f"bench-{codec}:1", codec=codec),
                       work / f"layout-{codec}")  # fmt: skip
    home = work / f"home-{codec}"
    store = ImageStore(home, Database(home / "boxlite.db"))
    t0 = time.perf_counter()
    image = store.import_path(layout)
    t1 = time.perf_counter()
    for layer in image.layers:
        check_layer(store.blobs, layer.digest, None, "bench")
    t2 = time.perf_counter()
    apply_layers_merged(image, store.blobs, work / f"merged-{codec}")
    t3 = time.perf_counter()
    dirs: list[Path] = []
    for i, layer in enumerate(image.layers):
        target = work / f"overlay-{codec}" / str(i)
        unpack_layer_for_overlay(store.blobs, layer.digest, target, lowers=dirs[::-1])
        dirs.append(target)
    t4 = time.perf_counter()
    return {
        "blob_mib": round(sum(x.size for x in image.layers) / 2**20, 2),
        "import_s": round(t1 - t0, 3),
        "check_s": round(t2 - t1, 3),
        "merged_unpack_s": round(t3 - t2, 3),
        "overlay_unpack_s": round(t4 - t3, 3),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=5)
    ap.add_argument("--files", type=int, default=2000)
    ap.add_argument("--out", type=Path, default=REPORT)
    args = ap.parse_args()
    tars = [layer_tar(k, args.files) for k in range(args.layers)]
    result: dict[str, object] = {
        "layers": args.layers,
        "files": args.layers * args.files,
        "tar_mib": round(sum(len(t) for t in tars) / 2**20, 2),
    }
    with tempfile.TemporaryDirectory(prefix="bx-bench-layers-", dir="/var/tmp") as tmp:
        for codec in ("gzip", "zstd"):
            result[codec] = measure(Path(tmp), tars, codec)
    text = json.dumps(result, indent=2)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
