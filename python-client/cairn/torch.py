"""PyTorch Distributed Checkpoint (DCP) storage through Cairn.

>>> import torch.distributed.checkpoint as dcp
>>> from cairn.torch import CairnReader, CairnWriter
>>> dcp.save(state_dict, storage_writer=CairnWriter(job="llm", step=1000))  # doctest: +SKIP
>>> dcp.load(state_dict, storage_reader=CairnReader(job="llm"))             # doctest: +SKIP

or with checkpoint ids: ``dcp.save(sd, checkpoint_id="cairn://llm/1000",
storage_writer=CairnWriter())``; ``cairn://TENANT/JOB/STEP`` names a tenant,
and ``STEP`` may be ``latest`` when loading.

Layout of a DCP step in Cairn, for N DCP ranks (the step's world size in
Cairn is N + 1):

* Cairn rank ``r + 1`` is DCP rank r's shard: one file per write item
  (``t0``, ``t1``, ...), raw little-endian bytes of the item's tensor chunk
  (or the item's serialized bytes), each copied once into the daemon's
  pre-sized tmpfs file, with dtype/shape/fqn in the file metadata.
* Cairn rank 0 holds ``dcp.metadata``: the pickled DCP ``Metadata``, whose
  ``storage_data`` maps every item to (Cairn rank, file). The coordinator
  commits it in ``finish``, after every rank's shard is committed, so the
  daemon reports the step restorable only once all N + 1 shards are in: a
  crash at any point leaves a step that ``latest`` never picks.

Attempts: the coordinator draws one attempt id per save of a step in
``prepare_global_plan`` and hands it to every rank in its plan; every shard
of the save, the metadata shard included, carries it. A step is complete
only when all its shards carry the same attempt, so a step a crashed run
left incomplete is simply saved again (its stale shards are replaced), a
late shard of the crashed run can never complete it, and a complete step
still raises AlreadyExists unless ``overwrite=True``.

Async saves: ``CairnWriter`` is DCP's stager too (an ``AsyncStager``), so
``dcp.async_save(sd, storage_writer=CairnWriter(...))`` stalls the trainer
only for one copy of the state dict into host buffers that are made once per
``Client`` and reused by every later save (DCP's default stager allocates a
fresh copy each time, which costs more than the copy). A save waits until the
previous save through the same buffers has written them (a save that failed
releases them too). The price is one host copy of the state kept between
saves; ``CairnWriter(cache_staged_state=False)`` stages into fresh memory
each time instead, and ``close()`` drops the buffers.

Loading restores each needed rank's shard once (memory-mapped, zero copy) and
copies every requested region straight into the destination tensors, so a
checkpoint saved by N ranks loads into any number of ranks (DCP's
resharding). CUDA tensors are saved through pinned host memory; they load
through DCP's usual ``copy_`` into the destination device.

DCP's ``use_collectives=False`` mode (every rank writes its own metadata) is
not supported: a Cairn step has exactly one metadata shard.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import os
import pickle
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed._state_dict_utils import _copy_state_dict, _create_cpu_state_dict
from torch.distributed.checkpoint.metadata import (
    STATE_DICT_TYPE,
    Metadata,
    MetadataIndex,
    StorageMeta,
)
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    LoadPlanner,
    ReadItem,
    SavePlan,
    SavePlanner,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.staging import AsyncStager
from torch.distributed.checkpoint.storage import StorageReader, StorageWriter, WriteResult
from torch.distributed.tensor import DTensor
from torch.futures import Future

from cairn import _arrays
from cairn.client import FORMAT_KEY, Client, RestoredShard
from cairn.errors import AlreadyExists, CairnError, InvalidArgument

__all__ = ["CHECKPOINT_SCHEME", "CairnReader", "CairnWriter", "parse_checkpoint_id"]

#: Prefix of the checkpoint ids these classes accept.
CHECKPOINT_SCHEME = "cairn://"
#: The Cairn rank holding the pickled DCP metadata.
METADATA_RANK = 0
#: File name of the pickled DCP metadata inside the metadata shard.
METADATA_FILE = "dcp.metadata"
#: Shard metadata value of ``cairn.format`` for every shard of a DCP step.
DCP_FORMAT = "torch-dcp/v1"
#: DCP format version the metadata is written as (FileSystemWriter's).
_DCP_VERSION = "1.0.0"

_META_FQN = "fqn"
_META_OFFSETS = "offsets"
#: How long a save's staged buffers may wait for the save to start before
#: the next save stops waiting for it and stages into fresh buffers.
_UNCLAIMED_GRACE = 10.0
#: How long the next save waits for a running save to write the buffers
#: before it stages into fresh buffers instead (leaving those to it).
_STAGING_WAIT_LIMIT = 300.0

log = logging.getLogger("cairn")


@dataclass(frozen=True)
class CairnStorageInfo:
    """Where one write item lives (pickled into the DCP metadata)."""

    rank: int
    file: str
    length: int


@dataclass(frozen=True)
class _PlanData:
    """What the coordinator tells each rank in its plan's storage_data."""

    shard_rank: int
    world_size: int
    #: The save's attempt id, the same on every rank.
    attempt: str


