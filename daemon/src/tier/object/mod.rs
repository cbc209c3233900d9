//! T3, the object-store tier: chunks and manifests in a bucket (S3, GCS,
//! Azure Blob) or a local directory, through the `object_store` crate.
//!
//! This is the tier that survives the loss of the whole cluster, so it keeps
//! the same content-addressed layout as the disk tier under the URL's path:
//!
//! ```text
//! <prefix>/tenants/<tenant>/chunks/<chunk id>
//! <prefix>/tenants/<tenant>/manifests/<job>/<step>/<rank>.manifest
//! ```
//!
//! Chunk ids are BLAKE3 hashes of their bytes, so a chunk is uploaded once per
//! tenant however many steps name it, and overwriting one is harmless. A
//! manifest is written only after every chunk it names (the caller,
//! [`crate::tier::transfer::copy_shard`], guarantees the order), and with
//! create-only semantics: a bucket never swaps one manifest of a shard for a
//! different one. Every read re-hashes the bytes, since a bucket is the one
//! tier the daemon does not control. Object-store puts are atomic, so there is
//! no temporary-file dance as on disk; note that the local-directory backend
//! (`file://`) does not fsync, so it is durable only as far as the page cache
//! is, and is meant for demos and tests.
//!
//! Around the backend sit the parts a shared, remote, billed store needs:
//! a local index of the chunks the bucket holds ([`index::KnownChunks`]),
//! per-chunk compression where it pays ([`cairn_core::codec`]), retries with
//! backoff and a bound on how long one request may stall, multipart uploads
//! for large objects, and the step markers, retention and garbage collection
//! of [`steps`].

pub mod index;
pub mod steps;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::Bytes;
use cairn_core::codec::{self, ChunkHeader, CompressionPolicy, Encoding, HEADER_LEN};
use cairn_core::{ChunkId, CoreError, JobName, Manifest, ShardKey, TenantName};
use futures::{StreamExt, TryStreamExt, stream};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use tokio_util::sync::CancellationToken;
use url::Url;

use self::index::KnownChunks;
use super::{ChunkLocation, ChunkRead, ChunkSink, ShardSource, TierKind};
pub use crate::error::ObjectError;
use crate::error::{Error, Result};
use crate::failpoint::crash_point;
use crate::metrics::Metrics;
use crate::retry::{RetryPolicy, retry};

const TENANTS: &str = "tenants";
const CHUNKS: &str = "chunks";
const MANIFESTS: &str = "manifests";
const MANIFEST_EXT: &str = "manifest";

/// How many HEAD or GET requests one call keeps in flight: enough to hide a
/// bucket's per-request latency, few enough not to trip its rate limits.
pub const DEFAULT_REQUEST_CONCURRENCY: usize = 16;
/// First wait before retrying a failed request; doubles up to the maximum.
const RETRY_FIRST_DELAY: Duration = Duration::from_millis(200);
/// Longest wait between two attempts of one request.
const RETRY_MAX_DELAY: Duration = Duration::from_secs(10);
/// The failpoint that injects a transient error into the next bucket
/// request, for the faults a real server cannot be made to produce on cue.
pub const FAULT_FAILPOINT: &str = "object_store.request";

/// How the tier talks to its bucket. `Default` is what `cairnd` uses unless
/// configured otherwise (see `docs/configuration.md`).
#[derive(Clone, Debug)]
pub struct ObjectTierSettings {
    /// When chunks are compressed.
    pub compression: CompressionPolicy,
    /// Longest one request may take before it is abandoned and retried, so a
    /// stalled connection cannot hold an upload forever.
    pub request_timeout: Duration,
    /// Attempts per request for transient errors (throttling, timeouts,
    /// resets, 5xx) before the error reaches the caller.
    pub attempts: u32,
    /// Objects larger than this are uploaded in parts.
    pub multipart_threshold: usize,
    /// Size of each part of a multipart upload.
    pub part_size: usize,
    /// Grace period of the bucket's garbage collection; see
    /// [`cairn_core::bucket`].
    pub gc_grace: Duration,
    /// Where the local index of the bucket's chunks is kept; `None` keeps it
    /// in memory only.
    pub index_dir: Option<PathBuf>,
}

impl Default for ObjectTierSettings {
    fn default() -> Self {
        Self {
            compression: CompressionPolicy::default(),
            request_timeout: Duration::from_secs(120),
            attempts: 5,
            multipart_threshold: 32 * 1024 * 1024,
            part_size: 16 * 1024 * 1024,
            gc_grace: Duration::from_secs(6 * 3600),
            index_dir: None,
        }
    }
}

