//! Watches that keep the operator's caches and turn changes into lock keys to reconcile.
//!
//! Pods are watched once, cluster-wide, restricted to StatefulSet pods by the label every
//! StatefulSet pod carries, and kept as projections ([`PodIndex`]). Leases are watched only when
//! labelled as stslock's, so the node heartbeats in `kube-node-lease` never reach us. A change
//! to a pod, a StatefulSet or one of our Leases maps to the locks in that namespace that
//! target it.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};

use futures::{Stream, StreamExt};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};

use crate::api::{LEASE_OWNER_ANNOTATION, StatefulSetLock};
use crate::cache::pods::PodIndex;

/// Label selecting StatefulSet pods (set by the StatefulSet controller on every pod).
pub const STS_POD_LABEL: &str = "statefulset.kubernetes.io/pod-name";
/// Label stslock puts on the Leases it creates, so it can watch only those.
pub const LEASE_LABEL: &str = "app.anukkrit.me/managed-by";

/// stslock's own Leases by (namespace, name), kept by [`lease_triggers_synced`] and by the responses
/// of this replica's own Lease writes and reads ([`remember_lease`]).
pub type LeaseCache =
    Arc<std::sync::RwLock<std::collections::HashMap<(String, String), Arc<Lease>>>>;

/// Server-side timeout of every watch: a stream that went half-open is replaced within this
/// (plus the client's read timeout), not after the default five minutes.
pub const WATCH_TIMEOUT_SECONDS: u32 = 20;

/// The backoff of every watch of a replica after an error: 100 ms, doubling to 2.5 s, each
/// delay up to twice that by jitter (at most 5 s), reset by the first event that arrives (a
/// relist's start is one: failed lists are retried every 100-200 ms). kube-runtime's default
/// (client-go's: 800 ms to 30 s) costs a restarted replica a second or more per failed initial
/// list, and its Leases are due meanwhile; an apiserver in trouble still sees each watch at
/// most every few seconds.
pub fn backoff() -> kube::runtime::watcher::ExponentialBackoff {
    backon::ExponentialBuilder::default()
        .with_min_delay(std::time::Duration::from_millis(100))
        .with_max_delay(std::time::Duration::from_millis(2500))
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .into()
}

/// The controller's backoff on its merged trigger stream: none. kube-runtime's default there
/// (client-go's watch backoff: 800 ms doubling to 30 s, reset only by an event) pauses *every*
/// trigger of the replica — pod readiness, Lease events, the renewal lane's hand-offs — on each
/// error of the lock watch: after an API outage the next failover waited 0.8-3.2 s more, and a
/// restarted replica under a 30 % error rate listed its locks only after seconds, its Leases
/// lapsing meanwhile. Each watch backs off on its own ([`backoff`]); errors that reach the
/// controller only need to be logged.
pub struct NoTriggerBackoff;

impl Iterator for NoTriggerBackoff {
    type Item = std::time::Duration;

    fn next(&mut self) -> Option<std::time::Duration> {
        Some(std::time::Duration::ZERO)
    }
}

impl kube::runtime::utils::Backoff for NoTriggerBackoff {
    fn reset(&mut self) {}
}

/// A StatefulSet as the StatefulSet watch and reads decode it: its metadata, `spec.replicas`
/// and `spec.selector` (what a decision and a re-read of its pods need), so the pod template,
/// volume claim templates and status are never allocated (a full `StatefulSet` is about 2.6 KB
/// even with its template emptied). The set cache keeps less still ([`super::sets::SetView`]).
#[derive(Clone, Debug, Default, serde::Deserialize, serde::Serialize)]
pub struct CachedStatefulSet {
    pub metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    #[serde(default)]
    pub spec: CachedStatefulSetSpec,
}

#[derive(Clone, Debug, Default, serde::Deserialize, serde::Serialize)]
pub struct CachedStatefulSetSpec {
    pub replicas: Option<i32>,
    #[serde(default)]
    pub selector: k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector,
}

impl kube::Resource for CachedStatefulSet {
    type DynamicType = ();
    type Scope = k8s_openapi::NamespaceResourceScope;

