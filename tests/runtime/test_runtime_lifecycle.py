"""Runtime + pipeline + CleanupGuard against a backend double whose launch fails."""

from __future__ import annotations

import asyncio
import json

import pytest

from boxlite_core.errors import (
    ConfigError,
    EngineError,
    ImageError,
    NotFoundError,
    StateError,
)
from boxlite_core.models import BoxStatus
from boxlite_core.runtime.aio import AsyncRuntime
from boxlite_testing import runtime_doubles as doubles
from boxlite_testing.runtime_doubles import TINY, make_runtime, opts


def test_create_persists_configured_record(rt):
    box = rt.create(opts())
    rec = rt.get(box.id).record
    assert rec.status is BoxStatus.CONFIGURED
    assert len(rec.id) == 12 and rec.name
    assert rec.image == TINY and rec.image_digest.startswith("sha256:")
    assert rec.backend == "launchfail_double"
    assert rt.get(rec.name).id == rec.id
    assert [e for e, _ in doubles.EVENTS] == ["created"]
    assert rt.metrics()["boxes_created"] == 1


def test_duplicate_name_is_config_error(rt):
    rt.create(opts(name="dup"))
    with pytest.raises(ConfigError, match="a box named dup exists"):
        rt.create(opts(name="dup"))


def test_generated_names_never_collide_even_when_every_friendly_name_is_taken(rt, monkeypatch):
    """CI once failed `create` with "a box named quiet-walrus exists" for a box the user did
    not name: concurrent creates looked the name up, both found it free, and the second
    insert hit the UNIQUE constraint. Here the word lists hold one word each, so every
    friendly name collides, and creates run from threads at once: each still gets a record,
    under a name of its own."""
    import concurrent.futures

    from boxlite_core.runtime import records

    monkeypatch.setattr(records, "_ADJECTIVES", ("quiet",))
    monkeypatch.setattr(records, "_NOUNS", ("walrus",))
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        boxes = list(pool.map(lambda _: rt.create(opts()), range(6)))
    names = [b.name for b in boxes]
    assert len(set(names)) == 6 and "quiet-walrus" in names
    assert {r.name for r in rt.list()} == set(names)


def test_a_given_name_is_never_replaced_by_a_generated_one(rt):
    rt.create(opts(name="mine"))
    with pytest.raises(ConfigError, match="a box named mine exists"):
        rt.create(opts(name="mine"))
    assert [r.name for r in rt.list()] == ["mine"]


def test_pause_on_a_backend_without_pause_names_it(rt):
    """The double declares no PAUSE: refused up front with the backend's name, before any
    state check, instead of a NotImplementedError from deep inside a handle."""
    box = rt.create(opts())
    for action in (box.pause, box.resume):
        with pytest.raises(ConfigError, match="backend 'launchfail_double' cannot pause"):
            action()
    assert rt.get(box.id).record.status is BoxStatus.CONFIGURED


def test_pause_of_a_box_that_is_not_running_is_a_state_error(rt):
    box = rt.create(opts(backend="pause_double"))
    with pytest.raises(StateError, match="not running; start it first"):
        box.pause()


def test_unknown_backend_rootfs_image(rt):
    with pytest.raises(NotFoundError, match="no VMM backend named 'nope'"):
        rt.create(opts(backend="nope"))
    with pytest.raises(ConfigError, match="unknown rootfs strategy"):
        rt.create(opts(rootfs="nope"))
    with pytest.raises(NotFoundError, match="not in the local store"):
        rt.create(opts(image="nosuchimage:1"))
    assert rt.list() == []


