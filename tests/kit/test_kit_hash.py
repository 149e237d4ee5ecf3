"""The kit's content hash: local inputs only, and every agent/proto edit changes it."""

from __future__ import annotations

from pathlib import Path

import pytest

from boxlite_core.errors import ConfigError
from boxlite_core.kit import KitRecipe, find_kit, kit_cache_dir
from boxlite_core.kit.builder import agent_files


def kit_id(root: Path) -> str:
    return KitRecipe.current("x86_64", root).kit_id()


def test_same_inputs_same_id(source_tree: Path) -> None:
    assert kit_id(source_tree) == kit_id(source_tree)


def test_agent_edit_changes_id(source_tree: Path) -> None:
    before = kit_id(source_tree)
    main = source_tree / "boxlite_core/agent/__main__.py"
    main.write_text(main.read_text() + "\n# edited\n")
    assert kit_id(source_tree) != before


def test_new_proto_file_changes_id(source_tree: Path) -> None:
    before = kit_id(source_tree)
    (source_tree / "boxlite_core/proto/agent_pb2.py").write_text("X = 1\n")
    assert kit_id(source_tree) != before


def test_pycache_and_non_python_files_do_not_change_id(source_tree: Path) -> None:
    before = kit_id(source_tree)
    cache = source_tree / "boxlite_core/agent/__pycache__"
    cache.mkdir()
    (cache / "x.cpython-311.py").write_text("junk")
    (source_tree / "boxlite_core/agent/README.txt").write_text("notes")
    assert kit_id(source_tree) == before


def test_host_package_init_is_replaced_by_an_empty_one(source_tree: Path) -> None:
    files = agent_files(source_tree)
    assert files["boxlite_core/__init__.py"] == b""
    assert "boxlite_core/agent/__main__.py" in files
    assert all(not k.startswith("boxlite_core/kit") for k in files)


def test_missing_agent_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="guest agent"):
        KitRecipe.current("x86_64", tmp_path)


def test_unknown_arch_is_a_clear_error(source_tree: Path) -> None:
    with pytest.raises(ConfigError, match="architecture"):
        KitRecipe.current("sparc", source_tree)


def test_find_kit_in_empty_home_is_none(tmp_path: Path, source_tree: Path) -> None:
    assert find_kit(tmp_path, source_root=source_tree) is None
    assert kit_cache_dir(tmp_path) == tmp_path / "cache" / "guest-kit"
