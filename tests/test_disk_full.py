"""A full disk while claiming a unit leaves nothing behind: no empty claim (read as a live owner until the lease
ran out, so a rerun could not take the unit), no empty temp file. On a real full filesystem: a tiny tmpfs."""

from __future__ import annotations

import errno
import os
import subprocess
import uuid
from pathlib import Path

import pytest

from pipeline.stores.local import LocalStore


@pytest.fixture
def tiny_fs(tmp_path):
    """A 64 KiB tmpfs (needs root, as on the team machines and in the CI container)."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)


def _fill(fs: Path) -> None:
    with open(fs / f"fill-{uuid.uuid4().hex}", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"x" * 4096)
        except OSError as e:
            assert e.errno == errno.ENOSPC


def _claims_folder(fs: Path) -> Path:
    folder = fs / ".state" / "claims"
    folder.mkdir(parents=True)
    return folder


def test_claim_on_a_full_disk_leaves_no_temp_file(tiny_fs):
    claims = _claims_folder(tiny_fs)
    _fill(tiny_fs)
    with pytest.raises(OSError) as e:
        LocalStore().create_exclusive(claims / "unit-00000", b'{"pid": 1}')
    assert e.value.errno == errno.ENOSPC
    assert os.listdir(claims) == []


def test_disk_filling_during_a_claim_leaves_no_empty_claim(tiny_fs, monkeypatch):
    """The record's temp file is written, then the disk fills and the link cannot add its entry: the fallback
    (create in place, then write) met ENOSPC on the write and left a 0-byte claim."""
    claims = _claims_folder(tiny_fs)
    real_link = os.link

    def link_on_a_disk_that_just_filled(src, dst, *args, **kwargs):
        if Path(dst).name.startswith("unit-"):
            _fill(tiny_fs)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
        return real_link(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "link", link_on_a_disk_that_just_filled)
    with pytest.raises(OSError) as e:
        LocalStore().create_exclusive(claims / "unit-00000", b'{"pid": 1}')
    assert e.value.errno == errno.ENOSPC
    assert os.listdir(claims) == [], "a claim or temp file was left on the full disk"
    monkeypatch.undo()
    for fill in tiny_fs.glob("fill-*"):  # space again: a rerun claims the unit at once
        fill.unlink()
    assert LocalStore().create_exclusive(claims / "unit-00000", b'{"pid": 2}')

