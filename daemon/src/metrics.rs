//! Prometheus metrics: every name in one place, documented in `docs/metrics.md`.
//!
//! Names start with `cairn_` and end in their unit. Labels stay low
//! cardinality: tier, RPC method and status code, peer node (a node talks
//! to the few peers placement gives it), never job or step.

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// Bytes committed into a tier (`tier`: memory, disk).
pub const SAVED_BYTES: &str = "cairn_saved_bytes_total";
/// Bytes handed back by restores, by the tier they came from.
pub const RESTORED_BYTES: &str = "cairn_restored_bytes_total";
/// Bytes restores wrote into the memory tier as they arrive, by source
/// (`disk`, `peer:<node>`, `object-store`): a restore's progress per source.
pub const RESTORE_SOURCE_BYTES: &str = "cairn_restore_source_bytes_total";
/// Restores filling the memory tier right now.
pub const RESTORES_ACTIVE: &str = "cairn_restores_active";
/// Bytes the restores in flight still have to fetch.
pub const RESTORE_REMAINING_BYTES: &str = "cairn_restore_remaining_bytes";
/// Time from CommitShard's arrival to its answer.
pub const COMMIT_SECONDS: &str = "cairn_commit_duration_seconds";
/// Time to serve RestoreShard, refills and verification included.
pub const RESTORE_SECONDS: &str = "cairn_restore_duration_seconds";
/// Time to write one shard through to the disk tier.
pub const WRITEBACK_SECONDS: &str = "cairn_writeback_duration_seconds";
/// Bytes in use per tier (files, chunks and reservations).
pub const TIER_USED_BYTES: &str = "cairn_tier_used_bytes";
/// Bytes of recycled memory-tier files waiting for the next save.
pub const MEMORY_POOL_BYTES: &str = "cairn_memory_pool_bytes";
/// Configured capacity per tier (0: unlimited).
pub const TIER_CAPACITY_BYTES: &str = "cairn_tier_capacity_bytes";
/// RPCs that failed, by method and gRPC code.
pub const RPC_ERRORS: &str = "cairn_rpc_errors_total";
/// Chunks whose bytes did not match their hash, by tier.
pub const CHUNK_VERIFY_FAILURES: &str = "cairn_chunk_verify_failures_total";
/// Chunks repaired from another tier, by the tier repaired.
pub const CHUNKS_REPAIRED: &str = "cairn_chunks_repaired_total";
/// Shards evicted, by tier and reason (retention, pressure, delete).
pub const SHARDS_EVICTED: &str = "cairn_shards_evicted_total";
/// Save sessions currently open.
pub const OPEN_SESSIONS: &str = "cairn_open_sessions";
/// Shards committed but not yet durable on disk.
pub const WRITEBACK_PENDING: &str = "cairn_writeback_pending_shards";
/// Write-backs and uploads that failed, by tier; deprecated in favour of
/// [`PIPELINE_FAILURES`], which counts the same attempts by pipeline.
pub const WRITEBACK_FAILURES: &str = "cairn_writeback_failures_total";
/// Bytes a tier already had and so did not write again (dedup), by tier.
pub const DEDUP_SKIPPED_BYTES: &str = "cairn_dedup_skipped_bytes_total";
/// Shards committed but not yet durable in the object store.
pub const UPLOAD_PENDING: &str = "cairn_upload_pending_shards";
/// Time from a shard's commit until it is durable in the object store.
pub const UPLOAD_LAG_SECONDS: &str = "cairn_upload_lag_seconds";
/// Bytes sent to the object store for chunks, after compression.
pub const OBJECT_STORE_STORED_BYTES: &str = "cairn_object_store_stored_bytes_total";
/// Chunks stored compressed in the object store.
pub const OBJECT_STORE_COMPRESSED_CHUNKS: &str = "cairn_object_store_compressed_chunks_total";
/// Object-store requests retried after a transient failure, by operation.
pub const OBJECT_STORE_RETRIES: &str = "cairn_object_store_retries_total";
/// Object-store requests that failed for good, by operation.
pub const OBJECT_STORE_ERRORS: &str = "cairn_object_store_errors_total";
/// Step directories of CSI volumes taken into the memory tier as shards.
pub const INGESTED_SHARDS: &str = "cairn_ingested_shards_total";
/// Step directories of CSI volumes that could not be ingested, by reason
/// (`refused`: symbolic links, special files or unstorable names, reported
/// once; `error`: I/O or space, retried at the next rescan).
pub const INGEST_FAILURES: &str = "cairn_ingest_failures_total";
/// Completed walks of every CSI volume (the slow rescan): shows ingest is
/// alive, and lets a test wait for "one more full look" instead of sleeping.
pub const INGEST_SCANS: &str = "cairn_ingest_scans_total";

