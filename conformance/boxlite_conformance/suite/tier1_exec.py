"""Tier 1: a box boots, runs commands and reports them exactly; the guest got what was asked.

Most tests share one started box (booting costs seconds under TCG); they only run commands,
so sharing does not weaken them. Stopping is tested on a box of its own.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import pytest

from boxlite_core.errors import BoxliteError
from boxlite_core.vmm import consolelog

from .. import guest_probe
from ..boxes import DEFAULT_MEMORY_MIB, BoxPool, default_cpus
from ..markers import tier
from ..requirements import Requirements

__all__ = ["TestConsoleLog", "TestExec", "TestGuestResources", "TestStop"]


@tier(1)
@pytest.mark.vm
class TestExec:
    def test_echo(self, box: Any) -> None:
        result = box.exec(["echo", "hello from the guest"], timeout=60)
        assert result.exit_code == 0, result
        assert result.stdout == b"hello from the guest\n"
        assert result.stderr == b""

    @pytest.mark.parametrize("code", [0, 1, 42])
    def test_exit_code(self, box: Any, code: int) -> None:
        result = box.exec(["sh", "-c", f"exit {code}"], timeout=60)
        assert result.exit_code == code, f"asked for exit {code}, got {result!r}"
        assert result.returncode == code
        assert result.signal is None and not result.timed_out

    def test_stdout_and_stderr_are_separate(self, box: Any) -> None:
        result = box.exec(
            ["sh", "-c", "echo out1; echo err1 >&2; echo out2; echo err2 >&2"], timeout=60
        )
        assert result.exit_code == 0, result
        assert result.stdout == b"out1\nout2\n", result
        assert result.stderr == b"err1\nerr2\n", result

    def test_stdin_reaches_the_program(self, box: Any) -> None:
        data = bytes(range(256)) * 1024  # 256 KiB, every byte value: no text-mode mangling
        result = box.exec(["sh", "-c", "cat | md5sum"], input=data, timeout=120)
        assert result.exit_code == 0, result
        import hashlib

        assert result.stdout.split()[0].decode() == hashlib.md5(data).hexdigest()

    def test_stdin_eof_without_input(self, box: Any) -> None:
        result = box.exec(["cat"], timeout=60)  # would hang if stdin were left open
        assert result.exit_code == 0 and result.stdout == b"", result

    def test_env_and_cwd(self, box: Any) -> None:
        result = box.exec(
            ["sh", "-c", 'echo "$CONFORMANCE_VAR"; pwd'],
            env={"CONFORMANCE_VAR": "a value with spaces"},
            cwd="/tmp",
            timeout=60,
        )
        assert result.exit_code == 0, result
        assert result.stdout == b"a value with spaces\n/tmp\n", result

    def test_killed_by_signal(self, box: Any) -> None:
        result = box.exec(["sh", "-c", "kill -TERM $$; sleep 5"], timeout=60)
        assert result.signal == signal.SIGTERM, f"expected death by SIGTERM, got {result!r}"
        assert result.exit_code is None
        assert result.returncode == 128 + signal.SIGTERM

    def test_timeout_kills_the_program(self, box: Any) -> None:
        result = box.exec(["sleep", "60"], timeout=2)
        assert result.timed_out, f"sleep 60 with timeout=2 was not reported timed out: {result!r}"
        assert result.returncode == 124
        after = box.exec(["true"], timeout=60)  # the box survives a timed-out command
        assert after.exit_code == 0

    def test_unknown_program(self, box: Any) -> None:
        try:
            result = box.exec(["/no/such/program"], timeout=60)
        except BoxliteError as exc:
            assert "/no/such/program" in str(exc), f"error does not name the program: {exc}"
            return
        assert result.returncode == 127, f"unknown program should exit 127, got {result!r}"


@tier(1)
@pytest.mark.vm
class TestGuestResources:
    """Looked at from inside the guest: the VM got the cpus and memory the box asked for."""

    def test_cpu_count(self, box: Any) -> None:
        assert guest_probe.cpu_count(box) == default_cpus()

    def test_memory_total(self, box: Any) -> None:
        asked_kib = DEFAULT_MEMORY_MIB * 1024
        total = guest_probe.mem_total_kib(box)
        # the kernel keeps its image and page tables out of MemTotal; never more than asked
        assert 0.75 * asked_kib <= total <= asked_kib, (
            f"asked for {DEFAULT_MEMORY_MIB} MiB, guest MemTotal is {total // 1024} MiB"
        )

    def test_root_is_writable(self, box: Any) -> None:
        guest_probe.run(box, ["sh", "-c", "echo kept > /conformance-root-file"])
        assert guest_probe.run(box, ["cat", "/conformance-root-file"]) == "kept\n"

    def test_proc_is_mounted(self, box: Any) -> None:
        assert guest_probe.mount_at(box, "/proc").fstype == "proc"

    def test_clock_is_fine_grained(self, box: Any) -> None:
        """Programs time things and sleep for less than a tick; glibc and musl even make DNS
        query ids from the clock. A backend whose guest falls back to a jiffies clocksource
        (4 ms steps) or periodic ticks fails here: a TCG guest's TSC needs ``tsc=reliable``
        (the guest kit adds it) and an x86 CPU model with ARAT (QEMU: ``-cpu qemu64,+arat``)."""
        clock = guest_probe.timekeeping(box)
        assert "jiffies" not in clock.clocksource, (
            f"the guest's clocksource is {clock.clocksource!r}: time advances in ticks")
        assert clock.resolution_ns == 1, (
            f"the guest's timers resolve {clock.resolution_ns} ns, not 1: no high-resolution "
            "mode (x86: the CPU model lacks ARAT, so the APIC timer cannot run one-shot)")


@tier(1)
@pytest.mark.vm
class TestStop:
    def test_stop_then_exec_is_refused(
        self, box_pool: BoxPool, conformance_requirements: Requirements
    ) -> None:
        box = box_pool.fresh(memory_mib=256, rootfs=conformance_requirements.default_rootfs)
        assert box.exec(["true"], timeout=60).exit_code == 0
        assert box.info()["status"] == "running"
        box.stop()
        info = box.info()
        assert info["status"] == "stopped", info
        assert not info.get("pid"), f"a stopped box still reports a VM pid: {info}"
        with pytest.raises(BoxliteError):
            box.exec(["true"], timeout=30)
        box.stop()  # idempotent


MIB = 1024 * 1024
#: 47-byte lines (49 with the tty's CR LF): ~4 MiB, a third more than the 1 MiB cap and its
#: two rotations hold (under TCG every byte is a UART exit: the flood's size is its cost)
FLOOD_LINES = 85_000


@tier(1)
@pytest.mark.vm
class TestConsoleLog:
    def test_a_flooding_guest_stays_within_the_console_cap(
        self, box_pool: BoxPool, conformance_requirements: Requirements
    ) -> None:
        """The guest is root and writes what it likes to its console: the host keeps
        console.log (+ rotations) within spec.console_log_max_bytes per file."""
        box = box_pool.fresh(memory_mib=256, rootfs=conformance_requirements.default_rootfs,
                             console_log_max_mib=1)
        log = Path(str(box.info()["dir"])) / "console.log"
        awk = ("BEGIN { for (i = 1; i <= LINES; i++) "
               'printf "flood-%08d-xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\\n", i }')
        script = ("mknod /dev/bx-console c 5 1 2>/dev/null; "  # /dev/console: the kernel's
                  f"awk '{awk.replace('LINES', str(FLOOD_LINES))}' > /dev/bx-console; "
                  "echo FLOOD-END > /dev/bx-console")
        try:
            result = box.exec(["sh", "-c", script], timeout=900)
            assert result.exit_code == 0, result
            deadline = time.monotonic() + 60
            while b"FLOOD-END" not in consolelog.tail_bytes(log, 3):
                assert time.monotonic() < deadline, (
                    f"the flood's end marker never reached {log}: "
                    f"{consolelog.tail_bytes(log, 3)!r}"
                )
                time.sleep(0.2)
            files = {p.name: p.stat().st_size for p in consolelog.log_files(log)}
            assert len(files) > 1, f"~5 MiB into a 1 MiB cap, yet nothing rotated: {files}"
            assert all(size <= MIB for size in files.values()), (
                f"a console file grew past its 1 MiB cap (console_log_max_mib=1): {files}; "
                "serve the console on a socket and copy it with the core's start_writer"
            )
            assert sum(files.values()) <= (consolelog.BACKUPS + 1) * MIB, files
            assert box.exec(["echo", "still here"], timeout=120).stdout == b"still here\n"
        finally:
            box.stop()
