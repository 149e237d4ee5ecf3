"""Framework overhead: bare QEMU boot vs `boxlite run`, where a box start's time goes, exec
round trip and idle memory, as ONE JSON report (``--png FILE`` draws a chart).

    python bench/run_overhead.py [-n 5] [--execs 50] [--png bench/out/overhead.png]
                                 [--home /var/tmp/boxlite-bench-home] [--seed-from HOME]

(a) boot: bench/boot_bare.py's marker mode (QEMU launch → `boxlite-init: start`, same kit)
    vs `boxlite run --rm busybox true` wall time, median of N each, and their ratio; then N
    API boxes (``Runtime.create(...).start()``) for the runtime's stage timings, with
    ``guest_connect`` split by watching the box's serial console for the initramfs and
    agent markers (kernel boot, /init to switch_root, agent Python start + imports, first
    Ping through the host bridge).
(b) exec: ``box.exec(["true"])`` M times in the last running box, and the raw agent RPCs
    (bench/exec_roundtrip.py's ``measure`` on the box's own AgentClient).
(c) memory: VmRSS of that box's QEMU after 5 s idle (bench/qemu_rss.py's ``status_kib``)
    and of this host-side Python process.

Every section records the host load average: this host is shared, TCG numbers move with it.
``--seed-from`` copies a built guest kit cache from another BOXLITE_HOME (skips a
multi-minute kit build in a fresh bench home).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path[:0] = [str(REPO), str(BENCH)]

import boot_bare  # noqa: E402
import exec_roundtrip  # noqa: E402
import qemu_rss  # noqa: E402

from boxlite_core.diskspace import ensure_free  # noqa: E402
from boxlite_core.fscopy import copy_tree  # noqa: E402
from boxlite_core.kit import EXEC_MARKER, START_MARKER  # noqa: E402
from boxlite_core.kit.builder import find_kit, kit_cache_dir  # noqa: E402
from boxlite_core.rootfs.util import tree_usage  # noqa: E402

DEFAULT_HOME = Path("/var/tmp/boxlite-bench-home")
SERVING_MARKER = "boxlite-agent[1]: serving on"
#: console markers of one box boot, in the order they appear
MARKERS = {"init_start": START_MARKER, "exec_agent": EXEC_MARKER, "agent_serving": SERVING_MARKER}
IDLE_SECONDS = 5.0


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def other_qemus() -> int:
    """QEMU processes on the host (other engineers' VMs compete for the same 2 cores)."""
    count = 0
    for comm in Path("/proc").glob("[0-9]*/comm"):
        with contextlib.suppress(OSError):
            if comm.read_text().startswith("qemu-system"):
                count += 1
    return count


def summary_s(samples: list[float]) -> dict[str, Any]:
    return {
        "median_s": round(statistics.median(samples), 3) if samples else None,
        "min_s": round(min(samples), 3) if samples else None,
        "max_s": round(max(samples), 3) if samples else None,
        "runs": [round(s, 3) for s in samples],
    }


def seed_kit(home: Path, source: Path) -> None:
    """Copy a built guest kit cache from another home if this one has no current kit."""
    if find_kit(home) is not None:
        return
    src, dst = kit_cache_dir(source), kit_cache_dir(home)
    kit = find_kit(source)
    if kit is None:
        print(f"seed: {source} has no current kit either; it will be built", file=sys.stderr)
        return
    dst.mkdir(parents=True, exist_ok=True)
    parts = [p for p in ("base", "debs", "kernel", "wheels", f"kits/{kit.kit_id}")
             if (src / p).exists() and not (dst / p).exists()]
    # the base root holds device nodes (dev/full, dev/zero): shutil.copytree *reads* them
    # (it once wrote 78 GB from dev/full); copy_tree makes nodes, never reads, and the
    # space is checked first
    ensure_free(dst, sum(tree_usage(src / p)[0] for p in parts), f"seeding the kit from {src}")
    for part in parts:
        (dst / part).parent.mkdir(parents=True, exist_ok=True)
        copy_tree(src / part, dst / part)
    print(f"seed: copied kit {kit.kit_id} from {source}", file=sys.stderr)


# -- (a) boot ---------------------------------------------------------------------------------


def bare_boot(home: Path, runs: int) -> dict[str, Any]:
    """boot_bare.py's own measurement (marker mode), parsed from its JSON."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        boot_bare.main(["-n", str(runs), "--home", str(home), "--source-root", str(REPO)])
    report = json.loads(out.getvalue())
    (machine, result), = report["results"].items()
    return {"until": report["until"], "machine": machine, "accel": report["accel"],
            "kit_id": report["kit_id"], "memory_mib": 512, **result, "load": load()}


def cli_run(runs: int, env: dict[str, str]) -> dict[str, Any]:
    exe = shutil.which("boxlite")
    base = [exe] if exe else [sys.executable, "-m", "boxlite_core.cli.main"]
    argv = [*base, "run", "--rm", "busybox", "true"]
    times: list[float] = []
    failures: list[str] = []
    for _ in range(runs):
        t = time.perf_counter()
        proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
        dt = time.perf_counter() - t
        if proc.returncode == 0:
            times.append(dt)
        else:
            # kept: a failed run is a result too (which stage, after how long)
            failures.append(f"after {dt:.1f}s: " + proc.stderr.strip().splitlines()[-1][:300])
            print(f"boxlite run failed ({proc.returncode}): {proc.stderr[-1500:]}",
                  file=sys.stderr)
    # The host CLI's own start-up (Python + click + lazy imports), paid once per `run`.
    startup = []
    for _ in range(runs):
        t = time.perf_counter()
        subprocess.run([*base, "--version"], env=env, capture_output=True, check=True)
        startup.append(time.perf_counter() - t)
    return {"argv": ["boxlite", *argv[len(base):]], "memory_mib": 512, **summary_s(times),
            "failures": failures, "cli_startup": summary_s(startup), "load": load()}


class ConsoleWatch:
    """Time when each boot marker first appears in a box's console.log (polled, ~5 ms)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.t0 = time.monotonic()
        self.seen: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set() and len(self.seen) < len(MARKERS):
            try:
                text = self.path.read_text(errors="replace")
            except FileNotFoundError:
                text = ""
            now = time.monotonic() - self.t0
            for key, marker in MARKERS.items():
                if key not in self.seen and marker in text:
                    self.seen[key] = now
            self._stop.wait(0.005)

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        return self.seen


def split_connect(timings: dict[str, float], seen: dict[str, float]) -> dict[str, float]:
    """Break guest_connect (launch returned → agent answered Ping) into boot phases.

    Offsets are from start(); stages before vmm_spawn are summed to find launch's end, so a
    few ms of inter-stage bookkeeping land in the first phase.
    """
    spawned = sum(timings.get(k, 0.0) for k in
                  ("filesystem_setup", "prepare", "volumes", "vmm_spawn"))
    connected = spawned + timings.get("guest_connect", 0.0)
    if len(seen) < len(MARKERS):
        return {}
    return {
        "kernel_boot_to_init": round(seen["init_start"] - spawned, 3),
        "initramfs_to_switch_root": round(seen["exec_agent"] - seen["init_start"], 3),
        "agent_python_start_imports": round(seen["agent_serving"] - seen["exec_agent"], 3),
        "bridge_first_ping": round(connected - seen["agent_serving"], 3),
    }


STAGES = ("filesystem_setup", "guest_kit_prep", "container_rootfs_prep", "prepare", "volumes",
          "vmm_spawn", "guest_connect", "guest_init", "total")


def api_boxes(rt: Any, runs: int, memory: int) -> tuple[dict[str, Any], Any]:
    """Start N boxes one after another; keep the last one running for (b) and (c)."""
    from boxlite_core import BoxOptions

    per_run: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    box = None
    for i in range(runs):
        if box is not None:
            box.stop()
            rt.remove(box.id, force=True)
            box = None
        t = time.perf_counter()
        candidate = rt.create(BoxOptions(image="busybox", memory_mib=memory))
        create_s = time.perf_counter() - t
        watch = ConsoleWatch(candidate.dir / "console.log")
        t = time.perf_counter()
        try:
            candidate.start()
        except Exception as exc:  # kept by the runtime for diagnosis; the bench goes on
            failed.append({"box": candidate.id, "after_s": round(time.perf_counter() - t, 1),
                           "console_markers_s": watch.stop(), "load": load(),
                           "error": str(exc).splitlines()[0][:400]})
            print(f"api box {i + 1}/{runs}: FAILED {exc}", file=sys.stderr)
            continue
        box = candidate
        start_s = time.perf_counter() - t
        seen = watch.stop()
        timings = dict(box.info()["stage_timings"])
        per_run.append({"create_s": round(create_s, 3), "start_s": round(start_s, 3),
                        "stages": timings, "console_markers_s": seen,
                        "guest_connect_split": split_connect(timings, seen)})
        print(f"api box {i + 1}/{runs}: start {start_s:.2f}s", file=sys.stderr)
    if box is None:
        raise SystemExit(f"every API box failed to start: {json.dumps(failed, indent=2)}")
    medians: dict[str, Any] = {
        "create_s": round(statistics.median(r["create_s"] for r in per_run), 3),
        "start_s": round(statistics.median(r["start_s"] for r in per_run), 3),
    }
    medians["stages"] = {k: round(statistics.median(r["stages"][k] for r in per_run), 3)
                         for k in STAGES if all(k in r["stages"] for r in per_run)}
    splits = [r["guest_connect_split"] for r in per_run if r["guest_connect_split"]]
    if splits:
        medians["guest_connect_split"] = {
            k: round(statistics.median(s[k] for s in splits), 3) for k in splits[0]}
    return {"memory_mib": memory, "median": medians, "runs": per_run, "failed": failed,
            "load": load()}, box


# -- (b) exec, (c) memory -----------------------------------------------------------------------


def exec_latency(box: Any, n: int) -> dict[str, Any]:
    for _ in range(5):
        box.exec(["true"])
    samples = []
    for _ in range(n):
        t = time.perf_counter()
        result = box.exec(["true"])
        samples.append(time.perf_counter() - t)
        assert result.exit_code == 0, result
    # The box's own AgentClient: a second connection to the virtio-serial port is not possible.
    client = box._live_client()
    raw_true = []
    for _ in range(n):
        t = time.perf_counter()
        code, *_ = client.run(["true"])
        raw_true.append(time.perf_counter() - t)
        assert code == 0
    return {
        "box_exec_true": exec_roundtrip._stats(samples),
        "agent_run_true": exec_roundtrip._stats(raw_true),
        "agent_rpc": exec_roundtrip.measure(client, n),
        "load": load(),
    }


def shim_pid(box: Any) -> int | None:
    """The box's agent shim (a host Python process holding the serial port), if any."""
    try:
        return int(json.loads((box.dir / "shim.json").read_text())["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def memory(box: Any) -> dict[str, Any]:
    pid = box.info()["pid"]
    time.sleep(IDLE_SECONDS)
    qemu = qemu_rss.status_kib(pid)
    host = qemu_rss.status_kib(os.getpid())
    shim = shim_pid(box)
    shim_kib = None
    if shim is not None:
        with contextlib.suppress(OSError):
            shim_kib = qemu_rss.status_kib(shim)
    return {
        "shim_pid": shim,
        "shim_rss_mib": round(shim_kib["VmRSS"] / 1024, 1) if shim_kib else None,
        "shim_kib": shim_kib,
        "idle_s": IDLE_SECONDS,
        "qemu_pid": pid,
        "qemu_rss_mib": round(qemu["VmRSS"] / 1024, 1),
        "qemu_kib": qemu,
        "host_python_rss_mib": round(host["VmRSS"] / 1024, 1),
        "host_python_kib": host,
        "load": load(),
    }


# -- chart ------------------------------------------------------------------------------------


def draw(report: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib  # type: ignore[import-not-found]

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # type: ignore[import-not-found]
    except ImportError:
        print("matplotlib not installed: skipping --png (pip install matplotlib)", file=sys.stderr)
        return
    boot = report["boot"]
    med = boot["api_box"]["median"]
    stages = med["stages"]
    split = med.get("guest_connect_split", {})
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(13, 4.2),
                                        gridspec_kw={"width_ratios": [3, 2, 1.2]})
    # (a) stacked: API start broken down; bare boot and CLI run as single bars
    parts = [("kit lookup + rootfs prep", stages.get("prepare", 0.0)),
             ("vmm spawn", stages.get("vmm_spawn", 0.0))]
    if split:
        parts += [("kernel → /init", split["kernel_boot_to_init"]),
                  ("initramfs → switch_root", split["initramfs_to_switch_root"]),
                  ("agent: Python + imports", split["agent_python_start_imports"]),
                  ("host shim + first Ping", split["bridge_first_ping"])]
    else:
        parts.append(("guest connect", stages.get("guest_connect", 0.0)))
    parts.append(("guest init", stages.get("guest_init", 0.0)))
    left = 0.0
    for label, value in parts:
        ax1.barh("API box.start()", value, left=left, label=label)
        left += value
    ax1.barh("boxlite run --rm\nbusybox true", boot["cli_run"]["median_s"] or 0, color="grey")
    ax1.barh("bare QEMU →\n/init marker", boot["bare_qemu"]["median_s"] or 0, color="black")
    ax1.set_xlabel("seconds (median)")
    ax1.set_title(f"boot (ratio run/bare = {boot['ratio_cli_over_bare']})")
    ax1.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0, -0.22), ncol=4, frameon=False)
    ex = report["exec"]
    labels = ["box\n.exec", "agent\nExec", "agent\nPing"]
    vals = [ex["box_exec_true"], ex["agent_run_true"], ex["agent_rpc"]["ping"]]
    direct = ex.get("agent_rpc_direct_no_shim") or {}
    if "exec_true" in direct:
        labels += ["Exec\nno shim", "Ping\nno shim"]
        vals += [direct["exec_true"], direct["ping"]]
    ax2.bar(labels, [v["median_ms"] for v in vals], label="median")
    ax2.bar(labels, [v["p90_ms"] - v["median_ms"] for v in vals],
            bottom=[v["median_ms"] for v in vals], label="→ p90", alpha=0.5)
    ax2.set_ylabel("ms")
    ax2.tick_params(axis="x", labelsize=7)
    ax2.set_title("exec `true` round trip")
    ax2.legend(fontsize=7)
    mem = report["memory"]
    ax3.bar(["QEMU", "host\nPython", "shim"],
            [mem["qemu_rss_mib"], mem["host_python_rss_mib"], mem.get("shim_rss_mib") or 0])
    ax3.set_ylabel("RSS MiB")
    ax3.set_title("memory")
    fig.suptitle(f"boxlite overhead, {report['accel']} — load avg {report['load_start']} → "
                 f"{report['load_end']}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)


# -- main -------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", "--runs", type=int, default=5, help="boots of each kind")
    ap.add_argument("--execs", type=int, default=50, help="exec round trips to time")
    ap.add_argument("--memory", type=int, default=256, help="MiB of the API boxes")
    ap.add_argument("--home", type=Path,
                    default=Path(os.environ.get("BOXLITE_HOME") or DEFAULT_HOME))
    ap.add_argument("--seed-from", type=Path, help="BOXLITE_HOME to copy a built kit from")
    ap.add_argument("--png", type=Path)
    ap.add_argument("--json", type=Path, help="also write the report here")
    ap.add_argument("--redraw", type=Path, metavar="JSON",
                    help="only draw --png from a saved report (no VMs booted)")
    args = ap.parse_args(argv)
    if args.redraw:
        if not args.png:
            ap.error("--redraw needs --png FILE")
        draw(json.loads(args.redraw.read_text()), args.png)
        return 0

    os.environ["BOXLITE_HOME"] = str(args.home)
    # A healthy TCG boot answers in ~10 s; a hung one should cost 60 s here, not 120 s.
    os.environ.setdefault("BOXLITE_BOOT_TIMEOUT", "60")
    env = dict(os.environ)
    if args.seed_from:
        seed_kit(args.home, args.seed_from)
    report: dict[str, Any] = {"bench": "run_overhead", "home": str(args.home),
                              "boot_timeout_s": float(os.environ["BOXLITE_BOOT_TIMEOUT"]),
                              "cpus": os.cpu_count(), "load_start": load(),
                              "qemus_running_at_start": other_qemus()}
    bare = bare_boot(args.home, args.runs)
    report["accel"] = bare["accel"]
    cli = cli_run(args.runs, env)
    ratio = (round(cli["median_s"] / bare["median_s"], 2)
             if cli["median_s"] and bare["median_s"] else None)
    from boxlite_core import Runtime

    rt = Runtime(args.home)
    box = None
    try:
        api, box = api_boxes(rt, args.runs, args.memory)
        report["boot"] = {"bare_qemu": bare, "cli_run": cli, "ratio_cli_over_bare": ratio,
                          "overhead_s": round(cli["median_s"] - bare["median_s"], 3)
                          if ratio else None,
                          "api_box": api}
        report["exec"] = exec_latency(box, args.execs)
        report["memory"] = memory(box)
        # Last: the same RPCs without the shim (stops it; the box is killed afterwards).
        direct = getattr(exec_roundtrip, "direct", None)
        if direct is not None and shim_pid(box) is not None:
            try:
                report["exec"]["agent_rpc_direct_no_shim"] = direct(box.dir, args.execs)
            except Exception as exc:  # a bench section failing must not lose the report
                report["exec"]["agent_rpc_direct_no_shim"] = {"error": repr(exc)}
            box.kill()
    finally:
        if box is not None:
            box.stop()
            rt.remove(box.id, force=True)
        rt.close()
    report["load_end"] = load()
    report["qemus_running_at_end"] = other_qemus()
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    if args.png:
        draw(report, args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
