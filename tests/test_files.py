"""Atomic, durable writes: the rename, then the folder that holds the new name, synced."""

import os
import stat

import pytest

import trainflow.tasks.files
from trainflow.tasks.engine.checkpoint import Checkpoints
from trainflow.tasks.files import atomic_write, make_dirs

from .engine.test_checkpoint import _some_state


@pytest.fixture
def syncs(monkeypatch):
    """Every os.replace and os.fsync, in order: ("replace", dst) or ("fsync", path, is_dir)."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        st = os.fstat(fd)
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"), stat.S_ISDIR(st.st_mode)))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


def test_atomic_write_syncs_the_file_then_renames_then_syncs_the_folder(tmp_path, syncs):
    atomic_write(tmp_path / "a.json", b"{}")
    (tmp_file,) = [e[1] for e in syncs if e[0] == "fsync" and not e[2]]
    assert syncs == [
        ("fsync", tmp_file, False),  # the bytes, under the temporary name
        ("replace", str(tmp_path / "a.json")),
        ("fsync", str(tmp_path), True),  # the new name
    ]
    assert (tmp_path / "a.json").read_bytes() == b"{}"
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_a_failed_write_leaves_neither_a_file_nor_a_temporary_one(tmp_path, monkeypatch):
    def refuse(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OSError):
        atomic_write(tmp_path / "a.json", b"{}")
    assert not list(tmp_path.iterdir())


def test_make_dirs_syncs_each_new_folder_into_its_parent(tmp_path, syncs):
    (tmp_path / "a").mkdir()
    make_dirs(tmp_path / "a" / "b" / "c")
    assert (tmp_path / "a" / "b" / "c").is_dir()
    assert syncs == [
        ("fsync", str(tmp_path / "a"), True),
        ("fsync", str(tmp_path / "a" / "b"), True),
    ]
    make_dirs(tmp_path / "a" / "b" / "c")  # there already: nothing to do
    assert len(syncs) == 2


def test_a_folder_that_cannot_be_synced_is_left_to_its_filesystem(tmp_path, monkeypatch):
    def refuse(fd):
        raise OSError(22, "Invalid argument")  # what some network filesystems say

    monkeypatch.setattr(os, "fsync", refuse)
    trainflow.tasks.files.fsync_dir(tmp_path)  # no error
    trainflow.tasks.files.fsync_dir(tmp_path / "missing")


def test_a_checkpoint_and_its_new_lineage_folder_survive_a_power_loss(tmp_path, syncs):
    """The folder the checkpoint is renamed into is synced after the rename, and the lineage
    folder, new on a first save, is synced into checkpoints/."""
    root = tmp_path / "checkpoints"
    root.mkdir()
    checkpoints = Checkpoints(str(root / "lineage"), every_seconds=0)
    assert checkpoints.save(_some_state())
    (saved,) = (root / "lineage").iterdir()
    replaced = syncs.index(("replace", str(saved)))
    assert ("fsync", str(root), True) in syncs[:replaced]
    assert ("fsync", str(root / "lineage"), True) in syncs[replaced:]
