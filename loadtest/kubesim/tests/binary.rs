//! The `kubesim` binary: prints its address, writes a kubeconfig, serves, and exits cleanly
//! on SIGTERM and SIGINT.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on setup failures

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

async fn run_and_signal(signal: &str) {
    let dir = std::env::temp_dir().join(format!("kubesim-bin-{}-{signal}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let kubeconfig = dir.join("kubeconfig");
    let mut child = Command::new(env!("CARGO_BIN_EXE_kubesim"))
        .args(["--addr", "127.0.0.1:0", "--kubeconfig"])
        .arg(&kubeconfig)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn kubesim");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let first = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
        .await
        .expect("printed in time")
        .expect("read")
        .expect("a line");
    let url = first
        .strip_prefix("kubesim listening on ")
        .unwrap_or_else(|| panic!("unexpected first line: {first}"));
    assert!(
        url.starts_with("http://127.0.0.1:") && !url.ends_with(":0"),
        "{url}"
    );
    let kc = std::fs::read_to_string(&kubeconfig).expect("kubeconfig written");
    assert!(kc.contains(&format!("server: {url}")), "{kc}");
    // It serves the API.
    let config = kube::Config::new(url.parse().expect("url"));
    let client = kube::Client::try_from(config).expect("client");
    let v = client.apiserver_version().await.expect("version");
    assert_eq!(v.major, "1");
    let pid = child.id().expect("pid").to_string();
    let killed = std::process::Command::new("kill")
        .args([&format!("-{signal}"), &pid])
        .status()
        .expect("kill");
    assert!(killed.success());
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("exited in time")
        .expect("wait");
    assert!(status.success(), "exit status {status:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn exits_cleanly_on_sigterm() {
    run_and_signal("TERM").await;
}

#[tokio::test]
async fn exits_cleanly_on_sigint() {
    run_and_signal("INT").await;
}
