//! `cairnd`: the node daemon.

use anyhow::Context;
use cairn_daemon::config::{Args, Config};
use clap::Parser;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

/// Chunk-sized buffers (reads, TLS records, gRPC messages) come and go by
/// the thousand per GiB moved; jemalloc keeps freed ones for reuse where
/// glibc's malloc returns them to the kernel and faults fresh pages in for
/// the next, which cost more CPU than hashing the bytes (perf profile in
/// benches/results).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    init_logging(&args.log_format);
    // Reads FAILPOINTS from the environment (crash tests only).
    let _failpoints = fail::FailScenario::setup();
    let config = match Config::load(&args) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("cairnd: invalid configuration: {e}");
            std::process::exit(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("cairnd")
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        let cancel = CancellationToken::new();
        let signals = cancel.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("shutdown requested");
            signals.cancel();
        });
        if let Err(e) = cairn_daemon::server::run(config, cancel).await {
            tracing::error!(error = %e, "cairnd failed");
            eprintln!("cairnd: {e}");
            std::process::exit(1);
        }
        Ok(())
    })
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

fn init_logging(format: &str) {
    let filter = EnvFilter::try_from_env("CAIRN_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}
