//! The `cairn.v1.Checkpoint` service: what training processes call.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use cairn_core::{JobName, ShardKey, Step, TenantName};
use cairn_proto::v1 as pb;
use cairn_proto::v1::checkpoint_server::Checkpoint;
use futures::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::Span;

use super::access::Access;
use super::convert::{self, required};
use super::to_status;
use crate::error::{Error, IoContext, Result};
use crate::node::{BeginShard, CopyState, Node, StepSelection};
use crate::tier::ChunkLocation;

/// Largest data message sent by ReadShard; well under tonic's 4 MiB default
/// decode limit, and large enough to keep per-message overhead small.
pub const STREAM_MESSAGE_BYTES: usize = 1024 * 1024;
/// Longest WaitDurable when the request names no timeout.
const DEFAULT_WAIT: Duration = Duration::from_secs(3600);

/// The service; cheap to clone.
#[derive(Clone)]
pub struct CheckpointService {
    node: Arc<Node>,
    access: Access,
}

impl CheckpointService {
    /// Serves `node` to clients of a socket that allows `access`.
    pub fn new(node: Arc<Node>, access: Access) -> Self {
        Self { node, access }
    }

    /// A BeginShard (or WriteShard header) for a shard this socket may write.
    fn begin_request(&self, req: &pb::BeginShardRequest) -> Result<BeginShard> {
        let begin = convert::begin_shard_with(&|t| self.access.tenant(&self.node, t), req)?;
        self.access.check_job(&begin.key.job)?;
        Ok(begin)
    }

    /// A selector's shard, its step resolved, if this socket may read it.
    async fn selected_shard(&self, sel: &pb::ShardSelector) -> Result<ShardKey> {
        let (tenant, job, step, rank) =
            convert::selector_with(&|t| self.access.tenant(&self.node, t), "shard", sel)?;
        self.access.check_job(&job)?;
        let step = self.node.resolve_step(&tenant, &job, step, rank).await?;
        let key = ShardKey {
            tenant,
            job,
            step,
            rank,
        };
        record_shard(&key);
        Ok(key)
    }

    /// A request's tenant and job, if this socket may act on them.
    fn tenant_and_job(&self, tenant: &str, job: &str) -> Result<(TenantName, JobName)> {
        let tenant = self.access.tenant(&self.node, tenant)?;
        let job = convert::job("job", job)?;
        self.access.check_job(&job)?;
        Ok((tenant, job))
    }

    fn status(&self, method: &'static str, err: Error) -> Status {
        to_status(&self.node.metrics, method, err)
    }

    fn reply<T>(&self, method: &'static str, result: Result<T>) -> Result<Response<T>, Status> {
        result
            .map(Response::new)
            .map_err(|e| self.status(method, e))
    }
}

/// The calling process's id, when it connected over the Unix socket and is
/// visible from the daemon's PID namespace. A writer in another namespace
/// (a trainer pod, when cairnd runs without `hostPID`) is reported as pid 0:
/// unknown, so its session is never taken for a dead writer's.
fn peer_pid<T>(request: &Request<T>) -> Option<i32> {
    request
        .extensions()
        .get::<tonic::transport::server::UdsConnectInfo>()
        .and_then(|info| info.peer_cred)
        .and_then(|cred| cred.pid())
        .filter(|pid| *pid > 0)
}

fn record_shard(key: &ShardKey) {
    let span = Span::current();
    span.record("job", key.job.as_str());
    span.record("step", key.step.0);
    span.record("rank", key.rank.0);
}

type ReadStream = Pin<Box<dyn Stream<Item = Result<pb::ReadShardResponse, Status>> + Send>>;

/// Bytes of protobuf framing per staged file in a `BeginShardResponse`, at
/// most (tags, lengths, the size varint).
const STAGED_FILE_FRAMING: usize = 32;

