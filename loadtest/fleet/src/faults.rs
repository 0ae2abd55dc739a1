//! `faults`: the acceptance run of issue P5. R replicas, N locks of 3-pod StatefulSets, and for
//! `--seconds` random faults of every kind kubesim has, each on one replica (or all) for a short
//! while, several at once: commit-then-lose-response (hang, 500, 504), hold-response, per-watch
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
//! membership Lease was still current then).
//!
//! A Lease lapse of a Ready writer: for each lock, replay its Lease and pod commits in
//! resourceVersion order, each at its commit-log time. Between two consecutive commits the state
//! is constant; the part of that stretch after `renewTime + leaseDurationSeconds` (renewTime as
//! written by the operator, wall clock mapped onto the store's clock) during which the Lease's
//! holder pod is Ready and labelled writer is lapsed. Adjacent lapsed stretches are one lapse.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kube::api::ListParams;
use kube::{Api, ResourceExt};
use kubesim::store::EventType;
use kubesim::{FaultConfig, HoldResponse, LoseResponse, StaleRead, WatchFault};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use stslock::api::{EPOCH_ANNOTATION, SHARD_LABEL, StatefulSetLock, WRITER_UID_ANNOTATION};
use stslock::sharding::GROUP_LABEL;

use crate::{Args, Fleet, pct, tenants};

const ROLE_LABEL: &str = "sts-role";
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

const KINDS: [Kind; 14] = [
    Kind::LoseHang,
    Kind::LoseServerTimeout,
    Kind::LoseTimeout,
    Kind::Hold,
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

/// Durations: a fault that blocks every request of a replica (partition) lasts at most
/// `BLOCKING_MS`, and a replica gets `lease/2 + 1 s` without blocking faults or kills after one,
/// so that a correct operator can always renew (renewals are due at half the Lease duration).
const SHORT_MS: (u64, u64) = (500, 8000);
const BLOCKING_MS: (u64, u64) = (500, 3000);
const KILL_DOWN_MS: (u64, u64) = (1000, 3000);
const FLAP_DOWN_MS: (u64, u64) = (1000, 10_000);

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
}

impl Injector {
    fn ms(&mut self, (lo, hi): (u64, u64)) -> u64 {
        self.rng.random_range(lo..=hi)
    }

    fn replicas_of(&self, target: Option<usize>) -> Vec<usize> {
        target.map_or_else(|| (0..self.replicas).collect(), |i| vec![i])
    }

    /// Inject one random fault now (returns false when the kind drawn is not possible now).
    fn inject(&mut self, sim: &kubesim::Sim, now: Instant, now_ms: u64) -> bool {
        let kind = KINDS[self.rng.random_range(0..KINDS.len())];
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
                let mut h = HoldResponse::new(d).probability(p);
                h.agents = agents.clone();
                h.resources = with_res(vec![]);
                (Payload::Hold(h), format!("{res} {d} ms p={p}"))
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
    let mut owner: HashMap<Key, (Option<String>, u64, String)> = HashMap::new();
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
                w.non_owner_count += 1;
                if w.non_owner.len() < DETAILS_JSON {
                    w.non_owner.push(json!({
                        "rv": c.rv, "atMs": c.at_ms, "by": r, "verb": c.verb,
                        "resource": c.resource, "object": format!("{}/{}", c.namespace, c.name),
                        "lock": format!("{}/{}", key.0, key.1),
                        "owner": prev_owner,
                        "ownerSetAtRv": prev.as_ref().map(|p| p.1),
                        "ownerSetBy": prev.as_ref().map(|p| p.2.clone()),
                    }));
                }
            }
        }
        if c.resource == "statefulsetlocks" {
            owner.insert(
                key,
                (c.labels.get(SHARD_LABEL).cloned(), c.rv, c.actor.clone()),
            );
        }
    }
    w
}

#[derive(Debug, Clone)]
struct Lapse {
    lock: Key,
    holder: String,
    start_ms: u64,
    end_ms: u64,
    /// rv of the Lease write whose renewTime lapsed.
    lease_rv: u64,
}

