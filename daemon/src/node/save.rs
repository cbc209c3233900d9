//! The save path: sessions, space in the memory tier, commit.

use crate::config::{MAX_SESSIONS_PER_CLIENT, MAX_SESSIONS_PER_TENANT, UploadAfter};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use cairn_core::{
    Attempt, EvictionCandidate, FileEntry, FileName, MANIFEST_VERSION, Manifest, ShardKey,
    ShardPresence, TenantName, choose_pressure_victims, latest_complete_step,
};

use super::attempts::Admission;
use super::volumes::{VolumeBinding, VolumeStagedFile};
use super::{BeginShard, FileSpec, Node, Session, StagedFile, lock, now_ms};
use crate::error::{Error, Result};
use crate::failpoint::crash_point;
use crate::hashing;

impl Node {
    /// Opens a save session: checks the request, reserves memory-tier space
    /// (evicting steps the disk tier already holds if needed) and creates the
    /// pre-sized files.
    ///
    /// `owner_pid` is the writer's process id when known (Unix socket peer
    /// credentials): a session whose writer has died is aborted as soon as
    /// anyone notices (the reaper, or a new writer for the same shard), so a
    /// restarted trainer can save the same step again at once.
    ///
    /// With `volume` (a request on a CSI volume's socket) the files are
    /// created inside that volume, where the pod can write them, and the
    /// staged paths returned are relative to the volume's root; the commit
    /// takes them into the tier by descriptor.
    #[tracing::instrument(skip_all, fields(shard = %request.key))]
    pub async fn begin(
        &self,
        request: BeginShard,
        owner_pid: Option<i32>,
        volume: Option<Arc<VolumeBinding>>,
    ) -> Result<(String, Vec<StagedFile>)> {
        let key = &request.key;
        if let Some(ws) = request.world_size
            && (ws == 0 || key.rank.0 >= ws)
        {
            return Err(Error::InvalidArgument(format!(
                "world_size {ws} must be above 0 and above rank {}",
                key.rank
            )));
        }
        check_file_names(&request.files)?;
        self.refuse_superseded(&request)?;
        if let Some(stored) = self.local_manifest(key).await {
            self.replace_abandoned_shard(&request, &stored).await?;
        }
        self.admit_attempt(&request)?;
        let session_id = uuid::Uuid::new_v4().to_string();
        let existing = lock(&self.sessions)
            .iter()
            .find(|(_, s)| &s.request.key == key)
            .map(|(id, s)| {
                (
                    id.clone(),
                    s.owner_pid,
                    s.committing,
                    s.request.attempt.clone(),
                )
            });
        if let Some((id, owner, committing, attempt)) = existing {
            if request.attempt.is_some() && attempt != request.attempt {
                // This begin made its attempt the step's current one: the
                // older save's session can never commit, so it goes now.
                tracing::warn!(session = %id, pid = ?owner, old_attempt = ?attempt, "a newer save of this step began; aborting the older attempt's session");
                self.abort(&id)?;
            } else if committing || owner.is_none_or(process_alive) {
                return Err(Error::Aborted(format!(
                    "shard {key} is being written by another session ({id}{}); abort it or wait for its commit",
                    owner.map(|p| format!(", pid {p}")).unwrap_or_default()
                )));
            } else {
                tracing::warn!(session = %id, pid = ?owner, "the previous writer of this shard is gone; aborting its session");
                self.abort(&id)?;
            }
        }
        self.check_session_limits(&key.tenant, owner_pid)?;
        let total = request.total_bytes()?;
        self.reserve_memory(&session_id, &key.tenant, total)?;
        let specs: Vec<(FileName, u64)> = request
            .files
            .iter()
            .map(|f| (f.name.clone(), f.size))
            .collect();
        let staged = match &volume {
            None => {
                let memory = Arc::clone(&self.memory);
                let id = session_id.clone();
                tokio::task::spawn_blocking(move || memory.stage(&id, &specs))
                    .await?
                    .map(|paths| (paths.clone(), paths, None))
            }
            Some(binding) => {
                let binding = Arc::clone(binding);
                let id = session_id.clone();
                tokio::task::spawn_blocking(move || {
                    let files = binding.stage_files(&id, &specs);
                    if files.is_err() {
                        binding.remove_session(&id);
                    }
                    files.map(|files| {
                        let handed: Vec<PathBuf> =
                            files.iter().map(|f| PathBuf::from(&f.relative)).collect();
                        let watched = files.iter().map(|f| f.host_path.clone()).collect();
                        (handed, watched, Some((binding, files)))
                    })
                })
                .await?
            }
        };
        let (handed, paths, volume) = match staged {
            Ok(staged) => staged,
            Err(e) => {
                self.memory.discard_staged(&session_id)?;
                return Err(e);
            }
        };
        let files = request
            .files
            .iter()
            .zip(handed)
            .map(|(f, path)| StagedFile {
                name: f.name.clone(),
                path,
                size: f.size,
            })
            .collect();
        {
            let mut sessions = lock(&self.sessions);
            if sessions.values().any(|s| &s.request.key == key) {
                drop(sessions);
                if let Some((binding, _)) = &volume {
                    binding.remove_session(&session_id);
                }
                self.memory.discard_staged(&session_id)?;
                return Err(Error::Aborted(format!(
                    "shard {key} is being written by another session"
                )));
            }
            sessions.insert(
                session_id.clone(),
                Session {
                    request,
                    owner_pid,
                    paths,
                    volume,
                    opened: Instant::now(),
                    committing: false,
                },
            );
            self.metrics.open_sessions.set(sessions.len() as i64);
        }
        self.update_usage_metrics();
        Ok((session_id, files))
    }

