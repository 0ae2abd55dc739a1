//! The failure modes of a real apiserver that act after a request was served, observed from
//! real kube-rs clients (in-process and over HTTP loopback): commit-then-lose-response,
//! hold-response, per-watch-stream lag and stall, stale `resourceVersion=0` reads.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on setup failures

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::{STATEFULSET, Transport, eventually, sim};
use futures::{Stream, StreamExt};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use kube::Api;
use kube::api::{GetParams, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kubesim::{HoldResponse, LateCommit, LoseResponse, StaleRead, WatchFault};
use serde_json::json;

const GROUP_LABEL: &str = "app.anukkrit.me/shard-group";

fn cm(name: &str, v: &str) -> ConfigMap {
    serde_json::from_value(json!({"metadata": {"name": name}, "data": {"v": v}})).expect("cm")
}

fn lease(name: &str, labels: &[(&str, &str)]) -> Lease {
    let labels: BTreeMap<&str, &str> = labels.iter().copied().collect();
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": labels},
        "spec": {"holderIdentity": "nobody"}
    }))
    .expect("lease")
}

fn v_of(c: &ConfigMap) -> Option<&str> {
    c.data.as_ref()?.get("v").map(String::as_str)
}

/// A request over plain HTTP to a `/sim/` endpoint (what a shell script would do).
async fn sim_http(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    body: serde_json::Value,
) -> serde_json::Value {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let b = body.to_string();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{b}",
        b.len()
    );
    s.write_all(req.as_bytes()).await.expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).await.expect("read");
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    let body = out.split("\r\n\r\n").nth(1).unwrap_or("");
    serde_json::from_str(body).unwrap_or(json!(null))
}

/// The current resourceVersion of a collection (to watch from).
async fn rv_of<K>(api: &Api<K>) -> String
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    api.list(&ListParams::default())
        .await
        .expect("list")
        .metadata
        .resource_version
        .expect("rv")
}

/// The next non-bookmark event of a watch within `secs` (None: the stream ended).
async fn next_event<K, S>(w: &mut S, secs: u64) -> Option<WatchEvent<K>>
where
    S: Stream<Item = kube::Result<WatchEvent<K>>> + Unpin,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        match tokio::time::timeout_at(deadline, w.next()).await {
            Err(_) => panic!("no watch event within {secs}s"),
            Ok(None) => return None,
            Ok(Some(Ok(WatchEvent::Bookmark(_)))) => continue,
            Ok(Some(Ok(e))) => return Some(e),
            Ok(Some(Err(e))) => panic!("watch error: {e}"),
        }
    }
}

fn added_name<K: kube::Resource>(e: Option<WatchEvent<K>>) -> String {
    match e {
        Some(WatchEvent::Added(o)) => o.meta().name.clone().unwrap_or_default(),
        other => panic!(
            "expected ADDED, got {:?}",
            other.map(|e| match e {
                WatchEvent::Added(_) => "ADDED",
                WatchEvent::Modified(_) => "MODIFIED",
                WatchEvent::Deleted(_) => "DELETED",
                WatchEvent::Bookmark(_) => "BOOKMARK",
                WatchEvent::Error(_) => "ERROR",
            })
        ),
    }
}

