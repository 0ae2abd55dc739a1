//! The renewal lane: one timer-wheel entry (`tokio_util::time::DelayQueue`, a hierarchical
//! timing wheel) per owned lock whose writer holds its Lease, due at half the Lease duration
//! after the last renewal, a few percent early by jitter so renewals of locks created together
//! spread out.
//!
//! A renewal is a single compare-and-swap update of the Lease's `renewTime` for the same
//! holder, budgeted before any reconcile write ([`crate::limits`]) and run outside the
//! reconcile workers, so a reconcile storm cannot make a Lease lapse. It renews only what the
//! reconcile lane would renew unchanged: the lock is this replica's (its ownership read afresh
//! in this fence generation, see `cache::fresh`), not deleting, the Lease is the lock's and of
//! the lock's duration, and its holder is the pod that carries the writer label (same UID),
//! Ready or not: the Lease moves only when the label does, so a writer waiting out
//! `failoverDelaySeconds`, one with no Ready pod to hand over to, one whose failover is held up
//! by API errors, and the writer of a `paused` lock all keep their Lease. Anything else — a
//! conflict, another holder, an error — sends the lock to the reconcile lane, which decides. A conflict also fetches the Lease afresh: a
//! lagging Lease watch must not make every renewal fail until the Lease lapses.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use serde_json::json;
use tokio::sync::{Semaphore, mpsc};
use tokio::time::Instant;
use tokio_util::time::{DelayQueue, delay_queue};

use crate::api::{
    LEASE_OWNER_ANNOTATION, RENEWED_ANNOTATION, StatefulSetLock, WRITER_UID_ANNOTATION,
};
use crate::call::{ApiCall, Kind, call};
use crate::limits::Lane;

/// Renewals running at once (each is one API call). Sized for demand, not as a budget (the
/// write budget, renewals first, is `crate::limits`): a renewal whose answer is lost holds its
/// slot for the whole API timeout, and with 32 slots a replica of ~170 locks of 10 s fell
/// seconds behind whenever its Lease answers were lost, so the back of a bunch of locks due
/// together lapsed.
const PARALLEL: usize = 512;
/// A renewal handed to the reconcile lane is looked at again after this long.
const RECHECK: Duration = Duration::from_secs(1);
/// A renewal whose write or re-read failed is tried again after this long: the holder is
/// healthy, only the API answered badly, and the Lease's time is running.
const RETRY: Duration = Duration::from_millis(300);
/// A renewal sent with less than this (or twice the API timeout, if more) left on the Lease is
/// hedged: sent again when the first attempt has no answer after [`HEDGE_AFTER`].
const HEDGE_WITHIN: Duration = Duration::from_secs(4);
const HEDGE_AFTER: Duration = Duration::from_millis(500);
/// A hedging attempt is sent only with at least this left of the write window.
const MIN_ATTEMPT: Duration = Duration::from_millis(300);
/// Renewals are scheduled up to this fraction of the half-duration early.
const JITTER: f64 = 0.05;

pub type LockRef = ObjectRef<StatefulSetLock>;

enum Cmd {
    Schedule(LockRef, Instant),
    /// Schedule only if the lock has no entry (never moves an existing one).
    Ensure(LockRef, Instant),
    Cancel(LockRef),
}

/// What the renewal lane works with (a part of the replica; the reconcile lane has its own).
pub struct Context {
    pub cache: Arc<crate::cache::Caches>,
    /// This replica's shard id.
    pub identity: String,
    pub sharding: Arc<crate::sharding::Sharding>,
    pub limits: Arc<crate::limits::Limits>,
    pub scope: Arc<crate::scope::Scope>,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Its own handle: outcomes reschedule entries through it.
    pub renewals: Renewals,
    pub api_timeout: Duration,
    /// Has the Lease watch delivered its initial list (see [`crate::probe::CacheSync`])?
    pub leases_synced: Arc<std::sync::atomic::AtomicBool>,
}

/// Handle to the renewal lane, held by the reconcile lane's context.
#[derive(Clone)]
pub struct Renewals {
    tx: mpsc::UnboundedSender<Cmd>,
    /// Locks handed to the reconcile lane and not rescheduled by it since: handed once, not
    /// again on every re-check (a trigger would override the reconcile lane's own pacing).
    handed: Arc<dashmap::DashSet<LockRef>>,
}

/// The lane's inbox; [`run`] consumes it.
pub struct Inbox(mpsc::UnboundedReceiver<Cmd>);

pub fn channel() -> (Renewals, Inbox) {
    let (tx, rx) = mpsc::unbounded_channel();
    (
        Renewals {
            tx,
            handed: Arc::default(),
        },
        Inbox(rx),
    )
}

/// `due_in` minus up to [`JITTER`] of it: never later than due.
fn jittered(due_in: Duration) -> Duration {
    let early = due_in.mul_f64(JITTER * rand::random::<f64>());
    due_in.saturating_sub(early)
}

impl Renewals {
    /// (Re)schedule the renewal of `lock` to `due_in` from now (jittered a little earlier);
    /// called by the reconcile lane when it has settled the lock.
    pub fn schedule(&self, lock: LockRef, due_in: Duration) {
        self.handed.remove(&lock);
        self.reschedule(lock, due_in);
    }

    fn reschedule(&self, lock: LockRef, due_in: Duration) {
        let _ = self
            .tx
            .send(Cmd::Schedule(lock, Instant::now() + jittered(due_in)));
    }

    /// Make sure `lock` has a renewal entry: due in `due_in` if it has none, an existing entry
    /// is left where it is. For a lock of this replica whose reconcile failed before it could
    /// schedule its renewal (a restart, a re-read that failed), or whose plan is about to write
    /// the Lease itself: the renewal lane re-reads and renews on its own schedule instead of
    /// waiting out the reconcile lane's backoff (rule 16).
    pub fn ensure(&self, lock: LockRef, due_in: Duration) {
        let _ = self.tx.send(Cmd::Ensure(lock, Instant::now() + due_in));
    }

