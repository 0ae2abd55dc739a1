//! Every fault kubesim can inject, observed from a real client (kube-rs, and plain HTTP for
//! the `/sim/` endpoints).
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on setup failures

mod common;

use std::time::{Duration, Instant};

use common::{STATEFULSET, Transport, eventually, sim};
use futures::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::Api;
use kube::api::{ListParams, PostParams, WatchEvent, WatchParams};
use kubesim::FaultConfig;
use serde_json::json;

fn ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

async fn with_set(client: &kube::Client) -> Api<Pod> {
    let sets: Api<StatefulSet> = Api::namespaced(client.clone(), "default");
    sets.create(
        &PostParams::default(),
        &serde_json::from_str(STATEFULSET).expect("sts"),
    )
    .await
    .expect("create");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    eventually(10, "3 ready pods", || {
        let pods = pods.clone();
        async move {
            let l = pods.list(&ListParams::default()).await.ok()?;
            (l.items.len() == 3 && l.items.iter().all(ready)).then_some(())
        }
    })
    .await;
    pods
}

/// POST/PUT a JSON body to a `/sim/` endpoint over plain HTTP (what a shell script would do).
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

#[tokio::test]
async fn latency_is_added_to_requests() {
    let (sim, client) = sim(Transport::InProcess).await;
    let cms: Api<ConfigMap> = Api::namespaced(client, "default");
    let t = Instant::now();
    cms.list(&ListParams::default()).await.expect("list");
    let base = t.elapsed();
    sim.faults().update(|f| f.latency_ms = 300);
    let t = Instant::now();
    cms.list(&ListParams::default()).await.expect("list");
    let slow = t.elapsed();
    assert!(slow >= Duration::from_millis(300), "{slow:?}");
    assert!(slow > base);
}

#[tokio::test]
async fn error_rates_return_the_chosen_status() {
    let (sim, client) = sim(Transport::InProcess).await;
    let cms: Api<ConfigMap> = Api::namespaced(client, "default");
    for (code, reason) in [
        (500, "InternalError"),
        (503, "ServiceUnavailable"),
        (429, "TooManyRequests"),
    ] {
        sim.faults().set(FaultConfig {
            error_rate: 1.0,
            error_code: code,
            ..Default::default()
        });
        match cms.get("anything").await {
            Err(kube::Error::Api(s)) => assert_eq!((s.code, s.reason.as_str()), (code, reason)),
            other => panic!("expected {code}, got {other:?}"),
        }
    }
    // Writes only: reads pass, writes fail.
    sim.faults().set(FaultConfig {
        error_rate: 1.0,
        error_code: 500,
        writes_only: true,
        ..Default::default()
    });
    cms.list(&ListParams::default())
        .await
        .expect("reads unaffected");
    let cm: ConfigMap = serde_json::from_value(json!({"metadata": {"name": "w"}})).expect("cm");
    assert!(cms.create(&PostParams::default(), &cm).await.is_err());
    // Reads only: writes pass, reads fail.
    sim.faults().set(FaultConfig {
        error_rate: 1.0,
        error_code: 500,
        reads_only: true,
        ..Default::default()
    });
    cms.create(&PostParams::default(), &cm)
        .await
        .expect("writes unaffected");
    assert!(cms.list(&ListParams::default()).await.is_err());
    assert!(cms.get("w").await.is_err());
    // A 50% rate fails some and passes some.
    sim.faults().set(FaultConfig {
        error_rate: 0.5,
        error_code: 500,
        ..Default::default()
    });
    let mut ok = 0;
    let mut failed = 0;
    for _ in 0..200 {
        match cms.list(&ListParams::default()).await {
            Ok(_) => ok += 1,
            Err(_) => failed += 1,
        }
    }
    assert!(ok > 40 && failed > 40, "ok {ok} failed {failed}");
}

#[tokio::test]
async fn api_down_fails_everything_and_ends_watches() {
    let (sim, client) = sim(Transport::Loopback).await;
    let cms: Api<ConfigMap> = Api::namespaced(client, "default");
    let rv = cms
        .list(&ListParams::default())
        .await
        .expect("list")
        .metadata
        .resource_version
        .expect("rv");
    let mut w = cms
        .watch(&WatchParams::default(), &rv)
        .await
        .expect("watch")
        .boxed();
    sim.faults().update(|f| f.down = true);
    let end = tokio::time::timeout(Duration::from_secs(5), w.next())
        .await
        .expect("watch ended in time");
    assert!(end.is_none(), "watch should end: {end:?}");
    // kube's config-built client retries 503s; the in-process client shows the raw answer.
    let raw: Api<ConfigMap> = Api::namespaced(sim.client(), "default");
    match raw.list(&ListParams::default()).await {
        Err(kube::Error::Api(s)) => assert_eq!(s.code, 503),
        other => panic!("expected 503, got {other:?}"),
    }
    sim.faults().update(|f| f.down = false);
    cms.list(&ListParams::default()).await.expect("back up");
}

