"""Atomic writes: the target is the old file or the complete new one, and no temp file is left."""

import os
import stat

import pytest

from napari_retina.io.atomic import atomic_path, atomic_write, atomic_write_bytes, atomic_write_text
from napari_retina.io.errors import RetinaInputError


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_write_text_and_bytes_round_trip(tmp_path):
    t = tmp_path / "ellipses.json"
    atomic_write_text(t, '{"a": 1}\nline2\n')
    assert t.read_bytes() == b'{"a": 1}\nline2\n'  # newlines not translated
    b = tmp_path / "overlay.png"
    atomic_write_bytes(b, b"\x89PNG\x00\xff")
    assert b.read_bytes() == b"\x89PNG\x00\xff"
    atomic_write_bytes(b, b"second")  # replacing an existing file
    assert b.read_bytes() == b"second"
    assert _leftovers(tmp_path) == []


def test_temp_path_is_hidden_sibling_with_real_suffix(tmp_path):
    target = tmp_path / "IDRiD_55_EX.tif"
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path
        assert tmp.name.startswith(".IDRiD_55_EX.")
        assert tmp.name.endswith(".tmp.tif")  # writers that pick the format from the suffix still work
        assert not target.exists()  # nothing visible until the write is complete
        tmp.write_bytes(b"done")
    assert target.read_bytes() == b"done"
    assert _leftovers(tmp_path) == []


def test_new_file_mode_follows_umask_and_existing_mode_is_kept(tmp_path):
    old = os.umask(0o022)
    try:
        new = tmp_path / "new.txt"
        atomic_write_text(new, "x")
        assert stat.S_IMODE(new.stat().st_mode) == 0o644  # not mkstemp's 0o600
        kept = tmp_path / "kept.txt"
        kept.write_text("old")
        os.chmod(kept, 0o640)
        atomic_write_text(kept, "new")
        assert stat.S_IMODE(kept.stat().st_mode) == 0o640
    finally:
        os.umask(old)


def test_failing_writer_leaves_old_content_and_no_temp(tmp_path):
    target = tmp_path / "provenance.json"
    target.write_text("old content")

    def half_then_crash(tmp):
        tmp.write_text("half-writ")
        raise RuntimeError("writer crashed")

    with pytest.raises(RuntimeError, match="writer crashed"):  # not an I/O problem: passes unchanged
        atomic_write(target, half_then_crash)
    assert target.read_text() == "old content"
    assert _leftovers(tmp_path) == []


def test_oserror_in_writer_becomes_one_line_error(tmp_path):
    target = tmp_path / "mask.tif"
    target.write_bytes(b"old")

    def disk_full(tmp):
        tmp.write_bytes(b"par")
        raise OSError(28, "No space left on device")

    with pytest.raises(RetinaInputError) as ei:
        atomic_write(target, disk_full)
    assert str(ei.value) == f"cannot write {target}: No space left on device"
    assert target.read_bytes() == b"old"
    assert _leftovers(tmp_path) == []


def test_oserror_about_another_file_is_not_blamed_on_the_target(tmp_path):
    import shutil

    target = tmp_path / "copy.jpg"
    with pytest.raises(FileNotFoundError):
        with atomic_path(target) as tmp:
            shutil.copyfile(tmp_path / "missing-source.jpg", tmp)
    assert not target.exists()
    assert _leftovers(tmp_path) == []


def test_parent_is_a_file(tmp_path):
    # works as root too, unlike chmod 0o500
    blocker = tmp_path / "notafolder"
    blocker.write_text("I am a file")
    with pytest.raises(RetinaInputError) as ei:
        atomic_write_text(blocker / "ellipses.json", "{}")
    msg = str(ei.value)
    assert msg.startswith(f"cannot write {blocker / 'ellipses.json'}: ")
    assert "not a folder" in msg and "\n" not in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notafolder"]


def test_missing_folder(tmp_path):
    target = tmp_path / "nope" / "IDRiD_01_EX.tif"
    with pytest.raises(RetinaInputError, match="does not exist"):
        atomic_write_bytes(target, b"x")
    assert not (tmp_path / "nope").exists()  # no folder silently created
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores folder permissions")
def test_read_only_folder(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o500)
    try:
        with pytest.raises(RetinaInputError, match="cannot write"):
            atomic_write_text(ro / "x.txt", "x")
        assert list(ro.iterdir()) == []
    finally:
        os.chmod(ro, 0o700)
