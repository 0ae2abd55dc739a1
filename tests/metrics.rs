//! The metrics endpoints of running operator replicas, on kubesim or a real control plane
//! (`tests/common`): what `/metrics` says after failovers, renewals, handoffs and a StatefulSet
//! without a Ready pod; when `/readyz` turns ready (and unready when fenced); that `stslock
//! dev` prints each shard's address; and that the alert rules, dashboard and manifests in
//! deploy/observability/ refer only to metrics the operator exposes and to the port it serves
//! them on. Assertions are on counts and states, never on durations.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on setup failures

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde_json::json;
use stslock::config::OperatorArgs;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

mod common;
use common::{Env, Options, call, poll};

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

/// An environment without operators; the tests start their replicas with [`replica`].
async fn env(partitionable: bool) -> Env {
    Env::start_with(Options {
        replicas: 0,
        partitionable,
        ..Options::default()
    })
    .await
}

/// Start an operator replica and wait for the address its metrics server bound.
async fn replica(env: &mut Env, id: &str, f: impl FnOnce(&mut OperatorArgs)) -> SocketAddr {
    let args = env.operator_args_with(id, f);
    env.start_operator_with(id, args).await;
    let addr = env.metrics_addr(id).await;
    assert!(addr.ip().is_loopback() && addr.port() != 0, "{addr}");
    addr
}

/// Lock `name` on StatefulSet `sts`, with Lease `{sts}-lease` of 30 s.
async fn lock(env: &Env, name: &str, sts: &str) {
    env.lock(name, sts, &format!("{sts}-lease"), 30, json!({}))
        .await;
}

/// The replica's exposition.
async fn metrics(addr: SocketAddr) -> HashMap<String, f64> {
    samples(&get(addr, "/metrics").await.1)
}

