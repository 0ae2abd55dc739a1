//! What the replica knows of the cluster: the watches and their caches (pods indexed by
//! StatefulSet, the Leases stslock owns, the locks by StatefulSet), the lenient decoding every
//! watch uses, and the record of what this replica wrote or read fresh (`fresh`), which says when
//! a cached view may be trusted. [`Caches`] bundles them for the lanes, with the quorum re-read
//! that refreshes one lock's view.

pub mod fresh;
pub mod interest;
pub mod lenient;
pub mod pods;
pub mod sets;
pub mod watch;

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use kube::runtime::reflector::Store;
use kube::{Client, ResourceExt};

use crate::api::{
    LEASE_OWNER_ANNOTATION, RENEWED_ANNOTATION, StatefulSetLock, WRITER_UID_ANNOTATION,
};
use crate::call::{ApiCall, Kind, call, call_opt};
use crate::elect::LeaseView;
use crate::error::Result;

/// A watch's relist in progress (kube-runtime's `Init`, `InitApply`…, `InitDone`): the
/// objects listed are gathered and handed over whole at `InitDone`, so a cache built from them
/// is never seen half-replaced (a half-replaced cache looks as if the rest were deleted).
#[derive(Debug)]
pub struct Relist<T>(Option<Vec<T>>);

impl<T> Default for Relist<T> {
    fn default() -> Self {
        Relist(None)
    }
}

impl<T> Relist<T> {
    /// `Init`: a new list begins (anything gathered before is dropped).
    pub fn begin(&mut self) {
        self.0 = Some(Vec::new());
    }

    /// `InitApply`: one listed object.
    pub fn push(&mut self, t: T) {
        self.0.get_or_insert_with(Vec::new).push(t);
    }

    /// `InitDone`: everything listed.
    pub fn finish(&mut self) -> Vec<T> {
        self.0.take().unwrap_or_default()
    }
}

/// One replica's caches, shared by its lanes.
pub struct Caches {
    pub client: Client,
    /// This replica's shard id (the shard label of the locks it owns).
    pub identity: String,
    /// Timeout of the reads made here.
    pub api_timeout: Duration,
    pub pods: pods::PodIndex,
    /// stslock's own Leases, from the labelled Lease watch.
    pub leases: watch::LeaseCache,
    pub locks: Store<StatefulSetLock>,
    /// The locks by StatefulSet and by Lease, kept from the same watch as `locks`.
    pub lock_index: watch::LockIndex,
    /// Every StatefulSet of the scope, as a projection (see [`sets`]).
    pub sets: sets::SetIndex,
    /// Read-your-writes and trust per lock (see [`fresh`]).
    pub fresh: Arc<fresh::Freshness>,
    /// The locks whose Leases and pods the caches keep: this replica's own (see [`interest`]).
    pub interest: Arc<interest::Interest>,
    /// The replica's metrics, where the reads made here are counted.
    pub metrics: Arc<crate::metrics::Metrics>,
}

impl Caches {
    /// The cached Lease `ns/name`, if stslock's Lease watch has it.
    pub fn cached_lease(&self, ns: &str, name: &str) -> Option<Arc<Lease>> {
        self.leases
            .read()
            .ok()
            .and_then(|m| m.get(&(ns.to_string(), name.to_string())).cloned())
    }

    /// The Lease named by a lock: the watch cache first, then a direct GET (a Lease that is
    /// not stslock's is not watched).
    pub async fn lease(&self, ns: &str, name: &str) -> Result<Option<Lease>> {
        if let Some(l) = self.cached_lease(ns, name) {
            return Ok(Some((*l).clone()));
        }
        let api: Api<Lease> = Api::namespaced(self.client.clone(), ns);
        call_opt(
            &self.metrics,
            ApiCall::get(Kind::Lease, format!("{ns}/{name}")),
            self.api_timeout,
            api.get(name),
        )
        .await
    }

    /// Fetch the Lease `ns/name` afresh into the cache (after a conflict or a failed
    /// confirmation: the cache is behind it, and the next attempt must start from the truth).
    pub async fn refresh_lease(&self, ns: &str, name: &str) {
        let api: Api<Lease> = Api::namespaced(self.client.clone(), ns);
        match call_opt(
            &self.metrics,
            ApiCall::get(Kind::Lease, format!("{ns}/{name}")),
            self.api_timeout,
            api.get(name),
        )
        .await
        {
            Ok(Some(l)) => watch::remember_lease(&self.leases, l),
            Ok(None) => watch::forget_lease(&self.leases, ns, name, None),
            Err(e) => tracing::debug!(lease = %format!("{ns}/{name}"), error = %e, "Lease refresh"),
        }
    }

