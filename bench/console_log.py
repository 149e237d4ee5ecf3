"""What the capped console writer costs at boot, and how fast a guest can fill its console.

Boots the guest kit with the qemu backend N times each way, alternating: ``writer`` (today's
plan: QEMU serves the console on a socket, logwriter.py caps it) and ``file`` (the old plan:
``-chardev file``, edited into the same plan). Times launch() (Popen → QMP answers) and the
agent's READY on its port (the guest has booted). Prints JSON.

    python3 bench/console_log.py [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins" / "boxlite_qemu"))

from boxlite_core.kit import ROOT_SERIAL, ensure_kit
from boxlite_core.vmm.spec import AgentChannel, ChannelKind, DiskSpec, VmSpec
from boxlite_qemu.backend import QemuBackend


def spec_for(kit, box: Path) -> VmSpec:
    box.mkdir(parents=True, exist_ok=True)
    return VmSpec(
        box_id=box.name, box_dir=box, cpus=1, memory_mib=256, kernel=kit.kernel,
        initrd=kit.initrd, cmdline=kit.cmdline, console_log=box / "console.log",
        agent=AgentChannel(ChannelKind.VIRTIO_SERIAL, box / "agent.port"),
        disks=(DiskSpec(kit.root_image, "raw", read_only=True, serial=ROOT_SERIAL),),
        guest=kit.guest_hints(),
    )


def file_plan(plan):
    """The same plan with the console back on an uncapped file chardev (the old way)."""
    argv = list(plan.data["argv"])
    i = next(i for i, a in enumerate(argv) if a.startswith("socket,id=console,"))
    argv[i] = f"file,id=console,path={plan.spec.console_log}"
    data = {k: v for k, v in plan.data.items() if k != "console_socket"}
    return type(plan)(plan.backend, plan.spec, {**data, "argv": argv})


def wait_ready(path: Path, timeout: float = 300.0) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(path))
    sock.settimeout(timeout)
    buf = b""
    try:
        while b"READY\n" not in buf:
            chunk = sock.recv(64)
            if not chunk:
                raise RuntimeError("agent port closed before READY")
            buf += chunk
    finally:
        sock.close()


def one(backend: QemuBackend, kit, root: Path, mode: str, index: int) -> dict[str, float]:
    box = root / f"{mode}{index}"
    plan = backend.plan(spec_for(kit, box))
    if mode == "file":
        plan = file_plan(plan)
    began = time.monotonic()
    handle = backend.launch(plan)
    launched = time.monotonic()
    try:
        wait_ready(box / "agent.port")
        ready = time.monotonic()
    finally:
        handle.kill()
        handle.release()
    return {"launch_s": launched - began, "ready_s": ready - began}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    home = Path(os.environ.get("BOXLITE_TEST_HOME", "/var/tmp/boxlite-test-home"))
    kit = ensure_kit(home)
    backend = QemuBackend()
    results: dict[str, list[dict[str, float]]] = {"writer": [], "file": []}
    with tempfile.TemporaryDirectory(prefix="bx-bench-", dir="/var/tmp") as tmp:
        for index in range(args.runs):
            for mode in ("writer", "file") if index % 2 == 0 else ("file", "writer"):
                results[mode].append(one(backend, kit, Path(tmp), mode, index))
    summary = {
        mode: {key: round(statistics.median(r[key] for r in runs), 3)
               for key in ("launch_s", "ready_s")}
        for mode, runs in results.items()
    }
    summary["runs"] = args.runs
    summary["loadavg_1m"] = os.getloadavg()[0]
    summary["raw"] = results
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
