//! Issue P5, sharding under the failure modes of a real apiserver (kubesim's fault layer): a
//! stalled membership watch, a membership Lease deleted by someone else, a handoff whose
//! response is lost, a handoff racing a plan whose writes are answered late. Each test checks
//! DESIGN §4 / rule 15 from kubesim's commit log, which records each lock's ownership label with
//! every write to it: only the lock's owner at that commit writes for it, and live owners keep
//! their locks.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on setup failures

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use kubesim::{CommitRecord, HoldResponse, LoseResponse, Sim, WatchFault};
use serde_json::json;
use stslock::api::{SHARD_LABEL, StatefulSetLock};
use stslock::config::OperatorArgs;

mod common;
use common::sim::{Replica, assert_never_two_writers, sim_with_crd, until};
use common::{lock_owners, pod_ready};

// ---------------------------------------------------------------------------------------------
// Harness

/// A replica of these suites: API calls time out after 2 s.
fn start(sim: &Sim, id: &str, f: impl FnOnce(&mut OperatorArgs)) -> Replica {
    common::sim::start(sim, id, |a| {
        a.api_timeout_seconds = 2;
        f(a)
    })
}

/// StatefulSets `s{i}` of `replicas` pods and locks `l{i}` with Leases `lease{i}`.
async fn statefulsets(client: &Client, range: std::ops::Range<usize>, replicas: i32) {
    let sets: Api<StatefulSet> = Api::namespaced(client.clone(), "default");
    for i in range {
        let sts: StatefulSet = serde_json::from_value(json!({
            "metadata": {"name": format!("s{i}")},
            "spec": {"serviceName": "s", "replicas": replicas, "selector": {"matchLabels": {"app": format!("s{i}")}},
                     "template": {"metadata": {"labels": {"app": format!("s{i}")}}, "spec": {"containers": [{"name": "c", "image": "x:1"}]}}}
        }))
        .unwrap();
        sets.create(&PostParams::default(), &sts).await.unwrap();
    }
}

async fn locks(client: &Client, range: std::ops::Range<usize>, lease_seconds: i32) {
    let locks: Api<StatefulSetLock> = Api::namespaced(client.clone(), "default");
    for i in range {
        let l: StatefulSetLock = serde_json::from_value(json!({"apiVersion": "app.anukkrit.me/v1", "kind": "StatefulSetLock",
            "metadata": {"name": format!("l{i}")}, "spec": {"statefulSetName": format!("s{i}"), "leaseName": format!("lease{i}"), "leaseDurationSeconds": lease_seconds}}))
        .unwrap();
        locks.create(&PostParams::default(), &l).await.unwrap();
    }
}

/// `n` two-pod StatefulSets with locks of `lease_seconds` Leases, and replica a alone owning
/// them all, every Lease created.
async fn alone_with_locks(sim: &Sim, client: &Client, n: usize, lease_seconds: i32) -> Replica {
    statefulsets(client, 0..n, 2).await;
    locks(client, 0..n, lease_seconds).await;
    let a = start(sim, "a", |_| {});
    until_owned_by(client, &["a"], 30).await;
    until_leases(client, n).await;
    a
}

/// `n` StatefulSets of `pods` pods with locks of `lease_seconds` Leases, split between
/// replicas a and b: the replicas, and each lock's owner once split.
async fn a_and_b_with_locks(
    sim: &Sim,
    client: &Client,
    n: usize,
    pods: i32,
    lease_seconds: i32,
) -> (Replica, Replica, BTreeMap<String, Option<String>>) {
    statefulsets(client, 0..n, pods).await;
    locks(client, 0..n, lease_seconds).await;
    let a = start(sim, "a", |_| {});
    let b = start(sim, "b", |_| {});
    let owned = until_owned_by(client, &["a", "b"], 60).await;
    (a, b, owned)
}

/// a alone with `n` locks (2 pods each, Leases of `lease_seconds`) and a membership Lease of
/// 15 s (the default): the fence of a replica nothing renews any more stays open about 12 s.
async fn alone_with_a_long_fence(
    sim: &Sim,
    client: &Client,
    n: usize,
    lease_seconds: i32,
) -> Replica {
    statefulsets(client, 0..n, 2).await;
    locks(client, 0..n, lease_seconds).await;
    let a = start(sim, "a", |a| a.membership_lease_seconds = 15);
    until_owned_by(client, &["a"], 30).await;
    until_leases(client, n).await;
    a
}

/// Every write of replica a to a lock committed at once and answered 1.5 s late: its
/// handoffs are in flight for that long.
fn a_lock_writes_answered_late() -> HoldResponse {
    HoldResponse::new(1500)
        .agent("stslock/a")
        .resource("statefulsetlocks")
}

/// The pod of StatefulSet `set` labelled writer, if any (the first, if several are).
async fn writer_of(client: &Client, set: &str) -> Option<String> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    pods.list(&ListParams::default().labels("sts-role=writer"))
        .await
        .ok()?
        .items
        .into_iter()
        .map(|p| p.name_any())
        .find(|p| p.starts_with(&format!("{set}-")))
}

/// Until the Leases `lease{i}` of `n` locks exist.
async fn until_leases(client: &Client, n: usize) {
    until(15, "every Lease created", || {
        let leases: Api<Lease> = Api::namespaced(client.clone(), "default");
        async move {
            let l = leases.list(&ListParams::default()).await.ok()?;
            (l.items
                .iter()
                .filter(|l| l.name_any().starts_with("lease"))
                .count()
                == n)
                .then_some(())
        }
    })
    .await;
}

/// Mark a membership Lease as a graceful leaver marks its own.
async fn mark_leaving(leases: &Api<Lease>, name: &str) {
    let leaving =
        json!({"metadata": {"annotations": {stslock::sharding::LEAVING_ANNOTATION: "true"}}});
    leases
        .patch(name, &PatchParams::default(), &Patch::Merge(&leaving))
        .await
        .unwrap();
}

/// Owner label of every lock.
async fn owners(client: &Client) -> BTreeMap<String, Option<String>> {
    lock_owners(&Api::namespaced(client.clone(), "default")).await
}