/// The object-store tier: an `object_store` backend and the key prefix the
/// URL named, so that several clusters or environments can share a bucket.
pub struct ObjectTier {
    store: Arc<dyn ObjectStore>,
    prefix: Path,
    url: String,
    settings: ObjectTierSettings,
    metrics: Arc<Metrics>,
    index: KnownChunks,
    /// Fires at shutdown: requests in flight and their retries stop.
    cancel: CancellationToken,
}

impl std::fmt::Debug for ObjectTier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectTier")
            .field("url", &self.url)
            .finish()
    }
}

/// The environment variables the cloud SDKs read for credentials and
/// endpoints, as `object_store` configuration keys: `parse_url_opts` starts
/// from empty builders, so the standard chains (`AWS_*`, `GOOGLE_*`,
/// `AZURE_*`) are passed on explicitly, and keys in the configuration file
/// override them.
fn environment_options() -> Vec<(String, String)> {
    std::env::vars()
        .filter(|(k, _)| {
            ["AWS_", "GOOGLE_", "AZURE_"]
                .iter()
                .any(|p| k.starts_with(p))
        })
        .map(|(k, v)| (k.to_ascii_lowercase(), v))
        .collect()
}

/// Seconds since the Unix epoch, by this node's clock.
fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Whether an error may go away if the request is sent again.
/// `object_store`'s own retries, set explicitly rather than left at its
/// default (10 retries within 180 s, under each of Cairn's attempts, so one
/// failing request could retry for many minutes). It keeps a couple of quick
/// retries for a request that failed on the way (a reset connection, a 5xx,
/// a throttling answer), which are cheap where they happen, and the whole of
/// them lives inside one of Cairn's attempts, whose `request_timeout` bounds
/// it. So a request takes at most `attempts` × `request_timeout` plus the
/// waits between attempts (under 10 s each), and at most `attempts` × 3 HTTP
/// requests: the layers add up, they do not multiply.
fn backend_retry(settings: &ObjectTierSettings) -> object_store::RetryConfig {
    object_store::RetryConfig {
        backoff: object_store::BackoffConfig {
            init_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
            base: 2.0,
        },
        max_retries: BACKEND_RETRIES,
        retry_timeout: settings.request_timeout,
    }
}

/// Retries `object_store` makes itself within one of Cairn's attempts.
pub const BACKEND_RETRIES: usize = 2;

/// The backend `url` names, configured by `options` (keys a backend does
/// not know are ignored, as `object_store::parse_url_opts` does) and
/// retrying as `retry` says.
fn open_backend(
    url: &Url,
    options: Vec<(String, String)>,
    retry: object_store::RetryConfig,
) -> object_store::Result<(Box<dyn ObjectStore>, Path)> {
    use object_store::ObjectStoreScheme as Scheme;
    use object_store::aws::AmazonS3Builder;
    use object_store::azure::MicrosoftAzureBuilder;
    use object_store::gcp::GoogleCloudStorageBuilder;

    /// Applies every option the builder knows.
    fn configured<B, K: std::str::FromStr>(
        builder: B,
        options: Vec<(String, String)>,
        with: fn(B, K, String) -> B,
    ) -> B {
        options.into_iter().fold(builder, |b, (key, value)| {
            match key.to_ascii_lowercase().parse() {
                Ok(key) => with(b, key, value),
                Err(_) => b,
            }
        })
    }

    let (scheme, path) = Scheme::parse(url)?;
    let path = Path::parse(path)?;
    let store: Box<dyn ObjectStore> = match scheme {
        Scheme::Local => Box::new(object_store::local::LocalFileSystem::new()),
        Scheme::Memory => Box::new(object_store::memory::InMemory::new()),
        Scheme::AmazonS3 => Box::new(
            configured(
                AmazonS3Builder::new().with_url(url.as_str()),
                options,
                AmazonS3Builder::with_config,
            )
            .with_retry(retry)
            .build()?,
        ),
        Scheme::GoogleCloudStorage => Box::new(
            configured(
                GoogleCloudStorageBuilder::new().with_url(url.as_str()),
                options,
                GoogleCloudStorageBuilder::with_config,
            )
            .with_retry(retry)
            .build()?,
        ),
        Scheme::MicrosoftAzure => Box::new(
            configured(
                MicrosoftAzureBuilder::new().with_url(url.as_str()),
                options,
                MicrosoftAzureBuilder::with_config,
            )
            .with_retry(retry)
            .build()?,
        ),
        other => {
            return Err(generic_error(format!(
                "{other:?} URLs are not supported (s3://, gs://, az:// or file://)"
            )));
        }
    };
    Ok((store, path))
}

