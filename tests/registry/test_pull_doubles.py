"""Registry behaviour the real registry will not produce: a double on 127.0.0.1 serves it."""

from __future__ import annotations

import pytest

from boxlite_core.errors import ImageError
from boxlite_core.images.registry import RegistrySettings, pull
from boxlite_testing.registry import build_image, index_rows, ref_rows, sha
from boxlite_testing.registry_double import RegistryDouble


@pytest.fixture
def double():
    d = RegistryDouble()
    yield d
    d.stop()


@pytest.fixture
def settings(double, no_docker_config):
    return RegistrySettings.load(
        None, env={"DOCKER_CONFIG": str(no_docker_config)}, insecure=[double.host]
    )


def test_wrong_blob_digest_double(double, settings, store):
    img = build_image([{"good": b"good layer"}, {"bad": b"this layer will be swapped"}])
    double.add_image("library/hello", "v1", img)
    bad = sha(img.layers[1])
    tampered = bytearray(img.layers[1])
    tampered[-5] ^= 0xFF  # same size, different bytes
    double.blobs[bad] = bytes(tampered)
    with pytest.raises(ImageError) as err:
        pull(store, f"{double.host}/library/hello:v1", settings=settings)
    msg = str(err.value)
    assert bad in msg and "does not match its digest" in msg and double.host in msg
    assert index_rows(store) == [] and ref_rows(store) == []
    assert not store.blobs.exists(bad)
    assert list(store.blobs.tmp.iterdir()) == []  # no half-written temp file either


def test_blob_longer_than_descriptor_double(double, settings, store):
    img = build_image([{"a": b"a"}])
    double.add_image("library/hello", "v1", img)
    double.blobs[sha(img.layers[0])] = img.layers[0] + b"extra"
    with pytest.raises(ImageError, match="larger than the"):
        pull(store, f"{double.host}/library/hello:v1", settings=settings)
    assert index_rows(store) == []


def test_manifest_digest_mismatch_double(double, settings, store):
    img = build_image([{"a": b"a"}])
    double.add_image("library/hello", "v1", img)
    other = build_image([{"b": b"b"}])
    double.manifests[f"library/hello/{img.digest}"] = (other.manifest, other.manifest_type)
    with pytest.raises(ImageError, match=r"not the .* asked for"):
        pull(store, f"{double.host}/library/hello@{img.digest}", settings=settings)
    assert index_rows(store) == []


def test_broken_download_resumes_with_range_double(double, settings, store):
    img = build_image([{"big": bytes(range(256)) * 4096}], compress=0)
    double.add_image("library/hello", "v1", img)
    layer = sha(img.layers[0])
    double.break_once.add(layer)
    image = pull(store, f"{double.host}/library/hello:v1", settings=settings)
    assert image.digest == img.digest
    ranges = [r for path, r in double.requests if path.endswith(layer)]
    assert ranges[0] == "" and ranges[1].startswith("bytes=") and ranges[1] != "bytes=0-"
    assert store.blobs.read_bytes(layer) == img.layers[0]


def test_mirror_serving_bad_blob_falls_back_double(double, registry, pusher, store,
                                                   no_docker_config):
    img = build_image([{"m": b"mirror is corrupt"}])
    pusher.image("library/mirrortest", "v1", img)
    double.add_image("library/mirrortest", "v1", img)
    double.blobs[sha(img.layers[0])] = b"x" * len(img.layers[0])
    env = {"BOXLITE_REGISTRY_MIRRORS": f"{registry.host}={double.url}",
           "BOXLITE_INSECURE_REGISTRIES": registry.host, "DOCKER_CONFIG": str(no_docker_config)}
    image = pull(store, f"{registry.host}/library/mirrortest:v1",
                 settings=RegistrySettings.load(None, env=env))
    assert image.digest == img.digest
    assert store.blobs.read_bytes(sha(img.layers[0])) == img.layers[0]
