//! `cairn status`: the node, or one job's steps and where each shard lives.

use super::*;

/// Where each shard of a job lives: per step, whether every rank can be
/// restored and from where, newest step first.
pub(crate) async fn job_status(
    clients: &mut Clients,
    tenant: &str,
    job: String,
    json: bool,
) -> Result<(), Failure> {
    let resp = list_steps(clients, tenant, &job).await?;
    print_job_status(&mut std::io::stdout().lock(), &job, resp, json)
}

/// `cairn status --job`, from the job's `ListSteps` answer.
pub(crate) fn print_job_status(
    out: &mut dyn Write,
    job: &str,
    resp: pb::ListStepsResponse,
    json: bool,
) -> Result<(), Failure> {
    let left_out = resp.left_out.clone();
    let Some(steps) = resp
        .jobs
        .into_iter()
        .find(|j| j.job == job)
        .map(|j| j.steps)
    else {
        if !left_out.is_empty() {
            return Err(fail(
                EXIT_TIER_UNREACHABLE,
                format!(
                    "job {job} has no checkpoint in what answered; left out: {}",
                    left_out.join("; ")
                ),
            ));
        }
        return Err(fail(
            4,
            format!("job {job} has no checkpoint this node can see"),
        ));
    };
    let latest = steps.iter().filter(|s| s.restorable).map(|s| s.step).max();
    let places = |r: &pb::ShardStatus| -> Vec<String> {
        let mut places: Vec<String> = r
            .tiers
            .iter()
            .filter(|t| {
                t.state == pb::ShardState::Durable as i32 && t.tier != pb::Tier::Peers as i32
            })
            .map(|t| tier_name(t.tier).to_owned())
            .collect();
        places.extend(
            r.peer_holders
                .iter()
                .map(|h| format!("peer {h}{}", unreachable_mark(&left_out, h))),
        );
        places
    };
    if json {
        let steps: Vec<_> = steps
            .iter()
            .rev()
            .map(|s| {
                let ranks: Vec<_> = s
                    .shards
                    .iter()
                    .map(|r| json!({"rank": r.rank, "bytes": r.total_bytes, "world_size": r.world_size, "in": places(r)}))
                    .collect();
                json!({"step": s.step, "restorable": s.restorable,
                       "object_store_complete": s.object_store_complete, "ranks": ranks})
            })
            .collect();
        writeln!(
            out,
            "{}",
            json!({"job": job, "latest_restorable": latest, "steps": steps, "left_out": left_out})
        )?;
        return Ok(());
    }
    print_left_out(out, &left_out)?;
    match latest {
        Some(step) => writeln!(out, "job {job}: latest restorable step {step}")?,
        None if left_out.is_empty() => writeln!(
            out,
            "job {job}: no step is restorable (some rank is missing from every step)"
        )?,
        None => writeln!(
            out,
            "job {job}: no step is restorable from what answered (the view is partial, see above)"
        )?,
    }
    for s in steps.iter().rev() {
        writeln!(
            out,
            "step {} — {}",
            s.step,
            if s.restorable {
                "restorable"
            } else {
                "NOT restorable"
            }
        )?;
        for r in &s.shards {
            let places = places(r);
            writeln!(
                out,
                "  rank {:>4} {:>10}  {}",
                r.rank,
                human_bytes(r.total_bytes),
                if places.is_empty() {
                    "nowhere durable yet".to_owned()
                } else {
                    places.join(", ")
                }
            )?;
        }
    }
    Ok(())
}

pub(crate) async fn status(clients: &mut Clients, json: bool) -> Result<(), Failure> {
    let s = clients
        .admin
        .status(pb::StatusRequest {})
        .await?
        .into_inner();
    print_status(&mut std::io::stdout().lock(), &s, json)
}

