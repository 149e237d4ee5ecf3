"""The host side of the agent channel: how the runtime reaches the agent inside a box.

``transport.connect`` is the one entry: it finds the stream for the box's channel kind and
returns a ``target.Transport``; ``client`` speaks the agent's gRPC protocol
(``boxlite_core.proto``) over it. Behind ``connect``, by concern:

* ``port``: attach to the virtio-serial port socket and read READY;
* ``bridge``: relay gRPC connections onto port attaches (SerialBridge);
* ``shimctl``: start, find and stop the per-box shim; ``shim``: the shim process itself;
* ``stream``: vsock channels, direct or through the Firecracker CONNECT handshake.

The agent itself (``boxlite_core.agent``) runs in the guest and shares no code with this
package except the protocol (``boxlite_core.proto``: generated stubs and ``wire``'s names).
"""
