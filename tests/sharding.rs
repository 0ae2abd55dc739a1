//! Several operator replicas split the locks: every lock is owned by exactly one live replica,
//! the load is balanced, a graceful leave or an abrupt death of a replica moves only its locks.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on setup failures

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::StatefulSet;
use kube::api::{ListParams, PostParams};
use kube::{Api, Client, ResourceExt};
use kubesim::{Sim, SimConfig};
use serde_json::json;
use stslock::api::{SHARD_LABEL, StatefulSetLock};
use stslock::config::OperatorArgs;
use tokio::sync::oneshot;

struct Replica {
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

fn start(sim: &Sim, id: &str, membership_secs: u64) -> Replica {
    let mut a = OperatorArgs::for_shard(id);
    a.membership_lease_seconds = membership_secs;
    a.api_timeout_seconds = 5;
    let client = sim.client_as(&format!("stslock/{id}"));
    let (stop, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        stslock::reconcile::run(client, a, async {
            let _ = rx.await;
        })
        .await
        .expect("operator");
    });
    Replica { stop, task }
}

async fn fleet(client: &Client, n: usize, lease_seconds: i32) {
    let sets: Api<StatefulSet> = Api::namespaced(client.clone(), "default");
    let locks: Api<StatefulSetLock> = Api::namespaced(client.clone(), "default");
    for i in 0..n {
        let sts: StatefulSet = serde_json::from_value(json!({
            "metadata": {"name": format!("s{i}")},
            "spec": {"serviceName": "s", "replicas": 1, "selector": {"matchLabels": {"app": format!("s{i}")}},
                     "template": {"metadata": {"labels": {"app": format!("s{i}")}}, "spec": {"containers": [{"name": "c", "image": "x:1"}]}}}
        }))
        .unwrap();
        sets.create(&PostParams::default(), &sts).await.unwrap();
        let l: StatefulSetLock = serde_json::from_value(json!({"apiVersion": "app.anukkrit.me/v1", "kind": "StatefulSetLock",
            "metadata": {"name": format!("l{i}")}, "spec": {"statefulSetName": format!("s{i}"), "leaseName": format!("lease{i}"), "leaseDurationSeconds": lease_seconds}}))
        .unwrap();
        locks.create(&PostParams::default(), &l).await.unwrap();
    }
}

/// Owner label of every lock (None when unlabelled).
async fn owners(client: &Client) -> BTreeMap<String, Option<String>> {
    let locks: Api<StatefulSetLock> = Api::namespaced(client.clone(), "default");
    locks
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .iter()
        .map(|l| (l.name_any(), l.labels().get(SHARD_LABEL).cloned()))
        .collect()
}