def parse_checkpoint_id(checkpoint_id: str | os.PathLike[str]) -> tuple[str | None, str, str]:
    """``cairn://[TENANT/]JOB/STEP`` → (tenant or None, job, step text)."""
    text = os.fspath(checkpoint_id)
    if not text.startswith(CHECKPOINT_SCHEME):
        raise InvalidArgument(
            f"checkpoint_id: expected {CHECKPOINT_SCHEME}[TENANT/]JOB/STEP, got {text!r}"
        )
    parts = text[len(CHECKPOINT_SCHEME) :].strip("/").split("/")
    if len(parts) == 2:
        tenant, (job, step) = None, parts
    elif len(parts) == 3:
        tenant, job, step = parts
    else:
        raise InvalidArgument(
            f"checkpoint_id: expected {CHECKPOINT_SCHEME}[TENANT/]JOB/STEP, got {text!r}"
        )
    if not job or not (step.isdigit() or step == "latest"):
        raise InvalidArgument(
            f"checkpoint_id: step must be a non-negative integer or 'latest', got {text!r}"
        )
    return tenant, job, step


class _CairnStorage:
    """What the writer and the reader share: the target and a lazy client."""

    def __init__(
        self,
        checkpoint_id: str | os.PathLike[str] | None,
        job: str | None,
        step: int | str | None,
        client: Client | None,
        socket: str | os.PathLike[str] | None,
        tenant: str,
    ) -> None:
        self.job = job
        self.step: int | str | None = step
        self.tenant = tenant
        self._socket = socket
        self._client = client
        # Settings of the client to make after unpickling (see __getstate__).
        self._client_settings: dict[str, Any] = {}
        if checkpoint_id is not None:
            self._apply_checkpoint_id(checkpoint_id)

    def _apply_checkpoint_id(self, checkpoint_id: str | os.PathLike[str]) -> None:
        tenant, job, step = parse_checkpoint_id(checkpoint_id)
        if tenant is not None:
            self.tenant = tenant
        self.job = job
        self.step = step if step == "latest" else int(step)

    @property
    def client(self) -> Client:
        if self._client is None or self._client.tenant != self.tenant:
            settings = {**self._client_settings, "tenant": self.tenant}
            self._client = Client(self._socket, **settings)
        return self._client

    @property
    def checkpoint_id(self) -> str:
        tenant = f"{self.tenant}/" if self.tenant else ""
        return f"{CHECKPOINT_SCHEME}{tenant}{self.job}/{self.step}"

    def _require_target(self) -> str:
        if not self.job:
            raise InvalidArgument(
                "job: not set; pass job= or a checkpoint_id such as cairn://JOB/STEP"
            )
        return self.job

    def __getstate__(self) -> dict[str, Any]:
        # A process-based async save pickles the writer: reconnect there.
        state = self.__dict__.copy()
        if state.get("_client") is not None:
            state["_socket"] = state["_client"].target
            state["tenant"] = state["_client"].tenant
            state["_client_settings"] = state["_client"]._settings()
        state["_client"] = None
        return state

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        try:
            parse_checkpoint_id(checkpoint_id)
        except (InvalidArgument, TypeError):
            return False
        return True