fn generic_error(why: String) -> object_store::Error {
    object_store::Error::Generic {
        store: "cairn",
        source: why.into(),
    }
}

impl ObjectTier {
    /// Opens the tier at `url` (`file:///abs/dir`, `s3://bucket/prefix`,
    /// `gs://bucket/prefix`, `az://container/prefix`). `options` are passed to
    /// the backend's builder as its configuration keys (`endpoint`,
    /// `allow_http`, `access_key_id`, `aws_server_side_encryption`, ...), on
    /// top of the standard credential variables of the environment; keys a
    /// backend does not know are ignored, and credentials given nowhere come
    /// from the backend's usual chain (instance metadata, workload identity).
    /// A `file://` directory is created if missing, so a fresh node can start
    /// with an empty local "bucket". Nothing is sent to the bucket here, so a
    /// bucket that is down does not keep the daemon from starting. Fails with
    /// `InvalidArgument` naming the URL when it cannot be parsed or its
    /// backend configured.
    pub fn open<I, K, V>(
        url: &str,
        options: I,
        settings: ObjectTierSettings,
        metrics: Arc<Metrics>,
    ) -> Result<Self>
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<str>,
        V: Into<String>,
    {
        let invalid = |why: String| {
            Error::InvalidArgument(format!("object store URL {url:?} is not usable: {why}"))
        };
        let parsed = Url::parse(url).map_err(|e| invalid(e.to_string()))?;
        if parsed.scheme() == "file" {
            let dir = parsed
                .to_file_path()
                .map_err(|()| invalid("a file URL must be an absolute local path".into()))?;
            std::fs::create_dir_all(&dir)
                .map_err(|e| invalid(format!("cannot create directory {}: {e}", dir.display())))?;
        }
        let mut all_options = environment_options();
        all_options.extend(
            options
                .into_iter()
                .map(|(k, v)| (k.as_ref().to_owned(), v.into())),
        );
        // Two servers behind the same URL (say, another S3 endpoint) are
        // different buckets to the local chunk index.
        let mut identity = url.to_owned();
        for (key, value) in &all_options {
            if key.contains("endpoint") || key.contains("url") {
                identity.push_str(&format!(" {key}={value}"));
            }
        }
        let (store, prefix) = open_backend(&parsed, all_options, backend_retry(&settings))
            .map_err(|e| invalid(e.to_string()))?;
        Self::build(
            Arc::from(store),
            prefix,
            url.to_owned(),
            &identity,
            settings,
            metrics,
        )
    }

    /// Wraps an already-built store, for callers that add their own layers
    /// around the backend.
    pub fn from_store(
        store: Arc<dyn ObjectStore>,
        prefix: Path,
        url: impl Into<String>,
        settings: ObjectTierSettings,
        metrics: Arc<Metrics>,
    ) -> Result<Self> {
        let url = url.into();
        let identity = url.clone();
        Self::build(store, prefix, url, &identity, settings, metrics)
    }

    /// `identity` keys the local chunk index: the URL and anything else
    /// that decides which bucket it names.
    fn build(
        store: Arc<dyn ObjectStore>,
        prefix: Path,
        url: String,
        identity: &str,
        settings: ObjectTierSettings,
        metrics: Arc<Metrics>,
    ) -> Result<Self> {
        let index = match &settings.index_dir {
            Some(dir) => KnownChunks::open(dir, identity)?,
            None => KnownChunks::in_memory(),
        };
        Ok(Self {
            store,
            prefix,
            url,
            settings,
            metrics,
            index,
            cancel: CancellationToken::new(),
        })
    }

    /// The same tier, abandoning its requests (and their retries) with
    /// [`ObjectError::Cancelled`] once `cancel` fires.
    pub fn with_cancel(self, cancel: CancellationToken) -> Self {
        Self { cancel, ..self }
    }

    /// The URL the tier was opened with, for logs and status.
    pub fn url(&self) -> &str {
        &self.url
    }

    fn tenant_path(&self, tenant: &TenantName) -> Path {
        self.prefix.clone().join(TENANTS).join(tenant.as_str())
    }

    /// The object key of a chunk of `tenant`.
    pub fn chunk_path(&self, tenant: &TenantName, id: &ChunkId) -> Path {
        self.tenant_path(tenant).join(CHUNKS).join(id.to_hex())
    }

