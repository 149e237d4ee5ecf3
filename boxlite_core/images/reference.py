"""Local image names: how a user's ``busybox`` and a pull's ``docker.io/library/busybox``
meet on one row of the store's index.

A leaf (see the package docstring for the dependency direction): importers match an archive's
tags with it, the store indexes by it, and the registry's :class:`~.registry.Reference`
turns a pulled name into it, without any of them importing the store.
"""

from __future__ import annotations

import re

from ..errors import ConfigError

_REF_RE = re.compile(r"^[a-z0-9][a-z0-9._/-]*(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?$")


def normalize_reference(ref: str) -> str:
    """'busybox' → 'busybox:latest'; 'docker.io/library/x:1' → 'x:1'. Digests pass through."""
    ref = ref.strip()
    if ref.startswith("sha256:"):
        return ref
    for prefix in ("docker.io/library/", "index.docker.io/library/", "docker.io/"):
        if ref.startswith(prefix):
            ref = ref[len(prefix) :]
            break
    name, _, digest = ref.partition("@")
    if digest:
        return ref
    last = name.rsplit("/", 1)[-1]
    if ":" not in last:
        name += ":latest"
    return name


def check_local_reference(ref: str) -> str:
    """``ref`` normalised, if it is a valid local NAME[:TAG] (what ``images import`` tags with).

    Raises:
        ConfigError: the name is not lowercase NAME[:TAG].
    """
    norm = normalize_reference(ref)
    if not _REF_RE.match(norm):
        raise ConfigError(
            f"image reference {ref!r} is not valid: use lowercase NAME[:TAG] (e.g. 'busybox:1.36')"
        )
    return norm
