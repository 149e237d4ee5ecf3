"""Start latency with boot templates (issue 14): cold vs template vs fork, one run, side by side.

    python bench/start_latency.py [-n 5] [--home /var/tmp/boxlite-bench-start-latency]
        [--seed-from /var/tmp/boxlite-test-home] [--json reports/bench-start-latency.json]
        [--png reports/bench-start-latency.png]
    python bench/start_latency.py --redraw reports/bench-start-latency.json --png FILE

``--freeze`` runs it from a copy of this tree (PYTHONPATH, like bench/start_ab.py): on a tree
others edit during the run, a changed agent would change the guest kit mid-run, and with it
the template key (a cold boot counted as a template start) and every snapshot's kit.

Why one run, interleaved: under TCG on a shared 2-core host a boot moves by seconds from one
minute to the next (bench/start_ab.py). So each of N rounds does one of every kind, in turn:

* ``bare``: QEMU launch → ``boxlite-init: start`` (bench/boot_bare.py, kernel + initramfs);
* ``api_cold``: ``create()`` + ``start()`` (``template=False``) → first ``exec(["true"])``;
* ``api_template``: the same from the boot template (split: create, start, first exec);
* ``cli_cold`` / ``cli_template``: ``boxlite run --rm busybox true`` wall clock, a CLI
  subprocess, with ``BOXLITE_TEMPLATES=off`` / on (bench/run_overhead.py's ``cli_run``);
* ``fork``: ``box.fork()`` of the round's running template box → the copy answering exec.

Then ``memory``: VmRSS and PSS (``/proc/PID/smaps_rollup``) of the QEMU of 1 and of 4 boxes
started from one template; and ``profile``: where a template start's time goes (stage
medians, the restore time QEMU's launch recorded, one cProfile'd API start, one cProfile'd
CLI run and the CLI's import time), summed up as ``host_steps``. The report has medians, p90,
ratios vs cold, and per target (``TARGETS``) pass/fail, the miss and its dominant step.

The home is private (default /var/tmp/boxlite-bench-start-latency, never the test home): its
templates and snapshots are this bench's. The guest kit is copied once from ``--seed-from``
(run_overhead.seed_kit), so a fresh home does not build one; the first round's warm-up start
saves the template (not timed).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import pstats
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path[:0] = [str(REPO), str(BENCH)]

import start_ab  # noqa: E402  (stdlib only: --freeze must not import this tree's packages)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


#: what --freeze copies: every distribution of the tree (start_ab.pythonpath) and the benches
FROZEN_PARTS = ("boxlite_core", "plugins", "conformance", "bench")


def run_frozen(argv: list[str]) -> int:
    """Copy the tree to a temporary directory and run this bench from there (``argv``
    without --freeze); the copy is removed afterwards."""
    tree = Path(tempfile.mkdtemp(prefix="boxlite-bench-tree-", dir="/var/tmp"))
    try:
        for part in FROZEN_PARTS:
            shutil.copytree(REPO / part, tree / part, symlinks=True,
                            ignore=shutil.ignore_patterns("__pycache__", "out", "*.egg-info"))
        env = dict(os.environ, PYTHONPATH=start_ab.pythonpath(tree))
        log(f"--freeze: running from a copy of the tree in {tree}")
        return subprocess.run([sys.executable, str(tree / "bench" / Path(__file__).name),
                               *argv], env=env, check=False).returncode
    finally:
        shutil.rmtree(tree, ignore_errors=True)


if __name__ == "__main__" and "--freeze" in sys.argv[1:]:
    # before the imports below: they would load this tree, which may be mid-edit
    sys.exit(run_frozen([a for a in sys.argv[1:] if a != "--freeze"]))

import qemu_rss  # noqa: E402
import run_overhead  # noqa: E402

from boxlite_core.kit.builder import find_kit  # noqa: E402
from boxlite_core.models import JsonObject, JsonValue  # noqa: E402

if TYPE_CHECKING:
    from boxlite_core import Box, Runtime

DEFAULT_HOME = Path("/var/tmp/boxlite-bench-start-latency")
DEFAULT_SEED = Path("/var/tmp/boxlite-test-home")
#: issue 14's targets: medians under TCG on this host, seconds
TARGETS: dict[str, float] = {
    "cli_template": 1.5,  # `boxlite run --rm busybox true`, from a template
    "api_template": 0.8,  # create() + start() → first exec `true`
    "fork": 1.5,  # fork() of a running box → the copy answering exec
}
STAGES = ("prepare", "volumes", "vmm_spawn", "guest_connect", "template_save", "guest_init")
#: seconds a box idles before its memory is read (the restore's page faults settle)
SETTLE_S = 3.0
MEMORY_BOXES = 4
Samples: TypeAlias = list[float]


def stats(samples: Samples) -> JsonObject:
    """start_ab.summary (runs_s, median_s, p90_s), or Nones when every run failed."""
    if not samples:
        return {"runs_s": [], "median_s": None, "p90_s": None}
    return dict(start_ab.summary(samples))


def median(values: list[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


# -- one start ---------------------------------------------------------------------------------


def vm_state(box: Box) -> JsonObject:
    """The box's vm.json (what the qemu backend recorded at launch: restore_seconds)."""
    try:
        data = json.loads((box.dir / "vm.json").read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def exec_true(box: Box) -> float:
    began = time.perf_counter()
    result = box.exec(["true"])
    took = time.perf_counter() - began
    if result.exit_code != 0:
        raise RuntimeError(f"box {box.name}: `true` exited {result.exit_code}")
    return took


def timed_start(rt: Runtime, *, template: bool) -> tuple[Box, JsonObject]:
    """create() + start() → first exec `true`: the box (running) and its row."""
    from boxlite_core import BoxOptions

    began = time.perf_counter()
    box = rt.create(BoxOptions(image="busybox", template=template))
    create_s = time.perf_counter() - began
    try:
        box.start()
        start_s = time.perf_counter() - began - create_s
        exec_s = exec_true(box)
        again_s = exec_true(box)
    except BaseException:
        with contextlib.suppress(Exception):
            rt.remove(box.id, force=True)
        raise
    record = box.record
    boot = record.state.get("boot")
    boot = boot if isinstance(boot, dict) else {}
    row: JsonObject = {
        "create_s": round(create_s, 3), "start_s": round(start_s, 3),
        "first_exec_s": round(exec_s, 3), "total_s": round(create_s + start_s + exec_s, 3),
        # the next exec: what the first one pays for a guest that is cold after a restore
        # (TCG translates every code path anew, page cache empty on the new rootfs disk)
        "second_exec_s": round(again_s, 3),
        "source": boot.get("source"), "reason": boot.get("reason"),
        "stages": dict(record.stage_timings),
    }
    restore_s = vm_state(box).get("restore_seconds")
    if isinstance(restore_s, (int, float)):
        row["qemu_restore_s"] = restore_s
    return box, row


def teardown(rt: Runtime, box: Box, *, kill: bool = False) -> dict[str, float]:
    """stop() (or, with ``kill``, kill(): what `run --rm` does to a box without volumes, whose
    disk goes with it) then remove(), seconds each."""
    began = time.perf_counter()
    (box.kill if kill else box.stop)()
    ended_s = time.perf_counter() - began
    began = time.perf_counter()
    rt.remove(box.id, force=True)
    return {"kill_s" if kill else "stop_s": round(ended_s, 3),
            "remove_s": round(time.perf_counter() - began, 3)}


def safe_teardown(rt: Runtime, box: Box, *, kill: bool = False) -> JsonObject:
    """teardown(), or a forced remove (and the error) when it fails."""
    try:
        return dict(teardown(rt, box, kill=kill))
    except Exception as exc:
        with contextlib.suppress(Exception):
            rt.remove(box.id, force=True)
        return {"error": str(exc)[:300]}


def timed_fork(rt: Runtime, source: Box) -> JsonObject:
    """fork() of a running box → the copy answering exec; the copy is stopped and removed."""
    began = time.perf_counter()
    (copy,) = source.fork()
    fork_s = time.perf_counter() - began
    try:
        exec_s = exec_true(copy)
        again_s = exec_true(copy)
        record = copy.record
        boot = record.state.get("boot")
        stages = dict(record.stage_timings)
        copy_start = stages.get("total", 0.0)
        row: JsonObject = {
            "fork_s": round(fork_s, 3), "first_exec_s": round(exec_s, 3),
            "total_s": round(fork_s + exec_s, 3), "second_exec_s": round(again_s, 3),
            # fork = snapshot (pause, save, detach) + create + the copy's start
            "snapshot_and_create_s": round(fork_s - copy_start, 3),
            "copy_start_s": round(copy_start, 3),
            "source": boot.get("source") if isinstance(boot, dict) else None,
            "stages": stages,
        }
    finally:
        copy_teardown = safe_teardown(rt, copy)
    row["teardown"] = copy_teardown
    return row


# -- rounds ------------------------------------------------------------------------------------


class Rounds:
    """Every kind's rows, one of each per round; a failed run is kept with its error."""

    def __init__(self) -> None:
        self.rows: dict[str, list[JsonObject]] = {
            k: [] for k in ("bare", "api_cold", "api_template", "cli_cold", "cli_template",
                            "fork")}
        self.failures: dict[str, list[str]] = {k: [] for k in self.rows}
        self.cli_startup: Samples = []

    def attempt(self, kind: str, fn: Callable[[], JsonObject]) -> JsonObject | None:
        try:
            row = fn()
        except Exception as exc:  # a failed run is a result too; the bench goes on
            message = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            self.failures[kind].append(message)
            log(f"{kind}: FAILED {message}")
            return None
        row["load"] = run_overhead.load()
        self.rows[kind].append(row)
        log(f"{kind}: {row.get('total_s')} s")
        return row


def bare_once(home: Path) -> JsonObject:
    report = run_overhead.bare_boot(home, 1)
    if not report["runs"]:
        raise RuntimeError("bare boot: no marker (see stderr)")
    return {"total_s": report["runs"][0], "machine": report["machine"],
            "kit_id": report["kit_id"]}


def cli_once(env: dict[str, str], rounds: Rounds) -> JsonObject:
    report = run_overhead.cli_run(1, env)
    rounds.cli_startup.extend(report["cli_startup"]["runs"])
    if not report["runs"]:
        raise RuntimeError("; ".join(report["failures"]) or "boxlite run failed")
    return {"total_s": report["runs"][0]}


def api_round(rt: Runtime, rounds: Rounds, *, template: bool) -> Box | None:
    """One API start; a template box is returned running (the round's fork source)."""
    kind = "api_template" if template else "api_cold"
    holder: list[Box] = []

    def run() -> JsonObject:
        box, row = timed_start(rt, template=template)
        if template:
            holder.append(box)
        else:
            row["teardown"] = teardown(rt, box)
        return row

    row = rounds.attempt(kind, run)
    if row is not None and template and row["source"] != "template":
        log(f"api_template: booted from {row['source']} ({row['reason']})")
    return holder[0] if holder else None


def run_rounds(rt: Runtime, home: Path, runs: int, env: dict[str, str]) -> Rounds:
    rounds = Rounds()
    cold_env = dict(env, BOXLITE_TEMPLATES="off")
    warm_env = dict(env, BOXLITE_TEMPLATES="on")
    for index in range(runs):
        log(f"round {index + 1}/{runs} (load {run_overhead.load()})")
        rounds.attempt("bare", lambda: bare_once(home))
        api_round(rt, rounds, template=False)
        source = api_round(rt, rounds, template=True)
        rounds.attempt("cli_cold", lambda: cli_once(cold_env, rounds))
        rounds.attempt("cli_template", lambda: cli_once(warm_env, rounds))
        if source is None:
            rounds.failures["fork"].append("no running template box to fork this round")
            continue
        try:
            rounds.attempt("fork", lambda src=source: timed_fork(rt, src))
        finally:
            # killed, as `run --rm` kills it: the CLI's breakdown takes this teardown
            rounds.rows["api_template"][-1]["teardown"] = safe_teardown(rt, source, kill=True)
    return rounds


def warm_up(rt: Runtime) -> JsonObject:
    """One untimed template start: saves the template if this home has none for the layout
    (a cold boot + save), and warms the page cache for the state file."""
    box, row = timed_start(rt, template=True)
    teardown(rt, box)
    log(f"warm-up: {row['source']} ({row['reason']}), {row['total_s']} s")
    return {k: row[k] for k in ("source", "reason", "total_s")}


# -- memory ------------------------------------------------------------------------------------


def smaps_kib(pid: int) -> dict[str, int]:
    """Rss and Pss (and their anon/file split) of ``pid`` from /proc/PID/smaps_rollup, kiB;
    qemu_rss.status_kib's VmRSS/VmHWM besides."""
    out = dict(qemu_rss.status_kib(pid))
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("Rss", "Pss", "Pss_Anon", "Pss_File", "Shared_Clean", "Private_Dirty"):
                out[key] = int(value.split()[0])
    return out


def qemu_pid(box: Box) -> int:
    pid = box.info().get("pid")
    if not isinstance(pid, int):
        raise RuntimeError(f"box {box.name}: no VMM pid in its record")
    return pid


def memory_of(boxes: list[Box]) -> JsonObject:
    per_box = [smaps_kib(qemu_pid(b)) for b in boxes]

    def total_mib(key: str) -> float | None:
        if not all(key in p for p in per_box):
            return None
        return round(sum(p[key] for p in per_box) / 1024, 1)

    return {"boxes": len(boxes), "rss_mib": total_mib("VmRSS"), "pss_mib": total_mib("Pss"),
            "per_box_kib": per_box, "load": run_overhead.load()}


def memory(rt: Runtime) -> JsonObject:
    """QEMU RSS/PSS of 1 box, then of MEMORY_BOXES boxes, all from one template."""
    boxes: list[Box] = []
    try:
        box, row = timed_start(rt, template=True)
        boxes.append(box)
        sources = [row["source"]]
        time.sleep(SETTLE_S)
        one = memory_of(boxes)
        for _ in range(MEMORY_BOXES - 1):
            box, row = timed_start(rt, template=True)
            boxes.append(box)
            sources.append(row["source"])
        time.sleep(SETTLE_S)
        many = memory_of(boxes)
    finally:
        for box in boxes:
            with contextlib.suppress(Exception):
                rt.remove(box.id, force=True)
    report: JsonObject = {"settle_s": SETTLE_S, "sources": sources, "one": one,
                          f"of_{MEMORY_BOXES}": many}
    for key in ("rss_mib", "pss_mib"):
        a, b = one[key], many[key]
        if isinstance(a, float) and isinstance(b, float):
            extra = round((b - a) / (MEMORY_BOXES - 1), 1)
            report[f"{key.split('_')[0]}_per_extra_box_mib"] = extra
    log(f"memory: 1 box {one['pss_mib']} MiB PSS, {MEMORY_BOXES} boxes {many['pss_mib']} MiB")
    return report


# -- profile -----------------------------------------------------------------------------------

#: (file suffix, function) → what that call is, in a template start (qemu backend); a name
#: another change renamed is simply reported as missing
PROFILE_STEPS: tuple[tuple[str, str, str], ...] = (
    ("runtime/box.py", "start", "box.start() (whole)"),
    ("boxlite_qemu/backend.py", "plan", "vmm_spawn: qemu plan (argv)"),
    ("vmm/consolelog.py", "start_writer", "vmm_spawn: console log writer process"),
    ("boxlite_qemu/backend.py", "_wait_qmp", "vmm_spawn: QEMU exec → QMP answers"),
    ("boxlite_qemu/backend.py", "_restore", "vmm_spawn: load template state + cont"),
    # the shim is dialled in a thread during the load (pipeline._dial_early): not profiled
    ("channel/shimctl.py", "connect_shim", "guest_connect: agent shim (host Python)"),
    ("runtime/restore.py", "check_after_connect", "guest_connect: wait for template digest"),
    ("channel/identity.py", "host_identity", "guest_init: host entropy + clock + hostname"),
    ("channel/client.py", "init",
     "guest_init: Init RPC, the agent's first call (connection, mounts, reseed, clock)"),
    ("runtime/box.py", "exec", "first exec `true` (whole)"),
    ("channel/client.py", "_run_once", "first exec: the Run call (start, output, exit)"),
)


def profile_steps(stats_: pstats.Stats, extra: tuple[tuple[str, str, str], ...] = ()
                  ) -> JsonObject:
    """Cumulative seconds of each PROFILE_STEPS function (None: not called / renamed)."""
    table = stats_.stats  # type: ignore[attr-defined]  # {(file, line, fn): (cc, nc, tt, ct, callers)}
    out: JsonObject = {}
    for suffix, fn, label in (*PROFILE_STEPS, *extra):
        hits = [v for (file, _line, name), v in table.items()
                if name == fn and file.endswith(suffix)]
        out[label] = round(sum(v[3] for v in hits), 3) if hits else None
    return out


def top_functions(stats_: pstats.Stats, n: int = 25) -> list[JsonValue]:
    """The n boxlite functions with the most cumulative time (anything PROFILE_STEPS misses)."""
    table = stats_.stats  # type: ignore[attr-defined]
    rows = [(v[3], v[1], f"{Path(file).parent.name}/{Path(file).name}:{name}")
            for (file, _line, name), v in table.items()
            if "/boxlite_core/" in file or "/boxlite_qemu/" in file]
    rows.sort(reverse=True)
    return [{"fn": name, "cum_s": round(cum, 3), "calls": calls} for cum, calls, name in rows[:n]]


def profile_api(rt: Runtime) -> JsonObject:
    """One template start + first exec under cProfile (threads other than this one are not
    profiled: the digest check and the shim's own process show up as waits)."""
    import cProfile

    profiler = cProfile.Profile()
    profiler.enable()
    try:
        box, row = timed_start(rt, template=True)
    finally:
        profiler.disable()
    row["teardown"] = teardown(rt, box)
    stats_ = pstats.Stats(profiler, stream=io.StringIO())
    return {"run": row, "steps_s": profile_steps(stats_), "top": top_functions(stats_)}


CLI_STEPS: tuple[tuple[str, str, str], ...] = (
    ("cli/main.py", "<module>", "CLI: everything after the interpreter is up"),
    ("cli/context.py", "runtime", "CLI: open the runtime (imports, db, plugins)"),
    ("cli/run.py", "_stream", "CLI: the command (exec, streamed)"),
    ("cli/run.py", "_finish_run", "CLI: stop + remove (--rm)"),
    ("runtime/box.py", "stop", "CLI: box.stop() (guest sync + power-off)"),
    ("<frozen importlib._bootstrap>", "_find_and_load", "CLI: imports (lazy ones included)"),
)


def top_level_imports(stderr: str) -> dict[str, float]:
    """``-X importtime``'s top-level imports: module → cumulative seconds."""
    out: dict[str, float] = {}
    for line in stderr.splitlines():
        match = re.match(r"import time:\s+\d+ \|\s+(\d+) \| (.*)$", line)
        if match and not match.group(2).startswith(" "):
            name = match.group(2).strip()
            out[name] = out.get(name, 0.0) + int(match.group(1)) / 1e6
    return out


def import_report(argv: list[str], env: dict[str, str]) -> JsonObject:
    """Run ``python -X importtime ARGV``: its wall time, total import seconds and the
    slowest top-level imports."""
    began = time.perf_counter()
    proc = subprocess.run([sys.executable, "-X", "importtime", *argv], env=env,
                          capture_output=True, text=True, timeout=300)
    wall = time.perf_counter() - began
    if proc.returncode != 0:
        return {"error": proc.stderr.strip()[-400:]}
    imports = top_level_imports(proc.stderr)
    slowest = sorted(imports.items(), key=lambda kv: -kv[1])[:8]
    return {"wall_s": round(wall, 3), "imports_s": round(sum(imports.values()), 3),
            "slowest_s": {name: round(s, 3) for name, s in slowest}}


def cli_argv() -> list[str]:
    return [sys.executable, "-m", "boxlite_core.cli.main", "run", "--rm", "busybox", "true"]


def profile_cli(env: dict[str, str], runs: int) -> JsonObject:
    """The CLI's own cost in a template `run`: interpreter start (``python -c pass``), import
    time (``-X importtime`` of a real run; the agent shim's imports too: it is a second host
    Python each start spawns), and one run under cProfile."""
    interp: Samples = []
    for _ in range(runs):
        began = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], env=env, check=True)
        interp.append(time.perf_counter() - began)
    run = import_report(cli_argv()[1:], env)
    out: JsonObject = {
        "python_start": stats(interp),
        "imports_s": run.get("imports_s"),
        "importtime_run": run,
        # the agent shim is a second host Python started in guest_connect
        "shim_imports": import_report(["-c", "import boxlite_core.channel.shim"], env),
    }
    with tempfile.TemporaryDirectory(prefix="bxsl") as tmp:
        prof = Path(tmp) / "cli.prof"
        began = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "cProfile", "-o", str(prof),
                               *cli_argv()[1:]], env=env, capture_output=True, text=True,
                              timeout=300)
        out["cprofile_run_wall_s"] = round(time.perf_counter() - began, 3)
        if proc.returncode == 0 and prof.exists():
            stats_ = pstats.Stats(str(prof), stream=io.StringIO())
            out["steps_s"] = profile_steps(stats_, CLI_STEPS)
            out["top"] = top_functions(stats_, 15)
        else:
            out["error"] = proc.stderr.strip()[-400:]
    return out


