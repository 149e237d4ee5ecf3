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
import contextlib
import inspect
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import attrs

from .. import envvars
from ..diskspace import MIB, ensure_free
from ..errors import (
    AgentUnreachable,
    BoxliteError,
    ConfigError,
    GuestError,
    StateError,
    UnsupportedError,
)
from ..models import HostShare, JsonObject
from ..rootfs.base import RootfsArtifact, RootfsContext
from ..vmm.consolelog import log_files, neutralise, tail_bytes, wait_writer
from ..vmm.procstat import start_time as proc_start_time
from ..vmm.spec import AgentChannel, Capability, ChannelKind, DiskSpec, ShareSpec, VmSpec
from ..volumes.resolve import remote_user_volumes, resolve_user_volumes
from . import restore
from .restore import BootChoice, FallBack
from .services import ProgressFn, Services
from .templates import TemplateStore

if TYPE_CHECKING:
    from ..channel.client import AgentClient
    from ..images.model import Image
    from ..kit.model import GuestKit
    from ..vmm.base import LaunchPlan, VmHandle, VmmBackend
    from ..volumes.base import VolumeSharer
    from .records import BoxRecord

log = logging.getLogger(__name__)

#: Default seconds to wait for the guest agent; generous because TCG boots are slow.
DEFAULT_BOOT_TIMEOUT = 120.0
#: seconds a restored VM's agent gets to answer (measured: 0.3-0.7 s) before its template is
#: given up for a cold boot; a snapshot restore gets the whole boot timeout
TEMPLATE_AGENT_TIMEOUT = 30.0
#: seconds a restored VM's port may go without READY before the shim re-attaches it (its
#: agent may still relay for the host it had when saved: see channel/shim.py Shim)
RESTORED_READY_RETRY = 2.0
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
    boot: BootChoice = attrs.field(factory=BootChoice)
    #: an agent connection started while the VMM restores a template (_dial_early)
    early_dial: tuple[concurrent.futures.Future[AgentClient], threading.Event] | None = None
    #: the VM's template/snapshot key (restore.key_of), or why it cannot be saved
    layout_key: str | None = None
    layout_unsupported: str | None = None
    #: set by the caller for a box created from a snapshot, on its first start
    snapshot_state: restore.SavedState | None = None
    #: the published ports as the network relay bound them (JSON of network.ports)
    published: list[JsonObject] = attrs.field(factory=list)

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


def check_network_capability(ctx: StartContext) -> None:
    """Refuse, before anything boots, a network for a backend that does not declare one."""
    from ..network.policy import NetworkMode

    options = ctx.record.options
    if options.network.mode is NetworkMode.NONE and not options.ports:
        return
    if Capability.NETWORK not in ctx.backend.capabilities():
        raise UnsupportedError(
            f"backend {ctx.record.backend!r} does not declare the 'network' capability, so "
            "its boxes cannot have a network policy or published ports; use a backend that "
            "does (`boxlite backends`) or drop --allow-net/--network/-p")


def filesystem_setup(ctx: StartContext) -> None:
    check_network_capability(ctx)
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
    """The guest kit: the current one, or for a snapshot's restore the one it was saved
    with (its VM runs that kernel and root image; a kit rebuild keeps it for snapshots)."""
    if ctx.snapshot_state is not None:
        from ..kit.builder import kit_by_id

        saved = kit_by_id(ctx.services.home, str(ctx.snapshot_state.meta.get("kit_id", "")))
        if saved is not None:
            ctx.kit = saved
            return
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


#: how a box on another machine gets its volumes: that machine's QEMU serves them over 9p
#: (a sharer of ours, e.g. virtiofsd, would run here, where those directories are not)
REMOTE_SHARER = "9p"


def volumes(ctx: StartContext) -> None:
    assert ctx.artifact is not None
    if ctx.backend.remote_host:
        _remote_volumes(ctx, ctx.backend.remote_host)
        return
    ctx.volumes = resolve_user_volumes(ctx.record.options.volumes)
    wanted: list[HostShare] = [*ctx.artifact.shares, *ctx.volumes]
    if not wanted:
        return
    ctx.sharer_name, ctx.sharer = pick_sharer(ctx, ctx.backend.capabilities())
    ctx.services.store.update(ctx.record.id, state={"sharer": ctx.sharer_name})
    ctx.shares = tuple(ctx.sharer.start(wanted, ctx.box_dir))


