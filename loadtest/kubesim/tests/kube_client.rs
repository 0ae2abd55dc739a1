//! kube-rs against kubesim, in-process and over loopback: what an operator relies on.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on setup failures

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{Transport, eventually, sim};
use futures::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::Api;
use kube::api::{
    DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams,
};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::json;

fn cm(name: &str, labels: &[(&str, &str)]) -> ConfigMap {
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_, _>>()},
        "data": {"k": "v"}
    }))
    .expect("configmap")
}

async fn list_with_selectors_and_pages(t: Transport) {
    let (_sim, client) = sim(t).await;
    let cms: Api<ConfigMap> = Api::namespaced(client, "default");
    for i in 0..25 {
        let tier = if i % 2 == 0 { "even" } else { "odd" };
        cms.create(
            &PostParams::default(),
            &cm(&format!("cm-{i:02}"), &[("tier", tier), ("app", "x")]),
        )
        .await
        .expect("create");
    }
    let even = cms
        .list(&ListParams::default().labels("tier=even"))
        .await
        .expect("list");
    assert_eq!(even.items.len(), 13);
    let set_based = cms
        .list(&ListParams::default().labels("tier in (odd),app"))
        .await
        .expect("list");
    assert_eq!(set_based.items.len(), 12);
    let none = cms
        .list(&ListParams::default().labels("tier notin (odd,even)"))
        .await
        .expect("list");
    assert!(none.items.is_empty());
    let by_name = cms
        .list(&ListParams::default().fields("metadata.name=cm-07"))
        .await
        .expect("list");
    assert_eq!(by_name.items.len(), 1);
    // Pagination: 25 items by pages of 10 → 10, 10, 5, with continue tokens.
    let mut seen = vec![];
    let mut lp = ListParams::default().limit(10);
    let mut pages = 0;
    loop {
        let page = cms.list(&lp).await.expect("page");
        pages += 1;
        seen.extend(
            page.items
                .iter()
                .map(|c| c.metadata.name.clone().expect("name")),
        );
        match page.metadata.continue_ {
            Some(c) if !c.is_empty() => lp = lp.continue_token(&c),
            _ => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(seen.len(), 25);
    let mut sorted = seen.clone();
    sorted.dedup();
    assert_eq!(sorted.len(), 25, "no duplicates across pages");
    // Bad selectors are 400s with the apiserver's wording.
    let err = cms
        .list(&ListParams::default().fields("data.k=v"))
        .await
        .expect_err("unsupported field");
    match err {
        kube::Error::Api(s) => {
            assert_eq!(s.code, 400);
            assert!(
                // kube-apiserver 1.34's wording (checked by the conformance suite).
                s.message
                    .contains(r#""data.k" is not a known field selector"#),
                "{}",
                s.message
            );
        }
        other => panic!("unexpected error {other:?}"),
    }
}

#[tokio::test]
async fn list_with_selectors_and_pages_in_process() {
    list_with_selectors_and_pages(Transport::InProcess).await;
}

#[tokio::test]
async fn list_with_selectors_and_pages_loopback() {
    list_with_selectors_and_pages(Transport::Loopback).await;
}

async fn four_patch_kinds_and_conflicts(t: Transport) {
    let (_sim, client) = sim(t).await;
    let leases: Api<Lease> = Api::namespaced(client.clone(), "default");
    let lease: Lease = serde_json::from_value(json!({
        "metadata": {"name": "l"},
        "spec": {"holderIdentity": "a", "leaseDurationSeconds": 30, "leaseTransitions": 0}
    }))
    .expect("lease");
    let created = leases
        .create(&PostParams::default(), &lease)
        .await
        .expect("create");
    let rv0 = created.metadata.resource_version.clone().expect("rv");

    // Merge patch.
    let p = leases
        .patch(
            "l",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"holderIdentity": "b"}})),
        )
        .await
        .expect("merge");
    assert_eq!(
        p.spec.as_ref().and_then(|s| s.holder_identity.as_deref()),
        Some("b")
    );
    // JSON patch.
    let p = leases
        .patch(
            "l",
            &PatchParams::default(),
            &Patch::<()>::Json(
                serde_json::from_value(json!([
                    {"op": "test", "path": "/spec/holderIdentity", "value": "b"},
                    {"op": "replace", "path": "/spec/leaseTransitions", "value": 1}
                ]))
                .expect("json patch"),
            ),
        )
        .await
        .expect("json");
    assert_eq!(p.spec.as_ref().and_then(|s| s.lease_transitions), Some(1));
    // A failing JSON patch test is rejected and changes nothing.
    leases
        .patch(
            "l",
            &PatchParams::default(),
            &Patch::<()>::Json(
                serde_json::from_value(json!([
                    {"op": "test", "path": "/spec/holderIdentity", "value": "zzz"},
                    {"op": "replace", "path": "/spec/holderIdentity", "value": "c"}
                ]))
                .expect("json patch"),
            ),
        )
        .await
        .expect_err("test op fails");
    // Strategic merge patch.
    let p = leases
        .patch(
            "l",
            &PatchParams::default(),
            &Patch::Strategic(json!({"metadata": {"labels": {"x": "1"}}})),
        )
        .await
        .expect("strategic");
    assert_eq!(
        p.metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("x"))
            .map(String::as_str),
        Some("1")
    );
    // Server-side apply, creating and then updating.
    let ssa = PatchParams::apply("test-manager");
    let applied = leases
        .patch(
            "l2",
            &ssa,
            &Patch::Apply(json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": "l2"}, "spec": {"holderIdentity": "z"}})),
        )
        .await
        .expect("apply create");
    assert_eq!(
        applied
            .spec
            .as_ref()
            .and_then(|s| s.holder_identity.as_deref()),
        Some("z")
    );
    let applied = leases
        .patch(
            "l2",
            &ssa,
            &Patch::Apply(json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": "l2", "labels": {"a": "b"}}, "spec": {"holderIdentity": "y"}})),
        )
        .await
        .expect("apply update");
    assert_eq!(
        applied
            .spec
            .as_ref()
            .and_then(|s| s.holder_identity.as_deref()),
        Some("y")
    );
    assert_eq!(
        applied
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("a"))
            .map(String::as_str),
        Some("b")
    );

    // A replace with a stale resourceVersion is a 409 Conflict (compare-and-swap).
    let mut stale = created.clone();
    stale.metadata.resource_version = Some(rv0);
    stale.spec.as_mut().expect("spec").holder_identity = Some("stale".into());
    match leases.replace("l", &PostParams::default(), &stale).await {
        Err(kube::Error::Api(s)) => {
            assert_eq!(s.code, 409);
            assert_eq!(s.reason, "Conflict");
            assert!(
                s.message.contains("the object has been modified"),
                "{}",
                s.message
            );
        }
        other => panic!("expected 409, got {other:?}"),
    }
    // A current one succeeds, and bumps the resourceVersion.
    let mut cur = leases.get("l").await.expect("get");
    let before = cur.metadata.resource_version.clone();
    cur.spec.as_mut().expect("spec").holder_identity = Some("fresh".into());
    let replaced = leases
        .replace("l", &PostParams::default(), &cur)
        .await
        .expect("replace");
    assert_ne!(replaced.metadata.resource_version, before);
    // Creating twice is AlreadyExists; missing is NotFound with the apiserver's message.
    match leases.create(&PostParams::default(), &lease).await {
        Err(kube::Error::Api(s)) => assert_eq!((s.code, s.reason.as_str()), (409, "AlreadyExists")),
        other => panic!("expected AlreadyExists, got {other:?}"),
    }
    match leases.get("nope").await {
        Err(kube::Error::Api(s)) => {
            assert_eq!(s.code, 404);
            assert_eq!(s.message, "leases.coordination.k8s.io \"nope\" not found");
        }
        other => panic!("expected NotFound, got {other:?}"),
    }
    leases
        .delete("l", &DeleteParams::default())
        .await
        .expect("delete");
    assert!(leases.get_opt("l").await.expect("get_opt").is_none());
}

