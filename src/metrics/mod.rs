//! Prometheus metrics of one operator replica (DESIGN §6), all prefixed `stslock_`.
//!
//! One [`Metrics`] per replica, held in the reconciler's `Context`: several replicas share a
//! process in tests and `stslock dev`, so there is no global registry. This module owns the
//! names, the buckets and what counts as a renewal, a failover or a writer-less lock; the
//! facts come from the reconciler (the observed state and the plan it applied). It never
//! makes API calls and never decides anything.
//!
//! API calls are counted by [`crate::call::call`], with the handle each lane passes it.

pub mod go_compat;

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use jiff::Timestamp;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::elect::{Observed, Plan, Role, Step, Transition};
use crate::error::Error;

/// Failovers take milliseconds when the operator reacts to a NotReady writer at once, and up
/// to `failoverDelaySeconds` (or a Lease duration) when it must wait.
const FAILOVER_BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];
/// A renewal is due at half the Lease duration; lateness beyond the other half is a lapse.
const LATENESS_BUCKETS: [f64; 12] = [
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 15.0,
];
const RECONCILE_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ShardLabel {
    shard: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NamespaceLabel {
    namespace: String,
}

/// Per-namespace series, only with `--namespace-metrics`: one series per tenant namespace.
struct NamespaceMetrics {
    failovers: Family<NamespaceLabel, Counter>,
    writerless_locks: Family<NamespaceLabel, Gauge>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ApiLabels {
    verb: String,
    resource: String,
    code: String,
}

/// The metrics of one operator replica.
pub struct Metrics {
    shard: String,
    registry: Registry,
    reconciles: Counter,
    reconcile_errors: Family<KindLabel, Counter>,
    reconcile_duration: Histogram,
    reconciles_in_flight: Gauge,
    lease_renewals: Counter,
    lease_renewal_lateness: Histogram,
    lease_lapses: Counter,
    writer_changes: Family<KindLabel, Counter>,
    failover_duration: Histogram,
    writerless_seconds: Counter<f64, AtomicU64>,
    writerless_locks: Gauge,
    dual_writer_detections: Counter,
    undecodable_objects: Family<KindLabel, Counter>,
    owned_locks: Family<ShardLabel, Gauge>,
    cached_objects: Family<KindLabel, Gauge>,
    ring_members: Gauge,
    shard_ready: Gauge,
    handoffs: Counter,
    api_requests: Family<ApiLabels, Counter>,
    rate_limit_waits: Counter,
    rate_limit_wait_seconds: Counter<f64, AtomicU64>,
    /// Locks of this replica without a Ready writer, since when (wall clock, like the pods'
    /// Ready transitions the failover duration is measured from).
    writerless: dashmap::DashMap<String, Timestamp>,
    namespaces: Option<NamespaceMetrics>,
    /// The Go operator's `statefulsetlock_*` series (`--go-metrics`).
    go: Option<go_compat::GoMetrics>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics")
            .field("shard", &self.shard)
            .finish_non_exhaustive()
    }
}

impl Metrics {
    pub fn new(shard: &str) -> Metrics {
        Metrics::new_with(shard, false)
    }

    /// With `per_namespace`, also failovers and writer-less locks by namespace (cardinality:
    /// one series per namespace with locks, so it is a flag).
    pub fn new_with(shard: &str, per_namespace: bool) -> Metrics {
        let mut registry = Registry::with_prefix("stslock");
        let m = Metrics {
            shard: shard.to_string(),
            reconciles: Counter::default(),
            reconcile_errors: Family::default(),
            reconcile_duration: Histogram::new(RECONCILE_BUCKETS),
            reconciles_in_flight: Gauge::default(),
            lease_renewals: Counter::default(),
            lease_renewal_lateness: Histogram::new(LATENESS_BUCKETS),
            lease_lapses: Counter::default(),
            writer_changes: Family::default(),
            failover_duration: Histogram::new(FAILOVER_BUCKETS),
            writerless_seconds: Counter::default(),
            writerless_locks: Gauge::default(),
            dual_writer_detections: Counter::default(),
            undecodable_objects: Family::default(),
            owned_locks: Family::default(),
            cached_objects: Family::default(),
            ring_members: Gauge::default(),
            shard_ready: Gauge::default(),
            handoffs: Counter::default(),
            api_requests: Family::default(),
            rate_limit_waits: Counter::default(),
            rate_limit_wait_seconds: Counter::default(),
            writerless: dashmap::DashMap::default(),
            namespaces: per_namespace.then(|| NamespaceMetrics {
                failovers: Family::default(),
                writerless_locks: Family::default(),
            }),
            go: None,
            registry: Registry::default(),
        };
        let r = &mut registry;
        r.register(
            "reconciles",
            "Reconciles of locks this replica owns",
            m.reconciles.clone(),
        );
        r.register(
            "reconcile_errors",
            "Failed reconciles by error kind",
            m.reconcile_errors.clone(),
        );
        r.register(
            "reconcile_duration_seconds",
            "Duration of one reconcile (gather, decide, apply)",
            m.reconcile_duration.clone(),
        );
        r.register(
            "reconciles_in_flight",
            "Reconciles running right now",
            m.reconciles_in_flight.clone(),
        );
        r.register(
            "lease_renewals",
            "Writer Lease renewals for the same holder",
            m.lease_renewals.clone(),
        );
        r.register(
            "lease_renewal_lateness_seconds",
            "How long after it was due (half the Lease duration after the last renew) a renewal was made",
            m.lease_renewal_lateness.clone(),
        );
        r.register(
            "lease_lapses",
            "Renewals made after the writer Lease had already expired",
            m.lease_lapses.clone(),
        );
        r.register(
            "writer_changes",
            "Writer changes by kind (election, failover, switchover)",
            m.writer_changes.clone(),
        );
        r.register(
            "failover_duration_seconds",
            "From the writer going NotReady (or, for a writer that is gone, the Lease takeover) to the new writer labelled",
            m.failover_duration.clone(),
        );
        r.register(
            "writerless_seconds",
            "Seconds locks of this replica spent without a Ready labelled writer",
            m.writerless_seconds.clone(),
        );
        r.register(
            "writerless_locks",
            "Locks of this replica whose last reconcile left them without a Ready writer",
            m.writerless_locks.clone(),
        );
        r.register(
            "dual_writer_detections",
            "Reconciles that observed two pods labelled writer in one StatefulSet (must stay 0)",
            m.dual_writer_detections.clone(),
        );
        r.register(
            "undecodable_objects",
            "Object versions (by kind) that could not be decoded and were skipped by the watches",
            m.undecodable_objects.clone(),
        );
        r.register(
            "owned_locks",
            "Locks whose shard label names this replica",
            m.owned_locks.clone(),
        );
        r.register(
            "cached_objects",
            "Objects in this replica's caches by kind: locks and StatefulSets of its scope, pods and Leases of its own locks only",
            m.cached_objects.clone(),
        );
        r.register(
            "ring_members",
            "Live members of the shard ring as this replica sees it",
            m.ring_members.clone(),
        );
        r.register(
            "shard_ready",
            "1 when this replica's caches have synced and its membership Lease is held",
            m.shard_ready.clone(),
        );
        r.register(
            "handoffs",
            "Locks this replica handed to another shard",
            m.handoffs.clone(),
        );
        r.register(
            "api_requests",
            "API requests by verb, resource and response code",
            m.api_requests.clone(),
        );
        r.register(
            "rate_limit_waits",
            "API requests that waited for the client-side rate limiter",
            m.rate_limit_waits.clone(),
        );
        r.register(
            "rate_limit_wait_seconds",
            "Seconds spent waiting for the client-side rate limiter",
            m.rate_limit_wait_seconds.clone(),
        );
        if let Some(ns) = &m.namespaces {
            r.register(
                "namespace_failovers",
                "Failovers by namespace (--namespace-metrics)",
                ns.failovers.clone(),
            );
            r.register(
                "namespace_writerless_locks",
                "Locks of this replica without a Ready writer, by namespace (--namespace-metrics)",
                ns.writerless_locks.clone(),
            );
        }
        // Series that exist from the start read 0 rather than missing, so rates and alerts
        // see them before the first event.
        for kind in crate::error::ErrorKind::ALL {
            let _ = m.reconcile_errors.get_or_create(&KindLabel {
                kind: kind.label().into(),
            });
        }
        for kind in crate::elect::TransitionKind::ALL {
            let _ = m.writer_changes.get_or_create(&KindLabel {
                kind: kind.as_str().into(),
            });
        }
        let _ = m.owned_locks.get_or_create(&ShardLabel {
            shard: m.shard.clone(),
        });
        Metrics { registry, ..m }
    }

    /// Also export the Go operator's per-lock `statefulsetlock_*` metrics (`--go-metrics`).
    pub fn with_go_metrics(mut self, on: bool) -> Metrics {
        self.go = on.then(go_compat::GoMetrics::new);
        self
    }

    /// The Go operator's metrics, when exported.
    pub fn go(&self) -> Option<&go_compat::GoMetrics> {
        self.go.as_ref()
    }

    pub fn shard(&self) -> &str {
        &self.shard
    }

    /// The Prometheus (OpenMetrics) text exposition.
    pub fn render(&self) -> Result<String, std::fmt::Error> {
        use prometheus_client::encoding::text::{encode_eof, encode_registry};
        let mut out = String::new();
        encode_registry(&mut out, &self.registry)?;
        if let Some(go) = &self.go {
            encode_registry(&mut out, go.registry())?;
        }
        encode_eof(&mut out)?;
        Ok(out)
    }

    /// Mark a reconcile in flight until the guard drops.
    pub fn reconcile_started(&self) -> InFlightReconcile {
        self.reconciles_in_flight.inc();
        InFlightReconcile(self.reconciles_in_flight.clone())
    }

    pub fn reconcile_finished(&self, elapsed: Duration, error: Option<&Error>) {
        self.reconciles.inc();
        self.reconcile_duration.observe(elapsed.as_secs_f64());
        if let Some(e) = error {
            self.reconcile_errors
                .get_or_create(&KindLabel {
                    kind: e.metric_label().into(),
                })
                .inc();
        }
    }

    /// A watched object that could not be decoded was skipped.
    pub fn undecodable(&self, kind: &str) {
        self.undecodable_objects
            .get_or_create(&KindLabel { kind: kind.into() })
            .inc();
    }

    /// What a reconcile saw, before it acted: two writers in one StatefulSet is the one
    /// thing election exists to prevent.
    pub fn observed(&self, o: &Observed) {
        if writers(o) > 1 {
            self.dual_writer_detections.inc();
            tracing::error!(lock = %o.key(), "two pods labelled writer in one StatefulSet");
        }
    }

    /// A plan's steps were all written: count renewals, writer changes and writer-less time.
    /// `started` is when its first write (the Lease) was made, `applied` when its last one
    /// (the new writer's label) returned; `old_writer_lost` is when this replica saw the old
    /// writer turn NotReady, if it did (see [`failover_started_at`]).
    pub fn applied(
        &self,
        o: &Observed,
        plan: &Plan,
        started: Timestamp,
        applied: Timestamp,
        old_writer_lost: Option<Timestamp>,
    ) {
        if let Some(r) = renewal(o, plan, started) {
            self.lease_renewals.inc();
            self.lease_renewal_lateness
                .observe(r.lateness.as_secs_f64());
            if r.lapsed {
                self.lease_lapses.inc();
            }
        }
        if let Some(go) = &self.go {
            let id = go_id(o);
            if renewal(o, plan, started).is_some() {
                go.renewal(
                    &id,
                    Duration::try_from(applied.duration_since(started)).unwrap_or_default(),
                    o.lease_duration_seconds as f64,
                );
            }
            if let Some(t) = &plan.transition {
                go.election(
                    &id,
                    t.kind.as_str(),
                    Duration::try_from(applied.duration_since(started)).unwrap_or_default(),
                );
            }
            let status = plan.status.as_ref().unwrap_or(&o.status);
            // A plan that wrote the Lease renewed it in full; else as observed.
            let wrote_lease = plan
                .steps
                .iter()
                .any(|s| matches!(s, Step::CreateLease { .. } | Step::UpdateLease { .. }));
            let expires_in = if wrote_lease {
                Some(o.lease_duration_seconds as f64)
            } else {
                o.lease.as_ref().and_then(|l| {
                    let t = l.renew_time?;
                    Some(t.duration_since(applied).as_secs_f64() + l.duration_seconds as f64)
                })
            };
            go.state(
                &id,
                status.writer_pod.as_deref(),
                o.pods.iter().filter(|p| p.ready).count() as i64,
                expires_in,
            );
        }
        let key = o.key();
        let mut failover_gap = None;
        if let Some(t) = &plan.transition {
            self.writer_changes
                .get_or_create(&KindLabel {
                    kind: t.kind.as_str().into(),
                })
                .inc();
            if let Some(lost) = failover_started_at(o, t, started, old_writer_lost) {
                let gap = seconds_between(lost, applied);
                self.failover_duration.observe(gap);
                failover_gap = Some(gap);
                if let Some(ns) = &self.namespaces {
                    ns.failovers
                        .get_or_create(&NamespaceLabel {
                            namespace: o.namespace.clone(),
                        })
                        .inc();
                }
            }
        }
        match writerless(o, plan) {
            Some(true) => {
                if let dashmap::Entry::Vacant(v) = self.writerless.entry(key) {
                    v.insert(started);
                    self.count_writerless(&o.namespace, 1);
                }
            }
            Some(false) | None => {
                let since = self.writerless.remove(&key).map(|(_, t)| t);
                if since.is_some() {
                    self.count_writerless(&o.namespace, -1);
                }
                // A failover's gap already covers the time since the writer was lost (it
                // starts no later than this lock entered the writer-less set).
                match (failover_gap, since) {
                    (Some(gap), _) => self.writerless_seconds.inc_by(gap),
                    (None, Some(since)) => self
                        .writerless_seconds
                        .inc_by(seconds_between(since, applied)),
                    (None, None) => 0.0,
                };
            }
        }
    }

    /// A lock of `namespace` entered (+1) or left (-1) the writer-less set.
    fn count_writerless(&self, namespace: &str, delta: i64) {
        self.writerless_locks.inc_by(delta);
        if let Some(ns) = &self.namespaces {
            ns.writerless_locks
                .get_or_create(&NamespaceLabel {
                    namespace: namespace.to_string(),
                })
                .inc_by(delta);
        }
    }

    /// The lock is no longer this replica's (handed off, deleted): stop tracking it.
    pub fn forget_lock(&self, key: &str) {
        if let Some(go) = &self.go {
            go.forget(key);
        }
        if self.writerless.remove(key).is_some() {
            self.count_writerless(key.split_once('/').map_or("", |(ns, _)| ns), -1);
        }
    }

    /// One API call finished (see [`crate::call`]).
    pub fn api_request(&self, verb: &str, resource: &str, code: &str) {
        self.api_requests
            .get_or_create(&ApiLabels {
                verb: verb.into(),
                resource: resource.into(),
                code: code.into(),
            })
            .inc();
    }

    /// A renewal made by the renewal lane, `lateness` after it was due.
    pub fn lane_renewal(&self, lateness: Duration) {
        self.lease_renewals.inc();
        self.lease_renewal_lateness.observe(lateness.as_secs_f64());
    }

    pub fn handoff(&self) {
        self.handoffs.inc();
    }

    /// A request waited `waited` for the client-side rate limiter.
    pub fn rate_limit_wait(&self, waited: Duration) {
        self.rate_limit_waits.inc();
        self.rate_limit_wait_seconds.inc_by(waited.as_secs_f64());
    }

    /// The shard's state, refreshed before each scrape.
    pub fn shard_state(&self, owned_locks: usize, ring_members: usize, ready: bool) {
        self.owned_locks
            .get_or_create(&ShardLabel {
                shard: self.shard.clone(),
            })
            .set(owned_locks as i64);
        self.ring_members.set(ring_members as i64);
        self.shard_ready.set(i64::from(ready));
    }

    /// How many objects of `kind` the caches hold, refreshed before each scrape.
    pub fn cached(&self, kind: &str, n: usize) {
        self.cached_objects
            .get_or_create(&KindLabel { kind: kind.into() })
            .set(n as i64);
    }
}

/// Decrements the in-flight gauge when a reconcile ends, however it ends.
pub struct InFlightReconcile(Gauge);

impl Drop for InFlightReconcile {
    fn drop(&mut self) {
        self.0.dec();
    }
}

fn seconds_between(from: Timestamp, to: Timestamp) -> f64 {
    to.duration_since(from).as_secs_f64().max(0.0)
}

/// Pods labelled writer in the lock's StatefulSet.
/// How the Go operator's metrics name `o`.
pub fn go_id(o: &Observed) -> go_compat::LockId {
    go_compat::LockId {
        namespace: o.namespace.clone(),
        name: o.name.clone(),
        statefulset: o.statefulset_name.clone(),
        lease_name: o.lease_name.clone(),
    }
}

pub fn writers(o: &Observed) -> usize {
    o.pods
        .iter()
        .filter(|p| p.role == Some(Role::Writer))
        .count()
}

/// When the writer a failover replaced was lost. For a NotReady writer: when this replica's
/// pod watch saw it turn NotReady (`seen_not_ready`), else its Ready condition's
/// lastTransitionTime (second precision, so up to a second early; used when the replica
/// started or took the lock over after the transition). For a writer that is gone (deleted,
/// recreated, terminating): `decided`, the moment of the Lease takeover, as nothing better is
/// known. None for elections and switchovers.
pub fn failover_started_at(
    o: &Observed,
    t: &Transition,
    decided: Timestamp,
    seen_not_ready: Option<Timestamp>,
) -> Option<Timestamp> {
    if t.kind != crate::elect::TransitionKind::Failover {
        return None;
    }
    let old = t
        .old_writer
        .as_deref()
        .and_then(|name| o.pods.iter().find(|p| p.name == name));
    Some(match old {
        Some(p) if !p.ready && !p.terminating => seen_not_ready
            .or(p.ready_since)
            .unwrap_or(decided)
            .min(decided),
        _ => decided,
    })
}

/// A renewal of the writer Lease for the same holder.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Renewal {
    /// How long after it was due (half the duration after the last renew) it was made.
    pub lateness: Duration,
    /// The Lease had expired before this renewal.
    pub lapsed: bool,
}

