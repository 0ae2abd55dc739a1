//! Fault injection on the API path: latency, error rates, the whole API down, dropped
//! watches, and per-client partitions chosen by the request's User-Agent; and the failure
//! modes of a real apiserver that act *after* a request was served:
//!
//! - [`LoseResponse`] (commit-then-lose-response): the write is committed, the client gets no
//!   answer (hang) or a 500 `ServerTimeout` / 504 `Timeout`;
//! - [`HoldResponse`]: the write is committed, the answer is delivered late;
//! - [`WatchFault`]: one resource's watch streams (optionally of one client, optionally only
//!   those whose label selector contains a string) lag by N ms or stall half-open;
//! - [`StaleRead`]: `get`/`list` with `resourceVersion=0` are served from a snapshot at least
//!   `lag_ms` old, as from a lagging watch cache; quorum reads stay fresh.
//!
//! Faults apply to the Kubernetes API only, never to `/sim/` (the test driver must always be
//! able to heal what it broke). Pod- and node-level faults live in [`crate::controllers`].

use std::sync::{Arc, RwLock};
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
    /// Only reads (GET, LIST, WATCH) are affected by latency and errors: slow lists and reads
    /// beside writes answered at another pace (with `hold_responses`, say).
    pub reads_only: bool,
    /// When non-empty, latency and errors apply only to clients whose User-Agent contains one
    /// of these strings.
    pub agents: Vec<String>,
    /// When non-empty, latency and errors apply only to requests for these resources (plural,
    /// or `plural.group`), e.g. only the lock watch's lists and watches.
    pub resources: Vec<String>,
    /// Every API request fails with 503, open watches end.
    pub down: bool,
    /// Clients whose User-Agent contains one of these strings are cut off: their requests hang
    /// until the partition heals (as a black-holed network does), their watches end.
    pub partitioned: Vec<String>,
    /// Commit-then-lose-response: a matching write is committed, then its answer is lost.
    /// The first entry that matches (and wins its probability roll) decides.
    pub lose_responses: Vec<LoseResponse>,
    /// A matching write is served (committed when it succeeds), then answered late. Delays of
    /// several matching entries add up.
    pub hold_responses: Vec<HoldResponse>,
    /// A matching write is served late whatever its client does meanwhile: it commits after
    /// the delay even if the client gave up (as a request already inside a real apiserver
    /// does). Delays of several matching entries add up.
    pub late_commits: Vec<LateCommit>,
    /// Lag or stall of matching watch streams, re-evaluated on every configuration change (so
    /// lifting a fault resumes delivery on the open streams).
    pub watch_faults: Vec<WatchFault>,
    /// `resourceVersion=0` reads of matching resources served from a lagging snapshot.
    pub stale_reads: Vec<StaleRead>,
}

/// True when `agents` is empty or the User-Agent contains one of them.
fn agent_matches(agents: &[String], agent: &str) -> bool {
    agents.is_empty() || agents.iter().any(|a| agent.contains(a.as_str()))
}

/// True when `resources` is empty or names the resource, by plural (`leases`) or by plural and
/// group (`leases.coordination.k8s.io`, `statefulsetlocks.anukkrit.me`).
fn resource_matches(resources: &[String], group: &str, plural: &str) -> bool {
    resources.is_empty()
        || resources.iter().any(|r| {
            r == plural
                || (!group.is_empty()
                    && r.strip_prefix(plural).and_then(|g| g.strip_prefix('.')) == Some(group))
        })
}

fn roll(probability: f64) -> bool {
    probability >= 1.0 || (probability > 0.0 && rand::rng().random_bool(probability))
}

/// What the client of a write whose response was lost sees.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum LostAs {
    /// No answer at all: the request hangs until the client gives up (its own timeout, or it
    /// closes the connection), at most [`MAX_HANG`], after which it gets a 504.
    #[default]
    Hang,
    /// 500 `ServerTimeout` ("The create operation against leases.coordination.k8s.io could not
    /// be completed at this time, please try again."), as when storage did not confirm in time.
    ServerTimeout,
    /// 504 `Timeout` ("Timeout: request did not complete within requested timeout - context
    /// deadline exceeded"), the apiserver's request-timeout filter. Note that kube-rs clients
    /// built from a `Config` retry 504s, so a lost create typically ends as 409 AlreadyExists.
    Timeout,
}

