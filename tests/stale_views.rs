//! Issue P5, shell level: the operator decides safely from stale views (DESIGN §2 rules 12–16)
//! when kubesim behaves like a real apiserver under trouble — a write that commits while its
//! response is lost, a half-open Lease watch, a namespace over its write budget, stale
//! `resourceVersion=0` reads at restart. Each test checks what a user cares about (epochs, Lease
//! lapses, who is writer) from every version of every object kubesim committed.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on setup failures

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use kubesim::{HoldResponse, LoseResponse, Sim, StaleRead, WatchFault};
use serde_json::{Value, json};
use stslock::api::{EPOCH_ANNOTATION, SHARD_LABEL, StatefulSetLock, WRITER_UID_ANNOTATION};

mod common;
use common::pod_ready;
use common::sim::{assert_never_two_writers, sim_with_crd, start, until};

const ROLE: &str = "sts-role";

// ---------------------------------------------------------------------------------------------
// Harness

async fn statefulset(client: &Client, name: &str, replicas: i32) {
    let sts: StatefulSet = serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"serviceName": name, "replicas": replicas, "selector": {"matchLabels": {"app": name}},
                 "template": {"metadata": {"labels": {"app": name}}, "spec": {"containers": [{"name": "c", "image": "postgres:15"}]}}}
    }))
    .unwrap();
    Api::<StatefulSet>::namespaced(client.clone(), "default")
        .create(&PostParams::default(), &sts)
        .await
        .expect("create sts");
}

async fn lock(client: &Client, name: &str, sts: &str, lease: &str, duration: i32) {
    let l: StatefulSetLock = serde_json::from_value(json!({"apiVersion": "app.anukkrit.me/v1", "kind": "StatefulSetLock",
        "metadata": {"name": name}, "spec": {"statefulSetName": sts, "leaseName": lease, "leaseDurationSeconds": duration}}))
    .unwrap();
    Api::<StatefulSetLock>::namespaced(client.clone(), "default")
        .create(&PostParams::default(), &l)
        .await
        .expect("create lock");
}

/// Poll `f` every 20 ms until it returns `Some`, failing after `secs`.
async fn wait_writer(client: &Client, app: &str, writer: &str, secs: u64) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    until(secs, &format!("{writer} sole writer of {app}"), || {
        let pods = pods.clone();
        async move {
            let l = pods
                .list(&ListParams::default().labels(&format!("app={app}")))
                .await
                .ok()?;
            let ok = !l.items.is_empty()
                && l.items.iter().all(|p| {
                    let role = p.labels().get(ROLE).map(String::as_str);
                    if p.name_any() == writer {
                        role == Some("writer")
                    } else {
                        role == Some("reader")
                    }
                });
            ok.then_some(())
        }
    })
    .await
}

/// Every committed version of every object, in commit order, with its commit time on the
/// wall clock (kubesim's store broadcasts each committed change to subscribers).
#[derive(Debug, Clone)]
struct Version {
    rv: u64,
    /// Unix ms of the commit.
    at_ms: i64,
    deleted: bool,
    resource: String,
    name: String,
    obj: Arc<Value>,
}

struct Tap {
    versions: Arc<Mutex<Vec<Version>>>,
    task: tokio::task::JoinHandle<()>,
}

fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH).unwrap().as_millis() as i64
}

impl Tap {
    fn start(sim: &Sim) -> Tap {
        let mut rx = sim.store().subscribe();
        let (base_i, base_s) = (Instant::now(), SystemTime::now());
        let versions = Arc::new(Mutex::new(Vec::new()));
        let v = versions.clone();
        let task = tokio::spawn(async move {
            loop {
                match rx.recv().await {
                    Ok(ev) => {
                        let at = if ev.at >= base_i {
                            base_s + (ev.at - base_i)
                        } else {
                            base_s - (base_i - ev.at)
                        };
                        v.lock().unwrap().push(Version {
                            rv: ev.rv,
                            at_ms: unix_ms(at),
                            deleted: ev.type_ == kubesim::store::EventType::Deleted,
                            resource: ev.key.1.clone(),
                            name: ev
                                .object
                                .pointer("/metadata/name")
                                .and_then(Value::as_str)
                                .unwrap_or_default()
                                .to_string(),
                            obj: ev.object.clone(),
                        });
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        panic!("tap lagged by {n} events")
                    }
                    Err(_) => return,
                }
            }
        });
        Tap { versions, task }
    }

    fn of(&self, resource: &str, name: Option<&str>) -> Vec<Version> {
        let mut v: Vec<Version> = self
            .versions
            .lock()
            .unwrap()
            .iter()
            .filter(|v| v.resource == resource && name.is_none_or(|n| v.name == n))
            .cloned()
            .collect();
        v.sort_by_key(|v| v.rv);
        v
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn str_at<'a>(v: &'a Value, ptr: &str) -> Option<&'a str> {
    v.pointer(ptr).and_then(Value::as_str)
}

fn micro_ms(s: &str) -> i64 {
    s.parse::<jiff::Timestamp>().unwrap().as_millisecond()
}

