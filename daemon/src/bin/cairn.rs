//! `cairn`: the operator CLI.
//!
//! Human tables by default, `--json` for scripts; progress bars (on a
//! terminal) for long work. Errors print one line, `cairn: <what went wrong>`,
//! and exit with a code by kind (the table is in `docs/operations.md`): 2
//! invalid input, 3 daemon unreachable, 4 not found, 5 verification found bad
//! chunks, 6 a tier the command needs is unreachable (the daemon answered,
//! the bucket or the peers did not), 1 anything else.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use cairn_daemon::client::Clients;
use cairn_proto::v1 as pb;
use cairn_proto::v1::admin_client::AdminClient;
use clap::{Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use tonic::transport::Channel;

#[derive(Parser)]
#[command(name = "cairn", version, about = "Operate a Cairn node daemon")]
struct Cli {
    /// cairnd's socket path, or http://host:port for its TCP listener.
    #[arg(long, global = true, env = "CAIRN_SOCKET", default_value = cairn_daemon::config::DEFAULT_SOCKET)]
    socket: String,
    /// Tenant (default: the daemon's).
    #[arg(long, global = true, env = "CAIRN_TENANT", default_value = "")]
    tenant: String,
    /// Print machine-readable JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum TierArg {
    Memory,
    Disk,
    Peers,
    ObjectStore,
}

impl TierArg {
    fn to_pb(self) -> pb::Tier {
        match self {
            TierArg::Memory => pb::Tier::Memory,
            TierArg::Disk => pb::Tier::Disk,
            TierArg::Peers => pb::Tier::Peers,
            TierArg::ObjectStore => pb::Tier::ObjectStore,
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// The daemon's tiers, usage and activity; with --job, where every
    /// shard of each of the job's steps lives and which steps are restorable.
    Status {
        /// A job to show step by step.
        #[arg(long)]
        job: Option<String>,
    },
    /// Steps of a job (or every job), with each rank's state per tier.
    List {
        /// Job name; all jobs when absent.
        #[arg(long)]
        job: Option<String>,
    },
    /// Save the files of a directory as one shard, through the fast path.
    Save {
        #[arg(long)]
        job: String,
        #[arg(long)]
        step: u64,
        #[arg(long, default_value_t = 0)]
        rank: u32,
        /// Number of ranks of the job.
        #[arg(long)]
        world_size: Option<u32>,
        /// Directory whose files (recursively) make the shard.
        dir: PathBuf,
    },
    /// Restore a shard into the memory tier, and optionally copy it out.
    Restore {
        #[arg(long)]
        job: String,
        /// A step number, or "latest" for the newest complete step.
        #[arg(long, default_value = "latest")]
        step: String,
        #[arg(long, default_value_t = 0)]
        rank: u32,
        /// Copy the restored files into this directory.
        #[arg(long)]
        to: Option<PathBuf>,
        /// Do not re-hash a shard the memory tier already holds.
        #[arg(long)]
        no_verify: bool,
        /// Restore into the memory tier of this node instead (its node id in
        /// the peer tier), through the peer tier: a replacement node filled
        /// before its job restarts. Copies no files here.
        #[arg(long, conflicts_with = "to")]
        node: Option<String>,
    },
    /// Re-hash a step's shards in one tier.
    Verify {
        #[arg(long)]
        job: String,
        #[arg(long)]
        step: u64,
        /// One rank; every rank when absent.
        #[arg(long)]
        rank: Option<u32>,
        #[arg(long, value_enum, default_value = "disk")]
        tier: TierArg,
        /// Rewrite bad chunks from another tier.
        #[arg(long)]
        repair: bool,
    },
    /// Wait until a step is durable in a tier.
    Wait {
        #[arg(long)]
        job: String,
        #[arg(long)]
        step: u64,
        #[arg(long, value_enum, default_value = "disk")]
        tier: TierArg,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 600)]
        timeout_secs: u64,
    },
    /// Delete a step from every tier (the object store included).
    Delete {
        #[arg(long)]
        job: String,
        #[arg(long)]
        step: u64,
    },
    /// Remove chunks that no manifest references, on disk and in the object
    /// store (there only once older than its grace period).
    Gc {
        /// Only report what would be removed.
        #[arg(long)]
        dry_run: bool,
    },
}

/// A failure with its exit code.
struct Failure {
    code: u8,
    message: String,
}

/// Exit code: the daemon could not be reached.
const EXIT_DAEMON_UNREACHABLE: u8 = 3;
/// Exit code: the daemon answered that a tier it needs (the bucket, the
/// peers) is unreachable.
const EXIT_TIER_UNREACHABLE: u8 = 6;

impl From<tonic::Status> for Failure {
    fn from(s: tonic::Status) -> Self {
        let code = match s.code() {
            tonic::Code::InvalidArgument => 2,
            // A status the daemon sent has no source; one made from a
            // transport error (no connection, the daemon gone) has one.
            tonic::Code::Unavailable if std::error::Error::source(&s).is_none() => {
                EXIT_TIER_UNREACHABLE
            }
            tonic::Code::Unavailable => EXIT_DAEMON_UNREACHABLE,
            tonic::Code::NotFound => 4,
            _ => 1,
        };
        Failure {
            code,
            message: s.message().to_owned(),
        }
    }
}

impl From<std::io::Error> for Failure {
    fn from(e: std::io::Error) -> Self {
        Failure {
            code: 1,
            message: e.to_string(),
        }
    }
}

fn fail(code: u8, message: impl Into<String>) -> Failure {
    Failure {
        code,
        message: message.into(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cairn: starting the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("cairn: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}

async fn run(cli: Cli) -> Result<(), Failure> {
    let mut clients = Clients::connect(&cli.socket)
        .await
        .map_err(|e| fail(3, format!("cannot reach cairnd at {}: {e}", cli.socket)))?;
    let tenant = cli.tenant.clone();
    match cli.command {
        Command::Status { job: None } => status(&mut clients, cli.json).await,
        Command::Status { job: Some(job) } => {
            job_status(&mut clients, &tenant, job, cli.json).await
        }
        Command::List { job } => {
            list(&mut clients, &tenant, job.unwrap_or_default(), cli.json).await
        }
        Command::Save {
            job,
            step,
            rank,
            world_size,
            dir,
        } => {
            save(
                &mut clients,
                &tenant,
                job,
                step,
                rank,
                world_size,
                &dir,
                cli.json,
            )
            .await
        }
        Command::Restore {
            job,
            step,
            rank,
            to,
            no_verify,
            node,
        } => {
            let step = match step.as_str() {
                "latest" => None,
                s => Some(s.parse().map_err(|_| {
                    fail(
                        2,
                        format!("--step {s:?} is neither a number nor \"latest\""),
                    )
                })?),
            };
            match node {
                Some(node) => {
                    prefetch(&mut clients, &tenant, job, step, rank, node, cli.json).await
                }
                None => {
                    restore(
                        &mut clients,
                        &tenant,
                        job,
                        step,
                        rank,
                        to,
                        no_verify,
                        cli.json,
                    )
                    .await
                }
            }
        }
        Command::Verify {
            job,
            step,
            rank,
            tier,
            repair,
        } => {
            verify(
                &mut clients,
                &tenant,
                job,
                step,
                rank,
                tier,
                repair,
                cli.json,
            )
            .await
        }
        Command::Wait {
            job,
            step,
            tier,
            timeout_secs,
        } => {
            let started = Instant::now();
            clients
                .checkpoint
                .wait_durable(pb::WaitDurableRequest {
                    tenant,
                    job: job.clone(),
                    step,
                    rank: None,
                    tier: tier.to_pb() as i32,
                    timeout_ms: timeout_secs * 1000,
                })
                .await?;
            let secs = started.elapsed().as_secs_f64();
            if cli.json {
                println!(
                    "{}",
                    json!({"job": job, "step": step, "tier": tier.to_pb().as_str_name(), "waited_seconds": secs})
                );
            } else {
                println!(
                    "step {step} of {job} is durable in the {} tier (waited {secs:.2}s)",
                    tier_name(tier.to_pb() as i32)
                );
            }
            Ok(())
        }
        Command::Delete { job, step } => {
            let resp = clients
                .checkpoint
                .delete_step(pb::DeleteStepRequest {
                    tenant,
                    job: job.clone(),
                    step,
                })
                .await?
                .into_inner();
            if cli.json {
                println!(
                    "{}",
                    json!({"job": job, "step": step, "shards_deleted": resp.shards_deleted})
                );
            } else {
                println!(
                    "deleted step {step} of {job} ({} shards)",
                    resp.shards_deleted
                );
            }
            Ok(())
        }
        Command::Gc { dry_run } => {
            let resp = clients
                .admin
                .gc(pb::GcRequest { dry_run })
                .await?
                .into_inner();
            if cli.json {
                println!(
                    "{}",
                    json!({"dry_run": dry_run, "chunks": resp.chunks_removed, "bytes": resp.bytes_removed,
                           "object_store": {"chunks": resp.object_store_chunks_removed, "bytes": resp.object_store_bytes_removed,
                                            "skipped_tenants": resp.object_store_skipped_tenants}})
                );
            } else {
                let verb = if dry_run { "would remove" } else { "removed" };
                println!(
                    "disk: {verb} {} unreferenced chunks ({})",
                    resp.chunks_removed,
                    human_bytes(resp.bytes_removed)
                );
                if resp.object_store_configured {
                    println!(
                        "object store: {verb} {} unreferenced chunks ({})",
                        resp.object_store_chunks_removed,
                        human_bytes(resp.object_store_bytes_removed)
                    );
                }
                for tenant in &resp.object_store_skipped_tenants {
                    println!(
                        "object store: tenant {tenant} skipped (a manifest cannot be read; see the daemon's log)"
                    );
                }
            }
            Ok(())
        }
    }
}

fn tier_name(tier: i32) -> &'static str {
    match pb::Tier::try_from(tier) {
        Ok(pb::Tier::Memory) => "memory",
        Ok(pb::Tier::Disk) => "disk",
        Ok(pb::Tier::Peers) => "peers",
        Ok(pb::Tier::ObjectStore) => "object-store",
        _ => "unknown",
    }
}

fn state_name(state: i32) -> &'static str {
    match pb::ShardState::try_from(state) {
        Ok(pb::ShardState::Absent) => "-",
        Ok(pb::ShardState::Pending) => "pending",
        Ok(pb::ShardState::Durable) => "durable",
        Ok(pb::ShardState::Failed) => "FAILED",
        _ => "?",
    }
}

fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// Waits for `call` (a RestoreShard) and meanwhile shows the daemon's
/// progress on it (from `Status`) as a bar, once it is fetching bytes.
async fn with_restore_progress<T>(
    call: impl std::future::Future<Output = T>,
    admin: &mut AdminClient<Channel>,
    selector: &pb::ShardSelector,
    json: bool,
) -> T {
    let mut call = std::pin::pin!(call);
    let mut ticks = tokio::time::interval(std::time::Duration::from_millis(250));
    let mut bar: Option<ProgressBar> = None;
    let is_ours = |p: &&pb::RestoreProgress| {
        p.shard.as_ref().is_some_and(|s| {
            s.job == selector.job
                && s.rank == selector.rank
                && selector.step.is_none_or(|step| s.step == step)
                && (selector.tenant.is_empty() || s.tenant == selector.tenant)
        })
    };
    loop {
        tokio::select! {
            out = &mut call => {
                if let Some(bar) = bar {
                    bar.finish_and_clear();
                }
                return out;
            }
            _ = ticks.tick(), if !json => {
                let Ok(status) = admin.status(pb::StatusRequest {}).await else { continue };
                if let Some(progress) = status.get_ref().restores.iter().find(is_ours) {
                    let bar = bar.get_or_insert_with(|| progress_bar(0, "restore"));
                    show_restore_progress(bar, progress);
                }
            }
        }
    }
}

/// Moves `bar` to a running restore's position, naming its sources.
fn show_restore_progress(bar: &ProgressBar, progress: &pb::RestoreProgress) {
    bar.set_length(progress.total_bytes);
    bar.set_position(progress.done_bytes);
    bar.set_prefix(bytes_from(&progress_sources(progress)));
}

/// A running restore's bytes by source (`disk`, `peer:<node>`, `object-store`).
fn progress_sources(progress: &pb::RestoreProgress) -> Vec<(String, u64)> {
    progress
        .sources
        .iter()
        .map(|s| (s.source.clone(), s.bytes))
        .collect()
}

/// A finished restore's bytes by the tier they came from.
fn tier_sources(sources: &[pb::SourceBytes]) -> Vec<(String, u64)> {
    sources
        .iter()
        .map(|s| (tier_name(s.tier).to_owned(), s.bytes))
        .collect()
}

/// Where a restore's bytes came from, for people: `1.0 GiB from disk, 20 MiB
/// from peer:node-2`.
fn bytes_from(sources: &[(String, u64)]) -> String {
    sources
        .iter()
        .map(|(source, bytes)| format!("{} from {source}", human_bytes(*bytes)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The same for scripts: source to bytes.
fn sources_json(sources: &[(String, u64)]) -> serde_json::Value {
    sources
        .iter()
        .map(|(source, bytes)| (source.clone(), json!(bytes)))
        .collect::<serde_json::Map<_, _>>()
        .into()
}

fn progress_bar(total: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(total);
    let style = ProgressStyle::with_template(
        "{msg} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta} {prefix}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ");
    bar.set_style(style);
    bar.set_message(what.to_owned());
    bar
}

/// Where each shard of a job lives: per step, whether every rank can be
/// restored and from where, newest step first.
async fn job_status(
    clients: &mut Clients,
    tenant: &str,
    job: String,
    json: bool,
) -> Result<(), Failure> {
    let resp = clients
        .checkpoint
        .list_steps(pb::ListStepsRequest {
            tenant: tenant.to_owned(),
            job: job.clone(),
            wait_for_all_tiers: false,
        })
        .await?
        .into_inner();
    let left_out = resp.left_out.clone();
    let Some(steps) = resp
        .jobs
        .into_iter()
        .find(|j| j.job == job)
        .map(|j| j.steps)
    else {
        if !left_out.is_empty() {
            return Err(fail(
                EXIT_TIER_UNREACHABLE,
                format!(
                    "job {job} has no checkpoint in what answered; left out: {}",
                    left_out.join("; ")
                ),
            ));
        }
        return Err(fail(
            4,
            format!("job {job} has no checkpoint this node can see"),
        ));
    };
    let latest = steps.iter().filter(|s| s.restorable).map(|s| s.step).max();
    let places = |r: &pb::ShardStatus| -> Vec<String> {
        let mut places: Vec<String> = r
            .tiers
            .iter()
            .filter(|t| {
                t.state == pb::ShardState::Durable as i32 && t.tier != pb::Tier::Peers as i32
            })
            .map(|t| tier_name(t.tier).to_owned())
            .collect();
        places.extend(
            r.peer_holders
                .iter()
                .map(|h| format!("peer {h}{}", unreachable_mark(&left_out, h))),
        );
        places
    };
    if json {
        let steps: Vec<_> = steps
            .iter()
            .rev()
            .map(|s| {
                let ranks: Vec<_> = s
                    .shards
                    .iter()
                    .map(|r| json!({"rank": r.rank, "bytes": r.total_bytes, "world_size": r.world_size, "in": places(r)}))
                    .collect();
                json!({"step": s.step, "restorable": s.restorable,
                       "object_store_complete": s.object_store_complete, "ranks": ranks})
            })
            .collect();
        println!(
            "{}",
            json!({"job": job, "latest_restorable": latest, "steps": steps, "left_out": left_out})
        );
        return Ok(());
    }
    print_left_out(&left_out);
    match latest {
        Some(step) => println!("job {job}: latest restorable step {step}"),
        None if left_out.is_empty() => {
            println!("job {job}: no step is restorable (some rank is missing from every step)")
        }
        None => println!(
            "job {job}: no step is restorable from what answered (the view is partial, see above)"
        ),
    }
    for s in steps.iter().rev() {
        println!(
            "step {} — {}",
            s.step,
            if s.restorable {
                "restorable"
            } else {
                "NOT restorable"
            }
        );
        for r in &s.shards {
            let places = places(r);
            println!(
                "  rank {:>4} {:>10}  {}",
                r.rank,
                human_bytes(r.total_bytes),
                if places.is_empty() {
                    "nowhere durable yet".to_owned()
                } else {
                    places.join(", ")
                }
            );
        }
    }
    Ok(())
}

async fn status(clients: &mut Clients, json: bool) -> Result<(), Failure> {
    let s = clients
        .admin
        .status(pb::StatusRequest {})
        .await?
        .into_inner();
    if json {
        let tiers: Vec<_> = s
            .tiers
            .iter()
            .map(|t| json!({"tier": tier_name(t.tier), "path": t.path, "used_bytes": t.used_bytes, "capacity_bytes": t.capacity_bytes, "shards": t.shards}))
            .collect();
        let peers = s.peers.as_ref().map(|p| {
            let members: Vec<_> = p
                .members
                .iter()
                .map(|m| json!({"node_id": m.node_id, "address": m.address, "zone": m.zone, "rack": m.rack,
                                "unreachable": m.unreachable, "last_contact_unix_ms": m.last_contact_unix_ms,
                                "holds_shards": m.holds_shards}))
                .collect();
            json!({"node_id": p.node_id, "replicas": p.replicas, "membership_source": p.membership_source,
                   "members": members, "pending_replications": p.pending_replications,
                   "under_replicated_shards": p.under_replicated_shards, "replica_shards": p.replica_shards,
                   "replica_bytes": p.replica_bytes, "insecure": p.insecure,
                   "membership_problem": p.membership_problem,
                   "scrub": {"passes": p.scrub_passes, "checked_chunks": p.scrub_checked_chunks,
                             "pass_chunks": p.scrub_pass_chunks, "bad_chunks": p.scrub_bad_chunks,
                             "bytes_per_sec": p.scrub_bytes_per_sec}})
        });
        let restores: Vec<_> = s
            .restores
            .iter()
            .map(|r| {
                let shard = r.shard.clone().unwrap_or_default();
                json!({"tenant": shard.tenant, "job": shard.job, "step": shard.step, "rank": shard.rank,
                       "total_bytes": r.total_bytes, "done_bytes": r.done_bytes,
                       "sources": sources_json(&progress_sources(r)),
                       "elapsed_seconds": r.elapsed_seconds})
            })
            .collect();
        println!(
            "{}",
            json!({"node": s.node, "version": s.version, "default_tenant": s.default_tenant, "metrics_addr": s.metrics_addr,
                   "open_sessions": s.open_sessions, "pending_writebacks": s.pending_writebacks,
                   "pending_uploads": s.pending_uploads, "tiers": tiers, "peers": peers,
                   "restores": restores})
        );
        return peer_tier_up(&s);
    }
    println!(
        "node {} (cairnd {}), default tenant {}",
        s.node, s.version, s.default_tenant
    );
    println!(
        "open sessions {}, pending write-backs {}, pending uploads {}",
        s.open_sessions, s.pending_writebacks, s.pending_uploads
    );
    println!(
        "{:<12} {:>12} {:>12} {:>8}  path",
        "tier", "used", "capacity", "shards"
    );
    for t in &s.tiers {
        let capacity = if t.capacity_bytes == 0 {
            "-".into()
        } else {
            human_bytes(t.capacity_bytes)
        };
        println!(
            "{:<12} {:>12} {:>12} {:>8}  {}",
            tier_name(t.tier),
            human_bytes(t.used_bytes),
            capacity,
            t.shards,
            t.path
        );
    }
    for r in &s.restores {
        let shard = r.shard.clone().unwrap_or_default();
        let from = progress_sources(r);
        println!(
            "restoring {} step {} rank {}: {} of {} ({:.0} s){}{}",
            shard.job,
            shard.step,
            shard.rank,
            human_bytes(r.done_bytes),
            human_bytes(r.total_bytes),
            r.elapsed_seconds,
            if from.is_empty() { "" } else { "; " },
            bytes_from(&from)
        );
    }
    if let Some(p) = &s.peers {
        println!(
            "peer tier: node id {}, {} replica(s) per shard, membership from {}{}",
            p.node_id,
            p.replicas,
            p.membership_source,
            if p.insecure {
                ", WITHOUT TLS"
            } else {
                ", mutual TLS"
            }
        );
        if !p.membership_problem.is_empty() {
            println!("  DOWN: {}", p.membership_problem);
        }
        println!(
            "  replicating {} shard(s), {} short of replicas; holding {} replica(s) ({}) for other nodes",
            p.pending_replications,
            p.under_replicated_shards,
            p.replica_shards,
            human_bytes(p.replica_bytes)
        );
        if p.scrub_bytes_per_sec == 0 {
            println!("  scrubbing of held replicas: off");
        } else {
            println!(
                "  scrubbing of held replicas: {} pass(es) done, {}/{} chunks of this pass, {} bad chunk(s) found, at most {}/s",
                p.scrub_passes,
                p.scrub_checked_chunks,
                p.scrub_pass_chunks,
                p.scrub_bad_chunks,
                human_bytes(p.scrub_bytes_per_sec)
            );
        }
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        for m in &p.members {
            let domain = match (m.zone.as_str(), m.rack.as_str()) {
                ("", "") => String::new(),
                (zone, rack) => format!(" zone={zone} rack={rack}"),
            };
            let health = if m.node_id == p.node_id {
                " (this node)".to_owned()
            } else {
                let contact = match m.last_contact_unix_ms {
                    0 => "no contact yet".to_owned(),
                    at => format!("last answered {} s ago", now_ms.saturating_sub(at) / 1000),
                };
                format!(
                    ": {}, {contact}, holds {} of this node's shards",
                    if m.unreachable {
                        "UNREACHABLE"
                    } else {
                        "reachable"
                    },
                    m.holds_shards
                )
            };
            println!(
                "  member {} at {}{}{}",
                m.node_id, m.address, domain, health
            );
        }
    }
    peer_tier_up(&s)
}

/// Fails (exit 6) when the node's peer tier is down, so that `cairn
/// status`, the DaemonSet's readiness probe, reports it.
fn peer_tier_up(s: &pb::StatusResponse) -> Result<(), Failure> {
    match s.peers.as_ref().map(|p| p.membership_problem.as_str()) {
        Some(problem) if !problem.is_empty() => Err(fail(
            EXIT_TIER_UNREACHABLE,
            format!("the peer tier is down: {problem}"),
        )),
        _ => Ok(()),
    }
}

async fn list(clients: &mut Clients, tenant: &str, job: String, json: bool) -> Result<(), Failure> {
    let resp = clients
        .checkpoint
        .list_steps(pb::ListStepsRequest {
            tenant: tenant.to_owned(),
            job,
            wait_for_all_tiers: false,
        })
        .await?
        .into_inner();
    if json {
        let jobs: Vec<_> = resp
            .jobs
            .iter()
            .map(|j| {
                let steps: Vec<_> = j
                    .steps
                    .iter()
                    .map(|s| {
                        let shards: Vec<_> = s
                            .shards
                            .iter()
                            .map(|r| {
                                let tiers: serde_json::Map<String, serde_json::Value> = r
                                    .tiers
                                    .iter()
                                    .map(|t| (tier_name(t.tier).to_owned(), json!(state_name(t.state))))
                                    .collect();
                                json!({"rank": r.rank, "bytes": r.total_bytes, "world_size": r.world_size, "tiers": tiers,
                                       "peer_holders": r.peer_holders, "peer_replicas_wanted": r.peer_replicas_wanted,
                                       "peer_problem": r.peer_problem})
                            })
                            .collect();
                        json!({"step": s.step, "restorable": s.restorable,
                               "object_store_complete": s.object_store_complete, "shards": shards})
                    })
                    .collect();
                json!({"job": j.job, "steps": steps})
            })
            .collect();
        println!("{}", json!({ "jobs": jobs, "left_out": resp.left_out }));
        return Ok(());
    }
    print_left_out(&resp.left_out);
    if resp.jobs.is_empty() {
        println!(
            "no checkpoints{}",
            if resp.left_out.is_empty() {
                ""
            } else {
                " in what answered"
            }
        );
        return Ok(());
    }
    println!(
        "{:<24} {:>10} {:>6} {:>12} {:>8} {:>8} {:>10} {:>12}  restorable",
        "job", "step", "rank", "size", "memory", "disk", "peers", "object-store"
    );
    for j in &resp.jobs {
        for s in &j.steps {
            for r in &s.shards {
                let state = |tier: pb::Tier| {
                    r.tiers
                        .iter()
                        .find(|t| t.tier == tier as i32)
                        .map(|t| state_name(t.state))
                        .unwrap_or("-")
                };
                let peers = if r.peer_replicas_wanted == 0 {
                    "-".to_owned()
                } else {
                    format!("{}/{}", r.peer_holders.len(), r.peer_replicas_wanted)
                };
                println!(
                    "{:<24} {:>10} {:>6} {:>12} {:>8} {:>8} {:>10} {:>12}  {}",
                    j.job,
                    s.step,
                    r.rank,
                    human_bytes(r.total_bytes),
                    state(pb::Tier::Memory),
                    state(pb::Tier::Disk),
                    peers,
                    state(pb::Tier::ObjectStore),
                    match (s.restorable, s.object_store_complete) {
                        (true, true) => "yes (complete in object store)",
                        (true, false) => "yes",
                        (false, _) => "no",
                    }
                );
                if !r.peer_holders.is_empty() || !r.peer_problem.is_empty() {
                    println!(
                        "{:<24} peers holding it: {}{}",
                        "",
                        if r.peer_holders.is_empty() {
                            "none".to_owned()
                        } else {
                            r.peer_holders
                                .iter()
                                .map(|h| format!("{h}{}", unreachable_mark(&resp.left_out, h)))
                                .collect::<Vec<_>>()
                                .join(", ")
                        },
                        if r.peer_problem.is_empty() {
                            String::new()
                        } else {
                            format!("; {}", r.peer_problem)
                        }
                    );
                }
            }
        }
    }
    Ok(())
}

/// Says, before a listing, what it could not ask: the view is partial.
fn print_left_out(left_out: &[String]) {
    for what in left_out {
        println!("partial view: {what}");
    }
}

/// " (unreachable)" for a holder the listing could not reach.
fn unreachable_mark(left_out: &[String], holder: &str) -> &'static str {
    if left_out
        .iter()
        .any(|l| l == &format!("peer {holder}: unreachable"))
    {
        " (unreachable)"
    } else {
        ""
    }
}

/// Regular files under `dir`, as (relative name, path, size), sorted by name.
fn collect_files(dir: &Path) -> Result<Vec<(String, PathBuf, u64)>, Failure> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let entries =
            std::fs::read_dir(&d).map_err(|e| fail(2, format!("reading {}: {e}", d.display())))?;
        for entry in entries {
            let entry = entry?;
            let meta = entry.metadata()?;
            let path = entry.path();
            if meta.is_dir() {
                stack.push(path);
            } else if meta.is_file() {
                let rel = path
                    .strip_prefix(dir)
                    .unwrap_or(&path)
                    .to_string_lossy()
                    .into_owned();
                out.push((rel, path, meta.len()));
            }
        }
    }
    out.sort();
    Ok(out)
}

#[allow(clippy::too_many_arguments)]
async fn save(
    clients: &mut Clients,
    tenant: &str,
    job: String,
    step: u64,
    rank: u32,
    world_size: Option<u32>,
    dir: &Path,
    json: bool,
) -> Result<(), Failure> {
    let files = collect_files(dir)?;
    let total: u64 = files.iter().map(|f| f.2).sum();
    let started = Instant::now();
    let begin = clients
        .checkpoint
        .begin_shard(pb::BeginShardRequest {
            shard: Some(pb::ShardRef {
                tenant: tenant.to_owned(),
                job: job.clone(),
                step,
                rank,
            }),
            files: files
                .iter()
                .map(|(name, _, size)| pb::FileSpec {
                    name: name.clone(),
                    size: *size,
                    metadata: HashMap::new(),
                })
                .collect(),
            world_size,
            metadata: HashMap::new(),
            attempt: String::new(),
        })
        .await?
        .into_inner();
    let bar = progress_bar(total, "save");
    let copied = copy_into_staged(&files, &begin.files, &bar);
    bar.finish_and_clear();
    let written = Instant::now();
    if let Err(e) = copied {
        let _ = clients
            .checkpoint
            .abort_shard(pb::AbortShardRequest {
                session_id: begin.session_id,
            })
            .await;
        return Err(e);
    }
    let commit = clients
        .checkpoint
        .commit_shard(pb::CommitShardRequest {
            session_id: begin.session_id,
        })
        .await?
        .into_inner();
    let info = commit.shard.unwrap_or_default();
    let (write_s, total_s) = (
        (written - started).as_secs_f64(),
        started.elapsed().as_secs_f64(),
    );
    if json {
        println!(
            "{}",
            json!({"job": job, "step": step, "rank": rank, "bytes": info.total_bytes, "files": info.file_count,
                   "chunks": info.chunk_count, "write_seconds": write_s, "total_seconds": total_s})
        );
    } else {
        println!(
            "saved {job} step {step} rank {rank}: {} in {} files, {} chunks; wrote in {write_s:.2}s, committed after {total_s:.2}s",
            human_bytes(info.total_bytes),
            info.file_count,
            info.chunk_count
        );
    }
    Ok(())
}

/// Copies each source file into its staged file with `pwrite`, reusing one
/// buffer.
fn copy_into_staged(
    files: &[(String, PathBuf, u64)],
    staged: &[pb::StagedFile],
    bar: &ProgressBar,
) -> Result<(), Failure> {
    let mut buf = vec![0u8; 8 * 1024 * 1024];
    for ((name, src, _), dst) in files.iter().zip(staged) {
        let mut input = std::fs::File::open(src)
            .map_err(|e| fail(1, format!("opening {}: {e}", src.display())))?;
        let output = std::fs::OpenOptions::new()
            .write(true)
            .open(&dst.path)
            .map_err(|e| {
                fail(
                    1,
                    format!("opening staged file for {name} at {}: {e}", dst.path),
                )
            })?;
        let mut offset = 0u64;
        loop {
            let n = input.read(&mut buf)?;
            if n == 0 {
                break;
            }
            output.write_all_at(&buf[..n], offset)?;
            offset += n as u64;
            bar.inc(n as u64);
        }
    }
    Ok(())
}

/// `cairn restore --node`: has another node restore the shard into its
/// memory tier, and says where the bytes came from.
async fn prefetch(
    clients: &mut Clients,
    tenant: &str,
    job: String,
    step: Option<u64>,
    rank: u32,
    node: String,
    json: bool,
) -> Result<(), Failure> {
    let started = Instant::now();
    let bar = progress_bar(0, &format!("restoring on {node}"));
    if json {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let mut events = clients
        .admin
        .prefetch(pb::PrefetchRequest {
            node,
            shard: Some(pb::ShardSelector {
                tenant: tenant.to_owned(),
                job: job.clone(),
                step,
                rank,
            }),
        })
        .await?
        .into_inner();
    let mut done = None;
    while let Some(event) = events.message().await? {
        match event.event {
            Some(pb::prefetch_progress::Event::Progress(p)) => show_restore_progress(&bar, &p),
            Some(pb::prefetch_progress::Event::Done(d)) => done = Some(d),
            None => {}
        }
    }
    bar.finish_and_clear();
    let resp = done.ok_or_else(|| fail(1, "the daemon ended the prefetch without a result"))?;
    let sources = tier_sources(&resp.sources);
    if json {
        println!(
            "{}",
            json!({"node": resp.node, "job": job, "step": resp.step, "rank": rank,
                   "bytes": resp.bytes, "sources": sources_json(&sources),
                   "seconds": started.elapsed().as_secs_f64()})
        );
    } else {
        println!(
            "{} holds step {} of {job} rank {rank} in its memory tier ({}; {:.1} s)",
            resp.node,
            resp.step,
            bytes_from(&sources),
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn restore(
    clients: &mut Clients,
    tenant: &str,
    job: String,
    step: Option<u64>,
    rank: u32,
    to: Option<PathBuf>,
    no_verify: bool,
    json: bool,
) -> Result<(), Failure> {
    let started = Instant::now();
    let selector = pb::ShardSelector {
        tenant: tenant.to_owned(),
        job: job.clone(),
        step,
        rank,
    };
    let mut checkpoint = clients.checkpoint.clone();
    let call = checkpoint.restore_shard(pb::RestoreShardRequest {
        shard: Some(selector.clone()),
        skip_verify: no_verify,
    });
    let resp = with_restore_progress(call, &mut clients.admin, &selector, json)
        .await?
        .into_inner();
    let manifest = resp.manifest.clone().unwrap_or_default();
    let restored_step = manifest.shard.as_ref().map(|s| s.step).unwrap_or_default();
    let total: u64 = manifest.files.iter().map(|f| f.size).sum();
    let restore_s = started.elapsed().as_secs_f64();
    if let Some(dir) = &to {
        let bar = progress_bar(total, "copy");
        let local = resp.files.iter().all(|f| Path::new(&f.path).exists());
        if local {
            copy_out(&resp.files, dir, &bar)?;
        } else {
            stream_out(clients, selector, &manifest, dir, &bar).await?;
        }
        bar.finish_and_clear();
    }
    let sources = tier_sources(&resp.sources);
    if json {
        let files: Vec<_> = resp
            .files
            .iter()
            .map(|f| json!({"name": f.name, "path": f.path, "size": f.size}))
            .collect();
        println!(
            "{}",
            json!({"job": job, "step": restored_step, "rank": rank, "bytes": total, "files": files,
                   "sources": sources_json(&sources),
                   "restore_seconds": restore_s, "total_seconds": started.elapsed().as_secs_f64(),
                   "copied_to": to.map(|p| p.display().to_string())})
        );
    } else {
        println!(
            "restored {job} step {restored_step} rank {rank}: {} in {} files ({}) in {restore_s:.2}s",
            human_bytes(total),
            resp.files.len(),
            bytes_from(&sources)
        );
        match &to {
            Some(dir) => println!(
                "copied to {} in {:.2}s",
                dir.display(),
                started.elapsed().as_secs_f64()
            ),
            None => {
                for f in &resp.files {
                    println!("  {}  {}", f.path, human_bytes(f.size));
                }
            }
        }
    }
    Ok(())
}

fn target_path(dir: &Path, name: &str) -> Result<PathBuf, Failure> {
    let path = dir.join(name);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| fail(1, format!("creating {}: {e}", parent.display())))?;
    }
    Ok(path)
}

fn copy_out(files: &[pb::RestoredFile], dir: &Path, bar: &ProgressBar) -> Result<(), Failure> {
    let mut buf = vec![0u8; 8 * 1024 * 1024];
    for f in files {
        let mut input = std::fs::File::open(&f.path)
            .map_err(|e| fail(1, format!("opening {}: {e}", f.path)))?;
        let path = target_path(dir, &f.name)?;
        let mut output = std::fs::File::create(&path)
            .map_err(|e| fail(1, format!("creating {}: {e}", path.display())))?;
        loop {
            let n = input.read(&mut buf)?;
            if n == 0 {
                break;
            }
            output.write_all(&buf[..n])?;
            bar.inc(n as u64);
        }
    }
    Ok(())
}

async fn stream_out(
    clients: &mut Clients,
    selector: pb::ShardSelector,
    manifest: &pb::ShardManifest,
    dir: &Path,
    bar: &ProgressBar,
) -> Result<(), Failure> {
    let mut selector = selector;
    selector.step = manifest.shard.as_ref().map(|s| s.step);
    let mut stream = clients
        .checkpoint
        .read_shard(pb::ReadShardRequest {
            shard: Some(selector),
        })
        .await?
        .into_inner();
    let mut outputs = Vec::new();
    for f in &manifest.files {
        let path = target_path(dir, &f.name)?;
        let file = std::fs::File::create(&path)
            .map_err(|e| fail(1, format!("creating {}: {e}", path.display())))?;
        file.set_len(f.size)?;
        outputs.push(file);
    }
    while let Some(msg) = stream.message().await? {
        if let Some(pb::read_shard_response::Msg::Data(d)) = msg.msg {
            let out = outputs.get(d.file_index as usize).ok_or_else(|| {
                fail(
                    1,
                    format!("cairnd sent data for unknown file {}", d.file_index),
                )
            })?;
            out.write_all_at(&d.data, d.offset)?;
            bar.inc(d.data.len() as u64);
        }
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn verify(
    clients: &mut Clients,
    tenant: &str,
    job: String,
    step: u64,
    rank: Option<u32>,
    tier: TierArg,
    repair: bool,
    json: bool,
) -> Result<(), Failure> {
    let mut stream = clients
        .admin
        .verify(pb::VerifyRequest {
            tenant: tenant.to_owned(),
            job: job.clone(),
            step,
            rank,
            tier: tier.to_pb() as i32,
            repair,
        })
        .await?
        .into_inner();
    let bar = progress_bar(0, "verify");
    let mut report = None;
    while let Some(p) = stream.message().await? {
        if p.done {
            report = Some(p);
            break;
        }
        bar.set_length(p.bytes_total);
        bar.set_position(p.bytes_done);
    }
    bar.finish_and_clear();
    let report =
        report.ok_or_else(|| fail(1, "cairnd ended the verify stream without a report"))?;
    let bad: Vec<_> = report.bad_chunks.iter().filter(|b| !b.repaired).collect();
    if json {
        let chunks: Vec<_> = report
            .bad_chunks
            .iter()
            .map(|b| json!({"rank": b.rank, "file": b.file, "offset": b.offset, "chunk": hex_id(&b.chunk_id), "problem": b.problem, "repaired": b.repaired, "holder": b.holder}))
            .collect();
        println!(
            "{}",
            json!({"job": job, "step": step, "tier": tier_name(tier.to_pb() as i32), "ok": bad.is_empty(), "bad_chunks": chunks})
        );
    } else if report.bad_chunks.is_empty() {
        println!(
            "step {step} of {job} in the {} tier: every chunk verified",
            tier_name(tier.to_pb() as i32)
        );
    } else {
        for b in &report.bad_chunks {
            println!(
                "rank {} file {} offset {} chunk {}: {}{}{}",
                b.rank,
                b.file,
                b.offset,
                hex_id(&b.chunk_id),
                b.problem,
                if b.holder.is_empty() {
                    String::new()
                } else {
                    format!(" on {}", b.holder)
                },
                if b.repaired { " (repaired)" } else { "" }
            );
        }
    }
    if bad.is_empty() {
        Ok(())
    } else {
        Err(fail(
            5,
            format!(
                "{} bad chunks in step {step} of {job} in the {} tier",
                bad.len(),
                tier_name(tier.to_pb() as i32)
            ),
        ))
    }
}

fn hex_id(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
