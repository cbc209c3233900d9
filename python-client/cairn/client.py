"""The Cairn client: save and restore named arrays through the node daemon.

Save, local (the fast path)
    ``BeginShard`` names the files and their sizes; the daemon answers with
    files already sized in its memory tier (tmpfs). Each tensor is written
    with one ``os.pwrite`` from a memoryview of the caller's own buffer (no
    pickling, no intermediate copy), then ``CommitShard`` makes the shard
    visible. Any exception, KeyboardInterrupt included, aborts the session, so
    a partial shard is never listed.

Save, remote
    When the daemon is reached over TCP, or its files are not visible from
    this process (another mount namespace), the same bytes travel over the
    ``WriteShard`` stream in messages of :data:`STREAM_MESSAGE_BYTES`.

Restore
    ``RestoreShard`` makes the shard readable in tmpfs and returns the paths;
    each file is mapped read-only and wrapped by ``numpy.frombuffer``, so the
    arrays view the daemon's pages without a copy. Over TCP the bytes come
    from the ``ReadShard`` stream instead.

The client is thread-safe. ``save_async`` runs saves in order on one
background thread.
"""

from __future__ import annotations

import concurrent.futures
import enum
import errno
import math
import mmap
import os
import re
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import grpc
import numpy as np

from cairn import _arrays
from cairn._names import escape_path, escape_segment
from cairn._proto.cairn.v1 import cairn_pb2 as pb
from cairn._proto.cairn.v1 import cairn_pb2_grpc as pb_grpc
from cairn.errors import (
    CairnError,
    DataLoss,
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    from_rpc_error,
)

__all__ = [
    "DEFAULT_SOCKET",
    "Client",
    "RestoredShard",
    "SaveHandle",
    "SaveResult",
    "ShardState",
    "ShardStatus",
    "StepInfo",
    "Tier",
]

#: Where the daemon listens when neither an argument nor CAIRN_SOCKET says.
DEFAULT_SOCKET = "/run/cairn/cairn.sock"
#: Environment variable naming the daemon's socket (or ``host:port``).
SOCKET_ENV = "CAIRN_SOCKET"
#: Bytes per ``FileData`` message on the streaming paths (about 1 MiB keeps
#: HTTP/2 framing cheap without large transient copies).
STREAM_MESSAGE_BYTES = 1 << 20
#: Shard metadata keys starting with this are the client's own.
RESERVED_PREFIX = "cairn."
#: Shard metadata key telling which client layout wrote the shard.
FORMAT_KEY = "cairn.format"
TENSORS_FORMAT = "tensors/v1"
DIRECTORY_FORMAT = "directory/v1"
#: Per-file metadata key of a directory import: the file's original path.
META_PATH = "path"
#: Shard metadata key of a directory import: its empty directories (JSON).
EMPTY_DIRS_KEY = "cairn.empty_dirs"

# Linux moves at most this many bytes per write call.
_MAX_IO = 0x7FFFF000

_T = TypeVar("_T")


class Tier(enum.IntEnum):
    """Storage tiers, fastest first."""

    MEMORY = pb.TIER_MEMORY
    DISK = pb.TIER_DISK
    PEERS = pb.TIER_PEERS
    OBJECT_STORE = pb.TIER_OBJECT_STORE

    @classmethod
    def parse(cls, value: Tier | int | str) -> Tier:
        """Accepts a Tier, its number, or a name such as ``"disk"``."""
        if isinstance(value, str):
            try:
                return cls[value.strip().upper().replace("-", "_")]
            except KeyError:
                names = ", ".join(t.name.lower() for t in cls)
                raise InvalidArgument(f"tier: unknown tier {value!r} (one of {names})") from None
        return cls(value)


class ShardState(enum.IntEnum):
    """Where one shard stands in one tier."""

    UNSPECIFIED = pb.SHARD_STATE_UNSPECIFIED
    ABSENT = pb.SHARD_STATE_ABSENT
    PENDING = pb.SHARD_STATE_PENDING
    DURABLE = pb.SHARD_STATE_DURABLE
    FAILED = pb.SHARD_STATE_FAILED


@dataclass(frozen=True)
class ShardStatus:
    """One rank's shard of a step, with its state in every tier."""

    rank: int
    total_bytes: int
    world_size: int | None
    tiers: Mapping[Tier, ShardState]


