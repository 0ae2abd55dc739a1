//! The pod index: every StatefulSet pod in the cluster as a compact projection, grouped by
//! (namespace, StatefulSet).
//!
//! Pods are the largest objects the operator watches and there are many of them, so only the
//! fields election needs are kept — never the full Pod. The index is fed by one cluster-wide
//! watch restricted to StatefulSet pods (label `statefulset.kubernetes.io/pod-name`).

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
    buffer: Option<Vec<Arc<PodProjection>>>,
    /// The initial list has been delivered (readiness).
    synced: bool,
    /// When this index saw a Ready pod turn NotReady, by (namespace, name): the condition's
    /// lastTransitionTime has only second precision, too coarse to time sub-second failovers.
    not_ready_seen: HashMap<(String, String), jiff::Timestamp>,
}

/// Cluster-wide index of StatefulSet pods.
#[derive(Clone)]
pub struct PodIndex {
    role_label: String,
    inner: Arc<RwLock<Inner>>,
}

impl PodIndex {
    pub fn new(role_label: impl Into<String>) -> Self {
        PodIndex {
            role_label: role_label.into(),
            inner: Arc::default(),
        }
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
                inner.buffer = Some(Vec::new());
                vec![]
            }
            watcher::Event::InitApply(p) => {
                if let Some(proj) = PodProjection::from_pod(p, &self.role_label)
                    && let Some(b) = inner.buffer.as_mut()
                {
                    b.push(Arc::new(proj));
                }
                vec![]
            }
            watcher::Event::InitDone => {
                inner.synced = true;
                let listed = inner.buffer.take().unwrap_or_default();
                let mut touched: Vec<SetKey> = inner.sets.keys().cloned().collect();
                inner.sets.clear();
                inner.pods.clear();
                for p in listed {
                    let key = (p.namespace.clone(), p.statefulset.clone());
                    touched.push(key.clone());
                    insert(&mut inner, key, p);
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
            watcher::Event::Apply(p) => {
                let Some(proj) = PodProjection::from_pod(p, &self.role_label) else {
                    return vec![];
                };
                let key = (proj.namespace.clone(), proj.statefulset.clone());
                let old = inner.sets.get(&key).and_then(|s| s.get(&proj.name));
                let changed = old.is_none_or(|old| **old != proj);
                let id = (proj.namespace.clone(), proj.name.clone());
                if proj.ready {
                    inner.not_ready_seen.remove(&id);
                } else if old.is_some_and(|o| o.ready && o.uid == proj.uid) {
                    inner.not_ready_seen.insert(id, jiff::Timestamp::now());
                }
                insert(&mut inner, key.clone(), Arc::new(proj));
                if changed { vec![key] } else { vec![] }
            }
            watcher::Event::Delete(p) => {
                let id = (p.namespace().unwrap_or_default(), p.name_any());
                inner.not_ready_seen.remove(&id);
                let Some(key) = inner.pods.remove(&id) else {
                    return vec![];
                };
                if let Some(set) = inner.sets.get_mut(&key) {
                    set.remove(&id.1);
                    if set.is_empty() {
                        inner.sets.remove(&key);
                    }
                }
                vec![key]
            }
        }
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

fn insert(inner: &mut Inner, key: SetKey, p: Arc<PodProjection>) {
    inner
        .pods
        .insert((p.namespace.clone(), p.name.clone()), key.clone());
    inner.sets.entry(key).or_default().insert(p.name.clone(), p);
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
}