/// Intervals inside `[from, to]` (ms after `from`) during which `lease` was absent or expired
/// (renewTime + leaseDurationSeconds in the past), from every committed version of it: between
/// two commits the Lease is what the earlier one wrote.
fn lapses(tap: &Tap, lease: &str, from: i64, to: i64) -> Vec<(i64, i64)> {
    let versions = tap.of("leases", Some(lease));
    let mut out = vec![];
    // (committed at, valid until) of each version; a delete is valid until its own commit.
    let spans: Vec<(i64, i64)> = versions
        .iter()
        .map(|v| {
            let until = if v.deleted {
                v.at_ms
            } else {
                let renew = str_at(&v.obj, "/spec/renewTime").map(micro_ms);
                let dur = v
                    .obj
                    .pointer("/spec/leaseDurationSeconds")
                    .and_then(Value::as_i64)
                    .unwrap_or(0);
                renew.map_or(v.at_ms, |r| r + dur * 1000)
            };
            (v.at_ms, until)
        })
        .collect();
    if let Some(first) = spans.first()
        && first.0 > from
    {
        out.push((0, first.0.min(to) - from));
    }
    for (i, (at, valid_until)) in spans.iter().enumerate() {
        let next = spans.get(i + 1).map_or(to, |n| n.0);
        let (gap_from, gap_to) = ((*valid_until).max(*at).max(from), next.min(to));
        if gap_from < gap_to {
            out.push((gap_from - from, gap_to - from));
        }
    }
    out
}

/// Lapses of Leases `lease0..lease{n-1}` in `from..to`, one line per Lease that lapsed.
fn lapses_of(tap: &Tap, n: usize, from: i64, to: i64) -> Vec<String> {
    (0..n)
        .filter_map(|i| {
            let gaps = lapses(tap, &format!("lease{i}"), from, to);
            (!gaps.is_empty()).then(|| format!("lease{i}: {gaps:?}"))
        })
        .collect()
}

/// StatefulSets `s{i}` of one pod, each with lock `l{i}` and Lease `lease{i}` of `seconds`.
async fn sets_and_locks(client: &Client, n: usize, seconds: i32) {
    for i in 0..n {
        statefulset(client, &format!("s{i}"), 1).await;
        lock(
            client,
            &format!("l{i}"),
            &format!("s{i}"),
            &format!("lease{i}"),
            seconds,
        )
        .await;
    }
}

/// Every epoch the operator issued, in commit order: each Lease version's leaseTransitions
/// with the writer UID it names, and each pod version whose writer label or epoch annotation
/// changed to (writer, epoch). Returns (epochs in commit order with where they were seen,
/// violations).
fn epoch_violations(tap: &Tap) -> (Vec<String>, Vec<String>) {
    let mut issued: Vec<(u64, i64, String, String)> = vec![];
    for v in tap.of("leases", None) {
        if v.deleted || !v.name.ends_with("lease") {
            continue;
        }
        let Some(t) = v
            .obj
            .pointer("/spec/leaseTransitions")
            .and_then(Value::as_i64)
        else {
            continue;
        };
        let uid = str_at(
            &v.obj,
            &format!(
                "/metadata/annotations/{}",
                WRITER_UID_ANNOTATION.replace('/', "~1")
            ),
        )
        .unwrap_or_default()
        .to_string();
        let holder = str_at(&v.obj, "/spec/holderIdentity").unwrap_or_default();
        issued.push((v.rv, t, uid, format!("Lease {} holder {holder}", v.name)));
    }
    let mut last: BTreeMap<String, (Option<String>, Option<String>)> = BTreeMap::new();
    let epoch_ptr = format!(
        "/metadata/annotations/{}",
        EPOCH_ANNOTATION.replace('/', "~1")
    );
    for v in tap.of("pods", None) {
        if v.deleted {
            continue;
        }
        let role = str_at(&v.obj, &format!("/metadata/labels/{ROLE}")).map(str::to_string);
        let epoch = str_at(&v.obj, &epoch_ptr).map(str::to_string);
        let before = last.insert(v.name.clone(), (role.clone(), epoch.clone()));
        let changed = before.as_ref() != Some(&(role.clone(), epoch.clone()));
        if changed
            && role.as_deref() == Some("writer")
            && let Some(e) = epoch.and_then(|e| e.parse::<i64>().ok())
        {
            let uid = str_at(&v.obj, "/metadata/uid")
                .unwrap_or_default()
                .to_string();
            issued.push((v.rv, e, uid, format!("pod {} labelled writer", v.name)));
        }
    }
    issued.sort_by_key(|i| i.0);
    let mut violations = vec![];
    let mut owner: BTreeMap<i64, String> = BTreeMap::new();
    let mut highest: Option<(i64, String)> = None;
    for (rv, e, uid, what) in &issued {
        if let Some(o) = owner.get(e)
            && o != uid
            && !uid.is_empty()
        {
            violations.push(format!(
                "epoch {e} issued to UID {uid} ({what}, rv {rv}) but already to UID {o}"
            ));
        }
        if !uid.is_empty() {
            owner.entry(*e).or_insert_with(|| uid.clone());
        }
        if let Some((h, hw)) = &highest
            && e < h
        {
            violations.push(format!(
                "epoch went back from {h} ({hw}) to {e} ({what}, rv {rv})"
            ));
        }
        if highest.as_ref().is_none_or(|(h, _)| e > h) {
            highest = Some((*e, what.clone()));
        }
    }
    let seen = issued
        .iter()
        .map(|(rv, e, _, what)| format!("rv {rv}: epoch {e} ({what})"))
        .collect();
    (seen, violations)
}

// ---------------------------------------------------------------------------------------------
// 1. A lost Lease-write response, then a third party deletes the Lease.

