"""JAX pytrees through Cairn, and Orbax checkpoint directories.

Pytrees
    :func:`save` flattens a pytree with ``jax.tree_util`` and saves every leaf
    as one file of a shard (the fast path of :class:`cairn.Client`): the
    leaf's key path (``['params']['dense']['kernel']``) is its name, and the
    file metadata keeps the path's entries, the dtype (bfloat16 and float8
    through ml_dtypes) and the shape. :func:`restore` maps the files back
    (zero copy) and either fills the structure of ``target`` (leaves come
    back as the target's leaf types: jax arrays placed with the target
    leaf's sharding, numpy arrays, Python scalars) or, without a target,
    rebuilds nested dicts and lists from the stored paths.

    Leaves must be fully addressable on this process (the usual case on one
    host); in a multi-host job every process saves its own pytree as its own
    rank.

Orbax
    Orbax writes a step directory of its own format (OCDBT, Zarr, JSON
    metadata). :func:`save_orbax_step` takes a finished step of an Orbax
    ``CheckpointManager`` and saves its directory as a Cairn shard;
    :func:`restore_orbax_step` lays the newest (or a given) step back into the
    manager's directory and reloads the manager, so ``manager.restore(step)``
    works as after any restart. Keep the manager's directory on tmpfs
    (``/dev/shm``) so both steps stay memory copies. Nodes with Cairn's CSI
    volume can instead point the manager at the mounted volume, which the
    daemon ingests without a copy.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any, Literal, cast

import jax
import numpy as np

from cairn import _arrays
from cairn.client import FORMAT_KEY, Client, SaveResult, _check_metadata
from cairn.errors import CairnError, InvalidArgument

__all__ = ["restore", "restore_orbax_step", "save", "save_orbax_step"]

#: Shard metadata value of ``cairn.format`` for a saved pytree.
PYTREE_FORMAT = "jax-pytree/v1"
_META_PATH = "jax.path"
_META_LEAF = "jax.leaf"
_TREEDEF_KEY = "cairn.jax.treedef"

Step = int | Literal["latest"]


def _split_client(args: Sequence[Any], client: Client | None) -> tuple[Client, bool, list[Any]]:
    """Peels an optional leading Client off positional arguments."""
    rest = list(args)
    if rest and isinstance(rest[0], Client):
        if client is not None:
            raise InvalidArgument("client: given twice (positionally and as client=)")
        return rest[0], False, rest[1:]
    if client is not None:
        return client, False, rest
    return Client(), True, rest


def save(
    *args: Any,
    rank: int = 0,
    world_size: int | None = None,
    metadata: Mapping[str, str] | None = None,
    client: Client | None = None,
) -> SaveResult:
    """Saves a pytree of arrays: ``save([client,] job, step, pytree)``.

    Without a client, one is made from ``CAIRN_SOCKET`` (and closed after).
    Leaves may be jax arrays, numpy arrays or numpy/Python scalars.
    """
    client, owned, rest = _split_client(args, client)
    try:
        if len(rest) != 3:
            raise InvalidArgument("save: expected ([client,] job, step, pytree)")
        job, step, pytree = rest
        leaves, treedef = jax.tree_util.tree_flatten_with_path(pytree)
        files = []
        seen: set[str] = set()
        from cairn._names import escape_segment

        for index, (path, leaf) in enumerate(leaves):
            name = jax.tree_util.keystr(path)
            kind, array_like = _leaf_kind(name, leaf)
            source = _arrays.source_for(name, array_like)
            file_name = f"{index}-{escape_segment(name)}"[:200]
            if file_name in seen:
                raise InvalidArgument(f"pytree: two leaves map to file {file_name!r}")
            seen.add(file_name)
            meta = source.metadata()
            meta[_META_PATH] = json.dumps([_key_entry(k) for k in path])
            meta[_META_LEAF] = kind
            files.append((file_name, source.nbytes, meta, source.materialize))
        shard_meta = _check_metadata(metadata)
        shard_meta[FORMAT_KEY] = PYTREE_FORMAT
        shard_meta[_TREEDEF_KEY] = str(treedef)[:4096]
        if world_size is None and rank == 0:
            world_size = 1
        return client._save_files(client._ref(job, step, rank), files, world_size, shard_meta)
    finally:
        if owned:
            client.close()


def restore(
    *args: Any,
    target: Any = None,
    rank: int = 0,
    client: Client | None = None,
) -> Any:
    """Restores a pytree: ``restore([client,] job, step="latest", target=None)``.

    With ``target`` (a pytree of arrays, ``jax.ShapeDtypeStruct`` or scalars
    of the saved structure), the result has the target's structure and leaf
    types, and every leaf's dtype and shape are checked against it. Without
    it, the result is nested dicts and lists of read-only numpy arrays.
    """
    client, owned, rest = _split_client(args, client)
    try:
        if not 1 <= len(rest) <= 2:
            raise InvalidArgument("restore: expected ([client,] job, step='latest')")
        job = rest[0]
        step = cast(Step, rest[1] if len(rest) == 2 else "latest")
        shard = client.restore(job, step, rank)
        if shard.metadata.get(FORMAT_KEY) != PYTREE_FORMAT:
            raise CairnError(
                f"{job} step {shard.step} rank {rank}: not a JAX pytree "
                f"(format {shard.metadata.get(FORMAT_KEY)!r})"
            )
        stored = {name: (shard[name], shard.file_metadata[name]) for name in shard}
        if target is None:
            return _rebuild(stored)
        return _fill(target, stored)
    finally:
        if owned:
            client.close()


def _leaf_kind(name: str, leaf: Any) -> tuple[str, Any]:
    if isinstance(leaf, jax.Array):
        if not leaf.is_fully_addressable:
            raise InvalidArgument(
                f"pytree{name}: array is not fully addressable from this process; "
                "save each process's addressable shards as its own rank"
            )
        return "jax", leaf
    if isinstance(leaf, np.ndarray):
        return "numpy", leaf
    if isinstance(leaf, np.generic):
        return "numpy", np.asarray(leaf)
    if isinstance(leaf, bool):
        return "bool", np.asarray(leaf)
    if isinstance(leaf, int):
        return "int", np.asarray(leaf, dtype=np.int64)
    if isinstance(leaf, float):
        return "float", np.asarray(leaf, dtype=np.float64)
    if isinstance(leaf, complex):
        return "complex", np.asarray(leaf, dtype=np.complex128)
    raise InvalidArgument(
        f"pytree{name}: leaves must be arrays or numbers, got {type(leaf).__name__}"
    )


def _key_entry(key: Any) -> list[Any]:
    tu = jax.tree_util
    if isinstance(key, tu.DictKey):
        k = key.key
        if isinstance(k, str):
            return ["d", k]
        if isinstance(k, (int, np.integer)) and not isinstance(k, bool):
            return ["di", int(k)]
        return ["dr", repr(k)]
    if isinstance(key, tu.SequenceKey):
        return ["s", key.idx]
    if isinstance(key, tu.GetAttrKey):
        return ["a", key.name]
    if isinstance(key, tu.FlattenedIndexKey):
        return ["f", key.key]
    return ["r", str(key)]


def _rebuild(stored: Mapping[str, tuple[np.ndarray, Mapping[str, str]]]) -> Any:
    """Nested dicts/lists from stored key paths (attributes become dict keys)."""
    root: dict[Any, Any] = {}
    for array, meta in stored.values():
        entries = json.loads(meta.get(_META_PATH, "[]"))
        value = _as_leaf(array, meta.get(_META_LEAF, "numpy"))
        if not entries:
            return value  # the pytree was a single leaf
        node = root
        for depth, (_, key) in enumerate(entries):
            if depth == len(entries) - 1:
                node[key] = value
            else:
                node = node.setdefault(key, {})
    return _lists_from_int_keys(root)


def _lists_from_int_keys(node: Any) -> Any:
    if not isinstance(node, dict):
        return node
    converted = {k: _lists_from_int_keys(v) for k, v in node.items()}
    keys = list(converted)
    if keys and all(isinstance(k, int) for k in keys) and sorted(keys) == list(range(len(keys))):
        return [converted[i] for i in range(len(keys))]
    return converted


def _as_leaf(array: np.ndarray, kind: str) -> Any:
    if kind == "bool":
        return bool(array.item())
    if kind == "int":
        return int(array.item())
    if kind == "float":
        return float(array.item())
    if kind == "complex":
        return complex(array.item())
    return array


def _fill(target: Any, stored: Mapping[str, tuple[np.ndarray, Mapping[str, str]]]) -> Any:
    target_leaves, treedef = jax.tree_util.tree_flatten_with_path(target)
    wanted = {jax.tree_util.keystr(path) for path, _ in target_leaves}
    missing = sorted(wanted - set(stored))
    extra = sorted(set(stored) - wanted)
    if missing or extra:
        raise InvalidArgument(
            f"target: structure differs from the checkpoint (missing from checkpoint: "
            f"{missing[:5]}, not in target: {extra[:5]})"
        )
    leaves = []
    for path, like in target_leaves:
        name = jax.tree_util.keystr(path)
        array, meta = stored[name]
        leaves.append(_like(name, array, meta, like))
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _like(name: str, array: np.ndarray, meta: Mapping[str, str], like: Any) -> Any:
    if isinstance(like, (bool, int, float, complex)) and not isinstance(like, np.generic):
        if array.shape != ():
            raise InvalidArgument(f"target{name}: scalar expected, checkpoint has {array.shape}")
        return type(like)(array.item())
    shape = getattr(like, "shape", None)
    dtype = getattr(like, "dtype", None)
    if shape is not None and tuple(shape) != array.shape:
        raise InvalidArgument(
            f"target{name}: shape {tuple(shape)} differs from the checkpoint's {array.shape}"
        )
    if dtype is not None and np.dtype(dtype) != array.dtype:
        raise InvalidArgument(
            f"target{name}: dtype {np.dtype(dtype)} differs from the checkpoint's {array.dtype}"
        )
    if isinstance(like, np.ndarray):
        return array
    if isinstance(like, np.generic):
        return array[()]
    if isinstance(like, (jax.Array, jax.ShapeDtypeStruct)):
        sharding = getattr(like, "sharding", None)
        return jax.device_put(array, sharding) if sharding is not None else jax.device_put(array)
    return _as_leaf(array, meta.get(_META_LEAF, "numpy"))


def _step_dir(directory: Any, step: int) -> str:
    return os.path.join(os.fspath(directory), str(step))


def save_orbax_step(
    client: Client,
    job: str,
    step: int,
    manager: Any,
    *,
    rank: int = 0,
    world_size: int | None = None,
) -> SaveResult:
    """Saves step ``step`` of an Orbax CheckpointManager (or of a checkpoint
    root directory holding ``<step>/``) as shard (job, step, rank).

    Waits for the manager's pending async save first, so only a finalized
    step directory is saved.
    """
    directory = getattr(manager, "directory", manager)
    if hasattr(manager, "wait_until_finished"):
        manager.wait_until_finished()
    step_dir = _step_dir(directory, step)
    if not os.path.isdir(step_dir):
        raise InvalidArgument(f"step: no finished Orbax step directory {step_dir!r}")
    return client.save_directory(
        job, step, rank, step_dir, metadata={"orbax.step_dir": str(step)}, world_size=world_size
    )


def restore_orbax_step(
    client: Client,
    job: str,
    manager: Any,
    step: Step = "latest",
    *,
    rank: int = 0,
) -> int:
    """Lays a step saved by :func:`save_orbax_step` back into the manager's
    directory (or a checkpoint root directory) and returns the step.

    A manager is reloaded so that ``manager.restore(step)`` sees the step.
    A step directory that already exists is left as it is.
    """
    directory = getattr(manager, "directory", manager)
    if step == "latest":
        manifest = client.manifest(job, "latest", rank)
        step = manifest.shard.step
    step_dir = _step_dir(directory, step)
    if not os.path.exists(step_dir):
        # Restore next to the target and rename, so Orbax never sees a
        # half-written step directory.
        staging = f"{step_dir}.cairn-restore-{os.getpid()}"
        client.restore_directory(job, staging, step, rank)
        os.rename(staging, step_dir)
    if hasattr(manager, "reload"):
        manager.reload()
    return step
