"""Volumes: a host directory reaching the guest.

One volume, two forms (``boxlite_core.models``): ``VolumeSpec`` is what the user said
(``-v HOST:GUEST[:ro]``, stored in the box record); :mod:`.resolve` turns it, at every start,
into a ``HostShare`` (canonical path, owner, tag) — the one type a sharer receives, rootfs
shares included. A sharer (:mod:`.base`; :mod:`.virtiofs`, :mod:`.ninep`) returns a
``ShareSpec`` per share, which is what the VMM backend attaches.
"""
