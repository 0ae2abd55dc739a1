//! Issue P7: stslock takes a cluster over from the Go `sts-leader-elect-operator` (DESIGN §10),
//! on either backend (tests/common). The fixture is the state the Go operator leaves: its CRD
//! (`tests/fixtures/go-operator-crd.yaml`, the seed's as it ships), locks with its finalizer and
//! its status, Leases with a holder and no labels, annotations or owner references, role labels
//! on the pods — one StatefulSet with the stale NotReady `writer` the Go operator is known to
//! leave beside the real one, one whose writer went NotReady before the Go operator was stopped —
//! and one lock without `spec`, which the Go CRD allows. Then our CRD is applied over the Go one
//! and stslock started.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: panics are failures

mod common;

use std::collections::BTreeMap;

use common::{Env, Options, ROLE_LABEL, call, pod_ready};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{
    ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams,
};
use kube::{Api, ResourceExt};
use serde_json::json;
use stslock::api::{FINALIZER, GO_FINALIZER, LEASE_OWNER_ANNOTATION, WRITER_UID_ANNOTATION};

const LOCKS: usize = 20;
const LEASE_SECONDS: i32 = 6;
/// The StatefulSet whose old writer (NotReady) still carries `writer` beside the new one.
const STALE: usize = 3;
/// The StatefulSet whose writer went NotReady before the Go operator was stopped.
const DOWN: usize = 5;

fn go_crd() -> CustomResourceDefinition {
    let yaml = include_str!("fixtures/go-operator-crd.yaml");
    serde_saphyr::from_str(yaml).expect("the Go operator's CRD parses")
}

fn locks_api(env: &Env) -> Api<DynamicObject> {
    let ar = ApiResource {
        group: "app.anukkrit.me".into(),
        version: "v1".into(),
        api_version: "app.anukkrit.me/v1".into(),
        kind: "StatefulSetLock".into(),
        plural: "statefulsetlocks".into(),
    };
    Api::namespaced_with(env.admin.clone(), &env.ns, &ar)
}

/// The writer the Go operator chose for set `i` (not always the lowest ordinal: it failed over
/// before, so an election from scratch would pick someone else).
fn go_writer(i: usize) -> String {
    format!("db-{i}-{}", i % 2)
}

/// The Go operator's CRD, served: its locks can be created (a real apiserver serves a new CRD
/// a moment after accepting it).
async fn apply_go_crd(env: &Env) {
    let crds: Api<CustomResourceDefinition> = Api::all(env.admin.clone());
    call(
        "apply the Go CRD",
        crds.patch(
            "statefulsetlocks.app.anukkrit.me",
            &PatchParams::apply("go-operator").force(),
            &Patch::Apply(go_crd()),
        ),
    )
    .await
    .expect("Go CRD");
    let locks = locks_api(env);
    env.until(60, "the Go CRD served", || {
        let locks = locks.clone();
        Box::pin(async move { locks.list(&ListParams::default()).await.ok().map(|_| ()) })
    })
    .await;
}

/// `bad-lock`, a lock without spec: valid under the Go CRD, undecodable as ours. Retried while
/// the apiserver may still serve the previous schema of the CRD (which requires spec).
async fn create_lock_without_spec(env: &Env, finalizers: serde_json::Value) {
    let locks = locks_api(env);
    let bad: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "app.anukkrit.me/v1", "kind": "StatefulSetLock",
        "metadata": {"name": "bad-lock", "finalizers": finalizers}
    }))
    .unwrap();
    env.until(60, "a lock without spec created under the Go CRD", || {
        let (locks, bad) = (locks.clone(), bad.clone());
        Box::pin(async move {
            locks
                .create(&PostParams::default(), &bad)
                .await
                .ok()
                .map(|_| ())
        })
    })
    .await;
}