@dataclass(frozen=True)
class StepInfo:
    """One step of a job as the daemon lists it."""

    step: int
    #: Every rank's shard is complete in some tier this node can read (its
    #: memory and disk tiers, and the object store when one is configured).
    restorable: bool
    shards: tuple[ShardStatus, ...]
    #: Every rank's shard is in the object store and the step is marked
    #: complete there: it survives the loss of the whole cluster.
    object_store_complete: bool = False

    def durable_in(self, tier: Tier | str) -> bool:
        """Whether every listed shard is durable in ``tier``."""
        wanted = Tier.parse(tier)
        return bool(self.shards) and all(
            s.tiers.get(wanted) == ShardState.DURABLE for s in self.shards
        )


@dataclass(frozen=True)
class SaveResult:
    """What the daemon reports for a committed shard."""

    tenant: str
    job: str
    step: int
    rank: int
    total_bytes: int
    file_count: int
    chunk_count: int
    manifest_hash: bytes
    committed_unix_ms: int

    @classmethod
    def _from_proto(cls, info: pb.ShardInfo) -> SaveResult:
        return cls(
            tenant=info.shard.tenant,
            job=info.shard.job,
            step=info.shard.step,
            rank=info.shard.rank,
            total_bytes=info.total_bytes,
            file_count=info.file_count,
            chunk_count=info.chunk_count,
            manifest_hash=bytes(info.manifest_hash),
            committed_unix_ms=info.committed_unix_ms,
        )


class RestoredShard(Mapping[str, np.ndarray]):
    """A restored shard: a read-only mapping from tensor name to array.

    The arrays view the daemon's memory tier through ``mmap`` (or, on the
    streaming path, buffers filled from the stream). A mapping stays valid
    after the shard is deleted or evicted (the pages live as long as the
    mapping), but copy what you keep for long (``numpy.array(x)``) if the
    daemon may recycle files in place.
    """

    def __init__(
        self,
        manifest: pb.ShardManifest,
        arrays: dict[str, np.ndarray],
        file_metadata: dict[str, dict[str, str]],
        streamed: bool,
    ) -> None:
        self._arrays = arrays
        self.manifest = manifest
        self.tenant: str = manifest.shard.tenant
        self.job: str = manifest.shard.job
        self.step: int = manifest.shard.step
        self.rank: int = manifest.shard.rank
        self.world_size: int | None = (
            manifest.world_size if manifest.HasField("world_size") else None
        )
        #: The shard's metadata (the caller's keys plus ``cairn.*`` ones).
        self.metadata: dict[str, str] = dict(manifest.metadata)
        #: Per tensor name: the file's stored metadata.
        self.file_metadata = file_metadata
        #: True when the bytes came over the ReadShard stream (no local files).
        self.streamed = streamed

    def __getitem__(self, key: str) -> np.ndarray:
        return self._arrays[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._arrays)

    def __len__(self) -> int:
        return len(self._arrays)

    def __repr__(self) -> str:
        return (
            f"RestoredShard(job={self.job!r}, step={self.step}, rank={self.rank}, "
            f"tensors={len(self._arrays)})"
        )


class SaveHandle:
    """A save running in the background (see :meth:`Client.save_async`)."""

    def __init__(
        self,
        client: Client,
        job: str,
        step: int,
        rank: int,
        future: concurrent.futures.Future[SaveResult],
        staged: threading.Event,
    ) -> None:
        self._client = client
        self.job = job
        self.step = step
        self.rank = rank
        self._future = future
        self._staged = staged

    def done(self) -> bool:
        """Whether the save has finished (committed or failed)."""
        return self._future.done()

    def staged(self) -> bool:
        """Whether the caller may reuse (modify, free) the saved buffers.

        True once every byte is in the daemon's memory tier (before the
        commit finishes), or once the save has failed.
        """
        return self._staged.is_set() or self._future.done()

    def wait_staged(self, timeout: float | None = None) -> bool:
        """Waits until :meth:`staged`; returns False on timeout."""
        if self._staged.wait(timeout) or self._future.done():
            return True
        return self.staged()

    def result(self, timeout: float | None = None) -> SaveResult:
        """Waits for the commit and returns what the daemon reports.

        Raises the save's error, or TimeoutError when ``timeout`` passes.
        """
        return self._future.result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        return self._future.exception(timeout)

    def wait_durable(
        self, tier: Tier | str = Tier.DISK, timeout: float | None = None
    ) -> None:
        """Waits for the commit, then until this shard is durable in ``tier``."""
        self.result(timeout)
        self._client.wait_durable(self.job, self.step, tier, rank=self.rank, timeout=timeout)

    def __repr__(self) -> str:
        state = "done" if self.done() else ("staged" if self.staged() else "writing")
        return f"SaveHandle(job={self.job!r}, step={self.step}, rank={self.rank}, {state})"


