//! Shared fixtures of kubesim's integration tests.
#![allow(dead_code)]

use std::future::Future;
use std::time::Duration;

use kubesim::{Sim, SimConfig};

/// How a test reaches the simulator.
#[derive(Debug, Clone, Copy)]
pub enum Transport {
    InProcess,
    Loopback,
}

/// A simulator with fast pods and a kube client over the chosen transport.
pub async fn sim(transport: Transport) -> (Sim, kube::Client) {
    let mut cfg = SimConfig::default();
    cfg.controllers.pod_ready_delay = Duration::from_millis(50);
    cfg.controllers.pod_terminate_delay = Duration::from_millis(100);
    cfg.bookmark_interval = Duration::from_millis(500);
    sim_with(transport, cfg).await
}

pub async fn sim_with(transport: Transport, cfg: SimConfig) -> (Sim, kube::Client) {
    let mut sim = Sim::start(cfg);
    let client = match transport {
        Transport::InProcess => sim.client(),
        Transport::Loopback => {
            let addr = sim
                .serve("127.0.0.1:0".parse().expect("addr"))
                .await
                .expect("serve");
            let config = kube::Config::new(format!("http://{addr}").parse().expect("url"));
            kube::Client::try_from(config).expect("client")
        }
    };
    (sim, client)
}

/// Poll `f` until it returns Some, failing the test after `secs` seconds.
pub async fn eventually<T, F, Fut>(secs: u64, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {secs}s waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub const STATEFULSET: &str = r#"{
  "apiVersion": "apps/v1", "kind": "StatefulSet",
  "metadata": {"name": "db"},
  "spec": {
    "serviceName": "db", "replicas": 3,
    "selector": {"matchLabels": {"app": "db"}},
    "template": {"metadata": {"labels": {"app": "db"}},
                 "spec": {"containers": [{"name": "db", "image": "postgres:15"}]}}
  }
}"#;
