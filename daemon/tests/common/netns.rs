//! Separate network hosts for multi-daemon tests, out of Linux network
//! namespaces.
//!
//! The peer tier replicates between cairnd processes over TCP. Running
//! several daemons on one loopback interface would test little of what goes
//! wrong between real hosts: every daemon could reach every other one, always,
//! and a "partition" could only be faked inside the daemon. So each test node
//! gets its own network namespace, with its own address on a veth pair
//! plugged into a Linux bridge that lives in one more namespace (a switch
//! nobody else is connected to). A partition is then a link taken down, which
//! the daemons see exactly as they would see a dead cable: connections stall,
//! connects time out.
//!
//! Only the peer traffic goes through the namespaces. Unix sockets bound to a
//! path belong to the filesystem, not to a network namespace, so the test
//! process still reaches each daemon's control socket from the host.
//!
//! Nothing here touches the host's root namespace: every interface is created
//! directly inside the Network's own namespaces, and deleting those
//! namespaces removes them.
//!
//! Needs root and `ip` (iproute2). Where a namespace cannot be created (not
//! root, a container without `CAP_SYS_ADMIN`, no `ip`), or where
//! `CAIRN_TEST_NETNS=off` is set, a Network falls back to "loopback mode":
//! distinct 127.x.y.z addresses on the host's loopback interface, which need
//! no configuration on Linux. That still gives each daemon an address of its
//! own, but no isolation, so tests that need partitions check
//! [`Network::isolated`] and skip with a printed reason.

use std::ffi::{OsStr, OsString};
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, Once, OnceLock};
use std::time::{Duration, Instant};

/// Every namespace a Network creates is named `cairnt-<pid>-<n>-<role>`, so
/// that namespaces left behind by a killed run can be recognised (by the
/// prefix) and judged stale (their pid is gone).
const PREFIX: &str = "cairnt";

/// Inside its namespaces a Network names the bridge this, the bridge-side
/// veth ends `cairntp<i>` and the node-side ones `cairntn<i>`. These names
/// only need to be unique within one namespace, and every Network has
/// namespaces of its own, so they cannot collide between Networks (a pid and
/// a counter would not fit in the 15 characters an interface name allows).
const BRIDGE_IF: &str = "cairntbr";

/// The bridge's own address is `.254` of the subnet: a fixed point from which
/// [`Network::heal`] checks that a node is reachable again, even when every
/// other node is partitioned.
const BRIDGE_HOST: u8 = 254;

/// How long [`Network::heal`] and [`Network::create`] wait for a node to
/// answer before declaring the harness broken.
const REACH_TIMEOUT: Duration = Duration::from_secs(10);

/// Set to `off` to force loopback mode even where namespaces would work.
const DISABLE_ENV: &str = "CAIRN_TEST_NETNS";

/// Numbers the Networks of this process, for unique names and subnets.
static NEXT_NETWORK: AtomicU32 = AtomicU32::new(0);

/// Serialises namespace setup within the process: the first `ip netns add`
/// on a machine creates and mounts `/run/netns`, which iproute2 does not do
/// atomically. (Teardown does not take it: a Network that panics halfway
/// through setup is dropped while the lock is still held.)
static SETUP_LOCK: Mutex<()> = Mutex::new(());

/// The fallback is announced once per process, not once per test.
static FALLBACK_ANNOUNCED: Once = Once::new();

/// A set of test hosts: `nodes` network namespaces on one bridge, or, where
/// namespaces are unavailable, `nodes` distinct loopback addresses.
///
/// Drop deletes the namespaces. Drop every process running inside them first
/// (declare the `Network` before the daemons, so it is dropped after them): a
/// namespace lives on, unnamed, while a process is still in it.
pub struct Network {
    /// One address per node, in node order.
    addrs: Vec<IpAddr>,
    /// `None` in loopback mode.
    isolation: Option<Isolation>,
}

