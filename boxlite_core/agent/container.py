"""Init: mount the container rootfs and volumes, and the pseudo-filesystems inside it.

Why the agent mounts (not the host): only the guest sees its disks and shares; the host sends
*what* to mount (disk serial, share tag) because device names inside the guest are not stable.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from ..proto.wire import RESERVED_GUEST_DIRS
from . import libc, rootpath
from .blockdev import flush_block_device
from .pid1 import log

NINEP_OPTS = "trans=virtio,version=9p2000.L,msize=512000"
# Rootfs: the host does not change it while the box runs, so loose caching is safe and fast.
NINEP_ROOT_CACHE = "cache=loose"
# Volumes: the host may edit files concurrently; mmap keeps coherency and allows mmap(2).
NINEP_VOLUME_CACHE = "cache=mmap"
DEV_NODES = ("null", "zero", "full", "random", "urandom", "tty")


def find_disk(serial: str) -> str:
    """/sys/block/vd*/serial == serial → /dev/vdX (devtmpfs names, no udev in the guest)."""
    for entry in sorted(Path("/sys/block").glob("vd*")):
        try:
            if (entry / "serial").read_text().strip() == serial:
                return f"/dev/{entry.name}"
        except OSError:
            continue
    raise FileNotFoundError(f"no virtio-blk disk with serial {serial!r} in /sys/block/vd*")


def fresh_disk(serial: str) -> str:
    """find_disk, its buffer cache dropped: a template-restored guest may hold sectors of the
    disk the template was made with (blockdev.flush_block_device; a failure is logged)."""
    disk = find_disk(serial)
    flush_block_device(disk)
    return disk


def mount_share(
    tag: str, fstype: str, target: str, *, read_only: bool, options: str, volume: bool
) -> None:
    flags = libc.MS_RDONLY if read_only else 0
    if fstype == "9p":
        cache = NINEP_VOLUME_CACHE if volume else NINEP_ROOT_CACHE
        libc.mount(tag, target, "9p", flags, ",".join(o for o in (NINEP_OPTS, cache, options) if o))
    elif fstype == "virtiofs":
        libc.mount(tag, target, "virtiofs", flags, options)
    elif fstype == "bind":
        libc.mount(tag, target, None, libc.MS_BIND | libc.MS_REC)
        if read_only:
            # A bind mount ignores MS_RDONLY on creation; it takes a remount to apply.
            libc.mount("none", target, None, libc.MS_BIND | libc.MS_REMOUNT | libc.MS_RDONLY)
    else:
        raise ValueError(f"unknown share fstype {fstype!r} (expected 9p, virtiofs or bind)")


def safe_join(root: str, path: str) -> str:
    """root + path, refusing '..' and symlinks in the way (the image is untrusted)."""
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ValueError(f"path {path!r} must not contain '..'")
    current = root
    for part in parts:
        current = os.path.join(current, part)
        if os.path.islink(current):
            raise ValueError(f"path {path!r} goes through a symlink in the container ({part!r})")
    return current


def volume_target(root: str, guest_path: str) -> str:
    """Where a volume for ``guest_path`` mounts: the path resolved inside the container's
    root with chroot semantics (rootpath.resolve: ``/var/run -> /run`` is followed, an
    absolute link restarts at the root, ``..`` stops there), missing directories created.

    Raises:
        ValueError: the path is relative, resolves to the root or into a reserved directory
            (/dev, /proc, /sys: a symlink in the image may lead there), meets a file or a
            link cycle, or cannot be created; the message names the volume's path.
    """
    what = f"volume guest path {guest_path!r}"
    if not guest_path.startswith("/"):
        raise ValueError(f"{what} must be absolute")
    try:
        target, _created = rootpath.resolve(root, guest_path, create=True)
    except OSError as exc:
        raise ValueError(f"{what}: {rootpath.describe(exc, guest_path)}") from None
    inside = rootpath.in_container(root, target)
    via = "" if inside == rootpath.normal(guest_path) else " (through a symlink in the image)"
    if inside == "/":
        raise ValueError(f"{what} resolves to the container's root{via}; mount it elsewhere")
    for reserved in RESERVED_GUEST_DIRS:
        if inside == reserved or inside.startswith(reserved + "/"):
            raise ValueError(f"{what} resolves to {inside}{via}: {reserved} is reserved for "
                             "the guest kernel; mount the volume elsewhere")
    return target


def _mkdirs(path: str, mode: int = 0o755) -> None:
    os.makedirs(path, mode=mode, exist_ok=True)


def _touch(path: str) -> None:
    if not os.path.exists(path):
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY | os.O_NOFOLLOW, 0o644))


def _device_node(source: str, target: str) -> None:
    """``target`` as the same device as ``source``: a new node (mknod, what runc does for a
    container's default devices), else a bind mount of ``source`` (no CAP_MKNOD: a native
    agent in tests). Nodes, not mounts: every exec copies the container's mount table into
    its own namespace and walks it (MS_PRIVATE|MS_REC), and six mounts fewer made a restored
    guest's Init and first exec cheaper."""
    try:
        st = os.stat(source)
    except FileNotFoundError:
        return
    try:
        os.mknod(target, stat.S_IFCHR | 0o666, st.st_rdev)
        os.chmod(target, stat.S_IMODE(st.st_mode))  # the umask may have taken bits
    except PermissionError:
        _touch(target)
        libc.mount(source, target, None, libc.MS_BIND)


