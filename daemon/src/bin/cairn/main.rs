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

mod format;
mod list;
mod maintenance;
mod progress;
mod restore;
mod save;
mod status;
mod verify;

use format::*;
use list::*;
use maintenance::*;
use progress::*;
use restore::*;
use save::*;
use status::*;
use verify::*;

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
#[derive(Debug)]
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
            wait(
                &mut clients,
                tenant,
                job,
                step,
                tier,
                timeout_secs,
                cli.json,
            )
            .await
        }
        Command::Delete { job, step } => delete(&mut clients, tenant, job, step, cli.json).await,
        Command::Gc { dry_run } => gc(&mut clients, dry_run, cli.json).await,
    }
}
