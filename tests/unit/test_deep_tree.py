"""The clean-up of trees deeper than the recursion limit that tests make (tests/deep_tree.py)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from tests import deep_tree


def _pytest_root_with_a_left_behind_tree(tmp_path: Path) -> Path:
    """A `pytest-of-<user>` root as an earlier session killed mid-test (or one before the tree was
    removed by its test) left it: the deep tree in a numbered directory and in a garbage one."""
    root = tmp_path / "pytest-of-someone"
    (root / "pytest-8" / "test_other0").mkdir(parents=True)
    for session in ("pytest-7", "garbage-0c1d"):
        tree = root / session / "test_outputs_of_a_tree_deeper_0"
        tree.mkdir(parents=True)
        deep_tree.make(tree, 1500)
    return root


def test_remove_left_behind_removes_only_the_deep_trees(tmp_path: Path) -> None:
    root = _pytest_root_with_a_left_behind_tree(tmp_path)
    removed = deep_tree.remove_left_behind(root)
    assert [p.relative_to(root).parts[0] for p in removed] == ["garbage-0c1d", "pytest-7"]
    assert sorted(p.name for p in root.iterdir()) == ["garbage-0c1d", "pytest-7", "pytest-8"]
    assert (root / "pytest-8" / "test_other0").is_dir()
    shutil.rmtree(root)  # what pytest does to old sessions' directories: recursion is safe again


def test_a_deep_tree_is_what_fails_pytest_clean_up(tmp_path: Path) -> None:
    """Why the module exists: the recursive removal pytest uses raises on such a tree."""
    deep_tree.make(tmp_path, 1500)
    result = subprocess.run(
        [sys.executable, "-c", f"import shutil; shutil.rmtree({str(tmp_path / 'a')!r})"],
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    assert "RecursionError" in result.stderr
    deep_tree.remove(tmp_path / "a")
    assert list(tmp_path.iterdir()) == []