# -- summary -----------------------------------------------------------------------------------


def col(rows: list[JsonObject], key: str) -> Samples:
    return [float(r[key]) for r in rows if isinstance(r.get(key), (int, float))]


def nested(rows: list[JsonObject], outer: str, key: str) -> Samples:
    return [float(v) for r in rows
            if isinstance(r.get(outer), dict) and isinstance(v := r[outer].get(key), (int, float))]


def summarise(rounds: Rounds) -> JsonObject:
    out: JsonObject = {}
    for kind, rows in rounds.rows.items():
        entry: JsonObject = {**stats(col(rows, "total_s")), "failures": rounds.failures[kind]}
        if kind.startswith("api"):
            entry["median_parts_s"] = {
                "create": median(col(rows, "create_s")),
                "start": median(col(rows, "start_s")),
                "first_exec": median(col(rows, "first_exec_s")),
                "second_exec": median(col(rows, "second_exec_s")),
                **{f"stage.{s}": median(nested(rows, "stages", s)) for s in STAGES},
                "qemu_restore": median(col(rows, "qemu_restore_s")),
                "stop": median(nested(rows, "teardown", "stop_s")),
                "kill": median(nested(rows, "teardown", "kill_s")),
                "remove": median(nested(rows, "teardown", "remove_s")),
            }
            entry["sources"] = [r.get("source") for r in rows]
        if kind == "api_template":
            restored = [r for r in rows if r.get("source") == "template"]
            entry["restored_only"] = stats(col(restored, "total_s"))
        if kind == "fork":
            entry["median_parts_s"] = {
                "snapshot_and_create": median(col(rows, "snapshot_and_create_s")),
                "copy_start": median(col(rows, "copy_start_s")),
                "first_exec": median(col(rows, "first_exec_s")),
                "second_exec": median(col(rows, "second_exec_s")),
                **{f"copy_stage.{s}": median(nested(rows, "stages", s)) for s in STAGES},
            }
            entry["sources"] = [r.get("source") for r in rows]
        entry["rows"] = list(rows)
        out[kind] = entry
    out["cli_startup_version"] = stats(rounds.cli_startup)
    return out


