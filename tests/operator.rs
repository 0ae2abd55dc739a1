//! The operator against kubesim or a real control plane (`tests/common`): the behaviour the
//! seed's README promises, and none of the seed's failure modes. Every test ends by checking
//! the invariant report of a record the operator did not write (kubesim's history, or the
//! harness's own pod watch on a real cluster): no instant with two writer-labelled pods.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on setup failures

use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use kube::ResourceExt;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;
use stslock::api::StatefulSetLock;

mod common;
use common::{Env, Options};

/// Runs a test body with 1 and with 3 operator replicas: P2's behaviour must hold for both.
macro_rules! replicas_test {
    ($name:ident) => {
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn one_replica() {
                super::$name(1).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn three_replicas() {
                super::$name(3).await
            }
        }
    };
}

async fn seed_samples_elect_pod_zero_and_renew(replicas: usize) {
    let env = Env::start(replicas).await;
    let applied = env.apply_samples().await;
    assert_eq!(applied.len(), 5);
    env.wait_writer("postgres", "postgres-cluster-0").await;
    let lease = env
        .leases()
        .get("postgres-cluster-leader-lease")
        .await
        .unwrap();
    let spec = lease.spec.clone().unwrap();
    assert_eq!(spec.holder_identity.as_deref(), Some("postgres-cluster-0"));
    assert_eq!(spec.lease_duration_seconds, Some(30));
    assert_eq!(spec.lease_transitions, Some(0));
    env.wait_condition("postgres-cluster-lock", "Available", "True", "WriterReady")
        .await;
    let st = env.lock_status("postgres-cluster-lock").await;
    assert_eq!(st.writer_pod.as_deref(), Some("postgres-cluster-0"));
    assert_eq!(st.observed_generation, Some(1));
    assert_eq!(st.writer_epoch, Some(0));
    let writer = env.pods().get("postgres-cluster-0").await.unwrap();
    assert_eq!(
        writer
            .annotations()
            .get("app.anukkrit.me/writer-epoch")
            .map(String::as_str),
        Some("0")
    );
    assert_eq!(st.writer_uid, writer.uid());
    env.wait_event("postgres-cluster-lock", "Elected", |r, _| r == "Elected")
        .await;
    env.assert_never_two_writers().await;
}

async fn lease_is_renewed_at_half_its_duration_and_idle_locks_write_only_renewals(replicas: usize) {
    let env = Env::start(replicas).await;
    let locks = 100;
    for i in 0..locks {
        env.statefulset(&format!("s{i}"), 2).await;
        env.lock(
            &format!("l{i}"),
            &format!("s{i}"),
            &format!("lease{i}"),
            2,
            json!({}),
        )
        .await;
    }
    for i in 0..locks {
        // Both pods exist and are labelled (wait_writer waits for the StatefulSet's count).
        env.wait_writer(&format!("s{i}"), &format!("s{i}-0")).await;
        env.wait_condition(&format!("l{i}"), "Available", "True", "WriterReady")
            .await;
        // And the status counts both Ready (a later count would be a status write).
        let (locks, name) = (env.locks(), format!("l{i}"));
        env.until(30, &format!("{name} status with 2 Ready pods"), move || {
            let (locks, name) = (locks.clone(), name.clone());
            Box::pin(async move {
                let l = common::call("get lock", locks.get(&name)).await.ok()?;
                (l.status?.ready_replicas == Some(2)).then_some(())
            })
        })
        .await;
    }
    // With several replicas, locks the first one elected move once the group forms.
    env.wait_ring_settled(60).await;
    // Idle for two lease periods: the operator writes nothing but Lease renewals, one per lock
    // per second (half of 2 s).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let start = env.commit_log().last().map(|c| c.seq).unwrap_or(0);
    tokio::time::sleep(Duration::from_secs(4)).await;
    let writes: Vec<_> = env
        .commit_log()
        .into_iter()
        .filter(|c| c.seq > start && c.by_operator())
        .collect();
    let non_lease: Vec<_> = writes.iter().filter(|c| c.resource != "leases").collect();
    assert!(
        non_lease.is_empty(),
        "idle locks wrote more than renewals: {non_lease:?}"
    );
    let renewals = writes.len();
    // 100 locks x 4 s / 1 s = 400 renewals; allow scheduling slack.
    assert!(
        (320..=480).contains(&renewals),
        "{renewals} renewals in 4 s for 100 locks of 2 s"
    );
    let mut gaps = vec![];
    for i in 0..locks {
        let name = format!("lease{i}");
        let at: Vec<u64> = writes
            .iter()
            .filter(|c| c.name == name)
            .map(|c| c.at_ms)
            .collect();
        gaps.extend(at.windows(2).map(|w| w[1] - w[0]));
    }
    gaps.sort_unstable();
    let (lo, hi) = (gaps[0], gaps[gaps.len() - 1]);
    println!(
        "idle: {renewals} writes in 4 s for {locks} locks, all Lease renewals; gaps for 2 s leases over {} renewals: min {lo} ms, median {} ms, max {hi} ms",
        gaps.len(),
        gaps[gaps.len() / 2]
    );
    // The renewal lane renews at half the duration, up to 5 % early by jitter; the reconcile
    // lane's safety net would only renew at 1.6 s, so gaps near that mean the lane is broken.
    assert!(
        lo >= 700 && hi <= 1300,
        "renewal gaps {lo}..{hi} ms for a 2 s lease"
    );
    env.assert_never_two_writers().await;
}

