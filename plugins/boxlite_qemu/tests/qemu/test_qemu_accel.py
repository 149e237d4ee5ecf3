"""Accelerator choice: KVM only when it would really boot a stock guest, else TCG.

The fake /sys, /proc and /dev trees here are test doubles (hence ``_double``); the last test
checks the real host's answer. The probe itself (kvm_usable, in the core) is tested in
tests/vmm/test_accel.py; these tests check QEMU's choice on top of it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from boxlite_core.errors import ConfigError
from boxlite_qemu.accel import ENV_ACCEL, choose_accel, host_accel


def fake_root(
    tmp: Path,
    *,
    modules=("kvm", "kvm_intel"),
    flags="fpu vme vmx sse",
    kvm_dev: bool = True,
) -> Path:
    root = tmp / "root"
    for mod in modules:
        (root / "sys/module" / mod).mkdir(parents=True)
    (root / "proc").mkdir(parents=True)
    (root / "proc/cpuinfo").write_text(f"processor\t: 0\nflags\t\t: {flags}\n\n")
    (root / "dev").mkdir()
    if kvm_dev:
        (root / "dev/kvm").write_text("")  # a regular file stands in for the char device
    return root


def test_kvm_when_everything_is_there_double(tmp_path: Path) -> None:
    choice = choose_accel(fake_root(tmp_path), env={}, system="Linux")
    assert choice.accel == "kvm"
    assert choice.notice == ""


def test_kvm_pvm_means_tcg_double(tmp_path: Path) -> None:
    root = fake_root(tmp_path, modules=("kvm", "kvm_pvm"), flags="fpu hypervisor")
    choice = choose_accel(root, env={}, system="Linux")
    assert choice.accel == "tcg"
    assert "kvm_pvm" in choice.reason
    assert choice.notice.startswith("boxlite: using QEMU TCG")


def test_no_vmx_svm_means_tcg_double(tmp_path: Path) -> None:
    root = fake_root(tmp_path, flags="fpu hypervisor sse")
    choice = choose_accel(root, env={}, system="Linux")
    assert choice.accel == "tcg" and "vmx/svm" in choice.reason


def test_svm_with_kvm_amd_double(tmp_path: Path) -> None:
    root = fake_root(tmp_path, modules=("kvm", "kvm_amd"), flags="fpu svm")
    assert choose_accel(root, env={}, system="Linux").accel == "kvm"


def test_no_hardware_module_means_tcg_double(tmp_path: Path) -> None:
    root = fake_root(tmp_path, modules=("kvm",), flags="vmx")
    assert choose_accel(root, env={}, system="Linux").accel == "tcg"


def test_no_dev_kvm_means_tcg_double(tmp_path: Path) -> None:
    root = fake_root(tmp_path, kvm_dev=False)
    choice = choose_accel(root, env={}, system="Linux")
    assert choice.accel == "tcg" and "no /dev/kvm" in choice.reason


@pytest.mark.skipif(os.geteuid() == 0, reason="root opens any file")
def test_unopenable_dev_kvm_means_tcg_double(tmp_path: Path) -> None:
    root = fake_root(tmp_path)
    os.chmod(root / "dev/kvm", 0)
    assert choose_accel(root, env={}, system="Linux").accel == "tcg"


def test_env_override_wins_double(tmp_path: Path) -> None:
    root = fake_root(tmp_path, modules=("kvm_pvm",), flags="")
    choice = choose_accel(root, env={ENV_ACCEL: "KVM"}, system="Linux")
    assert choice.accel == "kvm" and choice.forced
    assert choose_accel(fake_root(tmp_path / "b"), env={ENV_ACCEL: "tcg"}).accel == "tcg"


def test_env_override_rejects_nonsense(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=ENV_ACCEL):
        choose_accel(tmp_path, env={ENV_ACCEL: "xen"})


def test_unknown_os_means_tcg(tmp_path: Path) -> None:
    assert choose_accel(tmp_path, env={}, system="Plan9").accel == "tcg"


def test_this_host(monkeypatch: pytest.MonkeyPatch) -> None:
    """The real host: kvm only if /dev/kvm is a hardware KVM (never kvm_pvm)."""
    monkeypatch.delenv(ENV_ACCEL, raising=False)
    choice = host_accel()
    assert choice is host_accel()  # cached per process
    pvm = Path("/sys/module/kvm_pvm").exists()
    cpuinfo = Path("/proc/cpuinfo").read_text()
    if pvm or ("vmx" not in cpuinfo and "svm" not in cpuinfo):
        assert choice.accel == "tcg" and choice.notice
    monkeypatch.setenv(ENV_ACCEL, "tcg")
    assert host_accel().accel == "tcg" and host_accel().forced
