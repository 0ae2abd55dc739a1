//! The StatefulSets of this replica's own locks, as the two fields a decision reads (DESIGN §4:
//! full state only for the locks a replica owns). Every StatefulSet of the scope is watched
//! (one watch: its events trigger the locks that target it), but an event for a StatefulSet no
//! owned lock targets is dropped at once, as the pod index drops its pods
//! ([`super::interest`]); a lock gained later reads its StatefulSet with its Lease and pods
//! ([`super::Caches::read_around`]). Before the replica settles every StatefulSet is kept.
//!
//! Watch events, the relist and direct reads all go through here, newest resourceVersion wins.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};

use kube::ResourceExt;
use kube::runtime::watcher;

use crate::cache::fresh::rv_number;
use crate::cache::watch::CachedStatefulSet;

type SetKey = (String, String);

/// What a decision reads of a StatefulSet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SetView {
    /// `spec.replicas` (None: unset, which the API server defaults to 1).
    pub replicas: Option<i32>,
    /// `spec.selector.matchLabels`: narrows the pod list of a gained lock.
    pub match_labels: Option<BTreeMap<String, String>>,
    pub resource_version: u64,
}

impl SetView {
    pub fn of(s: &CachedStatefulSet) -> SetView {
        SetView {
            replicas: s.spec.replicas,
            match_labels: s.spec.selector.match_labels.clone(),
            resource_version: rv_number(s.metadata.resource_version.as_deref()),
        }
    }
}

fn key_of(s: &CachedStatefulSet) -> SetKey {
    (s.namespace().unwrap_or_default(), s.name_any())
}

#[derive(Default)]
struct Inner {
    sets: HashMap<SetKey, Arc<SetView>>,
    /// Listed since the last `Init`, swapped in at `InitDone`.
    buffer: super::Relist<(SetKey, Arc<SetView>)>,
    /// The newest resourceVersion of that list, kept or not: what the list shows.
    buffer_rv: u64,
    synced: bool,
}

/// Which StatefulSets are kept, by (namespace, name).
type Keep = Arc<dyn Fn(&str, &str) -> bool + Send + Sync>;

/// StatefulSets by (namespace, name).
#[derive(Clone, Default)]
pub struct SetIndex {
    inner: Arc<RwLock<Inner>>,
    /// None: every StatefulSet.
    keep: Option<Keep>,
}

impl SetIndex {
    /// Keep only the StatefulSets for which `keep(namespace, name)` holds when their event
    /// arrives.
    pub fn keeping(mut self, keep: impl Fn(&str, &str) -> bool + Send + Sync + 'static) -> Self {
        self.keep = Some(Arc::new(keep));
        self
    }

    fn keeps(&self, (ns, name): &SetKey) -> bool {
        self.keep.as_ref().is_none_or(|k| k(ns, name))
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        // Every mutation leaves the map consistent: a poisoned lock is still usable.
        self.inner.write().unwrap_or_else(|p| p.into_inner())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Apply one event of the StatefulSet watch.
    pub fn apply(&self, event: &watcher::Event<CachedStatefulSet>) {
        match event {
            watcher::Event::Init => {
                let mut inner = self.write();
                inner.buffer.begin();
                inner.buffer_rv = 0;
            }
            watcher::Event::InitApply(s) => {
                let view = Arc::new(SetView::of(s));
                let mut inner = self.write();
                inner.buffer_rv = inner.buffer_rv.max(view.resource_version);
                // Filtered when the list is complete, by what is kept then.
                inner.buffer.push((key_of(s), view));
            }
            watcher::Event::InitDone => {
                let mut inner = self.write();
                inner.synced = true;
                let list_rv = std::mem::take(&mut inner.buffer_rv);
                let listed = inner.buffer.finish();
                // What was read after the list was served stays (a gained lock's read).
                let newer: Vec<(SetKey, Arc<SetView>)> = inner
                    .sets
                    .drain()
                    .filter(|(_, v)| v.resource_version > list_rv)
                    .collect();
                for (key, view) in listed.into_iter().chain(newer) {
                    if self.keeps(&key) {
                        upsert(&mut inner, key, view);
                    }
                }
            }
            watcher::Event::Apply(s) => self.remember(s),
            watcher::Event::Delete(s) => {
                let rv = rv_number(s.metadata.resource_version.as_deref());
                let key = key_of(s);
                let mut inner = self.write();
                if inner
                    .sets
                    .get(&key)
                    .is_some_and(|v| v.resource_version <= rv)
                {
                    inner.sets.remove(&key);
                }
            }
        }
    }

    /// A StatefulSet as an event or a read showed it: kept if wanted and not older than the
    /// version held.
    pub fn remember(&self, s: &CachedStatefulSet) {
        let key = key_of(s);
        if self.keeps(&key) {
            upsert(&mut self.write(), key, Arc::new(SetView::of(s)));
        }
    }

    /// The StatefulSet is gone (a read found nothing).
    pub fn forget(&self, namespace: &str, name: &str) {
        self.write()
            .sets
            .remove(&(namespace.to_string(), name.to_string()));
    }

    pub fn get(&self, namespace: &str, name: &str) -> Option<Arc<SetView>> {
        self.read()
            .sets
            .get(&(namespace.to_string(), name.to_string()))
            .cloned()
    }

    /// Keep only the StatefulSets for which `keep(namespace, name)` holds.
    pub fn retain(&self, keep: impl Fn(&str, &str) -> bool) {
        self.write().sets.retain(|(ns, name), _| keep(ns, name));
    }

    /// Has the watch delivered its first list?
    pub fn is_synced(&self) -> bool {
        self.read().synced
    }

    pub fn len(&self) -> usize {
        self.read().sets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn upsert(inner: &mut Inner, key: SetKey, view: Arc<SetView>) {
    let older = inner
        .sets
        .get(&key)
        .is_some_and(|known| known.resource_version > view.resource_version);
    if !older {
        inner.sets.insert(key, view);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(name: &str, rv: u64, replicas: i32) -> CachedStatefulSet {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "ns", "resourceVersion": rv.to_string(),
                         "labels": {"app": name}, "annotations": {"big": "x".repeat(1024)}},
            "spec": {"replicas": replicas, "serviceName": name,
                     "selector": {"matchLabels": {"app": name}},
                     "template": {"spec": {"containers": [{"name": "c", "image": "i"}]}}},
            "status": {"replicas": replicas}
        }))
        .unwrap()
    }