/// A lost request hangs at most this long before it is answered with a 504.
pub const MAX_HANG: Duration = Duration::from_secs(600);

/// Commit-then-lose-response for writes (POST/PUT/PATCH/DELETE, never reads and never `/sim/`).
/// Only writes that succeed lose their answer: a rejected write (409, 422, ...) committed
/// nothing and is answered normally. The commit is complete (visible to every client, in the
/// commit log and the invariant recorder, its watch event sent) before the answer is lost.
///
/// JSON: `{"probability": 1.0, "agents": ["shard-a"], "resources": ["leases"], "lostAs":
/// "hang" | "serverTimeout" | "timeout"}` (every field optional).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct LoseResponse {
    /// Probability in `0.0..=1.0` that a matching write loses its answer (default 1.0).
    pub probability: f64,
    /// When non-empty, only clients whose User-Agent contains one of these strings.
    pub agents: Vec<String>,
    /// When non-empty, only these resources (plural, or `plural.group`).
    pub resources: Vec<String>,
    pub lost_as: LostAs,
}

impl Default for LoseResponse {
    fn default() -> Self {
        LoseResponse {
            probability: 1.0,
            agents: vec![],
            resources: vec![],
            lost_as: LostAs::Hang,
        }
    }
}

impl LoseResponse {
    /// Every matching write hangs without an answer.
    pub fn hang() -> Self {
        LoseResponse::default()
    }

    /// Every matching write is answered 500 `ServerTimeout`.
    pub fn server_timeout() -> Self {
        LoseResponse {
            lost_as: LostAs::ServerTimeout,
            ..Default::default()
        }
    }

    /// Every matching write is answered 504 `Timeout`.
    pub fn timeout() -> Self {
        LoseResponse {
            lost_as: LostAs::Timeout,
            ..Default::default()
        }
    }
}

/// Hold-response for writes: the write is served at once (committed when it succeeds, and
/// visible to everyone), its answer is delivered `delay_ms` later.
///
/// JSON: `{"delayMs": 2000, "probability": 1.0, "agents": [...], "resources": [...]}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct HoldResponse {
    pub delay_ms: u64,
    /// Probability in `0.0..=1.0` that a matching write is held (default 1.0).
    pub probability: f64,
    pub agents: Vec<String>,
    pub resources: Vec<String>,
}

impl Default for HoldResponse {
    fn default() -> Self {
        HoldResponse {
            delay_ms: 0,
            probability: 1.0,
            agents: vec![],
            resources: vec![],
        }
    }
}

impl HoldResponse {
    pub fn new(delay_ms: u64) -> Self {
        HoldResponse {
            delay_ms,
            ..Default::default()
        }
    }
}

/// Late commit for writes: the write is served `delay_ms` after it arrived, in a task of its
/// own, so that a client that gave up (its timeout, a closed connection, a killed process)
/// does not stop it — it still commits, seconds after its client moved on. Latency
/// ([`FaultConfig::latency_ms`]) is served in the request's own task instead: a client that
/// goes away takes its request with it.
///
/// JSON: `{"delayMs": 4000, "probability": 1.0, "agents": [...], "resources": [...],
/// "names": [...]}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct LateCommit {
    pub delay_ms: u64,
    /// Probability in `0.0..=1.0` that a matching write is served late (default 1.0).
    pub probability: f64,
    pub agents: Vec<String>,
    pub resources: Vec<String>,
    /// When non-empty, only writes to objects of these names (a create names none).
    pub names: Vec<String>,
}

impl Default for LateCommit {
    fn default() -> Self {
        LateCommit {
            delay_ms: 0,
            probability: 1.0,
            agents: vec![],
            resources: vec![],
            names: vec![],
        }
    }
}

impl LateCommit {
    pub fn new(delay_ms: u64) -> Self {
        LateCommit {
            delay_ms,
            ..Default::default()
        }
    }

