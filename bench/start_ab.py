"""A/B of a box's start: `boxlite run --rm busybox true` from two checkouts, interleaved.

Why interleaved in one run: under TCG on a shared 2-core host, load moves a boot by seconds
from one minute to the next; alternating A and B and reporting medians side by side (with
their ratio) is the only comparison that means anything here.

    git archive OLD_COMMIT | tar -x -C /tmp/old
    python3 bench/start_ab.py --a /tmp/old --b . --runs 5 > reports/bench-start-ab.json

Each checkout gets its own BOXLITE_HOME (default /var/tmp/boxlite-ab-{a,b}); the first run in
each builds the guest kit (not timed: one warm-up run per side). Prints one JSON object:
per side the wall times (s), median and p90, and ``ratio_b_over_a`` of the medians.
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

CLI = "from boxlite_core.cli.main import main; main()"
#: bound on one `boxlite run` (seconds): a cold kit build on the warm-up run takes minutes
RUN_TIMEOUT = 1800


def pythonpath(tree: Path) -> str:
    # every distribution of the checkout: an installed (editable) plugin of the other tree
    # must not be what the entry points load
    parts = [tree, *sorted((tree / "plugins").glob("boxlite_*")), tree / "conformance"]
    return os.pathsep.join(str(p.resolve()) for p in parts)


def run_once(tree: Path, home: Path, argv: list[str]) -> float:
    env = dict(os.environ, PYTHONPATH=pythonpath(tree), BOXLITE_HOME=str(home),
               BOXLITE_PULL="never")
    began = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CLI, *argv], env=env, capture_output=True,
                          text=True, timeout=RUN_TIMEOUT)
    took = time.perf_counter() - began
    if proc.returncode != 0:
        raise SystemExit(f"{tree}: boxlite {' '.join(argv)} exited {proc.returncode}: "
                         f"{proc.stderr.strip()[-800:]}")
    return took


def summary(times: list[float]) -> dict[str, object]:
    ordered = sorted(times)
    return {
        "runs_s": [round(t, 3) for t in times],
        "median_s": round(statistics.median(times), 3),
        "p90_s": round(ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))], 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--a", type=Path, required=True, help="checkout A (e.g. the old tree)")
    ap.add_argument("--b", type=Path, required=True, help="checkout B (e.g. this one)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--home-prefix", default="/var/tmp/boxlite-ab")
    ap.add_argument("--image", default="busybox")
    args = ap.parse_args()
    argv = ["run", "--rm", args.image, "--", "true"]
    sides = {"a": args.a, "b": args.b}
    homes = {k: Path(f"{args.home_prefix}-{k}") for k in sides}
    for key, tree in sides.items():  # warm-up: kit build, image import
        run_once(tree, homes[key], argv)
    times: dict[str, list[float]] = {"a": [], "b": []}
    load_before = os.getloadavg()[0]
    for _ in range(args.runs):
        for key, tree in sides.items():
            times[key].append(run_once(tree, homes[key], argv))
    result = {
        "command": "boxlite " + " ".join(argv),
        "a": {"tree": str(args.a), **summary(times["a"])},
        "b": {"tree": str(args.b), **summary(times["b"])},
        "ratio_b_over_a": round(statistics.median(times["b"]) / statistics.median(times["a"]), 3),
        "load_avg_before": round(load_before, 2),
        "load_avg_after": round(os.getloadavg()[0], 2),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