#[tokio::test]
async fn lost_response_commits_the_write_in_process() {
    let (sim, _) = sim(Transport::InProcess).await;
    let mine: Api<Lease> = Api::namespaced(sim.client_as("stslock/replica-1"), "default");
    let other: Api<Lease> = Api::namespaced(sim.client_as("stslock/replica-0"), "default");
    sim.faults().update(|c| {
        c.lose_responses = vec![LoseResponse::hang().agent("replica-1").resource("leases")]
    });
    // Hang: the client gets no answer until its own timeout, yet the lease is committed.
    let t = Instant::now();
    let r = tokio::time::timeout(
        Duration::from_secs(2),
        mine.create(&PostParams::default(), &lease("l", &[])),
    )
    .await;
    assert!(r.is_err(), "a lost response must not be answered: {r:?}");
    assert!(t.elapsed() >= Duration::from_secs(2));
    let seen = other.get("l").await.expect("the write was committed");
    let rv: u64 = seen
        .metadata
        .resource_version
        .as_deref()
        .expect("rv")
        .parse()
        .expect("numeric rv");
    let rec = sim
        .commit_log()
        .into_iter()
        .find(|r| r.rv == rv)
        .expect("in the commit log");
    assert_eq!(
        (rec.actor.as_str(), rec.verb, rec.resource.as_str()),
        ("stslock/replica-1", "create", "leases")
    );
    // Reads, other resources and other clients are unaffected.
    mine.get("l").await.expect("reads pass");
    let cms: Api<ConfigMap> = Api::namespaced(sim.client_as("stslock/replica-1"), "default");
    cms.create(&PostParams::default(), &cm("c", "1"))
        .await
        .expect("other resources pass");
    let holder = Patch::Merge(json!({"spec": {"holderIdentity": "replica-0"}}));
    other
        .patch("l", &PatchParams::default(), &holder)
        .await
        .expect("other clients pass");
    // 500 ServerTimeout: the client sees an error for a write that took effect.
    sim.faults().update(|c| {
        c.lose_responses = vec![
            LoseResponse::server_timeout()
                .agent("replica-1")
                .resource("leases.coordination.k8s.io"),
        ]
    });
    let holder = Patch::Merge(json!({"spec": {"holderIdentity": "replica-1"}}));
    match mine.patch("l", &PatchParams::default(), &holder).await {
        Err(kube::Error::Api(s)) => {
            assert_eq!((s.code, s.reason.as_str()), (500, "ServerTimeout"), "{s:?}");
            assert!(s.message.contains("could not be completed"), "{s:?}");
        }
        other => panic!("expected 500 ServerTimeout, got {other:?}"),
    }
    let now = other.get("l").await.expect("get");
    assert_eq!(
        now.spec.and_then(|s| s.holder_identity).as_deref(),
        Some("replica-1"),
        "the patch whose answer was lost is applied"
    );
    // A rejected write committed nothing and is answered as usual.
    match mine.create(&PostParams::default(), &lease("l", &[])).await {
        Err(kube::Error::Api(s)) => assert_eq!(s.code, 409, "{s:?}"),
        other => panic!("expected 409, got {other:?}"),
    }
}

#[tokio::test]
async fn lost_response_over_http_hangs_or_times_out_with_504() {
    let (sim, client) = sim(Transport::Loopback).await;
    let addr = sim.addr().expect("addr");
    let cfg = sim_http(
        addr,
        "PUT",
        "/sim/faults",
        json!({"loseResponses": [{"resources": ["configmaps"], "lostAs": "hang"}]}),
    )
    .await;
    assert_eq!(cfg["loseResponses"][0]["probability"], 1.0, "{cfg}");
    // A client with a 1 s read timeout, as an operator configures its API timeout.
    let mut config = kube::Config::new(sim.url().expect("url").parse().expect("url"));
    config.read_timeout = Some(Duration::from_secs(1));
    let impatient: Api<ConfigMap> =
        Api::namespaced(kube::Client::try_from(config).expect("client"), "default");
    let t = Instant::now();
    let r = tokio::time::timeout(
        Duration::from_secs(20),
        impatient.create(&PostParams::default(), &cm("a", "1")),
    )
    .await
    .expect("the client's own timeout answers");
    assert!(r.is_err(), "{r:?}");
    assert!(t.elapsed() >= Duration::from_secs(1), "{:?}", t.elapsed());
    let cms: Api<ConfigMap> = Api::namespaced(client, "default");
    assert_eq!(
        v_of(&cms.get("a").await.expect("committed")),
        Some("1"),
        "the write whose answer was lost is visible"
    );
    // 504: kube's default client retries it, and its retry of the create finds its own
    // object: 409 AlreadyExists for a create that succeeded once.
    sim_http(
        addr,
        "PUT",
        "/sim/faults",
        json!({"loseResponses": [{"resources": ["configmaps"], "lostAs": "timeout"}]}),
    )
    .await;
    match cms.create(&PostParams::default(), &cm("b", "1")).await {
        Err(kube::Error::Api(s)) => {
            assert_eq!((s.code, s.reason.as_str()), (409, "AlreadyExists"), "{s:?}")
        }
        other => panic!("expected 409 after a retried 504, got {other:?}"),
    }
    cms.get("b").await.expect("committed");
    let creates = sim
        .commit_log()
        .iter()
        .filter(|r| r.resource == "configmaps" && r.name == "b")
        .count();
    assert_eq!(creates, 1);
    // The raw 504 as the apiserver's timeout filter words it (in-process: no retries).
    let raw: Api<ConfigMap> = Api::namespaced(sim.client(), "default");
    match raw.create(&PostParams::default(), &cm("c", "1")).await {
        Err(kube::Error::Api(s)) => {
            assert_eq!((s.code, s.reason.as_str()), (504, "Timeout"), "{s:?}");
            assert!(
                s.message
                    .starts_with("Timeout: request did not complete within requested timeout"),
                "{s:?}"
            );
        }
        other => panic!("expected 504, got {other:?}"),
    }
    cms.get("c").await.expect("committed");
}

