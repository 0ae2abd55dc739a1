//! The pod index: every StatefulSet pod in the cluster as a compact projection, grouped by
//! (namespace, StatefulSet).
//!
//! Pods are the largest objects the operator watches and there are many of them, so only the
//! fields election needs are kept — never the full Pod. The index is fed by one cluster-wide
//! watch restricted to StatefulSet pods (label `statefulset.kubernetes.io/pod-name`), and
//! keeps from it only the pods of the StatefulSets its replica's own locks target
//! ([`PodIndex::keeping`], see `cache::interest`); write answers and quorum reads, which are
//! made for owned locks, always go in.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::runtime::watcher;

use crate::api::EPOCH_ANNOTATION;

/// What election needs to know about a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodProjection {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub statefulset: String,
    pub ordinal: Option<u32>,
    pub ready: bool,
    /// lastTransitionTime of the Ready condition.
    pub ready_transition: Option<jiff::Timestamp>,
    pub terminating: bool,
    pub role: Option<String>,
    pub epoch: Option<u64>,
    /// The version this projection was made from: the index only moves forward.
    pub resource_version: u64,
}

impl PodProjection {
    /// Does `other` say anything different to election (the resourceVersion aside)?
    fn same_as(&self, other: &PodProjection) -> bool {
        PodProjection {
            resource_version: other.resource_version,
            ..self.clone()
        } == *other
    }

    /// Does `other` differ in anything but what the operator itself writes on a pod (its role
    /// label and epoch annotation)?
    fn differs_beyond_role(&self, other: &PodProjection) -> bool {
        !PodProjection {
            resource_version: other.resource_version,
            role: other.role.clone(),
            epoch: other.epoch,
            ..self.clone()
        }
        .eq(other)
    }
}

impl PodProjection {
    /// None for pods not controlled by a StatefulSet.
    pub fn from_pod(pod: &Pod, role_label: &str) -> Option<PodProjection> {
        let owner = pod
            .owner_references()
            .iter()
            .find(|o| o.controller == Some(true) && o.kind == "StatefulSet")?;
        let name = pod.name_any();
        let ordinal = name
            .strip_prefix(&owner.name)
            .and_then(|s| s.strip_prefix('-'))
            .and_then(|s| s.parse().ok());
        let ready_cond = pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"));
        Some(PodProjection {
            namespace: pod.namespace().unwrap_or_default(),
            uid: pod.uid().unwrap_or_default(),
            statefulset: owner.name.clone(),
            ordinal,
            ready: ready_cond.is_some_and(|c| c.status == "True"),
            ready_transition: ready_cond
                .and_then(|c| c.last_transition_time.as_ref())
                .map(|t| t.0),
            terminating: pod.metadata.deletion_timestamp.is_some(),
            role: pod.labels().get(role_label).cloned(),
            epoch: pod
                .annotations()
                .get(EPOCH_ANNOTATION)
                .and_then(|e| e.parse().ok()),
            resource_version: crate::cache::fresh::rv_number(
                pod.metadata.resource_version.as_deref(),
            ),
            name,
        })
    }
}

type SetKey = (String, String);

#[derive(Default)]
struct Inner {
    sets: HashMap<SetKey, BTreeMap<String, Arc<PodProjection>>>,
    /// Pod (namespace, name) → its set, to find it again on deletion.
    pods: HashMap<(String, String), SetKey>,
    /// Objects listed since the last `Init`, swapped in at `InitDone`.
    buffer: super::Relist<Arc<PodProjection>>,
    /// The newest resourceVersion of that list, kept pods or not: what the list shows.
    buffer_rv: u64,
    /// The initial list has been delivered (readiness).
    synced: bool,
    /// When this index saw a Ready pod turn NotReady, by (namespace, name): the condition's
    /// lastTransitionTime has only second precision, too coarse to time sub-second failovers.
    not_ready_seen: HashMap<(String, String), jiff::Timestamp>,
}