    fn kind(_: &()) -> std::borrow::Cow<'_, str> {
        "StatefulSet".into()
    }
    fn group(_: &()) -> std::borrow::Cow<'_, str> {
        "apps".into()
    }
    fn version(_: &()) -> std::borrow::Cow<'_, str> {
        "v1".into()
    }
    fn plural(_: &()) -> std::borrow::Cow<'_, str> {
        "statefulsets".into()
    }
    fn meta(&self) -> &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
        &mut self.metadata
    }
}

/// What the lock watch keeps of each lock, for replica `identity` (DESIGN §4: full state only
/// for the locks a replica owns, metadata for the rest):
/// - managed fields are never read here, and on a real API server they are often most of an
///   object's metadata: dropped from every lock;
/// - a lock labelled for another replica keeps its metadata (labels, finalizers, deletion
///   time), and its spec (the rival check compares every lock's StatefulSet and Lease names),
///   but not its status, annotations or owner references. Nothing reads those of a lock this
///   replica does not own: a reconcile or renewal of a lock not labelled for this replica
///   stops at `Sharding::may_begin`, and a lock this replica gains arrives in full (the watch
///   event of the label change, the claim's or handoff's answer, the re-read that follows).
///
/// A lock with no shard label (not claimed yet, or still the Go operator's) is kept in full:
/// some replica is about to claim it.
pub fn slim_lock_for(identity: String) -> impl FnMut(&mut StatefulSetLock) + Send + 'static {
    move |l: &mut StatefulSetLock| {
        let m = &mut l.metadata;
        m.managed_fields = None;
        let foreign = m
            .labels
            .as_ref()
            .and_then(|labels| labels.get(crate::api::SHARD_LABEL))
            .is_some_and(|owner| *owner != identity);
        if foreign {
            m.annotations = None;
            m.owner_references = None;
            l.status = None;
        }
    }
}

/// The filter of the lock and StatefulSet watches: an object in a namespace the scope can
/// never include (`Scope::may_ever_allow`) is dropped before any cache sees it.
pub fn in_scope<K: kube::Resource, E>(
    scope: Arc<crate::scope::Scope>,
) -> impl FnMut(&Result<watcher::Event<K>, E>) -> std::future::Ready<bool> {
    move |ev| {
        std::future::ready(match ev {
            Ok(
                watcher::Event::Apply(o) | watcher::Event::InitApply(o) | watcher::Event::Delete(o),
            ) => scope.may_ever_allow(o.meta().namespace.as_deref().unwrap_or_default()),
            _ => true,
        })
    }
}

/// The watcher configuration every cache uses.
pub fn watch_config() -> watcher::Config {
    watcher::Config::default().timeout(WATCH_TIMEOUT_SECONDS)
}

/// Put `lease` into the cache unless the cache already has a newer version: watch events,
/// write responses and quorum reads all go through here, so the cache only moves forward.
pub fn remember_lease(cache: &LeaseCache, mut lease: Lease) {
    use crate::cache::fresh::rv_number;
    lease.metadata.managed_fields = None;
    let key = (lease.namespace().unwrap_or_default(), lease.name_any());
    if let Ok(mut m) = cache.write() {
        let newer = m.get(&key).is_none_or(|known| {
            rv_number(known.resource_version().as_deref())
                <= rv_number(lease.resource_version().as_deref())
        });
        if newer {
            m.insert(key, Arc::new(lease));
        }
    }
}

/// The Lease is gone as of resourceVersion `rv` (None: certainly gone, e.g. a 404 from a quorum
/// read): drop it unless the cache holds a newer version (a re-created Lease).
pub fn forget_lease(cache: &LeaseCache, namespace: &str, name: &str, rv: Option<&str>) {
    use crate::cache::fresh::rv_number;
    if let Ok(mut m) = cache.write() {
        let key = (namespace.to_string(), name.to_string());
        let older = m.get(&key).is_some_and(|known| {
            rv.is_none_or(|rv| {
                rv_number(known.resource_version().as_deref()) <= rv_number(Some(rv))
            })
        });
        if older {
            m.remove(&key);
        }
    }
}

type SetKey = (String, String);

/// A lock's Lease in the index: a hash of its namespace and name, not the strings (another
/// copy of every Lease name per replica for what is almost never a match); a lookup is checked
/// against the lock itself.
fn lease_hash(namespace: &str, lease: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::hash::DefaultHasher::new();
    (namespace, lease).hash(&mut h);
    h.finish()
}