async fn notready_writer_fails_over_and_does_not_fail_back(replicas: usize) {
    let env = Env::start(replicas).await;
    env.statefulset("db", 3).await;
    env.lock("lock", "db", "db-lease", 30, json!({})).await;
    env.wait_writer("db", "db-0").await;
    env.set_ready("db-0", false).await;
    env.wait_writer("db", "db-1").await;
    let lease = env.leases().get("db-lease").await.unwrap().spec.unwrap();
    assert_eq!(lease.holder_identity.as_deref(), Some("db-1"));
    assert_eq!(lease.lease_transitions, Some(1));
    // Demoted before the promotion, in commit order.
    let (demoted, promoted) = env
        .commits_until(5, "the operator's writes to db-0 and db-1", |log| {
            let pos = |name: &str| {
                log.iter()
                    .rposition(|c| c.resource == "pods" && c.name == name && c.by_operator())
            };
            Some((pos("db-0")?, pos("db-1")?))
        })
        .await;
    assert!(demoted < promoted, "old writer demoted first");
    // It comes back: stays reader.
    env.set_ready("db-0", true).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        env.roles("db").await[0],
        ("db-0".into(), Some("reader".into()))
    );
    env.wait_writer("db", "db-1").await;
    env.wait_event("lock", "Failover (db-0 is not Ready)", |r, m| {
        r == "Failover" && m.contains("db-0 is not Ready")
    })
    .await;
    env.assert_never_two_writers().await;
}

/// Asserts `lease` names `holder` at `epoch` and was renewed within its duration.
async fn assert_lease_held(env: &Env, lease: &str, holder: &str, epoch: i32) {
    let spec = env.leases().get(lease).await.unwrap().spec.unwrap();
    assert_eq!(spec.holder_identity.as_deref(), Some(holder));
    assert_eq!(spec.lease_transitions, Some(epoch));
    let renewed = spec.renew_time.expect("renewTime").0;
    let age = jiff::Timestamp::now().duration_since(renewed);
    let limit = jiff::SignedDuration::from_secs(i64::from(spec.lease_duration_seconds.unwrap()));
    assert!(
        age < limit,
        "Lease {lease} of {holder} lapsed: renewed {age:?} ago"
    );
}

async fn a_writer_keeps_its_lease_while_it_keeps_the_label(replicas: usize) {
    // The Lease moves only with the label: a NotReady writer waiting out failoverDelaySeconds,
    // or one with no Ready pod to hand over to, keeps its Lease renewed (2 s Leases here, so
    // an unrenewed one lapses within the waits below).
    let env = Env::start(replicas).await;
    env.statefulset("db", 2).await;
    env.lock(
        "lock",
        "db",
        "db-lease",
        2,
        json!({"failoverDelaySeconds": 6}),
    )
    .await;
    env.wait_writer("db", "db-0").await;
    env.wait_roles("db", 2).await;
    env.set_ready("db-0", false).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        env.roles("db").await[0],
        ("db-0".into(), Some("writer".into()))
    );
    assert_lease_held(&env, "db-lease", "db-0", 0).await;
    env.wait_writer("db", "db-1").await;
    // db-1 goes NotReady too, with nobody Ready to take over: after its delay it keeps both.
    env.set_ready("db-1", false).await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(
        env.roles("db").await,
        vec![
            ("db-0".into(), Some("reader".into())),
            ("db-1".into(), Some("writer".into()))
        ]
    );
    assert_lease_held(&env, "db-lease", "db-1", 1).await;
    env.wait_condition("lock", "Progressing", "True", "NoReadyPod")
        .await;
    env.assert_never_two_writers().await;
}

async fn deleted_writer_fails_over_and_its_replacement_is_a_reader(replicas: usize) {
    let env = Env::start(replicas).await;
    env.statefulset("db", 3).await;
    env.lock("lock", "db", "db-lease", 30, json!({})).await;
    env.wait_writer("db", "db-0").await;
    let old_uid = env.pods().get("db-0").await.unwrap().uid();
    env.delete_pod("db-0").await;
    env.wait_writer("db", "db-1").await;
    // The recreated db-0 (new UID) is labelled reader.
    let pods = env.pods();
    env.until(15, "db-0 recreated as reader", move || {
        let pods = pods.clone();
        let old_uid = old_uid.clone();
        Box::pin(async move {
            let p = pods.get_opt("db-0").await.ok()??;
            (p.uid() != old_uid && p.labels().get("sts-role").map(String::as_str) == Some("reader"))
                .then_some(())
        })
    })
    .await;
    env.wait_writer("db", "db-1").await;
    env.assert_never_two_writers().await;
}

