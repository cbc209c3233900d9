//! `peer-bench`: the peer tier (T2) between real `cairnd` on loopback,
//! against a raw TCP copy of the same bytes between two sockets on the same
//! loopback, measured in the same run:
//!
//! | figure | Cairn | baseline |
//! |---|---|---|
//! | replication | commit on node-a → `WaitDurable(Peers)` (node-b holds every chunk and the manifest) | raw TCP copy, memory to memory; and into a file on node-b's disk + one fsync |
//! | restore from a peer | `RestoreShard` on node-a after its tiers were wiped (every chunk fetched from node-b, verified, into tmpfs) | raw TCP copy, memory to memory |
//! | restore from two peers | node-a's shard replicated to node-b and node-c (`replicas = 2`), node-a wiped: `RestoreShard` with both up (both must send part of it) | the same restore with node-c down |
//! | planned restore | node-a restarted without its memory tier, its disk holding a third of the chunks, node-b's replica lacking another third, a bucket (SeaweedFS S3 on loopback) holding all: the restore planner combines the three | the same shard from the bucket alone |
//!
//! Two more baselines are floors, the least the peer tier's guarantees cost
//! whatever carries them: the same bytes over one mutual-TLS connection
//! (the daemons' rustls, provider and certificates), the receiver hashing
//! every chunk-sized piece with BLAKE3 and writing it into tmpfs (what a
//! verified restore must do) or into a file beside node-b's replicas with
//! one fsync (what replication must do).
//!
//! Both run with mutual TLS (a CA and one certificate per node made here)
//! and again between `--insecure-peers` daemons, so the table shows what TLS
//! costs. Every repetition saves a fresh job with new random tensors (checked:
//! node-b's replica store grows by the whole shard), and the restored files
//! are compared with what was saved. Each figure also reports the CPU seconds
//! the processes involved used, and per GiB (every running daemon for Cairn, this
//! process, both ends, for the raw copies), and the daemons' peak resident
//! memory. `--concurrency`, `--restore-concurrency`,
//! `--replica-tmpfs` and `--disk-tmpfs` change the daemons' settings to see
//! where the time goes.
//!
//! Usage: `peer-bench [--quick] [--size-mib N] [--repeat N] [--out FILE]`,
//! through `./scripts/bench` (which builds cairnd next to it).

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use cairn_bench::{
    CpuMeter, Daemon, Process, Row, TENSORS, gbps, make_tensors, median, peak_rss_mib, per_gib,
    report, restore, save, stage, start_daemon, table, tempdir, wait_durable,
};
use cairn_core::chunk::DEFAULT_CHUNK_SIZE;
use cairn_daemon::client::Clients;
use cairn_proto::v1 as pb;
use clap::{Parser, ValueEnum};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use testkit::metric;
use testkit::pki::TestPki;
use testkit::s3::SeaweedFs;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

#[derive(Parser)]
#[command(about = "Peer tier (T2) between two cairnd against a raw TCP copy")]
struct Args {
    /// Small sizes, one repetition: a smoke run.
    #[arg(long)]
    quick: bool,
    /// Shard size in MiB (default 1024, or 64 with --quick).
    #[arg(long)]
    size_mib: Option<u64>,
    /// Repetitions per figure; the median is reported.
    #[arg(long)]
    repeat: Option<usize>,
    /// Also append the tables to this file (say,
    /// benches/results/peer-bench-DATE.txt).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Which peer transports to measure.
    #[arg(long, value_enum, default_value_t = Only::Both)]
    only: Only,
    /// `peers.concurrency` of both daemons: chunks in flight per replica
    /// copy (the daemon's default, 8, when not given).
    #[arg(long)]
    concurrency: Option<usize>,
    /// `disk.writeback_concurrency` of both daemons, which also bounds the
    /// chunks a restore fetches at once (the daemon's default when not
    /// given).
    #[arg(long)]
    restore_concurrency: Option<usize>,
    /// Keep node-b's replica store (and the file baseline) on /dev/shm
    /// instead of the disk: shows what node-b's disk and fsyncs cost.
    #[arg(long)]
    replica_tmpfs: bool,
    /// Keep both nodes' disk tiers and replica stores (and the file
    /// baseline) on /dev/shm: no disk at all, only CPU and loopback.
    #[arg(long)]
    disk_tmpfs: bool,
}

/// The peer transports measured.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Only {
    /// Mutual TLS, then `--insecure-peers`.
    Both,
    /// Mutual TLS only.
    Tls,
    /// `--insecure-peers` only.
    Insecure,
}

/// Size of one write of the raw TCP baseline.
const WRITE_SIZE: usize = 1 << 20;

/// The nodes' ids (also their certificates' DNS names): node-a saves and
/// restores, node-b (and node-c, in the two-peer cluster) hold its replicas.
const NODES: [&str; 3] = ["node-a", "node-b", "node-c"];

/// A free loopback port (free when this returns; the daemon binds it).
fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// One node of a [`Cluster`]: what it takes to start (and restart) it.
struct Node {
    work: PathBuf,
    memory_dir: PathBuf,
    /// `--config FILE`, plus `--insecure-peers` without TLS.
    args: Vec<String>,
    daemon: Option<Daemon>,
}

impl Node {
    async fn start(&mut self) -> Result<()> {
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        self.daemon = Some(start_daemon(&self.work, &self.memory_dir, &args).await?);
        Ok(())
    }

