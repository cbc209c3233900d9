//! The fault matrix as a suite: `./scripts/torture [--quick] [--runs N]`
//! runs the ignored tests of this file; `docs/reliability.md` holds the
//! figures of the last full run and what each row does.
//!
//! Each row puts real `cairnd` processes through one fault, many times
//! (`TORTURE_RUNS` per row), each run with its own random sizes, shard
//! layout and moment of failure drawn from a seed (`TORTURE_SEED`; every
//! failure message names its run's seed, and `TORTURE_SEED=S TORTURE_RUNS=1
//! TORTURE_ROW=name` repeats a run). The faults:
//!
//! - a SIGKILL at every named crash point of save, commit, write-back,
//!   upload and replication (`FAILPOINTS=<point>=K*off->return` with a
//!   random K, so the daemon dies at a random shard or chunk), and a
//!   `kill -9` at a random moment of a run of saves;
//! - the object store (SeaweedFS) behind a fault-injecting proxy
//!   (`common::faultproxy`: 503 SlowDown, connection resets, stalled
//!   requests and parts), and behind one that never answers;
//! - the disk tier on a small tmpfs that fills at a random offset.
//!
//! After each run the daemon is restarted cleanly and what it lists is
//! checked against a ledger of what the client wrote and which saves were
//! acknowledged:
//!
//! 1. every acknowledged step is listed as restorable and restores
//!    byte-identical; a missing or different shard counts its bytes as lost;
//! 2. no step is listed as restorable unless all its shards were
//!    acknowledged. The one exception is a shard whose commit was in flight
//!    when the daemon died *after* renaming it into place (`commit.before_ack`,
//!    or a kill at a random moment): the shard is complete and only its reply
//!    was lost, so it may be listed, and must then restore byte-identical
//!    too. A crash before the rename never lists the shard;
//! 3. after recovery every acknowledged step reaches the tier the row is
//!    about, and restores from that tier alone (the memory tier wiped, or a
//!    brand-new node reading the bucket, or a wiped node reading its peers).
//!
//! Results go to stderr, one line per row, and as JSON lines to
//! `TORTURE_RESULTS` when set (what `./scripts/torture` prints as a table).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use cairn_daemon::client::Clients;
use cairn_proto::v1 as pb;
use common::faultproxy::{FaultPlan, FaultProxy};
use common::netns::Network;
use common::{
    Daemon, TEST_CHUNK, begin_request, bytes, files_under, restore, shard, start_daemon,
    start_daemon_with_env, wait_durable, write_staged,
};
use testkit::pki::TestPki;
use testkit::s3::{self, SeaweedFs};

/// Every named crash point of cairnd and the row that kills it there. A
/// `crash_point("...")` in `daemon/src` without a row here fails
/// `every_crash_point_has_a_row`.
const CRASH_POINTS: &[&str] = &[
    "commit.before_hash",
    "commit.after_hash",
    "commit.after_manifest",
    "commit.before_ack",
    "writeback.before_manifest",
    "writeback.after_manifest",
    "upload.after_chunk",
    "upload.before_marker",
    "peer.receive_chunk",
    "peer.serve_chunk",
];

/// Crash points before the commit point (the rename into the memory tier):
/// the shard being committed must never be listed.
const BEFORE_COMMIT: &[&str] = &[
    "commit.before_hash",
    "commit.after_hash",
    "commit.after_manifest",
];

/// Largest file of a shard in the local rows (32 test chunks).
const LOCAL_MAX_FILE: u64 = 32 * TEST_CHUNK;

/// Retention is not what these rows test: every step a run saves stays in
/// the local tiers (and, in the peer rows, on the holders) unless a fault
/// removes it.
const NO_RETENTION: [&str; 4] = ["--memory-keep-last", "1000", "--disk-keep-last", "1000"];

/// How long recovery may take before a step that should be durable in a
/// tier counts as a failure of the row.
const RECOVERY: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------
// Settings, randomness, results
// ---------------------------------------------------------------------------

struct Settings {
    runs: usize,
    seed: u64,
    results: Option<PathBuf>,
    only: Option<String>,
}

fn settings() -> &'static Settings {
    static SETTINGS: OnceLock<Settings> = OnceLock::new();
    SETTINGS.get_or_init(|| {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let seed = var("TORTURE_SEED")
            .map(|s| s.parse().expect("TORTURE_SEED is a number"))
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(1)
            });
        let runs = var("TORTURE_RUNS")
            .map(|s| s.parse().expect("TORTURE_RUNS is a number"))
            .unwrap_or(3);
        eprintln!("torture: TORTURE_SEED={seed} TORTURE_RUNS={runs}");
        Settings {
            runs,
            seed,
            results: var("TORTURE_RESULTS").map(PathBuf::from),
            only: var("TORTURE_ROW"),
        }
    })
}

/// splitmix64: small, fast, and the same sequence from the same seed.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (0 when `n` is 0).
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next() % n }
    }

    /// Uniform in `lo..hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo)
    }

    fn chance(&mut self, p: f64) -> bool {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }
}

/// The seed of run `run` of row `row`: distinct per row and run, and the
/// same for the same `TORTURE_SEED`.
fn run_seed(seed: u64, row: &str, run: usize) -> u64 {
    let mut rng = Rng::new(seed ^ (run as u64).wrapping_mul(0xA24B_AED4_963E_E407));
    for b in row.bytes() {
        rng.0 ^= u64::from(b);
        rng.next();
    }
    rng.next()
}

/// What one run found.
#[derive(Default)]
struct Outcome {
    problems: Vec<String>,
    /// Bytes of acknowledged shards that did not come back identical.
    bytes_lost: u64,
    /// Whether the fault happened (a failpoint fired, the disk filled).
    fired: bool,
    acked_bytes: u64,
    notes: Vec<String>,
}

impl Outcome {
    fn problem(&mut self, message: impl Into<String>) {
        self.problems.push(message.into());
    }
}

/// One row's figures.
struct RowReport {
    name: String,
    runs: usize,
    failed_runs: usize,
    bytes_lost: u64,
    fired: usize,
    acked_bytes: u64,
    seconds: f64,
    messages: Vec<String>,
    notes: Vec<String>,
    skipped: Option<String>,
}

impl RowReport {
    fn new(name: &str) -> RowReport {
        RowReport {
            name: name.into(),
            runs: 0,
            failed_runs: 0,
            bytes_lost: 0,
            fired: 0,
            acked_bytes: 0,
            seconds: 0.0,
            messages: Vec::new(),
            notes: Vec::new(),
            skipped: None,
        }
    }

    fn wanted(name: &str) -> bool {
        settings()
            .only
            .as_ref()
            .is_none_or(|only| name.contains(only))
    }

    fn skipped(name: &str, why: &str) -> RowReport {
        let mut report = RowReport::new(name);
        report.skipped = Some(why.into());
        report
    }

    /// A problem of the row as a whole (not of one run).
    fn row_problem(&mut self, message: String) {
        self.failed_runs += 1;
        self.messages.push(message);
    }

    /// Prints the row and appends it to `TORTURE_RESULTS`.
    fn publish(&self) {
        let status = match &self.skipped {
            Some(why) => format!("SKIPPED ({why})"),
            None if self.failed_runs == 0 => "ok".into(),
            None => "FAILED".into(),
        };
        eprintln!(
            "torture row {:<44} runs {:>4}  failures {:>3}  bytes lost {:>9}  fault hit {:>4}  {:>7.1} s  {status}",
            self.name, self.runs, self.failed_runs, self.bytes_lost, self.fired, self.seconds
        );
        for m in self.messages.iter().take(10) {
            eprintln!("    {m}");
        }
        for n in self.notes.iter().take(5) {
            eprintln!("    note: {n}");
        }
        let Some(path) = &settings().results else {
            return;
        };
        let record = serde_json::json!({
            "row": self.name,
            "runs": self.runs,
            "failures": self.failed_runs,
            "bytes_lost": self.bytes_lost,
            "fault_hit": self.fired,
            "acked_bytes": self.acked_bytes,
            "seconds": (self.seconds * 10.0).round() / 10.0,
            "seed": settings().seed,
            "skipped": self.skipped,
            "messages": self.messages.iter().take(20).collect::<Vec<_>>(),
            "notes": self.notes.iter().take(20).collect::<Vec<_>>(),
        });
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .expect("open TORTURE_RESULTS");
        writeln!(file, "{record}").expect("write TORTURE_RESULTS");
    }
}

