"""Issue 17 item 4: a box's default command is the image's Entrypoint + Cmd with docker's
overrides — arguments replace the Cmd only, ``--entrypoint`` replaces the Entrypoint and
drops the Cmd, ``--entrypoint ''`` clears it. The rule (runtime/entrypoint.py), the options
that carry it, the record that keeps it, and the CLI's refusal when nothing is left to run.
The in-VM run of each case is tests/vm/test_entrypoint_vm.py."""

from __future__ import annotations

import json

import pytest

from boxlite_core.errors import ConfigError
from boxlite_core.models import BoxOptions
from boxlite_core.runtime.entrypoint import default_argv
from boxlite_testing import runtime_doubles as doubles
from boxlite_testing.cli import boxlite
from boxlite_testing.runtime_doubles import make_runtime, opts

EP = ("/bin/server", "--flag")
CMD = ("serve", "--port", "80")


@pytest.mark.parametrize(
    ("image_ep", "image_cmd", "entrypoint", "cmd", "want"),
    [
        # the image alone
        (EP, (), None, None, [*EP]),
        ((), CMD, None, None, [*CMD]),
        (EP, CMD, None, None, [*EP, *CMD]),
        # arguments replace the Cmd, never the Entrypoint
        (EP, CMD, None, ("x", "y"), [*EP, "x", "y"]),
        ((), CMD, None, ("x",), ["x"]),
        (EP, (), None, ("x",), [*EP, "x"]),
        # --entrypoint X: the image's Cmd goes too (docker's reset), arguments follow X
        (EP, CMD, ("/bin/sh",), None, ["/bin/sh"]),
        (EP, CMD, ("/bin/sh",), ("-c", "echo"), ["/bin/sh", "-c", "echo"]),
        ((), CMD, ("/bin/sh",), None, ["/bin/sh"]),
        # one --entrypoint word is one program, never split
        (EP, CMD, ("/bin/my prog",), None, ["/bin/my prog"]),
        # --entrypoint '': cleared; only the arguments run
        (EP, CMD, (), ("ls", "-l"), ["ls", "-l"]),
        ((), (), (), ("true",), ["true"]),
    ],
)
def test_argv_composition(image_ep, image_cmd, entrypoint, cmd, want):
    assert default_argv(image_ep, image_cmd, entrypoint, cmd) == want


def test_image_with_neither_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"image img:1 has no Entrypoint or Cmd; give a comm"):
        default_argv((), (), None, None, image="img:1")


@pytest.mark.parametrize("image", [(EP, CMD), ((), ()), ((), CMD)])
def test_cleared_entrypoint_without_arguments_is_a_clear_error(image):
    """docker: `--entrypoint ''` with no arguments has nothing left (the Cmd was reset)."""
    with pytest.raises(ConfigError, match=r"--entrypoint '' cleared the Entrypoint of img:1"):
        default_argv(*image, (), None, image="img:1")


def test_options_take_lists_and_refuse_a_bare_string():
    options = BoxOptions(entrypoint=["/bin/sh", "-c"], cmd=["echo hi"])
    assert options.entrypoint == ("/bin/sh", "-c") and options.cmd == ("echo hi",)
    assert BoxOptions(entrypoint=[]).entrypoint == ()  # cleared, not unset
    assert BoxOptions(cmd=[]).cmd is None  # no arguments: the image's Cmd (docker)
    with pytest.raises(ConfigError, match=r"entrypoint='sh -c': give a list of arguments"):
        BoxOptions(entrypoint="sh -c")
    with pytest.raises(ConfigError, match=r"cmd=.*each argument must be a string without NUL"):
        BoxOptions(cmd=["a\0b"])
    with pytest.raises(ConfigError, match=r"cmd=.*each argument must be a string"):
        BoxOptions(cmd=[1])


@pytest.fixture
def images(tmp_path, monkeypatch):
    """A runtime (launch double: nothing boots) with four images: Entrypoint only, Cmd
    only, both, neither."""
    monkeypatch.setenv("BOXLITE_HOME", str(tmp_path / "home"))
    doubles.EVENTS.clear()
    runtime = make_runtime(tmp_path)
    configs = {
        "ep:1": {"Entrypoint": list(EP)},
        "cmd:1": {"Cmd": list(CMD)},
        "both:1": {"Entrypoint": list(EP), "Cmd": list(CMD)},
        "neither:1": {},
    }
    for name, config in configs.items():
        layout = doubles.make_oci_layout(tmp_path / name, {"bin/x": b"x"}, config)
        runtime.images.import_path(layout, name=name)
    yield runtime
    runtime.close()


