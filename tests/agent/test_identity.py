"""A guest's identity after a restore: entropy, wall clock, hostname (agent/identity.py).

The kernel parts are real and run on this host as root: RNDADDENTROPY / RNDRESEEDCRNG on
/dev/urandom (adding 64 random bytes to the host's pool is harmless) and BLKFLSBUF on a
non-loop block device. The host's clock and hostname are never changed: tests that would
(``*_double``) pass setter doubles, and the native agent is not PID 1, so it never steps the
clock (its hostname lives in its own UTS namespace). The VM test (``-m vm``) reseeds a real
booted box. Two template clones reading different /dev/urandom bytes is the template tests'
check (it needs templates); what it relies on here: apply_identity really reseeds the CRNG.
"""

from __future__ import annotations

import base64
import errno
import os
import time
from pathlib import Path

import pytest
from google.protobuf import json_format

from boxlite_core.agent import blockdev, identity
from boxlite_core.channel.identity import ENTROPY_BYTES, host_identity
from boxlite_core.proto import agent_pb2 as pb

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (CAP_SYS_ADMIN ioctls)")
HOUR_NS = 3600 * 10**9


class Recorder:
    """A setter double: remembers what it was asked to set, sets nothing."""

    def __init__(self) -> None:
        self.calls: list[int | str] = []

    def __call__(self, value: int | str) -> None:
        self.calls.append(value)


def message(**fields) -> pb.Identity:
    return pb.Identity(**fields)


# -- host side: the identity the host sends ---------------------------------------------------


def test_host_identity_parses_as_an_identity_message():
    before = time.time_ns()
    data = host_identity("box-1")
    after = time.time_ns()
    parsed = json_format.ParseDict(data, pb.Identity())
    assert len(parsed.entropy) == ENTROPY_BYTES == 64
    assert before <= parsed.wall_clock_ns <= after
    assert parsed.hostname == "box-1"
    # it is also what AgentClient.init takes as config["identity"]
    init = json_format.ParseDict({"share": {"tag": "t", "fstype": "bind"}, "identity": data},
                                 pb.InitRequest())
    assert init.HasField("identity") and init.identity.entropy == parsed.entropy


def test_host_identity_is_fresh_each_call():
    one, two = host_identity(), host_identity()
    assert base64.b64decode(one["entropy"]) != base64.b64decode(two["entropy"])
    assert one["hostname"] == ""


# -- guest side: the kernel calls, for real on this host ---------------------------------------


@needs_root
def test_add_entropy_reseeds_the_crng():
    assert identity.add_entropy(os.urandom(64)) is True


def test_add_entropy_nothing_to_add_opens_nothing(tmp_path):
    assert identity.add_entropy(b"", device=str(tmp_path / "absent")) is False


@needs_root
def test_add_entropy_on_a_non_random_device_raises(tmp_path):
    plain = tmp_path / "plain"
    plain.write_bytes(b"")
    with pytest.raises(OSError) as info:
        identity.add_entropy(b"x" * 64, device=str(plain))
    assert info.value.errno in (errno.ENOTTY, errno.EINVAL)


@needs_root
def test_kernel_without_reseed_ioctl_goes_on_double(monkeypatch, capfd):
    """An older kernel (< 4.17) refuses RNDRESEEDCRNG with EINVAL: entropy added, logged."""
    real_ioctl = identity.fcntl.ioctl
    asked: list[int] = []

    def old_kernel_ioctl(fd, request, *args):
        asked.append(request)
        if request == identity.RNDRESEEDCRNG:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return real_ioctl(fd, request, *args)

    monkeypatch.setattr(identity.fcntl, "ioctl", old_kernel_ioctl)
    assert identity.add_entropy(os.urandom(64)) is False
    assert asked == [identity.RNDADDENTROPY, identity.RNDRESEEDCRNG]
    assert "not reseeded now" in capfd.readouterr().err


def test_ioctl_numbers_match_linux_headers():
    """_IOW('R', 0x03, int[2]), _IO('R', 0x07), _IO(0x12, 97) (linux/random.h, linux/fs.h)."""

    def ioc(direction: int, kind: int, nr: int, size: int) -> int:
        return (direction << 30) | (size << 16) | (kind << 8) | nr

    assert identity.RNDADDENTROPY == ioc(1, ord("R"), 0x03, 8) == 0x40085203
    assert identity.RNDRESEEDCRNG == ioc(0, ord("R"), 0x07, 0) == 0x5207
    assert blockdev.BLKFLSBUF == ioc(0, 0x12, 97, 0) == 0x1261