#[tokio::test]
async fn held_response_arrives_late_after_the_write_is_visible_and_recorded() {
    let (sim, client) = sim(Transport::InProcess).await;
    let sets: Api<StatefulSet> = Api::namespaced(client.clone(), "default");
    sets.create(
        &PostParams::default(),
        &serde_json::from_str(STATEFULSET).expect("sts"),
    )
    .await
    .expect("create");
    let pods: Api<Pod> = Api::namespaced(client, "default");
    eventually(10, "db-0 exists", || {
        let pods = pods.clone();
        async move { pods.get_opt("db-0").await.ok()?.map(|_| ()) }
    })
    .await;
    let hold = Duration::from_millis(1500);
    sim.faults().update(|c| {
        c.hold_responses = vec![
            HoldResponse::new(hold.as_millis() as u64)
                .agent("slow-operator")
                .resource("pods"),
        ]
    });
    let slow: Api<Pod> = Api::namespaced(sim.client_as("slow-operator"), "default");
    let t = Instant::now();
    let write = tokio::spawn(async move {
        let p = Patch::Merge(json!({"metadata": {"labels": {"sts-role": "writer"}}}));
        let r = slow.patch("db-0", &PatchParams::default(), &p).await;
        (r, Instant::now())
    });
    // Another client sees the write, and the recorder has it, while its answer is held.
    let seen = eventually(10, "db-0 labelled writer", || {
        let pods = pods.clone();
        async move {
            let p = pods.get("db-0").await.ok()?;
            (p.metadata.labels?.get("sts-role").map(String::as_str) == Some("writer"))
                .then(Instant::now)
        }
    })
    .await;
    let writers = sim.report().statefulsets["default/db"].writers.clone();
    assert_eq!(writers, vec!["db-0".to_string()]);
    let (r, answered) = write.await.expect("join");
    r.expect("a held answer is the normal answer");
    assert!(answered.duration_since(t) >= hold, "{:?}", answered - t);
    assert!(seen < answered, "visible before the answer");
    assert!(
        sim.commit_log()
            .iter()
            .any(|r| r.actor == "slow-operator" && r.name == "db-0" && r.verb == "update")
    );
}

