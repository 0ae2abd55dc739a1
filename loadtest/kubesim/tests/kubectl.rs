//! The real `kubectl` (1.32) against kubesim over loopback: every command a user of the
//! operator types. Fails with a clear message when kubectl is not installed.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on setup failures

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use common::{Transport, eventually, sim};
use kubesim::Sim;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

fn fixture(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
        .display()
        .to_string()
}

struct Kubectl {
    kubeconfig: PathBuf,
    home: tempdir::TempDir,
}

mod tempdir {
    use std::path::{Path, PathBuf};

    /// A directory removed on drop.
    pub struct TempDir(PathBuf);

    impl TempDir {
        pub fn new(prefix: &str) -> TempDir {
            let p = std::env::temp_dir().join(format!("{prefix}-{}", uuid_like()));
            std::fs::create_dir_all(&p).expect("create temp dir");
            TempDir(p)
        }
        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// Unique per process and call: tests run in parallel, and two that got the same directory
    /// (same clock reading) removed each other's kubeconfig on drop.
    fn uuid_like() -> String {
        use std::sync::atomic::{AtomicU64, Ordering};
        use std::time::{SystemTime, UNIX_EPOCH};
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let seq = NEXT.fetch_add(1, Ordering::Relaxed);
        format!("{}-{n}-{seq}", std::process::id())
    }
}

fn kubectl_binary() -> String {
    let bin = std::env::var("KUBECTL").unwrap_or_else(|_| "kubectl".into());
    let found = std::process::Command::new(&bin)
        .args(["version", "--client"])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "kubectl not found: these tests run the real kubectl binary; install kubectl 1.32 or set KUBECTL=/path/to/kubectl"
    );
    bin
}

async fn start() -> (Sim, Kubectl) {
    let (sim, _client) = sim(Transport::Loopback).await;
    let home = tempdir::TempDir::new("kubesim-kubectl");
    let kubeconfig = home.path().join("kubeconfig");
    sim.write_kubeconfig(&kubeconfig).expect("kubeconfig");
    (sim, Kubectl { kubeconfig, home })
}

struct Out {
    ok: bool,
    stdout: String,
    stderr: String,
}

impl Kubectl {
    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(kubectl_binary());
        c.args(args)
            .env("KUBECONFIG", &self.kubeconfig)
            .env("HOME", self.home.path())
            .stdin(Stdio::null())
            .kill_on_drop(true);
        c
    }

    async fn try_run(&self, args: &[&str]) -> Out {
        let out = tokio::time::timeout(Duration::from_secs(60), self.command(args).output())
            .await
            .unwrap_or_else(|_| panic!("kubectl {args:?} timed out"))
            .expect("run kubectl");
        Out {
            ok: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Run and require success; returns stdout.
    async fn run(&self, args: &[&str]) -> String {
        let o = self.try_run(args).await;
        assert!(
            o.ok,
            "kubectl {args:?} failed:\nstdout: {}\nstderr: {}",
            o.stdout, o.stderr
        );
        o.stdout
    }

    async fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = args.to_vec();
        a.extend(["-o", "json"]);
        serde_json::from_str(&self.run(&a).await).expect("kubectl json output")
    }
}

fn pod_ready(p: &serde_json::Value) -> bool {
    p["status"]["conditions"].as_array().is_some_and(|c| {
        c.iter()
            .any(|c| c["type"] == "Ready" && c["status"] == "True")
    })
}

async fn wait_pods(k: &Kubectl, n: usize) -> Vec<serde_json::Value> {
    eventually(20, &format!("{n} ready postgres pods"), || async {
        let l = k.json(&["get", "pods", "-l", "app=postgres"]).await;
        let items = l["items"].as_array().cloned().unwrap_or_default();
        (items.len() == n && items.iter().all(pod_ready)).then_some(items)
    })
    .await
}