/// Chunk bytes sent to a peer (replication, or serving its restore), by peer.
pub const PEER_SENT_BYTES: &str = "cairn_peer_sent_bytes_total";
/// Chunk bytes received from a peer (its replicas, or our restore), by peer.
pub const PEER_RECEIVED_BYTES: &str = "cairn_peer_received_bytes_total";
/// Time from a shard's commit until the wanted number of peers hold it.
pub const REPLICATION_LAG_SECONDS: &str = "cairn_replication_lag_seconds";
/// Local shards with fewer confirmed peer replicas than wanted.
pub const UNDER_REPLICATED_SHARDS: &str = "cairn_under_replicated_shards";
/// Local shards queued or being replicated.
pub const REPLICATION_PENDING: &str = "cairn_replication_pending_shards";
/// Replica copies to one peer that failed, by reason (`full`, `unreachable`,
/// `refused`, `error`).
pub const REPLICATION_FAILURES: &str = "cairn_replication_failures_total";
/// Failed attempts of a background pipeline, by `pipeline` (`write-back`,
/// `upload`, `replication`).
pub const PIPELINE_FAILURES: &str = "cairn_pipeline_failures_total";
/// Shards a pipeline has given up retrying quickly on (past its attempts,
/// or failed for good), by `pipeline`: alert when above 0.
pub const PIPELINE_NEEDS_ATTENTION: &str = "cairn_pipeline_needs_attention_shards";
/// Members in the current membership view, this node included.
pub const PEER_MEMBERS: &str = "cairn_peer_members";
/// Checks that a recorded holder still has a replica whole, by result
/// (`holds`, `lost`: it answered without the replica or some of its chunks,
/// `no_answer`).
pub const HOLDER_CHECKS: &str = "cairn_holder_checks_total";
/// Holders that stopped counting for one of this node's shards, by reason
/// (`lost`, `unreachable`: past the grace period).
pub const HOLDERS_DROPPED: &str = "cairn_holders_dropped_total";
/// Surplus copies former holders dropped at this node's request.
pub const SURPLUS_REPLICAS_DROPPED: &str = "cairn_surplus_replicas_dropped_total";
/// Bytes of chunks re-hashed by scrubbing, by `store` (`replicas`: those
/// held for other nodes; `disk`: the disk tier's own).
pub const SCRUB_BYTES: &str = "cairn_scrub_bytes_total";
/// Chunks scrubbing found bad, by `store`: replica chunks are removed for
/// their owners to send again, disk chunks rewritten from another tier.
pub const SCRUB_BAD_CHUNKS: &str = "cairn_scrub_bad_chunks_total";