/// Runs `runs` runs of a row, each in its own task (a panic fails that run,
/// not the row), and publishes the row.
async fn row<F, Fut>(name: &str, runs: usize, mut run: F) -> RowReport
where
    F: FnMut(u64) -> Fut,
    Fut: Future<Output = Outcome> + Send + 'static,
{
    if !RowReport::wanted(name) {
        return RowReport::skipped(name, "not selected by TORTURE_ROW");
    }
    let started = Instant::now();
    let mut report = RowReport::new(name);
    for i in 0..runs {
        let seed = run_seed(settings().seed, name, i);
        report.runs += 1;
        match tokio::spawn(run(seed)).await {
            Ok(outcome) => {
                if !outcome.problems.is_empty() {
                    report.failed_runs += 1;
                }
                for p in outcome.problems {
                    report.messages.push(format!("run {i} (seed {seed}): {p}"));
                }
                for n in outcome.notes {
                    report.notes.push(format!("run {i}: {n}"));
                }
                report.bytes_lost += outcome.bytes_lost;
                report.acked_bytes += outcome.acked_bytes;
                report.fired += usize::from(outcome.fired);
            }
            Err(e) => {
                report.failed_runs += 1;
                let why = e
                    .try_into_panic()
                    .ok()
                    .and_then(|p| {
                        p.downcast_ref::<String>()
                            .cloned()
                            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    })
                    .unwrap_or_else(|| "cancelled".into());
                let why: String = why.chars().take(2000).collect();
                report
                    .messages
                    .push(format!("run {i} (seed {seed}) panicked: {why}"));
            }
        }
    }
    report.seconds = started.elapsed().as_secs_f64();
    report
}

/// Publishes every row, then fails the test if any row failed.
fn finish(reports: Vec<RowReport>) {
    for r in &reports {
        r.publish();
    }
    let failed: Vec<&RowReport> = reports.iter().filter(|r| r.failed_runs > 0).collect();
    assert!(
        failed.is_empty(),
        "torture rows failed: {}",
        failed
            .iter()
            .map(|r| format!("{} ({} of {} runs)", r.name, r.failed_runs, r.runs))
            .collect::<Vec<_>>()
            .join(", ")
    );
}

// ---------------------------------------------------------------------------
// The ledger: what the client wrote and what was acknowledged
// ---------------------------------------------------------------------------

type Files = Vec<(String, Vec<u8>)>;

struct Written {
    step: u64,
    rank: u32,
    files: Files,
    /// The daemon acknowledged it (CommitShard, or WaitDurable in the tier
    /// the row is about).
    acked: bool,
    /// Its save returned an error: the commit may or may not have happened.
    in_flight: bool,
}

impl Written {
    fn bytes(&self) -> u64 {
        self.files.iter().map(|(_, b)| b.len() as u64).sum()
    }
}

/// Test chunks of a shard's files (before deduplication).
fn chunk_count(files: &Files) -> u64 {
    files
        .iter()
        .map(|(_, b)| (b.len() as u64).div_ceil(TEST_CHUNK))
        .sum()
}

struct Ledger {
    job: String,
    world: u32,
    shards: Vec<Written>,
}

impl Ledger {
    fn new(job: &str, world: u32) -> Ledger {
        Ledger {
            job: job.into(),
            world,
            shards: Vec::new(),
        }
    }

    fn get(&self, step: u64, rank: u32) -> Option<&Written> {
        self.shards
            .iter()
            .find(|w| w.step == step && w.rank == rank)
    }

    fn steps(&self) -> BTreeSet<u64> {
        self.shards.iter().map(|w| w.step).collect()
    }

    fn acked(&self, step: u64) -> bool {
        (0..self.world).all(|r| self.get(step, r).is_some_and(|w| w.acked))
    }

    fn acked_steps(&self) -> Vec<u64> {
        self.steps()
            .into_iter()
            .filter(|&s| self.acked(s))
            .collect()
    }

    fn step_bytes(&self, step: u64) -> u64 {
        self.shards
            .iter()
            .filter(|w| w.step == step)
            .map(Written::bytes)
            .sum()
    }

    /// The same shards, acknowledged only for `steps` (confirmed in a tier
    /// further down); the others count as in flight, so they may show up
    /// there later but must then be whole.
    fn acknowledged_in(&self, steps: &BTreeSet<u64>) -> Ledger {
        Ledger {
            job: self.job.clone(),
            world: self.world,
            shards: self
                .shards
                .iter()
                .map(|w| Written {
                    step: w.step,
                    rank: w.rank,
                    files: w.files.clone(),
                    acked: steps.contains(&w.step),
                    in_flight: !steps.contains(&w.step),
                })
                .collect(),
        }
    }

    fn acked_bytes(&self) -> u64 {
        self.acked_steps()
            .into_iter()
            .map(|s| self.step_bytes(s))
            .sum()
    }
}

/// The shards of a run: `steps` steps of `world` ranks, each 1 to 3 files
/// of random sizes (empty, tiny, unaligned, up to `max_file`), some steps
/// a small edit of the step before (so write-back and uploads find most
/// chunks already there).
fn plan_shards(rng: &mut Rng, steps: u64, world: u32, max_file: u64) -> Vec<(u64, u32, Files)> {
    let mut plan: Vec<(u64, u32, Files)> = Vec::new();
    for step in 1..=steps {
        for rank in 0..world {
            let previous = plan
                .iter()
                .rev()
                .find(|(_, r, _)| *r == rank)
                .map(|(_, _, f)| f.clone());
            let files = match previous {
                Some(mut files) if rng.chance(0.3) => {
                    for (_, data) in &mut files {
                        if !data.is_empty() {
                            let at = rng.below(data.len() as u64) as usize;
                            let end = (at + 64).min(data.len());
                            data[at..end].copy_from_slice(&bytes(rng.next(), end - at));
                        }
                    }
                    files
                }
                _ => (0..rng.range(1, 4))
                    .map(|i| {
                        let size = match rng.below(10) {
                            0 => 0,
                            1 => rng.below(100),
                            2..=7 => rng.below(max_file / 4),
                            _ => rng.below(max_file),
                        };
                        (format!("f{i}.bin"), bytes(rng.next(), size as usize))
                    })
                    .collect(),
            };
            plan.push((step, rank, files));
        }
    }
    plan
}

async fn save_shard(
    c: &mut Clients,
    job: &str,
    step: u64,
    rank: u32,
    world: u32,
    files: &Files,
) -> Result<(), tonic::Status> {
    let refs: Vec<(&str, &[u8])> = files
        .iter()
        .map(|(n, b)| (n.as_str(), b.as_slice()))
        .collect();
    let mut request = begin_request(shard(job, step, rank), &refs);
    if world > 1 {
        request.world_size = Some(world);
    }
    let begin = c.checkpoint.begin_shard(request).await?.into_inner();
    write_staged(&begin, &refs);
    c.checkpoint
        .commit_shard(pb::CommitShardRequest {
            session_id: begin.session_id,
        })
        .await?;
    Ok(())
}

/// Saves the plan in order; stops at the first failed save (the daemon is
/// gone) unless `keep_going`.
async fn save_plan(
    c: &mut Clients,
    rng: &mut Rng,
    ledger: &mut Ledger,
    plan: Vec<(u64, u32, Files)>,
    keep_going: bool,
) -> Option<tonic::Status> {
    let mut first_error = None;
    for (step, rank, files) in plan {
        if rng.chance(0.2) {
            tokio::time::sleep(Duration::from_millis(rng.below(40))).await;
        }
        let result = save_shard(c, &ledger.job.clone(), step, rank, ledger.world, &files).await;
        let acked = result.is_ok();
        ledger.shards.push(Written {
            step,
            rank,
            files,
            acked,
            in_flight: !acked,
        });
        if let Err(e) = result {
            first_error.get_or_insert(e);
            if !keep_going {
                break;
            }
        }
    }
    first_error
}