class CairnWriter(_CairnStorage, StorageWriter, AsyncStager):
    """A DCP ``StorageWriter`` that saves each rank's tensors as a Cairn shard.

    ``job`` and ``step`` (or ``checkpoint_id="cairn://JOB/STEP"``) name the
    checkpoint; ``client`` (or ``socket``/``tenant``) names the daemon.
    A complete step is immutable: saving it again raises AlreadyExists
    unless ``overwrite=True``, which deletes the old step first. A step that
    never became complete (a crash during its save) is saved again without
    ``overwrite``: the new save's attempt replaces its shards.

    As the stager of ``dcp.async_save`` it copies the state dict into host
    buffers kept per ``Client`` (pinned when CUDA is available) and reused by
    the next async save through that client, once the previous one has
    written them. ``cache_staged_state=False`` stages into fresh host memory
    each time (no copy kept between saves, a longer stall); ``close()``
    drops the kept buffers.
    """

    # dcp.async_save returns as soon as stage() has copied: nothing to sync.
    _synchronize_after_execute: bool = False

    def __init__(
        self,
        checkpoint_id: str | os.PathLike[str] | None = None,
        *,
        job: str | None = None,
        step: int | None = None,
        client: Client | None = None,
        socket: str | os.PathLike[str] | None = None,
        tenant: str = "",
        overwrite: bool = False,
        cache_staged_state: bool = True,
    ) -> None:
        _CairnStorage.__init__(self, checkpoint_id, job, step, client, socket, tenant)
        self.overwrite = overwrite
        #: Whether async saves stage into host buffers kept per Client.
        self.cache_staged_state = cache_staged_state
        self.save_id = uuid.uuid4().hex
        self.is_coordinator = False
        self.rank = 0
        self._plan_data: _PlanData | None = None
        # The kept buffers this writer's last stage() filled, until its save
        # has written them.
        self._lease: _Lease | None = None

    # -- AsyncStager (dcp.async_save) ------------------------------------

    def stage(self, state_dict: STATE_DICT_TYPE) -> STATE_DICT_TYPE:
        """A host copy of ``state_dict`` that training may no longer change.

        Called by ``dcp.async_save`` in the trainer's thread; the save then
        runs in the background on the copy.
        """
        pin = torch.cuda.is_available()
        if not self.cache_staged_state:
            staged = _create_cpu_state_dict(state_dict, pin_memory=pin)
            return _copy_state_dict(state_dict, staged, type_check=False)
        buffers = _staging_buffers(self.client)
        lease, host = buffers.acquire(_layout_key(state_dict))
        try:
            if host is None:
                host = _create_cpu_state_dict(state_dict, pin_memory=pin)
            staged = _copy_state_dict(state_dict, host, type_check=False)
        except BaseException:
            buffers.release(lease, drop=True)
            raise
        buffers.keep(lease, host)
        self._lease = lease
        return _StagedStateDict(staged, lease)

    def synchronize_staging(self) -> None:
        """Nothing to wait for: :meth:`stage` returns once the copy is made."""

    def close(self) -> None:
        """Drops the host buffers kept for this writer's client (if any).

        A save still writing them keeps them until it is done.
        """
        if self._client is not None:
            _drop_staging_buffers(self._client)

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        if checkpoint_id:
            self._apply_checkpoint_id(checkpoint_id)
        self.save_id = uuid.uuid4().hex
        self._plan_data = None

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.is_coordinator = is_coordinator
        self.rank = int(kwargs.get("rank") or 0)
        if not kwargs.get("use_collectives", True):
            raise InvalidArgument(
                "use_collectives: CairnWriter needs use_collectives=True "
                "(one metadata shard per step, written by the coordinator)"
            )

    def _target_step(self) -> int:
        self._require_target()
        if not isinstance(self.step, int) or isinstance(self.step, bool):
            raise InvalidArgument(
                f"step: saving needs an integer step, got {self.step!r}"
            )
        return self.step

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        self._target_step()
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        job, step = self._require_target(), self._target_step()
        world_size = len(plans) + 1
        existing = next((s for s in self.client.list_steps(job) if s.step == step), None)
        if existing is not None:
            if existing.restorable and not self.overwrite:
                raise AlreadyExists(
                    f"checkpoint {self.checkpoint_id} already exists "
                    "(complete steps are immutable; pass overwrite=True to replace it)"
                )
            # An incomplete step (a crashed save) is saved again as it is: the
            # new attempt replaces its shards one by one. Shards the new save
            # would not replace (it has fewer ranks) are deleted first.
            stale_layout = any(
                s.rank >= world_size or s.world_size not in (None, world_size)
                for s in existing.shards
            )
            if self.overwrite or stale_layout:
                self.client.delete(job, step)
        attempt = uuid.uuid4().hex
        self._plan_data = _PlanData(METADATA_RANK, world_size, attempt)
        return [
            dataclasses.replace(plan, storage_data=_PlanData(index + 1, world_size, attempt))
            for index, plan in enumerate(plans)
        ]

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        try:
            return self._write_data(plan, planner)
        finally:
            # This rank's tensors are in Cairn (or the save failed): the
            # staged buffers may take the next save's copy.
            lease = self._lease
            if lease is not None and lease.ended_by(threading.current_thread()):
                self._lease = None

    def _write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        plan_data = plan.storage_data
        if not isinstance(plan_data, _PlanData):
            raise CairnError("write_data: the plan did not go through prepare_global_plan")
        files: list[tuple[str, int, dict[str, str], Callable[[], _arrays.Materialized]]] = []
        results: list[WriteResult] = []
        for index, item in enumerate(plan.items):
            file_name = f"t{index}"
            meta = {
                _arrays.META_NAME: file_name,
                _META_FQN: item.index.fqn,
                _META_OFFSETS: json.dumps(list(item.index.offset or ())),
            }
            if item.type == WriteItemType.BYTE_IO:
                # Serialized objects are small: resolving now gives their size.
                data = planner.resolve_data(item)
                if not isinstance(data, io.BytesIO):
                    raise CairnError(f"{item.index.fqn}: BYTE_IO item resolved to {type(data)}")
                payload = data.getbuffer()
                nbytes = payload.nbytes
                meta[_arrays.META_DTYPE] = "uint8"
                meta[_arrays.META_SHAPE] = json.dumps([nbytes])
                getter = _bytes_getter(payload, data)
            else:
                nbytes, dtype_name, shape = _item_layout(item)
                meta[_arrays.META_DTYPE] = dtype_name
                meta[_arrays.META_SHAPE] = json.dumps(list(shape))
                getter = _tensor_getter(planner, item, nbytes)
            files.append((file_name, nbytes, meta, getter))
            results.append(
                WriteResult(
                    index=item.index,
                    size_in_bytes=nbytes,
                    storage_data=CairnStorageInfo(plan_data.shard_rank, file_name, nbytes),
                )
            )
        self.client._save_files(
            self.client._ref(self._require_target(), self._target_step(), plan_data.shard_rank),
            files,
            plan_data.world_size,
            {FORMAT_KEY: DCP_FORMAT, "cairn.dcp.save_id": self.save_id},
            attempt=plan_data.attempt,
        )
        future: Future[list[WriteResult]] = Future()
        future.set_result(results)
        return future

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        if self._plan_data is None:
            raise CairnError("finish: prepare_global_plan did not run on the coordinator")
        metadata.version = _DCP_VERSION
        metadata.storage_data = {
            result.index: result.storage_data for rank_results in results for result in rank_results
        }
        metadata.storage_meta = self.storage_meta()
        payload = pickle.dumps(metadata, protocol=pickle.HIGHEST_PROTOCOL)
        view = memoryview(payload)
        meta = {
            _arrays.META_NAME: METADATA_FILE,
            _arrays.META_DTYPE: "uint8",
            _arrays.META_SHAPE: json.dumps([len(payload)]),
        }
        self.client._save_files(
            self.client._ref(self._require_target(), self._target_step(), METADATA_RANK),
            [(METADATA_FILE, len(payload), meta, lambda: (view, payload))],
            self._plan_data.world_size,
            {FORMAT_KEY: DCP_FORMAT, "cairn.dcp.save_id": self.save_id},
            attempt=self._plan_data.attempt,
        )

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=self.checkpoint_id, save_id=self.save_id)

    def __getstate__(self) -> dict[str, Any]:
        # A process-based async save writes in another process: the lease
        # stays here, held by the thread that waits for that process.
        state = super().__getstate__()
        state["_lease"] = None
        return state

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return _CairnStorage.validate_checkpoint_id(checkpoint_id)