    /// The daemon's process id.
    fn pid(&self) -> Result<u32> {
        self.daemon
            .as_ref()
            .and_then(Daemon::pid)
            .context("the node is not running")
    }

    async fn connect(&self) -> Result<Clients> {
        self.daemon
            .as_ref()
            .context("the node is not running")?
            .connect()
            .await
    }

    /// SIGKILL, then its memory and disk tiers wiped and the daemon started
    /// again with the same configuration: a replacement node.
    async fn wipe_and_restart(&mut self) -> Result<()> {
        // Dropping the daemon kills it and removes its memory tier.
        let disk_dir = self.daemon.take().map(|d| d.disk_dir.clone());
        if let Some(disk_dir) = disk_dir {
            std::fs::remove_dir_all(&disk_dir)
                .with_context(|| format!("wiping {}", disk_dir.display()))?;
        }
        let _ = std::fs::remove_dir_all(&self.memory_dir);
        self.start().await
    }
}

/// node-a and node-b, each replicating to the other (replicas = 1); or
/// with node-c too, each replicating to both others (replicas = 2).
struct Cluster {
    a: Node,
    b: Node,
    c: Option<Node>,
    /// Where node-b keeps replicas; the file baseline writes next to it.
    replica_dir: PathBuf,
    /// Everything of this cluster under /tmp and /dev/shm.
    dirs: Vec<PathBuf>,
}

impl Cluster {
    /// With `bucket`, node-a also uploads to that S3 server (right after
    /// commit), and the cluster's directories are "mixed"; with `three`,
    /// node-c joins ("two-peers").
    async fn start(
        work: &Path,
        shm: &Path,
        tls: Option<&Path>,
        bucket: Option<&SeaweedFs>,
        three: bool,
        args: &Args,
    ) -> Result<Self> {
        let label = match (bucket.is_some(), three, tls.is_some()) {
            (true, _, _) => "mixed",
            (false, true, _) => "two-peers",
            (false, false, true) => "tls",
            (false, false, false) => "insecure",
        };
        let members = &NODES[..if three { 3 } else { 2 }];
        let work = work.join(label);
        let shm = shm.join(label);
        std::fs::create_dir_all(&work)?;
        let ports = members
            .iter()
            .map(|_| free_port())
            .collect::<Result<Vec<_>>>()?;
        if (1..ports.len()).any(|i| ports[..i].contains(&ports[i])) {
            bail!("got the same free port twice");
        }
        let mut nodes = Vec::new();
        let mut replica_dirs = Vec::new();
        for (i, name) in members.iter().enumerate() {
            // The node's socket and disk tier (`<work>/disk`).
            let node_work = if args.disk_tmpfs {
                shm.join(name)
            } else {
                work.join(name)
            };
            std::fs::create_dir_all(&node_work)?;
            let replica_dir = if args.replica_tmpfs && !args.disk_tmpfs {
                shm.join(format!("{name}-replicas"))
            } else {
                node_work.join("disk").join("replicas")
            };
            let mut toml = format!(
                "node_name = \"{name}\"\n\
                 [peers]\nlisten = \"127.0.0.1:{}\"\nreplicas = {}\nreplica_dir = {:?}\n",
                ports[i],
                members.len() - 1,
                replica_dir
            );
            if let Some(c) = args.concurrency {
                toml.push_str(&format!("concurrency = {c}\n"));
            }
            if let Some(pki) = tls {
                toml.push_str(&format!(
                    "[peers.tls]\ncert = {:?}\nkey = {:?}\nca = {:?}\n",
                    pki.join(format!("{name}.pem")),
                    pki.join(format!("{name}.key")),
                    pki.join("ca.pem"),
                ));
            }
            if let Some(c) = args.restore_concurrency {
                toml.push_str(&format!("[disk]\nwriteback_concurrency = {c}\n"));
            }
            if let Some(s3) = bucket
                && i == 0
            {
                toml.push_str(&s3.object_store_config("cairn", "upload_after = \"commit\""));
            }
            toml.push_str("[membership]\nsource = \"static\"\n");
            for (j, peer) in members.iter().enumerate() {
                toml.push_str(&format!(
                    "[[membership.peers]]\nid = \"{peer}\"\naddress = \"127.0.0.1:{}\"\n",
                    ports[j]
                ));
            }
            let config = work.join(format!("{name}.toml"));
            std::fs::write(&config, toml)
                .with_context(|| format!("writing {}", config.display()))?;
            let mut node_args = vec![
                "--config".to_owned(),
                config.to_str().context("utf-8 config path")?.to_owned(),
            ];
            if tls.is_none() {
                node_args.push("--insecure-peers".to_owned());
            }
            let mut node = Node {
                work: node_work,
                memory_dir: shm.join(format!("{name}-t0")),
                args: node_args,
                daemon: None,
            };
            node.start().await?;
            nodes.push(node);
            replica_dirs.push(replica_dir);
        }
        let c = if three { nodes.pop() } else { None };
        let b = nodes.pop().context("node-b")?;
        let a = nodes.pop().context("node-a")?;
        Ok(Self {
            a,
            b,
            c,
            replica_dir: replica_dirs.swap_remove(1),
            dirs: vec![work, shm],
        })
    }
}

