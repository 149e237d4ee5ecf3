"""Box network throughput and connection setup, side by side with the same transfer between two
processes on the host (issue 15's bench).

    python bench/network.py [--mib 100] [-n 9] [--json FILE] [--png FILE]

The "internet" is the suite's test world (boxlite_conformance.networld: a network namespace
with servers on 203.0.113.10, reached only through a point-to-point veth). Servers there:
9000 sends N bytes and closes (the box downloads: world → host relay → guest), 9001 reads to
EOF and answers the count (the box uploads), 9002 answers one byte per connection (setup
latency). The baseline runs the same client code in a host process against the same servers.
Published ports: the host fetches N bytes from a box port (host → guest → host) and times
connection setup to it. Needs root (namespaces) and QEMU; TCG numbers move with host load.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "conformance"))

from figures import pyplot  # noqa: E402  (bench/, the script's own folder)

from boxlite_conformance.networld import SERVER_IP, World  # noqa: E402

SERVERS = r"""
import socket, sys, threading
ip, size = sys.argv[1], int(sys.argv[2])
def serve(port, handle):
    s = socket.create_server((ip, port), backlog=64)
    while True:
        c, _ = s.accept()
        threading.Thread(target=handle, args=(c,), daemon=True).start()
def source(c):
    chunk = b"x" * 65536
    left = size
    while left > 0:
        c.sendall(chunk[:min(left, 65536)]); left -= 65536
    c.close()
def sink(c):
    n = 0
    while d := c.recv(65536):
        n += len(d)
    c.sendall(str(n).encode()); c.close()
def one(c):
    c.sendall(b"!"); c.close()
for port, h in ((9000, source), (9001, sink), (9002, one)):
    threading.Thread(target=serve, args=(port, h), daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
"""


def host_download(size: int) -> float:
    began = time.monotonic()
    with socket.create_connection((SERVER_IP, 9000), timeout=60) as s:
        got = 0
        while d := s.recv(1 << 16):
            got += len(d)
    assert got == size, got
    return time.monotonic() - began


def host_upload(size: int) -> float:
    chunk = b"y" * 65536
    began = time.monotonic()
    with socket.create_connection((SERVER_IP, 9001), timeout=60) as s:
        left = size
        while left > 0:
            s.sendall(chunk[:min(left, 65536)])
            left -= 65536
        s.shutdown(socket.SHUT_WR)
        answer = s.recv(64)
    assert int(answer) == size, answer
    return time.monotonic() - began


def host_connect() -> float:
    began = time.monotonic()
    with socket.create_connection((SERVER_IP, 9002), timeout=10) as s:
        assert s.recv(1) == b"!"
    return time.monotonic() - began


def timed_exec(box, script: str) -> tuple[float, str]:
    began = time.monotonic()
    result = box.exec(["sh", "-c", script], timeout=600)
    took = time.monotonic() - began
    assert result.exit_code == 0, result.stderr
    return took, result.stdout.decode()


def stats(samples: list[float]) -> dict:
    ordered = sorted(samples)
    return {"median_s": round(statistics.median(ordered), 4),
            "p90_s": round(ordered[max(0, int(len(ordered) * 0.9) - 1)], 4),
            "n": len(ordered)}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mib", type=int, default=100)
    parser.add_argument("-n", type=int, default=9, help="connection-setup samples")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--png", type=Path)
    args = parser.parse_args()
    size = args.mib * 1024 * 1024

    from boxlite_core import BoxOptions, Runtime
    from boxlite_core.network.policy import NetworkPolicy


    report: dict = {"bench": "network", "mib": args.mib, "cpus": os.cpu_count(),
                    "load_start": os.getloadavg()}
    with tempfile.TemporaryDirectory() as tmp, \
            World(tag="bench", hosts_file=Path(tmp) / "hosts") as world:
        servers = subprocess.Popen(
            ["ip", "netns", "exec", world.netns, sys.executable, "-c", SERVERS, SERVER_IP,
             str(size)], stdout=subprocess.PIPE, text=True)
        world.servers.append(servers)
        assert servers.stdout is not None and servers.stdout.readline().strip() == "ready"
        host = {"download_s": host_download(size), "upload_s": host_upload(size),
                "connect": stats([host_connect() for _ in range(args.n)])}
        with Runtime() as rt:
            box = rt.create(BoxOptions(
                image="busybox", memory_mib=512, ports=["127.0.0.1:0:9100"],
                network=NetworkPolicy.parse([f"{SERVER_IP}"], None)))
            box.start()
            try:
                down, _ = timed_exec(box, f"nc {SERVER_IP} 9000 > /dev/null")
                up, out = timed_exec(box, f"head -c {size} /dev/zero | nc {SERVER_IP} 9001")
                assert out.strip().endswith(str(size)), out
                connects = []
                for _ in range(args.n):
                    took, _ = timed_exec(box, f"nc {SERVER_IP} 9002 </dev/null")
                    connects.append(took)
                exec_only = [timed_exec(box, "true")[0] for _ in range(args.n)]
                # published: a server in the box sends N bytes per connection
                box.exec_stream(["sh", "-c", f"while true; do head -c {size} /dev/zero | "
                                             "nc -l -p 9100; done"])
                port = box.info()["state"]["network"]["ports"][0]["host_port"]
                time.sleep(1.0)
                began = time.monotonic()
                with socket.create_connection(("127.0.0.1", port), timeout=120) as s:
                    got = 0
                    while d := s.recv(1 << 16):
                        got += len(d)
                published = time.monotonic() - began
                assert got == size, got
            finally:
                box.kill()
                box.remove()
        box_side = {
            "download_s": round(down, 3), "upload_s": round(up, 3),
            "published_fetch_s": round(published, 3),
            "connect_via_exec": stats(connects), "exec_true": stats(exec_only),
        }
    mib = args.mib
    report.update({
        "host": {k: (round(v, 4) if isinstance(v, float) else v) for k, v in host.items()},
        "box": box_side,
        "throughput_mib_s": {
            "host_download": round(mib / host["download_s"], 1),
            "host_upload": round(mib / host["upload_s"], 1),
            "box_download": round(mib / down, 1),
            "box_upload": round(mib / up, 1),
            "published_to_host": round(mib / published, 1),
        },
        "ratios": {
            "box_download_over_host": round(down / host["download_s"], 1),
            "box_upload_over_host": round(up / host["upload_s"], 1),
            "connect_setup_box_minus_exec_s": round(
                statistics.median(connects) - statistics.median(exec_only), 4),
            "connect_setup_host_s": host["connect"]["median_s"],
        },
        "load_end": os.getloadavg(),
    })
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    plt = pyplot() if args.png else None
    if plt is not None:
        t = report["throughput_mib_s"]
        fig, ax = plt.subplots(figsize=(7, 3.5))
        names = list(t)
        ax.barh(names, [t[n] for n in names], color=["#888", "#888", "#36c", "#36c", "#3a6"])
        ax.set_xscale("log")
        ax.set_xlabel(f"MiB/s ({mib} MiB, log scale)")
        ax.set_title("box network (TCG guest) vs host processes, one run")
        for i, n in enumerate(names):
            ax.text(t[n], i, f" {t[n]}", va="center")
        fig.tight_layout()
        fig.savefig(args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
