//! Several operator replicas split the locks: every lock is owned by exactly one live replica,
//! the load is balanced, a graceful leave or an abrupt death of a replica moves only its locks.
//! On kubesim or a real control plane (`tests/common`). Every test ends by checking, from a
//! record the operator did not write (kubesim's commit log, or the apiserver's audit log and
//! the harness's own lock watch), that only a lock's owner at the time wrote for it.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on setup failures

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use kube::ResourceExt;
use kube::api::ListParams;
use serde_json::json;

mod common;
use common::{Env, Options, assert_only_owners_wrote, call, lock_owners};

/// An environment without operators that records each lock's owner over time.
async fn env(partitionable: bool) -> Env {
    Env::start_with(Options {
        replicas: 0,
        record_owners: true,
        partitionable,
        ..Options::default()
    })
    .await
}

/// Starts replica `id` with a membership Lease of `membership_secs`.
async fn start(env: &mut Env, id: &str, membership_secs: u64) {
    let args = env.operator_args_with(id, |a| a.membership_lease_seconds = membership_secs);
    env.start_operator_with(id, args).await;
}

/// StatefulSets `s{i}` of one pod, locks `l{i}` with Leases `lease{i}`.
async fn fleet(env: &Env, n: usize, lease_seconds: i32) {
    for i in 0..n {
        env.statefulset(&format!("s{i}"), 1).await;
        env.lock(
            &format!("l{i}"),
            &format!("s{i}"),
            &format!("lease{i}"),
            lease_seconds,
            json!({}),
        )
        .await;
    }
}

/// Owner label of every lock (None when unlabelled).
async fn owners(env: &Env) -> BTreeMap<String, Option<String>> {
    lock_owners(&env.locks()).await
}

