//! `faults`: the acceptance run of issue P5. R replicas, N locks of 3-pod StatefulSets, and for
//! `--seconds` random faults of every kind kubesim has, each on one replica (or all) for a short
//! while, several at once: commit-then-lose-response (hang, 500, 504), hold-response, late
//! commits of pod and Lease writes (served seconds after the replica gave up on them), per-watch
//! lag and half-open stall (pods, leases, locks, the membership watch), stale `resourceVersion=0`
//! reads, latency, error rates (500/503/429), partitions, watch drops, compactions; plus writer
//! flaps and abrupt replica kills (restarted with the same id). Then every fault is lifted and
//! every lock must converge within `--converge-seconds`.
//!
//! Everything is judged from what kubesim committed, never from what the operators say:
//! - a tracker fed by the store's commit broadcast (every committed object, in resourceVersion
//!   order) keeps a compact history of every Lease, pod and lock;
//! - `sim.commit_log()` gives each commit's time, author and the lock's ownership label.
//!
//! Writes are attributed by the commit log: a lock commit is for that lock, a Lease `<lock>-lease`
//! write for its lock, a pod `<set>-<ordinal>` write for the lock of its StatefulSet (lock and set
//! share a name here). The owner at a write is the ownership label of the latest lock commit
//! before it. A lock commit by replica X is X's own when the label was X before it, or when the
//! commit sets the label to X (a claim; counted separately, with whether the previous owner's
//! membership Lease was still current then). A write served late (kubesim's late commit) that
//! lands after its replica lost the lock is the server's doing, applied after the replica gave
//! up on it: counted and listed apart, not as a write by a non-owner.
//!
//! A Lease lapse of a Ready writer: for each lock, replay its Lease and pod commits in
//! resourceVersion order, each at its commit-log time. Between two consecutive commits the state
//! is constant; the part of that stretch after `renewTime + leaseDurationSeconds` (renewTime as
//! written by the operator, wall clock mapped onto the store's clock) during which the Lease's
//! holder pod is Ready and labelled writer is lapsed. Adjacent lapsed stretches are one lapse.
//! A lapse is the fault injector's, not the operator's, when the lock's owner was down (killed,
//! or stopped for a graceful restart, and not back yet) at some moment between the renewal's due
//! time (half a Lease after the lapsed renewal) and the expiry, and came back less than half a
//! Lease before the expiry: a dead replica renews nothing, and half a Lease is what every
//! renewal gets after it is due. The same when the owner at the due time went down that way and
//! the replica owning the lock at the expiry claimed it less than half a Lease before the
//! expiry (a peer claims a dead owner's locks only once its membership Lease has run out).
//! It is also the fault injector's when the owner was up but cut off from renewing: it tried
//! to renew the Lease between the due time (less a twentieth of a Lease: the renewal lane's
//! early jitter) and the expiry, the first renewal within a quarter of a Lease of the due time
//! (or of when it got the lock, if later), and kept at it until the expiry (never idle for
//! longer than the API timeout: no write for the lock in flight), and every renewal failed by
//! faults — an error answer (5xx, 429), an answer only after the API timeout, none (kubesim's
//! write-attempt log), or an answer after the expiry while latency, late commits or held
//! answers were injected on it. Only Lease writes count as renewals: a write of the lock (a
//! confirmation of ownership) that got through renews nothing. Or its fence was shut by faults:
//! every renewal of its own membership Lease from a membership Lease before the due time (or
//! its last restart, if later) to the expiry failed that way (it may write nothing then), or
//! it tried to renew its membership more than half a Lease before the expiry and none of its
//! renewals committed until less than half a Lease before it (the fence opens only on a
//! committed renewal: as for an owner back from a restart only then) — and no renewal of the
//! Lease it tried got through. Every other lapse is the operator's, including one where the owner
//! tried nothing while its membership renewals went through.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kube::api::ListParams;
use kube::{Api, ResourceExt};
use kubesim::store::EventType;
use kubesim::{FaultConfig, HoldResponse, LateCommit, LoseResponse, StaleRead, WatchFault};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use stslock::api::{EPOCH_ANNOTATION, SHARD_LABEL, StatefulSetLock, WRITER_UID_ANNOTATION};
use stslock::sharding::GROUP_LABEL;

use crate::{Args, Fleet, pct, tenants};

pub(crate) const ROLE_LABEL: &str = "sts-role";
const AGENT_PREFIX: &str = "stslock/";
/// Details listed per violation kind (the JSON has up to `DETAILS_JSON`).
const DETAILS_TEXT: usize = 15;
const DETAILS_JSON: usize = 200;

type Key = (String, String);

// ---------------------------------------------------------------------------------------
// The tracker: a compact history of every Lease, pod and lock, from the commit broadcast.

#[derive(Debug, Clone)]
struct LeaseRec {
    holder: Option<String>,
    /// renewTime, milliseconds since the Unix epoch.
    renew_ms: Option<i64>,
    dur_ms: i64,
    transitions: i64,
    uid: Option<String>,
}

#[derive(Debug, Clone)]
struct PodRec {
    uid: String,
    ready: bool,
    writer: bool,
    epoch: Option<i64>,
}

/// One lock's history; `None` records a deletion.
#[derive(Debug, Default)]
struct LockTrack {
    lease: Vec<(u64, Option<LeaseRec>)>,
    pods: BTreeMap<String, Vec<(u64, Option<PodRec>)>>,
    writer_pod: Option<String>,
    /// The resourceVersion since which the lock has been converged (None: not converged now).
    converged_since: Option<u64>,
}

#[derive(Debug, Default)]
struct Tracker {
    locks: HashMap<Key, LockTrack>,
    /// Membership Leases by replica id: (rv, renewTime ms, duration ms).
    members: HashMap<String, Vec<(u64, Option<i64>, i64)>>,
    events: u64,
    lagged: u64,
}

fn s_at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    path.iter().try_fold(v, |v, k| v.get(k))?.as_str()
}

fn i_at(v: &Value, path: &[&str]) -> Option<i64> {
    path.iter().try_fold(v, |v, k| v.get(k))?.as_i64()
}

fn parse_ms(t: &str) -> Option<i64> {
    t.parse::<k8s_openapi::jiff::Timestamp>()
        .ok()
        .map(|t| t.as_millisecond())
}

fn lease_rec(o: &Value) -> LeaseRec {
    LeaseRec {
        holder: s_at(o, &["spec", "holderIdentity"]).map(str::to_string),
        renew_ms: s_at(o, &["spec", "renewTime"]).and_then(parse_ms),
        dur_ms: i_at(o, &["spec", "leaseDurationSeconds"]).unwrap_or(0) * 1000,
        transitions: i_at(o, &["spec", "leaseTransitions"]).unwrap_or(0),
        uid: s_at(o, &["metadata", "annotations", WRITER_UID_ANNOTATION]).map(str::to_string),
    }
}

fn pod_ready(o: &Value) -> bool {
    o.pointer("/status/conditions")
        .and_then(Value::as_array)
        .is_some_and(|cs| {
            cs.iter().any(|c| {
                c.get("type").and_then(Value::as_str) == Some("Ready")
                    && c.get("status").and_then(Value::as_str) == Some("True")
            })
        })
}

fn pod_rec(o: &Value) -> PodRec {
    PodRec {
        uid: s_at(o, &["metadata", "uid"])
            .unwrap_or_default()
            .to_string(),
        ready: pod_ready(o),
        writer: s_at(o, &["metadata", "labels", ROLE_LABEL]) == Some("writer"),
        epoch: s_at(o, &["metadata", "annotations", EPOCH_ANNOTATION]).and_then(|e| e.parse().ok()),
    }
}

/// The StatefulSet (= lock) name of a StatefulSet pod `<set>-<ordinal>`.
fn set_of(pod: &str) -> Option<&str> {
    let (set, ord) = pod.rsplit_once('-')?;
    ord.parse::<u32>().ok().map(|_| set)
}

fn last<T>(h: &[(u64, Option<T>)]) -> Option<&T> {
    h.last().and_then(|(_, r)| r.as_ref())
}

impl LockTrack {
    /// Why the lock is not converged (None: converged): exactly one writer-labelled pod, Ready,
    /// the Lease's holder, with the Lease's UID annotation, epoch annotation = leaseTransitions,
    /// and the lock's status.writerPod.
    fn unconverged(&self) -> Option<String> {
        let Some(l) = last(&self.lease) else {
            return Some("no Lease".into());
        };
        let writers: Vec<(&String, &PodRec)> = self
            .pods
            .iter()
            .filter_map(|(n, h)| last(h).filter(|p| p.writer).map(|p| (n, p)))
            .collect();
        let [(name, p)] = writers.as_slice() else {
            return Some(format!("{} writer-labelled pods", writers.len()));
        };
        if !p.ready {
            return Some(format!("writer {name} not Ready"));
        }
        if l.holder.as_deref() != Some(name.as_str()) {
            return Some(format!("writer {name}, Lease holder {:?}", l.holder));
        }
        if l.uid.as_deref() != Some(p.uid.as_str()) {
            return Some(format!(
                "writer {name} uid {}, Lease uid {:?}",
                p.uid, l.uid
            ));
        }
        if p.epoch != Some(l.transitions) {
            return Some(format!(
                "writer {name} epoch {:?}, leaseTransitions {}",
                p.epoch, l.transitions
            ));
        }
        if self.writer_pod.as_deref() != Some(name.as_str()) {
            return Some(format!(
                "writer {name}, status.writerPod {:?}",
                self.writer_pod
            ));
        }
        None
    }

    fn reeval(&mut self, rv: u64) {
        match (self.unconverged().is_none(), self.converged_since) {
            (true, None) => self.converged_since = Some(rv),
            (false, Some(_)) => self.converged_since = None,
            _ => {}
        }
    }

    /// The current writer-labelled Ready pod, if exactly one.
    fn ready_writer(&self) -> Option<&str> {
        let mut w = self
            .pods
            .iter()
            .filter(|(_, h)| last(h).is_some_and(|p| p.writer && p.ready));
        match (w.next(), w.next()) {
            (Some((n, _)), None) => Some(n.as_str()),
            _ => None,
        }
    }
}

impl Tracker {
    fn ingest(&mut self, ev: &kubesim::store::Event) {
        self.events += 1;
        let o = &*ev.object;
        let deleted = ev.type_ == EventType::Deleted;
        let ns = s_at(o, &["metadata", "namespace"])
            .unwrap_or_default()
            .to_string();
        let name = s_at(o, &["metadata", "name"]).unwrap_or_default();
        match (ev.key.0.as_str(), ev.key.1.as_str()) {
            ("coordination.k8s.io", "leases") => {
                if o.pointer("/metadata/labels")
                    .and_then(|l| l.get(GROUP_LABEL))
                    .is_some()
                {
                    let id = name.rsplit_once('-').map_or(name, |(_, id)| id).to_string();
                    let r = lease_rec(o);
                    self.members.entry(id).or_default().push((
                        ev.rv,
                        r.renew_ms.filter(|_| !deleted),
                        r.dur_ms,
                    ));
                    return;
                }
                let Some(lock) = name.strip_suffix("-lease") else {
                    return;
                };
                let t = self.locks.entry((ns, lock.to_string())).or_default();
                t.lease.push((ev.rv, (!deleted).then(|| lease_rec(o))));
                t.reeval(ev.rv);
            }
            ("", "pods") => {
                let Some(set) = set_of(name) else { return };
                let t = self.locks.entry((ns, set.to_string())).or_default();
                t.pods
                    .entry(name.to_string())
                    .or_default()
                    .push((ev.rv, (!deleted).then(|| pod_rec(o))));
                t.reeval(ev.rv);
            }
            ("app.anukkrit.me", "statefulsetlocks") => {
                let t = self.locks.entry((ns, name.to_string())).or_default();
                t.writer_pod = if deleted {
                    None
                } else {
                    s_at(o, &["status", "writerPod"]).map(str::to_string)
                };
                t.reeval(ev.rv);
            }
            _ => {}
        }
    }
}

