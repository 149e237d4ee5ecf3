pytest_plugins = ["boxlite_conformance.plugin"]

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def backend_name() -> str:
    return "example-qemu"