/// Which watched pods the index keeps, by (namespace, StatefulSet).
type Keep = Arc<dyn Fn(&str, &str) -> bool + Send + Sync>;

/// Cluster-wide index of StatefulSet pods.
#[derive(Clone)]
pub struct PodIndex {
    role_label: String,
    inner: Arc<RwLock<Inner>>,
    /// None: every watched pod.
    keep: Option<Keep>,
    /// Where [`PodIndex::remember`] reports StatefulSets whose pods a write's answer showed in
    /// a new state (see [`PodIndex::learned`]).
    learned: Arc<std::sync::Mutex<Option<tokio::sync::mpsc::UnboundedSender<SetKey>>>>,
}

impl PodIndex {
    pub fn new(role_label: impl Into<String>) -> Self {
        PodIndex {
            role_label: role_label.into(),
            inner: Arc::default(),
            keep: None,
            learned: Arc::default(),
        }
    }

    /// Keep only the watched pods of StatefulSets for which `keep(namespace, statefulset)`
    /// holds when their event arrives (the others are dropped at once).
    pub fn keeping(mut self, keep: impl Fn(&str, &str) -> bool + Send + Sync + 'static) -> Self {
        self.keep = Some(Arc::new(keep));
        self
    }

    fn keeps(&self, p: &PodProjection) -> bool {
        self.keep
            .as_ref()
            .is_none_or(|k| k(&p.namespace, &p.statefulset))
    }

    /// Keep only the pods of the StatefulSets for which `keep(namespace, statefulset)` holds.
    pub fn retain_sets(&self, keep: impl Fn(&str, &str) -> bool) {
        let mut inner = self.write();
        let gone: Vec<SetKey> = inner
            .sets
            .keys()
            .filter(|(ns, set)| !keep(ns, set))
            .cloned()
            .collect();
        for key in gone {
            if let Some(pods) = inner.sets.remove(&key) {
                for name in pods.into_keys() {
                    let id = (key.0.clone(), name);
                    inner.pods.remove(&id);
                    inner.not_ready_seen.remove(&id);
                }
            }
        }
    }

    /// Drop every pod of one StatefulSet (its lock was given up).
    pub fn drop_set(&self, namespace: &str, statefulset: &str) {
        let mut inner = self.write();
        let names: Vec<String> = inner
            .sets
            .get(&(namespace.to_string(), statefulset.to_string()))
            .map(|s| s.keys().cloned().collect())
            .unwrap_or_default();
        for name in names {
            remove_locked(&mut inner, namespace, &name, None);
        }
    }

    /// The StatefulSets whose pods a write's answer showed changed by someone else since the
    /// index last saw them (a pod Ready by now, restarted, terminating): the index takes that
    /// newer state from the answer, so the watch event that carries it later is no change
    /// and triggers nothing — these must be decided again from here. One subscriber; a new
    /// one replaces the last.
    pub fn learned(&self) -> tokio::sync::mpsc::UnboundedReceiver<SetKey> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        *self.learned.lock().unwrap_or_else(|p| p.into_inner()) = Some(tx);
        rx
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        // Every mutation below leaves the maps consistent, so a poisoned lock is still usable.
        self.inner.write().unwrap_or_else(|p| p.into_inner())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Has the pod watch delivered its initial list (so the index is complete)?
    pub fn is_synced(&self) -> bool {
        self.read().synced
    }

