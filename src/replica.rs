//! One operator replica, wired: its caches and watches, the shard runtime, the renewal lane,
//! the reconcile lane (kube-runtime's controller), the metrics server, and the background tasks
//! that keep them going — all in [`run_with`], all stopped with it. Each lane gets its own small
//! context ([`crate::reconcile::Context`], [`crate::renew::Context`]); nothing below imports this
//! module.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kube::runtime::controller::Controller;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};

use crate::api::StatefulSetLock;
use crate::cache::pods::PodIndex;
use crate::cache::{lenient, watch};
use crate::config::OperatorArgs;
use crate::reconcile::{Context, error_policy, traced_reconcile};

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
        if let Err(e) = crate::call::call(
            &ctx.metrics,
            crate::call::ApiCall::create(
                crate::call::Kind::Event,
                format!(
                    "{}/{}",
                    u.metadata.namespace.as_deref().unwrap_or_default(),
                    u.metadata.name.as_deref().unwrap_or_default()
                ),
            )
            .note("Undecodable"),
            ctx.args.api_timeout(),
            ctx.recorder.publish(&ev, &reference),
        )
        .await
        {
            tracing::warn!(error = %e, "event not recorded");
        }
    }
}

/// How many API timeouts the reconciles running at a stop get to end before the replica stops
/// waiting for them (a reconcile's writes are each bounded by one; waits for the write budget
/// are not). A graceful leave runs beside them and does not wait.
const STOP_GRACE_API_TIMEOUTS: u32 = 3;

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
    // Nothing is written with a value the API server would refuse halfway through.
    args.validate()
        .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
    let identity = args.identity();
    let metrics = Arc::new(
        crate::metrics::Metrics::new_with(&identity, args.namespace_metrics)
            .with_go_metrics(args.go_metrics),
    );
    // Bound before anything talks to the API server, so /healthz and /readyz answer (503)
    // while the replica is still connecting.
    let (listener, metrics_addr) = crate::probe::bind(args.metrics_addr).await?;
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
            placement: args.placement,
        },
        metrics.clone(),
    );
    let synced = Arc::new(crate::probe::CacheSync::default());
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
    let scope = Arc::new(crate::scope::Scope::new(
        &args.namespaces,
        args.namespace_selector.as_deref(),
    ));
    // Locks the lock watch saw deleted (Some), or a list of it complete (None: any lock the
    // list lacks is gone too — a deletion while the watch was down has no event), for the
    // caches to give up (once they exist).
    let (gone_tx, mut gone_rx) = tokio::sync::mpsc::unbounded_channel::<Option<String>>();
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
        .modify(watch::slim_lock_for(identity.clone()))
        .backoff(watch::backoff())
        .filter(watch::in_scope(scope.clone())),
    )
    .inspect({
        let synced = synced.clone();
        let index = lock_index.clone();
        let gone = gone_tx;
        move |ev| {
            if let Ok(e) = ev {
                index.apply(e);
                // A deleted lock's Lease and pods leave the caches (see `Caches::give_up`).
                match e {
                    watcher::Event::Delete(l) => {
                        let _ = gone.send(Some(crate::api::lock_key(l)));
                    }
                    watcher::Event::InitDone => {
                        let _ = gone.send(None);
                    }
                    _ => {}
                }
            }
            if matches!(ev, Ok(watcher::Event::InitDone)) {
                synced.set_locks();
            }
        }
    })
    .applied_objects();
    let controller = Controller::for_stream(lock_events, locks.clone());
    // Every StatefulSet as a projection; Leases and pods only for this replica's own locks
    // (DESIGN §4).
    let sets = crate::cache::sets::SetIndex::default();
    let interest = Arc::new(crate::cache::interest::Interest::default());
    let sets_stream = lenient::watcher::<watch::CachedStatefulSet>(
        client.clone(),
        watch::watch_config(),
        undecodable.clone(),
    )
    .backoff(watch::backoff())
    .filter(watch::in_scope(scope.clone()))
    .inspect({
        let (sets, synced) = (sets.clone(), synced.clone());
        move |ev| {
            if let Ok(e) = ev {
                sets.apply(e);
                if matches!(e, watcher::Event::InitDone) {
                    synced
                        .statefulsets
                        .store(true, std::sync::atomic::Ordering::SeqCst);
                }
            }
        }
    });
    let pods = PodIndex::new(args.role_label.clone()).keeping({
        let interest = interest.clone();
        move |ns, set| interest.wants_set(ns, set)
    });
    let leases: crate::cache::watch::LeaseCache = Arc::default();
    let probe = Arc::new(crate::probe::Probe {
        metrics: metrics.clone(),
        caches: synced.clone(),
        pods: pods.clone(),
        leases: Arc::clone(&leases),
        sets: sets.clone(),
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
    let limits = Arc::new(
        crate::limits::Limits::new(args.qps, args.burst, args.tenant_qps)
            .with_metrics(metrics.clone()),
    );

    tracing::info!(scope = %scope.describe(), qps = args.qps, burst = args.burst, tenant_qps = args.tenant_qps, "write budget and scope");
    let (renewals, renew_inbox) = crate::renew::channel();
    let (to_reconcile_tx, to_reconcile_rx) = tokio::sync::mpsc::unbounded_channel();
    let cache = Arc::new(crate::cache::Caches {
        client: client.clone(),
        identity: identity.clone(),
        api_timeout: args.api_timeout(),
        pods: pods.clone(),
        leases: Arc::clone(&leases),
        locks: locks.clone(),
        lock_index: lock_index.clone(),
        sets: sets.clone(),
        fresh: Arc::default(),
        interest: interest.clone(),
        metrics: metrics.clone(),
    });
    let ctx = Arc::new(Context {
        client: client.clone(),
        args: args.clone(),
        identity: identity.clone(),
        cache: cache.clone(),
        recorder,
        sharding: sharding.clone(),
        limits: limits.clone(),
        renewals: renewals.clone(),
        scope: scope.clone(),
        failures: Default::default(),
        metrics: metrics.clone(),
    });
    let renewal_lane = Arc::new(crate::renew::Context {
        cache: cache.clone(),
        identity,
        sharding: sharding.clone(),
        limits: limits.clone(),
        scope: scope.clone(),
        metrics: metrics.clone(),
        renewals,
        api_timeout: args.api_timeout(),
        leases_synced: synced.leases.clone(),
    });
    // A lock this replica gains or gives up is re-read before it is decided again (the
    // previous owner's writes may not be in the cache yet). A gained lock gets its renewal
    // entry at once (rule 16): the renewal lane renews it if due, or hands it to the
    // reconcile lane.
    sharding.on_ownership({
        let (cache, renewals) = (ctx.cache.clone(), ctx.renewals.clone());
        Box::new(move |lock: &StatefulSetLock, gained: bool| {
            let key = crate::api::lock_key(lock);
            // A loss seen in a view older than what this replica wrote itself (a claim the
            // lock watch has not delivered yet) is no loss.
            if !gained
                && cache
                    .fresh
                    .newest_lock(Arc::new(lock.clone()))
                    .labels()
                    .get(crate::api::SHARD_LABEL)
                    == Some(&cache.identity)
            {
                return;
            }
            cache.fresh.distrust(&key);
            let lock_ref = kube::runtime::reflector::ObjectRef::from_obj(lock);
            if gained {
                // The version that says so may be newer than the lock watch has delivered
                // (an awaited handoff read from the API server): ownership checks see it.
                cache.fresh.remember_lock(lock.clone());
                renewals.schedule(lock_ref, Duration::ZERO);
            } else {
                renewals.cancel(lock_ref);
                cache.give_up(&key);
            }
        })
    });
    // Shutdown: stop reconciling, then hand every owned lock to its next owner, then leave.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    // The background tasks live exactly as long as this future: a JoinSet aborts them when
    // dropped (or aborted) with it.
    let mut background = tokio::task::JoinSet::new();
    let stopping = args.identity();
    background.spawn({
        let sharding = sharding.clone();
        let hand_off = matches!(args.leave, crate::config::LeaveStrategy::Handoff);
        async move {
            shutdown.await;
            tracing::info!(shard = %stopping, "stopping: no new reconciles; waiting for the running ones");
            let _ = stop_tx.send(true);
            // Peers hand locks to this replica until they see it leaving: the mark goes out
            // now, not after the reconciles running have ended (seconds, under API faults).
            if hand_off {
                sharding.mark_leaving().await;
            }
        }
    });
    background.spawn(crate::probe::serve(listener, probe));
    background.spawn({
        let (cache, locks) = (ctx.cache.clone(), locks.clone());
        async move {
            while let Some(gone) = gone_rx.recv().await {
                match gone {
                    Some(key) => cache.give_up(&key),
                    // The store holds the list by now (the reflector applies an event before
                    // passing it on).
                    None => {
                        let present: std::collections::HashSet<String> = locks
                            .state()
                            .iter()
                            .map(|l| crate::api::lock_key(l))
                            .collect();
                        for key in cache.interest.keys() {
                            if !present.contains(&key) {
                                cache.give_up(&key);
                            }
                        }
                    }
                }
            }
        }
    });
    background.spawn(report_undecodable_locks(ctx.clone(), undecodable_rx));
    background.spawn(sharding.clone().membership_loop());
    background.spawn(sharding.clone().watch_members());
    // A lock about to be handed off has its Lease renewed first (if a quarter of it has
    // passed). Weak: the hook lives in `sharding`, which the lane's context holds.
    sharding.before_handoff({
        let lane = Arc::downgrade(&renewal_lane);
        Box::new(move |lock| {
            let lane = lane.clone();
            Box::pin(async move {
                match lane.upgrade() {
                    Some(lane) => crate::renew::before_handoff(&lane, &lock).await,
                    None => true,
                }
            })
        })
    });
    background.spawn(crate::renew::run(
        renewal_lane,
        renew_inbox,
        to_reconcile_tx,
    ));
    background.spawn({
        let (scope, client) = (scope.clone(), client.clone());
        async move { scope.follow(client).await }
    });
    background.spawn({
        let limits = limits.clone();
        async move {
            loop {
                tokio::time::sleep(Duration::from_secs(60)).await;
                limits.forget_idle();
            }
        }
    });
    // Handoffs whose answer was lost are resolved, and locks gained or lost noticed, on their
    // own schedule, not only when an assignment pass starts: a pass busy with a batch of
    // handoffs (each waits for the lock's writes in flight) took many seconds, and neither the
    // lock of an unresolved handoff nor one handed to this replica meanwhile got a renewal
    // until then.
    // Gains are noticed until the replica is gone, through its leave too: a lock handed to it
    // by a peer that has not seen it leaving needs its renewals until the leave hands it on.
    let (_noticing, until_gone) = tokio::sync::watch::channel(false);
    background.spawn({
        let (sharding, locks, scope) = (sharding.clone(), locks.clone(), scope.clone());
        every(Duration::from_millis(250), until_gone, move || {
            let (sharding, locks, scope) = (sharding.clone(), locks.clone(), scope.clone());
            async move {
                sharding.notice_ownership(&locks, &scope);
                sharding.resolve_unknown_handoffs().await;
            }
        })
    });
    background.spawn({
        let (sharding, locks, scope) = (sharding.clone(), locks.clone(), scope.clone());
        every(Duration::from_millis(300), stop_rx.clone(), move || {
            let (sharding, locks, scope) = (sharding.clone(), locks.clone(), scope.clone());
            async move { sharding.assign(&locks, &scope).await }
        })
    });
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
    let learned = pods.learned();
    // The pod and Lease watches start once the lock watch has listed: the locks labelled for
    // this replica then are its own, and from their first list on the caches keep only their
    // Leases and pods (see cache::interest; locks gained later are read when gained).
    let (settled_tx, settled) = tokio::sync::watch::channel(false);
    background.spawn({
        let (cache, synced, locks) = (ctx.cache.clone(), synced.clone(), locks.clone());
        let id = ctx.identity.clone();
        async move {
            synced.locks_listed().await;
            let state = locks.state();
            let own: Vec<&StatefulSetLock> = state
                .iter()
                .filter(|l| l.labels().get(crate::api::SHARD_LABEL) == Some(&id))
                .map(|l| l.as_ref())
                .collect();
            tracing::info!(
                shard = %id,
                owned = own.len(),
                "lock watch listed: keeping the Leases and pods of this replica's own locks"
            );
            cache.settle(own);
            let _ = settled_tx.send(true);
        }
    });
    let controller = controller
        .with_config(kube::runtime::controller::Config::default().concurrency(args.concurrency))
        .trigger_backoff(watch::NoTriggerBackoff)
        .reconcile_on(after_settling(
            settled.clone(),
            watch::pod_triggers(
                client.clone(),
                pods,
                lock_index.clone(),
                undecodable.clone(),
            ),
        ))
        .reconcile_on(set_triggers)
        .reconcile_on(watch::learned_triggers(learned, lock_index.clone()))
        .reconcile_on(after_settling(
            settled,
            watch::lease_triggers_synced(
                client.clone(),
                leases,
                interest,
                synced.leases.clone(),
                undecodable.clone(),
            ),
        ))
        .reconcile_on(crate::renew::to_reconcile(to_reconcile_rx))
        .graceful_shutdown_on({
            let mut stop = stop_rx.clone();
            async move {
                let _ = stop.wait_for(|s| *s).await;
            }
        });
    tracing::info!(shard = %args.identity(), "stslock operator started");
    // On a task of its own, aborted when this future is dropped: kube-runtime lets running
    // reconciles finish after a graceful shutdown, which dropping the shutdown channel starts —
    // a killed replica's plan in flight went on writing with the permits of a sharding state
    // nothing updated any more, after its restarted successor had decided the lock afresh.
    let mut reconciling = AbortOnDrop(tokio::spawn(
        controller
            .run(traced_reconcile, error_policy, ctx)
            .for_each(|res| async move {
                match res {
                    Ok((obj, _)) => tracing::trace!(lock = %obj, "reconciled"),
                    Err(e) => tracing::debug!(error = %e, "reconcile"),
                }
            }),
    ));
    // After the stop, the reconciles running get a bounded time to end: a stop must finish
    // (a pod has a termination grace period, a rolling update waits for it). With handoffs the
    // leave begins at once, beside them: each handoff marks its lock draining and waits for
    // the lock's writes in flight, and a running reconcile sends no write for a draining lock.
    // Waiting for them first kept every lock of the replica unhandled for up to that grace
    // (seconds under API faults) while peers had already taken it off the ring. One still
    // running once the leave is over is ended: the fence is closed by then.
    let mut stop = stop_rx.clone();
    let mut ended = false;
    tokio::select! {
        _ = &mut reconciling.0 => ended = true,
        stopped = async { stop.wait_for(|s| *s).await.is_ok() } => {
            if !stopped {
                let _ = (&mut reconciling.0).await;
                ended = true;
            }
        }
    }
    let grace = args.api_timeout() * STOP_GRACE_API_TIMEOUTS;
    let wind_down = async {
        if !ended
            && tokio::time::timeout(grace, &mut reconciling.0)
                .await
                .is_err()
        {
            tracing::warn!(
                shard = %args.identity(),
                ?grace,
                "reconciles still running after the stop (each lock's writes in flight are waited for before its handoff)"
            );
        }
        tracing::info!(shard = %args.identity(), "reconciles stopped");
    };
    match args.leave {
        crate::config::LeaveStrategy::Handoff => {
            tokio::join!(wind_down, sharding.leave(&locks));
        }
        crate::config::LeaveStrategy::Keep => {
            wind_down.await;
            tracing::info!("keeping this replica's locks for a replacement with the same id")
        }
    }
    drop(reconciling);
    drop(background);
    tracing::info!("stslock operator stopped");
    Ok(())
}

/// A task aborted when its handle is dropped.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// `stream`, started once the caches have settled (`settled` says true).
fn after_settling<S: futures::Stream + Send + 'static>(
    mut settled: tokio::sync::watch::Receiver<bool>,
    stream: S,
) -> impl futures::Stream<Item = S::Item> + Send + 'static {
    futures::stream::once(async move {
        // A closed sender (the replica stopping) starts it anyway; nothing consumes it then.
        let _ = settled.wait_for(|s| *s).await;
        stream
    })
    .flatten()
}

/// Run `f` to completion, then wait `period` (or until `stop` changes, which ends the loop).
async fn every<F, Fut>(period: Duration, mut stop: tokio::sync::watch::Receiver<bool>, f: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    loop {
        f().await;
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = stop.changed() => return,
        }
    }
}