    pub fn name(mut self, name: &str) -> Self {
        self.names.push(name.into());
        self
    }
}

/// The filters every write fault shares: `.agent(..)`, `.resource(..)` (each adds one) and
/// `.probability(..)`.
macro_rules! write_fault_filters {
    ($($t:ty),*) => {$(
        impl $t {
            pub fn agent(mut self, agent: &str) -> Self {
                self.agents.push(agent.into());
                self
            }

            pub fn resource(mut self, resource: &str) -> Self {
                self.resources.push(resource.into());
                self
            }

            pub fn probability(mut self, p: f64) -> Self {
                self.probability = p;
                self
            }
        }
    )*};
}

write_fault_filters!(LoseResponse, HoldResponse, LateCommit);

/// Default bound on the events one lagging or stalled watch stream holds.
pub const DEFAULT_MAX_HELD: usize = 1000;

/// Lag or stall of watch streams. A stream matches when its resource, its client's User-Agent
/// and its `labelSelector` query parameter all match; the filters are evaluated while the
/// stream is open, so adding or removing a fault acts on open streams at once. Other streams
/// (other resources, other clients, other selectors) are unaffected.
///
/// - `lag_ms`: every event (and bookmark) of the stream is delivered `lag_ms` after the server
///   had it, in order. The stream still ends at its `timeoutSeconds`; what it had not
///   delivered yet is not sent on it (the client re-watches from the last version it saw and
///   gets those events from the history, each `lag_ms` after its commit, as from a lagging
///   watch cache).
/// - `stall`: the stream goes half-open: the connection stays open, no events and no bookmarks
///   are sent, and it does not end, not even past the client's `timeoutSeconds`. When the stall
///   is lifted it delivers what it held, in order (and ends right after if its
///   `timeoutSeconds` passed meanwhile). `/sim/drop-watches` (or [`Faults::drop_watches`]) ends
///   it at any time, as do the API going down or a partition of its client.
///
/// Bounded: a stream holding `max_held` events and receiving one more is ended (a clean end of
/// the response body, no ERROR event), as the apiserver closes a watcher too slow for its
/// buffer ("Forcing watcher close due to unresponsiveness"); the client re-watches from the
/// last resourceVersion it saw, and the history replays the rest.
///
/// JSON: `{"resources": ["leases"], "agents": ["replica-1"], "labelSelector":
/// "app.anukkrit.me/shard-group", "lagMs": 0, "stall": true, "maxHeld": 1000}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct WatchFault {
    /// When non-empty, only watches of these resources (plural, or `plural.group`).
    pub resources: Vec<String>,
    /// When non-empty, only watches of clients whose User-Agent contains one of these.
    pub agents: Vec<String>,
    /// When non-empty, only watches whose `labelSelector` parameter contains this string
    /// (e.g. a label key: `app.anukkrit.me/shard-group`).
    pub label_selector: String,
    pub lag_ms: u64,
    pub stall: bool,
    /// Events held at most before the stream is ended (0 means [`DEFAULT_MAX_HELD`]).
    pub max_held: usize,
}

impl Default for WatchFault {
    fn default() -> Self {
        WatchFault {
            resources: vec![],
            agents: vec![],
            label_selector: String::new(),
            lag_ms: 0,
            stall: false,
            max_held: DEFAULT_MAX_HELD,
        }
    }
}

impl WatchFault {
    /// Watches of `resource` deliver every event `lag_ms` late.
    pub fn lag(resource: &str, lag_ms: u64) -> Self {
        WatchFault {
            resources: vec![resource.into()],
            lag_ms,
            ..Default::default()
        }
    }

    /// Watches of `resource` stall half-open.
    pub fn stall(resource: &str) -> Self {
        WatchFault {
            resources: vec![resource.into()],
            stall: true,
            ..Default::default()
        }
    }

    pub fn agent(mut self, agent: &str) -> Self {
        self.agents.push(agent.into());
        self
    }

    /// Only watches whose label selector contains `s`.
    pub fn label_selector(mut self, s: &str) -> Self {
        self.label_selector = s.into();
        self
    }

