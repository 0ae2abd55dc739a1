//! Gather: build [`Observed`] for one lock from the watch caches (pods, StatefulSets, locks,
//! stslock's Leases), falling back to a direct GET only for a Lease the cache does not have
//! (it may be foreign, and foreign Leases are not watched). An untrusted lock
//! ([`crate::reconcile::fresh`]) is first re-read with quorum reads ([`reread`]).

use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use kube::api::Api;
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};

use crate::api::{
    FINALIZER, GO_FINALIZER, LEASE_OWNER_ANNOTATION, RENEWED_ANNOTATION, StatefulSetLock,
    WRITER_UID_ANNOTATION,
};
use crate::config::OperatorArgs;
use crate::elect::{Candidate, Config, LeaseView, Observed, Rival, Role};
use crate::error::Result;
use crate::reconcile::Context;
use crate::reconcile::client::{call, call_opt};

pub fn election_config(args: &OperatorArgs, identity: &str) -> Config {
    Config {
        on_delete: args.on_delete,
        identity: identity.to_string(),
        max_locks_per_namespace: args.max_locks_per_namespace,
    }
}

pub fn lease_view(l: &Lease) -> LeaseView {
    let spec = l.spec.clone().unwrap_or_default();
    LeaseView {
        holder: spec.holder_identity,
        holder_uid: l.annotations().get(WRITER_UID_ANNOTATION).cloned(),
        transitions: i64::from(spec.lease_transitions.unwrap_or(0)),
        renew_time: spec.renew_time.map(|t| t.0),
        acquire_time: spec.acquire_time.map(|t| t.0),
        duration_seconds: i64::from(spec.lease_duration_seconds.unwrap_or(0)),
        resource_version: l.resource_version().unwrap_or_default(),
        owner: l.annotations().get(LEASE_OWNER_ANNOTATION).cloned(),
        unmarked: l.labels().is_empty()
            && l.annotations().is_empty()
            && l.owner_references().is_empty(),
        renewed_mark: l
            .annotations()
            .get(RENEWED_ANNOTATION)
            .and_then(|t| t.parse().ok()),
    }
}

/// The Lease named by the lock: the watch cache first, then a direct GET.
pub async fn lease(
    ctx: &Context,
    ns: &str,
    name: &str,
    timeout: Duration,
) -> Result<Option<Lease>> {
    let cached = ctx
        .leases
        .read()
        .ok()
        .and_then(|m| m.get(&(ns.to_string(), name.to_string())).cloned());
    if let Some(l) = cached {
        return Ok(Some((*l).clone()));
    }
    let api: Api<Lease> = Api::namespaced(ctx.client.clone(), ns);
    call_opt(
        &format!("getting Lease {ns}/{name}"),
        timeout,
        api.get(name),
    )
    .await
}