    /// Fetch the pod `ns/name` afresh into the pod cache (after a promotion conflicted: the
    /// cache is behind it, and the next plan must start from its current version).
    pub async fn refresh_pod(&self, ns: &str, name: &str) {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), ns);
        match call_opt(
            &self.metrics,
            ApiCall::get(Kind::Pod, format!("{ns}/{name}")),
            self.api_timeout,
            api.get(name),
        )
        .await
        {
            Ok(Some(p)) => self.pods.remember(&p),
            // Gone: its deletion reaches the cache through the watch.
            Ok(None) => {}
            Err(e) => tracing::debug!(pod = %format!("{ns}/{name}"), error = %e, "pod refresh"),
        }
    }

    /// A quorum read of the lock alone (remembered, newest wins); None: it is gone.
    pub async fn reread_lock(&self, lock: &StatefulSetLock) -> Result<Option<StatefulSetLock>> {
        let ns = lock.namespace().unwrap_or_default();
        let name = lock.name_any();
        let locks: Api<StatefulSetLock> = Api::namespaced(self.client.clone(), &ns);
        let read = call_opt(
            &self.metrics,
            ApiCall::get(Kind::StatefulSetLock, format!("{ns}/{name}")),
            self.api_timeout,
            locks.get(&name),
        )
        .await?;
        if let Some(l) = &read {
            self.fresh.remember_lock(l.clone());
        }
        Ok(read)
    }

    /// This replica gave lock `key` up (or it is gone): its Lease and its StatefulSet's pods
    /// leave the caches, unless another owned lock needs them.
    pub fn give_up(&self, key: &str) {
        let evict = self.interest.lose(key);
        if let Some((ns, set)) = evict.set {
            self.pods.drop_set(&ns, &set);
        }
        if let Some((ns, name)) = evict.lease {
            watch::forget_lease(&self.leases, &ns, &name, None);
        }
    }

    /// Do the caches hold this lock's Lease and pods (see [`interest::Interest::holds`])?
    pub fn holds(&self, lock: &StatefulSetLock) -> bool {
        self.interest.holds(lock)
    }

    /// The replica has settled (see [`interest`]): keep only the Leases and pods of `owned`
    /// (and of locks gained later) and drop the rest.
    pub fn settle<'a>(&self, owned: impl IntoIterator<Item = &'a StatefulSetLock>) {
        self.interest.settle(owned);
        let interest = &self.interest;
        self.pods.retain_sets(|ns, set| interest.wants_set(ns, set));
        if let Ok(mut m) = self.leases.write() {
            m.retain(|(ns, name), _| interest.wants_lease(ns, name));
        }
    }

    /// Quorum reads of everything one lock's decision rests on — the lock, its Lease, its
    /// StatefulSet's pods — into the caches (which keep whatever is newer). Returns the lock
    /// as read (None: it is gone). The lock enters the caches' interest first (it is read
    /// because it is this replica's), so no watch event newer than these reads is dropped.
    ///
    /// The interest is gained before the lock is read, not after: a lock deleted after that
    /// read is then given up by whatever reports the deletion (the lock watch's Delete, or the
    /// sweep after its relist), which comes after the gain. Gained after the read, a deletion
    /// reported in between would leave the lock's Lease and pods cached for good. A read that
    /// fails gives up a lock that was not in the interest before.
    pub async fn reread(&self, lock: &StatefulSetLock) -> Result<Option<StatefulSetLock>> {
        let new = self.interest.gain(lock);
        let read = match self.reread_lock(lock).await {
            Ok(read) => read,
            Err(e) => {
                if new {
                    self.give_up(&crate::api::lock_key(lock));
                }
                return Err(e);
            }
        };
        let Some(read) = read else {
            self.give_up(&crate::api::lock_key(lock));
            return Ok(None);
        };
        // No longer this replica's: nothing of it is kept (the caller sees the label).
        if read.labels().get(crate::api::SHARD_LABEL) != Some(&self.identity) {
            self.give_up(&crate::api::lock_key(&read));
            return Ok(Some(read));
        }
        self.read_around(&read).await?;
        Ok(Some(read))
    }

    /// Quorum reads of `lock`'s Lease and its StatefulSet's pods into the caches, for a lock
    /// labelled this replica's as read just now or as cached (the renewal lane reads them
    /// beside the write that confirms the label).
    /// The lock enters the caches' interest first, so no watch event newer than these reads is
    /// dropped; from the lock given, which names the Lease and the set. What a read brings in
    /// is checked against the interest after it is stored: a lock given up while the read was
    /// in flight (deleted, or lost) leaves nothing behind — checked before storing, a give-up
    /// in between would leave it cached for good.
    pub async fn read_around(&self, read: &StatefulSetLock) -> Result<()> {
        let ns = read.namespace().unwrap_or_default();
        let timeout = self.api_timeout;
        self.interest.gain(read);
        let lease_read = async {
            let leases: Api<Lease> = Api::namespaced(self.client.clone(), &ns);
            let lease_name = &read.spec.lease_name;
            match call_opt(
                &self.metrics,
                ApiCall::get(Kind::Lease, format!("{ns}/{lease_name}")),
                timeout,
                leases.get(lease_name),
            )
            .await?
            {
                Some(l) if l.labels().get(watch::LEASE_LABEL).is_some() => {
                    watch::remember_lease(&self.leases, l);
                    // Given up while this read was in flight (see below).
                    if !self.interest.wants_lease(&ns, lease_name) {
                        watch::forget_lease(&self.leases, &ns, lease_name, None);
                    }
                }
                // Not ours (not watched, never cached): gather reads it directly every time.
                Some(_) => {}
                None => watch::forget_lease(&self.leases, &ns, lease_name, None),
            }
            Ok::<(), crate::error::Error>(())
        };
        let pods_read = async {
            let set_name = &read.spec.stateful_set_name;
            // The StatefulSet's own selector, narrowed to StatefulSet pods, when the set is
            // cached; else every StatefulSet pod of the namespace. Either way only the pods
            // this set controls go in.
            let mut selector: Vec<String> = self
                .sets
                .get(&ns, set_name)
                .map(|s| s.match_labels.to_string())
                .into_iter()
                .filter(|s| !s.is_empty())
                .collect();
            selector.push(watch::STS_POD_LABEL.to_string());
            let pods: Api<Pod> = Api::namespaced(self.client.clone(), &ns);
            let listed = call(
                &self.metrics,
                ApiCall::list(Kind::Pod, format!("{ns}/{}", selector.join(",")))
                    .note(format!("pods of StatefulSet {set_name}")),
                timeout,
                pods.list(&kube::api::ListParams::default().labels(&selector.join(","))),
            )
            .await?;
            let list_rv = fresh::rv_number(listed.metadata.resource_version.as_deref());
            let mine: Vec<Pod> = listed
                .items
                .into_iter()
                .filter(|p| {
                    p.owner_references().iter().any(|o| {
                        o.controller == Some(true) && o.kind == "StatefulSet" && o.name == *set_name
                    })
                })
                .collect();
            self.pods.replace_set(&ns, set_name, &mine, list_rv);
            if !self.interest.wants_set(&ns, set_name) {
                self.pods.drop_set(&ns, set_name);
            }
            Ok::<(), crate::error::Error>(())
        };
        let (lease_read, pods_read) = futures::join!(lease_read, pods_read);
        lease_read?;
        pods_read?;
        self.interest.populated(read);
        Ok(())
    }
}

