"""Keystroke echo round trip through a box's terminal, side by side with a host pty
(issue 16's bench).

    python bench/tty_echo.py [-n 300] [--json FILE] [--png FILE]

One key is "typed" and the time until its echo is read back is one sample. In the box: the
Python API's Terminal (``box.exec(["cat"], tty=True)``): host → gRPC Stdin → agent → the pty's
line discipline echoes → agent → gRPC Output → host, the path `boxlite exec -it` takes (the
CLI adds a local read and write). Baseline: the same on a pty of this host (os.openpty, ``cat``
on the slave), so the ratio is the cost of the VM + agent channel. Under TCG the guest's
numbers move with host load (recorded at start and end).
"""

from __future__ import annotations

import argparse
import json
import os
import select
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from figures import pyplot  # noqa: E402  (bench/, the script's own folder)


def summary(samples: list[float]) -> dict:
    ordered = sorted(samples)
    return {"median_ms": round(statistics.median(ordered) * 1000, 3),
            "p99_ms": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000, 3),
            "max_ms": round(ordered[-1] * 1000, 3), "n": len(ordered)}


def host_pty(n: int) -> list[float]:
    master, slave = os.openpty()
    cat = subprocess.Popen(["cat"], stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    samples = []
    try:
        for i in range(n):
            key = bytes([ord("a") + i % 26])
            began = time.perf_counter()
            os.write(master, key)
            got = b""
            while key not in got:
                select.select([master], [], [], 5)
                got += os.read(master, 1024)
            samples.append(time.perf_counter() - began)
    finally:
        cat.kill()
        cat.wait()
        os.close(master)
    return samples


def box_terminal(n: int) -> tuple[list[float], float]:
    from boxlite_core import BoxOptions, Runtime

    with Runtime() as rt:
        box = rt.create(BoxOptions(image="busybox", memory_mib=256))
        box.start()
        try:
            began = time.perf_counter()
            term = box.exec(["cat"], tty=True)
            opened = time.perf_counter() - began
            samples = []
            with term:
                term.write(b"warm-up\r")
                term.read_until(b"warm-up", 30)
                for i in range(n):
                    key = bytes([ord("a") + i % 26])
                    began = time.perf_counter()
                    term.write(key)
                    term.read_until(key, 30)
                    samples.append(time.perf_counter() - began)
        finally:
            box.kill()
            box.remove()
    return samples, opened


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("-n", type=int, default=300, help="keystrokes per side")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--png", type=Path)
    args = parser.parse_args()
    report: dict = {"bench": "tty_echo", "keystrokes": args.n, "cpus": os.cpu_count(),
                    "load_start": os.getloadavg()}
    host = host_pty(args.n)
    box, opened = box_terminal(args.n)
    report.update({
        "host_pty": summary(host),
        "box_terminal": summary(box),
        "box_open_terminal_s": round(opened, 3),
        "ratio_median_box_over_host": round(statistics.median(box) / statistics.median(host), 1),
        "load_end": os.getloadavg(),
    })
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    if args.png:
        plt = pyplot()
        if plt is None:
            return 0
        fig, ax = plt.subplots(figsize=(7, 3.2))
        labels = ["host pty", "box terminal"]
        medians = [report["host_pty"]["median_ms"], report["box_terminal"]["median_ms"]]
        p99s = [report["host_pty"]["p99_ms"], report["box_terminal"]["p99_ms"]]
        ax.barh([0.2, 1.2], p99s, height=0.4, color="#bbb", label="p99")
        ax.barh([-0.2, 0.8], medians, height=0.4, color="#36c", label="median")
        ax.set_yticks([0, 1], labels)
        ax.set_xscale("log")
        ax.set_xlabel(f"keystroke echo round trip, ms (log; n={args.n} each)")
        ax.set_title(f"box terminal (TCG guest) vs host pty: median x"
                     f"{report['ratio_median_box_over_host']}")
        ax.legend(loc="lower right")
        fig.tight_layout()
        fig.savefig(args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