/// A late commit outlives its client: a kube-rs client over loopback gives up after 300 ms (its
/// own timeout drops the request and closes its connection), the write is not there then, and
/// it commits 1.5 s after it was sent anyway. The same delay as `latencyMs` dies with the
/// client.
#[tokio::test]
async fn a_late_commit_lands_after_its_client_gave_up() {
    let (sim, client) = sim(Transport::Loopback).await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    cms.create(&PostParams::default(), &cm("a", "1"))
        .await
        .expect("create");
    let patch = |v: &str| Patch::Merge(json!({"data": {"v": v}}));
    let give_up = Duration::from_millis(300);
    let late = Duration::from_millis(1500);
    // Latency in the request's own task: gone with the client.
    sim.faults().update(|c| {
        c.latency_ms = late.as_millis() as u64;
        c.writes_only = true;
    });
    let sent = tokio::time::timeout(
        give_up,
        cms.patch("a", &PatchParams::default(), &patch("2")),
    )
    .await;
    assert!(sent.is_err(), "the client gave up: {sent:?}");
    sim.faults().set(Default::default());
    tokio::time::sleep(late + Duration::from_millis(700)).await;
    assert_eq!(
        v_of(&cms.get("a").await.expect("get")),
        Some("1"),
        "a request whose client went away under latency is not served"
    );
    // A late commit: served in a task of its own.
    sim.faults().update(|c| {
        c.late_commits = vec![
            LateCommit::new(late.as_millis() as u64)
                .resource("configmaps")
                .name("a"),
        ];
    });
    let t = Instant::now();
    let sent = tokio::time::timeout(
        give_up,
        cms.patch("a", &PatchParams::default(), &patch("3")),
    )
    .await;
    assert!(sent.is_err(), "the client gave up: {sent:?}");
    sim.faults().set(Default::default());
    assert_eq!(
        v_of(&cms.get("a").await.expect("get")),
        Some("1"),
        "not committed yet"
    );
    let landed = eventually(10, "the late write committed", || {
        let cms = cms.clone();
        async move { (v_of(&cms.get("a").await.ok()?) == Some("3")).then(Instant::now) }
    })
    .await;
    assert!(landed.duration_since(t) >= late, "{:?}", landed - t);
    // The commit log says which commits were served late.
    let log = sim.commit_log();
    let late_commits: Vec<_> = log.iter().filter(|c| c.late).collect();
    assert_eq!(late_commits.len(), 1, "{log:?}");
    assert_eq!(late_commits[0].name, "a");
    // The faults can be set over HTTP too.
    assert_eq!(
        serde_json::to_value(kubesim::FaultConfig {
            late_commits: vec![LateCommit::new(5).agent("x")],
            ..Default::default()
        })
        .expect("json")["lateCommits"],
        json!([{"delayMs": 5, "probability": 1.0, "agents": ["x"], "resources": [], "names": []}])
    );
}

#[tokio::test]
async fn watch_lag_delays_one_resource_while_others_flow() {
    let (sim, client) = sim(Transport::Loopback).await;
    let lag = Duration::from_millis(1500);
    sim.faults()
        .update(|c| c.watch_faults = vec![WatchFault::lag("configmaps", lag.as_millis() as u64)]);
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let secrets: Api<Secret> = Api::namespaced(client, "default");
    let wp = WatchParams::default();
    let mut cw = cms
        .watch(&wp, &rv_of(&cms).await)
        .await
        .expect("watch")
        .boxed();
    let mut sw = secrets
        .watch(&wp, &rv_of(&secrets).await)
        .await
        .expect("watch")
        .boxed();
    let t = Instant::now();
    for n in ["a", "b", "c"] {
        cms.create(&PostParams::default(), &cm(n, "1"))
            .await
            .expect("create");
    }
    let s: Secret = serde_json::from_value(json!({"metadata": {"name": "s"}})).expect("secret");
    secrets
        .create(&PostParams::default(), &s)
        .await
        .expect("create");
    assert_eq!(added_name(next_event(&mut sw, 10).await), "s");
    let secret_at = t.elapsed();
    let mut got = vec![];
    for _ in 0..3 {
        got.push(added_name(next_event(&mut cw, 10).await));
        assert!(t.elapsed() >= lag, "delivered early: {:?}", t.elapsed());
    }
    assert_eq!(got, ["a", "b", "c"], "order kept");
    assert!(secret_at < lag, "the other resource flows: {secret_at:?}");
    // Lifting the lag: the same open stream is prompt again.
    sim.faults().update(|c| c.watch_faults.clear());
    let t = Instant::now();
    cms.create(&PostParams::default(), &cm("d", "1"))
        .await
        .expect("create");
    assert_eq!(added_name(next_event(&mut cw, 10).await), "d");
    assert!(t.elapsed() < lag, "{:?}", t.elapsed());
}

