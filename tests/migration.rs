//! The README's migration procedure ("Migrating from the Go operator"), step by step with the
//! real `kubectl` (1.32 against kubesim, 1.33 against the real control plane), on a cluster in
//! the state the Go operator leaves. The one step not run as written is `make deploy`: there is
//! no image registry here, so the harness starts the operator (as its ServiceAccount on the real
//! backend) where the procedure deploys it.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on setup failures

mod common;
use common::{Env, Options, ROLE_LABEL};
use stslock::api::GO_FINALIZER;

const GO_DEPLOYMENT: &str = "sts-leader-elect-operator-controller-manager";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readmes_migration_procedure_works() {
    let mut env = Env::start_with(Options::user_story()).await;
    let go_ns = env
        .add_namespace("sts-leader-elect-operator-system", serde_json::json!({}))
        .await;
    let k = env.kubectl();
    let dir = std::env::temp_dir().join(format!("stslock-migration-{:08x}", rand::random::<u32>()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = |name: &str, body: &str| {
        let p = dir.join(name);
        std::fs::write(&p, body).unwrap();
        p.to_string_lossy().to_string()
    };

    // --- The cluster as the Go operator runs it: its CRD, its manager, the samples applied as
    // its README says (`kubectl apply -k`), and what it wrote: a finalizer, an unmarked Lease,
    // the role labels, its status.
    k.install_crd("tests/fixtures/go-operator-crd.yaml").await;
    let manager = file(
        "manager.yaml",
        &format!(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: {GO_DEPLOYMENT}\n  namespace: {go_ns}\nspec:\n  replicas: 1\n  selector:\n    matchLabels: {{control-plane: controller-manager}}\n  template:\n    metadata:\n      labels: {{control-plane: controller-manager}}\n    spec:\n      containers:\n      - name: manager\n        image: example.com/sts-leader-elect-operator:latest\n"
        ),
    );
    k.run(&["apply", "-f", &manager]).await;
    k.run(&["apply", "-k", "deploy/samples/"]).await;
    k.until(&["get", "pods", "-l", "app=postgres", "-o", "jsonpath={range .items[*]}{.status.conditions[?(@.type==\"Ready\")].status}{\"\\n\"}{end}"], "3 Ready pods", |out| out.matches("True").count() == 3).await;
    let now = jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%S%.6fZ")
        .to_string();
    let lease = file(
        "lease.yaml",
        &format!(
            "apiVersion: coordination.k8s.io/v1\nkind: Lease\nmetadata:\n  name: postgres-cluster-leader-lease\nspec:\n  holderIdentity: postgres-cluster-1\n  leaseDurationSeconds: 30\n  acquireTime: \"{now}\"\n  renewTime: \"{now}\"\n"
        ),
    );
    k.run(&["create", "-f", &lease]).await;
    k.run(&[
        "label",
        "pod",
        "postgres-cluster-0",
        "postgres-cluster-2",
        &format!("{ROLE_LABEL}=reader"),
    ])
    .await;
    k.run(&[
        "label",
        "pod",
        "postgres-cluster-1",
        &format!("{ROLE_LABEL}=writer"),
    ])
    .await;
    k.run(&[
        "patch",
        "ssl",
        "postgres-cluster-lock",
        "--type=merge",
        "-p",
        &format!("{{\"metadata\":{{\"finalizers\":[\"{GO_FINALIZER}\"]}}}}"),
    ])
    .await;
    k.run(&["patch", "ssl", "postgres-cluster-lock", "--subresource=status", "--type=merge", "-p",
        r#"{"status":{"writerPod":"postgres-cluster-1","conditions":[{"type":"Available","status":"True","reason":"Available","message":"writer available","lastTransitionTime":"2026-01-01T00:00:00Z"}]}}"#]).await;

    // --- The procedure.
    // 1. Stop the Go operator (never delete its CRD: that deletes every lock).
    k.run(&[
        "-n",
        &go_ns,
        "scale",
        "deployment",
        GO_DEPLOYMENT,
        "--replicas=0",
    ])
    .await;
    let replicas = k
        .run(&[
            "-n",
            &go_ns,
            "get",
            "deployment",
            GO_DEPLOYMENT,
            "-o",
            "jsonpath={.spec.replicas}",
        ])
        .await;
    assert_eq!(replicas.trim(), "0");
    // 2. make install: our CRD over the Go one; every lock stays.
    k.install_crd("deploy/crd/app.anukkrit.me_statefulsetlocks.yaml")
        .await;
    // 3. make deploy (here: the harness starts the operator).
    let args = env.operator_args("stslock-0");
    env.start_operator_with("stslock-0", args).await;
    // 4. Verify: the same writer, Available, the Lease adopted, an Adopted Event.
    let got = k
        .until(
            &["get", "ssl"],
            "the lock Available with the Go operator's writer",
            |out| {
                out.lines().any(|l| {
                    l.starts_with("postgres-cluster-lock")
                        && l.contains("postgres-cluster-1")
                        && l.contains("True")
                })
            },
        )
        .await;
    for col in [
        "STATEFULSET",
        "WRITER",
        "EPOCH",
        "AVAILABLE",
        "LEASE DURATION",
        "AGE",
    ] {
        assert!(got.contains(col), "{col} in {got}");
    }
    k.until(
        &[
            "get",
            "leases",
            "-l",
            "app.anukkrit.me/managed-by=stslock",
            "-o",
            "name",
        ],
        "the Lease adopted",
        |out| out.contains("postgres-cluster-leader-lease"),
    )
    .await;
    k.until(
        &[
            "get",
            "events",
            "--field-selector",
            "reason=Adopted",
            "-o",
            "name",
        ],
        "an Adopted Event",
        |out| !out.trim().is_empty(),
    )
    .await;
    let holder = k
        .run(&[
            "get",
            "lease",
            "postgres-cluster-leader-lease",
            "-o",
            "jsonpath={.spec.holderIdentity}",
        ])
        .await;
    assert_eq!(
        holder.trim(),
        "postgres-cluster-1",
        "no failover on adoption"
    );
    k.until(
        &[
            "get",
            "ssl",
            "postgres-cluster-lock",
            "-o",
            "jsonpath={.metadata.finalizers}",
        ],
        "the Go finalizer replaced",
        |out| out.contains("app.anukkrit.me/finalizer") && !out.contains(GO_FINALIZER),
    )
    .await;
    let labels = k
        .run(&["get", "pods", "-l", "app=postgres", "--show-labels"])
        .await;
    assert_eq!(
        labels.matches(&format!("{ROLE_LABEL}=writer")).count(),
        1,
        "{labels}"
    );
    // 5. Remove the Go remnants.
    k.run(&["-n", &go_ns, "delete", "deployment", GO_DEPLOYMENT])
        .await;
    // Still managed: failover works.
    env.set_ready("postgres-cluster-1", false).await;
    k.until(&["get", "ssl"], "failed over", |out| {
        out.lines()
            .any(|l| l.starts_with("postgres-cluster-lock") && l.contains("postgres-cluster-0"))
    })
    .await;
    env.stop_operators().await;
    let _ = std::fs::remove_dir_all(&dir);
}
