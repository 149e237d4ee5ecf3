"""HvfBackend: boxlite's VMM contract over Apple's Virtualization.framework.

* ``plan`` is pure: ``{"vz": vz_config(spec, arch), ...}`` — checked on Linux.
* ``launch`` converts qcow2 disks to raw (the framework reads raw only), then starts
  ``python -m boxlite_hvf.runner`` in its own session with the plan on stdin, and records
  pid + start time in ``BOXDIR/vm.json`` so :meth:`attach` can re-adopt it.
* The handle signals the runner: SIGTERM asks the guest to power off (the runner forces it
  after its stop timeout), SIGKILL destroys the VM with the runner.
"""

from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
from pathlib import Path
from typing import Any

from boxlite_core import tools
from boxlite_core.errors import EngineError
from boxlite_core.vmm.base import LaunchPlan, VmHandle, VmmBackend
from boxlite_core.vmm.process import ProcessVmHandle
from boxlite_core.vmm.procstat import log_tail
from boxlite_core.vmm.spec import Capability, ChannelKind, ProbeResult, VmSpec

from . import probe as probing
from .config import WORK_DIR, normalise_arch, vz_config
from .proc import start_time

VM_JSON = "vm.json"
RUNNER_LOG = "runner.log"
RUNNER_MODULE = "boxlite_hvf.runner"
DEFAULT_STOP_TIMEOUT = 10.0


class HvfHandle(ProcessVmHandle):
    """The runner process of one box (the VM lives and dies with it). SIGTERM asks the guest
    to power off; the runner forces it after its own stop timeout."""

    KILL_WAIT = 10.0
    POLL = 0.05

    def __init__(self, box_dir: Path, pid: int, fingerprint: str | None,
                 popen: subprocess.Popen[bytes] | None = None) -> None:
        super().__init__(pid, fingerprint, popen)
        self.box_dir = box_dir

    def _identity(self) -> object | None:
        return start_time(self._pid)  # works on macOS (ps) as well as Linux

    def exit_reason(self) -> str | None:
        if self.is_running():
            return None
        code = self.returncode()
        what = {0: "the VM stopped", 1: "the VM ended in error",
                2: "the VM configuration was refused"}.get(code, "the VM runner exited")
        if code is not None and code < 0:
            name = signal.Signals(-code).name if -code in signal.valid_signals() else "?"
            what = f"the VM runner (pid {self._pid}) was killed by signal {-code} ({name})"
        elif code is None:
            what = (f"the VM runner (pid {self._pid}) exited or was killed (not our child: "
                    "its exit status is unknown)")
        tail = log_tail(self.box_dir / WORK_DIR / RUNNER_LOG, 5)
        return f"{what}" + (f": {tail}" if tail else "")


class HvfBackend(VmmBackend):
    """Backend ``hvf``. ``arch`` defaults to the host's: the framework does not emulate."""

    name = "hvf"

    def __init__(self, arch: str | None = None, stop_timeout: float = DEFAULT_STOP_TIMEOUT):
        self.arch = arch or platform.machine()
        self.stop_timeout = stop_timeout

    def capabilities(self) -> frozenset[Capability]:
        return frozenset({Capability.VIRTIOFS, Capability.RAW, Capability.VSOCK,
                          Capability.ATTACH, Capability.HVF})

    #: the runner turns each connect on the agent socket into a fresh vsock stream
    channel_kind = ChannelKind.VSOCK

    def probe(self) -> ProbeResult:
        return probing.judge(probing.gather())

    def plan(self, spec: VmSpec) -> LaunchPlan:
        arch = normalise_arch(spec.guest.arch or self.arch)
        return LaunchPlan(
            backend=self.name,
            spec=spec,
            data={
                "vz": vz_config(spec, arch),
                "runner": ["python", "-m", RUNNER_MODULE],  # python resolved at launch
                "watch_parent": bool(spec.backend_options.get("hvf_watch_parent", False)),
                "stop_timeout": self.stop_timeout,
            },
        )

    # -- launch --------------------------------------------------------------------------

    @staticmethod
    def convert_disks(vz: dict[str, Any]) -> list[str]:
        """Make the raw copies the plan asks for; return the targets (re)made."""
        made = []
        for disk in vz["block_devices"]:
            conv = disk["convert"]
            if conv is None:
                continue
            source, target = Path(conv["source"]), Path(conv["target"])
            if target.exists() and (
                conv["reuse"] == "keep" or target.stat().st_mtime >= source.stat().st_mtime
            ):
                continue
            qemu_img = tools.require_tool(
                "qemu-img", why="convert qcow2 disks to raw for Virtualization.framework "
                                "(macOS: brew install qemu)")
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_suffix(".raw.partial")
            argv = [qemu_img, *conv["argv"][1:-1], str(partial)]
            tools.run(argv, timeout=3600)
            partial.replace(target)
            made.append(str(target))
        return made

    def launch(self, plan: LaunchPlan) -> VmHandle:
        spec = plan.spec
        vz = plan.data["vz"]
        work = spec.box_dir / WORK_DIR
        work.mkdir(parents=True, exist_ok=True)
        self.convert_disks(vz)
        argv = [probing.runner_python(), *plan.data["runner"][1:]]
        config = {
            "vz": vz,
            "watch_parent": plan.data["watch_parent"],
            "stop_timeout": plan.data["stop_timeout"],
            "parent_pid": os.getpid(),
            # the runner caps its own log too (a guest refusing vsock connects adds lines)
            "runner_log": str(work / RUNNER_LOG),
        }
        log = open(work / RUNNER_LOG, "ab")  # noqa: SIM115 - handed to the child
        try:
            popen = subprocess.Popen(
                argv, stdin=subprocess.PIPE, stdout=log, stderr=log, close_fds=True,
                start_new_session=not plan.data["watch_parent"], cwd=spec.box_dir,
            )
        except OSError as exc:
            raise EngineError(f"hvf: cannot start the VM runner {argv[0]}: {exc}") from exc
        finally:
            log.close()
        assert popen.stdin is not None
        try:
            popen.stdin.write(json.dumps(config).encode())
            popen.stdin.close()
        except BrokenPipeError:
            pass
        fingerprint = start_time(popen.pid)
        record = {
            "backend": self.name,
            "pid": popen.pid,
            "start_time": fingerprint,
            "argv": argv,
            "socket": vz["vsock"]["bridge_socket"],
            "agent_port": vz["vsock"]["agent_port"],
            "log": str(work / RUNNER_LOG),
        }
        tmp = spec.box_dir / f".{VM_JSON}.tmp"
        tmp.write_text(json.dumps(record, indent=2, sort_keys=True))
        tmp.replace(spec.box_dir / VM_JSON)
        return HvfHandle(spec.box_dir, popen.pid, fingerprint, popen)

    def attach(self, box_dir: Path) -> VmHandle | None:
        try:
            record = json.loads((box_dir / VM_JSON).read_text())
        except (OSError, ValueError):
            return None
        if record.get("backend") != self.name or not isinstance(record.get("pid"), int):
            return None
        if not HvfHandle(box_dir, record["pid"], record.get("start_time")).is_running():
            return None
        return HvfHandle(box_dir, record["pid"], record.get("start_time"))
