//! A fault-injecting HTTP proxy in front of a real S3 server.
//!
//! The real server (SeaweedFS in these tests) cannot be made to throttle,
//! drop a connection or stall a part upload on demand, and a bucket in a
//! cloud does all three now and then. This proxy sits between cairnd and
//! the server on loopback and, for a configurable share of the requests,
//! does one of:
//!
//! - **SlowDown**: answers `503 Service Unavailable` with S3's XML error body
//!   (`<Code>SlowDown</Code>`), as S3 does when a prefix is throttled. The
//!   request never reaches the server.
//! - **Reset**: forwards the request, lets part of the response through (none
//!   at all, or up to its first half), then aborts the connection with a TCP
//!   RST. The server may well have carried out the request: a PUT that was
//!   stored but whose answer was lost, so the client's retry must be
//!   idempotent (create-only manifests find themselves already there).
//! - **Stall**: forwards the request head and about half of its body (a part
//!   upload stops half-way), then goes silent for the configured stall
//!   before going on, or for good when the stall is `None` (a bucket that
//!   accepts connections and never answers).
//!
//! Everything else is forwarded byte for byte. Each client connection carries
//! one request: the proxy asks the server to close after its answer
//! (`Connection: close`), and the server says so in the response, so the
//! client opens a new connection for its next request and a fault never
//! leaves a half-used connection in the client's pool.
//!
//! The choice is made per request from a seeded generator, so a run can be
//! repeated. The rate and the stall can be changed while the proxy runs
//! (`set_rate`), to let a backlog drain or to turn the bucket off entirely.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The longest request head the proxy accepts (S3 heads are a few KiB).
const MAX_HEAD: usize = 64 * 1024;

/// S3's answer to a throttled request.
const SLOW_DOWN_BODY: &str = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n\
<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message>\
<RequestId>cairn-faultproxy</RequestId><HostId>cairn-faultproxy</HostId></Error>";

/// What the proxy does to the requests it picks.
#[derive(Clone, Debug)]
pub struct FaultPlan {
    /// Share of requests given a fault, from 0 (none) to 1 (every one).
    pub rate: f64,
    /// Relative weights of the three faults (SlowDown, Reset, Stall).
    pub weights: [u32; 3],
    /// How long a stalled request stays silent; `None` for ever.
    pub stall: Option<Duration>,
    /// When not empty, only requests whose request line contains one of
    /// these texts are faulted, each text at most its count of times (the
    /// rate still applies): a fault aimed at one kind of request.
    pub only: Vec<(&'static str, u64)>,
}

impl FaultPlan {
    /// No faults: a transparent proxy.
    pub fn none() -> FaultPlan {
        FaultPlan {
            rate: 0.0,
            weights: [1, 1, 1],
            stall: Some(Duration::from_secs(1)),
            only: Vec::new(),
        }
    }
}

/// What happened so far, by kind.
#[derive(Debug, Default)]
pub struct Counts {
    pub requests: AtomicU64,
    pub slow_down: AtomicU64,
    pub reset: AtomicU64,
    pub stall: AtomicU64,
}

impl Counts {
    pub fn snapshot(&self) -> [u64; 4] {
        [
            self.requests.load(Ordering::Relaxed),
            self.slow_down.load(Ordering::Relaxed),
            self.reset.load(Ordering::Relaxed),
            self.stall.load(Ordering::Relaxed),
        ]
    }
}

/// Request lines of every request, in any proxy of this process, that
/// reached the server while its answer was cut or held past the client's
/// timeout: the server acted on it and the client never learned the
/// outcome (a `POST ...?uploads` like this creates a multipart upload whose
/// id nobody knows, on S3 as here).
static LOST_ANSWERS: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// See [`LOST_ANSWERS`].
pub fn lost_answers() -> Vec<String> {
    LOST_ANSWERS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    SlowDown,
    /// Abort after this many bytes of the response.
    Reset(u64),
    Stall,
}

struct State {
    plan: FaultPlan,
    rng: u64,
    /// Faults given so far under each of `plan.only`'s texts.
    aimed: Vec<u64>,
}

/// A running proxy; stops accepting when dropped (connections in flight
/// finish on their own).
pub struct FaultProxy {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    counts: Arc<Counts>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    /// Listens on a free loopback port and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr, plan: FaultPlan, seed: u64) -> FaultProxy {
        let listener = TcpListener::bind(("127.0.0.1", 0))
            .await
            .expect("bind the fault proxy");
        let addr = listener.local_addr().expect("proxy address");
        let state = Arc::new(Mutex::new(State {
            aimed: vec![0; plan.only.len()],
            plan,
            rng: seed | 1,
        }));
        let counts = Arc::new(Counts::default());
        let task = {
            let state = state.clone();
            let counts = counts.clone();
            tokio::spawn(async move {
                loop {
                    let Ok((client, _)) = listener.accept().await else {
                        continue;
                    };
                    let state = state.clone();
                    let counts = counts.clone();
                    tokio::spawn(async move {
                        // A client that goes away mid-request is no error of
                        // the proxy's; the client sees it as it would.
                        let _ = serve(client, upstream, &state, &counts).await;
                    });
                }
            })
        };
        FaultProxy {
            addr,
            state,
            counts,
            task,
        }
    }