/// A lag counts from the commit, as in a lagging watch cache: a stream that ends at its
/// `timeoutSeconds` with a change still held, resumed from the last version its client saw,
/// delivers that change `lag` after its commit, not `lag` after the resume. (Counted from the
/// resume, a lag as long as the client's watch timeout held a change back through resume after
/// resume: the operator's pod watch, 20 s timeouts under a 20 s lag, saw a readiness change
/// 45 s or more after it happened.)
#[tokio::test]
async fn a_lagging_watch_resumed_delivers_lag_after_the_commit() {
    let (sim, client) = sim(Transport::Loopback).await;
    let lag = Duration::from_millis(4000);
    sim.faults()
        .update(|c| c.watch_faults = vec![WatchFault::lag("configmaps", lag.as_millis() as u64)]);
    let cms: Api<ConfigMap> = Api::namespaced(client, "default");
    let rv = rv_of(&cms).await;
    let mut first = cms
        .watch(&WatchParams::default().timeout(1), &rv)
        .await
        .expect("watch")
        .boxed();
    cms.create(&PostParams::default(), &cm("a", "1"))
        .await
        .expect("create");
    let committed = Instant::now();
    assert!(
        next_event(&mut first, 10).await.is_none(),
        "the first stream ends at its timeout with the change still held"
    );
    let resumed_at = committed.elapsed();
    let mut second = cms
        .watch(&WatchParams::default().timeout(30), &rv)
        .await
        .expect("watch")
        .boxed();
    assert_eq!(added_name(next_event(&mut second, 10).await), "a");
    let at = committed.elapsed();
    assert!(at >= lag, "delivered early: {at:?}");
    assert!(
        at < resumed_at + lag - Duration::from_millis(200),
        "delivered {at:?} after the commit: the lag counted from the resume at {resumed_at:?}"
    );
}

#[tokio::test]
async fn stalled_watch_is_half_open_past_its_timeout_and_delivers_after_lift() {
    let (sim, client) = sim(Transport::Loopback).await;
    let addr = sim.addr().expect("addr");
    sim_http(
        addr,
        "PUT",
        "/sim/faults",
        json!({"watchFaults": [{"resources": ["leases"], "stall": true}]}),
    )
    .await;
    let leases: Api<Lease> = Api::namespaced(client.clone(), "default");
    let cms: Api<ConfigMap> = Api::namespaced(client, "default");
    // timeoutSeconds=1 and bookmarks every 500 ms: an unstalled stream would have ended, and
    // sent bookmarks, long before the 3 s below.
    let mut lw = leases
        .watch(&WatchParams::default().timeout(1), &rv_of(&leases).await)
        .await
        .expect("watch")
        .boxed();
    let mut cw = cms
        .watch(&WatchParams::default(), &rv_of(&cms).await)
        .await
        .expect("watch")
        .boxed();
    for n in ["l1", "l2", "l3"] {
        leases
            .create(&PostParams::default(), &lease(n, &[]))
            .await
            .expect("create");
    }
    cms.create(&PostParams::default(), &cm("c", "1"))
        .await
        .expect("create");
    assert_eq!(
        added_name(next_event(&mut cw, 10).await),
        "c",
        "others flow"
    );
    let quiet = tokio::time::timeout(Duration::from_secs(3), lw.next()).await;
    assert!(
        quiet.is_err(),
        "a stalled stream sends nothing (no event, no bookmark, no end): {:?}",
        quiet.map(|e| e.map(|e| e.is_ok()))
    );
    // Lifted: it delivers what it held, in order, then ends (its timeout passed meanwhile).
    sim_http(addr, "PUT", "/sim/faults", json!({})).await;
    let mut got = vec![];
    while let Some(e) = next_event(&mut lw, 10).await {
        got.push(added_name(Some(e)));
    }
    assert_eq!(got, ["l1", "l2", "l3"]);
}

#[tokio::test]
async fn stalled_watch_is_bounded_and_can_be_ended() {
    let (sim, client) = sim(Transport::InProcess).await;
    let cms: Api<ConfigMap> = Api::namespaced(client, "default");
    let rv = rv_of(&cms).await;
    sim.faults()
        .update(|c| c.watch_faults = vec![WatchFault::stall("configmaps").max_held(5)]);
    // The test ends a stalled stream when it chooses.
    let mut w = cms
        .watch(&WatchParams::default(), &rv)
        .await
        .expect("watch")
        .boxed();
    cms.create(&PostParams::default(), &cm("c0", "1"))
        .await
        .expect("create");
    sim.faults().drop_watches();
    assert!(
        next_event(&mut w, 10).await.is_none(),
        "ended, nothing sent"
    );
    // Past its bound a stalled stream ends, as the apiserver closes a watcher too slow for
    // its buffer; the client resumes from the last version it saw and loses nothing.
    let mut w = cms
        .watch(&WatchParams::default(), &rv)
        .await
        .expect("watch")
        .boxed();
    for i in 1..=5 {
        cms.create(&PostParams::default(), &cm(&format!("c{i}"), "1"))
            .await
            .expect("create");
    }
    assert!(next_event(&mut w, 10).await.is_none(), "ended at the bound");
    sim.faults().update(|c| c.watch_faults.clear());
    let mut w = cms
        .watch(&WatchParams::default(), &rv)
        .await
        .expect("watch")
        .boxed();
    let mut got = vec![];
    for _ in 0..6 {
        got.push(added_name(next_event(&mut w, 10).await));
    }
    assert_eq!(got, ["c0", "c1", "c2", "c3", "c4", "c5"]);
}

