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

Async saves
    :func:`save_async` (or ``save(..., blocking=False)``) returns a
    :class:`cairn.SaveHandle` as soon as the pytree's bytes are fixed, and
    writes and commits them on the client's background thread. JAX arrays
    are immutable, so an array already in host memory (the CPU backend) is
    kept as it is, not copied: the trainer's stall is the flattening of the
    tree. Arrays on an accelerator are copied to host memory first (every
    transfer started at once, then waited for), and numpy leaves, which the
    trainer could change in place, are copied. After the call the trainer may
    replace, donate or mutate its state at will (JAX does not reuse a donated
    buffer while the save still holds it).

Attempts
    Every save of a step carries an *attempt* id, so that a step left
    incomplete by a crash can be saved again (see ``docs/semantics.md``).
    A one-rank step (``world_size`` 1, the default for rank 0) gets a fresh
    one per call. With several ranks, every rank must send the same id: pass
    ``attempt=`` (up to 64 characters of ``[A-Za-z0-9._-]``) from your own
    coordination, or, in a ``jax.distributed`` job, leave it out and the
    processes agree on process 0's id (a small collective: every process
    must call the save of that step, as it must anyway for the step to
    complete). Several ranks outside ``jax.distributed`` must pass
    ``attempt=`` (``InvalidArgument`` otherwise: ranks with ids of their own
    would never make the step complete).

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
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast, overload

import jax
import numpy as np

from cairn import _arrays
from cairn._names import escape_segment
from cairn._proto.cairn.v1 import cairn_pb2 as pb
from cairn.client import (
    FORMAT_KEY,
    SOCKET_ENV,
    VOLUME_ENV,
    Client,
    SaveHandle,
    SaveResult,
    _check_attempt,
    _check_metadata,
)
from cairn.errors import CairnError, InvalidArgument

__all__ = ["restore", "restore_orbax_step", "save", "save_async", "save_orbax_step"]

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


_FileSpec = tuple[str, int, Mapping[str, str], Callable[[], _arrays.Materialized]]


@dataclass
class _PytreeSave:
    """One shard of a pytree, ready to write: what save and save_async share."""

    job: str
    step: int
    rank: int
    files: list[_FileSpec]
    world_size: int | None
    metadata: dict[str, str]
    attempt: str


@overload
def save(
    *args: Any,
    rank: int = ...,
    world_size: int | None = ...,
    metadata: Mapping[str, str] | None = ...,
    client: Client | None = ...,
    attempt: str | None = ...,
    blocking: Literal[True] = ...,
) -> SaveResult: ...


@overload
def save(
    *args: Any,
    rank: int = ...,
    world_size: int | None = ...,
    metadata: Mapping[str, str] | None = ...,
    client: Client | None = ...,
    attempt: str | None = ...,
    blocking: Literal[False],
) -> SaveHandle: ...


def save(
    *args: Any,
    rank: int = 0,
    world_size: int | None = None,
    metadata: Mapping[str, str] | None = None,
    client: Client | None = None,
    attempt: str | None = None,
    blocking: bool = True,
) -> SaveResult | SaveHandle:
    """Saves a pytree of arrays: ``save([client,] job, step, pytree)``.

    Without a client, one is made as ``Client()`` makes it (``CAIRN_VOLUME``,
    then ``CAIRN_SOCKET``) and closed after.
    Leaves may be jax arrays, numpy arrays or numpy/Python scalars.
    ``blocking=False`` is :func:`save_async` (and returns its handle). ``attempt``: see the module's
    notes on attempts (leave it out for a single-process job).
    """
    if not blocking:
        return save_async(
            *args,
            rank=rank,
            world_size=world_size,
            metadata=metadata,
            client=client,
            attempt=attempt,
        )
    client, owned, rest = _split_client(args, client)
    try:
        plan = _plan(rest, rank, world_size, metadata, attempt, snapshot=False)
        return _write(client, client._ref(plan.job, plan.step, plan.rank), plan)
    finally:
        if owned:
            client.close()


