"""The host side of the agent channel: how the runtime reaches the agent inside a box.

``transport`` finds the stream (virtio-serial port behind a per-box ``shim``, or a vsock
stream), ``client`` speaks the agent's gRPC protocol (``boxlite_core.proto``) over it.
The agent itself (``boxlite_core.agent``) runs in the guest and shares no code with this
package except the protocol.
"""
