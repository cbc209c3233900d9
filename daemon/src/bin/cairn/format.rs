//! How the CLI prints what the daemon answers: names, sizes, sources.

use super::*;

pub(crate) fn tier_name(tier: i32) -> &'static str {
    match pb::Tier::try_from(tier) {
        Ok(pb::Tier::Memory) => "memory",
        Ok(pb::Tier::Disk) => "disk",
        Ok(pb::Tier::Peers) => "peers",
        Ok(pb::Tier::ObjectStore) => "object-store",
        _ => "unknown",
    }
}

pub(crate) fn state_name(state: i32) -> &'static str {
    match pb::ShardState::try_from(state) {
        Ok(pb::ShardState::Absent) => "-",
        Ok(pb::ShardState::Pending) => "pending",
        Ok(pb::ShardState::Durable) => "durable",
        Ok(pb::ShardState::Failed) => "FAILED",
        _ => "?",
    }
}

pub(crate) fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// A running restore's bytes by source (`disk`, `peer:<node>`, `object-store`).
pub(crate) fn progress_sources(progress: &pb::RestoreProgress) -> Vec<(String, u64)> {
    progress
        .sources
        .iter()
        .map(|s| (s.source.clone(), s.bytes))
        .collect()
}

/// A finished restore's bytes by the tier they came from.
pub(crate) fn tier_sources(sources: &[pb::SourceBytes]) -> Vec<(String, u64)> {
    sources
        .iter()
        .map(|s| (tier_name(s.tier).to_owned(), s.bytes))
        .collect()
}

/// Where a restore's bytes came from, for people: `1.0 GiB from disk, 20 MiB
/// from peer:node-2`.
pub(crate) fn bytes_from(sources: &[(String, u64)]) -> String {
    sources
        .iter()
        .map(|(source, bytes)| format!("{} from {source}", human_bytes(*bytes)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The same for scripts: source to bytes.
pub(crate) fn sources_json(sources: &[(String, u64)]) -> serde_json::Value {
    sources
        .iter()
        .map(|(source, bytes)| (source.clone(), json!(bytes)))
        .collect::<serde_json::Map<_, _>>()
        .into()
}

/// Says, before a listing, what it could not ask: the view is partial.
pub(crate) fn print_left_out(out: &mut dyn Write, left_out: &[String]) -> std::io::Result<()> {
    for what in left_out {
        writeln!(out, "partial view: {what}")?;
    }
    Ok(())
}

/// " (unreachable)" for a holder the listing could not reach.
pub(crate) fn unreachable_mark(left_out: &[String], holder: &str) -> &'static str {
    if left_out
        .iter()
        .any(|l| l == &format!("peer {holder}: unreachable"))
    {
        " (unreachable)"
    } else {
        ""
    }
}

pub(crate) fn hex_id(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_as_people_write_them() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(5 << 30), "5.0 GiB");
        assert_eq!(human_bytes(u64::MAX), "16777216.0 TiB");
    }

    #[test]
    fn names_of_tiers_and_states_never_panic_on_unknown_values() {
        assert_eq!(tier_name(pb::Tier::ObjectStore as i32), "object-store");
        assert_eq!(tier_name(99), "unknown");
        assert_eq!(state_name(pb::ShardState::Failed as i32), "FAILED");
        assert_eq!(state_name(-1), "?");
        assert_eq!(hex_id(&[0, 0xab, 0x10]), "00ab10");
    }

    #[test]
    fn only_holders_the_listing_could_not_reach_are_marked() {
        let left_out = vec!["peer node-b: unreachable".to_owned()];
        assert_eq!(unreachable_mark(&left_out, "node-b"), " (unreachable)");
        assert_eq!(unreachable_mark(&left_out, "node-bb"), "");
        assert_eq!(unreachable_mark(&[], "node-b"), "");
    }
}
