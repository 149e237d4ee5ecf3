"""The host side of the VMM layer: the contract a backend implements, and what it may reuse.

* :mod:`.base` — the contract: ``VmmBackend``, ``VmHandle``, ``LaunchPlan``.
* :mod:`.accel` — does this host give KVM or HVF (``kvm_usable``, ``host_acceleration``).
* :mod:`.kvm_access` — can libvirt's QEMU user open /dev/kvm.
* :mod:`.process`, :mod:`.procstat` — a VM that is one host process; processes known by pid +
  start time.
* :mod:`.consolelog`, :mod:`.logwriter`, :mod:`.cappedio` — guest-fed logs (the console)
  kept under a size cap.

A backend author imports from :mod:`boxlite_core.vendor`, which re-exports what is public here.
"""
