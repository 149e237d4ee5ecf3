"""Text the guest chose never reaches the user's terminal as control characters.

A boot failure's reason carries the guest's console tail, and agent errors carry details the
guest wrote; the guest is hostile, so an escape sequence in them (set the window title, rewrite
the screen, OSC 52 clipboard writes) must be printed inert. The record below is what a boot whose
console printed such sequences leaves behind (no VM: the backend double fails the start).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from boxlite_core.errors import EngineError
from boxlite_core.models import BoxStatus
from boxlite_testing import runtime_doubles as doubles
from boxlite_testing.cli import boxlite

#: OSC 0 (window title), OSC 52 (clipboard), CSI clear screen, a C1 CSI, a bidi override
HOSTILE = "boot\x1b]0;pwned\x07 \x1b]52;c;Y3VybCBldmlsfHNo\x07\x1b[2J\x9b1m \u202etxt.exe"


def test_guest_text_in_errors_and_listings_is_inert(tmp_path: Path) -> None:
    layout = doubles.make_oci_layout(tmp_path / "layout", {"bin/x": b"x"}, {"Cmd": ["/bin/x"]})
    rt = doubles.make_runtime(tmp_path)
    rt.images.import_path(layout, name=doubles.TINY)
    box = rt.create(doubles.opts(name="noisy"))
    with pytest.raises(EngineError):
        box.start()
    rt.store.set_status(box.id, BoxStatus.FAILED, error=f"guest_connect: console: {HOSTILE}")
    rt.close()
    home = tmp_path / "home"
    listing = boxlite("ls", "-a", home=home)
    refused = boxlite("exec", "noisy", "--", "true", home=home)
    assert refused.returncode != 0
    for out in (listing.stdout, refused.stderr):
        assert "noisy" in out or "boot" in out
        bad = [c for c in out if not c.isprintable() and c != "\n"]
        assert not bad, f"control characters reached the terminal: {bad!r} in {out!r}"
    assert "\\x1b]0;pwned\\x07" in refused.stderr and "\\u202e" in refused.stderr
