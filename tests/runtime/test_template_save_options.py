"""A vendor's save_state written before ``restores_share_memory`` existed still saves
templates: the core passes the option only to a save_state that takes it."""

from __future__ import annotations

from pathlib import Path

from boxlite_core.runtime.pipeline import _template_save_options


class OldContract:
    def save_state(self, directory: Path, *, switch_disks=(), resume: bool = True) -> None:
        """The contract before the option."""


class NewContract:
    def save_state(self, directory: Path, *, switch_disks=(), resume: bool = True,
                   restores_share_memory: bool = False) -> None:
        """The contract with it."""


class TakesAnything:
    def save_state(self, directory: Path, **options: object) -> None:
        """A wrapper passing everything on."""


def test_the_option_goes_only_where_it_is_taken() -> None:
    assert _template_save_options(OldContract()) == {}  # type: ignore[arg-type]
    assert _template_save_options(NewContract()) == {  # type: ignore[arg-type]
        "restores_share_memory": True}
    assert _template_save_options(TakesAnything()) == {  # type: ignore[arg-type]
        "restores_share_memory": True}