/// The plan's renewal, if it renews the Lease for its current holder.
pub fn renewal(o: &Observed, plan: &Plan, decided: Timestamp) -> Option<Renewal> {
    if plan.transition.is_some() {
        return None;
    }
    let lease = o.lease.as_ref()?;
    let (holder, acquire) = plan.steps.iter().find_map(|s| match s {
        Step::UpdateLease {
            holder, acquire, ..
        } => Some((holder, *acquire)),
        _ => None,
    })?;
    if lease.holder.as_deref() != Some(holder.as_str()) {
        return None;
    }
    let last = lease.renew_time.or(lease.acquire_time)?;
    let due = last
        .checked_add(jiff::SignedDuration::from_millis(
            lease.duration_seconds.max(1) * 500,
        ))
        .ok()?;
    let late = decided.duration_since(due);
    Some(Renewal {
        lateness: if late.is_negative() {
            Duration::ZERO
        } else {
            late.unsigned_abs()
        },
        lapsed: acquire,
    })
}

/// Does the lock lack a Ready writer after this plan? None when the question does not apply:
/// a lock being deleted, paused, whose StatefulSet is scaled to zero (or missing), or that
/// never had a writer (before the first election, waiting for pods is the usual start, as
/// election itself judges it).
pub fn writerless(o: &Observed, plan: &Plan) -> Option<bool> {
    if o.deleting || o.paused || o.replicas.unwrap_or(0) == 0 {
        return None;
    }
    if o.lease.is_none() && o.status.writer_pod.is_none() && plan.transition.is_none() {
        return None;
    }
    let writer = match &plan.transition {
        Some(t) => Some(t.new_writer.as_str()),
        None => plan
            .status
            .as_ref()
            .unwrap_or(&o.status)
            .writer_pod
            .as_deref(),
    };
    let ready = writer
        .and_then(|w| o.pods.iter().find(|p| p.name == w))
        .is_some_and(|p| p.ready && !p.terminating);
    Some(!ready)
}

#[cfg(test)]
mod tests;