    pub fn cancel(&self, lock: LockRef) {
        self.handed.remove(&lock);
        let _ = self.tx.send(Cmd::Cancel(lock));
    }
}

/// Run the lane until the inbox closes (the operator stops). Locks that need a decision are
/// sent to `reconcile`.
pub async fn run(ctx: Arc<Context>, inbox: Inbox, reconcile: mpsc::UnboundedSender<LockRef>) {
    timer_wheel(inbox, PARALLEL, move |lock| {
        let (ctx, reconcile) = (ctx.clone(), reconcile.clone());
        async move { renew_one(&ctx, lock, &reconcile).await }
    })
    .await
}

/// The lane's schedule: one timer-wheel entry per lock, moved by `Schedule`, created (never
/// moved) by `Ensure`, dropped by `Cancel`; a due entry leaves the wheel and `due(lock)` runs on
/// its own task, at most `parallel` at once.
async fn timer_wheel<F, Fut>(inbox: Inbox, parallel: usize, due: F)
where
    F: Fn(LockRef) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let Inbox(mut rx) = inbox;
    let mut wheel: DelayQueue<LockRef> = DelayQueue::new();
    let mut entries: HashMap<LockRef, delay_queue::Key> = HashMap::new();
    let permits = Arc::new(Semaphore::new(parallel));
    // The renewals running: aborted with the lane (a replica whose future is dropped — killed —
    // must not go on renewing from a state nothing updates any more).
    let mut running = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            Some(_) = running.join_next(), if !running.is_empty() => {}
            cmd = rx.recv() => match cmd {
                None => return,
                Some(Cmd::Schedule(lock, at)) => match entries.get(&lock) {
                    Some(key) => wheel.reset_at(key, at),
                    None => {
                        let key = wheel.insert_at(lock.clone(), at);
                        entries.insert(lock, key);
                    }
                },
                Some(Cmd::Ensure(lock, at)) => {
                    if let std::collections::hash_map::Entry::Vacant(e) = entries.entry(lock) {
                        let key = wheel.insert_at(e.key().clone(), at);
                        e.insert(key);
                    }
                }
                Some(Cmd::Cancel(lock)) => {
                    if let Some(key) = entries.remove(&lock) {
                        wheel.remove(&key);
                    }
                }
            },
            Some(expired) = wheel.next(), if !wheel.is_empty() => {
                let lock = expired.into_inner();
                entries.remove(&lock);
                let Ok(permit) = permits.clone().acquire_owned().await else { return };
                let work = due(lock);
                running.spawn(async move {
                    work.await;
                    drop(permit);
                });
            }
        }
    }
}

