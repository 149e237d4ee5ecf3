"""What every agent channel hands the gRPC client: a target to dial, and close().

Why its own module: the channel kinds reach the agent very differently (a shim process, an
in-process bridge, a direct socket, a relay that says CONNECT first), but the client only
needs the address grpc dials and a way to let go; this base keeps the kinds' modules from
importing one another.
"""

from __future__ import annotations

#: Largest gRPC message the host accepts from the guest (bytes). The agent never sends more
#: than 1 MiB in one message (coalesced output, 256 KiB download chunks); a guest that sends
#: more has been replaced by hostile code, and without a bound one message could make the host
#: (shim or client) allocate gigabytes. Requests the host sends are not bounded here.
MAX_GUEST_MESSAGE = 16 * 1024 * 1024


class Transport:
    """What connect() returns: ``target`` for grpc.insecure_channel (``unix:PATH``), and
    close(). ``last_error`` is the latest failure behind the target (a refused handshake, a
    lost port), for error messages: gRPC itself only says UNAVAILABLE."""

    target: str
    last_error: str | None = None

    def close(self) -> None:
        """Let go of whatever the transport holds; the VM and the agent are left alone."""
