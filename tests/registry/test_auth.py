"""Credentials: a real registry with htpasswd (Basic) auth, and a Bearer token double."""

from __future__ import annotations

import base64
import json

import pytest

from boxlite_core.errors import ImageError
from boxlite_core.images.registry import Credentials, RegistrySettings, pull
from boxlite_testing.registry import PASSWORD, USER, Pusher, build_image, index_rows, ref_rows
from boxlite_testing.registry_double import RegistryDouble


def _docker_config(dir_, host, user, password):
    dir_.mkdir(exist_ok=True)
    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    (dir_ / "config.json").write_text(json.dumps({"auths": {host: {"auth": auth}}}))
    return dir_


@pytest.fixture(scope="module")
def private_image(auth_registry):
    img = build_image([{"secret/data": b"only for boxuser\n"}])
    Pusher(auth_registry.url, auth=(USER, PASSWORD)).image("team/private", "v1", img)
    return img


def test_401_without_credentials_is_clear(auth_registry, private_image, store, no_docker_config):
    settings = RegistrySettings.load(
        None, env={"DOCKER_CONFIG": str(no_docker_config)}, insecure=[auth_registry.host]
    )
    with pytest.raises(ImageError) as err:
        pull(store, f"{auth_registry.host}/team/private:v1", settings=settings)
    msg = str(err.value)
    assert msg.startswith(f"401 from {auth_registry.host} for team/private: no credentials")
    assert f"docker login {auth_registry.host}" in msg and "DOCKER_CONFIG" in msg
    assert index_rows(store) == [] and ref_rows(store) == []


def test_credentials_from_docker_config(auth_registry, private_image, store, tmp_path):
    cfg = _docker_config(tmp_path / "docker", auth_registry.host, USER, PASSWORD)
    settings = RegistrySettings.load(
        None, env={"DOCKER_CONFIG": str(cfg)}, insecure=[auth_registry.host]
    )
    image = pull(store, f"{auth_registry.host}/team/private:v1", settings=settings)
    assert image.digest == private_image.digest


def test_wrong_credentials_rejected(auth_registry, private_image, store, tmp_path):
    cfg = _docker_config(tmp_path / "docker", f"http://{auth_registry.host}", USER, "Pa55-nope")
    settings = RegistrySettings.load(
        None, env={"DOCKER_CONFIG": str(cfg)}, insecure=[auth_registry.host]
    )
    with pytest.raises(ImageError) as err:
        pull(store, f"{auth_registry.host}/team/private:v1", settings=settings)
    assert "were not accepted" in str(err.value) and USER in str(err.value)
    assert "Pa55-nope" not in str(err.value)  # never the password
    assert index_rows(store) == []


def test_explicit_credentials_win(auth_registry, private_image, store, no_docker_config):
    settings = RegistrySettings.load(
        None,
        env={"DOCKER_CONFIG": str(no_docker_config)},
        insecure=[auth_registry.host],
        credentials={auth_registry.host: Credentials(USER, PASSWORD)},
    )
    assert pull(store, f"{auth_registry.host}/team/private:v1", settings=settings).digest \
        == private_image.digest


@pytest.fixture
def bearer_double():
    double = RegistryDouble()
    double.bearer = ("tokuser", "tokpw")
    yield double
    double.stop()


def test_bearer_token_flow_double(bearer_double, store, tmp_path, no_docker_config):
    img = build_image([{"bearer": b"token protected"}])
    bearer_double.add_image("library/hello", "v1", img)
    ref = f"{bearer_double.host}/library/hello:v1"
    anon = RegistrySettings.load(
        None, env={"DOCKER_CONFIG": str(no_docker_config)}, insecure=[bearer_double.host]
    )
    with pytest.raises(ImageError, match=r"401 .*no credentials and anonymous access is refused"):
        pull(store, ref, settings=anon)
    assert index_rows(store) == []
    cfg = _docker_config(tmp_path / "docker", bearer_double.host, "tokuser", "tokpw")
    settings = RegistrySettings.load(
        None, env={"DOCKER_CONFIG": str(cfg)}, insecure=[bearer_double.host]
    )
    assert pull(store, ref, settings=settings).digest == img.digest
    last = bearer_double.token_requests[-1]
    assert last == {"service": "double", "scope": "repository:library/hello:pull"}
    # one token served the manifest and every blob
    assert len(bearer_double.token_requests) == 2