/// The namespaces of an isolated Network.
struct Isolation {
    /// The namespace that holds the bridge (the "switch").
    bridge_ns: String,
    /// One namespace per node, in node order.
    node_ns: Vec<String>,
    /// The bridge's address, the vantage point of reachability checks.
    bridge_addr: Ipv4Addr,
    /// Every namespace created so far, deleted on drop (also when setup
    /// panics halfway).
    created: Vec<String>,
}

impl Network {
    /// Creates `nodes` hosts (1 to 253): node `i` gets the address
    /// `10.<x>.<y>.<i+1>` in a namespace of its own, connected to the others
    /// through a bridge. Returns once every node is reachable.
    ///
    /// The subnet `10.<x>.<y>.0/24` is derived from the pid (`x`) and a
    /// per-process counter (`y`), so concurrent Networks, in this process or
    /// in other test binaries, normally get different subnets. (Namespaces
    /// already keep them apart; distinct subnets keep logs unambiguous and
    /// matter in loopback mode, where every address shares the host's `lo`.)
    ///
    /// Falls back to loopback mode, with one line on stderr saying why, when
    /// a namespace cannot be created.
    pub fn create(nodes: usize) -> Network {
        assert!(
            (1..BRIDGE_HOST as usize).contains(&nodes),
            "a Network has 1 to {} nodes, not {nodes}",
            BRIDGE_HOST - 1
        );
        let (id, x, y) = next_identity();
        if std::env::var(DISABLE_ENV).is_ok_and(|v| v == "off" || v == "0") {
            return Self::fall_back(nodes, x, y, &format!("{DISABLE_ENV}=off"));
        }
        if ip_binary().is_none() {
            return Self::fall_back(nodes, x, y, "no `ip` command found");
        }
        let setup_guard = SETUP_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        remove_stale_namespaces();

        let br = format!("{PREFIX}-{id}-br");
        if let Err(reason) = try_ip(&format!("netns add {br}")) {
            return Self::fall_back(nodes, x, y, &reason);
        }
        let bridge_addr = Ipv4Addr::new(10, x, y, BRIDGE_HOST);
        let mut network = Network {
            addrs: Vec::with_capacity(nodes),
            isolation: Some(Isolation {
                bridge_ns: br.clone(),
                node_ns: Vec::with_capacity(nodes),
                bridge_addr,
                created: vec![br.clone()],
            }),
        };
        run_ip(&format!("-n {br} link set lo up"));
        // STP off and no forward delay: a port forwards as soon as its link
        // is up, so a healed node is reachable in milliseconds, not after
        // the default 15 s learning delay.
        run_ip(&format!(
            "-n {br} link add {BRIDGE_IF} type bridge stp_state 0 forward_delay 0"
        ));
        run_ip(&format!(
            "-n {br} addr add {bridge_addr}/24 dev {BRIDGE_IF}"
        ));
        run_ip(&format!("-n {br} link set {BRIDGE_IF} up"));

        for node in 0..nodes {
            let ns = format!("{PREFIX}-{id}-n{node}");
            run_ip(&format!("netns add {ns}"));
            let isolation = network.isolation.as_mut().expect("isolated network");
            isolation.created.push(ns.clone());
            isolation.node_ns.push(ns.clone());
            let (port, link) = link_names(node);
            let addr = Ipv4Addr::new(10, x, y, node as u8 + 1);
            // Both ends are created from inside the bridge namespace, the
            // node's end directly in the node's namespace: nothing ever
            // appears in the root namespace.
            run_ip(&format!(
                "-n {br} link add {port} type veth peer name {link} netns {ns}"
            ));
            run_ip(&format!("-n {br} link set {port} master {BRIDGE_IF}"));
            run_ip(&format!("-n {br} link set {port} up"));
            run_ip(&format!("-n {ns} link set lo up"));
            run_ip(&format!("-n {ns} addr add {addr}/24 dev {link}"));
            run_ip(&format!("-n {ns} link set {link} up"));
            network.addrs.push(IpAddr::V4(addr));
        }
        drop(setup_guard);
        for node in 0..nodes {
            network.wait_reachable(node);
        }
        network
    }

