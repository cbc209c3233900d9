"""The Cairn client: save and restore named arrays through the node daemon.

Save, local (the fast path)
    ``BeginShard`` names the files and their sizes; the daemon answers with
    files already sized in its memory tier (tmpfs). Each tensor is copied
    once from a memoryview of the caller's own buffer (no pickling, no
    intermediate copy): one ``memcpy`` through a mapping when the file holds
    pooled pages already, else one ``os.pwrite`` (see
    :func:`cairn._arrays.copy_to_file`), then ``CommitShard`` makes the shard
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

Attempts
    Every save of a shard carries an *attempt* id (a fresh ``uuid4().hex`` per
    call unless the caller passes one; DCP's coordinator passes one to every
    rank). A step is complete only when all its shards carry the same attempt,
    so a step a crashed run left incomplete can simply be saved again, and a
    late shard of the crashed run is refused (``Aborted``) instead of being
    combined with the new one.

Daemon restarts and hangs
    Calls that fail because the daemon is unreachable or restarted
    (``UNAVAILABLE``, a reset connection, a save session the restarted daemon
    no longer knows) are retried with exponential backoff and jitter for
    ``retry_for`` seconds, each retry logged once at WARNING on the ``cairn``
    logger; then :class:`~cairn.errors.DaemonUnavailable` says how long it
    tried. A save is redone from the start of its shard with the same attempt
    (from the caller's tensors, or, for a background save that already
    reported ``staged``, from the staged copy it keeps mapped); if the commit
    had landed before the connection broke, the daemon's manifest shows our
    attempt and the save counts as done. No call waits forever by default:
    small calls have a deadline of :data:`CALL_TIMEOUT`, and a save or restore
    fails with :class:`~cairn.errors.DeadlineExceeded` once it makes no
    progress (no reply, no bytes accepted) for ``stall_timeout`` seconds.

The client is thread-safe. ``save_async`` runs saves in order on one
background thread.
"""

from __future__ import annotations

import concurrent.futures
import enum
import logging
import math
import mmap
import os
import random
import re
import threading
import time
import uuid
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
    AlreadyExists,
    CairnError,
    DaemonUnavailable,
    DataLoss,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    TierUnavailable,
    from_rpc_error,
)

__all__ = [
    "CALL_TIMEOUT",
    "DEFAULT_RETRY_FOR",
    "DEFAULT_SOCKET",
    "VOLUME_ENV",
    "DEFAULT_STALL_TIMEOUT",
    "Client",
    "RestoredShard",
    "SaveHandle",
    "SaveResult",
    "ShardState",
    "ShardStatus",
    "StepInfo",
    "Tier",
]

#: Where the daemon listens on the host (the operator's socket), used when
#: nothing else is named and it exists.
DEFAULT_SOCKET = "/run/cairn/cairn.sock"
#: Environment variable naming the daemon's socket (or ``host:port``).
SOCKET_ENV = "CAIRN_SOCKET"
#: Environment variable naming the mount path of the pod's Cairn CSI volume.
VOLUME_ENV = "CAIRN_VOLUME"
#: A Cairn CSI volume's own socket, relative to where the volume is mounted.
VOLUME_SOCKET = os.path.join(".cairn", "cairn.sock")
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

#: How long (seconds) a call is retried while the daemon is unreachable or
#: restarting, unless ``retry_for`` or :data:`RETRY_FOR_ENV` says otherwise.
DEFAULT_RETRY_FOR = 60.0
#: Environment variable overriding :data:`DEFAULT_RETRY_FOR` (0 disables).
RETRY_FOR_ENV = "CAIRN_RETRY_FOR"
#: How long (seconds) a save or restore may make no progress before it fails
#: with DeadlineExceeded, unless ``stall_timeout`` or :data:`STALL_TIMEOUT_ENV`
#: says otherwise.
DEFAULT_STALL_TIMEOUT = 60.0
#: Environment variable overriding :data:`DEFAULT_STALL_TIMEOUT` (0 disables).
STALL_TIMEOUT_ENV = "CAIRN_STALL_TIMEOUT"
#: Deadline (seconds) of a small call (listing, manifest, delete, status), or
#: ``stall_timeout`` when that is shorter.
CALL_TIMEOUT = 30.0
#: Retry backoff: the first pause, doubled after each retry up to the cap;
#: each pause is drawn between half and all of it (jitter).
_BACKOFF_FIRST = 0.1
_BACKOFF_CAP = 2.0
#: Deadline of the AbortShard sent after a failed save.
_ABORT_TIMEOUT = 5.0
#: Attempt ids the daemon accepts.
_ATTEMPT = re.compile(r"^[A-Za-z0-9._-]{0,64}$")
#: Details of a gRPC failure that mean the connection broke under the call.
_CONNECTION_BROKEN = re.compile(
    r"connection reset|socket closed|broken pipe|stream removed|goaway|connection refused"
    r"|failed to connect|end of tcp stream|endpoint closing",
    re.IGNORECASE,
)