impl Cluster {
    /// node-b, and node-c when the cluster has it.
    fn peers(&self) -> impl Iterator<Item = &Node> {
        std::iter::once(&self.b).chain(self.c.as_ref())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.a.daemon = None;
        self.b.daemon = None;
        self.c = None;
        for dir in &self.dirs {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// The mutual TLS of the raw floors: the same CA, node certificates, rustls
/// provider (aws-lc-rs) and cipher suites the daemons' peer tier uses, without
/// gRPC, HTTP/2 or Cairn around it.
struct RawTls {
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
}

impl RawTls {
    /// Issues certificates naming node-a (the client) and node-b (the
    /// server) from `pki`, under file names of their own.
    fn new(pki: &TestPki) -> Result<Self> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        for ca in CertificateDer::pem_file_iter(pki.ca_path())? {
            roots.add(ca?)?;
        }
        let roots = Arc::new(roots);
        let identity = |node: &str| -> Result<_> {
            let files = pki.issue_with_names(&format!("raw-{node}"), &[node]);
            let chain =
                CertificateDer::pem_file_iter(&files.cert)?.collect::<Result<Vec<_>, _>>()?;
            Ok((chain, PrivateKeyDer::from_pem_file(&files.key)?))
        };
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::clone(&roots),
            Arc::clone(&provider),
        )
        .build()?;
        let (chain, key) = identity(NODES[1])?;
        let server = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)?;
        let (chain, key) = identity(NODES[0])?;
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)?;
        Ok(Self {
            server: Arc::new(server),
            client: Arc::new(client),
        })
    }
}

/// How a raw copy runs: over plain TCP, or a floor for the peer tier.
#[derive(Clone, Copy)]
struct RawCopy<'a> {
    /// Mutual TLS on the connection.
    tls: Option<&'a RawTls>,
    /// The receiver hashes every chunk-sized piece with BLAKE3, as a peer
    /// verifies every chunk it receives.
    verify: bool,
    /// Where the receiver writes what it reads.
    sink: Option<&'a Path>,
    /// One fsync of the sink at the end.
    fsync: bool,
}

/// Copies `tensors` over a fresh loopback connection in this process: the
/// sender writes them from memory in [`WRITE_SIZE`] writes, the receiver
/// reads into one reused buffer of a chunk's size and, as `how` says,
/// hashes it and writes it into a file (fsynced once at the end). Returns
/// the seconds from connect until the receiver is done.
async fn raw_copy(tensors: &[Vec<u8>], how: RawCopy<'_>) -> Result<f64> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let total: u64 = tensors.iter().map(|t| t.len() as u64).sum();
    let mut file = how.sink.map(std::fs::File::create).transpose()?;
    let acceptor = how
        .tls
        .map(|tls| tokio_rustls::TlsAcceptor::from(Arc::clone(&tls.server)));
    let (verify, fsync) = (how.verify, how.fsync);
    let start = Instant::now();
    let receiver = tokio::spawn(async move {
        let (stream, _) = listener.accept().await?;
        let mut stream: Box<dyn AsyncRead + Send + Unpin> = match acceptor {
            Some(acceptor) => Box::new(acceptor.accept(stream).await?),
            None => Box::new(stream),
        };
        let mut buf = vec![0u8; DEFAULT_CHUNK_SIZE as usize];
        let mut received = 0u64;
        loop {
            // Fill the buffer: the file sees whole chunk-sized writes, and
            // the hash whole chunks.
            let mut filled = 0;
            while filled < buf.len() {
                let n = stream.read(&mut buf[filled..]).await?;
                if n == 0 {
                    break;
                }
                filled += n;
            }
            received += filled as u64;
            if verify {
                std::hint::black_box(blake3::hash(&buf[..filled]));
            }
            if let Some(f) = file.as_mut() {
                tokio::task::block_in_place(|| f.write_all(&buf[..filled]))?;
            }
            if filled < buf.len() {
                break;
            }
        }
        if let Some(f) = file
            && fsync
        {
            tokio::task::block_in_place(|| f.sync_all())?;
        }
        Ok::<u64, anyhow::Error>(received)
    });
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let mut stream: Box<dyn AsyncWrite + Send + Unpin> = match how.tls {
        Some(tls) => {
            let connector = tokio_rustls::TlsConnector::from(Arc::clone(&tls.client));
            let name = ServerName::try_from(NODES[1])?;
            Box::new(connector.connect(name, tcp).await?)
        }
        None => Box::new(tcp),
    };
    for tensor in tensors {
        for piece in tensor.chunks(WRITE_SIZE) {
            stream.write_all(piece).await?;
        }
    }
    stream.shutdown().await?;
    let received = receiver.await.context("the receiver task")??;
    let secs = start.elapsed().as_secs_f64();
    if received != total {
        bail!("the raw copy received {received} of {total} bytes");
    }
    if let Some(path) = how.sink {
        std::fs::remove_file(path)?;
    }
    Ok(secs)
}

/// The peers ListSteps names as holding `job`'s step.
async fn peer_holders(c: &mut Clients, job: &str, step: u64) -> Result<Vec<String>> {
    let jobs = c
        .checkpoint
        .list_steps(pb::ListStepsRequest {
            tenant: String::new(),
            job: job.into(),
            wait_for_all_tiers: true,
        })
        .await?
        .into_inner()
        .jobs;
    jobs.into_iter()
        .flat_map(|j| j.steps)
        .find(|s| s.step == step)
        .and_then(|s| s.shards.into_iter().next())
        .map(|s| s.peer_holders)
        .with_context(|| format!("step {step} of {job} is not listed"))
}