/// Every lock labelled with its owner on the ring of the `live` replicas (rebalancing done),
/// unchanged for 1 s.
async fn until_owned_by(
    client: &Client,
    live: &[&str],
    secs: u64,
) -> BTreeMap<String, Option<String>> {
    let members: Vec<String> = live.iter().map(|s| s.to_string()).collect();
    let ring = stslock_shard::Ring::new(&members);
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut stable: Option<(BTreeMap<String, Option<String>>, Instant)> = None;
    loop {
        let now = owners(client).await;
        let ok = now
            .iter()
            .all(|(k, v)| v.as_deref() == ring.owner(&format!("default/{k}")));
        match &stable {
            Some((o, since)) if ok && *o == now => {
                if since.elapsed() >= Duration::from_secs(1) {
                    return now;
                }
            }
            _ => stable = ok.then(|| (now.clone(), Instant::now())),
        }
        assert!(
            Instant::now() < deadline,
            "locks not all owned by their ring owner among {live:?} after {secs}s: {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The lock an operator write is for: its Lease `lease{i}`, its pods `s{i}-*`, its own status.
fn lock_of(c: &CommitRecord) -> Option<String> {
    match c.resource.as_str() {
        "leases" => c.name.strip_prefix("lease").map(|i| format!("l{i}")),
        "pods" => c
            .name
            .strip_prefix('s')
            .and_then(|r| r.split_once('-'))
            .map(|(i, _)| format!("l{i}")),
        "statefulsetlocks" => Some(c.name.clone()),
        _ => None,
    }
}

/// What the commit log says about ownership.
#[derive(Debug, Default)]
struct OwnershipAudit {
    /// Operator writes checked against the owner at their commit.
    checked: usize,
    /// Writes for a lock by a replica that did not own it at that commit (its Lease, its pods'
    /// labels, its status or finalizers; a label change itself — a claim or a handoff — is not
    /// one, see `moves`).
    non_owner: Vec<String>,
    /// Ownership label changes: (rv, lock, from, to, actor).
    moves: Vec<(u64, String, Option<String>, String, String)>,
}

/// Replays the commit log: the owner of each lock is the label recorded by the latest commit of
/// the lock before a write (kubesim records `app.anukkrit.me/shard` with every write).
/// The locks replica `by` moved from itself to `to` (label writes by `stslock/<by>`) after
/// resourceVersion `after`.
fn moved_after(log: &[CommitRecord], after: u64, by: &str, to: &str) -> Vec<String> {
    let actor = format!("stslock/{by}");
    audit(log)
        .moves
        .into_iter()
        .filter(|m| m.0 > after && m.2.as_deref() == Some(by) && m.3 == to && m.4 == actor)
        .map(|m| m.1)
        .collect()
}

fn audit(log: &[CommitRecord]) -> OwnershipAudit {
    let mut log: Vec<&CommitRecord> = log.iter().collect();
    log.sort_by_key(|c| c.rv);
    let mut owner: BTreeMap<String, String> = BTreeMap::new();
    let mut out = OwnershipAudit::default();
    for c in log {
        let actor = c.actor.strip_prefix("stslock/");
        if c.resource == "statefulsetlocks" {
            let before = owner.get(&c.name).cloned();
            let after = c.labels.get(SHARD_LABEL).cloned();
            if let Some(o) = &after {
                owner.insert(c.name.clone(), o.clone());
            }
            if before != after {
                if let Some(to) = after {
                    out.moves
                        .push((c.rv, c.name.clone(), before, to, c.actor.clone()));
                }
                continue;
            }
        }
        let (Some(actor), Some(lock)) = (actor, lock_of(c)) else {
            continue;
        };
        out.checked += 1;
        if owner.get(&lock).map(String::as_str) != Some(actor) {
            out.non_owner.push(format!(
                "rv {} at {} ms: {actor} {} {} {} for lock {lock} owned by {:?}",
                c.rv,
                c.at_ms,
                c.verb,
                c.resource,
                c.name,
                owner.get(&lock)
            ));
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// 4. A stalled membership watch must not make live peers look dead.

/// Replica a's membership watch goes half-open while b keeps renewing its membership Lease. a
/// must not take b's locks: b is alive, which a fresh read of b's Lease would show. (a's own
/// membership Lease is 6 s and b's 3 s, so for ~3 s a's stale view shows b expired while a still
/// sees itself alive — with equal durations that window is at most S/3 and depends on renewal
/// phases.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_membership_watch_does_not_make_a_live_peer_look_dead() {
    let (sim, client) = sim_with_crd().await;
    statefulsets(&client, 0..20, 1).await;
    locks(&client, 0..20, 4).await;
    let a = start(&sim, "a", |a| a.membership_lease_seconds = 6);
    let b = start(&sim, "b", |_| {});
    let before = until_owned_by(&client, &["a", "b"], 30).await;
    let stalled_at = sim.store().current_rv();
    sim.faults().update(|c| {
        c.watch_faults = vec![
            WatchFault::stall("leases")
                .agent("stslock/a")
                .label_selector("app.anukkrit.me/shard-group"),
        ]
    });
    // Deliberate wait (something must NOT happen): past b's membership duration + grace in a's
    // stale view (3.4 s) and a's own (6.9 s).
    tokio::time::sleep(Duration::from_secs(8)).await;
    sim.faults().update(|c| c.watch_faults.clear());
    let after = until_owned_by(&client, &["a", "b"], 15).await;
    // (Stopping the replicas below hands locks off: moves after this are the teardown's.)
    let end = sim.store().current_rv();
    a.stop().await;
    b.stop().await;

    let audit = audit(&sim.commit_log());
    let taken: Vec<_> = audit
        .moves
        .iter()
        .filter(|(rv, _, from, to, _)| {
            *rv > stalled_at && *rv <= end && from.as_deref() == Some("b") && to == "a"
        })
        .collect();
    println!(
        "{} writes checked, {} moves after the stall, locks of b taken by a: {taken:?}",
        audit.checked,
        audit
            .moves
            .iter()
            .filter(|m| m.0 > stalled_at && m.0 <= end)
            .count()
    );
    assert!(taken.is_empty(), "a claimed live b's locks: {taken:#?}");
    assert_eq!(
        before, after,
        "ownership moved although both replicas lived"
    );
    assert!(audit.non_owner.is_empty(), "{:#?}", audit.non_owner);
    assert_never_two_writers(&sim);
}

/// A claim from a dead owner is sent within a second of the start of a membership read that
/// showed the owner dead (a peer back meanwhile holds its locks as contested only that long).
/// Replica a's reads of Leases are answered 1.5 s late and b is killed: no membership read of
/// a's can back a claim, so b's locks stay b's until a's reads are fast again — then a takes
/// them all. (The pass's claims that outlast their read read the membership again: a claim
/// sent on such a re-read answered after the window broke the bound.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_peers_locks_are_not_claimed_on_a_membership_read_answered_late() {
    let (sim, client) = sim_with_crd().await;
    let (a, b, before) = a_and_b_with_locks(&sim, &client, 20, 1, 10).await;
    let of_b = before
        .values()
        .filter(|o| o.as_deref() == Some("b"))
        .count();
    assert!(of_b > 0, "b owns no lock: {before:?}");
    sim.faults().update(|c| {
        c.latency_ms = 1500;
        c.reads_only = true;
        c.agents = vec!["stslock/a".into()];
        c.resources = vec!["leases".into()];
    });
    let killed_at = sim.store().current_rv();
    b.task.abort();
    let _ = b.task.await;
    // Deliberate wait (something must NOT happen): b's membership Lease (3 s) lapses, and a
    // reads the membership on every pass, each read answered after the window.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let slow_until = sim.store().current_rv();
    sim.faults().set(kubesim::FaultConfig::default());
    let after = until_owned_by(&client, &["a"], 20).await;
    let end = sim.store().current_rv();
    a.stop().await;

    let audit = audit(&sim.commit_log());
    let taken = |from_rv: u64, to_rv: u64| {
        audit
            .moves
            .iter()
            .filter(|(rv, _, from, to, _)| {
                *rv > from_rv && *rv <= to_rv && from.as_deref() == Some("b") && to == "a"
            })
            .count()
    };
    println!(
        "b owned {of_b} locks; taken by a while its Lease reads were slow: {}, after: {}",
        taken(killed_at, slow_until),
        taken(slow_until, end)
    );
    assert_eq!(
        taken(killed_at, slow_until),
        0,
        "a claimed dead b's locks on membership reads answered after the window"
    );
    assert_eq!(taken(slow_until, end), of_b, "{after:?}");
    assert!(audit.non_owner.is_empty(), "{:#?}", audit.non_owner);
    assert_never_two_writers(&sim);
}

// ---------------------------------------------------------------------------------------------
// 5. A membership Lease deleted by a third party is not an instant death.

/// Someone deletes replica b's membership Lease (not a graceful leave: b is running). b re-creates
/// it at its next renewal (S/3), well within the grace; no lock may change owner and nobody but
/// a lock's owner may write for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_membership_lease_is_not_an_instant_death() {
    let (sim, client) = sim_with_crd().await;
    let (a, b, before) = a_and_b_with_locks(&sim, &client, 20, 1, 4).await;
    let deleted_at = sim.store().current_rv();
    let third: Api<Lease> = Api::namespaced(sim.client_as("kubectl"), "default");
    third
        .delete("stslock-b", &DeleteParams::default())
        .await
        .unwrap();
    until(5, "b re-created its membership Lease", || {
        let third = third.clone();
        async move { third.get_opt("stslock-b").await.ok()?.map(|_| ()) }
    })
    .await;
    // Deliberate wait (something must NOT happen): membership duration + grace + 1 s.
    tokio::time::sleep(Duration::from_millis(4500)).await;
    let after = owners(&client).await;
    // (Stopping the replicas below hands locks off: moves after this are the teardown's.)
    let end = sim.store().current_rv();
    a.stop().await;
    b.stop().await;

    let audit = audit(&sim.commit_log());
    let moved: Vec<_> = audit
        .moves
        .iter()
        .filter(|m| m.0 > deleted_at && m.0 <= end)
        .collect();
    println!(
        "{} writes checked, moves after the delete: {moved:?}",
        audit.checked
    );
    assert!(
        moved.is_empty(),
        "locks changed owner after b's membership Lease was deleted: {moved:#?}"
    );
    assert_eq!(before, after);
    assert!(audit.non_owner.is_empty(), "{:#?}", audit.non_owner);
    assert_never_two_writers(&sim);
}

// ---------------------------------------------------------------------------------------------
// 6. A handoff whose PATCH committed but whose response was lost.

/// Replica a owns 10 locks (2 s Leases: a renewal per lock per second); b joins, so a hands about
/// half of them off. Every lock write of a commits but its answer is lost (500 ServerTimeout),
/// and a's lock watch lags 3 s, so a's cache keeps showing the old label. a must not go on
/// working (renewing, labelling, writing status) from that cached label: over the whole run,
/// zero writes for a lock by a replica that was not its owner at that commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handoff_with_a_lost_response_leaves_no_writes_by_the_old_owner() {
    let (sim, client) = sim_with_crd().await;
    let a = alone_with_locks(&sim, &client, 10, 2).await;
    sim.faults().update(|c| {
        c.lose_responses = vec![
            LoseResponse::server_timeout()
                .agent("stslock/a")
                .resource("statefulsetlocks"),
        ];
        c.watch_faults = vec![WatchFault::lag("statefulsetlocks", 3000).agent("stslock/a")];
    });
    let faulted_at = sim.store().current_rv();
    let b = start(&sim, "b", |_| {});
    until_owned_by(&client, &["a", "b"], 20).await;
    // Deliberate wait: a few more renewals per lock (1 s each) after the handoffs.
    tokio::time::sleep(Duration::from_secs(3)).await;
    sim.faults().update(|c| {
        c.lose_responses.clear();
        c.watch_faults.clear();
    });
    until_owned_by(&client, &["a", "b"], 15).await;
    let end = sim.store().current_rv();
    a.stop().await;
    b.stop().await;

    let audit = audit(&sim.commit_log());
    let handoffs = audit
        .moves
        .iter()
        .filter(|m| m.0 > faulted_at && m.0 <= end && m.4 == "stslock/a" && m.3 == "b")
        .count();
    println!(
        "{handoffs} handoffs a → b with lost responses; {} writes checked, {} by a non-owner",
        audit.checked,
        audit.non_owner.len()
    );
    assert!(handoffs > 0, "no handoff happened under the fault");
    assert!(
        audit.checked > 100,
        "too few writes checked: {}",
        audit.checked
    );
    assert!(audit.non_owner.is_empty(), "{:#?}", audit.non_owner);
    assert_never_two_writers(&sim);
}

// ---------------------------------------------------------------------------------------------
// 7. A handoff must not move the label while the old owner's plan can still write.

/// Replica a elects six 5-pod StatefulSets while each of its pod-label writes is answered 1.5 s
/// late (served at once, answered late: a plan of 5 labels takes ~7.5 s); b joins meanwhile, so
/// a hands about half the locks off mid-plan, and the user asks every lock for a switchover to
/// pod 4 (which the new owner carries out at once). The label may move only once a's plan can
/// no longer write — a late write of that plan ("pod 4 is a reader") would demote the new
/// owner's writer: zero writes for a lock by a replica that was not its owner at that commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handoff_waits_until_the_old_owners_plan_can_no_longer_write() {
    let (sim, client) = sim_with_crd().await;
    let n = 6;
    statefulsets(&client, 0..n, 5).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    until(20, "every pod Ready", || {
        let pods = pods.clone();
        async move {
            let l = pods.list(&ListParams::default()).await.ok()?;
            let ready = l.items.iter().filter(|p| pod_ready(p)).count();
            (ready == n * 5).then_some(())
        }
    })
    .await;
    let a = start(&sim, "a", |_| {});
    // a is alone long enough to see itself on the ring.
    until(10, "a's membership Lease", || {
        let leases: Api<Lease> = Api::namespaced(client.clone(), "default");
        async move { leases.get_opt("stslock-a").await.ok()?.map(|_| ()) }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    sim.faults().update(|c| {
        c.hold_responses = vec![HoldResponse::new(1500).agent("stslock/a").resource("pods")]
    });
    locks(&client, 0..n, 30).await;
    // a claims every lock and starts electing (its Leases are not held).
    until(10, "a claimed and started every election", || {
        let leases: Api<Lease> = Api::namespaced(client.clone(), "default");
        let client = client.clone();
        async move {
            let o = owners(&client).await;
            let l = leases.list(&ListParams::default()).await.ok()?;
            (o.values().all(|v| v.as_deref() == Some("a"))
                && l.items
                    .iter()
                    .filter(|l| l.name_any().starts_with("lease"))
                    .count()
                    == n)
                .then_some(())
        }
    })
    .await;
    let b = start(&sim, "b", |_| {});
    let lock_api: Api<StatefulSetLock> = Api::namespaced(client.clone(), "default");
    for i in 0..n {
        lock_api
            .patch(
                &format!("l{i}"),
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"preferredWriter": format!("s{i}-4")}})),
            )
            .await
            .unwrap();
    }
    until_owned_by(&client, &["a", "b"], 25).await;
    sim.faults().update(|c| c.hold_responses.clear());
    for i in 0..n {
        until(15, &format!("s{i}-4 the writer, 4 readers"), || {
            let pods = pods.clone();
            async move {
                let l = pods
                    .list(&ListParams::default().labels(&format!("app=s{i}")))
                    .await
                    .ok()?;
                let ok = l.items.len() == 5
                    && l.items.iter().all(|p| {
                        let role = p.labels().get("sts-role").map(String::as_str);
                        role == Some(if p.name_any() == format!("s{i}-4") {
                            "writer"
                        } else {
                            "reader"
                        })
                    });
                ok.then_some(())
            }
        })
        .await;
    }
    let end = sim.store().current_rv();
    a.stop().await;
    b.stop().await;

    let audit = audit(&sim.commit_log());
    let handoffs = audit
        .moves
        .iter()
        .filter(|m| m.0 <= end && m.4 == "stslock/a" && m.3 == "b")
        .count();
    println!(
        "{handoffs} handoffs a → b; {} writes checked, {} by a non-owner",
        audit.checked,
        audit.non_owner.len()
    );
    assert!(handoffs > 0, "no handoff happened");
    assert!(audit.non_owner.is_empty(), "{:#?}", audit.non_owner);
    assert_never_two_writers(&sim);
}