def rounds_from(results: JsonObject) -> Rounds:
    """A saved report's rows, failures and CLI start-up samples, as the run collected them."""
    rounds = Rounds()
    for kind in rounds.rows:
        entry = results.get(kind)
        if isinstance(entry, dict):
            rounds.rows[kind] = list(entry.get("rows") or [])
            rounds.failures[kind] = list(entry.get("failures") or [])
    startup = results.get("cli_startup_version")
    if isinstance(startup, dict):
        rounds.cli_startup = [float(x) for x in startup.get("runs_s") or []]
    return rounds


def derive(report: JsonObject) -> None:
    """Add ``verdict``, ``ratios`` and ``host_steps``: pure functions of the report's
    ``results`` and ``profile`` (so ``--redraw`` can recompute them from a saved run)."""
    results, profile = report["results"], report["profile"]
    parts = {"api_template": api_parts(results),
             "cli_template": cli_parts(results, profile["cli_template"]),
             "fork": fork_parts(results)}
    report["verdict"] = verdicts(results, parts)
    report["ratios"] = ratios(results)
    report["host_steps"] = host_steps(parts, profile["api_template"], profile["cli_template"])


def ratio(a: JsonValue, b: JsonValue) -> float | None:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b:
        return round(a / b, 3)
    return None


