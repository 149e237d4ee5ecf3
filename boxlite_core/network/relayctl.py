"""Start, find and stop a box's network relay (the process in network/relay.py).

Same shape as the agent shim's control (channel/shimctl.py): the relay's identity (pid +
start time) is BOXDIR/netrelay.json, so a recycled pid is never taken for it; it is started in
its own session (a ^C in the starting terminal must not cut the box's network) and stopped by
the runtime's stop/kill/cleanup (``stop_relay``). Light on purpose: the process that starts
a box imports this, never the relay's resolver and parsers.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import attrs

from ..errors import ConfigError, EngineError
from ..vmm.procstat import live_record, log_tail, stop_recorded
from .policy import NetworkPolicy
from .ports import PortMapping

CONFIG_NAME = "network.json"
RELAY_JSON = "netrelay.json"
RELAY_LOG = "netrelay.log"
#: the relay's decisions, one line each (``boxlite logs --network``)
NETWORK_LOG = "network.log"
#: seconds a relay may take to bind its ports and say it serves
START_TIMEOUT = 15.0


@attrs.frozen
class RelayConfig:
    """What the relay serves: the box's name (for logs), its policy and published ports."""

    box: str
    policy: NetworkPolicy
    ports: tuple[PortMapping, ...] = ()

    def to_json(self) -> dict[str, object]:
        return {"box": self.box, "policy": self.policy.to_json(),
                "ports": [p.to_json() for p in self.ports]}

    @classmethod
    def from_json(cls, data: dict) -> RelayConfig:
        return cls(box=str(data["box"]), policy=NetworkPolicy.from_json(data["policy"]),
                   ports=tuple(PortMapping.from_json(p) for p in data.get("ports", [])))


def live_relay(box_dir: Path) -> dict | None:
    """netrelay.json of the box's running relay, else None."""
    return live_record(Path(box_dir) / RELAY_JSON)


def published_ports(box_dir: Path) -> list[PortMapping]:
    """The ports the box's live relay listens on (host ports as bound: a requested 0 shows
    the port the kernel picked); [] without a relay."""
    info = live_relay(box_dir)
    if info is None:
        return []
    return [PortMapping.from_json(p) for p in info.get("ports", [])]


def start_relay(box_dir: Path, config: RelayConfig, timeout: float = START_TIMEOUT) -> dict:
    """Start the box's relay (after stopping any earlier one) and wait until it serves.

    Returns its netrelay.json (``pid``, ``start_time``, ``ports`` as bound). Raises as
    :meth:`RelayStart.wait`."""
    return spawn_relay(box_dir, config).wait(timeout)


class RelayStart:
    """A relay process on its way up: ``spawn_relay`` returns at once (the relay's Python
    start overlaps the guest's network setup); ``wait`` blocks until it serves."""

    def __init__(self, box_dir: Path, proc: subprocess.Popen, log_path: Path) -> None:
        self.box_dir, self.proc, self.log_path = box_dir, proc, log_path

    def cancel(self) -> None:
        with contextlib.suppress(OSError):
            self.proc.kill()

    def wait(self, timeout: float = START_TIMEOUT) -> dict:
        """The relay's netrelay.json once it serves.

        Raises:
            ConfigError: a published port could not be bound (in use, no permission): the
                relay's own message names the address.
            EngineError: the relay exited for another reason or did not serve within
                ``timeout`` seconds (its log quoted).
        """
        box_dir, proc, log_path = self.box_dir, self.proc, self.log_path
        deadline = time.monotonic() + timeout
        while True:
            info = live_relay(box_dir)
            if info is not None and int(info["pid"]) == proc.pid:
                return info
            if proc.poll() is not None:
                tail = log_tail(log_path, 5, 2000).strip() or "(empty)"
                if proc.returncode == 2:  # the relay's "cannot publish" exit
                    raise ConfigError(f"box network: {tail.splitlines()[-1]}")
                raise EngineError(f"the network relay of {box_dir} exited with status "
                                  f"{proc.returncode} before serving; {log_path} ends:\n{tail}")
            if time.monotonic() >= deadline:
                self.cancel()
                raise EngineError(f"the network relay of {box_dir} did not serve within "
                                  f"{timeout:g} s; {log_path} ends:\n"
                                  f"{log_tail(log_path, 5, 2000) or '(empty)'}")
            time.sleep(0.01)


def spawn_relay(box_dir: Path, config: RelayConfig) -> RelayStart:
    """Start the box's relay process (after stopping any earlier one); see RelayStart."""
    box_dir = Path(box_dir)
    stop_relay(box_dir)
    config_path = box_dir / CONFIG_NAME
    tmp = box_dir / f".{CONFIG_NAME}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(config.to_json(), fh)
    os.replace(tmp, config_path)
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])  # the relay imports this boxlite_core
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    log_path = box_dir / RELAY_LOG
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "boxlite_core.network.relay", "--box-dir",
             str(box_dir.absolute())],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
            start_new_session=True, close_fds=True,
        )
    threading.Thread(target=proc.wait, daemon=True, name=f"relay-reaper-{proc.pid}").start()
    return RelayStart(box_dir, proc, log_path)


def network_log_lines(box_dir: Path, tail: int | None = None) -> list[str]:
    """The lines of BOXDIR/network.log (the last ``tail`` if given); [] when the box never had
    a network. Lines end with a newline."""
    try:
        with open(Path(box_dir) / NETWORK_LOG, encoding="utf-8", errors="replace") as fh:
            lines = fh.readlines()
    except FileNotFoundError:
        return []
    if tail is None:
        return lines
    return lines[-tail:] if tail else []


def stop_relay(box_dir: Path, timeout: float = 5.0) -> bool:
    """End the box's relay (SIGTERM, then SIGKILL) and remove its record. True if one ran."""
    return stop_recorded(Path(box_dir) / RELAY_JSON, timeout)