    fn replicas(idx: &SetIndex, name: &str) -> Option<i32> {
        idx.get("ns", name).and_then(|v| v.replicas)
    }

    #[test]
    fn a_view_keeps_the_replicas_the_selector_and_the_version() {
        let v = SetView::of(&set("db", 7, 3));
        assert_eq!(
            v,
            SetView {
                replicas: Some(3),
                match_labels: Some([("app".to_string(), "db".to_string())].into()),
                resource_version: 7,
            }
        );
    }

    #[test]
    fn only_wanted_sets_are_kept_and_the_newest_version_wins() {
        let wanted = Arc::new(RwLock::new(vec!["a".to_string()]));
        let idx = SetIndex::default().keeping({
            let wanted = wanted.clone();
            move |_, name| wanted.read().unwrap().iter().any(|w| w == name)
        });
        idx.apply(&watcher::Event::Apply(set("a", 5, 3)));
        idx.apply(&watcher::Event::Apply(set("b", 6, 3)));
        assert_eq!((replicas(&idx, "a"), replicas(&idx, "b")), (Some(3), None));
        // An older event after a newer read changes nothing.
        idx.remember(&set("a", 9, 4));
        idx.apply(&watcher::Event::Apply(set("a", 8, 2)));
        assert_eq!(replicas(&idx, "a"), Some(4));
        // A delete older than what is held does not remove it.
        idx.apply(&watcher::Event::Delete(set("a", 8, 2)));
        assert_eq!(replicas(&idx, "a"), Some(4));
        idx.apply(&watcher::Event::Delete(set("a", 10, 4)));
        assert_eq!(replicas(&idx, "a"), None);
        // Wanted later: its next event is kept.
        wanted.write().unwrap().push("b".into());
        idx.apply(&watcher::Event::Apply(set("b", 11, 5)));
        assert_eq!(replicas(&idx, "b"), Some(5));
        idx.retain(|_, name| name != "b");
        assert!(idx.is_empty());
    }

    #[test]
    fn a_relist_replaces_the_sets_but_keeps_reads_newer_than_the_list() {
        let idx = SetIndex::default();
        idx.apply(&watcher::Event::Apply(set("gone", 3, 1)));
        idx.remember(&set("read", 20, 2));
        idx.apply(&watcher::Event::Apply(set("listed", 4, 1)));
        assert!(!idx.is_synced());
        idx.apply(&watcher::Event::Init);
        idx.apply(&watcher::Event::InitApply(set("listed", 12, 3)));
        idx.apply(&watcher::Event::InitApply(set("new", 11, 1)));
        // Before InitDone the old state is still served whole.
        assert_eq!(replicas(&idx, "gone"), Some(1));
        idx.apply(&watcher::Event::InitDone);
        assert!(idx.is_synced());
        assert_eq!(
            replicas(&idx, "gone"),
            None,
            "absent from the list: deleted"
        );
        assert_eq!(replicas(&idx, "listed"), Some(3));
        assert_eq!(replicas(&idx, "new"), Some(1));
        assert_eq!(replicas(&idx, "read"), Some(2), "read after the list: kept");
        assert_eq!(idx.len(), 3);
    }
}
