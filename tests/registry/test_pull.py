"""Pulls from a real registry (Debian's docker-registry) on 127.0.0.1."""

from __future__ import annotations

import json

import pytest

from boxlite_core.errors import ImageError, NotFoundError
from boxlite_core.images.model import Image
from boxlite_core.images.oci import host_arch
from boxlite_core.images.registry import RegistrySettings, ensure_image, pull
from boxlite_testing.registry import build_image, index_rows, ref_rows, sha


class Recorder:
    def __init__(self):
        self.events = []

    def start(self, key, label, total):
        self.events.append(("start", key, total))

    def advance(self, key, n):
        pass

    def done(self, key, note):
        self.events.append(("done", key, note))


@pytest.mark.parametrize("docker", [False, True], ids=["oci", "docker-v2"])
def test_push_then_pull_same_digest(registry, pusher, store, insecure, docker):
    img = build_image(
        [{"bin/sh": b"#!fake shell\n"}, {"etc/hello": b"hello from the registry\n"}],
        docker=docker,
    )
    repo = "library/tiny-docker" if docker else "library/tiny"
    assert pusher.image(repo, "v1", img) == img.digest
    ref = f"{registry.host}/{repo}:v1"

    image = pull(store, ref, settings=insecure)

    assert isinstance(image, Image)
    assert image.digest == img.digest
    assert image.reference == ref
    assert image.config_digest == sha(img.config)
    assert [layer.digest for layer in image.layers] == [sha(b) for b in img.layers]
    assert image.config.cmd == ("/bin/sh",)
    assert store.get(ref).digest == img.digest
    for digest, data in img.blobs().items():
        assert store.blobs.read_bytes(digest) == data
    assert store.blobs.read_bytes(img.digest) == img.manifest
    # pinned by digest: found again by the same name
    pinned = f"{registry.host}/{repo}@{img.digest}"
    assert pull(store, pinned, settings=insecure).digest == img.digest
    assert store.get(pinned).digest == img.digest


def test_second_pull_skips_present_blobs(registry, pusher, store, insecure):
    base = {"bin/sh": b"base layer\n" * 100}
    one = build_image([base, {"a": b"1"}])
    two = build_image([base, {"b": b"2"}])
    pusher.image("library/shared", "one", one)
    pusher.image("library/shared", "two", two)
    pull(store, f"{registry.host}/library/shared:one", settings=insecure)
    rec = Recorder()
    pull(store, f"{registry.host}/library/shared:two", settings=insecure, progress=rec)
    done = {key: note for kind, key, note in rec.events if kind == "done"}
    assert done[sha(two.layers[0])] == "already present"
    assert done[sha(two.layers[1])] == "done"
    assert ("start", sha(two.layers[0]), len(two.layers[0])) not in rec.events


def test_index_picks_host_platform(registry, pusher, store, insecure):
    amd = build_image([{"arch": b"amd64"}], arch="amd64")
    arm = build_image([{"arch": b"arm64"}], arch="arm64")
    pusher.index("library/multi", "latest", [(arm, "arm64"), (amd, "amd64")])
    image = pull(store, f"{registry.host}/library/multi", settings=insecure)
    want = amd if host_arch() == "amd64" else arm
    assert image.digest == want.digest
    assert store.get(f"{registry.host}/library/multi:latest").digest == want.digest
    # an explicit platform wins over the host's
    other = pull(store, f"{registry.host}/library/multi", settings=insecure, platform="linux/arm64"
                 if host_arch() == "amd64" else "linux/amd64")
    assert other.digest != want.digest


def test_index_without_our_platform_fails_and_indexes_nothing(registry, pusher, store, insecure):
    arm = build_image([{"arch": b"arm64 only"}], arch="arm64")
    s390 = build_image([{"arch": b"s390x"}], arch="s390x")
    pusher.index("library/armonly", "latest", [(arm, "arm64"), (s390, "s390x")])
    with pytest.raises(ImageError) as err:
        pull(store, f"{registry.host}/library/armonly", settings=insecure, platform="linux/amd64")
    msg = str(err.value)
    assert f"{registry.host}/library/armonly" in msg
    assert "no image for linux/amd64" in msg and "linux/arm64, linux/s390x" in msg
    assert "--platform" in msg
    assert index_rows(store) == [] and ref_rows(store) == []
    assert not store.blobs.exists(sha(arm.layers[0]))


def test_single_manifest_for_other_arch_refused(registry, pusher, store, insecure):
    arm = build_image([{"x": b"arm"}], arch="arm64")
    pusher.image("library/armsingle", "v1", arm)
    with pytest.raises(ImageError, match="linux/arm64 image, not linux/amd64"):
        pull(store, f"{registry.host}/library/armsingle:v1", settings=insecure,
             platform="linux/amd64")
    assert index_rows(store) == []