#[tokio::test]
async fn stale_reads_serve_resource_version_0_from_the_past() {
    let (sim, client) = sim(Transport::InProcess).await;
    let lag = Duration::from_millis(2000);
    sim.faults()
        .update(|c| c.stale_reads = vec![StaleRead::new("configmaps", lag.as_millis() as u64)]);
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    cms.create(&PostParams::default(), &cm("old", "1"))
        .await
        .expect("create");
    let any = ListParams::default().match_any();
    // A fresh object is not in the lagging snapshot until it is lag old.
    let t = Instant::now();
    let stale = cms.list(&any).await.expect("list");
    assert!(stale.items.is_empty(), "too new for the snapshot");
    eventually(15, "old in the rv=0 list", || {
        let cms = cms.clone();
        let any = any.clone();
        async move {
            let l = cms.list(&any).await.ok()?;
            (!l.items.is_empty()).then_some(())
        }
    })
    .await;
    assert!(t.elapsed() >= lag / 2, "{:?}", t.elapsed());
    // New writes: rv=0 reads show the old state, quorum reads the new one.
    cms.patch(
        "old",
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"v": "2"}})),
    )
    .await
    .expect("patch");
    cms.create(&PostParams::default(), &cm("new", "1"))
        .await
        .expect("create");
    let stale = cms.list(&any).await.expect("list");
    let fresh = cms.list(&ListParams::default()).await.expect("list");
    let names = |l: &kube::api::ObjectList<ConfigMap>| {
        l.items
            .iter()
            .map(|c| {
                (
                    c.metadata.name.clone().unwrap_or_default(),
                    v_of(c).map(str::to_string),
                )
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(names(&stale), [("old".to_string(), Some("1".to_string()))]);
    assert_eq!(
        names(&fresh),
        [
            ("new".to_string(), Some("1".to_string())),
            ("old".to_string(), Some("2".to_string()))
        ]
    );
    let rv = |l: &kube::api::ObjectList<ConfigMap>| -> u64 {
        l.metadata
            .resource_version
            .as_deref()
            .and_then(|r| r.parse().ok())
            .expect("rv")
    };
    assert!(
        rv(&stale) < rv(&fresh),
        "the snapshot's own resourceVersion"
    );
    assert_eq!(
        v_of(&cms.get_with("old", &GetParams::any()).await.expect("get")),
        Some("1")
    );
    assert_eq!(v_of(&cms.get("old").await.expect("get")), Some("2"));
    match cms.get_with("new", &GetParams::any()).await {
        Err(kube::Error::Api(s)) => assert_eq!(s.code, 404),
        other => panic!("expected 404 from the snapshot, got {other:?}"),
    }
    // Other resources are fresh.
    let secrets: Api<Secret> = Api::namespaced(client, "default");
    let s: Secret = serde_json::from_value(json!({"metadata": {"name": "s"}})).expect("secret");
    secrets
        .create(&PostParams::default(), &s)
        .await
        .expect("create");
    assert_eq!(secrets.list(&any).await.expect("list").items.len(), 1);
    // The snapshot catches up.
    eventually(15, "rv=0 reads catch up", || {
        let cms = cms.clone();
        let any = any.clone();
        async move {
            let l = cms.list(&any).await.ok()?;
            (l.items.len() == 2).then_some(())
        }
    })
    .await;
}

/// A replica's view of one set of Leases, kept by kube-rs's reflector as the operator does.
fn reflect(client: kube::Client, selector: &str) -> reflector::Store<Lease> {
    let api: Api<Lease> = Api::namespaced(client, "default");
    let (reader, writer) = reflector::store();
    let stream = reflector(
        writer,
        watcher(api, watcher::Config::default().labels(selector)),
    )
    .applied_objects();
    tokio::spawn(stream.for_each(|_| async {}));
    reader
}

fn has(store: &reflector::Store<Lease>, name: &str) -> bool {
    store
        .state()
        .iter()
        .any(|l| l.metadata.name.as_deref() == Some(name))
}

#[tokio::test]
async fn membership_watch_stall_for_one_replica() {
    let (sim, client) = sim(Transport::InProcess).await;
    let leases: Api<Lease> = Api::namespaced(client, "default");
    let members = format!("{GROUP_LABEL}=g1");
    leases
        .create(
            &PostParams::default(),
            &lease("member-0", &[(GROUP_LABEL, "g1")]),
        )
        .await
        .expect("create");
    // Each replica watches the membership Leases of its group; replica-1 also watches other
    // Leases (its lock leases) on another stream.
    let view0 = reflect(sim.client_as("stslock/replica-0"), &members);
    let view1 = reflect(sim.client_as("stslock/replica-1"), &members);
    let locks1 = reflect(sim.client_as("stslock/replica-1"), "app=lock");
    for v in [&view0, &view1, &locks1] {
        tokio::time::timeout(Duration::from_secs(10), v.wait_until_ready())
            .await
            .expect("synced")
            .expect("ready");
    }
    assert!(has(&view1, "member-0"));
    sim.faults().update(|c| {
        c.watch_faults = vec![
            WatchFault::stall("leases")
                .agent("replica-1")
                .label_selector(GROUP_LABEL),
        ]
    });
    leases
        .create(
            &PostParams::default(),
            &lease("member-1", &[(GROUP_LABEL, "g1")]),
        )
        .await
        .expect("create");
    leases
        .create(&PostParams::default(), &lease("lock-a", &[("app", "lock")]))
        .await
        .expect("create");
    // Replica-0's membership view and replica-1's other Lease stream move on...
    eventually(10, "replica-0 sees member-1", || {
        let v = view0.clone();
        async move { has(&v, "member-1").then_some(()) }
    })
    .await;
    eventually(10, "replica-1 sees lock-a", || {
        let v = locks1.clone();
        async move { has(&v, "lock-a").then_some(()) }
    })
    .await;
    // ...while replica-1's membership view is stuck: member-1 was committed before lock-a,
    // which replica-1 already has on its other stream.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !has(&view1, "member-1"),
        "replica-1's membership watch is stalled"
    );
    assert!(has(&view1, "member-0"));
    // Lifted: the held event arrives on the same stream.
    sim.faults().update(|c| c.watch_faults.clear());
    eventually(10, "replica-1 sees member-1", || {
        let v = view1.clone();
        async move { has(&v, "member-1").then_some(()) }
    })
    .await;
}

#[test]
fn fault_config_json_shape() {
    let cfg: kubesim::FaultConfig = serde_json::from_value(json!({
        "latencyMs": 5,
        "loseResponses": [{"agents": ["a"], "lostAs": "serverTimeout", "probability": 0.5}],
        "holdResponses": [{"delayMs": 100}],
        "watchFaults": [{"resources": ["leases"], "labelSelector": GROUP_LABEL, "stall": true}],
        "staleReads": [{"resources": ["pods"], "lagMs": 1000}],
    }))
    .expect("parse");
    assert_eq!(cfg.latency_ms, 5);
    assert_eq!(
        cfg.lose_responses,
        [LoseResponse::server_timeout().agent("a").probability(0.5)]
    );
    assert_eq!(cfg.hold_responses, [HoldResponse::new(100)]);
    assert_eq!(
        cfg.watch_faults,
        [WatchFault::stall("leases").label_selector(GROUP_LABEL)]
    );
    assert_eq!(cfg.stale_reads, [StaleRead::new("pods", 1000)]);
    let back = serde_json::to_value(&cfg).expect("json");
    assert_eq!(back["watchFaults"][0]["maxHeld"], 1000);
    assert_eq!(back["loseResponses"][0]["lostAs"], "serverTimeout");
    // The old shape still parses, with no new faults.
    let old: kubesim::FaultConfig =
        serde_json::from_value(json!({"errorRate": 1.0, "partitioned": ["x"]})).expect("parse");
    assert!(old.lose_responses.is_empty() && old.watch_faults.is_empty());
}