class _FilesNotLocal(Exception):
    """The daemon's staged or restored files are not visible from here."""


@dataclass(frozen=True)
class _Target:
    grpc_target: str
    display: str
    unix_path: str | None


_HOST_PORT = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.\-]+):(\d{1,5})$")


def _resolve_target(socket: str | os.PathLike[str] | None) -> _Target:
    value = os.fspath(socket) if socket is not None else os.environ.get(SOCKET_ENV)
    if not value:
        value = DEFAULT_SOCKET
    for prefix in ("tcp://", "http://", "grpc://"):
        if value.startswith(prefix):
            host_port = value[len(prefix) :].rstrip("/")
            return _Target(host_port, host_port, None)
    if value.startswith("unix:"):
        path = value[len("unix:") :]
        if path.startswith("//"):
            path = path[2:]
    elif "/" not in value and _HOST_PORT.match(value):
        return _Target(value, value, None)
    else:
        path = value
    path = os.path.abspath(path)
    return _Target(f"unix:{path}", f"unix:{path}", path)


@dataclass
class _Stubs:
    checkpoint: pb_grpc.CheckpointStub
    admin: pb_grpc.AdminStub


TensorMapping = Mapping[str, Any]
Transport = Literal["auto", "local", "stream"]


@dataclass
class _PendingSave:
    ref: pb.ShardRef
    sources: list[_arrays.Source]
    world_size: int | None
    metadata: dict[str, str]
    on_staged: Callable[[], None] = field(default=lambda: None)


