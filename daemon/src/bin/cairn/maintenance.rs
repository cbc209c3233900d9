//! `cairn wait`, `cairn delete` and `cairn gc`.

use super::*;

/// Waits until a step is durable in `tier`.
pub(crate) async fn wait(
    clients: &mut Clients,
    tenant: String,
    job: String,
    step: u64,
    tier: TierArg,
    timeout_secs: u64,
    json: bool,
) -> Result<(), Failure> {
    let started = Instant::now();
    clients
        .checkpoint
        .wait_durable(pb::WaitDurableRequest {
            tenant,
            job: job.clone(),
            step,
            rank: None,
            tier: tier.to_pb() as i32,
            timeout_ms: timeout_secs.saturating_mul(1000),
        })
        .await?;
    let secs = started.elapsed().as_secs_f64();
    if json {
        println!(
            "{}",
            json!({"job": job, "step": step, "tier": tier.to_pb().as_str_name(), "waited_seconds": secs})
        );
    } else {
        println!(
            "step {step} of {job} is durable in the {} tier (waited {secs:.2}s)",
            tier_name(tier.to_pb() as i32)
        );
    }
    Ok(())
}

/// Deletes a step from every tier.
pub(crate) async fn delete(
    clients: &mut Clients,
    tenant: String,
    job: String,
    step: u64,
    json: bool,
) -> Result<(), Failure> {
    let resp = clients
        .checkpoint
        .delete_step(pb::DeleteStepRequest {
            tenant,
            job: job.clone(),
            step,
        })
        .await?
        .into_inner();
    if json {
        println!(
            "{}",
            json!({"job": job, "step": step, "shards_deleted": resp.shards_deleted})
        );
    } else {
        println!(
            "deleted step {step} of {job} ({} shards)",
            resp.shards_deleted
        );
    }
    Ok(())
}

/// Removes chunks no manifest names (or says what it would remove).
pub(crate) async fn gc(clients: &mut Clients, dry_run: bool, json: bool) -> Result<(), Failure> {
    let resp = clients
        .admin
        .gc(pb::GcRequest { dry_run })
        .await?
        .into_inner();
    if json {
        println!(
            "{}",
            json!({"dry_run": dry_run, "chunks": resp.chunks_removed, "bytes": resp.bytes_removed,
                   "object_store": {"chunks": resp.object_store_chunks_removed, "bytes": resp.object_store_bytes_removed,
                                    "skipped_tenants": resp.object_store_skipped_tenants}})
        );
    } else {
        let verb = if dry_run { "would remove" } else { "removed" };
        println!(
            "disk: {verb} {} unreferenced chunks ({})",
            resp.chunks_removed,
            human_bytes(resp.bytes_removed)
        );
        if resp.object_store_configured {
            println!(
                "object store: {verb} {} unreferenced chunks ({})",
                resp.object_store_chunks_removed,
                human_bytes(resp.object_store_bytes_removed)
            );
        }
        for tenant in &resp.object_store_skipped_tenants {
            println!(
                "object store: tenant {tenant} skipped (a manifest cannot be read; see the daemon's log)"
            );
        }
    }
    Ok(())
}
