"""`boxlite pull`, `boxlite images export`, `boxlite images prune` as a user runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from boxlite_testing.registry import build_image


def boxlite(*args, home, env=None):
    full = {k: v for k, v in os.environ.items() if not k.startswith("BOXLITE_")}
    full.update({"BOXLITE_HOME": str(home), **(env or {})})
    return subprocess.run(
        [sys.executable, "-m", "boxlite_core.cli.main", *args],
        capture_output=True, text=True, env=full, timeout=120,
    )


def test_cli_pull_export_prune(registry, pusher, tmp_path, no_docker_config):
    img = build_image([{"bin/sh": b"cli"}])
    pusher.image("library/clitest", "v1", img)
    ref = f"{registry.host}/library/clitest:v1"
    home = tmp_path / "home"
    env = {"DOCKER_CONFIG": str(no_docker_config)}

    refused = boxlite("pull", ref, home=home, env=env)
    assert refused.returncode == 1
    assert refused.stderr.startswith("boxlite: error: ") and "--insecure" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1

    proc = boxlite("pull", "--insecure", ref, home=home, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [ref, img.digest]
    assert proc.stderr == ""  # not a terminal: no progress bars
    listed = json.loads(boxlite("images", "ls", "--json", home=home).stdout)
    assert [(i["reference"], i["digest"]) for i in listed] == [(ref, img.digest)]

    out = tmp_path / "layout"
    proc = boxlite("images", "export", ref, str(out), home=home)
    assert proc.returncode == 0, proc.stderr
    assert (out / "index.json").is_file()

    proc = boxlite("images", "prune", home=home)
    assert proc.returncode == 0, proc.stderr
    assert f"deleted: {img.digest}" in proc.stdout and "removed 1 images" in proc.stdout
    assert json.loads(boxlite("images", "ls", "--json", home=home).stdout) == []

    proc = boxlite("images", "import", str(out), "--name", "clitest:v1", home=home)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["clitest:v1", img.digest]


def test_cli_pull_platform_error_one_line(registry, pusher, tmp_path, no_docker_config):
    arm = build_image([{"x": b"arm"}], arch="arm64")
    pusher.index("library/cliarm", "latest", [(arm, "arm64")])
    proc = boxlite("pull", "--insecure", "--platform", "linux/amd64",
                   f"{registry.host}/library/cliarm", home=tmp_path / "home",
                   env={"DOCKER_CONFIG": str(no_docker_config)})
    assert proc.returncode == 1
    assert "no image for linux/amd64" in proc.stderr and "linux/arm64" in proc.stderr
