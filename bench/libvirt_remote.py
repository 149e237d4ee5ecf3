"""Boxes on a remote libvirt host, side by side with their local references, in one run:

* upload: the guest kit (kernel, initrd, guest root image) and a 100 MB ext4-sized base into
  a fresh pool through ``RemotePool.upload`` (upload + read-back + hash), against
  ``virsh vol-upload`` of the same files (upload only);
* exec round trip: ``exec true`` in a box on the remote daemon (agent channel through
  ``virDomainOpenChannel`` and the stream bridge) against a box on the local daemon (its
  unix channel).

The "remote" daemon is boxlite_testing.remote_libvirt (this machine, a private mount
namespace, qemu+tcp on loopback): the network is loopback, so the numbers are the protocol's
and libvirt's cost, not a WAN's. Writes reports/bench-libvirt-remote.json (+ .png with
matplotlib).

    python3 bench/libvirt_remote.py [-n 20] [--home DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from boxlite_core.kit import ensure_kit  # noqa: E402
from boxlite_core.models import BoxOptions  # noqa: E402
from boxlite_core.runtime.runtime import Runtime  # noqa: E402
from boxlite_qemu.libvirt_pool import RemotePool  # noqa: E402
from boxlite_testing.remote_libvirt import RemoteLibvirtd  # noqa: E402

MIB = 2**20


def _virsh_upload(uri: str, pool: str, files: list[Path]) -> float:
    began = time.monotonic()
    for index, path in enumerate(files):
        name = f"virsh-{index}"
        subprocess.run(["virsh", "-c", uri, "vol-create-as", pool, name,
                        str(path.stat().st_size), "--format", "raw"],
                       check=True, capture_output=True, timeout=600)
        subprocess.run(["virsh", "-c", uri, "vol-upload", "--pool", pool, name, str(path)],
                       check=True, capture_output=True, timeout=600)
    return time.monotonic() - began


def upload_bench(remote: RemoteLibvirtd, files: list[Path]) -> dict:
    import libvirt

    conn = libvirt.open(remote.uri)
    try:
        ours = RemotePool(remote.uri, conn, "bench-ours", "/var/lib/libvirt/bench-ours")
        phases = {"upload": 0.0, "verify": 0.0}
        last = {"t": time.monotonic(), "phase": "upload"}

        def progress(what: str, _done: int, _total: int) -> None:
            now = time.monotonic()
            phases[last["phase"]] += now - last["t"]
            last["t"], last["phase"] = now, what.split()[0]

        began = time.monotonic()
        for path in files:
            last["t"], last["phase"] = time.monotonic(), "upload"
            ours.upload(path, progress)
        ours_s = time.monotonic() - began
        again = time.monotonic()
        for path in files:
            ours.upload(path)
        again_s = time.monotonic() - again
        theirs = RemotePool(remote.uri, conn, "bench-virsh", "/var/lib/libvirt/bench-virsh")
        theirs.pool()
        virsh_s = _virsh_upload(remote.uri, "bench-virsh", files)
    finally:
        conn.close()
    size = sum(p.stat().st_size for p in files)
    return {
        "bytes": size, "files": [p.name for p in files],
        "boxlite_s": round(ours_s, 3), "boxlite_upload_s": round(phases["upload"], 3),
        "boxlite_verify_s": round(phases["verify"], 3),
        "boxlite_present_s": round(again_s, 3),
        "virsh_vol_upload_s": round(virsh_s, 3),
        "ratio_boxlite_over_virsh": round(ours_s / virsh_s, 2),
        "boxlite_mib_s": round(size / MIB / ours_s, 1),
        "virsh_mib_s": round(size / MIB / virsh_s, 1),
    }


def exec_bench(rt: Runtime, n: int, **where: str) -> dict:
    box = rt.create(BoxOptions(image="busybox", memory_mib=256, backend="libvirt", **where))
    try:
        box.start()
        box.exec(["true"], timeout=60)  # the shim is up
        times = []
        for _ in range(n):
            began = time.monotonic()
            box.exec(["true"], timeout=60)
            times.append((time.monotonic() - began) * 1000)
    finally:
        rt.remove(box.id, force=True)
    times.sort()
    return {"n": n, "median_ms": round(statistics.median(times), 1),
            "p99_ms": round(times[min(n - 1, int(n * 0.99))], 1)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=20)
    ap.add_argument("--home", default=os.environ.get("BOXLITE_TEST_HOME",
                                                     "/var/tmp/boxlite-test-home"))
    ap.add_argument("--out", default=str(REPO / "reports" / "bench-libvirt-remote.json"))
    args = ap.parse_args()
    home = Path(args.home)
    kit = ensure_kit(home, source_root=REPO)
    base = Path("/var/tmp/bx-bench-base-100m.raw")
    if not base.exists() or base.stat().st_size != 100 * MIB:
        with open(base, "wb") as fh:
            fh.write(os.urandom(100 * MIB))
    os.environ["BOXLITE_LIBVIRT_DOMAIN_TYPE"] = "qemu"  # this machine's KVM boots nothing
    os.environ.pop("BOXLITE_LIBVIRT_URI", None)
    with RemoteLibvirtd(hide=[home]) as remote:
        upload = upload_bench(remote, [Path(kit.kernel), Path(kit.initrd),
                                       Path(kit.root_image), base])
        with Runtime(home) as rt:
            local = exec_bench(rt, args.n)
            far = exec_bench(rt, args.n, host=remote.uri)
    report = {
        "bench": "libvirt-remote",
        "machine": "2 cores, QEMU TCG; the remote daemon is this machine over qemu+tcp",
        "upload": upload,
        "exec_true_local_channel": local,
        "exec_true_remote_channel": far,
        "ratio_exec_remote_over_local_median": round(far["median_ms"] / local["median_ms"], 2),
    }
    out = Path(args.out)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    try:
        import matplotlib
    except ImportError:
        print("bench: no PNG: matplotlib is not installed (pip install matplotlib)",
              file=sys.stderr)
        return 0
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2))
    left.bar(["boxlite\n(upload+verify)", "virsh\nvol-upload"],
             [upload["boxlite_s"], upload["virsh_vol_upload_s"]], color=["#36c", "#bbb"])
    left.set_ylabel(f"seconds for {upload['bytes'] // MIB} MiB")
    right.bar(["local channel", "remote channel"], [local["median_ms"], far["median_ms"]],
              color=["#bbb", "#36c"])
    right.set_ylabel("exec true, median ms")
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