/// A switchover's Lease update commits but its response is lost (the operator's call hangs until
/// its timeout); while it hangs a third party deletes the Lease and the switchover is called off.
/// The epoch the lost write issued (to db-1) must not be issued again to anyone else, and no
/// later epoch may be lower: every Lease version and every promotion, in commit order, carries
/// an epoch ≥ all before it, and each epoch names one pod UID.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_lease_write_then_deleted_lease_never_reissues_or_lowers_the_epoch() {
    let (sim, client) = sim_with_crd().await;
    let tap = Tap::start(&sim);
    let op = start(&sim, "op", |a| a.api_timeout_seconds = 3);
    statefulset(&client, "db", 3).await;
    lock(&client, "lock", "db", "db-lease", 30).await;
    wait_writer(&client, "db", "db-0", 15).await;

    // The operator's Lease writes commit, their answers never come.
    sim.faults().update(|c| {
        c.lose_responses = vec![LoseResponse::hang().agent("stslock/op").resource("leases")]
    });
    let locks: Api<StatefulSetLock> = Api::namespaced(client.clone(), "default");
    locks
        .patch(
            "lock",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"preferredWriter": "db-1"}})),
        )
        .await
        .unwrap();
    // The switchover's Lease update (holder db-1) is committed...
    until(10, "Lease moved to db-1", || async {
        tap.of("leases", Some("db-lease"))
            .iter()
            .any(|v| str_at(&v.obj, "/spec/holderIdentity") == Some("db-1"))
            .then_some(())
    })
    .await;
    // ...and while the operator still waits for its answer, someone deletes the Lease and the
    // switchover is called off.
    let third: Api<Lease> = Api::namespaced(sim.client_as("kubectl"), "default");
    third
        .delete("db-lease", &DeleteParams::default())
        .await
        .unwrap();
    locks
        .patch(
            "lock",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"preferredWriter": null}})),
        )
        .await
        .unwrap();
    sim.faults().update(|c| c.lose_responses.clear());

    // Converged: a Lease again, its holder the one writer-labelled pod with the Lease's epoch.
    let leases: Api<Lease> = Api::namespaced(client.clone(), "default");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let (holder, epoch) = until(
        20,
        "Lease re-created and the writer labelled with its epoch",
        || {
            let (leases, pods) = (leases.clone(), pods.clone());
            async move {
                let spec = leases.get_opt("db-lease").await.ok()??.spec?;
                let holder = spec.holder_identity?;
                let epoch = spec.lease_transitions?;
                let l = pods
                    .list(&ListParams::default().labels("app=db"))
                    .await
                    .ok()?;
                let writers: Vec<_> = l
                    .items
                    .iter()
                    .filter(|p| p.labels().get(ROLE).map(String::as_str) == Some("writer"))
                    .collect();
                (writers.len() == 1
                    && writers[0].name_any() == holder
                    && writers[0].annotations().get(EPOCH_ANNOTATION) == Some(&epoch.to_string()))
                .then_some((holder, epoch))
            }
        },
    )
    .await;
    println!("converged: writer {holder}, epoch {epoch}");
    op.stop().await;
    let (seen, violations) = epoch_violations(&tap);
    println!("epochs issued:\n  {}", seen.join("\n  "));
    assert!(
        seen.iter()
            .any(|s| s.contains("epoch 1") && s.contains("holder db-1")),
        "the lost switchover write did not commit: {seen:#?}"
    );
    assert!(violations.is_empty(), "{violations:#?}");
    assert_never_two_writers(&sim);
}

// ---------------------------------------------------------------------------------------------
// 2. A half-open Lease watch while a third party changes the Lease's resourceVersion.

/// The operator's Lease watch goes half-open (stalled, no error, no end) and a third party keeps
/// touching the Lease (an annotation, which changes its resourceVersion). Renewals fail their
/// compare-and-swap on the stale cached version; they must recover (a 409 fetches the Lease
/// afresh), so the Lease of the Ready writer never lapses: at every instant some committed
/// version of it has renewTime + leaseDurationSeconds in the future.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_open_lease_watch_and_third_party_edits_never_let_the_lease_lapse() {
    let (sim, client) = sim_with_crd().await;
    let tap = Tap::start(&sim);
    let op = start(&sim, "op", |a| a.api_timeout_seconds = 2);
    statefulset(&client, "db", 2).await;
    lock(&client, "lock", "db", "db-lease", 3).await;
    wait_writer(&client, "db", "db-0", 15).await;
    // A couple of renewals first.
    until(10, "two renewals", || async {
        (tap.of("leases", Some("db-lease")).len() >= 3).then_some(())
    })
    .await;

    let from = unix_ms(SystemTime::now());
    sim.faults().update(|c| {
        c.watch_faults = vec![
            WatchFault::stall("leases")
                .agent("stslock/op")
                .label_selector("app.anukkrit.me/managed-by"),
        ]
    });
    let third: Api<Lease> = Api::namespaced(sim.client_as("kubectl"), "default");
    // Three edits 2 s apart, then 3 s more: 9 s under the stall (three lease durations).
    for i in 0..3 {
        tokio::time::sleep(Duration::from_secs(2)).await;
        third
            .patch(
                "db-lease",
                &PatchParams::default(),
                &Patch::Merge(
                    json!({"metadata": {"annotations": {"example.com/touched": i.to_string()}}}),
                ),
            )
            .await
            .unwrap();
    }
    let last_touch = unix_ms(SystemTime::now());
    // Deliberate wait (nothing to poll for): renewals must go on for a full lease duration after
    // the last edit.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let to = unix_ms(SystemTime::now());
    sim.faults().update(|c| c.watch_faults.clear());
    op.stop().await;

    let gaps = lapses(&tap, "db-lease", from, to);
    let renewals_after = tap
        .of("leases", Some("db-lease"))
        .iter()
        .filter(|v| v.at_ms > last_touch)
        .count();
    println!(
        "under the stall: {} Lease versions, lapses {gaps:?}, {renewals_after} renewals after the last edit",
        tap.of("leases", Some("db-lease"))
            .iter()
            .filter(|v| v.at_ms > from)
            .count()
    );
    assert!(
        gaps.is_empty(),
        "the Ready writer's Lease lapsed (ms after the stall began): {gaps:?}"
    );
    assert!(
        renewals_after >= 1,
        "renewals did not recover after the last edit"
    );
    wait_writer(&client, "db", "db-0", 5).await;
    assert_never_two_writers(&sim);
}