class CairnReader(_CairnStorage, StorageReader):
    """A DCP ``StorageReader`` that loads a step saved by :class:`CairnWriter`.

    ``step`` defaults to ``"latest"``: the newest step whose shards (the
    metadata shard included) are all complete. The step is fixed when the
    metadata is read. Each rank resolves ``latest`` on its own node's daemon;
    in multi-node jobs pass an explicit step so that every rank loads the same.
    """

    def __init__(
        self,
        checkpoint_id: str | os.PathLike[str] | None = None,
        *,
        job: str | None = None,
        step: int | str = "latest",
        client: Client | None = None,
        socket: str | os.PathLike[str] | None = None,
        tenant: str = "",
    ) -> None:
        _CairnStorage.__init__(self, checkpoint_id, job, step, client, socket, tenant)
        self.load_id = uuid.uuid4().hex
        self.storage_data: dict[MetadataIndex, CairnStorageInfo] = {}
        self._shards: dict[int, RestoredShard] = {}
        self.resolved_step: int | None = None

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        if checkpoint_id:
            self._apply_checkpoint_id(checkpoint_id)
        self.load_id = uuid.uuid4().hex
        self.storage_data = {}
        self._shards = {}
        self.resolved_step = None

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        job = self._require_target()
        step = self.step if self.step is not None else "latest"
        shard = self.client.restore(job, step, METADATA_RANK)  # type: ignore[arg-type]
        if shard.metadata.get(FORMAT_KEY) != DCP_FORMAT or METADATA_FILE not in shard:
            raise CairnError(
                f"{job} step {shard.step}: not a DCP checkpoint "
                f"(format {shard.metadata.get(FORMAT_KEY)!r})"
            )
        self.resolved_step = shard.step
        metadata = pickle.loads(shard[METADATA_FILE].tobytes())
        if not isinstance(metadata, Metadata):
            raise CairnError(f"{job} step {shard.step}: {METADATA_FILE} is not DCP metadata")
        storage_meta = getattr(metadata, "storage_meta", None) or StorageMeta()
        storage_meta.load_id = self.load_id
        metadata.storage_meta = storage_meta
        return metadata

    def set_up_storage_reader(
        self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any
    ) -> None:
        if metadata.storage_data is None:
            raise CairnError("DCP metadata holds no storage_data")
        self.storage_data = metadata.storage_data
        self.is_coordinator = is_coordinator
        if self.resolved_step is None and isinstance(self.step, int):
            self.resolved_step = self.step

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        if self.resolved_step is None:
            raise CairnError("read_data: read_metadata did not run")
        by_rank: dict[int, list[ReadItem]] = {}
        for item in plan.items:
            by_rank.setdefault(self.storage_data[item.storage_index].rank, []).append(item)
        for rank, items in sorted(by_rank.items()):
            shard = self._shard(rank)
            for item in items:
                info = self.storage_data[item.storage_index]
                stored = shard[info.file]
                if item.type == LoadItemType.BYTE_IO:
                    planner.load_bytes(item, io.BytesIO(stored.tobytes()))
                    continue
                source = _narrow(_as_tensor(stored), item.storage_offsets, item.lengths)
                target = planner.resolve_tensor(item).detach()
                if target.size() != source.size():
                    raise CairnError(
                        f"{item.storage_index.fqn}: stored region {tuple(source.size())} "
                        f"does not match destination {tuple(target.size())}"
                    )
                target.copy_(source)
                planner.commit_tensor(item, target)
        future: Future[None] = Future()
        future.set_result(None)
        return future

    def _shard(self, rank: int) -> RestoredShard:
        shard = self._shards.get(rank)
        if shard is None:
            assert self.resolved_step is not None
            # Private copy-on-write mappings: torch wants writable buffers,
            # and nothing is copied unless written.
            shard = self.client.restore(
                self._require_target(), self.resolved_step, rank, writable=True
            )
            self._shards[rank] = shard
        return shard

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return _CairnStorage.validate_checkpoint_id(checkpoint_id)