/// `cairn status` of the node, from its `Status` answer.
pub(crate) fn print_status(
    out: &mut dyn Write,
    s: &pb::StatusResponse,
    json: bool,
) -> Result<(), Failure> {
    if json {
        let tiers: Vec<_> = s
            .tiers
            .iter()
            .map(|t| json!({"tier": tier_name(t.tier), "path": t.path, "used_bytes": t.used_bytes, "capacity_bytes": t.capacity_bytes, "shards": t.shards}))
            .collect();
        let peers = s.peers.as_ref().map(|p| {
            let members: Vec<_> = p
                .members
                .iter()
                .map(|m| json!({"node_id": m.node_id, "address": m.address, "zone": m.zone, "rack": m.rack,
                                "unreachable": m.unreachable, "last_contact_unix_ms": m.last_contact_unix_ms,
                                "holds_shards": m.holds_shards}))
                .collect();
            json!({"node_id": p.node_id, "replicas": p.replicas, "membership_source": p.membership_source,
                   "members": members, "pending_replications": p.pending_replications,
                   "under_replicated_shards": p.under_replicated_shards, "replica_shards": p.replica_shards,
                   "replica_bytes": p.replica_bytes, "insecure": p.insecure,
                   "membership_problem": p.membership_problem,
                   "scrub": {"passes": p.scrub_passes, "checked_chunks": p.scrub_checked_chunks,
                             "pass_chunks": p.scrub_pass_chunks, "bad_chunks": p.scrub_bad_chunks,
                             "bytes_per_sec": p.scrub_bytes_per_sec}})
        });
        let restores: Vec<_> = s
            .restores
            .iter()
            .map(|r| {
                let shard = r.shard.clone().unwrap_or_default();
                json!({"tenant": shard.tenant, "job": shard.job, "step": shard.step, "rank": shard.rank,
                       "total_bytes": r.total_bytes, "done_bytes": r.done_bytes,
                       "sources": sources_json(&progress_sources(r)),
                       "elapsed_seconds": r.elapsed_seconds})
            })
            .collect();
        let pipelines: Vec<_> = s
            .pipelines
            .iter()
            .map(|p| {
                json!({"name": p.name, "pending": p.pending, "retrying": p.retrying,
                            "needs_attention": p.needs_attention, "durable": p.durable})
            })
            .collect();
        writeln!(
            out,
            "{}",
            json!({"node": s.node, "version": s.version, "default_tenant": s.default_tenant, "metrics_addr": s.metrics_addr,
                   "open_sessions": s.open_sessions, "pending_writebacks": s.pending_writebacks,
                   "pending_uploads": s.pending_uploads, "pipelines": pipelines, "tiers": tiers, "peers": peers,
                   "restores": restores})
        )?;
        return peer_tier_up(s);
    }
    writeln!(
        out,
        "node {} (cairnd {}), default tenant {}",
        s.node, s.version, s.default_tenant
    )?;
    writeln!(
        out,
        "open sessions {}, pending write-backs {}, pending uploads {}",
        s.open_sessions, s.pending_writebacks, s.pending_uploads
    )?;
    if !s.pipelines.is_empty() {
        writeln!(out, "pipelines: {}", pipeline_summary(&s.pipelines))?;
    }
    writeln!(
        out,
        "{:<12} {:>12} {:>12} {:>8}  path",
        "tier", "used", "capacity", "shards"
    )?;
    for t in &s.tiers {
        let capacity = if t.capacity_bytes == 0 {
            "-".into()
        } else {
            human_bytes(t.capacity_bytes)
        };
        writeln!(
            out,
            "{:<12} {:>12} {:>12} {:>8}  {}",
            tier_name(t.tier),
            human_bytes(t.used_bytes),
            capacity,
            t.shards,
            t.path
        )?;
    }
    for r in &s.restores {
        let shard = r.shard.clone().unwrap_or_default();
        let from = progress_sources(r);
        writeln!(
            out,
            "restoring {} step {} rank {}: {} of {} ({:.0} s){}{}",
            shard.job,
            shard.step,
            shard.rank,
            human_bytes(r.done_bytes),
            human_bytes(r.total_bytes),
            r.elapsed_seconds,
            if from.is_empty() { "" } else { "; " },
            bytes_from(&from)
        )?;
    }
    if let Some(p) = &s.peers {
        writeln!(
            out,
            "peer tier: node id {}, {} replica(s) per shard, membership from {}{}",
            p.node_id,
            p.replicas,
            p.membership_source,
            if p.insecure {
                ", WITHOUT TLS"
            } else {
                ", mutual TLS"
            }
        )?;
        if !p.membership_problem.is_empty() {
            writeln!(out, "  DOWN: {}", p.membership_problem)?;
        }
        writeln!(
            out,
            "  replicating {} shard(s), {} short of replicas; holding {} replica(s) ({}) for other nodes",
            p.pending_replications,
            p.under_replicated_shards,
            p.replica_shards,
            human_bytes(p.replica_bytes)
        )?;
        if p.scrub_bytes_per_sec == 0 {
            writeln!(out, "  scrubbing of held replicas: off")?;
        } else {
            writeln!(
                out,
                "  scrubbing of held replicas: {} pass(es) done, {}/{} chunks of this pass, {} bad chunk(s) found, at most {}/s",
                p.scrub_passes,
                p.scrub_checked_chunks,
                p.scrub_pass_chunks,
                p.scrub_bad_chunks,
                human_bytes(p.scrub_bytes_per_sec)
            )?;
        }
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        for m in &p.members {
            let domain = match (m.zone.as_str(), m.rack.as_str()) {
                ("", "") => String::new(),
                (zone, rack) => format!(" zone={zone} rack={rack}"),
            };
            let health = if m.node_id == p.node_id {
                " (this node)".to_owned()
            } else {
                let contact = match m.last_contact_unix_ms {
                    0 => "no contact yet".to_owned(),
                    at => format!("last answered {} s ago", now_ms.saturating_sub(at) / 1000),
                };
                format!(
                    ": {}, {contact}, holds {} of this node's shards",
                    if m.unreachable {
                        "UNREACHABLE"
                    } else {
                        "reachable"
                    },
                    m.holds_shards
                )
            };
            writeln!(
                out,
                "  member {} at {}{}{}",
                m.node_id, m.address, domain, health
            )?;
        }
    }
    peer_tier_up(s)
}