#[tokio::test]
async fn four_patch_kinds_and_conflicts_in_process() {
    four_patch_kinds_and_conflicts(Transport::InProcess).await;
}

#[tokio::test]
async fn four_patch_kinds_and_conflicts_loopback() {
    four_patch_kinds_and_conflicts(Transport::Loopback).await;
}

async fn watch_with_selectors(t: Transport) {
    let (_sim, client) = sim(t).await;
    let cms: Api<ConfigMap> = Api::namespaced(client, "default");
    let list = cms.list(&ListParams::default()).await.expect("list");
    let rv = list.metadata.resource_version.expect("rv");
    let mut stream = cms
        .watch(&WatchParams::default().labels("tier=gold"), &rv)
        .await
        .expect("watch")
        .boxed();
    cms.create(&PostParams::default(), &cm("plain", &[("tier", "tin")]))
        .await
        .expect("create");
    cms.create(&PostParams::default(), &cm("shiny", &[("tier", "gold")]))
        .await
        .expect("create");
    // Relabelling out of the selector is seen as a deletion by this watcher.
    cms.patch(
        "shiny",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"tier": "tin"}}})),
    )
    .await
    .expect("patch");
    let mut seen = vec![];
    while seen.len() < 2 {
        let ev = tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await
            .expect("event in time")
            .expect("stream open")
            .expect("event");
        match ev {
            WatchEvent::Added(c) => seen.push(format!("added {}", c.metadata.name.expect("name"))),
            WatchEvent::Deleted(c) => {
                seen.push(format!("deleted {}", c.metadata.name.expect("name")))
            }
            WatchEvent::Modified(c) => {
                seen.push(format!("modified {}", c.metadata.name.expect("name")))
            }
            WatchEvent::Bookmark(_) => {}
            WatchEvent::Error(e) => panic!("watch error {e:?}"),
        }
    }
    assert_eq!(seen, vec!["added shiny", "deleted shiny"]);
}

