//! The kubesim-only part of the harness, for suites that drive kubesim's internals directly
//! (its fault API, its store's commit stream) and start replicas by hand: an in-process kubesim,
//! operator replicas attributed to `stslock/<id>`, polling, and the invariant check.

use std::time::{Duration, Instant};

use kubesim::{Sim, SimConfig};
use stslock::api::SHARD_LABEL;
use stslock::config::OperatorArgs;
use tokio::sync::oneshot;

/// kubesim with fast pod lifecycles, recording each commit's ownership label and every write
/// request (answered or not, see `Sim::write_attempts`).
pub fn sim() -> Sim {
    super::init_test_log();
    let mut cfg = SimConfig::default();
    cfg.store.attempt_log_max = 100_000;
    cfg.controllers.pod_ready_delay = Duration::from_millis(20);
    cfg.controllers.pod_terminate_delay = Duration::from_millis(100);
    cfg.store.recorded_labels = vec![SHARD_LABEL.to_string(), "sts-role".to_string()];
    Sim::start(cfg)
}

/// [`sim`] with the StatefulSetLock CRD installed, and a client acting as the test (`test`).
pub async fn sim_with_crd() -> (Sim, kube::Client) {
    let sim = sim();
    let client = sim.client_as("test");
    stslock::dev::install_crd(&client)
        .await
        .expect("install the CRD");
    (sim, client)
}

/// One operator replica started by [`start`].
pub struct Replica {
    pub stop: oneshot::Sender<()>,
    pub task: tokio::task::JoinHandle<()>,
}

impl Replica {
    /// Graceful stop (the shutdown future resolves).
    pub async fn stop(self) {
        let _ = self.stop.send(());
        let _ = tokio::time::timeout(Duration::from_secs(20), self.task).await;
    }
}

/// One operator replica, its API calls attributed to `stslock/<id>` in kubesim's commit log
/// (3 s membership Leases and API timeout unless `f` says otherwise).
pub fn start(sim: &Sim, id: &str, f: impl FnOnce(&mut OperatorArgs)) -> Replica {
    let mut a = OperatorArgs::for_shard(id);
    a.membership_lease_seconds = 3;
    a.api_timeout_seconds = 3;
    f(&mut a);
    let client = sim.client_as(&format!("stslock/{id}"));
    let (stop, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        stslock::replica::run(client, a, async {
            let _ = rx.await;
        })
        .await
        .expect("operator");
    });
    Replica { stop, task }
}

/// Poll `f` every 50 ms until it returns something, at most `secs`.
pub async fn until<T, F, Fut>(secs: u64, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {secs}s waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// kubesim's invariant report: never two writer-labelled pods of one StatefulSet.
pub fn assert_never_two_writers(sim: &Sim) {
    let r = sim.report();
    assert_eq!(
        r.dual_writer_intervals, 0,
        "two writers at once: {:?}",
        r.statefulsets
    );
}
