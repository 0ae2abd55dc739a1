//! Apply: carry out a [`Plan`]'s steps in order, each one API write under a timeout, each
//! guarded so that it cannot act on something that changed since it was observed — the
//! Lease by its resourceVersion, a pod by its UID, the lock's finalizers by its
//! resourceVersion. A failed guard (409) stops the plan; the next reconcile starts from what
//! is true then.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::{Resource, ResourceExt};
use serde_json::{Value, json};

use crate::api::{
    EPOCH_ANNOTATION, FINALIZER, LEASE_OWNER_ANNOTATION, StatefulSetLock, WRITER_UID_ANNOTATION,
};
use crate::elect::{Observed, Plan, Severity, Step};
use crate::error::Result;
use crate::limits::Lane;
use crate::reconcile::Context;
use crate::reconcile::client::{call, call_opt};
use crate::reconcile::watch::LEASE_LABEL;

/// How long a quiet lock waits before a safety-net reconcile (watches drive everything else).
const RESYNC: Duration = Duration::from_secs(300);

fn micro(now: jiff::Timestamp) -> Value {
    serde_json::to_value(MicroTime(now)).unwrap_or(Value::Null)
}

pub async fn apply(lock: &StatefulSetLock, o: &Observed, plan: &Plan, ctx: &Context) -> Result<()> {
    let api_timeout = ctx.args.api_timeout();
    let ns = o.namespace.as_str();
    let locks: Api<StatefulSetLock> = Api::namespaced(ctx.client.clone(), ns);
    let leases: Api<Lease> = Api::namespaced(ctx.client.clone(), ns);
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    let pp = PatchParams::default();
    // Writes to the lock itself are compare-and-swap on the version this plan was made from
    // (advanced by the plan's own finalizer write): a reconcile that started from a stale view
    // — e.g. before its shard handed the lock off — cannot write it.
    let mut lock_rv = lock.resource_version();
    let held_by = o.lease.as_ref().and_then(|l| l.holder.as_deref());
    let mut first_write = None;
    for step in &plan.steps {
        // Every write is budgeted (renewing the current holder first, see crate::limits)
        // before its fence window is taken, so waiting for a token cannot eat the window.
        let lane = match step {
            Step::UpdateLease {
                holder, acquire, ..
            } if !acquire && Some(holder.as_str()) == held_by => Lane::Renewal,
            _ => Lane::Reconcile,
        };
        ctx.limits.acquire(lane).await;
        // A replica that may have lost its membership stops mid-plan: the next owner
        // reconverges from the Lease.
        // A write must also finish inside the fence window: one answered later could land
        // after a peer took the lock over.
        let window = ctx.sharding.write_window();
        if window.is_zero() {
            return Err(crate::error::Error::Fenced);
        }
        let timeout = api_timeout.min(window);
        let now = jiff::Timestamp::now();
        first_write.get_or_insert(now);
        match step {
            Step::AddFinalizer | Step::RemoveFinalizer => {
                let mut f: Vec<String> = lock.finalizers().to_vec();
                if matches!(step, Step::AddFinalizer) {
                    f.push(FINALIZER.into());
                } else {
                    f.retain(|x| x != FINALIZER);
                }
                let patch = json!({"metadata": {"finalizers": f, "resourceVersion": lock_rv}});
                let what = format!("updating finalizers of StatefulSetLock {ns}/{}", o.name);
                let updated = call_opt(
                    &what,
                    timeout,
                    locks.patch(&o.name, &pp, &Patch::Merge(&patch)),
                )
                .await?;
                if let Some(u) = updated {
                    lock_rv = u.resource_version();
                }
            }
            Step::CreateLease {
                holder,
                holder_uid,
                transitions,
            } => {
                let lease: Lease = serde_json::from_value(json!({
                    "metadata": {
                        "name": o.lease_name,
                        "namespace": ns,
                        "labels": {LEASE_LABEL: "stslock"},
                        "annotations": {LEASE_OWNER_ANNOTATION: o.key(), WRITER_UID_ANNOTATION: holder_uid},
                        "ownerReferences": [lock.controller_owner_ref(&()).map(|r| serde_json::to_value(r).unwrap_or(Value::Null)).unwrap_or(Value::Null)],
                    },
                    "spec": {
                        "holderIdentity": holder,
                        "leaseDurationSeconds": o.lease_duration_seconds,
                        "acquireTime": micro(now),
                        "renewTime": micro(now),
                        "leaseTransitions": transitions,
                    }
                }))?;
                call(
                    &format!("creating Lease {ns}/{}", o.lease_name),
                    timeout,
                    leases.create(&PostParams::default(), &lease),
                )
                .await?;
            }
            Step::UpdateLease {
                expected_resource_version,
                holder,
                holder_uid,
                transitions,
                acquire,
            } => {
                let mut spec = json!({
                    "holderIdentity": holder,
                    "leaseDurationSeconds": o.lease_duration_seconds,
                    "renewTime": micro(now),
                    "leaseTransitions": transitions,
                });
                if *acquire {
                    spec["acquireTime"] = micro(now);
                }
                // The resourceVersion in the patch makes it a compare-and-swap.
                let patch = json!({
                    "metadata": {"resourceVersion": expected_resource_version, "annotations": {WRITER_UID_ANNOTATION: holder_uid}},
                    "spec": spec,
                });
                call(
                    &format!(
                        "updating Lease {ns}/{} (holder {holder}, epoch {transitions})",
                        o.lease_name
                    ),
                    timeout,
                    leases.patch(&o.lease_name, &pp, &Patch::Merge(&patch)),
                )
                .await?;
            }
            Step::Label {
                pod,
                uid,
                role,
                epoch,
            } => {
                // metadata.uid in the patch is a precondition: a pod recreated under the same
                // name since it was observed is never given the role.
                let patch = json!({"metadata": {
                    "uid": uid,
                    "labels": {ctx.args.role_label.as_str(): role.map(|r| r.as_str())},
                    "annotations": {EPOCH_ANNOTATION: epoch.map(|e| e.to_string())},
                }});
                let what = format!(
                    "labelling pod {ns}/{pod} {}={}",
                    ctx.args.role_label,
                    role.map(|r| r.as_str()).unwrap_or("(none)")
                );
                call_opt(&what, timeout, pods.patch(pod, &pp, &Patch::Merge(&patch))).await?;
            }
            Step::DeleteLease {
                expected_resource_version,
            } => {
                let dp = DeleteParams {
                    preconditions: Some(Preconditions {
                        resource_version: Some(expected_resource_version.clone()),
                        uid: None,
                    }),
                    ..DeleteParams::default()
                };
                call_opt(
                    &format!("deleting Lease {ns}/{}", o.lease_name),
                    timeout,
                    leases.delete(&o.lease_name, &dp),
                )
                .await?;
            }
        }
    }
    // The election's writes are done (the new writer is labelled): count what they did now,
    // so a failed status write below cannot hide a failover from the metrics.
    let labelled = jiff::Timestamp::now();
    let old_writer_lost = plan
        .transition
        .as_ref()
        .and_then(|t| t.old_writer.as_deref())
        .and_then(|w| ctx.pods.not_ready_seen_at(ns, w));
    ctx.metrics.applied(
        o,
        plan,
        first_write.unwrap_or(labelled),
        labelled,
        old_writer_lost,
    );
    if let Some(status) = &plan.status {
        ctx.limits.acquire(Lane::Reconcile).await;
        let timeout = api_timeout.min(ctx.sharding.write_window());
        if timeout.is_zero() {
            return Err(crate::error::Error::Fenced);
        }
        call(
            &format!("writing status of StatefulSetLock {ns}/{}", o.name),
            timeout,
            locks.patch_status(
                &o.name,
                &pp,
                &Patch::Merge(json!({"metadata": {"resourceVersion": lock_rv}, "status": status})),
            ),
        )
        .await?;
    }
    let reference = lock.object_ref(&());
    for note in &plan.events {
        let ev = Event {
            type_: match note.severity {
                Severity::Normal => EventType::Normal,
                Severity::Warning => EventType::Warning,
            },
            reason: note.reason.into(),
            // The trace of the decision, for `kubectl describe` → trace backend.
            note: Some(crate::telemetry::with_trace_id(&note.message)),
            action: note.action.into(),
            secondary: None,
        };
        // An Event that cannot be written is logged, never a reason to redo the election.
        ctx.limits.acquire(Lane::Reconcile).await;
        if let Err(e) = call(
            &format!("recording Event {}", note.reason),
            api_timeout,
            ctx.recorder.publish(&ev, &reference),
        )
        .await
        {
            tracing::warn!(error = %e, "event not recorded");
        }
    }
    if let Some(t) = &plan.transition {
        tracing::info!(
            lock = %o.key(),
            kind = t.kind,
            old_writer = t.old_writer.as_deref().unwrap_or(""),
            new_writer = %t.new_writer,
            epoch = t.epoch,
            reason = %t.reason,
            "writer changed"
        );
    }
    Ok(())
}

/// When to reconcile a lock again. While its writer holds the Lease the renewal lane renews it;
/// the reconcile lane then only wakes as a safety net, past the renewal but well before expiry.
pub fn next_action(plan: &Plan, lease_duration: Duration) -> Action {
    let after = match (plan.requeue_after, plan.renew_after) {
        (Some(r), Some(n)) if r >= n => n + lease_duration.mul_f64(0.3),
        (r, _) => r.unwrap_or(RESYNC),
    };
    Action::requeue(after.min(RESYNC).max(Duration::from_millis(50)))
}
