"""Fixtures for the registry tests: a real registry on 127.0.0.1 (with and without a
password), the push side, and settings that ignore the developer's own docker config.

``home``/``store`` come from boxlite_testing.plugin; the registry helpers and the in-test
registry double from boxlite_testing.registry / .registry_double.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from boxlite_core.images.registry import RegistrySettings
from boxlite_testing.registry import (
    PASSWORD,
    REGISTRY_BIN,
    USER,
    LocalRegistry,
    Pusher,
    make_htpasswd,
)


def _need_registry() -> None:
    if not Path(REGISTRY_BIN).exists():
        pytest.skip("docker-registry not installed (apt-get install docker-registry)")


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    _need_registry()
    reg = LocalRegistry(tmp_path_factory.mktemp("registry"))
    yield reg
    reg.stop()


@pytest.fixture(scope="module")
def auth_registry(tmp_path_factory):
    _need_registry()
    work = tmp_path_factory.mktemp("authreg")
    make_htpasswd(work / "htpasswd", USER, PASSWORD)
    reg = LocalRegistry(work / "reg", htpasswd=work / "htpasswd")
    yield reg
    reg.stop()


@pytest.fixture
def pusher(registry):
    return Pusher(registry.url)


@pytest.fixture
def no_docker_config(tmp_path: Path) -> Path:
    """An empty DOCKER_CONFIG dir, so the developer's own ~/.docker never leaks into a test."""
    path = tmp_path / "docker-empty"
    path.mkdir()
    return path


@pytest.fixture
def insecure(registry, no_docker_config) -> RegistrySettings:
    return RegistrySettings.load(
        None, env={"DOCKER_CONFIG": str(no_docker_config)}, insecure=[registry.host]
    )
