"""The agent channel's fixed names, defined once for both ends of the wire.

Why a module of its own: the host (the core, every backend, the kit builder) and the guest
agent must agree on these values byte for byte, and they used to be spelled out in nine
places. This package is copied into the guest as it is (kit/builder.py GUEST_PACKAGES), so it
imports nothing: stdlib only, no attrs.

* :data:`AGENT_PORT_NAME`: the virtio-serial port name the guest agent opens
  (``/sys/class/virtio-ports/vport*/name``); a backend names its port this.
* :data:`AGENT_VSOCK_PORT`: the guest vsock port the agent listens on for a vsock channel.
* :data:`AGENT_VSOCK_CMDLINE_KEY`: the kernel command line key (``KEY=PORT``) that makes the
  guest's /init load the vsock modules and the agent listen on that port. The core appends
  it to the spec's cmdline for a vsock channel; backends never add it.
* :data:`READY`: the line the agent writes on the virtio-serial port each time a host
  attaches; the host reads it before it speaks HTTP/2 (vsock streams have none).
* :data:`RESERVED_GUEST_DIRS`: container directories no volume may cover. The host refuses
  a guest path naming one; the agent refuses one a symlink in the image leads to.
"""

from __future__ import annotations

AGENT_PORT_NAME = "org.boxlite.agent"
#: vsock ports below 1024 are privileged in the guest; 0xFFFFFFFF is VMADDR_PORT_ANY
AGENT_VSOCK_PORT = 1024
AGENT_VSOCK_CMDLINE_KEY = "boxlite.agent_vsock"
READY = b"READY\n"
#: the guest kernel fills these (devices, procfs, sysfs). A host directory over /dev turns
#: `>/dev/null` into a write to the host; over /proc or /sys it is silently hidden by the
#: kernel's own mount, or hides the kernel's.
RESERVED_GUEST_DIRS = ("/dev", "/proc", "/sys")

__all__ = ["AGENT_PORT_NAME", "AGENT_VSOCK_CMDLINE_KEY", "AGENT_VSOCK_PORT", "READY",
           "RESERVED_GUEST_DIRS"]