    /// A Network in loopback mode on purpose: node `i` gets the address
    /// `127.<x>.<y>.<i+1>` on the host's `lo`. For tests that want distinct
    /// addresses but no isolation, and to exercise the fallback.
    pub fn loopback(nodes: usize) -> Network {
        assert!(
            (1..BRIDGE_HOST as usize).contains(&nodes),
            "a Network has 1 to {} nodes, not {nodes}",
            BRIDGE_HOST - 1
        );
        let (_, x, y) = next_identity();
        Self::loopback_addresses(nodes, x, y)
    }

    /// Loopback mode because namespaces are unavailable, announced once.
    fn fall_back(nodes: usize, x: u8, y: u8, reason: &str) -> Network {
        let reason = reason.trim().replace('\n', "; ");
        FALLBACK_ANNOUNCED.call_once(|| {
            eprintln!(
                "netns unavailable ({reason}): falling back to distinct 127.x.y.z addresses; \
                 partitions are not simulated"
            );
        });
        Self::loopback_addresses(nodes, x, y)
    }

    fn loopback_addresses(nodes: usize, x: u8, y: u8) -> Network {
        Network {
            addrs: (0..nodes)
                .map(|node| IpAddr::V4(Ipv4Addr::new(127, x, y, node as u8 + 1)))
                .collect(),
            isolation: None,
        }
    }

    /// Whether the nodes are really separate hosts (namespaces), so that
    /// [`partition`](Self::partition) works. False in loopback mode.
    pub fn isolated(&self) -> bool {
        self.isolation.is_some()
    }

    /// How many nodes the Network has.
    pub fn nodes(&self) -> usize {
        self.addrs.len()
    }

    /// Node `node`'s address: what its daemon binds and what peers dial.
    pub fn addr(&self, node: usize) -> IpAddr {
        self.addrs[node]
    }

    /// The name of node `node`'s namespace (for `ip netns exec`, or for
    /// [`Daemon::start_in`](super::Daemon::start_in)); `None` in loopback
    /// mode, where everything runs in the host's namespace.
    pub fn namespace(&self, node: usize) -> Option<&str> {
        assert!(node < self.nodes(), "no node {node}");
        self.isolation
            .as_ref()
            .map(|isolation| isolation.node_ns[node].as_str())
    }

    /// Cuts node `node` off: its link goes down at both ends, so it reaches
    /// nobody and nobody reaches it. Established connections are not reset,
    /// they stall, as across a real dead link.
    ///
    /// Panics in loopback mode: check [`isolated`](Self::isolated) first.
    pub fn partition(&self, node: usize) {
        let isolation = self.isolation_for_partitions();
        let (port, link) = link_names(node);
        run_ip(&format!("-n {} link set {port} down", isolation.bridge_ns));
        run_ip(&format!(
            "-n {} link set {link} down",
            isolation.node_ns[node]
        ));
    }

    /// Undoes [`partition`](Self::partition): brings node `node`'s link back
    /// up at both ends and returns once the node is reachable again.
    ///
    /// Panics in loopback mode: check [`isolated`](Self::isolated) first.
    pub fn heal(&self, node: usize) {
        let isolation = self.isolation_for_partitions();
        let (port, link) = link_names(node);
        run_ip(&format!(
            "-n {} link set {link} up",
            isolation.node_ns[node]
        ));
        run_ip(&format!("-n {} link set {port} up", isolation.bridge_ns));
        self.wait_reachable(node);
    }

