//! The daemon's configuration file: TOML text into a validated `Config`
//! (`daemon::config`), with no flag or environment variable set.

use cairn_daemon::config::{Args, Config, MAX_PEER_REPLICAS, MIN_PART_SIZE};

/// The input as the text of `cairnd.toml`: refused with an error, or a
/// configuration that keeps every promise of `Config`.
pub fn daemon_config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(config) = Config::from_file_text(&Args::default(), "cairnd.toml", text) else {
        return;
    };
    for dir in [
        &config.memory_dir,
        &config.disk_dir,
        &config.ingest.volumes_dir,
    ] {
        assert!(dir.is_absolute(), "{dir:?}");
    }
    assert!(
        !config.memory_dir.starts_with(&config.disk_dir)
            && !config.disk_dir.starts_with(&config.memory_dir)
    );
    assert!(config.memory_pool_bytes <= config.memory_capacity);
    assert!(config.memory_retention.keep_last >= 1 && config.disk_retention.keep_last >= 1);
    assert!(config.writeback_concurrency >= 1);
    assert!(!config.ingest.rescan.is_zero());
    if let Some(object) = &config.object_store {
        assert!(!object.url.is_empty());
        assert!(object.concurrency >= 1 && object.retention.keep_last >= 1);
        assert!(object.settings.part_size >= MIN_PART_SIZE);
        assert!(object.settings.multipart_threshold >= object.settings.part_size);
        assert!((1..=19).contains(&object.settings.compression.level));
        assert!(object.settings.compression.min_ratio >= 1.0);
        assert!(object.settings.attempts >= 1);
    }
    if let Some(peers) = &config.peers {
        assert!((1..=MAX_PEER_REPLICAS).contains(&peers.replicas));
        assert!(peers.concurrency >= 1 && peers.replica_keep_last >= 1);
        assert!(peers.listen.port() != 0);
        assert!(peers.replica_dir.is_absolute());
    }
}
