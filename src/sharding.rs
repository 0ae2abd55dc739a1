//! The shard runtime of one replica: holds its membership Lease, watches its peers', keeps the
//! ring, claims and hands off locks through the ownership label, and fences itself.
//!
//! Decisions come from `stslock-shard` (pure); this module does the I/O. Only the replica named
//! by a lock's `app.anukkrit.me/shard` label reconciles that lock, and only while its fence
//! allows writes. Labels change only by compare-and-swap on the lock's resourceVersion, so two
//! replicas with different ring views can never both own a lock.

use dashmap::{DashMap, DashSet};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::reflector::Store;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use serde_json::json;
use stslock_shard::{Decision, Fence, Member, Rejoin, Ring, alive_members, membership_lease_name};

use crate::api::{SHARD_LABEL, SHARD_TERM_ANNOTATION, StatefulSetLock, lock_key};
use crate::call::{ApiCall, Kind, call, call_opt};

/// A membership renewal not answered within this long is read back (it may have committed
/// behind a late answer).
const HEDGE: Duration = Duration::from_millis(500);

/// Label on membership Leases naming the shard group.
pub const GROUP_LABEL: &str = "app.anukkrit.me/shard-group";
/// A claim from a dead owner is sent within this of the membership read it rests on (or
/// api-timeout, if shorter), or not at all; it lands within api-timeout of being sent, or never.
const CLAIM_SENT_WITHIN: Duration = Duration::from_secs(1);

/// The membership read the claims of one assignment pass from dead owners rest on.
struct ClaimRead {
    /// When it started (None: none yet).
    at: Option<Instant>,
    /// A read again for later claims failed or came too late: no more claims from dead
    /// owners this pass.
    failed: bool,
}

/// Annotation a replica puts on its membership Lease when it starts a graceful leave: peers
/// take it off the ring at once (no new locks go to it), but its locks stay its own until it
/// hands them off or its Lease is gone.
pub const LEAVING_ANNOTATION: &str = "app.anukkrit.me/leaving";

/// Annotation a replica running with `--placement bounded` puts on its membership Lease:
/// `bounded@<renewTime>`, written with every renewal (and on the Lease it creates). The group
/// places by bounded loads only while every replica on the ring carries it for its current
/// renewTime: a stale mark (left by a process that was killed, then renewed by an older binary
/// that knows nothing of it) does not count.
pub const PLACEMENT_ANNOTATION: &str = "app.anukkrit.me/placement";

/// The [`PLACEMENT_ANNOTATION`] of a bounded replica's renewal at `renew_time`.
fn bounded_mark(renew_time: &MicroTime) -> Option<String> {
    match serde_json::to_value(renew_time).ok()? {
        serde_json::Value::String(t) => Some(format!("bounded@{t}")),
        _ => None,
    }
}

/// What the rest of the replica does when this replica's ownership of a lock changes by its
/// own write: `true` when it gained the lock (a claim), `false` when it handed it off.
pub type OnOwnership = Box<dyn Fn(&StatefulSetLock, bool) + Send + Sync>;
/// Run before a lock is handed off, while this replica may still write for it (see
/// [`Sharding::before_handoff`]); `false` puts the handoff off.
pub type BeforeHandoff =
    Box<dyn Fn(Arc<StatefulSetLock>) -> futures::future::BoxFuture<'static, bool> + Send + Sync>;

/// Why a write was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The lock is not (or may no longer be) this replica's: another owns it, it is being
    /// handed off, or this replica's view predates its own handoff.
    NotOwner,
    /// The fence is closed (membership may have lapsed), or it closed and reopened since the
    /// plan started.
    Fenced,
}

fn rv_of(lock: &StatefulSetLock) -> u64 {
    crate::cache::fresh::rv_number(lock.resource_version().as_deref())
}

/// Ownership moves (claims, handoffs) of different locks in flight at once.
const MOVES_IN_PARALLEL: usize = 16;

/// A lock the ring gives this replica while a live peer still holds it waits for the peer's
/// handoff, which normally arrives through the lock watch within milliseconds. Waiting longer
/// than this, the lock is read from the API server (then at most once per
/// [`HANDOFF_READ_EVERY`]): a stalled or lagging lock watch must not keep this replica from
/// learning that it owns the lock, while the peer — which handed it over — has stopped
/// renewing its Lease.
const HANDOFF_READ_AFTER: Duration = Duration::from_millis(500);
const HANDOFF_READ_EVERY: Duration = Duration::from_secs(1);
/// Rounds of a leave's handoffs of the locks the API server still lists for the replica.
const LEAVE_LIST_ROUNDS: usize = 4;
/// Pause before a leave lists its locks again after a failed list.
const LEAVE_LIST_RETRY: Duration = Duration::from_millis(250);
/// How often a leave's first handoffs look for locks peers handed this replica meanwhile.
const LEAVE_POLL: Duration = Duration::from_millis(500);

/// A leave's handoffs: each lock once, at the newer of its cached and listed versions (a
/// handoff's CAS from an older one only conflicts), the ones the cache does not show first.
fn leave_order(
    cached: Vec<Arc<StatefulSetLock>>,
    listed: Vec<StatefulSetLock>,
) -> Vec<Arc<StatefulSetLock>> {
    let mut cached: HashMap<String, Arc<StatefulSetLock>> =
        cached.into_iter().map(|l| (lock_key(&l), l)).collect();
    let mut unseen = Vec::new();
    let mut seen = Vec::new();
    for lock in listed {
        match cached.remove(&lock_key(&lock)) {
            None => unseen.push(Arc::new(lock)),
            Some(c) if rv_of(&c) >= rv_of(&lock) => seen.push(c),
            Some(_) => seen.push(Arc::new(lock)),
        }
    }
    // Cached but not listed: labelled for this replica in its cache only (moved since, or the
    // list failed); a handoff from a stale version conflicts and re-reads, so they go too.
    let mut rest: Vec<_> = cached.into_values().collect();
    rest.sort_by_key(|l| lock_key(l));
    unseen.into_iter().chain(seen).chain(rest).collect()
}
/// Awaited handoffs read per assignment pass, at most.
const HANDOFF_READS_PER_PASS: usize = 64;

/// How soon a lost handoff whose settlement failed is tried again (see
/// [`Sharding::resolve_unknown_handoffs`]).
const SETTLE_AGAIN_AFTER: Duration = Duration::from_millis(500);

#[derive(Debug, Clone)]
pub struct ShardConfig {
    pub id: String,
    pub group: String,
    pub namespace: String,
    /// Membership Lease duration S; renewed every S/3.
    pub lease_duration: Duration,
    /// The fence stops writes at S − margin after the last renew started.
    pub margin: Duration,
    /// Peers are declared dead at S + grace after their last observed renewal.
    pub grace: Duration,
    pub api_timeout: Duration,
    pub placement: crate::config::Placement,
}

#[derive(Debug, Clone)]
struct Seen {
    /// renewTime as last seen.
    renew_time: Option<MicroTime>,
    /// This observer's clock (ms since origin) when that renewTime was first seen.
    at_ms: u64,
    duration: Duration,
    /// Marked as leaving (graceful): off the ring, but still holding its locks.
    leaving: bool,
    /// Runs with `--placement bounded`.
    bounded: bool,
}

#[derive(Default)]
struct View {
    members: HashMap<String, Seen>,
    ring: Option<Ring>,
    /// Alive members, leaving ones included: the owners whose labels are respected.
    alive: HashSet<String>,
    /// Hysteresis: a peer back on the ring after being off it is handed locks only after one of
    /// its membership renewal periods.
    rejoin: Rejoin,
    /// Bounded-load placement, while every ring member runs with it: the locks of the last
    /// assignment pass (key, owner label) and where each belongs on the current ring.
    placement: Option<PlacementView>,
}

/// Where bounded loads put each lock (see [`stslock_shard::balance`]).
#[derive(Default)]
struct PlacementView {
    /// The locks it was computed from: key and owner label as the pass saw them.
    locks: Vec<(String, Option<String>)>,
    /// The ring members it was computed for.
    members: Vec<String>,
    /// Lock key → its replica.
    targets: HashMap<String, String>,
}

impl PlacementView {
    fn compute(&mut self, ring: &Ring) {
        let locks: Vec<(&str, Option<&str>)> = self
            .locks
            .iter()
            .map(|(k, l)| (k.as_str(), l.as_deref()))
            .collect();
        let placed = stslock_shard::balance::assign(ring, &locks, stslock_shard::balance::EPSILON);
        self.targets = self
            .locks
            .iter()
            .zip(placed)
            .filter_map(|((k, _), i)| Some((k.clone(), ring.members().get(i)?.clone())))
            .collect();
        self.members = ring.members().to_vec();
    }
}

pub struct Sharding {
    pub cfg: ShardConfig,
    client: Client,
    /// The replica's metrics (API calls, handoffs).
    metrics: Arc<crate::metrics::Metrics>,
    origin: Instant,
    fence: Mutex<Fence>,
    view: RwLock<View>,
    // Per-lock state every write of every worker reads: sharded maps, so 16 workers do not
    // queue on one lock. The handoff's handshake (it marks the lock draining, then waits for
    // its writes; a write counts itself, then checks draining) needs only that each operation
    // on a key is atomic, which each map's shard lock gives.
    /// Locks being handed off: no new reconciles start, no new write is sent.
    draining: DashSet<String>,
    /// Locks a handoff is under way for (from its renewal to its label write): one at a time
    /// per lock. Two at once (an assignment pass and a graceful leave) shared one `draining`
    /// mark, and the first to finish cleared it while the other's label write was still in
    /// flight: a write of this replica got through and landed after its own handoff.
    handing: DashSet<String>,
    /// Writes in flight per lock (a handoff waits for them), and when a write for the lock
    /// last ended without a known outcome (it may still land: the handoff waits it out).
    writes: DashMap<String, (usize, Option<Instant>)>,
    /// Handoffs whose response was lost: the lock is neither worked on nor handed again until
    /// the outcome is known. Each with the version the handoff was sent from (its
    /// compare-and-swap base; see [`Sharding::resolve_unknown_handoffs`]) and when it may be
    /// tried next.
    unresolved: DashMap<String, (Arc<StatefulSetLock>, Instant)>,
    /// Unresolved handoffs being settled right now (see [`Sharding::resolve_unknown_handoffs`]).
    resolving: DashSet<String>,
    /// Bumped each time the fence reopens after the membership Lease may have expired (peers
    /// may have claimed locks meanwhile): trust in cached views (see `cache::fresh`) and
    /// plans started before do not survive it.
    generation: std::sync::atomic::AtomicU64,
    /// Until when the last reopening of the fence (this process's first renewal, or one after
    /// the membership Lease may have expired) is contested: a peer may have decided to claim a
    /// lock of this replica before the renewal (a previous process's last write may be in
    /// flight too), and its claim may land after it — within [`CLAIM_SENT_WITHIN`] of the
    /// membership read it was decided on plus api-timeout, to which a second is added. Until
    /// then a lock's ownership is confirmed by a write, not by a read (see
    /// [`Sharding::confirm_owner`]).
    contested: Mutex<Option<Instant>>,
    /// Tells this process's terms from an earlier one's with the same shard id.
    incarnation: u64,
    on_ownership: std::sync::OnceLock<OnOwnership>,
    before_handoff: std::sync::OnceLock<BeforeHandoff>,
    /// Locks this replica handed off, with the resourceVersion of the handoff write: a
    /// reconcile started from a cache older than that (still showing this replica as owner)
    /// must not run.
    released: DashMap<String, u64>,
    /// Locks the ring gives this replica that a live peer still holds: since when, and when
    /// each was last read from the API server (see [`HANDOFF_READ_AFTER`]).
    awaited: DashMap<String, (Instant, Option<Instant>)>,
    /// Locks read (awaited handoffs) or claimed labelled for this replica: the lock as read or
    /// as the claim's answer, and the fence generation then. Until the lock watch delivers a
    /// version as new, assignment works from this one — its label, and its resourceVersion for
    /// the next move. Dropped when the fence reopens (peers may have claimed the lock
    /// meanwhile).
    read_mine: DashMap<String, (Arc<StatefulSetLock>, u64)>,
    /// One ownership confirmation per lock at a time (see [`Sharding::confirm_owner`]).
    confirming: DashMap<String, Arc<tokio::sync::Mutex<()>>>,
    /// Locks labelled for this replica as of the last assignment pass. One that appears here —
    /// after a restart, handed over by a peer, or claimed — is reported gained at once
    /// (`on_ownership`), so its Lease gets a renewal entry before any reconcile of it runs.
    owned: Mutex<HashSet<String>>,
    leaving: std::sync::atomic::AtomicBool,
    /// Set when the leaving mark has been tried (every caller of `mark_leaving` waits for it).
    marked_leaving: tokio::sync::OnceCell<()>,
    /// The leave is done: no more membership renewals.
    left: std::sync::atomic::AtomicBool,
}