enum Step<'a> {
    Lease(Option<&'a LeaseRec>),
    Pod(&'a str, Option<&'a PodRec>),
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
            "faults: {} replicas, {} locks ({} pods each) in {} namespaces, {} s Leases, {} s membership, api timeout {api_timeout} s, seed {seed}; {} s of faults (one every ~{} ms), writer flaps every ~{} ms, replica kills every ~{} s",
            args.replicas,
            args.locks,
            args.pods,
            nss.len(),
            args.lease_seconds,
            args.membership_seconds,
            args.seconds,
            args.fault_every_ms,
            args.flap_every_ms,
            args.kill_every
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
    };
    let from_ms = fleet.sim.store().elapsed_ms();
    let end = now + Duration::from_secs(args.seconds);
    let mut next_fault = now;
    let mut next_flap = now;
    let mut next_kill = now + Duration::from_secs(args.kill_every.max(1));
    let mut next_progress = now + Duration::from_secs(30);
    let mut recoveries: Vec<(Instant, String, String)> = vec![];
    let mut flapped: HashSet<Key> = HashSet::new();
    let (mut flaps, mut kills) = (0u64, 0u64);
    while Instant::now() < end {
        let now = Instant::now();
        let now_ms = fleet.sim.store().elapsed_ms();
        let mut changed = inj.expire(now, now_ms, false);
        for i in 0..args.replicas {
            if inj.restart_at[i].is_some_and(|t| t <= now) {
                fleet.start_replica(i);
                inj.up[i] = true;
                inj.restart_at[i] = None;
            }
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
                if fleet.kill_replica(i) {
                    kills += 1;
                    let down = inj.ms(KILL_DOWN_MS);
                    inj.up[i] = false;
                    inj.restart_at[i] = Some(now + Duration::from_millis(down));
                    inj.quiet_until[i] = now + Duration::from_millis(down) + inj.cooldown;
                    inj.timeline.push(FaultRec {
                        kind: "replica-kill",
                        target: format!("r{i}"),
                        start_ms: now_ms,
                        end_ms: Some(now_ms + down),
                        detail: format!("down {down} ms"),
                    });
                }
            }
            let ms = args.kill_every * 1000;
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
    for i in 0..args.replicas {
        if inj.restart_at[i].take().is_some() {
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
    while lift.elapsed() < limit {
        if all_converged(&tracker, &keys) == keys.len() {
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
    let faults_injected = inj.timeline.len() as u64 - kills;
    let max_dual = report
        .statefulsets
        .values()
        .flat_map(|s| s.dual_writer.iter())
        .map(|i| i.duration_ms(report.now_ms))
        .max()
        .unwrap_or(0);
    let duals: Vec<Value> = report
        .statefulsets
        .iter()
        .flat_map(|(set, s)| {
            s.dual_writer
                .iter()
                .map(move |i| json!({"statefulSet": set, "startMs": i.start_ms, "endMs": i.end_ms}))
        })
        .take(DETAILS_JSON)
        .collect();
    let lapse_ms: u64 = all_lapses.iter().map(|l| l.end_ms - l.start_ms).sum();
    let lapse_max = all_lapses
        .iter()
        .map(|l| l.end_ms - l.start_ms)
        .max()
        .unwrap_or(0);
    // The faults on the lock's owner around each lapse (evidence for whoever fixes it).
    let owner_at = |k: &Key, at_ms: u64| -> Option<String> {
        log.iter()
            .rev()
            .find(|c| {
                c.resource == "statefulsetlocks"
                    && c.namespace == k.0
                    && c.name == k.1
                    && c.at_ms <= at_ms
            })
            .and_then(|c| c.labels.get(SHARD_LABEL).cloned())
    };
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
    let lapse_details: Vec<Value> = all_lapses
        .iter()
        .take(DETAILS_JSON)
        .enumerate()
        .map(|(n, l)| {
            let owner = owner_at(&l.lock, l.start_ms);
            let lw = log.iter().find(|c| c.rv == l.lease_rv);
            let (w0, w1) = (l.start_ms.saturating_sub(lease_ms), l.end_ms + 1000);
            let agent = owner.as_ref().map(|o| format!("{AGENT_PREFIX}{o}"));
            let owner_writes = log
                .iter()
                .filter(|c| c.at_ms >= w0 && c.at_ms <= l.end_ms && Some(&c.actor) == agent.as_ref())
                .count();
            // The first lapses also get every commit for their lock around them.
            let commits: Vec<Value> = if n < 10 {
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
            json!({
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
    if !all_lapses.is_empty() {
        violations.push(format!(
            "{} Lease lapses of a Ready writer ({lapse_ms} ms)",
            all_lapses.len()
        ));
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
            "claims": w.claims, "claimsWhilePreviousOwnerLive": w.claims_from_live,
        },
        "leaseLapses": {"count": all_lapses.len(), "totalMs": lapse_ms, "maxMs": lapse_max, "lapses": lapse_details},
        "convergence": {
            "limitSeconds": args.converge_seconds, "converged": converge.len(),
            "confirmed": confirmed, "apiCrossCheckConverged": api_ok,
            "maxMs": converge.last().copied().unwrap_or(0), "p99Ms": pct(&converge, 0.99),
            "p50Ms": pct(&converge, 0.5),
            "unconverged": unconverged.iter().take(DETAILS_JSON).map(|(k, why)| json!({"lock": format!("{}/{}", k.0, k.1), "why": why})).collect::<Vec<_>>(),
        },
        "measurement": {"commitsTracked": events, "trackerLagged": lagged, "commitLog": log.len(), "missingFromCommitLog": missing.get()},
        "violations": violations,
    });
    if let Some(p) = &args.json_out {
        std::fs::write(p, serde_json::to_string_pretty(&out)?)?;
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!(
            "run: {secs:.1} s of faults: {faults_injected} faults ({} at most at once), {kills} replica kills, {flaps} writer flaps",
            inj.max_overlap
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
        for x in w.claims_from_live.iter().take(DETAILS_TEXT) {
            println!("  claim from a live owner: {x}");
        }
        println!(
            "Lease lapses of a Ready writer: {} (total {lapse_ms} ms, max {lapse_max} ms)",
            all_lapses.len()
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
        if violations.is_empty() {
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