    /// Apply one watcher event; returns the StatefulSets whose pods changed (namespace, name).
    pub fn apply(&self, event: &watcher::Event<Pod>) -> Vec<SetKey> {
        let mut inner = self.write();
        match event {
            watcher::Event::Init => {
                inner.buffer.begin();
                inner.buffer_rv = 0;
                vec![]
            }
            watcher::Event::InitApply(p) => {
                let rv = crate::cache::fresh::rv_number(p.metadata.resource_version.as_deref());
                inner.buffer_rv = inner.buffer_rv.max(rv);
                // Filtered when the list is complete, by what is kept then: a lock gained
                // while the list comes in keeps its pods from it.
                if let Some(proj) = PodProjection::from_pod(p, &self.role_label) {
                    inner.buffer.push(Arc::new(proj));
                }
                vec![]
            }
            watcher::Event::InitDone => {
                inner.synced = true;
                let listed: Vec<Arc<PodProjection>> = inner
                    .buffer
                    .finish()
                    .into_iter()
                    .filter(|p| self.keeps(p))
                    .collect();
                // Of everything listed, not only the pods kept: a pod kept at a version
                // older than the list and absent from it is gone.
                let list_rv = std::mem::take(&mut inner.buffer_rv);
                let mut touched: Vec<SetKey> = inner.sets.keys().cloned().collect();
                // Versions this replica wrote (or read) after the list was served stay.
                let newer: Vec<Arc<PodProjection>> = inner
                    .sets
                    .values()
                    .flat_map(|s| s.values())
                    .filter(|p| p.resource_version > list_rv && self.keeps(p))
                    .cloned()
                    .collect();
                inner.sets.clear();
                inner.pods.clear();
                for p in listed.into_iter().chain(newer) {
                    let key = (p.namespace.clone(), p.statefulset.clone());
                    touched.push(key.clone());
                    upsert(&mut inner, key, p);
                }
                let Inner {
                    pods,
                    not_ready_seen,
                    ..
                } = &mut *inner;
                not_ready_seen.retain(|id, _| pods.contains_key(id));
                touched.sort();
                touched.dedup();
                touched
            }
            watcher::Event::Apply(p) => match PodProjection::from_pod(p, &self.role_label) {
                Some(proj) if self.keeps(&proj) => Self::upsert_projection(&mut inner, proj),
                _ => vec![],
            },
            watcher::Event::Delete(p) => {
                let rv = crate::cache::fresh::rv_number(p.metadata.resource_version.as_deref());
                remove_locked(
                    &mut inner,
                    &p.namespace().unwrap_or_default(),
                    &p.name_any(),
                    Some(rv),
                )
            }
        }
    }

    /// A pod as a write's answer returned it: into the index unless the index already has a
    /// newer version. When it shows the pod changed in more than the role and epoch the
    /// operator writes, its StatefulSet is reported to [`PodIndex::learned`].
    pub fn remember(&self, pod: &Pod) {
        let news = {
            let mut inner = self.write();
            let Some(now) = PodProjection::from_pod(pod, &self.role_label) else {
                return;
            };
            let old = indexed(&inner, &now.namespace, &now.name);
            let touched = Self::upsert_projection(&mut inner, now.clone());
            (!touched.is_empty() && old.is_none_or(|old| old.differs_beyond_role(&now)))
                .then_some((now.namespace, now.statefulset))
        };
        if let Some(set) = news
            && let Some(tx) = &*self.learned.lock().unwrap_or_else(|p| p.into_inner())
        {
            let _ = tx.send(set);
        }
    }

    /// A quorum read found the pod gone.
    pub fn forget(&self, namespace: &str, name: &str) {
        let mut inner = self.write();
        remove_locked(&mut inner, namespace, name, None);
    }

    /// The pods of one StatefulSet as a quorum LIST returned them (at `list_rv`): each listed
    /// pod goes in (unless newer is known), and pods of the set the list no longer has are
    /// gone unless known at a version newer than the list.
    pub fn replace_set(&self, namespace: &str, statefulset: &str, pods: &[Pod], list_rv: u64) {
        let mut inner = self.write();
        let mut listed = std::collections::HashSet::new();
        for p in pods {
            listed.insert(p.name_any());
            self.upsert_locked(&mut inner, p);
        }
        let stale: Vec<String> = inner
            .sets
            .get(&(namespace.to_string(), statefulset.to_string()))
            .map(|s| {
                s.values()
                    .filter(|p| !listed.contains(&p.name) && p.resource_version <= list_rv)
                    .map(|p| p.name.clone())
                    .collect()
            })
            .unwrap_or_default();
        for name in stale {
            remove_locked(&mut inner, namespace, &name, None);
        }
    }

