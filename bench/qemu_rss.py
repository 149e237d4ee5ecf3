"""RSS of an idle QEMU box: launch the guest kit with the qemu backend, wait for the agent's
READY (guest fully booted, agent idle), settle, read VmRSS/VmHWM from /proc/PID/status.

    python3 bench/qemu_rss.py [-n 3] [--memory 512] [--tb-size 0 --tb-size 64] [--home DIR]

``--tb-size 0`` means QEMU's default TCG translation cache; other values set
``tcg_tb_size_mib`` in the spec's backend_options (``-accel tcg,tb-size=N``). Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

from boxlite_core.kit import ROOT_SERIAL, ensure_kit
from boxlite_core.vmm.spec import AgentChannel, ChannelKind, DiskSpec, VmSpec
from boxlite_qemu.backend import QemuBackend


def status_kib(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
            out[key] = int(value.split()[0])
    return out


def wait_ready(path: Path, timeout: float) -> float:
    start = time.monotonic()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(path))
    sock.settimeout(timeout)
    buf = b""
    while b"READY\n" not in buf:
        chunk = sock.recv(64)
        if not chunk:
            raise RuntimeError("agent port closed before READY")
        buf += chunk
    sock.close()
    return time.monotonic() - start


def one_run(kit, backend: QemuBackend, box: Path, memory: int, tb_size: int,
            settle: float) -> dict:
    box.mkdir(parents=True)
    options = {"tcg_tb_size_mib": tb_size} if tb_size else {}
    spec = VmSpec(box_id=box.name, box_dir=box, cpus=1, memory_mib=memory, kernel=kit.kernel,
                  initrd=kit.initrd, cmdline=kit.cmdline, console_log=box / "console.log",
                  agent=AgentChannel(ChannelKind.VIRTIO_SERIAL, box / "agent.port"),
                  disks=(DiskSpec(kit.root_image, "raw", True, ROOT_SERIAL),),
                  guest=kit.guest_hints(), backend_options=options)
    started = time.monotonic()
    handle = backend.launch(backend.plan(spec))
    try:
        wait_ready(box / "agent.port", 180)
        ready_s = time.monotonic() - started
        time.sleep(settle)
        mem = status_kib(handle.pid)
    finally:
        handle.kill()
    return {"ready_s": round(ready_s, 2), **mem}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--runs", type=int, default=3)
    parser.add_argument("--memory", type=int, default=512, help="guest MiB")
    parser.add_argument("--tb-size", type=int, action="append",
                        help="TCG translation cache MiB (0 = QEMU default); repeatable")
    parser.add_argument("--settle", type=float, default=3.0, help="idle seconds before reading")
    parser.add_argument("--home", type=Path, default=Path("/var/tmp/boxlite-test-home"))
    args = parser.parse_args(argv)

    kit = ensure_kit(args.home, progress=lambda msg, _f: print(f"kit: {msg}", file=sys.stderr))
    backend = QemuBackend()
    probe = backend.probe()
    results = {}
    with tempfile.TemporaryDirectory(prefix="bxrss") as tmp:
        for tb in args.tb_size or [0]:
            runs = [one_run(kit, backend, Path(tmp) / f"tb{tb}-{i}", args.memory, tb,
                            args.settle) for i in range(args.runs)]
            rss = [r["VmRSS"] for r in runs]
            results[f"tb_size_{tb or 'default'}"] = {
                "rss_mib_median": round(statistics.median(rss) / 1024, 1),
                "runs": runs,
            }
    print(json.dumps({
        "bench": "qemu_rss",
        "accel": probe.details.get("accel"),
        "qemu_version": probe.details.get("qemu_version"),
        "machine": kit.machine,
        "guest_memory_mib": args.memory,
        "settle_s": args.settle,
        "results": results,
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