def _remote_volumes(ctx: StartContext, host: str) -> None:
    """volumes() for a box on ``host``: its paths are that machine's, shared by 9p there."""
    assert ctx.artifact is not None
    options = ctx.record.options
    if ctx.artifact.shares:
        raise ConfigError(
            f"rootfs {options.rootfs!r} shares directories of this machine, which a box on "
            f"{host} cannot reach; use --rootfs disk")
    ctx.volumes = remote_user_volumes(options.volumes, host)
    if not ctx.volumes:
        return
    if options.volume_sharer not in (None, REMOTE_SHARER):
        raise ConfigError(
            f"--sharer {options.volume_sharer}: a box on {host} gets its volumes from that "
            f"machine's QEMU ({REMOTE_SHARER}); drop --sharer")
    ctx.sharer_name, ctx.sharer = REMOTE_SHARER, ctx.services.plugins.volume_sharer(
        REMOTE_SHARER)
    ctx.services.store.update(ctx.record.id, state={"sharer": ctx.sharer_name})
    ctx.shares = tuple(ctx.sharer.start(ctx.volumes, ctx.box_dir))


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
        guest=kit.guest_hints(),
        console_log_max_bytes=options.console_log_max_mib * 1024 * 1024,
    )


def writable_disks(box_dir: Path) -> list[tuple[str, Path, str]]:
    """(serial, path, format) of the writable disks of the box's last launch (plan.json).

    Raises:
        StateError: the plan cannot be read.
    """
    try:
        plan = json.loads((box_dir / PLAN_FILE).read_text())
        disks = plan["spec"]["disks"]
    except (OSError, ValueError, KeyError) as exc:
        raise StateError(f"box directory {box_dir}: cannot read {PLAN_FILE} ({exc})") from None
    return [(str(d["serial"]), Path(d["path"]), str(d["format"]))
            for d in disks if not d.get("read_only")]


def templates(ctx: StartContext) -> TemplateStore:
    """The boot templates of the box's home."""
    return TemplateStore(ctx.services.home)


def vmm_spawn(ctx: StartContext) -> None:
    spec = build_spec(ctx)
    ctx.spec = spec
    ctx.layout_key, ctx.layout_unsupported = restore.key_of(spec, ctx.backend)
    if ctx.snapshot_state is not None:
        ctx.boot = restore.snapshot_choice(ctx.layout_key, ctx.layout_unsupported,
                                           ctx.snapshot_state)
    else:
        assert ctx.kit is not None
        ctx.boot = restore.choose(ctx.layout_key, templates(ctx),
                                  wanted=ctx.record.options.template, kit_id=ctx.kit.kit_id,
                                  unsupported=ctx.layout_unsupported)
    _launch(ctx)


def _launch(ctx: StartContext) -> None:
    """Plan and launch ctx.spec as ctx.boot says; a template the VMM refuses: cold boot."""
    assert ctx.spec is not None
    ctx.spec = attrs.evolve(ctx.spec, restore_from=restore.state_dir(ctx.boot))
    if ctx.boot.restoring:
        ctx.report(f"restoring the VM from its {ctx.boot.source}")
    ctx.plan = ctx.backend.plan(ctx.spec)
    (ctx.box_dir / PLAN_FILE).write_text(ctx.plan.to_json() + "\n")
    # a fresh console log per boot, so the tail on failure is this boot's (rotated copies
    # too: `boxlite logs` reads across them)
    for old in log_files(ctx.box_dir / CONSOLE_LOG):
        old.unlink(missing_ok=True)
    restore.start_digest_check(ctx.boot)
    if ctx.boot.source == restore.TEMPLATE:
        _dial_early(ctx)
    try:
        ctx.handle = ctx.backend.launch(attrs.evolve(ctx.plan, progress=ctx.report))
    except BaseException as exc:
        _cancel_early_dial(ctx)
        if ctx.boot.source != restore.TEMPLATE or not isinstance(exc, BoxliteError):
            raise
        ctx.boot = restore.give_up_template(ctx.boot, templates(ctx),
                                            f"the VMM could not load it: {_first_line(exc)}")
        _launch(ctx)
        return
    record_vmm_identity(ctx)


def _dial_early(ctx: StartContext) -> None:
    """Start the agent connection (its shim process: ~0.3 s of Python and gRPC start-up)
    while the VMM loads a template, instead of after. Safe because templates are saved with
    no host on the port: a host that attaches during the load is a change the restored
    guest is told about (see template_save)."""
    cancelled = threading.Event()

    def alive() -> bool:
        return not cancelled.is_set() and (ctx.handle is None or ctx.handle.is_running())

    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="boxlite-dial")
    ctx.early_dial = (pool.submit(_dial, ctx, alive), cancelled)
    pool.shutdown(wait=False)