    fn upsert_locked(&self, inner: &mut Inner, p: &Pod) -> Vec<SetKey> {
        match PodProjection::from_pod(p, &self.role_label) {
            Some(proj) => Self::upsert_projection(inner, proj),
            None => vec![],
        }
    }

    /// Put one projection into the index; returns the sets touched.
    fn upsert_projection(inner: &mut Inner, proj: PodProjection) -> Vec<SetKey> {
        let key = (proj.namespace.clone(), proj.statefulset.clone());
        let id = (proj.namespace.clone(), proj.name.clone());
        let old = indexed(inner, &proj.namespace, &proj.name);
        // A watch that lags behind what a write response or a fresh read already showed
        // must not take the index back.
        if old
            .as_ref()
            .is_some_and(|o| o.resource_version > proj.resource_version)
        {
            return vec![];
        }
        let changed = old.as_ref().is_none_or(|old| !old.same_as(&proj));
        if proj.ready {
            inner.not_ready_seen.remove(&id);
        } else if old.as_ref().is_some_and(|o| o.ready && o.uid == proj.uid) {
            inner.not_ready_seen.insert(id, jiff::Timestamp::now());
        }
        let mut touched = vec![];
        if let Some(o) = &old
            && o.statefulset != proj.statefulset
        {
            touched.extend(remove_locked(inner, &o.namespace, &o.name, None));
        }
        upsert(inner, key.clone(), Arc::new(proj));
        if changed {
            touched.push(key);
        }
        touched
    }

    /// The pods of one StatefulSet, by name.
    pub fn pods_of(&self, namespace: &str, statefulset: &str) -> Vec<Arc<PodProjection>> {
        self.read()
            .sets
            .get(&(namespace.to_string(), statefulset.to_string()))
            .map(|s| s.values().cloned().collect())
            .unwrap_or_default()
    }

    /// When this index saw the pod go from Ready to NotReady (None if it was never seen Ready,
    /// e.g. NotReady already in the initial list, or is Ready now).
    pub fn not_ready_seen_at(&self, namespace: &str, name: &str) -> Option<jiff::Timestamp> {
        self.read()
            .not_ready_seen
            .get(&(namespace.to_string(), name.to_string()))
            .copied()
    }