#[tokio::test]
async fn seed_samples_pods_and_everyday_commands() {
    let (sim, k) = start().await;
    // Plain apply, client-side validation on (no --validate=false).
    let out = k
        .run(&[
            "apply",
            "-f",
            &fixture("seed-statefulset.yaml"),
            "-f",
            &fixture("seed-services.yaml"),
        ])
        .await;
    assert!(
        out.contains("statefulset.apps/postgres-cluster created"),
        "{out}"
    );
    assert!(out.contains("service/postgres-writer created"), "{out}");
    // Re-applying is a no-op patch.
    let out = k
        .run(&["apply", "-f", &fixture("seed-statefulset.yaml")])
        .await;
    assert!(
        out.contains("statefulset.apps/postgres-cluster unchanged"),
        "{out}"
    );
    // Server-side apply.
    let out = k
        .run(&[
            "apply",
            "--server-side",
            "-f",
            &fixture("seed-services.yaml"),
        ])
        .await;
    assert!(
        out.contains("service/postgres-writer serverside-applied"),
        "{out}"
    );

    wait_pods(&k, 3).await;
    let shown = k
        .run(&["get", "pods", "-l", "app=postgres", "--show-labels"])
        .await;
    let lines: Vec<&str> = shown.lines().collect();
    assert!(
        lines[0].starts_with("NAME") && lines[0].contains("READY") && lines[0].contains("LABELS"),
        "{shown}"
    );
    for (i, line) in lines[1..].iter().enumerate() {
        assert!(
            line.starts_with(&format!("postgres-cluster-{i} ")),
            "{shown}"
        );
        assert!(line.contains("1/1") && line.contains("Running"), "{shown}");
        assert!(line.contains("app=postgres"), "{shown}");
        assert!(
            line.contains(&format!(
                "statefulset.kubernetes.io/pod-name=postgres-cluster-{i}"
            )),
            "{shown}"
        );
        assert!(
            line.contains(&format!("apps.kubernetes.io/pod-index={i}")),
            "{shown}"
        );
    }
    // Created in ordinal order (from the simulator's commit log).
    let created: Vec<String> = sim
        .commit_log()
        .into_iter()
        .filter(|c| c.resource == "pods" && c.verb == "create")
        .map(|c| c.name)
        .collect();
    assert_eq!(
        created,
        [
            "postgres-cluster-0",
            "postgres-cluster-1",
            "postgres-cluster-2"
        ]
    );

    // Output formats.
    let yaml = k
        .run(&["get", "statefulset", "postgres-cluster", "-o", "yaml"])
        .await;
    assert!(
        yaml.contains("kind: StatefulSet") && yaml.contains("readyReplicas: 3"),
        "{yaml}"
    );
    let wide = k.run(&["get", "pods", "-o", "wide"]).await;
    assert!(
        wide.lines()
            .next()
            .is_some_and(|h| h.contains("IP") && h.contains("NODE")),
        "{wide}"
    );
    assert!(wide.contains("kubesim-node-"), "{wide}");
    let sts = k.run(&["get", "sts"]).await;
    assert!(
        sts.contains("postgres-cluster") && sts.contains("3/3"),
        "{sts}"
    );
    let svc = k.run(&["get", "svc", "postgres-writer"]).await;
    assert!(
        svc.contains("ClusterIP") && svc.contains("5432/TCP"),
        "{svc}"
    );

    // describe
    let d = k.run(&["describe", "pod", "postgres-cluster-0"]).await;
    assert!(
        d.contains("Name:")
            && d.contains("postgres-cluster-0")
            && d.contains("Controlled By:  StatefulSet/postgres-cluster"),
        "{d}"
    );
    let d = k
        .run(&["describe", "statefulset", "postgres-cluster"])
        .await;
    assert!(d.contains("Replicas:") && d.contains("3 desired"), "{d}");

    // label / annotate
    k.run(&["label", "pod", "postgres-cluster-0", "sts-role=writer"])
        .await;
    k.run(&[
        "annotate",
        "pod",
        "postgres-cluster-0",
        "example.com/note=hello",
    ])
    .await;
    let p = k.json(&["get", "pod", "postgres-cluster-0"]).await;
    assert_eq!(p["metadata"]["labels"]["sts-role"], "writer");
    assert_eq!(p["metadata"]["annotations"]["example.com/note"], "hello");
    let sel = k
        .run(&["get", "pods", "-l", "sts-role=writer", "-o", "name"])
        .await;
    assert_eq!(sel.trim(), "pod/postgres-cluster-0");
    k.run(&["label", "pod", "postgres-cluster-0", "sts-role-"])
        .await;
    let p = k.json(&["get", "pod", "postgres-cluster-0"]).await;
    assert!(p["metadata"]["labels"].get("sts-role").is_none());

    // Readiness off and on through the status subresource, and kubectl wait.
    k.run(&[
        "patch",
        "pod",
        "postgres-cluster-1",
        "--subresource=status",
        "-p",
        r#"{"status":{"conditions":[{"type":"Ready","status":"False"}]}}"#,
    ])
    .await;
    let p = k.json(&["get", "pod", "postgres-cluster-1"]).await;
    assert!(!pod_ready(&p));
    assert!(
        p["status"]["conditions"].as_array().is_some_and(|c| c
            .iter()
            .any(|c| c["type"] == "Initialized" && c["status"] == "True")),
        "other conditions kept: {p}"
    );
    let ready = k
        .run(&[
            "get",
            "pod",
            "postgres-cluster-1",
            "-o",
            "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
        ])
        .await;
    assert_eq!(ready, "False");
    let waiter = tokio::spawn({
        let mut c = k.command(&[
            "wait",
            "--for=condition=Ready",
            "pod/postgres-cluster-1",
            "--timeout=30s",
        ]);
        async move { c.output().await }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    k.run(&[
        "patch",
        "pod",
        "postgres-cluster-1",
        "--subresource=status",
        "-p",
        r#"{"status":{"conditions":[{"type":"Ready","status":"True"}]}}"#,
    ])
    .await;
    let w = waiter.await.expect("join").expect("kubectl wait");
    assert!(
        w.status.success(),
        "kubectl wait: {}",
        String::from_utf8_lossy(&w.stderr)
    );
    assert!(String::from_utf8_lossy(&w.stdout).contains("condition met"));

    // Lease create/get/delete.
    let lease = k.home.path().join("lease.yaml");
    std::fs::write(&lease, "apiVersion: coordination.k8s.io/v1\nkind: Lease\nmetadata:\n  name: my-lease\nspec:\n  holderIdentity: postgres-cluster-0\n  leaseDurationSeconds: 30\n").expect("write");
    k.run(&["create", "-f", &lease.display().to_string()]).await;
    let l = k.run(&["get", "lease", "my-lease"]).await;
    assert!(
        l.contains("HOLDER") && l.contains("postgres-cluster-0"),
        "{l}"
    );
    k.run(&["delete", "lease", "my-lease"]).await;
    let gone = k.try_run(&["get", "lease", "my-lease"]).await;
    assert!(
        !gone.ok
            && gone
                .stderr
                .contains("leases.coordination.k8s.io \"my-lease\" not found"),
        "{}",
        gone.stderr
    );
}

#[tokio::test]
async fn watch_delete_and_scale() {
    let (_sim, k) = start().await;
    k.run(&["apply", "-f", &fixture("seed-statefulset.yaml")])
        .await;
    wait_pods(&k, 3).await;
    // get -w streams changes.
    let mut watch = k.command(&["get", "pods", "-w", "-l", "app=postgres"]);
    watch.stdout(Stdio::piped());
    let mut child = watch.spawn().expect("spawn watch");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    // Header + 3 rows first.
    for _ in 0..4 {
        tokio::time::timeout(Duration::from_secs(20), lines.next_line())
            .await
            .expect("initial rows")
            .expect("read");
    }
    let before = k.json(&["get", "pod", "postgres-cluster-2"]).await;
    let out = k.run(&["delete", "pod", "postgres-cluster-2"]).await;
    assert!(out.contains("pod \"postgres-cluster-2\" deleted"), "{out}");
    let mut streamed = vec![];
    let saw_terminating = tokio::time::timeout(Duration::from_secs(20), async {
        while let Ok(Some(l)) = lines.next_line().await {
            streamed.push(l.clone());
            if l.starts_with("postgres-cluster-2") && l.contains("Terminating") {
                return true;
            }
        }
        false
    })
    .await
    .unwrap_or(false);
    assert!(saw_terminating, "watch streamed: {streamed:?}");
    child.kill().await.ok();
    // Recreated with a new UID.
    let after = eventually(20, "postgres-cluster-2 back", || async {
        let p = k.json(&["get", "pods", "-l", "app=postgres"]).await;
        p["items"]
            .as_array()?
            .iter()
            .find(|p| p["metadata"]["name"] == "postgres-cluster-2" && pod_ready(p))
            .cloned()
    })
    .await;
    assert_ne!(before["metadata"]["uid"], after["metadata"]["uid"]);

    k.run(&["scale", "statefulset", "postgres-cluster", "--replicas=5"])
        .await;
    wait_pods(&k, 5).await;
    k.run(&["scale", "statefulset", "postgres-cluster", "--replicas=1"])
        .await;
    let left = wait_pods(&k, 1).await;
    assert_eq!(left[0]["metadata"]["name"], "postgres-cluster-0");
}

#[tokio::test]
async fn custom_resources_and_finalizers() {
    let (_sim, k) = start().await;
    k.run(&["apply", "-f", &fixture("widgets-crd.yaml")]).await;
    k.run(&[
        "wait",
        "--for=condition=Established",
        "crd/widgets.example.com",
        "--timeout=20s",
    ])
    .await;
    k.run(&["apply", "-f", &fixture("widget.yaml")]).await;
    let got = k.run(&["get", "widgets"]).await;
    let header = got.lines().next().unwrap_or("");
    for col in ["NAME", "SIZE", "OWNER", "READY", "AGE"] {
        assert!(header.contains(col), "missing column {col}: {got}");
    }
    assert!(got.contains("small") && got.contains("alice"), "{got}");
    let short = k.run(&["get", "wdg", "small"]).await;
    assert!(short.contains("small") && short.contains('3'), "{short}");
    let explain = k.run(&["explain", "widget.spec"]).await;
    assert!(
        explain.contains("size") && explain.contains("How big the widget is"),
        "{explain}"
    );
    let explain = k.run(&["explain", "wdg"]).await;
    assert!(
        explain.contains("Widget is a thing with a size"),
        "{explain}"
    );

    // Out-of-range integer: the apiserver's usual message.
    let bad = k
        .try_run(&["apply", "-f", &fixture("widget-too-big.yaml")])
        .await;
    assert!(!bad.ok);
    assert!(
        bad.stderr.contains("The Widget \"huge\" is invalid: spec.size: Invalid value: 5000: spec.size in body should be less than or equal to 10"),
        "{}",
        bad.stderr
    );
    // Immutable field (CEL transition rule).
    let bad = k
        .try_run(&[
            "patch",
            "widget",
            "small",
            "--type=merge",
            "-p",
            r#"{"spec":{"owner":"mallory"}}"#,
        ])
        .await;
    assert!(
        !bad.ok && bad.stderr.contains("owner is immutable"),
        "{}",
        bad.stderr
    );
    // Unknown fields are rejected under kubectl's default strict validation.
    let unknown = k.home.path().join("unknown.yaml");
    std::fs::write(&unknown, "apiVersion: example.com/v1\nkind: Widget\nmetadata:\n  name: odd\nspec:\n  size: 2\n  owner: x\n  colour: red\n").expect("write");
    let bad = k
        .try_run(&["apply", "-f", &unknown.display().to_string()])
        .await;
    assert!(
        !bad.ok && bad.stderr.contains("unknown field \"spec.colour\""),
        "{}",
        bad.stderr
    );

    // A finalizer keeps the object Terminating until it is removed.
    k.run(&[
        "patch",
        "widget",
        "small",
        "--type=merge",
        "-p",
        r#"{"metadata":{"finalizers":["example.com/keep"]}}"#,
    ])
    .await;
    k.run(&["delete", "widget", "small", "--wait=false"]).await;
    let w = k.json(&["get", "widget", "small"]).await;
    assert!(w["metadata"]["deletionTimestamp"].is_string(), "{w}");
    k.run(&[
        "patch",
        "widget",
        "small",
        "--type=json",
        "-p",
        r#"[{"op":"remove","path":"/metadata/finalizers"}]"#,
    ])
    .await;
    let gone = k.try_run(&["get", "widget", "small"]).await;
    assert!(
        !gone.ok && gone.stderr.contains("not found"),
        "{}",
        gone.stderr
    );
}