/// A failover whose writes after the Lease's compare-and-swap take seconds (each answered 1 s
/// late, inside the write window the harness's 3 s membership allows), while every watch of the replica runs 20 s behind: no watch event can trigger a
/// reconcile before the Lease (30 s) is due again, so its renewal rests on the entry the
/// failover's plan set. That entry must count from the plan, not from the end of its writes:
/// the new writer's Lease is renewed half a Lease after the failover wrote it (at 15 s, not
/// 15 s after the plan's last answer).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_slow_after_its_lease_write_renews_on_the_leases_schedule() {
    common::init_test_log();
    let (sim, client) = sim_with_crd().await;
    let tap = Tap::start(&sim);
    let op = start(&sim, "op", |a| a.api_timeout_seconds = 2);
    statefulset(&client, "db", 2).await;
    lock(&client, "lock", "db", "db-lease", 30).await;
    wait_writer(&client, "db", "db-0", 15).await;
    // Right after a renewal: the next one (15 s on) comes after the failover's Lease write,
    // which the lag puts 20 s after the readiness change, so the two never race.
    until(25, "a renewal", || async {
        (tap.of("leases", Some("db-lease")).len() >= 2).then_some(())
    })
    .await;
    sim.faults().update(|c| {
        c.watch_faults = vec![
            WatchFault {
                resources: vec![
                    "pods".into(),
                    "statefulsets".into(),
                    "statefulsetlocks".into(),
                ],
                lag_ms: 20_000,
                ..WatchFault::default()
            }
            .agent("stslock/op"),
            WatchFault::lag("leases", 20_000)
                .agent("stslock/op")
                .label_selector("app.anukkrit.me/managed-by"),
        ];
        c.hold_responses = vec![
            HoldResponse::new(1000)
                .agent("stslock/op")
                .resource("pods")
                .resource("statefulsetlocks")
                .resource("events"),
        ];
    });
    sim.pods().set_ready("default", "db-0", false).unwrap();
    // The Lease version naming db-1 (the failover), then the next one (its first renewal).
    let holder = |v: &Version| str_at(&v.obj, "/spec/holderIdentity").map(str::to_string);
    let (moved, renewed) = until(
        90,
        "the failover's Lease write and its next renewal",
        || {
            let versions = tap.of("leases", Some("db-lease"));
            async move {
                let i = versions
                    .iter()
                    .position(|v| holder(v).as_deref() == Some("db-1"))?;
                Some((versions[i].clone(), versions.get(i + 1)?.clone()))
            }
        },
    )
    .await;
    sim.faults().update(|c| {
        c.watch_faults.clear();
        c.hold_responses.clear();
    });
    wait_writer(&client, "db", "db-1", 30).await;
    op.stop().await;
    let gap = renewed.at_ms - moved.at_ms;
    println!("failover's Lease write to its next renewal: {gap} ms (30 s Lease)");
    assert_eq!(holder(&renewed).as_deref(), Some("db-1"));
    // Due 15 s after the plan (up to 5 % early); slack for a loaded machine, short of the
    // 18 s the plan's last answer (promotion, status, Event: 1 s each) plus half a Lease
    // comes to.
    assert!(
        gap <= 16_500,
        "the new writer's Lease was renewed {gap} ms after the failover wrote it (due at 15,000)"
    );
    assert_never_two_writers(&sim);
}

/// A restart whose StatefulSet list is answered 4 s late: the lock watch's list (and the
/// replica's own re-reads of its locks) come first, and so do the StatefulSet list's
/// triggers, which fire before the list is published. A lock decided then saw no StatefulSet:
/// it reported `StatefulSetNotFound` (condition and Event) for a set that exists, and
/// cancelled its renewal entry. It must wait for the list instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_with_a_slow_statefulset_list_reports_no_missing_statefulset() {
    let (sim, client) = sim_with_crd().await;
    let tap = Tap::start(&sim);
    let first = start(&sim, "op", |_| {});
    statefulset(&client, "db", 2).await;
    lock(&client, "lock", "db", "db-lease", 10).await;
    wait_writer(&client, "db", "db-0", 15).await;
    first.stop().await;
    let before = tap
        .of("statefulsetlocks", None)
        .last()
        .map_or(0, |v| v.rv)
        .max(tap.of("events", None).last().map_or(0, |v| v.rv));
    sim.faults().update(|c| {
        c.latency_ms = 4000;
        c.reads_only = true;
        c.agents = vec!["stslock/op".into()];
        c.resources = vec!["statefulsets".into()];
    });
    let op = start(&sim, "op", |_| {});
    // Deliberate wait (nothing to poll for: what is checked is that something never happens):
    // the list is answered after 4 s, and the reconciles it lets through follow at once.
    tokio::time::sleep(Duration::from_secs(6)).await;
    sim.faults().update(|c| {
        c.latency_ms = 0;
        c.reads_only = false;
        c.agents.clear();
        c.resources.clear();
    });
    wait_writer(&client, "db", "db-0", 10).await;
    op.stop().await;
    let not_found =
        |v: &Version| v.rv > before && v.obj.to_string().contains("StatefulSetNotFound");
    let statuses: Vec<u64> = tap
        .of("statefulsetlocks", Some("lock"))
        .iter()
        .filter(|v| not_found(v))
        .map(|v| v.rv)
        .collect();
    let events: Vec<u64> = tap
        .of("events", None)
        .iter()
        .filter(|v| not_found(v))
        .map(|v| v.rv)
        .collect();
    assert!(
        statuses.is_empty() && events.is_empty(),
        "StatefulSetNotFound reported for an existing StatefulSet: lock versions {statuses:?}, events {events:?}"
    );
    let first_lease = tap.of("leases", Some("db-lease"))[0].at_ms;
    let gaps = lapses(&tap, "db-lease", first_lease, unix_ms(SystemTime::now()));
    assert!(
        gaps.is_empty(),
        "the Lease lapsed across the restart: {gaps:?}"
    );
    assert_never_two_writers(&sim);
}

