//! Cairn's test harness, one copy for every crate that starts `cairnd`: the
//! daemon's integration tests, the CSI driver's tests and the benchmarks.
//!
//! - [`daemon`]: a real `cairnd` on a Unix socket in a directory of its own,
//!   killed on drop. When the test is failing, its log is kept and its last
//!   lines printed with the test's output.
//! - [`rpc`]: the requests and calls every test makes: save, restore, list a
//!   job's steps, wait until a step is durable in a tier.
//! - [`wait`]: waiting on a condition, with a deadline, instead of sleeping.
//! - [`pki`]: a throwaway CA and node certificates for the peer tier's
//!   mutual TLS.
//! - [`servers`] and [`s3`]: test servers on free loopback ports, and
//!   SeaweedFS as a real S3 bucket.
//! - [`data`] and [`metrics`]: deterministic test bytes, files under a
//!   directory, values read from a Prometheus scrape.
//! - [`logs`]: a failing test's process logs, kept and their tails printed.
//!
//! The crate is not published; it panics where a test should fail, and
//! returns errors only where a benchmark reports them.

pub mod daemon;
pub mod data;
pub mod logs;
pub mod metrics;
pub mod pki;
pub mod rpc;
pub mod s3;
pub mod servers;
pub mod wait;

pub use cairn_daemon::client::Clients;
pub use daemon::{Daemon, DaemonOptions, TEST_CHUNK, cairnd_binary};
pub use data::{bytes, files_under};
pub use metrics::metric;
pub use rpc::{
    begin_request, in_memory, job_steps, restore, save, save_in_volume, selector, shard,
    source_bytes, status, tenant_job_steps, wait_disk, wait_durable, write_staged,
};
pub use wait::wait_until;
