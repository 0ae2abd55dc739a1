//! Freshness: what this replica knows beyond its watch caches, so that it never decides from a
//! view older than its own writes (DESIGN §2 rules 12 and 14).
//!
//! The caches lag the truth, each watch on its own. Two things make a lock's view trustworthy
//! anyway:
//! - **read-your-writes**: every successful write's response goes into the caches (Leases and
//!   pods, monotonic by resourceVersion) or into the lock overlay kept here, so the next plan
//!   starts from at least what the last one wrote;
//! - **trust**: a lock is decided from caches only while it is *trusted*. It becomes untrusted
//!   when a write for it has an unknown outcome (timeout, lost response, 5xx), when this replica
//!   claims it or gets it handed over, and — for every lock at once — when the fence closed
//!   (the replica may have missed anything meanwhile) or the process starts. An untrusted lock
//!   is re-read with quorum reads (lock, Lease, its StatefulSet's pods) before it is decided
//!   again, and its renewals wait for that.
//!
//! This module never talks to the API server; `Caches::reread` and `Caches::reread_lock` do
//! the reads.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use kube::ResourceExt;

use crate::api::{StatefulSetLock, lock_key};

/// A resourceVersion as a number, for "is this newer". Kubernetes documents them as opaque,
/// but etcd's (and kubesim's) are increasing integers; an unparsable one compares as 0 (never
/// newer than anything cached).
pub fn rv_number(rv: Option<&str>) -> u64 {
    rv.and_then(|v| v.parse().ok()).unwrap_or(0)
}

#[derive(Default)]
struct Inner {
    /// Lock key → the fence generation its ownership was last verified in (re-read), and
    /// whether its view is still good for decisions (no unknown outcome, claim or handoff
    /// since). Renewals need only the first: they move renewTime by compare-and-swap, and
    /// within one fence generation nobody but this replica can move the lock away.
    trusted: HashMap<String, (u64, bool)>,
    /// Lock key → the newest version this replica wrote (dropped once the cache has caught up).
    locks: HashMap<String, Arc<StatefulSetLock>>,
}

#[derive(Default)]
pub struct Freshness(Mutex<Inner>);

impl Freshness {
    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Every mutation leaves the maps consistent: a poisoned lock is still usable.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Was the lock re-read in this fence generation (and nothing made it untrusted since)?
    pub fn is_trusted(&self, key: &str, generation: u64) -> bool {
        self.inner().trusted.get(key) == Some(&(generation, true))
    }

    /// Was the lock's ownership verified by a re-read in this fence generation?
    pub fn owner_verified(&self, key: &str, generation: u64) -> bool {
        self.inner()
            .trusted
            .get(key)
            .is_some_and(|(g, _)| *g == generation)
    }

    pub fn trust(&self, key: &str, generation: u64) {
        self.inner()
            .trusted
            .insert(key.to_string(), (generation, true));
    }

    /// The lock's ownership was verified by a fresh read of the lock alone in this fence
    /// generation: enough for a renewal (a compare-and-swap of renewTime), not for a decision
    /// (the lock is not trusted by this unless it already was).
    pub fn owner_seen(&self, key: &str, generation: u64) {
        let mut inner = self.inner();
        let t = inner
            .trusted
            .entry(key.to_string())
            .or_insert((generation, false));
        if t.0 != generation {
            *t = (generation, false);
        }
    }

    /// Something about the lock may have happened that the caches do not show: decide again
    /// only after a re-read.
    pub fn distrust(&self, key: &str) {
        if let Some(t) = self.inner().trusted.get_mut(key) {
            t.1 = false;
        }
    }

    /// Remember a version of the lock this replica wrote or read with a quorum read.
    pub fn remember_lock(&self, lock: StatefulSetLock) {
        let key = lock_key(&lock);
        let mut inner = self.inner();
        let newer = inner.locks.get(&key).is_none_or(|known| {
            rv_number(known.resource_version().as_deref())
                < rv_number(lock.resource_version().as_deref())
        });
        if newer {
            inner.locks.insert(key, Arc::new(lock));
        }
    }

