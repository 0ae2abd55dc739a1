//! The reconciler: gather what election needs from the watch caches, ask
//! [`crate::elect::decide`] for a plan, and apply the plan's steps in order.
//!
//! It owns all I/O of an election and none of its decisions. Order matters and is the plan's:
//! demotions and the epoch's reservation on the lock first, then the Lease (the intent record)
//! moves, then the new writer is promoted, then status is written. A crash between any two
//! steps reconverges from the Lease and the lock's records on the next reconcile. The replica
//! around it is wired in [`crate::replica`].

pub mod apply;
pub mod gather;

use std::sync::Arc;
use std::time::Duration;

use kube::runtime::controller::Action;
use kube::runtime::events::Recorder;
use kube::{Client, ResourceExt};

use crate::api::StatefulSetLock;
use crate::config::OperatorArgs;
use crate::error::Error;

/// Everything a reconcile needs, shared by all of them.
pub struct Context {
    pub client: Client,
    pub args: OperatorArgs,
    pub identity: String,
    /// The replica's caches (pods, Leases, locks, StatefulSets, what it wrote or read fresh).
    pub cache: Arc<crate::cache::Caches>,
    pub recorder: Recorder,
    pub sharding: Arc<crate::sharding::Sharding>,
    /// The write budget (global, per namespace, renewals first).
    pub limits: Arc<crate::limits::Limits>,
    /// The renewal lane's handle.
    pub renewals: crate::renew::Renewals,
    /// Namespaces this install handles.
    pub scope: Arc<crate::scope::Scope>,
    /// Consecutive failed reconciles per lock, for exponential backoff.
    pub failures: dashmap::DashMap<String, u32>,
    /// This replica's metrics (one per replica: several share a process in tests and dev).
    pub metrics: Arc<crate::metrics::Metrics>,
}

/// Per-lock exponential backoff with jitter: conflicts (someone, or a previous step, moved the
/// object) start at 100 ms and stay under 1 s; other errors start at 1 s and double with each
/// consecutive failure, up to 16 s while the API fails for now (5xx, 429, timeouts, fenced) and
/// 60 s otherwise (forbidden, invalid, …); a success resets it.
fn backoff(failures: u32, err: &Error) -> Duration {
    let conflict = err.is_retry_soon();
    let base = if conflict {
        Duration::from_millis(100)
    } else {
        Duration::from_secs(1)
    };
    let exp = base.saturating_mul(1u32 << failures.saturating_sub(1).min(10));
    // A conflict is not a fault: the write that caused it is on its way through the watch and
    // triggers a reconcile too. Backing off far would only delay a failover behind a slow
    // watch, so conflicts back off to 1 s at most. An API outage must not leave a lock that
    // failed through it waiting a minute after the API is back (a writer-less lock is an
    // outage of its own, and nothing else may trigger it): its errors back off to 16 s, so it
    // is tried again within 20 s of the recovery. The write budget still bounds what a
    // replica sends meanwhile.
    let capped = exp.min(if conflict {
        Duration::from_secs(1)
    } else if err.is_transient() {
        Duration::from_secs(16)
    } else {
        Duration::from_secs(60)
    });
    // ±20 % so locks that failed together do not retry together.
    capped.mul_f64(0.8 + 0.4 * rand::random::<f64>())
}

/// How long the Lease of `lock`, as this replica's cache has it, has before it expires, and
/// its duration (None: not cached, never renewed, or expired).
fn lease_expires_in(lock: &StatefulSetLock, ctx: &Context) -> Option<(Duration, Duration)> {
    let key = (
        lock.namespace().unwrap_or_default(),
        lock.spec.lease_name.clone(),
    );
    let view = {
        let leases = ctx.cache.leases.read().ok()?;
        crate::cache::lease_view(leases.get(&key)?)
    };
    let left = Duration::try_from(view.expiry()?.duration_since(jiff::Timestamp::now())).ok()?;
    let duration = Duration::from_secs(u64::try_from(view.duration_seconds).unwrap_or(0));
    Some((left, duration))
}

/// A failed reconcile of a lock whose Lease is still live comes back while the Lease can be
/// renewed, however far its backoff went: no later than the renewal is due (half a Lease
/// before the expiry), and once that is past, no later than two API timeouts before the
/// expiry. While its writer is labelled the renewal lane keeps the Lease on its own;
/// mid-failover (the Lease names the new writer, its promotion has no known outcome) only a
/// reconcile can — it then keeps the renewal's schedule, with half a Lease left for the
/// re-reads an untrusted lock needs first. A 1 s then 2 s backoff behind API errors after a
/// restart let one expire in the chaos soak. Not sooner than half an API timeout between
/// tries, so an outage does not turn every lock near its expiry into a loop of reads.
fn in_time_for_lease(
    delay: Duration,
    lease: Option<(Duration, Duration)>,
    api_timeout: Duration,
) -> Duration {
    match lease {
        Some((left, duration)) => {
            // Two API timeouts before the expiry, or the renewal's due time if that is earlier
            // and still ahead; within two API timeouts of the expiry, half an API timeout.
            let deadline = match left.checked_sub(api_timeout * 2) {
                Some(late) if !late.is_zero() => left
                    .checked_sub(duration / 2)
                    .filter(|due| !due.is_zero())
                    .map_or(late, |due| due.min(late)),
                _ => Duration::ZERO,
            };
            delay.min(deadline.max(api_timeout / 2))
        }
        None => delay,
    }
}

