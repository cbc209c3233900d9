//! `placement-sim`: how well replica placement spreads load and how little
//! it moves when the membership changes, on a simulated cluster.
//!
//! For each replica count and shard count it places every shard on the
//! cluster, and the first `--moves` shards also on the cluster plus one
//! joining node and on the cluster less one leaving node. It prints
//!
//! - max/mean replicas per node, next to the same figure for ideal uniform
//!   random placement of as many replicas (balls into bins), which no
//!   stateless placement can beat;
//! - the fraction of replicas that moved on the join and on the leave
//!   (goal <= 2/N), and how many of them moved anywhere else than onto the
//!   joining node or off the leaving one (must be 0);
//! - the time of one placement call, on one thread.
//!
//! Shards are `jobs x 8 ranks`; the 8 ranks of a job run on one node (8 GPUs)
//! and that node owns them. Nodes are spread round-robin over
//! `zones x racks-per-zone` racks.
//!
//! Usage: `placement-sim [--quick] [--nodes N] [--shards S,S..] [--moves M]
//! [--replicas R,R..]`.

use std::collections::{BTreeSet, HashMap};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use cairn_core::{Member, Membership, NodeId, PlacementKey, Rank};
use clap::Parser;

/// Ranks per job: one node's GPUs.
const RANKS_PER_JOB: u64 = 8;

#[derive(Parser)]
#[command(about = "Simulates replica placement: load balance and movement on join and leave")]
struct Args {
    /// 1,000 nodes and small shard counts: a smoke run of a few seconds.
    #[arg(long)]
    quick: bool,
    /// Nodes in the cluster (default 10,000, or 1,000 with --quick).
    #[arg(long)]
    nodes: Option<usize>,
    /// Shard counts to simulate, comma-separated (default 16000,10000000, or
    /// 16000,400000 with --quick). Rounded up to whole jobs of 8 ranks.
    #[arg(long, value_delimiter = ',')]
    shards: Vec<u64>,
    /// Shards placed three times to measure movement on join and leave
    /// (default 400,000, or 40,000 with --quick; at most the shard count).
    #[arg(long)]
    moves: Option<u64>,
    /// Replica counts to simulate, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [2, 3])]
    replicas: Vec<usize>,
    /// Zones in the cluster.
    #[arg(long, default_value_t = 4)]
    zones: usize,
    /// Racks in each zone (default 25, or 5 with --quick).
    #[arg(long)]
    racks_per_zone: Option<usize>,
    /// Worker threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
}

/// The simulated cluster, plus the node that joins.
struct Cluster {
    members: Vec<Member>,
    joiner: Member,
    /// Every node id, the joiner's included, to a dense index.
    index: HashMap<NodeId, usize>,
}

impl Cluster {
    fn new(nodes: usize, zones: usize, racks_per_zone: usize) -> Result<Self> {
        let member = |i: usize| -> Result<Member> {
            let id: NodeId = format!("node-{i:05}").parse()?;
            Ok(Member::new(id)
                .with_zone(format!("zone-{}", i % zones))
                .with_rack(format!("rack-{}", (i / zones) % racks_per_zone)))
        };
        let members = (0..nodes).map(member).collect::<Result<Vec<_>>>()?;
        let joiner = member(nodes)?;
        let index = members
            .iter()
            .chain([&joiner])
            .enumerate()
            .map(|(i, m)| (m.id.clone(), i))
            .collect();
        Ok(Self {
            members,
            joiner,
            index,
        })
    }

    /// The node that owns shard `shard` (all ranks of a job on one node).
    fn owner(&self, shard: u64) -> &Member {
        let job = shard / RANKS_PER_JOB;
        &self.members[(job % self.members.len() as u64) as usize]
    }
}

fn placement_key(shard: u64) -> Result<PlacementKey> {
    Ok(PlacementKey {
        tenant: "sim".parse()?,
        job: format!("job-{}", shard / RANKS_PER_JOB).parse()?,
        rank: Rank((shard % RANKS_PER_JOB) as u32),
    })
}