/// Every lock has a "Ready" writer-labelled pod that holds its Lease (and for STALE a second,
/// NotReady, writer-labelled pod).
async fn go_operator_state(env: &Env) {
    apply_go_crd(env).await;
    for i in 0..LOCKS {
        env.statefulset(&format!("db-{i}"), 3).await;
    }
    // Every pod Ready, as the Go operator needs them to label.
    env.until(180, "every pod Ready", || {
        let pods = env.pods();
        Box::pin(async move {
            let l = pods.list(&ListParams::default()).await.ok()?;
            let ready = l.items.iter().filter(|p| pod_ready(p)).count();
            (ready == LOCKS * 3).then_some(())
        })
    })
    .await;
    let locks = locks_api(env);
    let leases = env.leases();
    let pods = env.pods();
    let now = jiff::Timestamp::now();
    let micro = |t: jiff::Timestamp| t.strftime("%Y-%m-%dT%H:%M:%S%.6fZ").to_string();
    for i in 0..LOCKS {
        let writer = go_writer(i);
        // Its Lease: a holder, renewed a moment ago, no marks at all.
        let lease: Lease = serde_json::from_value(json!({
            "metadata": {"name": format!("db-{i}-lease")},
            "spec": {"holderIdentity": writer, "leaseDurationSeconds": LEASE_SECONDS,
                     "acquireTime": micro(now), "renewTime": micro(now), "leaseTransitions": i % 4}
        }))
        .unwrap();
        call(
            "create Go lease",
            leases.create(&PostParams::default(), &lease),
        )
        .await
        .expect("lease");
        for o in 0..3 {
            let pod = format!("db-{i}-{o}");
            let role = if pod == writer || (i == STALE && o == 1 - i % 2) {
                "writer"
            } else {
                "reader"
            };
            call(
                "label pod",
                pods.patch(
                    &pod,
                    &PatchParams::default(),
                    &Patch::Merge(json!({"metadata": {"labels": {ROLE_LABEL: role}}})),
                ),
            )
            .await
            .expect("label");
        }
        // The lock, with the Go finalizer and the Go operator's status.
        let lock: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "app.anukkrit.me/v1", "kind": "StatefulSetLock",
            "metadata": {"name": format!("lock-{i}"), "finalizers": [GO_FINALIZER]},
            "spec": {"statefulSetName": format!("db-{i}"), "leaseName": format!("db-{i}-lease"),
                     "leaseDurationSeconds": LEASE_SECONDS}
        }))
        .unwrap();
        call("create lock", locks.create(&PostParams::default(), &lock))
            .await
            .expect("lock");
        let t = now.strftime("%Y-%m-%dT%H:%M:%SZ").to_string();
        call(
            "Go status",
            locks.patch_status(
                &format!("lock-{i}"),
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {"writerPod": writer, "conditions": [
                    {"type": "Available", "status": "True", "reason": "Available", "message": format!("writer pod {writer} is available"), "lastTransitionTime": t},
                    {"type": "Progressing", "status": "False", "reason": "Reconciling", "message": "reconciled", "lastTransitionTime": t},
                ]}})),
            ),
        )
        .await
        .expect("status");
    }
    // The Go CRD lets a lock without spec be stored.
    create_lock_without_spec(env, json!([GO_FINALIZER])).await;
    // The known defect: STALE's old writer went NotReady and kept `writer`; DOWN's writer went
    // NotReady just before the Go operator stopped.
    env.set_ready(&format!("db-{STALE}-{}", 1 - STALE % 2), false)
        .await;
    env.set_ready(&go_writer(DOWN), false).await;
}

/// Our CRD over the Go one, served once its schema is ours (the printer columns say so).
async fn install_our_crd(env: &Env) {
    stslock::dev::install_crd(&env.admin)
        .await
        .expect("our CRD over the Go one");
    let crds: Api<CustomResourceDefinition> = Api::all(env.admin.clone());
    env.until(60, "our CRD established", || {
        let crds = crds.clone();
        Box::pin(async move {
            let c = crds.get("statefulsetlocks.app.anukkrit.me").await.ok()?;
            let ours = c.spec.versions.iter().any(|v| {
                v.additional_printer_columns
                    .as_ref()
                    .is_some_and(|p| p.iter().any(|c| c.name == "Epoch"))
            });
            let established = c
                .status?
                .conditions?
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True");
            (ours && established).then_some(())
        })
    })
    .await;
}

