"""libvirt backend timings: createXML (launch), launch → agent READY, destroy (kill), and
ACPI stop → destroy fallback, over N boots of the guest kit. Prints JSON.

    python3 bench/libvirt_lifecycle.py [-n 3] [--memory 512] [--home DIR] [--uri URI]

Needs a reachable libvirtd (virtlogd -d && libvirtd -d) and libvirt-python.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from boxlite_core.channel.port import open_port
from boxlite_core.kit import ROOT_SERIAL, ensure_kit
from boxlite_core.vmm.spec import AgentChannel, ChannelKind, DiskSpec, VmSpec
from boxlite_qemu.libvirt_backend import LibvirtBackend

REPO = Path(__file__).resolve().parents[1]


def one(backend: LibvirtBackend, kit, box_dir: Path, index: int, memory: int) -> dict:
    spec = VmSpec(
        box_id=f"bench{index}", box_dir=box_dir, cpus=1, memory_mib=memory,
        kernel=kit.kernel, initrd=kit.initrd, cmdline=kit.cmdline,
        console_log=box_dir / "console.log",
        agent=AgentChannel(ChannelKind.VIRTIO_SERIAL, box_dir / "agent.port"),
        disks=(DiskSpec(kit.root_image, "raw", read_only=True, serial=ROOT_SERIAL),),
        guest=kit.guest_hints(),
    )
    plan = backend.plan(spec)
    t0 = time.monotonic()
    handle = backend.launch(plan)
    t1 = time.monotonic()
    sock, _ = open_port(spec.agent.socket, deadline=t1 + 300, is_alive=handle.is_running,
                        console_tail=lambda: spec.console_log.read_text(errors="replace"))
    sock.close()
    t2 = time.monotonic()
    handle.kill()
    t3 = time.monotonic()
    handle.release()
    return {"launch_s": t1 - t0, "ready_s": t2 - t0, "destroy_s": t3 - t2}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=3)
    ap.add_argument("--memory", type=int, default=512)
    ap.add_argument("--home", default="/var/tmp/boxlite-test-home")
    ap.add_argument("--uri", default=None)
    args = ap.parse_args()
    kit = ensure_kit(Path(args.home), source_root=REPO)
    backend = LibvirtBackend(args.uri)
    runs = []
    with tempfile.TemporaryDirectory(prefix="bx-lv-bench-") as tmp:
        for i in range(args.n):
            box_dir = Path(tmp) / f"box{i}"
            box_dir.mkdir()
            runs.append(one(backend, kit, box_dir, i, args.memory))
    summary = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    print(json.dumps({"uri": backend.uri, "domain_type": backend.domain_type,
                      "kit_machine_hint": kit.machine, "machine": "q35", "n": args.n,
                      "median": summary, "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
