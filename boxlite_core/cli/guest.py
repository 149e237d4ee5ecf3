"""`boxlite guest build`: the guest kit (kernel, initramfs, agent root image) in the cache.

A build also removes the boot templates of other kits (:mod:`.templates`): they hold a
booted guest of the old kit, which no start uses any more."""

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
    from ..runtime.templates import TemplateStore
    from .templates import prune_other_kits

    home = default_home()
    with Reporter() as progress:
        kit = build_kit(home, progress=progress, force=force)
    # a template holds a booted guest of one kit: no start of another kit can use it
    removed = prune_other_kits(TemplateStore(home), kit.kit_id)
    if removed:
        click.echo(f"removed {len(removed)} boot template(s): broken or of other guest kits",
                   err=True)
    from ..runtime.runtime import Runtime

    with Runtime(home) as rt:  # the old kit's files on other machines boxes run on
        for host, name in rt.prune_hosts():
            click.echo(f"deleted on {host}: {name}", err=True)
    click.echo(f"{kit.kit_id} {kit.directory}")
    return 0


#: the commands this module adds to the top-level group
COMMANDS = (guest,)
