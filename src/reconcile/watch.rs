//! Watches that keep the operator's caches and turn changes into lock keys to reconcile.
//!
//! Pods are watched once, cluster-wide, restricted to StatefulSet pods by the label every
//! StatefulSet pod carries, and kept as projections ([`PodIndex`]). Leases are watched only when
//! labelled as stslock's, so the node heartbeats in `kube-node-lease` never reach us. A change
//! to a pod, a StatefulSet or one of our Leases maps to the locks in that namespace that
//! target it.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, RwLock};

use futures::{Stream, StreamExt};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::reflector::ObjectRef;
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

type SetKey = (String, String);

#[derive(Default)]
struct LockIndexInner {
    /// (namespace, StatefulSet) → names of the locks targeting it.
    by_set: HashMap<SetKey, BTreeSet<String>>,
    /// (namespace, lock) → its StatefulSet.
    set_of: HashMap<SetKey, String>,
    /// Listed since the last `Init`, swapped in at `InitDone`.
    buffer: Option<Vec<(SetKey, String)>>,
}

/// Locks by the StatefulSet they target, kept from the lock watch: a pod or StatefulSet event
/// finds its locks without scanning every lock (at thousands of locks and hundreds of pod
/// events a second, the scan made the one pod-event stream a queue that quiet namespaces waited
/// in behind noisy ones).
#[derive(Clone, Default)]
pub struct LockIndex(Arc<RwLock<LockIndexInner>>);

impl LockIndexInner {
    fn insert(&mut self, lock: SetKey, set: String) {
        if let Some(old) = self.set_of.insert(lock.clone(), set.clone())
            && old != set
        {
            self.remove_from_set(&lock, &old);
        }
        self.by_set
            .entry((lock.0.clone(), set))
            .or_default()
            .insert(lock.1);
    }

    fn remove_from_set(&mut self, lock: &SetKey, set: &str) {
        let key = (lock.0.clone(), set.to_string());
        if let Some(names) = self.by_set.get_mut(&key) {
            names.remove(&lock.1);
            if names.is_empty() {
                self.by_set.remove(&key);
            }
        }
    }
}

fn lock_key(l: &StatefulSetLock) -> SetKey {
    (l.namespace().unwrap_or_default(), l.name_any())
}

impl LockIndex {
    /// Follow one event of the lock watch.
    pub fn apply(&self, event: &watcher::Event<StatefulSetLock>) {
        let Ok(mut inner) = self.0.write() else {
            return;
        };
        match event {
            watcher::Event::Init => inner.buffer = Some(Vec::new()),
            watcher::Event::InitApply(l) => {
                let entry = (lock_key(l), l.spec.stateful_set_name.clone());
                inner.buffer.get_or_insert_with(Vec::new).push(entry);
            }
            watcher::Event::InitDone => {
                let listed = inner.buffer.take().unwrap_or_default();
                inner.by_set.clear();
                inner.set_of.clear();
                for (lock, set) in listed {
                    inner.insert(lock, set);
                }
            }
            watcher::Event::Apply(l) => inner.insert(lock_key(l), l.spec.stateful_set_name.clone()),
            watcher::Event::Delete(l) => {
                let lock = lock_key(l);
                if let Some(set) = inner.set_of.remove(&lock) {
                    inner.remove_from_set(&lock, &set);
                }
            }
        }
    }

    /// Locks in `namespace` whose StatefulSet is `statefulset`.
    pub fn locks_for_set(
        &self,
        namespace: &str,
        statefulset: &str,
    ) -> Vec<ObjectRef<StatefulSetLock>> {
        self.0
            .read()
            .ok()
            .and_then(|i| {
                i.by_set
                    .get(&(namespace.to_string(), statefulset.to_string()))
                    .map(|names| {
                        names
                            .iter()
                            .map(|n| ObjectRef::new(n).within(namespace))
                            .collect()
                    })
            })
            .unwrap_or_default()
    }
}

/// Lock keys to reconcile because pods changed; also keeps `index` current.
pub fn pod_triggers(
    client: Client,
    index: PodIndex,
    locks: LockIndex,
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
                        for r in locks.locks_for_set(&ns, &set) {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn lock(name: &str, set: &str) -> StatefulSetLock {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "app.anukkrit.me/v1", "kind": "StatefulSetLock",
            "metadata": {"name": name, "namespace": "ns"},
            "spec": {"statefulSetName": set, "leaseName": format!("{name}-lease"), "leaseDurationSeconds": 30}
        }))
        .unwrap()
    }

    fn names(idx: &LockIndex, set: &str) -> Vec<String> {
        idx.locks_for_set("ns", set)
            .into_iter()
            .map(|r| r.name)
            .collect()
    }

    #[test]
    fn lock_index_follows_the_watch_and_relists() {
        let idx = LockIndex::default();
        idx.apply(&watcher::Event::Init);
        idx.apply(&watcher::Event::InitApply(lock("a", "db")));
        assert!(names(&idx, "db").is_empty(), "not before InitDone");
        idx.apply(&watcher::Event::InitDone);
        assert_eq!(names(&idx, "db"), ["a"]);
        idx.apply(&watcher::Event::Apply(lock("b", "db")));
        idx.apply(&watcher::Event::Apply(lock("c", "other")));
        assert_eq!(names(&idx, "db"), ["a", "b"]);
        idx.apply(&watcher::Event::Apply(lock("b", "moved")));
        assert_eq!(names(&idx, "db"), ["a"]);
        assert_eq!(names(&idx, "moved"), ["b"]);
        idx.apply(&watcher::Event::Delete(lock("a", "db")));
        assert!(names(&idx, "db").is_empty());
        assert!(idx.locks_for_set("elsewhere", "moved").is_empty());
        // A relist replaces everything: c is gone, d is new.
        idx.apply(&watcher::Event::Init);
        idx.apply(&watcher::Event::InitApply(lock("b", "moved")));
        idx.apply(&watcher::Event::InitApply(lock("d", "db")));
        assert_eq!(names(&idx, "other"), ["c"], "old view kept until InitDone");
        idx.apply(&watcher::Event::InitDone);
        assert!(names(&idx, "other").is_empty());
        assert_eq!(names(&idx, "db"), ["d"]);
        assert_eq!(names(&idx, "moved"), ["b"]);
    }
}