    pub fn len(&self) -> usize {
        self.read().pods.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The pod `namespace/name` as the index has it.
fn indexed(inner: &Inner, namespace: &str, name: &str) -> Option<Arc<PodProjection>> {
    inner
        .pods
        .get(&(namespace.to_string(), name.to_string()))
        .and_then(|k| inner.sets.get(k))
        .and_then(|s| s.get(name))
        .cloned()
}

fn upsert(inner: &mut Inner, key: SetKey, p: Arc<PodProjection>) {
    inner
        .pods
        .insert((p.namespace.clone(), p.name.clone()), key.clone());
    inner.sets.entry(key).or_default().insert(p.name.clone(), p);
}

/// Remove a pod (as of `rv`: not when the index knows a newer version of that name, i.e. a
/// recreated pod); returns its set.
fn remove_locked(inner: &mut Inner, namespace: &str, name: &str, rv: Option<u64>) -> Vec<SetKey> {
    let id = (namespace.to_string(), name.to_string());
    let Some(key) = inner.pods.get(&id).cloned() else {
        return vec![];
    };
    if let Some(rv) = rv
        && inner
            .sets
            .get(&key)
            .and_then(|s| s.get(name))
            .is_some_and(|p| p.resource_version > rv)
    {
        return vec![];
    }
    inner.pods.remove(&id);
    inner.not_ready_seen.remove(&id);
    if let Some(set) = inner.sets.get_mut(&key) {
        set.remove(name);
        if set.is_empty() {
            inner.sets.remove(&key);
        }
    }
    vec![key]
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(name: &str, ready: bool, role: Option<&str>) -> Pod {
        let mut labels = json!({"app": "db"});
        if let Some(r) = role {
            labels["sts-role"] = json!(r);
        }
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "ns", "uid": format!("uid-{name}"), "labels": labels,
                "annotations": {"app.anukkrit.me/writer-epoch": "4"},
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "db", "uid": "s", "controller": true}]},
            "spec": {"containers": []},
            "status": {"conditions": [{"type": "Ready", "status": if ready {"True"} else {"False"}, "lastTransitionTime": "2026-01-01T00:00:00Z"}]}
        }))
        .expect("pod")
    }

    fn with_rv(mut p: Pod, rv: u64) -> Pod {
        p.metadata.resource_version = Some(rv.to_string());
        p
    }

    #[test]
    fn keeps_only_the_pods_of_wanted_statefulsets_and_drops_a_set_given_up() {
        let wanted = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let idx = PodIndex::new("sts-role").keeping({
            let wanted = wanted.clone();
            move |ns, set| {
                ns == "ns" && set == "db" && wanted.load(std::sync::atomic::Ordering::SeqCst)
            }
        });
        idx.apply(&watcher::Event::Init);
        idx.apply(&watcher::Event::InitApply(with_rv(
            pod("db-0", true, None),
            5,
        )));
        idx.apply(&watcher::Event::InitDone);
        assert!(idx.is_empty(), "not wanted: dropped at the list");
        assert!(
            idx.apply(&watcher::Event::Apply(with_rv(pod("db-0", false, None), 6)))
                .is_empty()
        );
        assert!(idx.is_empty(), "not wanted: dropped at an event");
        // Wanted from now on (the lock was gained and is about to be re-read).
        wanted.store(true, std::sync::atomic::Ordering::SeqCst);
        idx.apply(&watcher::Event::Apply(with_rv(
            pod("db-0", true, Some("writer")),
            7,
        )));
        // A quorum LIST of the set goes in whatever the filter says.
        idx.replace_set("ns", "db", &[with_rv(pod("db-1", true, None), 8)], 8);
        assert_eq!(
            idx.len(),
            1,
            "db-0 at 7 is older than the list that lacks it"
        );
        idx.apply(&watcher::Event::Apply(with_rv(pod("db-0", true, None), 9)));
        assert_eq!(idx.len(), 2);
        // A relist keeps only wanted pods; one kept at a version older than the list and
        // absent from it is gone, even when the newest listed object is one not kept.
        idx.apply(&watcher::Event::Init);
        idx.apply(&watcher::Event::InitApply(with_rv(
            pod("db-1", true, None),
            8,
        )));
        let mut other = with_rv(pod("web-0", true, None), 20);
        if let Some(o) = other.metadata.owner_references.as_mut() {
            o[0].name = "web".into();
        }
        idx.apply(&watcher::Event::InitApply(other));
        idx.apply(&watcher::Event::InitDone);
        assert_eq!(
            idx.pods_of("ns", "db")
                .iter()
                .map(|p| p.name.as_str())
                .collect::<Vec<_>>(),
            ["db-1"]
        );
        assert!(idx.pods_of("ns", "web").is_empty());
        // Given up: the set leaves the index.
        wanted.store(false, std::sync::atomic::Ordering::SeqCst);
        idx.drop_set("ns", "db");
        assert!(idx.is_empty());
    }

    #[test]
    fn projects_and_indexes_by_statefulset() {
        let idx = PodIndex::new("sts-role");
        idx.apply(&watcher::Event::Init);
        idx.apply(&watcher::Event::InitApply(pod(
            "db-0",
            true,
            Some("writer"),
        )));
        idx.apply(&watcher::Event::InitApply(pod("db-1", false, None)));
        let touched = idx.apply(&watcher::Event::InitDone);
        assert_eq!(touched, vec![("ns".to_string(), "db".to_string())]);
        let pods = idx.pods_of("ns", "db");
        assert_eq!(pods.len(), 2);
        assert_eq!(pods[0].ordinal, Some(0));
        assert!(pods[0].ready);
        assert_eq!(pods[0].role.as_deref(), Some("writer"));
        assert_eq!(pods[0].epoch, Some(4));
        assert!(!pods[1].ready);
        // An unchanged re-apply touches nothing; a change touches the set.
        assert!(
            idx.apply(&watcher::Event::Apply(pod("db-0", true, Some("writer"))))
                .is_empty()
        );
        assert_eq!(
            idx.apply(&watcher::Event::Apply(pod("db-0", false, Some("writer"))))
                .len(),
            1
        );
        idx.apply(&watcher::Event::Delete(pod("db-1", false, None)));
        assert_eq!(idx.pods_of("ns", "db").len(), 1);
        assert_eq!(idx.len(), 1);
    }

    #[test]
    fn synced_after_the_initial_list_and_notready_transitions_are_timed_when_seen() {
        let idx = PodIndex::new("sts-role");
        assert!(!idx.is_synced());
        idx.apply(&watcher::Event::Init);
        idx.apply(&watcher::Event::InitApply(pod("db-0", true, None)));
        idx.apply(&watcher::Event::InitApply(pod("db-1", false, None)));
        assert!(!idx.is_synced());
        idx.apply(&watcher::Event::InitDone);
        assert!(idx.is_synced());
        // NotReady in the list: the index never saw it turn, so it has no time for it.
        assert_eq!(idx.not_ready_seen_at("ns", "db-1"), None);
        let before = jiff::Timestamp::now();
        idx.apply(&watcher::Event::Apply(pod("db-0", false, None)));
        let seen = idx.not_ready_seen_at("ns", "db-0").expect("seen NotReady");
        assert!(seen >= before && seen <= jiff::Timestamp::now());
        // Still NotReady: the first sighting stays.
        idx.apply(&watcher::Event::Apply(pod("db-0", false, Some("reader"))));
        assert_eq!(idx.not_ready_seen_at("ns", "db-0"), Some(seen));
        idx.apply(&watcher::Event::Apply(pod("db-0", true, None)));
        assert_eq!(idx.not_ready_seen_at("ns", "db-0"), None);
        idx.apply(&watcher::Event::Apply(pod("db-0", false, None)));
        idx.apply(&watcher::Event::Delete(pod("db-0", false, None)));
        assert_eq!(idx.not_ready_seen_at("ns", "db-0"), None);
    }

    #[tokio::test]
    async fn a_write_answer_with_news_beyond_the_role_is_reported_once() {
        let at = |rv: u64, ready: bool, role: Option<&str>| {
            let mut p = pod("db-1", ready, role);
            p.metadata.resource_version = Some(rv.to_string());
            p
        };
        let idx = PodIndex::new("sts-role");
        let mut learned = idx.learned();
        idx.apply(&watcher::Event::Init);
        idx.apply(&watcher::Event::InitApply(at(10, false, None)));
        idx.apply(&watcher::Event::InitDone);
        // The answer shows only what the operator wrote: nothing to report.
        idx.remember(&at(11, false, Some("reader")));
        assert!(learned.try_recv().is_err());
        // Ready meanwhile (someone else's change, seen first in the answer): reported once,
        // and the watch event that carries it later is no change.
        idx.remember(&at(13, true, Some("reader")));
        assert_eq!(
            learned.try_recv().ok(),
            Some(("ns".to_string(), "db".to_string()))
        );
        assert!(learned.try_recv().is_err());
        assert!(
            idx.apply(&watcher::Event::Apply(at(13, true, Some("reader"))))
                .is_empty()
        );
        // An answer older than what the index has changes nothing and reports nothing.
        idx.remember(&at(12, false, Some("reader")));
        assert!(learned.try_recv().is_err());
        assert!(idx.pods_of("ns", "db")[0].ready);
    }
}
