//! The peer tier (T2) between real `cairnd` processes, each in its own
//! network namespace (veth pairs on a bridge; see `common::netns`), talking
//! mutual TLS with certificates from a test CA.
//!
//! Where namespaces cannot be created the harness falls back to distinct
//! 127.0.x.y addresses and says so; the partition test is then skipped with
//! a printed reason.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use cairn_core::{JobName, Member, Membership, NodeId, PlacementKey, Rank, TenantName};
use cairn_proto::v1 as pb;
use common::netns::Network;
use common::{
    Daemon, bytes, job_steps, restore, save, shard, source_bytes, start_daemon_in, wait_durable,
    wait_until,
};
use testkit::pki::TestPki;

const PEER_PORT: u16 = 7071;

/// How each node's certificate is made.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Cert {
    /// Signed by the cluster's CA, naming the node.
    Good,
    /// Signed by the cluster's CA, naming another node.
    WrongName,
    /// Naming the node, signed by another CA.
    ForeignCa,
}

/// N daemons, one per namespace, all in one static membership.
struct Cluster {
    /// First, so the daemons are gone before their namespaces (fields drop
    /// in declaration order).
    nodes: Vec<Daemon>,
    net: Network,
    pki: TestPki,
    foreign: TestPki,
    configs: tempfile::TempDir,
}

fn node_name(i: usize) -> String {
    format!("node-{i}")
}

/// What one node of a cluster differs in.
#[derive(Clone, Default)]
struct NodeOptions {
    cert: Option<Cert>,
    env: Vec<(&'static str, &'static str)>,
    /// More keys for the `[peers]` section.
    peers_toml: &'static str,
}

impl NodeOptions {
    /// A node started with these `FAILPOINTS`.
    fn failpoints(spec: &'static str) -> NodeOptions {
        NodeOptions {
            env: vec![("FAILPOINTS", spec)],
            ..NodeOptions::default()
        }
    }
}

impl Cluster {
    async fn start(n: usize, replicas: usize) -> Cluster {
        Self::start_with(n, replicas, &HashMap::new()).await
    }

    /// Starts `n` nodes, some of them with `options`.
    async fn start_with(
        n: usize,
        replicas: usize,
        options: &HashMap<usize, NodeOptions>,
    ) -> Cluster {
        let net = Network::create(n);
        let mut cluster = Cluster {
            net,
            pki: TestPki::new(),
            foreign: TestPki::new(),
            configs: tempfile::tempdir().expect("temp dir"),
            nodes: Vec::new(),
        };
        for i in 0..n {
            let options = options.get(&i).cloned().unwrap_or_default();
            let config = cluster.write_config(i, replicas, &options);
            let args = [
                "--config",
                config.to_str().expect("utf-8"),
                "--node-name",
                &node_name(i),
            ];
            let daemon = start_daemon_in(cluster.net.namespace(i), &args, &options.env).await;
            cluster.nodes.push(daemon);
        }
        cluster
    }

    fn write_config(&self, i: usize, replicas: usize, options: &NodeOptions) -> PathBuf {
        let name = node_name(i);
        let issued = match options.cert.unwrap_or(Cert::Good) {
            Cert::Good => self.pki.issue(&name),
            Cert::WrongName => self
                .pki
                .issue_with_names(&format!("{name}-wrong"), &["node-99"]),
            Cert::ForeignCa => self.foreign.issue(&name),
        };
        // Scrubbing is off unless a test turns it on: the tests that corrupt
        // replica chunks on purpose want the restore, not a scrub, to find
        // them.
        let scrub = if options.peers_toml.contains("scrub_bytes_per_sec") {
            ""
        } else {
            "scrub_bytes_per_sec = 0\n"
        };
        let mut toml = format!(
            "[peers]\nlisten = \"{}:{PEER_PORT}\"\nreplicas = {replicas}\nrequest_timeout_secs = 10\n{scrub}{}\n\
             [peers.tls]\ncert = {:?}\nkey = {:?}\nca = {:?}\n\
             [membership]\nsource = \"static\"\n",
            self.net.addr(i),
            options.peers_toml,
            issued.cert,
            issued.key,
            self.pki.ca_path(),
        );
        for j in 0..self.net.nodes() {
            toml.push_str(&format!(
                "[[membership.peers]]\nid = \"{}\"\naddress = \"{}:{PEER_PORT}\"\n",
                node_name(j),
                self.net.addr(j)
            ));
        }
        let path = self.configs.path().join(format!("{name}.toml"));
        std::fs::write(&path, toml).expect("write config");
        path
    }

    /// The nodes placement gives the replicas of rank `rank` of `job`
    /// saved on node `owner`, in order (the same pure function the daemons
    /// use).
    fn placement(&self, owner: usize, job: &str, rank: u32, replicas: usize) -> Vec<usize> {
        let members: Vec<Member> = (0..self.nodes.len())
            .map(|i| Member::new(NodeId::parse("id", node_name(i)).expect("node id")))
            .collect();
        let membership = Membership::new(members.clone()).expect("membership");
        let key = PlacementKey {
            tenant: TenantName::parse("tenant", "default".into()).expect("tenant"),
            job: JobName::parse("job", job.into()).expect("job"),
            rank: Rank(rank),
        };
        membership
            .place(&key, &members[owner], replicas)
            .iter()
            .map(|id| {
                id.as_str()
                    .strip_prefix("node-")
                    .and_then(|i| i.parse().ok())
                    .expect("node-N")
            })
            .collect()
    }
}

/// Files of a shard of `chunks` test chunks (two files, neither aligned).
fn shard_files(seed: u64, chunks: usize) -> Vec<(String, Vec<u8>)> {
    let total = chunks * common::TEST_CHUNK as usize;
    let first = total / 3 + 1234;
    vec![
        ("model.bin".into(), bytes(seed, first)),
        ("optim.bin".into(), bytes(seed + 1, total - first)),
    ]
}

async fn save_files(node: &Daemon, job: &str, step: u64, files: &[(String, Vec<u8>)]) {
    let refs: Vec<(&str, &[u8])> = files
        .iter()
        .map(|(n, b)| (n.as_str(), b.as_slice()))
        .collect();
    let mut c = node.clients().await;
    save(&mut c, shard(job, step, 0), &refs)
        .await
        .expect("save");
}