def _cancel_early_dial(ctx: StartContext) -> None:
    """The launch failed: end the early connection attempt (and its shim) before a retry."""
    from ..channel.shimctl import stop_shim

    if ctx.early_dial is None:
        return
    future, cancelled = ctx.early_dial
    ctx.early_dial = None
    cancelled.set()
    with contextlib.suppress(Exception):
        client = future.result(timeout=10)
        client.close()
    with contextlib.suppress(Exception):
        stop_shim(ctx.box_dir)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


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
    """Wait for the agent. A template-restored VM whose agent does not answer, or whose
    state files turn out changed, is given up: the VM goes, the box boots the kernel.

    A template-restored VM's agent gets no Ping: its first call is Init (guest_init), the
    check that it answers. The Ping cost a round trip through code the restored guest runs
    for the first time (~50 ms between the two calls' arrival in the guest, measured)."""
    try:
        _connect(ctx)
        restore.check_after_connect(ctx.boot)
    except (GuestError, FallBack) as exc:
        if ctx.boot.source != restore.TEMPLATE:
            raise
        _boot_instead(ctx, exc)


def _boot_instead(ctx: StartContext, exc: BaseException) -> None:
    """Give up the template-restored VM (``exc`` says why): it goes, the kernel boots."""
    _discard_vm(ctx)
    ctx.boot = restore.give_up_template(ctx.boot, templates(ctx), _first_line(exc))
    _launch(ctx)
    _connect(ctx)


def _discard_vm(ctx: StartContext) -> None:
    """End the VM of a failed restore and what serves it (agent client and shim)."""
    if ctx.handle is not None:
        with contextlib.suppress(Exception):
            ctx.handle.kill()
        with contextlib.suppress(Exception):
            ctx.handle.release()
        ctx.handle = None
    with contextlib.suppress(Exception):
        _drop_host(ctx)


def _agent_wait(ctx: StartContext) -> float:
    """Seconds this start waits for its agent."""
    if ctx.boot.source == restore.TEMPLATE:
        return min(boot_timeout(), TEMPLATE_AGENT_TIMEOUT)
    return boot_timeout()


def _dial(ctx: StartContext, is_alive: Callable[[], bool]) -> AgentClient:
    from ..channel.client import AgentClient

    assert ctx.spec is not None
    box_dir = ctx.box_dir
    return AgentClient.connect(
        box_dir,
        kind=ctx.spec.agent.kind,
        socket_path=ctx.spec.agent.socket,
        handshake=ctx.spec.agent.handshake,
        vsock_port=ctx.spec.agent.vsock_port,
        ready_retry=RESTORED_READY_RETRY if ctx.boot.restoring else None,
        ping=ctx.boot.source != restore.TEMPLATE,  # its first call is Init (guest_init)
        # a snapshot was saved with its host attached: a shim started ahead would attach
        # before the restored guest saw that host go (shimctl.connect_shim)
        standby=ctx.boot.source != restore.SNAPSHOT,
        timeout=_agent_wait(ctx),
        is_alive=is_alive,
        console_tail=lambda: console_tail(box_dir),
    )


def _connect(ctx: StartContext) -> None:
    assert ctx.spec is not None and ctx.handle is not None
    handle = ctx.handle
    waited = _agent_wait(ctx)
    ctx.report("waiting for the guest agent")
    early, ctx.early_dial = ctx.early_dial, None
    try:
        if early is not None:
            ctx.client = early[0].result(timeout=waited + 30)
        else:
            ctx.client = _dial(ctx, handle.is_running)
    except GuestError as exc:
        raise explain_agent_wait(exc, handle, waited) from exc
    except Exception as exc:
        raise GuestError(f"could not reach the guest agent: {type(exc).__name__}: {exc}") from exc


def template_save(ctx: StartContext) -> None:
    """A cold boot whose configuration has no template saves one now: the agent answered
    and Init has not run, so the VM holds no image and no user data. Never fails a start."""
    boot = ctx.boot
    if not boot.save or boot.key is None:
        return
    assert ctx.handle is not None and ctx.spec is not None
    handle = ctx.handle
    ctx.report("saving a boot template for the next start")
    meta = restore.template_meta(ctx.spec, ctx.backend, ctx.record.name)
    # Saved with no host on the agent port: QEMU tells a restored guest that its host changed
    # only when the saved and the live connection states differ (virtio-serial post-load), so
    # a template saved while attached leaves a clone whose new host attaches before the guest
    # runs serving its template's dead session (measured: no READY)
    store = templates(ctx)
    try:
        # the stream holds at most the guest's memory (zero pages are skipped)
        ensure_free(store.root, ctx.spec.memory_mib * MIB + TEMPLATE_SAVE_MARGIN,
                    "a boot template")
    except BoxliteError as exc:
        boot.reason = f"no template saved: {_first_line(exc)}"
        log.warning("box %s: boot template not saved: %s", ctx.record.name, _first_line(exc))
        return
    _detach_host(ctx)
    try:
        made = store.make(boot.key, meta, lambda d: handle.save_state(
            d, resume=True, **_template_save_options(handle)))
        boot.reason = (f"{boot.reason}; this start saved a new one" if made is not None
                       else f"{boot.reason}; another start saved one meanwhile")
    except (BoxliteError, OSError) as exc:
        boot.reason = f"saving the template failed: {_first_line(exc)}"
        log.warning("box %s: boot template not saved: %s", ctx.record.name, _first_line(exc))
        with contextlib.suppress(Exception):
            handle.resume()  # save_state resumes on failure; make sure the box is not frozen
    _connect(ctx)