log = logging.getLogger("cairn")

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
    #: The attempt that saved it (empty: saved without one). A step is
    #: complete only when all its shards carry the same attempt.
    attempt: str = ""


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
    #: The attempt this save carried (see :meth:`Client.save`).
    attempt: str = ""

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
            attempt=info.attempt,
        )

    @classmethod
    def _from_manifest(cls, manifest: pb.ShardManifest) -> SaveResult:
        return cls(
            tenant=manifest.shard.tenant,
            job=manifest.shard.job,
            step=manifest.shard.step,
            rank=manifest.shard.rank,
            total_bytes=sum(f.size for f in manifest.files),
            file_count=len(manifest.files),
            chunk_count=sum(len(f.chunks) for f in manifest.files),
            manifest_hash=bytes(manifest.manifest_hash),
            committed_unix_ms=manifest.committed_unix_ms,
            attempt=manifest.attempt,
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


class _FilesVanished(CairnError):
    """Files the daemon handed out are gone: it restarted and cleaned up."""


class _Default(enum.Enum):
    """Marks an argument left out (where None has a meaning of its own)."""

    DEFAULT = "default"


_DEFAULT = _Default.DEFAULT

Getter = Callable[[], _arrays.Materialized]


class _Watchdog:
    """Calls ``on_stall`` once when ``touch`` is not called for ``limit`` s.

    Guards a streaming call: every message sent or received is progress.
    A limit of None (or 0) watches nothing.
    """

    def __init__(self, limit: float | None) -> None:
        self.limit = limit or None
        self.stalled_for: float | None = None
        self._last = time.monotonic()
        self._done = threading.Event()

    def start(self, on_stall: Callable[[], object]) -> None:
        self._last = time.monotonic()
        if self.limit is not None:
            threading.Thread(
                target=self._run, args=(self.limit, on_stall), name="cairn-watchdog", daemon=True
            ).start()

    def touch(self) -> None:
        self._last = time.monotonic()

    def close(self) -> None:
        self._done.set()

    def _run(self, limit: float, on_stall: Callable[[], object]) -> None:
        period = min(0.25, limit / 4)
        while not self._done.wait(period):
            idle = time.monotonic() - self._last
            if idle >= limit:
                self.stalled_for = idle
                on_stall()
                return


class _ShardSave:
    """One shard's save across its tries: the request and where its bytes are.

    A try may be redone after the daemon restarted, from the start of the
    shard. Until ``on_staged`` has told the caller it may reuse its buffers,
    the bytes come from the caller's getters; after that (background saves
    only) from read-only mappings of the files this save staged, which stay
    valid when the daemon removes them.
    """

    def __init__(
        self,
        header: pb.BeginShardRequest,
        getters: Sequence[Getter],
        on_staged: Callable[[], None] | None,
    ) -> None:
        self.header = header
        self.getters: list[Getter] = list(getters)
        self.on_staged = on_staged
        self.staged = False
        #: The session of a failed try, aborted again before the next one (the
        #: first abort may not have reached the daemon).
        self.failed_session: str | None = None
        self._kept: list[mmap.mmap] = []

    @property
    def keeps_copies(self) -> bool:
        """Whether to keep the staged files mapped (the caller may reuse its buffers)."""
        return self.on_staged is not None and not self.staged

    def mark_staged(self, copies: list[mmap.mmap | None]) -> None:
        """Every byte is staged: tells the caller once; ``copies`` back a redo."""
        if self.staged:
            return
        self.staged = True
        if self.on_staged is None:
            return
        sizes = [f.size for f in self.header.files]
        self._kept = [m for m in copies if m is not None]
        self.getters = [_mapped_getter(m, size) for m, size in zip(copies, sizes)]
        self.on_staged()

    def staged_after_commit(self) -> None:
        """Streaming saves: the caller hears "staged" only once committed."""
        if not self.staged and self.on_staged is not None:
            self.staged = True
            self.on_staged()

    def close(self) -> None:
        kept, self._kept = self._kept, []
        self.getters = []
        for mapping in kept:
            try:
                mapping.close()
            except BufferError:
                # A view handed to gRPC still holds it; the GC unmaps it.
                pass


def _mapped_getter(mapping: mmap.mmap | None, size: int) -> Getter:
    if mapping is None or size == 0:
        return lambda: (memoryview(b""), None)
    return lambda: (memoryview(mapping)[:size], mapping)


@dataclass(frozen=True)
class _Target:
    grpc_target: str
    display: str
    unix_path: str | None


_HOST_PORT = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.\-]+):(\d{1,5})$")


def _volume_socket(volume: str, source: str) -> str:
    path = os.path.join(os.path.abspath(volume), VOLUME_SOCKET)
    if not os.path.exists(path):
        raise InvalidArgument(
            f"{source} {volume!r}: there is no Cairn socket at {path}; is a Cairn CSI volume "
            "mounted there (a volume of driver csi.cairn.dev in the pod spec)?"
        )
    return path


