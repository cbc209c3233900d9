//! Writes the seed corpora of `fuzz/corpus/` from real values: manifests,
//! stored chunks, requests as clients, peers and kubelet send them, the
//! documents of a CSI volume and the daemon's example configuration files.
//! Run after a format or protocol change, and commit what changed:
//!
//! ```text
//! cargo test -p cairn-fuzz-targets --test seeds -- --ignored
//! ```

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use cairn_core::codec::{ChunkHeader, CompressionPolicy, Encoding, compress};
use cairn_core::ingest::{IngestSource, IngestedSteps};
use cairn_core::{
    Attempt, ChunkId, ChunkRef, ChunkSize, FileEntry, FileName, JobName, MANIFEST_VERSION,
    Manifest, Rank, ShardKey, Step, TenantName, chunk_ranges,
};
use cairn_csi::csi::v1 as csi;
use cairn_proto::v1 as pb;
use prost::Message;

fn fuzz_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Writes `seeds` into `fuzz/corpus/<target>/`, replacing what was there.
fn write(target: &str, seeds: Vec<(&str, Vec<u8>)>) {
    let dir = fuzz_dir().join("corpus").join(target);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).expect("clearing a corpus");
    }
    std::fs::create_dir_all(&dir).expect("creating a corpus");
    for (name, bytes) in seeds {
        std::fs::write(dir.join(name), bytes).expect("writing a seed");
    }
}

/// A method selector byte, then the message.
fn request(method: u8, message: &impl Message) -> Vec<u8> {
    let mut bytes = vec![method];
    bytes.extend(message.encode_to_vec());
    bytes
}

/// Deterministic bf16-like bytes: small values whose high bytes repeat.
fn tensor(len: usize) -> Vec<u8> {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    (0..len / 2)
        .flat_map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let value = ((state % 2000) as f32 - 1000.0) / 40_000.0;
            ((value.to_bits() >> 16) as u16).to_le_bytes()
        })
        .collect()
}

fn manifest(files: &[(&str, Vec<u8>)], attempt: Option<&str>) -> Manifest {
    let chunk_size = ChunkSize::new(64 * 1024).expect("valid chunk size");
    Manifest {
        version: MANIFEST_VERSION,
        shard: ShardKey {
            tenant: TenantName::parse("tenant", "team-a".into()).expect("valid"),
            job: JobName::parse("job", "llama-7b".into()).expect("valid"),
            step: Step(1200),
            rank: Rank(1),
        },
        world_size: Some(4),
        chunk_size,
        files: files
            .iter()
            .map(|(name, data)| FileEntry {
                name: FileName::parse("name", (*name).to_owned()).expect("valid"),
                size: data.len() as u64,
                chunks: chunk_ranges(data.len() as u64, chunk_size)
                    .map(|r| ChunkRef {
                        id: ChunkId::of(&data[r.start as usize..r.end as usize]),
                        len: r.end - r.start,
                    })
                    .collect(),
                metadata: BTreeMap::from([
                    ("dtype".into(), "bfloat16".into()),
                    ("shape".into(), "[64, 1024]".into()),
                ]),
            })
            .collect(),
        metadata: BTreeMap::from([("framework".into(), "torch".into())]),
        committed_unix_ms: 1_700_000_000_000,
        attempt: attempt.map(|a| Attempt::parse("attempt", a.into()).expect("valid")),
    }
}

fn manifests() -> Vec<(&'static str, Manifest)> {
    vec![
        (
            "one_file",
            manifest(&[("model.safetensors", tensor(150_000))], None),
        ),
        (
            "nested_files_attempt",
            manifest(
                &[
                    ("layers/0/weights.bin", tensor(70_000)),
                    ("layers/1/weights.bin", tensor(64 * 1024)),
                    ("_.metadata", b"{}".to_vec()),
                    ("empty", Vec::new()),
                ],
                Some("3f6c2a1e-run-2"),
            ),
        ),
    ]
}

