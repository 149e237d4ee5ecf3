"""Snapshots of running boxes and forks: `snapshot save/ls/rm` and `fork`.

A snapshot is a box's memory and disks at one instant (see
:mod:`boxlite_core.runtime.snapshots`); ``boxlite run --snapshot NAME`` / ``create --snapshot
NAME`` (in :mod:`.run`) continue from one, and ``fork`` is a snapshot plus that, in one step.
The source box goes on running in every case, so these commands detach (``rt.close()``)
instead of stopping anything.
"""

from __future__ import annotations

import click

from ..errors import BoxliteError
from ..models import JsonObject, JsonValue
from .context import runtime
from .output import ago, emit_json, error, table


def size_text(size: int) -> str:
    """Bytes as the listings show them (``images ls``: decimal MB, one decimal)."""
    return f"{size / 1e6:.1f}MB"


@click.group()
def snapshot() -> None:
    """Snapshots of running boxes (memory + disks): save, ls, rm.

    `boxlite run --snapshot NAME` or `boxlite create --snapshot NAME` make a box that
    continues from one, its processes still running."""


@snapshot.command("save")
@click.argument("box")
@click.argument("name")
def snapshot_save(box: str, name: str) -> int:
    """Save running BOX's memory and disks as snapshot NAME; the box goes on running (it is
    paused for the save, ~1 s). Boxes with volumes cannot be saved (host directories are not
    captured). Prints NAME."""
    rt = runtime()
    try:
        snap = rt.get(box).snapshot(name)
    finally:
        rt.close()  # the box keeps running
    click.echo(snap.name)
    return 0


def _flags(data: JsonObject) -> str:
    """The FLAGS column: ``auto`` (made by fork), ``incomplete`` (its save failed)."""
    flags = [flag for flag, on in (("auto", data.get("auto")),
                                   ("incomplete", not data.get("complete"))) if on]
    return ",".join(flags) or "-"


@snapshot.command("ls")
@click.option("--json", "as_json", is_flag=True)
def snapshot_ls(as_json: bool) -> int:
    """List snapshots, oldest first. SIZE is the disk space of its directory (the saved
    memory and the frozen disks, which the boxes made from it share)."""
    snaps = runtime().snapshots()
    if as_json:
        emit_json([s.to_dict() for s in snaps])
        return 0
    rows = []
    for item in (s.to_dict() for s in snaps):
        created = item.get("created_at")
        usage = item.get("disk_usage_bytes")
        rows.append([
            str(item["name"]), str(item["box"]), str(item["image"]),
            ago(created if isinstance(created, (int, float)) else None),
            size_text(usage if isinstance(usage, int) else 0), _flags(item),
        ])
    table(rows, ["NAME", "BOX", "IMAGE", "CREATED", "SIZE", "FLAGS"])
    return 0


@snapshot.command("rm")
@click.argument("names", nargs=-1, required=True)
def snapshot_rm(names: tuple[str, ...]) -> int:
    """Remove snapshots (refused while a box's disk is an overlay on one: the error names
    the boxes; remove them first). Prints each name removed."""
    rt = runtime()
    code = 0
    try:
        for name in names:
            try:
                rt.remove_snapshot(name)
                click.echo(name)
            except BoxliteError as exc:
                error(str(exc))
                code = max(code, exc.exit_code)
    finally:
        rt.close()
    return code


@click.command()
@click.option("--name", default=None,
              help="the copy's name; with -n > 1 the prefix of NAME-1, NAME-2, ...")
@click.option("-n", "count", type=click.IntRange(min=1), default=1, show_default=True,
              help="how many copies")
@click.option("--json", "as_json", is_flag=True,
              help='[{"id", "name", "snapshot"}, ...] instead of names')
@click.argument("box")
def fork(name: str | None, count: int, as_json: bool, box: str) -> int:
    """Copy running BOX, memory included: snapshot + create + start, in one step.

    The source keeps running; each copy continues from the same instant (its processes
    still running) and then diverges: what one writes, to disk or memory, neither the
    source nor a sibling sees. Each gets its own RNG state, clock and hostname. Prints the
    copies' names, one per line.

    The snapshot taken is listed by `snapshot ls` (flag auto): its frozen disk backs the
    copies and the source, so it stays until they are removed (then `snapshot rm` it)."""
    rt = runtime()
    try:
        copies = rt.get(box).fork(count, name=name)
        out: list[JsonValue] = [
            {"id": c.id, "name": c.name, "snapshot": c.record.options.snapshot} for c in copies
        ]
    finally:
        rt.close()  # the source and the copies keep running
    if as_json:
        emit_json(out)
    else:
        for copy in copies:
            click.echo(copy.name)
    return 0


#: the commands this module adds to the top-level group
COMMANDS = (snapshot, fork)