/// What one worker counted over its share of the shards.
#[derive(Default)]
struct Tally {
    /// Replicas per node on the original cluster.
    load: Vec<u64>,
    /// Replicas of the shards placed three times.
    moves_placed: u64,
    /// Replicas now on a node that did not hold them, after the join.
    join_moved: u64,
    /// Of those, replicas that went elsewhere than to the joiner.
    join_stray: u64,
    /// Replicas now on a node that did not hold them, after the leave.
    leave_moved: u64,
    /// Replicas that left a node other than the leaver.
    leave_stray: u64,
}

struct Memberships {
    base: Membership,
    joined: Membership,
    left: Membership,
    leaver: NodeId,
}

fn tally(
    cluster: &Cluster,
    sets: &Memberships,
    shards: std::ops::Range<u64>,
    moves: u64,
    replicas: usize,
) -> Result<Tally> {
    let mut tally = Tally {
        load: vec![0; cluster.index.len()],
        ..Tally::default()
    };
    for shard in shards {
        let key = placement_key(shard)?;
        let owner = cluster.owner(shard);
        let base: BTreeSet<NodeId> = sets.base.place(&key, owner, replicas).into_iter().collect();
        for id in &base {
            tally.load[cluster.index[id]] += 1;
        }
        if shard >= moves {
            continue;
        }
        tally.moves_placed += base.len() as u64;
        let joined: BTreeSet<NodeId> = sets
            .joined
            .place(&key, owner, replicas)
            .into_iter()
            .collect();
        for id in joined.difference(&base) {
            tally.join_moved += 1;
            tally.join_stray += u64::from(*id != cluster.joiner.id);
        }
        let left: BTreeSet<NodeId> = sets.left.place(&key, owner, replicas).into_iter().collect();
        tally.leave_moved += left.difference(&base).count() as u64;
        tally.leave_stray += base
            .difference(&left)
            .filter(|id| **id != sets.leaver)
            .count() as u64;
    }
    Ok(tally)
}

/// Max/mean of `balls` thrown uniformly at random into `bins`: the figure
/// ideal stateless placement would reach. SplitMix64, fixed seed.
fn ideal_max_over_mean(balls: u64, bins: usize) -> f64 {
    let mut state = 0x5eed_u64;
    let mut load = vec![0u64; bins];
    for _ in 0..balls {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        load[((z as u128 * bins as u128) >> 64) as usize] += 1;
    }
    let max = load.iter().copied().max().unwrap_or(0);
    max as f64 * bins as f64 / balls as f64
}