class _Lease:
    """One async save's use of a client's staging buffers.

    Taken by ``stage()`` in the trainer's thread; claimed by the thread that
    runs the save when it first reads (or pickles) the staged state dict;
    ended when that thread's ``write_data`` is done, or when the thread is
    gone (the save failed before writing).
    """

    def __init__(self, buffers: _StagingBuffers) -> None:
        self.buffers = buffers
        self.stager = threading.current_thread()
        self.thread: threading.Thread | None = None
        self.since = time.monotonic()
        self.ended = False

    def claim(self) -> None:
        current = threading.current_thread()
        if self.thread is None and current is not self.stager:
            self.thread = current

    def ended_by(self, thread: threading.Thread) -> bool:
        """Ends the lease if ``thread`` holds it (the save that staged it, or,
        unclaimed, the thread that staged it); says whether it did."""
        if self.thread is thread or (self.thread is None and self.stager is thread):
            self.buffers.release(self)
            return True
        return False


class _StagingBuffers:
    """The host copy of a state dict that one Client's async saves reuse."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._host: STATE_DICT_TYPE | None = None
        self._key: Any = None
        self._lease: _Lease | None = None

    def acquire(self, key: Any) -> tuple[_Lease, STATE_DICT_TYPE | None]:
        """Waits until no save uses the buffers, then takes them: the kept
        host state dict if it has ``key``'s layout, else None (make one)."""
        with self._cond:
            while self._lease is not None:
                lease = self._lease
                held_for = time.monotonic() - lease.since
                if lease.thread is not None and not lease.thread.is_alive():
                    # Its save failed before writing: the buffers are free.
                    log.debug("reusing the staging buffers of an async save that ended early")
                    self._lease = None
                elif (lease.thread is None and held_for > _UNCLAIMED_GRACE) or (
                    held_for > _STAGING_WAIT_LIMIT
                ):
                    # Its save never started, or is still running: leave
                    # those buffers to it and stage into new ones.
                    log.warning(
                        "the previous async save %s after %.0f s; staging into new buffers",
                        "has not started" if lease.thread is None else "is still running",
                        held_for,
                    )
                    self._lease = None
                    self._host = None
                else:
                    self._cond.wait(timeout=0.05)
            lease = _Lease(self)
            self._lease = lease
            host = self._host if self._key == key else None
            if host is None:
                self._host = None  # freed before the new copy is allocated
            self._key = key
            return lease, host

    def keep(self, lease: _Lease, host: STATE_DICT_TYPE) -> None:
        with self._cond:
            if self._lease is lease:
                self._host = host

    def release(self, lease: _Lease, drop: bool = False) -> None:
        with self._cond:
            lease.ended = True
            if self._lease is lease:
                self._lease = None
                if drop:
                    self._host = None
                self._cond.notify_all()

    def clear(self) -> None:
        with self._cond:
            self._host = None
            self._key = None