/// The daemon's metrics, registered in their own registry.
pub struct Metrics {
    registry: Registry,
    /// See [`SAVED_BYTES`].
    pub saved_bytes: IntCounterVec,
    /// See [`RESTORED_BYTES`].
    pub restored_bytes: IntCounterVec,
    /// See [`COMMIT_SECONDS`].
    pub commit_seconds: Histogram,
    /// See [`RESTORE_SECONDS`].
    pub restore_seconds: Histogram,
    /// See [`WRITEBACK_SECONDS`].
    pub writeback_seconds: Histogram,
    /// See [`TIER_USED_BYTES`].
    pub tier_used_bytes: IntGaugeVec,
    /// See [`MEMORY_POOL_BYTES`].
    pub memory_pool_bytes: IntGauge,
    /// See [`TIER_CAPACITY_BYTES`].
    pub tier_capacity_bytes: IntGaugeVec,
    /// See [`RPC_ERRORS`].
    pub rpc_errors: IntCounterVec,
    /// See [`CHUNK_VERIFY_FAILURES`].
    pub chunk_verify_failures: IntCounterVec,
    /// See [`CHUNKS_REPAIRED`].
    pub chunks_repaired: IntCounterVec,
    /// See [`SHARDS_EVICTED`].
    pub shards_evicted: IntCounterVec,
    /// See [`OPEN_SESSIONS`].
    pub open_sessions: IntGauge,
    /// See [`WRITEBACK_PENDING`].
    pub writeback_pending: IntGauge,
    /// See [`WRITEBACK_FAILURES`].
    pub writeback_failures: IntCounterVec,
    /// See [`DEDUP_SKIPPED_BYTES`].
    pub dedup_skipped_bytes: IntCounterVec,
    /// See [`UPLOAD_PENDING`].
    pub upload_pending: IntGauge,
    /// See [`UPLOAD_LAG_SECONDS`].
    pub upload_lag_seconds: Histogram,
    /// See [`OBJECT_STORE_STORED_BYTES`].
    pub object_store_stored_bytes: IntCounter,
    /// See [`OBJECT_STORE_COMPRESSED_CHUNKS`].
    pub object_store_compressed_chunks: IntCounter,
    /// See [`OBJECT_STORE_RETRIES`].
    pub object_store_retries: IntCounterVec,
    /// See [`OBJECT_STORE_ERRORS`].
    pub object_store_errors: IntCounterVec,
    /// See [`INGESTED_SHARDS`].
    pub ingested_shards: IntCounter,
    /// See [`INGEST_FAILURES`].
    pub ingest_failures: IntCounterVec,
    /// See [`INGEST_SCANS`].
    pub ingest_scans: IntCounter,
    /// See [`RESTORE_SOURCE_BYTES`].
    pub restore_source_bytes: IntCounterVec,
    /// See [`RESTORES_ACTIVE`].
    pub restores_active: IntGauge,
    /// See [`RESTORE_REMAINING_BYTES`].
    pub restore_remaining_bytes: IntGauge,
    /// See [`PEER_SENT_BYTES`].
    pub peer_sent_bytes: IntCounterVec,
    /// See [`PEER_RECEIVED_BYTES`].
    pub peer_received_bytes: IntCounterVec,
    /// See [`REPLICATION_LAG_SECONDS`].
    pub replication_lag_seconds: Histogram,
    /// See [`UNDER_REPLICATED_SHARDS`].
    pub under_replicated_shards: IntGauge,
    /// See [`REPLICATION_PENDING`].
    pub replication_pending: IntGauge,
    /// See [`REPLICATION_FAILURES`].
    pub replication_failures: IntCounterVec,
    /// See [`PIPELINE_FAILURES`].
    pub pipeline_failures: IntCounterVec,
    /// See [`PIPELINE_NEEDS_ATTENTION`].
    pub pipeline_needs_attention: IntGaugeVec,
    /// See [`PEER_MEMBERS`].
    pub peer_members: IntGauge,
    /// See [`HOLDER_CHECKS`].
    pub holder_checks: IntCounterVec,
    /// See [`HOLDERS_DROPPED`].
    pub holders_dropped: IntCounterVec,
    /// See [`SURPLUS_REPLICAS_DROPPED`].
    pub surplus_replicas_dropped: IntCounter,
    /// See [`SCRUB_BYTES`].
    pub scrub_bytes: IntCounterVec,
    /// See [`SCRUB_BAD_CHUNKS`].
    pub scrub_bad_chunks: IntCounterVec,
}

