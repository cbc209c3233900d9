"""The copy into staged files (``cairn._arrays.copy_to_file``/``pwrite_all``),
on real files in tmpfs: the mapped path over pages a file already holds, the
``pwrite`` path everywhere else, and the same bytes either way."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from cairn import _arrays

MIB = 1 << 20


@pytest.fixture
def shm_dir() -> Iterator[Path]:
    """A directory in tmpfs where there is one (block accounting as the daemon's)."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    with tempfile.TemporaryDirectory(prefix="cairn-arrays-", dir=base) as d:
        yield Path(d)


@pytest.fixture
def pwrites(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Sizes of the views that went through the pwrite path."""
    calls: list[int] = []
    real = _arrays.pwrite_all

    def spy(fd: int, view: memoryview, offset: int = 0) -> None:
        calls.append(view.nbytes)
        real(fd, view, offset)

    monkeypatch.setattr(_arrays, "pwrite_all", spy)
    return calls


def _data(size: int, seed: int) -> memoryview:
    return memoryview(np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes())


def _open(path: Path, flags: int = os.O_RDWR) -> int:
    return os.open(path, flags | os.O_CLOEXEC)


def test_file_with_all_its_pages_is_copied_through_a_mapping(shm_dir: Path, pwrites: list[int]) -> None:
    path = shm_dir / "pooled"
    path.write_bytes(bytes(_data(3 * MIB, 1)))  # a pooled file: every page exists
    data = _data(3 * MIB, 2)
    fd = _open(path)
    try:
        _arrays.copy_to_file(fd, data)
    finally:
        os.close(fd)
    assert pwrites == []
    assert path.read_bytes() == bytes(data)


def test_file_with_holes_is_written_with_pwrite(shm_dir: Path, pwrites: list[int]) -> None:
    path = shm_dir / "fresh"
    with open(path, "wb") as f:
        f.truncate(2 * MIB)  # a new staged file: sized, no pages
    data = _data(2 * MIB, 3)
    fd = _open(path)
    try:
        _arrays.copy_to_file(fd, data)
    finally:
        os.close(fd)
    assert pwrites == [2 * MIB]
    assert path.read_bytes() == bytes(data)


def test_partly_filled_file_is_written_with_pwrite(shm_dir: Path, pwrites: list[int]) -> None:
    # A pooled file grown to a larger size: its new tail is a hole.
    path = shm_dir / "grown"
    path.write_bytes(b"\xff" * MIB)
    with open(path, "r+b") as f:
        f.truncate(4 * MIB)
    data = _data(4 * MIB, 4)
    fd = _open(path)
    try:
        _arrays.copy_to_file(fd, data)
    finally:
        os.close(fd)
    assert pwrites == [4 * MIB]
    assert path.read_bytes() == bytes(data)


def test_short_and_empty_files_are_extended(shm_dir: Path, pwrites: list[int]) -> None:
    # Shorter than the view (never mapped: a mapping past the end would fault).
    short = shm_dir / "short"
    short.write_bytes(b"\x01" * MIB)
    data = _data(2 * MIB, 5)
    fd = _open(short)
    try:
        _arrays.copy_to_file(fd, data)
    finally:
        os.close(fd)
    assert short.read_bytes() == bytes(data)

    empty = shm_dir / "empty"
    empty.touch()
    fd = _open(empty)
    try:
        _arrays.copy_to_file(fd, data)
        _arrays.copy_to_file(fd, memoryview(b""))  # nothing to write: no change
    finally:
        os.close(fd)
    assert empty.read_bytes() == bytes(data)
    assert pwrites == [2 * MIB, 2 * MIB, 0]


def test_small_views_and_write_only_descriptors_use_pwrite(shm_dir: Path, pwrites: list[int]) -> None:
    small = shm_dir / "small"
    small.write_bytes(b"\x00" * 4096)
    fd = _open(small)
    try:
        _arrays.copy_to_file(fd, _data(4096, 6))
    finally:
        os.close(fd)
    assert small.read_bytes() == bytes(_data(4096, 6))

    # Every page exists, but a write-only descriptor cannot be mapped.
    write_only = shm_dir / "write-only"
    write_only.write_bytes(b"\x00" * (2 * MIB))
    data = _data(2 * MIB, 7)
    fd = _open(write_only, os.O_WRONLY)
    try:
        _arrays.copy_to_file(fd, data)
    finally:
        os.close(fd)
    assert write_only.read_bytes() == bytes(data)
    assert pwrites == [4096, 2 * MIB]


def test_typed_views_are_copied_as_their_bytes(shm_dir: Path) -> None:
    array = np.arange(MIB, dtype=np.float32)  # 4 MiB, a non-byte buffer format
    path = shm_dir / "typed"
    path.write_bytes(b"\x00" * array.nbytes)
    fd = _open(path)
    try:
        _arrays.copy_to_file(fd, memoryview(array))
    finally:
        os.close(fd)
    assert np.array_equal(np.fromfile(path, dtype=np.float32), array)


def test_pwrite_all_splits_large_views_and_loops_on_short_writes(
    shm_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Views over the kernel's 2 GiB write limit go in pieces; a short write
    # is continued where it stopped. Both scaled down here.
    monkeypatch.setattr(_arrays, "_MAX_IO", 1000)
    real_pwrite = os.pwrite
    sizes: list[int] = []

    def short_pwrite(fd: int, data: memoryview, offset: int) -> int:
        sizes.append(len(data))
        return real_pwrite(fd, data[:700], offset)

    monkeypatch.setattr(os, "pwrite", short_pwrite)
    data = _data(5000, 8)
    path = shm_dir / "pieces"
    fd = _open(path, os.O_RDWR | os.O_CREAT)
    try:
        _arrays.pwrite_all(fd, data, 10)
    finally:
        os.close(fd)
    assert max(sizes) == 1000
    assert path.read_bytes() == b"\x00" * 10 + bytes(data)


def test_pwrite_all_fails_when_nothing_is_written(
    shm_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "pwrite", lambda fd, data, offset: 0)
    fd = _open(shm_dir / "stuck", os.O_RDWR | os.O_CREAT)
    try:
        with pytest.raises(OSError, match="wrote nothing"):
            _arrays.pwrite_all(fd, _data(10, 9))
    finally:
        os.close(fd)
