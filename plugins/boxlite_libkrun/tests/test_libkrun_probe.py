"""probe(): libkrun found and loadable, the API boxlite needs, and KVM really usable."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from boxlite_core.plugins import PluginRegistry
from boxlite_core.vmm.spec import Capability, ChannelKind
from boxlite_libkrun import binding
from boxlite_libkrun.backend import LibkrunBackend
from boxlite_libkrun.host import AccelCheck, check_kvm


def test_probe_on_this_machine_says_unavailable_with_reason_and_fix(monkeypatch):
    monkeypatch.delenv("BOXLITE_LIBKRUN_PATH", raising=False)
    if binding.find_library()[0] is not None and check_kvm().usable:
        pytest.skip("this host has libkrun and usable KVM")
    result = LibkrunBackend().probe()
    assert not result.available
    assert result.reason and result.fix
    if binding.find_library()[0] is None:
        assert "libkrun.so.1 not found (searched" in result.reason
        assert "/usr/lib64" in result.reason
        assert "BOXLITE_LIBKRUN_PATH" in result.fix and "dnf install libkrun" in result.fix


def test_probe_names_a_missing_override_path(monkeypatch, tmp_path):
    monkeypatch.setenv("BOXLITE_LIBKRUN_PATH", str(tmp_path / "nope.so"))
    result = LibkrunBackend().probe()
    assert not result.available and "BOXLITE_LIBKRUN_PATH" in result.reason


def test_probe_rejects_a_library_that_is_not_libkrun(monkeypatch):
    libc = "/lib/x86_64-linux-gnu/libc.so.6"
    if not os.path.exists(libc):
        pytest.skip("no libc at the Debian amd64 path")
    monkeypatch.setenv("BOXLITE_LIBKRUN_PATH", libc)
    result = LibkrunBackend(accel_check=lambda: AccelCheck(True)).probe()
    assert not result.available and "krun_create_ctx" in result.reason


def test_probe_c_double_with_fake_kvm_says_available(use_c_double, c_double_lib):
    result = LibkrunBackend(accel_check=lambda: AccelCheck(True)).probe()
    assert result.available, result.reason
    assert result.details["library"] == str(c_double_lib)
    assert all(result.details["symbols"].values())


def test_probe_c_double_with_failing_kvm_reports_its_reason(use_c_double):
    check = AccelCheck(False, "KVM here is the kvm_pvm module", "use kvm_intel")
    result = LibkrunBackend(accel_check=lambda: check).probe()
    assert not result.available
    assert (result.reason, result.fix) == (check.reason, check.fix)


def test_probe_c_double_with_this_hosts_kvm_check(use_c_double):
    """The double library plus the real KVM check: on a PVM host it must say why not."""
    real = check_kvm()
    result = LibkrunBackend().probe()
    assert result.available == real.usable
    if Path("/sys/module/kvm_pvm").exists():
        assert not result.available and "kvm_pvm" in result.reason and result.fix


def test_probe_c_double_old_api_lacks_vsock_port2(monkeypatch, c_double_old_lib):
    monkeypatch.setenv("BOXLITE_LIBKRUN_PATH", str(c_double_old_lib))
    backend = LibkrunBackend(accel_check=lambda: AccelCheck(True))
    result = backend.probe()
    assert not result.available and "krun_add_vsock_port2" in result.reason
    assert Capability.QCOW2 not in backend.capabilities()


def test_capabilities(monkeypatch):
    monkeypatch.delenv("BOXLITE_LIBKRUN_PATH", raising=False)
    caps = LibkrunBackend().capabilities()
    assert {Capability.VIRTIOFS, Capability.RAW, Capability.VSOCK, Capability.ATTACH} <= caps
    assert Capability.NINEP not in caps and Capability.TCG not in caps
    assert LibkrunBackend().channel_kind is ChannelKind.VSOCK


def _fake_host(tmp_path: Path, *, pvm: bool = False, flags: str = "fpu vmx sse") -> Path:
    (tmp_path / "dev").mkdir(parents=True)
    (tmp_path / "dev/kvm").write_text("")
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/cpuinfo").write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    if pvm:
        (tmp_path / "sys/module/kvm_pvm").mkdir(parents=True)
    return tmp_path


def test_check_kvm_reasons(tmp_path):
    assert not check_kvm(tmp_path).usable  # no /dev/kvm
    assert "does not exist" in check_kvm(tmp_path).reason
    host = _fake_host(tmp_path / "good")
    assert check_kvm(host).usable
    pvm = check_kvm(_fake_host(tmp_path / "pvm", pvm=True))
    assert not pvm.usable and "kvm_pvm" in pvm.reason and pvm.fix
    noflag = check_kvm(_fake_host(tmp_path / "noflag", flags="fpu sse"))
    assert not noflag.usable and "vmx/svm" in noflag.reason


def test_entry_point_registers_the_backend():
    registry = PluginRegistry(allow={"libkrun"})
    assert "libkrun" in registry.backend_names()
    assert registry.backend_plugin("libkrun") == "libkrun"
    assert isinstance(registry.backend("libkrun"), LibkrunBackend)
    assert not [f for f in registry.failures if f.plugin == "libkrun"]