// ---------------------------------------------------------------------------------------------
// 3. Claimed locks get a renewal entry at once even when the tenant budget defers them.

/// Replica b elects 10 locks; replica a, whose namespace budget is tiny (`--tenant-qps 0.1`),
/// joins (b hands it about half) and then b dies abruptly (a claims the rest). Every lock a takes
/// needs a status write (status.shard), which the budget defers for many seconds; its Lease must
/// still be renewed on time: no Ready writer's Lease lapses at any instant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claimed_locks_are_renewed_while_the_tenant_budget_defers_their_reconciles() {
    let (sim, client) = sim_with_crd().await;
    let tap = Tap::start(&sim);
    let n = 10;
    sets_and_locks(&client, n, 10).await;
    let b = start(&sim, "b", |_| {});
    for i in 0..n {
        wait_writer(&client, &format!("s{i}"), &format!("s{i}-0"), 15).await;
    }
    let locks: Api<StatefulSetLock> = Api::namespaced(client.clone(), "default");
    let owners = || {
        let locks = locks.clone();
        async move {
            locks
                .list(&ListParams::default())
                .await
                .unwrap()
                .items
                .iter()
                .map(|l| {
                    (
                        l.name_any(),
                        l.labels().get(SHARD_LABEL).cloned(),
                        l.status.as_ref().and_then(|s| s.shard.clone()),
                    )
                })
                .collect::<Vec<_>>()
        }
    };
    until(15, "b's status written on every lock", || async {
        owners()
            .await
            .iter()
            .all(|(_, _, s)| s.as_deref() == Some("b"))
            .then_some(())
    })
    .await;

    let from = unix_ms(SystemTime::now());
    let a = start(&sim, "a", |a| a.tenant_qps = 0.1);
    until(15, "b handed a lock to a", || async {
        owners()
            .await
            .iter()
            .any(|(_, l, _)| l.as_deref() == Some("a"))
            .then_some(())
    })
    .await;
    b.task.abort();
    let killed = Instant::now();
    until(15, "a owns every lock", || async {
        owners()
            .await
            .iter()
            .all(|(_, l, _)| l.as_deref() == Some("a"))
            .then_some(())
    })
    .await;
    println!("a owns every lock {:?} after b died", killed.elapsed());
    // Deliberate wait: a full lease duration (10 s) plus slack after the kill, so a Lease that
    // nobody renews would be seen lapsing.
    tokio::time::sleep(Duration::from_secs(12).saturating_sub(killed.elapsed())).await;
    let to = unix_ms(SystemTime::now());
    let still_deferred = owners()
        .await
        .iter()
        .filter(|(_, _, s)| s.as_deref() != Some("a"))
        .count();
    a.stop().await;
    let _ = b.stop.send(());

    let all = lapses_of(&tap, n, from, to);
    println!(
        "{still_deferred} of {n} locks still had b's status (reconcile deferred by the budget); lapses: {all:?}"
    );
    assert!(
        still_deferred > 0,
        "the tenant budget deferred nothing: the test does not exercise it"
    );
    assert!(
        all.is_empty(),
        "Leases of Ready writers lapsed (ms after a joined): {all:#?}"
    );
    assert_never_two_writers(&sim);
}

// ---------------------------------------------------------------------------------------------
// 4. A restarted replica renews its Leases before its reconcile lane reaches them.