/// Refuses a `BeginShard` whose reply (every staged file's name and path)
/// could not be sent, before anything is created: otherwise the session and
/// files would exist, the client would get `OUT_OF_RANGE` without learning
/// the session id, and the shard would stay locked until the session timed
/// out.
fn check_begin_reply_fits(node: &Node, begin: &BeginShard) -> Result<()> {
    let session_id_len = uuid::fmt::Hyphenated::LENGTH;
    let reply = begin.files.iter().fold(64 + session_id_len, |total, f| {
        total
            .saturating_add(f.name.as_str().len())
            .saturating_add(node.memory.staged_path_len(session_id_len, &f.name))
            .saturating_add(STAGED_FILE_FRAMING)
    });
    if reply > super::MAX_MESSAGE_BYTES {
        return Err(Error::InvalidArgument(format!(
            "files: the reply naming {} staged files would take about {reply} bytes, over the \
             {} byte message limit; save fewer or shorter-named files per shard",
            begin.files.len(),
            super::MAX_MESSAGE_BYTES
        )));
    }
    Ok(())
}

#[tonic::async_trait]
impl Checkpoint for CheckpointService {
    #[tracing::instrument(name = "BeginShard", skip_all, fields(job, step, rank))]
    async fn begin_shard(
        &self,
        request: Request<pb::BeginShardRequest>,
    ) -> Result<Response<pb::BeginShardResponse>, Status> {
        let result = async {
            let begin = self.begin_request(request.get_ref())?;
            record_shard(&begin.key);
            check_begin_reply_fits(&self.node, &begin)?;
            let (session_id, files) = self
                .node
                .begin(begin, peer_pid(&request), self.access.volume())
                .await?;
            Ok(pb::BeginShardResponse {
                session_id,
                files: files
                    .into_iter()
                    .map(|f| pb::StagedFile {
                        name: f.name.to_string(),
                        path: f.path.to_string_lossy().into_owned(),
                        size: f.size,
                    })
                    .collect(),
            })
        }
        .await;
        self.reply("BeginShard", result)
    }

    #[tracing::instrument(name = "CommitShard", skip_all, fields(session = %request.get_ref().session_id))]
    async fn commit_shard(
        &self,
        request: Request<pb::CommitShardRequest>,
    ) -> Result<Response<pb::CommitShardResponse>, Status> {
        let session_id = &request.get_ref().session_id;
        let result = match self.access.check_session(&self.node, session_id) {
            Ok(()) => self.node.commit(session_id).await,
            Err(e) => Err(e),
        };
        match result {
            Ok(m) => Ok(Response::new(pb::CommitShardResponse {
                shard: Some(convert::shard_info(&m)),
            })),
            Err(e) => Err(self.status("CommitShard", e)),
        }
    }

    #[tracing::instrument(name = "AbortShard", skip_all, fields(session = %request.get_ref().session_id))]
    async fn abort_shard(
        &self,
        request: Request<pb::AbortShardRequest>,
    ) -> Result<Response<pb::AbortShardResponse>, Status> {
        let session_id = &request.get_ref().session_id;
        self.access
            .check_session(&self.node, session_id)
            .and_then(|()| self.node.abort(session_id))
            .map(|()| Response::new(pb::AbortShardResponse {}))
            .map_err(|e| self.status("AbortShard", e))
    }

    #[tracing::instrument(name = "WriteShard", skip_all, fields(job, step, rank))]
    async fn write_shard(
        &self,
        request: Request<Streaming<pb::WriteShardRequest>>,
    ) -> Result<Response<pb::CommitShardResponse>, Status> {
        let pid = peer_pid(&request);
        let mut stream = request.into_inner();
        let header = match stream.message().await? {
            Some(pb::WriteShardRequest {
                msg: Some(pb::write_shard_request::Msg::Header(h)),
            }) => h,
            _ => {
                return Err(self.status(
                    "WriteShard",
                    Error::InvalidArgument(
                        "the first message of WriteShard must be a header".into(),
                    ),
                ));
            }
        };
        let begin = self
            .begin_request(&header)
            .map_err(|e| self.status("WriteShard", e))?;
        record_shard(&begin.key);
        let (session_id, files) = self
            .node
            .begin(begin, pid, None)
            .await
            .map_err(|e| self.status("WriteShard", e))?;
        let result = receive_files(&mut stream, &files).await;
        let result = match result {
            Ok(()) => self.node.commit(&session_id).await,
            Err(e) => Err(e),
        };
        match result {
            Ok(m) => Ok(Response::new(pb::CommitShardResponse {
                shard: Some(convert::shard_info(&m)),
            })),
            Err(e) => {
                if let Err(abort_err) = self.node.abort(&session_id) {
                    tracing::warn!(error = %abort_err, "aborting failed stream session failed");
                }
                Err(self.status("WriteShard", e))
            }
        }
    }

