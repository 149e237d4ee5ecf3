"""LibkrunBackend: plan = the krun call list, launch = a launcher child that replays it."""

from __future__ import annotations

import json
import logging
import os
import select
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from boxlite_core.errors import BoxliteError, EngineError
from boxlite_core.vmm.base import LaunchPlan, VmHandle, VmmBackend
from boxlite_core.vmm.consolelog import ensure_writer, start_writer, stop_writer, wait_writer
from boxlite_core.vmm.spec import Capability, ChannelKind, ProbeResult, VmSpec

from . import binding
from .handle import LOG_FILE, LibkrunHandle, launcher_error, read_state, write_state
from .host import AccelCheck, check_accel
from .plan import console_fifo, krun_calls

_log = logging.getLogger(__name__)

INSTALL_FIX = (
    "install libkrun and libkrunfw from your distribution (Fedora: dnf install libkrun; "
    "Debian/Ubuntu: not packaged — build from https://github.com/containers/libkrun); "
    "macOS: brew tap slp/krun && brew install libkrun; or set BOXLITE_LIBKRUN_PATH to "
    "the library file"
)
#: how long launch() waits for the launcher's configuration verdict (dlopen + ~20 calls)
STATUS_TIMEOUT = 30.0


class LibkrunBackend(VmmBackend):
    """libkrun: KVM (Linux) or Hypervisor.framework (macOS) through one shared library."""

    name = "libkrun"

    def __init__(self, accel_check: Callable[[], AccelCheck] = check_accel) -> None:
        # Injectable so tests can stand in for KVM on hosts without it (see tests/libkrun).
        self._accel_check = accel_check
        self._lib: binding.KrunLibrary | None = None

    #: every connect to the agent socket is a fresh vsock stream (krun_add_vsock_port2)
    channel_kind = ChannelKind.VSOCK

    def _library(self) -> binding.KrunLibrary | None:
        path, _ = binding.find_library()
        if path is None:
            return None
        if self._lib is None or self._lib.path != path:
            self._lib = binding.KrunLibrary(path)
        return self._lib

    def capabilities(self) -> frozenset[Capability]:
        caps = {
            Capability.VIRTIOFS,
            Capability.RAW,
            Capability.VSOCK,
            Capability.ATTACH,
            Capability.HVF if sys.platform == "darwin" else Capability.KVM,
        }
        try:
            lib = self._library()
        except EngineError:
            lib = None
        if lib is None or lib.has("krun_add_disk2"):  # unknown library: assume a current one
            caps.add(Capability.QCOW2)
        return frozenset(caps)

    def probe(self) -> ProbeResult:
        path, searched = binding.find_library()
        if path is None:
            name = "libkrun.dylib" if sys.platform == "darwin" else "libkrun.so.1"
            dirs = sorted({str(Path(p).parent) for p in searched if "/" in p})
            where = ", ".join(
                [
                    "BOXLITE_LIBKRUN_PATH"
                    if os.environ.get(binding.ENV_LIBRARY)
                    else "ctypes find_library('krun')",
                    *dirs,
                ]
            )
            return ProbeResult(
                False,
                reason=f"{name} not found (searched {where})",
                fix=INSTALL_FIX,
                details={"searched": searched},
            )
        try:
            lib = self._library()
        except EngineError as exc:
            return ProbeResult(False, reason=str(exc), fix=INSTALL_FIX, details={"library": path})
        assert lib is not None
        symbols = (
            "krun_add_disk2",
            "krun_add_virtiofs3",
            "krun_add_vsock_port2",
            "krun_disable_implicit_vsock",
            "krun_set_kernel",
            "krun_has_feature",
        )
        details = {
            "library": path,
            # Only needed for backend_options["krun_root"] boxes: the kit's kernel boots
            # without it.
            "libkrunfw": binding.find_firmware(path),
            "symbols": {s: lib.has(s) for s in symbols},
        }
        for needed, why in (
            ("krun_add_vsock_port2", "reach the guest agent over vsock"),
            ("krun_set_kernel", "boot the guest kit's kernel"),
        ):
            if not lib.has(needed):
                return ProbeResult(
                    False,
                    reason=f"{path} lacks {needed} (needed to {why})",
                    fix="upgrade libkrun to a release that exports it",
                    details=details,
                )
        accel = self._accel_check()
        if not accel.usable:
            return ProbeResult(False, reason=accel.reason, fix=accel.fix, details=details)
        return ProbeResult(True, details=details)

    def plan(self, spec: VmSpec) -> LaunchPlan:
        library, _ = binding.find_library()
        return LaunchPlan(
            backend=self.name,
            spec=spec,
            data={
                "calls": krun_calls(spec),
                "library": library,
                # the guest console goes through the capped writer, never straight to a file
                "console_fifo": str(console_fifo(spec)),
                "console_log_max_bytes": int(spec.console_log_max_bytes),
            },
        )

    def launch(self, plan: LaunchPlan) -> VmHandle:
        spec = plan.spec
        library = plan.data.get("library") or binding.find_library()[0]
        if not library:
            raise EngineError(f"box {spec.box_id}: libkrun not found; {INSTALL_FIX}")
        box_dir = Path(spec.box_dir)
        box_dir.mkdir(parents=True, exist_ok=True)
        spec.console_log.parent.mkdir(parents=True, exist_ok=True)
        # libkrun binds the agent socket itself; a stale one from a previous run blocks that.
        try:
            spec.agent.socket.unlink()
        except FileNotFoundError:
            pass
        log = box_dir / LOG_FILE
        request = json.dumps({"library": library, "calls": plan.data["calls"]}).encode()
        stderr_w = _start_console_writer(plan)
        status_r, status_w = os.pipe()
        argv = [sys.executable, "-m", "boxlite_libkrun.launcher", "--status-fd", str(status_w)]
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=stderr_w,
                stderr=stderr_w,
                pass_fds=(status_w,),
                start_new_session=True,
                close_fds=True,
            )
        except OSError as exc:
            os.close(status_r)
            os.close(status_w)
            stop_writer(box_dir)
            raise EngineError(
                f"box {spec.box_id}: cannot start the libkrun launcher: {exc}"
            ) from exc
        finally:
            os.close(stderr_w)
        os.close(status_w)
        try:
            assert proc.stdin is not None
            try:
                proc.stdin.write(request)
                proc.stdin.close()
            except BrokenPipeError:
                pass
            status = _read_status(status_r, STATUS_TIMEOUT)
        finally:
            os.close(status_r)
        handle = LibkrunHandle(proc.pid, None, log, proc, box_dir=box_dir)
        if status != "OK":
            if status is None and proc.poll() is None:
                handle.kill()
                detail = f"no answer from the launcher within {STATUS_TIMEOUT:.0f}s"
            elif status and status.startswith("ERROR "):
                proc.wait(10)
                detail = status[len("ERROR ") :]
            else:
                proc.wait(10)
                wait_writer(box_dir, 2.0)  # it copies the launcher's last lines into the log
                detail = launcher_error(log) or f"launcher exited with {proc.returncode}"
            handle.release()  # the launcher is gone: so is its console writer
            raise EngineError(f"box {spec.box_id}: libkrun launch failed: {detail} (log: {log})")
        state = write_state(box_dir, proc.pid, log)
        return LibkrunHandle(proc.pid, state["start_time"], log, proc, box_dir=box_dir)

    def attach(self, box_dir: Path) -> VmHandle | None:
        state = read_state(Path(box_dir))
        if not state or state.get("backend") != self.name:
            return None
        handle = LibkrunHandle(
            int(state["pid"]), state.get("start_time"), Path(state["log"]), box_dir=Path(box_dir)
        )
        if not handle.is_running():
            return None
        try:
            ensure_writer(Path(box_dir))  # a console writer that died: restart it on the pipe
        except BoxliteError as exc:
            _log.warning("box dir %s: could not restart the console log writer: %s", box_dir, exc)
        return handle