def _resolve_target(
    socket: str | os.PathLike[str] | None, volume: str | os.PathLike[str] | None
) -> _Target:
    """The daemon to talk to: ``socket``, else the socket of the CSI volume
    ``volume`` (or ``$CAIRN_VOLUME``) is mounted at, else ``$CAIRN_SOCKET``,
    else the host's :data:`DEFAULT_SOCKET` when it exists."""
    if socket is not None:
        value = os.fspath(socket)
    elif volume is not None:
        value = _volume_socket(os.fspath(volume), "volume")
    elif os.environ.get(VOLUME_ENV):
        value = _volume_socket(os.environ[VOLUME_ENV], VOLUME_ENV)
    elif os.environ.get(SOCKET_ENV):
        value = os.environ[SOCKET_ENV]
    elif os.path.exists(DEFAULT_SOCKET):
        value = DEFAULT_SOCKET
    else:
        raise InvalidArgument(
            "no Cairn daemon named: pass volume= (where the pod's Cairn CSI volume is "
            f"mounted), or set {VOLUME_ENV} (the same), or {SOCKET_ENV} (a socket path or "
            f"host:port); the host's {DEFAULT_SOCKET} does not exist either"
        )
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
    attempt: str
    on_staged: Callable[[], None] | None = field(default=None)


