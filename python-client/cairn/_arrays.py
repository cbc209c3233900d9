"""Turns tensors into flat byte views to write, and stored bytes back into arrays.

A :class:`Source` describes one file of a shard before any byte is touched:
its size, dtype and shape are known from the object's attributes alone, so the
daemon can pre-size the file first, and the bytes are only materialised (a
contiguous copy when the tensor is strided, a device-to-host copy through
pinned memory for CUDA tensors) right before they are written. For numpy
arrays, contiguous CPU tensors and bytes, materialising is free: the view
points at the caller's own memory.

Per-file metadata (strings only, as the daemon stores it):

``name``
    the tensor's name as the caller gave it (file names are escaped);
``dtype``
    numpy's name of the element type (``float32``, ``bfloat16``, ``bool``,
    ``float8_e4m3fn``; torch dtypes map to the same names);
``shape``
    the shape as a JSON list, ``[]`` for a 0-d array.

Bytes are always little-endian, row-major (C order).
"""

from __future__ import annotations

import errno
import json
import math
import mmap
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from cairn.errors import InvalidArgument

#: Per-file metadata keys.
META_NAME = "name"
META_DTYPE = "dtype"
META_SHAPE = "shape"

# What materialising returns: a 1-d unsigned-byte view, and the object that
# owns its memory (kept alive until the bytes are written).
Materialized = tuple[memoryview, Any]


@dataclass(frozen=True)
class Source:
    """One file to write: its layout, and how to get its bytes."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    materialize: Callable[[], Materialized]
    extra_metadata: Mapping[str, str] | None = None

    def metadata(self) -> dict[str, str]:
        meta = {
            META_NAME: self.name,
            META_DTYPE: self.dtype,
            META_SHAPE: json.dumps(list(self.shape)),
        }
        if self.extra_metadata:
            meta.update(self.extra_metadata)
        return meta


_EMPTY = memoryview(b"")

# Linux moves at most this many bytes per write call.
_MAX_IO = 0x7FFFF000
# Below this, one pwrite costs less than setting up a mapping.
_MAP_MIN_BYTES = 1 << 20


def source_for(name: str, obj: Any) -> Source:
    """Describes ``obj`` (numpy/jax array, torch tensor, bytes-like) as a Source."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(obj, torch.Tensor):
        return _torch_source(name, obj)
    if isinstance(obj, (bytes, bytearray, memoryview)):
        view = memoryview(obj)
        if view.ndim <= 1 and view.format in ("B", "b", "c") and view.c_contiguous:
            flat = view.cast("B") if view.format != "B" else view
            return Source(
                name, "uint8", (flat.nbytes,), flat.nbytes, lambda: (flat, obj)
            )
        return _numpy_source(name, np.asarray(view))
    if isinstance(obj, np.ndarray):
        return _numpy_source(name, obj)
    if hasattr(obj, "__array__") and hasattr(obj, "shape") and hasattr(obj, "dtype"):
        # jax.Array and friends: layout from attributes, bytes fetched lazily.
        return _lazy_array_source(name, obj)
    return _numpy_source(name, np.asarray(obj))


def _check_dtype(name: str, dtype: np.dtype) -> str:
    if dtype.hasobject or dtype.fields is not None:
        raise InvalidArgument(
            f"tensors[{name!r}]: dtype {dtype} holds Python objects or fields; "
            "only plain numeric arrays can be saved"
        )
    dtype_name = dtype.name
    try:
        if dtype_from_name(dtype_name) != dtype.newbyteorder("="):
            raise TypeError
    except TypeError:
        raise InvalidArgument(
            f"tensors[{name!r}]: dtype {dtype} cannot be saved (no stable name)"
        ) from None
    return dtype_name


def _numpy_source(name: str, array: np.ndarray) -> Source:
    dtype_name = _check_dtype(name, array.dtype)
    shape = tuple(int(d) for d in array.shape)

    def materialize() -> Materialized:
        flat = array
        if not flat.dtype.isnative:
            flat = flat.astype(flat.dtype.newbyteorder("="))
        flat = np.ascontiguousarray(flat).reshape(-1)
        if flat.size == 0:
            return _EMPTY, None
        # A uint8 view: custom dtypes (bfloat16, ...) have no buffer format.
        return flat.view(np.uint8).data, flat

    return Source(name, dtype_name, shape, array.nbytes, materialize)


def _lazy_array_source(name: str, obj: Any) -> Source:
    dtype = np.dtype(obj.dtype)
    dtype_name = _check_dtype(name, dtype)
    shape = tuple(int(d) for d in obj.shape)
    nbytes = math.prod(shape) * dtype.itemsize

    def materialize() -> Materialized:
        array = np.asarray(obj)
        if array.dtype != dtype or array.shape != shape:
            raise InvalidArgument(
                f"tensors[{name!r}]: changed layout while saving "
                f"({dtype}{list(shape)} became {array.dtype}{list(array.shape)})"
            )
        return _numpy_source(name, array).materialize()

    return Source(name, dtype_name, shape, nbytes, materialize)


