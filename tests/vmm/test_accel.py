"""The core's acceleration probe: KVM counts only where it would really boot a stock guest.

The fake /sys, /proc and /dev trees here are test doubles (hence ``_double``); the tests
without the suffix check this real host's answer. QEMU's choice on top of the probe
(``BOXLITE_ACCEL``, the TCG notice) is tested with the qemu plugin (test_qemu_accel.py).
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

import pytest

from boxlite_core.vmm.accel import host_acceleration, hvf_usable, kvm_usable
from boxlite_core.vmm.spec import Capability


def fake_root(
    tmp: Path,
    *,
    modules: tuple[str, ...] = ("kvm", "kvm_intel"),
    flags: str = "fpu vme vmx sse",
    kvm_dev: bool = True,
    proc_modules: str | None = None,
) -> Path:
    root = tmp / "root"
    for mod in modules:
        (root / "sys/module" / mod).mkdir(parents=True)
    (root / "proc").mkdir(parents=True)
    (root / "proc/cpuinfo").write_text(f"processor\t: 0\nflags\t\t: {flags}\n\n")
    if proc_modules is not None:
        (root / "proc/modules").write_text(proc_modules)
    (root / "dev").mkdir()
    if kvm_dev:
        (root / "dev/kvm").write_text("")  # a regular file stands in for the char device
    return root


def test_kvm_usable_when_everything_is_there_double(tmp_path: Path) -> None:
    assert kvm_usable(fake_root(tmp_path)) == (True, "")


def test_kvm_pvm_via_proc_modules_double(tmp_path: Path) -> None:
    root = fake_root(tmp_path, modules=(), proc_modules="kvm_pvm 1 0 - Live 0x0\nkvm 2 1\n")
    ok, why = kvm_usable(root)
    assert not ok and "kvm_pvm" in why


@pytest.mark.parametrize(
    ("kwargs", "why"),
    [
        ({"modules": ("kvm", "kvm_pvm"), "flags": "fpu hypervisor"}, "kvm_pvm"),
        ({"flags": "fpu hypervisor sse"}, "vmx/svm"),
        ({"modules": ("kvm",), "flags": "vmx"}, "kvm_intel nor kvm_amd"),
        ({"kvm_dev": False}, "no /dev/kvm"),
    ],
    ids=["kvm_pvm", "no-vmx-svm", "no-hardware-module", "no-dev-kvm"],
)
def test_kvm_not_usable_says_why_double(tmp_path: Path, kwargs: dict, why: str) -> None:
    ok, reason = kvm_usable(fake_root(tmp_path, **kwargs))
    assert not ok and why in reason, reason


def test_svm_with_kvm_amd_is_usable_double(tmp_path: Path) -> None:
    assert kvm_usable(fake_root(tmp_path, modules=("kvm", "kvm_amd"), flags="fpu svm"))[0]


@pytest.mark.skipif(os.geteuid() == 0, reason="root opens any file")
def test_unopenable_dev_kvm_is_not_usable_double(tmp_path: Path) -> None:
    root = fake_root(tmp_path)
    os.chmod(root / "dev/kvm", 0)
    ok, why = kvm_usable(root)
    assert not ok and "not usable by this user" in why


def test_host_acceleration_always_offers_tcg_double(tmp_path: Path) -> None:
    no_kvm = fake_root(tmp_path / "a", kvm_dev=False)
    assert host_acceleration(no_kvm, system="Linux") == frozenset({Capability.TCG})
    assert host_acceleration(tmp_path, system="Plan9") == frozenset({Capability.TCG})


def test_host_acceleration_adds_kvm_where_usable_double(tmp_path: Path) -> None:
    root = fake_root(tmp_path)
    assert host_acceleration(root, system="Linux") == {Capability.TCG, Capability.KVM}
    assert all(c.group == "acceleration" for c in host_acceleration(root, system="Linux"))


def test_this_host_agrees_with_its_kernel() -> None:
    """The real host: KVM only if /dev/kvm is a hardware KVM (never kvm_pvm), and
    host_acceleration says the same as kvm_usable."""
    usable, why = kvm_usable()
    pvm = Path("/sys/module/kvm_pvm").exists()
    cpuinfo = Path("/proc/cpuinfo").read_text()
    if pvm or ("vmx" not in cpuinfo and "svm" not in cpuinfo):
        assert not usable and why
    caps = host_acceleration()
    assert Capability.TCG in caps
    if platform.system() == "Linux":
        assert (Capability.KVM in caps) == usable
        assert Capability.HVF not in caps


def test_hvf_is_not_usable_off_macos() -> None:
    if platform.system() == "Darwin":
        pytest.skip("this is a Mac: hvf_usable depends on its hardware")
    ok, why = hvf_usable()
    assert not ok and why
