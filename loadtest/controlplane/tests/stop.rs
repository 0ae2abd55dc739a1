//! What the launcher starts, it stops: when the test holding it panics, and when its maximum
//! lifetime passes even though nobody stops it. (SIGINT and SIGTERM are the bin's and are
//! covered by `controlplane up`; a killed parent is covered by the same watchdog as the
//! lifetime.)

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use controlplane::{ControlPlane, Options};

fn alive(pid: u32) -> bool {
    // Reaped children leave no /proc entry; an unreaped one would be a zombie (state Z).
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| {
            !stat
                .split(") ")
                .nth(1)
                .is_some_and(|rest| rest.starts_with('Z'))
        })
        .unwrap_or(false)
}

fn build_script_present() -> bool {
    let script = controlplane::binaries::build_script();
    if !script.is_file() {
        eprintln!(
            "SKIPPED: {} is absent, so there is no real control plane to test",
            script.display()
        );
    }
    script.is_file()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_test_stops_its_control_plane_and_keeps_the_logs() -> Result<()> {
    if !build_script_present() {
        return Ok(());
    }
    let (tx, rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(async move {
        let cp = ControlPlane::start(Options {
            pod_lifecycle: None,
            ..Options::default()
        })
        .await;
        let cp = match cp {
            Ok(cp) => cp,
            Err(e) => {
                let _ = tx.send(Err(format!("{e:#}")));
                return;
            }
        };
        let _ = tx.send(Ok((cp.pids(), cp.data_dir.clone())));
        panic!("a test failing while it holds a control plane");
    });
    let (pids, data_dir) = match rx.await? {
        Ok(v) => v,
        Err(e) => bail!("starting: {e}"),
    };
    assert!(task.await.is_err_and(|e| e.is_panic()));
    assert_eq!(pids.len(), 3, "{pids:?}");
    for (name, pid) in &pids {
        assert!(!alive(*pid), "{name} ({pid}) still runs after the panic");
    }
    assert!(
        Path::new(&data_dir)
            .join("logs/kube-apiserver.log")
            .is_file(),
        "logs not kept after a panic"
    );
    std::fs::remove_dir_all(&data_dir)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_maximum_lifetime_holds_without_anyone_stopping_it() -> Result<()> {
    if !build_script_present() {
        return Ok(());
    }
    let lifetime = Duration::from_secs(20);
    let started = Instant::now();
    let mut cp = ControlPlane::start(Options {
        max_lifetime: lifetime,
        pod_lifecycle: None,
        ..Options::default()
    })
    .await?;
    let pids = cp.pids();
    cp.check_running()?;
    // The watchdogs act on whole seconds and give each process up to 10 s after SIGTERM.
    let deadline = started + lifetime + Duration::from_secs(15);
    while pids.iter().any(|(_, pid)| alive(*pid)) {
        if Instant::now() > deadline {
            bail!("still running {:?} after the lifetime", started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(
        started.elapsed() >= lifetime - Duration::from_secs(2),
        "stopped early: {:?}",
        started.elapsed()
    );
    let err = cp
        .check_running()
        .err()
        .map(|e| format!("{e:#}"))
        .unwrap_or_default();
    assert!(
        err.contains("exited"),
        "check_running after the lifetime: {err:?}"
    );
    cp.stop().await
}
