"""boxlite's QEMU backend: plan → argv, launch → a QEMU process driven over QMP.

Install with ``pip install boxlite-qemu``; the ``boxlite`` entry point registers backend
``qemu`` (see :mod:`boxlite_qemu.plugin`).
"""

from .accel import AccelChoice, choose_accel, host_accel
from .backend import QemuBackend
from .handle import QemuHandle

__all__ = ["AccelChoice", "QemuBackend", "QemuHandle", "choose_accel", "host_accel"]