    /// Records the request's attempt as its step's current one, or refuses
    /// it when a newer attempt of the step has begun here (a zombie rank of
    /// a crashed run).
    fn admit_attempt(&self, request: &BeginShard) -> Result<()> {
        let Some(attempt) = &request.attempt else {
            return Ok(());
        };
        let key = &request.key;
        match lock(&self.attempts).admit(key, attempt) {
            Admission::Current | Admission::NewlyCurrent { replaced: None } => Ok(()),
            Admission::NewlyCurrent {
                replaced: Some(old),
            } => {
                tracing::info!(shard = %key, %attempt, superseded = %old, "a new save of this step began; the older attempt can no longer commit");
                Ok(())
            }
            Admission::Superseded { by } => Err(superseded(key, attempt, &by)),
        }
    }

    /// Refuses a commit whose attempt a newer one has superseded: the late
    /// shard of an abandoned save is dropped, never made visible.
    fn refuse_superseded(&self, request: &BeginShard) -> Result<()> {
        let Some(attempt) = &request.attempt else {
            return Ok(());
        };
        match lock(&self.attempts).superseded_by(&request.key, attempt) {
            Some(by) => {
                tracing::warn!(shard = %request.key, %attempt, superseded_by = %by, "dropping a late shard of a superseded save");
                Err(superseded(&request.key, attempt, &by))
            }
            None => Ok(()),
        }
    }

    /// Makes room for `request` where `stored` is already committed: allowed
    /// only for a new attempt of a step that never became complete (a crashed
    /// save being redone), which removes the abandoned shard from the memory
    /// and disk tiers (peers and the bucket replace it when the new shard
    /// reaches them; see `Manifest::supersedes`). Anything else is
    /// `AlreadyExists`: complete steps are immutable.
    async fn replace_abandoned_shard(&self, request: &BeginShard, stored: &Manifest) -> Result<()> {
        let key = &request.key;
        let Some(attempt) = &request.attempt else {
            return Err(Error::AlreadyExists(format!(
                "shard {key} is already committed"
            )));
        };
        if stored.attempt.as_ref() == Some(attempt) {
            return Err(Error::AlreadyExists(format!(
                "shard {key} is already committed by this attempt ({attempt})"
            )));
        }
        let step_shards = self.all_shards(&key.tenant, Some(&key.job)).await?;
        let presences = step_shards
            .values()
            .filter(|m| m.shard.step == key.step)
            .map(|m| ShardPresence::from(&**m));
        if latest_complete_step(presences, None) == Some(key.step) {
            return Err(Error::AlreadyExists(format!(
                "step {} of job {} is complete (attempt {}); a complete step is immutable: delete it to save it again",
                key.step,
                key.job,
                stored.attempt.as_ref().map_or("none", |a| a.as_str())
            )));
        }
        let _gc = self.gc_lock.write().await;
        self.memory.evict(key)?;
        self.disk.remove_shard(key)?;
        self.writeback.forget(key);
        tracing::warn!(shard = %key, %attempt, abandoned = ?stored.attempt, "replacing the shard of an abandoned save of an incomplete step");
        self.update_usage_metrics();
        self.notify();
        Ok(())
    }