async fn until_owned_by(
    env: &Env,
    live: &HashSet<String>,
    secs: u64,
) -> (BTreeMap<String, Option<String>>, Duration) {
    let start = Instant::now();
    loop {
        let o = owners(env).await;
        // Every lock owned by a live replica, and every live replica owning at least half its
        // share (a replica that just joined is not yet seen by its peers: the locks are all
        // owned by live replicas before its handoffs have even started).
        let c = counts(&o);
        let fair = o.len() / (2 * live.len().max(1));
        if o.values()
            .all(|v| v.as_ref().is_some_and(|v| live.contains(v)))
            && live.iter().all(|r| c.get(r).copied().unwrap_or(0) >= fair)
        {
            // Stable for a moment: no more handoffs in flight. The time returned is when this
            // ownership was first seen, not the end of the quiet time that confirms it.
            let met = start.elapsed();
            tokio::time::sleep(Duration::from_millis(700)).await;
            let again = owners(env).await;
            if again == o {
                return (o, met);
            }
        }
        if start.elapsed() >= Duration::from_secs(secs) {
            panic!(
                "locks not all owned by {live:?} after {secs}s: {:?}; membership Leases: {:#?}; writes in that time: {:#?}",
                counts(&o),
                membership(env).await,
                write_summary(env, secs)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until every lock is owned as the ring of `live` assigns it (what `stslock` computes
/// from its membership: [`stslock_shard::Ring`] over the sorted ids, keyed by
/// `namespace/name`), unchanged for a moment. Unlike [`until_owned_by`], no handoff is left
/// to do when it returns, so later snapshots compare against the settled assignment rather
/// than one taken mid-rebalance.
async fn until_assigned(
    env: &Env,
    live: &HashSet<String>,
    secs: u64,
) -> BTreeMap<String, Option<String>> {
    until_settled(env, live, secs, "the ring", |ring, locks| {
        locks
            .iter()
            .map(|(k, _)| ring.owner(k).unwrap_or_default().to_string())
            .collect()
    })
    .await
}

/// Waits until the locks sit where bounded loads put them on the ring of `live` (what
/// `--placement bounded` computes: [`stslock_shard::balance::assign`] over the owner labels,
/// keyed by `namespace/name`) — a fixpoint: applied to the labels, it moves nothing — and stay
/// so for a moment.
async fn until_placed(
    env: &Env,
    live: &HashSet<String>,
    secs: u64,
) -> BTreeMap<String, Option<String>> {
    until_settled(env, live, secs, "bounded loads", |ring, locks| {
        let locks: Vec<(&str, Option<&str>)> = locks
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_deref()))
            .collect();
        stslock_shard::balance::assign(ring, &locks, stslock_shard::balance::EPSILON)
            .into_iter()
            .map(|i| ring.members()[i].clone())
            .collect()
    })
    .await
}

/// Waits until every lock's owner is the one `place` gives it on the ring of `live` (from the
/// locks keyed `namespace/name` with their owner labels), unchanged for a moment.
async fn until_settled(
    env: &Env,
    live: &HashSet<String>,
    secs: u64,
    how: &str,
    place: impl Fn(&stslock_shard::Ring, &[(String, Option<String>)]) -> Vec<String>,
) -> BTreeMap<String, Option<String>> {
    let mut members: Vec<String> = live.iter().cloned().collect();
    members.sort();
    let ring = stslock_shard::Ring::new(&members);
    let start = Instant::now();
    loop {
        let o = owners(env).await;
        let keyed: Vec<(String, Option<String>)> = o
            .iter()
            .map(|(name, owner)| (format!("{}/{name}", env.ns), owner.clone()))
            .collect();
        let want = place(&ring, &keyed);
        let misplaced = keyed
            .iter()
            .zip(&want)
            .filter(|((_, owner), want)| owner.as_deref() != Some(want.as_str()))
            .count();
        if misplaced == 0 {
            tokio::time::sleep(Duration::from_millis(300)).await;
            if owners(env).await == o {
                return o;
            }
        }
        if start.elapsed() >= Duration::from_secs(secs) {
            panic!(
                "{misplaced} locks not where {how} on {live:?} puts them after {secs}s: {:?}; membership Leases: {:#?}",
                counts(&o),
                membership(env).await,
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The membership Leases (name, holder, renewed, annotations), for failure messages.
async fn membership(env: &Env) -> Vec<String> {
    let leases = call("list leases", env.leases().list(&ListParams::default()))
        .await
        .unwrap();
    leases
        .items
        .iter()
        .filter(|l| !l.name_any().starts_with("lease"))
        .map(|l| {
            let spec = l.spec.clone().unwrap_or_default();
            format!(
                "{} held by {:?} renewed {:?} for {:?} s {:?}",
                l.name_any(),
                spec.holder_identity,
                spec.renew_time.map(|t| t.0.to_string()),
                spec.lease_duration_seconds,
                l.annotations()
            )
        })
        .collect()
}

/// Writes of the last `secs` seconds by actor, verb and resource: how many, and how long
/// the API server took to answer them (median and 90th percentile, real cluster only).
fn write_summary(env: &Env, secs: u64) -> Vec<String> {
    let since = env.elapsed_ms().saturating_sub(secs * 1000);
    // (actor, verb, resource, code) → (when, how long the answer took).
    type Group = (String, String, String, u16);
    let mut by: BTreeMap<Group, Vec<(u64, i64)>> = BTreeMap::new();
    for w in env.writes().iter().filter(|w| w.at_ms >= since) {
        let resource = if w.subresource.is_empty() {
            w.resource.clone()
        } else {
            format!("{}/{}", w.resource, w.subresource)
        };
        by.entry((w.actor.clone(), w.verb.clone(), resource, w.code))
            .or_default()
            .push((w.at_ms, w.completed_us - w.received_us));
    }
    by.into_iter()
        .map(|((actor, verb, resource, code), writes)| {
            let mut took: Vec<i64> = writes.iter().map(|(_, t)| *t).collect();
            took.sort_unstable();
            let q = |p: usize| took[(took.len() - 1) * p / 100] / 1000;
            let first = writes.iter().map(|(at, _)| *at).min().unwrap_or(0);
            let last = writes.iter().map(|(at, _)| *at).max().unwrap_or(0);
            format!(
                "{actor} {verb} {resource} {code}: {} from {first} to {last} ms (answered in {} ms, p90 {} ms)",
                took.len(),
                q(50),
                q(90)
            )
        })
        .collect()
}

fn counts(o: &BTreeMap<String, Option<String>>) -> BTreeMap<String, usize> {
    let mut c = BTreeMap::new();
    for v in o.values().flatten() {
        *c.entry(v.clone()).or_default() += 1;
    }
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_split_1000_locks_and_rebalance() {
    let mut env = env(false).await;
    let n = 1000;
    fleet(&env, n, 30).await;
    for i in 0..3 {
        start(&mut env, &format!("r{i}"), 3).await;
    }
    let live: HashSet<String> = env.operator_ids().into_iter().collect();
    let (_, took) = until_owned_by(&env, &live, 60).await;
    let three = until_assigned(&env, &live, 30).await;
    let c = counts(&three);
    let max = *c.values().max().unwrap() as f64;
    let balance = max / (n as f64 / 3.0);
    println!("3 replicas, {n} locks: {c:?}, busiest/mean {balance:.3}, all owned after {took:?}");
    assert!(
        balance <= 1.15,
        "busiest replica owns {balance:.3}x the mean"
    );

    // A 4th replica joins: it takes about its share, nothing else moves.
    start(&mut env, "r3", 3).await;
    let live4: HashSet<String> = env.operator_ids().into_iter().collect();
    let four = until_assigned(&env, &live4, 60).await;
    let moved = three
        .iter()
        .filter(|(k, v)| four.get(*k) != Some(v))
        .count();
    println!("4th replica joined: {moved} of {n} locks moved");
    assert!(moved as f64 <= 1.3 / 4.0 * n as f64, "{moved} moved");
    assert!(
        three
            .iter()
            .filter(|(k, v)| four.get(*k) != Some(v))
            .all(|(k, _)| four[k].as_deref() == Some("r3"))
    );

    // r1 leaves gracefully: only its locks move, and quickly.
    let left_at = Instant::now();
    env.stop_operator("r1").await;
    println!("r1 stopped after {:?}", left_at.elapsed());
    let live3: HashSet<String> = env.operator_ids().into_iter().collect();
    until_owned_by(&env, &live3, 30).await;
    println!("graceful leave handed off in {:?}", left_at.elapsed());
    let after_leave = until_assigned(&env, &live3, 30).await;
    for (k, v) in &four {
        if v.as_deref() != Some("r1") {
            assert_eq!(
                after_leave.get(k),
                Some(v),
                "{k} moved although its owner stayed"
            );
        }
    }

    // r2 dies abruptly (no handoff, its membership Lease just stops being renewed): its locks
    // are owned again within the membership duration + 5 s.
    env.kill_operator("r2").await;
    let died = Instant::now();
    println!("r2 killed at {} ms", env.elapsed_ms());
    let live2: HashSet<String> = env.operator_ids().into_iter().collect();
    let waiting_from = died.elapsed();
    let (_, took) = until_owned_by(&env, &live2, 3 + 5 + 5).await;
    // From the kill to the first view with every lock owned by a live replica (confirmed
    // unchanged 700 ms later, which is not counted).
    let reowned = waiting_from + took;
    println!("abrupt death: all locks owned again after {reowned:?} (membership Lease 3 s)");
    assert!(reowned <= Duration::from_secs(3 + 5 + 1), "{reowned:?}");
    env.stop_operators().await;
    env.assert_never_two_writers().await;
    assert_only_owners_wrote(&env, "1000 locks, join, leave, death", n).await;
}

/// A replica cut off from the API (kubesim: partition by User-Agent; real cluster: the
/// harness's proxy in front of it drops its connections) stops writing; its peer takes its
/// locks only after that, and it rejoins cleanly when the partition heals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_replica_stops_writing_before_its_peer_takes_over() {
    let mut env = env(true).await;
    fleet(&env, 40, 30).await;
    start(&mut env, "r0", 3).await;
    start(&mut env, "r1", 3).await;
    let live: HashSet<String> = ["r0".to_string(), "r1".to_string()].into();
    let (before, _) = until_owned_by(&env, &live, 60).await;
    let r1_locks: Vec<String> = before
        .iter()
        .filter(|(_, v)| v.as_deref() == Some("r1"))
        .map(|(k, _)| k.clone())
        .collect();
    assert!(!r1_locks.is_empty());

    let cut_at = env.commit_log().last().map(|c| c.at_ms).unwrap_or(0);
    env.partition("r1").await;
    let only_r0: HashSet<String> = ["r0".to_string()].into();
    let (_, took) = until_owned_by(&env, &only_r0, 20).await;
    println!("partition: r0 owns all locks {took:?} after r1 was cut off");
    let log = env
        .commits_until(10, "r0's takeover of r1's locks", |log| {
            log.iter()
                .any(|c| {
                    c.actor == "stslock/r0"
                        && c.at_ms > cut_at
                        && c.resource == "statefulsetlocks"
                        && r1_locks.contains(&c.name)
                })
                .then(|| log.to_vec())
        })
        .await;
    let last_r1 = log
        .iter()
        .filter(|c| c.actor == "stslock/r1")
        .map(|c| c.at_ms)
        .max()
        .unwrap_or(0);
    let first_takeover = log
        .iter()
        .filter(|c| {
            c.actor == "stslock/r0"
                && c.at_ms > cut_at
                && c.resource == "statefulsetlocks"
                && r1_locks.contains(&c.name)
        })
        .map(|c| c.at_ms)
        .min()
        .expect("r0 took over r1's locks");
    println!(
        "last write by r1 at {last_r1} ms, first takeover by r0 at {first_takeover} ms (cut at {cut_at} ms)"
    );
    assert!(
        last_r1 < first_takeover,
        "r1 wrote at {last_r1} ms, after r0 took over at {first_takeover} ms"
    );

    // Heal: r1 renews, rejoins the ring and gets its share back.
    env.heal("r1").await;
    let (after, _) = until_owned_by(&env, &live, 30).await;
    assert!(
        after.values().any(|v| v.as_deref() == Some("r1")),
        "r1 rejoined"
    );
    env.stop_operators().await;
    env.assert_never_two_writers().await;
    assert_only_owners_wrote(&env, "partition and heal", 40).await;
}

/// 50 abrupt kill/restart cycles of random replicas while writers fail: every operator write
/// for a lock (its Lease, its pods' labels, its status) came from the replica that owned the
/// lock at that moment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_kill_restart_cycles_never_let_a_non_owner_write() {
    let mut env = env(false).await;
    let n = 60;
    // Short leases: renewals every second give many writes to check.
    fleet(&env, n, 2).await;
    let ids = ["r0", "r1", "r2"];
    for id in ids {
        start(&mut env, id, 2).await;
    }
    let live: HashSet<String> = ids.iter().map(|s| s.to_string()).collect();
    until_owned_by(&env, &live, 60).await;
    // Every writer is there to be failed.
    for i in 0..n {
        env.wait_roles(&format!("s{i}"), 1).await;
    }
    for cycle in 0..50usize {
        let id = ids[cycle % 3];
        env.kill_operator(id).await;
        // Fail some writer meanwhile (it comes back as a reader).
        env.set_ready(&format!("s{}-0", cycle % n), cycle % 2 == 0)
            .await;
        // The scenario's pace (how long a replica stays dead), not a wait for a state.
        tokio::time::sleep(Duration::from_millis(150 + 37 * (cycle as u64 % 5))).await;
        start(&mut env, id, 2).await;
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    until_owned_by(&env, &live, 60).await;
    env.stop_operators().await;
    assert_only_owners_wrote(&env, "50 kill/restart cycles", 800).await;
    env.assert_never_two_writers().await;
}

/// `--placement bounded`: every replica holds at most ⌈1.02 × the mean⌉ of the locks (the ring
/// alone lets the busiest hold 5–15 % more), the group settles (no lock keeps moving), a
/// replica that joins takes about its share from the others, and a replica running with the
/// ring's placement makes the whole group place by the ring until it goes (a rolling change of
/// the flag never has two rules at once). Only owners write throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bounded_placement_caps_every_replica_and_settles() {
    let mut env = env(false).await;
    let n = 150;
    fleet(&env, n, 30).await;
    let bounded = |env: &Env, id: &str| {
        env.operator_args_with(id, |a| {
            a.membership_lease_seconds = 3;
            a.placement = stslock::config::Placement::Bounded;
        })
    };
    for i in 0..3 {
        let args = bounded(&env, &format!("r{i}"));
        env.start_operator_with(&format!("r{i}"), args).await;
    }
    let live: HashSet<String> = env.operator_ids().into_iter().collect();
    until_owned_by(&env, &live, 60).await;
    let three = until_placed(&env, &live, 60).await;
    let c = counts(&three);
    let cap = stslock_shard::balance::bounds(n, 3, stslock_shard::balance::EPSILON).cap;
    println!("bounded, 3 replicas, {n} locks: {c:?} (cap {cap})");
    assert!(c.values().all(|&x| x <= cap), "{c:?} over the cap {cap}");

    // A 4th replica joins: it takes about its share; what moves goes to it.
    let args = bounded(&env, "r3");
    env.start_operator_with("r3", args).await;
    let live4: HashSet<String> = env.operator_ids().into_iter().collect();
    let four = until_placed(&env, &live4, 60).await;
    let c4 = counts(&four);
    let cap4 = stslock_shard::balance::bounds(n, 4, stslock_shard::balance::EPSILON).cap;
    let moved: Vec<&String> = three
        .iter()
        .filter(|(k, v)| four.get(*k) != Some(v))
        .map(|(k, _)| k)
        .collect();
    let to_new = moved
        .iter()
        .filter(|k| four[**k].as_deref() == Some("r3"))
        .count();
    println!(
        "4th replica joined: {c4:?} (cap {cap4}); {} of {n} moved, {to_new} to r3",
        moved.len()
    );
    assert!(
        c4.values().all(|&x| x <= cap4),
        "{c4:?} over the cap {cap4}"
    );
    assert!(
        moved.len() as f64 <= 0.4 * n as f64,
        "{} moved",
        moved.len()
    );
    assert!(
        to_new as f64 >= 0.8 * moved.len() as f64,
        "{to_new} of {} to r3",
        moved.len()
    );

    // A replica placing by the ring joins: the whole group places by the ring.
    start(&mut env, "r4", 3).await;
    let live5: HashSet<String> = env.operator_ids().into_iter().collect();
    until_assigned(&env, &live5, 60).await;
    // It goes: bounded loads again.
    env.stop_operator("r4").await;
    let after = until_placed(&env, &live4, 60).await;
    assert!(
        counts(&after).values().all(|&x| x <= cap4),
        "{:?}",
        counts(&after)
    );
    env.stop_operators().await;
    env.assert_never_two_writers().await;
    assert_only_owners_wrote(&env, "bounded placement: join, mixed group, leave", n).await;
}
