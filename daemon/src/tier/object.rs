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
//! [`crate::transfer::copy_shard`], guarantees the order), and with
//! create-only semantics: a bucket never swaps one manifest of a shard for a
//! different one. Every read re-hashes the bytes, since a bucket is the one
//! tier the daemon does not control. Object-store puts are atomic, so there is
//! no temporary-file dance as on disk; note that the local-directory backend
//! (`file://`) does not fsync, so it is durable only as far as the page cache
//! is, and is meant for demos and tests.
//!
//! Retries, timeouts and metrics for the cloud backends come from
//! `object_store`'s own client options for now (passed as key-value pairs);
//! the upload pipeline (journal, compression, retention) builds on this type.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use cairn_core::{ChunkId, CoreError, JobName, Manifest, ShardKey, TenantName};
use futures::{StreamExt, TryStreamExt, stream};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use url::Url;

use super::{ChunkLocation, ChunkRead, ChunkSink, ShardSource, TierKind};
use crate::error::{Error, Result};

const TENANTS: &str = "tenants";
const CHUNKS: &str = "chunks";
const MANIFESTS: &str = "manifests";
const MANIFEST_EXT: &str = "manifest";

/// How many HEAD or GET requests one call keeps in flight: enough to hide a
/// bucket's per-request latency, few enough not to trip its rate limits.
pub const DEFAULT_REQUEST_CONCURRENCY: usize = 16;

/// The object-store tier: an `object_store` backend and the key prefix the
/// URL named, so that several clusters or environments can share a bucket.
pub struct ObjectTier {
    store: Arc<dyn ObjectStore>,
    prefix: Path,
    url: String,
}

impl std::fmt::Debug for ObjectTier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectTier")
            .field("url", &self.url)
            .finish()
    }
}

impl ObjectTier {
    /// Opens the tier at `url` (`file:///abs/dir`, `s3://bucket/prefix`,
    /// `gs://bucket/prefix`, `az://container/prefix`). `options` are passed to
    /// the backend's builder as its configuration keys (`endpoint`,
    /// `allow_http`, `access_key_id`, ...); keys a backend does not know are
    /// ignored, and credentials not given here come from the backend's usual
    /// chain (environment, instance metadata, workload identity). A
    /// `file://` directory is created if missing, so a fresh node can start
    /// with an empty local "bucket". Fails with `InvalidArgument` naming the
    /// URL when it cannot be parsed or its backend configured.
    pub fn open<I, K, V>(url: &str, options: I) -> Result<Self>
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
        let (store, prefix) =
            object_store::parse_url_opts(&parsed, options).map_err(|e| invalid(e.to_string()))?;
        Ok(Self {
            store: Arc::from(store),
            prefix,
            url: url.to_owned(),
        })
    }

    /// Wraps an already-built store, for callers that add their own layers
    /// (retry, fault injection, metrics) around the backend.
    pub fn from_store(store: Arc<dyn ObjectStore>, prefix: Path, url: impl Into<String>) -> Self {
        Self {
            store,
            prefix,
            url: url.into(),
        }
    }

    /// The URL the tier was opened with, for logs and status.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The underlying store, for tests and tools that inspect the bucket.
    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
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

    /// The bytes at `path`, or `None` when there is no such object.
    async fn get_bytes(&self, path: &Path, what: &str) -> Result<Option<Bytes>> {
        let result = match self.store.get(path).await {
            Ok(result) => result,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(source) => return Err(store_error(format!("reading {what} {path}"), source)),
        };
        match result.bytes().await {
            Ok(bytes) => Ok(Some(bytes)),
            // Deleted between the response headers and the body.
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(source) => Err(store_error(format!("reading {what} {path}"), source)),
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

    /// Compares the manifest already stored at `path` with the one being
    /// put: the same shard twice is fine (a retried copy), a different one
    /// is `AlreadyExists`. True when the same manifest is already stored,
    /// false when nothing is stored there.
    async fn check_existing_manifest(
        &self,
        path: &Path,
        manifest: &Manifest,
        encoded: &[u8],
    ) -> Result<bool> {
        let Some(existing) = self.get_bytes(path, "manifest").await? else {
            return Ok(false);
        };
        if existing.as_ref() == encoded {
            return Ok(true);
        }
        let same = match decode_off_thread(existing).await? {
            Ok(stored) => stored.hash() == manifest.hash(),
            Err(_) => false,
        };
        if same {
            Ok(true)
        } else {
            Err(Error::AlreadyExists(format!(
                "object-store tier already holds a different manifest for shard {} at {path}",
                manifest.shard
            )))
        }
    }
}

/// Wraps a store error with a verb-phrase context naming the key.
fn store_error(context: String, source: object_store::Error) -> Error {
    Error::ObjectStore { context, source }
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
            .store
            .list(Some(&prefix))
            .map_err(|source| store_error(format!("listing manifests under {prefix}"), source))
            .try_filter_map(|meta| async move {
                Ok((meta.location.extension() == Some(MANIFEST_EXT)).then_some(meta.location))
            })
            .try_collect()
            .await?;
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
        let Some(bytes) = self.get_bytes(&path, "chunk").await? else {
            return Ok(ChunkRead::Missing);
        };
        if bytes.len() as u64 != chunk.len {
            tracing::warn!(key = %path, expected = chunk.len, actual = bytes.len(), "object-store chunk has the wrong length");
            return Ok(ChunkRead::Corrupt);
        }
        let verified = tokio::task::spawn_blocking(move || {
            if ChunkId::of(&bytes) == chunk.id {
                ChunkRead::Verified(bytes)
            } else {
                ChunkRead::Corrupt
            }
        })
        .await?;
        Ok(verified)
    }
}

