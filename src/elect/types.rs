//! The plain data [`super::decide`] works on.

use std::time::Duration;

use jiff::Timestamp;

use crate::api::StatefulSetLockStatus;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Writer,
    Reader,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Writer => "writer",
            Role::Reader => "reader",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "writer" => Some(Role::Writer),
            "reader" => Some(Role::Reader),
            _ => None,
        }
    }
}

/// A pod of the lock's StatefulSet, as election sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub name: String,
    pub uid: String,
    pub ordinal: Option<u32>,
    pub ready: bool,
    /// When the Ready condition last changed (NotReady since, for a NotReady pod).
    pub ready_since: Option<Timestamp>,
    pub terminating: bool,
    /// The role label's value (None when absent; any other value is treated as absent).
    pub role: Option<Role>,
    pub epoch: Option<i64>,
    /// The pod's resourceVersion as observed (0: unknown). A promotion is a compare-and-swap
    /// on it: a pod that changed since — a demotion's fencing write above all — is not
    /// promoted by a plan made from the older view, however late its write is applied.
    pub resource_version: u64,
}

/// The writer Lease as observed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseView {
    pub holder: Option<String>,
    pub holder_uid: Option<String>,
    /// `leaseTransitions`: the fencing epoch.
    pub transitions: i64,
    pub renew_time: Option<Timestamp>,
    pub acquire_time: Option<Timestamp>,
    pub duration_seconds: i64,
    pub resource_version: String,
    /// The lock (`namespace/name`) that created the Lease, from its annotation.
    pub owner: Option<String>,
    /// The Lease carries no label, no annotation and no owner reference at all: the way the
    /// Go operator leaves its Leases (DESIGN §10), so it may be adopted. A Lease anything else
    /// has marked is someone's and is never written.
    pub unmarked: bool,
    /// The `renewTime` stslock last wrote, from [`crate::api::RENEWED_ANNOTATION`] (None when
    /// absent: a Lease from before that annotation, or not ours).
    pub renewed_mark: Option<Timestamp>,
}

impl LeaseView {
    /// Renewed by someone other than stslock since stslock last wrote it.
    pub fn renewed_elsewhere(&self) -> bool {
        self.renewed_mark.is_some() && self.renewed_mark != self.renew_time
    }

    /// When the Lease expires: its last renewal (or, never renewed, its acquisition) plus its
    /// duration. None: neither time is set (or out of range), which counts as expired.
    pub fn expiry(&self) -> Option<Timestamp> {
        self.renew_time
            .or(self.acquire_time)?
            .checked_add(jiff::SignedDuration::from_secs(self.duration_seconds))
            .ok()
    }
}

/// Another lock in the same namespace, for conflict detection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rival {
    pub name: String,
    pub created: Timestamp,
    pub statefulset: String,
    pub lease_name: String,
}

/// Everything [`super::decide`] needs to know.
#[derive(Debug, Clone, PartialEq)]
pub struct Observed {
    pub namespace: String,
    pub name: String,
    pub created: Timestamp,
    pub generation: i64,
    pub deleting: bool,
    pub has_finalizer: bool,
    /// The lock carries the Go operator's finalizer (it was managed by the Go operator).
    pub go_finalizer: bool,
    pub statefulset_name: String,
    pub lease_name: String,
    pub lease_duration_seconds: i64,
    pub paused: bool,
    pub failover_delay_seconds: i64,
    pub preferred_writer: Option<String>,
    /// Spec replicas of the StatefulSet; None when it does not exist.
    pub replicas: Option<i32>,
    pub pods: Vec<Candidate>,
    pub lease: Option<LeaseView>,
    pub rivals: Vec<Rival>,
    pub status: StatefulSetLockStatus,
}

impl Observed {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// What deleting a StatefulSetLock does to the role labels (the Lease is always deleted).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnDelete {
    /// Leave the current writer labelled, so deleting the lock is not a write outage.
    #[default]
    KeepWriter,
    /// Remove the role label from every pod of the StatefulSet.
    RemoveLabels,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub on_delete: OnDelete,
    /// This replica's identity, reported in status.shard.
    pub identity: String,
    /// At most this many locks per namespace; younger locks beyond it report QuotaExceeded.
    pub max_locks_per_namespace: Option<usize>,
}

/// One step of a plan, applied in order; every step is a single API call (a write, except
/// [`Step::ConfirmLease`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    AddFinalizer,
    /// Record `epoch` as the lock's highest issued epoch (status, compare-and-swap on the
    /// lock's resourceVersion) before any Lease carries it: whatever happens to the Lease
    /// afterwards, no later plan can issue it again.
    ReserveEpoch {
        epoch: i64,
        /// The pod it is for.
        uid: String,
    },
    /// Read the Lease from the API server (not the cache) and stop the plan unless it still
    /// names this holder with this epoch: a plan that promotes without writing the Lease must
    /// not act on a stale view of it.
    ConfirmLease {
        holder: String,
        holder_uid: String,
        transitions: i64,
    },
    CreateLease {
        holder: String,
        holder_uid: String,
        /// The epoch to start from: 0 on a first election, never lower than any epoch seen.
        transitions: i64,
    },
    /// Compare-and-swap on the Lease's resourceVersion.
    UpdateLease {
        expected_resource_version: String,
        holder: String,
        holder_uid: String,
        transitions: i64,
        /// A new holder (or re-acquisition): set acquireTime.
        acquire: bool,
    },
    /// Set (or with None, remove) the role label of a pod, guarded by its UID (an empty UID:
    /// unguarded, only for demotions). A writer gets the epoch annotation, anything else loses
    /// it. A demotion whose pod is gone (404) or is another pod now (UID mismatch) is done: the
    /// pod it was meant for no longer exists.
    Label {
        pod: String,
        uid: String,
        role: Option<Role>,
        epoch: Option<i64>,
    },
    DeleteLease {
        expected_resource_version: String,
    },
    RemoveFinalizer,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Normal,
    Warning,
}

