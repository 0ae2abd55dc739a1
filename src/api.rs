//! The `StatefulSetLock` custom resource (`app.anukkrit.me/v1`), wire-compatible with the Go
//! operator it replaces: the seed's three required spec fields with the seed's validation,
//! plus optional fields that default to the seed's behaviour.
//!
//! The CRD YAML in `deploy/crd/` is generated from these types (`stslock crd`) and a test
//! fails when it drifts.

use kube::{CustomResource, CustomResourceExt, KubeSchema};
use serde::{Deserialize, Serialize};

/// Group of the CRD and prefix of every label and annotation stslock writes.
pub const GROUP: &str = "app.anukkrit.me";
/// Finalizer that lets a lock clean up its Lease (and optionally labels) on deletion.
pub const FINALIZER: &str = "app.anukkrit.me/finalizer";
/// Pod annotation carrying the writer's fencing epoch (the Lease's `leaseTransitions`).
pub const EPOCH_ANNOTATION: &str = "app.anukkrit.me/writer-epoch";
/// Pod annotation every demotion writes with a fresh token: a demotion always changes the pod
/// (a new resourceVersion), even of a pod that is a reader already, so a promotion of it
/// decided before — compare-and-swap on the version its plan saw — can never land after it,
/// however late it is applied (a write whose answer was lost, a replica killed mid-plan).
pub const FENCE_ANNOTATION: &str = "app.anukkrit.me/fenced";
/// Lease annotation recording the writer pod's UID (a recreated pod is a different pod).
pub const WRITER_UID_ANNOTATION: &str = "app.anukkrit.me/writer-uid";
/// Lease annotation naming the lock (`namespace/name`) that created and owns the Lease.
pub const LEASE_OWNER_ANNOTATION: &str = "app.anukkrit.me/lock";
/// Lease annotation echoing the `renewTime` stslock last wrote: a Lease of ours whose
/// `renewTime` differs from it was renewed by someone else (another operator still running,
/// such as the Go operator during a migration), and is not fought over.
pub const RENEWED_ANNOTATION: &str = "app.anukkrit.me/renewed";
/// The Go `sts-leader-elect-operator`'s finalizer (DESIGN §10): replaced by [`FINALIZER`] in the
/// same write when stslock takes a lock over, and removed on deletion.
pub const GO_FINALIZER: &str = "statefulsetlock.app.anukkrit.me/finalizer";
/// Label on a lock naming the shard that owns it.
pub const SHARD_LABEL: &str = "app.anukkrit.me/shard";
/// Lock annotation a shard writes (compare-and-swap, with its own label unchanged) to confirm
/// its ownership after its membership Lease was gone or may have expired: a peer's claim decided
/// before the shard came back then conflicts instead of landing unseen. Its value names the
/// shard, its incarnation and its fence generation (`shard.incarnation.generation`).
pub const SHARD_TERM_ANNOTATION: &str = "app.anukkrit.me/shard-term";

const DNS1123_SUBDOMAIN: &str =
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";

