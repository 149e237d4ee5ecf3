"""`boxlite guest build`: the guest kit (kernel, initramfs, agent root image) in the cache."""

from __future__ import annotations

import click

from .progress import Reporter


@click.group()
def guest() -> None:
    """The guest kit (kernel, initramfs, agent root image)."""


@guest.command("build")
@click.option("--force", is_flag=True, help="rebuild even if the kit is cached")
def guest_build(force: bool) -> int:
    """Build (or find) the guest kit in the cache."""
    from ..kit import build_kit
    from ..runtime.runtime import default_home

    with Reporter() as progress:
        kit = build_kit(default_home(), progress=progress, force=force)
    click.echo(f"{kit.kit_id} {kit.directory}")
    return 0


#: the commands this module adds to the top-level group
COMMANDS = (guest,)
