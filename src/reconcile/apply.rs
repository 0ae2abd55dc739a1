//! Apply: carry out a [`Plan`]'s steps in order, each one API write under a timeout, each
//! guarded so that it cannot act on something that changed since it was observed — the
//! Lease by its resourceVersion, a pod by its UID (a promotion by its resourceVersion too),
//! the lock's finalizers and status by its resourceVersion. A failed guard (409) stops the
//! plan; the next reconcile starts from what is true then.
//!
//! Fencing (DESIGN §2 rule 12): a demotion always changes the pod — it writes a fresh token
//! into [`FENCE_ANNOTATION`] — and a promotion is a compare-and-swap on the pod's version its
//! plan observed. A promotion that is applied late (its answer lost, or its replica killed
//! while it was in flight) after a later plan demoted the pod conflicts instead of making a
//! second writer: every plan that moves the Lease away from a pod demotes it before the Lease
//! write.
//!
//! Every write asks the shard runtime for a permit at the moment it is sent (ownership, the
//! fence, a handoff in progress), so a plan stops as soon as its lock is no longer this
//! replica's. Every response goes into the caches (read-your-writes); a write whose outcome is
//! unknown makes the lock untrusted, so it is re-read before it is decided again; a 409 on the
//! Lease fetches the Lease afresh.

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
    EPOCH_ANNOTATION, FENCE_ANNOTATION, FINALIZER, GO_FINALIZER, LEASE_OWNER_ANNOTATION,
    RENEWED_ANNOTATION, StatefulSetLock, WRITER_UID_ANNOTATION,
};
use crate::cache::watch::{LEASE_LABEL, forget_lease, remember_lease};
use crate::call::{ApiCall, Kind, call, call_opt};
use crate::elect::{Observed, Plan, Severity, Step};
use crate::error::Result;
use crate::limits::Lane;
use crate::reconcile::Context;

/// How long a quiet lock waits before a safety-net reconcile (watches drive everything else).
const RESYNC: Duration = Duration::from_secs(300);

fn micro(now: jiff::Timestamp) -> Value {
    serde_json::to_value(MicroTime(now)).unwrap_or(Value::Null)
}

/// [`micro`] as a string: the `renewTime` echoed in [`RENEWED_ANNOTATION`], byte for byte.
pub fn micro_string(now: jiff::Timestamp) -> String {
    match micro(now) {
        Value::String(s) => s,
        _ => String::new(),
    }
}

/// A failed write: what it means for the caches, then the error.
fn after_failure(
    ctx: &Context,
    key: &str,
    permit: &crate::sharding::WritePermit<'_>,
    e: &crate::error::Error,
) {
    if e.outcome_unknown() {
        permit.unknown_outcome();
        ctx.cache.fresh.distrust(key);
    }
}

fn refused(r: crate::sharding::Refused, key: &str) -> crate::error::Error {
    match r {
        crate::sharding::Refused::Fenced => crate::error::Error::Fenced,
        crate::sharding::Refused::NotOwner => crate::error::Error::Stale(format!(
            "{key} is not this replica's any more (handed off or claimed)"
        )),
    }
}

/// One plan's API context: what every step needs to make its call.
struct Applier<'a> {
    ctx: &'a Context,
    lock: &'a StatefulSetLock,
    o: &'a Observed,
    key: String,
    generation: u64,
    held_by: Option<&'a str>,
    locks: Api<StatefulSetLock>,
    leases: Api<Lease>,
    pods: Api<Pod>,
    /// Pod name → the resourceVersion of this plan's own last write to it (its answer): a
    /// promotion of a pod the plan demoted first (a leftover from an interrupted handover)
    /// is a compare-and-swap on that version, not on the one the plan was made from.
    wrote: std::sync::Mutex<std::collections::HashMap<String, u64>>,
}

/// Steps that may be sent together: none depends on another's result, and each is safe in any
/// order and any subset (demotions, the epoch reservation, reading the Lease). Everything else
/// — finalizers, Lease writes, a promotion — waits for all steps before it.
fn joins_wave(step: &Step) -> bool {
    match step {
        Step::ReserveEpoch { .. } | Step::ConfirmLease { .. } => true,
        Step::Label { role, .. } => *role != Some(crate::elect::Role::Writer),
        _ => false,
    }
}