async fn terminating_writer_is_handed_over_before_it_is_gone(replicas: usize) {
    let env = Env::start_with(Options {
        replicas,
        pod_terminate_delay: Duration::from_secs(3),
        ..Options::default()
    })
    .await;
    env.statefulset("db", 2).await;
    env.lock(
        "lock",
        "db",
        "db-lease",
        30,
        json!({"failoverDelaySeconds": 60}),
    )
    .await;
    env.wait_writer("db", "db-0").await;
    env.delete_pod("db-0").await;
    let pods = env.pods();
    env.until(5, "db-1 writer while db-0 still terminating", move || {
        let pods = pods.clone();
        Box::pin(async move {
            let old = pods.get_opt("db-0").await.ok()??;
            let new = pods.get("db-1").await.ok()?;
            (old.metadata.deletion_timestamp.is_some()
                && old.labels().get("sts-role").map(String::as_str) == Some("reader")
                && new.labels().get("sts-role").map(String::as_str) == Some("writer"))
            .then_some(())
        })
    })
    .await;
    env.assert_never_two_writers().await;
}

async fn restart_with_an_expired_lease_keeps_the_writer_and_epoch(replicas: usize) {
    let mut env = Env::start(replicas).await;
    env.statefulset("db", 2).await;
    env.lock("lock", "db", "db-lease", 1, json!({})).await;
    env.wait_writer("db", "db-0").await;
    env.stop_operators().await;
    tokio::time::sleep(Duration::from_millis(2500)).await; // the 1 s Lease lapses
    let lapsed = env.leases().get("db-lease").await.unwrap().spec.unwrap();
    env.start_operators().await;
    let leases = env.leases();
    let renewed = env
        .until(10, "lease re-acquired", move || {
            let leases = leases.clone();
            let before = lapsed.renew_time.clone();
            Box::pin(async move {
                let s = leases.get("db-lease").await.ok()?.spec?;
                (s.renew_time != before).then_some(s)
            })
        })
        .await;
    assert_eq!(renewed.holder_identity.as_deref(), Some("db-0"));
    assert_eq!(renewed.lease_transitions, Some(0), "no needless failover");
    env.wait_writer("db", "db-0").await;
    env.assert_never_two_writers().await;
}

async fn preferred_writer_switches_over_and_paused_freezes(replicas: usize) {
    let env = Env::start(replicas).await;
    env.statefulset("db", 3).await;
    env.lock("lock", "db", "db-lease", 30, json!({})).await;
    env.wait_writer("db", "db-0").await;
    let pp = PatchParams::default();
    env.locks()
        .patch(
            "lock",
            &pp,
            &Patch::Merge(json!({"spec": {"preferredWriter": "db-2"}})),
        )
        .await
        .unwrap();
    env.wait_writer("db", "db-2").await;
    env.wait_event("lock", "Switchover", |r, _| r == "Switchover")
        .await;
    env.locks()
        .patch(
            "lock",
            &pp,
            &Patch::Merge(json!({"spec": {"paused": true, "preferredWriter": null}})),
        )
        .await
        .unwrap();
    env.wait_condition("lock", "Progressing", "False", "Paused")
        .await;
    env.set_ready("db-2", false).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    env.wait_writer("db", "db-2").await; // frozen
    env.locks()
        .patch(
            "lock",
            &pp,
            &Patch::Merge(json!({"spec": {"paused": false}})),
        )
        .await
        .unwrap();
    env.wait_writer("db", "db-0").await;
    env.assert_never_two_writers().await;
}

