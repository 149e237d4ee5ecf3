"""Which accelerator QEMU gets: KVM/HVF only where it really boots a guest, else TCG.

Whether the host really gives KVM or HVF is the core's public probe
(:mod:`boxlite_core.vmm.accel`: ``kvm_usable``, ``hvf_usable``); this module adds QEMU's
choice on top of it: the ``BOXLITE_ACCEL`` override, and a one-line notice saying why when it
falls back to TCG. :func:`host_accel` is the cached answer for the real host.
"""

from __future__ import annotations

import functools
import logging
import os
import platform as _platform
from collections.abc import Mapping
from pathlib import Path

import attrs

from boxlite_core.errors import ConfigError
from boxlite_core.vmm.accel import hvf_usable, kvm_usable

log = logging.getLogger(__name__)

ENV_ACCEL = "BOXLITE_ACCEL"
ACCELS = ("kvm", "tcg", "hvf")


@attrs.frozen
class AccelChoice:
    """The accelerator and why: ``notice`` is the one line a user sees when we fell back."""

    accel: str
    reason: str
    notice: str = ""
    forced: bool = False

    def to_dict(self) -> dict[str, object]:
        return attrs.asdict(self)


def choose_accel(
    root: Path = Path("/"),
    env: Mapping[str, str] | None = None,
    system: str | None = None,
) -> AccelChoice:
    """Decide the accelerator for this host. ``BOXLITE_ACCEL=kvm|tcg|hvf`` overrides.

    Raises ConfigError for an unknown override value (the user typed it; say so).
    """
    env = os.environ if env is None else env
    system = system or _platform.system()
    forced = env.get(ENV_ACCEL, "").strip().lower()
    if forced:
        if forced not in ACCELS:
            raise ConfigError(
                f"{ENV_ACCEL}={forced!r}: must be one of {', '.join(ACCELS)} (or unset to probe)"
            )
        return AccelChoice(forced, f"forced by {ENV_ACCEL}={forced}", forced=True)
    if system == "Darwin":
        ok, why = hvf_usable()
        if ok:
            return AccelChoice("hvf", "kern.hv_support=1")
    elif system == "Linux":
        ok, why = kvm_usable(root)
        if ok:
            return AccelChoice("kvm", "/dev/kvm usable with hardware virtualisation")
    else:
        why = f"no hardware accelerator support for {system}"
    notice = f"boxlite: using QEMU TCG (software emulation, slow): {why}"
    return AccelChoice("tcg", why, notice=notice)


@functools.cache
def _cached(forced: str) -> AccelChoice:
    choice = choose_accel(env={ENV_ACCEL: forced} if forced else {})
    if choice.notice:
        log.warning("%s", choice.notice)
    return choice


def host_accel() -> AccelChoice:
    """The accelerator for this process's host, probed once (per override value)."""
    return _cached(os.environ.get(ENV_ACCEL, "").strip().lower())