def ratios(results: JsonObject) -> JsonObject:
    def med(kind: str) -> JsonValue:
        entry = results[kind]
        return entry["median_s"] if isinstance(entry, dict) else None

    return {
        "api_template_over_api_cold": ratio(med("api_template"), med("api_cold")),
        "cli_template_over_cli_cold": ratio(med("cli_template"), med("cli_cold")),
        "fork_over_api_cold": ratio(med("fork"), med("api_cold")),
        "api_cold_over_bare": ratio(med("api_cold"), med("bare")),
        "api_template_over_bare": ratio(med("api_template"), med("bare")),
    }


def dominant(parts: dict[str, float | None]) -> JsonObject | None:
    known = {k: v for k, v in parts.items() if isinstance(v, (int, float))}
    if not known:
        return None
    name = max(known, key=lambda k: known[k])
    return {"step": name, "s": known[name], "share": round(known[name] / sum(known.values()), 2)}


def cli_parts(results: JsonObject, cli_profile: JsonObject) -> dict[str, float | None]:
    """`run --rm busybox true` from a template, as the API rounds' medians of the same work
    (:func:`api_parts`, then kill + remove, as `run --rm` ends a box without volumes) plus the
    CLI's own: interpreter, imports, and the rest (wall minus everything measured)."""
    api = results["api_template"]
    parts_src = api.get("median_parts_s", {}) if isinstance(api, dict) else {}
    cli = results["cli_template"]
    wall = cli.get("median_s") if isinstance(cli, dict) else None
    python = cli_profile.get("python_start", {})
    parts: dict[str, float | None] = {
        "python interpreter start": python.get("median_s") if isinstance(python, dict) else None,
        "imports (click, boxlite_core, grpc…)": cli_profile.get("imports_s"),  # type: ignore[dict-item]
        **api_parts(results),
        "kill (run --rm: no guest sync)": parts_src.get("kill"),
        "remove": parts_src.get("remove"),
    }
    known = sum(v for v in parts.values() if isinstance(v, (int, float)))
    if isinstance(wall, (int, float)):
        parts["CLI other (runtime open, plugins, db, output)"] = round(wall - known, 3)
    return parts


