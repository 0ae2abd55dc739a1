//! Starting points for tests and benches of the pure core: a lock `ns/lock` of StatefulSet `db`
//! with a 30 s Lease `db-lease`, pods `db-<i>`, a Lease held by one of them. Every field is
//! public: a case adjusts what it is about.

use jiff::Timestamp;

use super::types::{Candidate, Config, LeaseView, Observed, OnDelete};
use crate::api::StatefulSetLockStatus;

impl Observed {
    /// The lock `ns/lock` of StatefulSet `db` (as many replicas as `pods`), no Lease, empty
    /// status, created at `created`.
    pub fn example(pods: Vec<Candidate>, created: Timestamp) -> Observed {
        Observed {
            namespace: "ns".into(),
            name: "lock".into(),
            created,
            generation: 1,
            deleting: false,
            has_finalizer: true,
            go_finalizer: false,
            statefulset_name: "db".into(),
            lease_name: "db-lease".into(),
            lease_duration_seconds: 30,
            paused: false,
            failover_delay_seconds: 0,
            preferred_writer: None,
            replicas: Some(pods.len() as i32),
            pods,
            lease: None,
            rivals: vec![],
            status: StatefulSetLockStatus::default(),
        }
    }
}

impl Candidate {
    /// Pod `db-<i>` (UID `uid`), Ready (or not) since `since`, no role.
    pub fn example(i: u32, uid: String, ready: bool, since: Timestamp) -> Candidate {
        Candidate {
            name: format!("db-{i}"),
            uid,
            ordinal: Some(i),
            ready,
            ready_since: Some(since),
            terminating: false,
            role: None,
            epoch: None,
            resource_version: 0,
        }
    }
}

impl LeaseView {
    /// The lock's Lease (`ns/lock`'s, 30 s), held by `holder` (UID `uid`) at epoch
    /// `transitions`, acquired at `acquired` and renewed at `renewed`.
    pub fn example(
        holder: &str,
        uid: &str,
        transitions: i64,
        acquired: Timestamp,
        renewed: Timestamp,
    ) -> LeaseView {
        LeaseView {
            holder: Some(holder.into()),
            holder_uid: Some(uid.into()),
            transitions,
            renew_time: Some(renewed),
            acquire_time: Some(acquired),
            duration_seconds: 30,
            resource_version: "7".into(),
            owner: Some("ns/lock".into()),
            unmarked: false,
            renewed_mark: None,
        }
    }
}

impl Config {
    /// Replica `shard-a`, `--on-delete keep-writer`, no per-namespace quota.
    pub fn example() -> Config {
        Config {
            on_delete: OnDelete::KeepWriter,
            identity: "shard-a".into(),
            max_locks_per_namespace: None,
        }
    }
}