/// The core's view of a Lease.
pub fn lease_view(l: &Lease) -> LeaseView {
    let spec = l.spec.clone().unwrap_or_default();
    LeaseView {
        holder: spec.holder_identity,
        holder_uid: l.annotations().get(WRITER_UID_ANNOTATION).cloned(),
        transitions: i64::from(spec.lease_transitions.unwrap_or(0)),
        renew_time: spec.renew_time.map(|t| t.0),
        acquire_time: spec.acquire_time.map(|t| t.0),
        duration_seconds: i64::from(spec.lease_duration_seconds.unwrap_or(0)),
        resource_version: l.resource_version().unwrap_or_default(),
        owner: l.annotations().get(LEASE_OWNER_ANNOTATION).cloned(),
        unmarked: l.labels().is_empty()
            && l.annotations().is_empty()
            && l.owner_references().is_empty(),
        renewed_mark: l
            .annotations()
            .get(RENEWED_ANNOTATION)
            .and_then(|t| t.parse().ok()),
    }
}

#[cfg(all(test, feature = "dev"))]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)] // a test: panics are its failures

    use super::*;
    use kube::api::PostParams;
    use kubesim::{Sim, SimConfig};
    use serde_json::json;

    fn caches(client: Client) -> Caches {
        let interest = Arc::new(interest::Interest::default());
        interest.settle([]);
        let pods = pods::PodIndex::new("sts-role").keeping({
            let interest = interest.clone();
            move |ns, set| interest.wants_set(ns, set)
        });
        Caches {
            client,
            identity: "a".into(),
            api_timeout: Duration::from_secs(5),
            pods,
            leases: Arc::default(),
            locks: kube::runtime::reflector::store().0,
            lock_index: watch::LockIndex::default(),
            sets: sets::SetIndex::default(),
            fresh: Arc::default(),
            interest,
            metrics: Arc::new(crate::metrics::Metrics::new("a")),
        }
    }

    /// A lock given up (deleted while the lock watch was down, and swept after its relist)
    /// while a read of its Lease and pods is in flight: what that read brings in does not stay
    /// in the caches — nothing would ever give it up again.
    #[tokio::test]
    async fn a_lock_given_up_during_a_read_of_its_lease_and_pods_leaves_nothing_cached() {
        let sim = Sim::start(SimConfig::default());
        let client = sim.client_as("stslock/a");
        crate::dev::install_crd(&client).await.unwrap();
        let lock: StatefulSetLock = serde_json::from_value(json!({
            "apiVersion": "app.anukkrit.me/v1", "kind": "StatefulSetLock",
            "metadata": {"name": "l0", "namespace": "default",
                         "labels": {crate::api::SHARD_LABEL: "a"}},
            "spec": {"statefulSetName": "s0", "leaseName": "lease0", "leaseDurationSeconds": 10}
        }))
        .unwrap();
        let lock = Api::<StatefulSetLock>::namespaced(client.clone(), "default")
            .create(&PostParams::default(), &lock)
            .await
            .unwrap();
        let lease: Lease = serde_json::from_value(json!({
            "metadata": {"name": "lease0", "namespace": "default",
                         "labels": {watch::LEASE_LABEL: "stslock"}},
            "spec": {"holderIdentity": "s0-0", "leaseDurationSeconds": 10}
        }))
        .unwrap();
        Api::<Lease>::namespaced(client.clone(), "default")
            .create(&PostParams::default(), &lease)
            .await
            .unwrap();
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "s0-0", "namespace": "default",
                         "labels": {watch::STS_POD_LABEL: "s0-0"},
                         "ownerReferences": [{"apiVersion": "apps/v1", "kind": "StatefulSet",
                                              "name": "s0", "uid": "u-s0", "controller": true}]},
            "spec": {"containers": [{"name": "c", "image": "i"}]}
        }))
        .unwrap();
        Api::<Pod>::namespaced(client.clone(), "default")
            .create(&PostParams::default(), &pod)
            .await
            .unwrap();
        let caches = Arc::new(caches(client));
        // Reads of the Lease and pods are answered after 800 ms; the lock is given up 300 ms
        // into them.
        sim.faults().update(|c| {
            c.latency_ms = 800;
            c.reads_only = true;
            c.resources = vec!["leases".into(), "pods".into()];
        });
        let read = tokio::spawn({
            let (caches, lock) = (caches.clone(), lock.clone());
            async move { caches.read_around(&lock).await }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(caches.interest.keys(), vec!["default/l0".to_string()]);
        caches.give_up("default/l0");
        read.await.unwrap().unwrap();
        assert!(caches.interest.is_empty());
        assert!(
            caches.cached_lease("default", "lease0").is_none(),
            "the Lease of a lock given up stays cached"
        );
        assert!(
            caches.pods.pods_of("default", "s0").is_empty(),
            "the pods of a lock given up stay cached"
        );
        // A read of a lock still kept keeps them (the check above is not vacuous).
        sim.faults().set(Default::default());
        caches.read_around(&lock).await.unwrap();
        assert!(caches.holds(&lock));
        assert!(caches.cached_lease("default", "lease0").is_some());
        assert_eq!(caches.pods.pods_of("default", "s0").len(), 1);
    }
}
