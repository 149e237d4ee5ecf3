"""An operation a backend does not offer fails as UnsupportedError, a BoxliteError that names
the backend and the fix, instead of a NotImplementedError from deep inside a handle."""

from __future__ import annotations

import os

import pytest

from boxlite_core.errors import BoxliteError, UnsupportedError
from boxlite_core.vmm.process import ProcessVmHandle


class _PlainHandle(ProcessVmHandle):
    """A one-process VM handle that, like most, does not override pause/resume."""


@pytest.mark.parametrize("operation", ["pause", "resume"])
def test_pause_without_the_capability_is_unsupported(operation: str) -> None:
    handle = _PlainHandle(os.getpid(), None)
    with pytest.raises(UnsupportedError) as info:
        getattr(handle, operation)()
    message = str(info.value)
    assert f"_PlainHandle (backend package {__name__.partition('.')[0]}) cannot {operation}" \
        in message, message
    assert "'pause' capability" in message and "boxlite backends" in message, message


def test_unsupported_is_a_boxlite_error_with_a_usage_exit_code() -> None:
    assert issubclass(UnsupportedError, BoxliteError)
    assert not issubclass(UnsupportedError, NotImplementedError)
    assert UnsupportedError.exit_code == 2
