//! The reconciler: gather what election needs from the watch caches, ask
//! [`crate::elect::decide`] for a plan, and apply the plan's steps in order.
//!
//! It owns all I/O of an election and none of its decisions. Order matters and is the plan's:
//! the Lease (the intent record) moves first, then the old writer is demoted, then the new one
//! promoted, then status is written. A crash between any two steps reconverges from the Lease
//! on the next reconcile.

pub mod apply;
pub mod client;
pub mod fresh;
pub mod gather;
pub mod lenient;
pub mod pods;
pub mod watch;

use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};

use crate::api::StatefulSetLock;
use crate::config::OperatorArgs;
use crate::error::Error;
use pods::PodIndex;

/// Everything a reconcile needs, shared by all of them.
pub struct Context {
    pub client: Client,
    pub args: OperatorArgs,
    pub identity: String,
    pub pods: PodIndex,
    /// stslock's own Leases, from the labelled Lease watch.
    pub leases: watch::LeaseCache,
    pub locks: kube::runtime::reflector::Store<StatefulSetLock>,
    pub sets: kube::runtime::reflector::Store<k8s_openapi::api::apps::v1::StatefulSet>,
    pub recorder: Recorder,
    pub sharding: Arc<crate::sharding::Sharding>,
    /// The write budget (global, per namespace, renewals first).
    pub limits: Arc<crate::limits::Limits>,
    /// The renewal lane's handle.
    pub renewals: crate::renew::Renewals,
    /// Namespaces this install handles.
    pub scope: Arc<crate::scope::Scope>,
    /// Consecutive failed reconciles per lock, for exponential backoff.
    pub failures: std::sync::Mutex<std::collections::HashMap<String, u32>>,
    /// This replica's metrics (one per replica: several share a process in tests and dev).
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Read-your-writes and trust per lock (see [`fresh`]).
    pub fresh: Arc<fresh::Freshness>,
}

/// Hooks for whoever embeds the operator (tests, `stslock dev`).
#[derive(Debug, Default)]
pub struct RunOptions {
    /// Receives the address `/metrics`, `/healthz` and `/readyz` are served on, once bound.
    pub metrics_bound: Option<tokio::sync::oneshot::Sender<std::net::SocketAddr>>,
}

/// An Event on each StatefulSetLock the watch could not decode (it is skipped, not
/// reconciled): `kubectl describe ssl` then says why it is ignored.
async fn report_undecodable_locks(
    ctx: Arc<Context>,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<lenient::Undecodable>,
) {
    use k8s_openapi::api::core::v1::ObjectReference;
    use kube::runtime::events::{Event, EventType};
    while let Some(u) = rx.recv().await {
        if u.kind != "StatefulSetLock" || u.metadata.name.is_none() {
            continue;
        }
        let reference = ObjectReference {
            api_version: Some(format!("{}/v1", crate::api::GROUP)),
            kind: Some(u.kind.clone()),
            name: u.metadata.name.clone(),
            namespace: u.metadata.namespace.clone(),
            uid: u.metadata.uid.clone(),
            ..ObjectReference::default()
        };
        // events.k8s.io limits a note to 1 kB.
        let mut note = format!(
            "this StatefulSetLock cannot be decoded and is ignored: {}",
            u.error
        );
        if note.len() > 1000 {
            let mut end = 1000;
            while !note.is_char_boundary(end) {
                end -= 1;
            }
            note.truncate(end);
        }
        let ev = Event {
            type_: EventType::Warning,
            reason: "Undecodable".into(),
            note: Some(note),
            action: "Decode".into(),
            secondary: None,
        };
        ctx.limits.acquire(crate::limits::Lane::Reconcile).await;
        if let Err(e) = client::call(
            "recording Event Undecodable",
            ctx.args.api_timeout(),
            ctx.recorder.publish(&ev, &reference),
        )
        .await
        {
            tracing::warn!(error = %e, "event not recorded");
        }
    }
}

/// Run the operator until `shutdown` resolves.
pub async fn run(
    client: Client,
    args: OperatorArgs,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    run_with(client, args, shutdown, RunOptions::default()).await
}

