"""Publishing a directory: readers see the old generation or the whole new one, and a failed publish loses neither."""

from __future__ import annotations

from pathlib import Path

import pytest

from unexrl.io import atomic_directory


def _filled(path: Path, text: str) -> Path:
    path.mkdir(parents=True)
    (path / "a.txt").write_text(text)
    return path


def test_overwrite_replaces_the_whole_directory(tmp_path: Path) -> None:
    target = _filled(tmp_path / "out", "old")
    (target / "stale.txt").write_text("from the old generation")
    with atomic_directory(target, overwrite=True) as tmp:
        (tmp / "a.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["a.txt"] and (target / "a.txt").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # nothing left aside


def test_a_failed_rename_puts_the_old_directory_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = _filled(tmp_path / "out", "old")
    rename = Path.rename

    def refuse_the_new_one(self: Path, to: Path) -> Path:
        if self.name.startswith(".out.tmp-"):
            raise OSError("disk went away")
        return rename(self, to)

    monkeypatch.setattr(Path, "rename", refuse_the_new_one)
    with pytest.raises(OSError, match="disk went away"), atomic_directory(target, overwrite=True) as tmp:
        (tmp / "a.txt").write_text("new")
    assert (target / "a.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