    /// The object key of a shard's manifest.
    pub fn manifest_path(&self, key: &ShardKey) -> Path {
        self.tenant_path(&key.tenant)
            .join(MANIFESTS)
            .join(key.job.as_str())
            .join(key.step.0.to_string())
            .join(format!("{}.{MANIFEST_EXT}", key.rank.0))
    }

    /// The settings the tier runs with.
    pub fn settings(&self) -> &ObjectTierSettings {
        &self.settings
    }

    /// Runs one bucket request, retrying transient failures with backoff and
    /// abandoning any attempt that takes longer than the request timeout.
    /// `op` names the request in metrics and logs.
    async fn retrying<T, F, Fut>(
        &self,
        op: &'static str,
        key: &Path,
        request: F,
    ) -> Result<T, ObjectError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = object_store::Result<T>>,
    {
        self.retrying_within(op, key, self.settings.request_timeout, request)
            .await
    }

    /// [`Self::retrying`] with the bound on one attempt given explicitly.
    async fn retrying_within<T, F, Fut>(
        &self,
        op: &'static str,
        key: &Path,
        attempt_timeout: Duration,
        mut request: F,
    ) -> Result<T, ObjectError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = object_store::Result<T>>,
    {
        let try_once = || {
            let request = match fail::eval(FAULT_FAILPOINT, |_| {
                generic_error(format!("fault injected by failpoint {FAULT_FAILPOINT}"))
            }) {
                Some(fault) => Err(fault),
                None => Ok(request()),
            };
            async move {
                match tokio::time::timeout(attempt_timeout, request?).await {
                    Ok(answer) => Ok(answer?),
                    Err(_) => Err(ObjectError::Timeout(attempt_timeout)),
                }
            }
        };
        let mut attempt: u32 = 1;
        let policy = self.request_retry();
        let retrying = retry(
            &policy,
            try_once,
            |e: &ObjectError| !e.is_permanent(),
            |e, wait| {
                self.metrics
                    .object_store_retries
                    .with_label_values(&[op])
                    .inc();
                tracing::warn!(%key, op, attempt, error = %e, retry_in_ms = wait.as_millis(), "object-store request failed, retrying");
                attempt = attempt.saturating_add(1);
            },
        );
        let result = tokio::select! {
            () = self.cancel.cancelled() => Err(ObjectError::Cancelled),
            result = retrying => result,
        };
        // Absent objects and lost create-only races are answers the callers
        // expect, not failures; nor is a shutdown.
        if let Err(e) = &result
            && !matches!(
                e,
                ObjectError::Cancelled
                    | ObjectError::Store(
                        object_store::Error::NotFound { .. }
                            | object_store::Error::AlreadyExists { .. }
                            | object_store::Error::Precondition { .. }
                    )
            )
        {
            self.metrics
                .object_store_errors
                .with_label_values(&[op])
                .inc();
        }
        result
    }

    /// How one request is retried: [`RETRY_FIRST_DELAY`] doubling to
    /// [`RETRY_MAX_DELAY`], `attempts` tries in all.
    fn request_retry(&self) -> RetryPolicy {
        RetryPolicy::new(RETRY_FIRST_DELAY, RETRY_MAX_DELAY).tries(self.settings.attempts)
    }

    /// The bytes at `path`, or `None` when there is no such object.
    async fn get_bytes(&self, path: &Path, what: &str) -> Result<Option<Bytes>> {
        let store = &self.store;
        let result = self
            .retrying("get", path, || async move {
                store.get(path).await?.bytes().await
            })
            .await;
        match result {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.is_not_found() => Ok(None),
            Err(source) => Err(store_error(format!("reading {what} {path}"), source)),
        }
    }

    /// Deletes `path`; a missing object is not an error.
    async fn delete(&self, path: &Path) -> Result<()> {
        let store = &self.store;
        match self.retrying("delete", path, || store.delete(path)).await {
            Ok(()) => Ok(()),
            Err(e) if e.is_not_found() => Ok(()),
            Err(source) => Err(store_error(format!("deleting {path}"), source)),
        }
    }