/// [`run`], with hooks for embedding.
pub async fn run_with(
    client: Client,
    args: OperatorArgs,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    options: RunOptions,
) -> anyhow::Result<()> {
    let identity = args.identity();
    let metrics = Arc::new(
        crate::metrics::Metrics::new_with(&identity, args.namespace_metrics)
            .with_go_metrics(args.go_metrics),
    );
    // Bound before anything talks to the API server, so /healthz and /readyz answer (503)
    // while the replica is still connecting.
    let (listener, metrics_addr) = crate::metrics::server::bind(args.metrics_addr).await?;
    tracing::info!(shard = %identity, addr = %metrics_addr, "serving /metrics, /healthz, /readyz");
    if let Some(tx) = options.metrics_bound {
        let _ = tx.send(metrics_addr);
    }
    let namespace = args
        .namespace
        .clone()
        .or_else(|| std::env::var("POD_NAMESPACE").ok())
        .unwrap_or_else(|| client.default_namespace().to_string());
    let membership = Duration::from_secs(args.membership_lease_seconds.max(3));
    let sharding = crate::sharding::Sharding::new(
        client.clone(),
        crate::sharding::ShardConfig {
            id: identity.clone(),
            group: args.shard_group.clone(),
            namespace,
            lease_duration: membership,
            margin: membership / 5,
            grace: membership / 7,
            api_timeout: args.api_timeout(),
        },
    );
    let caches = Arc::new(crate::metrics::server::CacheSync::default());
    // What Controller::new builds, with the lock watch's InitDone visible for readiness (a
    // second waiter on the controller's Store::wait_until_ready could steal its wakeup).
    // Objects that cannot be decoded are skipped by every watch, counted, logged, and — a lock —
    // given an Event (by the task below, once the recorder exists).
    let (undecodable_tx, undecodable_rx) = tokio::sync::mpsc::unbounded_channel();
    let undecodable = lenient::Reporter::new({
        let metrics = metrics.clone();
        move |u: lenient::Undecodable| {
            metrics.undecodable(&u.kind);
            let _ = undecodable_tx.send(u);
        }
    });
    let (locks, locks_writer) = kube::runtime::reflector::store();
    let lock_index = watch::LockIndex::default();
    let lock_events = kube::runtime::reflector(
        locks_writer,
        // Backoff on watch errors: without it a watch that fails at once (RBAC denied, API
        // down, a client whose server is gone) is retried in a loop that never yields.
        lenient::watcher::<StatefulSetLock>(
            client.clone(),
            watch::watch_config(),
            undecodable.clone(),
        )
        .default_backoff(),
    )
    .inspect({
        let caches = caches.clone();
        let index = lock_index.clone();
        move |ev| {
            if let Ok(e) = ev {
                index.apply(e);
            }
            if matches!(ev, Ok(watcher::Event::InitDone)) {
                caches
                    .locks
                    .store(true, std::sync::atomic::Ordering::SeqCst);
            }
        }
    })
    .applied_objects();
    let controller = Controller::for_stream(lock_events, locks.clone());
    let (sets, sets_writer) = kube::runtime::reflector::store();
    let sets_stream = kube::runtime::reflector(
        sets_writer,
        lenient::watcher(client.clone(), watch::watch_config(), undecodable.clone())
            .default_backoff(),
    );
    let pods = PodIndex::new(args.role_label.clone());
    let leases = Arc::default();
    let scope = Arc::new(crate::scope::Scope::new(
        &args.namespaces,
        args.namespace_selector.as_deref(),
    ));
    let probe = Arc::new(crate::metrics::server::Probe {
        metrics: metrics.clone(),
        caches: caches.clone(),
        pods: pods.clone(),
        locks: locks.clone(),
        sharding: sharding.clone(),
        scope: scope.clone(),
    });
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "stslock".into(),
            instance: Some(identity.clone()),
        },
    );
    let limits = Arc::new(crate::limits::Limits::new(
        args.qps,
        args.burst,
        args.tenant_qps,
    ));

    tracing::info!(scope = %scope.describe(), qps = args.qps, burst = args.burst, tenant_qps = args.tenant_qps, "write budget and scope");
    let (renewals, renew_inbox) = crate::renew::channel();
    let (to_reconcile_tx, to_reconcile_rx) = tokio::sync::mpsc::unbounded_channel();
    let ctx = Arc::new(Context {
        client: client.clone(),
        args: args.clone(),
        identity,
        pods: pods.clone(),
        leases: Arc::clone(&leases),
        locks: locks.clone(),
        sets: sets.clone(),
        recorder,
        sharding: sharding.clone(),
        limits: limits.clone(),
        renewals,
        scope: scope.clone(),
        failures: Default::default(),
        metrics: metrics.clone(),
        fresh: Arc::default(),
    });
    // A lock this replica gains or gives up is re-read before it is decided again (the
    // previous owner's writes may not be in the caches yet). A gained lock gets its renewal
    // entry at once (rule 16): the renewal lane renews it if due, or hands it to the
    // reconcile lane.
    sharding.on_ownership({
        let (fresh, renewals) = (ctx.fresh.clone(), ctx.renewals.clone());
        Box::new(move |lock: &StatefulSetLock, gained: bool| {
            fresh.distrust(&fresh::lock_key(lock));
            let lock_ref = kube::runtime::reflector::ObjectRef::from_obj(lock);
            if gained {
                renewals.schedule(lock_ref, Duration::ZERO);
            } else {
                renewals.cancel(lock_ref);
            }
        })
    });
    // Shutdown: stop reconciling, then hand every owned lock to its next owner, then leave.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stop_waiter = tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    // The background tasks live exactly as long as this future: dropped (or aborted) with it.
    let scoped = |f| crate::metrics::scoped(metrics.clone(), f);
    let background = AbortOnDrop(vec![
        tokio::spawn(crate::metrics::server::serve(listener, probe)),
        tokio::spawn(report_undecodable_locks(ctx.clone(), undecodable_rx)),
        tokio::spawn(scoped(sharding.clone().membership_loop().boxed())),
        tokio::spawn(scoped(sharding.clone().watch_members().boxed())),
        tokio::spawn(cache_synced(sets.clone(), caches.clone(), |c| {
            &c.statefulsets
        })),
        tokio::spawn(scoped(
            crate::renew::run(ctx.clone(), renew_inbox, to_reconcile_tx).boxed(),
        )),
        tokio::spawn({
            let (scope, client) = (scope.clone(), client.clone());
            async move { scope.follow(client).await }
        }),
        tokio::spawn({
            let limits = limits.clone();
            async move {
                loop {
                    tokio::time::sleep(Duration::from_secs(60)).await;
                    limits.forget_idle();
                }
            }
        }),
        tokio::spawn(scoped({
            let sharding = sharding.clone();
            let locks = locks.clone();
            let scope = scope.clone();
            let mut stop = stop_rx.clone();
            async move {
                loop {
                    sharding.assign(&locks, &scope).await;
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(300)) => {}
                        _ = stop.changed() => return,
                    }
                }
            }
            .boxed()
        })),
        stop_waiter,
    ]);
    let set_triggers = {
        let locks = lock_index.clone();
        sets_stream
            .filter_map(move |ev| {
                use kube::runtime::watcher::Event;
                let refs = match ev {
                    Ok(Event::Apply(s)) | Ok(Event::Delete(s)) | Ok(Event::InitApply(s)) => {
                        locks.locks_for_set(&s.namespace().unwrap_or_default(), &s.name_any())
                    }
                    Ok(_) => vec![],
                    Err(e) => {
                        tracing::warn!(error = %e, "statefulset watch");
                        vec![]
                    }
                };
                futures::future::ready(Some(futures::stream::iter(refs)))
            })
            .flatten()
    };
    let controller = controller
        .with_config(kube::runtime::controller::Config::default().concurrency(args.concurrency))
        .reconcile_on(watch::pod_triggers(
            client.clone(),
            pods,
            lock_index.clone(),
            undecodable.clone(),
        ))
        .reconcile_on(set_triggers)
        .reconcile_on(watch::lease_triggers_synced(
            client.clone(),
            leases,
            caches.leases.clone(),
            undecodable.clone(),
        ))
        .reconcile_on(crate::renew::to_reconcile(to_reconcile_rx))
        .graceful_shutdown_on({
            let mut stop = stop_rx.clone();
            async move {
                let _ = stop.wait_for(|s| *s).await;
            }
        });
    tracing::info!("stslock operator started");
    controller
        .run(traced_reconcile, error_policy, ctx)
        .for_each(|res| async move {
            match res {
                Ok((obj, _)) => tracing::trace!(lock = %obj, "reconciled"),
                Err(e) => tracing::debug!(error = %e, "reconcile"),
            }
        })
        .await;
    match args.leave {
        crate::config::LeaveStrategy::Handoff => {
            crate::metrics::scoped(metrics.clone(), sharding.leave(&locks)).await
        }
        crate::config::LeaveStrategy::Keep => {
            tracing::info!("keeping this replica's locks for a replacement with the same id")
        }
    }
    drop(background);
    tracing::info!("stslock operator stopped");
    Ok(())
}