/// Desired writer election for one StatefulSet.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "app.anukkrit.me",
    version = "v1",
    kind = "StatefulSetLock",
    plural = "statefulsetlocks",
    shortname = "ssl",
    namespaced,
    status = "StatefulSetLockStatus",
    doc = "StatefulSetLock elects one writer pod of a StatefulSet (label sts-role=writer, the others sts-role=reader) and backs the choice with a coordination.k8s.io/v1 Lease.",
    printcolumn = r#"{"name":"StatefulSet","type":"string","jsonPath":".spec.statefulSetName","description":"The StatefulSet whose writer is elected (a column of the Go operator's CRD)"}"#,
    printcolumn = r#"{"name":"Writer","type":"string","jsonPath":".status.writerPod","description":"The pod currently labelled writer"}"#,
    printcolumn = r#"{"name":"Epoch","type":"integer","jsonPath":".status.writerEpoch","description":"Fencing epoch (the Lease's leaseTransitions)"}"#,
    printcolumn = r#"{"name":"Available","type":"string","jsonPath":".status.conditions[?(@.type==\"Available\")].status"}"#,
    printcolumn = r#"{"name":"Lease Duration","type":"integer","jsonPath":".spec.leaseDurationSeconds","description":"leaseDurationSeconds (a column of the Go operator's CRD)"}"#,
    printcolumn = r#"{"name":"Shard","type":"string","jsonPath":".status.shard","priority":1,"description":"Operator replica that owns this lock"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct StatefulSetLockSpec {
    /// Name of the target StatefulSet in the same namespace. Immutable.
    #[schemars(length(min = 1, max = 253), regex(pattern = DNS1123_SUBDOMAIN))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("statefulSetName is immutable"))]
    pub stateful_set_name: String,

    /// Name of the coordination.k8s.io/v1 Lease the operator creates and maintains. Immutable.
    #[schemars(length(min = 1, max = 253), regex(pattern = DNS1123_SUBDOMAIN))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("leaseName is immutable"))]
    pub lease_name: String,

    /// Duration in seconds that the lease is valid; it is renewed at half this interval.
    #[schemars(range(min = 1, max = 3600))]
    pub lease_duration_seconds: i32,

    /// Freeze the current roles: no relabelling and no Lease transitions while true.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub paused: bool,

    /// Seconds a NotReady writer gets to recover before failover; deleted or terminating writers are replaced at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 3600))]
    pub failover_delay_seconds: Option<i32>,

    /// Pod to hand the writer role to when it is Ready (declarative switchover).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), regex(pattern = DNS1123_SUBDOMAIN))]
    pub preferred_writer: Option<String>,
}

/// Observed state of a StatefulSetLock.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StatefulSetLockStatus {
    /// Name of the pod currently holding the writer lock.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub writer_pod: Option<String>,
    /// Last generation reconciled by the controller.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Available, Progressing and Error conditions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Fencing epoch of the current writer (the Lease's leaseTransitions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub writer_epoch: Option<i64>,
    /// UID of the writer pod.
    #[serde(default, rename = "writerUID", skip_serializing_if = "Option::is_none")]
    pub writer_uid: Option<String>,
    /// Operator replica (shard) that owns this lock.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard: Option<String>,
    /// Ready pods of the StatefulSet at the last reconcile.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_replicas: Option<i32>,
    /// When the writer last changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failover_time: Option<String>,
    /// The highest fencing epoch ever issued for this lock, recorded before the Lease carries
    /// it: the next writer gets a higher one even if the Lease is lost or edited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub highest_epoch: Option<i64>,
    /// UID of the pod `highestEpoch` was issued to.
    #[serde(
        default,
        rename = "highestEpochUID",
        skip_serializing_if = "Option::is_none"
    )]
    pub highest_epoch_uid: Option<String>,
}

/// A `metav1.Condition` (same fields and JSON names, so clients that read conditions generically
/// keep working).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// Type of condition: Available, Progressing or Error.
    #[serde(rename = "type")]
    pub type_: String,
    /// True, False or Unknown.
    pub status: String,
    /// Last time the condition transitioned from one status to another.
    pub last_transition_time: String,
    /// The lock's generation this condition was computed for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Machine-readable CamelCase reason for the last transition.
    pub reason: String,
    /// Human-readable details.
    #[serde(default)]
    pub message: String,
}

/// The CRD as YAML, as `stslock crd` prints it and `deploy/crd/` stores it.
pub fn crd_yaml() -> Result<String, serde_saphyr::ser::Error> {
    serde_saphyr::to_string(&StatefulSetLock::crd())
}

/// `metav1.Time` format: RFC 3339, seconds, UTC.
pub fn format_time(t: jiff::Timestamp) -> String {
    t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// A lock's key, `namespace/name`: how every per-lock map of a replica (trust, in-flight
/// writes, failures, handoffs, metrics) and every log line names it.
pub fn lock_key(lock: &StatefulSetLock) -> String {
    // As `namespace()` / `name_any()` give them, without copying either first: this runs over
    // every cached lock in each sharding pass.
    let m = &lock.metadata;
    let ns = m.namespace.as_deref().unwrap_or_default();
    let name = m
        .name
        .as_deref()
        .or(m.generate_name.as_deref())
        .unwrap_or_default();
    format!("{ns}/{name}")
}