def test_failed_launch_keeps_record_and_files(rt):
    box = rt.create(opts(name="boom"))
    with pytest.raises(EngineError, match=r"boom: start failed in vmm_spawn: .*no-such-vmlinux"):
        box.start()
    rec = box.record
    assert rec.status is BoxStatus.FAILED
    assert rec.error.startswith("vmm_spawn: ") and "no-such-vmlinux" in rec.error
    assert rec.failures == 1
    assert rec.state["failed_stage"] == "vmm_spawn"
    timings = rec.state["stage_timings"]
    for stage in (
        "filesystem_setup",
        "container_rootfs_prep",
        "guest_kit_prep",
        "volumes",
        "vmm_spawn",
    ):
        assert stage in timings and timings[stage] >= 0
    # files kept for diagnosis: the strategy's disk and the launch plan
    assert (box.dir / "rootfs.qcow2").exists()
    plan = json.loads((box.dir / "plan.json").read_text())
    assert plan["backend"] == "launchfail_double"
    assert plan["spec"]["disks"][0]["serial"] == "bxguest"
    assert rt.metrics()["boxes_failed"] == 1
    failed = [p for e, p in doubles.EVENTS if e == "failed"]
    assert failed and failed[0]["stage"] == "vmm_spawn"
    # Failed is retryable, and a retry that fails again counts again
    with pytest.raises(EngineError):
        box.start()
    assert box.record.failures == 2 and rt.metrics()["boxes_failed"] == 2


def test_failing_kit_stage_is_named(tmp_path, rt):
    def broken_kit(home, progress):
        raise ImageError("guest kit: kernel package missing (double)")

    rt.kit_provider = broken_kit
    box = rt.create(opts())
    with pytest.raises(ImageError, match="start failed in guest_kit_prep"):
        box.start()
    rec = box.record
    assert rec.status is BoxStatus.FAILED and rec.state["failed_stage"] == "guest_kit_prep"
    # the concurrent rootfs stage ran to completion before cleanup
    assert "container_rootfs_prep" in rec.state["stage_timings"]
    assert (box.dir / "rootfs.qcow2").exists()


def test_volume_vanishing_before_start_fails_volumes_stage(tmp_path, rt):
    vol = tmp_path / "vol"
    vol.mkdir()
    box = rt.create(opts(volumes=[f"{vol}:/data"], volume_sharer="ninep_double"))
    vol.rmdir()
    with pytest.raises(ConfigError, match=f"start failed in volumes: .*{vol}"):
        box.start()
    assert box.record.state["failed_stage"] == "volumes"


def test_sharer_capability_mismatch_names_both(tmp_path, rt):
    vol = tmp_path / "vol"
    vol.mkdir()
    box = rt.create(
        opts(backend="noshare_double", volumes=[f"{vol}:/data"], volume_sharer="vfsonly_double")
    )
    with pytest.raises(ConfigError, match=r"'vfsonly_double' needs .*'virtiofs'.*'noshare_double'"):
        box.start()


def test_sharer_started_then_stopped_on_failure(tmp_path, rt):
    vol = tmp_path / "vol"
    vol.mkdir()
    box = rt.create(opts(volumes=[f"{vol}:/data:ro"], volume_sharer="ninep_double"))
    with pytest.raises(EngineError):
        box.start()
    assert json.loads((box.dir / "sharer.started").read_text()) == ["uservol0"]
    assert (box.dir / "sharer.stopped").exists()
    assert box.record.state["sharer"] == "ninep_double"


def test_exec_on_a_box_that_is_not_running(rt):
    box = rt.create(opts(name="idle"))
    with pytest.raises(StateError, match="box idle is configured; start it first"):
        box.exec(["true"])


def test_image_config_merge(rt):
    box = rt.create(opts(env={"FOO": "opt", "BAR": "opt"}, workdir="/work"))
    params = box.exec_params({"BAR": "call"}, None, None)
    assert params["env"]["PATH"] == "/bin"  # image Env wins over the default PATH
    assert params["env"]["FOO"] == "opt" and params["env"]["BAR"] == "call"
    assert params["cwd"] == "/work"  # options override the image's WorkingDir
    assert params["user"] == "nobody"  # from the image
    assert box.exec_params(None, "/x", "root")["cwd"] == "/x"
    assert box.default_command() == ["/bin/hello"]