// ---------------------------------------------------------------------------------------------
// 8. A handoff must reach a replica whose lock watch is stalled.

/// Replica b joins with a half-open lock watch: it never sees, through the watch, a's handoffs
/// of the locks the ring now gives it, and a stops renewing a lock's Lease once it has handed
/// the lock over. b must still renew every one of them in time (it reads a handoff it has
/// awaited for 500 ms from the API server): no Lease of a lock b owns goes a Lease duration
/// without a write while the watch stays stalled for 2.5 durations.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handoff_reaches_a_replica_whose_lock_watch_is_stalled() {
    let (sim, client) = sim_with_crd().await;
    let lease_ms = 6000;
    let a = alone_with_locks(&sim, &client, 10, 6).await;
    sim.faults().update(|c| {
        c.watch_faults = vec![WatchFault::stall("statefulsetlocks").agent("stslock/b")];
    });
    let b = start(&sim, "b", |_| {});
    let owned = until_owned_by(&client, &["a", "b"], 20).await;
    let handed: Vec<String> = owned
        .iter()
        .filter(|(_, o)| o.as_deref() == Some("b"))
        .map(|(l, _)| l.clone())
        .collect();
    assert!(!handed.is_empty(), "the ring gave b no lock: {owned:?}");
    // Deliberate wait (the Leases must keep being renewed meanwhile): 2.5 Lease durations with
    // b's lock watch still stalled.
    tokio::time::sleep(Duration::from_millis(lease_ms * 5 / 2)).await;
    let end_ms = sim.store().elapsed_ms();
    let log = sim.commit_log();
    sim.faults().update(|c| c.watch_faults.clear());
    a.stop().await;
    b.stop().await;

    let handoff_ms = |lock: &str| {
        log.iter()
            .filter(|c| c.resource == "statefulsetlocks" && c.name == lock)
            .find(|c| c.labels.get(SHARD_LABEL).map(String::as_str) == Some("b"))
            .map(|c| c.at_ms)
            .unwrap()
    };
    for lock in &handed {
        let from = handoff_ms(lock);
        let worst = longest_without_lease_write(&log, lock, from, end_ms);
        println!("{lock}: handed to b at {from} ms, longest time without a Lease write {worst} ms");
        assert!(
            worst < lease_ms,
            "{lock}'s Lease went {worst} ms without a write after the handoff to b"
        );
    }
    assert_never_two_writers(&sim);
}

/// a hands locks to b while a's lock watch is half-open, and b hands them back when it stops
/// (A→B→A). a's stale cache still shows them labelled a, from before its own handoff: such a
/// view may not be acted on, and said nothing of the handback. a must learn of it by a read
/// (as for any awaited handoff) and renew the Leases: none of the locks handed back goes a
/// Lease duration without a Lease write while a's lock and Lease watches stay stalled for 2.5
/// durations (before, nothing on a looked at them until its watches recovered), and only
/// owners write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_handed_back_behind_its_own_handoff_is_renewed() {
    let (sim, client) = sim_with_crd().await;
    let lease_ms = 6000;
    let a = alone_with_locks(&sim, &client, 10, 6).await;
    // a's watch of the locks' Leases too (not of the membership Leases): b's renewal of a
    // Lease just before it hands the lock back would otherwise trigger a reconcile on a that
    // may re-read the lock after the handback.
    sim.faults().update(|c| {
        c.watch_faults = vec![
            WatchFault::stall("statefulsetlocks").agent("stslock/a"),
            WatchFault::stall("leases")
                .agent("stslock/a")
                .label_selector(stslock::cache::watch::LEASE_LABEL),
        ];
    });
    let joined = sim.store().current_rv();
    let b = start(&sim, "b", |_| {});
    until_owned_by(&client, &["a", "b"], 20).await;
    // Deliberate wait: b keeps the locks for more than a Lease, so that every reconcile a
    // had scheduled for them (their renewal time) has come and found them b's; nothing of
    // a's is pending for them when b hands them back.
    tokio::time::sleep(Duration::from_millis(lease_ms + 500)).await;
    let left = sim.store().current_rv();
    b.stop().await;
    until_owned_by(&client, &["a"], 20).await;
    let back_ms = sim.store().elapsed_ms();
    // Deliberate wait (the Leases must keep being renewed meanwhile): 2.5 Lease durations with
    // a's lock watch still stalled.
    tokio::time::sleep(Duration::from_millis(lease_ms * 5 / 2)).await;
    let end_ms = sim.store().elapsed_ms();
    let log = sim.commit_log();
    sim.faults().update(|c| c.watch_faults.clear());
    a.stop().await;

    let there = moved_after(&log, joined, "a", "b");
    let back = moved_after(&log, left, "b", "a");
    assert!(!there.is_empty(), "a handed nothing to b");
    assert!(!back.is_empty(), "b handed nothing back to a");
    let handback_ms = |lock: &str| {
        log.iter()
            .filter(|c| c.resource == "statefulsetlocks" && c.name == lock && c.rv > left)
            .find(|c| c.labels.get(SHARD_LABEL).map(String::as_str) == Some("a"))
            .map_or(back_ms, |c| c.at_ms)
    };
    for lock in &back {
        let from = handback_ms(lock);
        let worst = longest_without_lease_write(&log, lock, from, end_ms);
        println!(
            "{lock}: handed back to a at {from} ms, longest time without a Lease write {worst} ms"
        );
        assert!(
            worst < lease_ms,
            "{lock}'s Lease went {worst} ms without a write after b handed it back to a"
        );
    }
    let audit = audit(&log);
    assert!(audit.non_owner.is_empty(), "{:#?}", audit.non_owner);
    assert_never_two_writers(&sim);
}

/// The longest time lock `l{i}`'s Lease `lease{i}` went without a committed write between
/// `from_ms` and `end_ms` (store milliseconds), counting from its last write before `from_ms`.
fn longest_without_lease_write(log: &[CommitRecord], lock: &str, from_ms: u64, end_ms: u64) -> u64 {
    let lease = format!("lease{}", &lock[1..]);
    let writes = || {
        log.iter()
            .filter(|c| c.resource == "leases" && c.name == lease)
    };
    let mut last = writes()
        .filter(|c| c.at_ms <= from_ms)
        .map(|c| c.at_ms)
        .next_back()
        .unwrap_or(from_ms);
    let mut worst = 0;
    for c in writes().filter(|c| c.at_ms > from_ms && c.at_ms <= end_ms) {
        worst = worst.max(c.at_ms - last);
        last = c.at_ms;
    }
    worst.max(end_ms - last)
}

// ---------------------------------------------------------------------------------------------
// 9. A claim under a stalled lock watch keeps its Lease renewed.