async fn bad_input_reports_and_recovers_without_damage(replicas: usize) {
    let env = Env::start(replicas).await;
    // Missing StatefulSet, then created: Error clears, Available returns.
    env.lock("early", "later", "later-lease", 30, json!({}))
        .await;
    env.wait_condition("early", "Error", "True", "StatefulSetNotFound")
        .await;
    env.wait_event("early", "StatefulSetNotFound", |r, _| {
        r == "StatefulSetNotFound"
    })
    .await;
    env.statefulset("later", 2).await;
    env.wait_condition("early", "Available", "True", "WriterReady")
        .await;
    env.wait_condition("early", "Error", "False", "NoError")
        .await;

    // A second lock on the same StatefulSet: Conflict, and it writes nothing.
    env.lock("second", "later", "other-lease", 30, json!({}))
        .await;
    env.wait_condition("second", "Error", "True", "Conflict")
        .await;
    assert!(env.leases().get_opt("other-lease").await.unwrap().is_none());
    // The same lease name on another StatefulSet: Conflict too.
    env.statefulset("third", 1).await;
    env.lock("third", "third", "later-lease", 30, json!({}))
        .await;
    env.wait_condition("third", "Error", "True", "Conflict")
        .await;

    // A Lease stslock did not create is never overwritten.
    let foreign: Lease = serde_json::from_value(json!({"metadata": {"name": "taken"}, "spec": {"holderIdentity": "someone-else", "leaseDurationSeconds": 10}})).unwrap();
    env.leases()
        .create(&PostParams::default(), &foreign)
        .await
        .unwrap();
    env.statefulset("fourth", 1).await;
    env.lock("fourth", "fourth", "taken", 30, json!({})).await;
    env.wait_condition("fourth", "Error", "True", "LeaseNotOwned")
        .await;
    let after = env.leases().get("taken").await.unwrap();
    assert_eq!(
        after.spec.unwrap().holder_identity.as_deref(),
        Some("someone-else")
    );
    assert!(
        env.roles("fourth").await.iter().all(|(_, r)| r.is_none()),
        "no labels written"
    );
    // Fixed by deleting the foreign Lease: it recovers.
    env.leases()
        .delete("taken", &DeleteParams::default())
        .await
        .unwrap();
    env.wait_condition("fourth", "Available", "True", "WriterReady")
        .await;

    // Invalid specs are rejected by the API with the apiserver's messages.
    let bad: StatefulSetLock = serde_json::from_value(json!({"apiVersion": "app.anukkrit.me/v1", "kind": "StatefulSetLock", "metadata": {"name": "bad"},
        "spec": {"statefulSetName": "Not_A_Name", "leaseName": "x", "leaseDurationSeconds": 5000}})).unwrap();
    match env.locks().create(&PostParams::default(), &bad).await {
        Err(kube::Error::Api(s)) => {
            assert_eq!(s.code, 422);
            assert!(s.message.contains("spec.leaseDurationSeconds: Invalid value: 5000: spec.leaseDurationSeconds in body should be less than or equal to 3600"), "{}", s.message);
            assert!(s.message.contains("spec.statefulSetName"), "{}", s.message);
        }
        other => panic!("expected 422, got {other:?}"),
    }
    match env
        .locks()
        .patch(
            "early",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"statefulSetName": "other"}})),
        )
        .await
    {
        Err(kube::Error::Api(s)) => assert!(
            s.message.contains("statefulSetName is immutable"),
            "{}",
            s.message
        ),
        other => panic!("expected immutability error, got {other:?}"),
    }
    env.assert_never_two_writers().await;
}

async fn deleting_the_lock_cleans_up_and_keeps_the_writer_label(replicas: usize) {
    let env = Env::start(replicas).await;
    env.statefulset("db", 2).await;
    env.lock("lock", "db", "db-lease", 30, json!({})).await;
    env.wait_writer("db", "db-0").await;
    let l = env.locks().get("lock").await.unwrap();
    assert!(l.finalizers().iter().any(|f| f == stslock::api::FINALIZER));
    env.locks()
        .delete("lock", &DeleteParams::default())
        .await
        .unwrap();
    let locks = env.locks();
    env.until(10, "lock gone", move || {
        let locks = locks.clone();
        Box::pin(async move { locks.get_opt("lock").await.ok()?.is_none().then_some(()) })
    })
    .await;
    assert!(
        env.leases().get_opt("db-lease").await.unwrap().is_none(),
        "Lease deleted"
    );
    assert_eq!(
        env.roles("db").await[0].1.as_deref(),
        Some("writer"),
        "keep-writer: no write outage"
    );
    env.assert_never_two_writers().await;
}