    pub fn max_held(mut self, n: usize) -> Self {
        self.max_held = n;
        self
    }

    fn matches(&self, agent: &str, group: &str, plural: &str, label_selector: &str) -> bool {
        resource_matches(&self.resources, group, plural)
            && agent_matches(&self.agents, agent)
            && (self.label_selector.is_empty() || label_selector.contains(&self.label_selector))
    }
}

/// Stale reads: a `get` or `list` with `resourceVersion=0` (the apiserver serves those from its
/// watch cache, which may lag) of a matching resource sees the state as of at least `lag_ms`
/// ago, reconstructed from the watch history (so never older than the history kept: after a
/// compaction it is as old as the history allows). Its `resourceVersion` is that state's. The
/// list ignores `limit`/`continue`, as the watch cache does for `resourceVersion=0`. Reads
/// without a `resourceVersion` (quorum reads) and watches are not affected.
///
/// JSON: `{"resources": ["pods"], "agents": [], "lagMs": 2000}`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct StaleRead {
    pub resources: Vec<String>,
    pub agents: Vec<String>,
    pub lag_ms: u64,
}

impl StaleRead {
    pub fn new(resource: &str, lag_ms: u64) -> Self {
        StaleRead {
            resources: vec![resource.into()],
            agents: vec![],
            lag_ms,
        }
    }

    pub fn agent(mut self, agent: &str) -> Self {
        self.agents.push(agent.into());
        self
    }
}

/// What happens to the answer of a served write.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteFate {
    /// Delivered (or lost) this much later.
    pub hold: Duration,
    /// Lost, and how; only for writes that succeeded.
    pub lost: Option<LostAs>,
}

impl WriteFate {
    /// Hold the answer to a served write of `group`/`plural` (`method`), then say what replaces
    /// it: `None`, the answer itself; or the error a lost answer gets — after waiting until the
    /// client gives up for [`LostAs::Hang`] (dropping the request drops this future).
    pub async fn apply(self, method: &http::Method, group: &str, plural: &str) -> Option<ApiError> {
        if !self.hold.is_zero() {
            tokio::time::sleep(self.hold).await;
        }
        let operation = match *method {
            http::Method::POST => "create",
            http::Method::PUT => "update",
            http::Method::PATCH => "patch",
            http::Method::DELETE => "delete",
            _ => "write",
        };
        match self.lost? {
            LostAs::Hang => {
                tokio::time::sleep(MAX_HANG).await;
                Some(ApiError::request_timeout())
            }
            LostAs::ServerTimeout => Some(ApiError::server_timeout(group, plural, operation)),
            LostAs::Timeout => Some(ApiError::request_timeout()),
        }
    }
}

/// How one watch stream is shaped right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WatchShape {
    pub lag: Duration,
    pub stall: bool,
    pub max_held: usize,
}

impl WatchShape {
    pub fn is_normal(&self) -> bool {
        !self.stall && self.lag.is_zero()
    }
}

/// What the fault layer decided for one request.
pub enum Verdict {
    Proceed,
    Fail(ApiError),
}

pub struct Faults {
    config: RwLock<Arc<FaultConfig>>,
    /// Bumped to end open watches (a watch-drop fault, a partition starting, the API going
    /// down); watchers compare against the value they started with.
    epoch: watch::Sender<u64>,
    /// Bumped on every configuration change (open watches re-evaluate their [`WatchFault`]s).
    changes: watch::Sender<u64>,
}

impl Default for Faults {
    fn default() -> Self {
        Faults {
            config: RwLock::new(Arc::new(FaultConfig::default())),
            epoch: watch::channel(0).0,
            changes: watch::channel(0).0,
        }
    }
}

impl Faults {
    pub fn get(&self) -> FaultConfig {
        (*self.snapshot()).clone()
    }

