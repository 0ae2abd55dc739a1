//! Every StatefulSet of the scope, as the two fields a decision reads (DESIGN §4: a projection,
//! not the object): about 200 bytes each, against about 1.6 KB for the metadata and selector
//! maps of the decoded object this replaced. Kept for every StatefulSet, not only those of the
//! replica's own locks: a lock gained by a claim or a handoff then needs no read of its
//! StatefulSet (nor the RBAC to make one), and a set whose state no longer changes is known.
//!
//! Watch events and relists go through here, newest resourceVersion wins.

use std::collections::HashMap;
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
    /// `spec.selector.matchLabels` as a label selector (`k=v,…`; empty: none): narrows the
    /// pod list of a gained lock.
    pub match_labels: Box<str>,
    pub resource_version: u64,
}

impl SetView {
    pub fn of(s: &CachedStatefulSet) -> SetView {
        SetView {
            replicas: s.spec.replicas,
            match_labels: s
                .spec
                .selector
                .match_labels
                .iter()
                .flatten()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(",")
                .into(),
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
    /// A first list has completed: from then on a set absent here is absent from the API
    /// server as of the watch, not merely not listed yet.
    listed: bool,
}

/// StatefulSets by (namespace, name).
#[derive(Clone, Default)]
pub struct SetIndex {
    inner: Arc<RwLock<Inner>>,
}

impl SetIndex {
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
            watcher::Event::Init => self.write().buffer.begin(),
            watcher::Event::InitApply(s) => {
                let view = Arc::new(SetView::of(s));
                self.write().buffer.push((key_of(s), view));
            }
            // The list is the whole truth: a set absent from it is gone (a deletion while
            // the watch was down has no event), and nothing newer can have arrived meanwhile
            // (this watch delivers nothing else during a relist).
            watcher::Event::InitDone => {
                let mut inner = self.write();
                let listed = inner.buffer.finish();
                inner.sets = listed.into_iter().collect();
                inner.listed = true;
            }
            watcher::Event::Apply(s) => {
                upsert(&mut self.write(), key_of(s), Arc::new(SetView::of(s)));
            }
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

    pub fn get(&self, namespace: &str, name: &str) -> Option<Arc<SetView>> {
        self.read()
            .sets
            .get(&(namespace.to_string(), name.to_string()))
            .cloned()
    }

    pub fn len(&self) -> usize {
        self.read().sets.len()
    }

    /// Has the watch's first list completed? Before that, a set not here may exist.
    pub fn is_listed(&self) -> bool {
        self.read().listed
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
                     "selector": {"matchLabels": {"app": name, "tier": "db"}},
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
                match_labels: "app=db,tier=db".into(),
                resource_version: 7,
            }
        );
        let mut none = set("db", 7, 3);
        none.spec.selector.match_labels = None;
        assert_eq!(&*SetView::of(&none).match_labels, "");
    }

    #[test]
    fn the_newest_version_wins_and_an_older_delete_removes_nothing() {
        let idx = SetIndex::default();
        let apply = |s| idx.apply(&watcher::Event::Apply(s));
        apply(set("a", 9, 4));
        apply(set("a", 8, 2));
        assert_eq!(
            replicas(&idx, "a"),
            Some(4),
            "an older event changes nothing"
        );
        apply(set("a", 10, 5));
        assert_eq!(replicas(&idx, "a"), Some(5));
        idx.apply(&watcher::Event::Delete(set("a", 9, 4)));
        assert_eq!(
            replicas(&idx, "a"),
            Some(5),
            "a delete older than what is held"
        );
        idx.apply(&watcher::Event::Delete(set("a", 11, 5)));
        assert_eq!(replicas(&idx, "a"), None);
        assert!(idx.is_empty());
    }

    #[test]
    fn a_relist_replaces_the_sets_whole_when_it_completes() {
        let idx = SetIndex::default();
        idx.apply(&watcher::Event::Apply(set("gone", 3, 1)));
        idx.apply(&watcher::Event::Apply(set("listed", 4, 1)));
        idx.apply(&watcher::Event::Init);
        idx.apply(&watcher::Event::InitApply(set("listed", 12, 3)));
        idx.apply(&watcher::Event::InitApply(set("new", 11, 1)));
        // Until InitDone the old state is served whole.
        assert_eq!(
            (replicas(&idx, "gone"), replicas(&idx, "listed")),
            (Some(1), Some(1))
        );
        assert!(!idx.is_listed(), "no list has completed yet");
        idx.apply(&watcher::Event::InitDone);
        assert!(idx.is_listed());
        assert_eq!(
            replicas(&idx, "gone"),
            None,
            "absent from the list: deleted"
        );
        assert_eq!(replicas(&idx, "listed"), Some(3));
        assert_eq!(replicas(&idx, "new"), Some(1));
        assert_eq!(idx.len(), 2);
    }

    #[test]
    fn a_set_not_listed_yet_is_told_from_a_missing_one() {
        let idx = SetIndex::default();
        idx.apply(&watcher::Event::Init);
        idx.apply(&watcher::Event::InitApply(set("db", 3, 2)));
        // Its trigger may already have run a reconcile: the set is not found, but the list
        // is not complete either.
        assert_eq!(replicas(&idx, "db"), None);
        assert!(!idx.is_listed());
        idx.apply(&watcher::Event::InitDone);
        assert_eq!(replicas(&idx, "db"), Some(2));
        assert!(idx.is_listed());
        // A relist keeps it listed: the old state is served until the new list completes.
        idx.apply(&watcher::Event::Init);
        assert!(idx.is_listed());
        assert_eq!(replicas(&idx, "db"), Some(2));
    }
}