/// Which steps of the ledger's job the daemon lists, and whether each is
/// restorable and marked complete in the object store.
async fn listed(c: &mut Clients, job: &str) -> Result<BTreeMap<u64, (bool, bool)>, tonic::Status> {
    let response = c
        .checkpoint
        .list_steps(pb::ListStepsRequest {
            tenant: String::new(),
            job: job.into(),
            wait_for_all_tiers: true,
        })
        .await;
    match response {
        Ok(r) => Ok(r
            .into_inner()
            .jobs
            .into_iter()
            .flat_map(|j| j.steps)
            .map(|s| (s.step, (s.restorable, s.object_store_complete)))
            .collect()),
        Err(e) if e.code() == tonic::Code::NotFound => Ok(BTreeMap::new()),
        Err(e) => Err(e),
    }
}

/// What `check_steps` asks of the acknowledged steps.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// Every acknowledged step is listed and restores.
    AllAcked,
    /// As `AllAcked`, and each is marked complete in the object store.
    AllAckedAndMarked,
    /// Only what is listed is checked (a bucket mid-upload).
    ListedOnly,
}

/// Checks the daemon's listing and restores against the ledger (invariants
/// 1 and 2 of the module comment).
async fn check_steps(
    node: &Daemon,
    ledger: &Ledger,
    allow_in_flight: bool,
    expect: Expect,
    context: &str,
    out: &mut Outcome,
) {
    let mut c = node.clients().await;
    let listing = match listed(&mut c, &ledger.job).await {
        Ok(l) => l,
        Err(e) => {
            out.problem(format!("{context}: ListSteps failed: {e}"));
            return;
        }
    };
    for (&step, &(restorable, marked)) in &listing {
        if !restorable && !marked {
            continue;
        }
        for rank in 0..ledger.world {
            match ledger.get(step, rank) {
                None => out.problem(format!(
                    "{context}: step {step} is listed as restorable but rank {rank} was never saved"
                )),
                Some(w) if !(w.acked || allow_in_flight && w.in_flight) => out.problem(format!(
                    "{context}: step {step} is listed as restorable{} but rank {rank} was never acknowledged",
                    if marked { " (marked complete in the bucket)" } else { "" }
                )),
                Some(_) => {}
            }
        }
    }
    for step in ledger.steps() {
        let acked = ledger.acked(step);
        let (restorable, marked) = listing.get(&step).copied().unwrap_or((false, false));
        if acked && expect != Expect::ListedOnly && !restorable {
            out.problem(format!(
                "{context}: acknowledged step {step} is not listed as restorable"
            ));
            out.bytes_lost += ledger.step_bytes(step);
            continue;
        }
        if acked && expect == Expect::AllAckedAndMarked && !marked {
            out.problem(format!(
                "{context}: acknowledged step {step} has no completion marker in the bucket"
            ));
        }
        if !restorable {
            continue;
        }
        for rank in 0..ledger.world {
            let Some(w) = ledger.get(step, rank) else {
                continue;
            };
            match restore(&mut c, &ledger.job, Some(step), rank).await {
                Ok((_, got)) => {
                    let want: BTreeMap<&str, &[u8]> = w
                        .files
                        .iter()
                        .map(|(n, b)| (n.as_str(), b.as_slice()))
                        .collect();
                    let got: BTreeMap<&str, &[u8]> = got
                        .iter()
                        .map(|(n, b)| (n.as_str(), b.as_slice()))
                        .collect();
                    if want != got {
                        out.problem(format!(
                            "{context}: step {step} rank {rank} restored different bytes"
                        ));
                        if w.acked {
                            out.bytes_lost += w.bytes();
                        }
                    }
                }
                Err(e) => {
                    out.problem(format!(
                        "{context}: listed step {step} rank {rank} does not restore: {e}"
                    ));
                    if w.acked {
                        out.bytes_lost += w.bytes();
                    }
                }
            }
        }
    }
}

/// Waits until every acknowledged step of the ledger is durable in `tier`;
/// returns the steps that are.
async fn wait_tier(
    node: &Daemon,
    ledger: &Ledger,
    tier: pb::Tier,
    context: &str,
    out: &mut Outcome,
) -> BTreeSet<u64> {
    let mut c = node.clients().await;
    let mut confirmed = BTreeSet::new();
    for step in ledger.acked_steps() {
        match wait_durable(&mut c, &ledger.job, step, tier, RECOVERY.as_millis() as u64).await {
            Ok(()) => {
                confirmed.insert(step);
            }
            Err(e) => out.problem(format!(
                "{context}: acknowledged step {step} not durable in {tier:?} within {} s: {e}",
                RECOVERY.as_secs()
            )),
        }
    }
    confirmed
}

/// Invariant 3 for the disk tier: write-back catches up, then the memory
/// tier is wiped and everything acknowledged restores from disk alone.
async fn prove_from_disk(
    node: &mut Daemon,
    ledger: &Ledger,
    allow_in_flight: bool,
    out: &mut Outcome,
) {
    let on_disk = wait_tier(node, ledger, pb::Tier::Disk, "after restart", out).await;
    // What never reached the disk is a failure already; from here on only
    // what the disk confirmed has to come back.
    let ledger = ledger.acknowledged_in(&on_disk);
    node.kill();
    let _ = std::fs::remove_dir_all(&node.memory_dir);
    node.restart().await;
    check_steps(
        node,
        &ledger,
        allow_in_flight,
        Expect::AllAcked,
        "from disk alone",
        out,
    )
    .await;
}

/// When a run found problems, the end of each daemon's log goes to stderr
/// (the daemons' directories are removed with them).
fn show_logs(out: &Outcome, nodes: &[&Daemon]) {
    if out.problems.is_empty() {
        return;
    }
    for node in nodes {
        let log = node.log_text();
        let lines: Vec<&str> = log.lines().collect();
        let tail = lines[lines.len().saturating_sub(60)..].join("\n");
        eprintln!(
            "---- end of the log of cairnd ({}):\n{tail}",
            node.log.as_deref().unwrap_or(Path::new("stderr")).display()
        );
    }
}

fn staging_is_clean(node: &Daemon, out: &mut Outcome) {
    let left = files_under(&node.memory_dir.join("staging"));
    if !left.is_empty() {
        out.problem(format!(
            "{} files left in staging after restart",
            left.len()
        ));
    }
}

/// Blocks a worker thread while polling: run it off the async threads.
async fn wait_exit(node: Daemon, timeout: Duration) -> (Daemon, bool) {
    tokio::task::spawn_blocking(move || {
        let mut node = node;
        let exited = node.wait_exit(timeout);
        (node, exited)
    })
    .await
    .expect("wait for cairnd to exit")
}

// ---------------------------------------------------------------------------
// Crash points of save, commit and write-back (one node)
// ---------------------------------------------------------------------------