def _start_console_writer(plan: LaunchPlan) -> int:
    """Start the box's capped log writer before the launcher; the write end of the launcher's
    stderr pipe (the caller hands it to the launcher, then closes it).

    The writer reads ``console.fifo`` (what libkrun's ``krun_set_console_output`` opens) into
    ``console.log``, and the launcher's stdout/stderr (libkrun's own log lines, which a guest
    can provoke) into ``libkrun.log``, both under ``console_log_max_bytes`` with two rotated
    copies. It must run first: libkrun opens the pipe for writing inside
    ``krun_start_enter``, and a pipe without a reader would block that open."""
    spec = plan.spec
    box_dir = Path(spec.box_dir)
    fifo = Path(plan.data.get("console_fifo") or console_fifo(spec))
    cap = int(plan.data.get("console_log_max_bytes") or spec.console_log_max_bytes)
    stop_writer(box_dir)  # a writer left from an earlier boot of this box
    stderr_r, stderr_w = os.pipe()
    try:
        start_writer(
            box_dir, fifo, Path(spec.console_log), cap, fifo=True,
            stdin_fd=stderr_r, stdin_out=box_dir / LOG_FILE,
        )
    except BaseException:
        os.close(stderr_w)
        raise
    finally:
        os.close(stderr_r)
    return stderr_w


def _read_status(fd: int, timeout: float) -> str | None:
    """First line from the launcher's status pipe; None on timeout, "" if it closed silently."""
    deadline = time.monotonic() + timeout
    data = b""
    while b"\n" not in data:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        ready, _, _ = select.select([fd], [], [], remaining)
        if not ready:
            return None
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    return data.decode(errors="replace").split("\n", 1)[0].strip()