/// What one renewal ended as.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// Renewed; next renewal due after this long. With a reason, the holder is not healthy
    /// (it keeps its Lease while it keeps the label): the reconcile lane is told too.
    Renewed(Duration, Option<&'static str>),
    /// Not this replica's (any more): nothing to do here.
    NotMine,
    /// Still this replica's, but no write may go out right now (the fence is closed or
    /// reopened, a handoff is being tried): look again soon, keep the entry. Dropping it would
    /// leave the Lease to the reconcile lane's backoff.
    Wait(&'static str),
    /// Someone renewed it already; next renewal due after this long.
    NotDue(Duration),
    /// Needs a decision: send to the reconcile lane.
    Reconcile(&'static str),
    /// The API failed the renewal (or the re-read before it): hand it to the reconcile lane
    /// too, but try again here soon.
    Retry(&'static str),
}

async fn renew_one(ctx: &Context, lock: LockRef, reconcile: &mpsc::UnboundedSender<LockRef>) {
    let outcome = match ctx.cache.locks.get(&lock) {
        None => Outcome::NotMine,
        Some(l) => try_renew(ctx, &l, Due::Half).await,
    };
    match outcome {
        Outcome::Renewed(next, unhealthy) => {
            if let Some(why) = unhealthy {
                hand_to_reconcile(ctx, &lock, reconcile, why);
            }
            ctx.renewals.schedule(lock, next);
        }
        Outcome::NotDue(next) => ctx.renewals.reschedule(lock, next),
        Outcome::NotMine => {}
        Outcome::Wait(why) => {
            tracing::debug!(lock = %lock, shard = %ctx.identity, why, "renewal waits");
            ctx.renewals.reschedule(lock, RETRY);
        }
        Outcome::Reconcile(why) | Outcome::Retry(why) => {
            let again = if matches!(outcome, Outcome::Retry(_)) {
                RETRY
            } else {
                RECHECK
            };
            hand_to_reconcile(ctx, &lock, reconcile, why);
            // The reconcile lane reschedules the renewal when it settles the lock. Never wait
            // for it: a busy reconcile lane must not hold up other locks' renewals. Look again
            // soon in case it is slow and the holder recovers meanwhile (a Ready writer's Lease
            // must not lapse waiting for a reconcile).
            ctx.renewals.reschedule(lock, again);
        }
    }
}

/// Send `lock` to the reconcile lane, once until that lane reschedules its renewal.
fn hand_to_reconcile(
    ctx: &Context,
    lock: &LockRef,
    reconcile: &mpsc::UnboundedSender<LockRef>,
    why: &'static str,
) {
    tracing::debug!(lock = %lock, shard = %ctx.identity, why, "renewal handed to the reconcile lane");
    if ctx.renewals.handed.insert(lock.clone()) {
        let _ = reconcile.send(lock.clone());
    }
}

/// Renew `lock`'s Lease before this replica hands the lock off (the hook of
/// [`crate::sharding::Sharding::before_handoff`]) if a quarter of its duration has passed since
/// its last renewal, with the checks of any renewal: the next owner then starts with at least
/// three quarters of a Lease to learn of the lock, re-read it and renew it. Returns whether the
/// handoff may go on: not when the renewal was due and could not be made (an API failure, or
/// no write allowed right now) — the lock stays here, its renewals go on in this lane, and a
/// later pass hands it off. Anything else this lane would leave to the reconcile lane is left
/// to the next owner.
pub async fn before_handoff(ctx: &Context, lock: &StatefulSetLock) -> bool {
    let lock_ref = ObjectRef::from_obj(lock);
    match try_renew(ctx, lock, Due::Handoff).await {
        // Kept due on this replica's schedule in case the handoff does not happen (a
        // conflict): the label moving cancels it.
        Outcome::Renewed(next, _) => {
            ctx.renewals.schedule(lock_ref, next);
            true
        }
        Outcome::NotDue(_) | Outcome::NotMine => true,
        Outcome::Reconcile(why) => {
            tracing::debug!(lock = %lock_ref, why, "no renewal before the handoff");
            true
        }
        Outcome::Wait(why) | Outcome::Retry(why) => {
            tracing::debug!(lock = %lock_ref, why, "no renewal before the handoff: put off");
            ctx.renewals.reschedule(lock_ref, RETRY);
            false
        }
    }
}

/// When a renewal is due.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Due {
    /// The lane's schedule: half the Lease duration after the last renewal.
    Half,
    /// Before a handoff: a quarter of it.
    Handoff,
}

/// What [`Sharding::confirm_owner`](crate::sharding::Sharding::confirm_owner) answered, as the
/// renewal lane acts on it.
enum Confirmation {
    Confirmed(Box<StatefulSetLock>),
    /// The version confirmed from is behind (409) or the lock is gone from it (404).
    Behind,
    /// Not this replica's, fenced, or no answer: what to report.
    Stop(Outcome),
}

async fn confirm_owner(
    ctx: &Context,
    lock: &StatefulSetLock,
    generation: u64,
    must: bool,
    key: &str,
) -> Confirmation {
    match ctx
        .sharding
        .confirm_owner(lock, generation, must, &ctx.limits, Lane::Renewal)
        .await
    {
        Ok(Some(confirmed)) => Confirmation::Confirmed(Box::new(confirmed)),
        // Refused because a handoff of it drains (one that began after this try's first
        // check): as for the renewal's own permit below, the handoff may not happen (put off,
        // dropped, lost to a conflict) and nothing else would schedule the entry again. (Any
        // other refusal — the lock read labelled for another replica — leaves the lane.)
        Ok(None)
            if ctx.sharding.is_draining(key)
                && lock.labels().get(crate::api::SHARD_LABEL) == Some(&ctx.identity) =>
        {
            Confirmation::Stop(Outcome::Wait("being handed off"))
        }
        Ok(None) => Confirmation::Stop(Outcome::NotMine),
        Err(crate::error::Error::Fenced) => Confirmation::Stop(Outcome::Wait("fenced")),
        Err(e) if e.is_conflict() || e.is_not_found() => Confirmation::Behind,
        Err(e) => {
            tracing::debug!(lock = %key, shard = %ctx.identity, error = %e, "ownership not confirmed");
            Confirmation::Stop(Outcome::Retry(
                "ownership of the lock could not be confirmed",
            ))
        }
    }
}

async fn try_renew(ctx: &Context, lock: &StatefulSetLock, due: Due) -> Outcome {
    let lock = ctx.cache.fresh.newest_lock(Arc::new(lock.clone()));
    let lock = lock.as_ref();
    let generation = ctx.sharding.generation();
    if !ctx.sharding.may_begin(lock) {
        if lock.labels().get(crate::api::SHARD_LABEL) == Some(&ctx.identity) {
            return Outcome::Wait("fenced or being handed off");
        }
        // A read of its Lease and pods made beside a confirmation that ended unanswered may
        // have put a lock lost meanwhile back into the caches' interest.
        ctx.cache.give_up(&crate::api::lock_key(lock));
        return Outcome::NotMine;
    }
    let ns = lock.namespace().unwrap_or_default();
    if !ctx.scope.allows(&ns) {
        return Outcome::NotMine;
    }
    // Not due as the Lease cache shows it: nothing is read or written yet, not even the
    // confirmation of ownership a restart asks for. After a restart every owned lock's entry
    // fires at once; confirming them all first spent the write budget on Leases renewed just
    // before the restart while others ran out (the P5 run of seed 20261216: a replica back with
    // 493 locks sent its first renewal of one 2.4 s before it expired). Each is confirmed and
    // renewed when due instead, the most urgent first. Before the Lease watch's first list
    // every Lease is taken as due (waiting for that list, up to a second, cost a restart under
    // slow reads the second its renewals needed).
    if let Some(next) = not_due_as_cached(ctx, lock, due) {
        return Outcome::NotDue(next);
    }
    let key = crate::api::lock_key(lock);
    // A renewal needs the lock's ownership verified in this fence generation (its other writes'
    // unknown outcomes do not matter to a compare-and-swap of renewTime). If it is not, the
    // lock alone is re-read here (one read, not the three a decision needs: after a restart
    // under API errors every extra read delays every renewal), not left to the reconcile lane:
    // that lane backs off on a lock whose writes keep failing, and a Ready writer's Lease must
    // not lapse waiting for it (rule 16). This does not make the lock trusted for a decision.
    let reread;
    // Asked before any read (see `Sharding::must_confirm`).
    let must = !ctx.cache.fresh.owner_verified(&key, generation) && ctx.sharding.must_confirm();
    // Just after the fence reopened (a restart) ownership is confirmed by a write in any case:
    // a compare-and-swap on the cached version confirms it without reading the lock first, one
    // round trip less before each Lease's renewal. Only a cache that is behind (409) costs the
    // read.
    // (None after a 409 or a 404: the cached version is known to be behind, and only the read
    // below may be used from here on, even if another lane verified ownership meanwhile.)
    //
    // The Lease and pods a renewal may need read directly (see `must_read_around`) are read
    // beside the confirming write: the renewal is sent only after it, and under slow answers
    // each round trip in a row before it is one a Lease renewed late cannot spare — after a
    // restart, or a lock gained by a handoff whose Lease is due, these were four in a row.
    let mut around: Around = None;
    // Whether this try read (or confirmed by a write) the lock itself.
    let mut lock_read = true;
    let confirmed_from_cache = if must {
        // The read first: it puts the lock into the caches' interest as it starts, before the
        // write that shows the lock still exists is sent (see `Caches::reread`).
        let (read, confirmation) = tokio::join!(
            read_around_if_needed(ctx, lock, &None),
            confirm_owner(ctx, lock, generation, true, &key),
        );
        around = read;
        match confirmation {
            Confirmation::Confirmed(confirmed) => Some(*confirmed),
            Confirmation::Behind => None,
            Confirmation::Stop(outcome) => return stopped(ctx, lock, around, outcome),
        }
    } else {
        None
    };
    let lock = if let Some(confirmed) = confirmed_from_cache {
        ctx.cache.fresh.remember_lock(confirmed.clone());
        reread = ctx.cache.fresh.newest_after_read(confirmed);
        ctx.cache.fresh.owner_seen(&key, generation);
        reread.as_ref()
    } else if !must && ctx.cache.fresh.owner_verified(&key, generation) {
        lock_read = false;
        lock
    } else {
        // A lock whose Lease and pods will be read enters the caches' interest before the
        // read that shows it still exists (see `Caches::reread`).
        let gained = read_around_needed(ctx, lock, &around) && ctx.cache.interest.gain(lock);
        match ctx.cache.reread_lock(lock).await {
            Ok(Some(l)) => {
                let read = ctx.cache.fresh.newest_after_read(l);
                if gained && read.labels().get(crate::api::SHARD_LABEL) != Some(&ctx.identity) {
                    ctx.cache.give_up(&key);
                }
                // Just after the fence reopened a read is not enough: a peer's claim decided
                // while this replica was away may still land (see `Sharding::confirm_owner`).
                let (read_now, confirmation) = tokio::join!(
                    read_around_if_needed(ctx, &read, &around),
                    confirm_owner(ctx, &read, generation, must, &key),
                );
                if read_now.is_some() {
                    around = read_now;
                }
                match confirmation {
                    Confirmation::Confirmed(confirmed) => {
                        ctx.cache.fresh.remember_lock((*confirmed).clone());
                        reread = ctx.cache.fresh.newest_after_read(*confirmed);
                    }
                    // Behind a version just read: someone wrote the lock since; the next
                    // attempt starts over.
                    Confirmation::Behind => {
                        tracing::debug!(lock = %key, shard = %ctx.identity, "ownership not confirmed: the lock changed since it was read");
                        return Outcome::Retry("ownership of the lock could not be confirmed");
                    }
                    Confirmation::Stop(outcome) => return stopped(ctx, &read, around, outcome),
                }
                ctx.cache.fresh.owner_seen(&key, generation);
                reread.as_ref()
            }
            Ok(None) => {
                ctx.cache.give_up(&key);
                return Outcome::NotMine;
            }
            Err(e) => {
                if gained {
                    ctx.cache.give_up(&key);
                }
                tracing::debug!(lock = %key, shard = %ctx.identity, error = %e, "re-read before renewal");
                return Outcome::Retry("view of the lock could not be re-read");
            }
        }
    };
    if lock.meta().deletion_timestamp.is_some() {
        return Outcome::Reconcile("lock deleting");
    }
    // Read here unless read above for this lock's Lease and set (a lock just confirmed or read
    // is as fresh as a read of it: it is not read again).
    // (A read that fails is logged where it is made.)
    if lock_read {
        if let Some((_, _, Err(_))) = read_around_if_needed(ctx, lock, &around).await {
            return Outcome::Retry("Lease and pods could not be read");
        }
    } else if read_around_needed(ctx, lock, &around) {
        // The lock itself was not read in this try (its ownership was verified earlier in this
        // generation): one deleted while the lock watch was down is still here as cached, and
        // a read of only its Lease and pods would put them back into the caches for good —
        // nothing gives up a lock the lock list no longer has. It is read with them.
        match ctx.cache.reread(lock).await {
            Ok(Some(read)) if read.labels().get(crate::api::SHARD_LABEL) == Some(&ctx.identity) => {
                if read.meta().deletion_timestamp.is_some() {
                    return Outcome::Reconcile("lock deleting");
                }
            }
            Ok(_) => return Outcome::NotMine,
            Err(e) => {
                tracing::debug!(lock = %key, shard = %ctx.identity, error = %e, "direct read before renewal");
                return Outcome::Retry("Lease and pods could not be read");
            }
        }
    }
    let lease_name = lock.spec.lease_name.clone();
    let Some(lease) = ctx.cache.cached_lease(&ns, &lease_name) else {
        return Outcome::Reconcile("Lease not in cache");
    };
    if lease.annotations().get(LEASE_OWNER_ANNOTATION) != Some(&key) {
        return Outcome::Reconcile("Lease not owned by this lock");
    }
    let view = crate::cache::lease_view(&lease);
    if view.renewed_elsewhere() {
        // Someone else renews it (another operator still running): decide() reports that and
        // waits; renewing here would fight it.
        return Outcome::Reconcile("Lease renewed by another writer");
    }
    let Some(spec) = lease.spec.as_ref() else {
        return Outcome::Reconcile("Lease has no spec");
    };
    let Some(holder) = spec.holder_identity.as_deref() else {
        return Outcome::Reconcile("Lease has no holder");
    };
    if spec.lease_duration_seconds != Some(lock.spec.lease_duration_seconds) {
        return Outcome::Reconcile("leaseDurationSeconds changed");
    }
    let (duration, since_renew) = renewal_age(spec);
    let half = duration / 2;
    // Lapsed (renewals failed, or the replica was away): the same healthy holder re-acquires
    // it here, with no transition (rule 5), as the reconcile lane would.
    let expired = since_renew >= duration;
    // Renewed since this entry was scheduled (by the reconcile lane): not due yet.
    if let Some(next) = not_due(due, duration, since_renew) {
        return Outcome::NotDue(next);
    }
    let holder_uid = lease.annotations().get(WRITER_UID_ANNOTATION);
    // Ready or not: a writer that is failing over keeps its Lease until the Lease moves (the
    // label and the Lease move together); the reconcile lane, woken by the pod's watch,
    // decides the failover.
    let pods = ctx.cache.pods.pods_of(&ns, &lock.spec.stateful_set_name);
    let sitting = pods.iter().find(|p| {
        p.name == holder && Some(&p.uid) == holder_uid && p.role.as_deref() == Some("writer")
    });
    let Some(sitting) = sitting else {
        return Outcome::Reconcile("holder not the writer-labelled pod");
    };
    // A lapsed Lease is re-acquired here only for a healthy holder (rule 5); for any other the
    // reconcile lane decides between re-acquiring and failing over.
    let unhealthy = !lock.spec.paused && (!sitting.ready || sitting.terminating);
    if expired && unhealthy {
        return Outcome::Reconcile("Lease lapsed and its holder is not Ready");
    }
    ctx.limits.acquire(Lane::Renewal).await;
    let permit = match ctx.sharding.permit(lock, generation) {
        Ok(p) => p,
        Err(crate::sharding::Refused::Fenced) => return Outcome::Wait("fenced"),
        // Refused while a handoff of it is being decided (it drains): the handoff may not
        // happen (put off, lost to a conflict), and nothing else would schedule the entry
        // again. Only a lock this replica no longer owns leaves the lane (`lock` is the
        // newest view here, this replica's own writes included).
        Err(crate::sharding::Refused::NotOwner)
            if lock.labels().get(crate::api::SHARD_LABEL) == Some(&ctx.identity) =>
        {
            return Outcome::Wait("being handed off");
        }
        Err(crate::sharding::Refused::NotOwner) => return Outcome::NotMine,
    };
    let now = MicroTime(jiff::Timestamp::now());
    // The renewTime is echoed in an annotation: a renewal by anyone else shows as a mismatch.
    let metadata = json!({
        "resourceVersion": lease.resource_version(),
        "annotations": {RENEWED_ANNOTATION: now},
    });
    let patch = if expired {
        json!({"metadata": metadata, "spec": {"renewTime": now, "acquireTime": now}})
    } else {
        json!({"metadata": metadata, "spec": {"renewTime": now}})
    };
    let api: Api<Lease> = Api::namespaced(ctx.cache.client.clone(), &ns);
    let sent = std::time::Instant::now();
    // Every attempt's timeout ends within the write window the permit gave (the fence).
    let window_end = tokio::time::Instant::now() + permit.window;
    let (pp, merge) = (PatchParams::default(), Patch::Merge(&patch));
    let attempt = |timeout| {
        call(
            &ctx.metrics,
            ApiCall::patch(Kind::Lease, format!("{ns}/{lease_name}"))
                .note(format!("renewal for {holder}")),
            timeout,
            api.patch(&lease_name, &pp, &merge),
        )
    };
    // Close to the Lease's expiry one unanswered attempt can use up the time left (an answer
    // lost, or the write held past the timeout): the same compare-and-swap is sent again if the
    // first has no answer after HEDGE_AFTER. At most one of them commits (they carry the same
    // resourceVersion); the other conflicts, and a conflict re-reads the Lease.
    let remaining = duration.saturating_sub(since_renew);
    let hedge = remaining < HEDGE_WITHIN.max(2 * ctx.api_timeout);
    let (result, unknown) = hedged(
        attempt,
        ctx.api_timeout,
        window_end,
        hedge.then_some(HEDGE_AFTER),
    )
    .await;
    match result {
        Ok(renewed) => {
            crate::cache::watch::remember_lease(&ctx.cache.leases, renewed);
            ctx.metrics.lane_renewal(since_renew.saturating_sub(half));
            if let Some(go) = ctx.metrics.go() {
                go.renewal(
                    &crate::metrics::go_compat::LockId::of(lock),
                    sent.elapsed(),
                    duration.as_secs_f64(),
                );
            }
            // Due half a Lease after the renewTime written (taken before the request was
            // sent), not after the answer: a late answer must not eat the other half.
            Outcome::Renewed(
                half.saturating_sub(sent.elapsed()),
                unhealthy.then_some("holder not Ready"),
            )
        }
        Err(e) => {
            crate::telemetry::renewal_failed(
                &ns,
                &lock.name_any(),
                &ctx.identity,
                Some(holder),
                spec.lease_transitions.unwrap_or_default().into(),
                &e,
            );
            if unknown {
                permit.unknown_outcome();
            }
            drop(permit);
            if e.is_conflict() {
                // The cache is behind the Lease: read it now, so the next attempt (here or in
                // the reconcile lane) starts from the truth.
                ctx.cache.refresh_lease(&ns, &lease_name).await;
            } else {
                tracing::warn!(lock = %key, shard = %ctx.identity, error = %e, "Lease renewal failed");
            }
            Outcome::Retry("renewal write failed")
        }
    }
}

/// The outcome of a direct read of a lock's Lease and pods, with the Lease and StatefulSet
/// names it read for (None: not read).
type Around = Option<(String, String, Result<(), String>)>;

/// Until the Lease and pod watches have their initial lists (a restart), "not in the cache"
/// means "not listed yet": a lock's Lease and pods are read directly (and go into the caches)
/// rather than the lock handed to the reconcile lane and looked at again only after RECHECK —
/// with a Lease renewed just before the restart, half a Lease was not always enough for that.
/// Never a wait for the lists themselves: a watch that cannot list must not stop every
/// renewal. The same for a lock the caches do not keep yet (just gained: they keep the Leases
/// and pods of this replica's own locks only, from its first read on). And for a Lease the
/// cache shows lapsed not long ago: whether its holder is Ready decides between re-acquiring it
/// here and handing it to the reconcile lane, and a pod cache behind a stalled watch kept a
/// Ready holder looking NotReady for seconds (while the reconcile lane was stopped for a leave,
/// nothing else looked). Not for one lapsed longer: a StatefulSet with no Ready pod would be
/// read every second.
fn must_read_around(ctx: &Context, lock: &StatefulSetLock) -> bool {
    let synced =
        ctx.leases_synced.load(std::sync::atomic::Ordering::SeqCst) && ctx.cache.pods.is_synced();
    let ns = lock.namespace().unwrap_or_default();
    let recently_lapsed = ctx
        .cache
        .cached_lease(&ns, &lock.spec.lease_name)
        .is_some_and(|l| lapsed_within(&l, 2));
    !synced || !ctx.cache.holds(lock) || recently_lapsed
}

/// A Lease's duration (at least 1 s) and how long ago it was renewed, by this clock (its
/// duration when it never was, or when its renewTime is ahead of this clock).
fn renewal_age(spec: &k8s_openapi::api::coordination::v1::LeaseSpec) -> (Duration, Duration) {
    let (duration, since) = since_renewed(spec);
    (duration, since.unwrap_or(duration))
}

/// A Lease's duration (at least 1 s) and how long ago it was renewed, by this clock (None: it
/// never was, or its renewTime is ahead of this clock).
fn since_renewed(
    spec: &k8s_openapi::api::coordination::v1::LeaseSpec,
) -> (Duration, Option<Duration>) {
    let duration = Duration::from_secs(spec.lease_duration_seconds.unwrap_or(0).max(1) as u64);
    let since = spec
        .renew_time
        .as_ref()
        .and_then(|t| Duration::try_from(jiff::Timestamp::now().duration_since(t.0)).ok());
    (duration, since)
}

/// When a Lease renewed `since_renew` ago is due (`None`: now). The slack covers the jitter,
/// so an early-jittered entry renews instead of rescheduling itself.
fn not_due(due: Due, duration: Duration, since_renew: Duration) -> Option<Duration> {
    let half = duration / 2;
    let not_due = match due {
        Due::Half => since_renew + half.mul_f64(2.0 * JITTER) + Duration::from_millis(500) < half,
        Due::Handoff => since_renew < duration / 4,
    };
    not_due.then(|| half.saturating_sub(since_renew))
}

/// When `lock`'s Lease is due as the Lease cache shows it, if not now: the lock's own Lease,
/// of the lock's duration, renewed by nobody else. A cache behind the truth shows an older
/// renewal, never a newer one: it can make a Lease look due early, not late. None when the
/// cache does not tell (no such Lease cached, or another's).
fn not_due_as_cached(ctx: &Context, lock: &StatefulSetLock, due: Due) -> Option<Duration> {
    let ns = lock.namespace()?;
    let lease = ctx.cache.cached_lease(&ns, &lock.spec.lease_name)?;
    if lease.annotations().get(LEASE_OWNER_ANNOTATION) != Some(&crate::api::lock_key(lock))
        || crate::cache::lease_view(&lease).renewed_elsewhere()
    {
        return None;
    }
    let spec = lease.spec.as_ref()?;
    if spec.lease_duration_seconds != Some(lock.spec.lease_duration_seconds) {
        return None;
    }
    let (duration, since_renew) = renewal_age(spec);
    not_due(due, duration, since_renew)
}

/// Read `lock`'s Lease and pods directly if [`must_read_around`] says so and `done` is not a
/// successful read for the same Lease and set. None: nothing read now.
async fn read_around_if_needed(ctx: &Context, lock: &StatefulSetLock, done: &Around) -> Around {
    if !read_around_needed(ctx, lock, done) {
        return None;
    }
    let names = (
        lock.spec.lease_name.clone(),
        lock.spec.stateful_set_name.clone(),
    );
    let read = ctx.cache.read_around(lock).await.map_err(|e| {
        let key = crate::api::lock_key(lock);
        tracing::debug!(lock = %key, shard = %ctx.identity, error = %e, "direct read of the Lease and pods");
        e.to_string()
    });
    Some((names.0, names.1, read))
}

/// Whether [`read_around_if_needed`] would read: [`must_read_around`], for a lock labelled
/// this replica's, unless `done` is a successful read for the same Lease and set.
fn read_around_needed(ctx: &Context, lock: &StatefulSetLock, done: &Around) -> bool {
    let covered = done.as_ref().is_some_and(|(lease, set, read)| {
        read.is_ok() && (lease, set) == (&lock.spec.lease_name, &lock.spec.stateful_set_name)
    });
    let mine = lock.labels().get(crate::api::SHARD_LABEL) == Some(&ctx.identity);
    !covered && mine && must_read_around(ctx, lock)
}

/// A renewal stopped at its ownership check: a read of the Lease and pods made beside it for
/// a lock that is not this replica's leaves nothing of it in the caches. ("Not mine" also
/// means "being handed off": a lock whose newest view still names this replica keeps them,
/// as the handoff may fail; one that succeeds gives them up itself.)
fn stopped(ctx: &Context, lock: &StatefulSetLock, around: Around, outcome: Outcome) -> Outcome {
    let newest = ctx.cache.fresh.newest_lock(Arc::new(lock.clone()));
    if around.is_some()
        && matches!(outcome, Outcome::NotMine)
        && newest.labels().get(crate::api::SHARD_LABEL) != Some(&ctx.identity)
    {
        ctx.cache.give_up(&crate::api::lock_key(lock));
    }
    outcome
}

/// Whether `lease` has lapsed (by its renewTime, on this clock) less than `durations` of its
/// own durations ago.
fn lapsed_within(lease: &Lease, durations: u32) -> bool {
    let Some(spec) = lease.spec.as_ref() else {
        return false;
    };
    let (duration, Some(since)) = since_renewed(spec) else {
        return false;
    };
    since >= duration && since < duration * (durations + 1)
}

/// `attempt` (given its timeout: `api_timeout`, cut to end by `deadline`), and with `again_after`
/// the same attempt once more if the first has no answer by then and at least
/// [`MIN_ATTEMPT`] is left before `deadline`. The first success wins; when both fail, a conflict
/// is the error returned (the other attempt may have committed: the caller re-reads), else the
/// last one. Also whether any attempt's outcome is unknown (it may still commit).
async fn hedged<T, F, Fut>(
    attempt: F,
    api_timeout: Duration,
    deadline: tokio::time::Instant,
    again_after: Option<Duration>,
) -> (crate::error::Result<T>, bool)
where
    F: Fn(Duration) -> Fut,
    Fut: std::future::Future<Output = crate::error::Result<T>>,
{
    let timeout =
        || api_timeout.min(deadline.saturating_duration_since(tokio::time::Instant::now()));
    let first = attempt(timeout());
    tokio::pin!(first);
    let single = |r: crate::error::Result<T>| {
        let unknown = r.as_ref().is_err_and(|e| e.outcome_unknown());
        (r, unknown)
    };
    let Some(after) = again_after else {
        return single(first.await);
    };
    tokio::select! {
        r = &mut first => return single(r),
        _ = tokio::time::sleep(after) => {}
    }
    let left = timeout();
    if left < MIN_ATTEMPT {
        return single(first.await);
    }
    let second = attempt(left);
    tokio::pin!(second);
    let (done, other) = tokio::select! {
        r = &mut first => (r, second.as_mut()),
        r = &mut second => (r, first.as_mut()),
    };
    let e1 = match done {
        Ok(v) => return (Ok(v), false),
        Err(e) => e,
    };
    match other.await {
        // The other committed, so the failed one cannot (same resourceVersion).
        Ok(v) => (Ok(v), false),
        Err(e2) => {
            let unknown = e1.outcome_unknown() || e2.outcome_unknown();
            if e1.is_conflict() {
                (Err(e1), unknown)
            } else {
                (Err(e2), unknown)
            }
        }
    }
}

/// The stream of locks the renewal lane sends to the reconcile lane.
pub fn to_reconcile(
    rx: mpsc::UnboundedReceiver<LockRef>,
) -> impl futures::Stream<Item = LockRef> + Send + 'static {
    futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|r| (r, rx)) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timed_out() -> crate::error::Error {
        crate::error::Error::Timeout {
            context: "renewal".into(),
            after: Duration::from_secs(2),
        }
    }

    /// Attempt `n` (from 0) answers after `delays[n]` with `Ok(n)`, or a timeout for `None`.
    /// The attempt times out (as `call` would) when its answer comes after its timeout.
    async fn scripted(
        delays: &[(u64, bool)],
        calls: &std::sync::atomic::AtomicUsize,
        timeout: Duration,
    ) -> crate::error::Result<usize> {
        let n = calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let (ms, ok) = delays[n];
        let answer = Duration::from_millis(ms);
        tokio::time::sleep(answer.min(timeout)).await;
        if ok && answer <= timeout {
            Ok(n)
        } else {
            Err(timed_out())
        }
    }

    fn hedge(
        delays: &'static [(u64, bool)],
        calls: &'static std::sync::atomic::AtomicUsize,
        window_ms: u64,
    ) -> impl std::future::Future<Output = (crate::error::Result<usize>, bool)> {
        hedged(
            move |t| scripted(delays, calls, t),
            Duration::from_secs(2),
            tokio::time::Instant::now() + Duration::from_millis(window_ms),
            Some(HEDGE_AFTER),
        )
    }

    #[test]
    fn a_lease_lapsed_recently_is_told_from_a_live_one_and_from_one_lapsed_long_ago() {
        let lease = |ago_secs: i64| -> Lease {
            let t = jiff::Timestamp::now() - jiff::SignedDuration::from_secs(ago_secs);
            serde_json::from_value(
                json!({"spec": {"leaseDurationSeconds": 10, "renewTime": MicroTime(t)}}),
            )
            .unwrap()
        };
        assert!(!lapsed_within(&lease(5), 2));
        assert!(lapsed_within(&lease(11), 2));
        assert!(lapsed_within(&lease(29), 2));
        assert!(!lapsed_within(&lease(31), 2));
        assert!(!lapsed_within(&Lease::default(), 2));
    }

    #[tokio::test(start_paused = true)]
    async fn a_hedged_renewal_sends_once_more_only_when_the_first_is_slow() {
        use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
        // Answered in time: no second attempt.
        static A: AtomicUsize = AtomicUsize::new(0);
        let (r, unknown) = hedge(&[(100, true)], &A, 10_000).await;
        assert_eq!((r.ok(), unknown), (Some(0), false));
        assert_eq!(A.load(SeqCst), 1);

        // The first hangs until its timeout: the second, sent after 500 ms, wins.
        static B: AtomicUsize = AtomicUsize::new(0);
        let start = tokio::time::Instant::now();
        let (r, unknown) = hedge(&[(5000, true), (100, true)], &B, 10_000).await;
        assert_eq!((r.ok(), unknown), (Some(1), false));
        assert_eq!(start.elapsed(), Duration::from_millis(600));

        // Both time out: an error, and the outcome is unknown.
        static C: AtomicUsize = AtomicUsize::new(0);
        let (r, unknown) = hedge(&[(5000, true), (5000, true)], &C, 10_000).await;
        assert!(r.is_err_and(|e| e.outcome_unknown()));
        assert!(unknown);

        // The second attempt's timeout ends with the write window (1 s: 500 ms left when it is
        // sent), and none is sent with less than MIN_ATTEMPT left (700 ms window).
        static D: AtomicUsize = AtomicUsize::new(0);
        let start = tokio::time::Instant::now();
        let (r, _) = hedge(&[(5000, true), (600, true)], &D, 1000).await;
        assert!(r.is_err());
        assert_eq!(start.elapsed(), Duration::from_millis(1000));
        static E: AtomicUsize = AtomicUsize::new(0);
        let (r, _) = hedge(&[(5000, true), (100, true)], &E, 700).await;
        assert!(r.is_err());
        assert_eq!(E.load(SeqCst), 1);
    }

    fn lock(name: &str) -> LockRef {
        LockRef::new(name).within("ns")
    }

    /// The wheel on paused time: when each lock comes due, as (lock, seconds after start).
    #[tokio::test(start_paused = true)]
    async fn schedule_moves_ensure_never_moves_cancel_drops() {
        let (renewals, inbox) = channel();
        let fired: Arc<std::sync::Mutex<Vec<(String, u64)>>> = Arc::default();
        let start = Instant::now();
        let wheel = tokio::spawn({
            let fired = fired.clone();
            timer_wheel(inbox, 4, move |l: LockRef| {
                let fired = fired.clone();
                async move {
                    let at = start.elapsed().as_secs();
                    fired.lock().unwrap().push((l.name.clone(), at));
                }
            })
        });
        // No jitter through these: `ensure` takes the time as given, `reschedule` jitters by
        // at most 5 % (early), which whole seconds below absorb.
        renewals.ensure(lock("a"), Duration::from_secs(10));
        renewals.ensure(lock("a"), Duration::from_secs(1)); // exists: stays at 10 s
        renewals.ensure(lock("b"), Duration::from_secs(3));
        renewals.schedule(lock("b"), Duration::from_secs(20)); // moved to ~20 s
        renewals.ensure(lock("c"), Duration::from_secs(5));
        renewals.cancel(lock("c"));
        renewals.ensure(lock("d"), Duration::from_secs(7));
        tokio::time::sleep(Duration::from_secs(30)).await;
        let got = fired.lock().unwrap().clone();
        let names: Vec<&str> = got.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["d", "a", "b"], "{got:?}");
        assert_eq!((got[0].1, got[1].1), (7, 10), "{got:?}");
        assert!(
            (19..=20).contains(&got[2].1),
            "b is due at 20 s less up to 5 % jitter: {got:?}"
        );
        // Fired entries are gone: a lock is renewed again only when rescheduled.
        renewals.ensure(lock("a"), Duration::from_secs(2));
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(fired.lock().unwrap().last(), Some(&("a".to_string(), 32)));
        drop(renewals);
        wheel.await.unwrap();
    }

    /// At most `parallel` renewals run at once; the rest wait for a slot, none is lost.
    #[tokio::test(start_paused = true)]
    async fn due_renewals_run_at_most_parallel_at_once() {
        let (renewals, inbox) = channel();
        let running = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let peak = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let wheel = tokio::spawn({
            let (running, peak, done) = (running.clone(), peak.clone(), done.clone());
            timer_wheel(inbox, 3, move |_| {
                let (running, peak, done) = (running.clone(), peak.clone(), done.clone());
                async move {
                    use std::sync::atomic::Ordering::SeqCst;
                    let now = running.fetch_add(1, SeqCst) + 1;
                    peak.fetch_max(now, SeqCst);
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    running.fetch_sub(1, SeqCst);
                    done.fetch_add(1, SeqCst);
                }
            })
        });
        for i in 0..10 {
            renewals.ensure(lock(&format!("l{i}")), Duration::from_secs(1));
        }
        tokio::time::sleep(Duration::from_secs(10)).await;
        use std::sync::atomic::Ordering::SeqCst;
        assert_eq!(done.load(SeqCst), 10);
        assert_eq!(peak.load(SeqCst), 3);
        drop(renewals);
        wheel.await.unwrap();
    }

    #[test]
    fn jitter_is_early_and_small() {
        let d = Duration::from_secs(15);
        for _ in 0..1000 {
            let j = jittered(d);
            assert!(j <= d && j >= d.mul_f64(1.0 - JITTER), "{j:?}");
        }
    }

    #[tokio::test]
    async fn wheel_reset_keeps_one_entry_per_lock() {
        // The same mechanics `run` uses: resetting an entry moves it, never duplicates it.
        let mut wheel: DelayQueue<&str> = DelayQueue::new();
        let k = wheel.insert_at("a", Instant::now() + Duration::from_secs(3600));
        wheel.reset_at(&k, Instant::now() + Duration::from_millis(10));
        let first = tokio::time::timeout(Duration::from_secs(5), wheel.next())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(first.into_inner(), "a");
        assert!(wheel.is_empty());
    }
}