    type ReadShardStream = ReadStream;

    #[tracing::instrument(name = "ReadShard", skip_all, fields(job, step, rank))]
    async fn read_shard(
        &self,
        request: Request<pb::ReadShardRequest>,
    ) -> Result<Response<ReadStream>, Status> {
        let manifest = async {
            let key = self
                .selected_shard(required("shard", &request.get_ref().shard)?)
                .await?;
            self.node.manifest(&key).await
        }
        .await
        .map_err(|e| self.status("ReadShard", e))?;
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        let node = Arc::clone(&self.node);
        tokio::spawn(async move {
            let first = pb::ReadShardResponse {
                msg: Some(pb::read_shard_response::Msg::Manifest(
                    convert::manifest_to_pb(&manifest),
                )),
            };
            if tx.send(Ok(first)).await.is_err() {
                return;
            }
            for location in ChunkLocation::all(&manifest) {
                let bytes = match node.read_chunk(&location).await {
                    Ok(bytes) => bytes,
                    Err(e) => {
                        let _ = tx.send(Err(to_status(&node.metrics, "ReadShard", e))).await;
                        return;
                    }
                };
                let mut sent = 0;
                while sent < bytes.len() {
                    let end = sent.saturating_add(STREAM_MESSAGE_BYTES).min(bytes.len());
                    let msg = pb::ReadShardResponse {
                        msg: Some(pb::read_shard_response::Msg::Data(pb::FileData {
                            file_index: location.file_index as u32,
                            // In a validated manifest a chunk ends within
                            // its file's u64 size: never saturates.
                            offset: location.offset.saturating_add(sent as u64),
                            data: bytes.slice(sent..end).to_vec(),
                        })),
                    };
                    if tx.send(Ok(msg)).await.is_err() {
                        return; // the client went away
                    }
                    sent = end;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    #[tracing::instrument(name = "ListSteps", skip_all, fields(job = %request.get_ref().job))]
    async fn list_steps(
        &self,
        request: Request<pb::ListStepsRequest>,
    ) -> Result<Response<pb::ListStepsResponse>, Status> {
        let req = request.get_ref();
        let result = async {
            let tenant = self.access.tenant(&self.node, &req.tenant)?;
            let job = self.access.listed_job(if req.job.is_empty() {
                None
            } else {
                Some(convert::job("job", &req.job)?)
            })?;
            let view = self
                .node
                .list_steps(&tenant, job.as_ref(), req.wait_for_all_tiers)
                .await?;
            let wanted = self.node.peers.as_ref().map_or(0, |p| p.replicas() as u32);
            Ok(pb::ListStepsResponse {
                left_out: view.left_out,
                jobs: view
                    .jobs
                    .into_iter()
                    .map(|(job, steps)| pb::JobSteps {
                        job: job.to_string(),
                        steps: steps.into_iter().map(|s| step_to_pb(s, wanted)).collect(),
                    })
                    .collect(),
            })
        }
        .await;
        self.reply("ListSteps", result)
    }

    #[tracing::instrument(name = "GetManifest", skip_all, fields(job, step, rank))]
    async fn get_manifest(
        &self,
        request: Request<pb::GetManifestRequest>,
    ) -> Result<Response<pb::GetManifestResponse>, Status> {
        let result = async {
            let key = self
                .selected_shard(required("shard", &request.get_ref().shard)?)
                .await?;
            let m = self.node.manifest(&key).await?;
            Ok(pb::GetManifestResponse {
                manifest: Some(convert::manifest_to_pb(&m)),
            })
        }
        .await;
        self.reply("GetManifest", result)
    }

    #[tracing::instrument(name = "RestoreShard", skip_all, fields(job, step, rank))]
    async fn restore_shard(
        &self,
        request: Request<pb::RestoreShardRequest>,
    ) -> Result<Response<pb::RestoreShardResponse>, Status> {
        let req = request.get_ref();
        let result = async {
            let key = self.selected_shard(required("shard", &req.shard)?).await?;
            let outcome = self.node.restore(&key, !req.skip_verify).await?;
            // On a volume's socket the files are linked into the volume and
            // named relative to its root: the pod sees nothing else.
            let paths: Vec<String> = match self.access.volume() {
                None => outcome
                    .paths
                    .iter()
                    .map(|p| p.to_string_lossy().into_owned())
                    .collect(),
                Some(binding) => {
                    let files: Vec<_> = outcome
                        .manifest
                        .files
                        .iter()
                        .map(|f| f.name.clone())
                        .zip(outcome.paths.iter().cloned())
                        .collect();
                    let rank = key.rank;
                    tokio::task::spawn_blocking(move || binding.link_restored(rank, &files))
                        .await??
                }
            };
            Ok(pb::RestoreShardResponse {
                manifest: Some(convert::manifest_to_pb(&outcome.manifest)),
                files: outcome
                    .manifest
                    .files
                    .iter()
                    .zip(paths)
                    .map(|(f, path)| pb::RestoredFile {
                        name: f.name.to_string(),
                        path,
                        size: f.size,
                    })
                    .collect(),
                sources: convert::source_bytes(&outcome.bytes_by_tier),
            })
        }
        .await;
        self.reply("RestoreShard", result)
    }

    #[tracing::instrument(name = "DeleteStep", skip_all, fields(job = %request.get_ref().job, step = request.get_ref().step))]
    async fn delete_step(
        &self,
        request: Request<pb::DeleteStepRequest>,
    ) -> Result<Response<pb::DeleteStepResponse>, Status> {
        let req = request.get_ref();
        let result = async {
            let (tenant, job) = self.tenant_and_job(&req.tenant, &req.job)?;
            let shards_deleted = self.node.delete_step(&tenant, &job, Step(req.step)).await?;
            Ok(pb::DeleteStepResponse { shards_deleted })
        }
        .await;
        self.reply("DeleteStep", result)
    }

    #[tracing::instrument(name = "WaitDurable", skip_all, fields(job = %request.get_ref().job, step = request.get_ref().step))]
    async fn wait_durable(
        &self,
        request: Request<pb::WaitDurableRequest>,
    ) -> Result<Response<pb::WaitDurableResponse>, Status> {
        let req = request.get_ref();
        let result = async {
            let (tenant, job) = self.tenant_and_job(&req.tenant, &req.job)?;
            let tier = convert::tier("tier", req.tier)?;
            let timeout = match req.timeout_ms {
                0 => DEFAULT_WAIT,
                ms => Duration::from_millis(ms),
            };
            let selection = StepSelection {
                tenant,
                job,
                step: Step(req.step),
                rank: req.rank.map(cairn_core::Rank),
            };
            self.node.wait_durable(&selection, tier, timeout).await?;
            Ok(pb::WaitDurableResponse {})
        }
        .await;
        self.reply("WaitDurable", result)
    }
}

/// Writes a WriteShard stream's data messages into the staged files. Data
/// for each file must arrive in order, without gaps, and fill it exactly.
async fn receive_files(
    stream: &mut Streaming<pb::WriteShardRequest>,
    files: &[crate::node::StagedFile],
) -> Result<()> {
    // One descriptor at a time, opened when its file's data arrives: a
    // stream declaring many files must not hold a descriptor per file for
    // its whole life (clients send files one after another; one that
    // interleaves them pays an open per switch).
    let mut open: Option<(usize, Arc<std::fs::File>)> = None;
    let mut written = vec![0u64; files.len()];
    while let Some(message) = stream.message().await.map_err(|s| {
        Error::Aborted(format!(
            "stream broke before the client finished: {}",
            s.message()
        ))
    })? {
        let data = match message.msg {
            Some(pb::write_shard_request::Msg::Data(d)) => d,
            _ => {
                return Err(Error::InvalidArgument(
                    "only the first WriteShard message may be a header".into(),
                ));
            }
        };
        let index = data.file_index as usize;
        let Some(file) = files.get(index) else {
            return Err(Error::InvalidArgument(format!(
                "data.file_index {index} is out of range ({} files)",
                files.len()
            )));
        };
        if data.offset != written[index] {
            return Err(Error::InvalidArgument(format!(
                "data for file {}: offset {} but {} bytes were written so far (data must arrive in order)",
                file.name, data.offset, written[index]
            )));
        }
        let end = data.offset.saturating_add(data.data.len() as u64);
        if end > file.size {
            return Err(Error::InvalidArgument(format!(
                "data for file {}: {end} bytes exceed its declared size of {}",
                file.name, file.size
            )));
        }
        let handle = match &open {
            Some((i, handle)) if *i == index => Arc::clone(handle),
            _ => {
                drop(open.take()); // close the previous file's descriptor first
                let handle = std::fs::OpenOptions::new()
                    .write(true)
                    .open(&file.path)
                    .map(Arc::new)
                    .io_context(|| format!("opening {}", file.path.display()))?;
                open = Some((index, Arc::clone(&handle)));
                handle
            }
        };
        let offset = data.offset;
        let path = file.path.clone();
        tokio::task::spawn_blocking(move || {
            use std::os::unix::fs::FileExt;
            handle
                .write_all_at(&data.data, offset)
                .io_context(|| format!("writing {}", path.display()))
        })
        .await??;
        written[index] = end;
    }
    for (file, got) in files.iter().zip(&written) {
        if *got != file.size {
            return Err(Error::InvalidArgument(format!(
                "file {}: declared {} bytes but the stream carried {got}",
                file.name, file.size
            )));
        }
    }
    Ok(())
}

fn step_to_pb(view: crate::node::StepView, wanted_replicas: u32) -> pb::StepStatus {
    pb::StepStatus {
        step: view.step.0,
        restorable: view.restorable,
        object_store_complete: view.object_store_complete,
        shards: view
            .shards
            .into_iter()
            .map(|s| pb::ShardStatus {
                rank: s.rank.0,
                total_bytes: s.total_bytes,
                world_size: s.world_size,
                peer_holders: s
                    .peers
                    .iter()
                    .flat_map(|p| p.holders.iter().map(|h| h.to_string()))
                    .collect(),
                peer_replicas_wanted: wanted_replicas,
                attempt: convert::attempt_to_pb(s.attempt.as_ref()),
                peer_problem: s
                    .peers
                    .as_ref()
                    .and_then(|p| p.state.problem())
                    .unwrap_or_default()
                    .to_owned(),
                tiers: vec![
                    pb::TierState {
                        tier: pb::Tier::Memory as i32,
                        state: if s.in_memory {
                            pb::ShardState::Durable
                        } else {
                            pb::ShardState::Absent
                        } as i32,
                        problem: String::new(),
                    },
                    tier_state(pb::Tier::Disk, &s.disk),
                    tier_state(
                        pb::Tier::Peers,
                        s.peers.as_ref().map_or(&CopyState::Absent, |p| &p.state),
                    ),
                    tier_state(pb::Tier::ObjectStore, &s.object_store),
                ],
            })
            .collect(),
    }
}

fn tier_state(tier: pb::Tier, state: &CopyState) -> pb::TierState {
    let shard_state = match state {
        CopyState::Absent => pb::ShardState::Absent,
        CopyState::Pending => pb::ShardState::Pending,
        CopyState::Durable => pb::ShardState::Durable,
        CopyState::Failed(_) | CopyState::NeedsAttention(_) => pb::ShardState::Failed,
    };
    pb::TierState {
        tier: tier as i32,
        state: shard_state as i32,
        problem: state.problem().unwrap_or_default().to_owned(),
    }
}