    /// `http://127.0.0.1:PORT`, for the bucket's `endpoint` option.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn counts(&self) -> &Counts {
        &self.counts
    }

    /// Changes the share of requests given a fault, from now on.
    pub fn set_rate(&self, rate: f64) {
        lock(&self.state).plan.rate = rate;
    }

    /// Changes the whole plan, from now on.
    pub fn set_plan(&self, plan: FaultPlan) {
        let mut state = lock(&self.state);
        state.aimed = vec![0; plan.only.len()];
        state.plan = plan;
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

/// xorshift64*: enough to spread faults, and repeatable from a seed.
fn next(rng: &mut u64) -> u64 {
    *rng ^= *rng >> 12;
    *rng ^= *rng << 25;
    *rng ^= *rng >> 27;
    rng.wrapping_mul(0x2545_F491_4F6C_DD1D)
}

/// Picks this request's fault, if any, and the stall that goes with it.
fn choose(state: &Mutex<State>, head: &[u8]) -> (Option<Fault>, Option<Duration>) {
    let mut s = lock(state);
    let plan = s.plan.clone();
    if !plan.only.is_empty() {
        let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
        let line = String::from_utf8_lossy(line);
        let aimed = plan
            .only
            .iter()
            .position(|(text, _)| line.contains(text))
            .filter(|&i| s.aimed[i] < plan.only[i].1);
        match aimed {
            Some(i) => s.aimed[i] += 1,
            None => return (None, plan.stall),
        }
    }
    let roll = (next(&mut s.rng) >> 11) as f64 / (1u64 << 53) as f64;
    if roll >= plan.rate {
        return (None, plan.stall);
    }
    let total: u32 = plan.weights.iter().sum();
    if total == 0 {
        return (None, plan.stall);
    }
    let mut pick = (next(&mut s.rng) % u64::from(total)) as u32;
    let kind = plan
        .weights
        .iter()
        .position(|&w| {
            if pick < w {
                true
            } else {
                pick -= w;
                false
            }
        })
        .unwrap_or(0);
    let fault = match kind {
        0 => Fault::SlowDown,
        1 => {
            // Half the resets lose the whole answer, half cut it short.
            let cut = next(&mut s.rng);
            Fault::Reset(if cut.is_multiple_of(2) {
                0
            } else {
                cut % 4096 + 1
            })
        }
        _ => Fault::Stall,
    };
    (Some(fault), plan.stall)
}

fn record_lost_answer(head: &[u8]) {
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    LOST_ANSWERS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(String::from_utf8_lossy(line).into_owned());
}

/// One client connection: one request, faulted or forwarded.
async fn serve(
    mut client: TcpStream,
    upstream: SocketAddr,
    state: &Mutex<State>,
    counts: &Counts,
) -> std::io::Result<()> {
    let (head, mut early_body) = read_head(&mut client).await?;
    counts.requests.fetch_add(1, Ordering::Relaxed);
    let body_len = content_length(&head);
    let (fault, stall) = choose(state, &head);
    match fault {
        Some(Fault::SlowDown) => {
            counts.slow_down.fetch_add(1, Ordering::Relaxed);
            // Read the body first, so that closing does not reset the
            // connection under the client's feet before it reads the 503.
            let rest = body_len.saturating_sub(early_body.len() as u64);
            tokio::io::copy(&mut (&mut client).take(rest), &mut tokio::io::sink()).await?;
            let response = format!(
                "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/xml\r\n\
                 Content-Length: {}\r\nConnection: close\r\n\r\n{SLOW_DOWN_BODY}",
                SLOW_DOWN_BODY.len()
            );
            client.write_all(response.as_bytes()).await?;
            client.shutdown().await?;
            return Ok(());
        }
        Some(Fault::Reset(_)) => {
            counts.reset.fetch_add(1, Ordering::Relaxed);
            record_lost_answer(&head);
        }
        Some(Fault::Stall) => {
            counts.stall.fetch_add(1, Ordering::Relaxed);
            record_lost_answer(&head);
        }
        None => {}
    }

    let mut server = TcpStream::connect(upstream).await?;
    server.write_all(&close_after(&head)).await?;
    if fault == Some(Fault::Stall) {
        // Let about half the body through, then go silent.
        let half = (body_len / 2) as usize;
        let now = early_body.len().min(half);
        server.write_all(&early_body[..now]).await?;
        early_body.drain(..now);
        let more = (half - now) as u64;
        tokio::io::copy(&mut (&mut client).take(more), &mut server).await?;
        match stall {
            Some(stall) => tokio::time::sleep(stall).await,
            None => {
                // Hold the connection until the client gives up on it.
                let mut sink = [0u8; 4096];
                while client.read(&mut sink).await? > 0 {}
                return Ok(());
            }
        }
    }
    server.write_all(&early_body).await?;
    let (mut client_read, mut client_write) = client.split();
    let (mut server_read, mut server_write) = server.split();
    let upload = async {
        let _ = tokio::io::copy(&mut client_read, &mut server_write).await;
        let _ = server_write.shutdown().await;
    };
    let download = async {
        match fault {
            Some(Fault::Reset(after)) => {
                let _ =
                    tokio::io::copy(&mut (&mut server_read).take(after), &mut client_write).await;
                Err(())
            }
            _ => {
                let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
                let _ = client_write.shutdown().await;
                Ok(())
            }
        }
    };
    // The answer decides: once it is through (or cut), the exchange is over.
    let outcome = tokio::select! {
        outcome = download => outcome,
        () = async { upload.await; std::future::pending::<()>().await } => unreachable!(),
    };
    if outcome.is_err() {
        // An abortive close: the client reads ECONNRESET.
        client.set_zero_linger()?;
    }
    Ok(())
}

/// Reads up to the end of the request head; returns the head and whatever
/// of the body came with it.
async fn read_head(client: &mut TcpStream) -> std::io::Result<(Vec<u8>, Vec<u8>)> {
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = find(&buf, b"\r\n\r\n") {
            let body = buf.split_off(end + 4);
            return Ok((buf, body));
        }
        if buf.len() > MAX_HEAD {
            return Err(std::io::Error::other("request head too long"));
        }
        let n = client.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn header_lines(head: &[u8]) -> impl Iterator<Item = &str> {
    std::str::from_utf8(head)
        .unwrap_or("")
        .split("\r\n")
        .skip(1)
        .filter(|l| !l.is_empty())
}

fn content_length(head: &[u8]) -> u64 {
    header_lines(head)
        .filter_map(|l| l.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, value)| value.trim().parse().ok())
        .unwrap_or(0)
}

/// The request head with `Connection: close` in place of any connection
/// header, so the server closes after its answer.
fn close_after(head: &[u8]) -> Vec<u8> {
    let text = String::from_utf8_lossy(head);
    let mut lines = text.split("\r\n");
    let mut out = String::with_capacity(head.len() + 20);
    out.push_str(lines.next().unwrap_or_default());
    out.push_str("\r\n");
    for line in lines.filter(|l| !l.is_empty()) {
        let name = line.split(':').next().unwrap_or_default().trim();
        if name.eq_ignore_ascii_case("connection") || name.eq_ignore_ascii_case("keep-alive") {
            continue;
        }
        out.push_str(line);
        out.push_str("\r\n");
    }
    out.push_str("Connection: close\r\n\r\n");
    out.into_bytes()
}
