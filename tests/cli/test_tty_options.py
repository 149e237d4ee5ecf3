"""`-t` before any box exists: no terminal on stdin is one clear error and no box; the
detach keys and raw mode of cli/attach.py on a real pty of this host."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import termios

import pytest

from boxlite_core.cli.attach import DETACH_KEYS, DetachFilter, raw_mode
from boxlite_core.errors import ConfigError
from boxlite_core.runtime.boxexec import check_size
from boxlite_testing.cli import BOXLITE, boxlite_env


@pytest.mark.parametrize("args", [["exec", "-it", "somebox", "sh"],
                                  ["run", "-it", "--name", "never", "busybox", "sh"],
                                  ["run", "--rm", "-ti", "busybox"]])
def test_it_without_a_terminal_is_one_clear_error_and_no_box(tmp_path, args):
    proc = subprocess.run([*BOXLITE, *args], env=boxlite_env(tmp_path), stdin=subprocess.PIPE,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("boxlite: error: "), proc.stderr
    assert "the input device is not a TTY" in lines[0] and "drop -t" in lines[0]
    listed = subprocess.run([*BOXLITE, "ls", "-a", "--json"], env=boxlite_env(tmp_path),
                            capture_output=True, text=True, timeout=60)
    assert json.loads(listed.stdout) == []


@pytest.mark.parametrize(
    ("typed", "sent", "detach"),
    [
        ([b"ls\r"], b"ls\r", False),
        ([b"\x10\x11"], b"", True),
        ([b"ab\x10\x11cd"], b"ab", True),
        ([b"a\x10", b"\x11"], b"a", True),       # the sequence split across reads
        ([b"a\x10", b"b"], b"a\x10b", False),    # ^P not followed by ^Q: both go through
        ([b"\x10\x10\x11"], b"\x10", True),
        ([b"\x03"], b"\x03", False),             # ^C is a key like any other
    ],
)
def test_detach_keys(typed, sent, detach):
    keys = DetachFilter(DETACH_KEYS)
    out, detached = b"", False
    for chunk in typed:
        data, detached = keys.feed(chunk)
        out += data
        if detached:
            break
    assert (out, detached) == (sent, detach)


def test_detach_can_be_turned_off():
    assert DetachFilter(b"").feed(b"\x10\x11") == (b"\x10\x11", False)


def test_raw_mode_is_restored_on_every_way_out():
    master, slave = pty.openpty()
    try:
        before = termios.tcgetattr(slave)
        with raw_mode(slave):
            during = termios.tcgetattr(slave)
            assert not during[3] & (termios.ECHO | termios.ICANON | termios.ISIG)
        assert termios.tcgetattr(slave) == before
        with pytest.raises(RuntimeError), raw_mode(slave):
            raise RuntimeError("the box died")
        assert termios.tcgetattr(slave) == before
    finally:
        os.close(master)
        os.close(slave)


@pytest.mark.parametrize("bad", [(0, 80), (24, 0), (24, 65536), (24,), "24x80", (24.0, 80),
                                 (True, 80), None])
def test_bad_terminal_sizes_name_the_value(bad):
    with pytest.raises(ConfigError, match=r"^size="):
        check_size(bad)


def test_good_terminal_sizes():
    assert check_size((24, 80)) == (24, 80)
    assert check_size([1, 65535]) == (1, 65535)