/// Replica b dies (no handoff) and a's lock watch goes half-open at the same moment: a claims
/// b's locks once b's membership Lease has expired, but its watch keeps showing them labelled
/// b. a must renew their Leases at every due time, not only once: a version of the lock read
/// from the API server stays what ownership checks see until the watch delivers a newer one
/// (before, the first look at it dropped it, the next renewal found the lock "not mine" in the
/// stale cache, and nothing renewed the Lease until the watch recovered).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_under_a_stalled_lock_watch_keeps_its_leases_renewed() {
    let (sim, client) = sim_with_crd().await;
    let lease_ms = 6000;
    statefulsets(&client, 0..8, 2).await;
    locks(&client, 0..8, 6).await;
    let a = start(&sim, "a", |a| a.membership_lease_seconds = 3);
    let b = start(&sim, "b", |a| a.membership_lease_seconds = 3);
    let owned = until_owned_by(&client, &["a", "b"], 30).await;
    until_leases(&client, 8).await;
    let of_b: Vec<String> = owned
        .iter()
        .filter(|(_, o)| o.as_deref() == Some("b"))
        .map(|(l, _)| l.clone())
        .collect();
    assert!(!of_b.is_empty(), "the ring gave b no lock: {owned:?}");
    b.task.abort();
    sim.faults().update(|c| {
        c.watch_faults = vec![WatchFault::stall("statefulsetlocks").agent("stslock/a")];
    });
    let from_ms = sim.store().elapsed_ms();
    // Deliberate wait (the Leases must keep being renewed meanwhile): b's membership expires
    // (3 s), a claims, then several renewals (every 3 s) with a's lock watch still stalled.
    tokio::time::sleep(Duration::from_millis(lease_ms * 8 / 3)).await;
    let end_ms = sim.store().elapsed_ms();
    let log = sim.commit_log();
    let end = owners(&client).await;
    sim.faults().update(|c| c.watch_faults.clear());
    a.stop().await;

    for lock in &of_b {
        assert_eq!(
            end[lock].as_deref(),
            Some("a"),
            "a did not claim {lock}: {end:?}"
        );
        let worst = longest_without_lease_write(&log, lock, from_ms, end_ms);
        println!("{lock}: claimed by a, longest time without a Lease write {worst} ms");
        assert!(
            worst < lease_ms,
            "{lock}'s Lease went {worst} ms without a write after b died"
        );
    }
    assert_never_two_writers(&sim);
}

// ---------------------------------------------------------------------------------------------
// 10. A replica that learned of a handoff by reading it hands the lock on from what it read.

/// b's lock watch is stalled from its start: it learns of a's handoffs only by reading them.
/// Then c joins and the ring gives c some of b's locks: b must hand them on — from the version
/// it read (the stale cache's resourceVersion would make every handoff a conflict for as long as
/// the watch stays stalled) — and only the owner of a lock may write for it meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handoff_read_through_a_stalled_watch_is_handed_on() {
    let (sim, client) = sim_with_crd().await;
    let a = alone_with_locks(&sim, &client, 12, 6).await;
    sim.faults().update(|c| {
        c.watch_faults = vec![WatchFault::stall("statefulsetlocks").agent("stslock/b")];
    });
    let b = start(&sim, "b", |_| {});
    until_owned_by(&client, &["a", "b"], 20).await;
    let joined = sim.store().current_rv();
    let c = start(&sim, "c", |_| {});
    until_owned_by(&client, &["a", "b", "c"], 20).await;
    let end = sim.store().current_rv();
    sim.faults().update(|c| c.watch_faults.clear());
    a.stop().await;
    b.stop().await;
    c.stop().await;

    let audit = audit(&sim.commit_log());
    let b_to_c = audit
        .moves
        .iter()
        .filter(|m| m.0 > joined && m.0 <= end && m.2.as_deref() == Some("b") && m.3 == "c")
        .count();
    println!(
        "{b_to_c} locks handed on from b to c with b's lock watch stalled; {} writes checked",
        audit.checked
    );
    assert!(b_to_c > 0, "the ring moved none of b's locks to c");
    assert!(audit.non_owner.is_empty(), "{:#?}", audit.non_owner);
    assert_never_two_writers(&sim);
}

// ---------------------------------------------------------------------------------------------
// 11. A lock is handed off with its Lease freshly renewed.

/// a owns every lock alone, its Leases of 12 s renewed every 6 s; b joins when every Lease was
/// last renewed 3.5 s ago or more (a quarter and a bit). The ring moves some locks to b: each
/// must reach b with its Lease renewed at most a quarter of its duration (plus the handoff's own
/// writes) before the label moved, so that b has three quarters of a Lease to take it over —
/// not what is left of a's half, which after a slow restart or under slow answers was not
/// enough (the chaos soak's lapses after graceful restarts).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_is_handed_off_with_its_lease_freshly_renewed() {
    let (sim, client) = sim_with_crd().await;
    let (n, lease_ms) = (12, 12_000u64);
    let a = alone_with_locks(&sim, &client, n, 12).await;
    until_leases_aged(&sim, n, 3500..4000).await;
    let joined_ms = sim.store().elapsed_ms();
    let b = start(&sim, "b", |_| {});
    let owned = until_owned_by(&client, &["a", "b"], 20).await;
    let log = sim.commit_log();
    a.stop().await;
    b.stop().await;

    let handed = locks_of(&owned, "b");
    assert!(!handed.is_empty(), "the ring gave b no lock: {owned:?}");
    for lock in handed {
        let handoff = log
            .iter()
            .filter(|c| c.resource == "statefulsetlocks" && c.name == *lock && c.at_ms > joined_ms)
            .find(|c| c.labels.get(SHARD_LABEL).map(String::as_str) == Some("b"))
            .map(|c| c.at_ms)
            .unwrap();
        let lease = format!("lease{}", &lock[1..]);
        let renewed = log
            .iter()
            .filter(|c| c.resource == "leases" && c.name == lease && c.at_ms <= handoff)
            .map(|c| c.at_ms)
            .max()
            .unwrap();
        let age = handoff - renewed;
        println!(
            "{lock}: handed to b {} ms after b started, its Lease renewed {age} ms before",
            handoff - joined_ms
        );
        assert!(
            age <= lease_ms / 4 + 400,
            "{lock} was handed to b with a Lease last renewed {age} ms before (of {lease_ms} ms)"
        );
    }
    assert_never_two_writers(&sim);
}

/// Until the youngest of the Leases `lease{i}` of `n` locks was last written `ages` ago (store
/// milliseconds).
async fn until_leases_aged(sim: &Sim, n: usize, ages: std::ops::Range<u64>) {
    until(
        20,
        &format!("every Lease last written {ages:?} ms ago"),
        || {
            let log = sim.commit_log();
            let now = sim.store().elapsed_ms();
            let youngest = (0..n)
                .map(|i| {
                    let lease = format!("lease{i}");
                    let last = log
                        .iter()
                        .filter(|c| c.resource == "leases" && c.name == lease)
                        .map(|c| c.at_ms)
                        .max()
                        .unwrap_or(0);
                    now - last
                })
                .min()
                .unwrap_or(0);
            let ok = ages.contains(&youngest);
            async move { ok.then_some(()) }
        },
    )
    .await;
}

// ---------------------------------------------------------------------------------------------
// 12. A replica killed and restarted renews its Leases before they lapse.

/// a owns every lock alone (Leases of 6 s, renewed every 3 s) and is killed when its Leases
/// are 2 s old; it comes back 1 s later with the same id, every answer to it 400 ms late. Its
/// caches fill, it finds itself still the owner, and it must renew each Lease before it lapses
/// (at 6 s): about 3 s for lists, a membership renewal, a re-read and the renewal, each one
/// slow. Before, a renewal tried before the pod and Lease watches had their lists ("not in the
/// cache") was left to the reconcile lane and looked at again only a second later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_replica_renews_its_leases_before_they_lapse() {
    restart_with_slow_answers(400, 6).await;
}

/// As above with every answer 750 ms late: a quarter of the membership Lease (3 s), Leases of
/// 10 s. Before, the membership renewal was followed by a pause of S/3 counted from its answer
/// (and the hedging read was awaited alone, a further round trip): each renewal was answered
/// after the fence of the one before had closed, every reopening bumped the fence generation,
/// and the restarted replica's ownership confirmations, each given only what was left of the
/// fence (135-330 ms), never landed: no Lease was renewed until the latency went away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_replica_renews_its_leases_although_every_answer_is_slow() {
    restart_with_slow_answers(750, 10).await;
}