/// Latency buckets from 1 ms to about 10 minutes.
fn latency_buckets() -> Vec<f64> {
    prometheus::exponential_buckets(0.001, 2.5, 15).unwrap_or_default()
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let registry = Registry::new();
        // Registration fails only on duplicate names, which the constants above rule out.
        fn reg<C: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: C) -> C {
            let _ = r.register(Box::new(c.clone()));
            c
        }
        let counter = |name: &str, help: &str, labels: &[&str]| {
            reg(
                &registry,
                IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric"),
            )
        };
        let histogram = |name: &str, help: &str| {
            reg(
                &registry,
                Histogram::with_opts(HistogramOpts::new(name, help).buckets(latency_buckets()))
                    .expect("valid metric"),
            )
        };
        let gauge_vec = |name: &str, help: &str, labels: &[&str]| {
            reg(
                &registry,
                IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric"),
            )
        };
        let gauge = |name: &str, help: &str| {
            reg(&registry, IntGauge::new(name, help).expect("valid metric"))
        };
        Self {
            saved_bytes: counter(SAVED_BYTES, "Bytes committed into a tier.", &["tier"]),
            restored_bytes: counter(RESTORED_BYTES, "Bytes restored, by source tier.", &["tier"]),
            restore_source_bytes: counter(
                RESTORE_SOURCE_BYTES,
                "Bytes restores fetched, by source.",
                &["source"],
            ),
            restores_active: gauge(RESTORES_ACTIVE, "Restores in flight."),
            restore_remaining_bytes: gauge(
                RESTORE_REMAINING_BYTES,
                "Bytes the restores in flight still fetch.",
            ),
            commit_seconds: histogram(COMMIT_SECONDS, "CommitShard latency."),
            restore_seconds: histogram(RESTORE_SECONDS, "RestoreShard latency."),
            writeback_seconds: histogram(WRITEBACK_SECONDS, "Time to write a shard to disk."),
            tier_used_bytes: gauge_vec(TIER_USED_BYTES, "Bytes used per tier.", &["tier"]),
            tier_capacity_bytes: gauge_vec(
                TIER_CAPACITY_BYTES,
                "Capacity per tier (0: unlimited).",
                &["tier"],
            ),
            rpc_errors: counter(
                RPC_ERRORS,
                "Failed RPCs by method and code.",
                &["method", "code"],
            ),
            chunk_verify_failures: counter(
                CHUNK_VERIFY_FAILURES,
                "Chunks that failed verification.",
                &["tier"],
            ),
            chunks_repaired: counter(
                CHUNKS_REPAIRED,
                "Chunks rewritten from another tier.",
                &["tier"],
            ),
            shards_evicted: counter(SHARDS_EVICTED, "Shards evicted.", &["tier", "reason"]),
            open_sessions: gauge(OPEN_SESSIONS, "Open save sessions."),
            memory_pool_bytes: gauge(MEMORY_POOL_BYTES, "Recycled memory-tier bytes."),
            writeback_pending: gauge(WRITEBACK_PENDING, "Shards waiting for disk write-back."),
            writeback_failures: counter(WRITEBACK_FAILURES, "Failed write-backs.", &["tier"]),
            dedup_skipped_bytes: counter(
                DEDUP_SKIPPED_BYTES,
                "Bytes a tier already held.",
                &["tier"],
            ),
            upload_pending: gauge(UPLOAD_PENDING, "Shards waiting for upload."),
            upload_lag_seconds: histogram(
                UPLOAD_LAG_SECONDS,
                "Commit to durable in the object store.",
            ),
            object_store_stored_bytes: reg(
                &registry,
                IntCounter::new(
                    OBJECT_STORE_STORED_BYTES,
                    "Chunk bytes sent to the object store.",
                )
                .expect("valid metric"),
            ),
            object_store_compressed_chunks: reg(
                &registry,
                IntCounter::new(OBJECT_STORE_COMPRESSED_CHUNKS, "Chunks stored compressed.")
                    .expect("valid metric"),
            ),
            object_store_retries: counter(
                OBJECT_STORE_RETRIES,
                "Object-store requests retried.",
                &["op"],
            ),
            object_store_errors: counter(
                OBJECT_STORE_ERRORS,
                "Object-store requests that failed after retries.",
                &["op"],
            ),
            ingested_shards: reg(
                &registry,
                IntCounter::new(
                    INGESTED_SHARDS,
                    "Step directories ingested from CSI volumes.",
                )
                .expect("valid metric"),
            ),
            ingest_failures: counter(
                INGEST_FAILURES,
                "Step directories that could not be ingested.",
                &["reason"],
            ),
            ingest_scans: reg(
                &registry,
                IntCounter::new(INGEST_SCANS, "Completed walks of every CSI volume.")
                    .expect("valid metric"),
            ),
            peer_sent_bytes: counter(PEER_SENT_BYTES, "Chunk bytes sent to a peer.", &["peer"]),
            peer_received_bytes: counter(
                PEER_RECEIVED_BYTES,
                "Chunk bytes received from a peer.",
                &["peer"],
            ),
            replication_lag_seconds: histogram(
                REPLICATION_LAG_SECONDS,
                "Commit to held by the wanted number of peers.",
            ),
            under_replicated_shards: gauge(
                UNDER_REPLICATED_SHARDS,
                "Local shards with fewer peer replicas than wanted.",
            ),
            replication_pending: gauge(REPLICATION_PENDING, "Shards waiting for replication."),
            replication_failures: counter(
                REPLICATION_FAILURES,
                "Replica copies to a peer that failed.",
                &["reason"],
            ),
            pipeline_failures: counter(
                PIPELINE_FAILURES,
                "Failed attempts of a background pipeline.",
                &["pipeline"],
            ),
            pipeline_needs_attention: gauge_vec(
                PIPELINE_NEEDS_ATTENTION,
                "Shards a background pipeline no longer retries quickly.",
                &["pipeline"],
            ),
            peer_members: gauge(PEER_MEMBERS, "Members of the peer tier."),
            holder_checks: counter(
                HOLDER_CHECKS,
                "Checks that a holder still has a replica whole.",
                &["result"],
            ),
            holders_dropped: counter(
                HOLDERS_DROPPED,
                "Holders that stopped counting for a shard of this node.",
                &["reason"],
            ),
            surplus_replicas_dropped: reg(
                &registry,
                IntCounter::new(
                    SURPLUS_REPLICAS_DROPPED,
                    "Surplus replica copies former holders dropped.",
                )
                .expect("valid metric"),
            ),
            scrub_bytes: counter(
                SCRUB_BYTES,
                "Chunk bytes re-hashed by scrubbing.",
                &["store"],
            ),
            scrub_bad_chunks: counter(SCRUB_BAD_CHUNKS, "Chunks scrubbing found bad.", &["store"]),
            registry,
        }
    }

    /// The text exposition format, for `/metrics`.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