/// The plan's steps in waves: consecutive wave-joining steps together, every other step alone.
fn waves(steps: &[Step]) -> Vec<&[Step]> {
    let mut out = vec![];
    let mut start = 0;
    while start < steps.len() {
        let mut end = start + 1;
        if joins_wave(&steps[start]) {
            while end < steps.len() && joins_wave(&steps[end]) {
                end += 1;
            }
        }
        out.push(&steps[start..end]);
        start = end;
    }
    out
}

impl Applier<'_> {
    /// The lock as this replica knows it best now (its own writes included), for the
    /// ownership check of each write.
    fn current_lock(&self) -> std::sync::Arc<StatefulSetLock> {
        let ctx = self.ctx;
        ctx.cache
            .locks
            .get(&kube::runtime::reflector::ObjectRef::from_obj(self.lock))
            .map(|l| ctx.cache.fresh.newest_lock(l))
            .filter(|l| {
                crate::cache::fresh::rv_number(l.resource_version().as_deref())
                    >= crate::cache::fresh::rv_number(self.lock.resource_version().as_deref())
            })
            .unwrap_or_else(|| std::sync::Arc::new(self.lock.clone()))
    }

    /// Confirm the Lease by a quorum read (not a write: no budget, no permit).
    async fn confirm(&self, holder: &str, holder_uid: &str, transitions: i64) -> Result<()> {
        let (ctx, o, ns) = (self.ctx, self.o, self.o.namespace.as_str());
        let fresh = call_opt(
            &ctx.metrics,
            ApiCall::get(Kind::Lease, format!("{ns}/{}", o.lease_name)).note("confirm"),
            ctx.args.api_timeout(),
            self.leases.get(&o.lease_name),
        )
        .await?;
        let agrees = fresh.as_ref().is_some_and(|l| {
            let v = crate::cache::lease_view(l);
            v.holder.as_deref() == Some(holder)
                && v.holder_uid.as_deref() == Some(holder_uid)
                && v.transitions == transitions
        });
        match fresh {
            Some(l) => remember_lease(&ctx.cache.leases, l),
            None => forget_lease(&ctx.cache.leases, ns, &o.lease_name, None),
        }
        if agrees {
            Ok(())
        } else {
            Err(crate::error::Error::Stale(format!(
                "Lease {ns}/{} no longer names {holder} with epoch {transitions}",
                o.lease_name
            )))
        }
    }

    /// Carry out one step; returns the lock's new resourceVersion when the step wrote the lock.
    async fn step(&self, step: &Step, lock_rv: Option<String>) -> Result<Option<String>> {
        if let Step::ConfirmLease {
            holder,
            holder_uid,
            transitions,
        } = step
        {
            self.confirm(holder, holder_uid, *transitions).await?;
            return Ok(None);
        }
        let (ctx, lock, o) = (self.ctx, self.lock, self.o);
        let ns = o.namespace.as_str();
        let (locks, leases, pods) = (&self.locks, &self.leases, &self.pods);
        let pp = PatchParams::default();
        // Every write is budgeted (renewing the current holder first, see crate::limits)
        // before its permit is taken, so waiting for a token cannot eat the fence window.
        let lane = match step {
            Step::UpdateLease {
                holder, acquire, ..
            } if !acquire && Some(holder.as_str()) == self.held_by => Lane::Renewal,
            _ => Lane::Reconcile,
        };
        ctx.limits.acquire(lane).await;
        // Ownership and the fence, checked now for this write against the freshest view of
        // the lock: a handoff or a claim since the plan started stops it here. The write must
        // also finish inside the fence window: one answered later could land after a peer took
        // the lock over.
        let permit = ctx
            .sharding
            .permit(&self.current_lock(), self.generation)
            .map_err(|r| refused(r, &self.key))?;
        let timeout = ctx.args.api_timeout().min(permit.window);
        let now = jiff::Timestamp::now();
        let mut lock_rv = lock_rv;
        let before = lock_rv.clone();
        let result: Result<()> = async {
            match step {
                Step::ConfirmLease { .. } => Ok(()),
                Step::AddFinalizer | Step::RemoveFinalizer => {
                    // The Go operator's finalizer goes in the same write: stslock takes its
                    // place (adding ours) or finishes its job (removing both).
                    let mut f: Vec<String> = lock.finalizers().to_vec();
                    f.retain(|x| x != GO_FINALIZER);
                    if matches!(step, Step::AddFinalizer) {
                        if !f.iter().any(|x| x == FINALIZER) {
                            f.push(FINALIZER.into());
                        }
                    } else {
                        f.retain(|x| x != FINALIZER);
                    }
                    let patch = json!({"metadata": {"finalizers": f, "resourceVersion": lock_rv}});
                    let updated = call_opt(
                        &ctx.metrics,
                        ApiCall::patch(Kind::StatefulSetLock, format!("{ns}/{}", o.name))
                            .note("finalizers"),
                        timeout,
                        locks.patch(&o.name, &pp, &Patch::Merge(&patch)),
                    )
                    .await?;
                    if let Some(u) = updated {
                        lock_rv = u.resource_version();
                        ctx.cache.fresh.remember_lock(u);
                    }
                    Ok(())
                }
                Step::ReserveEpoch { epoch, uid } => {
                    let patch = json!({"metadata": {"resourceVersion": lock_rv}, "status": {"highestEpoch": epoch, "highestEpochUID": uid}});
                    let u = call(
                        &ctx.metrics,
                        ApiCall::patch(Kind::StatefulSetLock, format!("{ns}/{}", o.name))
                            .note(format!("status: reserve epoch {epoch}")),
                        timeout,
                        locks.patch_status(&o.name, &pp, &Patch::Merge(&patch)),
                    )
                    .await?;
                    lock_rv = u.resource_version();
                    ctx.cache.fresh.remember_lock(u);
                    Ok(())
                }
                Step::CreateLease {
                    holder,
                    holder_uid,
                    transitions,
                } => {
                    let lease = new_lease(lock, o, holder, holder_uid, *transitions, now)?;
                    let created = call(
                        &ctx.metrics,
                        ApiCall::create(Kind::Lease, format!("{ns}/{}", o.lease_name)),
                        timeout,
                        leases.create(&PostParams::default(), &lease),
                    )
                    .await?;
                    remember_lease(&ctx.cache.leases, created);
                    Ok(())
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
                    // The resourceVersion in the patch makes it a compare-and-swap. The marks
                    // are written every time (a no-op for a Lease of ours); on a Lease left by
                    // the Go operator they are the adoption, with the lock as its owner.
                    let mut meta = json!({
                        "resourceVersion": expected_resource_version,
                        "labels": {LEASE_LABEL: "stslock"},
                        "annotations": {
                            WRITER_UID_ANNOTATION: holder_uid,
                            LEASE_OWNER_ANNOTATION: o.key(),
                            RENEWED_ANNOTATION: micro(now),
                        },
                    });
                    if o.lease.as_ref().is_some_and(|l| l.owner.is_none())
                        && let Some(r) = lock.controller_owner_ref(&())
                    {
                        meta["ownerReferences"] = json!([r]);
                    }
                    let patch = json!({"metadata": meta, "spec": spec});
                    let updated = call(
                        &ctx.metrics,
                        ApiCall::patch(Kind::Lease, format!("{ns}/{}", o.lease_name))
                            .note(format!("holder {holder}, epoch {transitions}")),
                        timeout,
                        leases.patch(&o.lease_name, &pp, &Patch::Merge(&patch)),
                    )
                    .await?;
                    remember_lease(&ctx.cache.leases, updated);
                    Ok(())
                }
                Step::Label {
                    pod,
                    uid,
                    role,
                    epoch,
                } => {
                    // metadata.uid in the patch is a precondition: a pod recreated under the same
                    // name since it was observed is never given the role.
                    let demote = *role != Some(crate::elect::Role::Writer);
                    let mut meta = json!({
                        "labels": {ctx.args.role_label.as_str(): role.map(|r| r.as_str())},
                        "annotations": {EPOCH_ANNOTATION: epoch.map(|e| e.to_string())},
                    });
                    if !uid.is_empty() {
                        meta["uid"] = json!(uid);
                    }
                    if demote {
                        meta["annotations"][FENCE_ANNOTATION] =
                            json!(format!("{:016x}", rand::random::<u64>()));
                    } else {
                        let own = self
                            .wrote
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .get(pod.as_str())
                            .copied();
                        let seen = o
                            .pods
                            .iter()
                            .find(|p| p.name == *pod && p.uid == *uid)
                            .map(|p| p.resource_version);
                        match own.or(seen).filter(|rv| *rv > 0) {
                            Some(rv) => meta["resourceVersion"] = json!(rv.to_string()),
                            // Not a number (an API server whose resourceVersions are not
                            // etcd's): guarded by UID only, as before fencing.
                            None => tracing::warn!(lock = %self.key, pod = %pod, "promotion not guarded by the pod's resourceVersion: none known"),
                        }
                    }
                    let what = ApiCall::patch(Kind::Pod, format!("{ns}/{pod}")).note(format!(
                        "{}={}",
                        ctx.args.role_label,
                        role.map(|r| r.as_str()).unwrap_or("(none)")
                    ));
                    match call_opt(&ctx.metrics, what, timeout, pods.patch(pod, &pp, &Patch::Merge(&json!({"metadata": meta})))).await {
                        Ok(Some(p)) => {
                            let rv = crate::cache::fresh::rv_number(p.metadata.resource_version.as_deref());
                            self.wrote
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .insert(pod.clone(), rv);
                            ctx.cache.pods.remember(&p);
                            Ok(())
                        }
                        // The pod is gone: nothing carries a role any more. A promotion cannot
                        // go on (the plan was made for that pod).
                        Ok(None) if demote => Ok(()),
                        Ok(None) => Err(crate::error::Error::Stale(format!("pod {ns}/{pod} is gone"))),
                        // Another pod under that name now: the one meant is gone.
                        Err(e) if demote && e.is_uid_mismatch() => Ok(()),
                        Err(e) => Err(e),
                    }
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
                        &ctx.metrics,
                        ApiCall::delete(Kind::Lease, format!("{ns}/{}", o.lease_name)),
                        timeout,
                        leases.delete(&o.lease_name, &dp),
                    )
                    .await?;
                    forget_lease(&ctx.cache.leases, ns, &o.lease_name, None);
                    Ok(())
                }
            }
        }
        .await;
        if let Err(e) = &result {
            after_failure(ctx, &self.key, &permit, e);
            // Rule 14: a conflict on the Lease means the cache is behind; fetch it now so the
            // next plan (and the renewal lane) starts from the truth.
            if e.is_conflict()
                && matches!(
                    step,
                    Step::UpdateLease { .. } | Step::CreateLease { .. } | Step::DeleteLease { .. }
                )
            {
                ctx.cache.refresh_lease(ns, &o.lease_name).await;
            }
            // The same for a promotion: the pod changed since the plan saw it (a fencing
            // demotion, a status update the cache had not shown yet).
            if e.is_conflict()
                && let Step::Label {
                    pod,
                    role: Some(crate::elect::Role::Writer),
                    ..
                } = step
            {
                ctx.cache.refresh_pod(ns, pod).await;
            }
        }
        result?;
        Ok(if lock_rv != before { lock_rv } else { None })
    }
}

