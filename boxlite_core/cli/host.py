"""Commands about this host: which VMM backends work here (`backends`), and `doctor`.

The checks themselves live in :mod:`.doctor`; this module only prints them.
"""

from __future__ import annotations

import click

from .output import emit_json


@click.command()
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def backends(as_json: bool) -> int:
    """VMM backends, whether they work here (and if not, why), and plugin failures."""
    from ..plugins import PluginRegistry

    reg = PluginRegistry()
    probes = reg.probe_all()
    out = []
    for name in reg.backend_names():
        probe = probes[name]
        try:
            caps = sorted(c.value if hasattr(c, "value") else str(c)
                          for c in reg.backend(name).capabilities())
        except Exception as exc:
            caps = []
            probe_reason = f"capabilities() raised {type(exc).__name__}: {exc}"
            probe = type(probe)(False, reason=probe_reason, fix=probe.fix)
        out.append({
            "name": name,
            "plugin": reg.backend_plugin(name),
            "available": probe.available,
            "reason": probe.reason,
            "fix": probe.fix,
            "details": dict(probe.details),
            "capabilities": caps,
        })
    failures = [f.to_dict() for f in reg.failures]
    if as_json:
        emit_json({
            "backends": out,
            "failures": failures,
            "rootfs_strategies": reg.strategy_names(),
            "volume_sharers": reg.sharer_names(),
        })
        return 0
    if not out:
        click.echo("no VMM backends installed; e.g. pip install boxlite-qemu")
    for b in out:
        mark = "available" if b["available"] else "unavailable"
        click.echo(f"{b['name']} ({b['plugin']}): {mark}")
        if b["reason"]:
            click.echo(f"  reason: {b['reason']}")
        if b["fix"] and not b["available"]:
            click.echo(f"  fix: {b['fix']}")
        click.echo(f"  capabilities: {', '.join(b['capabilities']) or '-'}")
    for f in failures:
        click.echo(f"plugin {f['plugin']} FAILED ({f['where']}): {f['error']}")
    return 0


@click.command()
def doctor() -> int:
    """Check this host: programs, acceleration, disk space, backends, guest kit."""
    from .doctor import run_checks

    results = run_checks()
    worst = 0
    for check in results:
        line = f"{check.level:<4} {check.name}: {check.detail}"
        if check.fix and check.level != "ok":
            line += f" — fix: {check.fix}"
        click.echo(line)
        worst = max(worst, {"ok": 0, "warn": 0, "fail": 1}[check.level])
    return worst


#: the commands this module adds to the top-level group
COMMANDS = (backends, doctor)
