"""Reference parsing and settings: pure functions, no network."""

from __future__ import annotations

import base64
import json

import pytest

from boxlite_core.errors import ConfigError, ImageError
from boxlite_core.images.registry import (
    Platform,
    RegistrySettings,
    looks_like_registry_reference,
    parse_reference,
    select_manifest,
)
from boxlite_core.images.registry.client import parse_challenge

D = "sha256:" + "a" * 64


@pytest.mark.parametrize(
    ("text", "registry", "repo", "tag", "digest", "store_name"),
    [
        ("busybox", "docker.io", "library/busybox", "latest", None, "busybox:latest"),
        ("busybox:1.36", "docker.io", "library/busybox", "1.36", None, "busybox:1.36"),
        ("docker.io/library/alpine", "docker.io", "library/alpine", "latest", None,
         "alpine:latest"),
        ("index.docker.io/foo/bar:x", "docker.io", "foo/bar", "x", None, "foo/bar:x"),
        ("foo/bar", "docker.io", "foo/bar", "latest", None, "foo/bar:latest"),
        ("127.0.0.1:5000/x", "127.0.0.1:5000", "x", "latest", None, "127.0.0.1:5000/x:latest"),
        ("localhost/a/b:t", "localhost", "a/b", "t", None, "localhost/a/b:t"),
        ("ghcr.io/o/r:v1", "ghcr.io", "o/r", "v1", None, "ghcr.io/o/r:v1"),
        (f"busybox@{D}", "docker.io", "library/busybox", None, D, f"busybox@{D}"),
        (f"reg.io:443/a:t@{D}", "reg.io:443", "a", "t", D, f"reg.io:443/a@{D}"),
    ],
)
def test_parse_reference(text, registry, repo, tag, digest, store_name):
    ref = parse_reference(text)
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == (registry, repo, tag, digest)
    assert ref.store_name == store_name
    assert ref.target == (digest or tag)


def test_docker_hub_api_host():
    assert parse_reference("busybox").api_host == "registry-1.docker.io"
    assert parse_reference("127.0.0.1:5000/x").api_host == "127.0.0.1:5000"


@pytest.mark.parametrize(
    "bad", ["", "UPPER/case", "a b", "x@sha256:short", "x:bad tag", "a//b", "-x", "x:" + "t" * 200]
)
def test_parse_reference_rejects(bad):
    with pytest.raises(ConfigError, match="image reference"):
        parse_reference(bad)


def test_looks_like_registry_reference():
    assert looks_like_registry_reference("127.0.0.1:5000/x:1")
    assert looks_like_registry_reference("alpine")
    assert not looks_like_registry_reference("0123abcd")  # a short image id
    assert not looks_like_registry_reference(D)
    assert not looks_like_registry_reference("NOT VALID")


def test_parse_challenge():
    scheme, params = parse_challenge(
        'Bearer realm="https://auth.example/token",service="registry.example",'
        'scope="repository:library/x:pull"'
    )
    assert scheme == "bearer"
    assert params == {
        "realm": "https://auth.example/token",
        "service": "registry.example",
        "scope": "repository:library/x:pull",
    }
    assert parse_challenge('Basic realm="r"') == ("basic", {"realm": "r"})


def test_settings_env_and_file(tmp_path):
    (tmp_path / "registries.toml").write_text(
        'insecure = ["10.0.0.1:5000"]\n[mirrors]\n"docker.io" = ["https://m.example"]\n'
        '[auth."10.0.0.1:5000"]\nusername = "u"\npassword = "p"\n'
    )
    env = {
        "BOXLITE_REGISTRY_MIRRORS": "docker.io=http://127.0.0.1:5001,quay.io=http://127.0.0.1:5002",
        "BOXLITE_INSECURE_REGISTRIES": "127.0.0.1:5000",
        "DOCKER_CONFIG": str(tmp_path / "nodocker"),
    }
    s = RegistrySettings.load(tmp_path, env=env)
    assert s.mirrors_for("docker.io") == ("http://127.0.0.1:5001", "https://m.example")
    assert s.mirrors_for("index.docker.io") == s.mirrors_for("docker.io")
    assert s.mirrors_for("quay.io") == ("http://127.0.0.1:5002",)
    assert s.is_insecure("127.0.0.1:5000") and s.is_insecure("10.0.0.1:5000")
    assert not s.is_insecure("127.0.0.1:5001")
    cred = s.credentials_for("10.0.0.1:5000")
    assert cred is not None and (cred.username, cred.password) == ("u", "p")
    with pytest.raises(ConfigError, match="HOST=URL"):
        RegistrySettings.load(None, env={"BOXLITE_REGISTRY_MIRRORS": "nonsense"})
    with pytest.raises(ConfigError, match="http"):
        RegistrySettings.load(None, env={"BOXLITE_REGISTRY_MIRRORS": "docker.io=ftp://x"})


def test_docker_config_credentials(tmp_path):
    auth = base64.b64encode(b"alice:pw:with:colons").decode()
    (tmp_path / "config.json").write_text(json.dumps({"auths": {
        "https://index.docker.io/v1/": {"auth": auth},
        "127.0.0.1:5000": {"auth": base64.b64encode(b"bob:x").decode()},
    }}))
    s = RegistrySettings.load(None, env={"DOCKER_CONFIG": str(tmp_path)})
    hub = s.credentials_for("docker.io")
    assert hub is not None and (hub.username, hub.password) == ("alice", "pw:with:colons")
    assert s.credentials_for("127.0.0.1:5000").username == "bob"
    assert s.credentials_for("127.0.0.1:5001") is None


def test_select_manifest_platforms():
    def entry(arch, variant=""):
        plat = {"os": "linux", "architecture": arch}
        if variant:
            plat["variant"] = variant
        return {"digest": "sha256:" + arch[0] * 64, "platform": plat}

    index = {"manifests": [entry("arm", "v7"), entry("arm64", "v8"), entry("amd64")]}
    assert select_manifest(index, Platform("linux", "amd64"), "x")["platform"]["architecture"] \
        == "amd64"
    assert select_manifest(index, Platform.parse("linux/arm64"), "x")["platform"]["variant"] \
        == "v8"
    with pytest.raises(ImageError, match=r"no image for linux/s390x.*linux/amd64, linux/arm/v7"):
        select_manifest(index, Platform("linux", "s390x"), "x")
    with pytest.raises(ConfigError):
        Platform.parse("amd64")