/// Marks a reflector cache as synced once it has its initial list. Only for stores nothing
/// else waits on: `wait_until_ready` wakes only its most recent waiter.
async fn cache_synced<K>(
    store: kube::runtime::reflector::Store<K>,
    caches: Arc<crate::metrics::server::CacheSync>,
    flag: fn(&crate::metrics::server::CacheSync) -> &std::sync::atomic::AtomicBool,
) where
    K: kube::Resource + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    if store.wait_until_ready().await.is_ok() {
        flag(&caches).store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Aborts its tasks when dropped, so a replica's helpers never outlive it.
struct AbortOnDrop(Vec<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

fn lock_key(lock: &StatefulSetLock) -> String {
    format!(
        "{}/{}",
        lock.namespace().unwrap_or_default(),
        lock.name_any()
    )
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

fn error_policy(lock: Arc<StatefulSetLock>, err: &Error, ctx: Arc<Context>) -> Action {
    let key = lock_key(&lock);
    let failures = ctx
        .failures
        .lock()
        .map(|mut m| {
            let n = m.entry(key.clone()).or_default();
            *n = n.saturating_add(1);
            *n
        })
        .unwrap_or(1);
    let delay = backoff(failures, err);
    // The plan may have failed before it scheduled the renewal (after a restart nothing has
    // scheduled it yet): the renewal lane keeps a held Lease renewed meanwhile, with its own
    // re-read and fast retries, whatever this lock's backoff (rule 16).
    if lock.labels().get(crate::api::SHARD_LABEL) == Some(&ctx.identity) {
        ctx.renewals.ensure(
            kube::runtime::reflector::ObjectRef::from_obj(lock.as_ref()),
            Duration::ZERO,
        );
    }
    tracing::warn!(
        lock = %key,
        failures,
        error = %err,
        kind = err.metric_label(),
        "reconcile failed; retrying in {delay:?}"
    );
    Action::requeue(delay)
}

/// [`reconcile`] inside its span, the parent of its election span and API calls.
fn traced_reconcile(
    lock: Arc<StatefulSetLock>,
    ctx: Arc<Context>,
) -> impl std::future::Future<Output = Result<Action, Error>> + Send {
    let span = crate::telemetry::reconcile_span(&lock, &ctx.identity);
    crate::telemetry::traced(span, reconcile(lock, ctx))
}

async fn reconcile(lock: Arc<StatefulSetLock>, ctx: Arc<Context>) -> Result<Action, Error> {
    crate::metrics::scoped(ctx.metrics.clone(), reconcile_lock(lock, ctx)).await
}

async fn reconcile_lock(lock: Arc<StatefulSetLock>, ctx: Arc<Context>) -> Result<Action, Error> {
    if !ctx.scope.allows(&lock.namespace().unwrap_or_default()) {
        return Ok(Action::await_change());
    }
    let key = fresh::lock_key(&lock);
    // What this replica wrote itself may be newer than the watch has delivered.
    let mut lock = ctx.fresh.newest_lock(lock);
    // The fence generation this plan belongs to: if the fence closes and reopens meanwhile,
    // every write of the plan is refused.
    let generation = ctx.sharding.generation();
    if lock.labels().get(crate::api::SHARD_LABEL) == Some(&ctx.identity)
        && ctx.sharding.may_write()
        && !ctx.fresh.is_trusted(&key, generation)
    {
        // Untrusted (restart, claim, closed fence, a write with an unknown outcome): re-read
        // the lock, its Lease and its pods before deciding anything.
        match gather::reread(&lock, &ctx).await? {
            Some(l) => {
                lock = ctx.fresh.newest_lock(Arc::new(l));
                ctx.fresh.trust(&key, generation);
            }
            None => {
                ctx.fresh.forget(&key);
                return Ok(Action::await_change());
            }
        }
    }
    // Only the replica named by the lock's shard label works on it, and only while its own
    // membership is surely live.
    let Some(_inflight) = ctx.sharding.begin(&lock) else {
        let mine = lock.labels().get(crate::api::SHARD_LABEL) == Some(&ctx.identity);
        if !mine {
            ctx.metrics.forget_lock(&key);
        }
        return Ok(if mine {
            Action::requeue(Duration::from_secs(1))
        } else {
            Action::await_change()
        });
    };
    let _busy = ctx.metrics.reconcile_started();
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
            )
        {
            tracing::debug!(lock = %observed.key(), ?wait, "namespace over its write budget; requeued");
            return Ok(Action::requeue(wait));
        }
        crate::telemetry::traced_apply(
            &observed,
            &plan,
            &ctx.identity,
            apply::apply(&lock, &observed, &plan, &ctx, generation),
        )
        .await?;
        if let Ok(mut m) = ctx.failures.lock() {
            m.remove(&key);
        }
        if let Some(after) = plan.renew_after {
            // Renewed (or not due) as of now: the lane's entry starts from here.
            ctx.renewals.schedule(lock_ref, after);
        }
        let duration =
            Duration::from_secs(u64::try_from(observed.lease_duration_seconds).unwrap_or(1));
        Ok(apply::next_action(&plan, duration))
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
    use super::backoff;
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
}