fn spawn_tracker(sim: &kubesim::Sim, tracker: Arc<Mutex<Tracker>>) -> tokio::task::JoinHandle<()> {
    let mut rx = sim.store().subscribe();
    tokio::spawn(async move {
        use tokio::sync::broadcast::error::RecvError;
        loop {
            match rx.recv().await {
                Ok(ev) => lock(&tracker).ingest(&ev),
                Err(RecvError::Lagged(n)) => lock(&tracker).lagged += n,
                Err(RecvError::Closed) => return,
            }
        }
    })
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

fn wall_ms() -> i64 {
    k8s_openapi::jiff::Timestamp::now().as_millisecond()
}

// ---------------------------------------------------------------------------------------
// Faults

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Kind {
    LoseHang,
    LoseServerTimeout,
    LoseTimeout,
    Hold,
    Late,
    WatchLag,
    WatchStall,
    StaleRead,
    Latency,
    Error500,
    Error503,
    Error429,
    Partition,
    WatchDrop,
    Compaction,
}

const KINDS: [Kind; 15] = [
    Kind::LoseHang,
    Kind::LoseServerTimeout,
    Kind::LoseTimeout,
    Kind::Hold,
    Kind::Late,
    Kind::WatchLag,
    Kind::WatchStall,
    Kind::StaleRead,
    Kind::Latency,
    Kind::Error500,
    Kind::Error503,
    Kind::Error429,
    Kind::Partition,
    Kind::WatchDrop,
    Kind::Compaction,
];

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::LoseHang => "lose-response-hang",
            Kind::LoseServerTimeout => "lose-response-500",
            Kind::LoseTimeout => "lose-response-504",
            Kind::Hold => "hold-response",
            Kind::Late => "late-commit",
            Kind::WatchLag => "watch-lag",
            Kind::WatchStall => "watch-stall",
            Kind::StaleRead => "stale-read",
            Kind::Latency => "latency",
            Kind::Error500 => "errors-500",
            Kind::Error503 => "errors-503",
            Kind::Error429 => "errors-429",
            Kind::Partition => "partition",
            Kind::WatchDrop => "watch-drop",
            Kind::Compaction => "compaction",
        }
    }
}

enum Payload {
    Lose(LoseResponse),
    Hold(HoldResponse),
    Late(LateCommit),
    Watch(WatchFault),
    Stale(StaleRead),
    /// latency, jitter, agents
    Latency(u64, u64, Vec<String>),
    /// rate, code, agents
    Errors(f64, u16, Vec<String>),
    Partition(Vec<String>),
}

struct Active {
    until: Instant,
    payload: Payload,
    /// Index in the timeline.
    rec: usize,
}

/// One fault (or kill, or flap) as it happened, in store milliseconds.
#[derive(Debug, Clone)]
struct FaultRec {
    kind: &'static str,
    /// `r<i>` or `all`.
    target: String,
    start_ms: u64,
    end_ms: Option<u64>,
    detail: String,
}

fn agents_of(target: Option<usize>) -> Vec<String> {
    match target {
        Some(i) => vec![format!("{AGENT_PREFIX}r{i}")],
        None => vec![AGENT_PREFIX.to_string()],
    }
}

fn target_name(target: Option<usize>) -> String {
    target.map_or_else(|| "all".to_string(), |i| format!("r{i}"))
}

fn build(active: &[Active]) -> FaultConfig {
    let mut c = FaultConfig::default();
    for a in active {
        match &a.payload {
            Payload::Lose(l) => c.lose_responses.push(l.clone()),
            Payload::Hold(h) => c.hold_responses.push(h.clone()),
            Payload::Late(l) => c.late_commits.push(l.clone()),
            Payload::Watch(w) => c.watch_faults.push(w.clone()),
            Payload::Stale(s) => c.stale_reads.push(s.clone()),
            Payload::Latency(ms, j, ag) => {
                c.latency_ms = *ms;
                c.latency_jitter_ms = *j;
                c.agents = ag.clone();
            }
            Payload::Errors(rate, code, ag) => {
                c.error_rate = *rate;
                c.error_code = *code;
                c.agents = ag.clone();
            }
            Payload::Partition(ag) => c.partitioned.extend(ag.iter().cloned()),
        }
    }
    c
}

/// Durations: a fault that blocks every request of a replica (a partition, or every Lease answer
/// lost or held for a second or more) lasts at most
/// `BLOCKING_MS`, and a replica gets `lease/2 + 1 s` without blocking faults or kills after one,
/// so that a correct operator can always renew (renewals are due at half the Lease duration).
const SHORT_MS: (u64, u64) = (500, 8000);
const BLOCKING_MS: (u64, u64) = (500, 3000);
const KILL_DOWN_MS: (u64, u64) = (1000, 3000);
/// How late a late commit is served, past the API timeout: from half a second to four seconds
/// after it, so its client has given up on it when it lands (and a late write counted apart from
/// the non-owner writes is one its replica never saw answered), whatever `--api-timeout-seconds`.
const LATE_PAST_TIMEOUT_MS: (u64, u64) = (500, 4000);

fn late_ms(api_timeout_ms: u64) -> (u64, u64) {
    (
        api_timeout_ms + LATE_PAST_TIMEOUT_MS.0,
        api_timeout_ms + LATE_PAST_TIMEOUT_MS.1,
    )
}
/// Timeline kinds that are not API faults.
const NOT_API_FAULTS: [&str; 4] = ["replica-kill", "replica-restart", "scale-down", "node-loss"];
const FLAP_DOWN_MS: (u64, u64) = (1000, 10_000);

/// Whether stop number `done + 1` is graceful when a share `share` of the stops are: the
/// graceful ones spread evenly (with 0.25, the 4th, 8th, 12th …), so a run of n stops has
/// exactly ⌊n·share⌋ of them whatever its timing.
fn graceful_turn(done: u64, share: f64) -> bool {
    let share = share.clamp(0.0, 1.0);
    let graceful_by = |n: u64| (n as f64 * share + 1e-9).floor() as u64;
    graceful_by(done + 1) > graceful_by(done)
}

struct Injector {
    rng: StdRng,
    replicas: usize,
    cooldown: Duration,
    active: Vec<Active>,
    timeline: Vec<FaultRec>,
    /// No blocking fault and no kill on replica i before this.
    quiet_until: Vec<Instant>,
    up: Vec<bool>,
    restart_at: Vec<Option<Instant>>,
    max_overlap: usize,
    /// The range late commits are served in ([`late_ms`]).
    late_ms: (u64, u64),
}

impl Injector {
    fn ms(&mut self, (lo, hi): (u64, u64)) -> u64 {
        self.rng.random_range(lo..=hi)
    }

    /// A fault on every Lease write (`p` = 1, resource `leases` or all) blocks the renewals
    /// of the replicas it targets: like a partition, it is allowed only outside their quiet
    /// time, lasts at most [`BLOCKING_MS`] (set in `dur`) and starts their quiet time. Other
    /// faults pass unchanged.
    fn blocking_allowed(
        &mut self,
        p: f64,
        res: &str,
        target: Option<usize>,
        now: Instant,
        dur: &mut u64,
    ) -> bool {
        if p < 1.0 || !(res == "leases" || res == "*") {
            return true;
        }
        let rs = self.replicas_of(target);
        if rs.iter().any(|&i| now < self.quiet_until[i]) {
            return false;
        }
        *dur = self.ms(BLOCKING_MS);
        for i in rs {
            self.quiet_until[i] = now + Duration::from_millis(*dur) + self.cooldown;
        }
        true
    }

    fn replicas_of(&self, target: Option<usize>) -> Vec<usize> {
        target.map_or_else(|| (0..self.replicas).collect(), |i| vec![i])
    }

    /// The kind to try next: half the draws go to the kinds not injected yet (a kind refused
    /// because its slot was busy or its replicas were quiet stays among them), so a short run
    /// still sees every kind; the others are uniform.
    fn draw_kind(&mut self) -> Kind {
        let missing: Vec<Kind> = KINDS
            .iter()
            .copied()
            .filter(|k| !self.timeline.iter().any(|r| r.kind == k.name()))
            .collect();
        if !missing.is_empty() && self.rng.random_bool(0.5) {
            return missing[self.rng.random_range(0..missing.len())];
        }
        KINDS[self.rng.random_range(0..KINDS.len())]
    }

    /// Inject one random fault now (returns false when the kind drawn is not possible now).
    fn inject(&mut self, sim: &kubesim::Sim, now: Instant, now_ms: u64) -> bool {
        let kind = self.draw_kind();
        let target = if self.rng.random_bool(0.25) {
            None
        } else {
            Some(self.rng.random_range(0..self.replicas))
        };
        let agents = agents_of(target);
        let mut dur = self.ms(SHORT_MS);
        let resources = ["leases", "pods", "statefulsetlocks", "*"];
        let res = resources[self.rng.random_range(0..resources.len())];
        let with_res = |mut r: Vec<String>| {
            if res != "*" {
                r.push(res.to_string());
            }
            r
        };
        let p = [1.0, 1.0, 0.5, 0.2][self.rng.random_range(0..4)];
        let (payload, detail) = match kind {
            Kind::LoseHang | Kind::LoseServerTimeout | Kind::LoseTimeout => {
                // Every answer to a Lease write lost: the write commits, but the replica can
                // never confirm its own membership renewal, so its fence closes (as it must)
                // and nothing of it writes — a partition as far as renewals go.
                if !self.blocking_allowed(p, res, target, now, &mut dur) {
                    return false;
                }
                let mut l = match kind {
                    Kind::LoseHang => LoseResponse::hang(),
                    Kind::LoseServerTimeout => LoseResponse::server_timeout(),
                    _ => LoseResponse::timeout(),
                }
                .probability(p);
                l.agents = agents.clone();
                l.resources = with_res(vec![]);
                (Payload::Lose(l), format!("{res} p={p}"))
            }
            Kind::Hold => {
                let d = self.ms((100, 3000));
                // Every answer to the Lease writes held a second or more (more with latency on
                // top: past the API timeout) blocks renewals as a partition does: it is one, for
                // how long it lasts and the quiet time after it.
                if d >= 1000 && !self.blocking_allowed(p, res, target, now, &mut dur) {
                    return false;
                }
                let mut h = HoldResponse::new(d).probability(p);
                h.agents = agents.clone();
                h.resources = with_res(vec![]);
                (Payload::Hold(h), format!("{res} {d} ms p={p}"))
            }
            Kind::Late => {
                // Pod and Lease writes served 0.5-4 s past the API timeout, whatever the
                // replica does meanwhile. (Lock writes are left out: a claim or handoff applied
                // seconds after its replica gave up on it can move a lock under a live owner
                // that never wrote the lock since, which the ownership protocol does not fence.)
                // On every Lease write it blocks renewals as lost answers do.
                let late_res: Vec<String> = match res {
                    "leases" | "pods" => vec![res.to_string()],
                    _ => vec!["pods".to_string(), "leases".to_string()],
                };
                let blocking_res = if late_res.iter().any(|r| r == "leases") {
                    "leases"
                } else {
                    "pods"
                };
                if !self.blocking_allowed(p, blocking_res, target, now, &mut dur) {
                    return false;
                }
                let d = self.ms(self.late_ms);
                let mut l = LateCommit::new(d).probability(p);
                l.agents = agents.clone();
                l.resources = late_res.clone();
                (
                    Payload::Late(l),
                    format!("{} {d} ms p={p}", late_res.join("+")),
                )
            }
            Kind::WatchLag | Kind::WatchStall => {
                let which = ["pods", "leases", "statefulsetlocks", "membership"]
                    [self.rng.random_range(0..4)];
                let plural = if which == "membership" {
                    "leases"
                } else {
                    which
                };
                let mut w = if kind == Kind::WatchStall {
                    WatchFault::stall(plural)
                } else {
                    WatchFault::lag(plural, 0)
                };
                let lag = self.ms((100, 3000));
                if kind == Kind::WatchLag {
                    w.lag_ms = lag;
                }
                if which == "membership" {
                    w = w.label_selector(GROUP_LABEL);
                }
                w.agents = agents.clone();
                let detail = if kind == Kind::WatchLag {
                    format!("{which} {lag} ms")
                } else {
                    which.to_string()
                };
                (Payload::Watch(w), detail)
            }
            Kind::StaleRead => {
                let which = ["pods", "leases", "statefulsetlocks"][self.rng.random_range(0..3)];
                let lag = self.ms((500, 5000));
                let mut s = StaleRead::new(which, lag);
                s.agents = agents.clone();
                (Payload::Stale(s), format!("{which} {lag} ms"))
            }
            Kind::Latency | Kind::Error500 | Kind::Error503 | Kind::Error429 => {
                let busy = self
                    .active
                    .iter()
                    .any(|a| matches!(a.payload, Payload::Latency(..) | Payload::Errors(..)));
                if busy {
                    return false;
                }
                if kind == Kind::Latency {
                    let (ms, j) = (self.ms((100, 1000)), self.ms((0, 500)));
                    (
                        Payload::Latency(ms, j, agents.clone()),
                        format!("{ms}+{j} ms"),
                    )
                } else {
                    let code = match kind {
                        Kind::Error500 => 500,
                        Kind::Error503 => 503,
                        _ => 429,
                    };
                    let rate = f64::from(self.rng.random_range(5..=30u32)) / 100.0;
                    (
                        Payload::Errors(rate, code, agents.clone()),
                        format!("rate {rate}"),
                    )
                }
            }
            Kind::Partition => {
                let rs = self.replicas_of(target);
                if rs.iter().any(|&i| now < self.quiet_until[i]) {
                    return false;
                }
                dur = self.ms(BLOCKING_MS);
                for i in rs {
                    self.quiet_until[i] = now + Duration::from_millis(dur) + self.cooldown;
                }
                (Payload::Partition(agents.clone()), String::new())
            }
            Kind::WatchDrop | Kind::Compaction => {
                if kind == Kind::WatchDrop {
                    sim.faults().drop_watches();
                } else {
                    sim.compact();
                }
                self.timeline.push(FaultRec {
                    kind: kind.name(),
                    target: "all".into(),
                    start_ms: now_ms,
                    end_ms: Some(now_ms),
                    detail: String::new(),
                });
                return true;
            }
        };
        self.timeline.push(FaultRec {
            kind: kind.name(),
            target: target_name(target),
            start_ms: now_ms,
            end_ms: None,
            detail: format!("{detail} for {dur} ms").trim().to_string(),
        });
        self.active.push(Active {
            until: now + Duration::from_millis(dur),
            payload,
            rec: self.timeline.len() - 1,
        });
        self.max_overlap = self.max_overlap.max(self.active.len());
        true
    }