#[derive(Default)]
struct LockIndexInner {
    /// (namespace, StatefulSet) → names of the locks targeting it (almost always one: a
    /// `Vec` of one name is one small allocation, a `BTreeSet` node ~270 bytes).
    by_set: HashMap<SetKey, Vec<String>>,
    /// [`lease_hash`] → names of the locks naming that Lease.
    by_lease: HashMap<u64, Vec<String>>,
    /// (namespace, lock) → its StatefulSet and its Lease's hash.
    set_of: HashMap<SetKey, (String, u64)>,
    /// Listed since the last `Init`, swapped in at `InitDone`.
    buffer: super::Relist<(SetKey, (String, u64))>,
}

/// Locks by the StatefulSet they target, kept from the lock watch: a pod or StatefulSet event
/// finds its locks without scanning every lock (at thousands of locks and hundreds of pod
/// events a second, the scan made the one pod-event stream a queue that quiet namespaces waited
/// in behind noisy ones). Also by Lease, so a reconcile finds the locks it may conflict with
/// (same StatefulSet or same Lease) without scanning every lock either.
#[derive(Clone, Default)]
pub struct LockIndex(Arc<RwLock<LockIndexInner>>);

fn remove_name<K: std::hash::Hash + Eq>(map: &mut HashMap<K, Vec<String>>, key: &K, name: &str) {
    if let Some(names) = map.get_mut(key) {
        names.retain(|n| n != name);
        if names.is_empty() {
            map.remove(key);
        }
    }
}

fn add_name<K: std::hash::Hash + Eq>(map: &mut HashMap<K, Vec<String>>, key: K, name: &str) {
    let names = map.entry(key).or_default();
    if !names.iter().any(|n| n == name) {
        names.push(name.to_string());
    }
}

impl LockIndexInner {
    fn insert(&mut self, lock: SetKey, target: (String, u64)) {
        if let Some(old) = self.set_of.insert(lock.clone(), target.clone()) {
            if old == target {
                return;
            }
            self.remove_targets(&lock, &old);
        }
        add_name(&mut self.by_lease, target.1, &lock.1);
        add_name(&mut self.by_set, (lock.0, target.0), &lock.1);
    }

    fn remove_targets(&mut self, lock: &SetKey, (set, lease): &(String, u64)) {
        remove_name(&mut self.by_set, &(lock.0.clone(), set.clone()), &lock.1);
        remove_name(&mut self.by_lease, lease, &lock.1);
    }
}

fn lock_key(l: &StatefulSetLock) -> SetKey {
    (l.namespace().unwrap_or_default(), l.name_any())
}

fn targets(l: &StatefulSetLock) -> (String, u64) {
    let ns = l.namespace().unwrap_or_default();
    (
        l.spec.stateful_set_name.clone(),
        lease_hash(&ns, &l.spec.lease_name),
    )
}