fn stored_chunk(raw: &[u8], width: Option<u8>, policy: &CompressionPolicy) -> Vec<u8> {
    let (encoding, body) = compress(raw, width, policy).unwrap_or((Encoding::Raw, raw.to_vec()));
    let mut out = ChunkHeader {
        encoding,
        raw_len: raw.len() as u64,
    }
    .to_bytes()
    .to_vec();
    out.extend(body);
    out
}

fn shard_ref() -> pb::ShardRef {
    pb::ShardRef {
        tenant: "team-a".into(),
        job: "llama-7b".into(),
        step: 1200,
        rank: 1,
    }
}

fn selector(step: Option<u64>) -> pb::ShardSelector {
    pb::ShardSelector {
        tenant: String::new(),
        job: "llama-7b".into(),
        step,
        rank: 3,
    }
}

fn begin_shard() -> pb::BeginShardRequest {
    pb::BeginShardRequest {
        shard: Some(shard_ref()),
        files: vec![
            pb::FileSpec {
                name: "model.safetensors".into(),
                size: 1 << 30,
                metadata: HashMap::from([("dtype".into(), "bfloat16".into())]),
            },
            pb::FileSpec {
                name: "optim/__0_0.distcp".into(),
                size: 4096,
                metadata: HashMap::new(),
            },
        ],
        world_size: Some(8),
        metadata: HashMap::from([("framework".into(), "jax".into())]),
        attempt: "3f6c2a1e-run-2".into(),
    }
}

fn publish_request() -> csi::NodePublishVolumeRequest {
    use csi::volume_capability::access_mode::Mode;
    csi::NodePublishVolumeRequest {
        volume_id: "csi-4d1b0a3e9f".into(),
        target_path: "/var/lib/kubelet/pods/8a0e7c1d-2b3f-4c5d-9e6f-0a1b2c3d4e5f/volumes/kubernetes.io~csi/checkpoints/mount".into(),
        volume_capability: Some(csi::VolumeCapability {
            access_type: Some(csi::volume_capability::AccessType::Mount(
                csi::volume_capability::MountVolume::default(),
            )),
            access_mode: Some(csi::volume_capability::AccessMode {
                mode: Mode::SingleNodeWriter as i32,
            }),
        }),
        readonly: false,
        volume_context: HashMap::from([
            ("job".into(), "llama-7b".into()),
            ("rankFrom".into(), "jobCompletionIndex".into()),
            ("restore".into(), "latest".into()),
            ("stepDirFormat".into(), "step_{step}".into()),
            ("commitMarker".into(), ".metadata".into()),
            ("csi.storage.k8s.io/ephemeral".into(), "true".into()),
            ("csi.storage.k8s.io/pod.name".into(), "train-3-x7k2p".into()),
            ("csi.storage.k8s.io/pod.namespace".into(), "team-a".into()),
            (
                "csi.storage.k8s.io/pod.uid".into(),
                "8a0e7c1d-2b3f-4c5d-9e6f-0a1b2c3d4e5f".into(),
            ),
            (
                "csi.storage.k8s.io/serviceAccount.tokens".into(),
                "{\"cairn\":{\"token\":\"eyJhbGciOi\",\"expirationTimestamp\":\"2030-01-01T00:00:00Z\"}}".into(),
            ),
        ]),
        secrets: HashMap::from([("key".into(), "value".into())]),
        ..Default::default()
    }
}

/// The ```toml blocks of a markdown file.
fn toml_blocks(markdown: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in markdown.lines() {
        match (&mut current, line.trim()) {
            (None, "```toml") => current = Some(String::new()),
            (Some(block), "```") => {
                blocks.push(std::mem::take(block));
                current = None;
            }
            (Some(block), _) => {
                block.push_str(line);
                block.push('\n');
            }
            (None, _) => {}
        }
    }
    blocks
}

