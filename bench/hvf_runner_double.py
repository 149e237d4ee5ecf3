"""hvf backend costs measurable without a Mac: plan() time, and runner launch → first agent
byte over the framework test double (process start + config + bridge; no guest boot).

    python bench/hvf_runner_double.py        # prints JSON
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent / "plugins" / "boxlite_hvf" / "tests"
sys.path.insert(0, str(HERE))
os.environ["BOXLITE_HVF_API_FACTORY"] = "hvf_vz_double:recording"
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH"))
                                           if p)

from hvf_specs import make_spec  # noqa: E402

from boxlite_core.vmm.spec import DiskSpec  # noqa: E402
from boxlite_hvf.backend import HvfBackend  # noqa: E402


def first_byte(path: Path) -> None:
    while True:
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(str(path))
                s.recv(1)
                return
        except (FileNotFoundError, ConnectionRefusedError):
            time.sleep(0.005)


def main(runs: int = 5) -> None:
    backend = HvfBackend(arch="arm64")
    plans, launches = [], []
    for _ in range(runs):
        with tempfile.TemporaryDirectory() as tmp:
            box = Path(tmp)
            spec = make_spec(box, disks=(DiskSpec(box / "g.raw", format="raw"),))
            t0 = time.perf_counter()
            plan = backend.plan(spec)
            plans.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            handle = backend.launch(plan)
            first_byte(spec.agent.socket)
            launches.append(time.perf_counter() - t0)
            handle.stop(10)
    print(json.dumps({
        "runs": runs,
        "plan_ms_median": round(statistics.median(plans) * 1000, 3),
        "launch_to_first_agent_byte_ms_median": round(statistics.median(launches) * 1000, 1),
        "note": "framework double: no guest boots; measures the runner process path only",
    }, indent=2))


if __name__ == "__main__":
    main()
