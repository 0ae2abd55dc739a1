//! The metrics endpoints of running operator replicas against kubesim: what `/metrics` says
//! after failovers, renewals, handoffs and a StatefulSet without a Ready pod; when `/readyz`
//! turns ready (and unready when fenced); that `stslock dev` prints each shard's address; and
//! that the alert rules, dashboard and manifests in deploy/observability/ refer only to
//! metrics the operator exposes and to the port it serves them on. Assertions are on counts
//! and states, never on durations.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on setup failures

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{ListParams, PostParams};
use kube::{Api, Client, ResourceExt};
use kubesim::{Sim, SimConfig};
use serde_json::json;
use stslock::api::StatefulSetLock;
use stslock::config::OperatorArgs;
use stslock::reconcile::RunOptions;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;

/// GET `path` from `addr`: (status, body).
async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut raw = String::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut raw))
        .await
        .expect("response in time")
        .unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").expect("http response");
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, body.to_string())
}

/// Samples of a text exposition: series (`name{labels}`) → value.
fn samples(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_string(), value.parse().ok()?))
        })
        .collect()
}

/// Sum of every sample of metric `name` (any labels).
fn total(s: &HashMap<String, f64>, name: &str) -> f64 {
    s.iter()
        .filter(|(k, _)| k.as_str() == name || k.starts_with(&format!("{name}{{")))
        .map(|(_, v)| v)
        .sum()
}

/// Names of the samples an exposition can carry, from its `# TYPE` lines (present even for
/// labelled families that have no sample yet).
fn exposed_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for l in text.lines() {
        let mut w = l.split_whitespace();
        if w.next() != Some("#") || w.next() != Some("TYPE") {
            continue;
        }
        let (name, kind) = (w.next().unwrap(), w.next().unwrap());
        match kind {
            "counter" => {
                names.insert(format!("{name}_total"));
            }
            "histogram" => {
                for s in ["_bucket", "_sum", "_count"] {
                    names.insert(format!("{name}{s}"));
                }
            }
            _ => {
                names.insert(name.to_string());
            }
        }
    }
    names
}