class Client:
    """A connection to the node's Cairn daemon.

    In a pod, name the mount path of its Cairn CSI volume: ``volume``, else
    ``$CAIRN_VOLUME``. The client talks to the volume's own socket
    (``<volume>/.cairn/cairn.sock``), which acts for the volume's tenant
    (its namespace) and job only. Otherwise ``socket`` is a Unix socket
    path (or ``unix:PATH``) or ``host:port`` for TCP; without it the client
    reads ``$CAIRN_SOCKET``, then uses the host's ``/run/cairn/cairn.sock``
    if it exists. ``tenant`` is sent with every call (empty: the volume's,
    or the daemon's default on the host socket). ``transport`` forces the local file path (``"local"``)
    or the gRPC streams (``"stream"``); ``"auto"`` uses local files over a
    Unix socket when they are visible, streams otherwise.

    How long calls may take (seconds):

    ``retry_for``
        How long a call that failed because the daemon is unreachable or
        restarted is retried (backoff from 0.1 s doubling to 2 s, with
        jitter) before DaemonUnavailable. None: ``$CAIRN_RETRY_FOR``, else
        :data:`DEFAULT_RETRY_FOR` (60). 0: no retries.
    ``stall_timeout``
        A save or restore fails with DeadlineExceeded once it makes no
        progress (no reply, no bytes accepted) for this long. None:
        ``$CAIRN_STALL_TIMEOUT``, else :data:`DEFAULT_STALL_TIMEOUT` (60).
        0: no stall limit.
    ``timeout``
        Left out: small calls (listing, manifest, delete, status) get a
        deadline of :data:`CALL_TIMEOUT` (30, or ``stall_timeout`` when
        shorter) and saves and restores are bounded by ``stall_timeout``
        only. A number: as in earlier versions, the deadline of every call
        that is not itself a wait, each RPC of a save or restore included
        (the stall limit applies too). ``None``: no deadline on any call, and
        no stall limit unless ``stall_timeout`` is given: calls wait forever.

    ``wait_durable`` waits as long as its own ``timeout`` says.
    """

    def __init__(
        self,
        socket: str | os.PathLike[str] | None = None,
        *,
        volume: str | os.PathLike[str] | None = None,
        tenant: str = "",
        transport: Transport = "auto",
        timeout: float | None | _Default = _DEFAULT,
        retry_for: float | None = None,
        stall_timeout: float | None = None,
    ) -> None:
        if transport not in ("auto", "local", "stream"):
            raise InvalidArgument(f"transport: expected auto, local or stream, got {transport!r}")
        self._target = _resolve_target(socket, volume)
        if transport == "local" and self._target.unix_path is None:
            raise InvalidArgument(
                f"transport: 'local' needs a Unix socket, got TCP address {self._target.display}"
            )
        self.tenant = tenant
        self._timeout_arg = timeout
        #: The explicit ``timeout`` (None when left out or given as None).
        self.timeout: float | None = (
            None if timeout is _DEFAULT else _seconds("timeout", timeout, allow_none=True)
        )
        #: Seconds a call is retried while the daemon is unreachable (0: never).
        self.retry_for: float = (
            _seconds("retry_for", retry_for)
            if retry_for is not None
            else _env_seconds(RETRY_FOR_ENV, DEFAULT_RETRY_FOR)
        ) or 0.0
        if stall_timeout is not None:
            stall: float | None = _seconds("stall_timeout", stall_timeout)
        elif timeout is None:
            stall = None  # timeout=None: wait forever
        else:
            stall = _env_seconds(STALL_TIMEOUT_ENV, DEFAULT_STALL_TIMEOUT)
        #: Seconds without progress after which a save or restore fails
        #: (None: no limit).
        self.stall_timeout: float | None = stall or None
        self._transport: Transport = transport
        #: The volume whose socket this is (files the daemon names relative
        #: to it live there), or None on the host's socket.
        self._volume_root: str | None = None
        if self._target.unix_path is not None and self._target.unix_path.endswith(
            os.sep + VOLUME_SOCKET
        ):
            self._volume_root = self._target.unix_path[: -len(os.sep + VOLUME_SOCKET)]
        # Whether the daemon's files are visible here; unknown until tried.
        self._files_local: bool | None = (
            False if self._target.unix_path is None or transport == "stream" else None
        )
        options: list[tuple[str, Any]] = [
            ("grpc.max_send_message_length", -1),
            ("grpc.max_receive_message_length", -1),
            ("grpc.enable_retries", 0),
            # Reconnect soon after a daemon restart (gRPC's own backoff grows
            # to minutes, and calls fail fast meanwhile); our retries pace it.
            ("grpc.initial_reconnect_backoff_ms", int(_BACKOFF_FIRST * 1000)),
            ("grpc.max_reconnect_backoff_ms", int(_BACKOFF_CAP * 1000)),
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

    def _settings(self) -> dict[str, Any]:
        """Keyword arguments that make an equivalent client (for pickling)."""
        return {
            "tenant": self.tenant,
            "transport": self._transport,
            "timeout": self._timeout_arg,
            "retry_for": self.retry_for,
            "stall_timeout": self.stall_timeout or 0.0,
        }

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
        *,
        attempt: str | None = None,
    ) -> SaveResult:
        """Saves ``tensors`` as shard (job, step, rank) and commits it.

        ``tensors`` maps names to numpy arrays, torch tensors (CPU or CUDA),
        jax arrays or bytes-like objects. ``metadata`` (strings) is stored
        with the shard; ``world_size`` tells the daemon how many ranks the
        step has, so it can tell when the step is complete (default 1 for a
        rank-0 shard). Returns once the shard is durable in the memory tier.

        ``attempt`` names this save of the step ([A-Za-z0-9._-], at most 64
        characters); every rank of one save of a step must pass the same one.
        None: a fresh id for this call. A step is complete only when all its
        shards carry the same attempt; a shard of a step that never became
        complete is replaced by a save with a new attempt, a shard of a
        complete step never is (AlreadyExists).

        A daemon restart during the save is ridden through (see ``retry_for``
        on :class:`Client`): the shard is saved again from its start with the
        same attempt.
        """
        pending = self._prepare(job, step, rank, tensors, metadata, world_size, attempt)
        return self._save_pending(pending)

    def save_async(
        self,
        job: str,
        step: int,
        rank: int,
        tensors: TensorMapping,
        metadata: Mapping[str, str] | None = None,
        world_size: int | None = None,
        *,
        attempt: str | None = None,
    ) -> SaveHandle:
        """Starts :meth:`save` in the background and returns a handle.

        Arguments are checked before this returns. The tensors must not be
        modified until ``handle.staged()`` (or ``handle.wait_staged()``) says
        the bytes are in the memory tier (over the gRPC streams: once the
        shard is committed). If the daemon restarts after that, the save is
        redone from the copy it staged, not from the tensors. The handle's
        ``result()`` raises what :meth:`save` would, DeadlineExceeded when
        the daemon hangs included: it never waits forever.
        """
        pending = self._prepare(job, step, rank, tensors, metadata, world_size, attempt)
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
        attempt: str | None,
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
        return _PendingSave(
            self._ref(job, step, rank), sources, world_size, shard_meta, _check_attempt(attempt)
        )

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
            pending.ref,
            files,
            pending.world_size,
            pending.metadata,
            pending.on_staged,
            attempt=pending.attempt,
        )

    def _save_files(
        self,
        ref: pb.ShardRef,
        files: Sequence[tuple[str, int, Mapping[str, str], Getter]],
        world_size: int | None,
        metadata: Mapping[str, str],
        on_staged: Callable[[], None] | None = None,
        attempt: str | None = None,
    ) -> SaveResult:
        """Saves one shard: (file name, size, metadata, bytes getter) per file.

        The layer every save goes through (tensors, DCP items, directories,
        pytrees). ``attempt`` as for :meth:`save` (None: a fresh one).
        ``on_staged``, when given, is called once every byte is staged, after
        which the caller may change the buffers behind the getters: a redo
        after a daemon restart then reads the staged copy instead.
        """
        header = pb.BeginShardRequest(
            shard=ref,
            files=[pb.FileSpec(name=n, size=s, metadata=m) for n, s, m, _ in files],
            metadata=metadata,
            attempt=_check_attempt(attempt),
        )
        if world_size is not None:
            header.world_size = world_size
        save = _ShardSave(header, [g for _, _, _, g in files], on_staged)
        what = f"save of {ref.job} step {ref.step} rank {ref.rank}"
        try:
            return self._retrying(what, lambda: self._save_once(save), save=True)
        finally:
            save.close()

    def _save_once(self, save: _ShardSave) -> SaveResult:
        """One try of a shard's save, from its start."""
        if self._files_local is not False:
            try:
                return self._save_local(save)
            except _FilesNotLocal:
                if self._transport == "local":
                    raise CairnError(
                        f"the daemon's staged files are not visible from this process "
                        f"(daemon at {self.target}); use transport='auto' or 'stream'"
                    ) from None
                self._files_local = False
        return self._save_stream(save)

    def _save_local(self, save: _ShardSave) -> SaveResult:
        header = save.header
        if save.failed_session is not None:
            self._abort_quietly(save.failed_session)
            save.failed_session = None
        try:
            begun = self._call(
                "BeginShard",
                self._stubs.checkpoint.BeginShard,
                header,
                self._bulk_deadline(),
                retry=False,
            )
        except AlreadyExists:
            done = self._committed_by_us(header)
            if done is None:
                raise
            save.mark_staged([])
            return done
        session = begun.session_id
        copies: list[mmap.mmap | None] = []
        try:
            staged = {f.name: f for f in begun.files}
            keep = save.keeps_copies
            for index, spec in enumerate(header.files):
                target = staged.get(spec.name)
                if target is None or target.size != spec.size:
                    raise CairnError(
                        f"BeginShard staged {target.size if target else 'no'} bytes "
                        f"for file {spec.name!r}, expected {spec.size}"
                    )
                copy = self._write_staged(
                    self._local_path(target.path), save.getters[index], spec.size, index, keep
                )
                copies.append(copy)
                if self._files_local is None:
                    self._files_local = True
            save.mark_staged(copies)
            committed = self._call(
                "CommitShard",
                self._stubs.checkpoint.CommitShard,
                pb.CommitShardRequest(session_id=session),
                self._bulk_deadline(),
                retry=False,
            )
        except BaseException as e:
            if not save.staged:
                for copy in copies:
                    if copy is not None:
                        copy.close()
            self._abort_quietly(session, wait=not isinstance(e, DeadlineExceeded))
            save.failed_session = session
            raise
        return SaveResult._from_proto(committed.shard)

    def _local_path(self, path: str) -> str:
        """A path the daemon named: relative ones are inside this client's
        volume (the daemon's own files are not visible in a pod)."""
        if os.path.isabs(path):
            return path
        if self._volume_root is None:
            raise _FilesNotLocal()
        return os.path.join(self._volume_root, path)

    def _write_staged(
        self, path: str, getter: Getter, size: int, index: int, keep: bool
    ) -> mmap.mmap | None:
        """Writes one staged file; with ``keep``, returns a read-only mapping of it."""
        try:
            return _write_file(path, getter, size, first=index == 0, keep=keep)
        except FileNotFoundError:
            if self._files_local:
                # Visible a moment ago: the daemon restarted and cleaned up.
                raise _FilesVanished(f"staged file {path} vanished") from None
            raise

    def _committed_by_us(self, header: pb.BeginShardRequest) -> SaveResult | None:
        """After AlreadyExists: the result, if this very attempt committed it.

        A commit can land while its reply is lost (the daemon restarted);
        the redo then finds the shard committed by its own attempt.
        """
        if not header.attempt:
            return None
        ref = header.shard
        selector = pb.ShardSelector(
            tenant=ref.tenant, job=ref.job, step=ref.step, rank=ref.rank
        )
        try:
            manifest = self._call(
                "GetManifest",
                self._stubs.checkpoint.GetManifest,
                pb.GetManifestRequest(shard=selector),
                retry=False,
            ).manifest
        except CairnError:
            return None
        if manifest.attempt != header.attempt:
            return None
        return SaveResult._from_manifest(manifest)

    def _save_stream(self, save: _ShardSave) -> SaveResult:
        header = save.header
        cancelled = threading.Event()
        watchdog = _Watchdog(self.stall_timeout)

        def requests() -> Iterator[pb.WriteShardRequest]:
            # gRPC asks for the next message once the last one went out:
            # every ask is progress.
            yield pb.WriteShardRequest(header=header)
            for index, spec in enumerate(header.files):
                if spec.size == 0:
                    continue
                watchdog.touch()
                view, keepalive = save.getters[index]()
                if view.nbytes != spec.size:
                    raise CairnError(f"file {spec.name!r}: {view.nbytes} bytes, expected {spec.size}")
                for offset in range(0, spec.size, STREAM_MESSAGE_BYTES):
                    watchdog.touch()
                    if cancelled.is_set():
                        raise CairnError("save cancelled")
                    chunk = bytes(view[offset : offset + STREAM_MESSAGE_BYTES])
                    yield pb.WriteShardRequest(
                        data=pb.FileData(file_index=index, offset=offset, data=chunk)
                    )
                del view, keepalive
            watchdog.touch()

        started = time.monotonic()
        future = self._stubs.checkpoint.WriteShard.future(requests(), timeout=self.timeout)
        watchdog.start(future.cancel)
        try:
            response = future.result()
        except grpc.RpcError as e:
            if watchdog.stalled_for is not None:
                raise self._stalled("WriteShard", watchdog.stalled_for) from None
            error = self._error(e, "WriteShard", self.timeout, time.monotonic() - started)
            if isinstance(error, AlreadyExists):
                done = self._committed_by_us(header)
                if done is not None:
                    save.staged_after_commit()
                    return done
            raise error from None
        except grpc.FutureCancelledError:
            if watchdog.stalled_for is not None:
                raise self._stalled("WriteShard", watchdog.stalled_for) from None
            raise CairnError("WriteShard was cancelled") from None
        except BaseException:
            # Cancelling the stream before it half-closes commits nothing.
            cancelled.set()
            future.cancel()
            raise
        finally:
            watchdog.close()
        save.staged_after_commit()
        return SaveResult._from_proto(response.shard)

    def _abort_quietly(self, session_id: str, wait: bool = True) -> None:
        """Aborts a session; ``wait=False`` (daemon hung) sends it from a thread."""

        def abort(timeout: float) -> None:
            try:
                self._stubs.checkpoint.AbortShard(
                    pb.AbortShardRequest(session_id=session_id), timeout=timeout
                )
            except (grpc.RpcError, ValueError):
                # Unreachable or restarted daemons drop the session on their
                # own (nothing was listed); ValueError: channel closed.
                pass

        if wait:
            abort(_ABORT_TIMEOUT)
        else:
            # Lands when a stopped daemon resumes, so the shard is free then.
            threading.Thread(
                target=abort, args=(max(60.0, self.retry_for),), daemon=True
            ).start()

    def save_directory(
        self,
        job: str,
        step: int,
        rank: int,
        directory: str | os.PathLike[str],
        metadata: Mapping[str, str] | None = None,
        world_size: int | None = None,
        *,
        attempt: str | None = None,
    ) -> SaveResult:
        """Saves every file under ``directory`` as one shard.

        For frameworks that write a checkpoint directory of their own (Orbax,
        ``torch.save`` files): relative paths are kept in the per-file
        metadata and :meth:`restore_directory` lays them out again. Each file
        is mapped read-only and copied once into its staged file. ``attempt`` as for :meth:`save`.
        """
        root = os.fspath(directory)
        if not os.path.isdir(root):
            raise InvalidArgument(f"directory: {root!r} is not a directory")
        files: list[tuple[str, int, Mapping[str, str], Getter]] = []
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
        return self._save_files(
            self._ref(job, step, rank), files, world_size, shard_meta, attempt=attempt
        )

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
        return self._retrying(
            f"restore of {job} step {step} rank {rank}",
            lambda: self._restore_once(selector, writable, verify),
        )

    def _restore_once(
        self, selector: pb.ShardSelector, writable: bool, verify: bool
    ) -> RestoredShard:
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
            self._bulk_deadline(),
            retry=False,
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
                array = _map_file(
                    self._local_path(restored.path), restored.size, dtype, shape, writable
                )
            except FileNotFoundError:
                if self._files_local:
                    # Visible before: the daemon restarted (or evicted the
                    # shard) between its reply and this read.
                    raise _FilesVanished(f"restored file {restored.path} vanished") from None
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
        started = time.monotonic()
        stream = self._stubs.checkpoint.ReadShard(
            pb.ReadShardRequest(shard=selector), timeout=self.timeout
        )
        # Every message received is progress.
        watchdog = _Watchdog(self.stall_timeout)
        watchdog.start(stream.cancel)
        try:
            try:
                first = next(stream)
            except StopIteration:
                raise DataLoss("ReadShard ended before its manifest") from None
            if not first.HasField("manifest"):
                raise DataLoss("ReadShard did not start with the manifest")
            watchdog.touch()
            manifest = first.manifest
            buffers = [np.empty(f.size, dtype=np.uint8) for f in manifest.files]
            received = [0] * len(buffers)
            for message in stream:
                watchdog.touch()
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
            if watchdog.stalled_for is not None:
                raise self._stalled("ReadShard", watchdog.stalled_for) from None
            raise self._error(e, "ReadShard", self.timeout, time.monotonic() - started) from None
        finally:
            watchdog.close()
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
                    _arrays.pwrite_all(fd, np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)
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
        """The job's steps on this node, oldest first (empty for an unknown job).

        A tier that did not answer (the bucket, a peer) is left out and
        logged; :meth:`latest_step` refuses to answer "none" without the
        bucket."""
        return self._list_steps(job)[0]

    def _list_steps(
        self, job: str, wait_for_all_tiers: bool = False
    ) -> tuple[list[StepInfo], list[str]]:
        """The job's steps, and the tiers the daemon's listing left out
        (with ``wait_for_all_tiers``, only those that failed, not slow ones)."""
        if not job:
            raise InvalidArgument("job: must not be empty")
        try:
            response = self._call(
                "ListSteps",
                self._stubs.checkpoint.ListSteps,
                pb.ListStepsRequest(
                    tenant=self.tenant, job=job, wait_for_all_tiers=wait_for_all_tiers
                ),
            )
        except NotFound:
            return [], []
        left_out = list(response.left_out)
        for what in left_out:
            log.warning("cairn daemon at %s: listing %s without %s", self.target, job, what)
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
                        attempt=s.attempt,
                    )
                    for s in step.shards
                )
                steps.append(
                    StepInfo(step.step, step.restorable, shards, step.object_store_complete)
                )
        steps.sort(key=lambda s: s.step)
        return steps, left_out

    def list_jobs(self) -> list[str]:
        """The tenant's jobs on this node."""
        response = self._call(
            "ListSteps",
            self._stubs.checkpoint.ListSteps,
            pb.ListStepsRequest(tenant=self.tenant, job=""),
        )
        return sorted(j.job for j in response.jobs)

    def latest_step(self, job: str, complete_only: bool = True) -> int | None:
        """The newest step of ``job`` (restorable only, by default), or None.

        Raises TierUnavailable rather than return None when the bucket did
        not answer: a trainer told "no checkpoint" would start over.
        """
        # A slow bucket is waited for (its own timeouts bound it): the answer
        # decides where a job resumes.
        listed, left_out = self._list_steps(job, wait_for_all_tiers=True)
        steps = [s.step for s in listed if s.restorable or not complete_only]
        if steps:
            return max(steps)
        bucket = [what for what in left_out if what.startswith("the object store")]
        if bucket:
            raise TierUnavailable(
                f"cannot tell whether job {job} has a checkpoint: no tier that answered "
                f"holds one, and {bucket[0]}",
                grpc.StatusCode.UNAVAILABLE,
            )
        return None

    def delete(self, job: str, step: int) -> int:
        """Deletes every shard of a step from this node's tiers; returns how many.

        Raises NotFound for a step this node does not hold; when a retry
        after a daemon restart finds the step gone (the first try had
        deleted it), returns 0.
        """
        request = pb.DeleteStepRequest(tenant=self.tenant, job=job, step=_check_step(step))
        tries = 0

        def once() -> int:
            nonlocal tries
            tries += 1
            try:
                response = self._call(
                    "DeleteStep", self._stubs.checkpoint.DeleteStep, request, retry=False
                )
            except NotFound:
                if tries > 1:
                    return 0
                raise
            return int(response.shards_deleted)

        return self._retrying("DeleteStep", once)

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

        Raises DeadlineExceeded when ``timeout`` seconds pass first; with no
        ``timeout`` it waits as long as it takes. A daemon restart meanwhile
        is ridden through (``retry_for``), within the same ``timeout``.
        """
        request = pb.WaitDurableRequest(
            tenant=self.tenant, job=job, step=_check_step(step), tier=Tier.parse(tier).value
        )
        if rank is not None:
            request.rank = rank
        end = None
        if timeout is not None:
            if timeout <= 0:
                raise InvalidArgument(f"timeout: must be positive, got {timeout}")
            end = time.monotonic() + timeout

        def once() -> None:
            # No timeout: wait until durable (bounded only by an explicit
            # Client(timeout=...), as before).
            deadline = self.timeout
            if end is not None:
                left = end - time.monotonic()
                if left <= 0:
                    raise DeadlineExceeded(
                        f"{job} step {step} not durable in {Tier.parse(tier).name.lower()} "
                        f"within {timeout} s (the daemon at {self.target} was restarting)",
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                    )
                request.timeout_ms = max(1, int(left * 1000))
                # Let the daemon's own timeout answer first, with its message.
                deadline = left + 5.0
            try:
                self._call(
                    "WaitDurable", self._stubs.checkpoint.WaitDurable, request, deadline,
                    retry=False,
                )
            except DeadlineExceeded:
                raise
            except CairnError as e:
                if e.code == grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise DeadlineExceeded(e.message, e.code) from None
                raise

        self._retrying("WaitDurable", once)

    def status(self) -> pb.StatusResponse:
        """The daemon's tiers, usage and sessions (Admin.Status)."""
        return self._call("Status", self._stubs.admin.Status, pb.StatusRequest())

    def ping(self, timeout: float = 5.0) -> bool:
        """Whether the daemon answers within ``timeout`` seconds."""
        try:
            self._stubs.admin.Status(pb.StatusRequest(), timeout=timeout)
        except grpc.RpcError as e:
            # A volume's socket answers Status with PERMISSION_DENIED (it is
            # for operators): the daemon is there all the same.
            return e.code() == grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined]
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
        deadline: float | None | _Default = _DEFAULT,
        *,
        retry: bool = True,
    ) -> _T:
        """One unary call; ``deadline`` left out: a small call's deadline.

        With ``retry`` the call is retried while the daemon is unreachable
        (see :meth:`_retrying`).
        """
        seconds = self._small_deadline() if deadline is _DEFAULT else deadline

        def once() -> _T:
            started = time.monotonic()
            try:
                return method(request, timeout=seconds)
            except grpc.RpcError as e:
                raise self._error(e, name, seconds, time.monotonic() - started) from None

        return self._retrying(name, once) if retry else once()

    def _small_deadline(self) -> float | None:
        if self._timeout_arg is not _DEFAULT:
            return self.timeout
        if self.stall_timeout is not None:
            return min(CALL_TIMEOUT, self.stall_timeout)
        return CALL_TIMEOUT

    def _bulk_deadline(self) -> float | None:
        """Deadline of one RPC of a save or restore: no reply is no progress."""
        limits = [t for t in (self.timeout, self.stall_timeout) if t is not None]
        return min(limits) if limits else None

    def _retrying(self, what: str, once: Callable[[], _T], *, save: bool = False) -> _T:
        """Runs ``once`` until it succeeds, retrying while the daemon is away.

        Retried: the daemon unreachable or the connection broken, files it
        handed out gone, and for a save (``save=True``) a session the
        restarted daemon no longer knows. Backoff from 0.1 s doubling to 2 s,
        each pause drawn between half and all of it, for ``retry_for``
        seconds from the first failure; then DaemonUnavailable.
        """
        first_failure: float | None = None
        pause = _BACKOFF_FIRST
        tries = 0
        while True:
            try:
                return once()
            except CairnError as e:
                reason = _retry_reason(e, save)
                if reason is None or self.retry_for <= 0:
                    raise
                now = time.monotonic()
                if first_failure is None:
                    first_failure = now
                spent = now - first_failure
                tries += 1
                if spent >= self.retry_for:
                    raise DaemonUnavailable(
                        f"cairn daemon unavailable at {self.target}: {what} still failing "
                        f"after retrying for {spent:.1f} s ({tries} tries; retry_for "
                        f"{self.retry_for:g} s): {reason}",
                        self.target,
                        e.code,
                        retried_for=spent,
                    ) from e
                sleep = min(pause * random.uniform(0.5, 1.0), self.retry_for - spent)
                pause = min(pause * 2, _BACKOFF_CAP)
                log.warning(
                    "cairn daemon at %s: %s: %s; retrying in %.2f s (%.1f s of retry_for %g s spent)",
                    self.target, what, reason, sleep, spent, self.retry_for,
                )
                time.sleep(sleep)

    def _stalled(self, call: str, seconds: float) -> DeadlineExceeded:
        return DeadlineExceeded(
            f"{call} to the cairn daemon at {self.target} made no progress for "
            f"{seconds:.1f} s (stall_timeout {self.stall_timeout:g} s): the daemon may be hung",
            grpc.StatusCode.DEADLINE_EXCEEDED,
        )

    def _error(
        self,
        error: grpc.RpcError,
        call: str,
        deadline: float | None = None,
        elapsed: float | None = None,
    ) -> CairnError:
        if (
            deadline is not None
            and elapsed is not None
            and elapsed >= deadline * 0.95
            and isinstance(error, grpc.Call)
            and error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        ):
            # Our own deadline, not the daemon's answer.
            if self.stall_timeout is not None and deadline >= self.stall_timeout:
                return self._stalled(call, elapsed)
            return DeadlineExceeded(
                f"{call} to the cairn daemon at {self.target} got no reply within "
                f"{deadline:g} s",
                grpc.StatusCode.DEADLINE_EXCEEDED,
            )
        return from_rpc_error(error, self._target.display, call)


