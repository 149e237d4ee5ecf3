"""Entry point: `python3 -m boxlite_core.agent` (PID 1 in the guest).

Host channels: the virtio-serial port named org.boxlite.agent (QEMU), and/or AF_VSOCK when the
kernel cmdline has ``boxlite.agent_vsock=PORT`` (the core adds it for a vsock channel: libkrun,
hvf). Both names live in proto/wire.py. Both may serve at once; with neither the agent fails
naming the missing port.

Options exist for running the agent natively in tests, where listening unix sockets play
the part of the virtio-serial port and of the vsock port:
  --serial-listen PATH   listen at PATH; each accepted connection is one host attachment
  --port PATH            use this character device instead of searching /sys (default)
  --vsock-listen PATH    serve the vsock protocol (no READY, a stream per connection) at PATH
  --vsock-port PORT      listen on this AF_VSOCK port instead of the cmdline's (0 = none)
  --state-dir DIR        where rootfs, layers and the server socket live (/run/boxlite)
"""

from __future__ import annotations

import os
import sys

# Fork safety: the agent forks exec helpers from a multi-threaded process and never touches
# gRPC in the children; gRPC's own fork handlers would only slow every fork down.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
os.environ.setdefault("GRPC_POLL_STRATEGY", "epoll1")


def _parse(argv: list[str]) -> dict[str, str]:
    opts = {
        "state-dir": "/run/boxlite",
        "serial-listen": "",
        "port": "",
        "vsock-listen": "",
        "vsock-port": "",
    }
    it = iter(argv)
    for arg in it:
        key = arg.lstrip("-")
        if "=" in key:
            key, value = key.split("=", 1)
        else:
            value = next(it, "")
        if key not in opts:
            raise SystemExit(f"boxlite-agent: unknown option {arg!r}; known: {sorted(opts)}")
        opts[key] = value
    return opts


def _pid1_mounts() -> None:
    """Make sure the pseudo filesystems exist (busybox switch_root does not move them)."""
    from . import libc
    from .pid1 import log

    for source, target, fstype, flags, data in (
        ("proc", "/proc", "proc", libc.MS_NOSUID | libc.MS_NODEV | libc.MS_NOEXEC, ""),
        ("sysfs", "/sys", "sysfs", libc.MS_NOSUID | libc.MS_NODEV | libc.MS_NOEXEC, ""),
        ("devtmpfs", "/dev", "devtmpfs", libc.MS_NOSUID, "mode=0755"),
        ("tmpfs", "/run", "tmpfs", libc.MS_NOSUID | libc.MS_NODEV, "mode=0755"),
    ):
        if not os.path.ismount(target):
            try:
                libc.mount(source, target, fstype, flags, data)
            except OSError as exc:
                log(f"warning: {exc}")


def main(argv: list[str]) -> None:
    from . import libc, pid1

    opts = _parse(argv)
    is_pid1 = os.getpid() == 1
    if is_pid1:
        _pid1_mounts()
        from .network import loopback_up

        loopback_up()  # every box has a loopback, as every container does
    else:
        # Native runs: adopt the exec helpers' orphans exactly as PID 1 would.
        libc.prctl(libc.PR_SET_CHILD_SUBREAPER, 1)
    state_dir = opts["state-dir"]
    os.makedirs(state_dir, mode=0o700, exist_ok=True)

    from . import port, vsock

    # Open the endpoints first: listening sockets should exist early (connects queue up in the
    # backlog until the gRPC server is up and the accept loop runs).
    streams: vsock.Listener | None = None
    vsock_error: OSError | None = None
    if opts["vsock-listen"]:
        streams = vsock.Listener.unix(opts["vsock-listen"])
    else:
        vport = int(opts["vsock-port"]) if opts["vsock-port"] else vsock.read_cmdline_port()
        if vport:
            try:
                streams = vsock.Listener.vsock(vport)
            except OSError as exc:
                # Not fatal while a virtio-serial port may still serve (checked below).
                vsock_error = exc
                pid1.log(f"warning: cannot listen on vsock port {vport}: {exc}")
    endpoint: port.Endpoint | None
    if opts["serial-listen"]:
        endpoint = port.ListeningSocket(opts["serial-listen"])
    elif opts["port"]:
        endpoint = port.VirtioPort(opts["port"])
    else:
        try:
            endpoint = port.VirtioPort(port.find_virtio_port())
        except FileNotFoundError:
            if vsock_error is not None:
                raise vsock_error from None  # asked for vsock, and it is the only channel
            if streams is None:
                raise  # no channel at all: today's error, naming the missing port
            endpoint = None

    from . import procs

    reaper = pid1.Reaper()
    # Fork the exec zygote while the agent is still small and has no gRPC threads.
    zygote = None if os.environ.get("BOXLITE_AGENT_NO_ZYGOTE") else procs.Zygote(reaper)

    from . import server

    agent = server.Agent(state_dir, reaper, zygote)
    sock = os.path.join(state_dir, "agent.sock")
    server.start_server(agent, sock)
    pid1.log(f"serving on {sock} (pid {os.getpid()})")

    import signal
    import threading

    def on_term(signum, _frame) -> None:
        threading.Thread(target=agent.shutdown, args=(f"signal {signum}",), daemon=True).start()

    signal.signal(signal.SIGTERM, on_term)
    if not is_pid1:
        signal.signal(signal.SIGINT, on_term)
    if endpoint is None:
        assert streams is not None
        streams.serve_forever(sock)
        return
    if streams is not None:
        threading.Thread(
            target=streams.serve_forever, args=(sock,), name="vsock-accept", daemon=True
        ).start()
    port.serve_forever(endpoint, sock)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except SystemExit:
        raise
    except BaseException as exc:
        from .pid1 import fatal

        fatal(exc)