class Client:
    """A connection to the node's Cairn daemon.

    ``socket`` is a Unix socket path (or ``unix:PATH``) or ``host:port`` for
    TCP; without it the client reads ``CAIRN_SOCKET``, then falls back to
    ``/run/cairn/cairn.sock``. ``tenant`` is sent with every call (empty: the
    daemon's default). ``transport`` forces the local file path (``"local"``)
    or the gRPC streams (``"stream"``); ``"auto"`` uses local files over a
    Unix socket when they are visible, streams otherwise. ``timeout`` (seconds)
    bounds every call that is not itself a wait.
    """

    def __init__(
        self,
        socket: str | os.PathLike[str] | None = None,
        *,
        tenant: str = "",
        transport: Transport = "auto",
        timeout: float | None = None,
    ) -> None:
        if transport not in ("auto", "local", "stream"):
            raise InvalidArgument(f"transport: expected auto, local or stream, got {transport!r}")
        self._target = _resolve_target(socket)
        if transport == "local" and self._target.unix_path is None:
            raise InvalidArgument(
                f"transport: 'local' needs a Unix socket, got TCP address {self._target.display}"
            )
        self.tenant = tenant
        self.timeout = timeout
        self._transport: Transport = transport
        # Whether the daemon's files are visible here; unknown until tried.
        self._files_local: bool | None = (
            False if self._target.unix_path is None or transport == "stream" else None
        )
        options: list[tuple[str, Any]] = [
            ("grpc.max_send_message_length", -1),
            ("grpc.max_receive_message_length", -1),
            ("grpc.enable_retries", 0),
        ]
        if self._target.unix_path is not None:
            # gRPC's default :authority for a Unix target is the escaped
            # socket path, which HTTP/2 servers such as hyper reject with a
            # PROTOCOL_ERROR reset.
            options.append(("grpc.default_authority", "localhost"))
        self._channel = grpc.insecure_channel(self._target.grpc_target, options=options)
        self._stubs = _Stubs(
            pb_grpc.CheckpointStub(self._channel), pb_grpc.AdminStub(self._channel)
        )
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._closed = False

    # -- lifecycle -------------------------------------------------------

    @property
    def target(self) -> str:
        """The address this client talks to (``unix:/path`` or ``host:port``)."""
        return self._target.display

    def close(self) -> None:
        """Waits for background saves, then closes the connection."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            executor = self._executor
        if executor is not None:
            executor.shutdown(wait=True)
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client({self._target.display!r}, tenant={self.tenant!r})"

    # -- saving ----------------------------------------------------------

    def save(
        self,
        job: str,
        step: int,
        rank: int,
        tensors: TensorMapping,
        metadata: Mapping[str, str] | None = None,
        world_size: int | None = None,
    ) -> SaveResult:
        """Saves ``tensors`` as shard (job, step, rank) and commits it.

        ``tensors`` maps names to numpy arrays, torch tensors (CPU or CUDA),
        jax arrays or bytes-like objects. ``metadata`` (strings) is stored
        with the shard; ``world_size`` tells the daemon how many ranks the
        step has, so it can tell when the step is complete (default 1 for a
        rank-0 shard). Returns once the shard is durable in the memory tier.
        """
        pending = self._prepare(job, step, rank, tensors, metadata, world_size)
        return self._save_pending(pending)

    def save_async(
        self,
        job: str,
        step: int,
        rank: int,
        tensors: TensorMapping,
        metadata: Mapping[str, str] | None = None,
        world_size: int | None = None,
    ) -> SaveHandle:
        """Starts :meth:`save` in the background and returns a handle.

        Arguments are checked before this returns. The tensors must not be
        modified until ``handle.staged()`` (or ``handle.wait_staged()``) says
        the bytes are in the memory tier.
        """
        pending = self._prepare(job, step, rank, tensors, metadata, world_size)
        staged = threading.Event()
        pending.on_staged = staged.set
        future = self._background().submit(self._save_pending, pending)
        return SaveHandle(self, job, step, rank, future, staged)

    def _prepare(
        self,
        job: str,
        step: int,
        rank: int,
        tensors: TensorMapping,
        metadata: Mapping[str, str] | None,
        world_size: int | None,
    ) -> _PendingSave:
        if not isinstance(tensors, Mapping):
            raise InvalidArgument(
                f"tensors: expected a mapping of name to array, got {type(tensors).__name__}"
            )
        sources: list[_arrays.Source] = []
        seen: dict[str, str] = {}
        for name, value in tensors.items():
            if not isinstance(name, str):
                raise InvalidArgument(f"tensors: names must be strings, got {name!r}")
            file_name = escape_segment(name)
            if file_name in seen:  # only on a hash collision of two long names
                raise InvalidArgument(
                    f"tensors: names {seen[file_name]!r} and {name!r} map to one file"
                )
            seen[file_name] = name
            sources.append(_arrays.source_for(name, value))
        shard_meta = _check_metadata(metadata)
        shard_meta[FORMAT_KEY] = TENSORS_FORMAT
        if world_size is None and rank == 0:
            world_size = 1
        return _PendingSave(self._ref(job, step, rank), sources, world_size, shard_meta)

    def _background(self) -> concurrent.futures.ThreadPoolExecutor:
        with self._lock:
            if self._closed:
                raise CairnError("client is closed")
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(
                    max_workers=1, thread_name_prefix="cairn-save"
                )
            return self._executor

    def _save_pending(self, pending: _PendingSave) -> SaveResult:
        files = [
            (escape_segment(src.name), src.nbytes, src.metadata(), src.materialize)
            for src in pending.sources
        ]
        return self._save_files(
            pending.ref, files, pending.world_size, pending.metadata, pending.on_staged
        )

    def _save_files(
        self,
        ref: pb.ShardRef,
        files: Sequence[tuple[str, int, Mapping[str, str], Callable[[], _arrays.Materialized]]],
        world_size: int | None,
        metadata: Mapping[str, str],
        on_staged: Callable[[], None] = lambda: None,
    ) -> SaveResult:
        """Saves one shard: (file name, size, metadata, bytes getter) per file.

        The layer every save goes through (tensors, DCP items, directories).
        """
        header = pb.BeginShardRequest(
            shard=ref,
            files=[pb.FileSpec(name=n, size=s, metadata=m) for n, s, m, _ in files],
            metadata=metadata,
        )
        if world_size is not None:
            header.world_size = world_size
        getters = [g for _, _, _, g in files]
        if self._files_local is not False:
            try:
                return self._save_local(header, getters, on_staged)
            except _FilesNotLocal:
                if self._transport == "local":
                    raise CairnError(
                        f"the daemon's staged files are not visible from this process "
                        f"(daemon at {self.target}); use transport='auto' or 'stream'"
                    ) from None
                self._files_local = False
        return self._save_stream(header, getters, on_staged)

    def _save_local(
        self,
        header: pb.BeginShardRequest,
        getters: Sequence[Callable[[], _arrays.Materialized]],
        on_staged: Callable[[], None],
    ) -> SaveResult:
        begun = self._call("BeginShard", self._stubs.checkpoint.BeginShard, header)
        session = begun.session_id
        try:
            staged = {f.name: f for f in begun.files}
            for index, spec in enumerate(header.files):
                target = staged.get(spec.name)
                if target is None or target.size != spec.size:
                    raise CairnError(
                        f"BeginShard staged {target.size if target else 'no'} bytes "
                        f"for file {spec.name!r}, expected {spec.size}"
                    )
                _write_file(target.path, getters[index], spec.size, first=index == 0)
                if self._files_local is None:
                    self._files_local = True
            on_staged()
            committed = self._call(
                "CommitShard",
                self._stubs.checkpoint.CommitShard,
                pb.CommitShardRequest(session_id=session),
            )
        except BaseException:
            self._abort_quietly(session)
            raise
        return SaveResult._from_proto(committed.shard)

    def _save_stream(
        self,
        header: pb.BeginShardRequest,
        getters: Sequence[Callable[[], _arrays.Materialized]],
        on_staged: Callable[[], None],
    ) -> SaveResult:
        cancelled = threading.Event()

        def requests() -> Iterator[pb.WriteShardRequest]:
            yield pb.WriteShardRequest(header=header)
            for index, spec in enumerate(header.files):
                if spec.size == 0:
                    continue
                view, keepalive = getters[index]()
                if view.nbytes != spec.size:
                    raise CairnError(f"file {spec.name!r}: {view.nbytes} bytes, expected {spec.size}")
                for offset in range(0, spec.size, STREAM_MESSAGE_BYTES):
                    if cancelled.is_set():
                        raise CairnError("save cancelled")
                    chunk = bytes(view[offset : offset + STREAM_MESSAGE_BYTES])
                    yield pb.WriteShardRequest(
                        data=pb.FileData(file_index=index, offset=offset, data=chunk)
                    )
                del view, keepalive
            on_staged()

        future = self._stubs.checkpoint.WriteShard.future(requests(), timeout=self.timeout)
        try:
            response = future.result()
        except grpc.RpcError as e:
            raise self._error(e, "WriteShard") from None
        except BaseException:
            # Cancelling the stream before it half-closes commits nothing.
            cancelled.set()
            future.cancel()
            raise
        return SaveResult._from_proto(response.shard)

    def _abort_quietly(self, session_id: str) -> None:
        try:
            self._stubs.checkpoint.AbortShard(
                pb.AbortShardRequest(session_id=session_id), timeout=10
            )
        except grpc.RpcError:
            # The daemon drops sessions it cannot finish; nothing was listed.
            pass

    def save_directory(
        self,
        job: str,
        step: int,
        rank: int,
        directory: str | os.PathLike[str],
        metadata: Mapping[str, str] | None = None,
        world_size: int | None = None,
    ) -> SaveResult:
        """Saves every file under ``directory`` as one shard.

        For frameworks that write a checkpoint directory of their own (Orbax,
        ``torch.save`` files): relative paths are kept in the per-file
        metadata and :meth:`restore_directory` lays them out again. Each file
        is mapped read-only and written with one ``pwrite`` into its staged
        file (a single copy).
        """
        root = os.fspath(directory)
        if not os.path.isdir(root):
            raise InvalidArgument(f"directory: {root!r} is not a directory")
        files: list[tuple[str, int, Mapping[str, str], Callable[[], _arrays.Materialized]]] = []
        empty_dirs: list[str] = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            rel_dir = os.path.relpath(dirpath, root)
            if not dirnames and not filenames and rel_dir != ".":
                empty_dirs.append(rel_dir.replace(os.sep, "/"))
            for filename in sorted(filenames):
                full = os.path.join(dirpath, filename)
                rel = os.path.relpath(full, root).replace(os.sep, "/")
                size = os.path.getsize(full)
                files.append(
                    (escape_path(rel), size, {META_PATH: rel}, _file_reader(full, size))
                )
        shard_meta = _check_metadata(metadata)
        shard_meta[FORMAT_KEY] = DIRECTORY_FORMAT
        if empty_dirs:
            import json

            shard_meta[EMPTY_DIRS_KEY] = json.dumps(empty_dirs)
        if world_size is None and rank == 0:
            world_size = 1
        return self._save_files(self._ref(job, step, rank), files, world_size, shard_meta)

    # -- restoring -------------------------------------------------------

    def restore(
        self,
        job: str,
        step: int | Literal["latest"] = "latest",
        rank: int = 0,
        *,
        writable: bool = False,
        verify: bool = True,
    ) -> RestoredShard:
        """Restores shard (job, step, rank) as a mapping of name to array.

        ``step="latest"`` picks the newest step whose shards are all complete.
        Arrays are read-only views of the daemon's files (zero copy); with
        ``writable=True`` they are private copy-on-write mappings instead
        (writes stay in this process). ``verify=False`` lets the daemon skip
        re-hashing a shard its memory tier already holds.
        """
        selector = self._selector(job, step, rank)
        if self._files_local is not False:
            try:
                return self._restore_local(selector, writable, verify)
            except _FilesNotLocal:
                if self._transport == "local":
                    raise CairnError(
                        f"the daemon's restored files are not visible from this process "
                        f"(daemon at {self.target}); use transport='auto' or 'stream'"
                    ) from None
                self._files_local = False
        return self._restore_stream(selector, writable)

    def _restore_local(
        self, selector: pb.ShardSelector, writable: bool, verify: bool
    ) -> RestoredShard:
        response = self._call(
            "RestoreShard",
            self._stubs.checkpoint.RestoreShard,
            pb.RestoreShardRequest(shard=selector, skip_verify=not verify),
        )
        paths = {f.name: f for f in response.files}
        arrays: dict[str, np.ndarray] = {}
        file_metadata: dict[str, dict[str, str]] = {}
        for index, manifest_file in enumerate(response.manifest.files):
            restored = paths.get(manifest_file.name)
            if restored is None:
                raise DataLoss(f"RestoreShard returned no path for file {manifest_file.name!r}")
            meta = dict(manifest_file.metadata)
            dtype, shape = _layout(manifest_file.name, meta, restored.size)
            try:
                array = _map_file(restored.path, restored.size, dtype, shape, writable)
            except FileNotFoundError:
                if index == 0:
                    raise _FilesNotLocal() from None
                raise
            key = meta.get(_arrays.META_NAME, manifest_file.name)
            arrays[key] = array
            file_metadata[key] = meta
        if response.manifest.files and self._files_local is None:
            self._files_local = True
        return RestoredShard(response.manifest, arrays, file_metadata, streamed=False)

    def _restore_stream(self, selector: pb.ShardSelector, writable: bool) -> RestoredShard:
        manifest, buffers = self._read_stream(selector)
        arrays: dict[str, np.ndarray] = {}
        file_metadata: dict[str, dict[str, str]] = {}
        for manifest_file, buffer in zip(manifest.files, buffers):
            meta = dict(manifest_file.metadata)
            dtype, shape = _layout(manifest_file.name, meta, manifest_file.size)
            array = buffer.view(dtype).reshape(shape)
            if not writable:
                array.flags.writeable = False
            key = meta.get(_arrays.META_NAME, manifest_file.name)
            arrays[key] = array
            file_metadata[key] = meta
        return RestoredShard(manifest, arrays, file_metadata, streamed=True)

    def _read_stream(
        self, selector: pb.ShardSelector
    ) -> tuple[pb.ShardManifest, list[np.ndarray]]:
        stream = self._stubs.checkpoint.ReadShard(
            pb.ReadShardRequest(shard=selector), timeout=self.timeout
        )
        try:
            try:
                first = next(stream)
            except StopIteration:
                raise DataLoss("ReadShard ended before its manifest") from None
            if not first.HasField("manifest"):
                raise DataLoss("ReadShard did not start with the manifest")
            manifest = first.manifest
            buffers = [np.empty(f.size, dtype=np.uint8) for f in manifest.files]
            received = [0] * len(buffers)
            for message in stream:
                if not message.HasField("data"):
                    raise DataLoss("ReadShard sent a second manifest")
                data = message.data
                if data.file_index >= len(buffers):
                    raise DataLoss(f"ReadShard sent data for file #{data.file_index}")
                end = data.offset + len(data.data)
                target = buffers[data.file_index]
                if end > target.size:
                    raise DataLoss(
                        f"ReadShard sent bytes past the end of file "
                        f"{manifest.files[data.file_index].name!r}"
                    )
                target[data.offset : end] = np.frombuffer(data.data, dtype=np.uint8)
                received[data.file_index] += len(data.data)
        except grpc.RpcError as e:
            raise self._error(e, "ReadShard") from None
        finally:
            stream.cancel()
        for manifest_file, got in zip(manifest.files, received):
            if got != manifest_file.size:
                raise DataLoss(
                    f"ReadShard sent {got} of {manifest_file.size} bytes of file "
                    f"{manifest_file.name!r}"
                )
        return manifest, buffers

    def restore_directory(
        self,
        job: str,
        directory: str | os.PathLike[str],
        step: int | Literal["latest"] = "latest",
        rank: int = 0,
    ) -> int:
        """Writes a shard saved by :meth:`save_directory` back under ``directory``.

        Creates ``directory`` (it must not hold files of the same names) and
        returns the step restored.
        """
        import json

        root = os.fspath(directory)
        shard = self.restore(job, step, rank)
        os.makedirs(root, exist_ok=True)
        for name, array in shard.items():
            rel = shard.file_metadata[name].get(META_PATH, name)
            parts = [p for p in rel.split("/") if p not in ("", ".")]
            if not parts or ".." in parts:
                raise DataLoss(f"stored path {rel!r} leaves the directory")
            path = os.path.join(root, *parts)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            try:
                if array.nbytes:
                    _pwrite_all(fd, np.ascontiguousarray(array).reshape(-1).view(np.uint8).data, 0)
            finally:
                os.close(fd)
        for rel in json.loads(shard.metadata.get(EMPTY_DIRS_KEY, "[]")):
            parts = [p for p in rel.split("/") if p not in ("", ".")]
            if parts and ".." not in parts:
                os.makedirs(os.path.join(root, *parts), exist_ok=True)
        return shard.step

    def manifest(
        self, job: str, step: int | Literal["latest"] = "latest", rank: int = 0
    ) -> pb.ShardManifest:
        """The stored manifest of a shard (files, sizes, chunks, metadata)."""
        response = self._call(
            "GetManifest",
            self._stubs.checkpoint.GetManifest,
            pb.GetManifestRequest(shard=self._selector(job, step, rank)),
        )
        return response.manifest

    # -- listing and lifecycle -------------------------------------------

    def list_steps(self, job: str) -> list[StepInfo]:
        """The job's steps on this node, oldest first (empty for an unknown job)."""
        if not job:
            raise InvalidArgument("job: must not be empty")
        try:
            response = self._call(
                "ListSteps",
                self._stubs.checkpoint.ListSteps,
                pb.ListStepsRequest(tenant=self.tenant, job=job),
            )
        except NotFound:
            return []
        steps: list[StepInfo] = []
        for job_steps in response.jobs:
            if job_steps.job != job:
                continue
            for step in job_steps.steps:
                shards = tuple(
                    ShardStatus(
                        rank=s.rank,
                        total_bytes=s.total_bytes,
                        world_size=s.world_size if s.HasField("world_size") else None,
                        tiers={
                            Tier(t.tier): ShardState(t.state)
                            for t in s.tiers
                            if t.tier in Tier._value2member_map_
                        },
                    )
                    for s in step.shards
                )
                steps.append(
                    StepInfo(step.step, step.restorable, shards, step.object_store_complete)
                )
        steps.sort(key=lambda s: s.step)
        return steps

    def list_jobs(self) -> list[str]:
        """The tenant's jobs on this node."""
        response = self._call(
            "ListSteps",
            self._stubs.checkpoint.ListSteps,
            pb.ListStepsRequest(tenant=self.tenant, job=""),
        )
        return sorted(j.job for j in response.jobs)

    def latest_step(self, job: str, complete_only: bool = True) -> int | None:
        """The newest step of ``job`` (restorable only, by default), or None."""
        steps = [s.step for s in self.list_steps(job) if s.restorable or not complete_only]
        return max(steps) if steps else None

    def delete(self, job: str, step: int) -> int:
        """Deletes every shard of a step from this node's tiers; returns how many."""
        response = self._call(
            "DeleteStep",
            self._stubs.checkpoint.DeleteStep,
            pb.DeleteStepRequest(tenant=self.tenant, job=job, step=_check_step(step)),
        )
        return response.shards_deleted

    def wait_durable(
        self,
        job: str,
        step: int,
        tier: Tier | str = Tier.DISK,
        *,
        rank: int | None = None,
        timeout: float | None = None,
    ) -> None:
        """Waits until the step (or one rank of it) is durable in ``tier``.

        Raises DeadlineExceeded when ``timeout`` seconds pass first.
        """
        request = pb.WaitDurableRequest(
            tenant=self.tenant, job=job, step=_check_step(step), tier=Tier.parse(tier).value
        )
        if rank is not None:
            request.rank = rank
        deadline = None
        if timeout is not None:
            if timeout <= 0:
                raise InvalidArgument(f"timeout: must be positive, got {timeout}")
            request.timeout_ms = max(1, int(timeout * 1000))
            # Let the daemon's own timeout answer first, with its message.
            deadline = timeout + 5.0
        try:
            self._call("WaitDurable", self._stubs.checkpoint.WaitDurable, request, deadline)
        except DeadlineExceeded:
            raise
        except CairnError as e:
            if e.code == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise DeadlineExceeded(e.message, e.code) from None
            raise

    def status(self) -> pb.StatusResponse:
        """The daemon's tiers, usage and sessions (Admin.Status)."""
        return self._call("Status", self._stubs.admin.Status, pb.StatusRequest())

    def ping(self, timeout: float = 5.0) -> bool:
        """Whether the daemon answers within ``timeout`` seconds."""
        try:
            self._stubs.admin.Status(pb.StatusRequest(), timeout=timeout)
        except grpc.RpcError:
            return False
        return True

    # -- helpers ---------------------------------------------------------

    def _ref(self, job: str, step: int, rank: int) -> pb.ShardRef:
        return pb.ShardRef(
            tenant=self.tenant, job=job, step=_check_step(step), rank=_check_rank(rank)
        )

    def _selector(self, job: str, step: int | str, rank: int) -> pb.ShardSelector:
        selector = pb.ShardSelector(tenant=self.tenant, job=job, rank=_check_rank(rank))
        if step != "latest":
            if isinstance(step, str):
                raise InvalidArgument(f"step: expected an integer or 'latest', got {step!r}")
            selector.step = _check_step(step)
        return selector

    def _call(
        self,
        name: str,
        method: Callable[..., _T],
        request: Any,
        timeout: float | None = None,
    ) -> _T:
        try:
            return method(request, timeout=timeout if timeout is not None else self.timeout)
        except grpc.RpcError as e:
            raise self._error(e, name) from None

    def _error(self, error: grpc.RpcError, call: str) -> CairnError:
        return from_rpc_error(error, self._target.display, call)


