"""`boxlite templates ls/rm/prune`: the boot templates a start restores instead of booting.

Templates are made and used by starts on their own (:mod:`boxlite_core.runtime.templates`);
these commands only show and remove them. They work on the home's files, without opening a
Runtime: no box is touched, and a template in use by a restoring start is read-only anyway
(a removed one only makes the next start of that configuration boot cold and save it again).
"""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import ConfigError, NotFoundError
from ..runtime.templates import TemplateStore
from .output import ago, emit_json, table
from .snapshots import size_text


def _store() -> TemplateStore:
    from ..runtime.runtime import default_home

    return TemplateStore(default_home())


def current_kit_id(home: Path) -> str | None:
    """The id of the guest kit a start would use now, without building it: None when that
    kit is not built (then no template can be of it)."""
    from ..kit import find_kit

    kit = find_kit(home)
    return kit.kit_id if kit is not None else None


def prune_other_kits(store: TemplateStore, kit_id: str | None) -> list[str]:
    """Remove broken templates and those of another kit than ``kit_id`` (None: all of
    them); returns the removed keys (directory names)."""
    return store.prune({kit_id} if kit_id else set())


@click.group()
def templates() -> None:
    """Boot templates: saved VMs a start restores instead of booting the kernel (~1 s
    instead of ~6 s). Made by the first start of each configuration; BOXLITE_TEMPLATES=off
    or `run --no-template` opt out."""


@templates.command("ls")
@click.option("--json", "as_json", is_flag=True)
def templates_ls(as_json: bool) -> int:
    """List boot templates (broken ones are not listed: `templates prune` removes them)."""
    infos = _store().list()
    if as_json:
        emit_json([t.to_dict() for t in infos])
        return 0
    rows = []
    for item in (t.to_dict() for t in infos):
        created = item.get("created_at")
        size = item.get("size_bytes")
        memory = item.get("memory_mib")
        rows.append([
            str(item["key"]), str(item["backend"] or "-"), str(item["kit_id"] or "-")[:12],
            str(item.get("cpus") or "-"), f"{memory}MiB" if memory else "-",
            size_text(size if isinstance(size, int) else 0),
            ago(created if isinstance(created, (int, float)) else None),
            str(item.get("made_by_box") or "-"),
        ])
    table(rows, ["KEY", "BACKEND", "KIT", "CPUS", "MEMORY", "SIZE", "CREATED", "MADE BY"])
    return 0


@templates.command("rm")
@click.option("-a", "--all", "remove_all", is_flag=True, help="every template")
@click.argument("keys", nargs=-1)
def templates_rm(remove_all: bool, keys: tuple[str, ...]) -> int:
    """Remove boot templates by KEY (`templates ls`), or --all. The next start of that
    configuration boots the kernel and saves a new one. Prints each key removed; a KEY that
    is no template is an error (exit 3) once the others are removed."""
    if remove_all == bool(keys):
        raise ConfigError("templates rm: give template KEYs or --all (not both)")
    store = _store()
    if remove_all:
        for key in store.prune(None):
            click.echo(key)
        return 0
    missing = []
    for key in keys:
        # a key is one directory name: never a path that climbs out of the store
        if not key or "/" in key or key.startswith(".") or not store.remove(key):
            missing.append(key)
        else:
            click.echo(key)
    if missing:
        raise NotFoundError(f"no boot template {', '.join(missing)}; `boxlite templates ls` "
                            "lists them")
    return 0


@templates.command("prune")
def templates_prune() -> int:
    """Remove broken templates and those of another guest kit than the current one (made
    before a kit rebuild: no start can use them). Prints each key removed."""
    from ..runtime.runtime import default_home

    home = default_home()
    for key in prune_other_kits(TemplateStore(home), current_kit_id(home)):
        click.echo(key)
    return 0


#: the commands this module adds to the top-level group
COMMANDS = (templates,)