/// a owns 8 locks alone (Leases of `lease_secs`, membership Lease 3 s) and is killed when its
/// Leases are 2 s old; it comes back 1 s later with the same id, every request of it served
/// `latency_ms` late. Its caches fill, it finds itself still the owner, and it must renew each
/// Lease before it lapses: lists, a membership renewal, a re-read, a confirming write and the
/// renewal, each one slow.
async fn restart_with_slow_answers(latency_ms: u64, lease_secs: i32) {
    let (sim, client) = sim_with_crd().await;
    let n = 8;
    let lease_ms = u64::try_from(lease_secs).unwrap() * 1000;
    let a = alone_with_locks(&sim, &client, n, lease_secs).await;
    until_leases_aged(&sim, n, 2000..2300).await;
    a.task.abort();
    let killed_ms = sim.store().elapsed_ms();
    sim.faults().update(|c| {
        c.latency_ms = latency_ms;
        c.agents = vec!["stslock/a".into()];
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    let a = start(&sim, "a", |_| {});
    // Deliberate wait: past the time the Leases would lapse, and one more renewal.
    tokio::time::sleep(Duration::from_millis(lease_ms + 2000)).await;
    let end_ms = sim.store().elapsed_ms();
    let log = sim.commit_log();
    sim.faults().update(|c| *c = Default::default());
    a.stop().await;
    for i in 0..n {
        let lock = format!("l{i}");
        let worst = longest_without_lease_write(&log, &lock, killed_ms, end_ms);
        println!(
            "{lock}: longest time without a Lease write across the restart {worst} ms (answers {latency_ms} ms late)"
        );
        assert!(
            worst < lease_ms,
            "{lock}'s Lease went {worst} ms without a write across a's restart"
        );
    }
    assert_never_two_writers(&sim);
}

/// a owns 44 locks alone, created in eleven batches 450 ms apart, so their 10 s Leases are
/// renewed at phases spread over the 5 s between renewals. a is killed and comes back a second
/// later with a write budget of 16 writes/s: after a restart each lock needs two writes (the
/// confirmation of ownership, then the renewal), 88 in all, each before its own Lease runs out.
/// Before, every lock was confirmed at once, by both lanes in the renewals' share of the
/// budget, and the renewals came after, in no order: Leases close to expiry waited behind
/// confirmations of Leases renewed just before the kill, and lapsed. Now the renewal lane
/// confirms and renews each lock when its Lease is due as the Lease cache shows it, and the
/// reconcile lane's confirmations wait behind renewals: the budget goes to the most urgent
/// first.
///
/// Measured here (one run each): before, 11.4, 11.9 and 12.5 s without a Lease write (fails);
/// now 7 runs, 8.1-9.8 s (passes). The margin is under a second, too little for CI's shared
/// cores: run it with `--ignored`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "timing-sensitive on a shared machine (margin under 1 s): run with --ignored"]
async fn a_restarted_replica_under_a_tight_write_budget_renews_the_most_urgent_first() {
    let (sim, client) = sim_with_crd().await;
    let (n, batch) = (44, 4);
    let lease_ms = 10_000;
    statefulsets(&client, 0..n, 1).await;
    let a = start(&sim, "a", |_| {});
    for b in 0..n / batch {
        locks(&client, b * batch..(b + 1) * batch, 10).await;
        // Deliberate wait: the batches' Leases are renewed at phases 450 ms apart.
        tokio::time::sleep(Duration::from_millis(450)).await;
    }
    until_owned_by(&client, &["a"], 30).await;
    until_leases(&client, n).await;
    // Deliberate wait: every Lease renewed at least once since its election.
    tokio::time::sleep(Duration::from_secs(5)).await;
    a.task.abort();
    let killed_ms = sim.store().elapsed_ms();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let a = start(&sim, "a", |a| {
        a.qps = 16.0;
        a.burst = 16;
    });
    // Deliberate wait: past the time every Lease would lapse, and one more renewal.
    tokio::time::sleep(Duration::from_millis(lease_ms + 2000)).await;
    let end_ms = sim.store().elapsed_ms();
    let log = sim.commit_log();
    a.stop().await;
    let worst: Vec<(u64, String)> = (0..n)
        .map(|i| {
            let lock = format!("l{i}");
            (
                longest_without_lease_write(&log, &lock, killed_ms, end_ms),
                lock,
            )
        })
        .collect();
    let max = worst.iter().max().cloned().unwrap_or_default();
    println!("longest times without a Lease write across the restart: max {max:?}");
    let lapsed: Vec<_> = worst.iter().filter(|(w, _)| *w >= lease_ms).collect();
    assert!(
        lapsed.is_empty(),
        "Leases that went a Lease duration without a write: {lapsed:?}"
    );
    assert_never_two_writers(&sim);
}

// ---------------------------------------------------------------------------------------------
// 13. A replica back after its membership Lease was gone confirms its locks by a write.

/// a and b share 12 locks (4 s Leases, renewed every 2 s). a is killed and its membership Lease
/// is left as a graceful leave whose handoffs failed leaves it: marked leaving, then deleted,
/// with a's locks still labelled a. b may claim them at once, and does, each claim served 1.5 s
/// late (every write of b is); a comes back 400 ms after the delete, before any claim lands, its
/// lock watch stalled so that it never sees them land. Before, a re-read each lock (still
/// labelled a), took it for its own for the whole fence generation and went on renewing its
/// Lease after b's claim had landed: writes by a non-owner. Now a confirms each lock with a
/// compare-and-swap write first: either that lands first and b's claim conflicts, or the claim
/// does and a's write conflicts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_back_after_its_membership_was_gone_confirms_its_locks_by_a_write() {
    let (sim, client) = sim_with_crd().await;
    let n = 12;
    statefulsets(&client, 0..n, 2).await;
    locks(&client, 0..n, 4).await;
    let slow_membership = |a: &mut OperatorArgs| a.membership_lease_seconds = 6;
    let a = start(&sim, "a", slow_membership);
    let b = start(&sim, "b", slow_membership);
    let before = until_owned_by(&client, &["a", "b"], 30).await;
    until_leases(&client, n).await;
    a.task.abort();
    sim.faults().update(|c| {
        c.latency_ms = 1500;
        c.writes_only = true;
        c.agents = vec!["stslock/b".into()];
        c.watch_faults = vec![WatchFault::stall("statefulsetlocks").agent("stslock/a")];
    });
    let admin: Api<Lease> = Api::namespaced(sim.client_as("kubectl"), "default");
    mark_leaving(&admin, "stslock-a").await;
    admin
        .delete("stslock-a", &DeleteParams::default())
        .await
        .unwrap();
    let deleted_at = sim.store().current_rv();
    tokio::time::sleep(Duration::from_millis(400)).await;
    let a = start(&sim, "a", slow_membership);
    // Deliberate wait: b's claims land, and a's renewals (every 2 s) would follow them.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let end = sim.store().current_rv();
    let log = sim.commit_log();
    sim.faults().update(|c| *c = Default::default());
    a.stop().await;
    b.stop().await;

    let audit = audit(&log);
    let had_a = before
        .values()
        .filter(|o| o.as_deref() == Some("a"))
        .count();
    let claimed: Vec<_> = audit
        .moves
        .iter()
        .filter(|m| m.0 > deleted_at && m.0 <= end && m.2.as_deref() == Some("a") && m.3 == "b")
        .collect();
    let confirmed = log
        .iter()
        .filter(|c| {
            c.rv > deleted_at
                && c.resource == "statefulsetlocks"
                && c.actor == "stslock/a"
                && c.labels.get(SHARD_LABEL).map(String::as_str) == Some("a")
        })
        .count();
    println!(
        "a owned {had_a} locks; after its membership Lease was deleted b claimed {} of them, a confirmed {confirmed}; {} writes checked",
        claimed.len(),
        audit.checked
    );
    assert!(had_a > 0, "the ring gave a no lock: {before:?}");
    assert!(audit.non_owner.is_empty(), "{:#?}", audit.non_owner);
    assert_never_two_writers(&sim);
}

// ---------------------------------------------------------------------------------------------
// 14. A replica killed during its graceful leave rejoins the ring when it comes back.

/// a is killed in the middle of a graceful leave: its membership Lease stays marked leaving. a
/// comes back with the same id and must unmark it: before, its renewals left the mark, so every
/// peer — and a itself — kept it off the ring for good, and it was handed no lock again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_while_leaving_rejoins_the_ring_when_back() {
    let (sim, client) = sim_with_crd().await;
    let (a, b, _) = a_and_b_with_locks(&sim, &client, 8, 1, 4).await;
    a.task.abort();
    let admin: Api<Lease> = Api::namespaced(sim.client_as("kubectl"), "default");
    mark_leaving(&admin, "stslock-a").await;
    let a = start(&sim, "a", |_| {});
    let owned = until_owned_by(&client, &["a", "b"], 20).await;
    let lease = admin.get("stslock-a").await.unwrap();
    a.stop().await;
    b.stop().await;

    println!("owners after a came back: {owned:?}");
    assert!(
        !lease
            .annotations()
            .contains_key(stslock::sharding::LEAVING_ANNOTATION),
        "a's membership Lease is still marked leaving: {:?}",
        lease.annotations()
    );
    assert!(audit(&sim.commit_log()).non_owner.is_empty());
    assert_never_two_writers(&sim);
}

// ---------------------------------------------------------------------------------------------
// 15. A graceful stop ends while reconciles wait for the write budget.

/// a runs with a write budget of one write every 5 s (burst 1) and 16 locks to elect, so its
/// reconciles queue for the budget, the last of them for minutes. Stopped, it must still finish
/// — hand its locks off and leave — in bounded time: before, the stop waited for every running
/// reconcile to end, however long the budget kept it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_stop_ends_while_reconciles_wait_for_the_write_budget() {
    let (sim, client) = sim_with_crd().await;
    statefulsets(&client, 0..16, 2).await;
    locks(&client, 0..16, 10).await;
    let a = start(&sim, "a", |a| {
        a.qps = 0.2;
        a.burst = 1;
    });
    until(15, "a owns the locks", || {
        let client = client.clone();
        async move {
            let o = owners(&client).await;
            o.values().all(|o| o.as_deref() == Some("a")).then_some(())
        }
    })
    .await;
    // Deliberate wait: the reconciles are waiting for the budget.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let stopped = Instant::now();
    let _ = a.stop.send(());
    let finished = tokio::time::timeout(Duration::from_secs(30), a.task).await;
    println!(
        "a's graceful stop took {:?}",
        finished.is_ok().then(|| stopped.elapsed())
    );
    assert!(
        finished.is_ok(),
        "a's graceful stop did not finish within 30 s"
    );
    let lease: Option<Lease> = Api::namespaced(client.clone(), "default")
        .get_opt("stslock-a")
        .await
        .unwrap();
    assert!(
        lease.is_none(),
        "a left without deleting its membership Lease"
    );
    assert_never_two_writers(&sim);
}

// ---------------------------------------------------------------------------------------------
// A replica stopped by dropping its future writes nothing after.