pub(crate) fn error_policy(lock: Arc<StatefulSetLock>, err: &Error, ctx: Arc<Context>) -> Action {
    let key = crate::api::lock_key(&lock);
    let failures = {
        let mut n = ctx.failures.entry(key.clone()).or_default();
        *n = n.saturating_add(1);
        *n
    };
    // As this replica knows the lock: its own writes (a claim the lock watch has not
    // delivered yet) included.
    let mine = ctx
        .cache
        .fresh
        .newest_lock(lock.clone())
        .labels()
        .get(crate::api::SHARD_LABEL)
        == Some(&ctx.identity);
    let delay = in_time_for_lease(
        backoff(failures, err),
        mine.then(|| lease_expires_in(&lock, &ctx)).flatten(),
        ctx.args.api_timeout(),
    );
    // The plan may have failed before it scheduled the renewal (after a restart nothing has
    // scheduled it yet): the renewal lane keeps a held Lease renewed meanwhile, with its own
    // re-read and fast retries, whatever this lock's backoff (rule 16).
    if mine {
        ctx.renewals.ensure(
            kube::runtime::reflector::ObjectRef::from_obj(lock.as_ref()),
            Duration::ZERO,
        );
    }
    tracing::warn!(
        lock = %key,
        shard = %ctx.identity,
        failures,
        error = %err,
        kind = err.metric_label(),
        "reconcile failed; retrying in {delay:?}"
    );
    Action::requeue(delay)
}

/// [`reconcile`] inside its span, the parent of its election span and API calls.
pub(crate) fn traced_reconcile(
    lock: Arc<StatefulSetLock>,
    ctx: Arc<Context>,
) -> impl std::future::Future<Output = Result<Action, Error>> + Send {
    let span = crate::telemetry::reconcile_span(&lock, &ctx.identity);
    crate::telemetry::traced(span, reconcile_lock(lock, ctx))
}