impl LockIndex {
    /// Follow one event of the lock watch.
    pub fn apply(&self, event: &watcher::Event<StatefulSetLock>) {
        let Ok(mut inner) = self.0.write() else {
            return;
        };
        match event {
            watcher::Event::Init => inner.buffer.begin(),
            watcher::Event::InitApply(l) => {
                let entry = (lock_key(l), targets(l));
                inner.buffer.push(entry);
            }
            watcher::Event::InitDone => {
                let listed = inner.buffer.finish();
                inner.by_set.clear();
                inner.by_lease.clear();
                inner.set_of.clear();
                for (lock, target) in listed {
                    inner.insert(lock, target);
                }
            }
            watcher::Event::Apply(l) => inner.insert(lock_key(l), targets(l)),
            watcher::Event::Delete(l) => {
                let lock = lock_key(l);
                if let Some(old) = inner.set_of.remove(&lock) {
                    inner.remove_targets(&lock, &old);
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

    /// The other locks of `namespace` that may target StatefulSet `statefulset` or Lease
    /// `lease`, as `lock` does: a superset (by the Lease's hash), to be checked against the
    /// locks themselves.
    pub fn may_conflict(
        &self,
        namespace: &str,
        lock: &str,
        statefulset: &str,
        lease: &str,
    ) -> Vec<ObjectRef<StatefulSetLock>> {
        // Nothing panics while holding it; were it poisoned, its maps are still whole.
        let i = self.0.read().unwrap_or_else(|p| p.into_inner());
        let by_set = i
            .by_set
            .get(&(namespace.to_string(), statefulset.to_string()));
        let by_lease = i.by_lease.get(&lease_hash(namespace, lease));
        let mut names: Vec<&String> = by_set
            .into_iter()
            .chain(by_lease)
            .flatten()
            .filter(|n| *n != lock)
            .collect();
        names.sort_unstable();
        names.dedup();
        names
            .into_iter()
            .map(|n| ObjectRef::new(n).within(namespace))
            .collect()
    }
}

/// Lock keys to reconcile because pods changed; also keeps `index` current.
pub fn pod_triggers(
    client: Client,
    index: PodIndex,
    locks: LockIndex,
    undecodable: crate::cache::lenient::Reporter,
) -> impl Stream<Item = ObjectRef<StatefulSetLock>> + Send + 'static {
    let cfg = watch_config().labels(STS_POD_LABEL);
    crate::cache::lenient::watcher::<Pod>(client, cfg, undecodable)
        .backoff(backoff())
        .filter_map(move |ev| {
            let out = match ev {
                Ok(ev) => {
                    let touched = index.apply(&ev);
                    if let watcher::Event::Apply(p) | watcher::Event::Delete(p) = &ev {
                        tracing::trace!(pod = %p.name_any(), rv = ?p.metadata.resource_version, touched = touched.len(), "pod watch event");
                    }
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

/// Lock keys to reconcile because a write's answer showed their pods changed by someone else
/// (see [`PodIndex::learned`]): the watch event that carries the change will not trigger them.
pub fn learned_triggers(
    learned: tokio::sync::mpsc::UnboundedReceiver<(String, String)>,
    locks: LockIndex,
) -> impl Stream<Item = ObjectRef<StatefulSetLock>> + Send + 'static {
    futures::stream::unfold(learned, |mut rx| async move {
        rx.recv().await.map(|set| (set, rx))
    })
    .flat_map(move |(ns, set)| {
        tracing::debug!(namespace = %ns, statefulset = %set, "a write's answer showed its pods changed; deciding again");
        futures::stream::iter(locks.locks_for_set(&ns, &set))
    })
}

/// Lock keys to reconcile because one of stslock's Leases changed (e.g. edited or deleted by
/// someone else); sets `synced` once the initial list is in the cache (readiness). Only the
/// Leases of this replica's own locks (`interest`) are kept and trigger anything.
pub fn lease_triggers_synced(
    client: Client,
    leases: LeaseCache,
    interest: Arc<crate::cache::interest::Interest>,
    synced: Arc<std::sync::atomic::AtomicBool>,
    undecodable: crate::cache::lenient::Reporter,
) -> impl Stream<Item = ObjectRef<StatefulSetLock>> + Send + 'static {
    // A relist is buffered and swapped in at InitDone (merged with anything newer this replica
    // wrote meanwhile): the cache never goes through an empty state that would look like every
    // Lease was deleted.
    let mut relist = super::Relist::<Lease>::default();
    // The newest resourceVersion of the list in progress, Leases kept or not, and the Leases
    // it had that were not kept then (a lock gained before it completes keeps its own).
    let mut list_rv = 0;
    let mut skipped: Vec<(String, String)> = vec![];
    crate::cache::lenient::watcher::<Lease>(client, watch_config().labels(LEASE_LABEL), undecodable)
        .modify(|l| l.metadata.managed_fields = None)
        .backoff(backoff())
        .filter_map(move |ev| {
            let mut refs = vec![];
            let wanted =
                |l: &Lease| interest.wants_lease(&l.namespace().unwrap_or_default(), &l.name_any());
            match ev {
                Ok(watcher::Event::Apply(l)) if wanted(&l) => {
                    // Every change triggers a reconcile, the echo of this replica's own write
                    // included. Without the echo's reconcile (tried in 9eba8d2) the CI soak's
                    // seed failed 2 runs of 2 (Leases of Ready writers lapsed, locks left
                    // unconverged); with it, it passed 4 of 4. What the echo's reconcile had
                    // covered: a plan's renewal entry counted from the end of its writes (see
                    // `reconcile_lock`), which a late watch exposes as well. With that fixed
                    // (9a757ca) the same seed passed 2 of 2 with the echo's reconcile
                    // suppressed, no Lease lapsing; it is kept as a safety net all the same.
                    if let Some(r) = owner_ref(&l) {
                        refs.push(r);
                    }
                    let (ns, name) = (l.namespace().unwrap_or_default(), l.name_any());
                    remember_lease(&leases, l);
                    // Its lock given up since `wanted` was asked: that give-up may have
                    // dropped the Lease before it was stored here.
                    if !interest.wants_lease(&ns, &name) {
                        forget_lease(&leases, &ns, &name, None);
                    }
                }
                Ok(watcher::Event::InitApply(l)) => {
                    list_rv = list_rv.max(crate::cache::fresh::rv_number(
                        l.resource_version().as_deref(),
                    ));
                    if wanted(&l) {
                        relist.push(l);
                    } else {
                        skipped.push((l.namespace().unwrap_or_default(), l.name_any()));
                    }
                }
                // Another replica's lock: not kept.
                Ok(watcher::Event::Apply(_)) => {}
                Ok(watcher::Event::Delete(l)) => {
                    if let Some(r) = owner_ref(&l) {
                        refs.push(r);
                    }
                    forget_lease(
                        &leases,
                        &l.namespace().unwrap_or_default(),
                        &l.name_any(),
                        l.resource_version().as_deref(),
                    );
                }
                Ok(watcher::Event::Init) => {
                    relist.begin();
                    list_rv = 0;
                    skipped.clear();
                }
                Ok(watcher::Event::InitDone) => {
                    // Given up while the list came in: not kept.
                    let listed: Vec<Lease> =
                        relist.finish().into_iter().filter(|l| wanted(l)).collect();
                    refs.extend(listed.iter().filter_map(owner_ref));
                    // Gained meanwhile: the list's version was dropped, the re-read that came
                    // with the gain stays.
                    let gained: HashSet<(String, String)> = std::mem::take(&mut skipped)
                        .into_iter()
                        .filter(|(ns, name)| interest.wants_lease(ns, name))
                        .collect();
                    swap_in(
                        &leases,
                        listed,
                        std::mem::take(&mut list_rv),
                        &interest,
                        &gained,
                        &mut refs,
                    );
                    synced.store(true, std::sync::atomic::Ordering::SeqCst);
                }
                Err(e) => tracing::warn!(error = %e, "lease watch"),
            }
            futures::future::ready(Some(futures::stream::iter(refs)))
        })
        .flatten()
}

/// Replace the cache with a relist (of the Leases `interest` keeps; `list_rv`: the newest
/// version of everything listed), keeping entries newer than the list (written by this replica
/// after the list was served); kept Leases that disappeared trigger their locks.
fn swap_in(
    cache: &LeaseCache,
    listed: Vec<Lease>,
    list_rv: u64,
    interest: &crate::cache::interest::Interest,
    gained: &HashSet<(String, String)>,
    refs: &mut Vec<ObjectRef<StatefulSetLock>>,
) {
    use crate::cache::fresh::rv_number;
    let Ok(mut m) = cache.write() else { return };
    let old = std::mem::take(&mut *m);
    for l in listed {
        m.insert(
            (l.namespace().unwrap_or_default(), l.name_any()),
            Arc::new(l),
        );
    }
    for (key, known) in old {
        let known_rv = rv_number(known.resource_version().as_deref());
        match m.get(&key) {
            Some(listed) if rv_number(listed.resource_version().as_deref()) >= known_rv => {}
            // Read when its lock was gained while the list came in (the list's version was
            // not kept), or written by this replica after the list was served: keep it.
            None if gained.contains(&key) => {
                if let Some(r) = owner_ref(&known) {
                    refs.push(r);
                }
                m.insert(key, known);
            }
            _ if known_rv > list_rv => {
                m.insert(key, known);
            }
            Some(_) => {}
            // A Lease of a lock given up: not a disappearance.
            None if !interest.wants_lease(&key.0, &key.1) => {}
            None => {
                if let Some(r) = owner_ref(&known) {
                    refs.push(r);
                }
            }
        }
    }
    // Locks given up after the list was filtered: their give-up, which drops their Leases
    // only after taking this cache, may have come before this swap.
    m.retain(|(ns, name), _| interest.wants_lease(ns, name));
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

    /// The locks a reconcile must compare with: those on the same StatefulSet or the same
    /// Lease, in the same namespace, itself excluded; followed through edits, deletes, relists.
    #[test]
    fn lock_index_finds_the_locks_that_may_conflict() {
        let with_lease = |name: &str, set: &str, lease: &str| {
            let mut l = lock(name, set);
            l.spec.lease_name = lease.into();
            l
        };
        let idx = LockIndex::default();
        let rivals = |name: &str, set: &str, lease: &str| -> Vec<String> {
            idx.may_conflict("ns", name, set, lease)
                .into_iter()
                .map(|r| {
                    assert_eq!(r.namespace.as_deref(), Some("ns"));
                    r.name
                })
                .collect()
        };
        idx.apply(&watcher::Event::Apply(with_lease("a", "db", "shared")));
        idx.apply(&watcher::Event::Apply(with_lease("b", "db", "b-lease")));
        idx.apply(&watcher::Event::Apply(with_lease("c", "other", "shared")));
        idx.apply(&watcher::Event::Apply(with_lease("d", "quiet", "d-lease")));
        let mut elsewhere = with_lease("e", "db", "shared");
        elsewhere.metadata.namespace = Some("ns2".into());
        idx.apply(&watcher::Event::Apply(elsewhere));
        assert_eq!(rivals("a", "db", "shared"), ["b", "c"]);
        assert_eq!(rivals("b", "db", "b-lease"), ["a"]);
        assert_eq!(rivals("c", "other", "shared"), ["a"]);
        assert!(rivals("d", "quiet", "d-lease").is_empty());
        // Both StatefulSet and Lease shared: named once.
        idx.apply(&watcher::Event::Apply(with_lease("b", "db", "shared")));
        assert_eq!(rivals("a", "db", "shared"), ["b", "c"]);
        // An edit moves a lock off both; a delete drops it.
        idx.apply(&watcher::Event::Apply(with_lease("b", "quiet", "b-lease")));
        assert_eq!(rivals("a", "db", "shared"), ["c"]);
        assert_eq!(rivals("d", "quiet", "d-lease"), ["b"]);
        idx.apply(&watcher::Event::Delete(with_lease("c", "other", "shared")));
        assert!(rivals("a", "db", "shared").is_empty());
        // A relist replaces everything.
        idx.apply(&watcher::Event::Init);
        idx.apply(&watcher::Event::InitApply(with_lease("a", "db", "shared")));
        idx.apply(&watcher::Event::InitApply(with_lease("f", "x", "shared")));
        idx.apply(&watcher::Event::InitDone);
        assert_eq!(rivals("a", "db", "shared"), ["f"]);
        assert!(rivals("d", "quiet", "d-lease").is_empty());
    }

    /// A lock labelled for another replica is kept as metadata and spec; this replica's own
    /// locks and unclaimed ones are kept whole (minus managed fields).
    #[test]
    fn only_other_replicas_locks_are_slimmed() {
        let with = |label: Option<&str>| {
            let mut l = lock("a", "db");
            l.metadata.labels = label.map(|o| {
                [
                    (crate::api::SHARD_LABEL.to_string(), o.to_string()),
                    ("team".to_string(), "x".to_string()),
                ]
                .into()
            });
            l.metadata.annotations = Some([("note".to_string(), "kept?".to_string())].into());
            l.metadata.finalizers = Some(vec![crate::api::FINALIZER.to_string()]);
            l.metadata.managed_fields = Some(vec![Default::default()]);
            l.status = Some(crate::api::StatefulSetLockStatus {
                writer_pod: Some("db-0".into()),
                highest_epoch: Some(7),
                ..Default::default()
            });
            l
        };
        let mut slim = slim_lock_for("r0".to_string());
        for label in [Some("r0"), None] {
            let mut l = with(label);
            slim(&mut l);
            assert!(l.metadata.managed_fields.is_none(), "{label:?}");
            assert!(l.metadata.annotations.is_some(), "{label:?}");
            let st = l.status.as_ref().unwrap();
            assert_eq!(
                (st.writer_pod.as_deref(), st.highest_epoch),
                (Some("db-0"), Some(7)),
                "{label:?}"
            );
        }
        let mut other = with(Some("r1"));
        slim(&mut other);
        assert!(other.status.is_none());
        assert!(other.metadata.annotations.is_none());
        assert!(other.metadata.managed_fields.is_none());
        // What ownership, the rival check and deletion read stays.
        assert_eq!(
            other
                .labels()
                .get(crate::api::SHARD_LABEL)
                .map(String::as_str),
            Some("r1")
        );
        assert_eq!(other.labels().get("team").map(String::as_str), Some("x"));
        assert_eq!(other.finalizers(), [crate::api::FINALIZER]);
        assert_eq!(other.spec.stateful_set_name, "db");
        assert_eq!(other.spec.lease_name, "a-lease");
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

    fn lease(name: &str, rv: u64, owner: &str) -> Lease {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "ns", "resourceVersion": rv.to_string(),
                         "annotations": {LEASE_OWNER_ANNOTATION: format!("ns/{owner}")}},
            "spec": {"holderIdentity": "db-0"}
        }))
        .unwrap()
    }

    #[test]
    fn a_lease_relist_keeps_the_leases_of_own_locks_and_what_a_gain_read_meanwhile() {
        let interest = crate::cache::interest::Interest::default();
        interest.settle([]);
        let cache: LeaseCache = Arc::default();
        // Own locks a, b, c (Leases la, lb, lc); d is another replica's.
        for (l, le) in [("a", "la"), ("b", "lb"), ("c", "lc")] {
            let mut lk = lock(l, "db");
            lk.spec.lease_name = le.into();
            interest.gain(&lk);
        }
        remember_lease(&cache, lease("la", 10, "a")); // listed again, newer: replaced
        remember_lease(&cache, lease("lb", 20, "b")); // gone from the list: deleted
        remember_lease(&cache, lease("lc", 30, "c")); // gained while the list came in
        let gained: HashSet<(String, String)> = [("ns".to_string(), "lc".to_string())].into();
        let mut refs = vec![];
        swap_in(
            &cache,
            vec![lease("la", 40, "a")],
            100,
            &interest,
            &gained,
            &mut refs,
        );
        let m = cache.read().unwrap();
        let rv = |n: &str| {
            m.get(&("ns".to_string(), n.to_string()))
                .and_then(|l| l.resource_version())
        };
        assert_eq!(rv("la").as_deref(), Some("40"));
        assert_eq!(rv("lb"), None, "absent from a newer list: deleted");
        assert_eq!(rv("lc").as_deref(), Some("30"), "read by the gain: kept");
        let mut names: Vec<&str> = refs.iter().map(|r| r.name.as_str()).collect();
        names.sort_unstable();
        assert_eq!(
            names,
            ["b", "c"],
            "the deleted one and the gained one are decided again"
        );
    }

    #[test]
    fn a_statefulset_decodes_as_what_decisions_read() {
        let s: CachedStatefulSet = serde_json::from_value(serde_json::json!({
            "apiVersion": "apps/v1", "kind": "StatefulSet",
            "metadata": {"name": "db", "namespace": "ns", "uid": "u", "resourceVersion": "7",
                         "labels": {"app": "db"}, "annotations": {"big": "x".repeat(4096)},
                         "managedFields": [{"manager": "kubectl", "operation": "Update"}]},
            "spec": {"replicas": 3, "serviceName": "db",
                     "selector": {"matchLabels": {"app": "db"}},
                     "template": {"metadata": {"labels": {"app": "db"}},
                                  "spec": {"containers": [{"name": "c", "image": "postgres:15"}]}},
                     "volumeClaimTemplates": [{"metadata": {"name": "data"}}]},
            "status": {"replicas": 3, "readyReplicas": 2}
        }))
        .unwrap();
        assert_eq!(s.spec.replicas, Some(3));
        assert_eq!(
            s.spec.selector.match_labels,
            Some([("app".to_string(), "db".to_string())].into())
        );
        assert_eq!(
            (s.name_any(), s.namespace()),
            ("db".into(), Some("ns".into()))
        );
        assert_eq!(s.resource_version().as_deref(), Some("7"));
        // Nothing else was decoded: a fraction of the full type's inline size.
        assert!(
            std::mem::size_of::<CachedStatefulSet>()
                < std::mem::size_of::<k8s_openapi::api::apps::v1::StatefulSet>() / 2,
            "{} vs {}",
            std::mem::size_of::<CachedStatefulSet>(),
            std::mem::size_of::<k8s_openapi::api::apps::v1::StatefulSet>()
        );
        // The API's path for it is the StatefulSet's.
        assert_eq!(
            <CachedStatefulSet as kube::Resource>::url_path(&(), Some("ns")),
            "/apis/apps/v1/namespaces/ns/statefulsets"
        );
    }
}
