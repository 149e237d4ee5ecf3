"""Rootfs strategies: an image becomes the box's root filesystem.

:mod:`.base` holds the contract (``RootfsStrategy``, ``RootfsArtifact`` and the typed
``GuestRootfs`` the guest agent is told to mount); :mod:`.disk`, :mod:`.layers` and
:mod:`.merged` are the built-in strategies; :mod:`.util` their shared helpers.
"""