def _retry_reason(error: CairnError, save: bool) -> str | None:
    """Why ``error`` is worth a retry (the daemon is away), or None."""
    if isinstance(error, _FilesVanished):
        return f"{error.message} (daemon restarted?)"
    code = error.code
    if code == grpc.StatusCode.UNAVAILABLE:
        return error.message
    if code in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL) and _CONNECTION_BROKEN.search(
        error.message
    ):
        return f"connection broken: {error.message}"
    if save and isinstance(error, FailedPrecondition) and "is not open" in error.message:
        return f"the daemon no longer knows the save session (restarted?): {error.message}"
    return None


def _seconds(name: str, value: object, allow_none: bool = False) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise InvalidArgument(f"{name}: expected a non-negative number of seconds, got {value!r}")
    return float(value)


def _env_seconds(variable: str, default: float) -> float:
    text = os.environ.get(variable, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise InvalidArgument(f"${variable}: expected a non-negative number of seconds, got {text!r}")
    return value


def _check_attempt(attempt: str | None) -> str:
    """None: a fresh attempt id; else the caller's, checked."""
    if attempt is None:
        return uuid.uuid4().hex
    if not isinstance(attempt, str) or not _ATTEMPT.match(attempt):
        raise InvalidArgument(
            f"attempt: expected up to 64 characters of [A-Za-z0-9._-], got {attempt!r}"
        )
    return attempt


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
    path: str, getter: Getter, size: int, first: bool, keep: bool = False
) -> mmap.mmap | None:
    """Copies a staged file's bytes in (:func:`_arrays.copy_to_file`); with
    ``keep``, maps it read-only.

    The file is opened for reading too, so that pooled pages can be copied
    into through a mapping. The mapping kept keeps the bytes readable after
    the daemon removes the file (a restarted daemon cleans its staging area),
    so a background save can be redone after its caller reused the buffers.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        if first:
            raise _FilesNotLocal() from None
        raise
    except PermissionError:
        if keep:
            raise
        # A file this process may write but not read: pwrite only.
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        if not size:
            return None
        view, keepalive = getter()
        if view.nbytes != size:
            raise CairnError(f"{path}: {view.nbytes} bytes to write, expected {size}")
        _arrays.copy_to_file(fd, view)
        del view, keepalive
        return mmap.mmap(fd, size, access=mmap.ACCESS_READ) if keep else None
    finally:
        os.close(fd)


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
        # Mapping a regular file read-only costs no copy; the write then
        # copies page cache to tmpfs once.
        if size == 0:
            return memoryview(b""), None
        with open(path, "rb") as f:
            mapping = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ)
        return memoryview(mapping), mapping

    return read
