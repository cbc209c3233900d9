//! Tests of the multi-host test harness itself (`common::netns`,
//! `testkit::pki`, `start_daemon_in`): the peer-tier tests are only as good
//! as their hosts being separate, their partitions real and their
//! certificates what the daemons will check.

mod common;

use std::io::{BufRead, BufReader};
use std::net::IpAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use common::netns::{self, Network};
use common::start_daemon_in;
use testkit::pki::TestPki;

/// A TCP server for reachability checks: binds `argv[1]` on a free port,
/// prints the port, greets every connection with `cairn`, and exits after a
/// minute without one (so it cannot outlive a crashed test for long).
const LISTENER: &str = "\
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 0))
s.listen(16)
print(s.getsockname()[1], flush=True)
s.settimeout(60)
while True:
    try:
        c, _ = s.accept()
    except socket.timeout:
        break
    c.sendall(b'cairn\\n')
    c.close()
";

/// A TCP client: connects to `argv[1]:argv[2]` within `argv[3]` seconds and
/// succeeds only if it reads the listener's greeting.
const CLIENT: &str = "\
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3]))
data = c.recv(16)
sys.exit(0 if data == b'cairn\\n' else 2)
";

/// The greeting server, running in one node; killed on drop.
struct Listener {
    child: Child,
    port: u16,
}