    /// The configuration in effect, without copying it.
    pub fn snapshot(&self) -> Arc<FaultConfig> {
        match self.config.read() {
            Ok(c) => c.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Changes whenever the configuration is set.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    pub fn set(&self, new: FaultConfig) {
        let cut = {
            let mut c = match self.config.write() {
                Ok(c) => c,
                Err(p) => p.into_inner(),
            };
            let cut =
                (new.down && !c.down) || new.partitioned.iter().any(|p| !c.partitioned.contains(p));
            *c = Arc::new(new);
            cut
        };
        self.changes.send_modify(|n| *n += 1);
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
        self.snapshot()
            .partitioned
            .iter()
            .any(|p| agent.contains(p.as_str()))
    }

    /// The fate of the answer to a served write of `group`/`plural` by `agent`; `succeeded`
    /// says whether the write was accepted (only those can lose their answer).
    pub fn write_fate(&self, agent: &str, group: &str, plural: &str, succeeded: bool) -> WriteFate {
        let c = self.snapshot();
        let hold = c
            .hold_responses
            .iter()
            .filter(|h| {
                agent_matches(&h.agents, agent)
                    && resource_matches(&h.resources, group, plural)
                    && roll(h.probability)
            })
            .map(|h| Duration::from_millis(h.delay_ms))
            .sum();
        let lost = if succeeded {
            c.lose_responses
                .iter()
                .find(|l| {
                    agent_matches(&l.agents, agent)
                        && resource_matches(&l.resources, group, plural)
                        && roll(l.probability)
                })
                .map(|l| l.lost_as)
        } else {
            None
        };
        WriteFate { hold, lost }
    }

    /// How late a write of object `name` of `group`/`plural` by `agent` commits (see
    /// [`LateCommit`]); zero for a write served as usual.
    pub fn late_commit(&self, agent: &str, group: &str, plural: &str, name: &str) -> Duration {
        self.snapshot()
            .late_commits
            .iter()
            .filter(|l| {
                agent_matches(&l.agents, agent)
                    && resource_matches(&l.resources, group, plural)
                    && (l.names.is_empty() || l.names.iter().any(|n| n == name))
                    && roll(l.probability)
            })
            .map(|l| Duration::from_millis(l.delay_ms))
            .sum()
    }

    /// How a watch stream of `group`/`plural` by `agent` with the given `labelSelector`
    /// parameter is shaped under `c`: the largest lag of the matching faults, stalled if any
    /// stalls, holding at most the smallest bound.
    pub fn watch_shape(
        c: &FaultConfig,
        agent: &str,
        group: &str,
        plural: &str,
        label_selector: &str,
    ) -> WatchShape {
        let mut shape = WatchShape {
            lag: Duration::ZERO,
            stall: false,
            max_held: usize::MAX,
        };
        for f in c
            .watch_faults
            .iter()
            .filter(|f| f.matches(agent, group, plural, label_selector))
        {
            shape.lag = shape.lag.max(Duration::from_millis(f.lag_ms));
            shape.stall |= f.stall;
            let bound = if f.max_held == 0 {
                DEFAULT_MAX_HELD
            } else {
                f.max_held
            };
            shape.max_held = shape.max_held.min(bound);
        }
        if shape.max_held == usize::MAX {
            shape.max_held = DEFAULT_MAX_HELD;
        }
        shape
    }

    /// How old a `resourceVersion=0` read of `group`/`plural` by `agent` may be (None: fresh).
    pub fn stale_read_lag(&self, agent: &str, group: &str, plural: &str) -> Option<Duration> {
        self.snapshot()
            .stale_reads
            .iter()
            .filter(|s| {
                agent_matches(&s.agents, agent) && resource_matches(&s.resources, group, plural)
            })
            .map(|s| Duration::from_millis(s.lag_ms))
            .max()
    }

    /// Decide the fate of one API request; sleeps for latency and partitions.
    pub async fn admit(
        &self,
        agent: &str,
        is_write: bool,
        (group, plural): (&str, &str),
    ) -> Verdict {
        // A partitioned client waits until healed: from its side the request simply never
        // gets an answer, and its own timeout decides what happens.
        while self.is_partitioned(agent) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let c = self.snapshot();
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
            && (!c.reads_only || !is_write)
            && agent_matches(&c.agents, agent)
            && resource_matches(&c.resources, group, plural);
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