    /// Uploads one object, in parts when it is larger than the multipart
    /// threshold. A multipart upload that fails is aborted, so the bucket
    /// keeps no orphaned parts of it.
    async fn put_object(&self, path: &Path, parts: Vec<Bytes>, len: usize) -> Result<()> {
        let store = &self.store;
        let result = if len <= self.settings.multipart_threshold {
            let payload = PutPayload::from_iter(parts);
            self.retrying("put", path, || store.put(path, payload.clone()))
                .await
                .map(drop)
        } else {
            let whole: Bytes = parts.concat().into();
            // put_in_parts bounds each attempt itself (one request timeout
            // per part) so that it can abort the upload when it stalls; this
            // outer bound only catches an abort that hangs too.
            // The parts, then the aborts of a failed attempt (one request
            // each, `attempts` of them at most), then slack.
            let parts = whole.len().div_ceil(self.settings.part_size.max(1)) as u32;
            // Saturating: `request_timeout` and `attempts` come from the config.
            let requests = parts
                .saturating_add(self.settings.attempts.max(1))
                .saturating_add(2);
            let outer = self.settings.request_timeout.saturating_mul(requests);
            self.retrying_within("put_multipart", path, outer, || {
                self.put_in_parts(path, whole.clone())
            })
            .await
        };
        result.map_err(|source| store_error(format!("uploading {path}"), source))
    }

    /// One attempt at a multipart upload, aborted on any failure.
    async fn put_in_parts(&self, path: &Path, whole: Bytes) -> object_store::Result<()> {
        let mut upload = self.store.put_multipart(path).await?;
        let part_size = self.settings.part_size.max(1);
        let parts = whole.len().div_ceil(part_size).max(1) as u32;
        // Each part gets the stall bound of one request.
        let deadline = self.settings.request_timeout.saturating_mul(parts);
        let outcome = {
            let sending = async {
                for start in (0..whole.len()).step_by(part_size) {
                    let end = start.saturating_add(part_size).min(whole.len());
                    upload
                        .put_part(PutPayload::from(whole.slice(start..end)))
                        .await?;
                }
                upload.complete().await
            };
            tokio::time::timeout(deadline, sending).await
        };
        match outcome {
            Ok(Ok(_)) => Ok(()),
            outcome => {
                self.abort_upload(path, upload.as_mut()).await;
                match outcome {
                    Ok(Err(e)) => Err(e),
                    _ => Err(generic_error("multipart upload timed out".into())),
                }
            }
        }
    }

    /// Aborts a failed multipart upload, retried like any request (the
    /// bucket that failed the upload may well fail its abort once too), so
    /// no orphaned parts stay behind. One that still fails is logged.
    async fn abort_upload(&self, path: &Path, upload: &mut dyn object_store::MultipartUpload) {
        let mut waits = self.request_retry().delays();
        for attempt in 1_u32.. {
            let error =
                match tokio::time::timeout(self.settings.request_timeout, upload.abort()).await {
                    Ok(Ok(())) | Ok(Err(object_store::Error::NotFound { .. })) => return,
                    Ok(Err(e)) => e.to_string(),
                    Err(_) => "timed out".to_owned(),
                };
            let Some(wait) = waits.next() else {
                tracing::warn!(key = %path, attempts = attempt, error, "aborting a failed multipart upload failed; a bucket lifecycle rule will remove its parts");
                return;
            };
            tracing::debug!(key = %path, attempt, error, "aborting a failed multipart upload failed; retrying");
            tokio::time::sleep(wait).await;
        }
    }

    /// Reads and decodes the manifest at `path`. A missing object is `None`;
    /// so is a corrupt one, or one that names another shard (logged), since
    /// a shard whose manifest cannot be trusted is not complete here.
    async fn read_manifest(
        &self,
        path: &Path,
        expected: Option<&ShardKey>,
    ) -> Result<Option<Manifest>> {
        let Some(bytes) = self.get_bytes(path, "manifest").await? else {
            return Ok(None);
        };
        match decode_off_thread(bytes).await? {
            Ok(manifest) => {
                let names_this_key = match expected {
                    Some(key) => manifest.shard == *key,
                    None => self.manifest_path(&manifest.shard) == *path,
                };
                if names_this_key {
                    Ok(Some(manifest))
                } else {
                    tracing::warn!(key = %path, shard = %manifest.shard, "ignoring object-store manifest that names another shard");
                    Ok(None)
                }
            }
            Err(e) => {
                tracing::warn!(key = %path, error = %e, "ignoring corrupt object-store manifest");
                Ok(None)
            }
        }
    }