#[derive(Clone, Copy)]
enum Kill {
    /// SIGKILL at this crash point.
    At(&'static str),
    /// `kill -9` after a random delay, wherever the daemon is.
    Random,
}

async fn local_run(kill: Kill, seed: u64) -> Outcome {
    let mut rng = Rng::new(seed);
    let mut out = Outcome::default();
    let world = if rng.chance(0.3) { 2 } else { 1 };
    let steps = rng.range(2, 6);
    let plan = plan_shards(&mut rng, steps, world, LOCAL_MAX_FILE);
    let env = match kill {
        Kill::At(point) => {
            let k = rng.below(plan.len() as u64);
            vec![("FAILPOINTS".to_string(), format!("{point}={k}*off->return"))]
        }
        Kill::Random => Vec::new(),
    };
    let env_refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mut node = start_daemon_with_env(&NO_RETENTION, &env_refs).await;
    let mut ledger = Ledger::new("torture", world);
    match kill {
        Kill::At(point) => {
            let mut c = node.clients().await;
            save_plan(&mut c, &mut rng, &mut ledger, plan, false).await;
            let timeout = if point.starts_with("commit.") { 10 } else { 30 };
            let (n, exited) = wait_exit(node, Duration::from_secs(timeout)).await;
            node = n;
            out.fired = exited;
            if !exited {
                out.notes.push(format!("{point} was not reached"));
            }
        }
        Kill::Random => {
            let socket = node.socket.clone();
            let mut saver_rng = Rng::new(rng.next());
            let saver = tokio::spawn(async move {
                let mut ledger = Ledger::new("torture", world);
                let mut c = Clients::connect(socket.to_str().expect("utf-8"))
                    .await
                    .expect("connect");
                save_plan(&mut c, &mut saver_rng, &mut ledger, plan, false).await;
                ledger
            });
            tokio::time::sleep(Duration::from_millis(rng.below(400))).await;
            node.kill();
            out.fired = true;
            ledger = saver.await.expect("saver task");
        }
    }
    node.kill();
    node.restart().await;
    staging_is_clean(&node, &mut out);
    let allow_in_flight = !matches!(kill, Kill::At(p) if BEFORE_COMMIT.contains(&p));
    check_steps(
        &node,
        &ledger,
        allow_in_flight,
        Expect::AllAcked,
        "after restart",
        &mut out,
    )
    .await;
    prove_from_disk(&mut node, &ledger, allow_in_flight, &mut out).await;
    out.acked_bytes = ledger.acked_bytes();
    show_logs(&out, &[&node]);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by ./scripts/torture"]
async fn crash_points_of_save_commit_and_write_back() {
    let runs = settings().runs;
    let mut reports = Vec::new();
    let local = CRASH_POINTS
        .iter()
        .filter(|p| p.starts_with("commit.") || p.starts_with("writeback."));
    for &point in local {
        reports.push(
            row(&format!("crash at {point}"), runs, move |seed| {
                local_run(Kill::At(point), seed)
            })
            .await,
        );
    }
    reports.push(
        row("kill -9 at a random moment of saves", runs, |seed| {
            local_run(Kill::Random, seed)
        })
        .await,
    );
    finish(reports);
}

// ---------------------------------------------------------------------------
// Crash points of the upload (a file:// bucket)
// ---------------------------------------------------------------------------

async fn upload_run(point: &'static str, seed: u64) -> Outcome {
    let mut rng = Rng::new(seed);
    let mut out = Outcome::default();
    let world = if rng.chance(0.3) { 2 } else { 1 };
    let steps = rng.range(2, 5);
    let plan = plan_shards(&mut rng, steps, world, LOCAL_MAX_FILE);
    let hits = match point {
        "upload.after_chunk" => plan.iter().map(|(_, _, f)| chunk_count(f)).sum::<u64>() / 2,
        _ => plan.len() as u64,
    };
    let failpoints = format!("{point}={}*off->return", rng.below(hits.max(1)));
    let bucket = tempfile::tempdir().expect("bucket dir");
    let url = format!("file://{}", bucket.path().display());
    let args = [&NO_RETENTION[..], &["--object-store-url", url.as_str()]].concat();
    let mut node = start_daemon_with_env(&args, &[("FAILPOINTS", &failpoints)]).await;
    let mut ledger = Ledger::new("torture", world);
    let mut c = node.clients().await;
    save_plan(&mut c, &mut rng, &mut ledger, plan, false).await;
    let (n, exited) = wait_exit(node, Duration::from_secs(60)).await;
    node = n;
    out.fired = exited;
    if !exited {
        out.notes.push(format!("{point} was not reached"));
    }
    node.kill();
    // A brand-new node sees the bucket as the crash left it: whatever it
    // lists must be acknowledged and whole.
    {
        let fresh = start_daemon(&args).await;
        check_steps(
            &fresh,
            &ledger,
            true,
            Expect::ListedOnly,
            "bucket right after the crash",
            &mut out,
        )
        .await;
    }
    node.restart().await;
    staging_is_clean(&node, &mut out);
    check_steps(
        &node,
        &ledger,
        true,
        Expect::AllAcked,
        "after restart",
        &mut out,
    )
    .await;
    let in_bucket = wait_tier(
        &node,
        &ledger,
        pb::Tier::ObjectStore,
        "after restart",
        &mut out,
    )
    .await;
    let fresh = start_daemon(&args).await;
    check_steps(
        &fresh,
        &ledger.acknowledged_in(&in_bucket),
        true,
        Expect::AllAckedAndMarked,
        "bucket after recovery, on a new node",
        &mut out,
    )
    .await;
    out.acked_bytes = ledger.acked_bytes();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by ./scripts/torture"]
async fn crash_points_of_upload() {
    let runs = settings().runs;
    let mut reports = Vec::new();
    for &point in CRASH_POINTS.iter().filter(|p| p.starts_with("upload.")) {
        reports.push(
            row(&format!("crash at {point}"), runs, move |seed| {
                upload_run(point, seed)
            })
            .await,
        );
    }
    finish(reports);
}

// ---------------------------------------------------------------------------
// Crash points of replication (peers on loopback, mutual TLS)
// ---------------------------------------------------------------------------

const PEER_PORT: u16 = 7071;

/// `n` daemons on distinct loopback addresses, one static membership,
/// mutual TLS from a test CA; `env[i]` for node `i`.
struct Cluster {
    nodes: Vec<Daemon>,
    _net: Network,
    _pki: TestPki,
    _configs: tempfile::TempDir,
}

impl Cluster {
    async fn start(n: usize, replicas: usize, env: &BTreeMap<usize, String>) -> Cluster {
        let net = Network::loopback(n);
        let pki = TestPki::new();
        let configs = tempfile::tempdir().expect("config dir");
        let mut nodes = Vec::new();
        for i in 0..n {
            let name = format!("node-{i}");
            let cert = pki.issue(&name);
            let mut toml = format!(
                "[peers]\nlisten = \"{}:{PEER_PORT}\"\nreplicas = {replicas}\nrequest_timeout_secs = 10\nreplica_keep_last = 1000\n\
                 [peers.tls]\ncert = {:?}\nkey = {:?}\nca = {:?}\n\
                 [membership]\nsource = \"static\"\n",
                net.addr(i),
                cert.cert,
                cert.key,
                pki.ca_path(),
            );
            for j in 0..n {
                toml.push_str(&format!(
                    "[[membership.peers]]\nid = \"node-{j}\"\naddress = \"{}:{PEER_PORT}\"\n",
                    net.addr(j)
                ));
            }
            let path = configs.path().join(format!("{name}.toml"));
            std::fs::write(&path, toml).expect("write config");
            let mut args = vec![
                "--config",
                path.to_str().expect("utf-8"),
                "--node-name",
                &name,
            ];
            args.extend(NO_RETENTION);
            let env: Vec<(&str, &str)> = env
                .get(&i)
                .map(|fp| vec![("FAILPOINTS", fp.as_str())])
                .unwrap_or_default();
            nodes.push(start_daemon_with_env(&args, &env).await);
        }
        Cluster {
            nodes,
            _net: net,
            _pki: pki,
            _configs: configs,
        }
    }
}

/// Kills a node and wipes its memory and disk tiers: a replacement node.
async fn wipe_and_restart(node: &mut Daemon) {
    node.kill();
    for dir in [&node.memory_dir, &node.disk_dir] {
        let _ = std::fs::remove_dir_all(dir);
    }
    node.restart().await;
}

/// Restores every step of the ledger on `node` (rank 0): acknowledged ones
/// must come back identical; others may be absent (`NOT_FOUND`) or
/// identical, never partial or different.
async fn check_restores(node: &Daemon, ledger: &Ledger, context: &str, out: &mut Outcome) {
    let mut c = node.clients().await;
    for w in &ledger.shards {
        match restore(&mut c, &ledger.job, Some(w.step), w.rank).await {
            Ok((_, got)) => {
                let same = w.files.len() == got.len()
                    && w.files.iter().all(|(n, b)| got.get(n) == Some(b));
                if !same {
                    out.problem(format!(
                        "{context}: step {} restored different bytes",
                        w.step
                    ));
                    if w.acked {
                        out.bytes_lost += w.bytes();
                    }
                }
            }
            Err(e) if !w.acked && e.code() == tonic::Code::NotFound => {}
            Err(e) => {
                out.problem(format!(
                    "{context}: step {} ({}) does not restore: {e}",
                    w.step,
                    if w.acked {
                        "durable on peers"
                    } else {
                        "never confirmed by a peer"
                    }
                ));
                if w.acked {
                    out.bytes_lost += w.bytes();
                }
            }
        }
    }
}

/// Node 1 dies at a random chunk of the replicas node 0 sends it.
async fn peer_receive_run(seed: u64) -> Outcome {
    let mut rng = Rng::new(seed);
    let mut out = Outcome::default();
    let steps = rng.range(2, 5);
    let plan = plan_shards(&mut rng, steps, 1, LOCAL_MAX_FILE);
    let chunks: u64 = plan.iter().map(|(_, _, f)| chunk_count(f)).sum();
    let failpoint = format!(
        "peer.receive_chunk={}*off->return",
        rng.below(chunks.max(1))
    );
    let mut cluster = Cluster::start(2, 1, &BTreeMap::from([(1, failpoint)])).await;
    let mut ledger = Ledger::new("torture", 1);
    let mut c = cluster.nodes[0].clients().await;
    let mut peers_up = true;
    for (step, rank, files) in plan {
        if let Err(e) = save_shard(&mut c, "torture", step, rank, 1, &files).await {
            out.problem(format!("save of step {step} failed on a healthy node: {e}"));
            break;
        }
        // Acknowledged here means confirmed by the peer; stop waiting as
        // soon as the peer is dead.
        let mut acked = false;
        let waiting = Instant::now();
        while peers_up && !acked && waiting.elapsed() < Duration::from_secs(30) {
            acked = wait_durable(&mut c, "torture", step, pb::Tier::Peers, 500)
                .await
                .is_ok();
            // (wait_exit reports an exit once: it forgets the process.)
            peers_up &= !cluster.nodes[1].wait_exit(Duration::from_millis(1));
        }
        peers_up &= acked;
        ledger.shards.push(Written {
            step,
            rank,
            files,
            acked,
            in_flight: false,
        });
    }
    let receiver = cluster.nodes.remove(1);
    let (mut receiver, exited) = if peers_up {
        wait_exit(receiver, Duration::from_secs(30)).await
    } else {
        (receiver, true)
    };
    out.fired = exited;
    if rng.chance(0.5) {
        // The saving node is lost before replication could catch up: only
        // what the peer confirmed must come back, nothing partial.
        wipe_and_restart(&mut cluster.nodes[0]).await;
        receiver.restart().await;
        check_restores(
            &cluster.nodes[0],
            &ledger,
            "saver lost, from the peer",
            &mut out,
        )
        .await;
    } else {
        // The peer comes back: replication resumes and completes.
        receiver.restart().await;
        for w in &mut ledger.shards {
            let done = wait_durable(
                &mut c,
                "torture",
                w.step,
                pb::Tier::Peers,
                RECOVERY.as_millis() as u64,
            )
            .await;
            if let Err(e) = done {
                out.problem(format!(
                    "step {} not replicated {} s after the peer came back: {e}",
                    w.step,
                    RECOVERY.as_secs()
                ));
            } else {
                w.acked = true;
            }
        }
        wipe_and_restart(&mut cluster.nodes[0]).await;
        check_restores(
            &cluster.nodes[0],
            &ledger,
            "after resume, from the peer",
            &mut out,
        )
        .await;
    }
    cluster.nodes.push(receiver);
    out.acked_bytes = ledger
        .shards
        .iter()
        .filter(|w| w.acked)
        .map(Written::bytes)
        .sum();
    out
}

/// Node 1 of two holders dies at a random chunk it serves to a wiped node.
async fn peer_serve_run(seed: u64) -> Outcome {
    let mut rng = Rng::new(seed);
    let mut out = Outcome::default();
    let steps = rng.range(1, 4);
    let plan = plan_shards(&mut rng, steps, 1, LOCAL_MAX_FILE);
    let chunks: u64 = plan.iter().map(|(_, _, f)| chunk_count(f)).sum();
    let failpoint = format!("peer.serve_chunk={}*off->return", rng.below(chunks / 4 + 1));
    let mut cluster = Cluster::start(3, 2, &BTreeMap::from([(1, failpoint)])).await;
    let mut ledger = Ledger::new("torture", 1);
    let mut c = cluster.nodes[0].clients().await;
    for (step, rank, files) in plan {
        if let Err(e) = save_shard(&mut c, "torture", step, rank, 1, &files).await {
            out.problem(format!("save of step {step} failed: {e}"));
            break;
        }
        let acked = wait_durable(
            &mut c,
            "torture",
            step,
            pb::Tier::Peers,
            RECOVERY.as_millis() as u64,
        )
        .await;
        if let Err(e) = &acked {
            out.problem(format!("step {step} not durable on two peers: {e}"));
        }
        ledger.shards.push(Written {
            step,
            rank,
            files,
            acked: acked.is_ok(),
            in_flight: false,
        });
    }
    wipe_and_restart(&mut cluster.nodes[0]).await;
    let mut during = Outcome::default();
    check_restores(
        &cluster.nodes[0],
        &ledger,
        "a holder dies mid-restore",
        &mut during,
    )
    .await;
    let holder = cluster.nodes.remove(1);
    let (mut holder, exited) = wait_exit(holder, Duration::from_secs(1)).await;
    out.fired = exited;
    if !during.problems.is_empty() {
        // The other holder should have covered; whether anything is lost
        // is decided once every holder is back.
        out.problems.extend(during.problems);
        holder.restart().await;
        let mut after = Outcome::default();
        wipe_and_restart(&mut cluster.nodes[0]).await;
        check_restores(&cluster.nodes[0], &ledger, "every holder back", &mut after).await;
        out.problems.extend(after.problems);
        out.bytes_lost += after.bytes_lost;
    }
    cluster.nodes.push(holder);
    out.acked_bytes = ledger
        .shards
        .iter()
        .filter(|w| w.acked)
        .map(Written::bytes)
        .sum();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by ./scripts/torture"]
async fn crash_points_of_replication() {
    let runs = settings().runs;
    let mut reports = Vec::new();
    for &point in CRASH_POINTS.iter().filter(|p| p.starts_with("peer.")) {
        let name = format!("crash at {point}");
        reports.push(match point {
            "peer.receive_chunk" => row(&name, runs, peer_receive_run).await,
            "peer.serve_chunk" => row(&name, runs, peer_serve_run).await,
            other => panic!("no replication scenario for the crash point {other}"),
        });
    }
    finish(reports);
}

// ---------------------------------------------------------------------------
// A faulty bucket: SeaweedFS behind the fault-injecting proxy
// ---------------------------------------------------------------------------

/// Per-attempt bound of one bucket request (`request_timeout_secs`) in the
/// row with a bucket that never answers.
const DEAD_TIMEOUT_SECS: u64 = 2;

/// `request_timeout_secs` in the flaky-bucket row: long enough for a 6 MiB
/// part on a busy 2-core machine, shorter than the proxy's stall.
const FLAKY_TIMEOUT_SECS: u64 = 3;

fn bucket_config(endpoint: &str, prefix: &str, attempts: u32, timeout_secs: u64) -> String {
    format!(
        "[object_store]\nurl = \"s3://cairn/{prefix}\"\nrequest_timeout_secs = {timeout_secs}\n\
         attempts = {attempts}\nmultipart_threshold_bytes = 5242880\npart_size_bytes = 5242880\n\
         [object_store.options]\nendpoint = \"{endpoint}\"\nallow_http = \"true\"\nregion = \"us-east-1\"\n\
         access_key_id = \"{}\"\nsecret_access_key = \"{}\"\n",
        s3::ACCESS_KEY,
        s3::SECRET_KEY
    )
}

/// A daemon whose bucket is `config`, with 6 MiB chunks: every full chunk
/// goes up as a two-part multipart upload (5 MiB parts).
async fn bucket_daemon(config: &str) -> (Daemon, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("config dir");
    let path = dir.path().join("cairnd.toml");
    std::fs::write(&path, config).expect("write config");
    let chunk = (6u64 << 20).to_string();
    let node = start_daemon(&[
        "--config",
        path.to_str().expect("utf-8"),
        "--chunk-size",
        &chunk,
    ])
    .await;
    (node, dir)
}

/// Uploads under a flaky bucket (a share of requests answered 503 SlowDown,
/// reset, or stalled past the request timeout): every acknowledged step
/// becomes durable in the bucket within the bound and restores
/// byte-identical on a new node, read through the same faults.
async fn flaky_bucket_run(s3: Arc<SeaweedFs>, rate: f64, seed: u64) -> Outcome {
    let mut rng = Rng::new(seed);
    let mut out = Outcome::default();
    let plan = FaultPlan {
        rate,
        weights: [2, 1, 1],
        stall: Some(Duration::from_secs(FLAKY_TIMEOUT_SECS + 1)),
        only: Vec::new(),
    };
    let proxy = FaultProxy::start(s3.addr(), plan, rng.next()).await;
    let prefix = format!("flaky/{seed}");
    let config = bucket_config(&proxy.endpoint(), &prefix, 5, FLAKY_TIMEOUT_SECS);
    let (node, _config_dir) = bucket_daemon(&config).await;
    let steps = rng.range(1, 4);
    let shards = plan_shards(&mut rng, steps, 1, 14 << 20);
    let mut ledger = Ledger::new("torture", 1);
    let mut c = node.clients().await;
    if let Some(e) = save_plan(&mut c, &mut rng, &mut ledger, shards, true).await {
        out.problem(format!(
            "a save failed while only the bucket was faulty: {e}"
        ));
    }
    // From here on, acknowledged means confirmed durable in the bucket.
    let mut confirmed = BTreeSet::new();
    for step in ledger.acked_steps() {
        let started = Instant::now();
        let done = wait_durable(
            &mut c,
            "torture",
            step,
            pb::Tier::ObjectStore,
            FLAKY_BOUND.as_millis() as u64,
        )
        .await;
        match done {
            Ok(()) => {
                confirmed.insert(step);
                out.notes.push(format!(
                    "step {step} ({} bytes) durable in the bucket {:.1} s after its save",
                    ledger.step_bytes(step),
                    started.elapsed().as_secs_f64()
                ));
            }
            Err(e) => out.problem(format!(
                "step {step} not durable in the bucket within {} s: {e}",
                FLAKY_BOUND.as_secs()
            )),
        }
    }
    let ledger = ledger.acknowledged_in(&confirmed);
    let [requests, slow_down, reset, stall] = proxy.counts().snapshot();
    out.fired = slow_down + reset + stall > 0;
    out.notes.push(format!(
        "{requests} requests: {slow_down} SlowDown, {reset} resets, {stall} stalls"
    ));
    let failed_aborts = node
        .log_text()
        .matches("aborting a failed multipart upload failed")
        .count();
    if failed_aborts > 0 {
        out.notes.push(format!(
            "{failed_aborts} multipart uploads whose abort failed (their parts stay in the bucket)"
        ));
    }
    // A new node restores each step from the bucket through the same
    // faults (reads are retried like writes). Listing is not part of this
    // read: bucket listings are not retried (docs/object-store.md), so a
    // listing cut short is logged and leaves steps out.
    let (fresh, _fresh_dir) = bucket_daemon(&config).await;
    let mut fc = fresh.clients().await;
    for step in &confirmed {
        let Some(w) = ledger.get(*step, 0) else {
            continue;
        };
        match restore(&mut fc, "torture", Some(*step), 0).await {
            Ok((_, got)) => {
                let same = w.files.len() == got.len()
                    && w.files.iter().all(|(n, b)| got.get(n) == Some(b));
                if !same {
                    out.problem(format!(
                        "step {step} restored different bytes through the faults"
                    ));
                    out.bytes_lost += w.bytes();
                }
            }
            Err(e) => out.problem(format!(
                "step {step} did not restore on a new node through the faults: {e}"
            )),
        }
    }
    // With the faults off, a new node lists exactly what was confirmed,
    // marked complete, and restores it.
    proxy.set_rate(0.0);
    let (clean, _clean_dir) = bucket_daemon(&config).await;
    check_steps(
        &clean,
        &ledger,
        true,
        Expect::AllAckedAndMarked,
        "on a new node, faults off",
        &mut out,
    )
    .await;
    show_logs(&out, &[&node, &fresh]);
    out.acked_bytes = ledger.acked_bytes();
    out
}

/// Share of bucket requests the flaky-bucket row faults, unless
/// `TORTURE_BUCKET_FAULT_RATE` says otherwise.
const DEFAULT_FAULT_RATE: f64 = 0.2;

/// How long `ListSteps` may take while the bucket never answers: every
/// bucket listing gives up after `request_timeout_secs` without a page and
/// the listing goes on without the bucket; a few of them run one after
/// another (manifests, step markers), plus slack for a busy machine.
const LIST_BOUND: Duration = Duration::from_secs(4 * DEAD_TIMEOUT_SECS + 2);

/// How long an upload may take under the flaky bucket of the rows here:
/// with 5 attempts per request at a 20 % fault rate a request fails for
/// good about once in 3,000, so nearly every upload finishes in its first
/// attempt; the rest wait one shard retry (1 s, then 2 s, ...).
const FLAKY_BOUND: Duration = Duration::from_secs(90);

/// A bucket that accepts connections and never answers: the upload's first
/// attempt must fail within `attempts × request_timeout_secs` plus the
/// backoff between attempts (what `docs/object-store.md` promises), the
/// shard must show as failed, and once the bucket answers again the upload
/// completes and restores byte-identical.
async fn stalled_bucket_run(s3: Arc<SeaweedFs>, seed: u64) -> Outcome {
    let mut rng = Rng::new(seed);
    let mut out = Outcome::default();
    let attempts = 2u32;
    let dead = FaultPlan {
        rate: 1.0,
        weights: [0, 0, 1],
        stall: None,
        only: Vec::new(),
    };
    let proxy = FaultProxy::start(s3.addr(), dead, rng.next()).await;
    let prefix = format!("stalled/{seed}");
    let config = bucket_config(&proxy.endpoint(), &prefix, attempts, DEAD_TIMEOUT_SECS);
    let (node, _config_dir) = bucket_daemon(&config).await;
    let shards = plan_shards(&mut rng, 1, 1, 12 << 20);
    let mut ledger = Ledger::new("torture", 1);
    let mut c = node.clients().await;
    if let Some(e) = save_plan(&mut c, &mut rng, &mut ledger, shards, true).await {
        out.problem(format!("a save failed while only the bucket was down: {e}"));
        return out;
    }
    if let Err(e) = wait_durable(&mut c, "torture", 1, pb::Tier::Disk, 30_000).await {
        out.problem(format!("not durable on disk: {e}"));
        return out;
    }
    // Documented bound of one request: every attempt times out, with 0.2 s,
    // 0.4 s, ... between attempts.
    let backoff: f64 = (0..attempts.saturating_sub(1))
        .map(|i| 0.2 * 2f64.powi(i as i32))
        .sum();
    let bound = (attempts as u64 * DEAD_TIMEOUT_SECS) as f64 + backoff;
    let started = Instant::now();
    let mut failed_after = None;
    while started.elapsed() < Duration::from_secs_f64(bound + 30.0) {
        let scrape = node.metrics().await;
        if common::metric(
            &scrape,
            "cairn_writeback_failures_total{tier=\"object-store\"}",
        ) > 0.0
        {
            failed_after = Some(started.elapsed().as_secs_f64());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    match failed_after {
        // The upload starts right after write-back; 2 s of slack for the
        // queue and for the poll.
        Some(t) if t <= bound + 2.0 => {
            out.fired = true;
            out.notes.push(format!(
                "upload attempt failed {t:.1} s after write-back (bound {bound:.1} s)"
            ));
        }
        Some(t) => out.problem(format!(
            "the upload to a bucket that never answers failed only after {t:.1} s; the documented bound is {bound:.1} s"
        )),
        None => out.problem(format!(
            "the upload to a bucket that never answers was not reported failed within {:.0} s",
            bound + 30.0
        )),
    }
    // The shard says so, and listing does not wait for the bucket
    // (docs/semantics.md: `cairn list` goes on without it).
    let listing = Instant::now();
    match tokio::time::timeout(LIST_BOUND, object_store_state(&mut c, "torture", 1)).await {
        Ok(Some(pb::ShardState::Failed | pb::ShardState::Pending)) => {}
        Ok(state) => out.problem(format!(
            "a shard the bucket never received is listed as {state:?} in the object store"
        )),
        Err(_) => out.problem(format!(
            "ListSteps did not answer within {} s while the bucket never answers",
            LIST_BOUND.as_secs()
        )),
    }
    out.notes.push(format!(
        "ListSteps answered in {:.1} s",
        listing.elapsed().as_secs_f64()
    ));
    // The bucket answers again: the upload is retried and completes.
    proxy.set_plan(FaultPlan::none());
    let healed = Instant::now();
    match wait_durable(&mut c, "torture", 1, pb::Tier::ObjectStore, 90_000).await {
        Ok(()) => out.notes.push(format!(
            "durable in the bucket {:.1} s after it recovered",
            healed.elapsed().as_secs_f64()
        )),
        Err(e) => out.problem(format!(
            "not durable in the bucket 90 s after it recovered: {e}"
        )),
    }
    let (fresh, _fresh_dir) = bucket_daemon(&config).await;
    check_steps(
        &fresh,
        &ledger,
        false,
        Expect::AllAckedAndMarked,
        "restored on a new node",
        &mut out,
    )
    .await;
    out.acked_bytes = ledger.acked_bytes();
    out
}

async fn object_store_state(c: &mut Clients, job: &str, step: u64) -> Option<pb::ShardState> {
    let response = c
        .checkpoint
        .list_steps(pb::ListStepsRequest {
            tenant: String::new(),
            job: job.into(),
            wait_for_all_tiers: true,
        })
        .await
        .ok()?
        .into_inner();
    let shard = response
        .jobs
        .into_iter()
        .flat_map(|j| j.steps)
        .find(|s| s.step == step)?
        .shards
        .into_iter()
        .next()?;
    shard
        .tiers
        .iter()
        .find(|t| t.tier == pb::Tier::ObjectStore as i32)
        .and_then(|t| pb::ShardState::try_from(t.state).ok())
}

/// After a bucket row: no multipart upload may be left open under `prefix`
/// (each one is parts stored and billed that nothing will ever complete),
/// except one whose `CreateMultipartUpload` reached the bucket while its
/// answer was lost: cairnd never learned its id, so nothing can abort it
/// (on S3 alike; the bucket's lifecycle rule for incomplete multipart
/// uploads removes those, docs/object-store.md). Those are counted in a note.
async fn no_open_multipart(s3: &SeaweedFs, prefix: &str, report: &mut RowReport) {
    // Requests still stalled in the proxy finish (or give up) first.
    tokio::time::sleep(Duration::from_secs(FLAKY_TIMEOUT_SECS * 2)).await;
    let open = s3.open_multipart_uploads(prefix);
    let lost = common::faultproxy::lost_answers();
    let (unknowable, left): (Vec<_>, Vec<_>) = open.iter().partition(|(key, _)| {
        lost.iter()
            .any(|line| line.starts_with("POST ") && line.contains(&format!("/{key}?uploads")))
    });
    if !left.is_empty() {
        report.row_problem(format!(
            "{} multipart uploads left open under {prefix}: {:?}",
            left.len(),
            left.iter().take(5).collect::<Vec<_>>()
        ));
    }
    report.notes.push(format!(
        "open multipart uploads under {prefix} at the end: {} ({} created by a request whose \
         answer the proxy cut, so their ids never reached cairnd)",
        open.len(),
        unknowable.len()
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by ./scripts/torture"]
async fn bucket_faults() {
    let runs = settings().runs;
    let rate: f64 = std::env::var("TORTURE_BUCKET_FAULT_RATE")
        .ok()
        .filter(|v| !v.is_empty())
        .map(|v| {
            v.parse()
                .expect("TORTURE_BUCKET_FAULT_RATE is a number from 0 to 1")
        })
        .unwrap_or(DEFAULT_FAULT_RATE);
    let flaky_name = format!("flaky bucket ({:.0}% of requests faulted)", rate * 100.0);
    let rows = [flaky_name.as_str(), "bucket that never answers"];
    if !rows.iter().any(|r| RowReport::wanted(r)) {
        return;
    }
    let Some(s3) = SeaweedFs::start_or_skip() else {
        finish(
            rows.iter()
                .map(|r| RowReport::skipped(r, "SeaweedFS not installed"))
                .collect(),
        );
        return;
    };
    let s3 = Arc::new(s3);
    let mut reports = Vec::new();
    let flaky_runs = runs.div_ceil(4);
    let s = s3.clone();
    let mut flaky = row(rows[0], flaky_runs, move |seed| {
        flaky_bucket_run(s.clone(), rate, seed)
    })
    .await;
    if flaky.skipped.is_none() {
        no_open_multipart(&s3, "flaky/", &mut flaky).await;
    }
    reports.push(flaky);
    let stalled_runs = runs.div_ceil(20).max(1);
    let s = s3.clone();
    let mut stalled = row(rows[1], stalled_runs, move |seed| {
        stalled_bucket_run(s.clone(), seed)
    })
    .await;
    if stalled.skipped.is_none() {
        no_open_multipart(&s3, "stalled/", &mut stalled).await;
    }
    reports.push(stalled);
    finish(reports);
}

// ---------------------------------------------------------------------------
// The disk tier fills up
// ---------------------------------------------------------------------------

/// A tmpfs mounted for the run, unmounted on drop.
struct Mount(PathBuf);

impl Mount {
    fn tmpfs(at: &Path, bytes: u64) -> Result<Mount, String> {
        std::fs::create_dir_all(at).map_err(|e| e.to_string())?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(at)
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_owned());
        }
        Ok(Mount(at.to_path_buf()))
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// How long write-back may take to catch up once the full disk has room.
const RESUME_BOUND: Duration = Duration::from_secs(20);

/// Size of the disk tier's filesystem in the disk-full row.
const SMALL_DISK: u64 = 32 << 20;

/// Whether this process may mount a tmpfs (root, or the row is skipped).
fn can_mount() -> Result<(), String> {
    let probe = tempfile::tempdir().map_err(|e| e.to_string())?;
    Mount::tmpfs(&probe.path().join("m"), 1 << 20).map(drop)
}

async fn disk_full_run(seed: u64) -> Outcome {
    let mut rng = Rng::new(seed);
    let mut out = Outcome::default();
    let mut node = start_daemon(&NO_RETENTION).await;
    node.kill();
    // The disk tier's directory becomes a small filesystem, filled up to a
    // random point, so that it runs out in the middle of some shard.
    let _ = std::fs::remove_dir_all(&node.disk_dir);
    let mount = match Mount::tmpfs(&node.disk_dir, SMALL_DISK) {
        Ok(m) => m,
        Err(e) => {
            out.problem(format!("cannot mount a tmpfs: {e}"));
            return out;
        }
    };
    let free = rng.range(1 << 20, 20 << 20);
    let filler = node.disk_dir.join("filler");
    std::fs::write(&filler, vec![0u8; (SMALL_DISK - free) as usize]).expect("fill the disk");
    // The whole small filesystem is the tier's capacity: this row is about
    // the filesystem running out (ENOSPC), not the tier's own byte limit
    // (80 % of it by default), which would keep a step that fits the freed
    // space off the disk for good (disk_capacity.rs tests that limit).
    node.extra_args
        .extend(["--disk-capacity".to_owned(), SMALL_DISK.to_string()]);
    node.restart().await;
    let mut c = node.clients().await;
    // More than the free space, in steps of up to a few MiB.
    let mut ledger = Ledger::new("full", 1);
    let target = free + rng.range(2 << 20, 12 << 20);
    let mut step = 0;
    let mut saved = 0;
    while saved < target {
        step += 1;
        let files = plan_shards(&mut rng, 1, 1, 4 << 20)
            .pop()
            .map(|(_, _, f)| f)
            .unwrap_or_default();
        saved += files.iter().map(|(_, b)| b.len() as u64).sum::<u64>();
        let result = save_shard(&mut c, "full", step, 0, 1, &files).await;
        if let Err(e) = &result {
            out.problem(format!(
                "save of step {step} refused while only the disk was full: {e}"
            ));
        }
        ledger.shards.push(Written {
            step,
            rank: 0,
            files,
            acked: result.is_ok(),
            in_flight: result.is_err(),
        });
    }
    // Write-back runs into the full disk; wait until it has settled.
    let settle = Instant::now();
    let mut states = BTreeMap::new();
    while settle.elapsed() < Duration::from_secs(60) {
        states = disk_states(&mut c, "full").await;
        if !states.values().any(|s| *s == pb::ShardState::Pending) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let failed = states
        .values()
        .filter(|s| **s == pb::ShardState::Failed)
        .count();
    out.fired = failed > 0;
    let log = node.log_text();
    if failed > 0 {
        out.notes.push(format!(
            "{failed} of {} shards failed write-back with {} MiB free",
            states.len(),
            free >> 20
        ));
        let clear = [
            "No space left on device",
            "disk tier is full",
            "RESOURCE_EXHAUSTED",
        ];
        if !clear.iter().any(|m| log.contains(m)) {
            out.problem(
                "write-back failed on a full disk without saying the disk is full".to_string(),
            );
        }
    }
    // Nothing half-written: no temporary left behind; what disk lists as
    // durable is proven below by restoring from disk alone.
    let tmp = files_under(&node.disk_dir.join("tmp"));
    if !tmp.is_empty() {
        out.problem(format!(
            "{} temporary files left in the disk tier after failed write-backs",
            tmp.len()
        ));
    }
    check_steps(
        &node,
        &ledger,
        false,
        Expect::AllAcked,
        "while the disk is full",
        &mut out,
    )
    .await;
    // Space comes back: write-back must catch up without a restart.
    std::fs::remove_file(&filler).expect("free the disk");
    let freed = Instant::now();
    let acked: BTreeSet<u64> = ledger.acked_steps().into_iter().collect();
    let mut behind: Vec<u64> = acked.iter().copied().collect();
    while !behind.is_empty() && freed.elapsed() < RESUME_BOUND {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let states = disk_states(&mut c, "full").await;
        behind.retain(|step| states.get(step) != Some(&pb::ShardState::Durable));
    }
    if !behind.is_empty() {
        out.problem(format!(
            "write-back did not resume within {} s of space coming back: steps {behind:?} stay in memory only until a restart",
            RESUME_BOUND.as_secs()
        ));
        node.restart().await;
    }
    prove_from_disk(&mut node, &ledger, false, &mut out).await;
    node.kill();
    drop(mount);
    out.acked_bytes = ledger.acked_bytes();
    out
}

async fn disk_states(c: &mut Clients, job: &str) -> BTreeMap<u64, pb::ShardState> {
    let Ok(response) = c
        .checkpoint
        .list_steps(pb::ListStepsRequest {
            tenant: String::new(),
            job: job.into(),
            wait_for_all_tiers: true,
        })
        .await
    else {
        return BTreeMap::new();
    };
    response
        .into_inner()
        .jobs
        .into_iter()
        .flat_map(|j| j.steps)
        .filter_map(|s| {
            let shard = s.shards.first()?;
            let state = shard
                .tiers
                .iter()
                .find(|t| t.tier == pb::Tier::Disk as i32)
                .and_then(|t| pb::ShardState::try_from(t.state).ok())?;
            Some((s.step, state))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by ./scripts/torture"]
async fn disk_fills_up() {
    let name = "disk tier fills at a random offset";
    if !RowReport::wanted(name) {
        return;
    }
    if let Err(e) = can_mount() {
        assert!(
            std::env::var("TORTURE_REQUIRE_MOUNT").as_deref() != Ok("1"),
            "cannot mount a tmpfs for the disk-full row: {e}"
        );
        finish(vec![RowReport::skipped(
            name,
            &format!("cannot mount a tmpfs: {e}"),
        )]);
        return;
    }
    let runs = settings().runs.div_ceil(20).max(1);
    finish(vec![row(name, runs, disk_full_run).await]);
}

// ---------------------------------------------------------------------------
// The list of crash points stays complete
// ---------------------------------------------------------------------------

/// Every `crash_point("name")` in `daemon/src` has a row here, and every row
/// names a crash point that exists.
#[test]
fn every_crash_point_has_a_row() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut found = BTreeSet::new();
    for file in files_under(&src) {
        if file.extension().and_then(|e| e.to_str()) != Some("rs") {
            continue;
        }
        let text = std::fs::read_to_string(&file).expect("read source");
        for piece in text.split("crash_point(\"").skip(1) {
            if let Some(name) = piece.split('"').next() {
                found.insert(name.to_owned());
            }
        }
    }
    let rows: BTreeSet<String> = CRASH_POINTS.iter().map(|s| s.to_string()).collect();
    let missing: Vec<_> = found.difference(&rows).collect();
    let stale: Vec<_> = rows.difference(&found).collect();
    assert!(
        missing.is_empty(),
        "crash points without a torture row (add one to daemon/tests/torture.rs and docs/reliability.md): {missing:?}"
    );
    assert!(
        stale.is_empty(),
        "torture rows for crash points that no longer exist: {stale:?}"
    );
    let families = ["commit.", "writeback.", "upload.", "peer."];
    let homeless: Vec<_> = CRASH_POINTS
        .iter()
        .filter(|p| !families.iter().any(|f| p.starts_with(f)))
        .collect();
    assert!(
        homeless.is_empty(),
        "crash points that no torture test runs (give them a family): {homeless:?}"
    );
}

/// A multipart upload that fails is aborted, and an abort that stalls is
/// given up after one request timeout and tried again, so no parts stay
/// behind: the proxy stalls the first part upload (the upload attempt times
/// out) and the first abort (`DELETE ...?uploadId=`), then lets everything
/// through. Runs in the default suite.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multipart_upload_whose_part_and_abort_stall_leaves_nothing_open() {
    let Some(s3) = SeaweedFs::start_or_skip() else {
        assert!(
            std::env::var_os("CAIRN_REQUIRE_SERVERS").is_none(),
            "SeaweedFS is required (./scripts/install-test-servers)"
        );
        eprintln!("skipped: SeaweedFS not installed");
        return;
    };
    let plan = FaultPlan {
        rate: 1.0,
        weights: [0, 0, 1],
        stall: Some(Duration::from_secs(30)),
        only: vec![("partNumber=", 1), ("DELETE ", 1)],
    };
    let proxy = FaultProxy::start(s3.addr(), plan, 7).await;
    let prefix = "abort-retried";
    let config = bucket_config(&proxy.endpoint(), prefix, 3, 2);
    let (node, _config_dir) = bucket_daemon(&config).await;
    let mut c = node.clients().await;
    let chunk = bytes(3, 7 << 20);
    common::save(&mut c, shard("torture", 1, 0), &[("w", &chunk)])
        .await
        .expect("save");
    wait_durable(&mut c, "torture", 1, pb::Tier::ObjectStore, 90_000)
        .await
        .unwrap_or_else(|e| panic!("not durable in the bucket: {e}\n{}", node.log_text()));
    let [_, _, _, stalls] = proxy.counts().snapshot();
    assert_eq!(stalls, 2, "the part and the abort were both stalled once");
    assert_eq!(
        s3.open_multipart_uploads(prefix),
        Vec::<(String, String)>::new(),
        "a failed multipart upload was left open; log:\n{}",
        node.log_text()
    );
}
