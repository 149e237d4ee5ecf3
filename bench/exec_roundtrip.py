"""Round-trip latency of the guest agent: Ping, Exec("true"), output throughput, start-up.

    python bench/exec_roundtrip.py                 # agent run natively (root, busybox-static)
    python bench/exec_roundtrip.py --box-dir DIR   # a running box (agent.port in DIR, Init done)

Both modes time the normal path (through the per-box agent shim) and, under "direct", the
pre-shim path (an in-process bridge holding the port: kind "virtio-serial-inproc"). For the
direct run the box's shim is stopped first (other host processes lose their connection; the
next normal connect starts a new shim).

Prints one JSON object. Natively, the agent runs in private mount/UTS namespaces and chroots
into a busybox rootfs built here, so Exec takes the same fork/unshare/chroot path as in a VM.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from boxlite_core.channel.client import AgentClient  # noqa: E402
from boxlite_core.channel.shimctl import stop_shim  # noqa: E402


def direct(box: Path, n: int, **kw) -> dict:
    """The same measurements without the shim (in-process bridge on the port)."""
    stop_shim(box)
    with AgentClient.connect(box, kind="virtio-serial-inproc", timeout=60, **kw) as client:
        return measure(client, n)


def _stats(samples: list[float]) -> dict:
    ms = sorted(s * 1000 for s in samples)
    return {
        "median_ms": round(statistics.median(ms), 3),
        "p90_ms": round(ms[int(len(ms) * 0.9) - 1], 3),
        "min_ms": round(ms[0], 3),
        "n": len(ms),
    }


def _busybox_root(base: Path) -> Path:
    root = base / "root"
    (root / "bin").mkdir(parents=True)
    (root / "etc").mkdir()
    shutil.copy2("/bin/busybox", root / "bin/busybox")
    for applet in subprocess.run(
        ["/bin/busybox", "--list"], capture_output=True, text=True, check=True
    ).stdout.split():
        if applet != "busybox":
            (root / "bin" / applet).symlink_to("busybox")
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    return root


def _start_native(box: Path, importtime: bool = False) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    py = [sys.executable] + (["-X", "importtime"] if importtime else [])
    return subprocess.Popen(
        [
            "unshare",
            "--mount",
            "--uts",
            "--propagation",
            "private",
            *py,
            "-m",
            "boxlite_core.agent",
            "--serial-listen",
            str(box / "agent.port"),
            "--state-dir",
            str(box / "run"),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(box / "agent.log", "wb"),
    )


def measure(client: AgentClient, n: int) -> dict:
    out: dict = {}
    for _ in range(5):
        client.ping()
    samples = []
    for _ in range(n):
        t = time.perf_counter()
        client.ping()
        samples.append(time.perf_counter() - t)
    out["ping"] = _stats(samples)
    for label, argv in (("exec_true", ["true"]), ("exec_echo", ["echo", "hi"])):
        samples = []
        for _ in range(max(5, n // 4)):
            t = time.perf_counter()
            code, *_ = client.run(argv)
            samples.append(time.perf_counter() - t)
            assert code == 0
        out[label] = _stats(samples)
    t = time.perf_counter()
    code, _, _, data, err = client.run(
        ["sh", "-c", "head -c 10000000 /dev/zero | tee /tmp/z; sha256sum /tmp/z >&2"]
    )
    dt = time.perf_counter() - t
    ok = code == 0 and hashlib.sha256(data).hexdigest() == err.split()[0].decode()
    out["stdout_10MB"] = {"seconds": round(dt, 3), "MB_per_s": round(10 / dt, 1), "intact": ok}
    return out


def native(n: int) -> dict:
    result: dict = {"mode": "native"}
    with tempfile.TemporaryDirectory(prefix="bx-bench-") as tmp:
        base = Path(tmp)
        root = _busybox_root(base)
        starts = []
        for i in range(5):
            box = base / f"box{i}"
            box.mkdir()
            t = time.perf_counter()
            proc = _start_native(box)
            client = AgentClient.connect(box, timeout=30, is_alive=lambda p=proc: p.poll() is None)
            starts.append(time.perf_counter() - t)
            if i < 4:
                client.close()
                proc.kill()
                proc.wait()
                stop_shim(box)
        result["agent_start_to_first_ping"] = _stats(starts)
        client.init({"share": {"tag": str(root), "fstype": "bind"}})
        result.update(measure(client, n))
        client.close()
        result["direct"] = direct(box, n, is_alive=lambda p=proc: p.poll() is None)
        client = AgentClient.connect(box, timeout=30, is_alive=lambda p=proc: p.poll() is None)
        client.shutdown()
        client.close()
        proc.wait(timeout=10)
        stop_shim(box)
        # Same namespaces + chroot + /proc via util-linux, for comparison with the agent's
        # in-process fork chain (excludes gRPC; includes exec'ing the unshare binary).
        samples = []
        for _ in range(20):
            t = time.perf_counter()
            subprocess.run(
                ["unshare", "--mount", "--pid", "--fork", "--mount-proc", f"--root={root}", "true"],
                check=True,
            )
            samples.append(time.perf_counter() - t)
        result["util_linux_unshare_spawn"] = _stats(samples)
        # What the agent imports before it can serve (python -X importtime).
        box = base / "imp"
        box.mkdir()
        proc = _start_native(box, importtime=True)
        AgentClient.connect(box, timeout=30).close()
        proc.kill()
        proc.wait()
        stop_shim(box)
        top = []
        for line in (box / "agent.log").read_text().splitlines():
            if line.startswith("import time:") and "|" in line:
                parts = [p.strip() for p in line[len("import time:") :].split("|")]
                if parts[1].isdigit():
                    top.append((int(parts[1]), parts[2].strip()))
        top.sort(reverse=True)
        result["import_cumulative_top_ms"] = {name: round(us / 1000, 1) for us, name in top[:8]}
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--box-dir", type=Path, help="running box directory (agent.port inside)")
    ap.add_argument("-n", type=int, default=200, help="pings to time")
    args = ap.parse_args()
    if args.box_dir:
        with AgentClient.connect(args.box_dir, timeout=60) as client:
            result = {"mode": "box", "box_dir": str(args.box_dir), **measure(client, args.n)}
        result["direct"] = direct(args.box_dir, args.n)
    else:
        result = native(args.n)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
