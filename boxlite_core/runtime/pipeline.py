"""The init pipeline: named, timed stages that take a Configured box to a Running one.

Why a list of stages rather than one long function: every stage is timed into the box's
metrics (so "where do the 3 seconds go" has an answer per box), and a failure names the stage
it happened in, which the CleanupGuard records on the Failed box.

Stages (see ARCHITECTURE.md): filesystem_setup; container_rootfs_prep ‖ guest_kit_prep (two
threads: image → rootfs and the guest kit are independent and each can take seconds);
volumes; vmm_spawn; guest_connect; guest_init.

The record is Starting throughout (Box.start wrote it, naming the starter); ``run_stages``
writes each stage's name into ``state.stage`` before running it and vmm_spawn writes the VMM's
pid + start time into ``state.vmm`` before guest_connect waits: a process killed at any stage
leaves a record that says where it was and which processes to stop (cleanup.settle_abandoned).
"""

from __future__ import annotations

import concurrent.futures
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import attrs

from .. import envvars
from ..errors import ConfigError, GuestError
from ..models import HostShare, JsonObject
from ..rootfs.base import RootfsArtifact, RootfsContext
from ..vmm.consolelog import log_files, neutralise, tail_bytes, wait_writer
from ..vmm.procstat import start_time as proc_start_time
from ..vmm.spec import AgentChannel, Capability, ChannelKind, DiskSpec, ShareSpec, VmSpec
from ..volumes.resolve import resolve_user_volumes
from .services import ProgressFn, Services

if TYPE_CHECKING:
    from ..channel.client import AgentClient
    from ..images.model import Image
    from ..kit.model import GuestKit
    from ..vmm.base import LaunchPlan, VmHandle, VmmBackend
    from ..volumes.base import VolumeSharer
    from .records import BoxRecord

#: Default seconds to wait for the guest agent; generous because TCG boots are slow.
DEFAULT_BOOT_TIMEOUT = 120.0
ROOT_SERIAL = "bxguest"  # matches boxlite_core.kit.ROOT_SERIAL (the initramfs looks for it)
#: preferred volume sharers, in order, when the user names none
SHARER_PREFERENCE = ("virtiofs", "9p")

CONSOLE_LOG = "console.log"
PLAN_FILE = "plan.json"
#: the agent channel's socket in the box dir, by channel kind (the backend serves it)
AGENT_PORT = "agent.port"  # virtio-serial
AGENT_STREAM = "agent.sock"  # vsock


def boot_timeout() -> float:
    """``BOXLITE_BOOT_TIMEOUT`` (seconds) or 120: how long a start waits for the agent."""
    return envvars.seconds("BOXLITE_BOOT_TIMEOUT", DEFAULT_BOOT_TIMEOUT)


def console_tail(box_dir: Path, lines: int = 25, max_bytes: int = 64 * 1024) -> str:
    """The last lines of the box's serial console: the first thing to read when a boot fails.

    Across rotation (console.log.1 when the live file was just started), and neutralised:
    this text goes into error messages shown on terminals, and the guest wrote it.
    Only error paths call this: it first gives the console writer up to a second to finish
    (it exits right after a dead VM's last bytes, often a panic message)."""
    wait_writer(Path(box_dir), 1.0)
    data = tail_bytes(Path(box_dir) / CONSOLE_LOG, lines, max_bytes)
    return neutralise(data).rstrip()


@attrs.define
class StartContext:
    """Everything the stages produce for each other, and what cleanup must undo."""

    services: Services
    record: BoxRecord
    box_dir: Path
    backend: VmmBackend
    progress: ProgressFn | None = None
    stage: str | None = None
    timings: dict[str, float] = attrs.field(factory=dict)
    image: Image | None = None
    artifact: RootfsArtifact | None = None
    kit: GuestKit | None = None
    volumes: tuple[HostShare, ...] = ()
    sharer: VolumeSharer | None = None
    sharer_name: str | None = None
    shares: tuple[ShareSpec, ...] = ()
    spec: VmSpec | None = None
    plan: LaunchPlan | None = None
    handle: VmHandle | None = None
    client: AgentClient | None = None

    def report(self, message: str, fraction: float | None = None) -> None:
        if self.progress is not None:
            try:
                self.progress(message, fraction)
            except Exception:  # a broken progress display must not fail a boot
                pass


StageFn = Callable[[StartContext], None]


@attrs.frozen
class Stage:
    """One named step, or several run concurrently (``parallel``)."""

    name: str
    fn: StageFn | None = None
    parallel: tuple[Stage, ...] = ()


# -- stages ---------------------------------------------------------------------------------


def filesystem_setup(ctx: StartContext) -> None:
    ctx.box_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(ctx.box_dir, 0o700)  # sockets and the VM's disks live here


