"""Maps arbitrary tensor names to the file names the daemon accepts.

The daemon takes file names made of segments of ``[A-Za-z0-9._-]`` joined by
``/``, no segment starting with ``.`` or ``-``. Tensor names are arbitrary
strings (``model.layers.0.attn/q``, ``['params']['w']``, ``état``), so each
name is escaped into a single safe segment:

* ``A-Z a-z 0-9 . -`` stay as they are, except a leading ``.`` or ``-``;
* every other byte of the name's UTF-8 form, ``_`` included, becomes ``_XX``
  (two upper-case hex digits);
* the empty name becomes ``_`` (no other name escapes to a lone ``_``).

The escaping is injective, so distinct names never share a file, and the
original name always travels in the file's metadata, so nothing depends on
reversing it. Names whose escaped form would pass :data:`MAX_SEGMENT` bytes
are cut and suffixed with a hash of the full name.

Names are kept flat (one segment) on purpose: ``a`` and ``a/b`` as two
tensors would otherwise need ``a`` to be a file and a directory at once.
"""

from __future__ import annotations

import hashlib

# Well under NAME_MAX (255), leaving room for the daemon's own suffixes.
MAX_SEGMENT = 200

_PLAIN = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789.-")


def escape_segment(name: str) -> str:
    """Escapes ``name`` into one path segment the daemon accepts."""
    if name == "":
        return "_"
    raw = name.encode("utf-8", "surrogatepass")
    out: list[str] = []
    for i, byte in enumerate(raw):
        if byte in _PLAIN and not (i == 0 and byte in b".-"):
            out.append(chr(byte))
        else:
            out.append(f"_{byte:02X}")
    escaped = "".join(out)
    if len(escaped) <= MAX_SEGMENT:
        return escaped
    digest = hashlib.blake2b(raw, digest_size=16).hexdigest()
    head = escaped[: MAX_SEGMENT - len(digest) - 2]
    # Never cut an escape in half: drop a trailing partial "_X".
    cut = head.rfind("_", max(0, len(head) - 2))
    if cut != -1:
        head = head[:cut]
    return f"{head}_h{digest}"


def escape_path(relative_path: str) -> str:
    """Escapes each ``/``-separated segment of a relative path."""
    parts = [p for p in relative_path.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        raise ValueError(f"not a relative path inside a directory: {relative_path!r}")
    return "/".join(escape_segment(p) for p in parts)
