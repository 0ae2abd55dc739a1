//! Gather: build [`Observed`] for one lock from the watch caches (pods, StatefulSets, locks,
//! stslock's Leases), falling back to a direct GET only for a Lease the cache does not have
//! (it may be foreign, and foreign Leases are not watched). An untrusted lock
//! ([`crate::cache::fresh`]) is first re-read with quorum reads
//! ([`crate::cache::Caches::reread`]).

use kube::{Resource, ResourceExt};

use crate::api::{FINALIZER, GO_FINALIZER, StatefulSetLock};
use crate::config::OperatorArgs;
use crate::elect::{Candidate, Config, Observed, Rival, Role};
use crate::error::Result;
use crate::reconcile::Context;

pub fn election_config(args: &OperatorArgs, identity: &str) -> Config {
    Config {
        on_delete: args.on_delete,
        identity: identity.to_string(),
        max_locks_per_namespace: args.max_locks_per_namespace,
    }
}

pub async fn observe(lock: &StatefulSetLock, ctx: &Context) -> Result<Observed> {
    let ns = lock.namespace().unwrap_or_default();
    let name = lock.name_any();
    // The caches keep the Leases and pods of this replica's own locks only, from the first
    // re-read of each on: a decision without that would see no pods. (A gained lock is
    // untrusted, so it is re-read before it is decided; this is the guard.)
    if !ctx.cache.holds(lock) {
        ctx.cache.fresh.distrust(&crate::api::lock_key(lock));
        return Err(crate::error::Error::Stale(format!(
            "{ns}/{name}: its Lease and pods are not cached yet (re-reading)"
        )));
    }
    let set = ctx.cache.sets.get(&ns, &lock.spec.stateful_set_name);
    let pods = ctx
        .cache
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
            resource_version: p.resource_version,
        })
        .collect();
    let lease = ctx.cache.lease(&ns, &lock.spec.lease_name).await?;
    // A conflict is with a lock on the same StatefulSet or Lease (`decide::conflict`); only the
    // namespace quota, when set, counts every other lock of the namespace. Only those are
    // copied: copying every lock of a namespace of 5,000 on every reconcile made the
    // election of its locks quadratic (2,000 of 5,000 elected after 14 minutes). Without the
    // quota they are found in the lock index, not by a scan of every cached lock.
    let (set_name, lease_name) = (
        lock.spec.stateful_set_name.as_str(),
        lock.spec.lease_name.as_str(),
    );
    let rival = |l: &StatefulSetLock| {
        (l.metadata.namespace.as_deref() == Some(ns.as_str())
            && l.metadata.name.as_deref() != Some(name.as_str())
            && l.meta().deletion_timestamp.is_none())
        .then(|| Rival {
            name: l.name_any(),
            created: l.creation_timestamp().map(|t| t.0).unwrap_or_default(),
            statefulset: l.spec.stateful_set_name.clone(),
            lease_name: l.spec.lease_name.clone(),
        })
    };
    let rivals = if ctx.args.max_locks_per_namespace.is_some() {
        ctx.cache
            .locks
            .state()
            .iter()
            .filter_map(|l| rival(l))
            .collect()
    } else {
        ctx.cache
            .lock_index
            .may_conflict(&ns, &name, set_name, lease_name)
            .iter()
            .filter_map(|r| ctx.cache.locks.get(r))
            // The index is a superset (by the Lease's hash): what counts is the lock itself.
            .filter(|l| l.spec.stateful_set_name == set_name || l.spec.lease_name == lease_name)
            .filter_map(|l| rival(&l))
            .collect()
    };
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
        replicas: set.map(|s| s.replicas.unwrap_or(1)),
        pods,
        lease: lease.as_ref().map(crate::cache::lease_view),
        rivals,
        status: lock.status.clone().unwrap_or_default(),
    })
}