/// Replica a elects 12 locks with 6 s Leases, is killed and restarted at once (same id) with
/// one reconcile worker and 300 ms added to every API call it makes: its reconcile lane needs
/// several seconds to look at all 12 locks again (a re-read and a write each, one at a time),
/// longer than the Leases have left. The renewal lane must take every lock labelled for the
/// replica the moment the replica may write again (rule 16: restarts too): no Ready writer's
/// Lease lapses at any instant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_replica_renews_before_its_reconcile_lane_reaches_the_lock() {
    let (sim, client) = sim_with_crd().await;
    let tap = Tap::start(&sim);
    let n = 12;
    sets_and_locks(&client, n, 6).await;
    let a = start(&sim, "a", |_| {});
    for i in 0..n {
        wait_writer(&client, &format!("s{i}"), &format!("s{i}-0"), 15).await;
    }
    // Past the first renewals, so the Leases' renewTimes are spread as in steady state.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let from = unix_ms(SystemTime::now());
    a.task.abort();
    sim.faults().update(|c| {
        c.latency_ms = 300;
        c.agents = vec!["stslock/a".into()];
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let a = start(&sim, "a", |a| a.concurrency = 1);
    // Deliberate wait: two Lease durations after the restart, so a Lease nobody renews in time
    // is seen lapsing.
    tokio::time::sleep(Duration::from_secs(12)).await;
    let to = unix_ms(SystemTime::now());
    sim.faults().update(|c| {
        c.latency_ms = 0;
        c.agents.clear();
    });
    a.stop().await;
    let all = lapses_of(&tap, n, from, to);
    assert!(
        all.is_empty(),
        "Leases of Ready writers lapsed after the restart: {all:#?}"
    );
    assert_never_two_writers(&sim);
}

/// The membership Lease of a production replica (15 s): the fence's write window must not be
/// what late answers run into (with the tests' 3 s Leases it is under a second).
fn production_membership(a: &mut stslock::config::OperatorArgs) {
    a.membership_lease_seconds = 15;
}

/// A replica restarted while every read it makes is answered 2 s late and every write 1 s
/// late (committed at once), 5.1 s before the first of its Leases (10 s) expires: every Lease is
/// renewed before it expires. A lock's first renewal after a restart needs its label confirmed
/// by a write and, while the Lease and pod watches have not listed yet, its Lease and pods read;
/// before, those reads waited for the confirmation and read the lock once more first — four
/// answers in a row before the renewal was sent — and the Leases lapsed. Now the reads go beside
/// the confirming write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_restarted_under_slow_answers_renews_every_lease_in_time() {
    const READS_LATE_MS: u64 = 2_000;
    let (sim, client) = sim_with_crd().await;
    let tap = Tap::start(&sim);
    let n = 16;
    sets_and_locks(&client, n, 10).await;
    let a = start(&sim, "a", production_membership);
    for i in 0..n {
        wait_writer(&client, &format!("s{i}"), &format!("s{i}-0"), 15).await;
    }
    // Past the first renewals, so the Leases' renewTimes are spread as in steady state.
    tokio::time::sleep(Duration::from_secs(6)).await;
    a.task.abort();
    // Restarted 5.1 s before the first of the Leases it left expires: time for the lock list
    // and one read beside the confirming write before its renewal commits (4.0 s after the
    // restart, measured), not for the confirmation and two reads after it (6.0 s before).
    // (A request the aborted task had sent may still be served: the expiries are read after
    // that, and read again at the restart to check none moved.)
    tokio::time::sleep(Duration::from_millis(200)).await;
    let leases: Api<Lease> = Api::default_namespaced(client.clone());
    let earliest_expiry = || async {
        let mut earliest = i64::MAX;
        for i in 0..n {
            let l = leases.get(&format!("lease{i}")).await.unwrap();
            let renewed = l.spec.unwrap().renew_time.unwrap().0.as_millisecond();
            earliest = earliest.min(renewed + 10_000);
        }
        earliest
    };
    let earliest = earliest_expiry().await;
    let restart_at = earliest - 5_100;
    let wait = restart_at - unix_ms(SystemTime::now());
    assert!(wait > 0, "the Leases were renewed {} ms too early", -wait);
    tokio::time::sleep(Duration::from_millis(wait as u64)).await;
    assert_eq!(
        earliest_expiry().await,
        earliest,
        "a Lease was renewed after the aborted replica's expiries were read"
    );
    let from = unix_ms(SystemTime::now());
    sim.faults().update(|c| {
        c.latency_ms = READS_LATE_MS;
        c.reads_only = true;
        c.agents = vec!["stslock/a".into()];
        c.hold_responses = vec![HoldResponse::new(1_000).agent("stslock/a")];
    });
    let a = start(&sim, "a", production_membership);
    // Deliberate wait: two Lease durations after the restart, so a Lease nobody renews in time
    // is seen lapsing.
    tokio::time::sleep(Duration::from_secs(21)).await;
    let to = unix_ms(SystemTime::now());
    sim.faults().set(kubesim::FaultConfig::default());
    a.stop().await;
    let first_renewals: Vec<i64> = (0..n)
        .filter_map(|i| {
            let versions = tap.of("leases", Some(&format!("lease{i}")));
            versions
                .iter()
                .find(|v| v.at_ms > from)
                .map(|v| v.at_ms - from)
        })
        .collect();
    println!(
        "restarted {} ms before the first Lease expiry; first renewal of each Lease after the restart, ms after it: {first_renewals:?}",
        earliest - from
    );
    assert_eq!(
        first_renewals.len(),
        n,
        "a Lease was not renewed after the restart"
    );
    let all = lapses_of(&tap, n, from, to);
    assert!(
        all.is_empty(),
        "Leases of Ready writers lapsed after a restart under late answers: {all:#?}"
    );
    assert_never_two_writers(&sim);
}

// ---------------------------------------------------------------------------------------------
// 8. Stale reads at restart.