/// Failover latency over 200 failovers: from the commit that turned the writer NotReady to the
/// commit that labelled the new writer, both read from the write log (kubesim's commit log, or the audit log). Prints the
/// distribution, overall and per owning replica (run with --nocapture); asserts only that every
/// failover happened and that no instant had two writers. The 20 sets share one namespace and
/// fail together each round, so a replica owning many of them is paced by the namespace's
/// write budget (5 budgeted writes per failover at the default 50/s): its failovers queue
/// about 100 ms apart. The overall p50 falls where the paced and unpaced groups meet and moves
/// with the first paced failover of each round; the per-replica figures and the mean do not.
async fn failover_latency_over_200_failovers(replicas: usize) {
    let env = Env::start(replicas).await;
    let sets = 20;
    failover_fleet(&env, sets).await;
    for i in 0..sets {
        env.wait_writer(&format!("f{i}"), &format!("f{i}-0")).await;
    }
    let mut latencies = vec![];
    for round in 0..10 {
        // Every set fails over once per round: the current writer goes NotReady, the previous
        // one (NotReady since last round) comes back as a reader.
        let writer = round % 3;
        let next = (round + 1) % 3;
        for i in 0..sets {
            env.set_ready(&format!("f{i}-{next}"), true).await;
            env.set_ready(&format!("f{i}-{writer}"), false).await;
        }
        for i in 0..sets {
            env.wait_writer(&format!("f{i}"), &format!("f{i}-{next}"))
                .await;
        }
        let readiness = env.readiness_actor();
        let round_latencies = env
            .commits_until(5, "every set's NotReady and promotion commits", |log| {
                (0..sets)
                    .map(|i| {
                        let (old, new) = (format!("f{i}-{writer}"), format!("f{i}-{next}"));
                        let ms =
                            failover_ms(log, readiness, &old, &new, common::Write::by_operator)?;
                        Some((i, ms))
                    })
                    .collect::<Option<Vec<(usize, u64)>>>()
            })
            .await;
        latencies.extend(round_latencies);
    }
    let all: Vec<u64> = latencies.iter().map(|(_, ms)| *ms).collect();
    println!(
        "failover latency over {} failovers (debug build, {:?}): {}",
        all.len(),
        env.backend(),
        distribution(all)
    );
    // Per owning replica: all sets share one namespace, so a replica owning many of them is
    // paced by the namespace's write budget (--tenant-qps) and the others are not; the overall
    // p50 lands wherever the two groups meet.
    let owners = common::lock_owners(&env.locks()).await;
    let mut by_owner: std::collections::BTreeMap<&str, Vec<u64>> = Default::default();
    for (i, ms) in &latencies {
        let owner = owners.get(&format!("f{i}")).and_then(Option::as_deref);
        by_owner.entry(owner.unwrap_or("-")).or_default().push(*ms);
    }
    for (owner, ms) in by_owner {
        println!(
            "  owned by {owner}: {} failovers, {}",
            ms.len(),
            distribution(ms)
        );
    }
    env.assert_never_two_writers().await;
}

