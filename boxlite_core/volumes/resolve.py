"""Turn the user's ``-v HOST:GUEST[:ro]`` specs into checked, canonical shares.

A :class:`~boxlite_core.models.VolumeSpec` (what the user said, stored in the record) becomes
a :class:`~boxlite_core.models.HostShare` (what a sharer receives) here, once per start.

Why check on the host before anything boots: a typo in a volume path should fail in
milliseconds with the path in the message, not as a mount error in the guest after a boot.
The owner's uid/gid is recorded so sharers can map guest writes back to the volume's owner
(auto-idmap) instead of leaving root-owned files in a user's directory.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from ..errors import ConfigError
from ..models import HostShare, VolumeSpec

TAG_PREFIX = "uservol"


def resolve_user_volumes(specs: Iterable[VolumeSpec | str]) -> tuple[HostShare, ...]:
    """Check each volume's host directory and return them tagged ``uservol0``, ``uservol1``…

    Each share carries the canonical host path, the directory owner's uid/gid and the
    volume's ``guest_path``; a string is parsed as ``HOST:GUEST[:ro]``.

    Raises:
        ConfigError: naming the path and the fix, when a host path is missing, is not a
            directory, or cannot be read (or a string is not ``HOST:GUEST[:ro]``).
    """
    out: list[HostShare] = []
    for index, spec in enumerate(specs):
        if isinstance(spec, str):
            spec = VolumeSpec.parse(spec)
        given = os.path.expanduser(spec.host_path)
        where = f"volume {spec.host_path}:{spec.guest_path}"
        if not os.path.lexists(given):
            raise ConfigError(
                f"{where}: host path {given} does not exist; create it (mkdir -p {given}) "
                "or fix the path"
            )
        real = Path(os.path.realpath(given))
        if not real.exists():
            raise ConfigError(
                f"{where}: host path {given} is a dangling symlink (to {real}); fix the link"
            )
        if not real.is_dir():
            raise ConfigError(
                f"{where}: host path {real} is not a directory; volumes share directories — "
                "put the file in a directory and share that"
            )
        if not os.access(real, os.R_OK | os.X_OK):
            raise ConfigError(f"{where}: host directory {real} is not readable by this user")
        st = real.stat()
        out.append(
            HostShare(
                tag=f"{TAG_PREFIX}{index}",
                host_path=real,
                read_only=spec.read_only,
                uid=st.st_uid,
                gid=st.st_gid,
                guest_path=spec.guest_path,
            )
        )
    return tuple(out)


def remote_user_volumes(specs: Iterable[VolumeSpec | str], host: str) -> tuple[HostShare, ...]:
    """The volumes of a box on another machine (``BoxOptions.host``): their host paths are
    that machine's, so nothing is checked here but their form (the backend checks them
    there, before the VM starts); their owner there is unknown, so root is assumed.

    Raises:
        ConfigError: a host path that is not absolute (``~`` and relative paths name this
            machine's directories), or a string that is not ``HOST:GUEST[:ro]``.
    """
    out: list[HostShare] = []
    for index, spec in enumerate(specs):
        if isinstance(spec, str):
            spec = VolumeSpec.parse(spec)
        if not spec.host_path.startswith("/"):
            raise ConfigError(
                f"volume {spec.host_path}:{spec.guest_path}: the box runs on {host}, so its "
                f"host path is a path of that machine and must be absolute")
        # owner root: a writable one is then shared in QEMU's mapped mode, which keeps the
        # guest's owners, modes and device nodes in xattrs there (no setuid file of a root
        # guest lands on that machine as one)
        out.append(HostShare(tag=f"{TAG_PREFIX}{index}", host_path=Path(spec.host_path),
                             read_only=spec.read_only, uid=0, gid=0,
                             guest_path=spec.guest_path))
    return tuple(out)
