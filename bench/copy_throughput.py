"""Copy throughput in and out of a box, side by side with raw streams over the same channel,
for two checkouts in one interleaved run (issue 17, item 9).

    git archive OLD | tar -x -C /var/tmp/base-tree
    python3 bench/copy_throughput.py --baseline /var/tmp/base-tree --rounds 3 \\
        --json reports/bench-copy.json --png reports/bench-copy.png

Each checkout gets a worker process (its own PYTHONPATH, the same BOXLITE_HOME: kits are
kept per agent version) that boots one busybox box and then, on command, times:

* ``copy_in``: ``Box.copy_in`` of a 50 MiB file of random bytes (incompressible) to /tmp;
* ``copy_out``: ``Box.copy_out`` of it back to the host;
* ``stdin_raw``: ``exec sh -c 'cat > /dev/null'`` with the same 50 MiB as stdin;
* ``stdout_raw``: ``exec cat /tmp/blob`` (the 50 MiB to stdout, captured);
* ``stdout_zero``: ``exec head -c 50M /dev/zero`` (busybox writes it 4 KiB at a time: the
  channel's per-message cost), with ``--zero``.

Sides alternate op by op, round by round (TCG on a shared 2-core host: load moves numbers by
seconds from one minute to the next); while one side measures, the other's box is paused.
Besides wall time, each op records where the CPU went: the worker (host client: gRPC, tar,
file writes), the per-box shim (gRPC proxy + the virtio-serial bridge), QEMU's vCPU thread
(the guest: agent, relay, kernel) and QEMU's other threads (device emulation, chardev I/O);
and one cProfile of the host side per copy op (``--profile``). Prints one JSON object;
``--png`` draws medians with the targets.
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

MIB = 1024 * 1024
OPS = ("copy_in", "copy_out", "stdin_raw", "stdout_raw")
#: issue 17 item 9: both copy directions at least twice as fast as the baseline
SPEEDUP_TARGET = 2.0
#: bound on one worker reply (s): a kit build on first start takes minutes
REPLY_TIMEOUT = 1800


# -- worker (runs inside one checkout's interpreter) ---------------------------------------


def _thread_cpu(pid: int) -> dict[int, tuple[str, float]]:
    """{tid: (name, CPU seconds user+sys)} of ``pid``'s threads ({} when it is gone)."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as fh:
                raw = fh.read()
        except OSError:
            continue
        fields = raw[raw.rindex(")") + 2 :].split()
        out[int(tid)] = (
            raw[raw.index("(") + 1 : raw.rindex(")")],
            (int(fields[11]) + int(fields[12])) / tick,
        )
    return out


def _qemu_split(pid: int, before: dict, after: dict) -> tuple[float, float]:
    """(vCPU seconds, other seconds) of QEMU between two :func:`_thread_cpu` samples. The
    vCPU thread is the one named "CPU n/..." or, unnamed (no debug-threads), the busiest
    thread other than the main loop (a 1-vCPU box: one vCPU thread)."""
    delta = {tid: after[tid][1] - before.get(tid, ("", 0.0))[1] for tid in after}
    named = [tid for tid in after if after[tid][0].startswith("CPU ")]
    if named:
        vcpu = set(named)
    else:
        others = [tid for tid in delta if tid != pid]
        vcpu = {max(others, key=delta.__getitem__)} if others else set()
    return (sum(delta[t] for t in vcpu), sum(d for t, d in delta.items() if t not in vcpu))


