//! The official Python client (PyPI `kubernetes`) lists and watches pods against kubesim.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on setup failures

mod common;

use std::path::Path;

use common::{STATEFULSET, Transport, eventually, sim};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::{ListParams, PostParams};

/// The interpreter to use: `KUBESIM_PYTHON`, else `.venv/bin/python` at the workspace root
/// (what `make test` prepares), else `python3`.
fn python() -> String {
    if let Ok(p) = std::env::var("KUBESIM_PYTHON") {
        return p;
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/python");
    if venv.exists() {
        return venv.display().to_string();
    }
    "python3".into()
}

#[tokio::test]
async fn python_client_lists_and_watches_pods() {
    let py = python();
    let has_client = std::process::Command::new(&py)
        .args(["-c", "import kubernetes"])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        has_client,
        "{py} cannot import the `kubernetes` package: run `make test` (it installs it into .venv) \
         or `pip install kubernetes`, or point KUBESIM_PYTHON at an interpreter that has it"
    );
    let (sim, client) = sim(Transport::Loopback).await;
    let sets: Api<StatefulSet> = Api::namespaced(client.clone(), "default");
    sets.create(
        &PostParams::default(),
        &serde_json::from_str(STATEFULSET).expect("sts"),
    )
    .await
    .expect("create");
    let pods: Api<Pod> = Api::namespaced(client, "default");
    eventually(10, "3 pods", || {
        let pods = pods.clone();
        async move { (pods.list(&ListParams::default()).await.ok()?.items.len() == 3).then_some(()) }
    })
    .await;
    let dir = std::env::temp_dir().join(format!("kubesim-py-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let kubeconfig = dir.join("kubeconfig");
    sim.write_kubeconfig(&kubeconfig).expect("kubeconfig");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/list_watch.py");
    let out = tokio::time::timeout(
        std::time::Duration::from_secs(60),
        tokio::process::Command::new(&py)
            .arg(&script)
            .arg(&kubeconfig)
            .arg("3")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("python finished in time")
    .expect("run python");
    let _ = std::fs::remove_dir_all(&dir);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "python client failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("listed ['db-0', 'db-1', 'db-2']"),
        "{stdout}"
    );
    assert!(
        stdout.contains("watched ['db-0', 'db-1', 'db-2']"),
        "{stdout}"
    );
}
