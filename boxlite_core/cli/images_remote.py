"""CLI commands that move images between the store and the outside: pull, prune, export.

Kept out of main.py (owned by the runtime) so registry work does not collide with it;
``attach(cli, images)`` adds them: ``boxlite pull``, ``boxlite images prune``,
``boxlite images export``. Errors are BoxliteErrors and reach main()'s one-line handler.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click


def _runtime() -> Any:
    from ..runtime.runtime import Runtime

    return Runtime()


@click.command("pull")
@click.argument("ref")
@click.option(
    "--insecure",
    is_flag=True,
    help="talk plain HTTP to this image's registry (also: BOXLITE_INSECURE_REGISTRIES)",
)
@click.option("--platform", default=None, help="OS/ARCH[/VARIANT]; default linux/<host arch>")
def pull_cmd(ref: str, insecure: bool, platform: str | None) -> int:
    """Pull an image from an OCI registry (docker.io unless REF names a host)."""
    from ..images.registry import pull
    from ..images.registry.progress import default_progress

    rt = _runtime()
    with default_progress() as progress:
        image = pull(rt.images, ref, insecure=insecure, platform=platform, progress=progress)
    click.echo(f"{image.reference} {image.digest}")
    return 0


@click.command("prune")
def images_prune_cmd() -> int:
    """Remove images no box uses, and blobs no image needs."""
    from ..images.prune import prune

    rt = _runtime()
    in_use = frozenset(r.image_digest for r in rt.list() if r.image_digest)
    result = prune(rt.images, in_use)
    for digest in result.removed_images:
        click.echo(f"deleted: {digest}")
    click.echo(
        f"removed {len(result.removed_images)} images, {len(result.removed_blobs)} blobs, "
        f"reclaimed {result.reclaimed_bytes / 1e6:.1f} MB"
    )
    return 0


@click.command("export")
@click.argument("image")
@click.argument("directory", type=click.Path(file_okay=False))
def images_export_cmd(image: str, directory: str) -> int:
    """Write IMAGE to DIRECTORY as an OCI image layout (skopeo/podman/`images import`)."""
    from ..images.export import export_image

    out = export_image(_runtime().images, image, Path(directory))
    click.echo(str(out))
    return 0


def attach(cli: click.Group, images: click.Group) -> None:
    """Add the commands to the top-level group and the `images` group."""
    cli.add_command(pull_cmd)
    images.add_command(images_prune_cmd)
    images.add_command(images_export_cmd)