pub async fn apply(
    lock: &StatefulSetLock,
    o: &Observed,
    plan: &Plan,
    ctx: &Context,
    generation: u64,
) -> Result<()> {
    let api_timeout = ctx.args.api_timeout();
    let ns = o.namespace.as_str();
    let pp = PatchParams::default();
    let a = Applier {
        ctx,
        lock,
        o,
        key: o.key(),
        generation,
        held_by: o.lease.as_ref().and_then(|l| l.holder.as_deref()),
        locks: Api::namespaced(ctx.client.clone(), ns),
        leases: Api::namespaced(ctx.client.clone(), ns),
        pods: Api::namespaced(ctx.client.clone(), ns),
        wrote: Default::default(),
    };
    let (locks, key) = (&a.locks, &a.key);
    // Writes to the lock itself are compare-and-swap on the version this plan was made from
    // (advanced by the plan's own lock writes): a reconcile that started from a stale view —
    // e.g. before its shard handed the lock off — cannot write it.
    let mut lock_rv = lock.resource_version();
    let mut first_write = None;
    for wave in waves(&plan.steps) {
        first_write.get_or_insert_with(jiff::Timestamp::now);
        let results =
            futures::future::join_all(wave.iter().map(|s| a.step(s, lock_rv.clone()))).await;
        for r in results {
            if let Some(rv) = r? {
                lock_rv = Some(rv);
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
        .and_then(|w| ctx.cache.pods.not_ready_seen_at(ns, w));
    ctx.metrics.applied(
        o,
        plan,
        first_write.unwrap_or(labelled),
        labelled,
        old_writer_lost,
    );
    if let Some(status) = &plan.status {
        ctx.limits.acquire(Lane::Reconcile).await;
        let permit = ctx
            .sharding
            .permit(&a.current_lock(), generation)
            .map_err(|r| refused(r, key))?;
        let timeout = api_timeout.min(permit.window);
        match call(
            &ctx.metrics,
            ApiCall::patch(Kind::StatefulSetLock, format!("{ns}/{}", o.name)).note("status"),
            timeout,
            locks.patch_status(
                &o.name,
                &pp,
                &Patch::Merge(json!({"metadata": {"resourceVersion": lock_rv}, "status": status})),
            ),
        )
        .await
        {
            Ok(u) => ctx.cache.fresh.remember_lock(u),
            Err(e) => {
                after_failure(ctx, key, &permit, &e);
                return Err(e);
            }
        }
    }
    // Regarding the lock, not one version of it: the same Event repeated is then one Event
    // with a growing series (the recorder keys its cache on the whole reference).
    let mut reference = lock.object_ref(&());
    reference.resource_version = None;
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
        // An Event that cannot be written is logged, never a reason to redo the election;
        // one for a lock this replica no longer owns is not written at all.
        ctx.limits.acquire(Lane::Reconcile).await;
        let Ok(permit) = ctx.sharding.permit(&a.current_lock(), generation) else {
            break;
        };
        if let Err(e) = call(
            &ctx.metrics,
            ApiCall::create(Kind::Event, format!("{ns}/{}", o.name)).note(note.reason),
            api_timeout.min(permit.window),
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
            kind = t.kind.as_str(),
            old_writer = t.old_writer.as_deref().unwrap_or(""),
            new_writer = %t.new_writer,
            epoch = t.epoch,
            reason = %t.reason,
            "writer changed"
        );
    }
    Ok(())
}

/// The Lease a new election creates: labelled as stslock's (so it is watched), annotated with
/// its lock and writer UID, owned by the lock (garbage-collected with it).
fn new_lease(
    lock: &StatefulSetLock,
    o: &Observed,
    holder: &str,
    holder_uid: &str,
    transitions: i64,
    now: jiff::Timestamp,
) -> Result<Lease> {
    use k8s_openapi::api::coordination::v1::LeaseSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    Ok(Lease {
        metadata: ObjectMeta {
            name: Some(o.lease_name.clone()),
            namespace: Some(o.namespace.clone()),
            labels: Some([(LEASE_LABEL.to_string(), "stslock".to_string())].into()),
            annotations: Some(
                [
                    (LEASE_OWNER_ANNOTATION.to_string(), o.key()),
                    (WRITER_UID_ANNOTATION.to_string(), holder_uid.to_string()),
                    (RENEWED_ANNOTATION.to_string(), micro_string(now)),
                ]
                .into(),
            ),
            owner_references: lock.controller_owner_ref(&()).map(|r| vec![r]),
            ..ObjectMeta::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(holder.to_string()),
            lease_duration_seconds: i32::try_from(o.lease_duration_seconds).ok(),
            acquire_time: Some(MicroTime(now)),
            renew_time: Some(MicroTime(now)),
            lease_transitions: i32::try_from(transitions).ok(),
            ..LeaseSpec::default()
        }),
    })
}

/// When to reconcile a lock again. While its writer holds the Lease the renewal lane renews it;
/// the reconcile lane then only wakes as a safety net, past the renewal but well before expiry.
pub fn next_action(plan: &Plan, lease_duration: Duration, since_planned: Duration) -> Action {
    let after = match (plan.requeue_after, plan.renew_after) {
        (Some(r), Some(n)) if r >= n => n + lease_duration.mul_f64(0.3),
        (r, _) => r.unwrap_or(RESYNC),
    };
    // Counted from when the plan was made, like its renewal (see `reconcile_lock`): a slow
    // pass of writes may bring a pacing requeue (an error's, a wait for a Ready pod) down to
    // the floor once; the pass after it writes nothing.
    let after = after.saturating_sub(since_planned);
    Action::requeue(after.min(RESYNC).max(Duration::from_millis(50)))
}