def test_unknown_tag_is_clear(registry, store, insecure):
    with pytest.raises(ImageError, match=r"127\.0\.0\.1:\d+ has no library/nope/manifests/v9"):
        pull(store, f"{registry.host}/library/nope:v9", settings=insecure)
    assert index_rows(store) == []


def test_insecure_refused_unless_configured(registry, pusher, store, no_docker_config):
    img = build_image([{"x": b"insecure"}])
    pusher.image("library/plain", "v1", img)
    ref = f"{registry.host}/library/plain:v1"
    env = {"DOCKER_CONFIG": str(no_docker_config)}
    with pytest.raises(ImageError) as err:
        pull(store, ref, settings=RegistrySettings.load(None, env=env))
    assert "TLS" in str(err.value) and "--insecure" in str(err.value)
    assert registry.host in str(err.value)
    assert index_rows(store) == []
    # configured through the environment variable…
    env_ok = {**env, "BOXLITE_INSECURE_REGISTRIES": f"10.9.9.9:1,{registry.host}"}
    assert pull(store, ref, settings=RegistrySettings.load(None, env=env_ok)).digest == img.digest
    # …or per pull (the CLI's --insecure)
    assert pull(store, ref, settings=RegistrySettings.load(None, env=env), insecure=True).digest \
        == img.digest


def test_mirror_tried_first_for_docker_hub(registry, pusher, store, no_docker_config):
    img = build_image([{"hub": b"mirrored"}])
    pusher.image("library/mirrored", "1.0", img)
    env = {"BOXLITE_REGISTRY_MIRRORS": f"docker.io={registry.url}",
           "DOCKER_CONFIG": str(no_docker_config)}
    image = pull(store, "mirrored:1.0", settings=RegistrySettings.load(None, env=env))
    assert image.digest == img.digest
    assert store.get("mirrored:1.0").digest == img.digest
    assert store.get("docker.io/library/mirrored:1.0").digest == img.digest


def test_dead_mirror_falls_back_to_origin(registry, pusher, store, no_docker_config):
    from boxlite_testing.registry import free_port

    img = build_image([{"fallback": b"origin"}])
    pusher.image("library/fallback", "v1", img)
    dead = f"http://127.0.0.1:{free_port()}"
    env = {"BOXLITE_REGISTRY_MIRRORS": f"{registry.host}={dead}",
           "BOXLITE_INSECURE_REGISTRIES": registry.host, "DOCKER_CONFIG": str(no_docker_config)}
    image = pull(store, f"{registry.host}/library/fallback:v1",
                 settings=RegistrySettings.load(None, env=env))
    assert image.digest == img.digest


def test_ensure_image_pulls_only_when_missing(
    registry, pusher, store, insecure, no_docker_config, monkeypatch
):
    monkeypatch.setenv("BOXLITE_PULL", "missing")
    img = build_image([{"ensure": b"me"}])
    pusher.image("library/ensure", "v1", img)
    ref = f"{registry.host}/library/ensure:v1"
    with pytest.raises(NotFoundError):
        ensure_image(store, ref, pull=False)
    assert ensure_image(store, ref, settings=insecure).digest == img.digest
    # now local: settings that could not reach the registry (https) are never used
    https_only = RegistrySettings.load(None, env={"DOCKER_CONFIG": str(no_docker_config)})
    assert ensure_image(store, ref, settings=https_only).digest == img.digest
    with pytest.raises(NotFoundError):
        ensure_image(store, "0123abcd")  # an id, never sent to a registry
    with pytest.raises(NotFoundError):
        ensure_image(store, "Bad Name")  # not pullable: stays a plain "not found"


def test_pulled_image_unpacks_as_rootfs(registry, pusher, store, insecure, tmp_path):
    """The pulled image is an ordinary store image: the layer code applies it."""
    from boxlite_core.images.layers import apply_layer

    img = build_image([{"bin/sh": b"shell"}, {"etc/motd": b"pulled\n"}])
    pusher.image("library/unpack", "v1", img)
    image = pull(store, f"{registry.host}/library/unpack:v1", settings=insecure)
    root = tmp_path / "root"
    root.mkdir()
    for layer in image.layers:
        apply_layer(store.layer_blob(layer), layer.media_type, root)
    assert (root / "etc/motd").read_bytes() == b"pulled\n"
    assert json.loads(store.blobs.read_bytes(image.config_digest))["os"] == "linux"
