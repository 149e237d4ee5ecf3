"""Resolve an exec's `user` string through the *container's* /etc/passwd and /etc/group.

Runs after chroot, so the files read are the image's, not the guest's.
"""

from __future__ import annotations

from typing import NamedTuple


class Identity(NamedTuple):
    uid: int
    gid: int
    groups: list[int]
    home: str


def _read(path: str) -> list[list[str]]:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return [line.rstrip("\n").split(":") for line in fh if line.strip()]
    except OSError:
        return []


def resolve(user: str) -> Identity:
    """ "" / "name" / "uid" / "uid:gid" / "name:group" → Identity; LookupError if unknown."""
    user = user or "0"
    name, _, group = user.partition(":")
    passwd = [row for row in _read("/etc/passwd") if len(row) >= 7]
    entry = None
    if name.isdigit():
        uid = int(name)
        entry = next((row for row in passwd if row[2] == name), None)
    else:
        entry = next((row for row in passwd if row[0] == name), None)
        if entry is None:
            raise LookupError(f"user {name!r} not found in the container's /etc/passwd")
        uid = int(entry[2])
    gid = int(entry[3]) if entry else 0 if uid == 0 else uid
    home = entry[5] if entry else "/"
    groups_db = [row for row in _read("/etc/group") if len(row) >= 4]
    if group:
        if group.isdigit():
            gid = int(group)
        else:
            match = next((row for row in groups_db if row[0] == group), None)
            if match is None:
                raise LookupError(f"group {group!r} not found in the container's /etc/group")
            gid = int(match[2])
    supplementary = [gid]
    if entry is not None and not group:
        for row in groups_db:
            if entry[0] in row[3].split(",") and row[2].isdigit():
                supplementary.append(int(row[2]))
    return Identity(uid, gid, sorted(set(supplementary)), home or "/")
