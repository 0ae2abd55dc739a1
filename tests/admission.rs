//! The role label guarded at admission (`deploy/admission`, a ValidatingAdmissionPolicy) on a
//! real apiserver: with the policy applied as a user applies it, the operator — authenticated as
//! its ServiceAccount from `deploy/rbac` — elects and labels as usual, while a user who may patch
//! pods is refused setting, changing or removing the role label or the epoch annotation (and
//! may still change other labels).
//!
//! Needs the real control plane (`loadtest/controlplane`, built from source on first use).
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: panics are failures

use std::time::Duration;

use controlplane::{ControlPlane, Options, repo_path};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, ResourceExt};
use serde_json::{Value, json};
use stslock::config::OperatorArgs;

mod common;
use common::{Kubectl, call, db_and_lock, poll};

const NS: &str = "guarded";

/// A Role that may read and patch pods in [`NS`], bound to user `user`.
async fn pod_patcher(admin: &Client, user: &str) {
    let roles: Api<Role> = Api::namespaced(admin.clone(), NS);
    let bindings: Api<RoleBinding> = Api::namespaced(admin.clone(), NS);
    call(
        "create Role",
        roles.create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": "pod-patcher"},
                "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "patch", "update"]}]
            }))
            .unwrap(),
        ),
    )
    .await
    .unwrap();
    call(
        "create RoleBinding",
        bindings.create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": format!("{user}-patches-pods")},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "pod-patcher"},
                "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}]
            }))
            .unwrap(),
        ),
    )
    .await
    .unwrap();
}

/// A client acting as user `name` (the admin impersonating it: RBAC and admission see `name`).
async fn client_as(cp: &ControlPlane, name: &str) -> Client {
    let kubeconfig = Kubeconfig::read_from(&cp.kubeconfig_path).unwrap();
    let mut config =
        kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
            .await
            .unwrap();
    config.auth_info.impersonate = Some(name.to_string());
    Client::try_from(config).unwrap()
}

/// The pods of `db` by role label.
async fn roles(pods: &Api<Pod>) -> Vec<(String, Option<String>)> {
    let list = call(
        "list pods",
        pods.list(&ListParams::default().labels("app=db")),
    )
    .await
    .unwrap();
    let mut out: Vec<_> = list
        .items
        .iter()
        .map(|p| (p.name_any(), p.labels().get("sts-role").cloned()))
        .collect();
    out.sort();
    out
}

/// Patch pod `name`'s metadata as `client`; the refusal's message, if refused.
async fn patch_meta(client: &Client, name: &str, meta: Value) -> Result<(), String> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    match call(
        "patch a pod",
        pods.patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": meta})),
        ),
    )
    .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) => Err(format!("{} {}", e.code, e.message)),
        Err(e) => panic!("patch {name}: {e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_operator_may_write_the_role_label() {
    let cp = ControlPlane::start(Options::default())
        .await
        .expect("control plane");
    let admin = cp.admin_client().await.unwrap();
    stslock::dev::install_crd(&admin).await.expect("crd");
    // The policy, applied as the README says.
    Kubectl::admin_of(&cp)
        .run(&["apply", "-k", "deploy/admission"])
        .await;
    // A user who may read and patch pods in the namespace, nothing else.
    let namespaces: Api<Namespace> = Api::all(admin.clone());
    call(
        "create namespace",
        namespaces.create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": NS}})).unwrap(),
        ),
    )
    .await
    .unwrap();
    pod_patcher(&admin, "alice").await;
    // The operator as its ServiceAccount, exactly deploy/rbac.
    let identity = cp
        .install_operator_identity(
            &repo_path("deploy/rbac"),
            "stslock/admission",
            Duration::from_secs(3600),
        )
        .await
        .expect("operator identity");
    let operator_client = identity.client().await.unwrap();
    // Policy and RBAC reach admission and the authorizer through informers: wait until alice's
    // dry-run attempt on a probe pod gets past RBAC and is refused by the policy.
    let pods: Api<Pod> = Api::namespaced(admin.clone(), NS);
    call(
        "create the probe pod",
        pods.create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": "probe", "labels": {"app": "probe"}},
                "spec": {"containers": [{"name": "c", "image": "registry.invalid/x:1"}]}
            }))
            .unwrap(),
        ),
    )
    .await
    .unwrap();
    let alice = client_as(&cp, "alice").await;
    let as_alice: Api<Pod> = Api::namespaced(alice.clone(), NS);
    poll(30, "the policy in force for alice", || {
        let as_alice = as_alice.clone();
        Box::pin(async move {
            let refused = as_alice
                .patch(
                    "probe",
                    &PatchParams::default().dry_run(),
                    &Patch::Merge(json!({"metadata": {"labels": {"sts-role": "writer"}}})),
                )
                .await;
            matches!(refused, Err(kube::Error::Api(e)) if e.message.contains("stslock-role-label-guard"))
                .then_some(())
        })
    })
    .await;
    let mut args = OperatorArgs::for_shard("admission");
    args.namespace = Some("stslock-system".into());
    args.api_timeout_seconds = 3;
    args.metrics_addr = "127.0.0.1:0".parse().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let operator = tokio::spawn(stslock::replica::run_with(
        operator_client,
        args,
        async {
            let _ = stopped.await;
        },
        stslock::replica::RunOptions::default(),
    ));
    db_and_lock(&admin, NS, 2).await;
    // The operator's label writes pass the policy: it elects and labels both pods.
    let elected = vec![
        ("db-0".to_string(), Some("writer".to_string())),
        ("db-1".to_string(), Some("reader".to_string())),
    ];
    poll(
        60,
        "db-0 writer and db-1 reader, labelled by the operator",
        || {
            let (pods, elected) = (pods.clone(), elected.clone());
            Box::pin(async move { (roles(&pods).await == elected).then_some(()) })
        },
    )
    .await;

    // She may patch pods...
    patch_meta(&alice, "db-0", json!({"labels": {"team": "storage"}}))
        .await
        .expect("alice may change other labels");
    // ...but not the role label: not a second writer, not a demotion, not a removal...
    for (pod, meta) in [
        ("db-1", json!({"labels": {"sts-role": "writer"}})),
        ("db-0", json!({"labels": {"sts-role": "reader"}})),
        ("db-0", json!({"labels": {"sts-role": null}})),
        // ...nor the epoch annotation.
        (
            "db-0",
            json!({"annotations": {"app.anukkrit.me/writer-epoch": "7"}}),
        ),
        (
            "db-1",
            json!({"annotations": {"app.anukkrit.me/writer-epoch": "0"}}),
        ),
    ] {
        let refused = patch_meta(&alice, pod, meta.clone())
            .await
            .expect_err(&format!("alice may not patch {pod} with {meta}"));
        assert!(
            refused.contains("only the stslock operator may set, change or remove")
                && refused.contains("stslock-role-label-guard"),
            "refusal of {meta} on {pod}: {refused}"
        );
    }
    assert_eq!(roles(&pods).await, elected, "the roles are untouched");
    let db0 = call("get db-0", pods.get("db-0")).await.unwrap();
    assert_eq!(
        db0.annotations()
            .get("app.anukkrit.me/writer-epoch")
            .map(String::as_str),
        Some("0")
    );
    assert_eq!(
        db0.labels().get("team").map(String::as_str),
        Some("storage")
    );

    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), operator).await;
    cp.stop().await.unwrap();
}