async fn reconcile_lock(lock: Arc<StatefulSetLock>, ctx: Arc<Context>) -> Result<Action, Error> {
    if !ctx.scope.allows(&lock.namespace().unwrap_or_default()) {
        return Ok(Action::await_change());
    }
    let key = crate::api::lock_key(&lock);
    // What this replica wrote itself may be newer than the watch has delivered.
    let mut lock = ctx.cache.fresh.newest_lock(lock);
    // The fence generation this plan belongs to: if the fence closes and reopens meanwhile,
    // every write of the plan is refused.
    let generation = ctx.sharding.generation();
    if lock.labels().get(crate::api::SHARD_LABEL) == Some(&ctx.identity)
        && ctx.sharding.may_write()
        && !ctx.cache.fresh.is_trusted(&key, generation)
    {
        // Untrusted (restart, claim, closed fence, a write with an unknown outcome): re-read
        // the lock, its Lease and its pods before deciding anything.
        let must = ctx.sharding.must_confirm();
        match ctx.cache.reread(&lock).await? {
            Some(l) => {
                lock = ctx.cache.fresh.newest_after_read(l);
                // Confirmed by a write when the read alone does not show it (just after the
                // fence reopened, see `Sharding::confirm_owner`).
                match ctx
                    .sharding
                    .confirm_owner(
                        &lock,
                        generation,
                        must,
                        &ctx.limits,
                        crate::limits::Lane::Reconcile,
                    )
                    .await?
                {
                    Some(confirmed) => {
                        ctx.cache.fresh.remember_lock(confirmed.clone());
                        lock = ctx.cache.fresh.newest_after_read(confirmed);
                        ctx.cache.fresh.trust(&key, generation);
                    }
                    // Not this replica's: the read above may still say it is (a confirmation
                    // that lost to a peer's claim learns it from a read of its own), or a
                    // handoff of it is under way. Nothing of this plan may go out; the next
                    // reconcile reads again.
                    None if lock.labels().get(crate::api::SHARD_LABEL) == Some(&ctx.identity) => {
                        return Ok(Action::requeue(Duration::from_secs(1)));
                    }
                    None => {}
                }
            }
            None => {
                ctx.cache.fresh.forget(&key);
                return Ok(Action::await_change());
            }
        }
    }
    // Only the replica named by the lock's shard label works on it, and only while its own
    // membership is surely live.
    if !ctx.sharding.may_begin(&lock) {
        let mine = lock.labels().get(crate::api::SHARD_LABEL) == Some(&ctx.identity);
        if !mine {
            ctx.metrics.forget_lock(&key);
            // Its failures were this replica's: a lock that comes back later starts its
            // backoff afresh.
            ctx.failures.remove(&key);
        }
        return Ok(if mine {
            Action::requeue(Duration::from_secs(1))
        } else {
            Action::await_change()
        });
    }
    // Not found before the StatefulSet watch's first list completed (a start: its list's
    // triggers come before the list is published) is not "not found": deciding from it
    // reported StatefulSetNotFound, with an Event, and cancelled the Lease's renewal entry.
    // No decision yet, and no error: the renewal lane keeps a held Lease meanwhile, and the
    // readiness probe reports the StatefulSet cache unsynced (a list that keeps failing).
    if !ctx.cache.sets.is_listed()
        && ctx
            .cache
            .sets
            .get(
                &lock.namespace().unwrap_or_default(),
                &lock.spec.stateful_set_name,
            )
            .is_none()
    {
        tracing::debug!(lock = %key, "StatefulSets not listed yet; requeued");
        ctx.renewals.ensure(
            kube::runtime::reflector::ObjectRef::from_obj(lock.as_ref()),
            Duration::ZERO,
        );
        return Ok(Action::requeue(Duration::from_secs(1)));
    }
    let _busy = ctx.metrics.reconcile_started();
    // The plan's durations (`renew_after`, `requeue_after`) count from here, as `now` does.
    let started = std::time::Instant::now();
    let result = async {
        let now = jiff::Timestamp::now();
        let observed = gather::observe(&lock, &ctx).await?;
        ctx.metrics.observed(&observed);
        let plan = crate::elect::decide(
            &observed,
            now,
            &gather::election_config(&ctx.args, &ctx.identity),
        );
        // The renewal entry follows the plan before anything can defer the plan: a held
        // Lease is renewed on time even while its namespace is over its write budget.
        // A plan that writes the Lease itself computes `renew_after` as if that write had
        // succeeded: scheduling it now would push the lane's entry (and its fast retries) half a
        // Lease out while the Lease is not renewed, and every failing reconcile would push it
        // again. Such a plan only makes sure an entry exists; after it succeeds the entry is
        // set below.
        let lock_ref = kube::runtime::reflector::ObjectRef::from_obj(lock.as_ref());
        let writes_lease = plan.writes_lease();
        match plan.renew_after {
            // Not due at once: a plan that succeeds sets the entry within this anyway, and
            // the lane would only find the Lease mid-write.
            Some(_) if writes_lease => ctx
                .renewals
                .ensure(lock_ref.clone(), Duration::from_secs(1)),
            Some(after) => ctx.renewals.schedule(lock_ref.clone(), after),
            None => ctx.renewals.cancel(lock_ref.clone()),
        }
        // The namespace's budget is checked without waiting: over it, the lock goes back on
        // the queue and the worker moves on to other namespaces. A plain renewal is exempt.
        let writes = plan.budgeted_writes();
        let holder = observed.lease.as_ref().and_then(|l| l.holder.as_deref());
        if writes > 0
            && !plan.is_renewal_only(holder)
            && let Err(wait) = ctx.limits.tenant_admit(
                &observed.namespace,
                &observed.name,
                u32::try_from(writes).unwrap_or(u32::MAX),
                plan.restores_writer(),
            )
        {
            tracing::debug!(lock = %observed.key(), ?wait, "namespace over its write budget; requeued");
            return Ok(Action::requeue(wait));
        }
        if plan.steps.is_empty() {
            tracing::trace!(
                lock = %observed.key(),
                lease = ?observed.lease.as_ref().map(|l| (&l.holder, l.transitions)),
                pods = ?observed.pods.iter().map(|p| (&p.name, p.ready, p.role, p.epoch)).collect::<Vec<_>>(),
                "nothing to do"
            );
        }
        if !plan.steps.is_empty() {
            // What the plan was made from and what it does (for explaining a decision after
            // the fact: which view of the pods and the Lease led to which writes).
            tracing::debug!(
                lock = %observed.key(),
                shard = %ctx.identity,
                lease = ?observed.lease.as_ref().map(|l| (&l.holder, &l.holder_uid, l.transitions)),
                status_writer = ?(&observed.status.writer_pod, observed.status.writer_epoch),
                pods = ?observed.pods.iter().map(|p| (&p.name, p.ready, p.role, p.epoch)).collect::<Vec<_>>(),
                lock_rv = ?lock.resource_version(),
                steps = ?plan.steps,
                "plan"
            );
        }
        crate::telemetry::traced_apply(
            &observed,
            &plan,
            &ctx.identity,
            apply::apply(&lock, &observed, &plan, &ctx, generation),
        )
        .await?;
        ctx.failures.remove(&key);
        if let Some(after) = plan.renew_after {
            // Renewed (or not due) as of when the plan was made, not as of now: the writes
            // after its Lease write may have taken seconds (each up to an API timeout), and
            // counted from their end the entry moved the next renewal that much closer to the
            // expiry — nothing else renews the Lease meanwhile when the watch events that
            // trigger a reconcile come late.
            ctx.renewals
                .schedule(lock_ref, after.saturating_sub(started.elapsed()));
        }
        let duration =
            Duration::from_secs(u64::try_from(observed.lease_duration_seconds).unwrap_or(1));
        Ok(apply::next_action(&plan, duration, started.elapsed()))
    }
    .await;
    ctx.metrics
        .reconcile_finished(started.elapsed(), result.as_ref().err());
    if let Some(go) = ctx.metrics.go() {
        go.reconciled(
            &crate::metrics::go_compat::LockId::of(&lock),
            started.elapsed(),
            result.as_ref().err().map(|e| e.metric_label()),
        );
    }
    result
}