    /// Bytes `tenant` holds in the memory tier: its committed shards and
    /// its open save sessions.
    fn tenant_memory_bytes(&self, tenant: &TenantName) -> u64 {
        let committed = self
            .memory
            .shards()
            .iter()
            .filter(|m| &m.shard.tenant == tenant)
            .fold(0u64, |sum, m| sum.saturating_add(m.total_bytes()));
        lock(&self.sessions)
            .values()
            .filter(|s| &s.request.key.tenant == tenant)
            .fold(committed, |sum, s| {
                sum.saturating_add(s.request.total_bytes().unwrap_or(u64::MAX))
            })
    }

    /// Evicts `tenant`'s oldest shards the disk tier holds (only its own
    /// when `own_only`) until `needed` bytes are free; the bytes it could
    /// free at most when that is not enough.
    fn evict_for(
        &self,
        tenant: &TenantName,
        own_only: bool,
        needed: u64,
    ) -> Result<std::result::Result<(), u64>> {
        let candidates: Vec<EvictionCandidate<ShardKey>> = self
            .memory
            .shards()
            .iter()
            .filter(|m| !own_only || &m.shard.tenant == tenant)
            .map(|m| EvictionCandidate {
                key: m.shard.clone(),
                age_order: m.committed_unix_ms,
                bytes: m.total_bytes(),
                safe_to_drop: self.disk.contains(&m.shard),
            })
            .collect();
        let victims = match choose_pressure_victims(&candidates, needed) {
            Ok(victims) => victims,
            Err(freeable) => return Ok(Err(freeable)),
        };
        for key in victims {
            if self.memory.evict(&key)? {
                tracing::info!(shard = %key, "evicted from memory tier to make room");
                self.metrics
                    .shards_evicted
                    .with_label_values(&["memory", "pressure"])
                    .inc();
            }
        }
        Ok(Ok(()))
    }

    /// Reserves `bytes` for `tenant` in the memory tier, evicting the
    /// oldest shards the disk tier already holds when the tier is full.
    /// With memory quotas, a tenant over its quota first loses its own
    /// oldest steps the disk holds, else is refused; and room for a tenant
    /// is only ever made from that tenant's own steps, so one team's saves
    /// never push another's out of memory.
    pub(super) fn reserve_memory(&self, id: &str, tenant: &TenantName, bytes: u64) -> Result<()> {
        let quotas = &self.config.memory_quotas;
        if let Err(over) = quotas.check(tenant, self.tenant_memory_bytes(tenant), bytes)
            && self.evict_for(tenant, true, over.excess)?.is_err()
        {
            return Err(Error::ResourceExhausted(format!(
                "tenant {tenant} would hold {} bytes in the memory tier, over its quota of {} \
                 bytes ([tenants] memory_quota_bytes / memory_quotas), and its steps not yet on \
                 disk cannot be evicted; wait for the write-back or delete old steps",
                over.would_hold, over.quota
            )));
        }
        let own_only = quotas.is_enabled();
        let mut shortfall = match self.memory.try_reserve(id, bytes) {
            Ok(()) => return Ok(()),
            Err(shortfall) => shortfall,
        };
        for _ in 0..3 {
            if self.evict_for(tenant, own_only, shortfall)?.is_err() {
                break;
            }
            match self.memory.try_reserve(id, bytes) {
                Ok(()) => {
                    self.notify();
                    return Ok(());
                }
                Err(s) => shortfall = s,
            }
        }
        Err(Error::ResourceExhausted(self.memory_full_message(bytes)))
    }

