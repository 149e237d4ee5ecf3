"""Bare guest boot time: backend launch() → `boxlite-init: start` (first line of /init), as JSON.

Boots the cached guest kit (building it if needed) with `boxlite.init=marker`, so /init prints
its marker and powers off at once: this measures QEMU + kernel + initramfs only, not the agent.
`--until exec` instead times a normal boot up to `boxlite-init: exec agent` (guest root found,
mounted, switch_root next) and kills QEMU there. The boot goes through a registered backend
(kit.smoke: a VmSpec, planned and launched by `--backend`, default qemu), so the time runs from
launch() (QMP up, console writer attached) to the marker in the box's console log. `--accel`
sets BOXLITE_ACCEL for the qemu backend.

    python3 bench/boot_bare.py -n 5 --machine microvm --machine q35 [--home DIR] [--accel tcg]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from boxlite_core.kit import EXEC_MARKER, START_MARKER, ensure_kit
from boxlite_core.kit.smoke import boot_until, smoke_backend, smoke_spec


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--runs", type=int, default=5)
    parser.add_argument("--machine", action="append", choices=["microvm", "q35"],
                        help="machine type(s) to compare (default: the kit's choice)")
    parser.add_argument("--home", type=Path, default=Path("/var/tmp/boxlite-test-home"))
    parser.add_argument("--source-root", type=Path, default=None,
                        help="directory holding boxlite_core/ (default: this checkout)")
    parser.add_argument("--accel", default="tcg")
    parser.add_argument("--backend", default="qemu")
    parser.add_argument("--until", choices=["start", "exec"], default="start")
    args = parser.parse_args(argv)
    os.environ["BOXLITE_ACCEL"] = args.accel
    backend = smoke_backend(args.backend)

    started = time.monotonic()
    kit = ensure_kit(args.home, source_root=args.source_root,
                     progress=lambda msg, _f: print(f"kit: {msg}", file=sys.stderr))
    kit_seconds = time.monotonic() - started
    manifest = kit.read_manifest()
    results: dict[str, dict] = {}
    for machine in args.machine or [kit.machine]:
        mkit = ensure_kit(args.home, source_root=args.source_root, machine=machine)
        times: list[float] = []
        failures = 0
        with tempfile.TemporaryDirectory() as tmp:
            for run in range(args.runs):
                box = Path(tmp) / f"b{run}"  # a fresh console log per boot
                if args.until == "start":
                    spec = smoke_spec(mkit, box, extra_cmdline="boxlite.init=marker")
                    res = boot_until(spec, START_MARKER, timeout=120, backend=backend)
                else:
                    spec = smoke_spec(mkit, box)
                    res = boot_until(spec, EXEC_MARKER, timeout=120, kill_after_marker=True,
                                     backend=backend)
                if res.seconds_to_marker is None:
                    failures += 1
                    print(res.console[-1500:], file=sys.stderr)
                else:
                    times.append(round(res.seconds_to_marker, 3))
        results[machine] = {
            "median_s": round(statistics.median(times), 3) if times else None,
            "min_s": min(times, default=None),
            "max_s": max(times, default=None),
            "runs": times,
            "failures": failures,
            "cmdline": mkit.cmdline,
            "qemu_globals": list(mkit.qemu_globals),
        }
    print(json.dumps({
        "bench": "boot_bare",
        "until": START_MARKER if args.until == "start" else EXEC_MARKER,
        "accel": args.accel,
        "kit_id": kit.kit_id,
        "kit_ready_s": round(kit_seconds, 2),
        "kernel": manifest["kernel"]["package"] + " " + manifest["kernel"]["version"],
        "sizes": manifest["sizes"],
        "results": results,
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
