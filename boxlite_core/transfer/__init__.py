"""Host side of copying files between the host and a box.

Why a package of its own: the tar stream a guest sends is hostile input (the guest is root and
can replace the agent), and so may be the destination (a volume the guest can write). The code
that reads that stream and puts its result on the host must not depend on the interpreter's
``tarfile`` extraction filter (bypassed more than once, e.g. CVE-2025-4517), must name the
result from the user's request rather than from the archive, and must never follow a symlink
at or under the destination. Small modules:

* :mod:`.request` — the guest path as asked (``/dir``, ``/dir/.``, ``/link``) and the name the
  result gets (docker ``cp`` rules);
* :mod:`.untar` — read the stream with tarfile's *parser* and write each entry ourselves,
  fd-relative and ``O_NOFOLLOW``, into a private staging directory;
* :mod:`.place` — move the staged result into the destination without following links;
* :mod:`.copy_out` — the three glued together for :meth:`Box.copy_out`;
* :mod:`.copy_in` — the other way: a host tree as a tar stream (and its member list) for the
  agent, which places it by docker ``cp``'s DEST rules in the guest (agent/files.py).
"""

from __future__ import annotations

from .copy_out import CopyOutResult, SpecialBitsStripped, receive_tree, staging_root
from .request import OutRequest, parse_guest_path

__all__ = [
    "CopyOutResult",
    "OutRequest",
    "SpecialBitsStripped",
    "parse_guest_path",
    "receive_tree",
    "staging_root",
]
