//! The operator image as `make docker-build` builds it (`deploy/image/build.sh`: buildah here,
//! no Docker daemon): its configuration (entrypoint, non-root user, OCI labels), its size, the
//! binary inside (`--version`, no `dev`), and the operator it runs electing a writer on kubesim
//! over loopback — the container shares the host's network (buildah's chroot isolation).
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on setup failures

mod common;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{Env, Options};
use serde_json::{Value, json};

const IMG: &str = "localhost/stslock:image-test";

fn buildah(args: &[&str]) -> (bool, String, String) {
    let out = Command::new("buildah")
        .args(args)
        .env("STORAGE_DRIVER", "vfs")
        .env("BUILDAH_ISOLATION", "chroot")
        .output()
        .expect("buildah (make image-deps installs it)");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn ok(args: &[&str]) -> String {
    let (ok, out, err) = buildah(args);
    assert!(ok, "buildah {args:?}: {out}\n{err}");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_image_is_built_and_runs_the_operator() {
    let dir = std::env::temp_dir().join(format!("stslock-image-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let archive = dir.join("stslock.oci.tar");
    let out = Command::new("make")
        .args([
            "--no-print-directory",
            "docker-build",
            &format!("IMG={IMG}"),
            &format!("OCI_ARCHIVE={}", archive.display()),
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("make docker-build");
    assert!(
        out.status.success(),
        "make docker-build: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // Its configuration.
    let inspect: Value =
        serde_json::from_str(&ok(&["inspect", "--type", "image", IMG])).expect("inspect JSON");
    let config = &inspect["OCIv1"]["config"];
    assert_eq!(config["User"], "65532:65532", "{config}");
    assert_eq!(config["Entrypoint"], json!(["/stslock"]), "{config}");
    assert_eq!(config["Cmd"], json!(["run"]), "{config}");
    let labels = &config["Labels"];
    assert_eq!(
        labels["org.opencontainers.image.version"],
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(labels["org.opencontainers.image.title"], "stslock");
    assert!(
        labels["org.opencontainers.image.source"]
            .as_str()
            .is_some_and(|s| s.starts_with("https://")),
        "{labels}"
    );
    // Small: the binary and three shared libraries, no distribution.
    let images: Value = serde_json::from_str(&ok(&["images", "--json", IMG])).unwrap();
    let size = images[0]["size"].as_str().expect("size, e.g. \"29.1 MB\"");
    println!("image {IMG}: {size}");
    let (n, unit) = size.split_once(' ').expect("number and unit");
    let n: f64 = n.parse().expect("size number");
    let megabytes = match unit {
        "kB" | "KB" => n / 1e3,
        "MB" => n,
        "GB" => n * 1e3,
        other => panic!("unit {other} in {size}"),
    };
    assert!(megabytes < 60.0, "{size}");
    // The OCI archive holds it.
    let listing = Command::new("tar")
        .arg("tf")
        .arg(&archive)
        .output()
        .expect("tar");
    let listing = String::from_utf8_lossy(&listing.stdout);
    assert!(
        listing.lines().any(|l| l == "index.json") && listing.contains("blobs/sha256/"),
        "{listing}"
    );

    // The binary inside: the release build without `dev` (no kubesim in the image).
    let ctr = ok(&["from", "--quiet", IMG]).trim().to_string();
    let run = |args: &[&str]| {
        let mut all = vec!["run", ctr.as_str(), "--"];
        all.extend_from_slice(args);
        buildah(&all)
    };
    let (good, version, err) = run(&["/stslock", "--version"]);
    assert!(good, "{err}");
    assert_eq!(
        version.trim(),
        format!("stslock {}", env!("CARGO_PKG_VERSION"))
    );
    let (good, _, err) = run(&["/stslock", "dev"]);
    assert!(
        !good && err.contains("unrecognized subcommand 'dev'"),
        "{err}"
    );

    // The operator it runs, as user 65532, elects a writer on kubesim (loopback, shared).
    let env = Env::start_with(Options {
        replicas: 0,
        serve_http: true,
        ..Options::default()
    })
    .await;
    let kubeconfig = env.kubectl().kubeconfig;
    let mounted = dir.join("kubeconfig");
    std::fs::copy(&kubeconfig, &mounted).unwrap();
    set_mode(&mounted, 0o644);
    set_mode(&dir, 0o755);
    let shard = format!("image-{:08x}", rand::random::<u32>());
    let mut operator = tokio::process::Command::new("buildah")
        .args([
            "run",
            "-v",
            &format!("{}:/config/kubeconfig:ro", mounted.display()),
            &ctr,
            "--",
            "/stslock",
            "run",
            "--kubeconfig",
            "/config/kubeconfig",
            "--shard-id",
            &shard,
            "--metrics-addr",
            "127.0.0.1:0",
        ])
        .env("STORAGE_DRIVER", "vfs")
        .env("BUILDAH_ISOLATION", "chroot")
        .kill_on_drop(true)
        .spawn()
        .expect("buildah run the operator");
    env.statefulset("db", 3).await;
    env.lock("lock", "db", "db-lease", 30, json!({})).await;
    env.wait_writer("db", "db-0").await;
    // The lock's status is written after the pods' labels: a status read right after the
    // labels may be ahead of it (the operator runs in a slow chroot here), so wait for it.
    let status = env
        .until(15, "the lock's status names its writer", {
            let locks = env.locks();
            move || {
                let locks = locks.clone();
                Box::pin(async move {
                    let status = locks.get("lock").await.ok()?.status?;
                    status.writer_pod.is_some().then_some(status)
                })
            }
        })
        .await;
    assert_eq!(status.writer_pod.as_deref(), Some("db-0"), "{status:?}");
    assert_eq!(status.shard.as_deref(), Some(shard.as_str()), "{status:?}");
    env.assert_never_two_writers().await;

    // SIGTERM (as the kubelet stops a container): the operator shuts down gracefully. buildah's
    // chroot runner starts it in a session of its own, so it is found by its shard id.
    let signalled = Command::new("pkill")
        .args(["-TERM", "-f", &format!("shard-id {shard}")])
        .status()
        .expect("pkill");
    assert!(signalled.success(), "no operator process named {shard}");
    let exited = tokio::time::timeout(Duration::from_secs(30), operator.wait()).await;
    assert!(exited.is_ok(), "the operator did not stop on SIGTERM");
    let left = Command::new("pgrep")
        .args(["-f", &format!("shard-id {shard}")])
        .output()
        .expect("pgrep");
    assert!(left.stdout.is_empty(), "still running after SIGTERM");
    ok(&["rm", &ctr]);
    // Earlier builds' layers (the tag moved to this one) go; vfs keeps full copies.
    let _ = buildah(&["rmi", "--prune"]);
    std::fs::remove_dir_all(&dir).ok();
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}