#[tokio::test]
async fn dropped_watches_end_and_resume_without_loss() {
    let (sim, client) = sim(Transport::Loopback).await;
    let addr = sim.addr().expect("addr");
    let cms: Api<ConfigMap> = Api::namespaced(client, "default");
    let rv = cms
        .list(&ListParams::default())
        .await
        .expect("list")
        .metadata
        .resource_version
        .expect("rv");
    let mut w = cms
        .watch(&WatchParams::default(), &rv)
        .await
        .expect("watch")
        .boxed();
    sim_http(addr, "POST", "/sim/drop-watches", json!({})).await;
    let end = tokio::time::timeout(Duration::from_secs(5), w.next())
        .await
        .expect("ended");
    assert!(end.is_none());
    // Changes made while nobody watched are replayed from the history.
    let cm: ConfigMap =
        serde_json::from_value(json!({"metadata": {"name": "during"}})).expect("cm");
    cms.create(&PostParams::default(), &cm)
        .await
        .expect("create");
    let mut w = cms
        .watch(&WatchParams::default(), &rv)
        .await
        .expect("watch")
        .boxed();
    match tokio::time::timeout(Duration::from_secs(5), w.next())
        .await
        .expect("event")
    {
        Some(Ok(WatchEvent::Added(c))) => assert_eq!(c.metadata.name.as_deref(), Some("during")),
        other => panic!("{other:?}"),
    }
    // Forced compaction over HTTP: the same resume is now 410 Gone.
    sim_http(addr, "POST", "/sim/compact", json!({})).await;
    let mut w = cms
        .watch(&WatchParams::default(), &rv)
        .await
        .expect("watch")
        .boxed();
    match w.next().await {
        Some(Ok(WatchEvent::Error(e))) => assert_eq!(e.code, 410),
        other => panic!("expected 410, got {other:?}"),
    }
}