/// After a failover (db-0 → db-1, epoch 1; db-0 back Ready as a reader) the single replica is
/// restarted while every `resourceVersion=0` read of its agent — its watchers' initial lists —
/// is served from a snapshot older than the failover, and its Lease watch, opened from that
/// list, stays half-open. It must not make the old writer the writer again nor reuse an epoch.
/// (stslock lists with quorum reads — kube-runtime's default `ListSemantic::MostRecent` — and
/// re-reads a lock before deciding it after a restart, so the stale snapshot must not matter; a
/// switch to `any_semantic()` without those re-reads would fail here.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_from_stale_reads_does_not_relabel_the_old_writer_or_reuse_an_epoch() {
    let (sim, client) = sim_with_crd().await;
    let tap = Tap::start(&sim);
    let op = start(&sim, "op", |_| {});
    statefulset(&client, "db", 3).await;
    lock(&client, "lock", "db", "db-lease", 30).await;
    wait_writer(&client, "db", "db-0", 15).await;
    let before_failover = Instant::now();
    sim.pods().set_ready("default", "db-0", false).unwrap();
    wait_writer(&client, "db", "db-1", 15).await;
    let failover_rv = sim.store().current_rv();
    sim.pods().set_ready("default", "db-0", true).unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    until(10, "db-0 Ready again (a reader)", || async {
        let p = pods.get("db-0").await.ok()?;
        (pod_ready(&p) && p.labels().get(ROLE).map(String::as_str) == Some("reader")).then_some(())
    })
    .await;
    op.stop().await;

    // The snapshot predates the failover (by 0.5 s or more), and stays well inside the Lease's
    // half-duration (its renewTime is recent enough not to look due).
    let lag = before_failover.elapsed() + Duration::from_millis(500);
    sim.faults().update(|c| {
        // Every resource (an empty resource list matches all).
        c.stale_reads = vec![StaleRead {
            resources: vec![],
            agents: vec!["stslock/op".into()],
            lag_ms: lag.as_millis() as u64,
        }];
        // And its Lease stream, once opened from that list, stays half-open: whatever the list
        // said about the Lease is all the watch tells it.
        c.watch_faults = vec![WatchFault::stall("leases").agent("stslock/op")];
    });
    let op = start(&sim, "op", |_| {});
    // Deliberate wait (something must NOT happen): the restarted replica has its caches and has
    // decided the lock a few times.
    tokio::time::sleep(Duration::from_secs(4)).await;
    sim.faults().update(|c| {
        c.stale_reads.clear();
        c.watch_faults.clear();
    });
    wait_writer(&client, "db", "db-1", 10).await;
    op.stop().await;

    let relabelled: Vec<u64> = tap
        .of("pods", Some("db-0"))
        .iter()
        .filter(|v| {
            v.rv > failover_rv
                && str_at(&v.obj, &format!("/metadata/labels/{ROLE}")) == Some("writer")
        })
        .map(|v| v.rv)
        .collect();
    let (seen, violations) = epoch_violations(&tap);
    println!("epochs issued:\n  {}", seen.join("\n  "));
    assert!(
        relabelled.is_empty(),
        "the old writer db-0 was labelled writer again after the failover (rv {relabelled:?})"
    );
    assert!(violations.is_empty(), "{violations:#?}");
    assert_never_two_writers(&sim);
}

/// A write's answer shows a pod newer than the plan's view of it — the pod turned Ready
/// between the decision and the write — and the pod watch delivers that change only after the
/// answer. The index already holds the newer state from the answer, so the late watch event
/// changes nothing and triggers nothing: the lock must be decided again from the answer. It
/// waited for the 5-minute resync instead (found at 5,000 locks: a StatefulSet whose pods
/// turned Ready while the operator labelled them readers had no writer for 300 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_seen_ready_first_in_a_write_answer_gets_the_writer_at_once() {
    // Pods turn Ready only when the test says so.
    let mut cfg = kubesim::SimConfig::default();
    cfg.controllers.pod_ready_delay = Duration::from_secs(3600);
    cfg.controllers.pod_terminate_delay = Duration::from_millis(100);
    cfg.store.recorded_labels = vec![SHARD_LABEL.to_string()];
    let sim = Sim::start(cfg);
    let client = sim.client_as("test");
    stslock::dev::install_crd(&client).await.unwrap();
    let tap = Tap::start(&sim);
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let sets: Api<StatefulSet> = Api::namespaced(client.clone(), "default");
    // Pods are created without waiting for the previous one to be Ready.
    let sts: StatefulSet = serde_json::from_value(json!({
        "metadata": {"name": "db"},
        "spec": {"serviceName": "db", "replicas": 1, "podManagementPolicy": "Parallel",
                 "selector": {"matchLabels": {"app": "db"}},
                 "template": {"metadata": {"labels": {"app": "db"}}, "spec": {"containers": [{"name": "c", "image": "postgres:15"}]}}}
    }))
    .unwrap();
    sets.create(&PostParams::default(), &sts).await.unwrap();
    lock(&client, "lock", "db", "db-lease", 30).await;
    let op = start(&sim, "op", |_| {});
    until(15, "db-0 labelled reader (no Ready pod yet)", || async {
        let p = pods.get("db-0").await.ok()?;
        (p.labels().get(ROLE).map(String::as_str) == Some("reader")).then_some(())
    })
    .await;
    // The replica's pod watch runs 3 s late (its StatefulSet watch does not).
    sim.faults().update(|c| {
        c.watch_faults = vec![WatchFault::lag("pods", 3000).agent("stslock/op")];
    });
    // A new pod turns Ready 1 s after it is created. The replica sees it 3 s after its
    // creation, still NotReady, and labels it reader: that write's answer shows it Ready. The
    // watch event saying so comes 1 s later, older than what the index already holds. (The
    // StatefulSet's status change at the readiness triggered a reconcile too early to help: the
    // pod was not in the index yet.) Timing on a loaded machine can miss the window: then
    // another pod is tried.
    let mut raced = None;
    for n in 2..=4 {
        let pod = format!("db-{}", n - 1);
        sets.patch(
            "db",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": n}})),
        )
        .await
        .unwrap();
        until(10, &format!("{pod} created"), || async {
            pods.get(&pod).await.ok()
        })
        .await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        sim.pods().set_ready("default", &pod, true).unwrap();
        let first_label = until(15, &format!("{pod} labelled"), || async {
            tap.of("pods", Some(&pod))
                .into_iter()
                .find(|v| str_at(&v.obj, &format!("/metadata/labels/{ROLE}")).is_some())
        })
        .await;
        let labelled_ready = str_at(&first_label.obj, &format!("/metadata/labels/{ROLE}"))
            == Some("reader")
            && Some(&first_label).is_some_and(|v| {
                v.obj
                    .pointer("/status/conditions")
                    .and_then(Value::as_array)
                    .is_some_and(|cs| {
                        cs.iter().any(|c| {
                            str_at(c, "/type") == Some("Ready")
                                && str_at(c, "/status") == Some("True")
                        })
                    })
            });
        if labelled_ready {
            raced = Some(pod);
            break;
        }
        println!("{pod} was labelled before it turned Ready: trying another pod");
        sim.pods().set_ready("default", &pod, false).unwrap();
    }
    let pod = raced.expect("the race this test is about never happened in three tries");
    // The watch has caught up (its events changed nothing); the pod is the only Ready one.
    wait_writer(&client, "db", &pod, 10).await;
    op.stop().await;
    assert_never_two_writers(&sim);
}

