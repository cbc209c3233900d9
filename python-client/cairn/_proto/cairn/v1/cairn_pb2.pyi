from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tier(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TIER_UNSPECIFIED: _ClassVar[Tier]
    TIER_MEMORY: _ClassVar[Tier]
    TIER_DISK: _ClassVar[Tier]
    TIER_PEERS: _ClassVar[Tier]
    TIER_OBJECT_STORE: _ClassVar[Tier]

class ShardState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SHARD_STATE_UNSPECIFIED: _ClassVar[ShardState]
    SHARD_STATE_ABSENT: _ClassVar[ShardState]
    SHARD_STATE_PENDING: _ClassVar[ShardState]
    SHARD_STATE_DURABLE: _ClassVar[ShardState]
    SHARD_STATE_FAILED: _ClassVar[ShardState]
TIER_UNSPECIFIED: Tier
TIER_MEMORY: Tier
TIER_DISK: Tier
TIER_PEERS: Tier
TIER_OBJECT_STORE: Tier
SHARD_STATE_UNSPECIFIED: ShardState
SHARD_STATE_ABSENT: ShardState
SHARD_STATE_PENDING: ShardState
SHARD_STATE_DURABLE: ShardState
SHARD_STATE_FAILED: ShardState

class ShardRef(_message.Message):
    __slots__ = ("tenant", "job", "step", "rank")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    job: str
    step: int
    rank: int
    def __init__(self, tenant: _Optional[str] = ..., job: _Optional[str] = ..., step: _Optional[int] = ..., rank: _Optional[int] = ...) -> None: ...

class ShardSelector(_message.Message):
    __slots__ = ("tenant", "job", "step", "rank")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    job: str
    step: int
    rank: int
    def __init__(self, tenant: _Optional[str] = ..., job: _Optional[str] = ..., step: _Optional[int] = ..., rank: _Optional[int] = ...) -> None: ...

class FileSpec(_message.Message):
    __slots__ = ("name", "size", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    name: str
    size: int
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, name: _Optional[str] = ..., size: _Optional[int] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class BeginShardRequest(_message.Message):
    __slots__ = ("shard", "files", "world_size", "metadata", "attempt")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SHARD_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    shard: ShardRef
    files: _containers.RepeatedCompositeFieldContainer[FileSpec]
    world_size: int
    metadata: _containers.ScalarMap[str, str]
    attempt: str
    def __init__(self, shard: _Optional[_Union[ShardRef, _Mapping]] = ..., files: _Optional[_Iterable[_Union[FileSpec, _Mapping]]] = ..., world_size: _Optional[int] = ..., metadata: _Optional[_Mapping[str, str]] = ..., attempt: _Optional[str] = ...) -> None: ...

class StagedFile(_message.Message):
    __slots__ = ("name", "path", "size")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    name: str
    path: str
    size: int
    def __init__(self, name: _Optional[str] = ..., path: _Optional[str] = ..., size: _Optional[int] = ...) -> None: ...

class BeginShardResponse(_message.Message):
    __slots__ = ("session_id", "files")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    files: _containers.RepeatedCompositeFieldContainer[StagedFile]
    def __init__(self, session_id: _Optional[str] = ..., files: _Optional[_Iterable[_Union[StagedFile, _Mapping]]] = ...) -> None: ...

class CommitShardRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class ShardInfo(_message.Message):
    __slots__ = ("shard", "total_bytes", "file_count", "chunk_count", "manifest_hash", "committed_unix_ms", "attempt")
    SHARD_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    FILE_COUNT_FIELD_NUMBER: _ClassVar[int]
    CHUNK_COUNT_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_HASH_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    shard: ShardRef
    total_bytes: int
    file_count: int
    chunk_count: int
    manifest_hash: bytes
    committed_unix_ms: int
    attempt: str
    def __init__(self, shard: _Optional[_Union[ShardRef, _Mapping]] = ..., total_bytes: _Optional[int] = ..., file_count: _Optional[int] = ..., chunk_count: _Optional[int] = ..., manifest_hash: _Optional[bytes] = ..., committed_unix_ms: _Optional[int] = ..., attempt: _Optional[str] = ...) -> None: ...

class CommitShardResponse(_message.Message):
    __slots__ = ("shard",)
    SHARD_FIELD_NUMBER: _ClassVar[int]
    shard: ShardInfo
    def __init__(self, shard: _Optional[_Union[ShardInfo, _Mapping]] = ...) -> None: ...

class AbortShardRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class AbortShardResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class FileData(_message.Message):
    __slots__ = ("file_index", "offset", "data")
    FILE_INDEX_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    file_index: int
    offset: int
    data: bytes
    def __init__(self, file_index: _Optional[int] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class WriteShardRequest(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: BeginShardRequest
    data: FileData
    def __init__(self, header: _Optional[_Union[BeginShardRequest, _Mapping]] = ..., data: _Optional[_Union[FileData, _Mapping]] = ...) -> None: ...

class ChunkRef(_message.Message):
    __slots__ = ("id", "len")
    ID_FIELD_NUMBER: _ClassVar[int]
    LEN_FIELD_NUMBER: _ClassVar[int]
    id: bytes
    len: int
    def __init__(self, id: _Optional[bytes] = ..., len: _Optional[int] = ...) -> None: ...

class FileManifest(_message.Message):
    __slots__ = ("name", "size", "chunks", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    name: str
    size: int
    chunks: _containers.RepeatedCompositeFieldContainer[ChunkRef]
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, name: _Optional[str] = ..., size: _Optional[int] = ..., chunks: _Optional[_Iterable[_Union[ChunkRef, _Mapping]]] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class ShardManifest(_message.Message):
    __slots__ = ("shard", "world_size", "chunk_size", "files", "metadata", "manifest_hash", "committed_unix_ms", "attempt")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SHARD_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_HASH_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    shard: ShardRef
    world_size: int
    chunk_size: int
    files: _containers.RepeatedCompositeFieldContainer[FileManifest]
    metadata: _containers.ScalarMap[str, str]
    manifest_hash: bytes
    committed_unix_ms: int
    attempt: str
    def __init__(self, shard: _Optional[_Union[ShardRef, _Mapping]] = ..., world_size: _Optional[int] = ..., chunk_size: _Optional[int] = ..., files: _Optional[_Iterable[_Union[FileManifest, _Mapping]]] = ..., metadata: _Optional[_Mapping[str, str]] = ..., manifest_hash: _Optional[bytes] = ..., committed_unix_ms: _Optional[int] = ..., attempt: _Optional[str] = ...) -> None: ...

class ReadShardRequest(_message.Message):
    __slots__ = ("shard",)
    SHARD_FIELD_NUMBER: _ClassVar[int]
    shard: ShardSelector
    def __init__(self, shard: _Optional[_Union[ShardSelector, _Mapping]] = ...) -> None: ...

class ReadShardResponse(_message.Message):
    __slots__ = ("manifest", "data")
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    manifest: ShardManifest
    data: FileData
    def __init__(self, manifest: _Optional[_Union[ShardManifest, _Mapping]] = ..., data: _Optional[_Union[FileData, _Mapping]] = ...) -> None: ...

class TierState(_message.Message):
    __slots__ = ("tier", "state", "problem")
    TIER_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PROBLEM_FIELD_NUMBER: _ClassVar[int]
    tier: Tier
    state: ShardState
    problem: str
    def __init__(self, tier: _Optional[_Union[Tier, str]] = ..., state: _Optional[_Union[ShardState, str]] = ..., problem: _Optional[str] = ...) -> None: ...

class ShardStatus(_message.Message):
    __slots__ = ("rank", "total_bytes", "world_size", "tiers", "peer_holders", "peer_replicas_wanted", "peer_problem", "attempt")
    RANK_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    TIERS_FIELD_NUMBER: _ClassVar[int]
    PEER_HOLDERS_FIELD_NUMBER: _ClassVar[int]
    PEER_REPLICAS_WANTED_FIELD_NUMBER: _ClassVar[int]
    PEER_PROBLEM_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    rank: int
    total_bytes: int
    world_size: int
    tiers: _containers.RepeatedCompositeFieldContainer[TierState]
    peer_holders: _containers.RepeatedScalarFieldContainer[str]
    peer_replicas_wanted: int
    peer_problem: str
    attempt: str
    def __init__(self, rank: _Optional[int] = ..., total_bytes: _Optional[int] = ..., world_size: _Optional[int] = ..., tiers: _Optional[_Iterable[_Union[TierState, _Mapping]]] = ..., peer_holders: _Optional[_Iterable[str]] = ..., peer_replicas_wanted: _Optional[int] = ..., peer_problem: _Optional[str] = ..., attempt: _Optional[str] = ...) -> None: ...

class StepStatus(_message.Message):
    __slots__ = ("step", "restorable", "shards", "object_store_complete")
    STEP_FIELD_NUMBER: _ClassVar[int]
    RESTORABLE_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    OBJECT_STORE_COMPLETE_FIELD_NUMBER: _ClassVar[int]
    step: int
    restorable: bool
    shards: _containers.RepeatedCompositeFieldContainer[ShardStatus]
    object_store_complete: bool
    def __init__(self, step: _Optional[int] = ..., restorable: _Optional[bool] = ..., shards: _Optional[_Iterable[_Union[ShardStatus, _Mapping]]] = ..., object_store_complete: _Optional[bool] = ...) -> None: ...

class ListStepsRequest(_message.Message):
    __slots__ = ("tenant", "job", "wait_for_all_tiers")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    WAIT_FOR_ALL_TIERS_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    job: str
    wait_for_all_tiers: bool
    def __init__(self, tenant: _Optional[str] = ..., job: _Optional[str] = ..., wait_for_all_tiers: _Optional[bool] = ...) -> None: ...

class JobSteps(_message.Message):
    __slots__ = ("job", "steps")
    JOB_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    job: str
    steps: _containers.RepeatedCompositeFieldContainer[StepStatus]
    def __init__(self, job: _Optional[str] = ..., steps: _Optional[_Iterable[_Union[StepStatus, _Mapping]]] = ...) -> None: ...

class ListStepsResponse(_message.Message):
    __slots__ = ("jobs", "left_out")
    JOBS_FIELD_NUMBER: _ClassVar[int]
    LEFT_OUT_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[JobSteps]
    left_out: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, jobs: _Optional[_Iterable[_Union[JobSteps, _Mapping]]] = ..., left_out: _Optional[_Iterable[str]] = ...) -> None: ...

class GetManifestRequest(_message.Message):
    __slots__ = ("shard",)
    SHARD_FIELD_NUMBER: _ClassVar[int]
    shard: ShardSelector
    def __init__(self, shard: _Optional[_Union[ShardSelector, _Mapping]] = ...) -> None: ...

class GetManifestResponse(_message.Message):
    __slots__ = ("manifest",)
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    manifest: ShardManifest
    def __init__(self, manifest: _Optional[_Union[ShardManifest, _Mapping]] = ...) -> None: ...

class RestoreShardRequest(_message.Message):
    __slots__ = ("shard", "skip_verify")
    SHARD_FIELD_NUMBER: _ClassVar[int]
    SKIP_VERIFY_FIELD_NUMBER: _ClassVar[int]
    shard: ShardSelector
    skip_verify: bool
    def __init__(self, shard: _Optional[_Union[ShardSelector, _Mapping]] = ..., skip_verify: _Optional[bool] = ...) -> None: ...

class RestoredFile(_message.Message):
    __slots__ = ("name", "path", "size")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    name: str
    path: str
    size: int
    def __init__(self, name: _Optional[str] = ..., path: _Optional[str] = ..., size: _Optional[int] = ...) -> None: ...

class SourceBytes(_message.Message):
    __slots__ = ("tier", "bytes")
    TIER_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    tier: Tier
    bytes: int
    def __init__(self, tier: _Optional[_Union[Tier, str]] = ..., bytes: _Optional[int] = ...) -> None: ...

class RestoreShardResponse(_message.Message):
    __slots__ = ("manifest", "files", "sources")
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    manifest: ShardManifest
    files: _containers.RepeatedCompositeFieldContainer[RestoredFile]
    sources: _containers.RepeatedCompositeFieldContainer[SourceBytes]
    def __init__(self, manifest: _Optional[_Union[ShardManifest, _Mapping]] = ..., files: _Optional[_Iterable[_Union[RestoredFile, _Mapping]]] = ..., sources: _Optional[_Iterable[_Union[SourceBytes, _Mapping]]] = ...) -> None: ...

class DeleteStepRequest(_message.Message):
    __slots__ = ("tenant", "job", "step")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    job: str
    step: int
    def __init__(self, tenant: _Optional[str] = ..., job: _Optional[str] = ..., step: _Optional[int] = ...) -> None: ...

class DeleteStepResponse(_message.Message):
    __slots__ = ("shards_deleted",)
    SHARDS_DELETED_FIELD_NUMBER: _ClassVar[int]
    shards_deleted: int
    def __init__(self, shards_deleted: _Optional[int] = ...) -> None: ...

class WaitDurableRequest(_message.Message):
    __slots__ = ("tenant", "job", "step", "rank", "tier", "timeout_ms")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    job: str
    step: int
    rank: int
    tier: Tier
    timeout_ms: int
    def __init__(self, tenant: _Optional[str] = ..., job: _Optional[str] = ..., step: _Optional[int] = ..., rank: _Optional[int] = ..., tier: _Optional[_Union[Tier, str]] = ..., timeout_ms: _Optional[int] = ...) -> None: ...

class WaitDurableResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TierUsage(_message.Message):
    __slots__ = ("tier", "path", "used_bytes", "capacity_bytes", "shards")
    TIER_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    tier: Tier
    path: str
    used_bytes: int
    capacity_bytes: int
    shards: int
    def __init__(self, tier: _Optional[_Union[Tier, str]] = ..., path: _Optional[str] = ..., used_bytes: _Optional[int] = ..., capacity_bytes: _Optional[int] = ..., shards: _Optional[int] = ...) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("node", "version", "tiers", "open_sessions", "pending_writebacks", "default_tenant", "metrics_addr", "pending_uploads", "peers", "restores", "pipelines")
    NODE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TIERS_FIELD_NUMBER: _ClassVar[int]
    OPEN_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    PENDING_WRITEBACKS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_TENANT_FIELD_NUMBER: _ClassVar[int]
    METRICS_ADDR_FIELD_NUMBER: _ClassVar[int]
    PENDING_UPLOADS_FIELD_NUMBER: _ClassVar[int]
    PEERS_FIELD_NUMBER: _ClassVar[int]
    RESTORES_FIELD_NUMBER: _ClassVar[int]
    PIPELINES_FIELD_NUMBER: _ClassVar[int]
    node: str
    version: str
    tiers: _containers.RepeatedCompositeFieldContainer[TierUsage]
    open_sessions: int
    pending_writebacks: int
    default_tenant: str
    metrics_addr: str
    pending_uploads: int
    peers: PeerTierStatus
    restores: _containers.RepeatedCompositeFieldContainer[RestoreProgress]
    pipelines: _containers.RepeatedCompositeFieldContainer[PipelineStatus]
    def __init__(self, node: _Optional[str] = ..., version: _Optional[str] = ..., tiers: _Optional[_Iterable[_Union[TierUsage, _Mapping]]] = ..., open_sessions: _Optional[int] = ..., pending_writebacks: _Optional[int] = ..., default_tenant: _Optional[str] = ..., metrics_addr: _Optional[str] = ..., pending_uploads: _Optional[int] = ..., peers: _Optional[_Union[PeerTierStatus, _Mapping]] = ..., restores: _Optional[_Iterable[_Union[RestoreProgress, _Mapping]]] = ..., pipelines: _Optional[_Iterable[_Union[PipelineStatus, _Mapping]]] = ...) -> None: ...

class PipelineStatus(_message.Message):
    __slots__ = ("name", "pending", "retrying", "needs_attention", "durable")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PENDING_FIELD_NUMBER: _ClassVar[int]
    RETRYING_FIELD_NUMBER: _ClassVar[int]
    NEEDS_ATTENTION_FIELD_NUMBER: _ClassVar[int]
    DURABLE_FIELD_NUMBER: _ClassVar[int]
    name: str
    pending: int
    retrying: int
    needs_attention: int
    durable: int
    def __init__(self, name: _Optional[str] = ..., pending: _Optional[int] = ..., retrying: _Optional[int] = ..., needs_attention: _Optional[int] = ..., durable: _Optional[int] = ...) -> None: ...

class RestoreProgress(_message.Message):
    __slots__ = ("shard", "total_bytes", "done_bytes", "sources", "elapsed_seconds")
    SHARD_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    DONE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    shard: ShardRef
    total_bytes: int
    done_bytes: int
    sources: _containers.RepeatedCompositeFieldContainer[SourceProgress]
    elapsed_seconds: float
    def __init__(self, shard: _Optional[_Union[ShardRef, _Mapping]] = ..., total_bytes: _Optional[int] = ..., done_bytes: _Optional[int] = ..., sources: _Optional[_Iterable[_Union[SourceProgress, _Mapping]]] = ..., elapsed_seconds: _Optional[float] = ...) -> None: ...

class SourceProgress(_message.Message):
    __slots__ = ("source", "bytes")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    source: str
    bytes: int
    def __init__(self, source: _Optional[str] = ..., bytes: _Optional[int] = ...) -> None: ...

class PeerTierStatus(_message.Message):
    __slots__ = ("node_id", "replicas", "membership_source", "members", "pending_replications", "under_replicated_shards", "replica_shards", "replica_bytes", "insecure", "scrub_passes", "scrub_checked_chunks", "scrub_pass_chunks", "scrub_bad_chunks", "scrub_bytes_per_sec", "membership_problem")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    MEMBERSHIP_SOURCE_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    PENDING_REPLICATIONS_FIELD_NUMBER: _ClassVar[int]
    UNDER_REPLICATED_SHARDS_FIELD_NUMBER: _ClassVar[int]
    REPLICA_SHARDS_FIELD_NUMBER: _ClassVar[int]
    REPLICA_BYTES_FIELD_NUMBER: _ClassVar[int]
    INSECURE_FIELD_NUMBER: _ClassVar[int]
    SCRUB_PASSES_FIELD_NUMBER: _ClassVar[int]
    SCRUB_CHECKED_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    SCRUB_PASS_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    SCRUB_BAD_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    SCRUB_BYTES_PER_SEC_FIELD_NUMBER: _ClassVar[int]
    MEMBERSHIP_PROBLEM_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    replicas: int
    membership_source: str
    members: _containers.RepeatedCompositeFieldContainer[PeerMember]
    pending_replications: int
    under_replicated_shards: int
    replica_shards: int
    replica_bytes: int
    insecure: bool
    scrub_passes: int
    scrub_checked_chunks: int
    scrub_pass_chunks: int
    scrub_bad_chunks: int
    scrub_bytes_per_sec: int
    membership_problem: str
    def __init__(self, node_id: _Optional[str] = ..., replicas: _Optional[int] = ..., membership_source: _Optional[str] = ..., members: _Optional[_Iterable[_Union[PeerMember, _Mapping]]] = ..., pending_replications: _Optional[int] = ..., under_replicated_shards: _Optional[int] = ..., replica_shards: _Optional[int] = ..., replica_bytes: _Optional[int] = ..., insecure: _Optional[bool] = ..., scrub_passes: _Optional[int] = ..., scrub_checked_chunks: _Optional[int] = ..., scrub_pass_chunks: _Optional[int] = ..., scrub_bad_chunks: _Optional[int] = ..., scrub_bytes_per_sec: _Optional[int] = ..., membership_problem: _Optional[str] = ...) -> None: ...

class PeerMember(_message.Message):
    __slots__ = ("node_id", "address", "zone", "rack", "unreachable", "last_contact_unix_ms", "holds_shards")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    ZONE_FIELD_NUMBER: _ClassVar[int]
    RACK_FIELD_NUMBER: _ClassVar[int]
    UNREACHABLE_FIELD_NUMBER: _ClassVar[int]
    LAST_CONTACT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    HOLDS_SHARDS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    address: str
    zone: str
    rack: str
    unreachable: bool
    last_contact_unix_ms: int
    holds_shards: int
    def __init__(self, node_id: _Optional[str] = ..., address: _Optional[str] = ..., zone: _Optional[str] = ..., rack: _Optional[str] = ..., unreachable: _Optional[bool] = ..., last_contact_unix_ms: _Optional[int] = ..., holds_shards: _Optional[int] = ...) -> None: ...

class PeerMissingChunksRequest(_message.Message):
    __slots__ = ("tenant", "ids", "presence_only")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    PRESENCE_ONLY_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    ids: _containers.RepeatedScalarFieldContainer[bytes]
    presence_only: bool
    def __init__(self, tenant: _Optional[str] = ..., ids: _Optional[_Iterable[bytes]] = ..., presence_only: _Optional[bool] = ...) -> None: ...

class PeerMissingChunksResponse(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, ids: _Optional[_Iterable[bytes]] = ...) -> None: ...

class PeerPutChunkRequest(_message.Message):
    __slots__ = ("tenant", "id", "data")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    id: bytes
    data: bytes
    def __init__(self, tenant: _Optional[str] = ..., id: _Optional[bytes] = ..., data: _Optional[bytes] = ...) -> None: ...

class PeerPutChunkResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PeerPutManifestRequest(_message.Message):
    __slots__ = ("manifest", "owner", "owner_zone", "owner_rack")
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    OWNER_ZONE_FIELD_NUMBER: _ClassVar[int]
    OWNER_RACK_FIELD_NUMBER: _ClassVar[int]
    manifest: bytes
    owner: str
    owner_zone: str
    owner_rack: str
    def __init__(self, manifest: _Optional[bytes] = ..., owner: _Optional[str] = ..., owner_zone: _Optional[str] = ..., owner_rack: _Optional[str] = ...) -> None: ...

class PeerPutManifestResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PeerGetReplicaRequest(_message.Message):
    __slots__ = ("shard",)
    SHARD_FIELD_NUMBER: _ClassVar[int]
    shard: ShardRef
    def __init__(self, shard: _Optional[_Union[ShardRef, _Mapping]] = ...) -> None: ...

class PeerGetReplicaResponse(_message.Message):
    __slots__ = ("manifest",)
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    manifest: bytes
    def __init__(self, manifest: _Optional[bytes] = ...) -> None: ...

class PeerListReplicasRequest(_message.Message):
    __slots__ = ("tenant", "job")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    job: str
    def __init__(self, tenant: _Optional[str] = ..., job: _Optional[str] = ...) -> None: ...

class PeerListReplicasResponse(_message.Message):
    __slots__ = ("manifests",)
    MANIFESTS_FIELD_NUMBER: _ClassVar[int]
    manifests: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, manifests: _Optional[_Iterable[bytes]] = ...) -> None: ...

class PeerGetChunkRequest(_message.Message):
    __slots__ = ("tenant", "id")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    id: bytes
    def __init__(self, tenant: _Optional[str] = ..., id: _Optional[bytes] = ...) -> None: ...

class PeerGetChunkResponse(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...

class VerifyRequest(_message.Message):
    __slots__ = ("tenant", "job", "step", "rank", "tier", "repair")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    REPAIR_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    job: str
    step: int
    rank: int
    tier: Tier
    repair: bool
    def __init__(self, tenant: _Optional[str] = ..., job: _Optional[str] = ..., step: _Optional[int] = ..., rank: _Optional[int] = ..., tier: _Optional[_Union[Tier, str]] = ..., repair: _Optional[bool] = ...) -> None: ...

class BadChunk(_message.Message):
    __slots__ = ("rank", "file", "offset", "chunk_id", "problem", "repaired", "holder")
    RANK_FIELD_NUMBER: _ClassVar[int]
    FILE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    CHUNK_ID_FIELD_NUMBER: _ClassVar[int]
    PROBLEM_FIELD_NUMBER: _ClassVar[int]
    REPAIRED_FIELD_NUMBER: _ClassVar[int]
    HOLDER_FIELD_NUMBER: _ClassVar[int]
    rank: int
    file: str
    offset: int
    chunk_id: bytes
    problem: str
    repaired: bool
    holder: str
    def __init__(self, rank: _Optional[int] = ..., file: _Optional[str] = ..., offset: _Optional[int] = ..., chunk_id: _Optional[bytes] = ..., problem: _Optional[str] = ..., repaired: _Optional[bool] = ..., holder: _Optional[str] = ...) -> None: ...

class VerifyProgress(_message.Message):
    __slots__ = ("bytes_done", "bytes_total", "bad_chunks", "done")
    BYTES_DONE_FIELD_NUMBER: _ClassVar[int]
    BYTES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    BAD_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    bytes_done: int
    bytes_total: int
    bad_chunks: _containers.RepeatedCompositeFieldContainer[BadChunk]
    done: bool
    def __init__(self, bytes_done: _Optional[int] = ..., bytes_total: _Optional[int] = ..., bad_chunks: _Optional[_Iterable[_Union[BadChunk, _Mapping]]] = ..., done: _Optional[bool] = ...) -> None: ...

class GcRequest(_message.Message):
    __slots__ = ("dry_run",)
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    dry_run: bool
    def __init__(self, dry_run: _Optional[bool] = ...) -> None: ...

class GcResponse(_message.Message):
    __slots__ = ("chunks_removed", "bytes_removed", "object_store_chunks_removed", "object_store_bytes_removed", "object_store_skipped_tenants", "object_store_configured")
    CHUNKS_REMOVED_FIELD_NUMBER: _ClassVar[int]
    BYTES_REMOVED_FIELD_NUMBER: _ClassVar[int]
    OBJECT_STORE_CHUNKS_REMOVED_FIELD_NUMBER: _ClassVar[int]
    OBJECT_STORE_BYTES_REMOVED_FIELD_NUMBER: _ClassVar[int]
    OBJECT_STORE_SKIPPED_TENANTS_FIELD_NUMBER: _ClassVar[int]
    OBJECT_STORE_CONFIGURED_FIELD_NUMBER: _ClassVar[int]
    chunks_removed: int
    bytes_removed: int
    object_store_chunks_removed: int
    object_store_bytes_removed: int
    object_store_skipped_tenants: _containers.RepeatedScalarFieldContainer[str]
    object_store_configured: bool
    def __init__(self, chunks_removed: _Optional[int] = ..., bytes_removed: _Optional[int] = ..., object_store_chunks_removed: _Optional[int] = ..., object_store_bytes_removed: _Optional[int] = ..., object_store_skipped_tenants: _Optional[_Iterable[str]] = ..., object_store_configured: _Optional[bool] = ...) -> None: ...

class PrefetchRequest(_message.Message):
    __slots__ = ("node", "shard")
    NODE_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    node: str
    shard: ShardSelector
    def __init__(self, node: _Optional[str] = ..., shard: _Optional[_Union[ShardSelector, _Mapping]] = ...) -> None: ...

class PrefetchResponse(_message.Message):
    __slots__ = ("node", "step", "bytes", "sources")
    NODE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    node: str
    step: int
    bytes: int
    sources: _containers.RepeatedCompositeFieldContainer[SourceBytes]
    def __init__(self, node: _Optional[str] = ..., step: _Optional[int] = ..., bytes: _Optional[int] = ..., sources: _Optional[_Iterable[_Union[SourceBytes, _Mapping]]] = ...) -> None: ...

class PrefetchProgress(_message.Message):
    __slots__ = ("progress", "done")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    progress: RestoreProgress
    done: PrefetchResponse
    def __init__(self, progress: _Optional[_Union[RestoreProgress, _Mapping]] = ..., done: _Optional[_Union[PrefetchResponse, _Mapping]] = ...) -> None: ...

class PeerPrefetchRequest(_message.Message):
    __slots__ = ("shard",)
    SHARD_FIELD_NUMBER: _ClassVar[int]
    shard: ShardSelector
    def __init__(self, shard: _Optional[_Union[ShardSelector, _Mapping]] = ...) -> None: ...

class BindVolumeRequest(_message.Message):
    __slots__ = ("volume_id",)
    VOLUME_ID_FIELD_NUMBER: _ClassVar[int]
    volume_id: str
    def __init__(self, volume_id: _Optional[str] = ...) -> None: ...

class BindVolumeResponse(_message.Message):
    __slots__ = ("tenant", "job", "socket_path")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    SOCKET_PATH_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    job: str
    socket_path: str
    def __init__(self, tenant: _Optional[str] = ..., job: _Optional[str] = ..., socket_path: _Optional[str] = ...) -> None: ...

class UnbindVolumeRequest(_message.Message):
    __slots__ = ("volume_id",)
    VOLUME_ID_FIELD_NUMBER: _ClassVar[int]
    volume_id: str
    def __init__(self, volume_id: _Optional[str] = ...) -> None: ...

class UnbindVolumeResponse(_message.Message):
    __slots__ = ("was_bound",)
    WAS_BOUND_FIELD_NUMBER: _ClassVar[int]
    was_bound: bool
    def __init__(self, was_bound: _Optional[bool] = ...) -> None: ...

class PeerDropReplicaRequest(_message.Message):
    __slots__ = ("shard",)
    SHARD_FIELD_NUMBER: _ClassVar[int]
    shard: ShardRef
    def __init__(self, shard: _Optional[_Union[ShardRef, _Mapping]] = ...) -> None: ...

class PeerDropReplicaResponse(_message.Message):
    __slots__ = ("dropped",)
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    dropped: bool
    def __init__(self, dropped: _Optional[bool] = ...) -> None: ...