    fn memory_full_message(&self, needed: u64) -> String {
        let usage = self.memory.usage();
        let mut by_job: BTreeMap<String, (u64, u64)> = BTreeMap::new();
        for m in self.memory.shards() {
            let entry = by_job
                .entry(format!("{}/{}", m.shard.tenant, m.shard.job))
                .or_default();
            entry.0 = entry.0.saturating_add(m.total_bytes());
            if !self.disk.contains(&m.shard) {
                entry.1 = entry.1.saturating_add(m.total_bytes());
            }
        }
        let jobs: Vec<String> = by_job
            .iter()
            .map(|(job, (bytes, unsafe_bytes))| {
                format!("{job}: {bytes} bytes ({unsafe_bytes} not yet on disk)")
            })
            .collect();
        format!(
            "memory tier is full: this save needs {needed} bytes but {} of {} bytes are in use \
             ({} reserved by {} open sessions; shards: {}); nothing more can be evicted until the disk tier holds it",
            usage.used,
            usage.capacity,
            usage.reserved,
            usage.staging_areas,
            if jobs.is_empty() {
                "none".into()
            } else {
                jobs.join(", ")
            }
        )
    }

    /// Commits a session: hashes its files in place, writes the manifest and
    /// makes the shard visible, then queues the write-back to disk.
    #[tracing::instrument(skip_all, fields(session = session_id))]
    pub async fn commit(&self, session_id: &str) -> Result<Arc<Manifest>> {
        let started = Instant::now();
        let (request, paths, volume) = {
            let mut sessions = lock(&self.sessions);
            let session = sessions
                .get_mut(session_id)
                .ok_or_else(|| unknown_session(session_id))?;
            if session.committing {
                return Err(Error::FailedPrecondition(format!(
                    "session {session_id} is already being committed"
                )));
            }
            session.committing = true;
            (
                session.request.clone(),
                session.paths.clone(),
                session.volume.clone(),
            )
        };
        let result = match self.refuse_superseded(&request) {
            Ok(()) => match &volume {
                None => self.commit_staged_files(session_id, &request, paths).await,
                Some((binding, files)) => {
                    self.commit_from_volume(session_id, &request, binding, files)
                        .await
                }
            },
            Err(e) => Err(e),
        };
        let mut sessions = lock(&self.sessions);
        match &result {
            // A bad file size is the client's to fix: the session stays open.
            Err(Error::InvalidArgument(_)) => {
                if let Some(s) = sessions.get_mut(session_id) {
                    s.committing = false;
                }
            }
            _ => {
                sessions.remove(session_id);
            }
        }
        self.metrics.open_sessions.set(sessions.len() as i64);
        drop(sessions);
        if let Err(e) = &result
            && !matches!(e, Error::InvalidArgument(_))
        {
            let _ = self.memory.discard_staged(session_id);
        }
        let manifest = result?;
        self.metrics
            .commit_seconds
            .observe(started.elapsed().as_secs_f64());
        self.shard_committed(&manifest, started);
        Ok(manifest)
    }

    /// Commits a session whose files the pod wrote in its volume: takes them
    /// into the tier's staging area by descriptor (refusing files the pod
    /// replaced), commits as usual, and removes the session's directory from
    /// the volume either way. The shard's files are never recycled into the
    /// page pool: the pod may still hold them open.
    async fn commit_from_volume(
        &self,
        session_id: &str,
        request: &BeginShard,
        binding: &Arc<VolumeBinding>,
        files: &[VolumeStagedFile],
    ) -> Result<Arc<Manifest>> {
        let taken = {
            let binding = Arc::clone(binding);
            let memory = Arc::clone(&self.memory);
            let id = session_id.to_owned();
            let files = files.to_vec();
            tokio::task::spawn_blocking(move || binding.take_staged(&id, &files, &memory)).await?
        };
        let result = match taken {
            Ok(paths) => self.commit_staged_files(session_id, request, paths).await,
            Err(e) => Err(e),
        };
        if result.is_ok() {
            self.memory.mark_exported(&request.key);
        }
        let binding = Arc::clone(binding);
        let id = session_id.to_owned();
        tokio::task::spawn_blocking(move || binding.remove_session(&id)).await?;
        result
    }