def container_rootfs_prep(ctx: StartContext) -> None:
    services = ctx.services
    options = ctx.record.options
    ctx.report(f"image {options.image}")
    # The digest recorded at create, not the tag: a re-tagged image must not change a box.
    ctx.image = services.images.get(ctx.record.image_digest or options.image)
    strategy = services.plugins.rootfs_strategy(options.rootfs)
    rctx = RootfsContext(
        home=services.home,
        image_store=services.images,
        disk_size_mib=options.disk_size_mib,
        progress=ctx.progress,
    )
    ctx.artifact = strategy.prepare(ctx.image, ctx.box_dir, rctx)


def guest_kit_prep(ctx: StartContext) -> None:
    ctx.kit = ctx.services.kit_provider(ctx.services.home, ctx.progress)


def pick_sharer(ctx: StartContext, caps: frozenset[Capability]) -> tuple[str, VolumeSharer]:
    """The user's sharer, checked against the backend; else the first preferred one that
    this backend can attach and this host can serve."""
    rt = ctx.services
    backend_name = ctx.record.backend
    named = ctx.record.options.volume_sharer
    if named:
        sharer = rt.plugins.volume_sharer(named)
        if sharer.capability not in caps:
            have = ", ".join(sorted(c.value for c in caps)) or "none"
            raise ConfigError(
                f"volume sharer {named!r} needs the {sharer.capability.value!r} capability, "
                f"which backend {backend_name!r} does not declare (it has: {have}); "
                f"pick another --sharer or --backend"
            )
        sharer.check()
        return named, sharer
    names = [n for n in SHARER_PREFERENCE if n in rt.plugins.sharer_names()]
    names += [n for n in rt.plugins.sharer_names() if n not in names]
    reasons = []
    for name in names:
        sharer = rt.plugins.volume_sharer(name)
        if sharer.capability not in caps:
            reasons.append(f"{name}: backend {backend_name!r} lacks {sharer.capability.value!r}")
            continue
        try:
            sharer.check()
        except ConfigError as exc:
            reasons.append(f"{name}: {exc}")
            continue
        return name, sharer
    raise ConfigError(
        f"no volume sharer works with backend {backend_name!r} here ({'; '.join(reasons)})"
    )


def volumes(ctx: StartContext) -> None:
    assert ctx.artifact is not None
    ctx.volumes = resolve_user_volumes(ctx.record.options.volumes)
    wanted: list[HostShare] = [*ctx.artifact.shares, *ctx.volumes]
    if not wanted:
        return
    ctx.sharer_name, ctx.sharer = pick_sharer(ctx, ctx.backend.capabilities())
    ctx.services.store.update(ctx.record.id, state={"sharer": ctx.sharer_name})
    ctx.shares = tuple(ctx.sharer.start(wanted, ctx.box_dir))


def build_spec(ctx: StartContext) -> VmSpec:
    assert ctx.artifact is not None and ctx.kit is not None
    kit = ctx.kit
    options = ctx.record.options
    kind = ctx.backend.channel_kind
    agent = AgentChannel(
        kind=kind,
        socket=ctx.box_dir / (AGENT_PORT if kind is ChannelKind.VIRTIO_SERIAL else AGENT_STREAM),
        handshake=ctx.backend.channel_handshake,
    )
    disks = (
        DiskSpec(Path(kit.root_image), "raw", read_only=True, serial=ROOT_SERIAL),
        *ctx.artifact.disks,
    )
    # the guest listens on vsock only when its cmdline names the port: the core says so,
    # so no backend has to know the key (proto/wire.py AGENT_VSOCK_CMDLINE_KEY)
    cmdline = " ".join(w for w in (kit.cmdline, agent.cmdline_word) if w)
    return VmSpec(
        box_id=ctx.record.id,
        box_dir=ctx.box_dir,
        cpus=options.cpus,
        memory_mib=options.memory_mib,
        kernel=Path(kit.kernel),
        initrd=Path(kit.initrd),
        cmdline=cmdline,
        console_log=ctx.box_dir / CONSOLE_LOG,
        agent=agent,
        disks=disks,
        shares=ctx.shares,
        name=ctx.record.name,
        network=options.network,
        guest=kit.guest_hints(),
        console_log_max_bytes=options.console_log_max_mib * 1024 * 1024,
    )


def vmm_spawn(ctx: StartContext) -> None:
    ctx.spec = build_spec(ctx)
    ctx.plan = ctx.backend.plan(ctx.spec)
    (ctx.box_dir / PLAN_FILE).write_text(ctx.plan.to_json() + "\n")
    # a fresh console log per boot, so the tail on failure is this boot's (rotated copies
    # too: `boxlite logs` reads across them)
    for old in log_files(ctx.box_dir / CONSOLE_LOG):
        old.unlink(missing_ok=True)
    ctx.handle = ctx.backend.launch(ctx.plan)
    record_vmm_identity(ctx)


def vmm_identity(handle: VmHandle) -> dict[str, int | None] | None:
    """``{"pid", "start_time"}`` of a launched VM's process, None for a backend without one
    (libvirt: libvirtd owns the process; attach() by box directory finds it)."""
    pid = handle.pid
    if not pid:
        return None
    started = getattr(handle, "start_time", None)
    if started is None:
        started = proc_start_time(pid)
    return {"pid": pid, "start_time": started}