fn simulate(
    cluster: &Cluster,
    sets: &Memberships,
    shards: u64,
    moves: u64,
    replicas: usize,
    threads: usize,
) -> Result<()> {
    let nodes = cluster.members.len();

    // One placement call on one thread, before the workers start.
    let sample = shards.min(100_000);
    let keys = (0..sample).map(placement_key).collect::<Result<Vec<_>>>()?;
    let started = Instant::now();
    for (shard, key) in (0..sample).zip(&keys) {
        std::hint::black_box(sets.base.place(key, cluster.owner(shard), replicas));
    }
    let per_call = started.elapsed().as_secs_f64() / sample as f64;

    let started = Instant::now();
    let per_thread = shards.div_ceil(threads as u64);
    let tallies = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads as u64)
            .map(|t| {
                let range = (t * per_thread).min(shards)..((t + 1) * per_thread).min(shards);
                scope.spawn(move || tally(cluster, sets, range, moves, replicas))
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
            .collect::<Result<Vec<_>>>()
    })?;
    let elapsed = started.elapsed();
    let mut total = Tally {
        load: vec![0; cluster.index.len()],
        ..Tally::default()
    };
    for t in tallies {
        for (sum, load) in total.load.iter_mut().zip(&t.load) {
            *sum += load;
        }
        total.moves_placed += t.moves_placed;
        total.join_moved += t.join_moved;
        total.join_stray += t.join_stray;
        total.leave_moved += t.leave_moved;
        total.leave_stray += t.leave_stray;
    }

    let placed: u64 = total.load.iter().sum();
    if placed != shards * replicas as u64 {
        bail!(
            "placed {placed} replicas, expected {}",
            shards * replicas as u64
        );
    }
    let loads = &total.load[..nodes]; // the joiner holds nothing here
    let mean = placed as f64 / nodes as f64;
    let max = loads.iter().copied().max().unwrap_or(0);
    let min = loads.iter().copied().min().unwrap_or(0);
    let goal = 2.0 / nodes as f64;
    println!(
        "R={replicas} shards={shards} ({} jobs x {RANKS_PER_JOB} ranks)",
        shards / RANKS_PER_JOB
    );
    println!(
        "  load: mean {mean:.1} replicas/node, min {min}, max {max}, max/mean {:.3} \
         (ideal random placement: {:.3}; goal <= 1.10)",
        max as f64 / mean,
        ideal_max_over_mean(placed, nodes),
    );
    println!(
        "  join:  moved {:.6} of the {} replicas of the first {moves} shards (goal <= {goal:.6}), \
         {} not onto the new node",
        total.join_moved as f64 / total.moves_placed as f64,
        total.moves_placed,
        total.join_stray,
    );
    println!(
        "  leave: moved {:.6} of the same (goal <= {goal:.6}), {} off nodes that stayed",
        total.leave_moved as f64 / total.moves_placed as f64,
        total.leave_stray,
    );
    println!(
        "  time: {:.2} us per place() call on one thread; {:.1} s for {} calls on {threads} threads",
        per_call * 1e6,
        elapsed.as_secs_f64(),
        shards + 2 * moves,
    );
    Ok(())
}

fn main() -> Result<()> {
    let args = Args::parse();
    let nodes = args
        .nodes
        .unwrap_or(if args.quick { 1_000 } else { 10_000 });
    let racks_per_zone = args
        .racks_per_zone
        .unwrap_or(if args.quick { 5 } else { 25 });
    let shards = if args.shards.is_empty() {
        if args.quick {
            vec![16_000, 200_000]
        } else {
            vec![16_000, 10_000_000]
        }
    } else {
        args.shards.clone()
    };
    let threads = args.threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    if nodes < 2 || args.zones == 0 || racks_per_zone == 0 || threads == 0 {
        bail!("need at least 2 nodes, 1 zone, 1 rack per zone and 1 thread");
    }

    let cluster = Cluster::new(nodes, args.zones, racks_per_zone)?;
    let leaver = cluster.members[nodes / 2].clone();
    let sets = Memberships {
        base: Membership::new(cluster.members.clone())?,
        joined: Membership::new(
            cluster
                .members
                .iter()
                .chain([&cluster.joiner])
                .cloned()
                .collect(),
        )?,
        left: Membership::new(
            cluster
                .members
                .iter()
                .filter(|m| m.id != leaver.id)
                .cloned()
                .collect(),
        )
        .context("building the membership without the leaver")?,
        leaver: leaver.id,
    };
    println!(
        "placement-sim: {nodes} nodes in {} zones x {racks_per_zone} racks, weight 1, \
         {threads} threads; joiner {} (zone {}), leaver {}",
        args.zones,
        cluster.joiner.id,
        cluster.joiner.zone.as_deref().unwrap_or("-"),
        sets.leaver,
    );
    for &replicas in &args.replicas {
        for &count in &shards {
            let count = count.div_ceil(RANKS_PER_JOB) * RANKS_PER_JOB;
            let moves = args
                .moves
                .unwrap_or(if args.quick { 40_000 } else { 400_000 })
                .min(count);
            simulate(&cluster, &sets, count, moves, replicas, threads)?;
        }
    }
    Ok(())
}