    /// What follows every commit into the memory tier, whoever staged the
    /// files (a client's session or ingest): metrics, the log line, the
    /// write-back and upload queues, usage, and waking waiters.
    pub(super) fn shard_committed(&self, manifest: &Arc<Manifest>, started: Instant) {
        self.metrics
            .saved_bytes
            .with_label_values(&["memory"])
            .inc_by(manifest.total_bytes());
        tracing::info!(
            shard = %manifest.shard,
            bytes = manifest.total_bytes(),
            chunks = manifest.chunk_count(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "shard committed"
        );
        self.queue_writeback(manifest.shard.clone());
        self.queue_replication(manifest.shard.clone());
        if self.uploads_after(UploadAfter::Commit) {
            self.queue_upload(manifest.shard.clone());
        }
        self.update_usage_metrics();
        self.notify();
    }

    /// Turns the files of staging area `staging_id` (at `paths`, in the
    /// order of `request.files`) into the committed shard `request`
    /// describes: hashes them in place, builds the manifest, and has the
    /// memory tier write it and rename the area into place. The one way
    /// staged files become a shard, for client commits and ingest alike.
    /// On error the caller discards the staging area.
    pub(super) async fn commit_staged_files(
        &self,
        staging_id: &str,
        request: &BeginShard,
        paths: Vec<PathBuf>,
    ) -> Result<Arc<Manifest>> {
        let files: Vec<(String, PathBuf, u64)> = request
            .files
            .iter()
            .zip(paths)
            .map(|(f, p)| (f.name.as_str().to_owned(), p, f.size))
            .collect();
        let chunk_size = self.config.chunk_size;
        crash_point("commit.before_hash");
        let chunks =
            tokio::task::spawn_blocking(move || hashing::hash_files(&files, chunk_size)).await??;
        crash_point("commit.after_hash");
        let manifest = Arc::new(Manifest {
            version: MANIFEST_VERSION,
            shard: request.key.clone(),
            world_size: request.world_size,
            chunk_size,
            files: request
                .files
                .iter()
                .zip(chunks)
                .map(|(f, chunks)| FileEntry {
                    name: f.name.clone(),
                    size: f.size,
                    chunks,
                    metadata: f.metadata.clone(),
                })
                .collect(),
            metadata: request.metadata.clone(),
            committed_unix_ms: now_ms(),
            attempt: request.attempt.clone(),
        });
        // Hashing takes a while: a newer attempt may have begun meanwhile.
        self.refuse_superseded(request)?;
        let memory = Arc::clone(&self.memory);
        let id = staging_id.to_owned();
        let m = Arc::clone(&manifest);
        tokio::task::spawn_blocking(move || memory.commit_staged(&id, m)).await??;
        crash_point("commit.before_ack");
        Ok(manifest)
    }

    /// The shard an open session saves, if the session exists: what a
    /// volume's socket checks before it lets a commit or abort through.
    pub fn session_shard(&self, session_id: &str) -> Option<ShardKey> {
        lock(&self.sessions)
            .get(session_id)
            .map(|s| s.request.key.clone())
    }

    /// Drops a session and its files; unknown sessions are fine (idempotent).
    pub fn abort(&self, session_id: &str) -> Result<()> {
        let removed = {
            let mut sessions = lock(&self.sessions);
            let removed = sessions.remove(session_id);
            self.metrics.open_sessions.set(sessions.len() as i64);
            removed
        };
        if let Some(session) = removed {
            tracing::info!(shard = %session.request.key, session = session_id, "session aborted");
            if let Some((binding, _)) = &session.volume {
                binding.remove_session(session_id);
            }
            self.memory.discard_staged(session_id)?;
            self.update_usage_metrics();
        }
        Ok(())
    }

    /// Aborts sessions whose writer exited, that outlived
    /// `session_timeout_secs`, or whose files saw no write for
    /// `session_idle_timeout_secs` (a reservation nobody fills must not block
    /// every other save for long).
    pub(super) async fn reap_sessions(self: Arc<Self>) {
        let shortest = self
            .config
            .session_timeout
            .min(self.config.session_idle_timeout);
        #[expect(
            clippy::arithmetic_side_effects,
            reason = "dividing a Duration by the constant 4 can neither overflow nor divide by zero"
        )]
        let period = (shortest / 4).clamp(Duration::from_millis(100), Duration::from_secs(30));
        let idle_limit = self.config.session_idle_timeout;
        loop {
            tokio::select! {
                () = self.cancel.cancelled() => return,
                () = tokio::time::sleep(period) => {}
            }
            let mut stale = Vec::new();
            let mut maybe_idle = Vec::new();
            for (id, s) in lock(&self.sessions).iter() {
                if s.committing {
                    continue;
                }
                if s.opened.elapsed() > self.config.session_timeout {
                    stale.push((id.clone(), "it outlived session_timeout_secs"));
                } else if s.owner_pid.is_some_and(|p| !process_alive(p)) {
                    stale.push((id.clone(), "its writer exited"));
                } else if s.opened.elapsed() > idle_limit {
                    maybe_idle.push((id.clone(), s.paths.clone()));
                }
            }
            let idle = tokio::task::spawn_blocking(move || {
                maybe_idle
                    .into_iter()
                    .filter(|(_, paths)| {
                        last_write(paths)
                            .is_none_or(|at| at.elapsed().unwrap_or_default() > idle_limit)
                    })
                    .map(|(id, _)| id)
                    .collect::<Vec<_>>()
            })
            .await
            .unwrap_or_default();
            stale.extend(idle.into_iter().map(|id| {
                (
                    id,
                    "nothing was written to its files for session_idle_timeout_secs",
                )
            }));
            for (id, why) in stale {
                tracing::warn!(session = %id, reason = why, "aborting save session");
                if let Err(e) = self.abort(&id) {
                    tracing::warn!(session = %id, error = %e, "aborting stale session failed");
                }
            }
        }
    }

    /// Refuses a new session beyond the open-session limits of its client
    /// process and of its tenant.
    fn check_session_limits(&self, tenant: &TenantName, owner_pid: Option<i32>) -> Result<()> {
        let sessions = lock(&self.sessions);
        if let Some(pid) = owner_pid {
            let by_client = sessions
                .values()
                .filter(|s| s.owner_pid == Some(pid))
                .count();
            if by_client >= MAX_SESSIONS_PER_CLIENT {
                return Err(Error::ResourceExhausted(format!(
                    "client pid {pid} has {by_client} open save sessions, the most one client may hold \
                     ({MAX_SESSIONS_PER_CLIENT}); commit or abort some first"
                )));
            }
        }
        let by_tenant = sessions
            .values()
            .filter(|s| &s.request.key.tenant == tenant)
            .count();
        if by_tenant >= MAX_SESSIONS_PER_TENANT {
            return Err(Error::ResourceExhausted(format!(
                "tenant {tenant} has {by_tenant} open save sessions, the most one tenant may hold \
                 ({MAX_SESSIONS_PER_TENANT}); commit or abort some first"
            )));
        }
        Ok(())
    }
}

