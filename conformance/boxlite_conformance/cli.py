"""``boxlite-conformance``: run the installed suite against a backend and write its report.

A thin wrapper over ``pytest.main``: it writes, into a temp directory, exactly the two files
the vendor guide tells a vendor to write (a conftest line and a star-import), and runs pytest
on them. So the CLI and a vendor's own pytest run execute the same thing.

Exit status: 0 when every test passed or was skipped for a capability the backend does not
declare; 1 when any test failed (a T0 failure always fails); pytest's own code for usage or
internal errors.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from boxlite_core.vmm.spec import Capability, CapabilityGroup

from . import report as report_mod
from .markers import TIERS
from .requirements import HOST_REQUIREMENTS

VENDOR_CONFTEST = 'pytest_plugins = ["boxlite_conformance.plugin"]\n'
VENDOR_TEST_MODULE = "from boxlite_conformance.suite import *  # noqa: F403\n"


def _write_runner(directory: Path) -> Path:
    (directory / "conftest.py").write_text(VENDOR_CONFTEST)
    (directory / "test_conformance.py").write_text(VENDOR_TEST_MODULE)
    ini = directory / "pytest.ini"
    lines = ["[pytest]", "python_files = test_conformance.py"]
    if importlib.util.find_spec("pytest_timeout") is not None:
        lines.append("timeout = 900")  # a hung guest must not hang CI forever
    ini.write_text("\n".join(lines) + "\n")
    return ini


def _pytest_args(run_dir: Path, ini: Path) -> list[str]:
    return [str(run_dir), "-c", str(ini), "--rootdir", str(run_dir), "-p", "no:cacheprovider"]


def run_one(
    backend: str,
    tier: int | None,
    report_dir: Path,
    junitxml: str | None,
    strict: bool,
    extra: list[str],
) -> int:
    import pytest

    with tempfile.TemporaryDirectory(prefix="boxlite-conformance-") as tmp:
        run_dir = Path(tmp)
        args = [*_pytest_args(run_dir, _write_runner(run_dir)), "-rfEs"]
        args += ["--boxlite-backend", backend, "--conformance-report", str(report_dir)]
        if tier is not None:
            args += ["--conformance-max-tier", str(tier)]
        if junitxml:
            args += [f"--junitxml={Path(junitxml).resolve()}"]
        if strict:
            args.append("--conformance-strict")
        rc = int(pytest.main([*args, *extra]))
    if rc in (pytest.ExitCode.INTERNAL_ERROR, pytest.ExitCode.USAGE_ERROR):
        return rc
    path = report_dir / f"{report_mod._safe(backend)}.json"
    if not path.exists():
        print(f"boxlite-conformance: no report was written ({path})", file=sys.stderr)
        return rc or 1
    data = json.loads(path.read_text())
    print(f"boxlite-conformance: backend {backend!r}: {data['verdict'].upper()} "
          f"{data['summary']} -> {path.with_suffix('.md')}")
    return 0 if data["verdict"] == "pass" else 1


def run_all(args: argparse.Namespace, report_dir: Path) -> int:
    """Each backend in its own process: one broken backend cannot poison the others' run."""
    from boxlite_core.plugins import PluginRegistry

    registry = PluginRegistry()
    names = registry.backend_names()
    for failure in registry.failures:
        print(f"boxlite-conformance: plugin {failure.plugin!r} failed in {failure.where}: "
              f"{failure.error}", file=sys.stderr)
    if not names:
        print("boxlite-conformance: no VMM backends are registered; install one "
              "(e.g. pip install boxlite-qemu)", file=sys.stderr)
        return 1
    worst = 0
    reports = []
    for name in names:
        argv = [sys.executable, "-m", "boxlite_conformance", "run", "--backend", name,
                "--report", str(report_dir)]
        if args.tier is not None:
            argv += ["--tier", str(args.tier)]
        if args.strict:
            argv.append("--strict")
        if args.junitxml:
            stem = Path(args.junitxml)
            argv += ["--junitxml", str(stem.with_name(f"{stem.stem}-{name}{stem.suffix}"))]
        if args.extra:
            argv += ["--", *args.extra]
        rc = subprocess.run(argv, check=False).returncode
        worst = max(worst, rc)
        path = report_dir / f"{report_mod._safe(name)}.json"
        if path.exists():
            reports.append(json.loads(path.read_text()))
    failures = [f.to_dict() for f in registry.failures]
    if failures:
        worst = max(worst, 1)  # an installed plugin that cannot load is a failure too
    if reports or failures:
        (report_dir / "all.md").write_text(report_mod.combined_markdown(reports, failures))
        summary = [{k: r[k] for k in ("backend", "verdict", "summary", "capabilities", "probe")}
                   for r in reports]
        (report_dir / "all.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(f"boxlite-conformance: combined table -> {report_dir / 'all.md'}")
    return worst


def cmd_run(args: argparse.Namespace) -> int:
    if args.report:
        report_dir = Path(args.report).resolve()
        report_dir.mkdir(parents=True, exist_ok=True)
        return _dispatch(args, report_dir)
    with tempfile.TemporaryDirectory(prefix="boxlite-conformance-report-") as tmp:
        return _dispatch(args, Path(tmp))


def _dispatch(args: argparse.Namespace, report_dir: Path) -> int:
    if args.backend == "all":
        return run_all(args, report_dir)
    return run_one(args.backend, args.tier, report_dir, args.junitxml, args.strict, args.extra)


def collect() -> list[dict]:
    """The suite's tests with tier and capabilities, from a collect-only pytest run."""
    with tempfile.TemporaryDirectory(prefix="boxlite-conformance-list-") as tmp:
        run_dir = Path(tmp)
        out = run_dir / "list.json"
        done = subprocess.run(
            [sys.executable, "-m", "pytest", *_pytest_args(run_dir, _write_runner(run_dir)),
             "--collect-only", "-q", "--conformance-list", str(out)],
            capture_output=True, text=True, check=False,
        )
        if not out.exists():
            raise SystemExit(f"boxlite-conformance: collection failed:\n{done.stdout}{done.stderr}")
        return json.loads(out.read_text())


def cmd_list(args: argparse.Namespace) -> int:
    tests = collect()
    if args.json:
        print(json.dumps(tests, indent=2))
        return 0
    width = max((len(t["requires"]) for t in tests), default=1)
    width = max(width, len("capabilities"))
    print(f"tier  {'capabilities':<{width}}  test")
    for t in sorted(tests, key=lambda t: (t["tier"], t["test"])):
        caps = t["requires"]
        print(f"T{t['tier']:<4} {caps:<{width}}  {t['test']}")
    print(f"\n{len(tests)} tests. Tiers: " + "; ".join(f"T{k}: {v}" for k, v in TIERS.items()))
    print("\nCapabilities by group (tests gated on each):")
    for group in CapabilityGroup:
        gated = [f"{c.value} ({sum(c.value in t['capabilities'] for t in tests)})"
                 for c in Capability if c.group is group]
        print(f"  {group.value}: {', '.join(gated)}")
    print("Host requirements (host:NAME above):")
    for req in HOST_REQUIREMENTS.values():
        print(f"  {req.name}: {req.promise}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="boxlite-conformance",
        description="Run the boxlite backend conformance suite and write its report.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the suite against a backend (or 'all')")
    run.add_argument("--backend", required=True, help="registry name, or 'all'")
    run.add_argument("--tier", type=int, choices=sorted(TIERS), default=None,
                     help="run tiers 0..N only (default: all tiers)")
    run.add_argument("--junitxml", default=None, help="also write JUnit XML here")
    run.add_argument("--report", default=None, metavar="DIR",
                     help="write DIR/<backend>.json and DIR/<backend>.md (all: DIR/all.md)")
    run.add_argument("--strict", action="store_true",
                     help="fail VM tiers when the backend or runtime is unavailable here")
    run.add_argument("extra", nargs="*", help="after --: extra pytest arguments")
    run.set_defaults(func=cmd_run)
    lst = sub.add_parser("list", help="list the tests with their tiers and capabilities")
    lst.add_argument("--json", action="store_true", help="machine-readable output")
    lst.set_defaults(func=cmd_list)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
