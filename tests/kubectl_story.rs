//! The user's story with the real kubectl over loopback: install the CRD, apply the seed's
//! samples with `kubectl apply -f deploy/samples/`, see the writer, fail it, read the Events.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on setup failures

use std::path::{Path, PathBuf};
use std::time::Duration;

use kubesim::{Sim, SimConfig};
use stslock::config::OperatorArgs;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

struct Kubectl {
    kubeconfig: PathBuf,
    home: PathBuf,
}

impl Kubectl {
    async fn try_run(&self, args: &[&str]) -> (bool, String, String) {
        let bin = std::env::var("KUBECTL").unwrap_or_else(|_| "kubectl".into());
        let out = tokio::time::timeout(
            Duration::from_secs(60),
            tokio::process::Command::new(&bin)
                .args(args)
                .current_dir(root())
                .env("KUBECONFIG", &self.kubeconfig)
                .env("HOME", &self.home)
                .kill_on_drop(true)
                .output(),
        )
        .await
        .expect("kubectl in time")
        .unwrap_or_else(|e| panic!("cannot run {bin} (install kubectl 1.32 or set KUBECTL): {e}"));
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    async fn run(&self, args: &[&str]) -> String {
        let (ok, out, err) = self.try_run(args).await;
        assert!(ok, "kubectl {args:?}: {out}\n{err}");
        out
    }

    async fn until(&self, args: &[&str], what: &str, pred: impl Fn(&str) -> bool) -> String {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let (_, out, _) = self.try_run(args).await;
            if pred(&out) {
                return out;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}; last output:\n{out}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_story_with_the_seed_samples() {
    let mut cfg = SimConfig::default();
    cfg.controllers.pod_ready_delay = Duration::from_millis(50);
    let mut sim = Sim::start(cfg);
    sim.serve("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let home = std::env::temp_dir().join(format!("stslock-kubectl-{}", std::process::id()));
    std::fs::create_dir_all(&home).unwrap();
    let k = Kubectl {
        kubeconfig: home.join("kubeconfig"),
        home: home.clone(),
    };
    sim.write_kubeconfig(&k.kubeconfig).unwrap();

    // make install, then the operator, then the samples exactly as a user applies them.
    k.run(&[
        "apply",
        "-f",
        "deploy/crd/app.anukkrit.me_statefulsetlocks.yaml",
    ])
    .await;
    k.run(&[
        "wait",
        "--for=condition=Established",
        "crd/statefulsetlocks.app.anukkrit.me",
        "--timeout=20s",
    ])
    .await;
    let client = sim.client_as("stslock/kubectl-story");
    let mut args = OperatorArgs::for_shard("stslock-0");
    args.concurrency = 4;
    args.api_timeout_seconds = 5;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let operator = tokio::spawn(stslock::reconcile::run(client, args, async {
        let _ = stopped.await;
    }));
    let out = k.run(&["apply", "-f", "deploy/samples/"]).await;
    assert!(
        out.contains("statefulsetlock.app.anukkrit.me/postgres-cluster-lock created"),
        "{out}"
    );

    let ssl = k
        .until(&["get", "ssl"], "writer in kubectl get ssl", |o| {
            o.contains("postgres-cluster-0") && o.contains("True")
        })
        .await;
    let header = ssl.lines().next().unwrap_or("");
    for col in ["NAME", "WRITER", "EPOCH", "AVAILABLE", "AGE"] {
        assert!(header.contains(col), "{ssl}");
    }
    let wide = k.run(&["get", "ssl", "-o", "wide"]).await;
    assert!(
        wide.contains("SHARD") && wide.contains("stslock-0"),
        "{wide}"
    );
    let pods = k
        .run(&["get", "pods", "-l", "sts-role=writer", "-o", "name"])
        .await;
    assert_eq!(pods.trim(), "pod/postgres-cluster-0");
    let readers = k
        .run(&["get", "pods", "-l", "sts-role=reader", "-o", "name"])
        .await;
    assert_eq!(readers.lines().count(), 2, "{readers}");
    let lease = k
        .run(&[
            "get",
            "lease",
            "postgres-cluster-leader-lease",
            "-o",
            "jsonpath={.spec.holderIdentity}",
        ])
        .await;
    assert_eq!(lease, "postgres-cluster-0");

    // Fail the writer the way the README says.
    k.run(&[
        "patch",
        "pod",
        "postgres-cluster-0",
        "--subresource=status",
        "-p",
        r#"{"status":{"conditions":[{"type":"Ready","status":"False"}]}}"#,
    ])
    .await;
    k.until(
        &["get", "pods", "-l", "sts-role=writer", "-o", "name"],
        "new writer",
        |o| o.trim() == "pod/postgres-cluster-1",
    )
    .await;
    let described = k
        .until(
            &["describe", "ssl", "postgres-cluster-lock"],
            "Events in describe",
            |o| o.contains("Failover"),
        )
        .await;
    assert!(
        described.contains("Elected") && described.contains("elected postgres-cluster-0 as writer"),
        "{described}"
    );
    assert!(
        described.contains("postgres-cluster-1 is the writer now (epoch 1)"),
        "{described}"
    );

    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), operator).await;
    assert_eq!(sim.report().dual_writer_intervals, 0);
    let _ = std::fs::remove_dir_all(&home);
}