    /// Lift what is due; true when the configuration changed.
    fn expire(&mut self, now: Instant, now_ms: u64, all: bool) -> bool {
        let before = self.active.len();
        let timeline = &mut self.timeline;
        self.active.retain(|a| {
            let keep = !all && a.until > now;
            if !keep && let Some(r) = timeline.get_mut(a.rec) {
                r.end_ms = Some(now_ms);
            }
            keep
        });
        self.active.len() != before
    }
}

// ---------------------------------------------------------------------------------------
// Analysis

#[derive(Debug, Default)]
struct Writes {
    total: u64,
    by_resource: BTreeMap<String, u64>,
    /// Writes for a lock (lock, its Lease, its pods).
    for_locks: u64,
    non_owner: Vec<Value>,
    non_owner_count: u64,
    /// Writes served late that landed after their replica lost the lock.
    late_non_owner: Vec<Value>,
    late_non_owner_count: u64,
    claims: u64,
    claims_from_live: Vec<Value>,
}

/// The lock a write is for (locks, `<lock>-lease` Leases, `<set>-<n>` pods of known locks).
fn lock_of(c: &kubesim::CommitRecord, known: &HashSet<Key>) -> Option<Key> {
    let name = match c.resource.as_str() {
        "statefulsetlocks" => Some(c.name.as_str()),
        "leases" => c.name.strip_suffix("-lease"),
        "pods" => set_of(&c.name),
        _ => None,
    }?;
    let k = (c.namespace.clone(), name.to_string());
    known.contains(&k).then_some(k)
}

fn writes(
    log: &[kubesim::CommitRecord],
    known: &HashSet<Key>,
    tracker: &Tracker,
    offset_ms: i64,
) -> Writes {
    let mut w = Writes::default();
    // Owner and the commit that set it, per lock.
    // Per lock: its label as of its last write, that write's rv and actor, and the rv and actor
    // of the write that last changed the label.
    let mut owner: HashMap<Key, (Option<String>, u64, String, u64, String)> = HashMap::new();
    for c in log {
        let replica = c.actor.strip_prefix(AGENT_PREFIX);
        if replica.is_some() {
            w.total += 1;
            *w.by_resource.entry(c.resource.clone()).or_default() += 1;
        }
        let Some(key) = lock_of(c, known) else {
            continue;
        };
        let prev = owner.get(&key).cloned();
        let prev_owner = prev.as_ref().and_then(|p| p.0.clone());
        if let Some(r) = replica {
            w.for_locks += 1;
            let new = c.labels.get(SHARD_LABEL).cloned();
            let is_lock = c.resource == "statefulsetlocks";
            let own = prev_owner.as_deref() == Some(r);
            let claim = is_lock && !own && new.as_deref() == Some(r);
            if claim {
                w.claims += 1;
                if let Some(x) = &prev_owner {
                    // Was the previous owner's membership Lease current at this claim?
                    let at = c.at_ms as i64 + offset_ms;
                    let live = tracker.members.get(x).and_then(|h| {
                        h.iter()
                            .rev()
                            .find(|(rv, _, _)| *rv < c.rv)
                            .map(|(_, renew, dur)| renew.is_some_and(|r| r + dur > at))
                    });
                    if live == Some(true) && w.claims_from_live.len() < DETAILS_JSON {
                        w.claims_from_live.push(json!({
                            "rv": c.rv, "atMs": c.at_ms, "by": r, "lock": format!("{}/{}", key.0, key.1),
                            "previousOwner": x,
                        }));
                    }
                }
            } else if !own {
                let (count, list) = if c.late {
                    (&mut w.late_non_owner_count, &mut w.late_non_owner)
                } else {
                    (&mut w.non_owner_count, &mut w.non_owner)
                };
                *count += 1;
                if list.len() < DETAILS_JSON {
                    list.push(json!({
                        "rv": c.rv, "atMs": c.at_ms, "by": r, "verb": c.verb,
                        "resource": c.resource, "object": format!("{}/{}", c.namespace, c.name),
                        "lock": format!("{}/{}", key.0, key.1),
                        "owner": prev_owner,
                        "lastLockWriteRv": prev.as_ref().map(|p| p.1),
                        "lastLockWriteBy": prev.as_ref().map(|p| p.2.clone()),
                        "ownerSetAtRv": prev.as_ref().map(|p| p.3),
                        "ownerSetBy": prev.as_ref().map(|p| p.4.clone()),
                    }));
                }
            }
        }
        if c.resource == "statefulsetlocks" {
            let label = c.labels.get(SHARD_LABEL).cloned();
            let (moved_rv, moved_by) = match prev {
                Some((l, _, _, rv, by)) if l == label => (rv, by),
                _ => (c.rv, c.actor.clone()),
            };
            owner.insert(key, (label, c.rv, c.actor.clone(), moved_rv, moved_by));
        }
    }
    w
}

/// The ownership label of lock `k` as of its last commit at or before `at_ms`.
fn lock_owner_at(log: &[kubesim::CommitRecord], k: &Key, at_ms: u64) -> Option<String> {
    log.iter()
        .rev()
        .find(|c| {
            c.resource == "statefulsetlocks"
                && c.namespace == k.0
                && c.name == k.1
                && c.at_ms <= at_ms
        })
        .and_then(|c| c.labels.get(SHARD_LABEL).cloned())
}

#[derive(Debug, Clone)]
struct Lapse {
    lock: Key,
    holder: String,
    start_ms: u64,
    end_ms: u64,
    /// rv of the Lease write whose renewTime lapsed.
    lease_rv: u64,
    /// That renewTime (store milliseconds): what the Lease's expiry, and the renewal lane's due
    /// time, run from. Not the write's commit: a write committed late (the fault layer's late
    /// commit) carries a renewTime from before it, and is due and expires that much earlier.
    renewed_ms: u64,
}

enum Step<'a> {
    Lease(Option<&'a LeaseRec>),
    Pod(&'a str, Option<&'a PodRec>),
}

/// The write attempts of replica `owner` for lock `key` (the lock, its Lease, its pods) that
/// arrived between `from_ms` and `to_ms`, whatever their outcome. The fleet's names: lock
/// `dbN`, its Lease `dbN-lease`, its pods `dbN-<ordinal>`.
/// When `owner` got lock `key` last before `until_ms` (store milliseconds): the commit that
/// labelled it `owner` after a commit that did not (0 if it was `owner`'s from the start).
fn owner_since(log: &[kubesim::CommitRecord], key: &Key, owner: &str, until_ms: u64) -> u64 {
    let mut since = 0;
    let mut before: Option<&str> = None;
    for c in log.iter().filter(|c| {
        c.resource == "statefulsetlocks"
            && c.namespace == key.0
            && c.name == key.1
            && c.at_ms <= until_ms
    }) {
        let label = c.labels.get(SHARD_LABEL).map(String::as_str);
        if label == Some(owner) && before != Some(owner) {
            since = c.at_ms;
        }
        before = label;
    }
    since
}

/// Whether an owner whose Lease lapsed at `expiry` kept at its renewal from `start` (its due
/// time, or when it got the lock if later) on, given its writes `tried` for the lock (its
/// Lease, the lock, its pods): its first renewal of the Lease came within `prompt_ms` of
/// `start`, and from then to the expiry it was never idle longer than `timeout_ms` — idle
/// meaning no write of it in flight (a write counts from its arrival until its answer or its
/// client's timeout, whichever came first). One that sat idle and tried only near the expiry,
/// or gave up after one failed try, had its chance, whatever the fault layer did to its tries.
fn renewed_promptly_and_persistently(
    tried: &[&kubesim::WriteAttempt],
    start: u64,
    expiry: u64,
    prompt_ms: u64,
    timeout_ms: u64,
) -> bool {
    let Some(first) = tried
        .iter()
        .filter(|a| a.resource == "leases")
        .map(|a| a.at_ms)
        .min()
    else {
        return false;
    };
    if first > start + prompt_ms {
        return false;
    }
    let mut busy: Vec<(u64, u64)> = tried
        .iter()
        .filter(|a| a.at_ms >= first)
        .map(|a| (a.at_ms, a.at_ms + a.elapsed_ms.min(timeout_ms)))
        .collect();
    busy.sort_unstable();
    let mut free_from = first;
    for (from, to) in busy {
        if from > free_from + timeout_ms {
            return false;
        }
        free_from = free_from.max(to);
    }
    free_from + timeout_ms >= expiry
}

/// One write attempt in a report: [arrival ms, method, resource, name, status (0: no answer),
/// ms to answer].
fn attempt_json(a: &kubesim::WriteAttempt) -> Value {
    json!([
        a.at_ms,
        a.method,
        a.resource,
        a.name,
        a.status,
        a.elapsed_ms
    ])
}