#[tokio::test]
async fn watch_with_selectors_in_process() {
    watch_with_selectors(Transport::InProcess).await;
}

#[tokio::test]
async fn watch_with_selectors_loopback() {
    watch_with_selectors(Transport::Loopback).await;
}

/// kube-runtime's watcher keeps a correct view through a forced compaction: its next watch
/// resumes from a compacted resourceVersion, gets 410 Gone, relists, and ends with the final
/// state.
async fn watcher_recovers_from_compaction(t: Transport) {
    let (sim, client) = sim(t).await;
    let cms: Api<ConfigMap> = Api::namespaced(client, "default");
    let store = {
        let (reader, writer) = kube::runtime::reflector::store::<ConfigMap>();
        let stream = watcher(cms.clone(), watcher::Config::default().labels("app=x"))
            .default_backoff()
            .reflect(writer)
            .applied_objects();
        tokio::spawn(async move {
            let mut s = stream.boxed();
            // Errors (e.g. 410 Gone) are part of the stream; the watcher recovers by itself.
            while s.next().await.is_some() {}
        });
        reader
    };
    store.wait_until_ready().await.expect("store ready");
    for i in 0..5 {
        cms.create(
            &PostParams::default(),
            &cm(&format!("a{i}"), &[("app", "x")]),
        )
        .await
        .expect("create");
    }
    eventually(10, "reflector sees 5", || {
        let n = store.state().len();
        async move { (n == 5).then_some(()) }
    })
    .await;
    // Drop the watch and compact: changes made meanwhile are only visible through a relist.
    sim.faults().drop_watches();
    cms.delete("a0", &DeleteParams::default())
        .await
        .expect("delete");
    cms.create(&PostParams::default(), &cm("b0", &[("app", "x")]))
        .await
        .expect("create");
    sim.compact();
    cms.patch(
        "a1",
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"k": "changed"}})),
    )
    .await
    .expect("patch");
    sim.faults().drop_watches();
    eventually(20, "reflector converges after 410", || {
        let mut names: Vec<String> = store
            .state()
            .iter()
            .map(|c| c.metadata.name.clone().expect("name"))
            .collect();
        names.sort();
        let a1 = store
            .state()
            .iter()
            .find(|c| c.metadata.name.as_deref() == Some("a1"))
            .and_then(|c| c.data.as_ref().and_then(|d| d.get("k").cloned()));
        async move {
            (names == ["a1", "a2", "a3", "a4", "b0"] && a1.as_deref() == Some("changed"))
                .then_some(())
        }
    })
    .await;
}

#[tokio::test]
async fn watcher_recovers_from_compaction_in_process() {
    watcher_recovers_from_compaction(Transport::InProcess).await;
}

#[tokio::test]
async fn watcher_recovers_from_compaction_loopback() {
    watcher_recovers_from_compaction(Transport::Loopback).await;
}

#[tokio::test]
async fn resuming_a_watch_from_a_compacted_version_is_410_gone() {
    let (sim, client) = sim(Transport::Loopback).await;
    let cms: Api<ConfigMap> = Api::namespaced(client, "default");
    let rv = cms
        .list(&ListParams::default())
        .await
        .expect("list")
        .metadata
        .resource_version
        .expect("rv");
    cms.create(&PostParams::default(), &cm("x", &[]))
        .await
        .expect("create");
    sim.compact();
    let mut s = cms
        .watch(&WatchParams::default(), &rv)
        .await
        .expect("watch")
        .boxed();
    match s.next().await {
        Some(Ok(WatchEvent::Error(e))) => {
            assert_eq!(e.code, 410);
            assert_eq!(e.reason, "Expired");
        }
        other => panic!("expected 410 ERROR event, got {other:?}"),
    }
}

