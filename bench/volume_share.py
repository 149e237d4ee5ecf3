"""Cost of the share privilege guard: virtiofsd start time and guest write throughput.

    python bench/volume_share.py                 # sharer start only (no VM), 20 starts
    python bench/volume_share.py --vm            # plus dd of 64 MiB in a booted box, per sharer
    PYTHONPATH=/tmp/old python bench/volume_share.py --vm   # the same against another tree

Start: median seconds of ``VirtiofsSharer.start`` for one writable share owned by uid 1000
(a user volume: launcher + seccomp + squashing user namespace + the daemon ready to accept).
VM: a busybox box with one writable volume (owned by uid 1000) per sharer; the guest runs
``dd if=/dev/zero of=/data/f bs=1M count=64 conv=fsync`` ``--repeat`` times; the median MiB/s
(timed on the host around the exec, so it includes the exec round trip, the same for both
trees). Needs root. Prints one JSON object; which tree ran is in ``"tree"``.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if not os.environ.get("PYTHONPATH"):
    sys.path.insert(0, str(REPO))

import boxlite_core  # noqa: E402
from boxlite_core.models import BoxOptions, HostShare  # noqa: E402
from boxlite_core.volumes.virtiofs import VirtiofsSharer  # noqa: E402

OWNER = 1000
DD_MIB = 64


def bench_start(runs: int) -> dict:
    root = Path(tempfile.mkdtemp(prefix="bench-vfs-"))
    vol, box = root / "vol", root / "box"
    vol.mkdir()
    box.mkdir()
    os.chown(vol, OWNER, OWNER)
    sharer = VirtiofsSharer()
    times = []
    try:
        for _ in range(runs):
            t0 = time.perf_counter()
            sharer.start([HostShare("v", vol, False, OWNER, OWNER)], box)
            times.append(time.perf_counter() - t0)
            sharer.stop(box)
    finally:
        sharer.stop(box)
        shutil.rmtree(root, ignore_errors=True)
    return {"runs": runs, "median_s": round(statistics.median(times), 4),
            "min_s": round(min(times), 4)}


def bench_dd(sharer: str, repeat: int) -> dict:
    from boxlite_core.runtime.runtime import Runtime

    home = Path(os.environ.get("BOXLITE_TEST_HOME") or "/var/tmp/boxlite-test-home")
    vol = Path(tempfile.mkdtemp(prefix=f"bench-dd-{sharer}-", dir="/var/tmp"))
    os.chown(vol, OWNER, OWNER)
    rates = []
    try:
        with Runtime(home) as rt:
            box = rt.create(BoxOptions(
                image="busybox", name=f"bench-{sharer}-{secrets.token_hex(3)}",
                memory_mib=256, volumes=[f"{vol}:/data"], volume_sharer=sharer,
            ))
            try:
                box.start()
                for i in range(repeat):
                    t0 = time.perf_counter()
                    done = box.exec(["dd", "if=/dev/zero", f"of=/data/f{i}", "bs=1M",
                                     f"count={DD_MIB}", "conv=fsync"], timeout=600)
                    dt = time.perf_counter() - t0
                    if done.exit_code != 0:
                        raise SystemExit(f"dd failed: {done.stderr!r}")
                    rates.append(DD_MIB / dt)
                    box.exec(["rm", f"/data/f{i}"], timeout=60)
            finally:
                box.stop()
                box.remove(force=True)
    finally:
        shutil.rmtree(vol, ignore_errors=True)
    return {"repeat": repeat, "median_mib_s": round(statistics.median(rates), 1),
            "all_mib_s": [round(r, 1) for r in rates]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--vm", action="store_true")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    out: dict = {"tree": str(Path(boxlite_core.__file__).parents[1]),
                 "load": os.getloadavg()[0], "virtiofs_start": bench_start(args.runs)}
    if args.vm:
        out["dd_64mib"] = {s: bench_dd(s, args.repeat) for s in ("virtiofs", "9p")}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