    /// Writes `bytes` at `path` unless something is there already: the
    /// same content (byte-equal, or `same` says so) is success, anything else
    /// `AlreadyExists`. Manifests and step markers are written this way, so a
    /// bucket never swaps one for a different one.
    async fn put_create_only(
        &self,
        path: &Path,
        bytes: Bytes,
        same: impl Fn(&[u8]) -> Result<bool>,
    ) -> Result<()> {
        let matches_existing = |existing: Option<Bytes>| -> Result<Option<bool>> {
            match existing {
                None => Ok(None),
                Some(e) if e == bytes => Ok(Some(true)),
                Some(e) => Ok(Some(same(&e)?)),
            }
        };
        let differs = || Error::AlreadyExists(format!("{path} already holds different content"));
        // Look first: some S3-compatible and emulated servers accept a
        // conditional put without enforcing it, and would silently replace
        // the object. The conditional put below still closes the race with a
        // concurrent writer on stores that do enforce it.
        match matches_existing(self.get_bytes(path, "object").await?)? {
            Some(true) => return Ok(()),
            Some(false) => return Err(differs()),
            None => {}
        }
        let store = &self.store;
        let put = self
            .retrying("put", path, || {
                store.put_opts(
                    path,
                    PutPayload::from(bytes.clone()),
                    PutOptions::from(PutMode::Create),
                )
            })
            .await;
        match put {
            Ok(_) => Ok(()),
            // Someone wrote it between our look and our put (or a retried
            // put of ours had already landed).
            Err(ObjectError::Store(
                object_store::Error::AlreadyExists { .. }
                | object_store::Error::Precondition { .. },
            )) => match matches_existing(self.get_bytes(path, "object").await?)? {
                Some(true) => Ok(()),
                Some(false) => Err(differs()),
                None => Err(Error::Aborted(format!(
                    "{path} was reported to exist but cannot be read back; retry"
                ))),
            },
            // A store without conditional puts: we already checked that
            // nothing is there, so a plain put is as close to create-only as
            // it offers (a concurrent writer of different content could
            // still win the race).
            Err(ObjectError::Store(object_store::Error::NotImplemented { .. })) => {
                tracing::debug!(key = %path, "store has no create-only put; using a plain put after the existence check");
                self.retrying("put", path, || {
                    store.put(path, PutPayload::from(bytes.clone()))
                })
                .await
                .map_err(|source| store_error(format!("uploading {path}"), source))?;
                Ok(())
            }
            Err(source) => Err(store_error(format!("uploading {path}"), source)),
        }
    }
}

/// Wraps a store error with a verb-phrase context naming the key.
fn store_error(context: String, source: impl Into<ObjectError>) -> Error {
    Error::ObjectStore {
        context,
        source: source.into(),
    }
}

impl ObjectTier {
    /// Lists everything under `prefix`, failing when no entry (no page of
    /// the listing) arrives for `request_timeout`: `object_store` retries a
    /// bucket that never answers for minutes on its own, and a listing
    /// (`cairn list`, `ListSteps`, "latest") must not wait that long before
    /// it goes on without the bucket.
    pub(crate) async fn list_bounded(
        &self,
        prefix: &Path,
    ) -> Result<Vec<object_store::ObjectMeta>> {
        let stall = self.settings.request_timeout;
        let listing = tokio_stream::StreamExt::timeout(self.store.list(Some(prefix)), stall);
        tokio::pin!(listing);
        let mut out = Vec::new();
        while let Some(item) = futures::StreamExt::next(&mut listing).await {
            match item {
                Ok(Ok(meta)) => out.push(meta),
                Ok(Err(source)) => return Err(store_error(format!("listing {prefix}"), source)),
                Err(_) => {
                    return Err(store_error(
                        format!("listing {prefix}"),
                        generic_error(format!(
                            "the bucket sent nothing for {} s (request_timeout_secs)",
                            stall.as_secs_f64()
                        )),
                    ));
                }
            }
        }
        Ok(out)
    }

    /// `list_with_delimiter` under `prefix`, bounded like [`Self::list_bounded`].
    pub(crate) async fn list_dirs_bounded(
        &self,
        prefix: &Path,
    ) -> Result<object_store::ListResult> {
        let stall = self.settings.request_timeout;
        match tokio::time::timeout(stall, self.store.list_with_delimiter(Some(prefix))).await {
            Ok(listed) => listed.map_err(|source| store_error(format!("listing {prefix}"), source)),
            Err(_) => Err(store_error(
                format!("listing {prefix}"),
                generic_error(format!(
                    "the bucket did not answer within {} s (request_timeout_secs)",
                    stall.as_secs_f64()
                )),
            )),
        }
    }
}

