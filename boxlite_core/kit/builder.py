"""Build, cache and find guest kits.

Layout under `home/cache/guest-kit/`:

    kits/<kit_id>/      finished kits: vmlinux, initrd.img, guest-root.ext4, manifest.json, kit.json
    base/<base_id>/     mmdebstrap root (the slow, ~30 s layer), reused across agent edits
    kernel/<key>/       vmlinux + the module closure from one kernel .deb
    wheels/             downloaded wheels; wheels/site-<id>/ unpacked
    debs/               downloaded .debs
    tmp/                builds in progress (renamed into place when complete)

`kit_id` hashes only local inputs (the recipe, the host's grpcio/protobuf versions, the agent
and proto sources, and this package's own sources), so `find_kit` needs no network and an
edited agent or builder yields a new kit. Which package *versions* apt resolved is recorded in
the manifest, not hashed: the recipe names packages, the manifest says what went in.
Builds hold an exclusive flock on `.lock`, build in tmp/ and rename, so a half-built kit is
never visible and two processes never build at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import attrs

from ..diskspace import GIB, ensure_free
from ..errors import ConfigError, ImageError
from ..fscopy import copy_file
from ..runtime.savedstate import MANIFEST as SNAPSHOT_MANIFEST
from ..state.home import secure_home
from . import debian, guestroot, initramfs, kernel, modules
from .model import PROFILES, GuestKit, MachineProfile

Progress = Callable[[str, "float | None"], None]

KIT_FORMAT = 1
#: finished kits kept besides the current one
KEEP_KITS = 2
#: free space a kit build needs at its peak (measured: ~400 MiB of cache + staging)
KIT_BUILD_BYTES = 1 * GIB
#: bump to force a fresh mmdebstrap base for everyone
BASE_FORMAT = 1
SUITE = "bookworm"
KERNEL_PACKAGE: dict[str, str] = {"amd64": "linux-image-amd64", "arm64": "linux-image-arm64"}
BUSYBOX_PACKAGE = "busybox-static"
#: host distributions whose exact versions go into the guest (the stubs are generated with them)
WHEEL_DISTRIBUTIONS: tuple[str, ...] = ("grpcio", "protobuf", "typing_extensions")
WHEEL_PLATFORM: dict[str, str] = {"amd64": "manylinux2014_x86_64",
                                  "arm64": "manylinux2014_aarch64"}
#: the guest root's python (Debian 12); the wheels are fetched for it
GUEST_PYTHON: tuple[int, int] = (3, 11)

KERNEL_FILE = "vmlinux"
INITRD_FILE = "initrd.img"
ROOT_FILE = "guest-root.ext4"
MANIFEST_FILE = "manifest.json"
KIT_FILE = "kit.json"


def kit_cache_dir(home: Path) -> Path:
    return Path(home) / "cache" / "guest-kit"


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _default_source_root() -> Path:
    """The directory holding the `boxlite_core` package this code runs from."""
    return Path(__file__).resolve().parents[2]


#: the packages that run in the guest: the agent and the wire protocol it shares with the host
GUEST_PACKAGES = ("agent", "proto")


def agent_files(source_root: Path | None = None) -> dict[str, bytes]:
    """Guest-side sources, keyed by their path under /opt/boxlite.

    `boxlite_core/__init__.py` is written empty: the host's one imports attrs and friends,
    which the guest does not have. Only :data:`GUEST_PACKAGES` are copied: nothing else of
    boxlite_core exists in the guest.
    """
    root = Path(source_root) if source_root is not None else _default_source_root()
    core = root / "boxlite_core"
    if not (core / "agent").is_dir():
        raise ConfigError(f"guest kit: no guest agent at {core / 'agent'}; the kit needs "
                          "boxlite_core/agent (python3 -m boxlite_core.agent)")
    files: dict[str, bytes] = {"boxlite_core/__init__.py": b""}
    for sub in GUEST_PACKAGES:
        for path in sorted((core / sub).rglob("*.py")):
            if "__pycache__" not in path.parts:
                files[path.relative_to(root).as_posix()] = path.read_bytes()
    return files


def host_wheel_pins() -> dict[str, str]:
    """The host's installed versions of the guest's Python dependencies."""
    pins = {}
    for name in WHEEL_DISTRIBUTIONS:
        try:
            pins[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            raise ConfigError(f"guest kit: {name} is not installed on the host; "
                              f"pip install {name}") from None
    return pins


def _sources_digest(names: tuple[str, ...] | None = None) -> str:
    h = hashlib.sha256()
    here = Path(__file__).parent
    paths = [here / n for n in names] if names else here.glob("*.py")
    for path in sorted(paths):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


@attrs.frozen
class KitRecipe:
    """Every input of a kit; its digest is the kit_id."""

    arch: str
    deb_arch: str
    suite: str
    kernel_package: str
    busybox_package: str
    base_packages: tuple[str, ...]
    guest_modules: tuple[str, ...]
    wheel_pins: Mapping[str, str]
    agent: Mapping[str, bytes] = attrs.field(repr=False)

    @classmethod
    def current(cls, arch: str = "x86_64", source_root: Path | None = None) -> KitRecipe:
        deb_arch = debian.debian_arch(arch)
        return cls(arch=arch, deb_arch=deb_arch, suite=SUITE,
                   kernel_package=KERNEL_PACKAGE[deb_arch], busybox_package=BUSYBOX_PACKAGE,
                   base_packages=guestroot.BASE_PACKAGES, guest_modules=modules.GUEST_MODULES,
                   wheel_pins=host_wheel_pins(), agent=agent_files(source_root))

    def base_id(self) -> str:
        return _digest(["base", BASE_FORMAT, self.suite, self.deb_arch, self.base_packages,
                        guestroot.DPKG_EXCLUDES])[:20]

    def wheels_id(self) -> str:
        return _digest(["wheels", dict(self.wheel_pins), GUEST_PYTHON,
                        WHEEL_PLATFORM[self.deb_arch]])[:20]

    def kit_id(self) -> str:
        agent = {k: hashlib.sha256(v).hexdigest() for k, v in self.agent.items()}
        return _digest(["kit", KIT_FORMAT, self.arch, self.suite, self.kernel_package,
                        self.busybox_package, self.base_packages, self.guest_modules,
                        dict(self.wheel_pins), agent, _sources_digest()])[:24]


def select_profile(machine: str | None = None) -> tuple[MachineProfile, list[str]]:
    """The machine profile and the host-dependent cmdline words for it.

    microvm needs the host TSC rate; when /proc/cpuinfo does not tell it we fall back to q35,
    which is slower to boot but needs no such hint. BOXLITE_GUEST_MACHINE overrides.
    """
    name = machine or os.environ.get("BOXLITE_GUEST_MACHINE") or "microvm"
    if name not in PROFILES:
        raise ConfigError(f"guest kit: unknown machine {name!r}; known: {', '.join(PROFILES)}")
    profile = PROFILES[name]
    extra: list[str] = []
    if profile.needs_tsc_khz:
        khz = kernel.host_tsc_khz()
        if khz is None:
            if machine:
                raise ConfigError("guest kit: cannot read the host TSC rate for microvm; "
                                  "use machine q35")
            return select_profile("q35")
        extra.append(f"tsc_early_khz={khz}")
    return profile, extra


def _load(kit_dir: Path, machine: str | None = None) -> GuestKit | None:
    try:
        info = json.loads((kit_dir / KIT_FILE).read_text())
    except (OSError, ValueError):
        return None
    paths = [kit_dir / name for name in (KERNEL_FILE, INITRD_FILE, ROOT_FILE, MANIFEST_FILE)]
    if not all(p.is_file() for p in paths):
        return None
    profile, extra = select_profile(machine)
    return GuestKit(
        kit_id=info["kit_id"], directory=kit_dir, kernel=paths[0], initrd=paths[1],
        root_image=paths[2], cmdline=" ".join([*profile.cmdline, *extra]),
        machine=profile.machine, qemu_globals=profile.qemu_globals, arch=info["arch"],
        manifest=paths[3], virtio_transport=profile.virtio_transport,
    )


def kit_by_id(home: Path, kit_id: str, *, machine: str | None = None) -> GuestKit | None:
    """The built kit ``kit_id`` if it is still in the cache (a snapshot's VM runs the kit
    it was saved with, whatever the current one is), else None."""
    if not kit_id or "/" in kit_id or kit_id.startswith("."):
        return None
    return _load(kit_cache_dir(home) / "kits" / kit_id, machine)


def kits_of_snapshots(home: Path) -> set[str]:
    """Kit ids snapshots under ``HOME/snapshots`` were saved with: a kit rebuild keeps them
    (their VMs need that kernel and root image to be restored). Read from each snapshot's
    sealed manifest (runtime/savedstate.py MANIFEST, ``meta.kit_id``)."""
    out = set()
    for manifest in Path(home).glob(f"snapshots/*/vm/{SNAPSHOT_MANIFEST}"):
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            out.add(str(json.loads(manifest.read_text())["meta"]["kit_id"]))
    return out


def find_kit(home: Path, arch: str = "x86_64", *, machine: str | None = None,
             source_root: Path | None = None) -> GuestKit | None:
    """The built kit for the current inputs, or None. Cheap: hashes local files only."""
    recipe = KitRecipe.current(arch, source_root)
    return _load(kit_cache_dir(home) / "kits" / recipe.kit_id(), machine)


def ensure_kit(home: Path, arch: str = "x86_64", progress: Progress | None = None, *,
               machine: str | None = None, source_root: Path | None = None) -> GuestKit:
    """Find the kit for the current inputs, building it if needed."""
    kit = find_kit(home, arch, machine=machine, source_root=source_root)
    if kit is not None:
        return kit
    return build_kit(home, arch, progress, machine=machine, source_root=source_root)


@contextlib.contextmanager
def _locked(cache: Path) -> Iterator[None]:
    cache.mkdir(parents=True, exist_ok=True)
    with (cache / ".lock").open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def build_kit(home: Path, arch: str = "x86_64", progress: Progress | None = None,
              force: bool = False, *, machine: str | None = None,
              source_root: Path | None = None) -> GuestKit:
    """Build the kit for the current inputs (or return it if another process just did).

    `force` rebuilds the final kit and re-downloads .debs; the mmdebstrap base is kept
    (delete cache/guest-kit/base to redo it).
    """
    report: Progress = progress or (lambda _msg, _frac: None)
    recipe = KitRecipe.current(arch, source_root)
    cache = kit_cache_dir(home)
    kit_id = recipe.kit_id()
    final = cache / "kits" / kit_id
    secure_home(Path(home))
    with _locked(cache):
        if not force:
            kit = _load(final, machine)
            if kit is not None:
                return kit
        # base root + .debs + kernel + staging peak near 1 GiB: refuse before, not at ENOSPC
        ensure_free(cache, KIT_BUILD_BYTES, f"building guest kit {kit_id}")
        tmp_root = cache / "tmp"
        if tmp_root.exists():  # we hold the lock: anything here is from a crashed build
            shutil.rmtree(tmp_root)
        tmp_root.mkdir(parents=True)
        work = tmp_root / f"kit-{kit_id}"
        work.mkdir()
        try:
            _build(recipe, cache, work, report, force)
            if final.exists():
                shutil.rmtree(final)
            final.parent.mkdir(parents=True, exist_ok=True)
            os.rename(work / "out", final)
            _prune(final.parent, keep={final.name, *kits_of_snapshots(home)}, newest=KEEP_KITS)
        finally:
            shutil.rmtree(tmp_root, ignore_errors=True)
    kit = _load(final, machine)
    if kit is None:
        raise ImageError(f"guest kit {kit_id}: build finished but {final} is incomplete")
    report("guest kit ready", 1.0)
    return kit


def _prune(parent: Path, keep: set[str], newest: int) -> None:
    """Remove cache entries under `parent` except `keep` and the `newest` most recent others.

    Old kits are kept a while (a running box may still use one); old kernel layers are not.
    """
    others = sorted((p for p in parent.iterdir() if p.name not in keep),
                    key=lambda p: p.stat().st_mtime, reverse=True)
    for path in others[newest:]:
        shutil.rmtree(path, ignore_errors=True)


def _cached_deb(debs: Path, package: str, deb_arch: str, force: bool) -> Path:
    matches = sorted(debs.glob(f"{package}_*_{deb_arch}.deb"))
    if matches and not force:
        return matches[-1]
    for old in matches:
        old.unlink()
    return debian.download([package], deb_arch, debs)[0]


def _kernel_layer(recipe: KitRecipe, cache: Path, work: Path, report: Progress,
                  force: bool) -> tuple[Path, dict[str, Any]]:
    """vmlinux + the module closure of the kernel package, cached per .deb."""
    report(f"resolving {recipe.kernel_package}", 0.02)
    real = debian.resolve_dependency(recipe.kernel_package, recipe.deb_arch, "linux-image-")
    report(f"downloading {real} (apt-get download)", 0.05)
    deb = _cached_deb(cache / "debs", real, recipe.deb_arch, force)
    key = _digest(["kernel", deb.name, recipe.guest_modules,
                   _sources_digest(("kernel.py", "modules.py", "debian.py"))])[:20]
    layer = cache / "kernel" / key
    if (layer / "kernel.json").is_file() and not force:
        return layer, json.loads((layer / "kernel.json").read_text())
    report(f"extracting {deb.name}", 0.12)
    unpacked = work / "kernel-deb"
    debian.extract(deb, unpacked)
    bzimages = sorted((unpacked / "boot").glob("vmlinuz-*"))
    if not bzimages:
        raise ImageError(f"guest kit: {deb.name} holds no /boot/vmlinuz-*")
    release = bzimages[0].name.removeprefix("vmlinuz-")
    module_root = unpacked / "lib" / "modules" / release
    report("computing module dependencies", 0.18)
    modules.write_modules_dep(module_root)
    dep = modules.parse_modules_dep((module_root / "modules.dep").read_text())
    builtin_file = module_root / "modules.builtin"
    builtin = builtin_file.read_text().split() if builtin_file.is_file() else []
    order = modules.module_closure(dep, recipe.guest_modules, builtin)
    tmp_layer = work / "kernel-layer"
    (tmp_layer / "modules").mkdir(parents=True)
    report("unpacking vmlinux from the bzImage", 0.22)
    kernel.write_kernel(bzimages[0], tmp_layer / KERNEL_FILE, uncompressed=True)
    for rel in order:
        target = tmp_layer / "modules" / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        copy_file(module_root / rel, target, "guest kit modules", preserve=False)
    pkg, version = debian.package_info(deb)
    info = {"package": pkg, "version": version, "release": release, "modules": order,
            "format": "elf-vmlinux", "bzimage_compression":
                kernel.payload_format(bzimages[0].read_bytes())[0]}
    (tmp_layer / "kernel.json").write_text(json.dumps(info, indent=2))
    shutil.rmtree(unpacked)
    if layer.exists():
        shutil.rmtree(layer)
    layer.parent.mkdir(parents=True, exist_ok=True)
    os.rename(tmp_layer, layer)
    _prune(layer.parent, keep={layer.name}, newest=0)
    return layer, info


def _base_layer(recipe: KitRecipe, cache: Path, work: Path,
                report: Progress) -> tuple[Path, list[dict[str, str]]]:
    layer = cache / "base" / recipe.base_id()
    if (layer / "base.json").is_file():
        return layer / "root", json.loads((layer / "base.json").read_text())["packages"]
    report(f"bootstrapping the guest root (mmdebstrap {recipe.suite}, ~30 s)", 0.3)
    tmp_layer = work / "base-layer"
    tmp_layer.mkdir()
    packages = guestroot.build_base(tmp_layer / "root", recipe.suite, recipe.deb_arch,
                                    recipe.base_packages)
    (tmp_layer / "base.json").write_text(json.dumps(
        {"suite": recipe.suite, "arch": recipe.deb_arch, "include": recipe.base_packages,
         "packages": packages}, indent=2))
    layer.parent.mkdir(parents=True, exist_ok=True)
    os.rename(tmp_layer, layer)
    _prune(layer.parent, keep={layer.name}, newest=0)
    return layer / "root", packages


def _wheels_layer(recipe: KitRecipe, cache: Path, work: Path,
                  report: Progress) -> tuple[Path, list[dict[str, str]]]:
    site = cache / "wheels" / f"site-{recipe.wheels_id()}"
    if (site.parent / f"{site.name}.json").is_file() and site.is_dir():
        return site, json.loads((site.parent / f"{site.name}.json").read_text())
    report("downloading grpcio/protobuf wheels (pip download)", 0.6)
    wheels = guestroot.download_wheels(recipe.wheel_pins, cache / "wheels", GUEST_PYTHON,
                                       WHEEL_PLATFORM[recipe.deb_arch])
    tmp_site = work / "site"
    guestroot.unpack_wheels(wheels, tmp_site)
    info = [{"name": name, "version": recipe.wheel_pins[name], "file": w.name,
             "sha256": guestroot.file_sha256(w)}
            for name, w in zip(sorted(recipe.wheel_pins), wheels, strict=True)]
    if site.exists():
        shutil.rmtree(site)
    os.rename(tmp_site, site)
    (site.parent / f"{site.name}.json").write_text(json.dumps(info, indent=2))
    return site, info


def _build(recipe: KitRecipe, cache: Path, work: Path, report: Progress, force: bool) -> None:
    started = time.monotonic()
    out = work / "out"
    out.mkdir()
    kernel_layer, kernel_info = _kernel_layer(recipe, cache, work, report, force)
    try:
        os.link(kernel_layer / KERNEL_FILE, out / KERNEL_FILE)
    except OSError:
        copy_file(kernel_layer / KERNEL_FILE, out / KERNEL_FILE, "guest kit kernel",
                  preserve=False)

    report(f"downloading {recipe.busybox_package}", 0.26)
    bb_deb = _cached_deb(cache / "debs", recipe.busybox_package, recipe.deb_arch, force)
    bb_dir = work / "busybox"
    debian.extract(bb_deb, bb_dir)
    busybox = bb_dir / "bin" / "busybox"
    if not busybox.is_file():
        raise ImageError(f"guest kit: {bb_deb.name} holds no /bin/busybox")

    base_root, base_packages = _base_layer(recipe, cache, work, report)
    site, wheels = _wheels_layer(recipe, cache, work, report)

    report("writing the initramfs", 0.7)
    always, vsock = modules.split_vsock(kernel_info["modules"])
    initramfs.build_initramfs(out / INITRD_FILE, busybox, kernel_layer / "modules",
                              always, vsock)

    report("assembling the guest root (base + wheels + agent, byte-compiled)", 0.78)
    stage = work / "stage"
    guestroot.assemble_stage(stage, base_root, site, recipe.agent, initramfs.AGENT_DIR)
    report("writing the guest root image (mkfs.ext4)", 0.9)
    image_size = guestroot.make_image(stage, out / ROOT_FILE)
    shutil.rmtree(stage)

    bb_name, bb_version = debian.package_info(bb_deb)
    kit_id = recipe.kit_id()
    manifest = {
        "kit_id": kit_id,
        "kit_format": KIT_FORMAT,
        "arch": recipe.arch,
        "debian": {"suite": recipe.suite, "arch": recipe.deb_arch},
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "build_seconds": round(time.monotonic() - started, 1),
        "kernel": kernel_info,
        "initramfs": {"busybox": {"name": bb_name, "version": bb_version},
                      "compression": "none", "modules": always,
                      "vsock_modules": vsock},
        "packages": (
            [{"name": kernel_info["package"], "version": kernel_info["version"],
              "source": "apt-get download"},
             {"name": bb_name, "version": bb_version, "source": "apt-get download"}]
            + [{**p, "source": "mmdebstrap"} for p in base_packages]
        ),
        "wheels": wheels,
        "agent_files": sorted(recipe.agent),
        "machines": {name: p.to_dict() for name, p in PROFILES.items()},
        "sizes": {name: (out / name).stat().st_size
                  for name in (KERNEL_FILE, INITRD_FILE, ROOT_FILE)},
        "root_image_bytes": image_size,
    }
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    (out / KIT_FILE).write_text(json.dumps({"kit_id": kit_id, "arch": recipe.arch}) + "\n")
