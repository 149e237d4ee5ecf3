"""The examples' launch() as a vendor copies it: a plan for another backend is refused, and
when QEMU refuses an option the handle's exit_reason() quotes QEMU's own line.

Why exit_reason: QEMU creates its chardev sockets (the agent's included) before it checks
its devices, then exits; so a socket proves nothing, and the core, which waits for the agent
while the handle says the VM runs, puts exit_reason() first in its start error.
Fast: the QEMU case is a real ``qemu-system-x86_64 -device no-such-device`` (exits at once).
"""

from __future__ import annotations

import importlib
import shutil
from pathlib import Path

import attrs
import pytest

from boxlite_conformance.specs import build_spec
from boxlite_core.vendor import ConfigError, LaunchPlan, VmmBackend
from boxlite_core.vmm.consolelog import writer_running

EXAMPLES = Path(__file__).resolve().parents[2] / "conformance" / "examples"
#: (distribution dir, module, class) of each example backend
BACKENDS = [
    ("boxlite-example-qemu", "boxlite_example_qemu.backend", "ExampleQemuBackend"),
    ("boxlite-example-backend", "boxlite_example_backend.backend", "ExampleBackend"),
]


def _backend(monkeypatch: pytest.MonkeyPatch, dist: str, module: str, cls: str) -> VmmBackend:
    monkeypatch.syspath_prepend(str(EXAMPLES / dist))  # as if installed; undone after the test
    backend: VmmBackend = getattr(importlib.import_module(module), cls)()
    return backend


def _plan(tmp_path: Path, backend: VmmBackend) -> LaunchPlan:
    spec = build_spec(tmp_path, channel_kind=backend.channel_kind,
                      channel_handshake=backend.channel_handshake,
                      capabilities=backend.capabilities())
    return LaunchPlan(backend.name, spec, {})


@pytest.mark.parametrize(("dist", "module", "cls"), BACKENDS, ids=[b[0] for b in BACKENDS])
def test_launch_refuses_another_backends_plan(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, dist: str, module: str, cls: str
) -> None:
    backend = _backend(monkeypatch, dist, module, cls)
    plan = attrs.evolve(_plan(tmp_path, backend), backend="someone-else")
    with pytest.raises(ConfigError, match="someone-else"):
        backend.launch(plan)
    assert not any(tmp_path.rglob("*.json")), "a refused plan must not start anything"


@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="needs QEMU")
def test_example_qemu_exit_reason_quotes_qemu(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    backend = _backend(monkeypatch, *BACKENDS[0])
    plan = _plan(tmp_path, backend)
    console = plan.spec.box_dir / "console.sock"
    plan = attrs.evolve(plan, data={
        "argv": ["qemu-system-x86_64", "-nodefaults", "-display", "none",
                 "-device", "no-such-device"],
        "console_socket": str(console),
    })
    handle = backend.launch(plan)  # returns at once: QEMU's failure shows in the handle
    try:
        assert handle.wait(30), "QEMU with an unknown device did not exit"
        reason = handle.exit_reason() or ""
        assert reason.startswith("QEMU exited with code 1: "), reason
        assert "no-such-device" in reason, reason
        assert "\n" not in reason, f"one line, QEMU's last: {reason!r}"
        handle.kill()  # already gone: ends the console writer too
        assert not writer_running(plan.spec.box_dir)
    finally:
        handle.kill()