/// The unique chunk bytes a node holds as replicas for others.
async fn replica_bytes(c: &mut Clients) -> Result<u64> {
    Ok(c.admin
        .status(pb::StatusRequest {})
        .await?
        .into_inner()
        .peers
        .context("node-b has no peer tier")?
        .replica_bytes)
}

/// BLAKE3 of each tensor, by the file name the shard gives it.
fn hashes(tensors: &[Vec<u8>]) -> HashMap<String, blake3::Hash> {
    tensors
        .iter()
        .enumerate()
        .map(|(n, t)| (format!("tensor-{n}"), blake3::hash(t)))
        .collect()
}

/// Timings of one scenario: seconds, the CPU seconds of the processes
/// involved (this process for the baselines; node-a, node-b for Cairn) and,
/// for Cairn, the daemons' peak resident memory when the run ended.
#[derive(Default)]
struct Samples(Vec<f64>, Vec<Vec<f64>>, Vec<Vec<f64>>);

impl Samples {
    fn push(&mut self, secs: f64, cpu: Vec<f64>) {
        self.0.push(secs);
        self.1.push(cpu);
    }

    /// Records the peak RSS (MiB) so far of node-a and of the running
    /// ones of node-b and node-c.
    fn push_rss(&mut self, cluster: &Cluster) -> Result<()> {
        let mut rss = vec![peak_rss_mib(cluster.a.pid()?)?];
        for peer in cluster.peers() {
            if let Ok(pid) = peer.pid() {
                rss.push(peak_rss_mib(pid)?);
            }
        }
        self.2.push(rss);
        Ok(())
    }

    fn median(&self) -> f64 {
        median(self.0.clone())
    }

    /// Median CPU seconds of each process, joined with " + ".
    fn cpu(&self) -> String {
        let processes = self.1.first().map_or(0, Vec::len);
        (0..processes)
            .map(|i| format!("{:.2}", median(self.1.iter().map(|c| c[i]).collect())))
            .collect::<Vec<_>>()
            .join(" + ")
    }

    /// Median CPU seconds of all the processes together, per GiB of
    /// `total` bytes.
    fn cpu_per_gib(&self, total: u64) -> Option<f64> {
        if self.1.is_empty() {
            return None;
        }
        Some(per_gib(
            median(self.1.iter().map(|c| c.iter().sum()).collect()),
            total,
        ))
    }

    /// The highest peak RSS of each daemon over the runs, in MiB, joined
    /// with " / "; "-" when not measured.
    fn peak_rss(&self) -> String {
        let processes = self.2.first().map_or(0, Vec::len);
        if processes == 0 {
            return "-".to_owned();
        }
        (0..processes)
            .map(|i| {
                let peak = self
                    .2
                    .iter()
                    .filter_map(|r| r.get(i).copied())
                    .fold(0.0, f64::max);
                format!("{peak:.0}")
            })
            .collect::<Vec<_>>()
            .join(" / ")
    }

