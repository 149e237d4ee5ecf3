"""Issue 17 item 4 in a real VM, through the CLI: `boxlite run IMAGE -- ARGS` keeps the
image's Entrypoint and replaces its Cmd; `--entrypoint` replaces the Entrypoint and drops the
Cmd; `--entrypoint ''` clears it. The image: busybox with Entrypoint ``echo ep``, Cmd ``cmd``.
The rule itself, every combination, is unit-tested in tests/runtime/test_entrypoint.py."""

from __future__ import annotations

import pytest

from boxlite_testing.cli import boxlite
from boxlite_testing.derived import busybox_derived
from boxlite_testing.homes import unique

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def echo_image(runtime, tmp_path_factory):
    ref = busybox_derived(runtime.images, tmp_path_factory.mktemp("ep"),
                          config={"Entrypoint": ["echo", "ep"], "Cmd": ["cmd"]})
    yield ref
    runtime.images.remove(ref, in_use=runtime.images_in_use())  # untag; kept if in use


@pytest.mark.parametrize(
    ("flags", "args", "stdout"),
    [
        pytest.param([], [], "ep cmd\n", id="entrypoint+cmd"),
        pytest.param([], ["--", "a", "b"], "ep a b\n", id="args-replace-cmd-only"),
        # the image's Cmd is dropped with a replaced Entrypoint: echo alone prints a newline
        pytest.param(["--entrypoint", "echo"], [], "\n", id="entrypoint-drops-cmd"),
        pytest.param(["--entrypoint", "echo"], ["--", "x"], "x\n", id="entrypoint-with-args"),
        pytest.param(["--entrypoint", ""], ["--", "echo", "cleared"], "cleared\n",
                     id="entrypoint-cleared-with-args"),
    ],
)
def test_cli_run_composes_the_command_like_docker(vm_home, echo_image, flags, args, stdout):
    proc = boxlite("run", "--rm", "--name", unique("ep"), *flags, echo_image, *args,
                   home=vm_home)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == stdout


def test_cleared_entrypoint_without_args_is_refused_before_a_boot(vm_home, echo_image):
    name = unique("ep")
    proc = boxlite("run", "--rm", "--name", name, "--entrypoint", "", echo_image, home=vm_home)
    assert proc.returncode == 2
    assert "--entrypoint '' cleared the Entrypoint" in proc.stderr
    assert boxlite("inspect", name, home=vm_home).returncode != 0  # no box left


def test_exec_runs_its_command_as_given(runtime, echo_image):
    """`exec` is not the default command: no Entrypoint in front (docker exec)."""
    from boxlite_core.models import BoxOptions

    box = runtime.create(BoxOptions(image=echo_image, name=unique("ep"), memory_mib=256))
    try:
        box.start()
        assert box.exec(["echo", "plain"]).stdout == b"plain\n"
        assert box.default_command() == ["echo", "ep", "cmd"]
    finally:
        runtime.remove(box.id, force=True)