/// One write's permission (see [`Sharding::permit`]).
pub struct WritePermit<'a> {
    sharding: &'a Sharding,
    key: String,
    /// The write must complete within this (its timeout).
    pub window: Duration,
}

impl WritePermit<'_> {
    /// The write ended without a known outcome: it may still be applied.
    pub fn unknown_outcome(&self) {
        self.sharding.writes.entry(self.key.clone()).or_default().1 = Some(Instant::now());
    }
}

impl Drop for WritePermit<'_> {
    fn drop(&mut self) {
        if let Some(mut e) = self.sharding.writes.get_mut(&self.key) {
            e.0 = e.0.saturating_sub(1);
        }
        // Checked again under the shard's lock: a write counted meanwhile keeps the entry.
        let timeout = self.sharding.cfg.api_timeout;
        self.sharding
            .writes
            .remove_if(&self.key, |_, (n, unknown)| {
                *n == 0 && unknown.is_none_or(|t| t.elapsed() > timeout)
            });
    }
}

impl Sharding {
    pub fn new(
        client: Client,
        cfg: ShardConfig,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Arc<Sharding> {
        Arc::new(Sharding {
            metrics,
            fence: Mutex::new(Fence::new(cfg.lease_duration, cfg.margin)),
            client,
            origin: Instant::now(),
            view: RwLock::new(View {
                rejoin: Rejoin::new(
                    u64::try_from((cfg.lease_duration / 3).as_millis()).unwrap_or(0),
                ),
                ..View::default()
            }),
            draining: DashSet::default(),
            handing: DashSet::default(),
            writes: DashMap::default(),
            unresolved: DashMap::default(),
            resolving: DashSet::default(),
            generation: std::sync::atomic::AtomicU64::new(0),
            contested: Mutex::new(None),
            incarnation: u64::try_from(jiff::Timestamp::now().as_microsecond()).unwrap_or(0),
            on_ownership: std::sync::OnceLock::new(),
            before_handoff: std::sync::OnceLock::new(),
            released: DashMap::default(),
            awaited: DashMap::default(),
            read_mine: DashMap::default(),
            confirming: DashMap::default(),
            owned: Mutex::default(),
            leaving: std::sync::atomic::AtomicBool::new(false),
            marked_leaving: tokio::sync::OnceCell::new(),
            left: std::sync::atomic::AtomicBool::new(false),
            cfg,
        })
    }

    fn now(&self) -> Duration {
        self.origin.elapsed()
    }

    /// `namespace/name` of a membership Lease, for API calls.
    fn member_target(&self, name: &str) -> String {
        format!("{}/{name}", self.cfg.namespace)
    }

    /// May this replica write at all right now (its membership Lease is surely live)?
    pub fn may_write(&self) -> bool {
        self.fence
            .lock()
            .map(|f| f.may_write(self.now()))
            .unwrap_or(false)
    }

    /// How long this replica may still write; every write's timeout is bounded by it.
    pub fn write_window(&self) -> Duration {
        self.fence
            .lock()
            .map(|f| f.remaining(self.now()))
            .unwrap_or(Duration::ZERO)
    }

    /// May a reconcile (or renewal) of `lock` start: this replica owns it, may write, and is
    /// not handing it off? A handoff waits for the writes of one that started (each write asks
    /// for its own [`permit`](Self::permit)), not for the plan.
    pub fn may_begin(&self, lock: &StatefulSetLock) -> bool {
        let key = lock_key(lock);
        lock.labels().get(SHARD_LABEL) == Some(&self.cfg.id)
            && self.may_write()
            && !self.is_draining(&key)
            && !self.predates_own_handoff(&key, lock)
    }

    /// A handoff of the lock is being decided (drained for it, or its answer lost and not
    /// settled yet): its writes are refused until that is over.
    pub fn is_draining(&self, key: &str) -> bool {
        self.draining.contains(key) || self.unresolved.contains_key(key)
    }

    /// Is this view of the lock older than this replica's own handoff of it? Such a view
    /// still shows this replica as the owner: nothing may start or be written from it.
    fn predates_own_handoff(&self, key: &str, lock: &StatefulSetLock) -> bool {
        let seen: u64 = lock
            .resource_version()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        self.released
            .get(key)
            .is_some_and(|handed_off| seen < *handed_off)
    }

    /// The fence generation (see the field).
    pub fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// What to do when this replica gains or gives up a lock; set once, when the replica is
    /// wired.
    pub fn on_ownership(&self, f: OnOwnership) {
        let _ = self.on_ownership.set(f);
    }

    /// What to do with a lock just before it is handed off (drained and relabelled), while
    /// this replica may still write for it: renew its Lease, so the next owner starts with most
    /// of a Lease duration whatever the phase of this replica's renewals. Without it a lock
    /// handed over just before its renewal was due left the next owner half a Lease minus the
    /// handoff to learn of it, re-read it and renew — under slow answers, or a next owner that
    /// had just restarted, not enough (Leases of healthy writers lapsed in the chaos soak after
    /// graceful restarts). Set once, when the replica is wired. The hook's writes ask for
    /// permits like any other and end before draining begins; it must bound its own calls.
    /// It answers whether the handoff may go on: not when the Lease was due and could not be
    /// renewed (the handoff is put off to a later pass, and the renewal lane keeps trying).
    pub fn before_handoff(&self, f: BeforeHandoff) {
        let _ = self.before_handoff.set(f);
    }

    /// Permission to send one write for `lock` (as this replica sees it now, freshest view
    /// first), for a plan started in fence generation `generation`. Checked at every write,
    /// not only when a plan starts: ownership can move and the fence can close in between.
    /// The permit bounds the write's timeout (`window`) and counts it in flight until
    /// dropped, so a handoff can wait for it; `unknown_outcome` records a write that may still
    /// land.
    pub fn permit(
        &self,
        lock: &StatefulSetLock,
        generation: u64,
    ) -> Result<WritePermit<'_>, Refused> {
        let key = lock_key(lock);
        if lock.labels().get(SHARD_LABEL) != Some(&self.cfg.id)
            || self.is_draining(&key)
            || self.predates_own_handoff(&key, lock)
        {
            return Err(Refused::NotOwner);
        }
        if generation != self.generation() {
            return Err(Refused::Fenced);
        }
        // Counted in flight before the window is read: a handoff that sets `draining` after
        // the check above waits for this write.
        self.writes.entry(key.clone()).or_default().0 += 1;
        let permit = WritePermit {
            sharding: self,
            key,
            window: self.write_window(),
        };
        if permit.window.is_zero() {
            return Err(Refused::Fenced);
        }
        // Re-checked with the write counted: a handoff that began meanwhile sees it.
        if self.is_draining(&permit.key) {
            return Err(Refused::NotOwner);
        }
        Ok(permit)
    }

    /// The locks (`namespace/name`) this replica owns as of its last assignment pass.
    pub fn owned_keys(&self) -> HashSet<String> {
        self.owned.lock().map(|o| o.clone()).unwrap_or_default()
    }

    pub fn ring_members(&self) -> Vec<String> {
        self.view
            .read()
            .map(|v| {
                v.ring
                    .as_ref()
                    .map(|r| r.members().to_vec())
                    .unwrap_or_default()
            })
            .unwrap_or_default()
    }

    fn leases(&self) -> Api<Lease> {
        Api::namespaced(self.client.clone(), &self.cfg.namespace)
    }

    fn lease_name(&self) -> String {
        membership_lease_name(&self.cfg.group, &self.cfg.id)
    }