def _template_save_options(handle: VmHandle) -> dict[str, bool]:
    """``restores_share_memory=True``, unless the backend's ``save_state`` predates it (a
    vendor's, written to the contract before it had the option): that one saves as always."""
    try:
        names = inspect.signature(handle.save_state).parameters
    except (TypeError, ValueError):
        return {}
    takes = "restores_share_memory" in names or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in names.values())
    return {"restores_share_memory": True} if takes else {}


#: seconds the guest gets to see its host leave the agent port before the VM is saved
DETACH_SETTLE = 0.2
#: bytes beyond the guest's memory a template save needs room for
TEMPLATE_SAVE_MARGIN = 64 * MIB


def _drop_host(ctx: StartContext) -> None:
    """Close the agent client and stop the box's shim (the port's only host)."""
    from ..channel.shimctl import stop_shim

    if ctx.client is not None:
        with contextlib.suppress(Exception):
            ctx.client.close()
        ctx.client = None
    stop_shim(ctx.box_dir)


def _detach_host(ctx: StartContext) -> None:
    """:func:`_drop_host`, then give the guest time to see its host leave."""
    _drop_host(ctx)
    time.sleep(DETACH_SETTLE)


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
    """Init (mounts, hostname), or for a snapshot's clone only a new identity: its
    processes run on. Either way the guest gets host entropy and the host's clock last,
    right before the call (a restored guest's RNG and clock are its saved copy's)."""
    from ..channel.identity import host_identity

    assert ctx.client is not None
    if ctx.boot.source == restore.SNAPSHOT:
        ctx.client.reseed(host_identity(ctx.record.name), copy=True)
        return
    config = init_config(ctx)
    if ctx.boot.source == restore.TEMPLATE:  # the first call to this agent (guest_connect)
        try:
            ctx.client.init({**config, "identity": host_identity(ctx.record.name)},
                            first=True, timeout=_agent_wait(ctx))
            return
        except AgentUnreachable as exc:
            _boot_instead(ctx, exc)
            template_save(ctx)  # as a start that gave the template up in guest_connect
    ctx.client.init({**config, "identity": host_identity(ctx.record.name)})


def network_setup(ctx: StartContext) -> None:
    """The box network, if the box has a policy or published ports: the guest's side
    (address, redirect, resolver; agent/network.py) then the host's relay
    (network/relay.py), which judges every connection and query. Done at every start, after
    Init, so a box restored from a template gets its own network, never a saved one."""
    options = ctx.record.options
    policy = options.network
    from ..network.policy import (
        GUEST_IP,
        GUEST_PREFIX,
        HOST_ALIAS_GUEST_IP,
        HOST_ALIAS_NAME,
        RESOLVER_GUEST_IP,
        NetworkMode,
    )

    if policy.mode is NetworkMode.NONE and not options.ports:
        return
    from ..network.relayctl import RelayConfig, spawn_relay

    assert ctx.client is not None
    # the relay's interpreter starts while the guest sets its side up
    relay = spawn_relay(ctx.box_dir, RelayConfig(box=ctx.record.name, policy=policy,
                                                 ports=options.ports))
    try:
        ctx.client.configure_network(
            address=f"{GUEST_IP}/{GUEST_PREFIX}", resolver=RESOLVER_GUEST_IP,
            hosts=[(HOST_ALIAS_GUEST_IP, [HOST_ALIAS_NAME])] if policy.allows_host_alias
            else [],
            egress=policy.mode is not NetworkMode.NONE,
            udp_networks=policy.udp_networks,
        )
        info = relay.wait()
    except BaseException:
        relay.cancel()
        raise
    ctx.published = list(info.get("ports", []))


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
    Stage("template_save", template_save),
    Stage("guest_init", guest_init),
    Stage("network", network_setup),
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