/// `stslock::replica::run` is how the harness, `fleet` and `stslock dev` embed replicas, and
/// aborting its task is how they kill one: the soaks' kills mean something only if nothing of
/// the killed replica writes after it (its reconcile lane runs on a task of its own, stopped
/// through the shutdown channel the abort drops). Every write of it is served 1.5 s late when
/// it is killed, and its writer fails just after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aborted_replica_writes_nothing_after() {
    let (sim, client) = sim_with_crd().await;
    // Leases of 4 s: both lanes renew every 2 s.
    let a = alone_with_a_long_fence(&sim, &client, 8, 4).await;
    // Every write of a served 1.5 s late: when it is killed, renewals are on their way.
    sim.faults().update(|c| {
        c.latency_ms = 1500;
        c.writes_only = true;
        c.agents = vec!["stslock/a".into()];
    });
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let in_flight_from = sim.store().elapsed_ms();
    a.task.abort();
    let _ = a.task.await;
    let killed_ms = sim.store().elapsed_ms();
    // Deliberate wait: two renewal periods, and a writer failure to decide on.
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let writer = until(10, "a writer-labelled pod", || {
        let pods = pods.clone();
        async move {
            pods.list(&ListParams::default().labels("sts-role=writer"))
                .await
                .ok()?
                .items
                .first()
                .map(|p| p.name_any())
        }
    })
    .await;
    sim.pods().set_ready("default", &writer, false).unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let late: Vec<String> = sim
        .commit_log()
        .iter()
        // A request already sent when the task was aborted may still be served.
        .filter(|c| c.at_ms > killed_ms + 300 && c.actor == "stslock/a")
        .map(|c| {
            format!(
                "{} ms: {} {} {}",
                c.at_ms - killed_ms,
                c.verb,
                c.resource,
                c.name
            )
        })
        .collect();
    let landed = sim
        .commit_log()
        .iter()
        .filter(|c| c.at_ms > in_flight_from && c.actor == "stslock/a")
        .count();
    println!(
        "writes by the aborted replica more than 300 ms after: {late:#?} ({writer} was the writer; {landed} of its writes landed after the latency began)"
    );
    assert!(
        late.is_empty(),
        "the aborted replica went on writing: {late:#?}"
    );
}

// ---------------------------------------------------------------------------------------------
// 17. A lock-watch outage does not hold up the failovers that follow it.

/// Every request of a for StatefulSetLocks fails for 1.7 s and its watches are cut: its lock
/// watch fails again and again while pods and Leases flow. Then the locks are back and a writer
/// turns NotReady at once. kube-runtime's controller backs off its merged trigger stream on
/// every error of the lock watch (800 ms doubling to 30 s, client-go's watch backoff): before,
/// that paused every trigger of the replica — pod readiness, Leases, the renewal lane's
/// hand-offs — and this failover came 1.7-2.7 s after the flip (three runs; now 55-58 ms); a restarted
/// replica under a 30 % error rate listed its locks only after seconds, its Leases lapsing
/// meanwhile. Each watch backs off on its own; the merged stream adds nothing now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_watch_outage_does_not_hold_up_the_next_failover() {
    let (sim, client) = sim_with_crd().await;
    let n = 4;
    let a = alone_with_locks(&sim, &client, n, 10).await;
    let writer = until(10, "s0's writer labelled", || writer_of(&client, "s0")).await;
    sim.faults().update(|c| {
        c.error_rate = 1.0;
        c.agents = vec!["stslock/a".into()];
        c.resources = vec!["statefulsetlocks".into()];
    });
    sim.faults().drop_watches();
    tokio::time::sleep(Duration::from_millis(1700)).await;
    sim.faults().update(|c| *c = Default::default());
    let flipped = std::time::Instant::now();
    sim.pods().set_ready("default", &writer, false).unwrap();
    let new = until(15, "s0's writer failed over", || {
        let (client, old) = (client.clone(), writer.clone());
        async move { writer_of(&client, "s0").await.filter(|w| *w != old) }
    })
    .await;
    let took = flipped.elapsed();
    println!(
        "failover {writer} -> {new} {} ms after the lock watch came back",
        took.as_millis()
    );
    assert!(
        took < Duration::from_millis(600),
        "the failover took {} ms after the lock-watch outage",
        took.as_millis()
    );
    assert_never_two_writers(&sim);
    a.stop().await;
}

/// The same for a reconcile in flight at the abort: a failover whose writes are each served
/// 1.2 s late, its replica aborted 300 ms after the plan's first wave was served, while its
/// Lease write waits out its latency in kubesim. Nothing of the plan may land after. Before,
/// the controller ran on a task the abort did not reach, and kube-runtime lets running
/// reconciles finish after a graceful shutdown (which the abort starts by dropping the shutdown
/// channel): the plan went on with the permits of a sharding state nothing updated any more —
/// here the Lease +0.9 s, the promotion +2.1 s, the status +3.3 s and an Event +4.5 s after
/// the abort (two runs); in a soak such a plan of a killed replica promoted a pod after its
/// restarted successor had failed the lock over to another (2 ms of two writers). Now the
/// controller and the renewals end with the replica (three runs: nothing after).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconcile_in_flight_when_its_replica_is_aborted_writes_nothing_after() {
    let (sim, client) = sim_with_crd().await;
    // The write window does not end a plan left running.
    let a = alone_with_a_long_fence(&sim, &client, 2, 10).await;
    let writer = until(10, "s0's writer labelled", || writer_of(&client, "s0")).await;
    sim.faults().update(|c| {
        c.latency_ms = 1200;
        c.writes_only = true;
        c.agents = vec!["stslock/a".into()];
    });
    let flipped_ms = sim.store().elapsed_ms();
    sim.pods().set_ready("default", &writer, false).unwrap();
    // The failover's first writes are served; the rest of its plan is still to come.
    until(10, "the failover's first write served", || {
        let log = sim.commit_log();
        async move {
            log.iter()
                .any(|c| c.actor == "stslock/a" && c.at_ms > flipped_ms)
                .then_some(())
        }
    })
    .await;
    // Its next write is sent meanwhile and waits out its latency in kubesim.
    tokio::time::sleep(Duration::from_millis(300)).await;
    a.task.abort();
    let _ = a.task.await;
    let killed_ms = sim.store().elapsed_ms();
    // Deliberate wait: the rest of the plan, had it gone on, would land within this.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let log = sim.commit_log();
    let after: Vec<String> = log
        .iter()
        .filter(|c| c.at_ms > killed_ms && c.actor == "stslock/a")
        .map(|c| {
            format!(
                "+{} ms: {} {} {}",
                c.at_ms - killed_ms,
                c.verb,
                c.resource,
                c.name
            )
        })
        .collect();
    let before = log
        .iter()
        .filter(|c| c.at_ms > flipped_ms && c.at_ms <= killed_ms && c.actor == "stslock/a")
        .count();
    println!("{before} writes of the failover before the abort; after it: {after:#?}");
    assert!(
        after.is_empty(),
        "the aborted replica's plan went on: {after:#?}"
    );
}

// ---------------------------------------------------------------------------------------------
// 18. A restarted replica whose ownership confirmations lose their answers.

/// a owns 8 locks alone (Leases of 12 s, its membership Lease 15 s as in production) and is
/// killed when they are 2 s old; it comes back 1 s
/// later with every request of it served 1 s late, every lock write of it committed but never
/// answered (the client gives up after its 2 s timeout) and its lock watch stalled, so that
/// only a read shows what its writes did. Its first write for each lock, the confirmation of
/// ownership after the restart, lands unanswered: the next look must learn that from one read
/// of the lock (its term is there) and go on to the Lease, not try the confirmation again on the
/// version it knew before (a 409 a second late) — before, each lock took several such
/// confirmation attempts, about a second each, and Leases lapsed (the chaos soak's last
/// operator lapses after restarts).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_replica_resolves_unanswered_confirmations_by_a_read() {
    let (sim, client) = sim_with_crd().await;
    let n = 8;
    let lease_ms = 12_000;
    let a = alone_with_a_long_fence(&sim, &client, n, 12).await;
    until_leases_aged(&sim, n, 2000..2300).await;
    a.task.abort();
    let _ = a.task.await;
    let killed_ms = sim.store().elapsed_ms();
    sim.faults().update(|c| {
        c.latency_ms = 1000;
        c.agents = vec!["stslock/a".into()];
        c.lose_responses = vec![
            LoseResponse::hang()
                .agent("stslock/a")
                .resource("statefulsetlocks"),
        ];
        c.watch_faults = vec![WatchFault::stall("statefulsetlocks").agent("stslock/a")];
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    let a = start(&sim, "a", |a| a.membership_lease_seconds = 15);
    // Deliberate wait: past the time the Leases would lapse, and one more renewal.
    tokio::time::sleep(Duration::from_millis(lease_ms + 3000)).await;
    let end_ms = sim.store().elapsed_ms();
    let log = sim.commit_log();
    let attempts = sim.write_attempts();
    sim.faults().update(|c| *c = Default::default());
    a.stop().await;
    for w in attempts
        .iter()
        .filter(|w| w.at_ms > killed_ms && w.actor == "stslock/a")
    {
        println!(
            "+{} {} {} {} -> {} in {} ms",
            w.at_ms - killed_ms,
            w.method,
            w.resource,
            w.name,
            w.status,
            w.elapsed_ms
        );
    }
    let mut worst_all = 0;
    let mut behind = vec![];
    for i in 0..n {
        let lock = format!("l{i}");
        let worst = longest_without_lease_write(&log, &lock, killed_ms, end_ms);
        let tries: Vec<String> = attempts
            .iter()
            .filter(|w| {
                w.at_ms > killed_ms
                    && w.actor == "stslock/a"
                    && w.resource == "statefulsetlocks"
                    && w.name == lock
            })
            .map(|w| format!("+{} {} {}", w.at_ms - killed_ms, w.method, w.status))
            .collect();
        println!("{lock}: longest without a Lease write {worst} ms; lock writes {tries:?}");
        worst_all = worst_all.max(worst);
        if tries.iter().any(|t| t.ends_with(" 409")) {
            behind.push((lock, tries));
        }
    }
    assert!(
        behind.is_empty(),
        "confirmations sent on a version known to be behind: {behind:?}"
    );
    assert!(
        worst_all < lease_ms,
        "a Lease went {worst_all} ms without a write across a's restart"
    );
    assert_never_two_writers(&sim);
}

// ---------------------------------------------------------------------------------------------
// A lock handed to a replica while it leaves is handed on by it.

/// The locks `owner` owns in `owned`.
fn locks_of<'a>(owned: &'a BTreeMap<String, Option<String>>, owner: &str) -> Vec<&'a String> {
    owned
        .iter()
        .filter(|(_, o)| o.as_deref() == Some(owner))
        .map(|(l, _)| l)
        .collect()
}