def record_vmm_identity(ctx: StartContext) -> None:
    """Persist the VMM identity before guest_connect, the longest wait of a start: a process
    killed from here on leaves a record naming the exact process to stop."""
    assert ctx.handle is not None
    identity = vmm_identity(ctx.handle)
    if identity is not None:
        ctx.services.store.record_vmm(ctx.record.id, identity)


def guest_connect(ctx: StartContext) -> None:
    from ..channel.client import AgentClient

    assert ctx.spec is not None and ctx.handle is not None
    handle = ctx.handle
    box_dir = ctx.box_dir
    ctx.report("waiting for the guest agent")
    try:
        ctx.client = AgentClient.connect(
            box_dir,
            kind=ctx.spec.agent.kind,
            socket_path=ctx.spec.agent.socket,
            handshake=ctx.spec.agent.handshake,
            vsock_port=ctx.spec.agent.vsock_port,
            timeout=boot_timeout(),
            is_alive=handle.is_running,
            console_tail=lambda: console_tail(box_dir),
        )
    except GuestError as exc:
        raise explain_agent_wait(exc, handle, boot_timeout()) from exc
    except Exception as exc:
        raise GuestError(f"could not reach the guest agent: {type(exc).__name__}: {exc}") from exc


def explain_agent_wait(exc: GuestError, handle: VmHandle, waited: float) -> GuestError:
    """``exc`` with what only the caller knows: how the VM died, or which setting the wait was.

    A VMM that refuses an option may exit after its sockets exist (QEMU builds chardevs before
    devices), so the channel sees only a silent death; the backend's ``exit_reason()`` quotes
    the VMM. A VM still running means the wait ran out: name the setting that bounds it.
    """
    try:
        running = handle.is_running()
        reason = None if running else handle.exit_reason()
    except Exception:  # diagnosis only: never mask the real error
        return exc
    if reason:
        return GuestError(f"{reason}; {exc}")
    if running:
        return GuestError(f"{exc}\n(waited {waited:g} s for the agent: set BOXLITE_BOOT_TIMEOUT "
                          "to wait longer on a slow host)")
    return exc


def init_config(ctx: StartContext) -> JsonObject:
    """The agent's Init request, as the dict AgentClient.init takes (InitRequest's shape)."""
    assert ctx.artifact is not None
    fstype = ctx.sharer.guest_fstype if ctx.sharer is not None else ""
    return {
        # the strategy's typed answer in InitRequest's shape; shares take the sharer's fstype
        **ctx.artifact.guest.init_request(fstype),
        "volumes": [
            {"tag": v.tag, "fstype": fstype, "guest_path": v.guest_path, "read_only": v.read_only}
            for v in ctx.volumes
        ],
        "hostname": ctx.record.name,
    }


def guest_init(ctx: StartContext) -> None:
    assert ctx.client is not None
    ctx.client.init(init_config(ctx))


STAGES: tuple[Stage, ...] = (
    Stage("filesystem_setup", filesystem_setup),
    Stage(
        "prepare",
        parallel=(
            Stage("container_rootfs_prep", container_rootfs_prep),
            Stage("guest_kit_prep", guest_kit_prep),
        ),
    ),
    Stage("volumes", volumes),
    Stage("vmm_spawn", vmm_spawn),
    Stage("guest_connect", guest_connect),
    Stage("guest_init", guest_init),
)


# -- runner ---------------------------------------------------------------------------------


def _run_one(ctx: StartContext, stage: Stage) -> None:
    assert stage.fn is not None
    ctx.report(stage.name)
    began = time.monotonic()
    try:
        stage.fn(ctx)
    finally:
        ctx.timings[stage.name] = round(time.monotonic() - began, 4)


def run_stages(ctx: StartContext, stages: Sequence[Stage] = STAGES) -> None:
    """Run every stage in order; on an error set ``ctx.stage`` to the failing one and raise.

    Parallel members all finish (or fail) before the error propagates, so cleanup never races
    a thread that is still writing into the box directory.
    """
    total = time.monotonic()
    for stage in stages:
        ctx.stage = stage.name
        # in the record before the stage runs: a start killed here says where it was
        ctx.services.store.record_stage(ctx.record.id, stage.name)
        if not stage.parallel:
            _run_one(ctx, stage)
            continue
        began = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(
            max_workers=len(stage.parallel), thread_name_prefix=f"boxlite-{stage.name}"
        ) as pool:
            futures = {pool.submit(_run_one, ctx, member): member for member in stage.parallel}
            concurrent.futures.wait(futures)
        ctx.timings[stage.name] = round(time.monotonic() - began, 4)
        for future, member in futures.items():  # the first member in order that failed
            exc = future.exception()
            if exc is not None:
                ctx.stage = member.name
                raise exc
    ctx.stage = None
    ctx.timings["total"] = round(time.monotonic() - total, 4)

