"""Timings for the libkrun backend without libkrun: plan(), and launch() against the C double.

Prints JSON. ``launch_to_configured_ms`` is launch() until the launcher child has dlopened the
library and replayed every krun call up to krun_start_enter (Python start-up + cffi + calls):
the host-side overhead boxlite adds in front of a real libkrun boot.

    python bench/libkrun_plan.py [--runs N]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from boxlite_core.vmm.spec import AgentChannel, ChannelKind, DiskSpec, ShareSpec, VmSpec
from boxlite_libkrun.backend import LibkrunBackend

DOUBLE_SRC = (Path(__file__).resolve().parent.parent / "plugins" / "boxlite_libkrun" / "tests"
              / "krun_double.c")


def _spec(box: Path) -> VmSpec:
    kit = box / "kit"
    kit.mkdir(parents=True, exist_ok=True)
    (kit / "vmlinux").write_bytes(b"\x7fELF" + b"\0" * 60)
    return VmSpec(
        box_id="bench",
        box_dir=box,
        cpus=2,
        memory_mib=512,
        kernel=kit / "vmlinux",
        initrd=kit / "initrd",
        cmdline="console=ttyS0 quiet boxlite.agent_vsock=1024",  # as the core builds it
        console_log=box / "console.log",
        agent=AgentChannel(ChannelKind.VSOCK, box / "agent.sock"),
        disks=(
            DiskSpec(box / "root.qcow2", serial="rootfs"),
            DiskSpec(kit / "guest.raw", format="raw", read_only=True, serial="guestroot"),
        ),
        shares=(ShareSpec("vol0", Path("/srv"), kind="virtiofs", read_only=True),),
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=10)
    runs = parser.parse_args().runs
    out: dict[str, object] = {"runs": runs}
    with tempfile.TemporaryDirectory() as tmp:
        tmpdir = Path(tmp)
        backend = LibkrunBackend()
        spec = _spec(tmpdir / "box")
        plan_us = []
        for _ in range(max(runs, 100)):
            t0 = time.perf_counter()
            backend.plan(spec)
            plan_us.append((time.perf_counter() - t0) * 1e6)
        out["plan_median_us"] = round(statistics.median(plan_us), 1)

        gcc = shutil.which("gcc")
        if gcc is None:
            out["launch_to_configured_ms"] = None
            out["note"] = "gcc missing: no C double, launch not measured"
        else:
            lib = tmpdir / "libkrun.so.1"
            subprocess.run([gcc, "-shared", "-fPIC", "-o", str(lib), str(DOUBLE_SRC)], check=True)
            os.environ["BOXLITE_LIBKRUN_PATH"] = str(lib)
            os.environ["KRUN_DOUBLE_ENTER"] = "exit"
            os.environ.pop("KRUN_DOUBLE_LOG", None)
            plan = backend.plan(spec)
            launch_ms = []
            for _ in range(runs):
                t0 = time.perf_counter()
                handle = backend.launch(plan)
                launch_ms.append((time.perf_counter() - t0) * 1e3)
                handle.wait(10)
            out["launch_to_configured_ms"] = {
                "median": round(statistics.median(launch_ms), 1),
                "min": round(min(launch_ms), 1),
                "max": round(max(launch_ms), 1),
            }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
