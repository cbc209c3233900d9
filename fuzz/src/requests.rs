//! Every `cairn.v1` request: protobuf bytes decoded into the request type,
//! then through the conversions and validations its handler applies before
//! it touches the node (`daemon::service::{checkpoint, admin, convert}`,
//! `daemon::peer::service`). The first input byte picks the method.

use cairn_core::{ChunkId, Manifest, Member, NodeId, TenantName};
use cairn_daemon::error::{Error, Result};
use cairn_daemon::service::convert;
use cairn_daemon::wire::chunk_id;
use cairn_proto::v1 as pb;
use prost::Message;

use crate::assert_short_message;
use crate::manifest::check_accepted;

/// The tenant of a request that names none, as `Node::tenant` resolves it
/// (the daemon's `default_tenant`).
const DEFAULT_TENANT: &str = "default";

/// `Node::tenant`: the default when the request names none.
fn tenant(requested: &str) -> Result<TenantName> {
    let name = if requested.is_empty() {
        DEFAULT_TENANT
    } else {
        requested
    };
    Ok(TenantName::parse("tenant", name.to_owned())?)
}

/// A refused request's status message stays short, whatever the input.
fn refused<T>(method: &str, result: Result<T>) -> Option<T> {
    match result {
        Ok(value) => Some(value),
        Err(e) => {
            assert_short_message(method, tonic::Status::from(e).message());
            None
        }
    }
}

fn refused_status<T>(method: &str, result: std::result::Result<T, tonic::Status>) -> Option<T> {
    match result {
        Ok(value) => Some(value),
        Err(status) => {
            assert_short_message(method, status.message());
            None
        }
    }
}

/// `cairn.v1.Checkpoint`, one method per value of the first byte.
pub fn checkpoint_request(data: &[u8]) {
    let Some((&method, body)) = data.split_first() else {
        return;
    };
    match method % 10 {
        0 => {
            if let Ok(req) = pb::BeginShardRequest::decode(body) {
                begin_shard("BeginShard", &req);
            }
        }
        1 => {
            let _ = pb::CommitShardRequest::decode(body);
        }
        2 => {
            let _ = pb::AbortShardRequest::decode(body);
        }
        3 => {
            // The first message of a stream must be the header; data
            // messages are checked against the staged files.
            if let Ok(pb::WriteShardRequest {
                msg: Some(pb::write_shard_request::Msg::Header(header)),
            }) = pb::WriteShardRequest::decode(body)
            {
                begin_shard("WriteShard", &header);
            }
        }
        4 => {
            if let Ok(req) = pb::ReadShardRequest::decode(body) {
                selector("ReadShard", req.shard.as_ref());
            }
        }
        5 => {
            if let Ok(req) = pb::ListStepsRequest::decode(body) {
                refused("ListSteps", tenant(&req.tenant));
                if !req.job.is_empty() {
                    refused("ListSteps", convert::job("job", &req.job));
                }
            }
        }
        6 => {
            if let Ok(req) = pb::GetManifestRequest::decode(body) {
                selector("GetManifest", req.shard.as_ref());
            }
        }
        7 => {
            if let Ok(req) = pb::RestoreShardRequest::decode(body) {
                selector("RestoreShard", req.shard.as_ref());
            }
        }
        8 => {
            if let Ok(req) = pb::DeleteStepRequest::decode(body) {
                refused("DeleteStep", tenant(&req.tenant));
                refused("DeleteStep", convert::job("job", &req.job));
            }
        }
        _ => {
            if let Ok(req) = pb::WaitDurableRequest::decode(body) {
                refused("WaitDurable", tenant(&req.tenant));
                refused("WaitDurable", convert::job("job", &req.job));
                refused("WaitDurable", convert::tier("tier", req.tier));
                let _ = std::time::Duration::from_millis(req.timeout_ms);
            }
        }
    }
}

/// `cairn.v1.Admin`, one method per value of the first byte.
pub fn admin_request(data: &[u8]) {
    let Some((&method, body)) = data.split_first() else {
        return;
    };
    match method % 4 {
        0 => {
            let _ = pb::StatusRequest::decode(body);
        }
        1 => {
            if let Ok(req) = pb::VerifyRequest::decode(body) {
                refused("Verify", tenant(&req.tenant));
                refused("Verify", convert::job("job", &req.job));
                refused("Verify", convert::tier("tier", req.tier));
            }
        }
        2 => {
            let _ = pb::GcRequest::decode(body);
        }
        _ => {
            if let Ok(req) = pb::PrefetchRequest::decode(body) {
                selector("Prefetch", req.shard.as_ref());
                if !req.node.is_empty() {
                    refused(
                        "Prefetch",
                        NodeId::parse("node", req.node).map_err(Error::from),
                    );
                }
            }
        }
    }
}

