//! Fault injection on the API path: latency, error rates, the whole API down, dropped
//! watches, and per-client partitions chosen by the request's User-Agent.
//!
//! Faults apply to the Kubernetes API only, never to `/sim/` (the test driver must always be
//! able to heal what it broke). Pod- and node-level faults live in [`crate::controllers`].

use std::sync::RwLock;
use std::time::Duration;

use rand::Rng;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::error::ApiError;

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct FaultConfig {
    /// Added to every affected request before it is served.
    pub latency_ms: u64,
    /// Uniform extra latency in `0..=latency_jitter_ms`.
    pub latency_jitter_ms: u64,
    /// Probability in `0.0..=1.0` that an affected request fails with `error_code`.
    pub error_rate: f64,
    /// 500, 503 or 429 (429 and 503 carry `Retry-After: 1`). 0 means 500.
    pub error_code: u16,
    /// Only writes (POST/PUT/PATCH/DELETE) are affected by latency and errors.
    pub writes_only: bool,
    /// When non-empty, latency and errors apply only to clients whose User-Agent contains one
    /// of these strings.
    pub agents: Vec<String>,
    /// Every API request fails with 503, open watches end.
    pub down: bool,
    /// Clients whose User-Agent contains one of these strings are cut off: their requests hang
    /// until the partition heals (as a black-holed network does), their watches end.
    pub partitioned: Vec<String>,
}

/// What the fault layer decided for one request.
pub enum Verdict {
    Proceed,
    Fail(ApiError),
}

pub struct Faults {
    config: RwLock<FaultConfig>,
    /// Bumped to end open watches (a watch-drop fault, a partition starting, the API going
    /// down); watchers compare against the value they started with.
    epoch: watch::Sender<u64>,
}

impl Default for Faults {
    fn default() -> Self {
        Faults {
            config: RwLock::new(FaultConfig::default()),
            epoch: watch::channel(0).0,
        }
    }
}

impl Faults {
    pub fn get(&self) -> FaultConfig {
        match self.config.read() {
            Ok(c) => c.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    pub fn set(&self, new: FaultConfig) {
        let cut = {
            let mut c = match self.config.write() {
                Ok(c) => c,
                Err(p) => p.into_inner(),
            };
            let cut =
                (new.down && !c.down) || new.partitioned.iter().any(|p| !c.partitioned.contains(p));
            *c = new;
            cut
        };
        if cut {
            self.drop_watches();
        }
    }

    pub fn update(&self, f: impl FnOnce(&mut FaultConfig)) {
        let mut c = self.get();
        f(&mut c);
        self.set(c);
    }

    /// End every open watch now; clients re-watch from their last resourceVersion.
    pub fn drop_watches(&self) {
        self.epoch.send_modify(|e| *e += 1);
    }

    pub fn watch_epoch(&self) -> watch::Receiver<u64> {
        self.epoch.subscribe()
    }

    pub fn is_partitioned(&self, agent: &str) -> bool {
        self.get()
            .partitioned
            .iter()
            .any(|p| agent.contains(p.as_str()))
    }

    /// Decide the fate of one API request; sleeps for latency and partitions.
    pub async fn admit(&self, agent: &str, is_write: bool) -> Verdict {
        // A partitioned client waits until healed: from its side the request simply never
        // gets an answer, and its own timeout decides what happens.
        while self.is_partitioned(agent) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let c = self.get();
        if c.down {
            return Verdict::Fail(ApiError {
                retry_after: Some(1),
                ..ApiError::new(
                    503,
                    "ServiceUnavailable",
                    "the server is currently unable to handle the request",
                )
            });
        }
        let affected = (!c.writes_only || is_write)
            && (c.agents.is_empty() || c.agents.iter().any(|a| agent.contains(a.as_str())));
        if !affected {
            return Verdict::Proceed;
        }
        let (delay, fail) = {
            let mut rng = rand::rng();
            let jitter = if c.latency_jitter_ms > 0 {
                rng.random_range(0..=c.latency_jitter_ms)
            } else {
                0
            };
            (
                c.latency_ms + jitter,
                c.error_rate > 0.0 && rng.random_bool(c.error_rate.clamp(0.0, 1.0)),
            )
        };
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        if fail {
            let e = match c.error_code {
                429 => ApiError {
                    retry_after: Some(1),
                    ..ApiError::new(
                        429,
                        "TooManyRequests",
                        "Too many requests, please try again later.",
                    )
                },
                503 => ApiError {
                    retry_after: Some(1),
                    ..ApiError::new(
                        503,
                        "ServiceUnavailable",
                        "the server is currently unable to handle the request",
                    )
                },
                _ => ApiError::internal("Internal error occurred: injected fault"),
            };
            return Verdict::Fail(e);
        }
        Verdict::Proceed
    }
}