/// P10's floor on this backend: what any failover must pay — one watch delivery (the writer
/// turning NotReady) and three writes one after the other (the Lease compare-and-swap, the
/// demotion, the promotion) — made by a minimal client with nothing else to do, on
/// StatefulSets of its own beside the operator's, failed in the same rounds. Both are measured
/// the same way, from the commit of the readiness change to the commit of the promotion (the
/// commit log on kubesim, the audit log on a real cluster), and the operator's p50 and p99 are
/// reported as multiples of the floor's (one replica, no write budget). What is asserted is that every failover of both
/// happened and never two writers; the ratio is a measurement (timings are this machine's).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_latency_against_the_floor() {
    use futures::StreamExt;
    use k8s_openapi::api::core::v1::Pod;
    use kube::runtime::watcher;

    // No write budgets (`--qps 0 --tenant-qps 0`): the floor client has none, and with them a
    // round of failovers in one namespace would measure the namespace budget's pacing.
    let env = Env::start_with(Options {
        replicas: 1,
        operator_args: |a| {
            a.qps = 0.0;
            a.tenant_qps = 0.0;
        },
        ..Options::default()
    })
    .await;
    // P10 asks for the comparison at fleet size: STSLOCK_FLOOR_BACKGROUND_LOCKS=N first
    // elects N more locks (2 pods each) that only renew meanwhile; both the operator and the
    // floor client then see every pod event of the namespace (README, "Failover against its
    // floor": what this machine managed).
    let background = std::env::var("STSLOCK_FLOOR_BACKGROUND_LOCKS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(0);
    // Their Leases' duration (default 30 s): each renews at half of it, and on this machine's
    // real control plane 5,000 Leases of 30 s (333 renewals a second, no write budget) saturate
    // kube-apiserver (README, "Failover against its floor").
    let background_lease_seconds = std::env::var("STSLOCK_FLOOR_BACKGROUND_LEASE_SECONDS")
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
        .unwrap_or(30);
    if background > 0 {
        background_locks(&env, background, background_lease_seconds).await;
    }
    let (sets, rounds) = (10, 10);
    failover_fleet(&env, sets).await;
    for i in 0..sets {
        env.statefulset(&format!("g{i}"), 3).await;
    }
    for i in 0..sets {
        env.wait_writer(&format!("f{i}"), &format!("f{i}-0")).await;
    }
    // The floor's sets: every pod Ready (a real StatefulSet creates them in turn), then g{i}-0
    // writer and the others readers, and a Lease naming g{i}-0.
    let ready = |p: &Pod| {
        p.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
    };
    for i in 0..sets {
        let pods = env.pods();
        let app = format!("g{i}");
        env.until(45, &format!("3 Ready pods of {app}"), move || {
            let (pods, app) = (pods.clone(), app.clone());
            Box::pin(async move {
                let l = common::call(
                    "list pods",
                    pods.list(&kube::api::ListParams::default().labels(&format!("app={app}"))),
                )
                .await
                .ok()?;
                (l.items.len() == 3 && l.items.iter().all(ready)).then_some(())
            })
        })
        .await;
    }
    let agent = "floor/client";
    let floor = env.client_as("floor", agent).await;
    let pods: kube::Api<Pod> = kube::Api::namespaced(floor.clone(), &env.ns);
    let leases: kube::Api<Lease> = kube::Api::namespaced(floor.clone(), &env.ns);
    let role = |r: &str| Patch::Merge(json!({"metadata": {"labels": {"sts-role": r}}}));
    let pp = PatchParams::default();
    let mut state = std::collections::HashMap::new();
    for i in 0..sets {
        for k in 0..3 {
            let r = if k == 0 { "writer" } else { "reader" };
            common::call("label pod", pods.patch(&format!("g{i}-{k}"), &pp, &role(r)))
                .await
                .unwrap();
        }
        let lease: Lease = serde_json::from_value(json!({
            "metadata": {"name": format!("g{i}-lease")},
            "spec": {"holderIdentity": format!("g{i}-0"), "leaseDurationSeconds": 30, "leaseTransitions": 0}
        }))
        .unwrap();
        let lease = common::call(
            "create lease",
            leases.create(&PostParams::default(), &lease),
        )
        .await
        .unwrap();
        state.insert(
            format!("g{i}"),
            (0usize, std::sync::Arc::new(tokio::sync::Mutex::new(lease))),
        );
    }
    // The floor client: a watch of the namespace's pods; when a set's writer turns NotReady,
    // the Lease moves (compare-and-swap on what it wrote last), the writer is demoted, the
    // first other Ready pod promoted.
    let (synced_tx, synced) = tokio::sync::oneshot::channel();
    let failed = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let client = tokio::spawn({
        let (pods, leases, failed) = (pods.clone(), leases.clone(), failed.clone());
        async move {
            let mut synced_tx = Some(synced_tx);
            let mut readiness = std::collections::HashMap::new();
            let mut events = watcher(pods.clone(), watcher::Config::default()).boxed();
            while let Some(ev) = events.next().await {
                let pod = match ev {
                    Ok(watcher::Event::Apply(p) | watcher::Event::InitApply(p)) => p,
                    Ok(watcher::Event::InitDone) => {
                        if let Some(tx) = synced_tx.take() {
                            let _ = tx.send(());
                        }
                        continue;
                    }
                    Ok(_) => continue,
                    // The watcher re-lists after an error; the next event tells.
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let name = pod.name_any();
                readiness.insert(name.clone(), ready(&pod));
                // Any event of a set re-checks it: its writer NotReady, another pod Ready.
                let Some((set, _)) = name.rsplit_once('-') else {
                    continue;
                };
                let Some((writer, lease)) = state.get_mut(set) else {
                    continue;
                };
                let old = format!("{set}-{writer}");
                if readiness.get(&old) != Some(&false) {
                    continue;
                }
                let Some(next) = (0..3)
                    .filter(|k| k != writer)
                    .find(|k| readiness.get(&format!("{set}-{k}")) == Some(&true))
                else {
                    continue;
                };
                *writer = next;
                // Each failover runs on its own, as the operator's do: one set's three writes
                // never wait behind another's. A failed write (nobody else writes these) ends
                // the task and is reported by the round.
                let (pods, leases, lease) = (pods.clone(), leases.clone(), lease.clone());
                let (failed, set) = (failed.clone(), set.to_string());
                tokio::spawn(async move {
                    let mut lease = lease.lock().await;
                    // A merge patch carrying the resourceVersion last written: a
                    // compare-and-swap (with the operator's credentials, which may patch
                    // Leases, not update them).
                    let transitions = lease.spec.as_ref().and_then(|s| s.lease_transitions);
                    let cas = Patch::Merge(json!({
                        "metadata": {"resourceVersion": lease.resource_version()},
                        "spec": {"holderIdentity": format!("{set}-{next}"),
                                 "leaseTransitions": transitions.unwrap_or(0) + 1}
                    }));
                    let pp = PatchParams::default();
                    let done = async {
                        *lease =
                            common::call("move lease", leases.patch(&lease.name_any(), &pp, &cas))
                                .await?;
                        common::call("demote", pods.patch(&old, &pp, &role("reader"))).await?;
                        common::call(
                            "promote",
                            pods.patch(&format!("{set}-{next}"), &pp, &role("writer")),
                        )
                        .await?;
                        Ok::<_, kube::Error>(())
                    };
                    if let Err(e) = done.await {
                        failed.lock().unwrap().push(format!("{set}: {e}"));
                    }
                });
            }
        }
    });
    synced.await.expect("the floor client's pod watch listed");
    let readiness = env.readiness_actor();
    let (mut operator, mut floor_ms) = (vec![], vec![]);
    for round in 0..rounds {
        let writer = round % 3;
        let next = (round + 1) % 3;
        // Interleaved: both see the same load.
        for i in 0..sets {
            for set in [format!("f{i}"), format!("g{i}")] {
                env.set_ready(&format!("{set}-{next}"), true).await;
                env.set_ready(&format!("{set}-{writer}"), false).await;
            }
        }
        for i in 0..sets {
            for set in [format!("f{i}"), format!("g{i}")] {
                // A failed floor write fails the test with its error, not with this timeout.
                let floor_failed = async {
                    loop {
                        let f = failed.lock().unwrap().clone();
                        if !f.is_empty() {
                            break f;
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                };
                let new = format!("{set}-{next}");
                tokio::select! {
                    _ = env.wait_writer(&set, &new) => {}
                    f = floor_failed => panic!("the floor client's writes failed: {f:?}"),
                }
            }
        }
        let latencies = env
            .commits_until(5, "every set's NotReady and promotion commits", |log| {
                let mut out = vec![];
                for i in 0..sets {
                    for (set, by_floor) in [(format!("f{i}"), false), (format!("g{i}"), true)] {
                        let (old, new) = (format!("{set}-{writer}"), format!("{set}-{next}"));
                        let ms = failover_ms(log, readiness, &old, &new, |c| {
                            if by_floor {
                                c.actor == agent
                            } else {
                                c.by_operator()
                            }
                        })?;
                        out.push((by_floor, ms));
                    }
                }
                Some(out)
            })
            .await;
        for (by_floor, ms) in latencies {
            if by_floor {
                floor_ms.push(ms)
            } else {
                operator.push(ms)
            }
        }
    }
    client.abort();
    let p = |v: &mut Vec<u64>, q: f64| {
        v.sort_unstable();
        kubesim::html::pct(v, q)
    };
    let (op50, op99, fl50, fl99) = (
        p(&mut operator, 0.5),
        p(&mut operator, 0.99),
        p(&mut floor_ms, 0.5),
        p(&mut floor_ms, 0.99),
    );
    // Commit times have 1 ms resolution: a floor of 0 ms is taken as 1 ms for the ratio.
    let ratio = |a: u64, b: u64| a as f64 / b.max(1) as f64;
    println!(
        "failover against the floor ({:?}, debug build, {} background locks, {} failovers each): operator {}; floor {}; operator/floor p50 {:.1}x, p99 {:.1}x",
        env.backend(),
        background,
        sets * rounds,
        distribution(operator.clone()),
        distribution(floor_ms.clone()),
        ratio(op50, fl50),
        ratio(op99, fl99),
    );
    env.assert_never_two_writers().await;
}

/// `n` StatefulSets `bg<i>` of 2 pods (created in parallel), each with a lock of a Lease of
/// `lease_seconds`, all elected before this returns (the time it took is printed).
async fn background_locks(env: &Env, n: usize, lease_seconds: u32) {
    use futures::StreamExt;
    let started = std::time::Instant::now();
    let (sets, locks) = (
        env.api::<k8s_openapi::api::apps::v1::StatefulSet>(),
        env.locks(),
    );
    futures::stream::iter(0..n)
        .for_each_concurrent(32, |i| {
            let (sets, locks) = (sets.clone(), locks.clone());
            async move {
                let name = format!("bg{i}");
                let sts = serde_json::from_value(json!({
                    "metadata": {"name": name},
                    "spec": {"serviceName": name, "replicas": 2, "podManagementPolicy": "Parallel",
                             "selector": {"matchLabels": {"app": name}},
                             "template": {"metadata": {"labels": {"app": name}},
                                          "spec": {"containers": [{"name": "c", "image": "postgres:15"}]}}}
                }))
                .unwrap();
                create_retrying(&sets, &sts).await;
                let lock: StatefulSetLock = serde_json::from_value(json!({
                    "apiVersion": "app.anukkrit.me/v1", "kind": "StatefulSetLock",
                    "metadata": {"name": name},
                    "spec": {"statefulSetName": name, "leaseName": format!("{name}-lease"),
                             "leaseDurationSeconds": lease_seconds}
                }))
                .unwrap();
                create_retrying(&locks, &lock).await;
            }
        })
        .await;
    let created = started.elapsed();
    // A lock is elected once its status names the writer; the budget grows with `n`. Read in
    // pages, every 5 s, each page with a minute to answer: a list of thousands of custom
    // objects from an API server busy with the election takes longer than the harness's 10 s.
    env.until(
        120 + n as u64 / 5,
        &format!("{n} background locks elected"),
        || {
            let locks = locks.clone();
            Box::pin(async move {
                let (mut elected, mut next) = (0, None::<String>);
                loop {
                    let mut page = kube::api::ListParams::default().limit(500);
                    if let Some(token) = &next {
                        page = page.continue_token(token);
                    }
                    let l = tokio::time::timeout(Duration::from_secs(60), locks.list(&page))
                        .await
                        .ok()?
                        .ok()?;
                    elected += l
                        .items
                        .iter()
                        .filter(|l| l.name_any().starts_with("bg"))
                        .filter(|l| l.status.as_ref().is_some_and(|s| s.writer_pod.is_some()))
                        .count();
                    next = l.metadata.continue_.filter(|t| !t.is_empty());
                    if next.is_none() {
                        break;
                    }
                }
                if elected < n {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                }
                (elected == n).then_some(())
            })
        },
    )
    .await;
    println!(
        "{n} background locks: created in {:.1} s, all elected after {:.1} s",
        created.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
}

/// Create `obj`; an API server busy with thousands of creations may answer one with a 429, a
/// 5xx or not in time (the create may have landed: then it exists). Up to 10 tries.
async fn create_retrying<K>(api: &kube::Api<K>, obj: &K)
where
    K: kube::Resource + Clone + serde::Serialize + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let name = obj.meta().name.clone().unwrap_or_default();
    let mut last = String::new();
    for _ in 0..10 {
        match tokio::time::timeout(
            Duration::from_secs(30),
            api.create(&PostParams::default(), obj),
        )
        .await
        {
            Ok(Ok(_)) => return,
            Ok(Err(kube::Error::Api(s))) if s.code == 409 => return,
            Ok(Err(e)) => last = e.to_string(),
            Err(_) => last = "no answer within 30 s".into(),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    panic!("create {name}: {last}");
}

/// StatefulSets `f0`… of 3 pods, each with a lock `f<i>` of a 30 s Lease `f<i>-lease`.
async fn failover_fleet(env: &Env, sets: usize) {
    for i in 0..sets {
        env.statefulset(&format!("f{i}"), 3).await;
        env.lock(
            &format!("f{i}"),
            &format!("f{i}"),
            &format!("f{i}-lease"),
            30,
            json!({}),
        )
        .await;
    }
}

/// One failover's latency in the commit log: from the last commit of `old` by the readiness
/// actor (turning it NotReady) to the first later commit of `new` by `promoter` (its
/// promotion).
fn failover_ms(
    log: &[common::Write],
    readiness: &str,
    old: &str,
    new: &str,
    promoter: impl Fn(&common::Write) -> bool,
) -> Option<u64> {
    let fail = log
        .iter()
        .rfind(|c| c.name == old && c.resource == "pods" && c.actor == readiness)?;
    let promoted = log
        .iter()
        .find(|c| c.seq > fail.seq && c.name == new && c.resource == "pods" && promoter(c))?;
    Some(promoted.at_ms.saturating_sub(fail.at_ms))
}

/// p50, p90, p99, max and mean of latencies in milliseconds.
fn distribution(mut ms: Vec<u64>) -> String {
    use kubesim::html::pct;
    ms.sort_unstable();
    let mean = ms.iter().sum::<u64>() as f64 / ms.len() as f64;
    format!(
        "p50 {} ms, p90 {} ms, p99 {} ms, max {} ms, mean {mean:.0} ms",
        pct(&ms, 0.5),
        pct(&ms, 0.9),
        pct(&ms, 0.99),
        ms[ms.len() - 1]
    )
}

async fn a_deleted_lease_is_recreated_without_failover_or_epoch_reset(replicas: usize) {
    let env = Env::start(replicas).await;
    env.statefulset("db", 3).await;
    env.lock("lock", "db", "db-lease", 30, json!({})).await;
    env.wait_writer("db", "db-0").await;
    env.set_ready("db-0", false).await;
    env.wait_writer("db", "db-1").await; // epoch 1
    env.leases()
        .delete("db-lease", &DeleteParams::default())
        .await
        .unwrap();
    let leases = env.leases();
    let spec = env
        .until(10, "lease re-created", move || {
            let leases = leases.clone();
            Box::pin(async move { leases.get_opt("db-lease").await.ok()??.spec })
        })
        .await;
    assert_eq!(spec.holder_identity.as_deref(), Some("db-1"));
    assert_eq!(
        spec.lease_transitions,
        Some(1),
        "the fencing epoch never goes back"
    );
    env.wait_writer("db", "db-1").await;
    env.wait_event("lock", "LeaseRecreated", |r, _| r == "LeaseRecreated")
        .await;
    env.assert_never_two_writers().await;
}

replicas_test!(seed_samples_elect_pod_zero_and_renew);
replicas_test!(lease_is_renewed_at_half_its_duration_and_idle_locks_write_only_renewals);
replicas_test!(notready_writer_fails_over_and_does_not_fail_back);
replicas_test!(deleted_writer_fails_over_and_its_replacement_is_a_reader);
replicas_test!(terminating_writer_is_handed_over_before_it_is_gone);
replicas_test!(restart_with_an_expired_lease_keeps_the_writer_and_epoch);
replicas_test!(preferred_writer_switches_over_and_paused_freezes);
replicas_test!(bad_input_reports_and_recovers_without_damage);
replicas_test!(deleting_the_lock_cleans_up_and_keeps_the_writer_label);
replicas_test!(failover_latency_over_200_failovers);
replicas_test!(a_writer_keeps_its_lease_while_it_keeps_the_label);
replicas_test!(a_deleted_lease_is_recreated_without_failover_or_epoch_reset);