/// `cairn.v1.Peer`, one method per value of the first byte: what a peer
/// (or, with insecure peers, anyone reaching the port) can send.
pub fn peer_request(data: &[u8]) {
    let Some((&method, body)) = data.split_first() else {
        return;
    };
    match method % 8 {
        0 => {
            if let Ok(req) = pb::PeerMissingChunksRequest::decode(body) {
                peer_tenant("Peer/MissingChunks", &req.tenant);
                for id in &req.ids {
                    refused_status("Peer/MissingChunks", chunk_id(id));
                }
            }
        }
        1 => {
            if let Ok(req) = pb::PeerPutChunkRequest::decode(body) {
                peer_tenant("Peer/PutChunk", &req.tenant);
                if let Some(id) = refused_status("Peer/PutChunk", chunk_id(&req.id)) {
                    // The store keeps a chunk only under its own hash.
                    let _ = ChunkId::of(&req.data) == id;
                }
            }
        }
        2 => {
            if let Ok(req) = pb::PeerPutManifestRequest::decode(body) {
                match Manifest::decode(&req.manifest) {
                    Ok(manifest) => check_accepted(&manifest),
                    Err(e) => assert_short_message("Peer/PutManifest", &e.to_string()),
                }
                if let Some(owner) = refused(
                    "Peer/PutManifest",
                    NodeId::parse("owner", req.owner).map_err(Error::from),
                ) {
                    let _ = Member::new(owner)
                        .with_zone(req.owner_zone)
                        .with_rack(req.owner_rack);
                }
            }
        }
        3 => {
            if let Ok(req) = pb::PeerGetReplicaRequest::decode(body)
                && let Some(shard) = req.shard
            {
                peer_tenant("Peer/GetReplica", &shard.tenant);
                refused("Peer/GetReplica", convert::job("shard.job", &shard.job));
            }
        }
        4 => {
            if let Ok(req) = pb::PeerListReplicasRequest::decode(body) {
                peer_tenant("Peer/ListReplicas", &req.tenant);
                if !req.job.is_empty() {
                    refused("Peer/ListReplicas", convert::job("job", &req.job));
                }
            }
        }
        5 => {
            if let Ok(req) = pb::PeerGetChunkRequest::decode(body) {
                peer_tenant("Peer/GetChunk", &req.tenant);
                refused_status("Peer/GetChunk", chunk_id(&req.id));
            }
        }
        7 => {
            if let Ok(req) = pb::PeerDropReplicaRequest::decode(body)
                && let Some(shard) = req.shard
            {
                peer_tenant("Peer/DropReplica", &shard.tenant);
                refused("Peer/DropReplica", convert::job("shard.job", &shard.job));
            }
        }
        _ => {
            // Forwarded to the node's own prefetch, which converts the
            // selector as Admin/Prefetch does.
            if let Ok(req) = pb::PeerPrefetchRequest::decode(body) {
                selector("Peer/Prefetch", req.shard.as_ref());
            }
        }
    }
}

/// A peer names every tenant explicitly (no default).
fn peer_tenant(method: &str, value: &str) {
    refused(
        method,
        TenantName::parse("tenant", value.to_owned()).map_err(Error::from),
    );
}

fn begin_shard(method: &str, req: &pb::BeginShardRequest) {
    let Some(begin) = refused(method, convert::begin_shard_with(&tenant, req)) else {
        return;
    };
    assert!(begin.files.len() <= convert::MAX_FILES);
    assert_eq!(begin.files.len(), req.files.len());
    for (spec, wire) in begin.files.iter().zip(&req.files) {
        assert_eq!(spec.name.as_str(), wire.name);
        assert_eq!(spec.size, wire.size);
    }
    // The declared sizes come from the client: adding them up is checked.
    if let Some(total) = refused(method, begin.total_bytes()) {
        assert!(begin.files.iter().all(|f| f.size <= total));
    }
}

fn selector(method: &str, shard: Option<&pb::ShardSelector>) {
    let result = convert::required("shard", &shard.cloned())
        .and_then(|s| convert::selector_with(&tenant, "shard", s));
    refused(method, result);
}