/// One of the locks `owned` shows owned by `owner`.
fn a_lock_of(owned: &BTreeMap<String, Option<String>>, owner: &str) -> String {
    owned
        .iter()
        .find(|(_, o)| o.as_deref() == Some(owner))
        .map(|(k, _)| k.clone())
        .unwrap_or_else(|| panic!("{owner} owns no lock: {owned:?}"))
}

/// Once a has marked its membership Lease leaving (its leave's first handoffs are then under
/// way) and `wait_ms` more have passed, label `lock` for a, as a peer's handoff that had not seen
/// the mark would. Returns the store time just before that write.
async fn relabel_for_a_during_its_leave(
    sim: &Sim,
    client: &Client,
    lock: &str,
    wait_ms: u64,
) -> u64 {
    until(10, "a's leave started handing off", || {
        let leases: Api<Lease> = Api::namespaced(client.clone(), "default");
        async move {
            let l = leases.get_opt("stslock-a").await.ok().flatten()?;
            l.annotations()
                .contains_key(stslock::sharding::LEAVING_ANNOTATION)
                .then_some(())
        }
    })
    .await;
    // Deliberate wait: a's first handoffs (label writes held 1.5 s each) are in flight.
    tokio::time::sleep(Duration::from_millis(wait_ms)).await;
    let at_ms = sim.store().elapsed_ms();
    let admin: Api<StatefulSetLock> = Api::namespaced(sim.client_as("kubectl"), "default");
    let relabel = json!({"metadata": {"labels": {SHARD_LABEL: "a"}}});
    admin
        .patch(lock, &PatchParams::default(), &Patch::Merge(&relabel))
        .await
        .unwrap();
    at_ms
}

/// Peers hand locks to a leaving replica until they see its leaving mark (or when the answer of
/// an earlier handoff was lost and it lands late). a leaves with every label write of it held
/// 1.5 s; once its own handoffs are under way, one of b's locks is labelled for a (as b's
/// handoff would). a must hand that lock on before it goes: before, its leave handed off only
/// the locks its cache showed when the leave began, and such a lock stayed labelled for a
/// (renewed by nobody) until b saw a gone and claimed it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_handed_to_a_leaving_replica_is_handed_on_before_it_goes() {
    let (sim, client) = sim_with_crd().await;
    let (a, b, owned) = a_and_b_with_locks(&sim, &client, 16, 2, 10).await;
    let late = a_lock_of(&owned, "b");
    sim.faults()
        .update(|c| c.hold_responses = vec![a_lock_writes_answered_late()]);
    let from = sim.commit_log().last().map_or(0, |c| c.rv);
    let _ = a.stop.send(());
    relabel_for_a_during_its_leave(&sim, &client, &late, 500).await;
    let finished = tokio::time::timeout(Duration::from_secs(40), a.task).await;
    assert!(finished.is_ok(), "a's leave did not finish within 40 s");
    sim.faults().set(kubesim::FaultConfig::default());
    until_owned_by(&client, &["b"], 20).await;
    b.stop().await;

    let log = sim.commit_log();
    let moves = audit(&log).moves;
    let handed_on: Vec<_> = moves
        .iter()
        .filter(|(rv, lock, from_owner, to, actor)| {
            *rv > from
                && *lock == late
                && from_owner.as_deref() == Some("a")
                && to == "b"
                && actor == "stslock/a"
        })
        .collect();
    println!(
        "moves of {late} after the stop: {:?}",
        moves
            .iter()
            .filter(|m| m.0 > from && m.1 == late)
            .collect::<Vec<_>>()
    );
    assert!(
        !handed_on.is_empty(),
        "a left without handing {late} on (labelled for it during its leave)"
    );
    assert!(audit(&log).non_owner.is_empty());
    assert_never_two_writers(&sim);
}

/// As above, but the Lease of the lock labelled for a during its leave must also stay renewed
/// until it is handed on: a's leave (48 locks, its label writes answered 1.5 s late) takes
/// seconds, and the lock's 3 s Lease cannot wait for its end. Before, nothing renewed such a
/// lock until the leave's first pass had handed off everything else and listed the locks left
/// (the P5 run of seed 20261216: three Leases of locks handed to a replica restarting
/// gracefully lapsed that way).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_handed_to_a_leaving_replica_keeps_its_lease_renewed() {
    let (sim, client) = sim_with_crd().await;
    let lease_ms = 3000;
    let (a, b, owned) = a_and_b_with_locks(&sim, &client, 48, 1, 3).await;
    until_leases(&client, 48).await;
    let late = a_lock_of(&owned, "b");
    sim.faults()
        .update(|c| c.hold_responses = vec![a_lock_writes_answered_late()]);
    let _ = a.stop.send(());
    let from_ms = relabel_for_a_during_its_leave(&sim, &client, &late, 300).await;
    let finished = tokio::time::timeout(Duration::from_secs(40), a.task).await;
    assert!(finished.is_ok(), "a's leave did not finish within 40 s");
    sim.faults().set(kubesim::FaultConfig::default());
    until_owned_by(&client, &["b"], 20).await;
    // b renews it again once it has it back.
    tokio::time::sleep(Duration::from_millis(lease_ms)).await;
    let end_ms = sim.store().elapsed_ms();
    b.stop().await;

    let log = sim.commit_log();
    let worst = longest_without_lease_write(&log, &late, from_ms, end_ms);
    println!(
        "{late}: labelled for a during its leave; longest time without a Lease write {worst} ms"
    );
    assert!(
        worst < lease_ms,
        "{late}'s Lease went {worst} ms without a write (its Lease: {lease_ms} ms)"
    );
    assert!(audit(&log).non_owner.is_empty());
    assert_never_two_writers(&sim);
}

/// a, b and c share the locks; a's label writes are answered 1.5 s late, so its leave's
/// handoffs go out in batches over several seconds. Once a's leave is under way, b begins a
/// leave of its own. a must stop handing locks to b once it has seen b's mark: before, every
/// handoff of a leave went to the owner on the ring as it was when the leave began, and locks
/// went to a replica that was itself leaving (in the chaos soak, one whose leave then missed
/// them, so their Leases lapsed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leave_stops_handing_locks_to_a_peer_that_began_to_leave_meanwhile() {
    let (sim, client) = sim_with_crd().await;
    statefulsets(&client, 0..90, 1).await;
    locks(&client, 0..90, 10).await;
    let a = start(&sim, "a", |_| {});
    let b = start(&sim, "b", |_| {});
    let c = start(&sim, "c", |_| {});
    until_owned_by(&client, &["a", "b", "c"], 60).await;
    sim.faults()
        .update(|f| f.hold_responses = vec![a_lock_writes_answered_late()]);
    let _ = a.stop.send(());
    let marked = |id: &'static str| {
        let leases: Api<Lease> = Api::namespaced(client.clone(), "default");
        async move {
            // Marked, or already gone (a leave with nothing slowing it is over in milliseconds).
            match leases.get_opt(&format!("stslock-{id}")).await.ok()? {
                Some(l) => l
                    .annotations()
                    .contains_key(stslock::sharding::LEAVING_ANNOTATION)
                    .then_some(()),
                None => Some(()),
            }
        }
    };
    until(10, "a's leave started", || marked("a")).await;
    // Deliberate wait: a's first handoffs (label writes answered 1.5 s late) are in flight.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _ = b.stop.send(());
    until(10, "b's leave started", || marked("b")).await;
    // Deliberate wait: a's membership watch delivers b's mark (milliseconds on kubesim).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let seen = sim.commit_log().last().map_or(0, |c| c.rv);
    let finished = tokio::time::timeout(Duration::from_secs(40), a.task).await;
    assert!(finished.is_ok(), "a's leave did not finish within 40 s");
    sim.faults().set(kubesim::FaultConfig::default());
    let _ = tokio::time::timeout(Duration::from_secs(40), b.task).await;
    until_owned_by(&client, &["c"], 30).await;
    c.stop().await;

    let log = sim.commit_log();
    let to_b = moved_after(&log, seen, "a", "b");
    let to_c = moved_after(&log, seen, "a", "c");
    println!("a's handoffs after it saw b's mark: to b {to_b:?}, to c {to_c:?}");
    assert!(
        !to_c.is_empty(),
        "a's leave had no handoffs left after b began to leave: the test shows nothing"
    );
    assert!(
        to_b.is_empty(),
        "a handed {to_b:?} to b after b had begun to leave"
    );
    assert!(audit(&log).non_owner.is_empty());
    assert_never_two_writers(&sim);
}

/// b's membership watch is stalled when a leaves gracefully, a's label writes answered 1.5 s
/// late: a's leave hands every lock of a to b, and b's ring (behind the stall) still has a on
/// it, so b would hand about half of them straight back — to a replica that hands them on again
/// (under slow answers their Leases lapsed meanwhile: the P5 soak). b reads the membership
/// afresh before it hands a lock off, sees a's mark, and keeps them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_handed_over_by_a_leaving_peer_is_not_handed_back_to_it() {
    let (sim, client) = sim_with_crd().await;
    let (a, b, _) = a_and_b_with_locks(&sim, &client, 40, 1, 10).await;
    sim.faults().update(|f| {
        f.watch_faults = vec![
            WatchFault::stall("leases")
                .agent("stslock/b")
                .label_selector("app.anukkrit.me/shard-group"),
        ];
        f.hold_responses = vec![a_lock_writes_answered_late()];
    });
    // The stall shapes b's open watch from the next event on: a's leaving mark is not seen.
    let from = sim.commit_log().last().map_or(0, |c| c.rv);
    let _ = a.stop.send(());
    let finished = tokio::time::timeout(Duration::from_secs(40), a.task).await;
    assert!(finished.is_ok(), "a's leave did not finish within 40 s");
    sim.faults().set(kubesim::FaultConfig::default());
    until_owned_by(&client, &["b"], 30).await;
    b.stop().await;

    let log = sim.commit_log();
    let (to_b, back) = (
        moved_after(&log, from, "a", "b"),
        moved_after(&log, from, "b", "a"),
    );
    println!(
        "a's leave handed {} locks to b; b handed {back:?} back to a",
        to_b.len()
    );
    assert!(
        !to_b.is_empty(),
        "a's leave handed nothing to b: the test shows nothing"
    );
    assert!(
        back.is_empty(),
        "b handed {back:?} back to a, which was leaving"
    );
    assert!(audit(&log).non_owner.is_empty());
    assert_never_two_writers(&sim);
}