class Worker:
    def __init__(self, home: Path, size: int, scratch: Path) -> None:
        from boxlite_core import BoxOptions, Runtime

        self.size = size
        self.scratch = scratch
        scratch.mkdir(parents=True, exist_ok=True)
        self.blob = scratch / "blob"
        if not self.blob.exists() or self.blob.stat().st_size != size:
            with open(self.blob, "wb") as fh:
                for _ in range(size // MIB):
                    fh.write(os.urandom(MIB))
                fh.write(os.urandom(size % MIB))
        self.data = self.blob.read_bytes()
        self.rt = Runtime(home)
        began = time.perf_counter()
        self.box = self.rt.create(
            BoxOptions(image="busybox", memory_mib=512, name=f"bench-copy-{os.getpid()}")
        )
        self.box.start()
        self.start_s = time.perf_counter() - began
        record = self.box._link.record
        self.qemu_pid = int(record.pid or 0)
        shim_json = home / "boxes" / record.id / "shim.json"
        self.shim_pid = int(json.loads(shim_json.read_text())["pid"]) if shim_json.exists() else 0
        self.box.exec(["true"])
        self.box.copy_in(self.blob, "/tmp/blob")  # copy_out and stdout_raw read it

    def _run(self, op: str) -> None:
        if op == "copy_in":
            self.box.copy_in(self.blob, "/tmp/blob")
        elif op == "copy_out":
            out = self.scratch / "out"
            out.unlink(missing_ok=True)
            self.box.copy_out("/tmp/blob", out)
            if out.stat().st_size != self.size:
                raise RuntimeError(f"copy_out wrote {out.stat().st_size} bytes")
        elif op == "stdin_raw":
            got = self.box.exec(["sh", "-c", "cat > /dev/null"], input=self.data)
            if got.exit_code != 0:
                raise RuntimeError(f"stdin_raw: exit {got.exit_code}")
        elif op == "stdout_raw":
            got = self.box.exec(["cat", "/tmp/blob"])
            if len(got.stdout) != self.size:
                raise RuntimeError(f"stdout_raw: {len(got.stdout)} bytes")
        elif op == "stdout_zero":
            got = self.box.exec(["head", "-c", str(self.size), "/dev/zero"])
            if len(got.stdout) != self.size:
                raise RuntimeError(f"stdout_zero: {len(got.stdout)} bytes")
        else:
            raise ValueError(op)

    def measure(self, op: str, profile: bool = False) -> dict:
        before = (os.times(), _thread_cpu(self.qemu_pid), _thread_cpu(self.shim_pid))
        began = time.perf_counter()
        if profile:
            import cProfile
            import io
            import pstats

            prof = cProfile.Profile()
            prof.runcall(self._run, op)
        else:
            self._run(op)
        wall = time.perf_counter() - began
        after = (os.times(), _thread_cpu(self.qemu_pid), _thread_cpu(self.shim_pid))
        worker_cpu = (after[0].user + after[0].system) - (before[0].user + before[0].system)
        vcpu, qemu_other = _qemu_split(self.qemu_pid, before[1], after[1])
        shim = sum(c for _, c in after[2].values()) - sum(c for _, c in before[2].values())
        result = {
            "s": round(wall, 3),
            "cpu_s": {
                "host_client": round(worker_cpu, 2),
                "shim": round(shim, 2),
                "guest_vcpu": round(vcpu, 2),
                "qemu_io": round(qemu_other, 2),
            },
        }
        if profile:
            text = io.StringIO()
            pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(10)
            result["host_profile_top10_tottime"] = [
                line.strip()
                for line in text.getvalue().splitlines()
                if line.strip() and line.strip()[0].isdigit()
            ][:10]
        return result

    def close(self) -> None:
        try:
            self.box.kill()
            self.box.remove()
        finally:
            self.rt.close()


def worker_main(home: Path, size: int, scratch: Path) -> int:
    worker = Worker(home, size, scratch)
    print(json.dumps({"ready": True, "start_s": round(worker.start_s, 2)}), flush=True)
    try:
        for line in sys.stdin:
            cmd = json.loads(line)
            if cmd["op"] == "quit":
                break
            try:
                if cmd["op"] in ("pause", "resume"):
                    getattr(worker.box, cmd["op"])()
                    reply = {"ok": True}
                else:
                    reply = worker.measure(cmd["op"], cmd.get("profile", False))
            except Exception as exc:  # reported to the parent, which stops the run
                reply = {"error": f"{type(exc).__name__}: {exc}"}
            print(json.dumps(reply), flush=True)
    finally:
        worker.close()
    return 0


# -- parent -------------------------------------------------------------------------------


def pythonpath(tree: Path) -> str:
    parts = [tree, *sorted((tree / "plugins").glob("boxlite_*")), tree / "conformance"]
    return os.pathsep.join(str(p.resolve()) for p in parts)


class Side:
    def __init__(self, name: str, tree: Path, home: Path, size: int) -> None:
        self.name = name
        env = dict(os.environ, PYTHONPATH=pythonpath(tree), BOXLITE_PULL="never")
        scratch = Path(f"/var/tmp/bench-copy-{name}")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--worker",
                "--home",
                str(home),
                "--size",
                str(size),
                "--scratch",
                str(scratch),
            ],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        self.hello = self._reply()

    def _reply(self) -> dict:
        import select

        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], REPLY_TIMEOUT)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            self.proc.kill()
            raise SystemExit(
                f"bench: the {self.name} worker gave no answer "
                f"(exit {self.proc.poll()}; see its stderr above)"
            )
        reply = json.loads(line)
        if "error" in reply:
            raise SystemExit(f"bench: {self.name}: {reply['error']}")
        return reply

    def ask(self, op: str, profile: bool = False) -> dict:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, "profile": profile}) + "\n")
        return self._reply()

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def measure_alone(sides: dict[str, Side], name: str, op: str, profile: bool = False) -> dict:
    """``op`` on side ``name`` with the other sides' boxes paused: an idle TCG guest still
    takes host CPU (timer ticks), and the host has 2 cores."""
    others = [side for other, side in sides.items() if other != name]
    for side in others:
        side.ask("pause")
    try:
        return sides[name].ask(op, profile)
    finally:
        for side in others:
            side.ask("resume")