async fn scrape_all(replicas: &[SocketAddr]) -> Vec<HashMap<String, f64>> {
    let mut out = vec![];
    for addr in replicas {
        let (status, body) = get(*addr, "/metrics").await;
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
    let mut env = env(false).await;
    let mut replicas = vec![];
    for i in 0..3 {
        replicas.push(replica(&mut env, &format!("m-{i}"), |_| {}).await);
    }
    let locks = 6;
    for i in 0..locks {
        env.statefulset(&format!("f{i}"), 2).await;
        lock(&env, &format!("l{i}"), &format!("f{i}")).await;
    }
    for i in 0..locks {
        env.wait_writer(&format!("f{i}"), &format!("f{i}-0")).await;
        // Both pods are there to fail over between.
        env.wait_roles(&format!("f{i}"), 2).await;
    }
    // Two rounds: every writer goes NotReady and the other pod takes over; the old writer
    // comes back (as a reader) before the next round.
    let mut failovers = 0;
    for (from, to) in [(0, 1), (1, 0)] {
        for i in 0..locks {
            env.set_ready(&format!("f{i}-{to}"), true).await;
            env.set_ready(&format!("f{i}-{from}"), false).await;
        }
        for i in 0..locks {
            env.wait_writer(&format!("f{i}"), &format!("f{i}-{to}"))
                .await;
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
    env.assert_never_two_writers().await;
    env.stop_operators().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_waits_for_synced_caches_and_the_membership_lease() {
    let mut env = env(true).await;
    // The replica starts cut off from the API server: no list can complete, no membership
    // Lease can be written.
    env.partition("r-0").await;
    let addr = replica(&mut env, "r-0", |a| a.membership_lease_seconds = 3).await;
    let (status, body) = get(addr, "/healthz").await;
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    // Time for a wrong answer to show, not a wait for a state.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, body) = get(addr, "/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("caches not synced"), "{body}");
    for cache in ["statefulsetlocks", "statefulsets", "pods", "leases"] {
        assert!(body.contains(cache), "{body}");
    }
    assert_eq!(metrics(addr).await["stslock_shard_ready"], 0.0);
    // The partition heals: caches sync, the membership Lease is written, the replica is ready.
    env.heal("r-0").await;
    poll(20, "/readyz 200", move || {
        Box::pin(async move {
            let (status, _) = get(addr, "/readyz").await;
            (status == 200).then_some(())
        })
    })
    .await;
    // Cut off again: the caches stay synced, but the membership Lease cannot be renewed, the
    // fence closes, and the replica is not ready until it can renew again.
    env.partition("r-0").await;
    let body = poll(20, "/readyz 503 once fenced", move || {
        Box::pin(async move {
            let (status, body) = get(addr, "/readyz").await;
            (status == 503).then_some(body)
        })
    })
    .await;
    assert!(body.contains("membership Lease not held"), "{body}");
    env.heal("r-0").await;
    poll(20, "/readyz 200 again", move || {
        Box::pin(async move {
            let (status, _) = get(addr, "/readyz").await;
            (status == 200).then_some(())
        })
    })
    .await;
    env.stop_operators().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joining_replicas_take_locks_by_handoff_and_caches_and_gauges_follow() {
    let mut env = env(false).await;
    let first = replica(&mut env, "h-0", |_| {}).await;
    let locks = 12;
    for i in 0..locks {
        env.statefulset(&format!("hs{i}"), 2).await;
        lock(&env, &format!("h{i}"), &format!("hs{i}")).await;
    }
    for i in 0..locks {
        env.wait_writer(&format!("hs{i}"), &format!("hs{i}-0"))
            .await;
    }
    poll(20, "the only replica owns every lock", move || {
        Box::pin(async move {
            (total(&metrics(first).await, "stslock_owned_locks") == locks as f64).then_some(())
        })
    })
    .await;
    // Alone, h-0 keeps every pod, Lease and StatefulSet.
    poll(
        20,
        "h-0 caches the pods, Leases and StatefulSets of every lock",
        move || {
            Box::pin(async move {
                let m = metrics(first).await;
                (m.get("stslock_cached_objects{kind=\"pods\"}") == Some(&(2.0 * locks as f64))
                    && m.get("stslock_cached_objects{kind=\"leases\"}") == Some(&(locks as f64))
                    && m.get("stslock_cached_objects{kind=\"statefulsets\"}")
                        == Some(&(locks as f64)))
                .then_some(())
            })
        },
    )
    .await;
    let mut replicas = vec![first];
    for i in 1..3 {
        replicas.push(replica(&mut env, &format!("h-{i}"), |_| {}).await);
    }
    // The ring grows to three; h-0 hands the locks it no longer owns to their new owners,
    // and their pods and Leases leave its caches.
    let s = poll(20, "three ring members and every lock owned once", || {
        let replicas = replicas.clone();
        Box::pin(async move {
            let s = scrape_all(&replicas).await;
            // Each replica keeps the pods (two per StatefulSet) and the Leases of its own
            // locks only; every lock and StatefulSet of the scope.
            let cached = |m: &HashMap<String, f64>, kind: &str| {
                m.get(&format!("stslock_cached_objects{{kind=\"{kind}\"}}"))
                    .copied()
            };
            let own_state_only = s.iter().all(|m| {
                let owned = total(m, "stslock_owned_locks");
                cached(m, "pods") == Some(2.0 * owned)
                    && cached(m, "leases") == Some(owned)
                    && cached(m, "locks") == Some(locks as f64)
                    && cached(m, "statefulsets") == Some(locks as f64)
            });
            let settled = s.iter().all(|m| m["stslock_ring_members"] == 3.0)
                && sum(&s, "stslock_owned_locks") == locks as f64
                && total(&s[0], "stslock_owned_locks") < locks as f64
                && own_state_only;
            settled.then_some(s)
        })
    })
    .await;
    let moved = locks as f64 - total(&s[0], "stslock_owned_locks");
    assert!(
        total(&s[0], "stslock_handoffs_total") >= moved,
        "h-0 gave away {moved} locks with {} handoffs",
        total(&s[0], "stslock_handoffs_total")
    );
    assert_eq!(sum(&s, "stslock_dual_writer_detections_total"), 0.0);
    env.stop_operators().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_renewal_is_counted_with_its_lateness() {
    let mut env = env(false).await;
    let r = replica(&mut env, "n-0", |_| {}).await;
    env.statefulset("rn", 2).await;
    env.lock("rn", "rn", "rn-lease", 2, json!({})).await;
    env.wait_writer("rn", "rn-0").await;
    // A 2 s Lease is renewed every second by the same holder, with no new epoch.
    let s = poll(20, "three renewals", move || {
        Box::pin(async move {
            let s = metrics(r).await;
            (s["stslock_lease_renewals_total"] >= 3.0).then_some(s)
        })
    })
    .await;
    assert_eq!(
        s["stslock_lease_renewal_lateness_seconds_count"],
        s["stslock_lease_renewals_total"]
    );
    assert_eq!(s["stslock_writer_changes_total{kind=\"election\"}"], 1.0);
    assert_eq!(s["stslock_writer_changes_total{kind=\"failover\"}"], 0.0);
    let lease = call("get lease", env.leases().get("rn-lease"))
        .await
        .unwrap();
    assert_eq!(lease.spec.unwrap().lease_transitions, Some(0));
    env.stop_operators().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statefulset_with_no_ready_pod_is_reported_writerless_until_one_returns() {
    let mut env = env(false).await;
    let r = replica(&mut env, "w-0", |_| {}).await;
    env.statefulset("wl", 2).await;
    lock(&env, "wl", "wl").await;
    env.wait_writer("wl", "wl-0").await;
    env.wait_roles("wl", 2).await;
    let gauge = |s: HashMap<String, f64>| s["stslock_writerless_locks"];
    assert_eq!(gauge(metrics(r).await), 0.0);
    // No Ready pod at all: nobody to fail over to, the lock is writer-less.
    env.set_ready("wl-1", false).await;
    env.set_ready("wl-0", false).await;
    poll(15, "writerless_locks 1", move || {
        Box::pin(async move { (gauge(metrics(r).await) == 1.0).then_some(()) })
    })
    .await;
    env.set_ready("wl-1", true).await;
    env.wait_writer("wl", "wl-1").await;
    let s = poll(15, "writerless_locks 0", move || {
        Box::pin(async move {
            let s = metrics(r).await;
            (s["stslock_writerless_locks"] == 0.0).then_some(s)
        })
    })
    .await;
    assert!(s["stslock_writerless_seconds_total"] > 0.0);
    assert_eq!(s["stslock_failover_duration_seconds_count"], 1.0);
    assert_eq!(s["stslock_dual_writer_detections_total"], 0.0);
    env.stop_operators().await;
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
    let mut env = env(false).await;
    let r = replica(&mut env, "x-0", |_| {}).await;
    // Ready: it has made API calls, so every family has at least one series.
    let text = poll(20, "a ready replica's exposition", move || {
        Box::pin(async move {
            let (status, text) = get(r, "/metrics").await;
            assert_eq!(status, 200);
            (samples(&text).get("stslock_shard_ready") == Some(&1.0)).then_some(text)
        })
    })
    .await;
    let exposed = exposed_names(&text);
    assert!(exposed.contains("stslock_failover_duration_seconds_bucket"));
    env.stop_operators().await;

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
    if !common::kubesim_only(
        "`stslock dev` embeds kubesim; nothing of it reaches the real control plane (it runs in the kubesim pass)",
    ) {
        return;
    }
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
        let addr = *addr;
        poll(30, &format!("{id} ready"), move || {
            Box::pin(async move {
                let (status, _) = get(addr, "/readyz").await;
                (status == 200).then_some(())
            })
        })
        .await;
        let (status, text) = get(addr, "/metrics").await;
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

/// A lock deleted while the replica's lock watch was down has no Delete event (the watch
/// re-lists): the list's completion gives up every lock the list lacks, so its pods and Lease
/// leave the caches too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_deleted_while_the_lock_watch_was_down_leaves_the_caches() {
    use kube::api::{DeleteParams, Patch, PatchParams};
    if !common::kubesim_only("stalls, compacts and drops kubesim's watches") {
        return;
    }
    let mut env = env(false).await;
    let m = replica(&mut env, "d-0", |_| {}).await;
    // d1's Lease is short: its renewal entry fires (every 2 s) after the lock is gone, while
    // the check below still looks.
    env.statefulset("ds0", 2).await;
    lock(&env, "d0", "ds0").await;
    env.statefulset("ds1", 2).await;
    env.lock("d1", "ds1", "ds1-lease", 4, json!({})).await;
    for i in 0..2 {
        env.wait_writer(&format!("ds{i}"), &format!("ds{i}-0"))
            .await;
    }
    // Pods, Leases, locks, StatefulSets.
    let cached = move |want: [f64; 4]| async move {
        let s = metrics(m).await;
        let counts = ["pods", "leases", "locks", "statefulsets"].map(|k| {
            s.get(&format!("stslock_cached_objects{{kind=\"{k}\"}}"))
                .copied()
        });
        (counts == want.map(Some)).then_some(())
    };
    poll(
        20,
        "both locks' pods, Leases and StatefulSets cached",
        move || Box::pin(cached([4.0, 2.0, 2.0, 2.0])),
    )
    .await;
    // The lock watch stalls; d1 goes (its finalizer removed first: the operator cannot see the
    // deletion to finish it); the history is compacted and the watches dropped, so the lock
    // watch re-lists and never sees a Delete of d1.
    env.faults().update(|c| {
        c.watch_faults = vec![kubesim::WatchFault::stall("statefulsetlocks")];
    });
    let locks = env.locks();
    locks
        .patch(
            "d1",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"finalizers": null}})),
        )
        .await
        .unwrap();
    locks.delete("d1", &DeleteParams::default()).await.unwrap();
    env.sim().expect("kubesim").compact();
    env.faults().drop_watches();
    env.faults().set(Default::default());
    // ds1 itself stays (every StatefulSet of the scope is kept).
    poll(20, "d1's pods and Lease gone from the caches", move || {
        Box::pin(cached([2.0, 1.0, 1.0, 2.0]))
    })
    .await;
    // ... and they stay gone: d1's renewal entry, which still holds the lock as it was cached,
    // must not read them back in (it did, when the renewal lane read a lock's Lease and pods
    // without reading the lock itself).
    for _ in 0..12 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let s = metrics(m).await;
        let counts = ["pods", "leases", "locks", "statefulsets"].map(|k| {
            s.get(&format!("stslock_cached_objects{{kind=\"{k}\"}}"))
                .copied()
        });
        assert_eq!(
            counts,
            [Some(2.0), Some(1.0), Some(1.0), Some(2.0)],
            "cached pods, Leases, locks, StatefulSets after d1 was deleted unseen"
        );
    }
    env.stop_operators().await;
}