def torch_dtype_name(dtype: Any) -> str:
    """``torch.float32`` → ``float32`` (the numpy/ml_dtypes spelling)."""
    return str(dtype).removeprefix("torch.")


def _torch_source(name: str, tensor: Any) -> Source:
    import torch

    if tensor.layout != torch.strided:
        raise InvalidArgument(
            f"tensors[{name!r}]: {tensor.layout} tensors cannot be saved; densify first"
        )
    if tensor.device.type == "meta":
        raise InvalidArgument(f"tensors[{name!r}]: a meta tensor has no data")
    if tensor.is_quantized:
        raise InvalidArgument(f"tensors[{name!r}]: quantized tensors cannot be saved")
    shape = tuple(int(d) for d in tensor.shape)
    nbytes = tensor.numel() * tensor.element_size()

    def materialize() -> Materialized:
        host = tensor_to_host(tensor)
        flat = host.reshape(-1)
        if flat.numel() == 0:
            return _EMPTY, None
        return memoryview(flat.view(torch.uint8).numpy()), host

    return Source(name, torch_dtype_name(tensor.dtype), shape, nbytes, materialize)


def tensor_to_host(tensor: Any) -> Any:
    """A contiguous CPU tensor with ``tensor``'s values, sharing memory when it can.

    CUDA tensors are copied into pinned host memory (PyTorch's caching host
    allocator reuses those pages from one save to the next) and the copy is
    waited for before returning.
    """
    import torch

    x = tensor.detach()
    if x.device.type == "cuda":
        host = torch.empty(x.shape, dtype=x.dtype, device="cpu", pin_memory=True)
        host.copy_(x, non_blocking=True)
        torch.cuda.current_stream(x.device).synchronize()
        return host
    if x.device.type != "cpu":
        x = x.to("cpu")
    if x.is_conj():
        x = x.resolve_conj()
    if x.is_neg():
        x = x.resolve_neg()
    if not x.is_contiguous():
        x = x.contiguous()
    return x


def dtype_from_name(name: str) -> np.dtype:
    """numpy dtype from its name, taking bfloat16 and float8 types from ml_dtypes."""
    try:
        return np.dtype(name)
    except TypeError:
        pass
    try:
        import ml_dtypes
    except ImportError:  # pragma: no cover - ml_dtypes is a dependency
        raise TypeError(f"dtype {name!r} needs the ml_dtypes package") from None
    scalar_type = getattr(ml_dtypes, name, None)
    if scalar_type is None:
        raise TypeError(f"unknown dtype {name!r}")
    return np.dtype(scalar_type)


def layout_from_metadata(
    metadata: Mapping[str, str], size: int
) -> tuple[np.dtype, tuple[int, ...]]:
    """dtype and shape of a stored file; plain bytes when the metadata has none."""
    dtype_name = metadata.get(META_DTYPE)
    shape_text = metadata.get(META_SHAPE)
    if dtype_name is None or shape_text is None:
        return np.dtype(np.uint8), (size,)
    dtype = dtype_from_name(dtype_name)
    shape = tuple(int(d) for d in json.loads(shape_text))
    return dtype, shape


def pwrite_all(fd: int, view: memoryview, offset: int = 0) -> None:
    """One pwrite per buffer; loops only when the kernel writes less."""
    done = 0
    total = view.nbytes
    while done < total:
        written = os.pwrite(fd, view[done : done + _MAX_IO], offset + done)
        if written <= 0:
            raise OSError(errno.EIO, "pwrite wrote nothing")
        done += written


def copy_to_file(fd: int, view: memoryview) -> None:
    """Copies ``view`` to the start of the staged file ``fd`` (already sized).

    The copy the trainer waits for in an async save, made as cheap as the
    file allows. Over pages the file already holds (a file the daemon took
    from its page pool), a shared mapping populated in one call
    (``MAP_POPULATE``) and one ``memcpy`` run at memory speed, about twice as
    fast as ``pwrite``, which goes through the page cache page by page. Into
    a file with holes (a new one) ``pwrite`` is faster, since populating a
    writable mapping would zero every page first. ``fd`` must be open for
    reading and writing to be mapped; a write-only one is written with
    ``pwrite``.
    """
    size = view.nbytes
    stat = os.fstat(fd) if size >= _MAP_MIN_BYTES else None
    if stat is not None and stat.st_size >= size and stat.st_blocks * 512 >= size:
        try:
            mapping = mmap.mmap(
                fd,
                size,
                flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0),
                prot=mmap.PROT_READ | mmap.PROT_WRITE,
            )
        except (OSError, ValueError):
            pass  # not mappable here (write-only descriptor, odd file system)
        else:
            try:
                np.copyto(np.frombuffer(mapping, np.uint8), np.frombuffer(view, np.uint8))
            finally:
                mapping.close()
            return
    pwrite_all(fd, view)
