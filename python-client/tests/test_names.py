"""File-name escaping: always accepted by the daemon, never two names in one file."""

from __future__ import annotations

import re

import pytest

from cairn._names import MAX_SEGMENT, escape_path, escape_segment

SEGMENT = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")

NAMES = [
    "",
    "_",
    "__",
    "_5F",
    "w",
    "model.layers.0.weight",
    "a/b",
    "a_2Fb",
    ".",
    "..",
    ".hidden",
    "-dash",
    "x-",
    "with space",
    "['params']['kernel']",
    "état",
    "日本",
    "\x00",
    "a" * 199,
    "a" * 200,
    "a" * 201,
    "b" * 1000,
    "b" * 1000 + "!",
    "é" * 100,
]


@pytest.mark.parametrize("name", NAMES)
def test_escaped_names_are_valid_segments(name: str) -> None:
    escaped = escape_segment(name)
    assert SEGMENT.match(escaped), escaped
    assert len(escaped) <= MAX_SEGMENT


def test_escaping_is_injective() -> None:
    escaped = [escape_segment(n) for n in NAMES]
    assert len(set(escaped)) == len(NAMES)


def test_plain_names_stay_readable() -> None:
    assert escape_segment("model.layers.0.weight") == "model.layers.0.weight"
    assert escape_segment("a/b") == "a_2Fb"
    assert escape_segment("_x") == "_5Fx"


def test_paths_keep_their_directories() -> None:
    assert escape_path("ocdbt.process_0/d/abc") == "ocdbt.process_5F0/d/abc"
    assert escape_path("./a//.b") == "a/_2Eb"
    with pytest.raises(ValueError):
        escape_path("../etc/passwd")
    with pytest.raises(ValueError):
        escape_path("")