fn lease_of(l: &Lease) -> (String, i32, Option<jiff::Timestamp>) {
    let s = l.spec.clone().unwrap_or_default();
    (
        s.holder_identity.unwrap_or_default(),
        s.lease_transitions.unwrap_or(0),
        s.renew_time.map(|t| t.0),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn takes_over_the_go_operators_cluster_without_a_write_outage() {
    let mut env = Env::start_with(Options {
        replicas: 0,
        install_crd: false,
        ..Options::default()
    })
    .await;
    go_operator_state(&env).await;
    let before: BTreeMap<String, (String, i32, Option<jiff::Timestamp>)> =
        call("list leases", env.leases().list(&ListParams::default()))
            .await
            .unwrap()
            .items
            .iter()
            .map(|l| (l.name_any(), lease_of(l)))
            .collect();
    install_our_crd(&env).await;
    for id in ["test-0", "test-1"] {
        let args = env.operator_args(id);
        env.start_operator_with(id, args).await;
    }

    // Every decodable lock is adopted: its Lease marked as ours, the Go finalizer replaced.
    let leases = env.leases();
    let adopted = env
        .until(90, "every Lease adopted", || {
            let leases = leases.clone();
            Box::pin(async move {
                let l = leases.list(&ListParams::default()).await.ok()?;
                let ours: Vec<Lease> = l
                    .items
                    .into_iter()
                    .filter(|l| l.annotations().contains_key(LEASE_OWNER_ANNOTATION))
                    .collect();
                (ours.len() == LOCKS).then_some(ours)
            })
        })
        .await;
    for l in &adopted {
        let name = l.name_any();
        let i: usize = name
            .trim_start_matches("db-")
            .trim_end_matches("-lease")
            .parse()
            .unwrap();
        let (holder, transitions, _) = lease_of(l);
        let (go_holder, go_transitions, _) = before[&name].clone();
        assert_eq!(
            l.annotations()[LEASE_OWNER_ANNOTATION],
            format!("{}/lock-{i}", env.ns)
        );
        assert!(l.annotations().contains_key(WRITER_UID_ANNOTATION));
        assert_eq!(
            l.owner_references().first().map(|r| r.name.as_str()),
            Some(format!("lock-{i}").as_str()),
            "the adopted Lease is owned by its lock"
        );
        if i == DOWN {
            assert_ne!(holder, go_holder, "a NotReady holder is failed over");
            assert!(transitions > go_transitions, "under a new epoch");
        } else {
            assert_eq!(holder, go_holder, "{name}: a Ready holder keeps the role");
            assert_eq!(
                transitions, go_transitions,
                "{name}: adoption of a Ready holder is no transition"
            );
        }
    }
    // Roles: the same writer for every Ready holder; STALE's old writer demoted.
    for i in 0..LOCKS {
        let writer = if i == DOWN {
            adopted
                .iter()
                .find(|l| l.name_any() == format!("db-{i}-lease"))
                .map(|l| lease_of(l).0)
                .unwrap()
        } else {
            go_writer(i)
        };
        env.wait_writer(&format!("db-{i}"), &writer).await;
    }
    // (Listed untyped: the lock without spec does not decode as ours.)
    let locks = locks_api(&env);
    env.until(
        60,
        "Go finalizers replaced and WriterReady reported",
        || {
            let locks = locks.clone();
            Box::pin(async move {
                let l = locks.list(&ListParams::default()).await.ok()?;
                l.items
                    .iter()
                    .filter(|l| l.name_any() != "bad-lock")
                    .all(|l| {
                        l.finalizers() == [FINALIZER.to_string()]
                            && l.data["status"]["conditions"].as_array().is_some_and(|c| {
                                c.iter().any(|c| {
                                    c["type"] == "Available" && c["reason"] == "WriterReady"
                                })
                            })
                    })
                    .then_some(())
            })
        },
    )
    .await;
    env.wait_event("lock-0", "an Adopted Event", |reason, _| {
        reason == "Adopted"
    })
    .await;
    // The undecodable lock is reported on itself, and nothing else waited for it.
    env.wait_event("bad-lock", "an Undecodable Event", |reason, msg| {
        reason == "Undecodable" && msg.contains("spec")
    })
    .await;

    // Every Lease renewed within half its duration (plus scheduling slack) once adopted.
    let first: BTreeMap<String, jiff::Timestamp> = adopted
        .iter()
        .map(|l| (l.name_any(), lease_of(l).2.unwrap()))
        .collect();
    let renewed = env
        .until(30, "every adopted Lease renewed", || {
            let (leases, first) = (leases.clone(), first.clone());
            Box::pin(async move {
                let l = leases.list(&ListParams::default()).await.ok()?;
                let gaps: Vec<(String, f64)> = l
                    .items
                    .iter()
                    .filter_map(|l| {
                        let t = lease_of(l).2?;
                        let f = first.get(&l.name_any())?;
                        (t > *f).then(|| (l.name_any(), t.duration_since(*f).as_secs_f64()))
                    })
                    .collect();
                (gaps.len() == LOCKS).then_some(gaps)
            })
        })
        .await;
    for (name, gap) in &renewed {
        assert!(
            *gap <= f64::from(LEASE_SECONDS) / 2.0 + 1.5,
            "{name} renewed {gap:.2}s after adoption"
        );
    }

    // STALE's old writer recovers: it stays a reader.
    let stale = format!("db-{STALE}-{}", 1 - STALE % 2);
    env.set_ready(&stale, true).await;
    env.wait_writer(&format!("db-{STALE}"), &go_writer(STALE))
        .await;

    // Failover works on every adopted lock.
    let mut writers = BTreeMap::new();
    for i in 0..LOCKS {
        let roles = env.roles(&format!("db-{i}")).await;
        let w = roles
            .iter()
            .find(|(_, r)| r.as_deref() == Some("writer"))
            .map(|(p, _)| p.clone())
            .unwrap();
        env.set_ready(&w, false).await;
        writers.insert(i, w);
    }
    for (i, old) in &writers {
        let app = format!("db-{i}");
        wait_failed_over(&env, &app, old).await;
    }

    // Deleting an adopted lock completes: no finalizer left behind.
    for name in ["lock-0", "lock-1"] {
        call(
            "delete lock",
            env.locks().delete(name, &DeleteParams::default()),
        )
        .await
        .unwrap();
    }
    let locks = env.locks();
    env.until(60, "adopted locks deleted", || {
        let locks = locks.clone();
        Box::pin(async move {
            let a = locks.get_opt("lock-0").await.ok()?;
            let b = locks.get_opt("lock-1").await.ok()?;
            (a.is_none() && b.is_none()).then_some(())
        })
    })
    .await;

    // Zero dual-writer time, except the interval the Go operator left on STALE, which ends
    // once stslock runs.
    let report = env.report().await;
    for (set, r) in &report.statefulsets {
        if set.ends_with(&format!("/db-{STALE}")) {
            assert_eq!(r.dual_writer.len(), 1, "{set}: {:?}", r.dual_writer);
            assert!(
                r.dual_writer[0].end_ms.is_some(),
                "{set}: the stale writer was demoted"
            );
        } else {
            assert!(r.dual_writer.is_empty(), "{set}: {:?}", r.dual_writer);
        }
    }
    env.stop_operators().await;
}

/// Until exactly one pod of `app` other than `old` carries `writer`.
async fn wait_failed_over(env: &Env, app: &str, old: &str) {
    let pods = env.pods();
    let (app, old) = (app.to_string(), old.to_string());
    env.until(60, &format!("{app} failed over"), move || {
        let (pods, app, old) = (pods.clone(), app.clone(), old.clone());
        Box::pin(async move {
            let l = pods
                .list(&ListParams::default().labels(&format!("app={app},{ROLE_LABEL}=writer")))
                .await
                .ok()?;
            (l.items.len() == 1 && l.items[0].name_any() != old).then_some(())
        })
    })
    .await;
}

/// Failover latency of healthy locks, in ms per failover: each writer is failed in turn and the
/// time until another pod carries `writer` is taken from the test's own polling (10 ms).
async fn failover_latencies(env: &Env, sets: &[String]) -> Vec<u128> {
    let mut out = vec![];
    for app in sets {
        let roles = env.roles(app).await;
        let old = roles
            .iter()
            .find(|(_, r)| r.as_deref() == Some("writer"))
            .map(|(p, _)| p.clone())
            .unwrap();
        let start = std::time::Instant::now();
        env.set_ready(&old, false).await;
        wait_failed_over(env, app, &old).await;
        out.push(start.elapsed().as_millis());
        // Back to Ready: the next round fails the new writer of another set.
        env.set_ready(&old, true).await;
    }
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undecodable_lock_does_not_delay_failover_of_the_others() {
    let mut env = Env::start_with(Options {
        replicas: 0,
        install_crd: false,
        ..Options::default()
    })
    .await;
    apply_go_crd(&env).await;
    let locks = locks_api(&env);
    create_lock_without_spec(&env, json!([])).await;
    install_our_crd(&env).await;
    const SETS: usize = 6;
    let sets: Vec<String> = (0..SETS).map(|i| format!("h-{i}")).collect();
    for s in &sets {
        env.statefulset(s, 2).await;
        env.lock(
            &format!("{s}-lock"),
            s,
            &format!("{s}-lease"),
            10,
            json!({}),
        )
        .await;
    }
    let args = env.operator_args("test-0");
    env.start_operator_with("test-0", args).await;
    for s in &sets {
        env.wait_roles(s, 2).await;
    }
    env.wait_event("bad-lock", "an Undecodable Event", |reason, _| {
        reason == "Undecodable"
    })
    .await;
    let with = failover_latencies(&env, &sets).await;
    // The bad lock removed (it has no finalizer here), the same failovers again.
    call(
        "delete the bad lock",
        locks.delete("bad-lock", &DeleteParams::default()),
    )
    .await
    .unwrap();
    let without = failover_latencies(&env, &sets).await;
    let p50 = |v: &[u128]| v[v.len() / 2];
    let max = |v: &[u128]| v[v.len() - 1];
    eprintln!(
        "failover latency with the undecodable lock present: p50 {} ms, max {} ms; without: p50 {} ms, max {} ms ({:?} backend)",
        p50(&with),
        max(&with),
        p50(&without),
        max(&without),
        env.backend()
    );
    env.stop_operators().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_that_only_looks_like_the_go_operators_is_never_written() {
    let mut env = Env::start_with(Options {
        replicas: 0,
        ..Options::default()
    })
    .await;
    // x: its Lease is held by something that is not a pod of x. y: held by a pod of y, but
    // carrying another workload's label.
    for (set, holder, labels) in [
        ("x", "other-app-0", json!({})),
        (
            "y",
            "y-0",
            json!({"app.kubernetes.io/managed-by": "someone-else"}),
        ),
    ] {
        env.statefulset(set, 2).await;
        let lease: Lease = serde_json::from_value(json!({
            "metadata": {"name": format!("{set}-lease"), "labels": labels},
            "spec": {"holderIdentity": holder, "leaseDurationSeconds": 10, "leaseTransitions": 3}
        }))
        .unwrap();
        call(
            "create lease",
            env.leases().create(&PostParams::default(), &lease),
        )
        .await
        .unwrap();
        let lock: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "app.anukkrit.me/v1", "kind": "StatefulSetLock",
            "metadata": {"name": format!("{set}-lock"), "finalizers": [GO_FINALIZER]},
            "spec": {"statefulSetName": set, "leaseName": format!("{set}-lease"), "leaseDurationSeconds": 10}
        }))
        .unwrap();
        call(
            "create lock",
            locks_api(&env).create(&PostParams::default(), &lock),
        )
        .await
        .unwrap();
    }
    let before: BTreeMap<String, String> =
        call("list leases", env.leases().list(&ListParams::default()))
            .await
            .unwrap()
            .items
            .iter()
            .map(|l| (l.name_any(), l.resource_version().unwrap_or_default()))
            .collect();
    let args = env.operator_args("test-0");
    env.start_operator_with("test-0", args).await;
    for set in ["x", "y"] {
        env.wait_condition(&format!("{set}-lock"), "Error", "True", "LeaseNotOwned")
            .await;
    }
    // The Go finalizer is replaced all the same (a deleted lock must not hang on it).
    let locks = env.locks();
    env.until(30, "the Go finalizer replaced", || {
        let locks = locks.clone();
        Box::pin(async move {
            let l = locks.list(&ListParams::default()).await.ok()?;
            l.items
                .iter()
                .all(|l| l.finalizers() == [FINALIZER.to_string()])
                .then_some(())
        })
    })
    .await;
    for set in ["x", "y"] {
        let name = format!("{set}-lease");
        let now = call("get lease", env.leases().get(&name)).await.unwrap();
        assert_eq!(
            now.resource_version().unwrap_or_default(),
            before[&name],
            "{name} was written"
        );
    }
    // Deleting the locks deletes neither Lease nor touches the pods.
    for set in ["x", "y"] {
        call(
            "delete lock",
            env.locks()
                .delete(&format!("{set}-lock"), &DeleteParams::default()),
        )
        .await
        .unwrap();
    }
    let locks = env.locks();
    env.until(30, "locks deleted", || {
        let locks = locks.clone();
        Box::pin(async move {
            locks
                .list(&ListParams::default())
                .await
                .ok()?
                .items
                .is_empty()
                .then_some(())
        })
    })
    .await;
    for set in ["x", "y"] {
        let name = format!("{set}-lease");
        let now = call("get lease", env.leases().get(&name)).await.unwrap();
        assert_eq!(now.resource_version().unwrap_or_default(), before[&name]);
    }
    if env.has_write_log() {
        let touched: Vec<_> = env
            .writes()
            .into_iter()
            .filter(|w| {
                w.by_operator()
                    && w.maybe_committed()
                    && ((w.resource == "leases" && w.name.ends_with("-lease"))
                        || w.resource == "pods")
            })
            .collect();
        assert!(touched.is_empty(), "the operator wrote: {touched:?}");
    }
    env.stop_operators().await;
}