/// Decodes a manifest on the blocking pool: the header hash and JSON parse of
/// a large shard's manifest take longer than the async threads may block.
async fn decode_off_thread(bytes: Bytes) -> Result<std::result::Result<Manifest, CoreError>> {
    Ok(tokio::task::spawn_blocking(move || Manifest::decode(&bytes)).await?)
}

#[async_trait]
impl ShardSource for ObjectTier {
    fn kind(&self) -> TierKind {
        TierKind::ObjectStore
    }

    #[tracing::instrument(skip_all, fields(shard = %key))]
    async fn manifest(&self, key: &ShardKey) -> Result<Option<Arc<Manifest>>> {
        let path = self.manifest_path(key);
        Ok(self.read_manifest(&path, Some(key)).await?.map(Arc::new))
    }

    #[tracing::instrument(skip_all, fields(tenant = %tenant, job = job.map(|j| j.as_str())))]
    async fn list(&self, tenant: &TenantName, job: Option<&JobName>) -> Result<Vec<Arc<Manifest>>> {
        let mut prefix = self.tenant_path(tenant).join(MANIFESTS);
        if let Some(job) = job {
            prefix = prefix.join(job.as_str());
        }
        let paths: Vec<Path> = self
            .list_bounded(&prefix)
            .await?
            .into_iter()
            .filter(|meta| meta.location.extension() == Some(MANIFEST_EXT))
            .map(|meta| meta.location)
            .collect();
        let mut manifests: Vec<Arc<Manifest>> = stream::iter(paths)
            .map(|path| async move { self.read_manifest(&path, None).await })
            .buffer_unordered(DEFAULT_REQUEST_CONCURRENCY)
            .try_filter_map(|manifest| async move { Ok(manifest.map(Arc::new)) })
            .try_collect()
            .await?;
        manifests.sort_by(|a, b| a.shard.cmp(&b.shard));
        Ok(manifests)
    }

    #[tracing::instrument(skip_all, fields(shard = %location.shard(), chunk = %location.chunk.id))]
    async fn read_chunk(&self, location: &ChunkLocation) -> Result<ChunkRead> {
        let chunk = location.chunk;
        let path = self.chunk_path(&location.shard().tenant, &chunk.id);
        let Some(stored) = self.get_bytes(&path, "chunk").await? else {
            return Ok(ChunkRead::Missing);
        };
        let decoded = tokio::task::spawn_blocking(move || decode_chunk(&stored, chunk.len)).await?;
        match decoded {
            Ok(raw) if ChunkId::of(&raw) == chunk.id => Ok(ChunkRead::Verified(raw)),
            Ok(_) => {
                tracing::warn!(key = %path, "object-store chunk does not match its hash");
                Ok(ChunkRead::Corrupt)
            }
            Err(e) => {
                tracing::warn!(key = %path, error = %e, "object-store chunk cannot be decoded");
                Ok(ChunkRead::Corrupt)
            }
        }
    }
}

/// Decodes a stored chunk (header, then the raw or compressed body) into its
/// raw bytes, which must be `expected_len` long. Raw bodies are not copied.
fn decode_chunk(stored: &Bytes, expected_len: u64) -> std::result::Result<Bytes, CoreError> {
    let header = ChunkHeader::parse(stored)?;
    if header.raw_len != expected_len {
        return Err(CoreError::CorruptChunk(format!(
            "header says {} bytes, the manifest {expected_len}",
            header.raw_len
        )));
    }
    let body = stored.slice(HEADER_LEN..);
    match header.encoding {
        Encoding::Raw => Ok(body),
        Encoding::Zstd { .. } => Ok(codec::decompress(&header, &body)?.into()),
    }
}

/// Encodes a chunk for the bucket: its header and body, compressed when the
/// policy says it pays (a dtype in the file's metadata picks the shuffle).
fn encode_chunk(
    raw: Bytes,
    dtype: Option<&str>,
    policy: &CompressionPolicy,
) -> (ChunkHeader, Bytes) {
    let raw_len = raw.len() as u64;
    let width = dtype.and_then(codec::shuffle_width_for_dtype);
    match codec::compress(&raw, width, policy) {
        Some((encoding, body)) => (ChunkHeader { encoding, raw_len }, body.into()),
        None => (
            ChunkHeader {
                encoding: Encoding::Raw,
                raw_len,
            },
            raw,
        ),
    }
}

#[async_trait]
impl ChunkSink for ObjectTier {
    fn kind(&self) -> TierKind {
        TierKind::ObjectStore
    }