_buffers_lock = threading.Lock()
_buffers: weakref.WeakKeyDictionary[Client, _StagingBuffers] = weakref.WeakKeyDictionary()


def _staging_buffers(client: Client) -> _StagingBuffers:
    with _buffers_lock:
        buffers = _buffers.get(client)
        if buffers is None:
            buffers = _buffers[client] = _StagingBuffers()
        return buffers


def _drop_staging_buffers(client: Client) -> None:
    with _buffers_lock:
        buffers = _buffers.get(client)
    if buffers is not None:
        buffers.clear()


class _StagedStateDict(dict):  # type: ignore[type-arg]
    """The state dict ``stage()`` returns: claims its lease for the thread
    that runs the save (DCP's ``save`` reads it first with ``items()``; a
    process-based save pickles it)."""

    def __init__(self, staged: Mapping[str, Any], lease: _Lease) -> None:
        super().__init__(staged)
        self._lease = lease

    def items(self):  # type: ignore[no-untyped-def]
        self._lease.claim()
        return super().items()

    def __reduce__(self) -> tuple[Any, ...]:
        self._lease.claim()
        return (dict, (dict(self),))


def _layout_key(obj: Any) -> Any:
    """What the kept host copy must match to be reused: the structure, and
    each tensor's kind, shape and dtype (other values are copied each time)."""
    if isinstance(obj, DTensor):
        local = obj._local_tensor
        return ("dtensor", tuple(obj.shape), obj.dtype, tuple(local.shape), str(obj.placements))
    if isinstance(obj, ShardedTensor):
        shards = tuple(
            (tuple(s.metadata.shard_offsets), tuple(s.tensor.shape)) for s in obj.local_shards()
        )
        return ("sharded", tuple(obj.size()), obj.dtype, shards)
    if isinstance(obj, torch.Tensor):
        return ("tensor", tuple(obj.shape), obj.dtype)
    if isinstance(obj, dict):
        return ("dict", tuple((k, _layout_key(v)) for k, v in obj.items()))
    if isinstance(obj, (list, tuple)):
        return (type(obj).__name__, tuple(_layout_key(v) for v in obj))
    return ("value", type(obj))