impl Listener {
    fn start(network: &Network, node: usize) -> Listener {
        let mut child = network
            .command(node, netns::python())
            .args(["-c", LISTENER, &network.addr(node).to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn the TCP listener");
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().expect("listener stdout"))
            .read_line(&mut line)
            .expect("read the listener's port");
        let port = line
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("listener did not print its port: {line:?}"));
        Listener { child, port }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether node `from` gets the greeting of the listener on node `to`
/// within two seconds; the error says what happened instead.
fn greet(network: &Network, from: usize, to: usize, listener: &Listener) -> Result<(), String> {
    let output = network
        .command(from, netns::python())
        .args(["-c", CLIENT, &network.addr(to).to_string()])
        .arg(listener.port.to_string())
        .arg("2")
        .stdin(Stdio::null())
        .output()
        .expect("run the TCP client");
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

/// `ip netns list`, one name a line.
fn namespaces() -> Vec<String> {
    let output = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("run ip netns list");
    assert!(output.status.success(), "ip netns list: {output:?}");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| line.split_whitespace().next().map(str::to_string))
        .collect()
}

/// Runs `openssl args…`, returning whether it succeeded and its stdout and
/// stderr together.
fn openssl(args: &[&str]) -> (bool, String) {
    let output = Command::new("openssl")
        .args(args)
        .output()
        .expect("run openssl");
    (
        output.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    )
}

fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

#[test]
fn nodes_have_distinct_addresses_and_reach_each_other() {
    let network = Network::create(3);
    let addrs: Vec<IpAddr> = (0..3).map(|node| network.addr(node)).collect();
    assert!(
        addrs[0] != addrs[1] && addrs[1] != addrs[2] && addrs[0] != addrs[2],
        "{addrs:?}"
    );
    let listener = Listener::start(&network, 2);
    greet(&network, 0, 2, &listener).expect("node 0 reaches node 2");
    greet(&network, 1, 2, &listener).expect("node 1 reaches node 2");
    assert!(network.reachable(2, 0), "node 2 reaches node 0");
}

#[test]
fn partition_cuts_a_node_off_and_heal_reconnects_it() {
    let network = Network::create(3);
    if !network.isolated() {
        eprintln!(
            "skipped: partitions need network namespaces (root and `ip netns`), unavailable here"
        );
        return;
    }
    let listener = Listener::start(&network, 2);
    greet(&network, 0, 2, &listener).expect("node 0 reaches node 2 before the partition");

    network.partition(2);
    let cut = greet(&network, 0, 2, &listener);
    assert!(
        cut.is_err(),
        "node 0 still reaches node 2 after partition(2)"
    );
    assert!(!network.reachable(2, 0), "node 2 still reaches node 0");
    assert!(!network.reachable(1, 2), "node 1 still reaches node 2");
    // The partition is of node 2 only.
    assert!(network.reachable(0, 1), "node 0 lost node 1 too");

    network.heal(2);
    greet(&network, 0, 2, &listener).expect("node 0 reaches node 2 after heal(2)");
    assert!(
        network.reachable(2, 1),
        "node 2 reaches node 1 after heal(2)"
    );
}

#[test]
fn dropping_the_network_deletes_its_namespaces() {
    let network = Network::create(3);
    let Some(node_ns) = network.namespace(0).map(str::to_string) else {
        eprintln!("skipped: loopback mode creates no namespaces");
        return;
    };
    // `cairnt-<pid>-<n>-n0`: every namespace of this Network starts with
    // `cairnt-<pid>-<n>-`.
    let prefix = node_ns
        .strip_suffix("n0")
        .expect("node namespaces end in n<i>")
        .to_string();
    assert!(prefix.starts_with("cairnt-"), "{prefix}");
    let ours = |names: Vec<String>| -> Vec<String> {
        names
            .into_iter()
            .filter(|name| name.starts_with(&prefix))
            .collect()
    };
    let before = ours(namespaces());
    assert_eq!(before.len(), 4, "a bridge and 3 nodes: {before:?}");
    for node in 0..3 {
        let ns = network.namespace(node).expect("isolated");
        assert!(before.iter().any(|name| name == ns), "{ns} in {before:?}");
    }
    drop(network);
    let after = ours(namespaces());
    assert!(after.is_empty(), "left behind: {after:?}");
}

#[test]
fn networks_get_distinct_subnets() {
    let first = Network::create(1);
    let second = Network::create(1);
    let subnet = |addr: IpAddr| match addr {
        IpAddr::V4(v4) => v4.octets()[..3].to_vec(),
        IpAddr::V6(_) => panic!("IPv4 expected, got {addr}"),
    };
    assert_ne!(subnet(first.addr(0)), subnet(second.addr(0)));
    if first.isolated() {
        assert_eq!(subnet(first.addr(0))[0], 10, "{}", first.addr(0));
        assert_ne!(first.namespace(0), second.namespace(0));
    }
}

#[test]
fn loopback_mode_uses_distinct_local_addresses() {
    let network = Network::loopback(3);
    assert!(!network.isolated());
    assert_eq!(network.namespace(0), None);
    for node in 0..3 {
        assert!(network.addr(node).is_loopback(), "{}", network.addr(node));
    }
    let listener = Listener::start(&network, 2);
    greet(&network, 0, 2, &listener).expect("node 0 reaches node 2 over loopback");
    // Bound to node 2's address only, so node 1's address does not answer.
    let output = network
        .command(0, netns::python())
        .args(["-c", CLIENT, &network.addr(1).to_string()])
        .arg(listener.port.to_string())
        .arg("2")
        .output()
        .expect("run the TCP client");
    assert!(
        !output.status.success(),
        "the listener answered on node 1's address"
    );
}

#[test]
#[should_panic(expected = "partitions need network namespaces")]
fn loopback_mode_refuses_partitions() {
    Network::loopback(2).partition(1);
}

#[tokio::test]
async fn a_daemon_runs_inside_a_node_namespace() {
    let network = Network::create(2);
    let Some(ns) = network.namespace(1).map(str::to_string) else {
        eprintln!("skipped: loopback mode has no namespaces to run a daemon in");
        return;
    };
    let pids_in = |ns: &str| {
        let output = Command::new("ip")
            .args(["netns", "pids", ns])
            .output()
            .expect("run ip netns pids");
        assert!(output.status.success(), "ip netns pids: {output:?}");
        String::from_utf8_lossy(&output.stdout)
            .split_whitespace()
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    let mut daemon = start_daemon_in(Some(&ns), &[], &[]).await;
    // Ready means its Unix socket answered from the host's namespace.
    assert_eq!(daemon.launcher, netns::exec_prefix(&ns));
    assert_eq!(pids_in(&ns).len(), 1, "one process (cairnd) in {ns}");
    daemon.kill();
    assert!(pids_in(&ns).is_empty(), "kill() left a process in {ns}");
}

#[test]
fn pki_issues_certificates_its_ca_verifies() {
    let pki = TestPki::new();
    let ca = pki.ca_path();
    let node = pki.issue("node-a");
    for purpose in ["sslserver", "sslclient"] {
        let (ok, out) = openssl(&[
            "verify",
            "-purpose",
            purpose,
            "-CAfile",
            path(&ca),
            path(&node.cert),
        ]);
        assert!(ok, "openssl verify -purpose {purpose}: {out}");
    }
    let (ok, san) = openssl(&[
        "x509",
        "-noout",
        "-ext",
        "subjectAltName",
        "-in",
        path(&node.cert),
    ]);
    assert!(ok && san.contains("DNS:node-a"), "{san}");

    // The key is the certificate's.
    let (ok, from_cert) = openssl(&["x509", "-noout", "-pubkey", "-in", path(&node.cert)]);
    assert!(ok, "{from_cert}");
    let (ok, from_key) = openssl(&["pkey", "-pubout", "-in", path(&node.key)]);
    assert!(ok, "{from_key}");
    assert_eq!(from_cert, from_key, "key does not match the certificate");

    let impostor = pki.issue_with_names("impostor", &["node-b", "node-c"]);
    let (ok, out) = openssl(&["verify", "-CAfile", path(&ca), path(&impostor.cert)]);
    assert!(ok, "{out}");
    let (_, san) = openssl(&[
        "x509",
        "-noout",
        "-ext",
        "subjectAltName",
        "-in",
        path(&impostor.cert),
    ]);
    assert!(
        san.contains("DNS:node-b") && san.contains("DNS:node-c") && !san.contains("node-a"),
        "{san}"
    );
}

#[test]
fn a_foreign_ca_is_rejected() {
    let pki = TestPki::new();
    let foreign = TestPki::new();
    let stranger = foreign.issue("node-a");
    let (ok, out) = openssl(&[
        "verify",
        "-CAfile",
        path(&pki.ca_path()),
        path(&stranger.cert),
    ]);
    assert!(!ok, "a certificate from another CA verified: {out}");
    let (ok, out) = openssl(&[
        "verify",
        "-CAfile",
        path(&foreign.ca_path()),
        path(&stranger.cert),
    ]);
    assert!(ok, "its own CA rejected it: {out}");
}
