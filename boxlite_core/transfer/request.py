"""What the user asked to copy, and what the result is called (docker ``cp`` rules).

Why here and not in the archive: the archive comes from the guest. A request for ``/x`` must
produce a file or directory named ``x`` on the host (or the name the user typed), never
whatever the guest put at the top of the tar (``.ssh/authorized_keys``). The agent is asked
for ``guest_path`` and must put exactly one top entry, ``name``, in its archive; anything
else is refused by :mod:`.untar`.

The same SRC_PATH rules hold both ways (docker's ``container cp`` reference; moby
``pkg/archive/copy.go``): ``SRC/.`` (and ``.``) is SRC's *contents*, archived under the top
name "."; ``SRC/`` is SRC itself, with a symlink there followed (the link's name kept);
``FILE/`` and ``FILE/.`` are errors (not a directory); a symlink named without a trailing
``/`` is copied as the link.
"""

from __future__ import annotations

import os
import posixpath
import stat
from pathlib import Path

import attrs

from ..errors import ConfigError

#: the archive's top name when the contents of a directory are asked for (``/dir/.``)
CONTENTS = "."


@attrs.frozen
class OutRequest:
    """One copy-out request.

    ``guest_path``: the absolute path sent to the agent (normalised; a trailing ``/`` kept,
    it asks the guest to follow a symlink there, like docker). ``name``: the top entry the
    archive must have and the result's default name (``"."`` when ``contents``).
    ``contents``: ``/dir/.`` or ``/``: copy what is *in* the directory, not the directory.
    """

    guest_path: str
    name: str
    contents: bool


def parse_guest_path(path: str) -> OutRequest:
    """Parse ``path`` as typed after ``BOX:``; raises ConfigError for a relative path."""
    if not path.startswith("/"):
        raise ConfigError(f"copy: guest path {path!r} must be absolute (BOX:/path)")
    if "\x00" in path:
        raise ConfigError(f"copy: guest path {path!r} contains a NUL byte")
    norm = posixpath.normpath(path)
    if norm.startswith("//"):
        norm = "/" + norm.lstrip("/")
    contents = path.endswith("/.") or norm == "/"
    if contents:
        return OutRequest(guest_path=norm.rstrip("/") + "/.", name=CONTENTS, contents=True)
    name = posixpath.basename(norm)
    guest_path = norm + "/" if path.endswith("/") else norm
    return OutRequest(guest_path=guest_path, name=name, contents=False)


@attrs.frozen
class InRequest:
    """One copy-in source.

    ``path``: the host path to archive (a trailing ``/`` resolved to what the link points
    at); ``name``: the archive's top entry (SRC's base name, ``"."`` for its contents);
    ``is_dir``: whether that entry is a directory (a symlink is not).
    """

    path: Path
    name: str
    is_dir: bool


def parse_host_source(text: str | os.PathLike[str]) -> InRequest:
    """Parse the host SRC_PATH of ``boxlite cp SRC BOX:DEST`` (docker's rules, above).

    Raises ConfigError: empty, missing, ``FILE/`` or ``FILE/.`` (not a directory).
    """
    raw = os.fspath(text)
    if not raw:
        raise ConfigError("copy: the host source path is empty")
    if "\x00" in raw:
        raise ConfigError(f"copy: host path {raw!r} contains a NUL byte")
    contents = raw == "." or raw.endswith("/.") or posixpath.normpath(raw) == "/"
    follow = contents or raw.endswith("/")
    try:
        st = os.stat(raw) if follow else os.lstat(raw)
    except FileNotFoundError:
        raise ConfigError(f"copy: host path {raw} does not exist") from None
    except NotADirectoryError:
        raise ConfigError(
            f"copy: host path {raw} is not a directory (remove the trailing "
            f"'{'/.' if contents else '/'}')"
        ) from None
    except OSError as exc:
        raise ConfigError(f"copy: cannot read host path {raw}: {exc.strerror}") from None
    if follow and not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"copy: host path {raw} is not a directory")
    if contents:
        return InRequest(path=Path(os.path.realpath(raw)), name=CONTENTS, is_dir=True)
    name = os.path.basename(os.path.abspath(raw.rstrip("/")))
    path = Path(os.path.realpath(raw)) if follow else Path(raw)
    return InRequest(path=path, name=name, is_dir=stat.S_ISDIR(st.st_mode))


__all__ = ["CONTENTS", "InRequest", "OutRequest", "parse_guest_path", "parse_host_source"]