    fn list(&self) -> String {
        self.0
            .iter()
            .map(|s| format!("{s:.3}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Every timing of a run.
#[derive(Default)]
struct Timings {
    tcp_memory: Samples,
    tcp_file: Samples,
    /// Mutual TLS alone, memory to memory: what the peer tier's encryption
    /// costs.
    tls_memory: Samples,
    /// The least a verified restore from a peer must do: mutual TLS, a
    /// BLAKE3 of every chunk, a write into tmpfs.
    floor_restore: Samples,
    /// The least replication must do: mutual TLS, a BLAKE3 of every chunk,
    /// a write into a file beside node-b's replicas and one fsync.
    floor_replicate: Samples,
    replicate_tls: Samples,
    replicate_insecure: Samples,
    restore_tls: Samples,
    restore_insecure: Samples,
    /// Replicas on node-b and node-c; node-c down, so every chunk comes
    /// from node-b.
    restore_one_of_two: Samples,
    /// The same, both up: the planner splits the chunks between them.
    restore_two: Samples,
    /// The planner combining node-a's disk, node-b and the bucket.
    restore_mixed: Samples,
    /// The same shard from the bucket alone.
    restore_bucket: Samples,
}

/// The running daemons' processes (node-a first), as [`CpuMeter`] takes
/// them.
fn daemon_pids(cluster: &Cluster) -> Result<Vec<Process>> {
    let mut pids = vec![Process::Pid(cluster.a.pid()?)];
    for peer in cluster.peers() {
        if let Ok(pid) = peer.pid() {
            pids.push(Process::Pid(pid));
        }
    }
    Ok(pids)
}

/// Saves, replicates and restores `repeat` fresh jobs through `cluster`,
/// each after the two raw TCP copies of the same bytes and, with `floors`
/// (a TLS cluster), the two mutual-TLS floors.
async fn run_cluster(
    cluster: &mut Cluster,
    floors: Option<&RawTls>,
    total: u64,
    repeat: usize,
    timings: &mut Timings,
) -> Result<()> {
    let tls = floors.is_some();
    let label = if tls { "tls" } else { "insecure" };
    let (replicate, restored) = if tls {
        (&mut timings.replicate_tls, &mut timings.restore_tls)
    } else {
        (
            &mut timings.replicate_insecure,
            &mut timings.restore_insecure,
        )
    };
    let baseline_file = cluster
        .replica_dir
        .parent()
        .context("the replica dir has a parent")?
        .join("raw-tcp-baseline");
    let floor_tmpfs_file = cluster.a.memory_dir.with_file_name("raw-tls-floor");
    for run in 0..repeat {
        // make_tensors seeds tensor t with seed + t: seeds TENSORS apart
        // share no tensor, so no chunk deduplicates against an earlier run.
        let seed = (if tls { 1 } else { 1 + repeat as u64 } + run as u64) * TENSORS as u64 * 10;
        let tensors = make_tensors(total, seed);
        let expected = hashes(&tensors);

        let plain = RawCopy {
            tls: None,
            verify: false,
            sink: None,
            fsync: false,
        };
        let into_file = RawCopy {
            sink: Some(&baseline_file),
            fsync: true,
            ..plain
        };
        let mut copies = vec![
            (plain, &mut timings.tcp_memory),
            (into_file, &mut timings.tcp_file),
        ];
        if let Some(tls) = floors {
            let tls = Some(tls);
            let floor_file = RawCopy {
                tls,
                verify: true,
                ..into_file
            };
            let floor_tmpfs = RawCopy {
                sink: Some(&floor_tmpfs_file),
                fsync: false,
                ..floor_file
            };
            copies.push((RawCopy { tls, ..plain }, &mut timings.tls_memory));
            copies.push((floor_file, &mut timings.floor_replicate));
            copies.push((floor_tmpfs, &mut timings.floor_restore));
        }
        for (how, samples) in copies {
            let cpu = CpuMeter::this()?;
            let secs = raw_copy(&tensors, how).await?;
            samples.push(secs, cpu.stop()?);
        }

        let job = format!("peer-{label}-{run}");
        let mut b = cluster.b.connect().await?;
        let held_before = replica_bytes(&mut b).await?;
        let mut c = cluster.a.connect().await?;
        let session_id = stage(&mut c, &job, 1, &tensors).await?;
        drop(tensors);
        c.checkpoint
            .commit_shard(pb::CommitShardRequest { session_id })
            .await?;
        let cpu = CpuMeter::start(daemon_pids(cluster)?)?;
        let t = Instant::now();
        wait_durable(&mut c, &job, 1, pb::Tier::Peers).await?;
        replicate.push(t.elapsed().as_secs_f64(), cpu.stop()?);
        replicate.push_rss(cluster)?;
        let holders = peer_holders(&mut c, &job, 1).await?;
        if holders != ["node-b"] {
            bail!("{job}: peer holders {holders:?}, expected node-b");
        }
        // Every byte crossed: node-b holds `total` more unique bytes.
        let held = replica_bytes(&mut b).await? - held_before;
        if held != total {
            bail!("{job}: node-b's replica store grew by {held} bytes, not {total}");
        }
        // Let node-a's write-back to its disk finish before the restore and
        // the next run.
        wait_durable(&mut c, &job, 1, pb::Tier::Disk).await?;
        drop(c);

        let mut c = restore_from_peers(cluster, &job, total, &expected, restored).await?;
        // The restored shard is node-a's again: it goes back to its disk
        // and node-b is asked whether it still holds it. Let both finish.
        wait_durable(&mut c, &job, 1, pb::Tier::Disk).await?;
        wait_durable(&mut c, &job, 1, pb::Tier::Peers).await?;
    }
    Ok(())
}

/// node-a wiped and restarted, then `job`'s step 1 restored there: its
/// time, the daemons' CPU and peak RSS go into `samples`, and the restore
/// must have come from peers alone and give back `expected`. Returns a
/// client of node-a.
async fn restore_from_peers(
    cluster: &mut Cluster,
    job: &str,
    total: u64,
    expected: &HashMap<String, blake3::Hash>,
    samples: &mut Samples,
) -> Result<Clients> {
    cluster.a.wipe_and_restart().await?;
    let mut c = cluster.a.connect().await?;
    let cpu = CpuMeter::start(daemon_pids(cluster)?)?;
    let t = Instant::now();
    let response = restore(&mut c, job, 1).await?;
    samples.push(t.elapsed().as_secs_f64(), cpu.stop()?);
    samples.push_rss(cluster)?;
    check_restore(job, &response, total, &[pb::Tier::Peers], expected)?;
    Ok(c)
}

/// Restore from two peers at once against one: node-a's shard replicated to
/// node-b and node-c (replicas = 2), then node-a wiped and restored once
/// with node-c down (every chunk from node-b) and once with both up. Checks
/// that both peers sent part of the shard (node-a's
/// `cairn_peer_received_bytes_total`) and that the bytes are the ones saved.
async fn run_two_peers(
    cluster: &mut Cluster,
    total: u64,
    repeat: usize,
    timings: &mut Timings,
) -> Result<()> {
    for run in 0..repeat {
        let job = format!("two-peers-{run}");
        let tensors = make_tensors(total, (2_000 + run as u64) * TENSORS as u64 * 10);
        let expected = hashes(&tensors);
        let mut c = cluster.a.connect().await?;
        save(&mut c, &job, 1, &tensors).await?;
        drop(tensors);
        wait_durable(&mut c, &job, 1, pb::Tier::Peers).await?;
        let mut holders = peer_holders(&mut c, &job, 1).await?;
        holders.sort();
        if holders != NODES[1..] {
            bail!("{job}: peer holders {holders:?}, expected node-b and node-c");
        }
        wait_durable(&mut c, &job, 1, pb::Tier::Disk).await?;
        drop(c);

        let node_c = cluster
            .c
            .as_mut()
            .context("the two-peer cluster has node-c")?;
        node_c.daemon = None;
        let one = &mut timings.restore_one_of_two;
        drop(restore_from_peers(cluster, &job, total, &expected, one).await?);

        cluster
            .c
            .as_mut()
            .context("the two-peer cluster has node-c")?
            .start()
            .await?;
        let mut c =
            restore_from_peers(cluster, &job, total, &expected, &mut timings.restore_two).await?;
        let metrics = cluster
            .a
            .daemon
            .as_ref()
            .context("node-a is running")?
            .metrics()
            .await;
        for peer in &NODES[1..] {
            let received = metric(
                &metrics,
                &format!("cairn_peer_received_bytes_total{{peer=\"{peer}\"}}"),
            );
            if received < 1.0 {
                bail!("{job}: nothing of the two-peer restore came from {peer}");
            }
        }
        // The restored shard is node-a's again; let its write-back and
        // holder check finish before the next run.
        wait_durable(&mut c, &job, 1, pb::Tier::Disk).await?;
        wait_durable(&mut c, &job, 1, pb::Tier::Peers).await?;
    }
    Ok(())
}

/// The unique chunk ids of rank 0 of `job` at `step`, as hex, sorted.
async fn chunk_ids(c: &mut Clients, job: &str, step: u64) -> Result<Vec<String>> {
    let manifest = c
        .checkpoint
        .get_manifest(pb::GetManifestRequest {
            shard: Some(pb::ShardSelector {
                tenant: String::new(),
                job: job.into(),
                step: Some(step),
                rank: 0,
            }),
        })
        .await?
        .into_inner()
        .manifest
        .context("GetManifest without a manifest")?;
    let mut ids: Vec<String> = manifest
        .files
        .iter()
        .flat_map(|f| &f.chunks)
        .map(|c| c.id.iter().map(|b| format!("{b:02x}")).collect())
        .collect();
    ids.sort();
    ids.dedup();
    Ok(ids)
}

/// Removes the chunks `ids` from a chunk store's directory (the default
/// tenant's `chunks/`), those already gone included.
fn remove_chunks(chunks: &Path, ids: &[String]) -> Result<()> {
    for id in ids {
        let path = chunks.join(&id[..2]).join(id);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e).with_context(|| format!("removing {}", path.display()));
            }
            _ => {}
        }
    }
    Ok(())
}

/// Checks that every tier in `want`, and no other, served part of a
/// restore of `total` bytes, and that the restored files are `expected`.
fn check_restore(
    job: &str,
    response: &pb::RestoreShardResponse,
    total: u64,
    want: &[pb::Tier],
    expected: &HashMap<String, blake3::Hash>,
) -> Result<()> {
    let all: u64 = response.sources.iter().map(|s| s.bytes).sum();
    for tier in want {
        let from: u64 = response
            .sources
            .iter()
            .filter(|s| s.tier == *tier as i32)
            .map(|s| s.bytes)
            .sum();
        if from == 0 {
            bail!("{job}: nothing came from {tier:?}: {:?}", response.sources);
        }
    }
    let others = response
        .sources
        .iter()
        .any(|s| s.bytes > 0 && !want.iter().any(|t| *t as i32 == s.tier));
    if all != total || others {
        bail!(
            "{job}: restored from {:?}, wanted {want:?}",
            response.sources
        );
    }
    if response.files.len() != TENSORS {
        bail!("{job}: restored {} files", response.files.len());
    }
    for file in &response.files {
        let got = blake3::hash(
            &std::fs::read(&file.path).with_context(|| format!("reading {}", file.path))?,
        );
        if expected.get(&file.name) != Some(&got) {
            bail!("{job}: {} differs after the restore", file.name);
        }
    }
    Ok(())
}

/// The restore planner's case: node-a restarts with its memory tier lost,
/// its disk holding a third of the shard's chunks, node-b's replica lacking
/// another third and the bucket holding all of it, so no source but the
/// bucket has the whole shard and the restore must combine all three. The
/// baseline is the same shard restored from the bucket alone (node-a wiped,
/// node-b down), the only single source that could.
async fn run_mixed(
    cluster: &mut Cluster,
    total: u64,
    repeat: usize,
    timings: &mut Timings,
) -> Result<()> {
    let job = "mixed";
    let tensors = make_tensors(total, 1_000_000);
    let expected = hashes(&tensors);
    let mut c = cluster.a.connect().await?;
    save(&mut c, job, 1, &tensors).await?;
    drop(tensors);
    for tier in [pb::Tier::Peers, pb::Tier::Disk, pb::Tier::ObjectStore] {
        wait_durable(&mut c, job, 1, tier).await?;
    }
    let ids = chunk_ids(&mut c, job, 1).await?;
    drop(c);
    let third = ids.len() / 3;
    if third == 0 {
        bail!("{job}: {} chunks are too few to split in three", ids.len());
    }
    let a_chunks = cluster.a.work.join("disk/tenants/default/chunks");
    let b_chunks = cluster.replica_dir.join("tenants/default/chunks");
    for _ in 0..repeat {
        cluster.a.daemon = None;
        remove_chunks(&a_chunks, &ids[third..])?;
        remove_chunks(&b_chunks, &ids[2 * third..])?;
        cluster.a.start().await?;
        let mut c = cluster.a.connect().await?;
        let cpu = CpuMeter::start(daemon_pids(cluster)?)?;
        let t = Instant::now();
        let response = restore(&mut c, job, 1).await?;
        timings
            .restore_mixed
            .push(t.elapsed().as_secs_f64(), cpu.stop()?);
        timings.restore_mixed.push_rss(cluster)?;
        let all = [pb::Tier::Disk, pb::Tier::Peers, pb::Tier::ObjectStore];
        check_restore(job, &response, total, &all, &expected)?;
        // node-a sends node-b the chunks it lost; let that finish first.
        wait_durable(&mut c, job, 1, pb::Tier::Peers).await?;
    }
    cluster.b.daemon = None;
    for _ in 0..repeat {
        cluster.a.wipe_and_restart().await?;
        let mut c = cluster.a.connect().await?;
        let cpu = CpuMeter::start(vec![Process::Pid(cluster.a.pid()?)])?;
        let t = Instant::now();
        let response = restore(&mut c, job, 1).await?;
        timings
            .restore_bucket
            .push(t.elapsed().as_secs_f64(), cpu.stop()?);
        timings.restore_bucket.push_rss(cluster)?;
        check_restore(job, &response, total, &[pb::Tier::ObjectStore], &expected)?;
    }
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args = Args::parse();
    let size_mib = args.size_mib.unwrap_or(if args.quick { 64 } else { 1024 });
    let repeat = args.repeat.unwrap_or(if args.quick { 1 } else { 3 });
    if repeat == 0 {
        bail!("--repeat must be at least 1");
    }
    let total = size_mib << 20;
    // Removed when they go out of scope, early errors included.
    let work_dir = tempdir("/tmp", "cairn-peer-bench")?;
    let shm_dir = tempdir("/dev/shm", "cairn-peer-bench")?;
    let (work, shm) = (work_dir.path(), shm_dir.path());
    // A throwaway CA and one certificate per node (`<node>.pem`, `.key`).
    let pki = TestPki::new();
    for node in NODES {
        pki.issue(node);
    }
    let header = format!(
        "peer-bench: {size_mib} MiB in {TENSORS} tensors, node-a -> node-b on loopback, replicas 1, \
         peers.concurrency {}, restore concurrency {}, node-b's replicas on {}, median of {repeat} runs, {} cores",
        args.concurrency
            .map_or("8 (default)".to_owned(), |c| c.to_string()),
        args.restore_concurrency
            .map_or("default".to_owned(), |c| c.to_string()),
        if args.disk_tmpfs {
            "tmpfs (both disk tiers too)"
        } else if args.replica_tmpfs {
            "tmpfs"
        } else {
            "disk"
        },
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );
    println!("{header}");

    let mut timings = Timings::default();
    if args.only != Only::Insecure {
        let mut cluster = Cluster::start(work, shm, Some(pki.dir()), None, false, &args).await?;
        let floors = RawTls::new(&pki)?;
        run_cluster(&mut cluster, Some(&floors), total, repeat, &mut timings).await?;
        drop(cluster);
        let s3 = SeaweedFs::start()?;
        let mut cluster =
            Cluster::start(work, shm, Some(pki.dir()), Some(&s3), false, &args).await?;
        run_mixed(&mut cluster, total, repeat, &mut timings).await?;
        drop(cluster);
        drop(s3);
        let mut cluster = Cluster::start(work, shm, Some(pki.dir()), None, true, &args).await?;
        run_two_peers(&mut cluster, total, repeat, &mut timings).await?;
    }
    if args.only != Only::Tls {
        let mut cluster = Cluster::start(work, shm, None, None, false, &args).await?;
        run_cluster(&mut cluster, None, total, repeat, &mut timings).await?;
    }

    let tcp = timings.tcp_memory.median();
    let mut detail = String::from(
        "\n| scenario | bytes | seconds (median) | GB/s | ratio vs raw TCP | CPU s | CPU s/GiB \
         | peak RSS MiB | runs (s) |\n|---|---:|---:|---:|---:|---|---:|---|---|\n",
    );
    let mut line = |name: &str, samples: &Samples| {
        if samples.0.is_empty() {
            return;
        }
        let secs = samples.median();
        detail.push_str(&format!(
            "| {name} | {total} | {secs:.3} | {:.2} | {:.2} | {} | {} | {} | {} |\n",
            gbps(total, secs),
            tcp / secs,
            samples.cpu(),
            samples
                .cpu_per_gib(total)
                .map_or_else(|| "-".to_owned(), |c| format!("{c:.2}")),
            samples.peak_rss(),
            samples.list()
        ));
    };
    line("raw TCP copy, memory to memory", &timings.tcp_memory);
    line("raw TCP copy into a file + one fsync", &timings.tcp_file);
    line("mutual-TLS copy, memory to memory", &timings.tls_memory);
    line(
        "floor: mutual-TLS copy, BLAKE3 per chunk, into a file + one fsync",
        &timings.floor_replicate,
    );
    line(
        "floor: mutual-TLS copy, BLAKE3 per chunk, into tmpfs",
        &timings.floor_restore,
    );
    line(
        "replication, mutual TLS (commit to durable on node-b)",
        &timings.replicate_tls,
    );
    line("replication, --insecure-peers", &timings.replicate_insecure);
    line(
        "restore from node-b, mutual TLS (verified, into tmpfs)",
        &timings.restore_tls,
    );
    line(
        "restore from node-b, --insecure-peers",
        &timings.restore_insecure,
    );
    line(
        "restore from node-b of a shard node-b and node-c hold, node-c down, mutual TLS",
        &timings.restore_one_of_two,
    );
    line(
        "restore from node-b and node-c at once, mutual TLS",
        &timings.restore_two,
    );
    line(
        "restore planned over node-a's disk (1/3), node-b (2/3) and the bucket (all), mutual TLS",
        &timings.restore_mixed,
    );
    line(
        "restore from the bucket alone (SeaweedFS S3 on loopback, same shard)",
        &timings.restore_bucket,
    );
    detail.push_str(
        "\nCPU s: user + system seconds (median run) of the bench process (both ends) for the raw \
         copies, of node-a + node-b for Cairn (node-a's include its write-back to its own disk \
         tier, which runs alongside replication; node-a alone for the bucket-only restore, \
         node-b being down). CPU s/GiB: all of them together, per GiB of the shard. Peak RSS: \
         VmHWM of node-a / node-b since they started (node-a restarts before each restore), \
         the highest at the end of any run; it counts the tmpfs pages a daemon maps.\n",
    );
    print!("{detail}");

    let mut rows = Vec::new();
    let vs = |figure, samples: &Samples, base: &Samples, baseline_name, goal| {
        let (secs, base_secs) = (samples.median(), base.median());
        Row {
            figure,
            cairn: gbps(total, secs),
            baseline: gbps(total, base_secs),
            baseline_name,
            ratio: base_secs / secs,
            goal,
            cairn_cpu: samples.cpu_per_gib(total),
            baseline_cpu: base.cpu_per_gib(total),
        }
    };
    for (samples, figure, figure_file) in [
        (
            &timings.replicate_tls,
            "replication, mutual TLS",
            "replication, mutual TLS (vs file)",
        ),
        (
            &timings.replicate_insecure,
            "replication, --insecure-peers",
            "replication, --insecure-peers (vs file)",
        ),
    ] {
        if samples.0.is_empty() {
            continue;
        }
        rows.push(vs(
            figure,
            samples,
            &timings.tcp_memory,
            "raw TCP copy, memory to memory",
            "throughput ratio >= 0.7",
        ));
        rows.push(vs(
            figure_file,
            samples,
            &timings.tcp_file,
            "raw TCP copy into a file + fsync",
            "throughput ratio >= 0.7",
        ));
    }
    for (samples, figure) in [
        (&timings.restore_tls, "restore from a peer, mutual TLS"),
        (
            &timings.restore_insecure,
            "restore from a peer, --insecure-peers",
        ),
    ] {
        if !samples.0.is_empty() {
            rows.push(vs(
                figure,
                samples,
                &timings.tcp_memory,
                "raw TCP copy, memory to memory",
                "throughput ratio >= 0.5",
            ));
        }
    }
    // How far Cairn is from the least its guarantees cost: the floors carry
    // the same TLS, hash and write, and nothing else.
    for (samples, floor, figure, floor_name) in [
        (
            &timings.replicate_tls,
            &timings.floor_replicate,
            "replication, mutual TLS (vs floor)",
            "floor: TLS + BLAKE3 into a file + fsync",
        ),
        (
            &timings.restore_tls,
            &timings.floor_restore,
            "restore from a peer, mutual TLS (vs floor)",
            "floor: TLS + BLAKE3 into tmpfs",
        ),
    ] {
        if !samples.0.is_empty() && !floor.0.is_empty() {
            rows.push(vs(
                figure,
                samples,
                floor,
                floor_name,
                "throughput ratio (report)",
            ));
        }
    }
    if !timings.restore_two.0.is_empty() {
        rows.push(vs(
            "restore from two peers at once, mutual TLS",
            &timings.restore_two,
            &timings.restore_one_of_two,
            "restore from one of them (the other down)",
            "speed-up > 1",
        ));
    }
    if !timings.restore_mixed.0.is_empty() {
        rows.push(vs(
            "restore, planner over disk + peer + bucket",
            &timings.restore_mixed,
            &timings.restore_bucket,
            "restore from the bucket alone (S3)",
            "speed-up (report)",
        ));
        rows.push(vs(
            "restore, planner over disk + peer + bucket",
            &timings.restore_mixed,
            &timings.restore_tls,
            "restore from a peer alone (mutual TLS)",
            "speed-up (report)",
        ));
    }
    if !timings.replicate_tls.0.is_empty() && !timings.replicate_insecure.0.is_empty() {
        rows.push(vs(
            "TLS cost: replication with mutual TLS",
            &timings.replicate_tls,
            &timings.replicate_insecure,
            "replication, --insecure-peers",
            "throughput ratio (report)",
        ));
    }
    report("peer-bench", total, &rows)?;

    if let Some(out) = &args.out {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(out)
            .with_context(|| format!("opening {}", out.display()))?;
        let command: Vec<String> = std::env::args().collect();
        write!(
            f,
            "\n# {}\n{header}\n{detail}{}",
            command.join(" "),
            table(&rows)
        )?;
        println!("\nappended to {}", out.display());
    }
    Ok(())
}