@pytest.mark.parametrize("cwd", ["work", "./work", "../x"])
def test_a_relative_working_directory_is_refused_as_docker_does(rt, cwd):
    """Issue 17 item 5's neighbour: the API refuses it before asking the box (docker: "the
    working directory 'x' is invalid, it needs to be an absolute path"); the CLI's -w and
    BoxOptions.workdir refuse it too."""
    box = rt.create(opts(name="rel"))
    with pytest.raises(ConfigError, match=r"cwd=.*: the working directory must be an absol"):
        box.exec(["true"], cwd=cwd)
    with pytest.raises(ConfigError, match=r"cwd=.*: the working directory must be an absol"):
        box.exec_stream(["true"], cwd=cwd)
    with pytest.raises(ConfigError, match=r"workdir='work': guest path must be absolute"):
        opts(workdir="work")


def test_remove_keeps_nothing(rt):
    box = rt.create(opts(name="tidy"))
    with pytest.raises(EngineError):
        box.start()
    assert box.dir.exists()
    rt.remove("tidy")
    assert not box.dir.exists()
    with pytest.raises(NotFoundError):
        rt.get("tidy")


def test_remove_running_needs_force_and_recover_marks_gone(tmp_path, rt):
    box = rt.create(opts(name="ghost"))
    # a record claiming Running whose VM does not exist (as after a host reboot)
    rt.store.set_status(box.id, BoxStatus.STARTING)
    rt.store.set_status(box.id, BoxStatus.RUNNING, pid=999999)
    with pytest.raises(StateError, match="ghost is running; stop it first"):
        rt.remove("ghost")
    other = rt.create(opts(name="halting"))
    rt.store.set_status(other.id, BoxStatus.STARTING)
    rt.store.set_status(other.id, BoxStatus.RUNNING)
    rt.store.set_status(other.id, BoxStatus.STOPPING)
    rt2 = make_runtime(tmp_path)  # a new process starting up
    try:
        ghost = rt2.get("ghost").record
        assert ghost.status is BoxStatus.FAILED
        assert ghost.error == "VM is gone (found at startup)"
        assert rt2.get("halting").record.status is BoxStatus.STOPPED
        assert rt2.metrics()["boxes_running"] == 0
    finally:
        rt2.close()
    rt.store.set_status(box.id, BoxStatus.STARTING)
    rt.store.set_status(box.id, BoxStatus.RUNNING)
    rt.remove("ghost", force=True)
    with pytest.raises(NotFoundError):
        rt.get("ghost")


def test_metrics_keys(rt):
    m = rt.metrics()
    for key in (
        "boxes_created",
        "boxes_failed",
        "boxes_stopped",
        "boxes_running",
        "execs",
        "exec_errors",
    ):
        assert m[key] == 0


def test_home_from_env(tmp_path, monkeypatch):
    from boxlite_core.runtime.runtime import Runtime

    monkeypatch.setenv("BOXLITE_HOME", str(tmp_path / "envhome"))
    with Runtime(plugins=[]) as runtime:
        assert runtime.home == tmp_path / "envhome"
        assert (tmp_path / "envhome" / "boxlite.db").exists()


def test_async_many_boxes_concurrently(rt, tmp_path):
    async def main():
        art = AsyncRuntime(rt.home, plugins=rt.plugins, kit_provider=rt.kit_provider)
        async with art:
            boxes = await asyncio.gather(*(art.create(opts()) for _ in range(5)))
            results = await asyncio.gather(*(b.start() for b in boxes), return_exceptions=True)
            assert all(isinstance(r, EngineError) for r in results)
            return [await b.status() for b in boxes]

    statuses = asyncio.run(main())
    assert statuses == [BoxStatus.FAILED] * 5
    assert len({r.name for r in rt.list()}) == 5