/// Chunk bytes node `i` received from peers since it started.
fn received_bytes(net: &Network, i: usize, node: &Daemon) -> u64 {
    metrics_in_namespace(net, i, node)
        .lines()
        .filter(|l| l.starts_with("cairn_peer_received_bytes_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

async fn shard_status(node: &Daemon, job: &str, step: u64) -> pb::ShardStatus {
    let mut c = node.clients().await;
    job_steps(&mut c, job)
        .await
        .into_iter()
        .find(|s| s.step == step)
        .and_then(|s| s.shards.into_iter().next())
        .unwrap_or_else(|| panic!("step {step} of {job} is not listed"))
}

fn peer_state(shard: &pb::ShardStatus) -> pb::ShardState {
    shard
        .tiers
        .iter()
        .find(|t| t.tier == pb::Tier::Peers as i32)
        .map(|t| pb::ShardState::try_from(t.state).expect("state"))
        .expect("a peers tier state")
}

async fn replica_shards(node: &Daemon) -> u64 {
    let mut c = node.clients().await;
    testkit::status(&mut c)
        .await
        .peers
        .expect("peer tier status")
        .replica_shards
}

/// Kills a node's daemon and wipes its memory and disk tiers, as a
/// replacement node would start.
async fn wipe_and_restart(node: &mut Daemon) {
    node.kill();
    for dir in [&node.memory_dir, &node.disk_dir] {
        let _ = std::fs::remove_dir_all(dir);
    }
    node.restart().await;
}

async fn assert_restores_from_peers(
    node: &Daemon,
    job: &str,
    step: u64,
    files: &[(String, Vec<u8>)],
) {
    let mut c = node.clients().await;
    let (response, restored) = restore(&mut c, job, Some(step), 0)
        .await
        .expect("restore from peers");
    for (name, expected) in files {
        assert!(
            restored.get(name) == Some(expected),
            "{name} differs after restoring from peers"
        );
    }
    let total: u64 = files.iter().map(|(_, b)| b.len() as u64).sum();
    assert_eq!(source_bytes(&response, pb::Tier::Peers), total);
}

/// Prometheus text of a daemon inside its namespace.
fn metrics_in_namespace(net: &Network, i: usize, node: &Daemon) -> String {
    let log = node.log_text();
    let addr = log
        .lines()
        .rev()
        .find(|l| l.contains("cairnd ready"))
        .and_then(|l| l.split("metrics=Some(").nth(1))
        .and_then(|rest| rest.split(')').next())
        .expect("metrics address in the log")
        .to_owned();
    let output = net
        .command(i, common::netns::python())
        .args([
            "-c",
            "import sys, urllib.request; print(urllib.request.urlopen('http://' + sys.argv[1] + '/metrics').read().decode())",
            &addr,
        ])
        .output()
        .expect("run python");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn replicates_to_one_peer_and_restores_a_wiped_node() {
    let mut cluster = Cluster::start(3, 1).await;
    let files = shard_files(1, 40);
    save_files(&cluster.nodes[0], "r1", 10, &files).await;
    let mut c = cluster.nodes[0].clients().await;
    wait_durable(&mut c, "r1", 10, pb::Tier::Peers, 30_000)
        .await
        .expect("durable on one peer");
    let expected = cluster.placement(0, "r1", 0, 1);
    let shard = shard_status(&cluster.nodes[0], "r1", 10).await;
    assert_eq!(peer_state(&shard), pb::ShardState::Durable);
    assert_eq!(shard.peer_holders, vec![node_name(expected[0])]);
    assert_eq!(shard.peer_replicas_wanted, 1);
    assert_eq!(replica_shards(&cluster.nodes[expected[0]]).await, 1);
    // The operator sees the same through the CLI.
    let out = cluster.nodes[0].cli(&["--json", "list", "--job", "r1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json list");
    let listed_shard = &listed["jobs"][0]["steps"][0]["shards"][0];
    assert_eq!(listed_shard["peer_holders"][0], node_name(expected[0]));
    assert_eq!(listed_shard["tiers"]["peers"], "durable");
    let out = cluster.nodes[0].cli(&["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(
            "peer tier: node id node-0, 1 replica(s) per shard, membership from static, mutual TLS"
        ),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "member node-2 at {}:{PEER_PORT}",
            cluster.net.addr(2)
        )),
        "{text}"
    );
    let other = 3 - expected[0];
    assert_eq!(
        replica_shards(&cluster.nodes[other]).await,
        0,
        "only the placed peer holds it; log of node 0:\n{}",
        cluster.nodes[0].log_text()
    );

    wipe_and_restart(&mut cluster.nodes[0]).await;
    assert_restores_from_peers(&cluster.nodes[0], "r1", 10, &files).await;
    // The restored shard is local again: memory now, disk after write-back.
    let mut c = cluster.nodes[0].clients().await;
    common::wait_disk(&mut c, "r1", 10).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn replicates_to_two_peers_and_restores_from_both() {
    let mut cluster = Cluster::start(3, 2).await;
    let files = shard_files(2, 64);
    save_files(&cluster.nodes[0], "r2", 5, &files).await;
    let mut c = cluster.nodes[0].clients().await;
    wait_durable(&mut c, "r2", 5, pb::Tier::Peers, 30_000)
        .await
        .expect("durable on two peers");
    let shard = shard_status(&cluster.nodes[0], "r2", 5).await;
    let mut holders = shard.peer_holders.clone();
    holders.sort();
    assert_eq!(holders, vec![node_name(1), node_name(2)]);
    for holder in 1..3 {
        assert_eq!(replica_shards(&cluster.nodes[holder]).await, 1);
    }
    // A second step with most chunks unchanged sends only what changed.
    let mut next = files.clone();
    next[1].1[..1000].fill(7);
    save_files(&cluster.nodes[0], "r2", 6, &next).await;
    let mut c = cluster.nodes[0].clients().await;
    wait_durable(&mut c, "r2", 6, pb::Tier::Peers, 30_000)
        .await
        .expect("second step durable on two peers");
    if cluster.net.isolated() {
        let scrape = metrics_in_namespace(&cluster.net, 0, &cluster.nodes[0]);
        for holder in 1..3 {
            let sent = common::metric(
                &scrape,
                &format!(
                    "cairn_peer_sent_bytes_total{{peer=\"{}\"}}",
                    node_name(holder)
                ),
            ) as usize;
            let one_step: usize = files.iter().map(|(_, b)| b.len()).sum();
            assert!(
                sent < one_step + 2 * common::TEST_CHUNK as usize,
                "the second step resent unchanged chunks to {holder}: {sent} bytes"
            );
        }
    }

    wipe_and_restart(&mut cluster.nodes[0]).await;
    assert_restores_from_peers(&cluster.nodes[0], "r2", 6, &next).await;
    if cluster.net.isolated() {
        let scrape = metrics_in_namespace(&cluster.net, 0, &cluster.nodes[0]);
        for holder in 1..3 {
            let received = common::metric(
                &scrape,
                &format!(
                    "cairn_peer_received_bytes_total{{peer=\"{}\"}}",
                    node_name(holder)
                ),
            );
            assert!(
                received > 0.0,
                "the restore read nothing from {}",
                node_name(holder)
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_peer_killed_mid_shard_gets_the_rest_when_it_returns() {
    // Node 1 kills itself (SIGKILL) on the 301st chunk it receives of a
    // 1,000-chunk shard; with R = 2 in a 3-node cluster the step cannot be
    // durable until it is back.
    let options = HashMap::from([(
        1,
        NodeOptions::failpoints("peer.receive_chunk=300*off->return"),
    )]);
    let mut cluster = Cluster::start_with(3, 2, &options).await;
    let files = shard_files(3, 1000);
    save_files(&cluster.nodes[0], "kill", 1, &files).await;
    assert!(
        cluster.nodes[1].wait_exit(Duration::from_secs(60)),
        "node 1 did not die at its failpoint"
    );
    let mut c = cluster.nodes[0].clients().await;
    let early = wait_durable(&mut c, "kill", 1, pb::Tier::Peers, 2_000).await;
    assert_eq!(
        early
            .expect_err("one of two replicas must not count as durable")
            .code(),
        tonic::Code::DeadlineExceeded
    );
    let shard = shard_status(&cluster.nodes[0], "kill", 1).await;
    assert_ne!(peer_state(&shard), pb::ShardState::Durable);
    assert!(!shard.peer_problem.is_empty(), "the status says why");

    cluster.nodes[1].restart().await;
    wait_durable(&mut c, "kill", 1, pb::Tier::Peers, 90_000)
        .await
        .expect("durable on two peers once node 1 is back");
    // What node 1 had stored before it died is not sent again: after its
    // restart it receives the 700 chunks it lacked, plus at most the ones
    // that were in flight when it died (`peers.concurrency`, 8).
    let received = received_bytes(&cluster.net, 1, &cluster.nodes[1]);
    assert!(
        received <= (700 + 8) * common::TEST_CHUNK,
        "node 1 received {received} bytes after its restart, {} chunks' worth",
        received / common::TEST_CHUNK
    );
    // Node 1's copy is whole: with node 2 gone, a wiped node 0 restores
    // every byte from node 1 alone.
    cluster.nodes[2].kill();
    wipe_and_restart(&mut cluster.nodes[0]).await;
    assert_restores_from_peers(&cluster.nodes[0], "kill", 1, &files).await;
}

/// SIGTERM on the sender in the middle of a long replication: it stops
/// within its drain deadline (20 s) with every background task stopped, and
/// once started again it finishes the copy.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_mid_replication_drains_in_time_and_replication_resumes() {
    // Node 1 takes each chunk 20 ms late: 1,000 chunks take 20 s or more.
    let options = HashMap::from([(1, NodeOptions::failpoints("peer.receive_chunk=sleep(20)"))]);
    let mut cluster = Cluster::start_with(2, 1, &options).await;
    let files = shard_files(8, 1000);
    save_files(&cluster.nodes[0], "drain", 1, &files).await;
    wait_until(
        Duration::from_secs(60),
        "replication to start",
        async || replica_chunk_files(&cluster.nodes[1]).len() >= 50,
    )
    .await;
    let stopping = std::time::Instant::now();
    cluster.nodes[0].stop().await;
    let stopped_in = stopping.elapsed();
    let log = cluster.nodes[0].log_text();
    assert!(
        stopped_in < Duration::from_secs(20),
        "node 0 took {stopped_in:?} to stop; its log:\n{log}"
    );
    assert!(
        log.contains("background tasks stopped")
            && !log.contains("still running at the shutdown deadline"),
        "every background task should have stopped before the deadline; the log:\n{log}"
    );
    let held = replica_chunk_files(&cluster.nodes[1]).len();
    assert!(held < 1000, "the copy was cut short ({held} chunks held)");

    cluster.nodes[0].restart().await;
    let mut c = cluster.nodes[0].clients().await;
    wait_durable(&mut c, "drain", 1, pb::Tier::Peers, 120_000)
        .await
        .expect("replicated once node 0 is back");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_partition_does_not_corrupt_or_count_as_durable() {
    let mut cluster = Cluster::start(3, 2).await;
    if !cluster.net.isolated() {
        eprintln!("SKIPPED: partitions need network namespaces, which are unavailable here");
        return;
    }
    cluster.net.partition(0);
    let files = shard_files(4, 50);
    save_files(&cluster.nodes[0], "part", 3, &files).await;
    let mut c = cluster.nodes[0].clients().await;
    let cut_off = wait_durable(&mut c, "part", 3, pb::Tier::Peers, 5_000).await;
    assert_eq!(
        cut_off.expect_err("nothing reached a peer").code(),
        tonic::Code::DeadlineExceeded
    );
    let shard = shard_status(&cluster.nodes[0], "part", 3).await;
    assert!(shard.peer_holders.is_empty(), "{:?}", shard.peer_holders);
    assert_ne!(peer_state(&shard), pb::ShardState::Durable);
    for holder in 1..3 {
        assert_eq!(replica_shards(&cluster.nodes[holder]).await, 0);
    }

    cluster.net.heal(0);
    let started = Instant::now();
    wait_durable(&mut c, "part", 3, pb::Tier::Peers, 90_000)
        .await
        .expect("durable once the partition heals");
    eprintln!("durable {:?} after healing", started.elapsed());
    wipe_and_restart(&mut cluster.nodes[0]).await;
    assert_restores_from_peers(&cluster.nodes[0], "part", 3, &files).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn peers_with_wrong_certificates_are_refused() {
    // Node 1's certificate names another node; node 2's comes from another
    // CA. Node 0 must not count either as a holder.
    let cert = |cert| NodeOptions {
        cert: Some(cert),
        ..NodeOptions::default()
    };
    let options = HashMap::from([(1, cert(Cert::WrongName)), (2, cert(Cert::ForeignCa))]);
    let cluster = Cluster::start_with(3, 1, &options).await;
    let files = shard_files(5, 8);
    save_files(&cluster.nodes[0], "certs", 1, &files).await;
    let mut c = cluster.nodes[0].clients().await;
    let refused = wait_durable(&mut c, "certs", 1, pb::Tier::Peers, 5_000).await;
    assert_eq!(
        refused.expect_err("no peer proved who it is").code(),
        tonic::Code::DeadlineExceeded
    );
    for holder in 1..3 {
        assert_eq!(replica_shards(&cluster.nodes[holder]).await, 0);
    }
    // Node 1, calling node 0 with a certificate for another name, is
    // refused by node 0's service with a message naming the mismatch.
    save_files(&cluster.nodes[1], "certs-from-1", 1, &files).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let log = cluster.nodes[0].log_text();
        if log.contains("does not prove it is node node-1") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node 0 never refused node 1; log:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(replica_shards(&cluster.nodes[0]).await, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_chunk_the_sender_read_wrong_is_refused_and_sent_again_from_a_good_copy() {
    // The sender reads chunks for a peer without hashing them (the peer
    // hashes them). Here node 0 flips a byte of the first two it reads, as
    // if its memory tier's bytes had changed since the commit: node 1 must
    // refuse both, and node 0 send a checked copy instead.
    let options = HashMap::from([(
        0,
        NodeOptions::failpoints("transfer.corrupt_unchecked_read=2*return"),
    )]);
    let cluster = Cluster::start_with(2, 1, &options).await;
    let files = shard_files(8, 16);
    save_files(&cluster.nodes[0], "flip", 1, &files).await;
    let mut c = cluster.nodes[0].clients().await;
    wait_durable(&mut c, "flip", 1, pb::Tier::Peers, 30_000)
        .await
        .expect("durable on node 1");
    let receiver = metrics_in_namespace(&cluster.net, 1, &cluster.nodes[1]);
    assert_eq!(
        metric(
            &receiver,
            "cairn_rpc_errors_total{code=\"DataLoss\",method=\"Peer/PutChunk\"}"
        ),
        2.0,
        "node 1 refused the two bad chunks"
    );
    let sender = metrics_in_namespace(&cluster.net, 0, &cluster.nodes[0]);
    assert_eq!(
        metric(&sender, "cairn_chunk_verify_failures_total{tier=\"peers\"}"),
        2.0
    );
    assert_eq!(
        cluster.nodes[0].count_in_log("the receiver refused a chunk read without a check"),
        2
    );
    // Node 1's replica is whole: every chunk checks out on it.
    let out = cluster.nodes[0].cli(&["verify", "--job", "flip", "--step", "1", "--tier", "peers"]);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_peer_sends_the_replica_to_the_next_candidate() {
    // The peer placement prefers for this rank can take 1 MiB of replicas;
    // the shard is 4 MiB.
    let probe = Cluster::start(3, 1).await;
    let preferred = probe.placement(0, "full", 0, 1)[0];
    drop(probe);
    let options = HashMap::from([(
        preferred,
        NodeOptions {
            peers_toml: "replica_capacity_bytes = 1048576",
            ..NodeOptions::default()
        },
    )]);
    let cluster = Cluster::start_with(3, 1, &options).await;
    let files = shard_files(6, 64);
    save_files(&cluster.nodes[0], "full", 1, &files).await;
    let mut c = cluster.nodes[0].clients().await;
    wait_durable(&mut c, "full", 1, pb::Tier::Peers, 30_000)
        .await
        .expect("durable on the next candidate");
    let next = 3 - preferred;
    let shard = shard_status(&cluster.nodes[0], "full", 1).await;
    assert_eq!(shard.peer_holders, vec![node_name(next)]);
    assert_eq!(replica_shards(&cluster.nodes[preferred]).await, 0);
    assert!(
        cluster.nodes[0].log_text().contains("reason=\"full\""),
        "the sender logs why it skipped the full peer"
    );
}

/// A cluster whose membership comes from DNS: every node resolves one name
/// through the real resolver, which reads the namespace's own `/etc/hosts`
/// (`ip netns exec` binds `/etc/netns/<ns>/hosts` over it). Editing that
/// file in place is a node joining or leaving.
struct DnsCluster {
    nodes: Vec<Daemon>,
    net: Network,
    configs: tempfile::TempDir,
    hosts: Vec<PathBuf>,
}

const PEERS_NAME: &str = "peers.cairn.test";

impl DnsCluster {
    async fn start(n: usize, replicas: usize) -> Option<DnsCluster> {
        let net = Network::create(n);
        if !net.isolated() {
            return None;
        }
        let mut cluster = DnsCluster {
            nodes: Vec::new(),
            configs: tempfile::tempdir().expect("temp dir"),
            hosts: (0..n)
                .map(|i| {
                    let dir =
                        PathBuf::from("/etc/netns").join(net.namespace(i).expect("namespace"));
                    std::fs::create_dir_all(&dir).expect("create /etc/netns/<ns>");
                    dir.join("hosts")
                })
                .collect(),
            net,
        };
        cluster.set_members(&(0..n).collect::<Vec<_>>());
        for i in 0..n {
            let name = cluster.net.addr(i).to_string();
            let config = cluster.configs.path().join(format!("{i}.toml"));
            std::fs::write(
                &config,
                format!(
                    "[peers]\nlisten = \"{name}:{PEER_PORT}\"\nreplicas = {replicas}\nrequest_timeout_secs = 10\n\
                     [membership]\nsource = \"dns\"\nname = \"{PEERS_NAME}\"\ninterval_secs = 1\n"
                ),
            )
            .expect("write config");
            let args = [
                "--config",
                config.to_str().expect("utf-8"),
                "--node-name",
                &name,
                "--insecure-peers",
            ];
            let daemon = start_daemon_in(cluster.net.namespace(i), &args, &[]).await;
            cluster.nodes.push(daemon);
        }
        Some(cluster)
    }

    /// What the name resolves to, on every node (written in place, so the
    /// bind mounts see it).
    fn set_members(&self, members: &[usize]) {
        let mut text = String::from("127.0.0.1 localhost\n");
        for &i in members {
            text.push_str(&format!("{} {PEERS_NAME}\n", self.net.addr(i)));
        }
        for path in &self.hosts {
            std::fs::write(path, &text).expect("write hosts");
        }
    }

    fn id(&self, i: usize) -> String {
        self.net.addr(i).to_string()
    }

    fn index_of(&self, id: &str) -> usize {
        (0..self.nodes.len())
            .find(|&i| self.id(i) == id)
            .unwrap_or_else(|| panic!("{id} is no node"))
    }
}

impl Drop for DnsCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            node.kill();
        }
        for path in &self.hosts {
            if let Some(dir) = path.parent() {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn members_leaving_are_replaced_and_a_new_node_restores() {
    let Some(mut cluster) = DnsCluster::start(4, 2).await else {
        eprintln!(
            "SKIPPED: DNS membership per node needs network namespaces, which are unavailable here"
        );
        return;
    };
    let files = shard_files(7, 48);
    save_files(&cluster.nodes[0], "leave", 1, &files).await;
    let mut c = cluster.nodes[0].clients().await;
    wait_durable(&mut c, "leave", 1, pb::Tier::Peers, 30_000)
        .await
        .expect("durable on two peers");
    let first = shard_status(&cluster.nodes[0], "leave", 1)
        .await
        .peer_holders;
    assert_eq!(first.len(), 2);
    let lost_holder = cluster.index_of(&first[0]);
    let kept_holder = cluster.index_of(&first[1]);
    let spare = (1..4)
        .find(|i| *i != lost_holder && *i != kept_holder)
        .expect("a fourth node");

    // A holder dies: the owner notices it left and replicates to the spare.
    cluster.nodes[lost_holder].kill();
    cluster.set_members(&[0, kept_holder, spare]);
    let spare_id = cluster.id(spare);
    wait_until(
        Duration::from_secs(60),
        "the owner replaced the lost holder",
        async || {
            let holders = shard_status(&cluster.nodes[0], "leave", 1)
                .await
                .peer_holders;
            holders.len() == 2 && holders.contains(&spare_id)
        },
    )
    .await;
    assert_eq!(replica_shards(&cluster.nodes[spare]).await, 1);

    // The owner dies, the lost holder comes back as a new, empty node, and
    // the spare dies: the remaining holder re-replicates the orphaned
    // replica to where placement now puts it, so the step keeps two copies.
    cluster.nodes[0].kill();
    cluster.set_members(&[kept_holder, spare, lost_holder]);
    wipe_and_restart(&mut cluster.nodes[lost_holder]).await;
    cluster.nodes[spare].kill();
    cluster.set_members(&[kept_holder, lost_holder]);
    wait_until(
        Duration::from_secs(60),
        "the orphaned replica has two holders again",
        async || replica_shards(&cluster.nodes[lost_holder]).await >= 1,
    )
    .await;

    // A replacement for the owner, with empty tiers, restores every byte
    // from the peers.
    cluster.set_members(&[0, kept_holder, lost_holder]);
    wipe_and_restart(&mut cluster.nodes[0]).await;
    let mut c = cluster.nodes[0].clients().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let (response, restored) = loop {
        match restore(&mut c, "leave", Some(1), 0).await {
            Ok(done) => break done,
            Err(e) if Instant::now() < deadline => {
                eprintln!("restore not possible yet: {e}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => panic!("restore from peers failed: {e}"),
        }
    };
    for (name, expected) in &files {
        assert!(restored.get(name) == Some(expected), "{name} differs");
    }
    let total: u64 = files.iter().map(|(_, b)| b.len() as u64).sum();
    assert_eq!(source_bytes(&response, pb::Tier::Peers), total);
}

/// The replica chunk files a node holds for the default tenant.
fn replica_chunk_files(node: &Daemon) -> Vec<PathBuf> {
    common::files_under(&node.disk_dir.join("replicas/tenants/default/chunks"))
}

fn chunk_file(node: &Daemon, id: &[u8]) -> PathBuf {
    let hex: String = id.iter().map(|b| format!("{b:02x}")).collect();
    node.disk_dir
        .join("replicas/tenants/default/chunks")
        .join(&hex[..2])
        .join(hex)
}

async fn manifest_chunks(node: &Daemon, job: &str, step: u64) -> Vec<Vec<u8>> {
    let mut c = node.clients().await;
    let manifest = c
        .checkpoint
        .get_manifest(pb::GetManifestRequest {
            shard: Some(common::selector(job, Some(step), 0)),
        })
        .await
        .expect("manifest")
        .into_inner()
        .manifest
        .expect("manifest");
    let mut ids: Vec<Vec<u8>> = manifest
        .files
        .iter()
        .flat_map(|f| f.chunks.iter().map(|c| c.id.clone()))
        .collect();
    ids.sort();
    ids.dedup();
    ids
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restore_combines_disk_and_two_damaged_peers_into_the_exact_bytes() {
    let mut cluster = Cluster::start(3, 2).await;
    // Step 1 stays on node 0's disk; step 2 shares its first file with it.
    let step1 = shard_files(8, 40);
    let mut step2 = step1.clone();
    step2[1].1 = bytes(80, step1[1].1.len());
    save_files(&cluster.nodes[0], "spread", 1, &step1).await;
    save_files(&cluster.nodes[0], "spread", 2, &step2).await;
    let mut c = cluster.nodes[0].clients().await;
    for step in [1, 2] {
        wait_durable(&mut c, "spread", step, pb::Tier::Peers, 30_000)
            .await
            .expect("durable on both peers");
        common::wait_disk(&mut c, "spread", step).await;
    }
    let ids = manifest_chunks(&cluster.nodes[0], "spread", 2).await;
    // Node 0 keeps only step 1: its disk has step 2's shared chunks, not the rest.
    c.checkpoint
        .delete_step(pb::DeleteStepRequest {
            tenant: String::new(),
            job: "spread".into(),
            step: 2,
        })
        .await
        .expect("delete step 2 locally");
    // Node 1 loses half of step 2's chunks and node 2's copies of the other
    // half are corrupted: no single source has it all.
    let (first_half, second_half) = ids.split_at(ids.len() / 2);
    for id in first_half {
        std::fs::remove_file(chunk_file(&cluster.nodes[1], id)).expect("remove from node 1");
    }
    for id in second_half {
        let path = chunk_file(&cluster.nodes[2], id);
        let mut stored = std::fs::read(&path).expect("a chunk node 2 holds");
        stored[100] ^= 0xff;
        std::fs::write(&path, stored).expect("corrupt it");
    }
    assert!(!replica_chunk_files(&cluster.nodes[1]).is_empty());

    let mut c = cluster.nodes[0].clients().await;
    let (response, restored) = restore(&mut c, "spread", Some(2), 0)
        .await
        .expect("restore from disk and peers");
    for (name, expected) in &step2 {
        assert!(restored.get(name) == Some(expected), "{name} differs");
    }
    let total: u64 = step2.iter().map(|(_, b)| b.len() as u64).sum();
    let from_disk = source_bytes(&response, pb::Tier::Disk);
    let from_peers = source_bytes(&response, pb::Tier::Peers);
    assert!(from_disk > 0, "the shared chunks come from the local disk");
    assert!(from_peers > 0, "the rest from the peers");
    assert_eq!(from_disk + from_peers, total);
    let log = cluster.nodes[0].log_text();
    assert!(
        log.contains("peer:node-2"),
        "the restore names its sources:\n{log}"
    );
    assert!(
        log.contains("chunk failed verification, trying its next source"),
        "the corrupt copy was caught and reported"
    );
    // Both peers served part of it.
    assert!(log.contains("chunks restored by source"), "{log}");
    let _ = &mut cluster;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_peer_killed_mid_restore_leaves_the_rest_to_the_other() {
    // Node 1 serves 200 chunks of a 1,000-chunk restore, then dies.
    let options = HashMap::from([(
        1,
        NodeOptions::failpoints("peer.serve_chunk=200*off->return"),
    )]);
    let mut cluster = Cluster::start_with(3, 2, &options).await;
    let files = shard_files(9, 1000);
    save_files(&cluster.nodes[0], "midway", 1, &files).await;
    let mut c = cluster.nodes[0].clients().await;
    wait_durable(&mut c, "midway", 1, pb::Tier::Peers, 60_000)
        .await
        .expect("durable on both peers");
    wipe_and_restart(&mut cluster.nodes[0]).await;
    assert_restores_from_peers(&cluster.nodes[0], "midway", 1, &files).await;
    assert!(
        cluster.nodes[1].wait_exit(Duration::from_secs(5)),
        "node 1 should have died serving the restore"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_operator_prefetches_a_step_onto_a_replacement_node() {
    // The holders serve each chunk 100 ms late, so the prefetch runs long
    // enough to be watched.
    let slow = NodeOptions::failpoints("peer.serve_chunk=sleep(100)");
    let options = HashMap::from([(0, slow.clone()), (1, slow)]);
    let mut cluster = Cluster::start_with(3, 2, &options).await;
    let files = shard_files(10, 30);
    save_files(&cluster.nodes[0], "prefetch", 4, &files).await;
    let mut c = cluster.nodes[0].clients().await;
    wait_durable(&mut c, "prefetch", 4, pb::Tier::Peers, 30_000)
        .await
        .expect("durable on both peers");
    // Node 2 is replaced: empty tiers, its replica gone with them.
    wipe_and_restart(&mut cluster.nodes[2]).await;

    // From node 0, the operator fills node 2 before the job restarts there,
    // while node 2's status shows how far the restore is.
    let socket = cluster.nodes[0].socket.clone();
    let cli = std::thread::spawn(move || {
        std::process::Command::new(common::CAIRN)
            .arg("--socket")
            .arg(&socket)
            .args([
                "--json", "restore", "--job", "prefetch", "--step", "latest", "--node", "node-2",
            ])
            .output()
            .expect("run cairn")
    });
    let total: u64 = files.iter().map(|(_, b)| b.len() as u64).sum();
    let mut target = cluster.nodes[2].clients().await;
    let mut seen_midway = None;
    while !cli.is_finished() {
        let status = testkit::status(&mut target).await;
        if let Some(running) = status.restores.first() {
            assert_eq!(
                running.shard.as_ref().map(|s| s.job.as_str()),
                Some("prefetch")
            );
            assert_eq!(running.total_bytes, total);
            if running.done_bytes > 0 && running.done_bytes < total {
                seen_midway = Some(running.clone());
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let out = cli.join().expect("cli thread");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let midway = seen_midway.expect("node 2's status showed the restore part-way");
    assert!(
        midway
            .sources
            .iter()
            .all(|s| s.source.starts_with("peer:node-")),
        "{midway:?}"
    );
    let done: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(done["node"], "node-2");
    assert_eq!(done["step"], 4);
    assert_eq!(done["bytes"], total);
    assert_eq!(done["sources"]["peers"], total, "{done}");
    let status = testkit::status(&mut target).await;
    assert!(status.restores.is_empty(), "{:?}", status.restores);
    // The metrics say which peers the bytes came from, and that none are left.
    let metrics = metrics_in_namespace(&cluster.net, 2, &cluster.nodes[2]);
    let from_peers: u64 = metrics
        .lines()
        .filter(|l| l.starts_with("cairn_restore_source_bytes_total{source=\"peer:node-"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert_eq!(from_peers, total, "{metrics}");
    assert!(
        metrics.contains("cairn_restore_remaining_bytes 0"),
        "{metrics}"
    );
    assert!(metrics.contains("cairn_restores_active 0"), "{metrics}");

    // The job's pod on node 2 then restores from memory.
    let mut c = cluster.nodes[2].clients().await;
    let (response, restored) = restore(&mut c, "prefetch", None, 0)
        .await
        .expect("restore on node 2");
    assert_eq!(source_bytes(&response, pb::Tier::Memory), total);
    for (name, expected) in &files {
        assert!(restored.get(name) == Some(expected), "{name} differs");
    }

    // A failure on the other node keeps its meaning: nothing to restore there.
    let out = cluster.nodes[0].cli(&["restore", "--job", "no-such-job", "--node", "node-2"]);
    assert_eq!(out.status.code(), Some(4));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("node node-2: ") && stderr.contains("no-such-job"),
        "{stderr}"
    );

    let out = cluster.nodes[0].cli(&["restore", "--job", "prefetch", "--node", "node-9"]);
    assert_eq!(out.status.code(), Some(4));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("node node-9 is not a member"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `attack` as a process on node `node` would: on a thread of its own
/// that joins the node's network namespace (in loopback mode, plainly), with
/// a runtime of its own (a runtime's sockets belong to the namespace of the
/// thread that opens them).
fn from_node<T: Send + 'static>(
    net: &Network,
    node: usize,
    attack: impl AsyncFnOnce() -> T + Send + 'static,
) -> T {
    let namespace = net.namespace(node).map(|ns| format!("/run/netns/{ns}"));
    std::thread::spawn(move || {
        if let Some(path) = namespace {
            let file = std::fs::File::open(&path).expect("open the node's network namespace");
            rustix::thread::move_into_link_name_space(
                std::os::fd::AsFd::as_fd(&file),
                Some(rustix::thread::LinkNameSpaceType::Network),
            )
            .expect("join the node's network namespace");
        }
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(attack())
    })
    .join()
    .expect("attacking thread")
}

/// Finding 3 of the hardening review, end to end: a member whose key an
/// attacker holds (node-0, its certificate signed by the cluster's CA) sends
/// replicas straight to the other daemons' peer port. It may not plant a
/// step naming another node as its owner: the refusal names both nodes, and
/// nothing it sent is listed anywhere. (A replica sent where placement does
/// not put it is refused too, `peer::service`'s unit tests; with three nodes
/// every node is a candidate, the R placed plus the fallbacks.)
#[tokio::test(flavor = "multi_thread")]
async fn a_compromised_member_cannot_plant_replicas_in_other_nodes_names() {
    use cairn_core::{
        ChunkId, ChunkRef, ChunkSize, FileEntry, FileName, MANIFEST_VERSION, Manifest, ShardKey,
        Step,
    };
    use cairn_daemon::tier::peer::client::PeerClient;
    use cairn_daemon::tier::peer::tls::{PeerTls, TlsFiles};

    let cluster = Cluster::start(3, 1).await;
    let job = "victim";
    let placed = cluster.placement(0, job, 0, 1)[0];
    let elsewhere = 3 - placed;
    let stolen = cluster
        .pki
        .issue_with_names("node-0-stolen", &[&node_name(0)]);
    let tls = PeerTls::load(&TlsFiles {
        cert: stolen.cert,
        key: stolen.key,
        ca: cluster.pki.ca_path(),
    })
    .expect("load the stolen identity");
    let addrs: Vec<std::net::SocketAddr> = (0..3)
        .map(|i| std::net::SocketAddr::new(cluster.net.addr(i), PEER_PORT))
        .collect();
    let data = bytes(99, 4096);
    let id = ChunkId::of(&data);
    let manifest = Manifest {
        version: MANIFEST_VERSION,
        shard: ShardKey {
            tenant: TenantName::parse("tenant", "default".into()).expect("tenant"),
            job: JobName::parse("job", job.into()).expect("job"),
            step: Step(999),
            rank: Rank(0),
        },
        world_size: Some(1),
        chunk_size: ChunkSize::new(common::TEST_CHUNK).expect("chunk size"),
        files: vec![FileEntry {
            name: FileName::parse("file", "model.bin".into()).expect("name"),
            size: data.len() as u64,
            chunks: vec![ChunkRef {
                id,
                len: data.len() as u64,
            }],
            metadata: Default::default(),
        }],
        metadata: Default::default(),
        committed_unix_ms: 1,
        attempt: None,
    };
    let member = |i: usize| Member::new(NodeId::parse("id", node_name(i)).expect("id"));
    let at_step = |step: u64| {
        let mut m = manifest.clone();
        m.shard.step = Step(step);
        m
    };
    // The third node besides node-0 and `target`, named as the owner.
    let spoofed_for = |target: usize| member(3 - target);
    // Each: target node, owner named in the request, the replica.
    let sends = [
        // Its own replica where placement puts it: stored (the attacking
        // client works; the refusals below are not connection failures).
        (placed, member(0), at_step(1)),
        // Another node's name as the owner, to either node.
        (placed, spoofed_for(placed), at_step(999)),
        (elsewhere, spoofed_for(elsewhere), at_step(999)),
    ];
    let owners: Vec<String> = sends.iter().map(|(_, o, _)| o.id.to_string()).collect();
    let outcomes = from_node(&cluster.net, 0, async move || {
        let mut outcomes = Vec::new();
        for (target, owner, manifest) in sends {
            let client = PeerClient::new(
                &NodeId::parse("id", node_name(0)).expect("id"),
                NodeId::parse("id", node_name(target)).expect("id"),
                addrs[target],
                Some(&tls),
                Duration::from_secs(10),
                Default::default(),
            )
            .expect("peer client");
            client
                .put_chunk(&manifest.shard.tenant, &id, data.clone().into())
                .await
                .expect("a chunk alone is accepted (content-addressed, verified)");
            outcomes.push(client.put_manifest(&manifest, &owner).await);
        }
        outcomes
    });
    outcomes[0]
        .as_ref()
        .expect("the owner's replica where placement puts it is stored");
    let refused = |i: usize, what: &str| match &outcomes[i] {
        Err(cairn_daemon::error::Error::Peer { status, .. }) => {
            assert_eq!(
                status.code(),
                tonic::Code::PermissionDenied,
                "{what}: {status:?}"
            );
            status.message().to_owned()
        }
        other => panic!("{what} was not refused: {other:?}"),
    };
    for i in [1, 2] {
        let message = refused(i, "a replica naming another node as its owner");
        assert!(
            message.contains("node-0") && message.contains(&format!("naming node {}", owners[i])),
            "{message}"
        );
    }

    // Only the legitimate replica is held, and no node lists step 999.
    assert_eq!(replica_shards(&cluster.nodes[placed]).await, 1);
    assert_eq!(replica_shards(&cluster.nodes[elsewhere]).await, 0);
    for (i, node) in cluster.nodes.iter().enumerate() {
        let mut c = node.clients().await;
        let steps: Vec<u64> = job_steps(&mut c, job)
            .await
            .iter()
            .map(|s| s.step)
            .collect();
        assert!(
            !steps.contains(&999),
            "node {i} lists the planted step: {steps:?}"
        );
    }
}

/// `[peers]` keys of the holder-check and scrub tests: check every second,
/// a holder unreachable for 3 s stops counting, scrub fast.
const CHECKED: &str =
    "check_interval_secs = 1\nholder_grace_secs = 3\nscrub_bytes_per_sec = 1073741824\n";

fn checked_options(n: usize) -> HashMap<usize, NodeOptions> {
    (0..n)
        .map(|i| {
            let options = NodeOptions {
                peers_toml: CHECKED,
                ..Default::default()
            };
            (i, options)
        })
        .collect()
}

/// The value of one sample (`name{labels}` as exposed) in Prometheus text;
/// 0 when absent.
fn metric(text: &str, sample: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

/// Issue 16, findings 1 and 4: a holder wiped and restarted with the same id
/// kept counting ("2/2", `wait --tier peers` at once) while it held nothing,
/// and `cairn_peer_members` stayed 0 under static membership. Now the owner's
/// holder checks notice, and the replica is made again; a holder that stays
/// unreachable past the grace period stops counting too, and
/// `WaitDurable(PEERS)` blocks until it is back. Finally the refilled holder
/// alone restores the step, byte-identical, with the owner and the other
/// holder gone and no bucket.
#[tokio::test(flavor = "multi_thread")]
async fn a_lost_or_unreachable_holder_stops_counting_and_is_refilled() {
    let mut cluster = Cluster::start_with(3, 2, &checked_options(3)).await;
    let metrics = metrics_in_namespace(&cluster.net, 0, &cluster.nodes[0]);
    assert_eq!(metric(&metrics, "cairn_peer_members"), 3.0, "{metrics}");
    let files = shard_files(16, 24);
    save_files(&cluster.nodes[0], "held", 1, &files).await;
    let mut c = cluster.nodes[0].clients().await;
    wait_durable(&mut c, "held", 1, pb::Tier::Peers, 30_000)
        .await
        .expect("durable on two peers");
    let holders = cluster.placement(0, "held", 0, 2);
    let (refilled, other) = (holders[0], holders[1]);

    // Lost: wiped and back at once, with the same id.
    wipe_and_restart(&mut cluster.nodes[refilled]).await;
    wait_until(
        Duration::from_secs(30),
        "the wiped holder is noticed and refilled",
        async || {
            let metrics = metrics_in_namespace(&cluster.net, 0, &cluster.nodes[0]);
            metric(&metrics, "cairn_holders_dropped_total{reason=\"lost\"}") >= 1.0
                && replica_shards(&cluster.nodes[refilled]).await == 1
        },
    )
    .await;
    wait_durable(&mut c, "held", 1, pb::Tier::Peers, 30_000)
        .await
        .expect("durable on two peers again");
    assert!(
        cluster.nodes[0]
            .log_text()
            .contains("a holder no longer counts; replicating the shard again"),
        "the owner says what it found"
    );

    // Unreachable: down past the grace period, with no other node to take
    // its copy (three nodes, two replicas).
    cluster.nodes[refilled].kill();
    wait_until(
        Duration::from_secs(30),
        "the unreachable holder stops counting",
        async || {
            peer_state(&shard_status(&cluster.nodes[0], "held", 1).await) != pb::ShardState::Durable
        },
    )
    .await;
    let shard = shard_status(&cluster.nodes[0], "held", 1).await;
    assert_eq!(shard.peer_holders, vec![node_name(other)], "{shard:?}");
    let err = wait_durable(&mut c, "held", 1, pb::Tier::Peers, 1_000)
        .await
        .expect_err("one replica of two is not durable in the peer tier");
    assert_eq!(err.code(), tonic::Code::DeadlineExceeded, "{err:?}");
    let metrics = metrics_in_namespace(&cluster.net, 0, &cluster.nodes[0]);
    assert_eq!(metric(&metrics, "cairn_under_replicated_shards"), 1.0);
    assert!(
        metric(
            &metrics,
            "cairn_holders_dropped_total{reason=\"unreachable\"}"
        ) >= 1.0
    );
    let out = cluster.nodes[0].cli(&["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("member {} at", node_name(refilled)))
            && text.contains("UNREACHABLE"),
        "{text}"
    );
    cluster.nodes[refilled].restart().await;
    wait_durable(&mut c, "held", 1, pb::Tier::Peers, 60_000)
        .await
        .expect("durable on two peers once the holder is back");

    // The refilled holder alone restores the step.
    cluster.nodes[0].kill();
    cluster.nodes[other].kill();
    assert_restores_from_peers(&cluster.nodes[refilled], "held", 1, &files).await;
}

/// Issue 16, findings 2 and 3: with a holder's replica chunks corrupted,
/// nothing healed them (re-replication sent only missing chunks) and the
/// shard still counted. Now the holder's scrubbing finds and removes them,
/// the owner's next check finds them absent, and they are sent again: the
/// holder ends with good copies and restores the step alone.
#[tokio::test(flavor = "multi_thread")]
async fn corrupt_replica_chunks_are_scrubbed_and_sent_again() {
    let mut cluster = Cluster::start_with(3, 1, &checked_options(3)).await;
    let files = shard_files(17, 24);
    save_files(&cluster.nodes[0], "scrubbed", 1, &files).await;
    let mut c = cluster.nodes[0].clients().await;
    wait_durable(&mut c, "scrubbed", 1, pb::Tier::Peers, 30_000)
        .await
        .expect("durable on one peer");
    let holder = cluster.placement(0, "scrubbed", 0, 1)[0];
    let ids = manifest_chunks(&cluster.nodes[0], "scrubbed", 1).await;
    for id in &ids {
        let path = chunk_file(&cluster.nodes[holder], id);
        let mut stored = std::fs::read(&path).expect("a chunk the holder holds");
        stored[7] ^= 0xff;
        std::fs::write(&path, stored).expect("corrupt it");
    }
    let all_good = |node: &Daemon| {
        ids.iter().all(|id| {
            std::fs::read(chunk_file(node, id))
                .is_ok_and(|b| blake3::hash(&b).as_bytes().as_slice() == id.as_slice())
        })
    };
    wait_until(
        Duration::from_secs(60),
        "the holder's chunks are good again",
        async || all_good(&cluster.nodes[holder]),
    )
    .await;
    let metrics = metrics_in_namespace(&cluster.net, holder, &cluster.nodes[holder]);
    assert!(
        metric(&metrics, "cairn_scrub_bad_chunks_total{store=\"replicas\"}") >= ids.len() as f64,
        "{metrics}"
    );
    assert!(metric(&metrics, "cairn_scrub_bytes_total{store=\"replicas\"}") > 0.0);
    let out = cluster.nodes[holder].cli(&["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("scrubbing of held replicas:") && text.contains("bad chunk(s) found"),
        "{text}"
    );
    wait_durable(&mut c, "scrubbed", 1, pb::Tier::Peers, 30_000)
        .await
        .expect("durable again");
    cluster.nodes[0].kill();
    assert_restores_from_peers(&cluster.nodes[holder], "scrubbed", 1, &files).await;
}

/// Issue 16, finding 2: with one holder's copies corrupted, `cairn verify
/// --tier peers` reported only chunks bad on every holder (none: the other
/// holder's are good) and `--repair` repaired nothing. Now each holder is
/// verified on its own, the bad copies are named with their holder, and
/// `--repair` sends that holder good ones: it exits 0, and so does the next
/// verify.
#[tokio::test(flavor = "multi_thread")]
async fn verify_names_each_holders_bad_chunks_and_repair_heals_them() {
    let cluster = Cluster::start(3, 2).await;
    let files = shard_files(18, 16);
    save_files(&cluster.nodes[0], "verified", 1, &files).await;
    let mut c = cluster.nodes[0].clients().await;
    wait_durable(&mut c, "verified", 1, pb::Tier::Peers, 30_000)
        .await
        .expect("durable on two peers");
    let holders = cluster.placement(0, "verified", 0, 2);
    let (damaged, good) = (holders[0], holders[1]);
    let ids = manifest_chunks(&cluster.nodes[0], "verified", 1).await;
    for id in &ids {
        let path = chunk_file(&cluster.nodes[damaged], id);
        let mut stored = std::fs::read(&path).expect("a chunk the holder holds");
        stored[3] ^= 0xff;
        std::fs::write(&path, stored).expect("corrupt it");
    }
    let verify = |repair: bool| {
        let mut args = vec![
            "verify", "--job", "verified", "--step", "1", "--tier", "peers",
        ];
        if repair {
            args.push("--repair");
        }
        cluster.nodes[0].cli(&args)
    };
    let out = verify(false);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(5), "{text}");
    let damaged_name = format!("corrupt on {}", node_name(damaged));
    assert_eq!(text.matches(&damaged_name).count(), ids.len(), "{text}");
    assert!(!text.contains(&format!("on {}", node_name(good))), "{text}");

    let out = verify(true);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(text.matches("(repaired)").count(), ids.len(), "{text}");
    let out = verify(false);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    for id in &ids {
        let stored = std::fs::read(chunk_file(&cluster.nodes[damaged], id)).expect("repaired");
        assert_eq!(blake3::hash(&stored).as_bytes().as_slice(), id.as_slice());
    }
}

// ---------------------------------------------------------------------------
// Soak (`./scripts/soak`; `./scripts/soak --quick` runs in `./scripts/test`)
// ---------------------------------------------------------------------------

/// splitmix64: the soak's choices, the same from the same seed.
struct SoakRng(u64);

impl SoakRng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// Whether `node` holds a good copy of every chunk in `ids` (its replica
/// store's files, re-hashed here).
fn holds_good_copies(node: &Daemon, ids: &[Vec<u8>]) -> bool {
    ids.iter().all(|id| {
        std::fs::read(chunk_file(node, id))
            .is_ok_and(|b| blake3::hash(&b).as_bytes().as_slice() == id.as_slice())
    })
}

/// Longest a holder may be reported while its copy is not good: one check
/// round (1 s here) after the scrub that finds a bad chunk, whose passes are
/// 10 s apart, plus slack for a loaded machine.
const SOAK_FALSE_HOLDER_ALLOWANCE: Duration = Duration::from_secs(20);

/// One step the soak saved: its number, files and chunk ids.
type SoakStep = (u64, Vec<(String, Vec<u8>)>, Vec<Vec<u8>>);

/// `[peers]` keys of the soak: [`CHECKED`], and every step kept.
const SOAK_PEERS: &str = "check_interval_secs = 1\nholder_grace_secs = 3\nscrub_bytes_per_sec = 1073741824\nreplica_keep_last = 1000\n";

/// Issue 16's soak: three daemons, two replicas, holder checks every second,
/// every step kept everywhere. Node 0 saves a step about every second while
/// one holder at a time is killed (back after 0 to 4 s), wiped and restarted
/// with the same id, or has a chunk of an earlier step's replica corrupted,
/// at random (`SOAK_SEED`).
///
/// After every step, for every step saved so far: the owner never reports
/// more holders than replicas, and reports a holder whose copy is not good
/// (its chunk files, re-hashed by the test) only briefly: never longer than
/// [`SOAK_FALSE_HOLDER_ALLOWANCE`] (checks and scrubbing are periodic). At
/// the end, with the churn stopped, every step becomes durable on two
/// holders with good copies, and the owner, wiped, restores the newest and
/// the oldest from the peers alone, byte-identical.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "run by ./scripts/soak"]
async fn soak_the_peer_tier_under_churn() {
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let secs: u64 = var("SOAK_SECS").map_or(30, |s| s.parse().expect("SOAK_SECS is a number"));
    let seed: u64 = var("SOAK_SEED").map_or_else(
        || {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        },
        |s| s.parse().expect("SOAK_SEED is a number"),
    );
    eprintln!("soak: SOAK_SEED={seed} SOAK_SECS={secs}");
    let mut rng = SoakRng(seed);
    let options: HashMap<usize, NodeOptions> = (0..3)
        .map(|i| {
            let options = NodeOptions {
                peers_toml: SOAK_PEERS,
                env: vec![
                    ("CAIRN_MEMORY_KEEP_LAST", "1000"),
                    ("CAIRN_DISK_KEEP_LAST", "1000"),
                ],
                ..Default::default()
            };
            (i, options)
        })
        .collect();
    let mut cluster = Cluster::start_with(3, 2, &options).await;
    let job = "soak";
    // Every step saved: its files and its chunk ids.
    let mut saved: Vec<SoakStep> = Vec::new();
    // A reported holder whose copy is not good, since when.
    let mut false_since: HashMap<(u64, String), Instant> = HashMap::new();
    let mut down: Option<(usize, Instant)> = None;
    let mut events: HashMap<&str, u32> = HashMap::new();
    let mut worst = Duration::ZERO;
    let deadline = Instant::now() + Duration::from_secs(secs);
    let node_index = |name: &str| -> usize {
        name.strip_prefix("node-")
            .and_then(|i| i.parse().ok())
            .expect("node-N")
    };
    while Instant::now() < deadline {
        let step = saved.len() as u64 + 1;
        let files = shard_files(seed ^ step, 4);
        save_files(&cluster.nodes[0], job, step, &files).await;
        let ids = manifest_chunks(&cluster.nodes[0], job, step).await;
        saved.push((step, files, ids));
        if let Some((node, back_at)) = down
            && Instant::now() >= back_at
        {
            cluster.nodes[node].restart().await;
            down = None;
        }
        let holder = 1 + (rng.next() % 2) as usize;
        if down.is_none() {
            let event = match rng.next() % 10 {
                0 => {
                    cluster.nodes[holder].kill();
                    let back = Duration::from_millis(rng.next() % 4000);
                    down = Some((holder, Instant::now() + back));
                    "kill"
                }
                1 => {
                    wipe_and_restart(&mut cluster.nodes[holder]).await;
                    "wipe"
                }
                2 | 3 => {
                    let (_, _, ids) = &saved[(rng.next() % saved.len() as u64) as usize];
                    let id = &ids[(rng.next() % ids.len() as u64) as usize];
                    let path = chunk_file(&cluster.nodes[holder], id);
                    match std::fs::read(&path) {
                        Ok(mut stored) if !stored.is_empty() => {
                            stored[0] ^= 0xff;
                            std::fs::write(&path, stored).expect("corrupt a replica chunk");
                            "corrupt"
                        }
                        _ => "corrupt (no copy there)",
                    }
                }
                _ => "quiet",
            };
            *events.entry(event).or_default() += 1;
        }
        // What the owner reports against what the holders have, for every
        // step (a holder that is down keeps its files: good).
        for (step, _, ids) in &saved {
            let reported = shard_status(&cluster.nodes[0], job, *step)
                .await
                .peer_holders;
            assert!(
                reported.len() <= 2,
                "more holders than replicas for step {step}: {reported:?}"
            );
            let now = Instant::now();
            for name in &reported {
                let key = (*step, name.clone());
                if holds_good_copies(&cluster.nodes[node_index(name)], ids) {
                    false_since.remove(&key);
                    continue;
                }
                let since = *false_since.entry(key).or_insert(now);
                worst = worst.max(now - since);
                assert!(
                    now - since <= SOAK_FALSE_HOLDER_ALLOWANCE,
                    "{name} has been reported holding step {step} without a good copy for {:?} \
                     (seed {seed}); events so far: {events:?}",
                    now - since
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(rng.next() % 1000)).await;
    }
    if let Some((node, _)) = down {
        cluster.nodes[node].restart().await;
    }
    let mut c = cluster.nodes[0].clients().await;
    for (step, _, ids) in &saved {
        wait_durable(&mut c, job, *step, pb::Tier::Peers, 60_000)
            .await
            .unwrap_or_else(|e| {
                panic!("step {step} not durable on two peers after the churn: {e}")
            });
        wait_until(
            Duration::from_secs(60),
            &format!("both holders of step {step} hold good copies"),
            async || {
                let reported = shard_status(&cluster.nodes[0], job, *step)
                    .await
                    .peer_holders;
                reported.len() == 2
                    && reported
                        .iter()
                        .all(|name| holds_good_copies(&cluster.nodes[node_index(name)], ids))
            },
        )
        .await;
    }
    wipe_and_restart(&mut cluster.nodes[0]).await;
    let (first, last) = (saved.first().expect("saved"), saved.last().expect("saved"));
    for (step, files, _) in [first, last] {
        assert_restores_from_peers(&cluster.nodes[0], job, *step, files).await;
    }
    eprintln!(
        "soak: {} steps in {secs} s, events {events:?}, longest a holder was reported without a \
         good copy: {worst:?} (allowed {SOAK_FALSE_HOLDER_ALLOWANCE:?}); seed {seed}",
        saved.len()
    );
}

/// Issue 16: a holder that stayed unreachable past the grace period stopped
/// counting and its copy was made on the next candidate; when it came back
/// it kept its old copy for good (R + 1 copies; a rolling update would leave
/// one more per node). Now the owner asks it to drop the surplus copy.
#[tokio::test(flavor = "multi_thread")]
async fn a_holder_that_returns_after_its_copy_moved_drops_the_surplus() {
    let mut cluster = Cluster::start_with(3, 1, &checked_options(3)).await;
    let files = shard_files(19, 8);
    save_files(&cluster.nodes[0], "surplus", 1, &files).await;
    let mut c = cluster.nodes[0].clients().await;
    wait_durable(&mut c, "surplus", 1, pb::Tier::Peers, 30_000)
        .await
        .expect("durable on one peer");
    let placed = cluster.placement(0, "surplus", 0, 1)[0];
    let other = 3 - placed;
    cluster.nodes[placed].kill();
    wait_until(
        Duration::from_secs(60),
        "the copy moved to the other node",
        async || {
            let shard = shard_status(&cluster.nodes[0], "surplus", 1).await;
            peer_state(&shard) == pb::ShardState::Durable
                && shard.peer_holders == vec![node_name(other)]
        },
    )
    .await;
    assert_eq!(replica_shards(&cluster.nodes[other]).await, 1);
    // Back, with its old copy.
    cluster.nodes[placed].restart().await;
    wait_until(
        Duration::from_secs(30),
        "the returning holder dropped its surplus copy",
        async || replica_shards(&cluster.nodes[placed]).await == 0,
    )
    .await;
    let metrics = metrics_in_namespace(&cluster.net, 0, &cluster.nodes[0]);
    assert_eq!(
        metric(&metrics, "cairn_surplus_replicas_dropped_total"),
        1.0
    );
    let shard = shard_status(&cluster.nodes[0], "surplus", 1).await;
    assert_eq!(shard.peer_holders, vec![node_name(other)]);
    assert_eq!(replica_shards(&cluster.nodes[other]).await, 1);
    assert!(
        cluster.nodes[placed]
            .log_text()
            .contains("surplus replica dropped at its owner's request")
    );
}
