//! Traces on kubesim or a real control plane (`tests/common`) and a real OTLP/gRPC receiver
//! in this process: a failover is one span carrying the decision, its API calls are its
//! children, and the Event names the trace; an unreachable collector changes nothing about
//! failover.
//!
//! Each test scopes its own subscriber to its thread (`current_thread` runtime, so every task
//! of the operator runs there) instead of a process-wide one: the tests point at different
//! collectors and run in parallel.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on setup failures

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kube::ResourceExt;
use kube::api::ListParams;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use serde_json::json;
use stslock::config::OperatorArgs;
use stslock::telemetry::{Otlp, TelemetryConfig, TelemetryGuard};

mod common;
use common::{Env, Options, call};

// ---------------------------------------------------------------- the OTLP receiver

/// One received span with its resource's attributes.
#[derive(Debug, Clone)]
struct Got {
    span: opentelemetry_proto::tonic::trace::v1::Span,
    resource: Vec<KeyValue>,
}

impl Got {
    fn attr(&self, key: &str) -> Option<Value> {
        attr(&self.span.attributes, key)
    }
    fn str(&self, key: &str) -> Option<String> {
        match self.attr(key)? {
            Value::StringValue(s) => Some(s),
            _ => None,
        }
    }
}

fn attr(kvs: &[KeyValue], key: &str) -> Option<Value> {
    kvs.iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.clone()?.value)
}

