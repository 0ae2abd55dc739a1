//! `kubectl stslock` as a user runs it: the real `kubectl`, with this build's `stslock` linked
//! as `kubectl-stslock` on its PATH, against kubesim (kubectl 1.32) or the real control plane
//! (kubectl 1.33, `STSLOCK_TEST_BACKEND=real`), two operator replicas running.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on setup failures

mod common;
use std::time::Duration;

use common::{Env, Options};
use serde_json::json;

/// Set a pod's readiness and wait until kubectl (what the plugin reads) shows it.
async fn set_ready(env: &Env, k: &common::Kubectl, pod: &str, ready: bool) {
    env.set_ready(pod, ready).await;
    let want = if ready { "True" } else { "False" };
    k.until(
        &[
            "get",
            "pod",
            pod,
            "-o",
            "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
        ],
        &format!("{pod} Ready={want}"),
        |o| o == want,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_plugin_command_works_through_kubectl() {
    let env = Env::start_with(Options {
        replicas: 2,
        serve_http: true,
        ..Options::default()
    })
    .await;
    let k = env.kubectl().with_plugin();
    let ns = env.ns.clone();
    env.statefulset("db", 3).await;
    env.lock("lock", "db", "db-lease", 30, json!({})).await;
    env.wait_writer("db", "db-0").await;
    env.wait_roles("db", 3).await;

    let plugins = k.run(&["plugin", "list"]).await;
    assert!(plugins.contains("kubectl-stslock"), "{plugins}");

    // status: one lock, available, owned by one of the two shards, both members live.
    let status = k
        .until(
            &["stslock", "status"],
            "the lock available in status",
            |o| o.contains("Available    1"),
        )
        .await;
    assert!(
        status.starts_with(&format!("1 StatefulSetLocks in namespace {ns}\n")),
        "{status}"
    );
    assert!(
        status.contains("WITHOUT AN AVAILABLE WRITER: 0"),
        "{status}"
    );
    let shard_lines: Vec<&str> = status
        .lines()
        .filter(|l| l.starts_with("test-0") || l.starts_with("test-1"))
        .collect();
    assert_eq!(shard_lines.len(), 2, "{status}");
    assert!(shard_lines.iter().all(|l| l.contains("(live)")), "{status}");
    let owned: usize = shard_lines
        .iter()
        .map(|l| {
            l.split_whitespace()
                .nth(1)
                .unwrap()
                .parse::<usize>()
                .unwrap()
        })
        .sum();
    assert_eq!(owned, 1, "{status}");

    // switchover to a named pod: returns once it is the writer, label and status.
    let out = k
        .run(&["stslock", "switchover", "lock", "--to", "db-2"])
        .await;
    assert!(out.contains("writer db-0 -> db-2"), "{out}");
    env.wait_writer("db", "db-2").await;
    assert_eq!(
        env.lock_status("lock").await.writer_pod.as_deref(),
        Some("db-2")
    );
    let out = k
        .run(&["stslock", "switchover", "lock", "--to", "db-2"])
        .await;
    assert!(
        out.contains("db-2 is the writer already; nothing changed"),
        "{out}"
    );

    // A pod that is not Ready is refused, with the reason, and nothing is written.
    set_ready(&env, &k, "db-1", false).await;
    let (ok, _, err) = k
        .try_run(&["stslock", "switchover", "lock", "--to", "db-1"])
        .await;
    assert!(!ok && err.contains("db-1 is not Ready"), "{err}");
    let (ok, _, err) = k
        .try_run(&["stslock", "switchover", "lock", "--to", "nope-0"])
        .await;
    assert!(!ok && err.contains("not a pod of StatefulSet"), "{err}");
    let (ok, _, err) = k.try_run(&["stslock", "why", "missing"]).await;
    assert!(
        !ok && err.contains(&format!("StatefulSetLock {ns}/missing not found")),
        "{err}"
    );

    // pause: the writer going NotReady is not failed over while paused.
    let out = k.run(&["stslock", "pause", "lock"]).await;
    assert!(
        out.contains(&format!("{ns}/lock paused (writer db-2")),
        "{out}"
    );
    env.set_ready("db-2", false).await;
    // Once the operator has seen it (one Ready pod left in the status), the writer is still db-2.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while env.lock_status("lock").await.ready_replicas != Some(1) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the operator did not report db-2 NotReady"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        env.lock_status("lock").await.writer_pod.as_deref(),
        Some("db-2")
    );
    let labelled = k
        .run(&["get", "pods", "-l", "sts-role=writer", "-o", "name"])
        .await;
    assert_eq!(labelled.trim(), "pod/db-2");
    let status = k.run(&["stslock", "status"]).await;
    assert!(status.contains("Paused       1"), "{status}");

    // why: the lock, its conditions, Lease, pods and Events with their trace ids.
    let why = k.run(&["stslock", "why", "lock"]).await;
    let epoch = env.lock_status("lock").await.writer_epoch.unwrap();
    for want in [
        &format!("StatefulSetLock {ns}/lock (StatefulSet db, Lease db-lease, PAUSED)") as &str,
        &format!("writer db-2 (epoch {epoch})"),
        "preferred writer db-2",
        "CONDITIONS",
        "Progressing",
        "Paused",
        &format!("holder db-2, epoch (leaseTransitions) {epoch}"),
        "RECENT EVENTS",
        "Switchover",
        "Elected",
    ] {
        assert!(why.contains(want), "missing {want:?} in:\n{why}");
    }
    let pods: Vec<&str> = why
        .lines()
        .skip_while(|l| !l.starts_with("POD "))
        .skip(1)
        .take(3)
        .collect();
    assert!(
        pods[0].starts_with("db-0") && pods[0].contains("True") && pods[0].contains("reader"),
        "{why}"
    );
    assert!(
        pods[2].starts_with("db-2") && pods[2].contains("False") && pods[2].contains("writer"),
        "{why}"
    );

    // resume: the NotReady writer is failed over (its preferred pod is not Ready: db-0 is).
    let out = k.run(&["stslock", "resume", "lock"]).await;
    assert!(out.contains(&format!("{ns}/lock resumed")), "{out}");
    env.wait_writer("db", "db-0").await;
    let status = k
        .until(&["stslock", "status"], "the failover in status", |o| {
            o.lines()
                .any(|l| l.starts_with(&ns) && l.contains("lock") && l.contains("db-0"))
        })
        .await;
    assert!(status.contains("LAST WRITER CHANGES"), "{status}");
    let why = k.run(&["stslock", "why", "lock"]).await;
    assert!(why.contains("Failover"), "{why}");

    // Without a preferred pod, switchover picks the Ready reader with the lowest ordinal.
    set_ready(&env, &k, "db-1", true).await;
    let out = k.run(&["stslock", "switchover", "lock"]).await;
    assert!(out.contains("writer db-0 -> db-1"), "{out}");
    env.wait_writer("db", "db-1").await;
    env.assert_never_two_writers().await;
}

/// The plugin against `stslock dev` itself (kubesim, three shards, the seed's samples), as the
/// README's first command leaves it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_plugin_drives_stslock_dev() {
    let home = std::env::temp_dir().join(format!("stslock-plugin-dev-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&home).unwrap();
    let kubeconfig = home.join("stslock-dev.kubeconfig");
    let mut dev = tokio::process::Command::new(env!("CARGO_BIN_EXE_stslock"))
        .args(["dev", "--metrics-addr", "127.0.0.1:0", "--kubeconfig-out"])
        .arg(&kubeconfig)
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .spawn()
        .expect("stslock dev");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !kubeconfig.exists() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no kubeconfig from stslock dev"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let k = common::Kubectl {
        bin: std::path::PathBuf::from(
            std::env::var("KUBECTL").unwrap_or_else(|_| "kubectl".into()),
        ),
        kubeconfig,
        home: home.clone(),
        plugins: None,
    }
    .with_plugin();
    let status = k
        .until(&["stslock", "status", "-A"], "the sample elected", |o| {
            o.contains("Available    1") && o.contains("WITHOUT AN AVAILABLE WRITER: 0")
        })
        .await;
    assert!(
        status.starts_with("1 StatefulSetLocks in all namespaces"),
        "{status}"
    );
    for shard in ["stslock-0", "stslock-1", "stslock-2"] {
        assert!(
            status
                .lines()
                .any(|l| l.starts_with(shard) && l.contains("(live)")),
            "{shard} in:\n{status}"
        );
    }
    k.until(
        &["stslock", "why", "postgres-cluster-lock", "-n", "default"],
        "every sample pod Ready",
        |o| o.contains(", 3 Ready pods,"),
    )
    .await;
    let out = k
        .run(&[
            "stslock",
            "switchover",
            "postgres-cluster-lock",
            "-n",
            "default",
        ])
        .await;
    assert!(
        out.contains("writer postgres-cluster-0 -> postgres-cluster-1"),
        "{out}"
    );
    let out = k
        .run(&["stslock", "pause", "postgres-cluster-lock", "-n", "default"])
        .await;
    assert!(out.contains("paused (writer postgres-cluster-1"), "{out}");
    let why = k
        .run(&["stslock", "why", "postgres-cluster-lock", "-n", "default"])
        .await;
    assert!(
        why.contains("PAUSED") && why.contains("Switchover"),
        "{why}"
    );
    let out = k
        .run(&[
            "stslock",
            "resume",
            "postgres-cluster-lock",
            "-n",
            "default",
        ])
        .await;
    assert!(out.contains("resumed"), "{out}");
    dev.start_kill().ok();
    let _ = dev.wait().await;
    std::fs::remove_dir_all(home).ok();
}