async fn until_owned_by(
    client: &Client,
    live: &HashSet<String>,
    secs: u64,
) -> (BTreeMap<String, Option<String>>, Duration) {
    let start = Instant::now();
    loop {
        let o = owners(client).await;
        // Every lock owned by a live replica, and every live replica owning at least half its
        // share (a replica that just joined is not yet seen by its peers: the locks are all
        // owned by live replicas before its handoffs have even started).
        let c = counts(&o);
        let fair = o.len() / (2 * live.len().max(1));
        if o.values()
            .all(|v| v.as_ref().is_some_and(|v| live.contains(v)))
            && live.iter().all(|r| c.get(r).copied().unwrap_or(0) >= fair)
        {
            // Stable for a moment: no more handoffs in flight.
            tokio::time::sleep(Duration::from_millis(700)).await;
            let again = owners(client).await;
            if again == o {
                return (o, start.elapsed());
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(secs),
            "locks not all owned by {live:?} after {secs}s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
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
    let mut cfg = SimConfig::default();
    cfg.controllers.pod_ready_delay = Duration::from_millis(20);
    let sim = Sim::start(cfg);
    let client = sim.client_as("test");
    stslock::dev::install_crd(&client).await.unwrap();
    let n = 1000;
    fleet(&client, n, 30).await;
    let mut replicas: BTreeMap<String, Replica> = (0..3)
        .map(|i| (format!("r{i}"), start(&sim, &format!("r{i}"), 3)))
        .collect();
    let live: HashSet<String> = replicas.keys().cloned().collect();
    let (three, took) = until_owned_by(&client, &live, 60).await;
    let c = counts(&three);
    let max = *c.values().max().unwrap() as f64;
    let balance = max / (n as f64 / 3.0);
    println!("3 replicas, {n} locks: {c:?}, busiest/mean {balance:.3}, all owned after {took:?}");
    assert!(
        balance <= 1.15,
        "busiest replica owns {balance:.3}x the mean"
    );

    // A 4th replica joins: it takes about its share, nothing else moves.
    replicas.insert("r3".into(), start(&sim, "r3", 3));
    let live4: HashSet<String> = replicas.keys().cloned().collect();
    let (four, _) = until_owned_by(&client, &live4, 60).await;
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
    let r1 = replicas.remove("r1").unwrap();
    let left_at = Instant::now();
    let _ = r1.stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(30), r1.task).await;
    let live3: HashSet<String> = replicas.keys().cloned().collect();
    let (after_leave, _) = until_owned_by(&client, &live3, 30).await;
    println!("graceful leave handed off in {:?}", left_at.elapsed());
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
    let r2 = replicas.remove("r2").unwrap();
    r2.task.abort();
    let died = Instant::now();
    let live2: HashSet<String> = replicas.keys().cloned().collect();
    let (_, _) = until_owned_by(&client, &live2, 3 + 5 + 5).await;
    let reowned = died.elapsed();
    println!("abrupt death: all locks owned again after {reowned:?} (membership Lease 3 s)");
    assert!(reowned <= Duration::from_secs(3 + 5 + 1), "{reowned:?}");
    assert_eq!(sim.report().dual_writer_intervals, 0);
    for (_, r) in replicas {
        let _ = r.stop.send(());
        let _ = tokio::time::timeout(Duration::from_secs(30), r.task).await;
    }
}

/// A replica cut off from the API (kubesim partition by User-Agent) stops writing; its peer
/// takes its locks only after that, and it rejoins cleanly when the partition heals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_replica_stops_writing_before_its_peer_takes_over() {
    let mut cfg = SimConfig::default();
    cfg.controllers.pod_ready_delay = Duration::from_millis(20);
    let sim = Sim::start(cfg);
    let client = sim.client_as("test");
    stslock::dev::install_crd(&client).await.unwrap();
    fleet(&client, 40, 30).await;
    let r0 = start(&sim, "r0", 3);
    let r1 = start(&sim, "r1", 3);
    let live: HashSet<String> = ["r0".to_string(), "r1".to_string()].into();
    let (before, _) = until_owned_by(&client, &live, 60).await;
    let r1_locks: Vec<String> = before
        .iter()
        .filter(|(_, v)| v.as_deref() == Some("r1"))
        .map(|(k, _)| k.clone())
        .collect();
    assert!(!r1_locks.is_empty());

    let cut_at = sim.commit_log().last().map(|c| c.at_ms).unwrap_or(0);
    sim.faults()
        .update(|f| f.partitioned = vec!["stslock/r1".into()]);
    let only_r0: HashSet<String> = ["r0".to_string()].into();
    let (_, took) = until_owned_by(&client, &only_r0, 20).await;
    println!("partition: r0 owns all locks {took:?} after r1 was cut off");
    let log = sim.commit_log();
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
    sim.faults().update(|f| f.partitioned.clear());
    let (after, _) = until_owned_by(&client, &live, 30).await;
    assert!(
        after.values().any(|v| v.as_deref() == Some("r1")),
        "r1 rejoined"
    );
    assert_eq!(sim.report().dual_writer_intervals, 0);
    for r in [r0, r1] {
        let _ = r.stop.send(());
        let _ = tokio::time::timeout(Duration::from_secs(30), r.task).await;
    }
}

/// 50 abrupt kill/restart cycles of random replicas while writers fail: kubesim's commit log,
/// which records each lock's owner label with every write to it, shows that every operator
/// write for a lock (its Lease, its pods' labels, its status) came from the replica that owned
/// the lock at that moment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_kill_restart_cycles_never_let_a_non_owner_write() {
    let mut cfg = SimConfig::default();
    cfg.controllers.pod_ready_delay = Duration::from_millis(20);
    cfg.store.recorded_labels = vec![SHARD_LABEL.to_string()];
    let sim = Sim::start(cfg);
    let client = sim.client_as("test");
    stslock::dev::install_crd(&client).await.unwrap();
    let n = 60;
    // Short leases: renewals every second give many writes to check.
    fleet(&client, n, 2).await;
    let ids = ["r0", "r1", "r2"];
    let mut replicas: BTreeMap<String, Replica> = ids
        .iter()
        .map(|id| (id.to_string(), start(&sim, id, 2)))
        .collect();
    let live: HashSet<String> = ids.iter().map(|s| s.to_string()).collect();
    until_owned_by(&client, &live, 60).await;
    for cycle in 0..50usize {
        let id = ids[cycle % 3];
        if let Some(r) = replicas.remove(id) {
            r.task.abort();
        }
        // Fail some writer meanwhile (it comes back as a reader).
        let pod = format!("s{}-0", cycle % n);
        let _ = sim.pods().set_ready("default", &pod, cycle % 2 == 0);
        tokio::time::sleep(Duration::from_millis(150 + 37 * (cycle as u64 % 5))).await;
        replicas.insert(id.to_string(), start(&sim, id, 2));
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    until_owned_by(&client, &live, 60).await;
    for (_, r) in std::mem::take(&mut replicas) {
        let _ = r.stop.send(());
        let _ = tokio::time::timeout(Duration::from_secs(30), r.task).await;
    }
    // Owner of each lock over time, from the commit log (the label recorded on each write).
    let log = sim.commit_log();
    let mut owner: BTreeMap<String, String> = BTreeMap::new();
    let mut checked = 0;
    let mut violations = vec![];
    for c in &log {
        if c.resource == "statefulsetlocks" {
            let before = owner.get(&c.name).cloned();
            if let Some(o) = c.labels.get(SHARD_LABEL) {
                owner.insert(c.name.clone(), o.clone());
            }
            // A status or finalizer write must come from the owner before this commit (a label
            // change itself may come from the previous owner handing off, or a claimer).
            let label_change = before.as_deref() != c.labels.get(SHARD_LABEL).map(String::as_str);
            if let Some(actor) = c.actor.strip_prefix("stslock/")
                && !label_change
            {
                checked += 1;
                if owner.get(&c.name).map(String::as_str) != Some(actor) {
                    violations.push(format!(
                        "{} wrote lock {} owned by {:?} (rv {})",
                        actor,
                        c.name,
                        owner.get(&c.name),
                        c.rv
                    ));
                }
            }
            continue;
        }
        let Some(actor) = c.actor.strip_prefix("stslock/") else {
            continue;
        };
        // Writes for lock l{i}: its Lease lease{i}, the pods s{i}-*.
        let lock = if c.resource == "leases" {
            c.name.strip_prefix("lease").map(|i| format!("l{i}"))
        } else if c.resource == "pods" {
            c.name
                .strip_prefix('s')
                .and_then(|r| r.split_once('-'))
                .map(|(i, _)| format!("l{i}"))
        } else {
            None
        };
        if let Some(lock) = lock {
            checked += 1;
            if owner.get(&lock).map(String::as_str) != Some(actor) {
                violations.push(format!(
                    "{} wrote {} {} for lock {lock} owned by {:?} (rv {})",
                    actor,
                    c.resource,
                    c.name,
                    owner.get(&lock),
                    c.rv
                ));
            }
        }
    }
    println!(
        "50 kill/restart cycles: {checked} operator writes checked against the owner at the time, {} violations",
        violations.len()
    );
    assert!(checked > 800, "too few writes checked: {checked}");
    assert!(violations.is_empty(), "{violations:#?}");
    assert_eq!(sim.report().dual_writer_intervals, 0);
}
