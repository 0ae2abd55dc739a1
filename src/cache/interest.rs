//! Which Leases and pods this replica keeps: those of the locks it owns (DESIGN §4: a replica
//! keeps full state only for its own locks, so its memory shrinks as replicas are added).
//!
//! Every replica still watches every StatefulSet pod and every stslock Lease (one watch each,
//! for the whole scope), but those two watches start only once the lock watch has listed: the
//! locks labelled for the replica then are its own ([`Interest::settle`]), and from their
//! first list on the caches keep only the Leases and pods of its own locks — an event for any
//! other is dropped at once. (Before settling everything would be kept; nothing is watched
//! then.) A relist keeps what is wanted when it completes. A lock gained later enters the interest before its Lease and pods are
//! first read for it — [`super::Caches::read_around`], which every gained lock goes through
//! before it is decided or renewed (a claim or a handoff makes it untrusted; the reconcile lane
//! reads it with the lock, [`super::Caches::reread`]) — so no event newer than
//! that read is dropped, and the caches hold it ([`Interest::holds`]) once that read
//! succeeded. It leaves when the replica gives the lock up (its Lease and pods leave the
//! caches); a lock given up is untrusted again, so regaining it reads it afresh.

use std::collections::HashMap;
use std::sync::RwLock;

use kube::ResourceExt;

use crate::api::{StatefulSetLock, lock_key};

type Key = (String, String);

#[derive(Default)]
struct Inner {
    /// Keeping only the owned locks' Leases and pods (else everything).
    settled: bool,
    /// Owned lock (`namespace/name`) → its (namespace, StatefulSet) and (namespace, Lease).
    locks: HashMap<String, (Key, Key)>,
    /// Owned locks whose Lease and pods the caches hold (read since they were gained).
    populated: std::collections::HashSet<String>,
    /// How many owned locks target each StatefulSet, and name each Lease.
    sets: HashMap<Key, usize>,
    leases: HashMap<Key, usize>,
}

/// What one lock given up leaves behind: its StatefulSet's pods and its Lease, each unless
/// another owned lock still needs it.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Evict {
    pub set: Option<Key>,
    pub lease: Option<Key>,
}

#[derive(Default)]
pub struct Interest(RwLock<Inner>);

impl Interest {
    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        // Every mutation leaves the maps consistent: a poisoned lock is still usable.
        self.0.write().unwrap_or_else(|p| p.into_inner())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        self.0.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Keep the Lease and pods of `lock` from now on (idempotent); the caches hold them once
    /// they were read ([`Interest::populated`]). True: it was not kept before.
    pub fn gain(&self, lock: &StatefulSetLock) -> bool {
        gain_locked(&mut self.write(), lock)
    }

    /// The Lease and pods of `lock` were read after it was gained: the caches hold them.
    pub fn populated(&self, lock: &StatefulSetLock) {
        let mut inner = self.write();
        let key = lock_key(lock);
        if inner.locks.contains_key(&key) {
            inner.populated.insert(key);
        }
    }

    /// Do the caches hold the Lease and pods of `lock`? Always before settling (everything
    /// is kept); after, once they were read for it since it was gained.
    pub fn holds(&self, lock: &StatefulSetLock) -> bool {
        let inner = self.read();
        !inner.settled || inner.populated.contains(&lock_key(lock))
    }

    /// Has the replica settled (see the module doc)?
    pub fn is_settled(&self) -> bool {
        self.read().settled
    }

