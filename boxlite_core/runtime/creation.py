"""Creating a box record: from options, or from a snapshot (``BoxOptions.snapshot``).

Why a module of its own: ``Runtime.create`` and ``Box.fork`` both create boxes, and a Box
must not import the Runtime (see services.py).
"""

from __future__ import annotations

import shutil
import warnings

import attrs

from ..errors import ConfigError, NotFoundError
from ..images.model import Image
from ..models import BoxOptions, BoxStatus
from ..volumes.base import SharerLimitationWarning, VolumeSharer
from ..volumes.resolve import remote_user_volumes, resolve_user_volumes
from . import snapshots
from .capacity import check_capacity
from .records import BoxRecord, generated_name, new_box_id
from .services import Services
from .store import NameTakenError

#: what a box created from a snapshot takes from the snapshot's box, whatever it was told:
#: its VM must be the one the snapshot saved
FROM_SNAPSHOT = ("image", "backend", "cpus", "memory_mib", "disk_size_mib", "volumes",
                 "rootfs", "volume_sharer", "network", "console_log_max_mib")


def refuse_snapshot_conflicts(
    options: BoxOptions, snap: snapshots.Snapshot, given: frozenset[str] | None = None
) -> None:
    """Refuse an option the snapshot's VM fixes (image, cpus, memory, volumes…) set to
    something else than the snapshot's. ``given``: the fields the caller knows were set (the
    CLI does); without it a value equal to BoxOptions' default counts as unset.

    Raises:
        ConfigError: such an option, named.
    """
    defaults = BoxOptions()
    for field in FROM_SNAPSHOT:
        mine, theirs = getattr(options, field), getattr(snap.options, field)
        was_set = field in given if given is not None else mine != getattr(defaults, field)
        if was_set and mine != theirs:
            raise ConfigError(
                f"{field}={mine!r}: a box created from snapshot {snap.name} continues its VM, "
                f"so it has that box's {field} ({theirs!r}); leave {field} unset"
            )


def options_from_snapshot(options: BoxOptions, snap: snapshots.Snapshot) -> BoxOptions:
    """The snapshot's box's options, with this box's name, env, workdir, user, entrypoint,
    cmd, auto_remove and published ports (never the snapshot's: its source may still hold
    them). The network policy is the snapshot's: the copy's guest continues its source's
    network setup.

    Raises:
        ConfigError: as :func:`refuse_snapshot_conflicts`.
    """
    refuse_snapshot_conflicts(options, snap)
    return attrs.evolve(
        snap.options, name=options.name, snapshot=snap.name, auto_remove=options.auto_remove,
        env=options.env or snap.options.env, workdir=options.workdir or snap.options.workdir,
        user=options.user or snap.options.user, template=options.template,
        ports=options.ports,
        entrypoint=snap.options.entrypoint if options.entrypoint is None else options.entrypoint,
        cmd=options.cmd or snap.options.cmd,
    )


def warn_limitations(name: str, sharer: VolumeSharer) -> None:
    """A SharerLimitationWarning per limitation ``sharer`` declares (the CLI prints them on
    stderr), so whoever picks it by name hears what it lacks before relying on it."""
    for limitation in sharer.limitations:
        warnings.warn(f"volume sharer {name}: {limitation.summary}", SharerLimitationWarning,
                      stacklevel=4)  # Runtime.create's caller


def _local_or_pulled(services: Services, ref: str) -> Image:
    """The image ``ref`` from the store, or pulled when missing (``ensure_image``).

    Why the store first: the registry client imports requests and urllib3, ~0.1 s that every
    ``boxlite run`` of a local image would otherwise pay before its VM starts."""
    try:
        return services.images.get(ref)
    except NotFoundError:
        from ..images.registry.pull import ensure_image

        return ensure_image(services.images, ref)