#[tokio::test]
async fn bookmarks_and_streaming_lists() {
    let (_sim, client) = sim(Transport::InProcess).await;
    let cms: Api<ConfigMap> = Api::namespaced(client, "default");
    cms.create(&PostParams::default(), &cm("s1", &[("app", "s")]))
        .await
        .expect("create");
    // watch-list (sendInitialEvents) as kube-runtime's streaming_lists() does it.
    let (reader, writer) = kube::runtime::reflector::store::<ConfigMap>();
    let stream = watcher(cms.clone(), watcher::Config::default().streaming_lists())
        .reflect(writer)
        .applied_objects();
    tokio::spawn(async move {
        let mut s = stream.boxed();
        // Errors (e.g. 410 Gone) are part of the stream; the watcher recovers by itself.
        while s.next().await.is_some() {}
    });
    reader.wait_until_ready().await.expect("ready");
    assert_eq!(reader.state().len(), 1);
    // Bookmarks arrive on an idle watch.
    let rv = cms
        .list(&ListParams::default())
        .await
        .expect("list")
        .metadata
        .resource_version
        .expect("rv");
    let mut s = cms
        .watch(
            &WatchParams {
                bookmarks: true,
                ..WatchParams::default()
            },
            &rv,
        )
        .await
        .expect("watch")
        .boxed();
    let ev = tokio::time::timeout(Duration::from_secs(5), s.next())
        .await
        .expect("bookmark in time")
        .expect("open")
        .expect("event");
    assert!(matches!(ev, WatchEvent::Bookmark(_)), "{ev:?}");
}

async fn statefulset_controller(t: Transport) {
    let (_sim, client) = sim(t).await;
    let sets: Api<StatefulSet> = Api::namespaced(client.clone(), "default");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let sts: StatefulSet = serde_json::from_str(common::STATEFULSET).expect("sts");
    sets.create(&PostParams::default(), &sts)
        .await
        .expect("create");
    let ready = |p: &Pod| {
        p.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
    };
    let all = eventually(10, "3 ready pods", || {
        let pods = pods.clone();
        async move {
            let l = pods
                .list(&ListParams::default().labels("app=db"))
                .await
                .ok()?;
            (l.items.len() == 3 && l.items.iter().all(ready)).then_some(l.items)
        }
    })
    .await;
    // Ordered creation: each pod was created after its predecessor.
    let mut by_ordinal: Vec<(String, String)> = all
        .iter()
        .map(|p| {
            (
                p.metadata.name.clone().expect("name"),
                p.metadata.resource_version.clone().expect("rv"),
            )
        })
        .collect();
    by_ordinal.sort();
    for p in &all {
        let labels = p.metadata.labels.as_ref().expect("labels");
        let name = p.metadata.name.as_deref().expect("name");
        assert_eq!(
            labels
                .get("statefulset.kubernetes.io/pod-name")
                .map(String::as_str),
            Some(name)
        );
        assert!(labels.contains_key("apps.kubernetes.io/pod-index"));
        let owner = &p.metadata.owner_references.as_ref().expect("owner")[0];
        assert_eq!(owner.kind, "StatefulSet");
        assert_eq!(owner.controller, Some(true));
    }
    // A deleted pod comes back with a new UID.
    let old_uid = pods.get("db-1").await.expect("get").metadata.uid;
    pods.delete("db-1", &DeleteParams::default())
        .await
        .expect("delete");
    eventually(10, "db-1 recreated", || {
        let pods = pods.clone();
        let old_uid = old_uid.clone();
        async move {
            let p = pods.get_opt("db-1").await.ok()??;
            (p.metadata.uid != old_uid && ready(&p)).then_some(())
        }
    })
    .await;
    // Scale through the scale subresource.
    sets.patch_scale(
        "db",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"replicas": 1}})),
    )
    .await
    .expect("scale");
    eventually(10, "scaled to 1", || {
        let pods = pods.clone();
        async move {
            let l = pods
                .list(&ListParams::default().labels("app=db"))
                .await
                .ok()?;
            (l.items.len() == 1).then_some(())
        }
    })
    .await;
    let s = eventually(10, "status follows", || {
        let sets = sets.clone();
        async move {
            let s = sets.get("db").await.ok()?;
            let st = s.status.clone()?;
            (st.replicas == 1 && st.ready_replicas == Some(1)).then_some(s)
        }
    })
    .await;
    assert_eq!(s.spec.replicas, Some(1));
    // Deleting the StatefulSet garbage-collects its pods.
    sets.delete("db", &DeleteParams::default())
        .await
        .expect("delete");
    eventually(10, "pods collected", || {
        let pods = pods.clone();
        async move {
            let l = pods
                .list(&ListParams::default().labels("app=db"))
                .await
                .ok()?;
            l.items.is_empty().then_some(())
        }
    })
    .await;
}

