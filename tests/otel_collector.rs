//! Traces through a real OpenTelemetry Collector: the collector's own OTLP receiver and file
//! exporter (`loadtest/otelcol`, built from its Go modules, cached; or `$STSLOCK_OTELCOL`), the
//! `stslock` binary run as a user runs it (`stslock run`, `OTEL_EXPORTER_OTLP_ENDPOINT`) against
//! kubesim; a failover is found in the collector's file as one `failover` span, and the lock's
//! Failover Event names its trace.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on setup failures

mod common;
use std::path::PathBuf;
use std::time::Duration;

use common::{Env, Options};
use serde_json::{Value, json};

fn collector() -> PathBuf {
    common::built_tool("STSLOCK_OTELCOL", "loadtest/otelcol/build.sh", &[])
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn attr(attrs: &Value, key: &str) -> Option<Value> {
    attrs
        .as_array()?
        .iter()
        .find(|a| a["key"] == key)
        .map(|a| a["value"].clone())
}

/// Every span in the file exporter's output (one OTLP/JSON export request per line), with its
/// resource's attributes.
fn spans(file: &std::path::Path) -> Vec<(Value, Value)> {
    let Ok(text) = std::fs::read_to_string(file) else {
        return vec![];
    };
    let mut out = vec![];
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let Ok(req) = serde_json::from_str::<Value>(line) else {
            continue; // a line being written
        };
        for rs in req["resourceSpans"].as_array().into_iter().flatten() {
            for ss in rs["scopeSpans"].as_array().into_iter().flatten() {
                for span in ss["spans"].as_array().into_iter().flatten() {
                    out.push((span.clone(), rs["resource"]["attributes"].clone()));
                }
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_span_reaches_a_real_collector() {
    let dir = std::env::temp_dir().join(format!("stslock-otelcol-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let traces = dir.join("traces.json");
    let port = free_port();
    let config = dir.join("collector.yaml");
    std::fs::write(
        &config,
        serde_json::to_vec_pretty(&json!({
            "receivers": {"otlp": {"protocols": {"grpc": {"endpoint": format!("127.0.0.1:{port}")}}}},
            "exporters": {"file": {"path": traces, "flush_interval": "100ms"}},
            "service": {
                "telemetry": {"metrics": {"level": "none"}, "logs": {"level": "warn"}},
                "pipelines": {"traces": {"receivers": ["otlp"], "exporters": ["file"]}}
            }
        }))
        .unwrap(),
    )
    .unwrap();
    let mut collector = tokio::process::Command::new(collector())
        .arg("--config")
        .arg(&config)
        .kill_on_drop(true)
        .spawn()
        .expect("start the collector");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the collector does not listen on {port}"
        );
        assert!(
            collector.try_wait().unwrap().is_none(),
            "the collector exited"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let env = Env::start_with(Options {
        replicas: 0,
        serve_http: true,
        ..Options::default()
    })
    .await;
    let ns = env.ns.clone();
    let kubeconfig = env.kubectl().kubeconfig;
    let mut operator = tokio::process::Command::new(env!("CARGO_BIN_EXE_stslock"))
        .args([
            "run",
            "--shard-id",
            "otelcol-0",
            "--metrics-addr",
            "127.0.0.1:0",
        ])
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .env(
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            format!("http://127.0.0.1:{port}"),
        )
        .env("OTEL_BSP_SCHEDULE_DELAY", "200")
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .spawn()
        .expect("stslock run");
    env.statefulset("db", 3).await;
    env.lock("lock", "db", "db-lease", 30, json!({})).await;
    env.wait_writer("db", "db-0").await;
    env.wait_roles("db", 3).await;
    env.set_ready("db-0", false).await;
    env.wait_writer("db", "db-1").await;

    let lock = format!("{ns}/lock");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let (span, resource) = loop {
        if let Some(found) = spans(&traces).into_iter().find(|(s, _)| {
            s["name"] == "failover"
                && attr(&s["attributes"], "stslock.lock") == Some(json!({"stringValue": lock}))
        }) {
            break found;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no failover span in the collector's file; spans: {:?}",
            spans(&traces)
                .iter()
                .map(|(s, _)| s["name"].to_string())
                .collect::<std::collections::BTreeSet<_>>()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let a = |k: &str| attr(&span["attributes"], k);
    assert_eq!(
        a("stslock.writer.old"),
        Some(json!({"stringValue": "db-0"}))
    );
    assert_eq!(
        a("stslock.writer.new"),
        Some(json!({"stringValue": "db-1"}))
    );
    assert_eq!(
        a("stslock.shard"),
        Some(json!({"stringValue": "otelcol-0"}))
    );
    assert_eq!(
        attr(&resource, "service.name"),
        Some(json!({"stringValue": "stslock"}))
    );
    let trace_id = span["traceId"].as_str().expect("traceId").to_string();
    assert_eq!(trace_id.len(), 32, "{span}");

    // The Failover Event names the same trace.
    let events: kube::Api<k8s_openapi::api::events::v1::Event> =
        kube::Api::namespaced(env.admin.clone(), &ns);
    let notes: Vec<String> = events
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some("Failover"))
        .filter_map(|e| e.note)
        .collect();
    assert!(
        notes
            .iter()
            .any(|n| n.ends_with(&format!("trace_id={trace_id}"))),
        "no Failover Event names trace {trace_id}: {notes:?}"
    );

    operator.start_kill().ok();
    let _ = operator.wait().await;
    collector.start_kill().ok();
    let _ = collector.wait().await;
    std::fs::remove_dir_all(dir).ok();
}