#[test]
#[ignore = "writes fuzz/corpus/; run by hand after a format change"]
fn write_seed_corpora() {
    let manifests = manifests();
    let mut decode_seeds: Vec<(&str, Vec<u8>)> = manifests
        .iter()
        .map(|(name, m)| (*name, m.encode()))
        .collect();
    let mut torn = manifests[0].1.encode();
    torn.truncate(torn.len() / 2);
    decode_seeds.push(("torn", torn));
    for (name, m) in &manifests {
        Manifest::decode(&m.encode()).unwrap_or_else(|e| panic!("seed {name} is refused: {e}"));
    }
    write("manifest_decode", decode_seeds);
    write(
        "manifest_body",
        manifests
            .iter()
            .map(|(name, m)| {
                let encoded = m.encode();
                let newline = encoded.iter().position(|&b| b == b'\n').expect("header");
                (*name, encoded[newline + 1..].to_vec())
            })
            .collect(),
    );

    let policy = CompressionPolicy::default();
    let text = b"cairn stores checkpoints in tiers; ".repeat(60);
    write(
        "chunk_decode",
        vec![
            (
                "raw",
                stored_chunk(
                    &tensor(3000)[..1000],
                    None,
                    &CompressionPolicy {
                        enabled: false,
                        ..policy
                    },
                ),
            ),
            (
                "zstd_shuffle2",
                stored_chunk(&tensor(4000), Some(2), &policy),
            ),
            ("zstd_text", stored_chunk(&text, None, &policy)),
            ("header_only", stored_chunk(&[], None, &policy)),
        ],
    );
    let with_control = |control: u8, data: &[u8]| {
        let mut out = vec![control];
        out.extend_from_slice(data);
        out
    };
    write(
        "chunk_roundtrip",
        vec![
            ("bf16_shuffle2", with_control(2, &tensor(3000))),
            ("text_level3", with_control(0x80, &text)),
            ("zeros_ratio1", with_control(0x23, &[0; 2048])),
            ("raw_policy_off", with_control(0x40, &tensor(500))),
        ],
    );

    write(
        "names",
        [
            ("job", "llama-7b"),
            ("tenant", "team-a"),
            ("attempt", "3f6c2a1e-run-2"),
            ("node", "gpu-node-17.zone-a"),
            ("file_nested", "layers/0/weights.bin"),
            ("file_dcp", "__0_0.distcp"),
            ("dcp_metadata", ".metadata"),
            ("escaped", "_.metadata"),
            ("dotdot", "a/../b"),
            ("orbax_tmp", "100.orbax-checkpoint-tmp-1699999999"),
            ("step_dir", "checkpoint_000100"),
            ("step_max", "18446744073709551615"),
            ("format", "step_{step}"),
            ("format_bare", "{step}"),
            ("marker", "commit_success.txt"),
            ("none", "none"),
            (
                "chunk_id",
                "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262",
            ),
        ]
        .into_iter()
        .map(|(name, text)| (name, text.as_bytes().to_vec()))
        .collect(),
    );

    cairn_daemon::service::convert::begin_shard_with(
        &|t| Ok(TenantName::parse("tenant", t.to_owned())?),
        &begin_shard(),
    )
    .expect("the seed BeginShard is valid");
    let header_stream = pb::WriteShardRequest {
        msg: Some(pb::write_shard_request::Msg::Header(begin_shard())),
    };
    write(
        "checkpoint_request",
        vec![
            ("begin_shard", request(0, &begin_shard())),
            (
                "commit_shard",
                request(
                    1,
                    &pb::CommitShardRequest {
                        session_id: "0f8e7d6c-5b4a-4938-8271-605f4e3d2c1b".into(),
                    },
                ),
            ),
            (
                "abort_shard",
                request(
                    2,
                    &pb::AbortShardRequest {
                        session_id: "0f8e7d6c-5b4a-4938-8271-605f4e3d2c1b".into(),
                    },
                ),
            ),
            ("write_shard_header", request(3, &header_stream)),
            (
                "read_shard",
                request(
                    4,
                    &pb::ReadShardRequest {
                        shard: Some(selector(None)),
                    },
                ),
            ),
            (
                "list_steps",
                request(
                    5,
                    &pb::ListStepsRequest {
                        tenant: "team-a".into(),
                        job: "llama-7b".into(),
                        wait_for_all_tiers: false,
                    },
                ),
            ),
            (
                "get_manifest",
                request(
                    6,
                    &pb::GetManifestRequest {
                        shard: Some(selector(Some(1200))),
                    },
                ),
            ),
            (
                "restore_shard",
                request(
                    7,
                    &pb::RestoreShardRequest {
                        shard: Some(selector(None)),
                        skip_verify: true,
                    },
                ),
            ),
            (
                "delete_step",
                request(
                    8,
                    &pb::DeleteStepRequest {
                        tenant: String::new(),
                        job: "llama-7b".into(),
                        step: 1100,
                    },
                ),
            ),
            (
                "wait_durable",
                request(
                    9,
                    &pb::WaitDurableRequest {
                        tenant: "team-a".into(),
                        job: "llama-7b".into(),
                        step: 1200,
                        rank: Some(0),
                        tier: pb::Tier::ObjectStore as i32,
                        timeout_ms: 60_000,
                    },
                ),
            ),
        ],
    );
    write(
        "admin_request",
        vec![
            ("status", request(0, &pb::StatusRequest {})),
            (
                "verify",
                request(
                    1,
                    &pb::VerifyRequest {
                        tenant: String::new(),
                        job: "llama-7b".into(),
                        step: 1200,
                        rank: None,
                        tier: pb::Tier::Disk as i32,
                        repair: true,
                    },
                ),
            ),
            ("gc", request(2, &pb::GcRequest { dry_run: true })),
            (
                "prefetch",
                request(
                    3,
                    &pb::PrefetchRequest {
                        node: "gpu-node-17".into(),
                        shard: Some(selector(None)),
                    },
                ),
            ),
        ],
    );
    let data = tensor(4096);
    let id = ChunkId::of(&data).as_bytes().to_vec();
    write(
        "peer_request",
        vec![
            (
                "missing_chunks",
                request(
                    0,
                    &pb::PeerMissingChunksRequest {
                        tenant: "team-a".into(),
                        ids: vec![id.clone(), vec![7; 32]],
                        presence_only: false,
                    },
                ),
            ),
            (
                "put_chunk",
                request(
                    1,
                    &pb::PeerPutChunkRequest {
                        tenant: "team-a".into(),
                        id: id.clone(),
                        data: data.into(),
                    },
                ),
            ),
            (
                "put_manifest",
                request(
                    2,
                    &pb::PeerPutManifestRequest {
                        manifest: manifests[1].1.encode(),
                        owner: "gpu-node-17".into(),
                        owner_zone: "zone-a".into(),
                        owner_rack: "rack-3".into(),
                    },
                ),
            ),
            (
                "get_replica",
                request(
                    3,
                    &pb::PeerGetReplicaRequest {
                        shard: Some(shard_ref()),
                    },
                ),
            ),
            (
                "list_replicas",
                request(
                    4,
                    &pb::PeerListReplicasRequest {
                        tenant: "team-a".into(),
                        job: String::new(),
                    },
                ),
            ),
            (
                "get_chunk",
                request(
                    5,
                    &pb::PeerGetChunkRequest {
                        tenant: "team-a".into(),
                        id,
                    },
                ),
            ),
            (
                "prefetch",
                request(
                    6,
                    &pb::PeerPrefetchRequest {
                        shard: Some(selector(Some(1200))),
                    },
                ),
            ),
            (
                "drop_replica",
                request(
                    7,
                    &pb::PeerDropReplicaRequest {
                        shard: Some(shard_ref()),
                    },
                ),
            ),
        ],
    );

    let publish = publish_request();
    let attributes: String = publish
        .volume_context
        .iter()
        .collect::<BTreeMap<_, _>>()
        .into_iter()
        .map(|(k, v)| format!("{k}={v}\n"))
        .collect();
    let mut attribute_seed = vec![1];
    attribute_seed.extend(attributes.into_bytes());
    write(
        "csi_request",
        vec![
            ("publish", request(0, &publish)),
            ("publish_attributes", attribute_seed),
            (
                "publish_attributes_rank",
                b"\x01job=bert\nrank=3\ntenant=research\ncsi.storage.k8s.io/ephemeral=true\nrestore=none\n".to_vec(),
            ),
            (
                "unpublish",
                request(2, &csi::NodeUnpublishVolumeRequest {
                    volume_id: publish.volume_id.clone(),
                    target_path: publish.target_path.clone(),
                }),
            ),
            (
                "stats",
                request(3, &csi::NodeGetVolumeStatsRequest {
                    volume_id: publish.volume_id.clone(),
                    volume_path: publish.target_path.clone(),
                    staging_target_path: String::new(),
                }),
            ),
        ],
    );

    let mut steps = IngestedSteps::default();
    steps.record(Step(100), "100", IngestSource::Ingested);
    steps.record(Step(200), "step_200", IngestSource::Prefilled);
    let spec = cairn_csi::volume::VolumeSpec::from_request(
        &cairn_csi::node::publish_request(publish),
        Path::new("/var/lib/kubelet"),
    )
    .expect("the seed request is valid");
    let record = cairn_csi::store::VolumeRecord {
        format: cairn_csi::store::FORMAT_VERSION,
        spec,
        published_at: "2024-05-01T12:00:00Z".into(),
    };
    write(
        "ingest_json",
        vec![
            ("ingested", steps.encode()),
            ("volume", record.to_json()),
            (
                "volume_minimal",
                br#"{"format":1,"volume_id":"csi-1","tenant":"default","job":"j","rank":0,"commit_marker":"none"}"#.to_vec(),
            ),
        ],
    );

    let repo = fuzz_dir().parent().expect("the repository").to_path_buf();
    let mut configs = vec![(
        "deploy_base".to_owned(),
        std::fs::read(repo.join("deploy/base/cairnd.toml")).expect("deploy/base/cairnd.toml"),
    )];
    let docs =
        std::fs::read_to_string(repo.join("docs/configuration.md")).expect("docs/configuration.md");
    for (i, block) in toml_blocks(&docs).into_iter().enumerate() {
        configs.push((format!("docs_{i}"), block.into_bytes()));
    }
    configs.push((
        "static_peers".to_owned(),
        b"node_name = \"node-a\"\n[peers]\ninsecure = true\nreplicas = 2\n\
          [membership]\nsource = \"static\"\n\
          [[membership.peers]]\nid = \"node-a\"\naddress = \"10.0.0.1:7070\"\nzone = \"z1\"\n\
          [[membership.peers]]\nid = \"node-b\"\naddress = \"10.0.0.2:7070\"\nzone = \"z2\"\n"
            .to_vec(),
    ));
    configs.push((
        "dns_ingest".to_owned(),
        b"node_name = \"node-a\"\n[peers]\ninsecure = true\n\
          [membership]\nsource = \"dns\"\nname = \"cairn-peers.cairn-system.svc\"\ninterval_secs = 5\n\
          [ingest]\ncommit_marker = \".metadata\"\nrescan_secs = 2\n"
            .to_vec(),
    ));
    for (name, text) in &configs[configs.len() - 2..] {
        let text = std::str::from_utf8(text).expect("UTF-8");
        let args = cairn_daemon::config::Args::default();
        cairn_daemon::config::Config::from_file_text(&args, name, text)
            .unwrap_or_else(|e| panic!("seed {name} is refused: {e}"));
    }
    write(
        "daemon_config",
        configs
            .iter()
            .map(|(name, bytes)| (name.as_str(), bytes.clone()))
            .collect(),
    );
}
