//! The launcher against the real binaries (built by `build.sh`, or reused): kubectl 1.33 and
//! a kube-rs client drive kube-apiserver 1.34; the StatefulSet controller and the pod-lifecycle
//! stand-in make the seed's sample StatefulSet Ready; the operator's ServiceAccount gets exactly
//! `deploy/rbac/`, which the real authorizer enforces, and the audit log records it.
//!
//! Slow the first time (the cold Go build); `make test-real` runs it.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use controlplane::{CALL_TIMEOUT, ControlPlane, Options, PodLifecycleOptions, repo_path, timed};
use k8s_openapi::api::admissionregistration::v1::{
    ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding,
};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod};
use kube::Api;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use serde_json::json;

const NS: &str = "stslock-real";
const OPERATOR_UA: &str = "stslock-controlplane-test/1";

async fn kubectl(kubeconfig: &Path, args: &[&str]) -> Result<String> {
    let bin = controlplane::kubectl()?;
    let mut cmd = tokio::process::Command::new(&bin);
    cmd.arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(90), cmd.output())
        .await
        .with_context(|| format!("kubectl {args:?} timed out"))?
        .with_context(|| format!("running {}", bin.display()))?;
    ensure!(
        out.status.success(),
        "kubectl {args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Polls `check` until it returns `Some`, or fails after `limit` with the last observation.
async fn eventually<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>, String>>,
{
    let deadline = Instant::now() + limit;
    loop {
        let last = match check().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => "not yet".to_string(),
            Err(e) => e,
        };
        if Instant::now() > deadline {
            bail!("{what}: not within {limit:?} (last: {last})");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn ready_condition(pod: &Pod) -> Option<String> {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
        .map(|c| c.status.clone())
}

async fn ready_pods(pods: &Api<Pod>) -> Result<Option<Vec<Pod>>, String> {
    let list = timed(
        "list pods",
        CALL_TIMEOUT,
        pods.list(&ListParams::default().labels("app=postgres")),
    )
    .await
    .map_err(|e| format!("{e:#}"))?;
    let ready: Vec<Pod> = list.items.into_iter().filter(is_ready).collect();
    Ok((ready.len() == 3).then_some(ready))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statefulset_pods_become_ready_and_the_operator_gets_exactly_its_rbac() -> Result<()> {
    let script = controlplane::binaries::build_script();
    if !script.is_file() {
        eprintln!(
            "SKIPPED: {} is absent, so there is no real control plane to test",
            script.display()
        );
        return Ok(());
    }
    let started = Instant::now();
    let ready_after = Duration::from_millis(300);
    let cp = ControlPlane::start(Options {
        max_lifetime: Duration::from_secs(900),
        pod_lifecycle: Some(PodLifecycleOptions {
            nodes: 2,
            ready_after,
            ..PodLifecycleOptions::default()
        }),
        ..Options::default()
    })
    .await?;
    eprintln!(
        "control plane up after {:.1} s at {}",
        started.elapsed().as_secs_f64(),
        cp.server
    );
    let kc = cp.kubeconfig_path.clone();

    // kubectl 1.33 against apiserver 1.34 with the admin kubeconfig.
    let readyz = kubectl(&kc, &["get", "--raw", "/readyz"]).await?;
    assert_eq!(readyz.trim(), "ok");
    let version = kubectl(&kc, &["version", "-o", "json"]).await?;
    assert!(
        version.contains("\"gitVersion\": \"v1.34."),
        "server version: {version}"
    );

    // The CRD and the seed's samples, as a person would apply them.
    let crd = repo_path("deploy/crd/app.anukkrit.me_statefulsetlocks.yaml");
    kubectl(&kc, &["apply", "-f", &crd.display().to_string()]).await?;
    kubectl(
        &kc,
        &[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/statefulsetlocks.app.anukkrit.me",
        ],
    )
    .await?;
    kubectl(&kc, &["create", "namespace", NS]).await?;
    for sample in [
        "postgres-services.yaml",
        "postgres-statefulset.yaml",
        "app_v1_statefulsetlock.yaml",
    ] {
        let path = repo_path("deploy/samples").join(sample);
        kubectl(&kc, &["-n", NS, "apply", "-f", &path.display().to_string()]).await?;
    }

    // The StatefulSet controller creates the pods (once the serviceaccount controller made
    // `default` in the new namespace); the stand-in binds them and makes them Ready.
    let admin = cp.admin_client().await?;
    let pods: Api<Pod> = Api::namespaced(admin.clone(), NS);
    let ready = eventually("3 postgres pods Ready", Duration::from_secs(120), || {
        ready_pods(&pods)
    })
    .await?;
    let mut names: Vec<_> = ready
        .iter()
        .filter_map(|p| p.metadata.name.clone())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "postgres-cluster-0",
            "postgres-cluster-1",
            "postgres-cluster-2"
        ]
    );
    let sts: Api<StatefulSet> = Api::namespaced(admin.clone(), NS);
    eventually(
        "StatefulSet readyReplicas 3",
        Duration::from_secs(60),
        || async {
            let s = timed("get sts", CALL_TIMEOUT, sts.get("postgres-cluster"))
                .await
                .map_err(|e| format!("{e:#}"))?;
            Ok((s.status.and_then(|s| s.ready_replicas) == Some(3)).then_some(()))
        },
    )
    .await?;

    // A readiness change made through pods/status stays: the stand-in never undoes it.
    let not_ready = json!({ "status": { "conditions": [ { "type": "Ready", "status": "False", "reason": "Test" } ] } });
    timed(
        "set postgres-cluster-0 not Ready",
        CALL_TIMEOUT,
        pods.patch_status(
            "postgres-cluster-0",
            &PatchParams::default(),
            &Patch::Strategic(&not_ready),
        ),
    )
    .await?;
    // Absence of a change can only be watched for a while: many times the stand-in's delay.
    tokio::time::sleep(ready_after * 10).await;
    let p0 = timed(
        "get postgres-cluster-0",
        CALL_TIMEOUT,
        pods.get("postgres-cluster-0"),
    )
    .await?;
    assert_eq!(
        ready_condition(&p0).as_deref(),
        Some("False"),
        "the stand-in overwrote a test's readiness"
    );

    // Graceful deletion: the stand-in finalizes the pod; the controller recreates it; Ready again.
    let old_uid = p0.metadata.uid.clone();
    timed(
        "delete postgres-cluster-0",
        CALL_TIMEOUT,
        pods.delete("postgres-cluster-0", &DeleteParams::default()),
    )
    .await?;
    eventually(
        "postgres-cluster-0 recreated and Ready",
        Duration::from_secs(60),
        || async {
            let p = timed(
                "get postgres-cluster-0",
                CALL_TIMEOUT,
                pods.get_opt("postgres-cluster-0"),
            )
            .await
            .map_err(|e| format!("{e:#}"))?;
            Ok(p.filter(|p| p.metadata.uid != old_uid && is_ready(p))
                .map(|_| ()))
        },
    )
    .await?;

    // The operator: its own ServiceAccount, exactly deploy/rbac, a TokenRequest token over TLS.
    let operator = cp
        .install_operator_identity(
            &repo_path("deploy/rbac"),
            OPERATOR_UA,
            Duration::from_secs(3600),
        )
        .await?;
    assert_eq!(
        operator.username,
        "system:serviceaccount:stslock-system:stslock"
    );
    let whoami = kubectl(
        &operator.kubeconfig_path,
        &[
            "auth",
            "whoami",
            "-o",
            "jsonpath={.status.userInfo.username}",
        ],
    )
    .await?;
    assert_eq!(whoami.trim(), operator.username);
    let op = operator.client().await?;
    let op_pods: Api<Pod> = Api::namespaced(op.clone(), NS);
    let listed = timed(
        "operator lists pods",
        CALL_TIMEOUT,
        op_pods.list(&ListParams::default()),
    )
    .await?;
    assert_eq!(listed.items.len(), 3);
    // Allowed write (pods: patch), so the audit log has an allowed entry of it too.
    let label = json!({ "metadata": { "labels": { "controlplane-test": "seen" } } });
    timed(
        "operator labels a pod",
        CALL_TIMEOUT,
        op_pods.patch(
            "postgres-cluster-1",
            &PatchParams::default(),
            &Patch::Merge(&label),
        ),
    )
    .await?;
    // Denied: deleting a namespace is nowhere in deploy/rbac.
    let op_namespaces: Api<Namespace> = Api::all(op.clone());
    let denied = tokio::time::timeout(
        CALL_TIMEOUT,
        op_namespaces.delete(NS, &DeleteParams::default()),
    )
    .await
    .context("operator deletes a namespace: timed out")?;
    match denied {
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 403, "{status:?}");
            assert!(
                status
                    .message
                    .contains("system:serviceaccount:stslock-system:stslock"),
                "{}",
                status.message
            );
        }
        other => panic!("deleting a namespace as the operator must be forbidden, got {other:?}"),
    }
    let ns_still_there = timed(
        "get namespace",
        CALL_TIMEOUT,
        Api::<Namespace>::all(admin.clone()).get_opt(NS),
    )
    .await?;
    assert!(ns_still_there.is_some_and(|n| n.metadata.deletion_timestamp.is_none()));

    // The audit log (written by the apiserver, not by us) names the SA and its User-Agent.
    let audit = cp.audit_log_path.clone();
    let (allowed, forbidden) = eventually(
        "audit entries of the operator",
        Duration::from_secs(30),
        || async {
            let text = std::fs::read_to_string(&audit).map_err(|e| e.to_string())?;
            let mut allowed = None;
            let mut forbidden = None;
            for line in text.lines() {
                let Ok(e) = serde_json::from_str::<serde_json::Value>(line) else {
                    continue;
                };
                if e["user"]["username"] != operator.username.as_str()
                    || e["userAgent"] != OPERATOR_UA
                {
                    continue;
                }
                let code = e["responseStatus"]["code"].as_i64();
                match (
                    e["verb"].as_str(),
                    e["objectRef"]["resource"].as_str(),
                    code,
                ) {
                    (Some("patch"), Some("pods"), Some(200)) => allowed = Some(e.clone()),
                    (Some("delete"), Some("namespaces"), Some(403)) => forbidden = Some(e.clone()),
                    _ => {}
                }
            }
            Ok(allowed.zip(forbidden))
        },
    )
    .await?;
    // The operator's pod writes are kept with their answers: the committed resourceVersion
    // orders them among the lock's versions (the owner check of tests/common).
    assert_eq!(allowed["level"], "RequestResponse");
    assert!(
        allowed["responseObject"]["metadata"]["resourceVersion"]
            .as_str()
            .is_some_and(|rv| rv.parse::<u64>().is_ok()),
        "the answer's resourceVersion: {}",
        allowed["responseObject"]["metadata"]
    );
    assert_eq!(forbidden["objectRef"]["name"], NS);
    assert!(
        forbidden["annotations"]["authorization.k8s.io/decision"] == "forbid",
        "annotations: {}",
        forbidden["annotations"]
    );

    admission_is_enforced(&admin).await?;

    cp.stop().await?;
    eprintln!("whole test {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// PodSecurity and ValidatingAdmissionPolicy are on: a `restricted` namespace rejects the
/// sample's pod template, and a policy's CEL rule rejects a ConfigMap.
async fn admission_is_enforced(admin: &kube::Client) -> Result<()> {
    let namespaces: Api<Namespace> = Api::all(admin.clone());
    let restricted: Namespace = serde_json::from_value(json!({
        "metadata": { "name": "restricted", "labels": { "pod-security.kubernetes.io/enforce": "restricted" } }
    }))?;
    timed(
        "create namespace restricted",
        CALL_TIMEOUT,
        namespaces.create(&Default::default(), &restricted),
    )
    .await?;
    let pod: Pod = serde_json::from_value(json!({
        "metadata": { "name": "postgres" },
        "spec": { "containers": [ { "name": "postgres", "image": "postgres:15" } ] }
    }))?;
    let pods: Api<Pod> = Api::namespaced(admin.clone(), "restricted");
    match tokio::time::timeout(CALL_TIMEOUT, pods.create(&Default::default(), &pod)).await? {
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 403, "{status:?}");
            assert!(
                status
                    .message
                    .contains("violates PodSecurity \"restricted:latest\""),
                "{}",
                status.message
            );
        }
        other => panic!("PodSecurity admitted a non-restricted pod: {other:?}"),
    }

    let policy: ValidatingAdmissionPolicy = serde_json::from_value(json!({
        "metadata": { "name": "no-forbidden-configmaps" },
        "spec": {
            "failurePolicy": "Fail",
            "matchConstraints": { "resourceRules": [ {
                "apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"], "resources": ["configmaps"]
            } ] },
            "validations": [ { "expression": "object.metadata.name != 'forbidden'", "message": "no forbidden ConfigMaps" } ]
        }
    }))?;
    let binding: ValidatingAdmissionPolicyBinding = serde_json::from_value(json!({
        "metadata": { "name": "no-forbidden-configmaps" },
        "spec": { "policyName": "no-forbidden-configmaps", "validationActions": ["Deny"] }
    }))?;
    let policies: Api<ValidatingAdmissionPolicy> = Api::all(admin.clone());
    let bindings: Api<ValidatingAdmissionPolicyBinding> = Api::all(admin.clone());
    timed(
        "create policy",
        CALL_TIMEOUT,
        policies.create(&Default::default(), &policy),
    )
    .await?;
    timed(
        "create binding",
        CALL_TIMEOUT,
        bindings.create(&Default::default(), &binding),
    )
    .await?;
    let configmaps: Api<ConfigMap> = Api::namespaced(admin.clone(), "restricted");
    let forbidden: ConfigMap =
        serde_json::from_value(json!({ "metadata": { "name": "forbidden" } }))?;
    // The apiserver compiles a new policy asynchronously; until then the create succeeds.
    eventually("the policy denies", Duration::from_secs(30), || async {
        match tokio::time::timeout(
            CALL_TIMEOUT,
            configmaps.create(&Default::default(), &forbidden),
        )
        .await
        {
            Err(_) => Err("timed out".to_string()),
            Ok(Err(kube::Error::Api(status)))
                if status.code == 422 && status.message.contains("no forbidden ConfigMaps") =>
            {
                Ok(Some(()))
            }
            Ok(Err(e)) => Err(format!("{e}")),
            Ok(Ok(_)) => {
                let params = DeleteParams::default();
                let gone = configmaps.delete("forbidden", &params);
                tokio::time::timeout(CALL_TIMEOUT, gone)
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| e.to_string())?;
                Ok(None)
            }
        }
    })
    .await
}