def summarise(runs: list[dict], size: int) -> dict:
    walls = [r["s"] for r in runs]
    med = statistics.median(walls)
    cpu = {k: round(statistics.median(r["cpu_s"][k] for r in runs), 2) for k in runs[0]["cpu_s"]}
    return {
        "runs_s": walls,
        "median_s": round(med, 3),
        "mib_per_s": round(size / MIB / med, 1),
        "cpu_median_s": cpu,
    }


def draw(report: dict, png: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        print(
            "bench: no PNG: matplotlib is not installed (pip install matplotlib)", file=sys.stderr
        )
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops = report["ops"]
    sides = list(report["sides"])
    fig, ax = plt.subplots(figsize=(8, 3.6))
    width = 0.8 / len(sides)
    for i, side in enumerate(sides):
        values = [report["sides"][side][op]["median_s"] for op in ops]
        ax.bar([x + i * width for x in range(len(ops))], values, width, label=side)
    for x, op in enumerate(ops):
        target = report["targets_s"].get(op)
        if target:
            ax.hlines(target, x - 0.1, x + 0.9, colors="k", linestyles="dashed")
    ax.set_xticks([x + width / 2 for x in range(len(ops))], ops)
    ax.set_ylabel(f"seconds for {report['size_mib']} MiB (median of {report['rounds']})")
    ax.set_title("copy in/out vs raw exec streams, TCG guest (dashed: 2x target)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--baseline", type=Path, help="the checkout to compare with (old tree)")
    ap.add_argument(
        "--tree",
        type=Path,
        default=Path(__file__).resolve().parents[1],
        help="the checkout under test (default: this one)",
    )
    ap.add_argument(
        "--home",
        type=Path,
        default=Path(os.environ.get("BOXLITE_TEST_HOME") or "/var/tmp/boxlite-test-home"),
    )
    ap.add_argument("--size-mib", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--zero", action="store_true", help="also time exec head -c N /dev/zero")
    ap.add_argument(
        "--profile",
        action="store_true",
        help="one more cProfile'd copy_in/copy_out per side (host side)",
    )
    ap.add_argument("--json", type=Path)
    ap.add_argument("--png", type=Path)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--scratch", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker_main(args.home, args.size, args.scratch)

    size = args.size_mib * MIB
    ops = [*OPS, "stdout_zero"] if args.zero else list(OPS)
    trees = {"baseline": args.baseline, "new": args.tree} if args.baseline else {"new": args.tree}
    sides: dict[str, Side] = {}
    report: dict = {
        "bench": "copy_throughput",
        "size_mib": args.size_mib,
        "rounds": args.rounds,
        "cpus": os.cpu_count(),
        "load_start": os.getloadavg(),
        "trees": {k: str(v) for k, v in trees.items()},
        "ops": ops,
    }
    try:
        for name, tree in trees.items():
            sides[name] = Side(name, tree, args.home, size)
        runs: dict[str, dict[str, list[dict]]] = {n: {op: [] for op in ops} for n in sides}
        for _ in range(args.rounds):
            for op in ops:
                for name in sides:
                    runs[name][op].append(measure_alone(sides, name, op))
                    print(f"{name:8} {op:11} {runs[name][op][-1]['s']:7.2f} s", file=sys.stderr)
        report["sides"] = {n: {op: summarise(runs[n][op], size) for op in ops} for n in sides}
        for name, side in sides.items():
            report["sides"][name]["box_start_s"] = side.hello["start_s"]
            if args.profile:
                report["sides"][name]["profile"] = {
                    op: measure_alone(sides, name, op, profile=True)
                    for op in ("copy_in", "copy_out")
                }
    finally:
        for side in sides.values():
            side.close()
    report["load_end"] = os.getloadavg()
    if "baseline" in report["sides"]:
        base, new = report["sides"]["baseline"], report["sides"]["new"]
        report["speedup"] = {op: round(base[op]["median_s"] / new[op]["median_s"], 2) for op in ops}
        report["targets_s"] = {
            op: round(base[op]["median_s"] / SPEEDUP_TARGET, 3) for op in ("copy_in", "copy_out")
        }
        report["target_met"] = {
            op: new[op]["median_s"] <= t for op, t in report["targets_s"].items()
        }
    else:
        report["targets_s"] = {}
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    if args.png:
        draw(report, args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
