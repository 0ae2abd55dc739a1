//! The shipped installer on a real apiserver with the restricted Pod Security Standard enforced
//! on `stslock-system` (the namespace in `dist/install.yaml` carries the label): a server-side
//! dry run of the whole file passes without a Pod Security warning, the StatefulSet controller
//! creates the operator's pods under enforcement, and a pod that breaks the standard is
//! refused there (enforcement is on, not merely labelled).
//!
//! Needs the real control plane (`loadtest/controlplane`, built from source on first use).
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: panics are failures

use std::path::Path;

use controlplane::{ControlPlane, Options, repo_path};
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::PostParams;
use serde_json::json;

mod common;
use common::{Kubectl, call, poll};

/// The documents of `dist/install.yaml` of kind `kind`, as one YAML stream in a file.
fn documents_of_kind(dir: &Path, kind: &str) -> String {
    let all = std::fs::read_to_string(repo_path("dist/install.yaml")).unwrap();
    let docs: Vec<&str> = all
        .split("\n---\n")
        .filter(|d| d.lines().any(|l| l == format!("kind: {kind}")))
        .collect();
    assert!(!docs.is_empty(), "no {kind} in dist/install.yaml");
    let path = dir.join(format!("{kind}.yaml"));
    std::fs::write(&path, docs.join("\n---\n")).unwrap();
    path.to_string_lossy().into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_installer_passes_the_restricted_pod_security_standard() {
    let cp = ControlPlane::start(Options::default())
        .await
        .expect("control plane");
    let k = Kubectl::admin_of(&cp);
    let dir = std::env::temp_dir().join(format!("stslock-hardening-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    // The namespace first, as the installer declares it (with the enforce label): a dry run
    // cannot create it for the objects inside.
    let ns = documents_of_kind(&dir, "Namespace");
    let (ok, _, err) = k.try_run(&["apply", "-f", &ns]).await;
    assert!(ok, "{err}");
    let (ok, out, err) = k
        .try_run(&["apply", "--dry-run=server", "-f", "dist/install.yaml"])
        .await;
    assert!(ok, "dry run of dist/install.yaml: {out}\n{err}");
    assert!(
        !err.contains("PodSecurity"),
        "dist/install.yaml would violate the restricted standard:\n{err}"
    );
    assert!(out.contains("statefulset.apps/stslock"), "{out}");

    // Enforcement is on: a pod that breaks the standard is refused in the namespace.
    let admin = cp.admin_client().await.unwrap();
    let pods: Api<Pod> = Api::namespaced(admin.clone(), "stslock-system");
    // (No security context at all: fine for the baseline standard, not for restricted.)
    let unrestricted: Pod = serde_json::from_value(json!({
        "metadata": {"name": "unrestricted"},
        "spec": {"containers": [{"name": "c", "image": "registry.invalid/x:1"}]}
    }))
    .unwrap();
    let dry = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    match call(
        "dry-run an unrestricted pod",
        pods.create(&dry, &unrestricted),
    )
    .await
    {
        Err(kube::Error::Api(e)) => assert!(
            e.code == 403
                && e.message
                    .contains("violates PodSecurity \"restricted:latest\""),
            "{e:?}"
        ),
        other => panic!("a pod breaking the standard was not refused: {other:?}"),
    }

    // For real: the StatefulSet controller creates the operator's pods under enforcement.
    let (ok, _, err) = k.try_run(&["apply", "-f", "dist/install.yaml"]).await;
    assert!(ok, "{err}");
    poll(
        60,
        "pod stslock-0 created by the StatefulSet controller",
        || {
            let pods = pods.clone();
            Box::pin(async move { pods.get_opt("stslock-0").await.ok().flatten().map(|_| ()) })
        },
    )
    .await;
    cp.stop().await.unwrap();
}
