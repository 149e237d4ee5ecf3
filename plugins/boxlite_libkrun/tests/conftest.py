"""Fixtures for the libkrun backend tests: VmSpecs built in tmp_path, and the C test double.

The double (krun_double.c) exports libkrun's functions with the same C signatures and logs each
call; it is compiled with gcc per session, so the real cffi binding, launcher child process and
handle run end to end without libkrun or KVM on the machine.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from boxlite_core.vmm.spec import AgentChannel, ChannelKind, DiskSpec, ShareSpec, VmSpec

HERE = Path(__file__).parent
ELF_HEADER = b"\x7fELF\x02\x01\x01" + b"\0" * 57


def make_spec(box_dir: Path, **changes) -> VmSpec:
    kit = box_dir / "kit"
    kit.mkdir(parents=True, exist_ok=True)
    kernel = kit / "vmlinux"
    if not kernel.exists():
        kernel.write_bytes(ELF_HEADER)
    fields = dict(
        box_id="b1",
        box_dir=box_dir,
        cpus=2,
        memory_mib=768,
        kernel=kernel,
        initrd=kit / "initrd.cpio",
        # as the core builds it for a vsock channel: the agent's port key appended
        cmdline="console=ttyS0 quiet loglevel=3 panic=-1 reboot=t boxlite.agent_vsock=1024",
        console_log=box_dir / "console.log",
        agent=AgentChannel(ChannelKind.VSOCK, box_dir / "agent.sock"),
        disks=(
            DiskSpec(box_dir / "rootfs.qcow2", format="qcow2", serial="rootfs"),
            DiskSpec(kit / "guestroot.raw", format="raw", read_only=True, serial="guestroot"),
        ),
        shares=(
            ShareSpec("vol0", Path("/srv/data"), kind="virtiofs"),
            ShareSpec("vol1", Path("/srv/ro"), kind="virtiofs", read_only=True),
        ),
    )
    fields.update(changes)
    return VmSpec(**fields)


@pytest.fixture
def spec_factory(tmp_path: Path):
    def factory(**changes) -> VmSpec:
        return make_spec(tmp_path / "box", **changes)

    return factory


def _compile(out_dir: Path, *flags: str) -> Path:
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.fail("gcc is needed to build the libkrun C test double: apt-get install gcc")
    out_dir.mkdir(parents=True, exist_ok=True)
    lib = out_dir / "libkrun.so.1"
    subprocess.run(
        [
            gcc,
            "-shared",
            "-fPIC",
            "-Wall",
            "-Werror",
            *flags,
            "-o",
            str(lib),
            str(HERE / "krun_double.c"),
        ],
        check=True,
    )
    return lib


@pytest.fixture(scope="session")
def c_double_lib(tmp_path_factory) -> Path:
    """A libkrun.so.1 test double with the current API."""
    return _compile(tmp_path_factory.mktemp("krun_double"))


@pytest.fixture(scope="session")
def c_double_old_lib(tmp_path_factory) -> Path:
    """A libkrun.so.1 test double without the newer symbols (like an old libkrun)."""
    return _compile(tmp_path_factory.mktemp("krun_double_old"), "-DOLD_API")


@pytest.fixture
def use_c_double(c_double_lib: Path, tmp_path: Path, monkeypatch) -> Path:
    """Point the backend at the double; returns the call log path the double appends to."""
    log = tmp_path / "krun_calls.log"
    monkeypatch.setenv("BOXLITE_LIBKRUN_PATH", str(c_double_lib))
    monkeypatch.setenv("KRUN_DOUBLE_LOG", str(log))
    for var in ("KRUN_DOUBLE_FAIL", "KRUN_DOUBLE_ENTER", "KRUN_DOUBLE_NO_BLK",
                "KRUN_DOUBLE_CONSOLE", "KRUN_DOUBLE_STDERR"):
        monkeypatch.delenv(var, raising=False)
    return log
