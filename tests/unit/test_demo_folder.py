"""trainer.demo.world_demo.demo_folder: which folders a demo may empty, and what it refuses before changing anything."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from trainer.demo.world_demo import MARKER, demo_folder


def earlier_demo(root: Path) -> Path:
    """A folder as a finished demo leaves it."""
    with demo_folder(root):
        (root / "drm").mkdir()
        (root / "drm" / "drm-x.safetensors").write_bytes(b"x")
        (root / "demo.json").write_text("{}")
    return root


def test_an_earlier_demo_is_emptied_and_marked(tmp_path):
    root = earlier_demo(tmp_path / "demo")
    with demo_folder(root) as held:
        assert held == root and sorted(p.name for p in root.iterdir()) == [MARKER, ".lock"]


def test_a_users_folder_with_a_demo_json_is_refused_and_kept(tmp_path):
    root = tmp_path / "project"
    root.mkdir()
    (root / "demo.json").write_text('{"name": "my project"}')
    (root / "thesis.tex").write_text("precious")
    with pytest.raises(ValueError, match="is not a demo folder; choose another --out"):
        with demo_folder(root):
            pass
    assert (root / "thesis.tex").read_text() == "precious"


def test_a_file_put_into_an_earlier_demo_stops_the_rerun(tmp_path):
    root = earlier_demo(tmp_path / "demo")
    (root / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds notes.txt, which no demo writes; move it out"):
        with demo_folder(root):
            pass
    assert (root / "notes.txt").read_text() == "mine" and (root / "drm" / "drm-x.safetensors").is_file()


def test_a_folder_that_cannot_be_written_is_refused_by_name(tmp_path, monkeypatch):
    def read_only(self, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(Path, "mkdir", read_only)
    with pytest.raises(ValueError, match=r"out: cannot write into .*ro \(Read-only file system\); choose a folder"):
        with demo_folder(tmp_path / "ro"):
            pass


def test_a_link_to_an_earlier_demo_empties_the_folder_it_names(tmp_path):
    target = earlier_demo(tmp_path / "demo")
    link = tmp_path / "link"
    link.symlink_to(target, target_is_directory=True)
    with demo_folder(link):
        assert link.is_symlink() and not (target / "drm").exists()


def test_a_second_run_into_the_same_folder_is_refused_while_the_first_holds_it(tmp_path):
    root = earlier_demo(tmp_path / "demo")
    with demo_folder(root):
        (root / "grpo").mkdir()
        with pytest.raises(ValueError, match="another run is writing into"):
            with demo_folder(root):
                pass
        assert (root / "grpo").is_dir()  # the refused run deleted nothing


def test_a_path_under_a_file_is_refused(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match="is a file; choose another --out"):
        with demo_folder(tmp_path / "afile" / "sub"):
            pass