/// One line for the background pipelines: what each has pending, retrying
/// and, loudly, what needs attention.
fn pipeline_summary(pipelines: &[pb::PipelineStatus]) -> String {
    pipelines
        .iter()
        .map(|p| {
            let mut parts = vec![format!("{} pending", p.pending)];
            if p.retrying > 0 {
                parts.push(format!("{} retrying", p.retrying));
            }
            if p.needs_attention > 0 {
                parts.push(format!(
                    "{} NEED ATTENTION (cairn list shows why)",
                    p.needs_attention
                ));
            }
            if p.durable > 0 {
                parts.push(format!("{} durable", p.durable));
            }
            format!("{} {}", p.name, parts.join(", "))
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Fails (exit 6) when the node's peer tier is down, so that `cairn
/// status`, the DaemonSet's readiness probe, reports it.
pub(crate) fn peer_tier_up(s: &pb::StatusResponse) -> Result<(), Failure> {
    match s.peers.as_ref().map(|p| p.membership_problem.as_str()) {
        Some(problem) if !problem.is_empty() => Err(fail(
            EXIT_TIER_UNREACHABLE,
            format!("the peer tier is down: {problem}"),
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shard(rank: u32, tiers: &[(pb::Tier, pb::ShardState)], holders: &[&str]) -> pb::ShardStatus {
        pb::ShardStatus {
            rank,
            total_bytes: 3 * 1024 * 1024,
            world_size: Some(2),
            tiers: tiers
                .iter()
                .map(|(tier, state)| pb::TierState {
                    tier: *tier as i32,
                    state: *state as i32,
                    problem: String::new(),
                })
                .collect(),
            peer_holders: holders.iter().map(|h| h.to_string()).collect(),
            ..Default::default()
        }
    }

    fn job(steps: Vec<pb::StepStatus>, left_out: &[&str]) -> pb::ListStepsResponse {
        pb::ListStepsResponse {
            jobs: vec![pb::JobSteps {
                job: "llm".into(),
                steps,
            }],
            left_out: left_out.iter().map(|l| l.to_string()).collect(),
        }
    }

    fn printed(
        print: impl FnOnce(&mut dyn Write) -> Result<(), Failure>,
    ) -> Result<String, Failure> {
        let mut out = Vec::new();
        print(&mut out)?;
        Ok(String::from_utf8(out).expect("utf-8"))
    }

    #[test]
    fn a_job_shows_the_latest_restorable_step_and_where_each_rank_lives() {
        use pb::ShardState::{Durable, Pending};
        use pb::Tier::{Disk, Memory, ObjectStore};
        let steps = vec![
            pb::StepStatus {
                step: 9,
                restorable: true,
                shards: vec![
                    shard(0, &[(Memory, Durable), (Disk, Durable)], &["node-b"]),
                    shard(1, &[(Memory, Durable), (ObjectStore, Pending)], &[]),
                ],
                ..Default::default()
            },
            pb::StepStatus {
                step: 10,
                restorable: false,
                shards: vec![shard(0, &[(Memory, Pending)], &[])],
                ..Default::default()
            },
        ];
        let text =
            printed(|out| print_job_status(out, "llm", job(steps, &[]), false)).expect("printed");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines,
            [
                "job llm: latest restorable step 9",
                "step 10 — NOT restorable",
                "  rank    0    3.0 MiB  nowhere durable yet",
                "step 9 — restorable",
                "  rank    0    3.0 MiB  memory, disk, peer node-b",
                "  rank    1    3.0 MiB  memory",
            ]
        );
    }

    #[test]
    fn a_partial_view_is_labelled_and_never_called_unrestorable() {
        let steps = vec![pb::StepStatus {
            step: 4,
            restorable: false,
            shards: vec![shard(0, &[], &["node-c"])],
            ..Default::default()
        }];
        let left_out = ["peer node-c: unreachable", "the object store: timed out"];
        let text =
            printed(|out| print_job_status(out, "llm", job(steps.clone(), &left_out), false))
                .expect("printed");
        assert!(text.starts_with("partial view: peer node-c: unreachable\npartial view: the object store: timed out\n"), "{text}");
        assert!(
            text.contains("no step is restorable from what answered (the view is partial"),
            "{text}"
        );
        assert!(
            !text.contains("some rank is missing from every step"),
            "{text}"
        );
        assert!(text.contains("peer node-c (unreachable)"), "{text}");

        let json: serde_json::Value = serde_json::from_str(
            &printed(|out| print_job_status(out, "llm", job(steps, &left_out), true))
                .expect("printed"),
        )
        .expect("one JSON document");
        assert_eq!(json["latest_restorable"], serde_json::Value::Null);
        assert_eq!(json["left_out"][0], "peer node-c: unreachable");
        assert_eq!(
            json["steps"][0]["ranks"][0]["in"][0],
            "peer node-c (unreachable)"
        );
    }

    #[test]
    fn a_job_nobody_answered_for_exits_6_and_one_nobody_has_exits_4() {
        let empty = pb::ListStepsResponse::default();
        let unknown =
            printed(|out| print_job_status(out, "llm", empty.clone(), false)).expect_err("fails");
        assert_eq!(unknown.code, 4);
        assert!(
            unknown.message.contains("job llm has no checkpoint"),
            "{}",
            unknown.message
        );
        let partial = pb::ListStepsResponse {
            left_out: vec!["the object store: timed out".into()],
            ..empty
        };
        let unreachable =
            printed(|out| print_job_status(out, "llm", partial, false)).expect_err("fails");
        assert_eq!(unreachable.code, EXIT_TIER_UNREACHABLE);
        assert!(
            unreachable
                .message
                .contains("left out: the object store: timed out")
        );
    }

    #[test]
    fn a_node_whose_peer_tier_is_down_says_so_and_exits_6() {
        let status = pb::StatusResponse {
            node: "node-a".into(),
            peers: Some(pb::PeerTierStatus {
                node_id: "node-a".into(),
                replicas: 2,
                membership_source: "kubernetes".into(),
                membership_problem: "cannot reach the API server".into(),
                members: vec![pb::PeerMember {
                    node_id: "node-b".into(),
                    address: "10.0.0.2:7070".into(),
                    unreachable: true,
                    holds_shards: 3,
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut out = Vec::new();
        let failure = print_status(&mut out, &status, false).expect_err("exit 6");
        assert_eq!(failure.code, EXIT_TIER_UNREACHABLE);
        assert!(failure.message.contains("cannot reach the API server"));
        let text = String::from_utf8(out).expect("utf-8");
        assert!(text.contains("DOWN: cannot reach the API server"), "{text}");
        assert!(text.contains("member node-b at 10.0.0.2:7070"), "{text}");
        assert!(text.contains("UNREACHABLE"), "{text}");

        let healthy = pb::StatusResponse {
            peers: None,
            ..status
        };
        let text = printed(|out| print_status(out, &healthy, true)).expect("exit 0");
        let json: serde_json::Value = serde_json::from_str(&text).expect("one JSON document");
        assert_eq!(json["node"], "node-a");
    }

    #[test]
    fn status_names_each_pipeline_and_what_needs_attention() {
        let status = pb::StatusResponse {
            node: "node-a".into(),
            pipelines: vec![
                pb::PipelineStatus {
                    name: "write-back".into(),
                    ..Default::default()
                },
                pb::PipelineStatus {
                    name: "upload".into(),
                    pending: 2,
                    retrying: 1,
                    needs_attention: 3,
                    durable: 0,
                },
                pb::PipelineStatus {
                    name: "replication".into(),
                    pending: 1,
                    durable: 9,
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let text = printed(|out| print_status(out, &status, false)).expect("exit 0");
        assert!(
            text.contains(
                "pipelines: write-back 0 pending; upload 2 pending, 1 retrying, \
                 3 NEED ATTENTION (cairn list shows why); replication 1 pending, 9 durable\n"
            ),
            "{text}"
        );
        let json: serde_json::Value =
            serde_json::from_str(&printed(|out| print_status(out, &status, true)).expect("exit 0"))
                .expect("JSON");
        assert_eq!(json["pipelines"][1]["name"], "upload");
        assert_eq!(json["pipelines"][1]["needs_attention"], 3);
    }
}