struct Replica {
    addr: SocketAddr,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

/// Start an operator replica and wait for the address its metrics server bound.
async fn replica(sim: &Sim, id: &str, f: impl FnOnce(&mut OperatorArgs)) -> Replica {
    let mut args = OperatorArgs::for_shard(id);
    args.api_timeout_seconds = 5;
    f(&mut args);
    let client = sim.client_as(&format!("stslock/{id}"));
    let (stop, stopped) = oneshot::channel::<()>();
    let (bound_tx, bound_rx) = oneshot::channel();
    let task = tokio::spawn(async move {
        let shutdown = async {
            let _ = stopped.await;
        };
        let options = RunOptions {
            metrics_bound: Some(bound_tx),
        };
        stslock::reconcile::run_with(client, args, shutdown, options)
            .await
            .expect("operator");
    });
    let addr = tokio::time::timeout(Duration::from_secs(10), bound_rx)
        .await
        .expect("metrics address in time")
        .expect("metrics address");
    assert!(addr.ip().is_loopback() && addr.port() != 0, "{addr}");
    Replica { addr, stop, task }
}

async fn stop(replicas: Vec<Replica>) {
    for r in replicas {
        let _ = r.stop.send(());
        let _ = tokio::time::timeout(Duration::from_secs(15), r.task).await;
    }
}

fn sim() -> Sim {
    let mut cfg = SimConfig::default();
    cfg.controllers.pod_ready_delay = Duration::from_millis(20);
    cfg.controllers.pod_terminate_delay = Duration::from_millis(100);
    Sim::start(cfg)
}

/// Poll `f` every 20 ms until it returns Some, failing after `secs`.
async fn until<T, F: std::future::Future<Output = Option<T>>>(
    secs: u64,
    what: &str,
    mut f: impl FnMut() -> F,
) -> T {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {secs}s waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

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

async fn lock(client: &Client, name: &str, sts: &str) {
    let l: StatefulSetLock = serde_json::from_value(json!({
        "apiVersion": "app.anukkrit.me/v1", "kind": "StatefulSetLock", "metadata": {"name": name},
        "spec": {"statefulSetName": sts, "leaseName": format!("{sts}-lease"), "leaseDurationSeconds": 30}
    }))
    .unwrap();
    Api::<StatefulSetLock>::namespaced(client.clone(), "default")
        .create(&PostParams::default(), &l)
        .await
        .expect("create lock");
}

/// `writer` is the one pod labelled writer in `app`, every other pod a reader.
async fn wait_writer(client: &Client, app: &str, writer: &str) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    until(15, &format!("{writer} sole writer of {app}"), || {
        let pods = pods.clone();
        async move {
            let l = pods
                .list(&ListParams::default().labels(&format!("app={app}")))
                .await
                .ok()?;
            let ok = !l.items.is_empty()
                && l.items.iter().all(|p| {
                    let role = p.labels().get("sts-role").map(String::as_str);
                    role == Some(if p.name_any() == writer {
                        "writer"
                    } else {
                        "reader"
                    })
                });
            ok.then_some(())
        }
    })
    .await
}

async fn scrape_all(replicas: &[Replica]) -> Vec<HashMap<String, f64>> {
    let mut out = vec![];
    for r in replicas {
        let (status, body) = get(r.addr, "/metrics").await;
        assert_eq!(status, 200, "{body}");
        out.push(samples(&body));
    }
    out
}

fn sum(scrapes: &[HashMap<String, f64>], name: &str) -> f64 {
    scrapes.iter().map(|s| total(s, name)).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failovers_are_counted_once_and_locks_are_split_across_three_replicas() {
    let sim = sim();
    let client = sim.client_as("test");
    stslock::dev::install_crd(&client).await.expect("crd");
    let mut replicas = vec![];
    for i in 0..3 {
        replicas.push(replica(&sim, &format!("m-{i}"), |_| {}).await);
    }
    let locks = 6;
    for i in 0..locks {
        statefulset(&client, &format!("f{i}"), 2).await;
        lock(&client, &format!("l{i}"), &format!("f{i}")).await;
    }
    for i in 0..locks {
        wait_writer(&client, &format!("f{i}"), &format!("f{i}-0")).await;
    }
    // Two rounds: every writer goes NotReady and the other pod takes over; the old writer
    // comes back (as a reader) before the next round.
    let mut failovers = 0;
    for (from, to) in [(0, 1), (1, 0)] {
        for i in 0..locks {
            sim.pods()
                .set_ready("default", &format!("f{i}-{to}"), true)
                .unwrap();
            sim.pods()
                .set_ready("default", &format!("f{i}-{from}"), false)
                .unwrap();
        }
        for i in 0..locks {
            wait_writer(&client, &format!("f{i}"), &format!("f{i}-{to}")).await;
            failovers += 1;
        }
    }
    // The counts settle once every replica has finished its reconciles; shards may still be
    // claiming their locks. Then the numbers must be exact.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let scrapes = loop {
        let s = scrape_all(&replicas).await;
        let settled = sum(&s, "stslock_failover_duration_seconds_count") >= failovers as f64
            && sum(&s, "stslock_owned_locks") == locks as f64
            && sum(&s, "stslock_reconciles_in_flight") == 0.0;
        if settled || tokio::time::Instant::now() > deadline {
            break s;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(
        sum(&scrapes, "stslock_failover_duration_seconds_count"),
        failovers as f64,
        "failovers counted across the replicas"
    );
    assert_eq!(
        sum(&scrapes, "stslock_owned_locks"),
        locks as f64,
        "owned locks across the replicas"
    );
    assert_eq!(
        sum(&scrapes, "stslock_writer_changes_total{kind=\"failover\"}"),
        failovers as f64
    );
    assert_eq!(
        sum(&scrapes, "stslock_writer_changes_total{kind=\"election\"}"),
        locks as f64
    );
    assert_eq!(sum(&scrapes, "stslock_dual_writer_detections_total"), 0.0);
    assert_eq!(sum(&scrapes, "stslock_writerless_locks"), 0.0);
    assert!(sum(&scrapes, "stslock_writerless_seconds_total") > 0.0);
    // Each replica reports its own shard, and the three see the same three-member ring.
    for (i, s) in scrapes.iter().enumerate() {
        let own: Vec<&String> = s
            .keys()
            .filter(|k| k.starts_with("stslock_owned_locks{"))
            .collect();
        assert_eq!(
            own,
            vec![&format!("stslock_owned_locks{{shard=\"m-{i}\"}}")]
        );
        assert_eq!(s["stslock_ring_members"], 3.0);
        assert_eq!(s["stslock_shard_ready"], 1.0);
    }
    // Every failover's writes went through client::call and were counted by verb and code.
    assert!(
        sum(
            &scrapes,
            "stslock_api_requests_total{verb=\"patch\",resource=\"pods\",code=\"2xx\"}"
        ) >= 2.0 * failovers as f64
    );
    assert!(sum(&scrapes, "stslock_reconciles_total") >= failovers as f64);
    assert_eq!(sim.report().dual_writer_intervals, 0);
    stop(replicas).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_waits_for_synced_caches_and_the_membership_lease() {
    let sim = sim();
    let client = sim.client_as("test");
    stslock::dev::install_crd(&client).await.expect("crd");
    // The replica starts cut off from the API server: no list can complete, no membership
    // Lease can be written.
    sim.faults()
        .update(|f| f.partitioned = vec!["stslock/r-0".into()]);
    let r = replica(&sim, "r-0", |a| a.membership_lease_seconds = 3).await;
    let (status, body) = get(r.addr, "/healthz").await;
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, body) = get(r.addr, "/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("caches not synced"), "{body}");
    for cache in ["statefulsetlocks", "statefulsets", "pods", "leases"] {
        assert!(body.contains(cache), "{body}");
    }
    let (_, m) = get(r.addr, "/metrics").await;
    assert_eq!(samples(&m)["stslock_shard_ready"], 0.0);
    // The partition heals: caches sync, the membership Lease is written, the replica is ready.
    sim.faults().update(|f| f.partitioned.clear());
    until(20, "/readyz 200", || async {
        let (status, _) = get(r.addr, "/readyz").await;
        (status == 200).then_some(())
    })
    .await;
    // Cut off again: the caches stay synced, but the membership Lease cannot be renewed, the
    // fence closes, and the replica is not ready until it can renew again.
    sim.faults()
        .update(|f| f.partitioned = vec!["stslock/r-0".into()]);
    let body = until(20, "/readyz 503 once fenced", || async {
        let (status, body) = get(r.addr, "/readyz").await;
        (status == 503).then_some(body)
    })
    .await;
    assert!(body.contains("membership Lease not held"), "{body}");
    sim.faults().update(|f| f.partitioned.clear());
    until(20, "/readyz 200 again", || async {
        let (status, _) = get(r.addr, "/readyz").await;
        (status == 200).then_some(())
    })
    .await;
    stop(vec![r]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joining_replicas_take_locks_by_handoff_and_the_gauges_follow() {
    let sim = sim();
    let client = sim.client_as("test");
    stslock::dev::install_crd(&client).await.expect("crd");
    let first = replica(&sim, "h-0", |_| {}).await;
    let locks = 12;
    for i in 0..locks {
        lock(&client, &format!("h{i}"), &format!("hs{i}")).await;
    }
    until(20, "the only replica owns every lock", || async {
        let s = scrape_all(std::slice::from_ref(&first)).await;
        (total(&s[0], "stslock_owned_locks") == locks as f64).then_some(())
    })
    .await;
    let mut replicas = vec![first];
    for i in 1..3 {
        replicas.push(replica(&sim, &format!("h-{i}"), |_| {}).await);
    }
    // The ring grows to three; h-0 hands the locks it no longer owns to their new owners.
    let s = until(20, "three ring members and every lock owned once", || {
        let replicas = &replicas;
        async move {
            let s = scrape_all(replicas).await;
            let settled = s.iter().all(|m| m["stslock_ring_members"] == 3.0)
                && sum(&s, "stslock_owned_locks") == locks as f64
                && total(&s[0], "stslock_owned_locks") < locks as f64;
            settled.then_some(s)
        }
    })
    .await;
    let moved = locks as f64 - total(&s[0], "stslock_owned_locks");
    assert!(
        total(&s[0], "stslock_handoffs_total") >= moved,
        "h-0 gave away {moved} locks with {} handoffs",
        total(&s[0], "stslock_handoffs_total")
    );
    assert_eq!(sum(&s, "stslock_dual_writer_detections_total"), 0.0);
    stop(replicas).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_renewal_is_counted_with_its_lateness() {
    let sim = sim();
    let client = sim.client_as("test");
    stslock::dev::install_crd(&client).await.expect("crd");
    let r = replica(&sim, "n-0", |_| {}).await;
    statefulset(&client, "rn", 2).await;
    let l: StatefulSetLock = serde_json::from_value(json!({
        "apiVersion": "app.anukkrit.me/v1", "kind": "StatefulSetLock", "metadata": {"name": "rn"},
        "spec": {"statefulSetName": "rn", "leaseName": "rn-lease", "leaseDurationSeconds": 2}
    }))
    .unwrap();
    Api::<StatefulSetLock>::namespaced(client.clone(), "default")
        .create(&PostParams::default(), &l)
        .await
        .unwrap();
    wait_writer(&client, "rn", "rn-0").await;
    // A 2 s Lease is renewed every second by the same holder, with no new epoch.
    let s = until(20, "three renewals", || async {
        let s = samples(&get(r.addr, "/metrics").await.1);
        (s["stslock_lease_renewals_total"] >= 3.0).then_some(s)
    })
    .await;
    assert_eq!(
        s["stslock_lease_renewal_lateness_seconds_count"],
        s["stslock_lease_renewals_total"]
    );
    assert_eq!(s["stslock_writer_changes_total{kind=\"election\"}"], 1.0);
    assert_eq!(s["stslock_writer_changes_total{kind=\"failover\"}"], 0.0);
    let lease = Api::<k8s_openapi::api::coordination::v1::Lease>::namespaced(client, "default")
        .get("rn-lease")
        .await
        .unwrap();
    assert_eq!(lease.spec.unwrap().lease_transitions, Some(0));
    stop(vec![r]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statefulset_with_no_ready_pod_is_reported_writerless_until_one_returns() {
    let sim = sim();
    let client = sim.client_as("test");
    stslock::dev::install_crd(&client).await.expect("crd");
    let r = replica(&sim, "w-0", |_| {}).await;
    statefulset(&client, "wl", 2).await;
    lock(&client, "wl", "wl").await;
    wait_writer(&client, "wl", "wl-0").await;
    let gauge = |text: String| samples(&text)["stslock_writerless_locks"];
    assert_eq!(gauge(get(r.addr, "/metrics").await.1), 0.0);
    // No Ready pod at all: nobody to fail over to, the lock is writer-less.
    sim.pods().set_ready("default", "wl-1", false).unwrap();
    sim.pods().set_ready("default", "wl-0", false).unwrap();
    until(15, "writerless_locks 1", || async {
        (gauge(get(r.addr, "/metrics").await.1) == 1.0).then_some(())
    })
    .await;
    sim.pods().set_ready("default", "wl-1", true).unwrap();
    wait_writer(&client, "wl", "wl-1").await;
    let s = until(15, "writerless_locks 0", || async {
        let s = samples(&get(r.addr, "/metrics").await.1);
        (s["stslock_writerless_locks"] == 0.0).then_some(s)
    })
    .await;
    assert!(s["stslock_writerless_seconds_total"] > 0.0);
    assert_eq!(s["stslock_failover_duration_seconds_count"], 1.0);
    assert_eq!(s["stslock_dual_writer_detections_total"], 0.0);
    stop(vec![r]).await;
}

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Metric names a PromQL expression selects.
fn promql_metric_names(expr: &str) -> BTreeSet<String> {
    fn walk(e: &promql_parser::parser::Expr, out: &mut BTreeSet<String>) {
        use promql_parser::parser::Expr;
        match e {
            Expr::Aggregate(a) => {
                walk(&a.expr, out);
                if let Some(p) = &a.param {
                    walk(p, out);
                }
            }
            Expr::Unary(u) => walk(&u.expr, out),
            Expr::Binary(b) => {
                walk(&b.lhs, out);
                walk(&b.rhs, out);
            }
            Expr::Paren(p) => walk(&p.expr, out),
            Expr::Subquery(s) => walk(&s.expr, out),
            Expr::VectorSelector(v) => {
                out.insert(v.name.clone().expect("selector by metric name"));
            }
            Expr::MatrixSelector(m) => {
                out.insert(m.vs.name.clone().expect("selector by metric name"));
            }
            Expr::Call(c) => {
                for a in &c.args.args {
                    walk(a, out);
                }
            }
            Expr::Extension(_) | Expr::NumberLiteral(_) | Expr::StringLiteral(_) => {}
        }
    }
    let ast = promql_parser::parser::parse(expr)
        .unwrap_or_else(|e| panic!("invalid PromQL {expr:?}: {e}"));
    let mut out = BTreeSet::new();
    walk(&ast, &mut out);
    out
}

/// Names a rule or panel may use: the operator's own, and Prometheus' scrape health.
fn check_names(source: &str, expr: &str, exposed: &BTreeSet<String>, used: &mut BTreeSet<String>) {
    let names = promql_metric_names(expr);
    assert!(!names.is_empty(), "{source}: {expr:?} selects no metric");
    for n in names {
        assert!(
            exposed.contains(&n) || n == "up",
            "{source}: {expr:?} uses {n}, which the operator does not expose"
        );
        used.insert(n);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alert_rules_and_dashboard_use_only_exposed_metrics() {
    // The exposition of a running replica, not a list kept by hand.
    let sim = sim();
    let client = sim.client_as("test");
    stslock::dev::install_crd(&client).await.expect("crd");
    let r = replica(&sim, "x-0", |_| {}).await;
    // Ready: it has made API calls, so every family has at least one series.
    let text = until(20, "a ready replica's exposition", || async {
        let (status, text) = get(r.addr, "/metrics").await;
        assert_eq!(status, 200);
        (samples(&text).get("stslock_shard_ready") == Some(&1.0)).then_some(text)
    })
    .await;
    let exposed = exposed_names(&text);
    assert!(exposed.contains("stslock_failover_duration_seconds_bucket"));
    stop(vec![r]).await;

    let dir = root().join("deploy/observability");
    let rules: serde_json::Value =
        serde_saphyr::from_str(&std::fs::read_to_string(dir.join("prometheusrule.yaml")).unwrap())
            .expect("prometheusrule.yaml is YAML");
    assert_eq!(rules["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(rules["kind"], "PrometheusRule");
    let mut alerts = BTreeSet::new();
    let mut used = BTreeSet::new();
    for group in rules["spec"]["groups"].as_array().expect("rule groups") {
        for rule in group["rules"].as_array().expect("rules") {
            let alert = rule["alert"].as_str().expect("every rule is an alert");
            let expr = rule["expr"].as_str().expect("expr");
            check_names(alert, expr, &exposed, &mut used);
            assert!(
                rule["labels"]["severity"].is_string(),
                "{alert}: no severity"
            );
            assert!(
                rule["annotations"]["summary"].is_string(),
                "{alert}: no summary"
            );
            alerts.insert(alert.to_string());
        }
    }
    for (alert, metric) in [
        ("StslockDualWriter", "stslock_dual_writer_detections_total"),
        ("StslockLeaseLapses", "stslock_lease_lapses_total"),
        (
            "StslockStatefulSetWithoutWriter",
            "stslock_writerless_locks",
        ),
        ("StslockShardNotReady", "stslock_shard_ready"),
        ("StslockRingMemberMissing", "stslock_ring_members"),
    ] {
        assert!(alerts.contains(alert), "missing alert {alert}: {alerts:?}");
        assert!(used.contains(metric), "no rule uses {metric}");
    }

    let dash: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("grafana-dashboard.json")).unwrap())
            .expect("grafana-dashboard.json is JSON");
    assert!(dash["title"].is_string() && dash["uid"].is_string());
    let panels = dash["panels"].as_array().expect("panels");
    assert!(panels.len() >= 8, "{} panels", panels.len());
    let mut dash_used = BTreeSet::new();
    for p in panels {
        let title = p["title"].as_str().expect("panel title");
        assert!(p["type"].is_string() && p["gridPos"].is_object(), "{title}");
        let targets = p["targets"].as_array().expect("panel targets");
        assert!(!targets.is_empty(), "{title}: no queries");
        for t in targets {
            // Grafana substitutes its interval variable before the query reaches Prometheus.
            let expr = t["expr"]
                .as_str()
                .expect("target expr")
                .replace("$__rate_interval", "5m");
            check_names(title, &expr, &exposed, &mut dash_used);
        }
    }
    for metric in [
        "stslock_failover_duration_seconds_bucket",
        "stslock_dual_writer_detections_total",
        "stslock_owned_locks",
        "stslock_lease_renewal_lateness_seconds_bucket",
        "stslock_api_requests_total",
    ] {
        assert!(dash_used.contains(metric), "no panel shows {metric}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stslock_dev_prints_where_each_shard_serves_its_metrics() {
    use tokio::io::AsyncBufReadExt;
    let dir = std::env::temp_dir().join(format!("stslock-dev-metrics-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_stslock"))
        .args([
            "dev",
            "--shards",
            "2",
            "--no-samples",
            "--metrics-addr",
            "127.0.0.1:0",
        ])
        .arg("--kubeconfig-out")
        .arg(dir.join("kubeconfig"))
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("run stslock dev");
    let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let mut addrs = HashMap::new();
    let mut seen = vec![];
    tokio::time::timeout(Duration::from_secs(60), async {
        while addrs.len() < 2 {
            let Some(line) = lines.next_line().await.unwrap() else {
                panic!("stslock dev exited; its stderr:\n{}", seen.join("\n"));
            };
            seen.push(line.clone());
            // "shard stslock-0: http://127.0.0.1:PORT/metrics  http://.../readyz  ..."
            if let Some(rest) = line.strip_prefix("shard ")
                && let Some((id, urls)) = rest.split_once(": http://")
                && let Some((addr, _)) = urls.split_once("/metrics")
            {
                addrs.insert(id.to_string(), addr.parse::<SocketAddr>().unwrap());
            }
        }
    })
    .await
    .expect("stslock dev printed both shards' metrics addresses");
    let mut ids: Vec<_> = addrs.keys().cloned().collect();
    ids.sort();
    assert_eq!(ids, ["stslock-0", "stslock-1"]);
    for (id, addr) in &addrs {
        until(30, &format!("{id} ready"), || async {
            let (status, _) = get(*addr, "/readyz").await;
            (status == 200).then_some(())
        })
        .await;
        let (status, text) = get(*addr, "/metrics").await;
        assert_eq!(status, 200);
        assert!(
            text.contains(&format!("stslock_owned_locks{{shard=\"{id}\"}}")),
            "{text}"
        );
    }
    child.kill().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// `deploy/observability` builds with kustomize, and its pieces point at each other and at the
/// operator's pods: ServiceMonitor → Service (labels, port name) → manager pods (labels,
/// container port), dashboard ConfigMap = the JSON file.
#[test]
fn observability_kustomization_wires_the_metrics_port_of_the_manager() {
    let out =
        std::process::Command::new(std::env::var("KUBECTL").unwrap_or_else(|_| "kubectl".into()))
            .args(["kustomize", "deploy/observability"])
            .current_dir(root())
            .output()
            .expect("kubectl kustomize (kubectl is required, as for dist/install.yaml)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let docs: Vec<serde_json::Value> =
        serde_saphyr::from_multiple(&String::from_utf8(out.stdout).unwrap()).unwrap();
    let find = |kind: &str| {
        docs.iter()
            .find(|d| d["kind"] == kind)
            .unwrap_or_else(|| panic!("no {kind}"))
            .clone()
    };
    let (svc, sm, cm) = (find("Service"), find("ServiceMonitor"), find("ConfigMap"));
    assert_eq!(
        find("PrometheusRule")["metadata"]["namespace"],
        "stslock-system"
    );
    assert_eq!(sm["metadata"]["namespace"], "stslock-system");
    let subset = |want: &serde_json::Value, have: &serde_json::Value| {
        want.as_object()
            .unwrap()
            .iter()
            .all(|(k, v)| have.get(k) == Some(v))
    };
    assert!(subset(
        &sm["spec"]["selector"]["matchLabels"],
        &svc["metadata"]["labels"]
    ));
    let port = &svc["spec"]["ports"][0];
    assert_eq!(sm["spec"]["endpoints"][0]["port"], port["name"]);
    assert_eq!(sm["spec"]["endpoints"][0]["path"], "/metrics");
    let manager: Vec<serde_json::Value> = serde_saphyr::from_multiple(
        &std::fs::read_to_string(root().join("deploy/manager/manager.yaml")).unwrap(),
    )
    .unwrap();
    let sts = manager.iter().find(|d| d["kind"] == "StatefulSet").unwrap();
    let template = &sts["spec"]["template"];
    assert!(subset(
        &svc["spec"]["selector"],
        &template["metadata"]["labels"]
    ));
    let container = &template["spec"]["containers"][0];
    let cport = container["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == port["targetPort"])
        .expect("the Service's targetPort is a named port of the manager");
    let addr = container["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "STSLOCK_METRICS_ADDR")
        .expect("the manager sets --metrics-addr")["value"]
        .as_str()
        .unwrap()
        .parse::<SocketAddr>()
        .unwrap();
    assert_eq!(cport["containerPort"], addr.port());
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    let dashboard =
        std::fs::read_to_string(root().join("deploy/observability/grafana-dashboard.json"))
            .unwrap();
    assert_eq!(cm["data"]["grafana-dashboard.json"], dashboard.as_str());
}