    /// Create or renew this replica's membership Lease; on success the fence moves.
    async fn renew(&self) -> crate::error::Result<()> {
        let started = self.now();
        // Trust in cached views survives a closed fence as long as the membership Lease cannot
        // have expired meanwhile: before that, no peer can have claimed anything.
        let was_closed = self
            .fence
            .lock()
            .map(|f| f.may_have_expired(started))
            .unwrap_or(true);
        // Microsecond precision, as the apiserver stores it: a read-back compares equal.
        let micros = jiff::Timestamp::now().as_microsecond();
        let now = MicroTime(jiff::Timestamp::from_microsecond(micros).unwrap_or_default());
        let name = self.lease_name();
        let timeout = self.cfg.api_timeout;
        let mut patch = json!({"spec": {"renewTime": now, "holderIdentity": self.cfg.id}});
        // The placement this replica runs with (null removes an earlier process's).
        let placement = (self.cfg.placement == crate::config::Placement::Bounded)
            .then(|| bounded_mark(&now))
            .flatten();
        patch["metadata"] = json!({"annotations": {PLACEMENT_ANNOTATION: placement}});
        if self.leaving.load(std::sync::atomic::Ordering::SeqCst) {
            patch["metadata"]["annotations"][LEAVING_ANNOTATION] = json!("true");
        } else if self.generation() == 0 {
            // Until this process's first renewal: a Lease marked `leaving` by an earlier one
            // whose leave never finished (killed during its handoffs) is unmarked, or this one
            // would stay off every ring. Only then: a later renewal sent just before this
            // process's own leave began could land after the mark and undo it.
            patch["metadata"]["annotations"][LEAVING_ANNOTATION] = serde_json::Value::Null;
        }
        let is_mine = |l: &Lease| {
            l.spec.as_ref().and_then(|s| s.renew_time.as_ref()) == Some(&now)
                && l.spec.as_ref().and_then(|s| s.holder_identity.as_deref())
                    == Some(self.cfg.id.as_str())
        };
        let api = self.leases();
        let read_back = || {
            call_opt(
                &self.metrics,
                ApiCall::get(Kind::Lease, self.member_target(&name)).note("read back"),
                timeout,
                api.get(&name),
            )
        };
        let (pp, body) = (PatchParams::default(), Patch::Merge(&patch));
        let send = || {
            call_opt(
                &self.metrics,
                ApiCall::patch(Kind::Lease, self.member_target(&name)).note("membership renewal"),
                timeout,
                api.patch(&name, &pp, &body),
            )
        };
        let write = send();
        tokio::pin!(write);
        // An answer that is late (held, or lost) does not mean the renewal did not happen: if
        // none came within HEDGE, a read shows whether it committed, and if it did the fence
        // opens now instead of after the whole API timeout (after a restart every held Lease
        // waits for it). The same renewal is sent once more meanwhile (the same renewTime: it
        // does not matter which lands, or if both do): a write served late, or whose answer is
        // lost, then costs HEDGE, not the API timeout and a retry.
        let answered = tokio::select! {
            r = &mut write => Some(r),
            _ = tokio::time::sleep(HEDGE.min(timeout / 2)) => None,
        };
        // The read-back and the second write race the first: whichever shows the renewal first
        // wins (awaiting the read alone added a whole round trip to every slow renewal).
        let answered = match answered {
            Some(r) => r,
            None => {
                let (read, again) = (read_back(), send());
                tokio::pin!(read, again);
                // Both attempts' errors, once they have failed.
                let mut failed: Vec<crate::error::Error> = vec![];
                let (mut read_done, mut first_done, mut second_done) = (false, false, false);
                loop {
                    tokio::select! {
                        r = &mut write, if !first_done => {
                            first_done = true;
                            match r {
                                Ok(v) => break Ok(v),
                                Err(e) => failed.push(e),
                            }
                        }
                        r = &mut again, if !second_done => {
                            second_done = true;
                            match r {
                                Ok(v) => break Ok(v),
                                Err(e) => failed.push(e),
                            }
                        }
                        r = &mut read, if !read_done => {
                            read_done = true;
                            if let Ok(Some(l)) = r && is_mine(&l) {
                                break Ok(Some(l));
                            }
                        }
                    }
                    if failed.len() == 2 {
                        // Both failed: an unknown outcome is the one to report (it is read
                        // back below).
                        let i = failed.iter().position(|e| e.outcome_unknown()).unwrap_or(1);
                        break Err(failed.swap_remove(i));
                    }
                }
            }
        };
        let renewed = match answered {
            Ok(r) => r,
            // Maybe committed (the answer was lost or late): read it back (rule 14). If the
            // Lease carries exactly the renewTime sent, the renewal happened, and peers see it.
            Err(e) if e.outcome_unknown() => match read_back().await {
                Ok(Some(l)) if is_mine(&l) => Some(l),
                _ => return Err(e),
            },
            Err(e) => return Err(e),
        };
        if self.left.load(std::sync::atomic::Ordering::SeqCst) {
            // The leave finished while this renewal was in flight: it must neither re-create
            // the Lease nor reopen the fence.
            return Ok(());
        }
        if renewed.is_none() {
            let lease = Lease {
                metadata: kube::api::ObjectMeta {
                    name: Some(name.clone()),
                    labels: Some([(GROUP_LABEL.to_string(), self.cfg.group.clone())].into()),
                    // Peers place by bounded loads from this Lease's first version on: without
                    // the mark they would place by the ring until its next renewal.
                    annotations: placement.map(|p| [(PLACEMENT_ANNOTATION.to_string(), p)].into()),
                    ..Default::default()
                },
                spec: Some(k8s_openapi::api::coordination::v1::LeaseSpec {
                    holder_identity: Some(self.cfg.id.clone()),
                    lease_duration_seconds: i32::try_from(self.cfg.lease_duration.as_secs()).ok(),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now.clone()),
                    ..Default::default()
                }),
            };
            call(
                &self.metrics,
                ApiCall::create(Kind::Lease, self.member_target(&name)),
                timeout,
                self.leases().create(&PostParams::default(), &lease),
            )
            .await?;
        }
        if let Ok(mut f) = self.fence.lock() {
            if self.left.load(std::sync::atomic::Ordering::SeqCst) {
                return Ok(());
            }
            // Reopening after the Lease may have expired — before this renewal was sent, or
            // while it was in flight (sent in time, answered after the expiry) — or for the
            // first time in this process: peers may have claimed locks (or a previous process's
            // last write may still land), and the caches need not show it yet.
            if was_closed || f.may_have_expired(self.now()) {
                self.generation
                    .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let until = Instant::now()
                    + self.claim_sent_within()
                    + self.cfg.api_timeout
                    + Duration::from_secs(1);
                if let Ok(mut c) = self.contested.lock() {
                    *c = Some(c.map_or(until, |earlier| earlier.max(until)));
                }
            }
            f.renewed(started);
        }
        Ok(())
    }

    /// See [`CLAIM_SENT_WITHIN`].
    fn claim_sent_within(&self) -> Duration {
        CLAIM_SENT_WITHIN.min(self.cfg.api_timeout)
    }

    /// Must ownership of a lock read from now on be confirmed by a write (see `contested`)?
    /// Asked before the read: a read started after the window is enough.
    pub fn must_confirm(&self) -> bool {
        self.contested
            .lock()
            .is_ok_and(|c| c.is_some_and(|until| Instant::now() < until))
    }

    /// This replica's term in `generation`: the value of [`SHARD_TERM_ANNOTATION`] it writes.
    fn term(&self, generation: u64) -> String {
        format!("{}.{:x}.{generation}", self.cfg.id, self.incarnation)
    }

    /// Confirm that `read` (a version of the lock labelled for this replica) is this replica's
    /// in `generation`. Just after the fence reopened (`must`: what
    /// [`must_confirm`](Self::must_confirm) said before the read) a read does not show it: a
    /// peer's claim decided on this replica's absence may land after it. Then this replica's
    /// term is written into the lock, compare-and-swap on the resourceVersion of `read`: once
    /// that write lands no earlier claim can (it conflicts), and a later one is decided on a
    /// fresh read of the membership, which shows this replica alive. With `must`, `read` may
    /// be a cached version rather than one just read: the compare-and-swap proves it current
    /// (a stale one gets a 409), and a cached term of this generation exists only if this
    /// replica's own confirmation landed. Without `must`, `read` must come from a read started
    /// after the window.
    ///
    /// A confirmation that conflicts or gets no answer is resolved here by one read of the
    /// lock: this replica's term in it means the write landed (only this process writes it,
    /// and only in this generation), otherwise it is tried once more on the version read. One
    /// confirmation per lock runs at a time (the renewal and reconcile lanes both confirm):
    /// the second finds the first's answer instead of conflicting with it.
    ///
    /// Returns the lock as confirmed (the write's answer, or the read showing it), `None` when
    /// it is not this replica's; an error (a conflict, a lost answer) means "not confirmed
    /// yet": read again and retry.
    ///
    /// The writes are budgeted in `lane`: the renewal lane's confirmations (each is followed
    /// by a renewal) go before reconciles, the reconcile lane's do not (after a restart, its
    /// first pass over every lock confirmed them all in the renewals' lane and took the budget
    /// from the Leases about to expire). The first write's token is taken before this lock's
    /// turn, so a confirmation waiting for a reconcile token never holds up a renewal's.
    pub async fn confirm_owner(
        &self,
        read: &StatefulSetLock,
        generation: u64,
        must: bool,
        limits: &crate::limits::Limits,
        lane: crate::limits::Lane,
    ) -> crate::error::Result<Option<StatefulSetLock>> {
        if read.labels().get(SHARD_LABEL) != Some(&self.cfg.id) {
            return Ok(None);
        }
        let term = self.term(generation);
        if !must || read.annotations().get(SHARD_TERM_ANNOTATION) == Some(&term) {
            return Ok(Some(read.clone()));
        }
        let key = lock_key(read);
        // Confirmed already (the other lane's write, or its read): no token spent.
        if let Some(known) = self.confirmed_since(&key, generation, &term, read) {
            return Ok(Some(known));
        }
        limits.acquire(lane).await;
        let gate = self.confirming.entry(key.clone()).or_default().clone();
        let result = {
            let _turn = gate.lock().await;
            self.confirm_by_write(read, generation, &term, limits).await
        };
        drop(gate);
        self.confirming
            .remove_if(&key, |_, g| Arc::strong_count(g) == 1);
        result
    }

    /// The lock as this replica confirmed or read it in `generation` with its `term`, when
    /// that is at least as new as `read` (a confirmation already made by the other lane).
    fn confirmed_since(
        &self,
        key: &str,
        generation: u64,
        term: &str,
        read: &StatefulSetLock,
    ) -> Option<StatefulSetLock> {
        let known = self.read_mine.get(key).map(|r| r.clone())?;
        let confirmed = known.0.labels().get(SHARD_LABEL) == Some(&self.cfg.id)
            && known
                .0
                .annotations()
                .get(SHARD_TERM_ANNOTATION)
                .map(String::as_str)
                == Some(term);
        (known.1 == generation
            && confirmed
            && crate::cache::fresh::rv_number(known.0.resource_version().as_deref())
                >= crate::cache::fresh::rv_number(read.resource_version().as_deref()))
        .then(|| (*known.0).clone())
    }

    /// The write of [`confirm_owner`](Self::confirm_owner), with its resolution by a read.
    async fn confirm_by_write(
        &self,
        read: &StatefulSetLock,
        generation: u64,
        term: &str,
        limits: &crate::limits::Limits,
    ) -> crate::error::Result<Option<StatefulSetLock>> {
        let key = lock_key(read);
        let mine = |l: &StatefulSetLock| l.labels().get(SHARD_LABEL) == Some(&self.cfg.id);
        let confirmed = |l: &StatefulSetLock| {
            mine(l)
                && l.annotations()
                    .get(SHARD_TERM_ANNOTATION)
                    .map(String::as_str)
                    == Some(term)
        };
        // Confirmed while this one waited its turn (the other lane's write, or its read).
        if let Some(known) = self.confirmed_since(&key, generation, term, read) {
            return Ok(Some(known));
        }
        let ns = read.namespace().unwrap_or_default();
        let api: Api<StatefulSetLock> = Api::namespaced(self.client.clone(), &ns);
        let mut from = read.clone();
        let mut resolved_once = false;
        // The first write's token was taken before this lock's turn (in its lane). A retry
        // (after a conflict, or a lost answer that did not land) is taken in the renewals'
        // share whatever the lane: it holds this lock's turn, and a renewal of the lock may be
        // waiting for it — a reconcile token is not served while renewals wait for theirs.
        let mut paid = true;
        loop {
            if !std::mem::take(&mut paid) {
                limits.acquire(crate::limits::Lane::Renewal).await;
            }
            let permit = match self.permit(&from, generation) {
                Ok(p) => p,
                Err(Refused::Fenced) => return Err(crate::error::Error::Fenced),
                Err(Refused::NotOwner) => return Ok(None),
            };
            let patch = json!({"metadata": {
                "resourceVersion": from.resource_version(),
                "annotations": {SHARD_TERM_ANNOTATION: term},
            }});
            let (name, params, patch) = (
                from.name_any(),
                PatchParams::default(),
                Patch::Merge(&patch),
            );
            let write = call(
                &self.metrics,
                ApiCall::patch(Kind::StatefulSetLock, key.clone()).note("confirming ownership"),
                self.cfg.api_timeout.min(permit.window),
                api.patch(&name, &params, &patch),
            );
            // Hedged: with no answer after HEDGE, one read shows whether it landed (a lost or
            // late answer otherwise costs the whole timeout, and the Lease renewal waiting for
            // this confirmation was sent too late to land before the Lease expired). A read
            // showing the term is this write's landing: any other write of the term came before
            // it and makes this compare-and-swap fail.
            let read_back = async {
                tokio::time::sleep(HEDGE).await;
                match call_opt(
                    &self.metrics,
                    ApiCall::get(Kind::StatefulSetLock, key.clone()).note("confirmation hedge"),
                    self.cfg.api_timeout.min(permit.window),
                    api.get(&name),
                )
                .await
                {
                    Ok(Some(now)) if confirmed(&now) => Some(now),
                    _ => None,
                }
            };
            let result = tokio::select! {
                result = write => result,
                Some(now) = read_back => {
                    tracing::debug!(shard = %self.cfg.id, lock = %key, "ownership confirmed: read back before the confirmation's answer");
                    return Ok(Some(self.confirmed_as(&key, now, generation)));
                }
            };
            let e = match result {
                Ok(updated) => {
                    tracing::debug!(shard = %self.cfg.id, lock = %key, "ownership confirmed");
                    return Ok(
                        Some(self.confirmed_as(&key, updated, generation)).filter(|l| mine(l))
                    );
                }
                Err(e) => e,
            };
            if e.outcome_unknown() {
                permit.unknown_outcome();
            }
            drop(permit);
            if resolved_once || !(e.is_conflict() || e.outcome_unknown()) {
                return Err(e);
            }
            resolved_once = true;
            // What became of it is learnt from one read, not from another write on a version
            // known to be behind (each a round trip; under slow answers, Leases lapsed while
            // confirmations conflicted one after another).
            let now = match call_opt(
                &self.metrics,
                ApiCall::get(Kind::StatefulSetLock, key.clone()).note("confirmation outcome"),
                self.cfg.api_timeout,
                api.get(&from.name_any()),
            )
            .await
            {
                Ok(Some(now)) => now,
                Ok(None) => return Err(e),
                Err(read_error) => {
                    tracing::debug!(shard = %self.cfg.id, lock = %key, error = %read_error, "confirmation outcome not read");
                    return Err(e);
                }
            };
            if !mine(&now) {
                return Ok(None);
            }
            if confirmed(&now) {
                tracing::debug!(shard = %self.cfg.id, lock = %key, error = %e, "ownership confirmed: the unanswered confirmation landed");
                return Ok(Some(self.confirmed_as(&key, now, generation)));
            }
            tracing::debug!(shard = %self.cfg.id, lock = %key, error = %e, "ownership confirmation tried again on the version read");
            from = now;
        }
    }

    /// Remember `lock` (confirmed in `generation`): assignment works from this version until
    /// the lock watch delivers one as new (a handoff from an older one would conflict).
    fn confirmed_as(&self, key: &str, lock: StatefulSetLock, generation: u64) -> StatefulSetLock {
        self.read_mine
            .insert(key.to_string(), (Arc::new(lock.clone()), generation));
        lock
    }

    /// Renew the membership Lease every S/3 until leaving.
    pub async fn membership_loop(self: Arc<Self>) {
        let every = self.cfg.lease_duration / 3;
        // A leaving replica keeps renewing while it hands its locks off (its fence must stay
        // open for those writes); it stops when the leave is done.
        while !self.left.load(std::sync::atomic::Ordering::SeqCst) {
            let started = tokio::time::Instant::now();
            let result = self.renew().await;
            // Renewals start every S/3 whatever their answers take: the fence runs from when a
            // renewal was sent, so counting S/3 from the answer let slow answers (a fifth of S)
            // close it before the next renewal was answered, and every reopening bumps the
            // generation (all trust in cached ownership lost). A failed renewal is tried again
            // soon: waiting S/3 after a failure can close the fence (or keep it closed after a
            // restart) for longer than a lock's Lease lasts, and after a restart every Lease of
            // the replica waits for the fence to open.
            let next = match &result {
                Ok(()) => started + every,
                Err(_) => tokio::time::Instant::now() + every.min(Duration::from_millis(250)),
            };
            if let Err(e) = result {
                tracing::warn!(error = %e, shard = %self.cfg.id, "membership renewal failed");
            }
            tokio::time::sleep_until(next).await;
        }
    }

    /// Note one observation of a member's Lease. Liveness is measured on this observer's clock,
    /// from when it saw the renewTime change, never from the holder's timestamp.
    fn observe_member(&self, l: &Lease) {
        let spec = l.spec.clone().unwrap_or_default();
        let Some(id) = spec.holder_identity.clone() else {
            return;
        };
        let duration = Duration::from_secs(spec.lease_duration_seconds.unwrap_or(15).max(1) as u64);
        let leaving = l.annotations().contains_key(LEAVING_ANNOTATION);
        let bounded = spec
            .renew_time
            .as_ref()
            .and_then(bounded_mark)
            .is_some_and(|mark| l.annotations().get(PLACEMENT_ANNOTATION) == Some(&mark));
        let now_ms = self.now().as_millis() as u64;
        if let Ok(mut v) = self.view.write() {
            match v.members.get_mut(&id) {
                Some(seen) if seen.renew_time == spec.renew_time => {
                    seen.leaving = leaving;
                    seen.duration = duration;
                    seen.bounded = bounded;
                }
                _ => {
                    v.members.insert(
                        id,
                        Seen {
                            renew_time: spec.renew_time,
                            at_ms: now_ms,
                            duration,
                            leaving,
                            bounded,
                        },
                    );
                }
            }
        }
    }

    /// Watch the group's membership Leases and keep the ring.
    pub async fn watch_members(self: Arc<Self>) {
        let api = self.leases();
        let cfg = crate::cache::watch::watch_config()
            .labels(&format!("{GROUP_LABEL}={}", self.cfg.group));
        let mut stream = watcher(api, cfg)
            .backoff(crate::cache::watch::backoff())
            .boxed();
        while let Some(ev) = stream.next().await {
            match ev {
                Ok(watcher::Event::Apply(l)) | Ok(watcher::Event::InitApply(l)) => {
                    self.observe_member(&l)
                }
                Ok(watcher::Event::Delete(l)) => {
                    // A graceful leaver marked its Lease first and deletes it only when it
                    // writes no more: it is gone at once. Any other delete (a person, another
                    // controller) says nothing about whether the replica still runs: it gets
                    // the same grace as an expiry, measured from its last renewal seen.
                    // Only the version last seen: a delete delivered late by a lagging watch,
                    // after a fresh read showed the replica's next process renewing a new Lease,
                    // says nothing about that process.
                    let leaving = l.annotations().contains_key(LEAVING_ANNOTATION);
                    let spec = l.spec.unwrap_or_default();
                    if let (Some(id), Ok(mut v)) = (spec.holder_identity, self.view.write())
                        && leaving
                        && v.members
                            .get(&id)
                            .is_none_or(|seen| seen.renew_time == spec.renew_time)
                    {
                        v.members.remove(&id);
                    }
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "membership watch"),
            }
            self.recompute();
        }
    }

    /// A quorum LIST of the group's membership Leases: before a peer is declared dead, its
    /// Lease is read fresh, so a stalled watch cannot make a live peer look dead.
    async fn refresh_members(&self) -> bool {
        self.refresh_members_listed().await.is_some()
    }

    /// [`refresh_members`](Self::refresh_members), returning the ids of the members whose
    /// Leases the read showed (None: the read failed).
    async fn refresh_members_listed(&self) -> Option<HashSet<String>> {
        let lp =
            kube::api::ListParams::default().labels(&format!("{GROUP_LABEL}={}", self.cfg.group));
        match call(
            &self.metrics,
            ApiCall::list(
                Kind::Lease,
                format!("{}/{GROUP_LABEL}={}", self.cfg.namespace, self.cfg.group),
            ),
            self.cfg.api_timeout,
            self.leases().list(&lp),
        )
        .await
        {
            Ok(list) => {
                for l in &list.items {
                    self.observe_member(l);
                }
                Some(
                    list.items
                        .iter()
                        .filter_map(|l| l.spec.as_ref()?.holder_identity.clone())
                        .collect(),
                )
            }
            Err(e) => {
                tracing::warn!(error = %e, "membership refresh");
                None
            }
        }
    }

    /// Recompute alive members and the ring; true when the ring changed.
    fn recompute(&self) -> bool {
        let now_ms = self.now().as_millis() as u64;
        let Ok(mut v) = self.view.write() else {
            return false;
        };
        let members: Vec<Member> = v
            .members
            .iter()
            .map(|(id, seen)| Member {
                id: id.clone(),
                renewed_at_ms: seen.at_ms,
                duration: seen.duration,
                leaving: false,
            })
            .collect();
        let holders: HashSet<String> = alive_members(&members, now_ms, self.cfg.grace)
            .into_iter()
            .collect();
        let me_leaving = self.leaving.load(std::sync::atomic::Ordering::SeqCst);
        let mut ring_members: Vec<String> = holders
            .iter()
            .filter(|id| {
                let leaving = v.members.get(*id).is_some_and(|s| s.leaving);
                !(leaving || (me_leaving && **id == self.cfg.id))
            })
            .cloned()
            .collect();
        ring_members.sort();
        v.rejoin.observe(&ring_members, now_ms);
        let unchanged = v
            .ring
            .as_ref()
            .is_some_and(|r| r.members() == ring_members.as_slice());
        v.alive = holders;
        // Bounded loads only while every replica on the ring places by them.
        let bounded = self.cfg.placement == crate::config::Placement::Bounded
            && ring_members
                .iter()
                .all(|id| v.members.get(id).is_some_and(|s| s.bounded));
        if !bounded {
            v.placement = None;
        } else if v.placement.is_none() {
            v.placement = Some(PlacementView::default());
        }
        if !unchanged {
            tracing::info!(shard = %self.cfg.id, members = ?ring_members, bounded, "ring changed");
            v.ring = Some(Ring::new(&ring_members));
        }
        let View {
            ring, placement, ..
        } = &mut *v;
        if let (Some(ring), Some(p)) = (ring.as_ref(), placement.as_mut())
            && p.members != ring.members()
        {
            p.compute(ring);
        }
        !unchanged
    }

    /// Place the assignment pass's locks (bounded loads; nothing to do placing by the ring).
    /// Computed outside the view's lock (the membership watch takes it), and not again while
    /// neither the locks' labels nor the ring changed.
    fn place(&self, locks: Vec<(String, Option<String>)>) {
        let ring = match self.view.read() {
            Ok(v) => match (&v.ring, &v.placement) {
                (Some(ring), Some(p)) if p.members != ring.members() || p.locks != locks => {
                    ring.clone()
                }
                _ => return,
            },
            Err(_) => return,
        };
        let mut placed = PlacementView {
            locks,
            ..PlacementView::default()
        };
        placed.compute(&ring);
        if let Ok(mut v) = self.view.write()
            && v.placement.is_some()
            && v.ring
                .as_ref()
                .is_some_and(|r| r.members() == ring.members())
        {
            v.placement = Some(placed);
        }
    }

    /// Whether this replica may hand `lock` to `to` now. Not from a view older than its own
    /// handoff of it (a lock watch behind the handoff still shows the label): that would hand it
    /// off again, with a stale resourceVersion, and conflict every pass until the watch catches
    /// up — each time renewing its Lease first. Nor while one is running. Nor to a peer just
    /// back on the ring (see `Rejoin`).
    fn may_release(&self, key: &str, lock: &StatefulSetLock, to: &str) -> bool {
        !self.is_draining(key) && !self.predates_own_handoff(key, lock) && self.may_hand_to(to)
    }

    /// Claim, hand off or leave each lock as the rules say (up to [`MOVES_IN_PARALLEL`] moves at
    /// once). Runs periodically and on ring changes.
    pub async fn assign(&self, locks: &Store<StatefulSetLock>, scope: &crate::scope::Scope) {
        self.recompute();
        if !self.may_write() {
            return;
        }
        self.resolve_unknown_handoffs().await;
        // When this pass's first membership re-read started (claims from dead owners that
        // outlast its window read it again: `dead_owner_claimable`).
        let mut refreshed: Option<Instant> = None;
        // The membership re-read a claim needs failed: nothing moves this pass.
        let mut unread = false;
        // The members that re-read showed.
        let mut listed: Option<HashSet<String>> = None;
        let mut work = vec![];
        let mut mine = HashSet::new();
        let mut gained = vec![];
        let mut lost = vec![];
        let mut awaited = HashSet::new();
        let mut to_read = vec![];
        let now = Instant::now();
        let generation = self.generation();
        let views: Vec<(String, Arc<StatefulSetLock>)> = locks
            .state()
            .into_iter()
            .filter(|l| scope.allows(l.metadata.namespace.as_deref().unwrap_or_default()))
            .map(|cached| {
                let key = lock_key(&cached);
                let lock = self.best_view(&key, cached, generation, true);
                (key, lock)
            })
            .collect();
        if self.view.read().is_ok_and(|v| v.placement.is_some()) {
            self.place(
                views
                    .iter()
                    .map(|(k, l)| (k.clone(), l.labels().get(SHARD_LABEL).cloned()))
                    .collect(),
            );
        }
        for (key, lock) in views {
            let label = lock.labels().get(SHARD_LABEL).map(String::as_str);
            let was_owned = self.owned.lock().is_ok_and(|o| o.contains(&key));
            match self.ownership_of(&key, &lock) {
                Some(true) => {
                    if !was_owned {
                        gained.push(lock.clone());
                    }
                    mine.insert(key.clone());
                }
                Some(false) if was_owned => lost.push(lock.clone()),
                _ => {}
            }
            let mut decision = self.decide_for(&key, label);
            // Claiming a lock whose labelled owner looks dead: make sure it is, by a fresh
            // read of the membership Leases (my watch may just have stalled).
            // And handing a lock off: a peer that began to leave (its mark behind my stalled or
            // lagging membership watch) may just have handed it to me, and would get it back,
            // only to hand it on again — under slow answers its Lease lapsed meanwhile. A lock
            // goes only to a peer whose Lease this pass's read showed.
            let releasing = matches!(&decision, Some(Decision::Release { to })
                if self.may_release(&key, &lock, to));
            let claiming = decision == Some(Decision::Claim) && label.is_some();
            if (claiming || releasing) && refreshed.is_none() {
                refreshed = Some(Instant::now());
                listed = self.refresh_members_listed().await;
                if listed.is_some() {
                    self.recompute();
                    decision = self.decide_for(&key, label);
                } else {
                    // No move this pass; the pass still goes on, so that the locks this
                    // replica holds are reported below (their Leases need renewal entries).
                    unread = true;
                }
            }
            // A view that names me but is older than my own handoff of the lock says nothing
            // of the label now. With the ring giving the lock back to me, the peer may have
            // handed it back behind my watch: ask the API server, as for an awaited handoff
            // (the read counts only if labelled mine and no older than that handoff). Not
            // when the ring says the peer: that is my handoff itself, still on its way.
            let stale_own =
                decision == Some(Decision::Own) && self.only_own_handoff_known(&key, &lock);
            let read_it = stale_own || matches!(decision, Some(Decision::WaitForHandoff { .. }));
            match decision {
                _ if read_it => {
                    let mut e = self.awaited.entry(key.clone()).or_insert((now, None));
                    let (since, read) = *e;
                    if now.duration_since(since) >= HANDOFF_READ_AFTER
                        && read.is_none_or(|r| now.duration_since(r) >= HANDOFF_READ_EVERY)
                        && to_read.len() < HANDOFF_READS_PER_PASS
                    {
                        e.1 = Some(now);
                        to_read.push(lock.clone());
                    }
                    awaited.insert(key);
                }
                Some(Decision::Claim) => {
                    let from_dead = label.is_some();
                    work.push((lock, None, from_dead))
                }
                Some(Decision::Release { to })
                    if self.may_release(&key, &lock, &to)
                        && listed.as_ref().is_some_and(|ids| ids.contains(&to)) =>
                {
                    work.push((lock, Some(to), false))
                }
                _ => {}
            }
        }
        self.awaited.retain(|k, _| awaited.contains(k));
        if !self.read_mine.is_empty() {
            let present: HashSet<String> = locks.state().iter().map(|l| lock_key(l)).collect();
            self.read_mine.retain(|k, _| present.contains(k));
        }
        // Locks labelled mine that this incarnation has not reported yet: a restart's locks, or
        // a peer's handoff. Their Leases may be near expiry, and the reconcile lane reaches
        // them one by one (after a restart, its first pass over every lock): the renewal lane
        // takes them now (rule 16).
        if let Ok(mut o) = self.owned.lock() {
            *o = mine;
        }
        if let Some(f) = self.on_ownership.get() {
            for lock in &gained {
                f(lock, true);
            }
            for lock in &lost {
                f(lock, false);
            }
        }
        if !unread {
            // Each move is one compare-and-swap of one lock's label (a handoff first waits for
            // that lock's in-flight work): independent per lock, so they run side by side. One
            // at a time, a dead peer's few hundred locks took one round trip each to be re-owned
            // (about 11 s for 330 locks on a real apiserver). They go first: a claim is decided
            // on a fresh read of the membership, which must not age behind slow reads.
            // Claims first: they must go out soon after the membership read (below), and a
            // handoff can take seconds (it waits for the lock's writes in flight).
            work.sort_by_key(|(_, to, _)| to.is_some());
            let claim_read = tokio::sync::Mutex::new(ClaimRead {
                at: refreshed,
                failed: false,
            });
            let claim_read = &claim_read;
            futures::stream::iter(work)
                .for_each_concurrent(MOVES_IN_PARALLEL, |(lock, to, from_dead)| async move {
                    match to {
                        // A claim from a dead owner goes out soon after a membership read that
                        // shows it dead, or not at all: a replica that came back meanwhile
                        // bounds by this how long such a claim can still land (see
                        // `contested`).
                        None if from_dead => {
                            if self
                                .dead_owner_claimable(&lock, claim_read, generation)
                                .await
                            {
                                self.set_owner(&lock, &self.cfg.id, "claim").await;
                            }
                        }
                        None => {
                            self.set_owner(&lock, &self.cfg.id, "claim").await;
                        }
                        Some(to) => self.hand_off(&lock, &to).await,
                    }
                })
                .await;
        }
        // Awaited handoffs that are late as the lock watch shows them: the API server's word.
        let mut gained = vec![];
        for l in self.read_awaited(to_read).await {
            let key = lock_key(&l);
            if self.generation() != generation
                || self.is_draining(&key)
                || self.predates_own_handoff(&key, &l)
            {
                continue;
            }
            self.awaited.remove(&key);
            let l = Arc::new(l);
            self.read_mine.insert(key.clone(), (l.clone(), generation));
            if self.owned.lock().is_ok_and(|mut o| o.insert(key)) {
                gained.push(l);
            }
        }
        if let Some(f) = self.on_ownership.get() {
            for lock in &gained {
                f(lock, true);
            }
        }
    }

    /// The newest view of a lock this replica has: a handoff to it read from the API server
    /// that the watch has not delivered yet (see `read_awaited`) stands for the cached one.
    /// `forget` drops a read the cache has caught up with (or from an earlier generation).
    fn best_view(
        &self,
        key: &str,
        cached: Arc<StatefulSetLock>,
        generation: u64,
        forget: bool,
    ) -> Arc<StatefulSetLock> {
        match self.read_mine.get(key).map(|r| r.clone()) {
            Some((l, g)) if g == generation && rv_of(&l) > rv_of(&cached) => l,
            Some(_) => {
                if forget {
                    self.read_mine.remove(key);
                }
                cached
            }
            None => cached,
        }
    }

    /// What `lock`'s label says about this replica's ownership of it: `Some(true)` held (not
    /// while it is handing it off, nor from a view older than its own handoff), `Some(false)`
    /// labelled for another replica by someone else (a peer's claim; a handoff of this
    /// replica's reports itself when its label write answers), `None` neither yet.
    fn ownership_of(&self, key: &str, lock: &StatefulSetLock) -> Option<bool> {
        let mine = lock.labels().get(SHARD_LABEL).map(String::as_str) == Some(self.cfg.id.as_str());
        if mine && !self.is_draining(key) && !self.predates_own_handoff(key, lock) {
            Some(true)
        } else if !mine && !self.handing.contains(key) {
            Some(false)
        } else {
            None
        }
    }

    /// Is `lock` a view older than this replica's own handoff of it, with no handoff of it
    /// under way here? Whatever happened to it since (a peer may have handed it back) only
    /// the API server can tell.
    fn only_own_handoff_known(&self, key: &str, lock: &StatefulSetLock) -> bool {
        self.predates_own_handoff(key, lock)
            && !self.is_draining(key)
            && !self.handing.contains(key)
    }

    fn may_hand_to(&self, to: &str) -> bool {
        let now_ms = self.now().as_millis() as u64;
        self.view
            .read()
            .is_ok_and(|v| v.rejoin.may_hand_to(to, now_ms))
    }

    /// The target of a handoff of `key` planned for `planned`, as the ring is now: `planned` while
    /// it is still on the ring, else the ring's owner of `key`; `None` when that is this replica
    /// or the ring is empty.
    fn target_now(&self, key: &str, planned: &str) -> Option<String> {
        let v = self.view.read().ok()?;
        let ring = v.ring.as_ref()?;
        if ring.members().iter().any(|m| m == planned) {
            return Some(planned.to_string());
        }
        Self::target(&v, ring, key)
            .filter(|owner| *owner != self.cfg.id)
            .map(str::to_string)
    }

    /// Where `key` belongs on `ring`: its bounded-load placement while the group places by
    /// bounded loads (`None` for a lock the last pass did not place yet), else its ring owner.
    fn target<'v>(v: &'v View, ring: &'v Ring, key: &str) -> Option<&'v str> {
        match &v.placement {
            Some(p) => p.targets.get(key).map(String::as_str),
            None => ring.owner(key),
        }
    }

    /// May a claim of `lock` from its dead labelled owner be sent now? Only within
    /// [`CLAIM_SENT_WITHIN`] of the start of a membership read that still shows the owner dead,
    /// and in the fence generation the pass began in. When the pass's read is older (a dead
    /// peer's few hundred locks take more than that to claim on a loaded API server), the
    /// membership is read again — once for all the claims waiting — and each claim decided
    /// again on it, rather than left to a later pass: passes are 300 ms apart and each began
    /// with its own read, so a dead peer's locks went in bursts of what one window allowed, a
    /// second or more apart. A read that fails, or answers only after the window, stops this
    /// pass's claims from dead owners (the next pass reads again).
    async fn dead_owner_claimable(
        &self,
        lock: &StatefulSetLock,
        read: &tokio::sync::Mutex<ClaimRead>,
        generation: u64,
    ) -> bool {
        let mut read = read.lock().await;
        let within =
            |at: Option<Instant>| at.is_some_and(|at| at.elapsed() <= self.claim_sent_within());
        if read.failed || self.generation() != generation {
            return false;
        }
        if !within(read.at) {
            let started = Instant::now();
            if self.refresh_members_listed().await.is_none() {
                read.failed = true;
                return false;
            }
            self.recompute();
            read.at = Some(started);
            if !within(read.at) {
                read.failed = true;
                return false;
            }
        }
        let label = lock.labels().get(SHARD_LABEL).map(String::as_str);
        label.is_some() && self.decide_for(&lock_key(lock), label) == Some(Decision::Claim)
    }

    fn decide_for(&self, key: &str, label: Option<&str>) -> Option<Decision> {
        let v = self.view.read().ok()?;
        let ring = v.ring.as_ref()?;
        if v.placement.is_some() && Self::target(&v, ring, key).is_none() {
            return None; // not placed yet: the next pass decides
        }
        Some(stslock_shard::decide(
            label,
            Self::target(&v, ring, key),
            &self.cfg.id,
            &v.alive,
        ))
    }

    /// Read `locks` (awaited handoffs) from the API server; the ones labelled for this replica
    /// now. A read that fails is tried again on a later pass.
    async fn read_awaited(&self, locks: Vec<Arc<StatefulSetLock>>) -> Vec<StatefulSetLock> {
        futures::stream::iter(locks)
            .map(|lock| async move {
                let key = lock_key(&lock);
                let api: Api<StatefulSetLock> =
                    Api::namespaced(self.client.clone(), &lock.namespace().unwrap_or_default());
                match call_opt(
                    &self.metrics,
                    ApiCall::get(Kind::StatefulSetLock, key.clone()).note("awaited handoff"),
                    self.cfg.api_timeout,
                    api.get(&lock.name_any()),
                )
                .await
                {
                    Ok(found) => {
                        found.filter(|l| l.labels().get(SHARD_LABEL) == Some(&self.cfg.id))
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, lock = %key, "awaited handoff not read");
                        None
                    }
                }
            })
            .buffer_unordered(MOVES_IN_PARALLEL)
            .filter_map(futures::future::ready)
            .collect()
            .await
    }

    /// Report locks this replica gained or lost since `owned` was last brought up to date (see
    /// the field), between assignment passes: a pass busy with a batch of handoffs (each
    /// waits for its lock's writes in flight) took seconds, and a lock handed to this replica
    /// meanwhile had no renewal entry until the pass ended — its Lease lapsed in the 500-lock
    /// chaos soak. Only adds to and removes from `owned`; the pass still replaces it whole.
    pub fn notice_ownership(&self, locks: &Store<StatefulSetLock>, scope: &crate::scope::Scope) {
        if !self.may_write() {
            return;
        }
        let generation = self.generation();
        let (mut gained, mut lost) = (vec![], vec![]);
        {
            let Ok(mut owned) = self.owned.lock() else {
                return;
            };
            for cached in locks.state() {
                if !scope.allows(cached.metadata.namespace.as_deref().unwrap_or_default()) {
                    continue;
                }
                let key = lock_key(&cached);
                let lock = self.best_view(&key, cached, generation, false);
                let held = self.ownership_of(&key, &lock);
                if held == Some(false) && owned.remove(&key) {
                    lost.push(lock);
                } else if held == Some(true) && owned.insert(key) {
                    gained.push(lock);
                }
            }
        }
        if let Some(f) = self.on_ownership.get() {
            for lock in &gained {
                f(lock, true);
            }
            for lock in &lost {
                f(lock, false);
            }
        }
    }

    /// Handoffs whose response was lost: settle where the label is. Run by every assignment
    /// pass and on a schedule of its own (`replica::run`); a lock being resolved by one is
    /// skipped by the other. They go out together: until it is settled, an unresolved lock
    /// gets no write, not even its Lease's renewal (the handoff may have landed), and a batch
    /// of handoffs whose answers were lost together, settled one after the other under slow
    /// answers (15 at about 1 s each in a P5 run), held the last ones' renewals past their
    /// Leases' expiry.
    pub async fn resolve_unknown_handoffs(&self) {
        if !self.may_write() {
            return;
        }
        let now = Instant::now();
        let keys: Vec<String> = self
            .unresolved
            .iter()
            .filter(|e| e.value().1 <= now)
            .map(|e| e.key().clone())
            .collect();
        // Marked here, unmarked when each ends or is dropped (a pass cancelled at a shutdown):
        // a mark left behind would keep its lock from ever being resolved.
        let underway: Vec<Underway<'_>> = keys
            .into_iter()
            .filter_map(|key| Underway::take(&self.resolving, key))
            .collect();
        futures::stream::iter(underway)
            .for_each_concurrent(MOVES_IN_PARALLEL, |underway| async move {
                self.resolve_unknown_handoff(&underway.0).await;
                drop(underway);
            })
            .await;
    }

    /// One lock of [`resolve_unknown_handoffs`](Self::resolve_unknown_handoffs), its key
    /// `namespace/name`.
    ///
    /// Settled by a write, not by waiting and reading: a handoff whose answer was lost may
    /// still be applied later (an API server serves a request past its client's timeout), so a
    /// read showing the label unmoved proves nothing by itself. This replica's term is written
    /// into the lock, compare-and-swap on the version the handoff was sent from: if that lands,
    /// the handoff never can (same base version) and the lock is still this replica's; a 409
    /// means the lock moved past that version (the handoff landed, or another write did), so
    /// the handoff can no longer land either and one read shows where the label is. The lock
    /// stays unresolved while neither answers (tried again by the next pass).
    async fn resolve_unknown_handoff(&self, key: &str) {
        let Some(from) = self.unresolved.get(key).map(|e| e.value().0.clone()) else {
            return;
        };
        // Only this entry is settled here: a newer one for the lock (another handoff of a
        // later version) is left to its own settlement.
        let settled = |_: &String, e: &(Arc<StatefulSetLock>, Instant)| Arc::ptr_eq(&e.0, &from);
        if from.resource_version().is_none() {
            // No base version to fence on (never the case for a lock read from the API).
            self.unresolved.remove_if(key, settled);
            return;
        }
        // Under an error storm each try is a write that fails: not more than two a second.
        if let Some(mut e) = self.unresolved.get_mut(key) {
            e.1 = Instant::now() + SETTLE_AGAIN_AFTER;
        }
        let generation = self.generation();
        let timeout = self.cfg.api_timeout.min(self.write_window());
        if timeout.is_zero() {
            return;
        }
        let ns = from.namespace().unwrap_or_default();
        let api: Api<StatefulSetLock> = Api::namespaced(self.client.clone(), &ns);
        let patch = json!({"metadata": {
            "resourceVersion": from.resource_version(),
            "annotations": {SHARD_TERM_ANNOTATION: self.term(generation)},
        }});
        let fenced = call(
            &self.metrics,
            ApiCall::patch(Kind::StatefulSetLock, key.to_string()).note("fencing a lost handoff"),
            timeout,
            api.patch(
                &from.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            ),
        )
        .await;
        let e = match fenced {
            Ok(kept) => {
                // The handoff's base version, labelled for this replica: still its own, and
                // confirmed in this generation.
                if kept.labels().get(SHARD_LABEL) == Some(&self.cfg.id) {
                    tracing::info!(shard = %self.cfg.id, lock = %key, "handoff did not land: the lock stays here");
                    self.confirmed_as(key, kept, generation);
                } else {
                    // The base version was not this replica's: nothing to keep.
                    tracing::warn!(shard = %self.cfg.id, lock = %key, owner = ?kept.labels().get(SHARD_LABEL), "handoff did not land, and the lock's version it was based on is labelled for another replica");
                }
                self.unresolved.remove_if(key, settled);
                return;
            }
            Err(e) => e,
        };
        if !(e.is_conflict() || e.is_not_found()) {
            tracing::warn!(error = %e, lock = %key, "handoff outcome unknown");
            return;
        }
        let read = call_opt(
            &self.metrics,
            ApiCall::get(Kind::StatefulSetLock, key.to_string()).note("handoff outcome"),
            self.cfg.api_timeout,
            api.get(&from.name_any()),
        )
        .await;
        match read {
            Ok(found) => {
                if let Some(l) = &found
                    && l.labels().get(SHARD_LABEL) != Some(&self.cfg.id)
                {
                    self.record_released(key, l);
                    if let Some(f) = self.on_ownership.get() {
                        f(l, false);
                    }
                }
                self.unresolved.remove_if(key, settled);
            }
            Err(e) => tracing::warn!(error = %e, lock = %key, "handoff outcome unknown"),
        }
    }

    fn record_released(&self, key: &str, updated: &StatefulSetLock) {
        let rv = updated
            .resource_version()
            .and_then(|v| v.parse().ok())
            .unwrap_or(u64::MAX);
        self.released.insert(key.to_string(), rv);
    }

    /// Drain a lock, then move its label. Draining stops new reconciles and new writes for
    /// it at once (every write asks for a permit); the label moves only when no write of this
    /// replica for the lock is in flight — and, when one ended without a known outcome, only
    /// after it can no longer land (api-timeout after it was sent). If that does not happen
    /// in time the handoff is put off, never forced.
    async fn hand_off(&self, lock: &StatefulSetLock, to: &str) {
        let key = lock_key(lock);
        let Some(_handing) = Underway::take(&self.handing, key.clone()) else {
            // Another handoff of it is under way; it decides.
            return;
        };
        self.hand_off_alone(lock, to, &key).await;
    }

    async fn hand_off_alone(&self, lock: &StatefulSetLock, to: &str, key: &str) {
        let key = key.to_string();
        if let Some(renew) = self.before_handoff.get() {
            // Not under a timeout of its own: cutting a write short would leave it in flight
            // with no record that it may still land. Its calls are bounded by api-timeout.
            if !renew(Arc::new(lock.clone())).await {
                // The Lease was due and its renewal failed: draining now would stop this
                // replica's own renewals of it for as long as the handoff takes (its wait for
                // that failed write, the label write), under the same faults — Leases of Ready
                // writers lapsed that way in the chaos soak. The next pass tries again.
                tracing::debug!(shard = %self.cfg.id, lock = %key, to, "handoff put off: the Lease's renewal before it failed");
                return;
            }
        }
        // The renewal may have confirmed ownership (a write to the lock): the label moves from
        // that version, or it would conflict.
        let newer = self
            .read_mine
            .get(&key)
            .map(|e| e.0.clone())
            .filter(|l| rv_of(l) > rv_of(lock));
        let lock = newer.as_deref().unwrap_or(lock);
        self.draining.insert(key.clone());
        let deadline = Instant::now() + self.cfg.api_timeout * 2 + Duration::from_secs(1);
        let quiet = loop {
            let busy = self.writes.get(&key).is_some_and(|e| {
                let (n, unknown) = *e;
                n > 0 || unknown.is_some_and(|t| t.elapsed() <= self.cfg.api_timeout)
            });
            if !busy {
                break true;
            }
            if Instant::now() >= deadline {
                break false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        // The renewal and the wait above can take seconds under faults, and the target was taken
        // from the ring when the handoff began: a target that has left the ring since (it began
        // a leave of its own, or died) is replaced by the owner on the ring as it is now.
        let to = match self.target_now(&key, to) {
            Some(to) => to,
            None => {
                tracing::debug!(shard = %self.cfg.id, lock = %key, to, "handoff dropped: the ring now gives the lock to this replica or to no one");
                self.draining.remove(&key);
                return;
            }
        };
        let to = to.as_str();
        if quiet {
            use tracing::Instrument;
            let span = crate::telemetry::handoff_span(
                &lock.namespace().unwrap_or_default(),
                &lock.name_any(),
                &self.cfg.id,
                to,
            );
            self.set_owner(lock, to, "handoff").instrument(span).await;
        } else {
            tracing::warn!(shard = %self.cfg.id, lock = %key, "handoff put off: a write is still in flight");
        }
        self.draining.remove(&key);
    }

    /// Write the ownership label with compare-and-swap on the lock's resourceVersion.
    async fn set_owner(&self, lock: &StatefulSetLock, owner: &str, why: &str) {
        let ns = lock.namespace().unwrap_or_default();
        let api: Api<StatefulSetLock> = Api::namespaced(self.client.clone(), &ns);
        // A claim is this replica's confirmation of ownership too (see `confirm_owner`).
        let term = (owner == self.cfg.id).then(|| self.term(self.generation()));
        let patch = json!({"metadata": {
            "resourceVersion": lock.resource_version(),
            "labels": {SHARD_LABEL: owner},
            "annotations": {SHARD_TERM_ANNOTATION: term},
        }});
        let what = ApiCall::patch(Kind::StatefulSetLock, lock_key(lock))
            .note(format!("{why} to shard {owner}"));
        // Bounded by the fence window like every write of this replica.
        let timeout = self.cfg.api_timeout.min(self.write_window());
        if timeout.is_zero() {
            return;
        }
        match call(
            &self.metrics,
            what,
            timeout,
            api.patch(
                &lock.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            ),
        )
        .await
        {
            Ok(updated) => {
                if owner != self.cfg.id {
                    self.record_released(&lock_key(lock), &updated);
                } else {
                    // Until the lock watch delivers the claim, assignment works from its answer
                    // (not from a cached view that still names the previous owner: that would
                    // claim again, and conflict, every pass).
                    self.read_mine.insert(
                        lock_key(lock),
                        (Arc::new(updated.clone()), self.generation()),
                    );
                }
                if let Ok(mut o) = self.owned.lock() {
                    if owner == self.cfg.id {
                        o.insert(lock_key(lock));
                    } else {
                        o.remove(&lock_key(lock));
                    }
                }
                if let Some(f) = self.on_ownership.get() {
                    f(&updated, owner == self.cfg.id);
                }
                if why == "handoff" {
                    self.metrics.handoff();
                }
                // The handoff span's outcome, when there is one.
                tracing::Span::current().record("stslock.outcome", "ok");
                tracing::info!(shard = %self.cfg.id, lock = %lock_key(lock), to = owner, "{why}")
            }
            // Lost the race (someone changed the lock): the next pass sees the new state.
            Err(e) if e.is_conflict() || e.is_not_found() => {
                tracing::Span::current().record("stslock.outcome", e.metric_label());
            }
            Err(e) => {
                tracing::Span::current().record("stslock.outcome", e.metric_label());
                tracing::warn!(error = %e, "ownership label");
                // A handoff that may have committed: until it is settled, the lock is
                // not this replica's to work on. (A claim that may have committed shows up in
                // the lock watch, and a claimed lock is re-read before it is decided.)
                if e.outcome_unknown() && owner != self.cfg.id {
                    self.unresolved
                        .insert(lock_key(lock), (Arc::new(lock.clone()), Instant::now()));
                }
            }
        }
    }

    /// Mark the membership Lease `leaving` (once; tried up to three times: peers hand locks to
    /// this replica until they see the mark) and take this replica off its own ring. Called as
    /// soon as a graceful stop begins, before the reconciles running are waited for.
    pub async fn mark_leaving(&self) {
        self.marked_leaving
            .get_or_init(|| async {
                self.leaving
                    .store(true, std::sync::atomic::Ordering::SeqCst);
                let name = self.lease_name();
                let mark = json!({"metadata": {"annotations": {LEAVING_ANNOTATION: "true"}}});
                for attempt in 1..=3 {
                    match call(
                        &self.metrics,
                        ApiCall::patch(Kind::Lease, self.member_target(&name)).note("leaving"),
                        self.cfg.api_timeout.min(self.write_window()),
                        self.leases()
                            .patch(&name, &PatchParams::default(), &Patch::Merge(&mark)),
                    )
                    .await
                    {
                        Ok(_) => break,
                        Err(e) => {
                            tracing::warn!(error = %e, attempt, "marking the membership Lease as leaving")
                        }
                    }
                }
                self.recompute();
            })
            .await;
    }

    /// The ring of a fresh read of the membership (of the view as it is, if the read fails):
    /// a leave's handoffs go by it, since a stalled membership watch hid a peer's own leave and
    /// locks went to a replica that was leaving too.
    async fn fresh_ring(&self) -> Option<Ring> {
        if self.refresh_members().await {
            self.recompute();
        }
        self.view.read().ok().and_then(|v| v.ring.clone())
    }

    /// Hand each of `moves` to its place on `ring`: its bounded-load target while the group
    /// places by bounded loads (on this ring), else its ring owner.
    async fn hand_all_off(&self, ring: &Ring, moves: Vec<Arc<StatefulSetLock>>) {
        futures::stream::iter(moves)
            .filter_map(|lock| {
                let key = lock_key(&lock);
                let placed = self.view.read().ok().and_then(|v| {
                    let p = v.placement.as_ref()?;
                    (p.members == ring.members()).then(|| p.targets.get(&key).cloned())?
                });
                let to = placed.or_else(|| ring.owner(&key).map(str::to_string));
                futures::future::ready(to.map(|to| (lock, to)))
            })
            .for_each_concurrent(MOVES_IN_PARALLEL, |(lock, to)| async move {
                self.hand_off(&lock, &to).await
            })
            .await;
    }

    /// The locks the API server lists labelled for this replica (none being handed off by it);
    /// `None` when the list fails.
    async fn list_own_locks(&self) -> Option<Vec<StatefulSetLock>> {
        let api: Api<StatefulSetLock> = Api::all(self.client.clone());
        let selector = format!("{SHARD_LABEL}={}", self.cfg.id);
        match call(
            &self.metrics,
            ApiCall::list(Kind::StatefulSetLock, selector.clone()).note("leaving"),
            self.cfg.api_timeout,
            api.list(&kube::api::ListParams::default().labels(&selector)),
        )
        .await
        {
            Ok(list) => Some(
                list.items
                    .into_iter()
                    .filter(|l| {
                        !self.handing.contains(&lock_key(l)) && !self.is_draining(&lock_key(l))
                    })
                    .collect(),
            ),
            Err(e) => {
                tracing::warn!(error = %e, "leaving: listing this replica's locks");
                None
            }
        }
    }

    /// During a leave's first handoffs (never ends by itself): every [`LEAVE_POLL`], the locks
    /// the API server lists labelled for this replica that are not in `known` (what the leave
    /// hands off) get renewal entries at once, as the assignment passes would give them.
    async fn renew_locks_handed_meanwhile(&self, mut known: HashSet<String>) {
        loop {
            tokio::time::sleep(LEAVE_POLL).await;
            if !self.may_write() {
                continue;
            }
            let Some(listed) = self.list_own_locks().await else {
                continue;
            };
            let new: Vec<_> = listed
                .into_iter()
                .filter(|l| known.insert(lock_key(l)))
                .collect();
            if !new.is_empty() {
                tracing::info!(shard = %self.cfg.id, locks = new.len(), "leaving: locks handed to this replica meanwhile get their Leases renewed until they are handed on");
                self.report_gained(&new);
            }
        }
    }

    /// Report `locks` (listed labelled for this replica) gained, unless already reported:
    /// their Leases get renewal entries (see `on_ownership`).
    fn report_gained(&self, locks: &[StatefulSetLock]) {
        let Some(f) = self.on_ownership.get() else {
            return;
        };
        for lock in locks {
            if self
                .owned
                .lock()
                .is_ok_and(|mut o| o.insert(lock_key(lock)))
            {
                f(lock, true);
            }
        }
    }

    /// Graceful leave: hand every owned lock to its next owner, then delete the membership
    /// Lease so peers rebalance at once.
    pub async fn leave(&self, locks: &Store<StatefulSetLock>) {
        self.mark_leaving().await;
        if let Some(ring) = self.fresh_ring().await {
            let cached: Vec<_> = locks
                .state()
                .into_iter()
                .filter(|lock| lock.labels().get(SHARD_LABEL) == Some(&self.cfg.id))
                .collect();
            // The lock watch can be behind (a peer handed this replica locks just before it saw
            // the mark): the API server's list too, from the start. The locks only it shows
            // go first: nothing renews their Leases, since this replica has never seen them.
            let listed = self.list_own_locks().await.unwrap_or_default();
            let moves = leave_order(cached, listed);
            let known: HashSet<String> = moves.iter().map(|l| lock_key(l)).collect();
            tracing::info!(shard = %self.cfg.id, locks = moves.len(), "leaving: handing locks off");
            // Those handoffs take seconds under slow answers; a lock a peer hands this replica
            // meanwhile (it has not seen the mark yet) would have nothing renewing its Lease
            // until they are done (the assignment passes, which report gained locks, stopped
            // with the reconciles). The API server's list is polled meanwhile.
            tokio::select! {
                () = self.hand_all_off(&ring, moves) => {}
                () = self.renew_locks_handed_meanwhile(known) => {}
            }
            // Peers that had not seen the mark yet may have handed locks to this replica since
            // (or the lock watch is behind): the API server's list of the locks labelled for
            // it, handed off until it is empty (a few rounds at most).
            // Not while the fence is shut (no handoff can be written), nor once a round hands
            // nothing off; a list that fails is tried again in the next round.
            let mut before = usize::MAX;
            for round in 0..LEAVE_LIST_ROUNDS {
                if !self.may_write() {
                    break;
                }
                let Some(left) = self.list_own_locks().await else {
                    if round + 1 < LEAVE_LIST_ROUNDS {
                        tokio::time::sleep(LEAVE_LIST_RETRY).await;
                    }
                    continue;
                };
                if left.is_empty() || left.len() >= before {
                    break;
                }
                before = left.len();
                let ring = self.fresh_ring().await.unwrap_or_else(|| ring.clone());
                tracing::info!(shard = %self.cfg.id, locks = left.len(), "leaving: handing off locks the API server still lists for this replica");
                self.hand_all_off(&ring, left.into_iter().map(Arc::new).collect())
                    .await;
            }
        }
        tracing::info!(shard = %self.cfg.id, "leaving: handoffs done");
        // A handoff the last assignment pass started (skipped above) must end before the
        // membership Lease goes: peers claim what is left at once. Each is bounded (its
        // renewal's re-read, write and conflict re-read, and its label write by api-timeout
        // each, its wait for in-flight writes by 2 × api-timeout + 1 s; the rate limiter is
        // what is not). Past the deadline the fence below still stops new writes.
        let deadline = Instant::now() + self.cfg.api_timeout * 8 + Duration::from_secs(1);
        while !self.handing.is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // No write of this replica may follow the delete: peers claim what is left at once.
        self.left.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Ok(mut f) = self.fence.lock() {
            *f = Fence::new(self.cfg.lease_duration, self.cfg.margin);
        }
        // The fence is closed: no new write starts. One already sent (a renewal of a lock whose
        // handoff failed or is still under way) must end, or be unable to land, first.
        let deadline = Instant::now() + self.cfg.api_timeout * 2 + Duration::from_secs(1);
        while Instant::now() < deadline
            && self.writes.iter().any(|e| {
                let (n, unknown) = *e.value();
                n > 0 || unknown.is_some_and(|t| t.elapsed() <= self.cfg.api_timeout)
            })
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tracing::info!(shard = %self.cfg.id, "leaving: deleting the membership Lease");
        let name = self.lease_name();
        if let Err(e) = call_opt(
            &self.metrics,
            ApiCall::delete(Kind::Lease, self.member_target(&name)),
            self.cfg.api_timeout,
            self.leases().delete(&name, &DeleteParams::default()),
        )
        .await
        {
            tracing::warn!(error = %e, "leaving the shard group");
        }
    }
}

/// A lock's key in one of the runtime's sets of work under way (handoffs, resolutions of lost
/// handoff answers): put in only if absent, given back when dropped — also when the work is cancelled.
struct Underway<'a>(String, &'a DashSet<String>);