#[tokio::test]
async fn statefulset_controller_in_process() {
    statefulset_controller(Transport::InProcess).await;
}

#[tokio::test]
async fn statefulset_controller_loopback() {
    statefulset_controller(Transport::Loopback).await;
}

#[tokio::test]
async fn finalizers_hold_deletion_until_removed() {
    let (_sim, client) = sim(Transport::InProcess).await;
    let cms: Api<ConfigMap> = Api::namespaced(client, "default");
    let mut c = cm("held", &[]);
    c.metadata.finalizers = Some(vec!["example.com/hold".into()]);
    cms.create(&PostParams::default(), &c)
        .await
        .expect("create");
    cms.delete("held", &DeleteParams::default())
        .await
        .expect("delete");
    let held = cms.get("held").await.expect("still there");
    assert!(held.metadata.deletion_timestamp.is_some());
    // No new finalizers on a terminating object.
    let err = cms
        .patch(
            "held",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"finalizers": ["example.com/hold", "other"]}})),
        )
        .await
        .expect_err("forbidden");
    assert!(
        matches!(err, kube::Error::Api(ref s) if s.code == 422),
        "{err:?}"
    );
    cms.patch(
        "held",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
    )
    .await
    .expect("remove finalizer");
    assert!(cms.get_opt("held").await.expect("get").is_none());
}

#[tokio::test]
async fn generate_name_and_generation() {
    let (_sim, client) = sim(Transport::InProcess).await;
    let sets: Api<StatefulSet> = Api::namespaced(client.clone(), "default");
    let mut sts: StatefulSet = serde_json::from_str(common::STATEFULSET).expect("sts");
    sts.metadata.name = None;
    sts.metadata.generate_name = Some("gen-".into());
    let created = sets
        .create(&PostParams::default(), &sts)
        .await
        .expect("create");
    let name = created.metadata.name.clone().expect("name");
    assert!(name.starts_with("gen-") && name.len() == 9, "{name}");
    assert_eq!(created.metadata.generation, Some(1));
    let p = sets
        .patch(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 2}})),
        )
        .await
        .expect("patch");
    assert_eq!(p.metadata.generation, Some(2));
    let p = sets
        .patch(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"a": "b"}}})),
        )
        .await
        .expect("patch");
    assert_eq!(
        p.metadata.generation,
        Some(2),
        "metadata changes do not bump generation"
    );
    // Namespaced objects need their namespace.
    let elsewhere: Api<ConfigMap> = Api::namespaced(client, "missing");
    match elsewhere
        .create(&PostParams::default(), &cm("x", &[]))
        .await
    {
        Err(kube::Error::Api(s)) => assert_eq!(s.message, "namespaces \"missing\" not found"),
        other => panic!("expected namespace not found, got {other:?}"),
    }
}

/// A pod in graceful deletion stays (Terminating) when someone patches it; only the kubelet's
/// final delete removes it.
#[tokio::test]
async fn patching_a_terminating_pod_does_not_remove_it() {
    let mut cfg = kubesim::SimConfig::default();
    cfg.controllers.pod_ready_delay = Duration::from_millis(20);
    cfg.controllers.pod_terminate_delay = Duration::from_secs(2);
    let (_sim, client) = common::sim_with(Transport::InProcess, cfg).await;
    let sets: Api<StatefulSet> = Api::namespaced(client.clone(), "default");
    sets.create(
        &PostParams::default(),
        &serde_json::from_str(common::STATEFULSET).unwrap(),
    )
    .await
    .unwrap();
    let pods: Api<Pod> = Api::namespaced(client, "default");
    eventually(10, "db-0 scheduled", || {
        let pods = pods.clone();
        async move {
            pods.get_opt("db-0")
                .await
                .ok()??
                .spec?
                .node_name
                .map(|_| ())
        }
    })
    .await;
    pods.delete("db-0", &DeleteParams::default()).await.unwrap();
    let p = pods
        .patch(
            "db-0",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"sts-role": "reader"}}})),
        )
        .await
        .unwrap();
    assert!(p.metadata.deletion_timestamp.is_some());
    assert!(
        pods.get_opt("db-0").await.unwrap().is_some(),
        "still terminating"
    );
}
