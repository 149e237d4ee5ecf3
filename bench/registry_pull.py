#!/usr/bin/env python3
"""Benchmark: pull a ~20 MB image (3 gzip layers of random bytes) from a local registry.

Starts Debian's docker-registry on 127.0.0.1, pushes the image with the test helpers, then
times boxlite's pull into an empty store (cold), a second pull (every blob present: only the
manifest is fetched), and, as a baseline, plain sequential `requests` GETs of the same blobs
with no verification or store. Prints JSON.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "registry"))

import requests  # noqa: E402
from registry_helpers import LocalRegistry, Pusher, build_image  # noqa: E402

from boxlite_core.images.registry import RegistrySettings, pull  # noqa: E402
from boxlite_core.images.store import ImageStore  # noqa: E402
from boxlite_core.state.db import Database  # noqa: E402


def main() -> None:
    layer_mb = [10, 6, 4]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        reg = LocalRegistry(work / "reg")
        try:
            layers = [{f"data/blob{i}": os.urandom(mb * 1024 * 1024)} for i, mb in
                      enumerate(layer_mb)]
            img = build_image(layers, compress=1)
            Pusher(reg.url).image("library/bench", "v1", img)
            total = sum(len(b) for b in img.blobs().values())
            settings = RegistrySettings.load(None, env={}, insecure=[reg.host])
            store = ImageStore(work / "home", Database(work / "home" / "boxlite.db"))
            t0 = time.perf_counter()
            image = pull(store, f"{reg.host}/library/bench:v1", settings=settings)
            cold = time.perf_counter() - t0
            assert image.digest == img.digest
            t0 = time.perf_counter()
            pull(store, f"{reg.host}/library/bench:v1", settings=settings)
            warm = time.perf_counter() - t0
            session = requests.Session()
            t0 = time.perf_counter()
            for digest in img.blobs():
                resp = session.get(f"{reg.url}/v2/library/bench/blobs/{digest}")
                assert resp.status_code == 200
            baseline = time.perf_counter() - t0
        finally:
            reg.stop()
    print(json.dumps({
        "image_bytes": total,
        "layers": len(layer_mb),
        "pull_cold_s": round(cold, 3),
        "pull_cold_MBps": round(total / cold / 1e6, 1),
        "pull_again_s": round(warm, 3),
        "baseline_plain_get_s": round(baseline, 3),
    }, indent=2))


if __name__ == "__main__":
    main()