    /// Whether node `from` can open a TCP connection to node `to` right now:
    /// a probe to port 9 (discard) from inside `from`'s namespace that counts
    /// an accepted or a refused connection as reachable (either way `to`
    /// answered) and a timeout or an unreachable error as not. Takes up to a
    /// second when `to` is unreachable.
    pub fn reachable(&self, from: usize, to: usize) -> bool {
        tcp_probe(self.namespace(from), self.addr(to), Duration::from_secs(1))
    }

    /// A command that runs `program` inside node `node`'s namespace (through
    /// `ip netns exec`), or plainly in loopback mode. `ip netns exec` execs
    /// the program, so the child's pid is the program's and killing the
    /// child kills the program.
    pub fn command(&self, node: usize, program: impl AsRef<OsStr>) -> Command {
        match self.namespace(node) {
            Some(ns) => command_in_namespace(ns, program),
            None => Command::new(program),
        }
    }

    fn isolation_for_partitions(&self) -> &Isolation {
        self.isolation.as_ref().expect(
            "partitions need network namespaces, and this Network is in loopback mode: \
             check Network::isolated() and skip the test",
        )
    }

    /// Waits until node `node` answers a probe from the bridge (which has an
    /// address of its own, so this works even when every other node is
    /// partitioned); panics after [`REACH_TIMEOUT`].
    fn wait_reachable(&self, node: usize) {
        let Some(isolation) = &self.isolation else {
            return;
        };
        let deadline = Instant::now() + REACH_TIMEOUT;
        let addr = self.addr(node);
        while !tcp_probe(Some(&isolation.bridge_ns), addr, Duration::from_millis(500)) {
            assert!(
                Instant::now() < deadline,
                "node {node} ({addr}) is not reachable from the bridge ({}) {REACH_TIMEOUT:?} \
                 after its link came up",
                isolation.bridge_addr
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Network {
    /// Deletes every namespace this Network created; that removes their
    /// veth ends and the bridge with them. Never panics (a drop during a
    /// failing test's unwinding would abort the whole test binary): failures
    /// are reported on stderr, and the next run's stale sweep retries.
    fn drop(&mut self) {
        let Some(isolation) = &self.isolation else {
            return;
        };
        for ns in isolation.created.iter().rev() {
            if let Err(error) = try_ip(&format!("netns delete {ns}")) {
                eprintln!("could not delete test namespace {ns}: {error}");
            }
        }
    }
}

/// A command that runs `program` inside the named network namespace: `ip
/// netns exec <namespace> <program>`. What [`Network::command`] uses.
pub fn command_in_namespace(namespace: &str, program: impl AsRef<OsStr>) -> Command {
    let prefix = exec_prefix(namespace);
    let mut command = Command::new(&prefix[0]);
    command.args(&prefix[1..]).arg(program);
    command
}

/// `ip netns exec <namespace>`, the command line a program runs through to
/// be inside the namespace: what a namespaced [`Daemon`](super::Daemon) is
/// launched with ([`testkit::DaemonOptions::launcher`]).
pub fn exec_prefix(namespace: &str) -> Vec<OsString> {
    let ip = ip_binary().expect("`ip` (iproute2) is needed to run a program in a namespace");
    vec![ip.into(), "netns".into(), "exec".into(), namespace.into()]
}

/// A fresh `cairnt-<pid>-<n>` identity, with the subnet bytes derived from
/// it: `x` from the pid (1 to 254, so a loopback address is never in
/// 127.0.x.x, where 127.0.0.1 and /etc/hosts' 127.0.1.1 live), `y` from the
/// counter (unique for the first 256 Networks of a process).
fn next_identity() -> (String, u8, u8) {
    let pid = std::process::id();
    let n = NEXT_NETWORK.fetch_add(1, Ordering::Relaxed);
    let x = (pid % 254) as u8 + 1;
    let y = (n % 256) as u8;
    (format!("{pid}-{n}"), x, y)
}

/// The bridge-side and node-side interface names of node `node`'s veth.
fn link_names(node: usize) -> (String, String) {
    (format!("{PREFIX}p{node}"), format!("{PREFIX}n{node}"))
}

/// The `ip` binary: on `PATH`, or where iproute2 installs it (test runners
/// do not always have the sbin directories on `PATH`).
fn ip_binary() -> Option<&'static Path> {
    static IP: OnceLock<Option<PathBuf>> = OnceLock::new();
    IP.get_or_init(|| {
        let on_path = std::env::var_os("PATH")
            .map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
            .unwrap_or_default();
        on_path
            .into_iter()
            .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
            .map(|dir| dir.join("ip"))
            .find(|candidate| candidate.is_file())
    })
    .as_deref()
}

/// Runs `ip <command>` (its arguments separated by whitespace: every name
/// the harness passes is its own, without spaces); the error is the command
/// line with its exit status and stderr. For the calls that may legitimately
/// fail.
fn try_ip(command: &str) -> Result<String, String> {
    let ip = ip_binary().ok_or_else(|| format!("`ip {command}`: no `ip` command found"))?;
    let output = Command::new(ip)
        .args(command.split_whitespace())
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("`ip {command}`: cannot run {}: {e}", ip.display()))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(format!(
            "`ip {command}` failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

/// Runs `ip <command>` and panics, with the command line and stderr, if it
/// fails: every other `ip` call is part of setting up the harness, where a
/// failure means the harness is broken.
fn run_ip(command: &str) -> String {
    try_ip(command).unwrap_or_else(|error| panic!("{error}"))
}

/// Deletes the `cairnt-<pid>-…` namespaces whose pid is no longer alive:
/// left behind by a test binary that was killed before its Networks dropped.
/// Best effort: another process may be sweeping the same ones.
fn remove_stale_namespaces() {
    let Ok(list) = try_ip("netns list") else {
        return;
    };
    for line in list.lines() {
        // `ip netns list` prints `name` or `name (id: N)`.
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(rest) = name.strip_prefix(PREFIX).and_then(|r| r.strip_prefix('-')) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = try_ip(&format!("netns delete {name}"));
        }
    }
}

/// The Python that probes run with: `sys.executable` of `python3` on `PATH`,
/// resolved once so that a version-manager shim does not stand between the
/// child pid and the interpreter.
pub fn python() -> &'static Path {
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    PYTHON.get_or_init(|| {
        let output = Command::new("python3")
            .args(["-c", "import sys; print(sys.executable)"])
            .stdin(Stdio::null())
            .output()
            .expect("python3 is needed by the network test harness (TCP probes)");
        assert!(
            output.status.success(),
            "python3 failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        PathBuf::from(String::from_utf8_lossy(&output.stdout).trim())
    })
}

/// The TCP probe behind [`Network::reachable`]: exit 0 when `addr` answered
/// (accepted or refused), 1 when it did not within the timeout. Python, since
/// `ping` is often not installed and the probe must run inside a namespace.
const PROBE: &str = "\
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.settimeout(float(sys.argv[3]))
try:
    s.connect((sys.argv[1], int(sys.argv[2])))
except ConnectionRefusedError:
    pass
except OSError:
    sys.exit(1)
";

/// Whether `addr` answers a TCP connect from `namespace` (the host's when
/// `None`) within `timeout`.
fn tcp_probe(namespace: Option<&str>, addr: IpAddr, timeout: Duration) -> bool {
    let mut command = match namespace {
        Some(ns) => command_in_namespace(ns, python()),
        None => Command::new(python()),
    };
    let output: Output = command
        .args(["-c", PROBE, &addr.to_string(), "9"])
        .arg(timeout.as_secs_f64().to_string())
        .stdin(Stdio::null())
        .output()
        .expect("run the TCP probe");
    match output.status.code() {
        Some(0) => true,
        Some(1) => false,
        _ => panic!(
            "TCP probe of {addr} from {namespace:?} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ),
    }
}
