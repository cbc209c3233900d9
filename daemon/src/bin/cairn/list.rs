//! `cairn list`: steps and the state of each shard in each tier.

use super::*;

pub(crate) async fn list(
    clients: &mut Clients,
    tenant: &str,
    job: String,
    json: bool,
) -> Result<(), Failure> {
    let resp = list_steps(clients, tenant, &job).await?;
    print_list(&mut std::io::stdout().lock(), resp, json)
}

/// The steps of `job` (every job when empty), as people see them: without
/// waiting more than a second for a slow tier (the answer names what it
/// left out).
pub(crate) async fn list_steps(
    clients: &mut Clients,
    tenant: &str,
    job: &str,
) -> Result<pb::ListStepsResponse, Failure> {
    Ok(clients
        .checkpoint
        .list_steps(pb::ListStepsRequest {
            tenant: tenant.to_owned(),
            job: job.to_owned(),
            wait_for_all_tiers: false,
        })
        .await?
        .into_inner())
}

/// `cairn list`, from the `ListSteps` answer.
pub(crate) fn print_list(
    out: &mut dyn Write,
    resp: pb::ListStepsResponse,
    json: bool,
) -> Result<(), Failure> {
    if json {
        let jobs: Vec<_> = resp
            .jobs
            .iter()
            .map(|j| {
                let steps: Vec<_> = j
                    .steps
                    .iter()
                    .map(|s| {
                        let shards: Vec<_> = s
                            .shards
                            .iter()
                            .map(|r| {
                                let tiers: serde_json::Map<String, serde_json::Value> = r
                                    .tiers
                                    .iter()
                                    .map(|t| (tier_name(t.tier).to_owned(), json!(state_name(t.state))))
                                    .collect();
                                let problems: serde_json::Map<String, serde_json::Value> = r
                                    .tiers
                                    .iter()
                                    .filter(|t| !t.problem.is_empty())
                                    .map(|t| (tier_name(t.tier).to_owned(), json!(t.problem)))
                                    .collect();
                                json!({"rank": r.rank, "bytes": r.total_bytes, "world_size": r.world_size, "tiers": tiers,
                                       "problems": problems,
                                       "peer_holders": r.peer_holders, "peer_replicas_wanted": r.peer_replicas_wanted,
                                       "peer_problem": r.peer_problem})
                            })
                            .collect();
                        json!({"step": s.step, "restorable": s.restorable,
                               "object_store_complete": s.object_store_complete, "shards": shards})
                    })
                    .collect();
                json!({"job": j.job, "steps": steps})
            })
            .collect();
        writeln!(
            out,
            "{}",
            json!({ "jobs": jobs, "left_out": resp.left_out })
        )?;
        return Ok(());
    }
    print_left_out(out, &resp.left_out)?;
    if resp.jobs.is_empty() {
        writeln!(
            out,
            "no checkpoints{}",
            if resp.left_out.is_empty() {
                ""
            } else {
                " in what answered"
            }
        )?;
        return Ok(());
    }
    writeln!(
        out,
        "{:<24} {:>10} {:>6} {:>12} {:>8} {:>8} {:>10} {:>12}  restorable",
        "job", "step", "rank", "size", "memory", "disk", "peers", "object-store"
    )?;
    for j in &resp.jobs {
        for s in &j.steps {
            for r in &s.shards {
                let state = |tier: pb::Tier| {
                    r.tiers
                        .iter()
                        .find(|t| t.tier == tier as i32)
                        .map(|t| state_name(t.state))
                        .unwrap_or("-")
                };
                let peers = if r.peer_replicas_wanted == 0 {
                    "-".to_owned()
                } else {
                    format!("{}/{}", r.peer_holders.len(), r.peer_replicas_wanted)
                };
                writeln!(
                    out,
                    "{:<24} {:>10} {:>6} {:>12} {:>8} {:>8} {:>10} {:>12}  {}",
                    j.job,
                    s.step,
                    r.rank,
                    human_bytes(r.total_bytes),
                    state(pb::Tier::Memory),
                    state(pb::Tier::Disk),
                    peers,
                    state(pb::Tier::ObjectStore),
                    match (s.restorable, s.object_store_complete) {
                        (true, true) => "yes (complete in object store)",
                        (true, false) => "yes",
                        (false, _) => "no",
                    }
                )?;
                if !r.peer_holders.is_empty() || !r.peer_problem.is_empty() {
                    writeln!(
                        out,
                        "{:<24} peers holding it: {}{}",
                        "",
                        if r.peer_holders.is_empty() {
                            "none".to_owned()
                        } else {
                            r.peer_holders
                                .iter()
                                .map(|h| format!("{h}{}", unreachable_mark(&resp.left_out, h)))
                                .collect::<Vec<_>>()
                                .join(", ")
                        },
                        if r.peer_problem.is_empty() {
                            String::new()
                        } else {
                            format!("; {}", r.peer_problem)
                        }
                    )?;
                }
                // The peer tier's problem is on the line above.
                for t in r
                    .tiers
                    .iter()
                    .filter(|t| !t.problem.is_empty() && t.tier != pb::Tier::Peers as i32)
                {
                    writeln!(out, "{:<24} {}: {}", "", tier_name(t.tier), t.problem)?;
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listing(left_out: &[&str]) -> pb::ListStepsResponse {
        let shard = pb::ShardStatus {
            rank: 1,
            total_bytes: 2048,
            tiers: vec![
                pb::TierState {
                    tier: pb::Tier::Memory as i32,
                    state: pb::ShardState::Durable as i32,
                    problem: String::new(),
                },
                pb::TierState {
                    tier: pb::Tier::ObjectStore as i32,
                    state: pb::ShardState::Failed as i32,
                    problem: "needs attention after 10 failed attempts: bucket said 403".into(),
                },
            ],
            peer_holders: vec!["node-b".into()],
            peer_replicas_wanted: 2,
            peer_problem: "node-c: full".into(),
            ..Default::default()
        };
        pb::ListStepsResponse {
            jobs: vec![pb::JobSteps {
                job: "llm".into(),
                steps: vec![pb::StepStatus {
                    step: 7,
                    restorable: true,
                    shards: vec![shard],
                    object_store_complete: false,
                }],
            }],
            left_out: left_out.iter().map(|l| l.to_string()).collect(),
        }
    }

    fn printed(resp: pb::ListStepsResponse, json: bool) -> String {
        let mut out = Vec::new();
        print_list(&mut out, resp, json).expect("printed");
        String::from_utf8(out).expect("utf-8")
    }

    #[test]
    fn each_shard_is_a_row_with_its_state_in_every_tier_and_its_holders() {
        let text = printed(listing(&[]), false);
        let lines: Vec<Vec<&str>> = text
            .lines()
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert_eq!(
            lines[0],
            [
                "job",
                "step",
                "rank",
                "size",
                "memory",
                "disk",
                "peers",
                "object-store",
                "restorable"
            ]
        );
        assert_eq!(
            lines[1],
            [
                "llm", "7", "1", "2.0", "KiB", "durable", "-", "1/2", "FAILED", "yes"
            ]
        );
        assert!(text.contains("peers holding it: node-b"), "{text}");
        assert!(text.contains("node-c: full"), "{text}");
        // Why a tier's copy failed is under the row, named by its tier.
        assert_eq!(
            lines[3],
            [
                "object-store:",
                "needs",
                "attention",
                "after",
                "10",
                "failed",
                "attempts:",
                "bucket",
                "said",
                "403"
            ]
        );
        let json: serde_json::Value =
            serde_json::from_str(&printed(listing(&[]), true)).expect("JSON");
        assert_eq!(
            json["jobs"][0]["steps"][0]["shards"][0]["problems"]["object-store"],
            "needs attention after 10 failed attempts: bucket said 403"
        );
    }

    #[test]
    fn a_partial_listing_says_what_it_left_out_in_text_and_json() {
        let text = printed(listing(&["peer node-b: unreachable"]), false);
        assert!(
            text.starts_with("partial view: peer node-b: unreachable\n"),
            "{text}"
        );
        assert!(text.contains("node-b (unreachable)"), "{text}");
        let empty = pb::ListStepsResponse {
            jobs: Vec::new(),
            left_out: vec!["the object store: timed out".into()],
        };
        assert!(printed(empty, false).ends_with("no checkpoints in what answered\n"));
        let json: serde_json::Value =
            serde_json::from_str(&printed(listing(&["peer node-b: unreachable"]), true))
                .expect("JSON");
        assert_eq!(json["left_out"][0], "peer node-b: unreachable");
        assert_eq!(
            json["jobs"][0]["steps"][0]["shards"][0]["tiers"]["object-store"],
            "FAILED"
        );
        assert_eq!(
            json["jobs"][0]["steps"][0]["shards"][0]["peer_holders"][0],
            "node-b"
        );
    }
}
