from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from registry_helpers import REGISTRY_BIN, LocalRegistry, Pusher, make_htpasswd

from boxlite_core.images.registry import RegistrySettings
from boxlite_core.images.store import ImageStore
from boxlite_core.state.db import Database

USER, PASSWORD = "boxuser", "s3cret-pw"


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
def home(tmp_path: Path) -> Path:
    path = tmp_path / "home"
    path.mkdir()
    return path


@pytest.fixture
def store(home: Path) -> ImageStore:
    return ImageStore(home, Database(home / "boxlite.db"))


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
