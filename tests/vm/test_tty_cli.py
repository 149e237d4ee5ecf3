"""`run -it` / `exec -it` on a real terminal (tmux) against real boxes: sizes and resizes,
^C reaching the box, exit codes, full-screen programs, detach, and the host terminal restored
on every way out (exit, the box killed, SIGTERM to the CLI)."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest

from boxlite_core.models import BoxOptions
from boxlite_testing.homes import unique
from boxlite_testing.orphans import command_lines
from boxlite_testing.tmux import TmuxTerminal, tmux_missing

pytestmark = [pytest.mark.vm,
              pytest.mark.skipif(tmux_missing() is not None, reason=str(tmux_missing()))]

BOX_PROMPT = "BOX> "


@pytest.fixture
def term(tmp_path, vm_home):
    """A tmux terminal whose shell has `bl` = this tree's boxlite on the test home."""
    wrapper = tmp_path / "bl"
    wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} -m boxlite_core.cli.main "$@"\n')
    wrapper.chmod(0o755)
    env = {"BOXLITE_HOME": str(vm_home), "PATH": f"{tmp_path}:{os.environ['PATH']}",
           "PS1_BOX": BOX_PROMPT}
    if os.environ.get("PYTHONPATH"):
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    t = TmuxTerminal(tmp_path, env=env)
    yield t
    t.close()


@pytest.fixture
def tty_box(runtime):
    box = runtime.create(BoxOptions(image="busybox", name=unique("tty"), memory_mib=256))
    box.start()
    yield box
    runtime.remove(box.id, force=True)


def _exec_shell(term: TmuxTerminal, box, tmp: Path, extra: str = "") -> None:
    """`bl exec -it BOX sh` between two `stty -a` snapshots; then EXIT=<code>."""
    term.type(f"stty -a > {tmp}/before; bl exec -it {extra}-e PS1=\"$PS1_BOX\" {box.name} sh;"
              f" echo EXIT=$?; stty -a > {tmp}/after")
    term.wait_for(BOX_PROMPT)


def _ended(term: TmuxTerminal, tmp: Path, timeout: float = 60) -> int:
    """The code the CLI exited with; asserts the host terminal's settings are as before."""
    deadline = time.monotonic() + timeout
    while not re.findall(r"EXIT=(\d+)", screen := term.screen()):  # not the typed "EXIT=$?"
        assert time.monotonic() < deadline, f"the CLI did not end; screen:\n{screen}"
        time.sleep(0.1)
    code = int(re.findall(r"EXIT=(\d+)", screen)[-1])
    for _ in range(50):
        if (tmp / "after").exists() and (tmp / "after").read_text():
            break
        time.sleep(0.1)
    # the first line holds the window size, which a test may have changed on purpose
    after = (tmp / "after").read_text().splitlines()[1:]
    assert after == (tmp / "before").read_text().splitlines()[1:], "terminal not restored"
    return code


def test_size_resize_ctrl_c_and_exit_code(term, tty_box, tmp_path):
    _exec_shell(term, tty_box, tmp_path)
    term.type("stty size")
    term.wait_for("30 100")
    term.resize(120, 40)
    time.sleep(0.5)
    term.type("stty size")
    term.wait_for("40 120")
    # ^C interrupts the job in the box; the shell there (and the CLI) live on
    term.type("sleep 100; echo after-sleep")
    time.sleep(1.0)
    started = time.monotonic()
    term.key("C-c")
    term.wait_for(BOX_PROMPT, 15, count=4)
    assert time.monotonic() - started < 10
    term.type("echo alive-$((40+2))")
    screen = term.wait_for("alive-42")
    assert "after-sleep" not in screen.replace("echo after-sleep", "")
    term.type("exit 3")
    assert _ended(term, tmp_path) == 3