    /// From now on keep only the Leases and pods of `owned` (the caches, which kept
    /// everything so far, hold theirs) and of locks gained later; the caller drops the rest.
    pub fn settle<'a>(&self, owned: impl IntoIterator<Item = &'a StatefulSetLock>) {
        let mut inner = self.write();
        for lock in owned {
            gain_locked(&mut inner, lock);
            inner.populated.insert(lock_key(lock));
        }
        inner.settled = true;
    }

    /// Stop keeping the Leases and pods of lock `key` (`namespace/name`); returns what the
    /// caches can drop (nothing before settling: everything is kept).
    pub fn lose(&self, key: &str) -> Evict {
        let mut inner = self.write();
        let evict = remove(&mut inner, key);
        if inner.settled {
            evict
        } else {
            Evict::default()
        }
    }

    /// Are pods of this StatefulSet kept?
    pub fn wants_set(&self, namespace: &str, statefulset: &str) -> bool {
        let inner = self.read();
        !inner.settled
            || inner
                .sets
                .contains_key(&(namespace.to_string(), statefulset.to_string()))
    }

    /// Is this Lease kept?
    pub fn wants_lease(&self, namespace: &str, name: &str) -> bool {
        let inner = self.read();
        !inner.settled
            || inner
                .leases
                .contains_key(&(namespace.to_string(), name.to_string()))
    }

    /// The owned locks (`namespace/name`) whose Leases and pods are kept.
    pub fn keys(&self) -> Vec<String> {
        self.read().locks.keys().cloned().collect()
    }

    /// Owned locks whose Leases and pods are kept.
    pub fn len(&self) -> usize {
        self.read().locks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// True: `lock` was not kept before (under any names).
fn gain_locked(inner: &mut Inner, lock: &StatefulSetLock) -> bool {
    let key = lock_key(lock);
    let ns = lock.namespace().unwrap_or_default();
    let set = (ns.clone(), lock.spec.stateful_set_name.clone());
    let lease = (ns, lock.spec.lease_name.clone());
    // statefulSetName and leaseName are immutable, but a lock deleted and re-created under
    // the same name may name others: the old entry is given up first.
    let new = match inner.locks.get(&key) {
        Some(known) if *known == (set.clone(), lease.clone()) => return false,
        Some(_) => {
            remove(inner, &key);
            false
        }
        None => true,
    };
    *inner.sets.entry(set.clone()).or_default() += 1;
    *inner.leases.entry(lease.clone()).or_default() += 1;
    inner.locks.insert(key, (set, lease));
    new
}

fn remove(inner: &mut Inner, key: &str) -> Evict {
    inner.populated.remove(key);
    let Some((set, lease)) = inner.locks.remove(key) else {
        return Evict::default();
    };
    let release = |counts: &mut HashMap<Key, usize>, k: Key| -> Option<Key> {
        let n = counts.get_mut(&k)?;
        *n = n.saturating_sub(1);
        if *n == 0 {
            counts.remove(&k);
            Some(k)
        } else {
            None
        }
    };
    Evict {
        set: release(&mut inner.sets, set),
        lease: release(&mut inner.leases, lease),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lock(name: &str, set: &str, lease: &str) -> StatefulSetLock {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "app.anukkrit.me/v1", "kind": "StatefulSetLock",
            "metadata": {"name": name, "namespace": "ns"},
            "spec": {"statefulSetName": set, "leaseName": lease, "leaseDurationSeconds": 30}
        }))
        .unwrap()
    }

    fn k(a: &str) -> Option<Key> {
        Some(("ns".to_string(), a.to_string()))
    }

    #[test]
    fn a_statefulset_or_lease_two_owned_locks_share_is_kept_until_both_are_given_up() {
        let i = Interest::default();
        assert!(
            i.wants_set("ns", "db") && i.wants_lease("ns", "l1") && i.holds(&lock("a", "db", "l1")),
            "before settling everything is kept"
        );
        assert_eq!(i.lose("ns/a"), Evict::default());
        i.settle([]);
        assert!(!i.wants_set("ns", "db") && !i.wants_lease("ns", "l1"));
        assert!(i.gain(&lock("a", "db", "l1")), "not kept before");
        assert!(!i.holds(&lock("a", "db", "l1")), "kept, not read yet");
        i.populated(&lock("a", "db", "l1"));
        assert!(i.holds(&lock("a", "db", "l1")));
        assert!(!i.gain(&lock("a", "db", "l1")), "idempotent");
        assert!(
            i.gain(&lock("b", "db", "l2")),
            "a rival lock on the same StatefulSet"
        );
        assert_eq!(i.len(), 2);
        assert!(i.wants_set("ns", "db") && i.wants_lease("ns", "l1") && i.wants_lease("ns", "l2"));
        assert!(!i.wants_set("other", "db"), "by namespace");
        assert_eq!(
            i.lose("ns/a"),
            Evict {
                set: None,
                lease: k("l1")
            }
        );
        assert!(i.wants_set("ns", "db") && !i.wants_lease("ns", "l1"));
        assert_eq!(i.lose("ns/a"), Evict::default(), "given up once");
        assert_eq!(
            i.lose("ns/b"),
            Evict {
                set: k("db"),
                lease: k("l2")
            }
        );
        assert!(i.is_empty() && !i.wants_set("ns", "db"));
        assert!(
            !i.holds(&lock("a", "db", "l1")),
            "given up: read again when regained"
        );
    }

    #[test]
    fn settling_keeps_the_owned_locks_as_held() {
        let i = Interest::default();
        let (a, b) = (lock("a", "db", "l1"), lock("b", "web", "l2"));
        i.settle([&a]);
        assert!(i.is_settled() && i.holds(&a) && !i.holds(&b));
        assert!(i.wants_set("ns", "db") && !i.wants_set("ns", "web"));
    }

    #[test]
    fn a_lock_recreated_under_its_name_with_other_targets_moves_its_interest() {
        let i = Interest::default();
        i.settle([]);
        i.gain(&lock("a", "db", "l1"));
        i.gain(&lock("a", "web", "l9"));
        assert!(!i.wants_set("ns", "db") && !i.wants_lease("ns", "l1"));
        assert!(i.wants_set("ns", "web") && i.wants_lease("ns", "l9"));
        assert_eq!(i.len(), 1);
    }
}