/// An Event to record on the lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    pub severity: Severity,
    pub reason: &'static str,
    pub action: &'static str,
    pub message: String,
}

/// What [`super::decide`] wants done.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Plan {
    pub steps: Vec<Step>,
    /// The status to write; None when it equals the current one.
    pub status: Option<StatefulSetLockStatus>,
    pub events: Vec<Note>,
    /// Reconcile again after this long even if nothing changes (renewals, failover delays).
    pub requeue_after: Option<Duration>,
    /// The holder keeps the Lease and its next renewal is due after this long: the renewal
    /// lane takes it from here (the reconcile lane's requeue is then only a safety net).
    pub renew_after: Option<Duration>,
    /// Why a failover or switchover happened, for traces and Events.
    pub transition: Option<Transition>,
}

impl Plan {
    /// Does the plan write the Lease (create it, renew it, or move it)?
    pub fn writes_lease(&self) -> bool {
        self.steps
            .iter()
            .any(|s| matches!(s, Step::UpdateLease { .. } | Step::CreateLease { .. }))
    }

    /// Does the plan write the sitting holder's Lease for the same holder (a renewal, or a
    /// lapsed Lease re-acquired), with or without other writes, outside any transition?
    pub fn renews(&self, holder: Option<&str>) -> bool {
        self.transition.is_none()
            && self.steps.iter().any(
                |s| matches!(s, Step::UpdateLease { holder: h, .. } if Some(h.as_str()) == holder),
            )
    }

    /// Is the plan nothing but a renewal of the sitting holder (no new holder, no label, no
    /// status, no Event)? Such a plan is exempt from the namespace's write budget, like the
    /// renewal lane.
    pub fn is_renewal_only(&self, holder: Option<&str>) -> bool {
        self.status.is_none()
            && self.events.is_empty()
            && !self.steps.is_empty()
            && self.steps.iter().all(|s| {
                matches!(s, Step::UpdateLease { holder: h, acquire: false, .. }
                    if Some(h.as_str()) == holder)
            })
    }

    /// Does the plan give a StatefulSet that has no usable writer one: a failover, a first
    /// election, or the promotion that completes an interrupted transition (the Lease moved,
    /// the label not yet)? Such a plan goes before its namespace's plans that do not, and
    /// never borrows ([`crate::limits`]). A switchover's own plan does not go first (its writer
    /// is healthy).
    pub fn restores_writer(&self) -> bool {
        match &self.transition {
            Some(t) => matches!(t.kind, TransitionKind::Failover | TransitionKind::Election),
            None => self.steps.iter().any(|s| {
                matches!(
                    s,
                    Step::Label {
                        role: Some(Role::Writer),
                        ..
                    }
                )
            }),
        }
    }

    /// The writes its namespace's budget pays for: every step but the quorum read, and the
    /// status. Events are notes about the election, not its state: like client-go's event
    /// recorder, they are not charged to the tenant (each still takes a token of the replica's
    /// budget, and a plan has at most one per transition).
    pub fn budgeted_writes(&self) -> usize {
        self.steps
            .iter()
            .filter(|s| !matches!(s, Step::ConfirmLease { .. }))
            .count()
            + usize::from(self.status.is_some())
    }
}

/// What kind of change of writer (or of the writer's record) a plan makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TransitionKind {
    /// A first writer.
    Election,
    /// The writer was lost (not Ready, terminating, deleted): another pod takes over.
    Failover,
    /// A healthy writer hands over to the preferred one.
    Switchover,
    /// The Lease's holder or epoch was changed outside stslock: the holder is confirmed under
    /// a new epoch.
    EpochRepair,
    /// A Lease the Go operator left, taken over for the same holder and epoch.
    Adoption,
}

impl TransitionKind {
    pub const ALL: [TransitionKind; 5] = [
        TransitionKind::Election,
        TransitionKind::Failover,
        TransitionKind::Switchover,
        TransitionKind::EpochRepair,
        TransitionKind::Adoption,
    ];

    /// Its name in metrics labels, span names and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            TransitionKind::Election => "election",
            TransitionKind::Failover => "failover",
            TransitionKind::Switchover => "switchover",
            TransitionKind::EpochRepair => "epoch_repair",
            TransitionKind::Adoption => "adoption",
        }
    }
}

impl std::fmt::Display for TransitionKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    pub kind: TransitionKind,
    pub old_writer: Option<String>,
    pub new_writer: String,
    pub reason: String,
    pub epoch: i64,
}