#[tokio::test]
async fn partition_by_user_agent_cuts_one_client_only() {
    let (sim, _) = sim(Transport::InProcess).await;
    let cut: Api<ConfigMap> = Api::namespaced(sim.client_as("stslock/shard-a"), "default");
    let fine: Api<ConfigMap> = Api::namespaced(sim.client_as("stslock/shard-b"), "default");
    let rv = cut
        .list(&ListParams::default())
        .await
        .expect("list")
        .metadata
        .resource_version
        .expect("rv");
    let mut w = cut
        .watch(&WatchParams::default(), &rv)
        .await
        .expect("watch")
        .boxed();
    sim.faults()
        .update(|f| f.partitioned = vec!["shard-a".into()]);
    // The partitioned client's watch ends and its requests get no answer.
    let end = tokio::time::timeout(Duration::from_secs(5), w.next())
        .await
        .expect("ended");
    assert!(end.is_none());
    let hung =
        tokio::time::timeout(Duration::from_millis(500), cut.list(&ListParams::default())).await;
    assert!(hung.is_err(), "partitioned request must not be answered");
    fine.list(&ListParams::default())
        .await
        .expect("other clients unaffected");
    // Healing lets a pending request through.
    let pending = tokio::spawn(async move {
        cut.list(&ListParams::default())
            .await
            .map(|l| l.items.len())
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    sim.faults().update(|f| f.partitioned.clear());
    let n = tokio::time::timeout(Duration::from_secs(5), pending)
        .await
        .expect("answered")
        .expect("join");
    assert!(n.is_ok());
}

#[tokio::test]
async fn pod_faults_over_http_and_rust() {
    let (sim, client) = sim(Transport::Loopback).await;
    let addr = sim.addr().expect("addr");
    let pods = with_set(&client).await;
    // NotReady and back, over HTTP.
    sim_http(addr, "POST", "/sim/pods/default/db-0/notready", json!({})).await;
    assert!(!ready(&pods.get("db-0").await.expect("get")));
    sim_http(addr, "POST", "/sim/pods/default/db-0/ready", json!({})).await;
    assert!(ready(&pods.get("db-0").await.expect("get")));
    // Crash: NotReady with a restart counted, then Ready again by itself.
    sim.pods().crash("default", "db-1").expect("crash");
    let p = pods.get("db-1").await.expect("get");
    assert!(!ready(&p));
    let restarts = p
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .map(|c| c[0].restart_count);
    assert_eq!(restarts, Some(1));
    eventually(10, "db-1 restarted", || {
        let pods = pods.clone();
        async move { ready(&pods.get("db-1").await.ok()?).then_some(()) }
    })
    .await;
    // Delete: recreated with a new UID.
    let uid = pods.get("db-2").await.expect("get").metadata.uid;
    sim_http(addr, "POST", "/sim/pods/default/db-2/kill", json!({})).await;
    eventually(10, "db-2 recreated", || {
        let pods = pods.clone();
        let uid = uid.clone();
        async move {
            let p = pods.get_opt("db-2").await.ok()??;
            (p.metadata.uid != uid).then_some(())
        }
    })
    .await;
    // Node loss: every pod on the node turns NotReady; restore brings them back.
    let node = pods
        .get("db-0")
        .await
        .expect("get")
        .spec
        .and_then(|s| s.node_name)
        .expect("scheduled");
    let r = sim_http(addr, "POST", &format!("/sim/nodes/{node}/lose"), json!({})).await;
    assert!(r["pods"].as_u64().is_some_and(|n| n >= 1), "{r}");
    assert!(!ready(&pods.get("db-0").await.expect("get")));
    sim.pods().node(&node, "restore").expect("restore");
    assert!(ready(&pods.get("db-0").await.expect("get")));
    // Fault configuration round-trips over HTTP.
    let cfg = sim_http(
        addr,
        "PUT",
        "/sim/faults",
        json!({"latencyMs": 5, "partitioned": ["x"]}),
    )
    .await;
    assert_eq!(cfg["latencyMs"], 5);
    assert_eq!(sim.faults().get().partitioned, vec!["x".to_string()]);
}

#[tokio::test]
async fn invariant_report_sees_dual_writers_and_gaps() {
    let (sim, client) = sim(Transport::Loopback).await;
    let addr = sim.addr().expect("addr");
    let pods = with_set(&client).await;
    let label = |role: &'static str| {
        kube::api::Patch::Merge(json!({"metadata": {"labels": {"sts-role": role}}}))
    };
    let pp = kube::api::PatchParams::default();
    pods.patch("db-0", &pp, &label("writer"))
        .await
        .expect("label");
    // Promote db-1 before demoting db-0: a dual-writer interval.
    pods.patch("db-1", &pp, &label("writer"))
        .await
        .expect("label");
    tokio::time::sleep(Duration::from_millis(30)).await;
    pods.patch("db-0", &pp, &label("reader"))
        .await
        .expect("label");
    // Writer NotReady: a gap until it is Ready again.
    sim.pods()
        .set_ready("default", "db-1", false)
        .expect("notready");
    tokio::time::sleep(Duration::from_millis(30)).await;
    sim.pods()
        .set_ready("default", "db-1", true)
        .expect("ready");
    let r = sim_http(addr, "GET", "/sim/report", json!(null)).await;
    let set = &r["statefulsets"]["default/db"];
    assert_eq!(set["dual_writer"].as_array().map(Vec::len), Some(1), "{r}");
    assert!(
        r["dual_writer_ms"].as_u64().is_some_and(|ms| ms >= 30),
        "{r}"
    );
    assert_eq!(
        set["no_ready_writer"].as_array().map(Vec::len),
        Some(1),
        "{r}"
    );
    assert!(set["no_ready_writer"][0]["end_ms"].is_u64());
    assert_eq!(set["writers"], json!(["db-1"]));
    assert_eq!(sim.report().dual_writer_intervals, 1);
}

/// Every write request is logged with what its client got: the answer's status and how long
/// it took, or status 0 when the client gave up before any answer (here: a partition, and a
/// client that stops waiting after 300 ms).
#[tokio::test]
async fn write_attempts_record_what_the_client_got() {
    let mut cfg = kubesim::SimConfig::default();
    cfg.store.attempt_log_max = 100;
    let (sim, _) = common::sim_with(Transport::InProcess, cfg).await;
    let client = sim.client_as("tester");
    let cms: Api<ConfigMap> = Api::namespaced(client, "default");
    let cm: ConfigMap = serde_json::from_value(json!({"metadata": {"name": "a"}})).expect("cm");
    cms.create(&PostParams::default(), &cm)
        .await
        .expect("create");
    sim.faults().set(FaultConfig {
        error_rate: 1.0,
        error_code: 503,
        writes_only: true,
        ..Default::default()
    });
    assert!(cms.replace("a", &PostParams::default(), &cm).await.is_err());
    sim.faults().set(FaultConfig {
        partitioned: vec!["tester".into()],
        ..Default::default()
    });
    let gave_up = tokio::time::timeout(
        Duration::from_millis(300),
        cms.replace("a", &PostParams::default(), &cm),
    )
    .await;
    assert!(gave_up.is_err(), "a partitioned client gets no answer");
    sim.faults().set(FaultConfig::default());
    let mine: Vec<_> = sim
        .write_attempts()
        .into_iter()
        .filter(|a| a.actor == "tester")
        .collect();
    let seen: Vec<(&str, &str, &str, u16)> = mine
        .iter()
        .map(|a| {
            (
                a.method.as_str(),
                a.resource.as_str(),
                a.name.as_str(),
                a.status,
            )
        })
        .collect();
    assert_eq!(
        seen,
        vec![
            ("POST", "configmaps", "", 201),
            ("PUT", "configmaps", "a", 503),
            ("PUT", "configmaps", "a", 0),
        ]
    );
    assert!(mine.iter().all(|a| a.namespace == "default"));
    assert!(mine[2].elapsed_ms >= 250, "{:?}", mine[2]);
}