/// a's lock watch is stalled when one of b's locks is labelled for a; then a leaves, its label
/// writes answered 1.5 s late. a's leave must hand that lock on with its first handoffs: a has
/// never seen it, so nothing renews its Lease until it moves. Before, the leave handed off what
/// its cache showed first and listed the API server only after those handoffs, seconds later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leave_hands_on_first_the_locks_its_stalled_cache_never_showed() {
    let (sim, client) = sim_with_crd().await;
    let (a, b, owned) = a_and_b_with_locks(&sim, &client, 96, 1, 10).await;
    let of_a = owned.values().filter(|o| o.as_deref() == Some("a")).count();
    assert!(
        of_a >= 40,
        "a owns {of_a} locks: fewer than three batches of handoffs"
    );
    let late = a_lock_of(&owned, "b");
    sim.faults().update(|f| {
        f.watch_faults = vec![WatchFault::stall("statefulsetlocks").agent("stslock/a")];
        f.hold_responses = vec![a_lock_writes_answered_late()];
    });
    let admin: Api<StatefulSetLock> = Api::namespaced(sim.client_as("kubectl"), "default");
    let relabel = json!({"metadata": {"labels": {SHARD_LABEL: "a"}}});
    admin
        .patch(&late, &PatchParams::default(), &Patch::Merge(&relabel))
        .await
        .unwrap();
    // Deliberate wait: the relabel is committed and b's watch has shown it (milliseconds).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let from = sim.commit_log().last().map_or(0, |c| c.rv);
    let finished = tokio::time::timeout(Duration::from_secs(40), a.stop()).await;
    assert!(finished.is_ok(), "a's leave did not finish within 40 s");
    sim.faults().set(kubesim::FaultConfig::default());
    until_owned_by(&client, &["b"], 20).await;
    b.stop().await;

    let log = sim.commit_log();
    let handoffs: Vec<String> = audit(&log)
        .moves
        .into_iter()
        .filter(|m| m.0 > from && m.2.as_deref() == Some("a") && m.4 == "stslock/a")
        .map(|m| m.1)
        .collect();
    println!("a's handoffs in commit order: {handoffs:?}");
    let at = handoffs.iter().position(|l| *l == late);
    // Its handoff is started first, with the first batch of 16; it takes longer than the others
    // (a has never renewed its Lease: the renewal before the handoff reads and confirms it), so
    // it commits within the first two batches.
    assert!(
        at.is_some_and(|i| i < 32),
        "a handed {late} on at position {at:?} of its {} handoffs, not within its first 32",
        handoffs.len()
    );
    assert!(audit(&log).non_owner.is_empty());
    assert_never_two_writers(&sim);
}

/// a's answers to pod writes are held 8 s (its api timeout is 5 s, its membership Lease 12 s),
/// and one of its writers fails, so a reconcile of a is stuck in a pod write when a is stopped
/// gracefully. a's leave must begin at once, beside that reconcile: before, it began only once
/// the running reconciles had ended (here, when the pod write timed out), and every lock of a
/// waited, unhandled, although peers had already taken a off the ring.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_leave_does_not_wait_for_a_reconcile_stuck_in_a_write() {
    let (sim, client) = sim_with_crd().await;
    statefulsets(&client, 0..16, 2).await;
    locks(&client, 0..16, 10).await;
    // Every write's timeout is bounded by the fence window too: a's membership Lease is long
    // enough for the api timeout to be the bound.
    let a = start(&sim, "a", |args| {
        args.api_timeout_seconds = 5;
        args.membership_lease_seconds = 12;
    });
    let b = start(&sim, "b", |_| {});
    let owned = until_owned_by(&client, &["a", "b"], 30).await;
    let lock = owned
        .iter()
        .find(|(_, o)| o.as_deref() == Some("a"))
        .map(|(k, _)| k.clone())
        .expect("a owns a lock");
    let set = lock.replacen('l', "s", 1);
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let writer = until(20, "a writer-labelled pod of a's lock", || {
        let (pods, selector) = (pods.clone(), format!("sts-role=writer,app={set}"));
        async move {
            pods.list(&ListParams::default().labels(&selector))
                .await
                .ok()?
                .items
                .first()
                .map(|p| p.name_any())
        }
    })
    .await;
    sim.faults().update(|f| {
        f.hold_responses = vec![HoldResponse::new(8000).agent("stslock/a").resource("pods")];
    });
    let from_ms = sim.store().elapsed_ms();
    sim.pods().set_ready("default", &writer, false).unwrap();
    until(10, "a's failover wrote a pod (its answer is held)", || {
        let log = sim.commit_log();
        let wrote = log
            .iter()
            .any(|c| c.at_ms >= from_ms && c.actor == "stslock/a" && c.resource == "pods");
        async move { wrote.then_some(()) }
    })
    .await;
    let from = sim.commit_log().last().map_or(0, |c| c.rv);
    let stop_ms = sim.store().elapsed_ms();
    let finished = tokio::time::timeout(Duration::from_secs(40), a.stop()).await;
    assert!(finished.is_ok(), "a's leave did not finish within 40 s");
    sim.faults().set(kubesim::FaultConfig::default());
    until_owned_by(&client, &["b"], 20).await;
    b.stop().await;

    let log = sim.commit_log();
    let first = audit(&log)
        .moves
        .into_iter()
        .find(|m| m.0 > from && m.2.as_deref() == Some("a") && m.4 == "stslock/a")
        .expect("a handed a lock off");
    let at_ms = log
        .iter()
        .find(|c| c.rv == first.0)
        .map(|c| c.at_ms)
        .expect("the handoff's commit");
    println!(
        "a's first handoff ({}) committed {} ms after the stop",
        first.1,
        at_ms - stop_ms
    );
    // The stuck pod write ends at a's 5 s api timeout; a leave that waits for it starts after.
    assert!(
        at_ms - stop_ms < 2500,
        "a's first handoff committed {} ms after the stop: its leave waited for the stuck reconcile",
        at_ms - stop_ms
    );
    assert!(audit(&log).non_owner.is_empty());
    assert_never_two_writers(&sim);
}

// ---------------------------------------------------------------------------------------------
// 20. Handoffs whose outcome is unknown are settled together, not one after another.

/// a owns 40 locks (8 s Leases) alone; b joins, and every lock write of a fails with a 500
/// meanwhile: each handoff to b ends with an unknown outcome, and until it is settled (see
/// `Sharding::resolve_unknown_handoffs`) a sends nothing for that lock — not even its Lease's
/// renewal (the handoff may have landed). Then the writes go through again but every lock
/// request of a takes 1 s. The ~20 unresolved locks must be settled together: one after
/// another (an assignment pass and a timer both resolve, so two at a time), the last were
/// settled about 10 × 1 s after the faults changed, and their Leases, held by Ready writers,
/// went longer than a Lease without a renewal (a P5 fault run lost two Leases that way).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_handoff_outcomes_are_resolved_together() {
    let (sim, client) = sim_with_crd().await;
    let (n, lease_ms) = (40, 8_000u64);
    let a = alone_with_locks(&sim, &client, n, 8).await;
    sim.faults().update(|c| {
        c.error_rate = 1.0;
        c.error_code = 500;
        c.writes_only = true;
        c.agents = vec!["stslock/a".into()];
        c.resources = vec!["statefulsetlocks".into()];
    });
    let from_ms = sim.store().elapsed_ms();
    let b = start(&sim, "b", |_| {});
    // b joins the ring, and a's assignment passes (every 300 ms) try their handoffs to b, each
    // failing with a 500 and left unresolved: wait until a dozen locks had a failed write
    // (kubesim's record of every write request; with its 40 locks settled, a's lock writes
    // now are those handoffs and the renewals' confirmations before them).
    until(20, "a's failed handoffs of a dozen locks", || {
        let failed: std::collections::BTreeSet<String> = sim
            .write_attempts()
            .into_iter()
            .filter(|w| {
                w.actor == "stslock/a"
                    && w.resource == "statefulsetlocks"
                    && w.status >= 500
                    && w.at_ms > from_ms
            })
            .map(|w| w.name)
            .collect();
        std::future::ready((failed.len() >= 12).then_some(()))
    })
    .await;
    // Deliberate wait: a's later passes keep trying to settle the unresolved handoffs (each
    // a write that fails like the handoff did); none may move a lock meanwhile.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let moved = owners(&client)
        .await
        .values()
        .filter(|o| o.as_deref() == Some("b"))
        .count();
    assert_eq!(moved, 0, "a lock moved to b while a's lock writes failed");
    sim.faults().update(|c| {
        c.error_rate = 0.0;
        c.writes_only = false;
        c.latency_ms = 1000;
    });
    let owned = until_owned_by(&client, &["a", "b"], 40).await;
    let end_ms = sim.store().elapsed_ms();
    sim.faults().set(kubesim::FaultConfig::default());
    let log = sim.commit_log();
    a.stop().await;
    b.stop().await;

    let handed = locks_of(&owned, "b");
    assert!(
        handed.len() >= 12,
        "the ring gave b too few locks: {owned:?}"
    );
    let mut worst_of_all = 0;
    for lock in &handed {
        let worst = longest_without_lease_write(&log, lock, from_ms, end_ms);
        worst_of_all = worst_of_all.max(worst);
        assert!(
            worst < lease_ms,
            "{lock}'s Lease went {worst} ms without a write while its handoff was unresolved"
        );
    }
    println!(
        "{} locks handed to b after failed handoffs; longest time without a Lease write {worst_of_all} ms (Leases of {lease_ms} ms)",
        handed.len()
    );
    assert!(audit(&log).non_owner.is_empty());
    assert_never_two_writers(&sim);
}