def api_parts(results: JsonObject) -> dict[str, float | None]:
    api = results["api_template"]
    src = api.get("median_parts_s", {}) if isinstance(api, dict) else {}
    vmm, restore = src.get("stage.vmm_spawn"), src.get("qemu_restore")
    parts: dict[str, float | None] = {
        "create": src.get("create"),
        "prepare": src.get("stage.prepare"),
        "vmm_spawn: QEMU start, plan, writer": (round(vmm - restore, 3)
                                                 if vmm is not None and restore is not None
                                                 else vmm),
        "vmm_spawn: template load + cont": restore,
        "guest_connect (the shim sees READY)": src.get("stage.guest_connect"),
        "guest_init (Init RPC: the agent's first call)": src.get("stage.guest_init"),
        "first exec": src.get("first_exec"),
    }
    start = src.get("start")
    staged = sum(src.get(f"stage.{s}") or 0.0 for s in STAGES)
    if start is not None:
        parts["start: between stages"] = round(start - staged, 3)
    return parts


def fork_parts(results: JsonObject) -> dict[str, float | None]:
    entry = results["fork"]
    src = entry.get("median_parts_s", {}) if isinstance(entry, dict) else {}
    return {
        "snapshot (pause, save state, disk switch) + create": src.get("snapshot_and_create"),
        "copy: vmm_spawn (restore)": src.get("copy_stage.vmm_spawn"),
        "copy: guest_connect": src.get("copy_stage.guest_connect"),
        "copy: guest_init (reseed)": src.get("copy_stage.guest_init"),
        "copy: first exec": src.get("first_exec"),
    }


