//! A crash of etcd or kube-apiserver (SIGKILL) and its restart with the same data: what was
//! written before is still there, the apiserver serves again, and the old process is gone.

use std::time::Duration;

use anyhow::{Context, Result};
use controlplane::{ControlPlane, Options};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;
use kube::api::PostParams;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_and_the_apiserver_are_killed_and_restarted_with_their_data() -> Result<()> {
    if !controlplane::binaries::build_script().is_file() {
        eprintln!("SKIPPED: no real control plane here (its build script is absent)");
        return Ok(());
    }
    let mut cp = ControlPlane::start(Options {
        pod_lifecycle: None,
        ..Options::default()
    })
    .await?;
    let maps: Api<ConfigMap> = Api::namespaced(cp.admin_client().await?, "default");
    let mut map = ConfigMap::default();
    map.metadata.name = Some("before-the-crash".into());
    map.data = Some([("k".to_string(), "v".to_string())].into());
    controlplane::timed(
        "create",
        Duration::from_secs(10),
        maps.create(&PostParams::default(), &map),
    )
    .await?;

    for component in ["etcd", "kube-apiserver"] {
        let before = pid_of(&cp, component)?;
        let took = cp
            .kill_and_restart(component, Duration::from_millis(1500))
            .await?;
        let after = pid_of(&cp, component)?;
        println!(
            "{component}: pid {before} killed, {after} serving again {} ms after its restart",
            took.as_millis()
        );
        assert_ne!(before, after, "{component} was not started again");
        assert!(
            !std::path::Path::new(&format!("/proc/{before}")).exists(),
            "{component}'s killed process {before} is still there"
        );
        let maps: Api<ConfigMap> = Api::namespaced(cp.admin_client().await?, "default");
        let found =
            controlplane::timed("get", Duration::from_secs(10), maps.get("before-the-crash"))
                .await?;
        assert_eq!(
            found.data.and_then(|d| d.get("k").cloned()).as_deref(),
            Some("v"),
            "the ConfigMap written before {component}'s crash"
        );
    }
    // Only these two are restarted.
    assert!(
        cp.kill_and_restart("kube-controller-manager", Duration::ZERO)
            .await
            .is_err()
    );
    cp.check_running()?;
    cp.stop().await
}

fn pid_of(cp: &ControlPlane, component: &str) -> Result<u32> {
    cp.pids()
        .into_iter()
        .find(|(c, _)| *c == component)
        .map(|(_, p)| p)
        .with_context(|| format!("no {component}"))
}