fn attempts_for_lock<'a>(
    attempts: &'a [kubesim::WriteAttempt],
    owner: &str,
    key: &'a Key,
    from_ms: u64,
    to_ms: u64,
) -> impl Iterator<Item = &'a kubesim::WriteAttempt> + 'a {
    let agent = format!("{AGENT_PREFIX}{owner}");
    let (ns, lock) = (&key.0, &key.1);
    let (lease, pods) = (format!("{lock}-lease"), format!("{lock}-"));
    attempts.iter().filter(move |a| {
        a.at_ms >= from_ms
            && a.at_ms <= to_ms
            && a.actor == agent
            && a.namespace == *ns
            && match a.resource.as_str() {
                "statefulsetlocks" => a.name == *lock,
                "leases" => a.name == lease,
                "pods" => a.name.starts_with(&pods),
                _ => false,
            }
    })
}

fn lapses(
    key: &Key,
    t: &LockTrack,
    at_of: &dyn Fn(u64) -> u64,
    offset_ms: i64,
    from_ms: u64,
    to_ms: u64,
) -> Vec<Lapse> {
    let mut steps: Vec<(u64, Step)> = t
        .lease
        .iter()
        .map(|(rv, r)| (*rv, Step::Lease(r.as_ref())))
        .collect();
    for (name, h) in &t.pods {
        steps.extend(h.iter().map(|(rv, r)| (*rv, Step::Pod(name, r.as_ref()))));
    }
    steps.sort_by_key(|s| s.0);
    let mut lease: Option<(u64, &LeaseRec)> = None;
    let mut pods: HashMap<&str, &PodRec> = HashMap::new();
    let mut out: Vec<Lapse> = vec![];
    for i in 0..steps.len() {
        let rv = steps[i].0;
        match &steps[i].1 {
            Step::Lease(r) => lease = r.map(|r| (rv, r)),
            Step::Pod(n, Some(p)) => {
                pods.insert(*n, *p);
            }
            Step::Pod(n, None) => {
                pods.remove(*n);
            }
        }
        let t0 = at_of(rv);
        let t1 = steps.get(i + 1).map_or(to_ms, |s| at_of(s.0));
        let Some((lrv, l)) = lease else { continue };
        let (Some(h), Some(renew)) = (l.holder.as_deref(), l.renew_ms) else {
            continue;
        };
        if !pods.get(h).is_some_and(|p| p.ready && p.writer) {
            continue;
        }
        let deadline = u64::try_from(renew + l.dur_ms - offset_ms).unwrap_or(0);
        let renewed_ms = u64::try_from(renew - offset_ms).unwrap_or(0);
        let (s, e) = (t0.max(deadline).max(from_ms), t1.min(to_ms));
        if s >= e {
            continue;
        }
        match out.last_mut() {
            Some(x) if x.end_ms == s && x.holder == h && x.lease_rv == lrv => x.end_ms = e,
            _ => out.push(Lapse {
                lock: key.clone(),
                holder: h.to_string(),
                start_ms: s,
                end_ms: e,
                lease_rv: lrv,
                renewed_ms,
            }),
        }
    }
    out
}

/// Convergence of every lock from a fresh (quorum) read of the API, as a cross-check of the
/// tracker: the number of locks converged.
async fn api_converged(client: &kube::Client, locks: &[Key]) -> anyhow::Result<usize> {
    let mut tracks: HashMap<Key, LockTrack> = HashMap::new();
    let lp = ListParams::default();
    for p in Api::<Pod>::all(client.clone()).list(&lp).await?.items {
        let (ns, name) = (p.namespace().unwrap_or_default(), p.name_any());
        let Some(set) = set_of(&name) else { continue };
        let v = serde_json::to_value(&p)?;
        tracks
            .entry((ns, set.to_string()))
            .or_default()
            .pods
            .insert(name.clone(), vec![(0, Some(pod_rec(&v)))]);
    }
    for l in Api::<Lease>::all(client.clone()).list(&lp).await?.items {
        let (ns, name) = (l.namespace().unwrap_or_default(), l.name_any());
        let Some(lock) = name.strip_suffix("-lease") else {
            continue;
        };
        let v = serde_json::to_value(&l)?;
        tracks
            .entry((ns, lock.to_string()))
            .or_default()
            .lease
            .push((0, Some(lease_rec(&v))));
    }
    for l in Api::<StatefulSetLock>::all(client.clone())
        .list(&lp)
        .await?
        .items
    {
        let k = (l.namespace().unwrap_or_default(), l.name_any());
        tracks.entry(k).or_default().writer_pod = l.status.and_then(|s| s.writer_pod);
    }
    Ok(locks
        .iter()
        .filter(|k| tracks.get(*k).is_some_and(|t| t.unconverged().is_none()))
        .count())
}

// ---------------------------------------------------------------------------------------
// The scenario

fn say(json: bool, s: String) {
    if json {
        eprintln!("{s}");
    } else {
        println!("{s}");
    }
}

fn all_converged(tracker: &Mutex<Tracker>, locks: &[Key]) -> usize {
    let t = lock(tracker);
    locks
        .iter()
        .filter(|k| t.locks.get(*k).is_some_and(|t| t.converged_since.is_some()))
        .count()
}

