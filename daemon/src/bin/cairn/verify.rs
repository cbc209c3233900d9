//! `cairn verify`: re-hash a tier's copies, and repair them.

use super::*;

#[allow(clippy::too_many_arguments)]
pub(crate) async fn verify(
    clients: &mut Clients,
    tenant: &str,
    job: String,
    step: u64,
    rank: Option<u32>,
    tier: TierArg,
    repair: bool,
    json: bool,
) -> Result<(), Failure> {
    let mut stream = clients
        .admin
        .verify(pb::VerifyRequest {
            tenant: tenant.to_owned(),
            job: job.clone(),
            step,
            rank,
            tier: tier.to_pb() as i32,
            repair,
        })
        .await?
        .into_inner();
    let bar = progress_bar(0, "verify");
    let mut report = None;
    while let Some(p) = stream.message().await? {
        if p.done {
            report = Some(p);
            break;
        }
        bar.set_length(p.bytes_total);
        bar.set_position(p.bytes_done);
    }
    bar.finish_and_clear();
    let report =
        report.ok_or_else(|| fail(1, "cairnd ended the verify stream without a report"))?;
    let bad: Vec<_> = report.bad_chunks.iter().filter(|b| !b.repaired).collect();
    if json {
        let chunks: Vec<_> = report
            .bad_chunks
            .iter()
            .map(|b| json!({"rank": b.rank, "file": b.file, "offset": b.offset, "chunk": hex_id(&b.chunk_id), "problem": b.problem, "repaired": b.repaired, "holder": b.holder}))
            .collect();
        println!(
            "{}",
            json!({"job": job, "step": step, "tier": tier_name(tier.to_pb() as i32), "ok": bad.is_empty(), "bad_chunks": chunks})
        );
    } else if report.bad_chunks.is_empty() {
        println!(
            "step {step} of {job} in the {} tier: every chunk verified",
            tier_name(tier.to_pb() as i32)
        );
    } else {
        for b in &report.bad_chunks {
            println!(
                "rank {} file {} offset {} chunk {}: {}{}{}",
                b.rank,
                b.file,
                b.offset,
                hex_id(&b.chunk_id),
                b.problem,
                if b.holder.is_empty() {
                    String::new()
                } else {
                    format!(" on {}", b.holder)
                },
                if b.repaired { " (repaired)" } else { "" }
            );
        }
    }
    if bad.is_empty() {
        Ok(())
    } else {
        Err(fail(
            5,
            format!(
                "{} bad chunks in step {step} of {job} in the {} tier",
                bad.len(),
                tier_name(tier.to_pb() as i32)
            ),
        ))
    }
}