def save_async(
    *args: Any,
    rank: int = 0,
    world_size: int | None = None,
    metadata: Mapping[str, str] | None = None,
    client: Client | None = None,
    attempt: str | None = None,
) -> SaveHandle:
    """Starts saving a pytree: ``save_async([client,] job, step, pytree)``.

    Returns a :class:`cairn.SaveHandle` once the pytree's bytes are fixed
    (host-resident jax arrays are kept without a copy, accelerator arrays
    are copied to host memory, numpy leaves are copied); the trainer need
    not wait for ``handle.staged()``. ``handle.result()`` waits for the
    commit (the step is then safe in the memory tier) and raises the save's
    error; ``handle.wait_durable("disk")`` waits for the disk tier.

    Saves run in order on the client's background thread. Without a
    client, they go through one client per daemon address, kept for the
    life of the process (``CAIRN_VOLUME`` and ``CAIRN_SOCKET`` are read at each call).
    """
    if client is None and not (args and isinstance(args[0], Client)):
        client = _shared_client()
    client, _, rest = _split_client(args, client)
    plan = _plan(rest, rank, world_size, metadata, attempt, snapshot=True)
    ref = client._ref(plan.job, plan.step, plan.rank)
    staged = threading.Event()
    future = client._background().submit(_write, client, ref, plan, staged.set)
    return SaveHandle(client, plan.job, plan.step, plan.rank, future, staged)


def _plan(
    rest: Sequence[Any],
    rank: int,
    world_size: int | None,
    metadata: Mapping[str, str] | None,
    attempt: str | None,
    *,
    snapshot: bool,
) -> _PytreeSave:
    """Checks the arguments and describes every leaf as a file.

    With ``snapshot``, every leaf's bytes are fixed before this returns (see
    :func:`save_async`); without it, they are read when written.
    """
    if len(rest) != 3:
        raise InvalidArgument("save: expected ([client,] job, step, pytree)")
    job, step, pytree = rest
    leaves, treedef = jax.tree_util.tree_flatten_with_path(pytree)
    described = []
    for path, leaf in leaves:
        name = jax.tree_util.keystr(path)
        kind, array_like = _leaf_kind(name, leaf)
        if snapshot and isinstance(array_like, np.ndarray) and array_like is leaf:
            # The caller's own numpy array: it may change in place later.
            array_like = np.array(array_like, order="C", copy=True)
        described.append((path, name, kind, array_like))
    if snapshot:
        hosted = _to_host([a for _, _, _, a in described if isinstance(a, jax.Array)])
        described = [
            (path, name, kind, next(hosted) if isinstance(a, jax.Array) else a)
            for path, name, kind, a in described
        ]
    files: list[_FileSpec] = []
    seen: set[str] = set()
    for index, (path, name, kind, array_like) in enumerate(described):
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
    return _PytreeSave(
        job, step, rank, files, world_size, shard_meta, _attempt_for(attempt, world_size)
    )


def _to_host(arrays: list[jax.Array]) -> Iterator[np.ndarray]:
    """Host numpy arrays with the values of ``arrays``, fixed from now on.

    An array in host memory (CPU devices) is viewed without a copy (the view
    keeps its buffer alive); the others are copied to host memory, every
    transfer started before the first is waited for.
    """
    for array in arrays:
        if not _on_host(array):
            array.copy_to_host_async()
    return iter([np.asarray(array) for array in arrays])


def _on_host(array: jax.Array) -> bool:
    return all(device.platform == "cpu" for device in array.sharding.device_set)


def _attempt_for(attempt: str | None, world_size: int | None) -> str:
    """The attempt id every rank of this step save must send (see the module notes)."""
    if attempt is not None or (world_size is not None and world_size <= 1):
        return _check_attempt(attempt)  # None: a fresh one
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        mine = np.frombuffer(uuid.uuid4().bytes, dtype=np.uint8)
        agreed = multihost_utils.broadcast_one_to_all(mine)
        return np.asarray(agreed, dtype=np.uint8).tobytes().hex()
    raise InvalidArgument(
        f"attempt: a step of {world_size or 'several'} ranks needs one attempt id shared by "
        "every rank; pass attempt= (or save from a jax.distributed job, whose processes "
        "agree on one)"
    )


def _write(
    client: Client,
    ref: pb.ShardRef,
    plan: _PytreeSave,
    on_staged: Callable[[], None] | None = None,
) -> SaveResult:
    return client._save_files(
        ref,
        plan.files,
        plan.world_size,
        plan.metadata,
        on_staged=on_staged,
        attempt=plan.attempt,
    )


# One client per daemon address for save_async calls that name none: a save
# in flight needs its client until it ends, and saves stay in order.
_shared_clients: dict[tuple[str | None, str | None], Client] = {}
_shared_lock = threading.Lock()


def _shared_client() -> Client:
    key = (os.environ.get(VOLUME_ENV), os.environ.get(SOCKET_ENV))
    with _shared_lock:
        client = _shared_clients.get(key)
        if client is None or client._closed:
            client = _shared_clients[key] = Client()
        return client


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