    /// Answers from the local index for chunks written recently enough to be
    /// reused (see [`cairn_core::bucket`]), and with a bounded number of
    /// HEAD requests for the rest. A chunk that is in the bucket but too old
    /// to reuse safely counts as missing: uploading it again refreshes it.
    #[tracing::instrument(skip_all, fields(tenant = %tenant, chunks = ids.len()))]
    async fn missing_chunks(&self, tenant: &TenantName, ids: &[ChunkId]) -> Result<Vec<ChunkId>> {
        let grace = self.settings.gc_grace;
        let fresh = |written: u64, now: u64| {
            cairn_core::bucket::reusable(Duration::from_secs(now.saturating_sub(written)), grace)
        };
        stream::iter(ids.iter().copied())
            .map(|id| async move {
                let now = unix_now();
                if self
                    .index
                    .written_at(tenant, &id)
                    .is_some_and(|t| fresh(t, now))
                {
                    return Ok(None);
                }
                let path = self.chunk_path(tenant, &id);
                let store = &self.store;
                match self.retrying("head", &path, || store.head(&path)).await {
                    Ok(meta) => {
                        let written = u64::try_from(meta.last_modified.timestamp()).unwrap_or(0);
                        if fresh(written, now) {
                            self.index.record(tenant, id, written);
                            Ok(None)
                        } else {
                            Ok(Some(id))
                        }
                    }
                    Err(e) if e.is_not_found() => Ok(Some(id)),
                    Err(source) => Err(store_error(format!("checking for chunk {path}"), source)),
                }
            })
            .buffer_unordered(DEFAULT_REQUEST_CONCURRENCY)
            .try_filter_map(|missing| async move { Ok(missing) })
            .try_collect()
            .await
    }

    /// Compresses the chunk where it pays and uploads it. Overwriting a
    /// chunk (a retried or concurrent upload) writes the same content.
    #[tracing::instrument(skip_all, fields(chunk = %location.chunk.id, bytes = data.len()))]
    async fn put_chunk(&self, location: &ChunkLocation, data: Bytes) -> Result<()> {
        let tenant = &location.shard().tenant;
        let id = location.chunk.id;
        let path = self.chunk_path(tenant, &id);
        let dtype = location.manifest.files[location.file_index]
            .metadata
            .get("dtype")
            .cloned();
        let policy = self.settings.compression;
        let raw_len = data.len();
        let (header, body) =
            tokio::task::spawn_blocking(move || encode_chunk(data, dtype.as_deref(), &policy))
                .await?;
        let stored_len = body.len().saturating_add(HEADER_LEN);
        let header_bytes = Bytes::copy_from_slice(&header.to_bytes());
        self.put_object(&path, vec![header_bytes, body], stored_len)
            .await?;
        self.index.record(tenant, id, unix_now());
        crash_point("upload.after_chunk");
        self.metrics
            .object_store_stored_bytes
            .inc_by(stored_len as u64);
        if header.encoding != Encoding::Raw {
            self.metrics.object_store_compressed_chunks.inc();
            tracing::trace!(raw_len, stored_len, "chunk compressed");
        }
        Ok(())
    }

    /// Create-only: the same manifest again is fine, a different one for the
    /// same shard is `AlreadyExists`, except a manifest that supersedes the
    /// stored one (a new save of a step that never became complete; see
    /// `Manifest::supersedes`), which replaces it.
    #[tracing::instrument(skip_all, fields(shard = %manifest.shard))]
    async fn put_manifest(&self, manifest: &Manifest) -> Result<()> {
        let path = self.manifest_path(&manifest.shard);
        let encoded = Bytes::from(manifest.encode());
        if let Some(stored) = self.read_manifest(&path, Some(&manifest.shard)).await?
            && manifest.supersedes(&stored)
        {
            tracing::info!(abandoned = ?stored.attempt, attempt = ?manifest.attempt, "replacing the bucket's manifest of an abandoned save");
            let store = &self.store;
            return self
                .retrying("put", &path, || {
                    store.put(&path, PutPayload::from(encoded.clone()))
                })
                .await
                .map(|_| ())
                .map_err(|source| store_error(format!("uploading {path}"), source));
        }
        self.put_create_only(&path, encoded, |existing| {
            Ok(match Manifest::decode(existing) {
                Ok(stored) => stored.hash() == manifest.hash(),
                Err(_) => false,
            })
        })
        .await
        .map_err(|e| match e {
            Error::AlreadyExists(_) => Error::AlreadyExists(format!(
                "object-store tier already holds a different manifest for shard {} at {path}",
                manifest.shard
            )),
            other => other,
        })
    }
}