impl<'a> Underway<'a> {
    fn take(set: &'a DashSet<String>, key: String) -> Option<Underway<'a>> {
        set.insert(key.clone()).then_some(Underway(key, set))
    }
}

impl Drop for Underway<'_> {
    fn drop(&mut self) {
        self.1.remove(&self.0);
    }
}

#[cfg(all(test, feature = "dev"))]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)] // a test: panics are its failures

    use super::*;
    use kubesim::{HoldResponse, Sim, SimConfig};

    fn alone(client: Client, lease_duration: Duration) -> Arc<Sharding> {
        member(client, "a", lease_duration)
    }

    fn member(client: Client, id: &str, lease_duration: Duration) -> Arc<Sharding> {
        member_placing(client, id, lease_duration, crate::config::Placement::Ring)
    }

    fn member_placing(
        client: Client,
        id: &str,
        lease_duration: Duration,
        placement: crate::config::Placement,
    ) -> Arc<Sharding> {
        Sharding::new(
            client,
            ShardConfig {
                id: id.into(),
                group: "stslock".into(),
                namespace: "default".into(),
                lease_duration,
                margin: lease_duration / 5,
                grace: Duration::from_secs(2),
                api_timeout: Duration::from_secs(2),
                placement,
            },
            Arc::new(crate::metrics::Metrics::new(id)),
        )
    }

    /// Lock `default/l0`, labelled for replica a, created through `client`.
    async fn lock_of_a(client: &Client) -> (Api<StatefulSetLock>, StatefulSetLock) {
        let locks: Api<StatefulSetLock> = Api::namespaced(client.clone(), "default");
        let lock: StatefulSetLock = serde_json::from_value(json!({
            "apiVersion": "app.anukkrit.me/v1", "kind": "StatefulSetLock",
            "metadata": {"name": "l0", "labels": {SHARD_LABEL: "a"}},
            "spec": {"statefulSetName": "s0", "leaseName": "lease0", "leaseDurationSeconds": 10}
        }))
        .unwrap();
        let lock = locks.create(&PostParams::default(), &lock).await.unwrap();
        (locks, lock)
    }

    fn lock_at(name: &str, rv: u64) -> StatefulSetLock {
        let mut l = StatefulSetLock::new(name, Default::default());
        l.metadata.namespace = Some("t".into());
        l.metadata.resource_version = Some(rv.to_string());
        l
    }

    /// A leave hands off each lock once: the ones only the API server's list shows first
    /// (nothing renews their Leases), each at the newer of its cached and listed versions, then
    /// the ones only the cache shows.
    #[test]
    fn a_leave_hands_off_locks_its_cache_never_saw_first_at_their_newest_version() {
        let cached = vec![
            Arc::new(lock_at("both-older-cache", 5)),
            Arc::new(lock_at("both-newer-cache", 9)),
            Arc::new(lock_at("cache-only", 3)),
        ];
        let listed = vec![
            lock_at("both-older-cache", 7),
            lock_at("listed-only", 4),
            lock_at("both-newer-cache", 8),
        ];
        let order: Vec<(String, u64)> = leave_order(cached, listed)
            .iter()
            .map(|l| (l.name_any(), rv_of(l)))
            .collect();
        assert_eq!(
            order,
            vec![
                ("listed-only".to_string(), 4),
                ("both-older-cache".to_string(), 7),
                ("both-newer-cache".to_string(), 9),
                ("cache-only".to_string(), 3),
            ]
        );
    }

    /// The placement mark on a membership Lease counts only for the renewal that wrote it: a
    /// Lease renewed later by a binary that does not know the mark (a rollback) does not keep
    /// the group on bounded loads, and a replica placing by the ring removes it.
    #[tokio::test]
    async fn a_placement_mark_counts_only_for_the_renewal_that_wrote_it() {
        use crate::config::Placement::Bounded;
        let sim = Sim::start(SimConfig::default());
        let a = member_placing(
            sim.client_as("stslock/a"),
            "a",
            Duration::from_secs(3),
            Bounded,
        );
        let b = member_placing(
            sim.client_as("stslock/b"),
            "b",
            Duration::from_secs(3),
            Bounded,
        );
        let leases: Api<Lease> = Api::namespaced(sim.client(), "default");
        let marked = |s: &Sharding, id: &str| {
            s.view
                .read()
                .unwrap()
                .members
                .get(id)
                .is_some_and(|m| m.bounded)
        };
        // The Lease a creates carries the mark from its first version.
        a.renew().await.unwrap();
        let mut l = leases.get(&a.lease_name()).await.unwrap();
        b.observe_member(&l);
        assert!(marked(&b, "a"));
        // Renewed by a binary that knows nothing of the mark: it stays, for an old renewTime.
        l.spec.as_mut().unwrap().renew_time = Some(MicroTime(
            jiff::Timestamp::now() + jiff::SignedDuration::from_secs(1),
        ));
        b.observe_member(&l);
        assert!(!marked(&b, "a"), "a mark of an earlier renewal counted");
        // a's next renewal marks its own renewTime again.
        a.renew().await.unwrap();
        b.observe_member(&leases.get(&a.lease_name()).await.unwrap());
        assert!(marked(&b, "a"));
        // A replica placing by the ring clears the mark.
        let ring = member(sim.client_as("stslock/a"), "a", Duration::from_secs(3));
        ring.renew().await.unwrap();
        let l = leases.get(&a.lease_name()).await.unwrap();
        assert!(!l.annotations().contains_key(PLACEMENT_ANNOTATION), "{l:?}");
        b.observe_member(&l);
        assert!(!marked(&b, "a"));
    }

    /// A membership renewal sent while the Lease was surely live but answered after it may
    /// have expired reopens the fence in a new, contested generation: peers may have claimed
    /// locks meanwhile just as after a renewal sent late. Before, only the state when the
    /// renewal was sent counted, and the fence reopened in the same generation, every lock
    /// still trusted from reads made before.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_renewal_answered_after_the_lease_may_have_expired_opens_a_new_generation() {
        let sim = Sim::start(SimConfig::default());
        let s = alone(sim.client_as("stslock/a"), Duration::from_secs(2));
        s.renew().await.unwrap();
        assert_eq!(s.generation(), 1);
        assert!(s.must_confirm(), "a process's first reopening is contested");
        tokio::time::sleep(Duration::from_millis(800)).await;
        s.renew().await.unwrap();
        assert_eq!(s.generation(), 1, "a renewal in time keeps the generation");
        // The next renewal is sent in time (0.8 s after the last) and committed 1.5 s later:
        // answered 2.3 s after the last renewal was sent, past the 2 s Lease.
        sim.faults().update(|c| {
            c.latency_ms = 1500;
            c.writes_only = true;
            c.agents = vec!["stslock/a".into()];
        });
        tokio::time::sleep(Duration::from_millis(800)).await;
        s.renew().await.unwrap();
        sim.faults().set(Default::default());
        assert_eq!(
            s.generation(),
            2,
            "the fence reopened after the Lease may have expired, in the same generation"
        );
        assert!(s.must_confirm());
    }

    /// A confirmation of ownership whose answer is late (committed at once, answered after the
    /// 2 s api timeout) is read back after 500 ms: ownership is confirmed then, not when the
    /// write times out (the Lease renewal of a restarted replica waits for this confirmation,
    /// and in the chaos soak it was sent too late to land before the Lease expired).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_confirmation_answered_late_is_read_back_before_its_timeout() {
        let sim = Sim::start(SimConfig::default());
        let client = sim.client_as("stslock/a");
        crate::dev::install_crd(&client).await.unwrap();
        let (_, lock) = lock_of_a(&client).await;
        let s = alone(client, Duration::from_secs(15));
        s.renew().await.unwrap();
        sim.faults().update(|c| {
            c.hold_responses = vec![HoldResponse::new(3000).resource("statefulsetlocks")];
        });
        let started = Instant::now();
        let confirmed = s
            .confirm_owner(
                &lock,
                s.generation(),
                true,
                &crate::limits::Limits::unlimited(),
                crate::limits::Lane::Renewal,
            )
            .await
            .unwrap()
            .expect("confirmed");
        let took = started.elapsed();
        println!("confirmed after {took:?}");
        assert_eq!(
            confirmed.annotations().get(SHARD_TERM_ANNOTATION),
            Some(&s.term(s.generation()))
        );
        assert!(
            took < Duration::from_millis(1500),
            "confirmed only after {took:?}: the late answer's timeout was waited for"
        );
    }

    /// Replica a alone with lock `l0`, and its handoff of the lock to b sent, to be served
    /// 4.5 s later (after its 2 s timeout): the handoff's outcome is unknown. Faults cleared.
    async fn handoff_served_late() -> (Sim, Api<StatefulSetLock>, Arc<Sharding>, String) {
        let sim = Sim::start(SimConfig::default());
        let client = sim.client_as("stslock/a");
        crate::dev::install_crd(&client).await.unwrap();
        let (locks, lock) = lock_of_a(&client).await;
        let s = alone(client, Duration::from_secs(15));
        s.renew().await.unwrap();
        sim.faults().update(|c| {
            c.late_commits = vec![kubesim::LateCommit::new(4500).resource("statefulsetlocks")];
        });
        s.set_owner(&lock, "b", "handoff").await;
        sim.faults().set(kubesim::FaultConfig::default());
        (sim, locks, s, lock_key(&lock))
    }

    /// A handoff served after its client gave up (an API server keeps a request its client
    /// timed out on) is settled by a compare-and-swap on the handoff's own base version, not by
    /// a read: once that lands the handoff cannot, and the lock stays this replica's. Before,
    /// a read api-timeout after the failure showed the label unmoved and the lock was taken
    /// back; the handoff landed two seconds later and moved the label under a replica that
    /// believed it the owner.
    #[tokio::test]
    async fn a_handoff_served_after_its_timeout_is_fenced_by_its_settlement() {
        let (_sim, locks, s, key) = handoff_served_late().await;
        assert!(s.is_draining(&key), "the handoff's outcome is unknown");
        s.resolve_unknown_handoffs().await;
        assert!(
            !s.is_draining(&key),
            "settled at once, not api-timeout later"
        );
        let now = locks.get("l0").await.unwrap();
        assert_eq!(now.labels().get(SHARD_LABEL), Some(&"a".to_string()));
        assert_eq!(
            now.annotations().get(SHARD_TERM_ANNOTATION),
            Some(&s.term(s.generation())),
            "settled by this replica's own compare-and-swap"
        );
        // Deliberate wait: the late handoff is served 4.5 s after it was sent.
        tokio::time::sleep(Duration::from_millis(3000)).await;
        let after = locks.get("l0").await.unwrap();
        assert_eq!(
            after.labels().get(SHARD_LABEL),
            Some(&"a".to_string()),
            "the late handoff moved the label after the lock was settled as this replica's"
        );
        assert_eq!(
            after.resource_version(),
            now.resource_version(),
            "the late handoff committed"
        );
        assert!(s.may_begin(&after));
    }

    /// The settlement's own write can lose its answer too (committed, answered 504): the lock
    /// stays unresolved, and the next try's compare-and-swap conflicts with it; the read that
    /// follows shows the lock labelled for this replica, so it is settled as its own — and the
    /// late handoff still cannot land.
    #[tokio::test]
    async fn a_settlement_whose_answer_was_lost_is_settled_by_the_next_try() {
        let (sim, locks, s, key) = handoff_served_late().await;
        sim.faults().update(|c| {
            c.lose_responses = vec![kubesim::LoseResponse::timeout().resource("statefulsetlocks")];
        });
        s.resolve_unknown_handoffs().await;
        assert!(s.is_draining(&key), "the settlement's answer was lost");
        let fenced = locks.get("l0").await.unwrap();
        assert_eq!(
            fenced.annotations().get(SHARD_TERM_ANNOTATION),
            Some(&s.term(s.generation())),
            "the settlement committed"
        );
        sim.faults().set(kubesim::FaultConfig::default());
        // Not tried again at once (an error storm would get a write per pass).
        s.resolve_unknown_handoffs().await;
        assert!(s.is_draining(&key));
        tokio::time::sleep(SETTLE_AGAIN_AFTER).await;
        s.resolve_unknown_handoffs().await;
        assert!(!s.is_draining(&key), "settled by the second try");
        // Deliberate wait: the late handoff is served 4.5 s after it was sent.
        tokio::time::sleep(Duration::from_millis(3500)).await;
        let after = locks.get("l0").await.unwrap();
        assert_eq!(after.labels().get(SHARD_LABEL), Some(&"a".to_string()));
        assert_eq!(after.resource_version(), fenced.resource_version());
        assert!(s.may_begin(&after));
    }

    /// A second handoff of a lock while one is under way (an assignment pass and a graceful
    /// leave) returns at once and leaves the first in charge: the lock stays drained until the
    /// first one's label write has its answer. Before, the second shared the draining mark,
    /// failed its own label write at once (a conflict) and cleared the mark while the first's
    /// write was still in flight, so a write of this replica for the lock could go out and land
    /// after the handoff.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_second_handoff_of_a_lock_leaves_it_drained_until_the_first_ends() {
        let sim = Sim::start(SimConfig::default());
        let client = sim.client_as("stslock/a");
        crate::dev::install_crd(&client).await.unwrap();
        let (locks, lock) = lock_of_a(&client).await;
        let s = alone(client, Duration::from_secs(15));
        // Peers b and c on the ring: a handoff's target is re-taken from it before its write.
        for peer in ["b", "c"] {
            member(
                sim.client_as(&format!("stslock/{peer}")),
                peer,
                Duration::from_secs(15),
            )
            .renew()
            .await
            .unwrap();
        }
        s.renew().await.unwrap();
        assert!(s.refresh_members().await);
        s.recompute();
        assert!(
            s.may_write(),
            "the fence is open after the membership renewal"
        );
        let key = lock_key(&lock);

        // The first handoff's label write is committed at once and answered 800 ms later.
        sim.faults().update(|c| {
            c.hold_responses = vec![HoldResponse::new(800).resource("statefulsetlocks")];
        });
        let first = tokio::spawn({
            let (s, lock) = (s.clone(), lock.clone());
            async move { s.hand_off(&lock, "b").await }
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        sim.faults().set(Default::default());
        assert!(s.is_draining(&key), "the first handoff drains the lock");
        let second = Instant::now();
        s.hand_off(&lock, "c").await;
        println!("second handoff returned after {:?}", second.elapsed());
        assert!(
            s.is_draining(&key),
            "the lock was undrained while the first handoff's label write was in flight"
        );
        first.await.unwrap();
        assert!(!s.is_draining(&key));
        let now = locks.get("l0").await.unwrap();
        assert_eq!(now.labels().get(SHARD_LABEL).map(String::as_str), Some("b"));
        // Its own handoff is on record: views from before it are refused.
        assert!(s.permit(&lock, s.generation()).is_err());
    }
}