def verdicts(results: JsonObject, parts: dict[str, dict[str, float | None]]) -> JsonObject:
    out: JsonObject = {}
    for kind, target in TARGETS.items():
        entry = results[kind]
        value = entry.get("median_s") if isinstance(entry, dict) else None
        row: JsonObject = {"target_s": target, "median_s": value}
        if isinstance(value, (int, float)):
            row["pass"] = value <= target
            if value > target:
                row["missed_by_s"] = round(value - target, 3)
                row["missed_by_ratio"] = round(value / target, 2)
                row["dominant_step"] = dominant(parts[kind])
        else:
            row["pass"] = None
        out[kind] = row
    return out


def host_steps(parts: dict[str, dict[str, float | None]], api_profile: JsonObject,
               cli_profile: JsonObject) -> JsonObject:
    """What a template start still pays on the host, per step (medians), with the
    cProfile'd run's finer split of the stages (one run, profiler overhead included)."""
    return {
        "api_template_start_median_s": parts["api_template"],
        "cli_run_template_median_s": parts["cli_template"],
        "fork_median_s": parts["fork"],
        "api_template_profiled_s": api_profile.get("steps_s"),
        "cli_template_profiled_s": cli_profile.get("steps_s"),
        "notes": [
            "medians come from the interleaved rounds; '*_profiled_s' from one cProfile'd run "
            "(slower: profiler overhead), only to split a stage",
            "CLI other = CLI wall median minus the medians of interpreter start, imports "
            "(-X importtime) and the same API work (create, start, exec, stop, remove)",
        ],
    }