pub(crate) async fn faults(args: &Args) -> anyhow::Result<()> {
    let seed = args.seed.unwrap_or_else(|| rand::rng().random());
    let mut fleet = Fleet::new(args);
    let tracker = Arc::new(Mutex::new(Tracker::default()));
    let tracker_task = spawn_tracker(&fleet.sim, tracker.clone());
    // renewTime (wall clock, ms since the epoch) − offset = store milliseconds.
    let offset_ms = wall_ms() - fleet.sim.store().elapsed_ms() as i64;
    let nss = tenants("tenant", args.namespaces);
    fleet.install(&nss).await?;
    fleet.add_locks(&nss, args.locks).await?;
    let keys: Vec<Key> = fleet.locks.clone();
    let known: HashSet<Key> = keys.iter().cloned().collect();
    for i in 0..args.replicas {
        fleet.start_replica(i);
    }
    let lease_ms = u64::try_from(args.lease_seconds).unwrap_or(10) * 1000;
    let api_timeout = args.api_timeout_seconds.unwrap_or(2);
    say(
        args.json,
        format!(
            "faults: {} replicas, {} locks ({} pods each) in {} namespaces, {} s Leases, {} s membership, api timeout {api_timeout} s, seed {seed}; {} s of faults (one every ~{} ms), writer flaps every ~{} ms, replica stops every ~{} ms ({:.0} % graceful), scale events every ~{} ms, node losses every ~{} ms (0: none)",
            args.replicas,
            args.locks,
            args.pods,
            nss.len(),
            args.lease_seconds,
            args.membership_seconds,
            args.seconds,
            args.fault_every_ms,
            args.flap_every_ms,
            args.kill_every_ms.unwrap_or(args.kill_every * 1000),
            args.graceful_share * 100.0,
            args.scale_every_ms,
            args.node_loss_every_ms
        ),
    );
    let settle_start = Instant::now();
    while all_converged(&tracker, &keys) < keys.len() {
        anyhow::ensure!(
            settle_start.elapsed() < Duration::from_secs(600),
            "only {} of {} locks converged after 600 s before any fault",
            all_converged(&tracker, &keys),
            keys.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    say(
        args.json,
        format!(
            "settled: {} locks converged in {:.1} s",
            keys.len(),
            settle_start.elapsed().as_secs_f64()
        ),
    );
    // Let the first renewals happen so every Lease is on its schedule.
    tokio::time::sleep(Duration::from_millis(lease_ms / 2 + 500)).await;

    let now = Instant::now();
    let mut inj = Injector {
        rng: StdRng::seed_from_u64(seed),
        replicas: args.replicas,
        cooldown: Duration::from_millis(lease_ms / 2 + 1000),
        active: vec![],
        timeline: vec![],
        quiet_until: vec![now; args.replicas],
        up: vec![true; args.replicas],
        restart_at: vec![None; args.replicas],
        max_overlap: 0,
        late_ms: late_ms(api_timeout * 1000),
    };
    let from_ms = fleet.sim.store().elapsed_ms();
    let end = now + Duration::from_secs(args.seconds);
    let mut next_fault = now;
    let mut next_flap = now;
    let kill_ms = args.kill_every_ms.unwrap_or(args.kill_every * 1000);
    let mut next_kill = now + Duration::from_millis(kill_ms.max(1));
    let mut next_scale = now + Duration::from_millis(args.scale_every_ms);
    let mut next_node_loss = now + Duration::from_millis(args.node_loss_every_ms);
    let mut next_sample = now;
    // Replicas told to stop gracefully, until their task has finished.
    let mut stopping: Vec<Option<tokio::task::JoinHandle<()>>> =
        (0..args.replicas).map(|_| None).collect();
    // StatefulSets scaled down by one pod, and when they are scaled back.
    let mut scaled: Vec<(Instant, Key)> = vec![];
    let mut lost_node: Option<(Instant, String)> = None;
    let mut ev = Events::default();
    let mut next_progress = now + Duration::from_secs(30);
    let mut recoveries: Vec<(Instant, String, String)> = vec![];
    let mut flapped: HashSet<Key> = HashSet::new();
    let (mut flaps, mut kills) = (0u64, 0u64);
    while Instant::now() < end {
        let now = Instant::now();
        let now_ms = fleet.sim.store().elapsed_ms();
        let mut changed = inj.expire(now, now_ms, false);
        for (i, stop) in stopping.iter_mut().enumerate() {
            let stopped = stop.as_ref().is_none_or(|h| h.is_finished());
            if stopped && inj.restart_at[i].is_some_and(|t| t <= now) {
                *stop = None;
                fleet.start_replica(i);
                inj.up[i] = true;
                inj.restart_at[i] = None;
            }
        }
        if now >= next_sample {
            ev.rss
                .push((now_ms, kubesim::html::rss_kib("self").unwrap_or(0)));
            next_sample = now + Duration::from_secs(1);
        }
        let mut k = 0;
        while k < scaled.len() {
            if scaled[k].0 <= now {
                let (_, key) = scaled.swap_remove(k);
                scale(&fleet.client, &key, args.pods).await;
            } else {
                k += 1;
            }
        }
        if lost_node.as_ref().is_some_and(|(t, _)| *t <= now)
            && let Some((_, node)) = lost_node.take()
        {
            let _ = fleet.sim.pods().node(&node, "restore");
        }
        if args.scale_every_ms > 0 && now >= next_scale {
            let key = keys[inj.rng.random_range(0..keys.len())].clone();
            if !scaled.iter().any(|(_, k)| *k == key) {
                let last_pod = format!("{}-{}", key.1, args.pods - 1);
                let writer = lock(&tracker)
                    .locks
                    .get(&key)
                    .and_then(|t| t.ready_writer().map(str::to_string));
                if scale(&fleet.client, &key, args.pods - 1).await {
                    let back = inj.ms((2000, 8000));
                    if writer.as_deref() == Some(last_pod.as_str()) {
                        ev.writers_scaled_away += 1;
                    }
                    ev.scale_events += 1;
                    inj.timeline.push(FaultRec {
                        kind: "scale-down",
                        target: format!("{}/{}", key.0, key.1),
                        start_ms: now_ms,
                        end_ms: Some(now_ms + back),
                        detail: format!("to {} pods for {back} ms", args.pods - 1),
                    });
                    scaled.push((now + Duration::from_millis(back), key));
                }
            }
            next_scale =
                now + Duration::from_millis(inj.rng.random_range(0..=2 * args.scale_every_ms));
        }
        if args.node_loss_every_ms > 0 && now >= next_node_loss && lost_node.is_none() {
            let node = format!("kubesim-node-{}", inj.rng.random_range(1..=3));
            let down = inj.ms((2000, 15_000));
            if let Ok(pods) = fleet.sim.pods().node(&node, "lose") {
                ev.node_losses += 1;
                inj.timeline.push(FaultRec {
                    kind: "node-loss",
                    target: node.clone(),
                    start_ms: now_ms,
                    end_ms: Some(now_ms + down),
                    detail: format!("{pods} pods NotReady for {down} ms"),
                });
                lost_node = Some((now + Duration::from_millis(down), node));
            }
            next_node_loss =
                now + Duration::from_millis(inj.rng.random_range(0..=2 * args.node_loss_every_ms));
        }
        recoveries.retain(|(t, ns, pod)| {
            if *t > now {
                return true;
            }
            let _ = fleet.sim.pods().set_ready(ns, pod, true);
            flapped.remove(&(ns.clone(), pod.clone()));
            false
        });
        if now >= next_fault {
            for _ in 0..5 {
                if inj.inject(&fleet.sim, now, now_ms) {
                    changed = true;
                    break;
                }
            }
            next_fault = now
                + Duration::from_millis(inj.rng.random_range(0..=2 * args.fault_every_ms.max(1)));
        }
        if changed {
            fleet.sim.faults().set(build(&inj.active));
        }
        if args.flap_every_ms > 0 && now >= next_flap {
            let k = &keys[inj.rng.random_range(0..keys.len())];
            let w = lock(&tracker)
                .locks
                .get(k)
                .and_then(|t| t.ready_writer().map(str::to_string));
            if let Some(w) = w
                && !flapped.contains(&(k.0.clone(), w.clone()))
                && fleet.sim.pods().set_ready(&k.0, &w, false).is_ok()
            {
                flaps += 1;
                flapped.insert((k.0.clone(), w.clone()));
                let down = inj.ms(FLAP_DOWN_MS);
                recoveries.push((now + Duration::from_millis(down), k.0.clone(), w));
            }
            next_flap =
                now + Duration::from_millis(inj.rng.random_range(0..=2 * args.flap_every_ms));
        }
        if args.kill_every > 0 && now >= next_kill {
            let up = inj.up.iter().filter(|u| **u).count();
            let candidates: Vec<usize> = (0..args.replicas)
                .filter(|&i| inj.up[i] && now >= inj.quiet_until[i])
                .collect();
            if up >= 2 && !candidates.is_empty() {
                let i = candidates[inj.rng.random_range(0..candidates.len())];
                // The share is kept exactly, not drawn: which stop is graceful must not hang
                // on how many draws the run's timing put before it (a short run could draw none).
                let graceful = graceful_turn(kills + ev.graceful_restarts, args.graceful_share);
                let stopped = if graceful {
                    fleet.begin_stop(i).map(|h| stopping[i] = Some(h)).is_some()
                } else {
                    fleet.kill_replica(i)
                };
                if stopped {
                    if graceful {
                        ev.graceful_restarts += 1;
                    } else {
                        kills += 1;
                    }
                    let down = inj.ms(KILL_DOWN_MS);
                    inj.up[i] = false;
                    inj.restart_at[i] = Some(now + Duration::from_millis(down));
                    inj.quiet_until[i] = now + Duration::from_millis(down) + inj.cooldown;
                    inj.timeline.push(FaultRec {
                        kind: if graceful {
                            "replica-restart"
                        } else {
                            "replica-kill"
                        },
                        target: format!("r{i}"),
                        start_ms: now_ms,
                        end_ms: Some(now_ms + down),
                        detail: format!("down {down} ms"),
                    });
                }
            }
            let ms = kill_ms.max(2);
            next_kill = now + Duration::from_millis(inj.rng.random_range(ms / 2..=ms * 3 / 2));
        }
        if now >= next_progress {
            let t = lock(&tracker);
            say(
                args.json,
                format!(
                    "  t={:.0}s: {} faults so far, {} active, {kills} kills, {flaps} flaps, {} commits tracked, tracker lagged {}",
                    now.duration_since(end - Duration::from_secs(args.seconds))
                        .as_secs_f64(),
                    inj.timeline.len(),
                    inj.active.len(),
                    t.events,
                    t.lagged
                ),
            );
            next_progress = now + Duration::from_secs(30);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Lift everything: faults, flaps, kills.
    let lift = Instant::now();
    let lift_ms = fleet.sim.store().elapsed_ms();
    inj.expire(lift, lift_ms, true);
    fleet.sim.faults().set(FaultConfig::default());
    for (_, ns, pod) in recoveries.drain(..) {
        let _ = fleet.sim.pods().set_ready(&ns, &pod, true);
    }
    if let Some((_, node)) = lost_node.take() {
        let _ = fleet.sim.pods().node(&node, "restore");
    }
    for (_, key) in scaled.drain(..) {
        scale(&fleet.client, &key, args.pods).await;
    }
    for (i, stop) in stopping.iter_mut().enumerate() {
        if inj.restart_at[i].take().is_some() {
            if let Some(h) = stop.take() {
                let _ = tokio::time::timeout(Duration::from_secs(30), h).await;
            }
            fleet.start_replica(i);
            inj.up[i] = true;
        }
    }
    say(
        args.json,
        format!(
            "fault period over: {} faults, {kills} kills, {flaps} flaps; all lifted, measuring convergence (limit {} s)",
            inj.timeline.len(),
            args.converge_seconds
        ),
    );
    let limit = Duration::from_secs(args.converge_seconds);
    let mut confirmed = false;
    // Writes sent before the lift may still be served late after it: convergence is
    // confirmed only once the last of them has landed.
    let drained = Duration::from_millis(inj.late_ms.1 + 500);
    while lift.elapsed() < limit {
        if lift.elapsed() >= drained && all_converged(&tracker, &keys) == keys.len() {
            // Still converged a moment later (nothing was in flight)?
            tokio::time::sleep(Duration::from_secs(2)).await;
            if all_converged(&tracker, &keys) == keys.len() {
                confirmed = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let api_ok = api_converged(&fleet.client, &keys).await?;
    let to_ms = fleet.sim.store().elapsed_ms();
    for i in 0..args.replicas {
        fleet.kill_replica(i);
    }
    // Let the last broadcast events in.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let report = fleet.sim.report();
    let log = fleet.sim.commit_log();
    let at: HashMap<u64, u64> = log.iter().map(|c| (c.rv, c.at_ms)).collect();
    let missing = std::cell::Cell::new(0u64);
    let at_of = |rv: u64| -> u64 {
        at.get(&rv).copied().unwrap_or_else(|| {
            missing.set(missing.get() + 1);
            0
        })
    };
    let t = lock(&tracker);
    let w = writes(&log, &known, &t, offset_ms);
    let mut all_lapses: Vec<Lapse> = vec![];
    let mut converge: Vec<u64> = vec![];
    let mut unconverged: Vec<(Key, String)> = vec![];
    for k in &keys {
        let Some(lt) = t.locks.get(k) else {
            unconverged.push((k.clone(), "never seen".into()));
            continue;
        };
        all_lapses.extend(lapses(k, lt, &at_of, offset_ms, from_ms, to_ms));
        match (lt.converged_since, lt.unconverged()) {
            (Some(rv), _) => converge.push(at_of(rv).saturating_sub(lift_ms)),
            (None, why) => unconverged.push((k.clone(), why.unwrap_or_default())),
        }
    }
    let (events, lagged) = (t.events, t.lagged);
    drop(t);
    tracker_task.abort();
    converge.sort_unstable();
    all_lapses.sort_by_key(|l| l.start_ms);
    let mut by_kind: BTreeMap<&str, u64> = BTreeMap::new();
    for f in &inj.timeline {
        *by_kind.entry(f.kind).or_default() += 1;
    }
    // API faults only: replica stops, scale events and node losses are counted on their own.
    let faults_injected = inj
        .timeline
        .iter()
        .filter(|f| !NOT_API_FAULTS.contains(&f.kind))
        .count() as u64;
    let max_dual = report
        .statefulsets
        .values()
        .flat_map(|s| s.dual_writer.iter())
        .map(|i| i.duration_ms(report.now_ms))
        .max()
        .unwrap_or(0);
    let lapse_ms: u64 = all_lapses.iter().map(|l| l.end_ms - l.start_ms).sum();
    let lapse_max = all_lapses
        .iter()
        .map(|l| l.end_ms - l.start_ms)
        .max()
        .unwrap_or(0);
    // Whose lapse (see the module doc): the owner's down times as the injector recorded them.
    let down_of = |owner: &str| -> Vec<(u64, u64)> {
        inj.timeline
            .iter()
            .filter(|f| {
                (f.kind == "replica-kill" || f.kind == "replica-restart") && f.target == owner
            })
            .map(|f| (f.start_ms, f.end_ms.unwrap_or(u64::MAX)))
            .collect()
    };
    let owner_down_at_due = |l: &Lapse| -> bool {
        // From the Lease's renewTime, as the renewal lane schedules (see `Lapse::renewed_ms`).
        let renewed = l.renewed_ms;
        // The Lease's expiry: a lapse starts later when its holder was not Ready then (it
        // starts when the holder turns Ready again), but the renewal was missed by then.
        let (due, expiry) = (renewed + lease_ms / 2, l.start_ms.min(renewed + lease_ms));
        let down_in_window = |owner: &str| {
            down_of(owner)
                .iter()
                .any(|&(down, back)| down < expiry && back > due && back + lease_ms / 2 > expiry)
        };
        let at_expiry = lock_owner_at(&log, &l.lock, expiry);
        if at_expiry.as_deref().is_some_and(down_in_window) {
            return true;
        }
        // The owner when the renewal was due went down; the replica that owns the lock at the
        // expiry claimed it (after the dead owner's membership ran out) less than half a Lease
        // before the expiry, later than any renewal gets after it is due.
        let Some(at_due) = lock_owner_at(&log, &l.lock, due) else {
            return false;
        };
        if Some(&at_due) == at_expiry.as_ref() || !down_in_window(&at_due) {
            return false;
        }
        let claimed = log
            .iter()
            .find(|c| {
                c.resource == "statefulsetlocks"
                    && c.namespace == l.lock.0
                    && c.name == l.lock.1
                    && c.at_ms >= due
                    && c.labels.get(SHARD_LABEL) == at_expiry.as_ref()
            })
            .map(|c| c.at_ms);
        claimed.is_none_or(|c| c + lease_ms / 2 > expiry)
    };
    // The owner was up but the fault layer defeated every write it tried for the lock between
    // the due time and the expiry: each answered with an error (5xx, 429), only after the
    // client had given up (the API timeout), or never. An owner that tried nothing in that
    // window, or got any answer in time, had its chance: that lapse stays the operator's.
    let attempts = fleet.sim.write_attempts();
    let timeout_ms = api_timeout * 1000;
    let membership_ms = args.membership_seconds * 1000;
    let owner_cut_off = |l: &Lapse| -> bool {
        // The owner when the Lease expired (a lapse starts later when its holder was not Ready
        // then, and the lock may have moved on meanwhile).
        let expired = l.start_ms.min(l.renewed_ms + lease_ms);
        let Some(owner) = lock_owner_at(&log, &l.lock, expired) else {
            return false;
        };
        let renewed = l.renewed_ms;
        let (due, expiry) = (renewed + lease_ms / 2, l.start_ms);
        // Slowed past the expiry by the fault layer: answered after it while latency, a late
        // commit or a held answer was injected on the owner's requests when the try arrived.
        let slowed = |a: &kubesim::WriteAttempt| {
            a.at_ms + a.elapsed_ms > expiry
                && inj.timeline.iter().any(|f| {
                    matches!(f.kind, "latency" | "late-commit" | "hold-response")
                        && (f.target == owner || f.target == "all")
                        && f.start_ms <= a.at_ms
                        && f.end_ms.is_none_or(|end| end >= a.at_ms)
                })
        };
        let defeated = |a: &kubesim::WriteAttempt| {
            a.status == 0
                || a.status == 429
                || a.status >= 500
                || a.elapsed_ms >= timeout_ms
                || slowed(a)
        };
        // From a little before the due time: the renewal lane schedules each renewal up to 5 %
        // of half a Lease early (its jitter), and a try made then is the try at the due time
        // (the P5 run's db28: renewed 15 ms before the nominal due time, that try lost, its
        // retry 2.5 s later counted as the first).
        let window_from = due.saturating_sub(lease_ms / 20);
        let tried: Vec<_> =
            attempts_for_lock(&attempts, &owner, &l.lock, window_from, expiry).collect();
        // Only a write of the Lease renews it: a confirmation of the lock that got through
        // (P5 run of seed 20261216: an owner back from a kill confirmed its locks, then every
        // renewal of their Leases timed out or committed past the expiry) renews nothing.
        let renewals_tried: Vec<_> = tried
            .iter()
            .copied()
            .filter(|a| a.resource == "leases")
            .collect();
        let lock_defeated = renewals_tried.iter().all(|a| defeated(a));
        // And it tried in time and kept trying (see `renewed_promptly_and_persistently`).
        let since = owner_since(&log, &l.lock, &owner, expiry);
        let prompt = renewed_promptly_and_persistently(
            &tried,
            due.max(since),
            expiry,
            lease_ms / 4,
            timeout_ms,
        );
        // Or its fence was shut by faults: every renewal of its own membership Lease, from a
        // membership Lease before the due time (or from its last restart, if later: an earlier
        // process's renewals open no fence of this one) to the expiry, failed (a replica
        // writes nothing without a live membership), and nothing it tried for the lock got
        // through.
        let member = format!("stslock-{owner}");
        let agent = format!("{AGENT_PREFIX}{owner}");
        let restarted = down_of(&owner)
            .iter()
            .map(|&(_, back)| back)
            .filter(|&back| back <= expiry)
            .max()
            .unwrap_or(0);
        let from = due.saturating_sub(membership_ms).max(restarted);
        let renewals: Vec<_> = attempts
            .iter()
            .filter(|a| {
                a.actor == agent
                    && a.resource == "leases"
                    && a.name == member
                    && a.at_ms >= from
                    && a.at_ms <= expiry
            })
            .collect();
        let fence_shut = !renewals.is_empty() && renewals.iter().all(|a| defeated(a));
        // Or it was shut until less than half a Lease before the expiry (as for an owner back
        // from a restart only then, see `owner_down_at_due`): the owner tried to renew its
        // membership before that, and none of its renewals committed until then — the fence
        // opens on a committed renewal (answered, or read back), never before it commits.
        let tried_early = renewals.iter().any(|a| a.at_ms + lease_ms / 2 <= expiry);
        let first_commit = log
            .iter()
            .filter(|c| {
                c.actor == agent && c.resource == "leases" && c.name == member && c.at_ms >= from
            })
            .map(|c| c.at_ms)
            .min();
        let opened_late = tried_early && first_commit.is_none_or(|at| at + lease_ms / 2 > expiry);
        (fence_shut || opened_late || prompt) && lock_defeated
    };
    #[derive(Clone, Copy, PartialEq)]
    enum Cause {
        Operator,
        OwnerDown,
        OwnerCutOff,
    }
    let causes: Vec<Cause> = all_lapses
        .iter()
        .map(|l| {
            if owner_down_at_due(l) {
                Cause::OwnerDown
            } else if owner_cut_off(l) {
                Cause::OwnerCutOff
            } else {
                Cause::Operator
            }
        })
        .collect();
    let excused: Vec<bool> = causes.iter().map(|c| *c != Cause::Operator).collect();
    let operator_lapses = excused.iter().filter(|e| !**e).count();
    let cut_off_lapses = causes.iter().filter(|c| **c == Cause::OwnerCutOff).count();
    let down_lapses = causes.iter().filter(|c| **c == Cause::OwnerDown).count();
    let operator_lapse_ms: u64 = all_lapses
        .iter()
        .zip(&excused)
        .filter(|(_, e)| !**e)
        .map(|(l, _)| l.end_ms - l.start_ms)
        .sum();
    // The faults on the lock's owner around each lapse (evidence for whoever fixes it).
    let owner_at = |k: &Key, at_ms: u64| lock_owner_at(&log, k, at_ms);
    let faults_near = |owner: Option<&str>, from: u64, to: u64| -> Vec<String> {
        inj.timeline
            .iter()
            .filter(|f| {
                (f.target == "all" || Some(f.target.as_str()) == owner)
                    && f.start_ms <= to
                    && f.end_ms.unwrap_or(to) >= from
            })
            .map(|f| {
                format!(
                    "{}@{} [{}..{}] {}",
                    f.kind,
                    f.target,
                    f.start_ms,
                    f.end_ms.map_or("-".into(), |e| e.to_string()),
                    f.detail
                )
            })
            .collect()
    };
    // Each dual-writer interval with what led to it: every commit for its lock (lock, Lease,
    // pods, with the pods' role label and the lock's shard label) from 10 s before to 1 s
    // after, and the faults on the lock's owner then.
    let duals: Vec<Value> = report
        .statefulsets
        .iter()
        .flat_map(|(set, s)| s.dual_writer.iter().map(move |i| (set, i)))
        .take(DETAILS_JSON)
        .map(|(set, i)| {
            // fleet names each lock after its StatefulSet.
            let key: Option<Key> = set
                .split_once('/')
                .map(|(ns, name)| (ns.to_string(), name.to_string()));
            let (from, to) = (
                i.start_ms.saturating_sub(10_000),
                i.end_ms.unwrap_or(report.now_ms) + 1000,
            );
            let owner = key.as_ref().and_then(|k| owner_at(k, i.start_ms));
            let commits: Vec<Value> = log
                .iter()
                .filter(|c| {
                    c.at_ms >= from && c.at_ms <= to && key.is_some() && lock_of(c, &known) == key
                })
                .take(200)
                .map(|c| {
                    json!([
                        c.rv,
                        c.at_ms,
                        c.actor,
                        c.verb,
                        c.resource,
                        c.name,
                        c.labels.get(SHARD_LABEL),
                        c.labels.get(ROLE_LABEL)
                    ])
                })
                .collect();
            // What the owner sent for the lock in that window, answered or not (a write that
            // lands late shows here with its arrival time and how long it took).
            let tried: Vec<Value> = match (owner.as_deref(), key.as_ref()) {
                (Some(o), Some(k)) => attempts_for_lock(&attempts, o, k, from, to)
                    .take(200)
                    .map(attempt_json)
                    .collect(),
                _ => vec![],
            };
            json!({
                "statefulSet": set, "startMs": i.start_ms, "endMs": i.end_ms,
                "owner": owner, "commits": commits, "ownerAttempts": tried,
                "faultsOnOwner": faults_near(owner.as_deref(), from, to),
            })
        })
        .collect();
    // The operator's lapses first (in time order), then the others.
    let mut order: Vec<usize> = (0..all_lapses.len()).collect();
    order.sort_by_key(|&n| (excused[n], all_lapses[n].start_ms));
    let lapse_details: Vec<Value> = order
        .iter()
        .take(DETAILS_JSON)
        .enumerate()
        .map(|(k, &n)| {
            let l = &all_lapses[n];
            let owner = owner_at(&l.lock, l.start_ms);
            let lw = log.iter().find(|c| c.rv == l.lease_rv);
            let (w0, w1) = (l.start_ms.saturating_sub(lease_ms), l.end_ms + 1000);
            let agent = owner.as_ref().map(|o| format!("{AGENT_PREFIX}{o}"));
            let owner_writes = log
                .iter()
                .filter(|c| c.at_ms >= w0 && c.at_ms <= l.end_ms && Some(&c.actor) == agent.as_ref())
                .count();
            // The first lapses also get every commit for their lock around them.
            let commits: Vec<Value> = if k < 10 {
                log.iter()
                    .filter(|c| {
                        c.at_ms >= w0
                            && c.at_ms <= w1
                            && lock_of(c, &known).as_ref() == Some(&l.lock)
                    })
                    .take(60)
                    .map(|c| {
                        json!([c.rv, c.at_ms, c.actor, c.verb, c.resource, c.name, c.labels.get(SHARD_LABEL)])
                    })
                    .collect()
            } else {
                vec![]
            };
            // What the owner tried for the lock from the renewal that lapsed to the end of the
            // lapse: [arrival ms, method, resource, name, status (0: no answer), ms to answer].
            let renewed = lw.map_or(w0, |c| c.at_ms);
            let tried: Vec<Value> = owner
                .as_deref()
                .map(|o| {
                    attempts_for_lock(&attempts, o, &l.lock, renewed, l.end_ms)
                        .take(60)
                        .map(attempt_json)
                        .collect()
                })
                .unwrap_or_default();
            // Every replica that owned the lock from the renewal that lapsed to the end of the
            // lapse (the one that missed the renewal may have handed the lock on before the
            // lapse began): what each tried for it, how much it wrote in all, and its faults.
            let mut owners: Vec<String> = owner_at(&l.lock, renewed).into_iter().collect();
            for c in log.iter().filter(|c| {
                c.resource == "statefulsetlocks"
                    && c.namespace == l.lock.0
                    && c.name == l.lock.1
                    && c.at_ms >= renewed
                    && c.at_ms <= l.end_ms
            }) {
                if let Some(o) = c.labels.get(SHARD_LABEL)
                    && !owners.contains(o)
                {
                    owners.push(o.clone());
                }
            }
            let owners: Vec<Value> = owners
                .iter()
                .map(|o| {
                    let agent = format!("{AGENT_PREFIX}{o}");
                    json!({
                        "id": o,
                        "attempts": attempts_for_lock(&attempts, o, &l.lock, renewed, l.end_ms)
                            .take(60)
                            .map(attempt_json)
                            .collect::<Vec<_>>(),
                        "writesInWindow": log
                            .iter()
                            .filter(|c| c.at_ms >= renewed && c.at_ms <= l.end_ms && c.actor == agent)
                            .count(),
                        "faults": faults_near(Some(o), renewed, l.end_ms)
                            .into_iter()
                            .filter(|f| !f.contains("@all "))
                            .collect::<Vec<_>>(),
                    })
                })
                .collect();
            json!({
                "ownerAttempts": tried,
                "owners": owners,
                "cause": match causes[n] {
                    Cause::OwnerDown => "owner down when the renewal was due",
                    Cause::OwnerCutOff => "owner cut off: every renewal of the Lease it tried failed by faults",
                    Cause::Operator => "operator",
                },
                "ownerWritesInWindow": owner_writes,
                "commits": commits,
                "lock": format!("{}/{}", l.lock.0, l.lock.1), "holder": l.holder,
                "startMs": l.start_ms, "endMs": l.end_ms, "ms": l.end_ms - l.start_ms,
                "owner": owner,
                "lastLeaseWrite": lw.map(|c| json!({"rv": c.rv, "atMs": c.at_ms, "actor": c.actor, "verb": c.verb})),
                "faultsOnOwner": faults_near(owner.as_deref(), l.start_ms.saturating_sub(lease_ms), l.end_ms),
            })
        })
        .collect();
    let secs = (lift_ms - from_ms) as f64 / 1000.0;
    // Writer failures as kubesim saw them: every interval without a Ready writer that began in
    // the fault period (a flap, a node loss, a scaled-away writer; several at once count once).
    let writer_failures = report
        .statefulsets
        .values()
        .flat_map(|s| s.no_ready_writer.iter())
        .filter(|i| i.start_ms >= from_ms)
        .count();
    let converged_in_time = confirmed
        && unconverged.is_empty()
        && converge
            .last()
            .is_some_and(|m| *m <= limit.as_millis() as u64);
    let mut violations: Vec<String> = vec![];
    if report.dual_writer_intervals > 0 {
        violations.push(format!(
            "{} dual-writer intervals ({} ms)",
            report.dual_writer_intervals, report.dual_writer_ms
        ));
    }
    if w.non_owner_count > 0 {
        violations.push(format!("{} writes by a non-owner", w.non_owner_count));
    }
    // Found, but not failed on (`--lapses-reported-only`).
    let mut reported = vec![];
    if operator_lapses > 0 {
        let what = format!(
            "{operator_lapses} Lease lapses of a Ready writer caused by the operator ({operator_lapse_ms} ms)"
        );
        if args.lapses_reported_only {
            reported.push(what);
        } else {
            violations.push(what);
        }
    }
    if !converged_in_time {
        violations.push(format!(
            "{} of {} locks not converged within {} s",
            unconverged.len(),
            keys.len(),
            args.converge_seconds
        ));
    }
    if lagged > 0 || missing.get() > 0 {
        violations.push(format!(
            "measurement incomplete: tracker lagged {lagged} events, {} commits not in the commit log",
            missing.get()
        ));
    }
    let out = json!({
        "scenario": "faults", "seed": seed,
        "replicas": args.replicas, "locks": args.locks, "podsPerSet": args.pods,
        "namespaces": nss.len(), "leaseSeconds": args.lease_seconds,
        "membershipSeconds": args.membership_seconds, "apiTimeoutSeconds": api_timeout,
        "faultSeconds": secs,
        "faults": {"total": faults_injected, "byKind": by_kind, "maxOverlapping": inj.max_overlap},
        "replicaKills": kills, "writerFlaps": flaps,
        "gracefulRestarts": ev.graceful_restarts, "scaleEvents": ev.scale_events,
        "writersScaledAway": ev.writers_scaled_away, "nodeLosses": ev.node_losses,
        "writerFailures": writer_failures,
        "invariants": {
            "dualWriterIntervals": report.dual_writer_intervals,
            "dualWriterMs": report.dual_writer_ms, "dualWriterMaxMs": max_dual,
            "dualWriter": duals,
            "writerlessMs": report.no_ready_writer_ms,
            "writerlessIntervals": report.no_ready_writer_intervals,
            "writerlessMaxMs": report.max_no_ready_writer_ms,
        },
        "writes": {
            "operator": w.total, "byResource": w.by_resource, "forLocks": w.for_locks,
            "nonOwner": w.non_owner_count, "nonOwnerWrites": w.non_owner,
            "lateNonOwner": w.late_non_owner_count, "lateNonOwnerWrites": w.late_non_owner,
            "claims": w.claims, "claimsWhilePreviousOwnerLive": w.claims_from_live,
        },
        "leaseLapses": {"count": all_lapses.len(), "totalMs": lapse_ms, "maxMs": lapse_max,
            "operatorCaused": operator_lapses, "operatorCausedMs": operator_lapse_ms,
            "ownerDownAtDue": down_lapses, "ownerCutOff": cut_off_lapses, "lapses": lapse_details},
        "convergence": {
            "limitSeconds": args.converge_seconds, "converged": converge.len(),
            "confirmed": confirmed, "apiCrossCheckConverged": api_ok,
            "maxMs": converge.last().copied().unwrap_or(0), "p99Ms": pct(&converge, 0.99),
            "p50Ms": pct(&converge, 0.5),
            "unconverged": unconverged.iter().take(DETAILS_JSON).map(|(k, why)| json!({"lock": format!("{}/{}", k.0, k.1), "why": why})).collect::<Vec<_>>(),
        },
        "measurement": {"commitsTracked": events, "trackerLagged": lagged, "commitLog": log.len(), "missingFromCommitLog": missing.get()},
        "violations": violations,
        "reportedNotFailed": reported,
    });
    if let Some(p) = &args.json_out {
        std::fs::write(p, serde_json::to_string_pretty(&out)?)?;
    }
    if let Some(p) = &args.html_out {
        let summary = vec![
            (
                "fault period".to_string(),
                format!("{secs:.1} s, seed {seed}"),
            ),
            (
                "API faults".to_string(),
                format!("{faults_injected} ({} at most at once)", inj.max_overlap),
            ),
            ("replica kills".to_string(), kills.to_string()),
            (
                "graceful restarts".to_string(),
                ev.graceful_restarts.to_string(),
            ),
            ("writer flaps".to_string(), flaps.to_string()),
            ("node losses".to_string(), ev.node_losses.to_string()),
            (
                "scale events".to_string(),
                format!(
                    "{} ({} took the writer away)",
                    ev.scale_events, ev.writers_scaled_away
                ),
            ),
            (
                "writer failures (writer-less intervals)".to_string(),
                writer_failures.to_string(),
            ),
            (
                "dual-writer intervals".to_string(),
                format!(
                    "{} ({} ms)",
                    report.dual_writer_intervals, report.dual_writer_ms
                ),
            ),
            (
                "writes for a lock by a non-owner".to_string(),
                format!(
                    "{} of {} (and {} served late, after their replica lost the lock)",
                    w.non_owner_count, w.for_locks, w.late_non_owner_count
                ),
            ),
            (
                "Lease lapses of a Ready writer".to_string(),
                format!(
                    "{} ({lapse_ms} ms): {operator_lapses} caused by the operator, {down_lapses} with the owner down when the renewal was due, {cut_off_lapses} with every renewal of the Lease the owner tried failed by faults",
                    all_lapses.len(),
                ),
            ),
            (
                "converged after the faults".to_string(),
                format!(
                    "{}/{} within {} s (max {} ms)",
                    converge.len(),
                    keys.len(),
                    args.converge_seconds,
                    converge.last().copied().unwrap_or(0)
                ),
            ),
        ];
        let t = lock(&tracker);
        let html = html_report(&ReportInput {
            seed,
            args,
            from_ms,
            lift_ms,
            to_ms,
            report: &report,
            log: &log,
            tracker: &t,
            at_of: &at_of,
            timeline: &inj.timeline,
            rss: &ev.rss,
            summary,
            violations: &violations,
            reported: &reported,
        });
        std::fs::write(p, html)?;
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!(
            "run: {secs:.1} s of faults: {faults_injected} faults ({} at most at once), {kills} replica kills, {} graceful restarts, {flaps} writer flaps, {} node losses, {} scale events ({} took the writer away); {writer_failures} writer failures (intervals without a Ready writer)",
            inj.max_overlap,
            ev.graceful_restarts,
            ev.node_losses,
            ev.scale_events,
            ev.writers_scaled_away
        );
        println!(
            "faults by kind: {}",
            by_kind
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        println!(
            "kubesim invariants: dual-writer intervals {} (total {} ms, max {max_dual} ms); writer-less {} ms over {} intervals (max {} ms)",
            report.dual_writer_intervals,
            report.dual_writer_ms,
            report.no_ready_writer_ms,
            report.no_ready_writer_intervals,
            report.max_no_ready_writer_ms
        );
        for d in duals.iter().take(DETAILS_TEXT) {
            println!("  dual writer: {d}");
        }
        println!(
            "operator writes: {} ({}); {} for locks (lock, Lease, pods), of which by a non-owner: {}; claims {} (previous owner's membership Lease still current: {})",
            w.total,
            w.by_resource
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", "),
            w.for_locks,
            w.non_owner_count,
            w.claims,
            w.claims_from_live.len()
        );
        for x in w.non_owner.iter().take(DETAILS_TEXT) {
            println!("  non-owner write: {x}");
        }
        if w.late_non_owner_count > 0 {
            println!(
                "  {} writes served late landed after their replica lost the lock (the server's doing, not counted above)",
                w.late_non_owner_count
            );
        }
        for x in w.late_non_owner.iter().take(DETAILS_TEXT) {
            println!("  late write after the lock moved: {x}");
        }
        for x in w.claims_from_live.iter().take(DETAILS_TEXT) {
            println!("  claim from a live owner: {x}");
        }
        println!(
            "Lease lapses of a Ready writer: {} (total {lapse_ms} ms, max {lapse_max} ms): {operator_lapses} caused by the operator ({operator_lapse_ms} ms), {down_lapses} with the owner down when the renewal was due and back less than half a Lease before the expiry, {cut_off_lapses} with the owner up, renewing in time and on, but every renewal of the Lease it tried (due time to expiry) failed by faults",
            all_lapses.len(),
        );
        for x in lapse_details.iter().take(DETAILS_TEXT) {
            println!("  lapse: {x}");
        }
        println!(
            "convergence after lifting: {}/{} locks within {} s{}; time to converge max {} ms, p99 {} ms, p50 {} ms; API cross-check: {api_ok} converged",
            converge.len(),
            keys.len(),
            args.converge_seconds,
            if confirmed { "" } else { " (NOT all at once)" },
            converge.last().copied().unwrap_or(0),
            pct(&converge, 0.99),
            pct(&converge, 0.5)
        );
        for (k, why) in unconverged.iter().take(DETAILS_TEXT) {
            println!("  unconverged {}/{}: {why}", k.0, k.1);
        }
        println!(
            "measurement: {events} commits tracked, tracker lagged {lagged}, commit log {} entries, {} rvs missing from it",
            log.len(),
            missing.get()
        );
        if violations.is_empty() && !reported.is_empty() {
            println!(
                "RESULT: PASS, except what this run does not fail on: {}",
                reported.join("; ")
            );
        } else if violations.is_empty() {
            println!("RESULT: PASS");
        } else {
            println!("RESULT: FAIL: {}", violations.join("; "));
        }
    }
    anyhow::ensure!(
        violations.is_empty(),
        "invariants violated: {}",
        violations.join("; ")
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Soak events and the HTML report

/// What the soak did besides API faults, flaps and kills, and what it sampled.
#[derive(Default)]
struct Events {
    graceful_restarts: u64,
    scale_events: u64,
    /// Scale-downs that removed the pod carrying `writer`.
    writers_scaled_away: u64,
    node_losses: u64,
    /// (store ms, RSS KiB) of this process: kubesim and every replica run in it.
    rss: Vec<(u64, u64)>,
}

/// Set the StatefulSet of `key` to `replicas` pods (the driver's own client: no fault applies
/// to it). False when the API refused.
async fn scale(client: &kube::Client, (ns, name): &Key, replicas: i32) -> bool {
    let sets: Api<k8s_openapi::api::apps::v1::StatefulSet> = Api::namespaced(client.clone(), ns);
    let patch = json!({"spec": {"replicas": replicas}});
    match sets
        .patch(
            name,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&patch),
        )
        .await
    {
        Ok(_) => true,
        Err(e) => {
            eprintln!("scaling {ns}/{name} to {replicas}: {e}");
            false
        }
    }
}

/// Everything the HTML report draws, in store milliseconds.
struct ReportInput<'a> {
    seed: u64,
    args: &'a Args,
    from_ms: u64,
    lift_ms: u64,
    to_ms: u64,
    report: &'a kubesim::Report,
    log: &'a [kubesim::CommitRecord],
    tracker: &'a Tracker,
    at_of: &'a dyn Fn(u64) -> u64,
    timeline: &'a [FaultRec],
    rss: &'a [(u64, u64)],
    summary: Vec<(String, String)>,
    violations: &'a [String],
    /// Violations found but not failed on.
    reported: &'a [String],
}

fn html_report(r: &ReportInput<'_>) -> String {
    use kubesim::html::{self as report, Fill, Row, Segment, Series};
    let secs = |ms: u64| (ms as f64 - r.from_ms as f64) / 1000.0;
    let span = (secs(r.from_ms), secs(r.to_ms));
    // Writer-less intervals that began in the run: each is a writer failure (or a lost
    // election) until a Ready writer was back.
    let writerless = r.report.writerless_ms(r.from_ms);
    let mut sections = vec![report::summary(
        &if r.violations.is_empty() && r.reported.is_empty() {
            "PASS: every invariant held".to_string()
        } else if r.violations.is_empty() {
            format!(
                "PASS, except what this run does not fail on: {}",
                r.reported.join("; ")
            )
        } else {
            format!("FAIL: {}", r.violations.join("; "))
        },
        r.violations.is_empty(),
        &r.summary,
        "Judged from what kubesim committed.",
    )];
    sections.push(report::histogram(
        "failover-latency",
        "Failover latency (time without a Ready writer)",
        "Every interval in which a StatefulSet had no Ready pod labelled writer, from the commit that lost it to the commit that restored one (kubesim's invariant recorder); intervals that began before the fault period are left out.",
        &writerless,
    ));
    // Writer timeline: the StatefulSets with a dual-writer interval first, then those whose
    // writer changed most.
    let mut sets: Vec<(&Key, usize)> = r
        .tracker
        .locks
        .iter()
        .map(|(k, t)| {
            let changes = t
                .pods
                .values()
                .flat_map(|h| h.windows(2))
                .filter(|w| {
                    w[0].1.as_ref().is_some_and(|p| p.writer)
                        != w[1].1.as_ref().is_some_and(|p| p.writer)
                })
                .count();
            (k, changes)
        })
        .collect();
    let dual = |k: &Key| {
        r.report
            .statefulsets
            .get(&format!("{}/{}", k.0, k.1))
            .is_some_and(|s| !s.dual_writer.is_empty())
    };
    sets.sort_by_key(|(k, c)| (!dual(k), std::cmp::Reverse(*c), (*k).clone()));
    let rows: Vec<Row> = sets
        .iter()
        .take(24)
        .map(|(k, _)| {
            let t = &r.tracker.locks[*k];
            let mut segments = vec![];
            for (pod, h) in &t.pods {
                let ordinal = pod
                    .rsplit_once('-')
                    .and_then(|(_, o)| o.parse::<usize>().ok())
                    .unwrap_or(0);
                let mut since: Option<u64> = None;
                for (rv, rec) in h {
                    let at = (r.at_of)(*rv);
                    let writer = rec.as_ref().is_some_and(|p| p.writer);
                    match (since, writer) {
                        (None, true) => since = Some(at),
                        (Some(s), false) => {
                            segments.push(Segment {
                                start: secs(s),
                                end: secs(at),
                                fill: Fill::Series(ordinal),
                                title: format!("{pod} writer"),
                            });
                            since = None;
                        }
                        _ => {}
                    }
                }
                if let Some(s) = since {
                    segments.push(Segment {
                        start: secs(s),
                        end: secs(r.to_ms),
                        fill: Fill::Series(ordinal),
                        title: format!("{pod} writer"),
                    });
                }
            }
            if let Some(s) = r.report.statefulsets.get(&format!("{}/{}", k.0, k.1)) {
                segments.extend(report::invariant_segments(
                    s,
                    r.from_ms,
                    r.report.now_ms,
                    &secs,
                ));
            }
            Row {
                label: format!("{}/{}", k.0, k.1),
                segments,
            }
        })
        .collect();
    let legend = report::writer_legend(usize::try_from(r.args.pods).unwrap_or(1));
    sections.push(report::timeline(
        "writer-timeline",
        "Writer per StatefulSet",
        "Who carried the writer label, with writer-less intervals (dark) and dual-writer intervals (red) marked; the StatefulSets with a dual writer first, then those whose writer changed most (at most 24).",
        span,
        &rows,
        &legend,
    ));
    // Ownership per replica: the shard label of every lock commit, sampled.
    let mut owner: HashMap<(String, String), String> = HashMap::new();
    let mut count: BTreeMap<String, i64> = BTreeMap::new();
    let mut samples: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    let every = ((r.to_ms.saturating_sub(r.from_ms)) / 300).max(200);
    let mut next = r.from_ms;
    let sample = |at: u64,
                  count: &BTreeMap<String, i64>,
                  samples: &mut BTreeMap<String, Vec<(f64, f64)>>| {
        for (id, n) in count {
            samples
                .entry(id.clone())
                .or_default()
                .push((secs(at), *n as f64));
        }
    };
    for c in r
        .log
        .iter()
        .filter(|c| c.resource == "statefulsetlocks" && c.at_ms <= r.to_ms)
    {
        while c.at_ms >= next && next <= r.to_ms {
            if next >= r.from_ms {
                sample(next, &count, &mut samples);
            }
            next += every;
        }
        let now = c.labels.get(SHARD_LABEL).cloned().unwrap_or_default();
        let prev = owner.insert((c.namespace.clone(), c.name.clone()), now.clone());
        if prev.as_deref() != Some(now.as_str()) {
            if let Some(p) = prev {
                *count.entry(p).or_default() -= 1;
            }
            *count.entry(now).or_default() += 1;
        }
    }
    while next <= r.to_ms {
        sample(next, &count, &mut samples);
        next += every;
    }
    let series: Vec<Series> = samples
        .into_iter()
        .map(|(id, points)| Series {
            name: if id.is_empty() { "unowned".into() } else { id },
            points,
        })
        .collect();
    sections.push(report::line_chart(
        "ownership",
        "Locks owned per replica",
        "The shard label of every lock as committed; a killed replica's locks stay labelled with it until a peer claims them or it comes back.",
        ("seconds", "locks"),
        &series,
    ));
    // Renewal lateness: consecutive renewals of the same holder, beyond half the duration.
    let mut late: Vec<(f64, f64)> = vec![];
    for t in r.tracker.locks.values() {
        for w in t.lease.windows(2) {
            if let ((_, Some(a)), (rv, Some(b))) = (&w[0], &w[1])
                && a.holder == b.holder
                && let (Some(ra), Some(rb)) = (a.renew_ms, b.renew_ms)
                && rb > ra
            {
                let at = (r.at_of)(*rv);
                if at >= r.from_ms {
                    let lateness = (rb - ra - b.dur_ms / 2).max(0);
                    late.push((secs(at), lateness as f64));
                }
            }
        }
    }
    late.sort_by(|a, b| a.0.total_cmp(&b.0));
    let bucket = (span.1 - span.0).max(1.0) / 200.0;
    let mut worst: Vec<(f64, f64)> = vec![];
    for (x, y) in &late {
        let b = ((x - span.0) / bucket).floor() * bucket + span.0;
        match worst.last_mut() {
            Some((bx, by)) if (*bx - b).abs() < 1e-9 => *by = by.max(*y),
            _ => worst.push((b, *y)),
        }
    }
    sections.push(report::line_chart(
        "renewal-lateness",
        "Renewal lateness (worst per interval)",
        "How much later than half its duration each Lease was renewed by the same holder (renewTime as written), the worst one per interval.",
        ("seconds", "ms late"),
        &[Series {
            name: "renewal lateness".into(),
            points: worst,
        }],
    ));
    // API writes per second per replica.
    let series = report::per_second(
        r.log.iter().filter_map(|c| {
            c.actor
                .strip_prefix(AGENT_PREFIX)
                .map(|id| (id.to_string(), c.at_ms))
        }),
        r.from_ms,
        r.to_ms,
    );
    sections.push(report::line_chart(
        "api-writes",
        "API writes per second, per replica",
        "Committed writes by each replica (its User-Agent), per second.",
        ("seconds", "writes/s"),
        &series,
    ));
    sections.push(report::line_chart(
        "memory",
        "Memory (resident set)",
        "The fleet process's RSS: kubesim and every replica run in it, so this is their sum (per-replica figures need the replicas as separate processes).",
        ("seconds", "MiB"),
        &[Series {
            name: "fleet process".into(),
            points: r
                .rss
                .iter()
                .map(|(ms, kib)| (secs(*ms), *kib as f64 / 1024.0))
                .collect(),
        }],
    ));
    // Faults over time, one row per kind.
    let mut kinds: BTreeMap<&str, Vec<Segment>> = BTreeMap::new();
    for (n, f) in r.timeline.iter().enumerate() {
        let end = f.end_ms.unwrap_or(r.lift_ms).max(f.start_ms + 200);
        kinds.entry(f.kind).or_default().push(Segment {
            start: secs(f.start_ms),
            end: secs(end),
            fill: Fill::Series(n % 3),
            title: format!("{} on {}: {}", f.kind, f.target, f.detail),
        });
    }
    let rows: Vec<Row> = kinds
        .into_iter()
        .map(|(k, segments)| Row {
            label: format!("{k} ({})", segments.len()),
            segments,
        })
        .collect();
    sections.push(report::timeline(
        "faults",
        "Faults injected",
        "Each fault, replica stop, scale event and node loss as injected (hover for details).",
        span,
        &rows,
        &[],
    ));
    report::page(
        &format!(
            "fleet faults: {} replicas, {} locks, seed {}",
            r.args.replicas, r.args.locks, r.seed
        ),
        &sections,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn graceful_stops_keep_their_share_exactly() {
        let turns = |share: f64, n: u64| -> Vec<u64> {
            (0..n)
                .filter(|&d| graceful_turn(d, share))
                .map(|d| d + 1)
                .collect()
        };
        assert_eq!(turns(0.25, 13), vec![4, 8, 12]);
        assert_eq!(turns(0.15, 40).len(), 6);
        assert_eq!(turns(0.0, 50), Vec::<u64>::new());
        assert_eq!(turns(1.0, 5), vec![1, 2, 3, 4, 5]);
        assert_eq!(turns(0.5, 6), vec![2, 4, 6]);
    }

    fn try_at(resource: &str, at_ms: u64, elapsed_ms: u64, status: u16) -> kubesim::WriteAttempt {
        kubesim::WriteAttempt {
            at_ms,
            actor: format!("{AGENT_PREFIX}r1"),
            method: "PATCH".into(),
            namespace: "t".into(),
            resource: resource.into(),
            name: "db".into(),
            status,
            elapsed_ms,
        }
    }

    fn judged(tries: &[kubesim::WriteAttempt], start: u64, expiry: u64) -> bool {
        let tries: Vec<_> = tries.iter().collect();
        // 10 s Leases (a quarter: 2.5 s), 2 s API timeout.
        renewed_promptly_and_persistently(&tries, start, expiry, 2_500, 2_000)
    }

    /// The P5 run of seed 20261216: back from a kill 5 s before the expiry, the owner confirms
    /// the lock, sends the renewal and its hedge (both time out), confirms again and renews
    /// again until the expiry.
    #[test]
    fn an_owner_renewing_until_the_expiry_kept_at_it() {
        let tries = [
            try_at("statefulsetlocks", 119_300, 600, 200),
            try_at("leases", 119_970, 2_000, 0),
            try_at("leases", 120_480, 2_000, 0),
            try_at("statefulsetlocks", 122_800, 700, 200),
            try_at("leases", 123_600, 1_900, 200),
        ];
        assert!(judged(&tries, 119_000, 125_000));
    }

    #[test]
    fn an_owner_that_stopped_after_one_failed_renewal_had_its_chance() {
        let tries = [
            try_at("leases", 120_000, 2_000, 0),
            // Nothing between 122 s and the expiry at 125 s.
        ];
        assert!(!judged(&tries, 119_000, 125_000));
        // Idle for 2.5 s in the middle, then one more try.
        let tries = [
            try_at("leases", 120_000, 300, 503),
            try_at("leases", 122_800, 2_000, 0),
        ];
        assert!(!judged(&tries, 119_000, 125_000));
    }

    #[test]
    fn an_owner_that_renewed_late_or_only_confirmed_the_lock_had_its_chance() {
        // First renewal 3 s after it was due (a quarter of the Lease is 2.5 s).
        let tries = [
            try_at("leases", 123_000, 2_000, 0),
            try_at("leases", 124_000, 2_000, 0),
        ];
        assert!(!judged(&tries, 120_000, 126_000));
        // Only lock writes: no renewal tried at all.
        let tries = [
            try_at("statefulsetlocks", 120_000, 2_000, 0),
            try_at("statefulsetlocks", 122_000, 2_000, 0),
            try_at("statefulsetlocks", 124_000, 2_000, 0),
        ];
        assert!(!judged(&tries, 120_000, 126_000));
    }
}
