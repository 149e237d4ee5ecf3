"""How a start gets its VM: boot the kernel, or restore a boot template or a snapshot.

The start pipeline (``pipeline.py``) calls :func:`choose` in vmm_spawn, before the launch,
then :func:`check_after_connect` once the agent answered. A template that cannot be used
(stale, corrupt, refused by the VMM, an agent that never answers) is deleted and the box
boots the kernel: :class:`FallBack` carries the reason to the pipeline, which relaunches.
A snapshot is the user's: it is never deleted here, and a failing one fails the start.
"""

from __future__ import annotations

import concurrent.futures
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import attrs

from ..errors import BoxliteError, ConfigError, EngineError, UnsupportedError
from ..models import JsonObject
from .savedstate import SavedState, StaleStateError, verify_digests
from .templates import TemplateStore, env_disabled_reason, layout_key, template_notice

if TYPE_CHECKING:
    from ..vmm.base import VmmBackend
    from ..vmm.spec import VmSpec

log = logging.getLogger(__name__)

#: seconds a restore waits for its state's digest check (~0.13 s per 120 MiB here)
DIGEST_TIMEOUT = 120.0

#: where a start's VM came from (``inspect``: ``state.boot.source``)
KERNEL = "kernel"
TEMPLATE = "template"
SNAPSHOT = "snapshot"


class FallBack(BoxliteError):
    """A template could not be used: the start goes on with a cold boot. Internal."""


@attrs.define
class BootChoice:
    """What this start restores (``state`` None: it boots the kernel), whether its cold boot
    saves a template (``save``, under ``key``), and why no template is used (``inspect``)."""

    source: str = KERNEL
    state: SavedState | None = None
    key: str | None = None
    reason: str | None = None
    save: bool = False
    digests: concurrent.futures.Future[None] | None = None

    @property
    def restoring(self) -> bool:
        """This start restores a saved VM (template or snapshot) instead of booting."""
        return self.state is not None

    def to_dict(self) -> JsonObject:
        """``state.boot`` of the box record: ``{"source", "template", "reason"}``."""
        return {"source": self.source, "template": self.key, "reason": self.reason}


def key_of(spec: VmSpec, backend: VmmBackend) -> tuple[str | None, str | None]:
    """(layout key, None) of ``spec``, or (None, why this VM cannot be saved)."""
    try:
        return layout_key(spec, backend), None
    except UnsupportedError as exc:
        return None, str(exc)
    except (OSError, ConfigError, EngineError) as exc:  # e.g. a daemon slow to answer
        return None, f"cannot key this VM's layout: {exc}"


def choose(
    key: str | None, store: TemplateStore, *, wanted: bool, kit_id: str,
    unsupported: str | None = None,
) -> BootChoice:
    """A template restore for layout ``key`` when a good one exists; else a cold boot that
    saves one (``save``) or, with the reason, one that cannot (``key`` None: ``unsupported``
    says why).

    ``wanted`` is the box's ``template`` option. Never raises for a template's sake (a
    broken one is removed, with a one-line notice logged at WARNING); ConfigError only for a
    ``BOXLITE_TEMPLATES`` value that is neither on nor off.
    """
    if not wanted:
        return BootChoice(reason="template=False")
    off = env_disabled_reason()
    if off:
        return BootChoice(reason=off)
    if key is None:
        return BootChoice(reason=unsupported)
    try:
        info = store.find(key)
    except StaleStateError as exc:
        log.warning(template_notice(f"{exc}; removed"))
        store.remove(key)
        return BootChoice(key=key, save=True, reason=f"stale template removed: {exc}")
    if info is None:
        return BootChoice(key=key, save=True, reason="no template yet")
    if info.kit_id and info.kit_id != kit_id:  # the key covers it; belt and braces
        store.remove(key)
        return BootChoice(key=key, save=True, reason="template of another guest kit removed")
    return BootChoice(source=TEMPLATE, state=info.state, key=key)


def start_digest_check(choice: BootChoice) -> None:
    """Hash the state's files in a thread while the VMM loads them (they share the page
    cache): the restore does not wait for it, :func:`check_after_connect` does."""
    if choice.state is None:
        return
    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="boxlite-digest")
    choice.digests = pool.submit(verify_digests, choice.state)
    pool.shutdown(wait=False)


def check_after_connect(choice: BootChoice) -> None:
    """Wait for the digest check of a restored state.

    Raises:
        FallBack: a template's files changed since they were sealed (the caller kills the
            VM, removes the template, boots cold).
        StaleStateError: the same for a snapshot (the start fails: it is the user's).
    """
    if choice.digests is None:
        return
    try:
        choice.digests.result(timeout=DIGEST_TIMEOUT)
    except concurrent.futures.TimeoutError:
        why = f"its files' digests were not checked within {DIGEST_TIMEOUT:g} s"
        if choice.source == TEMPLATE:
            raise FallBack(why) from None
        raise StaleStateError(f"saved state {state_dir(choice)}: {why}") from None
    except StaleStateError as exc:
        if choice.source == TEMPLATE:
            raise FallBack(str(exc)) from exc
        raise


def give_up_template(choice: BootChoice, store: TemplateStore, why: str) -> BootChoice:
    """The template of ``choice`` failed: remove it, say so once, and return the cold boot's
    choice (which saves a fresh template)."""
    assert choice.key is not None
    store.remove(choice.key)
    log.warning(template_notice(f"{why}; removed"))
    return BootChoice(key=choice.key, save=True,
                      reason=f"template failed and was removed: {why}")


def template_meta(spec: VmSpec, backend: VmmBackend, box_name: str) -> JsonObject:
    """What ``boxlite templates ls`` shows of a template, recorded at save time."""
    return {
        "backend": backend.name,
        "kit_id": spec.guest.kit_id,
        "cpus": spec.cpus,
        "memory_mib": spec.memory_mib,
        "box": box_name,
    }


def state_dir(choice: BootChoice) -> Path | None:
    """The directory ``choice`` restores from, None for a kernel boot."""
    return choice.state.directory if choice.state is not None else None


def snapshot_choice(key: str | None, unsupported: str | None, state: SavedState) -> BootChoice:
    """The restore of a user snapshot into ``spec`` (a box created from it, first start).

    Raises:
        UnsupportedError: the backend cannot restore (no SNAPSHOT, or a device it cannot
            load).
        ConfigError: the snapshot was saved for another layout, VMM version or guest kit
            (the key recorded at save time differs), naming what to do.
    """
    name = state.meta.get("snapshot", state.directory.name)
    if key is None:
        raise UnsupportedError(f"snapshot {name} cannot be restored: {unsupported}")
    if state.meta.get("key") != key:
        raise ConfigError(
            f"snapshot {name}: it was saved on another VM layout, VMM version or guest kit "
            f"than this box gets now (the snapshot's kit: {state.meta.get('kit_id')}); it "
            "cannot be restored here: take a new snapshot with this boxlite"
        )
    return BootChoice(source=SNAPSHOT, state=state)