# -- chart -------------------------------------------------------------------------------------


def draw(report: JsonObject, path: Path) -> None:
    try:
        import matplotlib  # type: ignore[import-not-found]

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # type: ignore[import-not-found]
    except ImportError:
        print("matplotlib not installed: skipping --png (pip install '.[bench]')",
              file=sys.stderr)
        return
    results = report["results"]
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 6.5),
                                        gridspec_kw={"width_ratios": [2.2, 2.4, 1]})
    kinds = [("bare", "bare QEMU → /init"), ("api_cold", "API cold\ncreate+start+exec"),
             ("api_template", "API template\ncreate+start+exec"),
             ("cli_cold", "run --rm busybox\ntrue, cold"),
             ("cli_template", "run --rm busybox\ntrue, template"),
             ("fork", "fork() → copy\nanswers exec")]
    labels = [label for _, label in kinds]
    meds = [results[k]["median_s"] or 0 for k, _ in kinds]
    p90s = [(results[k]["p90_s"] or 0) - (results[k]["median_s"] or 0) for k, _ in kinds]
    colors = ["black", "tab:grey", "tab:blue", "tab:grey", "tab:blue", "tab:green"]
    ax1.barh(labels, meds, xerr=[[0] * len(meds), p90s], color=colors, capsize=3)
    for i, (kind, _label) in enumerate(kinds):
        if kind in TARGETS:
            ax1.plot([TARGETS[kind]] * 2, [i - 0.4, i + 0.4], color="red", lw=2)
        ax1.text(meds[i] + p90s[i], i, f" {meds[i]:.2f}", va="center", fontsize=7)
    ax1.invert_yaxis()
    ax1.tick_params(axis="y", labelsize=7)
    ax1.set_xlabel("seconds (median, whisker → p90; red: target)")
    ax1.set_title("start latency", fontsize=9)
    steps = report["host_steps"]
    rows = [("API template", steps["api_template_start_median_s"]),
            ("CLI template", steps["cli_run_template_median_s"]),
            ("fork", steps["fork_median_s"])]
    labels2 = list(dict.fromkeys(k for _, parts in rows for k in parts))
    palette = plt.get_cmap("tab20").colors
    color = {label: palette[i % len(palette)] for i, label in enumerate(labels2)}
    drawn: set[str] = set()
    for name, parts in rows:
        left = 0.0
        for label, value in parts.items():
            if not isinstance(value, (int, float)) or value <= 0:
                continue
            ax2.barh(name, value, left=left, color=color[label], edgecolor="white",
                     label=None if label in drawn else label)
            drawn.add(label)
            left += value
    for y, (name, _) in enumerate(rows):
        target = {"API template": "api_template", "CLI template": "cli_template",
                  "fork": "fork"}[name]
        ax2.plot([TARGETS[target]] * 2, [y - 0.4, y + 0.4], color="red", lw=2)
    ax2.invert_yaxis()
    ax2.set_xlabel("seconds (medians of the rounds)")
    ax2.set_title("where a template start's time goes", fontsize=9)
    ax2.legend(fontsize=6, loc="upper left", bbox_to_anchor=(0, -0.16), ncol=2, frameon=False)
    mem = report.get("memory") or {}
    if "one" in mem:
        many = mem[f"of_{MEMORY_BOXES}"]
        x = ["1 box", f"{MEMORY_BOXES} boxes"]
        ax3.bar([i - 0.2 for i in range(2)], [mem["one"]["rss_mib"] or 0, many["rss_mib"] or 0],
                width=0.4, label="RSS")
        ax3.bar([i + 0.2 for i in range(2)], [mem["one"]["pss_mib"] or 0, many["pss_mib"] or 0],
                width=0.4, label="PSS")
        ax3.set_xticks(range(2), x)
        ax3.set_ylabel("MiB (QEMU processes, total)")
        ax3.legend(fontsize=7)
    ax3.set_title("QEMU memory, 1 vs 4 boxes\nfrom one template", fontsize=9)
    fig.suptitle(f"boxlite start latency, {report.get('accel')}, n={report['runs']} — load "
                 f"{report['load_start']} → {report['load_end']}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)


# -- main --------------------------------------------------------------------------------------


@contextlib.contextmanager
def bench_runtime(home: Path) -> Iterator[Runtime]:
    """The bench home's runtime; on the way out every box and snapshot in it is removed
    (the home is the bench's own: nothing else lives there)."""
    from boxlite_core import Runtime

    rt = Runtime(home)
    try:
        yield rt
    finally:
        for box in rt.list():
            with contextlib.suppress(Exception):
                rt.remove(box.id, force=True)
        for snap in rt.snapshots():
            with contextlib.suppress(Exception):
                rt.remove_snapshot(snap.name)
        kit = find_kit(home)  # templates of older kits only take space here
        with contextlib.suppress(Exception):
            rt.templates().prune({kit.kit_id} if kit is not None else set())
        rt.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", "--runs", type=int, default=5, help="rounds (one run of each kind)")
    ap.add_argument("--home", type=Path, default=DEFAULT_HOME,
                    help="the bench's own BOXLITE_HOME (never the test home)")
    ap.add_argument("--seed-from", type=Path, default=DEFAULT_SEED,
                    help="BOXLITE_HOME to copy a built guest kit from")
    ap.add_argument("--json", type=Path, help="also write the report here")
    ap.add_argument("--png", type=Path)
    ap.add_argument("--redraw", type=Path, metavar="JSON",
                    help="no VMs: re-derive a saved report's summaries from its rows, then "
                         "write --png and/or --json")
    ap.add_argument("--freeze", action="store_true",
                    help="run from a copy of this tree (others may edit it meanwhile)")
    args = ap.parse_args(argv)
    if args.freeze:  # main() called from Python: the imports are done already
        given = sys.argv[1:] if argv is None else argv
        return run_frozen([a for a in given if a != "--freeze"])
    if args.redraw:
        if not args.png and not args.json:
            ap.error("--redraw needs --png FILE and/or --json FILE")
        report = json.loads(args.redraw.read_text())
        report["results"] = summarise(rounds_from(report["results"]))
        derive(report)
        report["rederived"] = f"summaries recomputed from the rows by --redraw {args.redraw.name}"
        if args.json:
            args.json.write_text(json.dumps(report, indent=2) + "\n")
        if args.png:
            draw(report, args.png)
        return 0
    if args.home.resolve() == DEFAULT_SEED.resolve():
        ap.error("--home must not be the test home: templates and boxes here are the bench's")

    os.environ["BOXLITE_HOME"] = str(args.home)
    os.environ.setdefault("BOXLITE_BOOT_TIMEOUT", "60")
    os.environ.pop("BOXLITE_TEMPLATES", None)
    run_overhead.seed_kit(args.home, args.seed_from)
    env = dict(os.environ)
    began = time.monotonic()
    report: JsonObject = {
        "bench": "start_latency", "home": str(args.home), "runs": args.runs,
        "tree": str(REPO),
        "cpus": os.cpu_count(), "load_start": run_overhead.load(),
        "qemus_running_at_start": run_overhead.other_qemus(), "targets_s": dict(TARGETS),
    }
    with bench_runtime(args.home) as rt:
        report["warm_up"] = warm_up(rt)
        rounds = run_rounds(rt, args.home, args.runs, env)
        results = summarise(rounds)
        report["accel"] = os.environ.get("BOXLITE_ACCEL") or "tcg"
        bare_rows = rounds.rows["bare"]
        if bare_rows:
            report["kit_id"] = bare_rows[0]["kit_id"]
        try:
            report["memory"] = memory(rt)
        except Exception as exc:  # a section failing must not lose the report
            report["memory"] = {"error": repr(exc)[:400]}
        api_profile = profile_api(rt)
    cli_profile = profile_cli(dict(env, BOXLITE_TEMPLATES="on"), args.runs)
    report["profile"] = {"api_template": api_profile, "cli_template": cli_profile}
    report["results"] = results
    derive(report)
    report["load_end"] = run_overhead.load()
    report["qemus_running_at_end"] = run_overhead.other_qemus()
    report["wall_s"] = round(time.monotonic() - began, 1)
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