@needs_root
def test_apply_identity_clock_and_hostname_double(tmp_path):
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    clock, name = Recorder(), Recorder()
    target = time.time_ns() + HOUR_NS
    applied = identity.apply_identity(
        message(entropy=os.urandom(64), wall_clock_ns=target, hostname="clone-2"),
        root=str(root),
        set_clock=clock,
        set_hostname=name,
    )
    assert clock.calls == [target] and name.calls == ["clone-2"]
    assert 3590 < applied.clock_step <= 3600  # the clock was an hour behind the "host"
    assert (root / "etc/hostname").read_text() == "clone-2\n"
    assert applied.boot_id == Path(identity.BOOT_ID).read_text().strip()


def test_apply_identity_leaves_what_is_unset_double(tmp_path):
    clock, name = Recorder(), Recorder()
    applied = identity.apply_identity(
        message(), set_clock=clock, set_hostname=name, random_device=str(tmp_path / "absent")
    )
    assert clock.calls == [] and name.calls == []
    assert applied.clock_step == 0.0


def test_apply_identity_without_a_clock_setter_double(tmp_path):
    """set_clock=None (a native agent): the clock is left and reported as not moved."""
    name = Recorder()
    applied = identity.apply_identity(
        message(wall_clock_ns=time.time_ns() + HOUR_NS, hostname="n"),
        root=str(tmp_path / "no-etc"),  # missing /etc: ignored, as Init does
        set_clock=None,
        set_hostname=name,
        random_device=str(tmp_path / "absent"),
    )
    assert applied.clock_step == 0.0 and name.calls == ["n"]


def test_a_native_agent_never_steps_the_clock():
    """The server gives apply_identity a clock setter only as the guest's PID 1."""
    from boxlite_core.agent.server import Agent

    assert os.getpid() != 1
    # no Reaper: its waitpid(-1) thread would take this test process's children
    assert Agent("/nonexistent", reaper=None).set_clock is None


def _block_device() -> str | None:
    """A non-loop block device this process may open (a sandbox may deny the host's disk)."""
    for entry in sorted(Path("/sys/block").glob("*")):
        if entry.name.startswith(("loop", "nbd")):
            continue
        try:
            os.close(os.open(f"/dev/{entry.name}", os.O_RDONLY))
        except OSError:
            continue
        return f"/dev/{entry.name}"
    return None


@needs_root
def test_flush_block_device_real():
    device = _block_device()
    if device is None:
        pytest.skip("no openable non-loop block device in /sys/block")
    assert blockdev.flush_block_device(device) is True


def test_flush_block_device_failure_is_logged_not_raised(tmp_path, capfd):
    plain = tmp_path / "plain"
    plain.write_bytes(b"")
    assert blockdev.flush_block_device(str(plain)) is False
    assert blockdev.flush_block_device(str(tmp_path / "absent")) is False
    assert "cannot drop the buffer cache" in capfd.readouterr().err


# -- over the wire: the real agent, natively ---------------------------------------------------


@pytest.fixture
def own_root(tmp_path):
    """A container root of this test's own: Init and Reseed write its /etc/hostname."""
    from boxlite_testing.native_agent import build_busybox_root, missing_requirement

    if reason := missing_requirement():
        pytest.skip(reason)
    return build_busybox_root(tmp_path / "root")