def create_box(services: Services, options: BoxOptions) -> BoxRecord:
    """Persist a Configured box and return its record. Cheap checks first, so a typo fails
    before a boot; a registry image not in the store is pulled (pull-on-create).

    Raises ConfigError (bad option, taken name, too many CPUs/memory), NotFoundError (no such
    snapshot), ImageError (image not found/pulled), StateError (an incomplete snapshot),
    UnsupportedError (``host`` with a backend that runs boxes on this machine only).
    Warns SharerLimitationWarning when ``volume_sharer`` names a sharer that declares
    limitations (9p: see volumes/ninep.py).
    """
    snap = None
    if options.snapshot:
        snap = services.snapshots.get(options.snapshot)
        snapshots.saved_state(snap)  # an incomplete or damaged one fails here, not at start
        options = options_from_snapshot(options, snap)
    plugins = services.plugins
    backend = snap.backend if snap is not None else plugins.select_backend(options)
    if options.host is None and backend:
        # a backend whose default is another machine (BOXLITE_LIBVIRT_URI): the record
        # keeps where the box is, so later commands find it whatever their environment
        where = plugins.backend(backend).remote_host
        options = attrs.evolve(options, host=where if isinstance(where, str) and where else None)
    if options.host and backend:
        # a backend that runs boxes here only, or a host it cannot read (UnsupportedError,
        # ConfigError): refused now, not by every start of a box that cannot ever run
        plugins.backend(backend, options.host)
    if options.host:  # another machine's capacity and directories are its backend's
        remote_user_volumes(options.volumes, options.host)
    else:
        check_capacity(options)  # more CPUs/memory than the host has: refused, no record
        resolve_user_volumes(options.volumes)
    if options.rootfs not in plugins.strategy_names():
        raise ConfigError(
            f"rootfs={options.rootfs!r}: unknown rootfs strategy; known: "
            f"{', '.join(plugins.strategy_names()) or 'none'}"
        )
    if options.volume_sharer and options.volume_sharer not in plugins.sharer_names():
        raise ConfigError(
            f"volume_sharer={options.volume_sharer!r}: unknown volume sharer; known: "
            f"{', '.join(plugins.sharer_names()) or 'none'}"
        )
    if options.volume_sharer:
        warn_limitations(options.volume_sharer, plugins.volume_sharer(options.volume_sharer))
    if snap is not None:
        image_digest, image_config = snap.image_digest, snap.image_config
    else:
        image = _local_or_pulled(services, options.image)
        image_digest = getattr(image, "digest", None)
        image_config = image.config.to_dict() if hasattr(image, "config") else None
    record = _insert_named(services, options, backend, image_digest, image_config)
    if snap is not None:
        try:
            with services.snapshots.lock(shared=True):
                if services.snapshots.find(snap.name) is None:
                    raise NotFoundError(f"snapshot {snap.name} was removed meanwhile")
                snapshots.clone_disks(snap, services.box_dir(record.id))
        except BaseException:
            services.store.delete(record.id)
            shutil.rmtree(services.box_dir(record.id), ignore_errors=True)
            raise
    services.db.bump("boxes_created")
    services.plugins.notify("created", box=record.to_dict())
    return record


def _insert_named(
    services: Services,
    options: BoxOptions,
    backend: str,
    image_digest: str | None,
    image_config: dict[str, object] | None,
) -> BoxRecord:
    """Insert the box's record, picking a generated name if the user gave none.

    A generated name is tried by inserting it: the table's UNIQUE constraint is the only
    check that holds while other creates run at the same time (a look before the insert
    raced, and two concurrent creates took the same name). The last candidate contains the
    whole box id, so the loop ends with a record.
    """
    box_id = new_box_id()
    attempts = 1 if options.name is not None else 5
    for attempt in range(attempts):
        name = options.name if options.name is not None else generated_name(box_id, attempt)
        record = BoxRecord(
            id=box_id,
            name=name,
            status=BoxStatus.CONFIGURED,
            options=attrs.evolve(options, name=name),
            backend=backend,
            image=options.image,
            image_digest=image_digest,
            rootfs=options.rootfs,
            state={"image_config": image_config} if image_config else {},
        )
        try:
            return services.store.insert(record)
        except NameTakenError:
            if options.name is not None or attempt == attempts - 1:
                raise
    raise AssertionError("unreachable: the last attempt returns or raises")