@pytest.mark.parametrize(
    ("image", "options", "want"),
    [
        ("both:1", {}, [*EP, *CMD]),
        ("both:1", {"cmd": ["a"]}, [*EP, "a"]),
        ("both:1", {"entrypoint": ["/bin/sh"]}, ["/bin/sh"]),
        ("both:1", {"entrypoint": [], "cmd": ["ls"]}, ["ls"]),
        ("ep:1", {}, [*EP]),
        ("cmd:1", {"cmd": ["a"]}, ["a"]),
        ("neither:1", {"cmd": ["a"]}, ["a"]),
    ],
)
def test_the_record_keeps_the_command_across_runtimes(tmp_path, images, image, options, want):
    """What a restart needs is in the record: another Runtime on the same home (another
    process, a later start) composes the same argv."""
    box = images.create(opts(image=image, **options))
    assert box.default_command() == want
    with make_runtime(tmp_path) as again:
        assert again.get(box.id).default_command() == want
        stored = again.get(box.id).record.to_dict()["options"]
    assert stored["entrypoint"] == options.get("entrypoint")
    assert stored["cmd"] == (options.get("cmd") or None)


def test_a_box_from_a_snapshot_keeps_its_own_command():
    from boxlite_core.runtime.creation import options_from_snapshot

    class _Snap:
        name = "s1"
        options = BoxOptions(entrypoint=["/old"], cmd=["old"])

    mine = options_from_snapshot(BoxOptions(cmd=["new"]), _Snap())  # type: ignore[arg-type]
    assert (mine.entrypoint, mine.cmd) == (("/old",), ("new",))
    cleared = options_from_snapshot(BoxOptions(entrypoint=[]), _Snap())  # type: ignore[arg-type]
    assert (cleared.entrypoint, cleared.cmd) == ((), ("old",))
    kept = options_from_snapshot(BoxOptions(), _Snap())  # type: ignore[arg-type]
    assert (kept.entrypoint, kept.cmd) == (("/old",), ("old",))


def _import(home, tmp_path, name, config):
    layout = doubles.make_oci_layout(tmp_path / name.replace(":", "_"), {"bin/x": b"x"}, config)
    proc = boxlite("images", "import", str(layout), "--name", name, home=home)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize(
    ("config", "flags", "expect"),
    [
        ({}, [], "image neither:1 has no Entrypoint or Cmd"),
        ({"Entrypoint": list(EP), "Cmd": list(CMD)}, ["--entrypoint", ""],
         "--entrypoint '' cleared the Entrypoint of neither:1"),
    ],
)
def test_cli_run_with_nothing_to_run_fails_before_a_boot_and_leaves_no_box(
    tmp_path, config, flags, expect
):
    """One error line naming the fix, exit 2, and no record left behind (docker: "No
    command specified", no container)."""
    home = tmp_path / "home"
    _import(home, tmp_path, "neither:1", config)
    proc = boxlite("run", *flags, "neither:1", home=home)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("boxlite: error: "), proc.stderr
    assert expect in lines[0]
    listed = boxlite("ls", "-a", "--json", home=home)
    assert json.loads(listed.stdout) == []


def test_cli_create_records_the_entrypoint(tmp_path):
    home = tmp_path / "home"
    _import(home, tmp_path, "both:1", {"Entrypoint": list(EP), "Cmd": list(CMD)})
    made = boxlite("create", "--entrypoint", "/bin/sh", "--name", "c1", "both:1", home=home)
    assert made.returncode == 0, made.stderr
    cleared = boxlite("create", "--entrypoint", "", "--name", "c2", "both:1", home=home)
    assert cleared.returncode == 0, cleared.stderr
    shown = {}
    for name in ("c1", "c2"):
        proc = boxlite("inspect", name, home=home)
        assert proc.returncode == 0, proc.stderr
        shown[name] = json.loads(proc.stdout)["options"]["entrypoint"]
    assert shown == {"c1": ["/bin/sh"], "c2": []}
