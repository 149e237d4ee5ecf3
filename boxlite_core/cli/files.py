"""`boxlite cp`: files between the host and a box, like `docker cp`."""

from __future__ import annotations

import click

from ..errors import ConfigError
from .context import runtime


def _split_box_path(text: str) -> tuple[str | None, str]:
    box, sep, path = text.partition(":")
    if sep and box and "/" not in box and path.startswith("/"):
        return box, path
    return None, text


@click.command()
@click.argument("src")
@click.argument("dst")
def cp(src: str, dst: str) -> int:
    """Copy files: `boxlite cp HOSTPATH BOX:/path` or `boxlite cp BOX:/path HOSTPATH`.

    `docker cp`'s rules, both ways. SRC: `SRC/.` copies a directory's contents, `SRC/` is
    SRC (a symlink there followed), a symlink is copied as the link. DEST: an existing
    directory receives SRC inside it (a directory nests); a missing DEST becomes the copy
    (its parent must exist); a file replaces a file; a directory onto a file, or a file to
    a missing `DEST/`, is an error. Out of a box, nothing at or under DEST is followed if it
    is a symlink, and setuid/setgid bits are dropped from files (with a warning).
    """
    import warnings

    src_box, src_path = _split_box_path(src)
    dst_box, dst_path = _split_box_path(dst)
    if (src_box is None) == (dst_box is None):
        raise ConfigError("cp: exactly one of SRC and DST must be BOX:/path")
    rt = runtime()
    if dst_box is not None:
        rt.get(dst_box).copy_in(src_path, dst_path)
    else:
        assert src_box is not None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            rt.get(src_box).copy_out(src_path, dst_path)
        for warning in caught:
            click.echo(f"warning: {warning.message}", err=True)
    rt.close()
    return 0


#: the commands this module adds to the top-level group
COMMANDS = (cp,)