// ---------------------------------------------------------------------------------------------
// A promotion that commits after the operator gave up on it.

/// A switchover to db-1 whose promotion write is served 4 s late, in a task of its own (it
/// commits whatever the operator does meanwhile, as a request inside a real apiserver does):
/// the operator gives up on it after its 2 s timeout, and before it lands a second switchover
/// moves the Lease on to db-0 — db-1 never changed meanwhile (no readiness change, still a
/// reader). When the late promotion lands it must not make db-1 a second writer beside db-0.
/// Before, the demotion of db-1 (a reader already) was a no-op write that left db-1 as it was,
/// and the promotion, guarded by db-1's UID only, went through: two writers for as long as the
/// next plan took to notice. Now a promotion is a compare-and-swap on the version of the pod
/// its plan saw, and a demotion always changes the pod (a fencing token): the late promotion
/// conflicts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_promotion_that_commits_after_a_later_switchover_does_not_make_a_second_writer() {
    let (sim, client) = sim_with_crd().await;
    let op = start(&sim, "op", |a| a.api_timeout_seconds = 2);
    statefulset(&client, "db", 2).await;
    lock(&client, "lock", "db", "db-lease", 20).await;
    wait_writer(&client, "db", "db-0", 15).await;
    let prefer = |pod: &'static str| {
        let locks: Api<StatefulSetLock> = Api::namespaced(client.clone(), "default");
        async move {
            locks
                .patch(
                    "lock",
                    &PatchParams::default(),
                    &Patch::Merge(json!({"spec": {"preferredWriter": pod}})),
                )
                .await
                .unwrap();
        }
    };
    let leases: Api<Lease> = Api::namespaced(client.clone(), "default");
    let holder = || {
        let leases = leases.clone();
        async move { leases.get("db-lease").await.ok()?.spec?.holder_identity }
    };
    // The operator's writes to db-1 commit 4 s late from here on.
    sim.faults().update(|c| {
        c.late_commits = vec![
            kubesim::LateCommit::new(4000)
                .agent("stslock/op")
                .resource("pods")
                .name("db-1"),
        ]
    });
    let started_ms = sim.store().elapsed_ms();
    prefer("db-1").await;
    // The Lease moves to db-1, then its promotion is sent (and served late); from then on the
    // operator's writes are served at once.
    until(20, "the Lease moved to db-1", || {
        let h = holder();
        async move { (h.await.as_deref() == Some("db-1")).then_some(()) }
    })
    .await;
    let moved_ms = sim.store().elapsed_ms();
    tokio::time::sleep(Duration::from_millis(300)).await;
    sim.faults().set(Default::default());
    prefer("db-0").await;
    until(20, "the Lease moved back to db-0", || {
        let h = holder();
        async move { (h.await.as_deref() == Some("db-0")).then_some(()) }
    })
    .await;
    // Deliberate wait: the late promotion of db-1 (sent by 300 ms after the Lease moved,
    // served 4 s after it was sent) has landed or been refused by now.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let log = sim.commit_log();
    op.stop().await;
    let db1_writes: Vec<String> = log
        .iter()
        .filter(|c| c.at_ms > started_ms && c.resource == "pods" && c.name == "db-1")
        .map(|c| {
            format!(
                "+{} ms {} by {} role {:?}",
                c.at_ms - moved_ms.min(c.at_ms),
                c.verb,
                c.actor,
                c.labels.get(ROLE)
            )
        })
        .collect();
    println!("db-1's committed writes (from the Lease's move to db-1): {db1_writes:#?}");
    // The scenario happened: a promotion of db-1 was sent and its client gave up on it (no
    // answer within 2 s) — it was then served late, 4 s after it was sent.
    let given_up: Vec<_> = sim
        .write_attempts()
        .into_iter()
        .filter(|w| {
            w.at_ms > started_ms
                && w.actor == "stslock/op"
                && w.resource == "pods"
                && w.name == "db-1"
                && w.status == 0
        })
        .collect();
    assert!(!given_up.is_empty(), "no write to db-1 was given up on");

    assert_never_two_writers(&sim);
    wait_writer(&client, "db", "db-0", 5).await;
}