def test_full_screen_editor_draws_and_exits_cleanly(term, tty_box, tmp_path):
    _exec_shell(term, tty_box, tmp_path)
    term.type("vi /tmp/note.txt")
    term.wait_for("/tmp/note.txt")  # vi's status line
    screen = term.wait_for("~")
    assert screen.count("~") >= 20  # empty lines drawn down the whole window
    term.type("ihello from vi", enter=False)
    term.key("Escape")
    time.sleep(1.0)  # vi reads ESC + a quick next key as one escape sequence (Alt-key)
    term.type(":wq")
    term.wait_for(BOX_PROMPT, count=2)
    term.type("cat /tmp/note.txt; exit")
    assert _ended(term, tmp_path) == 0
    assert tty_box.exec(["cat", "/tmp/note.txt"]).stdout == b"hello from vi\n"


def test_a_megabyte_through_the_cli_terminal_is_intact(term, tty_box, tmp_path):
    tty_box.exec(["sh", "-c", "head -c 1048576 /dev/urandom > /tmp/blob"])
    want = tty_box.exec(["sha256sum", "/tmp/blob"]).stdout.split()[0].decode()
    out = tmp_path / "out.bin"
    term.type(f"stty -a > {tmp_path}/before; bl exec -it {tty_box.name} "
              f"sh -c 'stty -opost; cat /tmp/blob' > {out}; echo EXIT=$?; "
              f"stty -a > {tmp_path}/after")
    assert _ended(term, tmp_path, timeout=120) == 0
    data = out.read_bytes()
    assert len(data) == 1048576 and hashlib.sha256(data).hexdigest() == want


def test_detach_leaves_the_command_running(term, tty_box, tmp_path):
    term.type(f"stty -a > {tmp_path}/before; bl exec -it {tty_box.name} "
              "sh -c 'echo started-$((40+2)); sleep 4; touch /tmp/after-detach'; echo EXIT=$?; "
              f"stty -a > {tmp_path}/after")
    term.wait_for("started-42")  # the output, not the typed command line
    term.key("C-p", "C-q")
    assert _ended(term, tmp_path) == 0
    assert "detached" in term.screen()
    assert tty_box.exec(["test", "-e", "/tmp/after-detach"]).exit_code == 1  # still sleeping
    deadline = time.monotonic() + 30
    while tty_box.exec(["test", "-e", "/tmp/after-detach"]).exit_code != 0:
        assert time.monotonic() < deadline, "the detached command did not go on"
        time.sleep(0.5)


def test_box_killed_during_a_session(term, runtime, tmp_path):
    box = runtime.create(BoxOptions(image="busybox", name=unique("ttykill"), memory_mib=256))
    box.start()
    try:
        _exec_shell(term, box, tmp_path)
        box.kill()
        code = _ended(term, tmp_path)
        assert code != 0
        screen = term.screen()
        errors = [line for line in screen.splitlines() if line.startswith("boxlite: ")]
        assert len(errors) == 1 and box.name in errors[0], screen
    finally:
        runtime.remove(box.id, force=True)


def test_sigterm_to_the_cli_restores_the_terminal(term, tty_box, tmp_path):
    _exec_shell(term, tty_box, tmp_path)
    pids = [pid for pid, argv in command_lines() if b"boxlite_core.cli.main" in argv
            and b"exec" in argv and tty_box.name.encode() in argv]
    assert len(pids) == 1, pids
    os.kill(pids[0], signal.SIGTERM)
    assert _ended(term, tmp_path) == 128 + signal.SIGTERM


def test_run_it_rm(term, runtime, tmp_path):
    name = unique("ttyrun")
    term.type(f"stty -a > {tmp_path}/before; bl run --rm -it --name {name} "
              f"-e PS1=\"$PS1_BOX\" busybox sh; echo EXIT=$?; stty -a > {tmp_path}/after")
    term.wait_for(BOX_PROMPT, timeout=300)
    term.type("tty; exit 5")
    assert _ended(term, tmp_path) == 5
    assert "/dev/pts/" in term.screen()
    assert name not in {b.name for b in runtime.list()}
