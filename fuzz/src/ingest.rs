//! The small JSON documents of a CSI volume's directory (`core::ingest`):
//! `volume.json`, which the plugin writes and the daemon's ingest reads, and
//! `ingested.json`, which both write. A pod cannot write either (they are
//! beside its `data/`), but a crash, a full disk or an older version can
//! leave anything there.

use cairn_core::ingest::{IngestedSteps, VolumeInfo};
use cairn_csi::store::VolumeRecord;

/// The input as each document: whatever decodes survives its own encoding.
pub fn ingest_json(data: &[u8]) {
    if let Ok(steps) = IngestedSteps::decode(data) {
        let again = IngestedSteps::decode(&steps.encode()).expect("ingested.json re-encodes");
        assert_eq!(again, steps);
        let _ = steps.has_prefilled();
        if let Some(first) = steps.steps.first() {
            assert!(steps.contains(first.step));
            let mut more = steps.clone();
            assert!(!more.record(first.step, "again", first.source));
        }
    }
    let _ = VolumeInfo::decode(data);
    // The plugin's own record of a volume is the same document, read back
    // at start-up; ingest reads what the plugin writes.
    if let Ok(record) = serde_json::from_slice::<VolumeRecord>(data) {
        let json = record.to_json();
        let back: VolumeRecord = serde_json::from_slice(&json).expect("a record re-encodes");
        assert_eq!(back, record);
        if let Ok(info) = VolumeInfo::decode(&json) {
            assert_eq!(info.tenant_attribute, record.spec.tenant_attribute);
            assert_eq!(info.job, record.spec.job);
            assert_eq!(info.rank, record.spec.rank);
        }
    }
}
