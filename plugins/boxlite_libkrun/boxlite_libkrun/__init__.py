"""boxlite's libkrun backend: libkrun's C API bound with cffi (ABI mode), replayed in a child.

Modules: ``binding`` (cdef + dlopen), ``plan`` (VmSpec → ordered krun calls, pure),
``launcher`` (the child process that becomes the VM), ``handle`` (pid + start-time handle),
``host`` (KVM usability), ``backend`` (the VmmBackend), ``plugin`` (entry point).

The package import is kept tiny: the launcher child imports only ``binding`` and ``launcher``
(no attrs models), which keeps launch() → configured near Python's own start-up time.
The agent's vsock port is the spec's (``VmSpec.agent.vsock_port``), not this package's.
"""
