"""Memory images: a saved VM whose guest RAM is a file that every restore maps copy-on-write.

Why: a boot template is restored by every start of its configuration, often by several boxes
at once. Restored from a migration stream, each QEMU copies the whole saved memory (~120 MiB
for a 512 MiB guest: 75-85 ms of a start under TCG here, more on a busy host) into its own
anonymous RAM, and each box then holds its private copy of pages none of them ever changes
(the kernel, the agent's interpreter and libraries). Restored from a memory image, QEMU maps
the file ``MAP_PRIVATE`` (``memory-backend-file,share=off``): nothing is copied at start, a
page is read from the page cache when the guest first touches it, copied only when the guest
writes it, and the pages no box writes are one copy in the host's page cache for all of them.

How, with QEMU's own migration (QEMU ≥ 4.0; ``docs/devel/migration.rst``, capability
``x-ignore-shared``): a RAM block backed by a *shared* file is skipped by a migration with
``x-ignore-shared`` on; both ends must set it, and the destination must back the block with
the same memory. A box saves its template as a normal stream (its RAM is anonymous: a
shared file behind a running box would write its memory to disk). :func:`materialize` then
loads that stream into a second, never-running QEMU whose RAM is a shared file, the image,
and saves that QEMU again with ``x-ignore-shared``: the result is the image plus a device
state of ~0.2 MiB. A restore maps the image private under the RAM block's name (the
machine's default RAM id, e.g. ``microvm.ram``, so the name in the device state matches) and
loads the device state with ``x-ignore-shared`` on.

The image's apparent size is the guest's memory; only the pages the stream carried take disk
(pages that were zero stay holes). QEMU 7.2 opens a ``mem-path`` read-write even for a private
mapping (``file_ram_open``; ``readonly=on`` maps it read-only, which a guest cannot run on),
and the core seals template files 0400: only a root QEMU (CAP_DAC_OVERRIDE) can open a sealed
image, so images are made only when running as root (:func:`usable`). QEMU never writes the
file (``MAP_PRIVATE``). QEMU 8.2's ``rom=off`` with ``readonly=on`` would lift that limit.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from boxlite_core.errors import EngineError
from boxlite_core.models import JsonObject
from boxlite_core.vmm.procstat import log_tail

from .argv import STATE_INFO
from .handle import MIGRATION_FD, migration_bound, migration_finished
from .qmp import Poll, QmpError, qmp_command, qmp_poll

#: in a saved-state directory: the guest RAM (sparse, the guest's memory size) and the device
#: state saved without it (``x-ignore-shared``)
RAM_IMAGE = "qemu-ram"
DEVICE_STATE = "qemu-devstate"
#: the migration capability both ends set (QEMU's name: still experimental in 7.2)
IGNORE_SHARED = "x-ignore-shared"
#: seconds the helper QEMU gets to answer QMP, and to exit after ``quit``
HELPER_START_BOUND = 30.0
HELPER_EXIT_BOUND = 10.0


def saved_memory_image(directory: Path) -> JsonObject | None:
    """The ``"memory_image"`` facts of the state saved in ``directory`` (its
    ``qemu-state.json``, written by ``QemuHandle.save_state``), or None: a stream-only state
    (a snapshot, or a template whose image could not be made), or no readable facts (the
    restore then looks for the stream and fails naming it)."""
    try:
        facts = json.loads((directory / STATE_INFO).read_text())
    except (OSError, ValueError):
        return None
    image = facts.get("memory_image") if isinstance(facts, dict) else None
    if not isinstance(image, dict):
        return None
    names = ("ram_image", "device_state", "ram_id")
    if not all(isinstance(image.get(n), str) and image[n] for n in names):
        return None
    return image


def usable() -> str | None:
    """Why this process cannot restore from a memory image, or None when it can: the image is
    sealed 0400 and QEMU opens it read-write (module docstring), which only root may."""
    if os.geteuid() != 0:
        return ("QEMU 7.2 opens a memory image read-write and templates are sealed read-only "
                "(0400): only root may; restores load the stream instead")
    return None


def default_ram_id(machine: str) -> str | None:
    """The name QEMU gives a machine's main RAM block when no ``memory-backend`` is set
    (``MachineClass.default_ram_id`` in QEMU's hw/: microvm ``microvm.ram``, pc/q35
    ``pc.ram``, arm virt ``mach-virt.ram``): a memory image's backend must carry that id, or
    the stream saved without one names a block the restoring QEMU lacks. None: a machine
    this module does not know (no image is made).

    ``machine`` is the ``-machine`` value (``microvm,isa-serial=on``, ``q35``,
    ``pc-q35-7.2``).
    """
    name = machine.split(",", 1)[0]
    if name == "microvm":
        return "microvm.ram"
    if name in ("q35", "pc") or name.startswith(("pc-q35", "pc-i440fx")):
        return "pc.ram"
    if name == "virt" or name.startswith("virt-"):
        return "mach-virt.ram"
    return None


def memory_object(ram_id: str, memory_mib: int, image: Path | str, *, shared: bool) -> str:
    """The ``-object`` value backing RAM block ``ram_id`` with ``image``: shared (the
    helper fills the file) or private (a restore: copy-on-write)."""
    path = os.fspath(image).replace(",", ",,")
    return (f"memory-backend-file,id={ram_id},size={memory_mib}M,mem-path={path},"
            f"share={'on' if shared else 'off'}")


def with_memory_image(argv: Sequence[str], ram_id: str, memory_mib: int, image: Path | str,
                      *, shared: bool) -> list[str]:
    """``argv`` with guest RAM backed by ``image``: ``memory-backend=ram_id`` appended to
    ``-machine`` and the backend object placed after ``-m``.

    Raises:
        ValueError: ``argv`` has no ``-machine`` or ``-m``, or already names a memory
            backend (a virtiofs VM's memfd: such a VM is never saved).
    """
    out = list(argv)
    try:
        machine_at = out.index("-machine") + 1
        memory_at = out.index("-m") + 1
    except ValueError:
        raise ValueError("QEMU argv without -machine or -m") from None
    if "memory-backend=" in out[machine_at]:
        raise ValueError(f"-machine {out[machine_at]} already names a memory backend")
    out[machine_at] += f",memory-backend={ram_id}"
    out[memory_at + 1:memory_at + 1] = [
        "-object", memory_object(ram_id, memory_mib, image, shared=shared)]
    return out


def helper_argv(argv: Sequence[str], *, ram_id: str, memory_mib: int, image: Path,
                sockets: Path) -> list[str]:
    """The argv of the helper QEMU that turns a stream into an image, from the argv of the
    VM that saved it: the same machine, CPU and devices (a migration loads only into the
    same device layout), with

    * guest RAM on ``image``, shared (the stream's pages land in the file);
    * every character device a fresh unconnected socket under ``sockets`` (QMP among them:
      ``sockets/qmp``), so the port states saved again are "no host attached", as in the
      stream (a restored guest then sees its new host arrive);
    * every drive the ``null-co`` driver with its other options (read-only, cache) kept:
      the device state does not depend on the image behind a drive, and the saving box's
      disks are open in its own QEMU;
    * no pidfile, and ``-incoming defer``.
    """
    out: list[str] = []
    items = list(argv)
    index = 0
    while index < len(items):
        arg = items[index]
        value = items[index + 1] if index + 1 < len(items) else ""
        if arg in ("-pidfile", "-incoming"):
            index += 2
            continue
        if arg == "-chardev" and value.startswith("socket,"):
            chardev = _option(value, "id")
            out += [arg, f"socket,id={chardev},path={sockets / chardev},server=on,wait=off"]
            index += 2
            continue
        if arg == "-drive":
            kept = [o for o in _split(value) if not o.startswith(("file=", "format="))]
            out += [arg, ",".join(["driver=null-co", *kept])]
            index += 2
            continue
        out.append(arg)
        index += 1
    return [*with_memory_image(out, ram_id, memory_mib, image, shared=True),
            "-incoming", "defer"]


def _split(value: str) -> list[str]:
    """A QEMU option string's ``key=value`` items (``,,`` is an escaped comma)."""
    parts, current, index = [], "", 0
    while index < len(value):
        if value.startswith(",,", index):
            current += ",,"
            index += 2
        elif value[index] == ",":
            parts.append(current)
            current = ""
            index += 1
        else:
            current += value[index]
            index += 1
    parts.append(current)
    return parts


def _option(value: str, key: str) -> str:
    for part in _split(value):
        if part.startswith(key + "="):
            return part[len(key) + 1:]
    raise ValueError(f"QEMU option string {value!r} has no {key}=")


def materialize(directory: Path, stream: Path, argv: Sequence[str], *, machine: str,
                memory_bytes: int, timeout: float = 5.0) -> JsonObject:
    """Turn the migration ``stream`` saved by the VM that ran ``argv`` into
    ``directory/qemu-ram`` + ``directory/qemu-devstate`` (module docstring); the stream is
    left for the caller to drop. Returns what a restore needs: ``{"ram_image",
    "device_state", "ram_id", "memory_mib", "seconds", "image_bytes"}`` (``image_bytes``:
    bytes the image takes on disk).

    Bounded: the helper QEMU must answer QMP within :data:`HELPER_START_BOUND` s, each
    migration within its size-based bound, each QMP step within ``timeout``; it is killed
    on any failure or interruption and nothing is left but the caller's files.

    Raises:
        EngineError: an unknown machine, a memory size that is not whole MiB, or the helper
            failed (QEMU's last log lines are in the message).
    """
    started = time.monotonic()
    ram_id = default_ram_id(machine)
    if ram_id is None:
        raise EngineError(f"no memory image for machine {machine!r}: its RAM block name is "
                          "not known here")
    if memory_bytes <= 0 or memory_bytes % (1 << 20):
        raise EngineError(f"no memory image for a guest of {memory_bytes} bytes (whole MiB "
                          "only)")
    image, devstate = directory / RAM_IMAGE, directory / DEVICE_STATE
    work = Path(tempfile.mkdtemp(prefix="boxlite-memimage-"))
    log = work / "qemu.log"
    popen: subprocess.Popen[bytes] | None = None
    done = False
    try:
        fd = os.open(image, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, memory_bytes)  # sparse: QEMU wants the file at the RAM's size
        finally:
            os.close(fd)
        args = helper_argv(argv, ram_id=ram_id, memory_mib=memory_bytes >> 20, image=image,
                           sockets=work)
        with open(log, "wb") as out:
            popen = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=out,
                                     stderr=subprocess.STDOUT, close_fds=True,
                                     start_new_session=True)
        qmp = work / "qmp"
        _wait_monitor(popen, qmp, log)
        _load(qmp, stream, timeout)
        _save(qmp, devstate, memory_bytes, timeout)
        with contextlib.suppress(QmpError):
            qmp_command(qmp, "quit", timeout=timeout)
        try:
            popen.wait(HELPER_EXIT_BOUND)
        except subprocess.TimeoutExpired:
            raise EngineError(f"the memory-image QEMU (pid {popen.pid}) did not exit within "
                              f"{HELPER_EXIT_BOUND:g} s of quit") from None
        for path in (image, devstate):
            _fsync(path)
        done = True
        return {"ram_image": RAM_IMAGE, "device_state": DEVICE_STATE, "ram_id": ram_id,
                "memory_mib": memory_bytes >> 20,
                "seconds": round(time.monotonic() - started, 3),
                "image_bytes": os.stat(image).st_blocks * 512}
    except (QmpError, OSError, ValueError) as exc:
        tail = log_tail(log) if log.exists() else ""
        raise EngineError(f"making the memory image in {directory} failed: {exc}"
                          + (f"\n--- QEMU log ---\n{tail}" if tail else "")) from exc
    finally:
        if popen is not None and popen.poll() is None:
            popen.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                popen.wait(HELPER_EXIT_BOUND)
        if not done:
            for path in (image, devstate):
                with contextlib.suppress(OSError):
                    path.unlink()
        shutil.rmtree(work, ignore_errors=True)


def _wait_monitor(popen: subprocess.Popen[bytes], qmp: Path, log: Path) -> None:
    deadline = time.monotonic() + HELPER_START_BOUND
    last = "no socket"
    while time.monotonic() < deadline:
        if popen.poll() is not None:
            raise EngineError(f"the memory-image QEMU exited ({popen.returncode}) before its "
                              f"monitor answered:\n{log_tail(log)}")
        if qmp.exists():
            try:
                qmp_command(qmp, "query-status", timeout=2.0)
                return
            except QmpError as exc:
                last = str(exc)
        time.sleep(0.02)
    raise EngineError(f"the memory-image QEMU (pid {popen.pid}) did not answer QMP on {qmp} "
                      f"within {HELPER_START_BOUND:g} s ({last})")


def _load(qmp: Path, stream: Path, timeout: float) -> None:
    what = f"loading {stream} into the memory-image QEMU"
    fd = os.open(stream, os.O_RDONLY | os.O_CLOEXEC)
    try:
        poll = Poll("query-migrate", functools.partial(migration_finished, what),
                    migration_bound(os.fstat(fd).st_size), what, interval=0.01)
        qmp_poll(qmp, [("getfd", {"fdname": MIGRATION_FD}),
                       ("migrate-incoming", {"uri": f"fd:{MIGRATION_FD}"})],
                 poll, fds={0: fd}, timeout=timeout)
    finally:
        os.close(fd)


def _save(qmp: Path, devstate: Path, memory_bytes: int, timeout: float) -> None:
    what = f"saving the device state to {devstate}"
    fd = os.open(devstate, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        poll = Poll("query-migrate", functools.partial(migration_finished, what),
                    migration_bound(memory_bytes), what, interval=0.01)
        qmp_poll(qmp, [
            ("migrate-set-capabilities",
             {"capabilities": [{"capability": IGNORE_SHARED, "state": True}]}),
            ("getfd", {"fdname": MIGRATION_FD}),
            ("migrate", {"uri": f"fd:{MIGRATION_FD}"}),
        ], poll, fds={1: fd}, timeout=timeout)
    finally:
        os.close(fd)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


__all__ = ["DEVICE_STATE", "IGNORE_SHARED", "RAM_IMAGE", "default_ram_id", "helper_argv",
           "materialize", "memory_object", "saved_memory_image", "usable",
           "with_memory_image"]