def _check_step(step: int) -> int:
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
        raise InvalidArgument(f"step: expected a non-negative integer, got {step!r}")
    return int(step)


def _check_rank(rank: int) -> int:
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or not 0 <= rank < 2**32:
        raise InvalidArgument(f"rank: expected a non-negative integer, got {rank!r}")
    return int(rank)


def _check_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in (metadata or {}).items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise InvalidArgument(
                f"metadata: keys and values must be strings, got {key!r}: {value!r}"
            )
        if key.startswith(RESERVED_PREFIX):
            raise InvalidArgument(f"metadata[{key!r}]: keys starting with 'cairn.' are reserved")
        out[key] = value
    return out


def _layout(file_name: str, meta: Mapping[str, str], size: int) -> tuple[np.dtype, tuple[int, ...]]:
    try:
        dtype, shape = _arrays.layout_from_metadata(meta, size)
    except (TypeError, ValueError) as e:
        raise CairnError(f"file {file_name!r}: unreadable dtype/shape metadata: {e}") from None
    if math.prod(shape) * dtype.itemsize != size:
        raise DataLoss(
            f"file {file_name!r}: {size} bytes do not hold {dtype}{list(shape)}"
        )
    return dtype, shape


def _write_file(
    path: str, getter: Callable[[], _arrays.Materialized], size: int, first: bool
) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        if first:
            raise _FilesNotLocal() from None
        raise
    try:
        if size:
            view, keepalive = getter()
            if view.nbytes != size:
                raise CairnError(f"{path}: {view.nbytes} bytes to write, expected {size}")
            _pwrite_all(fd, view, 0)
            del view, keepalive
    finally:
        os.close(fd)


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    """One pwrite per buffer; loops only when the kernel writes less."""
    done = 0
    total = view.nbytes
    while done < total:
        written = os.pwrite(fd, view[done : done + _MAX_IO], offset + done)
        if written <= 0:
            raise OSError(errno.EIO, "pwrite wrote nothing")
        done += written


def _map_file(
    path: str, size: int, dtype: np.dtype, shape: tuple[int, ...], writable: bool
) -> np.ndarray:
    if size == 0:
        array = np.empty(shape, dtype=dtype)
        array.flags.writeable = writable
        return array
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        actual = os.fstat(fd).st_size
        if actual != size:
            raise DataLoss(f"{path}: {actual} bytes on disk, manifest says {size}")
        mapping = mmap.mmap(
            fd, size, access=mmap.ACCESS_COPY if writable else mmap.ACCESS_READ
        )
    finally:
        os.close(fd)
    return np.frombuffer(mapping, dtype=dtype, count=size // dtype.itemsize).reshape(shape)


def _file_reader(path: str, size: int) -> Callable[[], _arrays.Materialized]:
    def read() -> _arrays.Materialized:
        # Mapping a regular file read-only costs no copy; the pwrite then
        # copies page cache to tmpfs once.
        if size == 0:
            return memoryview(b""), None
        with open(path, "rb") as f:
            mapping = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ)
        return memoryview(mapping), mapping

    return read
