from __future__ import annotations

import pytest

from boxlite_testing import runtime_doubles as doubles
from boxlite_testing.runtime_doubles import TINY, make_runtime


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    monkeypatch.setenv("BOXLITE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("BOXLITE_PLUGINS", raising=False)
    doubles.EVENTS.clear()


@pytest.fixture
def rt(tmp_path):
    runtime = make_runtime(tmp_path)
    layout = doubles.make_oci_layout(
        tmp_path / "layout",
        {"bin/hello": b"#!/bin/sh\necho hi\n"},
        {
            "Env": ["PATH=/bin", "FOO=image"],
            "Cmd": ["/bin/hello"],
            "WorkingDir": "/srv",
            "User": "nobody",
        },
    )
    runtime.images.import_path(layout, name=TINY)
    yield runtime
    runtime.close()