def setup_pseudo_fs(root: str) -> None:
    """/dev (minimal: a tmpfs with bind-mounted nodes), /dev/pts, /dev/shm, /tmp, /sys (ro).

    Not the guest's devtmpfs: it would expose the guest's disks to the container.
    """
    dev = safe_join(root, "dev")
    _mkdirs(dev)
    libc.mount("tmpfs", dev, "tmpfs", libc.MS_NOSUID | libc.MS_NOEXEC, "mode=755,size=65536k")
    for node in DEV_NODES:
        _device_node(f"/dev/{node}", f"{dev}/{node}")
    _mkdirs(f"{dev}/pts")
    try:
        libc.mount(
            "devpts",
            f"{dev}/pts",
            "devpts",
            libc.MS_NOSUID | libc.MS_NOEXEC,
            "newinstance,ptmxmode=0666,mode=620,gid=5",
        )
        os.symlink("pts/ptmx", f"{dev}/ptmx")
    except OSError as exc:
        log(f"warning: devpts in the container: {exc}")
    _mkdirs(f"{dev}/shm", 0o1777)
    libc.mount("shm", f"{dev}/shm", "tmpfs", libc.MS_NOSUID | libc.MS_NODEV, "mode=1777")
    for name, target in (
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ):
        os.symlink(target, f"{dev}/{name}")
    tmp = safe_join(root, "tmp")
    _mkdirs(tmp, 0o1777)
    libc.mount("tmpfs", tmp, "tmpfs", libc.MS_NOSUID | libc.MS_NODEV, "mode=1777")
    sys_dir = safe_join(root, "sys")
    _mkdirs(sys_dir)
    try:
        libc.mount(
            "sysfs",
            sys_dir,
            "sysfs",
            libc.MS_RDONLY | libc.MS_NOSUID | libc.MS_NODEV | libc.MS_NOEXEC,
        )
    except OSError as exc:  # not permitted in some native test environments
        log(f"warning: sysfs in the container: {exc}")
    _mkdirs(safe_join(root, "proc"), 0o555)  # each exec mounts its own /proc (own pid ns)


def overlay_options(lowers: list[str], upper_mnt: str) -> str:
    """The overlayfs mount options for ``lowers`` (bottom first) under UPPER/upper.

    ``userxattr``: overlayfs reads and writes its metadata (``opaque``) as ``user.overlay.*``
    (Linux >= 5.11; the kit's kernel is 6.1). The layers come through virtiofs or 9p, and
    ``trusted.*`` xattrs do not reach the guest that way, so with the default namespace an
    opaque directory showed the lower entries again. The host writes the same names
    (images/overlay_view.py).
    """
    # overlayfs lists the *top* lower layer first; the request lists the bottom first.
    lowerdir = ":".join(reversed(lowers))
    return f"lowerdir={lowerdir},upperdir={upper_mnt}/upper,workdir={upper_mnt}/work,userxattr"


def init_container(state_dir: str, cfg) -> str:
    """Mount everything an InitRequest describes; return the container root path."""
    root = os.path.join(state_dir, "rootfs")
    _mkdirs(root)
    kind = cfg.WhichOneof("rootfs")
    if kind == "disk":
        disk = fresh_disk(cfg.disk.serial)
        libc.mount(
            disk, root, cfg.disk.fstype or "ext4", libc.MS_RDONLY if cfg.disk.read_only else 0
        )
    elif kind == "share":
        mount_share(
            cfg.share.tag,
            cfg.share.fstype,
            root,
            read_only=False,
            options=cfg.share.options,
            volume=False,
        )
    elif kind == "layers":
        lowers = []
        for i, layer in enumerate(cfg.layers.layers):
            target = os.path.join(state_dir, "layers", str(i))
            _mkdirs(target)
            mount_share(
                layer.tag, layer.fstype, target, read_only=True, options=layer.options, volume=False
            )
            lowers.append(target)
        upper_mnt = os.path.join(state_dir, "upper")
        _mkdirs(upper_mnt)
        if cfg.layers.upper_serial:
            libc.mount(
                fresh_disk(cfg.layers.upper_serial), upper_mnt, cfg.layers.upper_fstype or "ext4"
            )
        else:  # no disk given: a tmpfs upper (changes are lost at shutdown)
            libc.mount("tmpfs", upper_mnt, "tmpfs", 0, "mode=755")
        _mkdirs(f"{upper_mnt}/upper")
        _mkdirs(f"{upper_mnt}/work")
        libc.mount("overlay", root, "overlay", 0, overlay_options(lowers, upper_mnt))
    else:
        raise ValueError("InitRequest has no rootfs (set disk, share or layers)")
    setup_pseudo_fs(root)
    for vol in cfg.volumes:
        target = volume_target(root, vol.guest_path)
        mount_share(
            vol.tag, vol.fstype, target, read_only=vol.read_only, options=vol.options, volume=True
        )
    hostname = cfg.hostname or cfg.identity.hostname  # identity's: already set, not yet written
    if hostname:
        libc.sethostname(hostname)
        try:
            with open(safe_join(root, "etc/hostname"), "w") as fh:
                fh.write(hostname + "\n")
        except (OSError, ValueError):
            pass  # read-only or missing /etc: the kernel hostname is what counts
    return root


def unmount_all(state_dir: str) -> None:
    """Unmount everything under state_dir, deepest first (best effort, for Shutdown)."""
    prefix = state_dir.rstrip("/") + "/"
    try:
        with open("/proc/self/mounts") as fh:
            targets = [line.split()[1] for line in fh]
    except OSError:
        return
    targets = [t.replace("\\040", " ") for t in targets if t.startswith(prefix)]
    for target in sorted(set(targets), key=len, reverse=True):
        try:
            libc.umount(target)
        except OSError:
            try:
                libc.umount(target, libc.MNT_DETACH)
            except OSError as exc:
                log(f"umount {target}: {exc}")