/// Quorum reads of everything one lock's decision rests on — the lock, its Lease, its
/// StatefulSet's pods — into the caches (which keep whatever is newer). Returns the lock as
/// read (None: it is gone).
pub async fn reread(lock: &StatefulSetLock, ctx: &Context) -> Result<Option<StatefulSetLock>> {
    use k8s_openapi::api::core::v1::Pod;
    let ns = lock.namespace().unwrap_or_default();
    let name = lock.name_any();
    let timeout = ctx.args.api_timeout();
    let locks: Api<StatefulSetLock> = Api::namespaced(ctx.client.clone(), &ns);
    let Some(fresh) = call_opt(
        &format!("reading StatefulSetLock {ns}/{name}"),
        timeout,
        locks.get(&name),
    )
    .await?
    else {
        return Ok(None);
    };
    ctx.fresh.remember_lock(fresh.clone());
    let leases: Api<Lease> = Api::namespaced(ctx.client.clone(), &ns);
    let lease_name = &fresh.spec.lease_name;
    match call_opt(
        &format!("reading Lease {ns}/{lease_name}"),
        timeout,
        leases.get(lease_name),
    )
    .await?
    {
        Some(l)
            if l.labels()
                .get(crate::reconcile::watch::LEASE_LABEL)
                .is_some() =>
        {
            crate::reconcile::watch::remember_lease(&ctx.leases, l)
        }
        // Not ours (not watched, never cached): gather reads it directly every time.
        Some(_) => {}
        None => crate::reconcile::watch::forget_lease(&ctx.leases, &ns, lease_name, None),
    }
    let set_name = &fresh.spec.stateful_set_name;
    if let Some(set) = ctx.sets.get(&ObjectRef::new(set_name).within(&ns)) {
        // The StatefulSet's own selector, narrowed to StatefulSet pods; the index keeps only
        // pods this set controls.
        let mut selector: Vec<String> = set
            .spec
            .selector
            .match_labels
            .clone()
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        selector.push(crate::reconcile::watch::STS_POD_LABEL.to_string());
        let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
        let listed = call(
            &format!("listing pods of StatefulSet {ns}/{set_name}"),
            timeout,
            pods.list(&kube::api::ListParams::default().labels(&selector.join(","))),
        )
        .await?;
        let list_rv =
            crate::reconcile::fresh::rv_number(listed.metadata.resource_version.as_deref());
        ctx.pods.replace_set(&ns, set_name, &listed.items, list_rv);
    }
    Ok(Some(fresh))
}

pub async fn observe(lock: &StatefulSetLock, ctx: &Context) -> Result<Observed> {
    let ns = lock.namespace().unwrap_or_default();
    let name = lock.name_any();
    let timeout = ctx.args.api_timeout();
    let set = ctx
        .sets
        .get(&ObjectRef::new(&lock.spec.stateful_set_name).within(&ns));
    let pods = ctx
        .pods
        .pods_of(&ns, &lock.spec.stateful_set_name)
        .iter()
        .map(|p| Candidate {
            name: p.name.clone(),
            uid: p.uid.clone(),
            ordinal: p.ordinal,
            ready: p.ready,
            ready_since: p.ready_transition,
            terminating: p.terminating,
            role: p.role.as_deref().and_then(Role::parse),
            epoch: p.epoch.map(|e| e as i64),
        })
        .collect();
    let lease = lease(ctx, &ns, &lock.spec.lease_name, timeout).await?;
    let rivals = ctx
        .locks
        .state()
        .iter()
        .filter(|l| l.namespace().as_deref() == Some(ns.as_str()) && l.name_any() != name)
        .filter(|l| l.meta().deletion_timestamp.is_none())
        .map(|l| Rival {
            name: l.name_any(),
            created: l.creation_timestamp().map(|t| t.0).unwrap_or_default(),
            statefulset: l.spec.stateful_set_name.clone(),
            lease_name: l.spec.lease_name.clone(),
        })
        .collect();
    Ok(Observed {
        namespace: ns,
        name,
        created: lock.creation_timestamp().map(|t| t.0).unwrap_or_default(),
        generation: lock.meta().generation.unwrap_or(0),
        deleting: lock.meta().deletion_timestamp.is_some(),
        has_finalizer: lock.finalizers().iter().any(|f| f == FINALIZER),
        go_finalizer: lock.finalizers().iter().any(|f| f == GO_FINALIZER),
        statefulset_name: lock.spec.stateful_set_name.clone(),
        lease_name: lock.spec.lease_name.clone(),
        lease_duration_seconds: i64::from(lock.spec.lease_duration_seconds),
        paused: lock.spec.paused,
        failover_delay_seconds: i64::from(lock.spec.failover_delay_seconds.unwrap_or(0)),
        preferred_writer: lock.spec.preferred_writer.clone(),
        replicas: set.map(|s| s.spec.replicas.unwrap_or(1)),
        pods,
        lease: lease.as_ref().map(lease_view),
        rivals,
        status: lock.status.clone().unwrap_or_default(),
    })
}
