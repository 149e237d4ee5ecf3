"""Image commands: `images import/ls/rm/prune/export` and the top-level `pull`.

Errors are BoxliteErrors and reach main()'s one-line handler. ``pull`` talks to a registry
(boxlite_core.images.registry); the rest work on the local store only.
"""

from __future__ import annotations

from pathlib import Path

import click

from .context import runtime
from .output import emit_json, table
from .progress import Reporter


@click.group()
def images() -> None:
    """Local images."""


@images.command("import")
@click.argument("path", type=click.Path(exists=True))
@click.option("--name", "ref", default=None, help="reference to store it under (name:tag)")
def images_import(path: str, ref: str | None) -> int:
    """Import an OCI layout directory, OCI archive or `docker save` tar."""
    rt = runtime()
    with Reporter() as progress:
        image = rt.images.import_path(Path(path), name=ref, progress=progress)
    click.echo(f"{image.reference} {image.digest}")
    return 0


@images.command("ls")
@click.option("--json", "as_json", is_flag=True)
def images_ls(as_json: bool) -> int:
    """List local images."""
    items = list(runtime().images.list())
    if as_json:
        emit_json([i.to_dict() for i in items])
        return 0
    table(
        [[i.reference, i.short_id, f"{i.size / 1e6:.1f}MB", str(len(i.layers))] for i in items],
        ["REFERENCE", "ID", "SIZE", "LAYERS"],
    )
    return 0


@images.command("rm")
@click.argument("ref")
def images_rm(ref: str) -> int:
    """Remove an image reference (refused while a box uses it)."""
    rt = runtime()
    in_use = rt.images_in_use()
    rt.images.remove(ref, in_use=in_use)
    click.echo(ref)
    return 0


@images.command("prune")
def images_prune() -> int:
    """Remove images no box uses, blobs no image needs, and files no VM uses on the other
    machines boxes run on (`--host`)."""
    from ..images.prune import prune

    rt = runtime()
    in_use = rt.images_in_use()
    result = prune(rt.images, in_use)
    for digest in result.removed_images:
        click.echo(f"deleted: {digest}")
    click.echo(
        f"removed {len(result.removed_images)} images, {len(result.removed_blobs)} blobs, "
        f"reclaimed {result.reclaimed_bytes / 1e6:.1f} MB"
    )
    for host, name in rt.prune_hosts():  # what other machines keep for boxes of ours
        click.echo(f"deleted on {host}: {name}")
    return 0


@images.command("export")
@click.argument("image")
@click.argument("directory", type=click.Path(file_okay=False))
def images_export(image: str, directory: str) -> int:
    """Write IMAGE to DIRECTORY as an OCI image layout (skopeo/podman/`images import`)."""
    from ..images.export import export_image

    out = export_image(runtime().images, image, Path(directory))
    click.echo(str(out))
    return 0


@click.command("pull")
@click.argument("ref")
@click.option(
    "--insecure",
    is_flag=True,
    help="talk plain HTTP to this image's registry (also: BOXLITE_INSECURE_REGISTRIES)",
)
@click.option("--platform", default=None, help="OS/ARCH[/VARIANT]; default linux/<host arch>")
def pull(ref: str, insecure: bool, platform: str | None) -> int:
    """Pull an image from an OCI registry (docker.io unless REF names a host)."""
    from ..images.registry import pull as pull_image
    from ..images.registry.progress import default_progress

    rt = runtime()
    with default_progress() as progress:
        image = pull_image(rt.images, ref, insecure=insecure, platform=platform,
                           progress=progress)
    click.echo(f"{image.reference} {image.digest}")
    return 0


#: the commands this module adds to the top-level group
COMMANDS = (images, pull)