#[derive(Clone, Default)]
struct Receiver {
    spans: Arc<Mutex<Vec<Got>>>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for rs in req.into_inner().resource_spans {
            let resource = rs.resource.map(|r| r.attributes).unwrap_or_default();
            for ss in rs.scope_spans {
                for span in ss.spans {
                    spans.push(Got {
                        span,
                        resource: resource.clone(),
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

impl Receiver {
    /// A gRPC OTLP trace receiver on 127.0.0.1:0, on a thread and runtime of its own (like a
    /// collector, it must not share the operator's runtime); returns its endpoint.
    async fn start() -> (String, Receiver) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let r = Receiver::default();
        let service = TraceServiceServer::new(r.clone());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                tonic::transport::Server::builder()
                    .add_service(service)
                    .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
                    .await
                    .unwrap();
            });
        });
        (format!("http://{addr}"), r)
    }

    fn spans(&self) -> Vec<Got> {
        self.spans.lock().unwrap().clone()
    }
}

// ---------------------------------------------------------------- the operator

/// An environment with `replicas` replicas `otel-<n>`; `unlimited`: no write budgets
/// (`--qps 0 --tenant-qps 0`), to measure the operator, not its limiter.
async fn env(replicas: usize, unlimited: bool) -> Env {
    let operator_args: fn(&mut OperatorArgs) = if unlimited {
        |a| {
            a.qps = 0.0;
            a.tenant_qps = 0.0;
        }
    } else {
        |_| {}
    };
    Env::start_with(Options {
        replicas,
        shard_id: |i| format!("otel-{i}"),
        operator_args,
        ..Options::default()
    })
    .await
}

/// Start replica `otel-<n>` (n = replicas so far).
async fn add_replica(env: &mut Env) {
    let id = format!("otel-{}", env.operator_ids().len());
    let args = env.operator_args(&id);
    env.start_operator_with(&id, args).await;
}

fn telemetry(otlp: Otlp, max_queue: usize) -> (tracing::Dispatch, TelemetryGuard) {
    stslock::telemetry::build(&TelemetryConfig {
        otlp,
        shard: Some("otel-resource".into()),
        log_filter: Some("error".into()),
        max_queue,
        export_timeout: Duration::from_secs(1),
        shutdown_timeout: Duration::from_secs(3),
        ..TelemetryConfig::default()
    })
    .expect("telemetry")
}

/// Flush until a span matching `f` has arrived.
async fn wait_span(
    guard: &TelemetryGuard,
    receiver: &Receiver,
    what: &str,
    f: impl Fn(&Got) -> bool,
) -> Got {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        guard.flush().await;
        if let Some(s) = receiver.spans().into_iter().find(&f) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "no {what} span; got {:?}",
            receiver
                .spans()
                .iter()
                .map(|g| g.span.name.clone())
                .collect::<std::collections::BTreeSet<_>>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

// ---------------------------------------------------------------- tests

#[tokio::test(flavor = "current_thread")]
async fn failover_is_one_span_with_api_call_children_and_its_event_names_the_trace() {
    let (endpoint, receiver) = Receiver::start().await;
    let (dispatch, guard) = telemetry(Otlp::Endpoint(endpoint), 4096);
    let _scoped = tracing::dispatcher::set_default(&dispatch);
    let mut env = env(1, false).await;
    let ns = env.ns.clone();
    env.statefulset("db", 3).await;
    env.lock("lock", "db", "db-lease", 30, json!({})).await;
    env.wait_lease_holder("db-lease", "db-0").await;
    // Every pod is there (a real StatefulSet controller creates them one after another).
    env.wait_roles("db", 3).await;
    env.set_ready("db-0", false).await;
    env.wait_lease_holder("db-lease", "db-1").await;

    // The failover span is exported once closed; flush until it arrives.
    let deadline = Instant::now() + Duration::from_secs(15);
    let failover = loop {
        guard.flush().await;
        if let Some(s) = receiver.spans().into_iter().find(|g| {
            g.span.name == "failover"
                && g.str("stslock.lock").as_deref() == Some(format!("{ns}/lock").as_str())
        }) {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "no failover span; got {:?}",
            receiver
                .spans()
                .iter()
                .map(|g| g.span.name.clone())
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let s = |k: &str| failover.str(k).unwrap_or_else(|| panic!("attribute {k}"));
    assert_eq!(s("k8s.namespace.name"), ns);
    assert_eq!(s("stslock.shard"), "otel-0");
    assert_eq!(s("stslock.writer.old"), "db-0");
    assert_eq!(s("stslock.writer.new"), "db-1");
    assert_eq!(s("stslock.reason"), "writer db-0 is not Ready");
    assert_eq!(s("stslock.outcome"), "ok");
    assert_eq!(failover.attr("stslock.epoch"), Some(Value::IntValue(1)));
    match failover.attr("stslock.writerless_seconds") {
        Some(Value::DoubleValue(w)) => assert!((0.0..15.0).contains(&w), "writerless {w}"),
        other => panic!("writerless_seconds: {other:?}"),
    }
    let resource = |k: &str| attr(&failover.resource, k);
    assert_eq!(
        resource("service.name"),
        Some(Value::StringValue("stslock".into()))
    );
    assert_eq!(
        resource("service.version"),
        Some(Value::StringValue(env!("CARGO_PKG_VERSION").into()))
    );
    assert_eq!(
        resource("stslock.shard"),
        Some(Value::StringValue("otel-resource".into()))
    );

    let all = receiver.spans();
    let same_trace: Vec<&Got> = all
        .iter()
        .filter(|g| g.span.trace_id == failover.span.trace_id)
        .collect();
    // Parent: the reconcile that decided it.
    let parent = same_trace
        .iter()
        .find(|g| g.span.span_id == failover.span.parent_span_id)
        .expect("the failover span's parent was exported");
    assert_eq!(parent.span.name, "reconcile");
    assert_eq!(parent.str("stslock.lock"), Some(format!("{ns}/lock")));
    // Children: the API calls of the plan, Lease first.
    let children: Vec<&&Got> = same_trace
        .iter()
        .filter(|g| g.span.parent_span_id == failover.span.span_id)
        .collect();
    let lease_update = children
        .iter()
        .find(|g| {
            g.span
                .name
                .starts_with(&format!("patch Lease {ns}/db-lease (holder db-1"))
        })
        .unwrap_or_else(|| {
            panic!(
                "no Lease update among the children: {:?}",
                children.iter().map(|g| &g.span.name).collect::<Vec<_>>()
            )
        });
    assert_eq!(lease_update.str("k8s.verb").as_deref(), Some("patch"));
    assert_eq!(lease_update.str("k8s.resource").as_deref(), Some("leases"));
    assert!(
        children.iter().any(|g| g
            .span
            .name
            .starts_with(&format!("patch Pod {ns}/db-1 (sts-role=writer)"))),
        "promotion of db-1 is a child span"
    );

    // `kubectl describe ssl` shows the trace.
    let trace_id = hex(&failover.span.trace_id);
    assert_eq!(trace_id.len(), 32);
    let evs = env.events("lock").await;
    let (_, note) = evs
        .iter()
        .find(|(r, _)| r == "Failover")
        .unwrap_or_else(|| panic!("no Failover event: {evs:?}"));
    assert!(
        note.ends_with(&format!("trace_id={trace_id}")),
        "event note {note:?} should name trace {trace_id}"
    );
    // The election before it was its own trace, with its own id in its own Event.
    let (_, elected) = evs.iter().find(|(r, _)| r == "Elected").expect("Elected");
    assert!(elected.contains(" trace_id="), "{elected:?}");
    assert!(!elected.contains(&trace_id), "{elected:?}");

    // A switchover to a preferred writer is a decision span too.
    call(
        "patch lock",
        env.locks().patch(
            "lock",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({"spec": {"preferredWriter": "db-2"}})),
        ),
    )
    .await
    .unwrap();
    env.wait_lease_holder("db-lease", "db-2").await;
    let switchover = wait_span(&guard, &receiver, "switchover", |g| {
        g.span.name == "switchover"
    })
    .await;
    assert_eq!(
        switchover.str("stslock.writer.old").as_deref(),
        Some("db-1")
    );
    assert_eq!(
        switchover.str("stslock.writer.new").as_deref(),
        Some("db-2")
    );
    assert_eq!(switchover.attr("stslock.epoch"), Some(Value::IntValue(2)));
    assert_eq!(switchover.str("stslock.outcome").as_deref(), Some("ok"));
    assert_eq!(
        switchover.attr("stslock.writerless_seconds"),
        None,
        "a switchover from a Ready writer is never writer-less"
    );

    // A Lease deleted behind the operator's back is re-created for the same writer: a decision
    // span of its own, the epoch unchanged.
    call(
        "delete lease",
        env.leases().delete("db-lease", &Default::default()),
    )
    .await
    .unwrap();
    let recreated = wait_span(&guard, &receiver, "lease_recreated", |g| {
        g.span.name == "lease_recreated"
    })
    .await;
    assert_eq!(recreated.str("stslock.writer.old").as_deref(), Some("db-2"));
    assert_eq!(recreated.str("stslock.writer.new").as_deref(), Some("db-2"));
    assert_eq!(recreated.attr("stslock.epoch"), Some(Value::IntValue(2)));
    assert_eq!(
        recreated.str("stslock.reason").as_deref(),
        Some("Lease db-lease was missing")
    );
    assert_eq!(recreated.str("stslock.outcome").as_deref(), Some("ok"));
    env.wait_lease_holder("db-lease", "db-2").await;

    // Renewals add no decision spans: one of each.
    let decisions: HashMap<String, usize> = receiver
        .spans()
        .iter()
        .filter(|g| g.attr("stslock.kind").is_some())
        .fold(HashMap::new(), |mut m, g| {
            *m.entry(g.span.name.clone()).or_default() += 1;
            m
        });
    assert_eq!(
        decisions,
        HashMap::from([
            ("election".to_string(), 1),
            ("failover".to_string(), 1),
            ("switchover".to_string(), 1),
            ("lease_recreated".to_string(), 1)
        ])
    );
    env.stop_operators().await;
    guard.shutdown().await;
}

#[tokio::test(flavor = "current_thread")]
async fn a_shard_handoff_is_a_span_with_its_ownership_write_as_child() {
    let (endpoint, receiver) = Receiver::start().await;
    let (dispatch, guard) = telemetry(Otlp::Endpoint(endpoint), 4096);
    let _scoped = tracing::dispatcher::set_default(&dispatch);
    let mut env = env(1, false).await;
    let ns = env.ns.clone();
    for i in 0..8 {
        env.statefulset(&format!("h{i}"), 1).await;
        env.lock(
            &format!("h{i}"),
            &format!("h{i}"),
            &format!("h{i}-lease"),
            30,
            json!({}),
        )
        .await;
    }
    for i in 0..8 {
        env.wait_lease_holder(&format!("h{i}-lease"), &format!("h{i}-0"))
            .await;
    }
    // A second replica joins: the ring moves some locks from otel-0 to otel-1.
    add_replica(&mut env).await;
    let handoff = wait_span(&guard, &receiver, "handoff", |g| {
        g.span.name == "handoff" && g.str("stslock.outcome").as_deref() == Some("ok")
    })
    .await;
    assert_eq!(handoff.str("stslock.shard").as_deref(), Some("otel-0"));
    assert_eq!(handoff.str("stslock.shard.to").as_deref(), Some("otel-1"));
    assert_eq!(handoff.str("k8s.namespace.name"), Some(ns.clone()));
    let lock = handoff.str("stslock.lock").unwrap();
    assert!(lock.starts_with(&format!("{ns}/h")), "{lock}");
    let spans = receiver.spans();
    let write = spans
        .iter()
        .find(|g| g.span.parent_span_id == handoff.span.span_id)
        .expect("the ownership write is a child of the handoff span");
    assert_eq!(write.span.trace_id, handoff.span.trace_id);
    assert!(
        write.span.name.starts_with(&format!(
            "patch StatefulSetLock {lock} (handoff to shard otel-1)"
        )),
        "{}",
        write.span.name
    );
    assert_eq!(write.str("k8s.verb").as_deref(), Some("patch"));
    assert_eq!(
        write.str("k8s.resource").as_deref(),
        Some("statefulsetlocks")
    );
    env.stop_operators().await;
    guard.shutdown().await;
}

#[tokio::test(flavor = "current_thread")]
async fn a_failed_renewal_is_a_span_and_a_successful_one_is_not() {
    let (endpoint, receiver) = Receiver::start().await;
    let (dispatch, guard) = telemetry(Otlp::Endpoint(endpoint), 4096);
    let _scoped = tracing::dispatcher::set_default(&dispatch);
    let mut env = env(1, false).await;
    let ns = env.ns.clone();
    env.statefulset("r", 2).await;
    // A 2 s Lease is renewed every second.
    env.lock("r", "r", "r-lease", 2, json!({})).await;
    env.wait_lease_holder("r-lease", "r-0").await;
    // The window the renewals are counted in, not a wait for a state.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    guard.flush().await;
    let renewed = env
        .commit_log()
        .iter()
        .filter(|c| {
            c.resource == "leases" && c.name == "r-lease" && c.actor.starts_with("stslock/")
        })
        .count();
    assert!(
        renewed >= 3,
        "created and renewed at least twice: {renewed} writes"
    );
    let renewal_spans: Vec<String> = receiver
        .spans()
        .iter()
        .map(|g| g.span.name.clone())
        .filter(|n| n == "renewal failed" || n.starts_with("renewing Lease"))
        .collect();
    assert!(
        renewal_spans.is_empty(),
        "renewals that succeed get no span: {renewal_spans:?}"
    );
    // The operator's writes fail with 500 for a while.
    env.fail_operator_writes().await;
    let failed = wait_span(&guard, &receiver, "renewal failed", |g| {
        g.span.name == "renewal failed"
    })
    .await;
    env.heal_operator_writes().await;
    assert_eq!(failed.str("stslock.lock"), Some(format!("{ns}/r")));
    assert_eq!(failed.str("k8s.namespace.name"), Some(ns.clone()));
    assert_eq!(failed.str("stslock.shard").as_deref(), Some("otel-0"));
    assert_eq!(failed.str("stslock.writer.old").as_deref(), Some("r-0"));
    assert_eq!(failed.attr("stslock.epoch"), Some(Value::IntValue(0)));
    assert_eq!(
        failed.str("stslock.outcome").as_deref(),
        Some("server_error")
    );
    assert_eq!(
        failed.span.status.as_ref().map(|s| s.code),
        Some(opentelemetry_proto::tonic::trace::v1::status::StatusCode::Error as i32)
    );
    // Healed: the same writer keeps the Lease.
    env.wait_lease_holder("r-lease", "r-0").await;
    env.stop_operators().await;
    guard.shutdown().await;
}

#[tokio::test(flavor = "current_thread")]
async fn a_collector_on_a_closed_port_does_not_slow_failover() {
    // A port that was just free and is closed now: connections are refused.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    failover_with_a_broken_collector(format!("http://{closed}")).await;
}

#[tokio::test(flavor = "current_thread")]
async fn a_collector_that_never_answers_does_not_slow_failover() {
    // Listening but never accepting: connections hang until the exporter's timeout.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    failover_with_a_broken_collector(format!("http://{}", silent.local_addr().unwrap())).await;
    drop(silent);
}

async fn failover_with_a_broken_collector(endpoint: String) {
    // A tiny queue: spans beyond it are dropped, never waited for.
    let (dispatch, guard) = telemetry(Otlp::Endpoint(endpoint), 8);
    let _scoped = tracing::dispatcher::set_default(&dispatch);
    assert!(guard.exporting());
    let guard = Arc::new(guard);
    // Keep exports to the dead endpoint in flight the whole time.
    let flusher = tokio::spawn({
        let guard = Arc::clone(&guard);
        async move {
            loop {
                guard.flush().await;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    });
    let mut env = env(1, false).await;
    for i in 0..4 {
        env.statefulset(&format!("db{i}"), 3).await;
        env.lock(
            &format!("lock{i}"),
            &format!("db{i}"),
            &format!("db{i}-lease"),
            30,
            json!({}),
        )
        .await;
    }
    for i in 0..4 {
        env.wait_lease_holder(&format!("db{i}-lease"), &format!("db{i}-0"))
            .await;
        env.wait_roles(&format!("db{i}"), 3).await;
    }
    let started = Instant::now();
    for i in 0..4 {
        env.set_ready(&format!("db{i}-0"), false).await;
    }
    for i in 0..4 {
        env.wait_lease_holder(&format!("db{i}-lease"), &format!("db{i}-1"))
            .await;
    }
    let took = started.elapsed();
    // Failover is normally tens of milliseconds here; one export timeout is 1 s.
    assert!(
        took < Duration::from_secs(1),
        "failover of 4 locks took {took:?}"
    );
    // The spans existed (and were dropped): the Events still carry their trace ids.
    let evs = env.events("lock0").await;
    assert!(
        evs.iter()
            .any(|(r, m)| r == "Failover" && m.contains(" trace_id=")),
        "{evs:?}"
    );
    flusher.abort();
    let _ = flusher.await;
    env.stop_operators().await;
    // Shutdown is bounded even with a dead collector.
    let guard = Arc::into_inner(guard).expect("sole owner");
    let t = Instant::now();
    guard.shutdown().await;
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "shutdown took {:?}",
        t.elapsed()
    );
}

/// The cost of trace export: elections per second with export to the in-process receiver vs
/// without (the same subscriber minus the OpenTelemetry layer), alternating to even out
/// warm-up. Run with
/// `cargo test --release --test telemetry -- --ignored --nocapture telemetry_cost`
/// (`STSLOCK_BENCH_LOCKS` sets the number of locks per round, default 200; the write budgets
/// are off unless `STSLOCK_BENCH_BUDGETS` is set, since with them the limiter sets the pace).
#[tokio::test(flavor = "current_thread")]
#[ignore = "measurement; prints numbers"]
async fn telemetry_cost() {
    let n: usize = std::env::var("STSLOCK_BENCH_LOCKS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let (endpoint, receiver) = Receiver::start().await;
    let mut rates: HashMap<&str, Vec<f64>> = HashMap::new();
    for round in 0..6 {
        let export = round % 2 == 1;
        let otlp = if export {
            Otlp::Endpoint(endpoint.clone())
        } else {
            Otlp::Off
        };
        let (dispatch, guard) = telemetry(otlp, 4096);
        let _scoped = tracing::dispatcher::set_default(&dispatch);
        let before = receiver.spans().len();
        let mut env = env(1, std::env::var_os("STSLOCK_BENCH_BUDGETS").is_none()).await;
        for i in 0..n {
            env.statefulset(&format!("s{i}"), 2).await;
        }
        let started = Instant::now();
        for i in 0..n {
            env.lock(
                &format!("l{i}"),
                &format!("s{i}"),
                &format!("s{i}-lease"),
                30,
                json!({}),
            )
            .await;
        }
        let leases = env.leases();
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let held = leases
                .list(&ListParams::default())
                .await
                .unwrap()
                .items
                .iter()
                .filter(|l| {
                    // The locks' Leases, not the replica's membership Lease.
                    l.name_any().ends_with("-lease")
                        && l.spec
                            .as_ref()
                            .and_then(|s| s.holder_identity.as_ref())
                            .is_some()
                })
                .count();
            if held >= n {
                break;
            }
            assert!(Instant::now() < deadline, "only {held}/{n} elected");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let secs = started.elapsed().as_secs_f64();
        env.stop_operators().await;
        guard.flush().await;
        let exported = receiver.spans().len() - before;
        let mode = if export { "otlp" } else { "off" };
        println!(
            "round {round} ({mode}): {n} elections in {secs:.3} s = {:.1} elections/s, {exported} spans exported",
            n as f64 / secs
        );
        if export {
            let mut by_name: HashMap<String, usize> = HashMap::new();
            for g in &receiver.spans()[before..] {
                let name = g.str("k8s.verb").map_or(g.span.name.clone(), |v| {
                    format!("api {v} {}", g.str("k8s.resource").unwrap_or_default())
                });
                *by_name.entry(name).or_default() += 1;
            }
            let mut by_name: Vec<_> = by_name.into_iter().collect();
            by_name.sort_by_key(|e| std::cmp::Reverse(e.1));
            println!("  spans by kind: {by_name:?}");
        }
        rates.entry(mode).or_default().push(n as f64 / secs);
        guard.shutdown().await;
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let (off, on) = (mean(&rates["off"]), mean(&rates["otlp"]));
    println!(
        "elections/s without export {off:.1}, with OTLP export {on:.1}, ratio {:.3}",
        on / off
    );
    assert!(on > 0.0 && off > 0.0);
}
