//! The Helm chart (`deploy/helm/stslock`) with Helm itself (built from the Go module proxy by
//! `loadtest/tools/tool.sh helm`, cached, or `$HELM`): it lints; with default values it renders exactly
//! the objects of `kubectl kustomize deploy/default` (and, with `observability.enabled`, those of
//! `deploy/observability` too); values reach the objects; the rendering passes a server-side dry
//! run on the real control plane with the restricted Pod Security Standard enforced.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: panics are failures

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;

use controlplane::{ControlPlane, Options, repo_path};
use serde_json::{Value, json};

mod common;
use common::Kubectl;

const CHART: &str = "deploy/helm/stslock";

fn helm() -> PathBuf {
    common::built_tool("HELM", "loadtest/tools/tool.sh", &["helm"])
}

/// Run `bin args…` in the repository; its stdout, or a failure with both streams.
fn run(bin: &std::path::Path, args: &[&str]) -> String {
    let out = Command::new(bin)
        .args(args)
        .current_dir(repo_path("."))
        .env(
            "HELM_CACHE_HOME",
            std::env::temp_dir().join("stslock-helm-cache"),
        )
        .env(
            "HELM_CONFIG_HOME",
            std::env::temp_dir().join("stslock-helm-config"),
        )
        .env(
            "HELM_DATA_HOME",
            std::env::temp_dir().join("stslock-helm-data"),
        )
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e}", bin.display()));
    assert!(
        out.status.success(),
        "{} {args:?}:\n{}\n{}",
        bin.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `v` with every whole number written the same way (`3600.0` in a file helm passes through as
/// is, `3600` once kustomize has re-encoded it).
fn canon(v: Value) -> Value {
    match v {
        Value::Number(n) => match n.as_f64() {
            Some(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => json!(f as i64),
            _ => Value::Number(n),
        },
        Value::Array(a) => Value::Array(a.into_iter().map(canon).collect()),
        Value::Object(o) => Value::Object(o.into_iter().map(|(k, v)| (k, canon(v))).collect()),
        other => other,
    }
}

/// The objects of a YAML stream, by "kind namespace/name".
fn objects(yaml: &str) -> BTreeMap<String, Value> {
    serde_saphyr::from_str_multiple::<Value, Vec<Value>>(yaml)
        .expect("a YAML stream")
        .into_iter()
        .filter(|o| !o.is_null())
        .map(|o| {
            let key = format!(
                "{} {}/{}",
                o["kind"].as_str().unwrap_or(""),
                o["metadata"]["namespace"].as_str().unwrap_or(""),
                o["metadata"]["name"].as_str().unwrap_or("")
            );
            (key, canon(o))
        })
        .collect()
}

fn kubectl() -> PathBuf {
    PathBuf::from(std::env::var("KUBECTL").unwrap_or_else(|_| "kubectl".into()))
}

fn template(helm: &std::path::Path, set: &[&str]) -> String {
    let mut args = vec!["template", "stslock", CHART, "--include-crds"];
    for s in set {
        args.extend(["--set", s]);
    }
    run(helm, &args)
}

fn env_of(objects: &BTreeMap<String, Value>) -> BTreeMap<String, Value> {
    objects["StatefulSet stslock-system/stslock"]["spec"]["template"]["spec"]["containers"][0]
        ["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["name"].as_str().unwrap().to_string(),
                e.get("value").cloned().unwrap_or(Value::Null),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chart_lints_matches_kustomize_and_dry_runs_on_the_api_server() {
    let helm = helm();
    let lint = run(&helm, &["lint", CHART]);
    assert!(
        lint.contains("1 chart(s) linted, 0 chart(s) failed"),
        "{lint}"
    );

    // The chart's copies of the CRD and the observability files are the shipped ones.
    for (copy, original) in [
        (
            "deploy/helm/stslock/crds/app.anukkrit.me_statefulsetlocks.yaml",
            "deploy/crd/app.anukkrit.me_statefulsetlocks.yaml",
        ),
        (
            "deploy/helm/stslock/files/prometheusrule.yaml",
            "deploy/observability/prometheusrule.yaml",
        ),
        (
            "deploy/helm/stslock/files/grafana-dashboard.json",
            "deploy/observability/grafana-dashboard.json",
        ),
    ] {
        assert_eq!(
            std::fs::read(repo_path(copy)).unwrap(),
            std::fs::read(repo_path(original)).unwrap(),
            "{copy} differs from {original} (make manifests copies it)"
        );
    }

    // Default values: exactly kustomize's objects.
    let rendered = template(&helm, &[]);
    let chart = objects(&rendered);
    let kustomized = objects(&run(&kubectl(), &["kustomize", "deploy/default"]));
    assert_eq!(
        chart.keys().collect::<Vec<_>>(),
        kustomized.keys().collect::<Vec<_>>()
    );
    for (key, object) in &kustomized {
        assert_eq!(
            &chart[key], object,
            "{key}: chart (left) and kustomize (right) differ"
        );
    }

    // observability.enabled adds exactly deploy/observability's objects.
    let with = objects(&template(&helm, &["observability.enabled=true"]));
    let observability = objects(&run(&kubectl(), &["kustomize", "deploy/observability"]));
    assert_eq!(with.len(), chart.len() + observability.len());
    for (key, object) in &observability {
        assert_eq!(
            with.get(key),
            Some(object),
            "{key}: chart and kustomize differ"
        );
    }

    // Values reach the objects.
    let custom = objects(&template(
        &helm,
        &[
            "replicas=5",
            "namespace.create=false",
            "image.tag=1.2.3",
            "operator.namespaces={a,b}",
            "operator.goMetrics=true",
            "operator.concurrency=32",
            "operator.membershipNamespace=ops",
            "operator.roleLabel=db-role",
            "operator.otlpEndpoint=http://collector:4317",
            "podDisruptionBudget.enabled=false",
            "networkPolicy.enabled=false",
        ],
    ));
    let sts = &custom["StatefulSet stslock-system/stslock"];
    assert_eq!(sts["spec"]["replicas"], 5);
    assert_eq!(
        sts["spec"]["template"]["spec"]["containers"][0]["image"],
        "ghcr.io/stslock/stslock:1.2.3"
    );
    assert!(!custom.contains_key("Namespace /stslock-system"));
    assert!(!custom.contains_key("PodDisruptionBudget stslock-system/stslock"));
    assert!(!custom.contains_key("NetworkPolicy stslock-system/stslock"));
    let env = env_of(&custom);
    assert_eq!(env["STSLOCK_NAMESPACES"], json!("a,b"));
    assert_eq!(env["STSLOCK_GO_METRICS"], json!("true"));
    assert_eq!(env["STSLOCK_CONCURRENCY"], json!("32"));
    assert_eq!(env["STSLOCK_NAMESPACE"], json!("ops"));
    assert_eq!(env["STSLOCK_ROLE_LABEL"], json!("db-role"));
    assert_eq!(
        env["OTEL_EXPORTER_OTLP_ENDPOINT"],
        json!("http://collector:4317")
    );
    assert!(!env_of(&chart).contains_key("STSLOCK_CONCURRENCY"));

    // A server-side dry run on the real apiserver, with the restricted Pod Security Standard
    // enforced on the chart's namespace (created first, as the chart declares it: a dry run
    // cannot create it for the objects inside).
    let cp = ControlPlane::start(Options::default())
        .await
        .expect("control plane");
    let k = Kubectl::admin_of(&cp);
    let dir = std::env::temp_dir().join(format!("stslock-helm-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let all = dir.join("chart.yaml");
    std::fs::write(&all, &rendered).unwrap();
    let ns = dir.join("namespace.yaml");
    std::fs::write(
        &ns,
        serde_json::to_vec(&chart["Namespace /stslock-system"]).unwrap(),
    )
    .unwrap();
    let (ok, _, err) = k.try_run(&["apply", "-f", ns.to_str().unwrap()]).await;
    assert!(ok, "{err}");
    let (ok, out, err) = k
        .try_run(&["apply", "--dry-run=server", "-f", all.to_str().unwrap()])
        .await;
    assert!(ok, "dry run of the chart: {out}\n{err}");
    assert!(!err.contains("PodSecurity"), "{err}");
    for want in [
        "customresourcedefinition.apiextensions.k8s.io/statefulsetlocks.app.anukkrit.me",
        "statefulset.apps/stslock",
        "clusterrole.rbac.authorization.k8s.io/stslock-manager",
        "poddisruptionbudget.policy/stslock",
        "networkpolicy.networking.k8s.io/stslock",
    ] {
        assert!(out.contains(want), "{want} not in:\n{out}");
    }
    std::fs::remove_dir_all(dir).ok();
}