    /// A lock just read from the API server (and remembered by [`Caches::reread_lock`]): the
    /// newer of it and the version remembered here, which stays remembered. The read says
    /// nothing about the watch cache, which may still be behind it (a stalled lock watch that
    /// still shows the previous owner's label): only the cache reaching that version ends it
    /// ([`Freshness::newest_lock`]). Through `newest_lock`, the read, equal to what it had
    /// just remembered, dropped it, and the next look at the cache acted on the older view (a
    /// lock just claimed was "not mine" to the renewal lane, and its Lease lapsed).
    ///
    /// [`Caches::reread_lock`]: crate::cache::Caches::reread_lock
    pub fn newest_after_read(&self, read: StatefulSetLock) -> Arc<StatefulSetLock> {
        let key = lock_key(&read);
        let read_rv = rv_number(read.resource_version().as_deref());
        match self.inner().locks.get(&key) {
            Some(known) if rv_number(known.resource_version().as_deref()) > read_rv => {
                known.clone()
            }
            _ => Arc::new(read),
        }
    }

    /// The newer of the cached lock and the one remembered here.
    pub fn newest_lock(&self, cached: Arc<StatefulSetLock>) -> Arc<StatefulSetLock> {
        let key = lock_key(&cached);
        let mut inner = self.inner();
        let Some(known) = inner.locks.get(&key).cloned() else {
            return cached;
        };
        if rv_number(known.resource_version().as_deref())
            > rv_number(cached.resource_version().as_deref())
        {
            known
        } else {
            // The cache has caught up: it is the one to follow from now on.
            inner.locks.remove(&key);
            cached
        }
    }

    /// The lock is gone (deleted): forget everything about it.
    pub fn forget(&self, key: &str) {
        let mut inner = self.inner();
        inner.trusted.remove(key);
        inner.locks.remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lock(rv: &str, shard: &str) -> StatefulSetLock {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "app.anukkrit.me/v1", "kind": "StatefulSetLock",
            "metadata": {"name": "l", "namespace": "ns", "resourceVersion": rv, "labels": {"app.anukkrit.me/shard": shard}},
            "spec": {"statefulSetName": "db", "leaseName": "db-lease", "leaseDurationSeconds": 30}
        }))
        .unwrap()
    }

    #[test]
    fn own_writes_win_until_the_cache_catches_up() {
        let f = Freshness::default();
        f.remember_lock(lock("12", "a"));
        // An older remembered version never replaces a newer one.
        f.remember_lock(lock("9", "old"));
        let seen = f.newest_lock(Arc::new(lock("10", "stale")));
        assert_eq!(seen.resource_version().as_deref(), Some("12"));
        let seen = f.newest_lock(Arc::new(lock("13", "b")));
        assert_eq!(seen.resource_version().as_deref(), Some("13"));
        // Caught up: the overlay is gone, an older cache view is what there is.
        let seen = f.newest_lock(Arc::new(lock("11", "c")));
        assert_eq!(seen.resource_version().as_deref(), Some("11"));
    }

    /// A read is remembered, then looked at: the stale watch cache must not win over it
    /// afterwards, until the cache reaches that version.
    #[test]
    fn a_read_stays_remembered_while_the_cache_is_behind() {
        let f = Freshness::default();
        f.remember_lock(lock("20", "me"));
        let seen = f.newest_after_read(lock("20", "me"));
        assert_eq!(seen.labels()["app.anukkrit.me/shard"], "me");
        let seen = f.newest_lock(Arc::new(lock("15", "dead-peer")));
        assert_eq!(
            seen.labels()["app.anukkrit.me/shard"],
            "me",
            "the stale cache must not win over the read"
        );
        // A read older than a remembered write gives the write.
        f.remember_lock(lock("22", "me"));
        assert_eq!(
            f.newest_after_read(lock("21", "me"))
                .resource_version()
                .as_deref(),
            Some("22")
        );
        // The cache reaches it: the cache is followed from then on.
        let seen = f.newest_lock(Arc::new(lock("22", "me")));
        assert_eq!(seen.resource_version().as_deref(), Some("22"));
        let seen = f.newest_lock(Arc::new(lock("15", "dead-peer")));
        assert_eq!(seen.resource_version().as_deref(), Some("15"));
    }

    #[test]
    fn trust_is_per_generation_and_revocable() {
        let f = Freshness::default();
        assert!(!f.is_trusted("ns/l", 1));
        f.trust("ns/l", 1);
        assert!(f.is_trusted("ns/l", 1));
        assert!(!f.is_trusted("ns/l", 2), "a closed fence revokes trust");
        f.distrust("ns/l");
        assert!(!f.is_trusted("ns/l", 1));
        assert!(
            f.owner_verified("ns/l", 1),
            "ownership stays verified in the generation"
        );
        assert!(!f.owner_verified("ns/l", 2));
    }
}