def _item_layout(item: WriteItem) -> tuple[int, str, Sequence[int]]:
    tensor_data = item.tensor_data
    if tensor_data is None:
        raise CairnError(f"{item.index.fqn}: tensor item without tensor_data")
    shape = [int(d) for d in tensor_data.chunk.sizes]
    dtype = tensor_data.properties.dtype
    return math.prod(shape) * dtype.itemsize, _arrays.torch_dtype_name(dtype), shape


def _bytes_getter(payload: memoryview, owner: Any) -> Callable[[], _arrays.Materialized]:
    view = payload.cast("B") if payload.format != "B" else payload
    return lambda: (view, owner)


def _tensor_getter(
    planner: SavePlanner, item: WriteItem, nbytes: int
) -> Callable[[], _arrays.Materialized]:
    def materialize() -> _arrays.Materialized:
        tensor = planner.resolve_data(item)
        if not isinstance(tensor, torch.Tensor):
            raise CairnError(f"{item.index.fqn}: tensor item resolved to {type(tensor)}")
        host = _arrays.tensor_to_host(tensor)
        flat = host.reshape(-1)
        if flat.numel() * flat.element_size() != nbytes:
            raise CairnError(
                f"{item.index.fqn}: resolved tensor has {flat.numel() * flat.element_size()} "
                f"bytes, the plan says {nbytes}"
            )
        if nbytes == 0:
            return memoryview(b""), None
        return memoryview(flat.view(torch.uint8).numpy()), host

    return materialize


def _as_tensor(stored: np.ndarray) -> torch.Tensor:
    """A torch view of a restored array, for every dtype torch and ml_dtypes share."""
    dtype = getattr(torch, stored.dtype.name, None)
    if not isinstance(dtype, torch.dtype):
        raise CairnError(f"dtype {stored.dtype.name} has no torch equivalent")
    raw = torch.from_numpy(stored.reshape(-1).view(np.uint8))
    return raw.view(dtype).reshape(stored.shape)


def _narrow(tensor: torch.Tensor, offsets: Sequence[int], lengths: Sequence[int]) -> torch.Tensor:
    for dim, (offset, length) in enumerate(zip(offsets, lengths)):
        if offset != 0 or length != tensor.size(dim):
            tensor = tensor.narrow(dim, offset, length)
    return tensor