def test_init_and_reseed_over_the_wire(agent_factory, own_root):
    from boxlite_core.channel.client import AgentClient

    agent = agent_factory()
    with AgentClient.connect(
        agent.box_dir, timeout=30, is_alive=agent.is_alive, console_tail=agent.console_tail
    ) as client:
        # Reseed before Init: fine (no container root to write into yet)
        early = client.reseed({"entropy": base64.b64encode(os.urandom(64)).decode(),
                               "hostname": "early"})
        assert early["boot_id"] == Path(identity.BOOT_ID).read_text().strip()
        assert client.probe()["hostname"] == "early"
        # Init's identity comes first; its hostname is used when Init names none.
        # wall_clock_ns is left 0: this agent runs on the host (it would not step it anyway).
        init_identity = host_identity("from-identity")
        init_identity["wall_clock_ns"] = "0"
        client.init({"share": {"tag": str(own_root), "fstype": "bind"},
                     "identity": init_identity})
        assert client.probe()["hostname"] == "from-identity"
        assert (own_root / "etc/hostname").read_text() == "from-identity\n"
        again = host_identity("renamed")
        again["wall_clock_ns"] = "0"
        reply = client.reseed(again)
        assert reply == {"boot_id": early["boot_id"], "clock_step": 0.0}
        assert client.probe()["hostname"] == "renamed"
        assert (own_root / "etc/hostname").read_text() == "renamed\n"
        code, _sig, _to, out, _err = client.run(["hostname"])
        assert (code, out) == (0, b"renamed\n")
    log = agent.console_tail()
    assert "CRNG reseeded" in log and "hostname renamed" in log


def test_reseed_bad_identity_is_a_guest_error(agent_factory):
    from boxlite_core.channel.client import AgentClient
    from boxlite_core.errors import GuestError
    from boxlite_testing.native_agent import missing_requirement

    if reason := missing_requirement():
        pytest.skip(reason)
    agent = agent_factory()
    with AgentClient.connect(
        agent.box_dir, timeout=30, is_alive=agent.is_alive, console_tail=agent.console_tail
    ) as client, pytest.raises(GuestError, match="bad guest identity"):
        client.reseed({"entropy": "not base64 !", "no_such_field": 1})


# -- a real VM -----------------------------------------------------------------------------------


@pytest.mark.vm
def test_reseed_a_running_box(shared_home):
    """Reseed on a booted box: new hostname (kernel and /etc/hostname), the clock stepped both
    ways, boot_id unchanged; and the box started with the host's time (Init's identity)."""
    from boxlite_core.models import BoxOptions
    from boxlite_core.runtime.runtime import Runtime
    from boxlite_testing.homes import unique

    def guest_time(box) -> float:
        """Guest wall clock minus the host's, seconds; 0 when consistent with the exec's window
        (``date +%s`` truncates, and a loaded host takes a while to run the exec)."""
        before = time.time()
        result = box.exec(["date", "+%s"])
        after = time.time()
        assert result.exit_code == 0, result
        guest = int(result.text)  # the guest's clock was in [guest, guest + 1)
        if guest + 1 < before:
            return guest + 1 - before
        return max(0.0, guest - after)

    with Runtime(shared_home) as rt:
        box = rt.create(BoxOptions(image="busybox", name=unique("identity"), memory_mib=256))
        try:
            box.start()
            offset = guest_time(box)
            assert abs(offset) < 2, f"the guest's clock is {offset:+.2f} s off the host's"
            client = box._live_client()
            ahead = host_identity("newname")
            ahead["wall_clock_ns"] = str(time.time_ns() + HOUR_NS)
            reply = client.reseed(ahead)
            assert reply["boot_id"]
            assert 3590 < reply["clock_step"] < 3610, reply
            offset = guest_time(box)
            assert 3590 < offset < 3610, offset
            assert client.probe()["hostname"] == "newname"
            assert box.exec(["hostname"]).text == "newname\n"
            assert box.exec(["cat", "/etc/hostname"]).text == "newname\n"
            boot_id = box.exec(["cat", "/proc/sys/kernel/random/boot_id"]).text.strip()
            assert boot_id == reply["boot_id"]
            back = client.reseed(host_identity("newname"))
            assert -3610 < back["clock_step"] < -3590, back
            assert back["boot_id"] == reply["boot_id"]  # what a reseed cannot change
            offset = guest_time(box)
            assert abs(offset) < 2, f"the guest's clock is {offset:+.2f} s off the host's"
            console = str(box.logs())
            assert "CRNG reseeded" in console and "hostname newname" in console
            assert "cannot drop the buffer cache" not in console  # BLKFLSBUF before the mount
            # Init carried one too (the start pipeline's host_identity(name)); a cold boot
            # needs it as well: under TCG the guest's clock fell ~5 s behind while booting.
            assert f"hostname {box.record.name}; boot_id {boot_id}" in console
        finally:
            rt.remove(box.id, force=True)