/// The newest modification time among a session's files (up to about
/// 4,096 of them, evenly spread): when its writer last wrote.
fn last_write(paths: &[PathBuf]) -> Option<SystemTime> {
    let step = (paths.len() / 4096).max(1);
    paths
        .iter()
        .step_by(step)
        .filter_map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
        .max()
}

/// Rejects a file list that names a file twice, or names a file and also a
/// file inside it as a directory (`a` and `a/b`): both would collide on disk.
/// Linear in the number of files times their depth.
fn check_file_names(files: &[FileSpec]) -> Result<()> {
    let mut names = std::collections::HashSet::with_capacity(files.len());
    for (i, f) in files.iter().enumerate() {
        if !names.insert(f.name.as_str()) {
            return Err(Error::InvalidArgument(format!(
                "files[{i}].name {} is listed twice",
                f.name
            )));
        }
    }
    for f in files {
        let name = f.name.as_str();
        for (cut, _) in name.match_indices('/') {
            if names.contains(&name[..cut]) {
                return Err(Error::InvalidArgument(format!(
                    "files: {} is both a file and the directory of {name}",
                    &name[..cut]
                )));
            }
        }
    }
    Ok(())
}

/// Whether a process with this id exists (in cairnd's pid namespace, which
/// is the one Unix socket credentials are reported in).
fn process_alive(pid: i32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

fn superseded(key: &ShardKey, attempt: &Attempt, by: &Attempt) -> Error {
    Error::Aborted(format!(
        "attempt {attempt} of step {} of job {} was superseded by attempt {by} (a newer save of this step began); shard {key} of the older attempt is dropped",
        key.step, key.job
    ))
}

fn unknown_session(id: &str) -> Error {
    // Cut: the id comes from the request, and a message of any length would
    // not fit the reply's metadata.
    let shown: String = id.chars().take(80).collect();
    Error::FailedPrecondition(format!(
        "session {shown:?} is not open (never begun, already committed, or aborted)"
    ))
}
