//! Watches that keep the operator's caches and turn changes into lock keys to reconcile.
//!
//! Pods are watched once, cluster-wide, restricted to StatefulSet pods by the label every
//! StatefulSet pod carries, and kept as projections ([`PodIndex`]). Leases are watched only when
//! labelled as stslock's, so the node heartbeats in `kube-node-lease` never reach us. A change
//! to a pod, a StatefulSet or one of our Leases maps to the locks in that namespace that
//! target it.

use std::collections::HashSet;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};

use crate::api::{LEASE_OWNER_ANNOTATION, StatefulSetLock};
use crate::reconcile::pods::PodIndex;

/// Label selecting StatefulSet pods (set by the StatefulSet controller on every pod).
pub const STS_POD_LABEL: &str = "statefulset.kubernetes.io/pod-name";
/// Label stslock puts on the Leases it creates, so it can watch only those.
pub const LEASE_LABEL: &str = "app.anukkrit.me/managed-by";

/// stslock's own Leases by (namespace, name), kept by [`lease_triggers`].
pub type LeaseCache =
    Arc<std::sync::RwLock<std::collections::HashMap<(String, String), Arc<Lease>>>>;

/// Locks in `namespace` whose StatefulSet is `statefulset`.
pub fn locks_for_set(
    locks: &Store<StatefulSetLock>,
    namespace: &str,
    statefulset: &str,
) -> Vec<ObjectRef<StatefulSetLock>> {
    locks
        .state()
        .iter()
        .filter(|l| {
            l.namespace().as_deref() == Some(namespace) && l.spec.stateful_set_name == statefulset
        })
        .map(|l| ObjectRef::from_obj(l.as_ref()))
        .collect()
}

/// Lock keys to reconcile because pods changed; also keeps `index` current.
pub fn pod_triggers(
    client: Client,
    index: PodIndex,
    locks: Store<StatefulSetLock>,
) -> impl Stream<Item = ObjectRef<StatefulSetLock>> + Send + 'static {
    let pods: Api<Pod> = Api::all(client);
    let cfg = watcher::Config::default().labels(STS_POD_LABEL);
    watcher(pods, cfg)
        .default_backoff()
        .filter_map(move |ev| {
            let out = match ev {
                Ok(ev) => {
                    let touched = index.apply(&ev);
                    let mut refs = Vec::new();
                    let mut seen = HashSet::new();
                    for (ns, set) in touched {
                        for r in locks_for_set(&locks, &ns, &set) {
                            if seen.insert(r.clone()) {
                                refs.push(r);
                            }
                        }
                    }
                    refs
                }
                Err(e) => {
                    tracing::warn!(error = %e, "pod watch");
                    vec![]
                }
            };
            futures::future::ready(Some(futures::stream::iter(out)))
        })
        .flatten()
}

/// Lock keys to reconcile because one of stslock's Leases changed (e.g. edited or deleted
/// by someone else).
pub fn lease_triggers(
    client: Client,
    leases: LeaseCache,
) -> impl Stream<Item = ObjectRef<StatefulSetLock>> + Send + 'static {
    lease_triggers_synced(client, leases, Arc::default())
}

/// [`lease_triggers`], also setting `synced` once the initial list is in the cache (readiness).
pub fn lease_triggers_synced(
    client: Client,
    leases: LeaseCache,
    synced: Arc<std::sync::atomic::AtomicBool>,
) -> impl Stream<Item = ObjectRef<StatefulSetLock>> + Send + 'static {
    let api: Api<Lease> = Api::all(client);
    watcher(api, watcher::Config::default().labels(LEASE_LABEL))
        .default_backoff()
        .filter_map(move |ev| {
            let mut refs = vec![];
            match ev {
                Ok(watcher::Event::Apply(l)) | Ok(watcher::Event::InitApply(l)) => {
                    let key = (l.namespace().unwrap_or_default(), l.name_any());
                    if let Some(r) = owner_ref(&l) {
                        refs.push(r);
                    }
                    if let Ok(mut m) = leases.write() {
                        m.insert(key, Arc::new(l));
                    }
                }
                Ok(watcher::Event::Delete(l)) => {
                    let key = (l.namespace().unwrap_or_default(), l.name_any());
                    if let Some(r) = owner_ref(&l) {
                        refs.push(r);
                    }
                    if let Ok(mut m) = leases.write() {
                        m.remove(&key);
                    }
                }
                Ok(watcher::Event::Init) => {
                    if let Ok(mut m) = leases.write() {
                        m.clear();
                    }
                }
                Ok(watcher::Event::InitDone) => {
                    synced.store(true, std::sync::atomic::Ordering::SeqCst);
                }
                Err(e) => tracing::warn!(error = %e, "lease watch"),
            }
            futures::future::ready(Some(futures::stream::iter(refs)))
        })
        .flatten()
}

/// The lock a Lease belongs to, from the annotation stslock writes on it.
pub fn owner_ref(lease: &Lease) -> Option<ObjectRef<StatefulSetLock>> {
    let owner = lease.annotations().get(LEASE_OWNER_ANNOTATION)?;
    let (ns, name) = owner.split_once('/')?;
    Some(ObjectRef::new(name).within(ns))
}