#[async_trait]
impl ChunkSink for ObjectTier {
    fn kind(&self) -> TierKind {
        TierKind::ObjectStore
    }

    /// One HEAD per chunk, a bounded number at once. (A local index of what
    /// the bucket holds, checked against it only on a miss, comes with the
    /// upload pipeline.)
    #[tracing::instrument(skip_all, fields(tenant = %tenant, chunks = ids.len()))]
    async fn missing_chunks(&self, tenant: &TenantName, ids: &[ChunkId]) -> Result<Vec<ChunkId>> {
        stream::iter(ids.iter().copied())
            .map(|id| async move {
                let path = self.chunk_path(tenant, &id);
                match self.store.head(&path).await {
                    Ok(_) => Ok(None),
                    Err(object_store::Error::NotFound { .. }) => Ok(Some(id)),
                    Err(source) => Err(store_error(format!("checking for chunk {path}"), source)),
                }
            })
            .buffer_unordered(DEFAULT_REQUEST_CONCURRENCY)
            .try_filter_map(|missing| async move { Ok(missing) })
            .try_collect()
            .await
    }

    /// A plain put: the key is the content's hash, so overwriting a chunk
    /// (a retried or concurrent upload) writes the same bytes.
    #[tracing::instrument(skip_all, fields(tenant = %tenant, chunk = %id, bytes = data.len()))]
    async fn put_chunk(&self, tenant: &TenantName, id: ChunkId, data: Bytes) -> Result<()> {
        let path = self.chunk_path(tenant, &id);
        self.store
            .put(&path, PutPayload::from(data))
            .await
            .map_err(|source| store_error(format!("uploading chunk {path}"), source))?;
        Ok(())
    }

    /// Create-only: the same manifest again is fine, a different one for the
    /// same shard is `AlreadyExists`.
    #[tracing::instrument(skip_all, fields(shard = %manifest.shard))]
    async fn put_manifest(&self, manifest: &Manifest) -> Result<()> {
        let path = self.manifest_path(&manifest.shard);
        let encoded = Bytes::from(manifest.encode());
        // Look first: some S3-compatible and emulated servers accept a
        // conditional put without enforcing it, and would silently replace a
        // different manifest. The conditional put below still closes the
        // race with a concurrent writer on stores that do enforce it.
        if self
            .check_existing_manifest(&path, manifest, &encoded)
            .await?
        {
            return Ok(());
        }
        let put = self
            .store
            .put_opts(
                &path,
                PutPayload::from(encoded.clone()),
                PutOptions::from(PutMode::Create),
            )
            .await;
        match put {
            Ok(_) => Ok(()),
            // Someone wrote it between our look and our put.
            Err(
                object_store::Error::AlreadyExists { .. }
                | object_store::Error::Precondition { .. },
            ) => {
                if self
                    .check_existing_manifest(&path, manifest, &encoded)
                    .await?
                {
                    Ok(())
                } else {
                    Err(Error::Aborted(format!(
                        "manifest {path} was reported to exist but cannot be read back; retry the copy"
                    )))
                }
            }
            // A store without conditional puts: we already checked that
            // nothing is there, so a plain put is as close to create-only as
            // it offers (a concurrent writer of a different manifest could
            // still win the race).
            Err(object_store::Error::NotImplemented { .. }) => {
                tracing::debug!(key = %path, "store has no create-only put; using a plain put after the existence check");
                self.store
                    .put(&path, PutPayload::from(encoded))
                    .await
                    .map_err(|source| store_error(format!("uploading manifest {path}"), source))?;
                Ok(())
            }
            Err(source) => Err(store_error(format!("uploading manifest {path}"), source)),
        }
    }
}