#[cfg(test)]
mod tests {
    use super::{backoff, in_time_for_lease};
    use crate::error::Error;
    use std::time::Duration;

    #[test]
    fn backoff_doubles_with_jitter_and_conflicts_stay_short() {
        let invalid = Error::Invalid("spec".into());
        let timeout = Error::Timeout {
            context: "patch".into(),
            after: Duration::from_secs(2),
        };
        let stale = Error::Stale("lock moved".into());
        for _ in 0..200 {
            let first = backoff(1, &invalid);
            assert!(first >= Duration::from_millis(800) && first <= Duration::from_millis(1200));
            let third = backoff(3, &timeout);
            assert!(third >= Duration::from_millis(3200) && third <= Duration::from_millis(4800));
            assert!(backoff(30, &invalid) <= Duration::from_secs(72));
            assert!(backoff(30, &invalid) >= Duration::from_secs(48));
            // An API outage: back within 20 s of the recovery, whatever happened before.
            assert!(backoff(30, &timeout) <= Duration::from_millis(19_200));
            assert!(backoff(30, &timeout) >= Duration::from_millis(12_800));
            assert!(backoff(30, &Error::Fenced) <= Duration::from_millis(19_200));
            assert!(backoff(1, &stale) <= Duration::from_millis(120));
            assert!(backoff(30, &stale) <= Duration::from_millis(1200));
        }
    }

    #[test]
    fn a_live_lease_is_not_left_to_expire_behind_the_backoff() {
        let (ms, api) = (Duration::from_millis, Duration::from_secs(2));
        let (ten, thirty) = (Duration::from_secs(10), Duration::from_secs(30));
        // The soak's case: 2 s of backoff, 2.08 s left on a 10 s Lease: back in 1 s (half an
        // API timeout), in time to renew.
        assert_eq!(
            in_time_for_lease(ms(2000), Some((ms(2080), ten)), api),
            ms(1000)
        );
        // Plenty left: the backoff as it is.
        assert_eq!(
            in_time_for_lease(ms(2000), Some((ms(9000), ten)), api),
            ms(2000)
        );
        // A long backoff ends when the renewal is due (half a Lease before the expiry)...
        assert_eq!(
            in_time_for_lease(ms(16_000), Some((ms(9000), ten)), api),
            ms(4000)
        );
        assert_eq!(
            in_time_for_lease(ms(16_000), Some((ms(28_000), thirty)), api),
            ms(13_000)
        );
        // ...or two API timeouts before the expiry, if that is earlier (short Leases)...
        assert_eq!(
            in_time_for_lease(ms(16_000), Some((ms(5000), ms(3000))), api),
            ms(1000)
        );
        assert_eq!(
            in_time_for_lease(ms(16_000), Some((ms(6000), ms(6000))), api),
            ms(2000)
        );
        // ...and past the renewal's due time, two API timeouts before the expiry...
        assert_eq!(
            in_time_for_lease(ms(16_000), Some((ms(12_000), thirty)), api),
            ms(8000)
        );
        // ...and within two API timeouts of the expiry, half an API timeout, whatever the
        // renewal's due time (never later than before it counted).
        assert_eq!(
            in_time_for_lease(ms(16_000), Some((ms(3500), ms(3000))), api),
            ms(1000)
        );
        // No Lease, or expired: the backoff.
        assert_eq!(in_time_for_lease(ms(16_000), None, api), ms(16_000));
        // A shorter backoff is never lengthened.
        assert_eq!(
            in_time_for_lease(ms(100), Some((ms(500), ten)), api),
            ms(100)
        );
    }
}
