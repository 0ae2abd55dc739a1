//! The user's story with the real kubectl: install the CRD, apply the seed's samples with
//! `kubectl apply -f deploy/samples/`, see the writer, fail it, read the Events. kubectl 1.32
//! against kubesim over loopback, or kubectl 1.33 against the real apiserver (`tests/common`).
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on setup failures

mod common;
use common::{Backend, Env, Options};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_story_with_the_seed_samples() {
    // The operator starts after `make install`, below.
    let mut env = Env::start_with(Options::user_story()).await;
    let k = env.kubectl();

    // make install, then the operator, then the samples exactly as a user applies them.
    k.install_crd("deploy/crd/app.anukkrit.me_statefulsetlocks.yaml")
        .await;
    let mut args = env.operator_args("stslock-0");
    args.concurrency = 4;
    env.start_operator_with("stslock-0", args).await;
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

    env.stop_operators().await;
    env.assert_never_two_writers().await;
    if env.backend() == Backend::Real {
        // The operator wrote as its ServiceAccount only, never as the admin kubectl used.
        let writes = env.writes();
        assert!(
            writes
                .iter()
                .filter(|w| w.by_operator())
                .all(|w| w.user.as_deref() == Some("system:serviceaccount:stslock-system:stslock")),
            "operator writes under another identity"
        );
    }
}
