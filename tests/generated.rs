//! Generated artifacts match their sources: the CRD in deploy/crd/ is what `stslock crd`
//! prints, and dist/install.yaml is what `make build-installer` builds.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on setup failures

use std::path::Path;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn crd_yaml_matches_the_types() {
    let generated = stslock::api::crd_yaml().expect("render CRD");
    let committed =
        std::fs::read_to_string(root().join("deploy/crd/app.anukkrit.me_statefulsetlocks.yaml"))
            .expect("read deploy/crd");
    assert!(
        generated == committed,
        "deploy/crd/app.anukkrit.me_statefulsetlocks.yaml is stale: run `make manifests`"
    );
}

#[test]
fn install_yaml_matches_kustomize() {
    let out =
        std::process::Command::new(std::env::var("KUBECTL").unwrap_or_else(|_| "kubectl".into()))
            .args(["kustomize", "deploy/default"])
            .current_dir(root())
            .output()
            .expect("kubectl kustomize (kubectl is required to build dist/install.yaml)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let built = String::from_utf8_lossy(&out.stdout).into_owned();
    let committed =
        std::fs::read_to_string(root().join("dist/install.yaml")).expect("read dist/install.yaml");
    assert!(
        built == committed,
        "dist/install.yaml is stale: run `make build-installer`"
    );
    // The installer carries the CRD, least-privilege RBAC and the operator (3 shards + PDB).
    for kind in [
        "CustomResourceDefinition",
        "ClusterRole",
        "ClusterRoleBinding",
        "ServiceAccount",
        "StatefulSet",
        "PodDisruptionBudget",
        "Namespace",
    ] {
        assert!(built.contains(&format!("kind: {kind}\n")), "missing {kind}");
    }
    assert!(!built.contains("\"*\""), "RBAC must not use wildcards");
}

#[test]
fn crd_is_seed_compatible() {
    use kube::CustomResourceExt;
    let crd = serde_json::to_value(stslock::api::StatefulSetLock::crd()).expect("crd json");
    assert_eq!(crd["metadata"]["name"], "statefulsetlocks.app.anukkrit.me");
    assert_eq!(
        crd["spec"]["names"]["shortNames"],
        serde_json::json!(["ssl"])
    );
    let v = &crd["spec"]["versions"][0];
    assert_eq!(v["name"], "v1");
    assert!(v["subresources"]["status"].is_object());
    let spec = &v["schema"]["openAPIV3Schema"]["properties"]["spec"];
    assert_eq!(
        spec["required"],
        serde_json::json!(["leaseDurationSeconds", "leaseName", "statefulSetName"])
    );
    assert_eq!(spec["properties"]["statefulSetName"]["minLength"], 1);
    assert_eq!(spec["properties"]["leaseName"]["minLength"], 1);
    assert_eq!(spec["properties"]["leaseDurationSeconds"]["minimum"], 1.0);
    assert_eq!(
        spec["properties"]["leaseDurationSeconds"]["maximum"],
        3600.0
    );
    assert_eq!(
        spec["properties"]["leaseDurationSeconds"]["format"],
        "int32"
    );
    let cols: Vec<&str> = v["additionalPrinterColumns"]
        .as_array()
        .expect("columns")
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    // Ours, and the Go operator's (StatefulSet, Writer Pod as our Writer, Lease Duration).
    assert_eq!(
        cols,
        [
            "StatefulSet",
            "Writer",
            "Epoch",
            "Available",
            "Lease Duration",
            "Shard",
            "Age"
        ]
    );
}
