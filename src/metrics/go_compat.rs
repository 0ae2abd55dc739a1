//! The Go operator's metrics, `statefulsetlock_*`, with its names, types and labels, so the
//! dashboards and alerts written for it keep working after a migration (DESIGN §10). Every
//! series is per lock, so they are exported only with `--go-metrics` (cardinality), and a lock
//! a replica gives up (handed off, deleted) has its gauges removed there.
//!
//! Meanings, where ours differ from the Go operator's:
//! - `leader_elections_total{reason}`: every writer change, `reason` = election, failover,
//!   switchover, epoch_repair or adoption;
//! - `leader_election_duration_seconds`: from a writer change's first write to its last;
//! - `lease_expiration_seconds`: seconds until expiry as of the last renewal or reconcile of
//!   the lock (a renewal sets it to the full duration).

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// The Go operator's buckets (client_golang's DefBuckets).
const DEF_BUCKETS: [f64; 11] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

fn histogram() -> Histogram {
    Histogram::new(DEF_BUCKETS)
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ElectionLabels {
    namespace: String,
    statefulsetlock: String,
    statefulset: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SetLabels {
    namespace: String,
    statefulsetlock: String,
    statefulset: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LeaseLabels {
    namespace: String,
    statefulsetlock: String,
    lease_name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LockLabels {
    namespace: String,
    statefulsetlock: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    namespace: String,
    statefulsetlock: String,
    error_type: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LeaderLabels {
    namespace: String,
    statefulsetlock: String,
    statefulset: String,
    leader_pod: String,
}

/// One lock as the Go metrics label it.
#[derive(Clone, Debug, Default)]
pub struct LockId {
    pub namespace: String,
    pub name: String,
    pub statefulset: String,
    pub lease_name: String,
}

impl LockId {
    pub fn of(lock: &crate::api::StatefulSetLock) -> LockId {
        use kube::ResourceExt;
        LockId {
            namespace: lock.namespace().unwrap_or_default(),
            name: lock.name_any(),
            statefulset: lock.spec.stateful_set_name.clone(),
            lease_name: lock.spec.lease_name.clone(),
        }
    }

    fn lock(&self) -> LockLabels {
        LockLabels {
            namespace: self.namespace.clone(),
            statefulsetlock: self.name.clone(),
        }
    }
    fn set(&self) -> SetLabels {
        SetLabels {
            namespace: self.namespace.clone(),
            statefulsetlock: self.name.clone(),
            statefulset: self.statefulset.clone(),
        }
    }
    fn lease(&self) -> LeaseLabels {
        LeaseLabels {
            namespace: self.namespace.clone(),
            statefulsetlock: self.name.clone(),
            lease_name: self.lease_name.clone(),
        }
    }
}

type Hist = Family<SetLabels, Histogram, fn() -> Histogram>;
type LockHist = Family<LockLabels, Histogram, fn() -> Histogram>;
type LeaseHist = Family<LeaseLabels, Histogram, fn() -> Histogram>;

pub struct GoMetrics {
    registry: Registry,
    elections: Family<ElectionLabels, Counter>,
    election_duration: Hist,
    renewals: Family<LeaseLabels, Counter>,
    renewal_duration: LeaseHist,
    errors: Family<ErrorLabels, Counter>,
    reconcile_duration: LockHist,
    leader: Family<LeaderLabels, Gauge>,
    labeling_errors: Family<LockLabels, Counter>,
    ready_pods: Family<SetLabels, Gauge>,
    lease_expiration: Family<LeaseLabels, Gauge<f64, AtomicU64>>,
    /// lock key → what its gauges are labelled with now (to remove them when it goes).
    gauges: dashmap::DashMap<String, (LockId, Option<String>)>,
}

impl std::fmt::Debug for GoMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GoMetrics").finish_non_exhaustive()
    }
}

impl GoMetrics {
    pub fn new() -> GoMetrics {
        let m = GoMetrics {
            registry: Registry::default(),
            elections: Family::default(),
            election_duration: Family::new_with_constructor(histogram),
            renewals: Family::default(),
            renewal_duration: Family::new_with_constructor(histogram),
            errors: Family::default(),
            reconcile_duration: Family::new_with_constructor(histogram),
            leader: Family::default(),
            labeling_errors: Family::default(),
            ready_pods: Family::default(),
            lease_expiration: Family::default(),
            gauges: dashmap::DashMap::default(),
        };
        let mut r = Registry::with_prefix("statefulsetlock");
        r.register(
            "leader_elections",
            "Total number of leader elections performed",
            m.elections.clone(),
        );
        r.register(
            "leader_election_duration_seconds",
            "Time taken for leader election operations",
            m.election_duration.clone(),
        );
        r.register(
            "lease_renewals",
            "Total number of lease renewals performed",
            m.renewals.clone(),
        );
        r.register(
            "lease_renewal_duration_seconds",
            "Time taken for lease renewal operations",
            m.renewal_duration.clone(),
        );
        r.register(
            "reconciliation_errors",
            "Total number of reconciliation errors",
            m.errors.clone(),
        );
        r.register(
            "reconciliation_duration_seconds",
            "Time taken for reconciliation operations",
            m.reconcile_duration.clone(),
        );
        r.register(
            "current_leader_info",
            "Information about the current leader (1 if leader exists, 0 otherwise)",
            m.leader.clone(),
        );
        r.register(
            "pod_labeling_errors",
            "Total number of pod labeling errors",
            m.labeling_errors.clone(),
        );
        r.register(
            "ready_pods",
            "Number of ready pods in the StatefulSet",
            m.ready_pods.clone(),
        );
        r.register(
            "lease_expiration_seconds",
            "Seconds until lease expiration (negative if expired)",
            m.lease_expiration.clone(),
        );
        GoMetrics { registry: r, ..m }
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    pub fn reconciled(&self, id: &LockId, elapsed: Duration, error_type: Option<&str>) {
        self.reconcile_duration
            .get_or_create(&id.lock())
            .observe(elapsed.as_secs_f64());
        if let Some(e) = error_type {
            self.errors
                .get_or_create(&ErrorLabels {
                    namespace: id.namespace.clone(),
                    statefulsetlock: id.name.clone(),
                    error_type: e.to_string(),
                })
                .inc();
        }
    }

    pub fn pod_labeling_error(&self, id: &LockId) {
        self.labeling_errors.get_or_create(&id.lock()).inc();
    }

    pub fn election(&self, id: &LockId, reason: &str, took: Duration) {
        self.elections
            .get_or_create(&ElectionLabels {
                namespace: id.namespace.clone(),
                statefulsetlock: id.name.clone(),
                statefulset: id.statefulset.clone(),
                reason: reason.to_string(),
            })
            .inc();
        self.election_duration
            .get_or_create(&id.set())
            .observe(took.as_secs_f64());
    }

    pub fn renewal(&self, id: &LockId, took: Duration, duration_seconds: f64) {
        self.renewals.get_or_create(&id.lease()).inc();
        self.renewal_duration
            .get_or_create(&id.lease())
            .observe(took.as_secs_f64());
        self.lease_expiration
            .get_or_create(&id.lease())
            .set(duration_seconds);
        self.remember(id, None, false);
    }

    /// The state a reconcile left: writer (if any), Ready pods, seconds until the Lease expires.
    pub fn state(
        &self,
        id: &LockId,
        leader: Option<&str>,
        ready_pods: i64,
        expires_in: Option<f64>,
    ) {
        self.ready_pods.get_or_create(&id.set()).set(ready_pods);
        if let Some(s) = expires_in {
            self.lease_expiration.get_or_create(&id.lease()).set(s);
        }
        self.remember(id, leader.map(str::to_string), true);
    }

    /// Keep what `id`'s gauges are labelled with; with `leader_known`, move the leader series.
    fn remember(&self, id: &LockId, leader: Option<String>, leader_known: bool) {
        let key = format!("{}/{}", id.namespace, id.name);
        // The entry's shard stays locked while the leader series moves: two reconciles of
        // one lock cannot interleave here.
        let mut entry = self.gauges.entry(key).or_insert_with(|| (id.clone(), None));
        if leader_known && entry.1 != leader {
            if let Some(old) = entry.1.take() {
                self.leader.remove(&leader_labels(&entry.0, &old));
            }
            if let Some(new) = &leader {
                self.leader.get_or_create(&leader_labels(id, new)).set(1);
            }
            entry.1 = leader;
        }
        entry.0 = id.clone();
    }

    /// The lock is no longer this replica's: its gauges go (the new owner exports them).
    pub fn forget(&self, key: &str) {
        if let Some((_, (id, leader))) = self.gauges.remove(key) {
            if let Some(l) = leader {
                self.leader.remove(&leader_labels(&id, &l));
            }
            self.ready_pods.remove(&id.set());
            self.lease_expiration.remove(&id.lease());
        }
    }
}

fn leader_labels(id: &LockId, leader: &str) -> LeaderLabels {
    LeaderLabels {
        namespace: id.namespace.clone(),
        statefulsetlock: id.name.clone(),
        statefulset: id.statefulset.clone(),
        leader_pod: leader.to_string(),
    }
}

impl Default for GoMetrics {
    fn default() -> Self {
        GoMetrics::new()
    }
}
