//! The shard runtime of one replica: holds its membership Lease, watches its peers', keeps the
//! ring, claims and hands off locks through the ownership label, and fences itself.
//!
//! Decisions come from `stslock-shard` (pure); this module does the I/O. Only the replica named
//! by a lock's `app.anukkrit.me/shard` label reconciles that lock, and only while its fence
//! allows writes. Labels change only by compare-and-swap on the lock's resourceVersion, so two
//! replicas with different ring views can never both own a lock.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::reflector::Store;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use serde_json::json;
use stslock_shard::{Decision, Fence, Member, Ring, alive_members, membership_lease_name};

use crate::api::{SHARD_LABEL, StatefulSetLock};
use crate::reconcile::client::{call, call_opt};

/// Label on membership Leases naming the shard group.
pub const GROUP_LABEL: &str = "app.anukkrit.me/shard-group";

#[derive(Debug, Clone)]
pub struct ShardConfig {
    pub id: String,
    pub group: String,
    pub namespace: String,
    /// Membership Lease duration S; renewed every S/3.
    pub lease_duration: Duration,
    /// The fence stops writes at S − margin after the last renew started.
    pub margin: Duration,
    /// Peers are declared dead at S + grace after their last observed renewal.
    pub grace: Duration,
    pub api_timeout: Duration,
}

#[derive(Default)]
struct View {
    /// Member id → (renewTime as last seen, local time it was first seen, duration, leaving).
    members: HashMap<String, (Option<MicroTime>, u64, Duration)>,
    ring: Option<Ring>,
    alive: HashSet<String>,
}

pub struct Sharding {
    pub cfg: ShardConfig,
    client: Client,
    origin: Instant,
    fence: Mutex<Fence>,
    view: RwLock<View>,
    /// Locks being reconciled right now (namespace/name → count).
    inflight: Mutex<HashMap<String, usize>>,
    /// Locks being handed off: no new reconciles start.
    draining: Mutex<HashSet<String>>,
    /// Locks this replica handed off, with the resourceVersion of the handoff write: a
    /// reconcile started from a cache older than that (still showing this replica as owner)
    /// must not run.
    released: Mutex<HashMap<String, u64>>,
    leaving: std::sync::atomic::AtomicBool,
}

fn key_of(lock: &StatefulSetLock) -> String {
    format!(
        "{}/{}",
        lock.namespace().unwrap_or_default(),
        lock.name_any()
    )
}

/// Marks a reconcile in flight until dropped.
pub struct InFlight<'a> {
    sharding: &'a Sharding,
    key: String,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if let Ok(mut m) = self.sharding.inflight.lock()
            && let Some(n) = m.get_mut(&self.key)
        {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.key);
            }
        }
    }
}

impl Sharding {
    pub fn new(client: Client, cfg: ShardConfig) -> Arc<Sharding> {
        Arc::new(Sharding {
            fence: Mutex::new(Fence::new(cfg.lease_duration, cfg.margin)),
            cfg,
            client,
            origin: Instant::now(),
            view: RwLock::default(),
            inflight: Mutex::default(),
            draining: Mutex::default(),
            released: Mutex::default(),
            leaving: std::sync::atomic::AtomicBool::new(false),
        })
    }

    fn now(&self) -> Duration {
        self.origin.elapsed()
    }

    /// May this replica write at all right now (its membership Lease is surely live)?
    pub fn may_write(&self) -> bool {
        self.fence
            .lock()
            .map(|f| f.may_write(self.now()))
            .unwrap_or(false)
    }

    /// How long this replica may still write; every write's timeout is bounded by it.
    pub fn write_window(&self) -> Duration {
        self.fence
            .lock()
            .map(|f| f.remaining(self.now()))
            .unwrap_or(Duration::ZERO)
    }

    /// Start a reconcile of `lock` if this replica owns it and may write; the guard marks it in
    /// flight so a handoff waits for it.
    pub fn begin(&self, lock: &StatefulSetLock) -> Option<InFlight<'_>> {
        let key = key_of(lock);
        if lock.labels().get(SHARD_LABEL) != Some(&self.cfg.id) || !self.may_write() {
            return None;
        }
        if self
            .draining
            .lock()
            .map(|d| d.contains(&key))
            .unwrap_or(true)
        {
            return None;
        }
        // A view older than this replica's own handoff of the lock still shows it as the
        // owner: no reconcile or renewal may start from it.
        let seen: u64 = lock
            .resource_version()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        if self
            .released
            .lock()
            .map(|r| r.get(&key).is_some_and(|handed_off| seen < *handed_off))
            .unwrap_or(true)
        {
            return None;
        }
        if let Ok(mut m) = self.inflight.lock() {
            *m.entry(key.clone()).or_default() += 1;
        }
        Some(InFlight {
            sharding: self,
            key,
        })
    }

    pub fn ring_members(&self) -> Vec<String> {
        self.view
            .read()
            .map(|v| {
                v.ring
                    .as_ref()
                    .map(|r| r.members().to_vec())
                    .unwrap_or_default()
            })
            .unwrap_or_default()
    }

    fn leases(&self) -> Api<Lease> {
        Api::namespaced(self.client.clone(), &self.cfg.namespace)
    }

    fn lease_name(&self) -> String {
        membership_lease_name(&self.cfg.group, &self.cfg.id)
    }

    /// Create or renew this replica's membership Lease; on success the fence moves.
    async fn renew(&self) -> crate::error::Result<()> {
        let started = self.now();
        let now = MicroTime(jiff::Timestamp::now());
        let name = self.lease_name();
        let timeout = self.cfg.api_timeout;
        let patch = json!({"spec": {"renewTime": now, "holderIdentity": self.cfg.id}});
        let renewed = call_opt(
            &format!("renewing membership Lease {name}"),
            timeout,
            self.leases()
                .patch(&name, &PatchParams::default(), &Patch::Merge(&patch)),
        )
        .await?;
        if renewed.is_none() {
            let lease: Lease = serde_json::from_value(json!({
                "metadata": {"name": name, "labels": {GROUP_LABEL: self.cfg.group}},
                "spec": {"holderIdentity": self.cfg.id, "leaseDurationSeconds": self.cfg.lease_duration.as_secs(), "acquireTime": now, "renewTime": now}
            }))?;
            call(
                &format!("creating membership Lease {name}"),
                timeout,
                self.leases().create(&PostParams::default(), &lease),
            )
            .await?;
        }
        if let Ok(mut f) = self.fence.lock() {
            f.renewed(started);
        }
        Ok(())
    }

    /// Renew the membership Lease every S/3 until leaving.
    pub async fn membership_loop(self: Arc<Self>) {
        let every = self.cfg.lease_duration / 3;
        while !self.leaving.load(std::sync::atomic::Ordering::SeqCst) {
            if let Err(e) = self.renew().await {
                tracing::warn!(error = %e, shard = %self.cfg.id, "membership renewal failed");
            }
            tokio::time::sleep(every).await;
        }
    }

    /// Watch the group's membership Leases and keep the ring.
    pub async fn watch_members(self: Arc<Self>) {
        let api = self.leases();
        let cfg = watcher::Config::default().labels(&format!("{GROUP_LABEL}={}", self.cfg.group));
        let mut stream = watcher(api, cfg).default_backoff().boxed();
        while let Some(ev) = stream.next().await {
            let now_ms = self.now().as_millis() as u64;
            match ev {
                Ok(watcher::Event::Apply(l)) | Ok(watcher::Event::InitApply(l)) => {
                    let spec = l.spec.clone().unwrap_or_default();
                    let Some(id) = spec.holder_identity.clone() else {
                        continue;
                    };
                    let dur = Duration::from_secs(
                        spec.lease_duration_seconds.unwrap_or(15).max(1) as u64
                    );
                    if let Ok(mut v) = self.view.write() {
                        // Liveness is measured on this observer's clock, from when it saw the
                        // renewTime change, never from the holder's timestamp.
                        let changed = v
                            .members
                            .get(&id)
                            .is_none_or(|(rt, _, _)| rt != &spec.renew_time);
                        if changed {
                            v.members.insert(id, (spec.renew_time.clone(), now_ms, dur));
                        }
                    }
                }
                Ok(watcher::Event::Delete(l)) => {
                    if let (Some(id), Ok(mut v)) =
                        (l.spec.and_then(|s| s.holder_identity), self.view.write())
                    {
                        v.members.remove(&id);
                    }
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "membership watch"),
            }
            self.recompute();
        }
    }

    /// Recompute alive members and the ring; true when the ring changed.
    fn recompute(&self) -> bool {
        let now_ms = self.now().as_millis() as u64;
        let Ok(mut v) = self.view.write() else {
            return false;
        };
        let members: Vec<Member> = v
            .members
            .iter()
            .map(|(id, (_, at, d))| Member {
                id: id.clone(),
                renewed_at_ms: *at,
                duration: *d,
                leaving: false,
            })
            .collect();
        let mut alive = alive_members(&members, now_ms, self.cfg.grace);
        if self.leaving.load(std::sync::atomic::Ordering::SeqCst) {
            alive.retain(|m| m != &self.cfg.id);
        }
        let set: HashSet<String> = alive.iter().cloned().collect();
        if set == v.alive && v.ring.is_some() {
            return false;
        }
        tracing::info!(shard = %self.cfg.id, members = ?alive, "ring changed");
        v.ring = Some(Ring::new(&alive));
        v.alive = set;
        true
    }

    /// Claim, hand off or leave each lock as the rules say. Runs periodically and on ring
    /// changes.
    pub async fn assign(&self, locks: &Store<StatefulSetLock>, scope: &crate::scope::Scope) {
        self.recompute();
        if !self.may_write() {
            return;
        }
        let (ring, alive) = match self.view.read() {
            Ok(v) => (v.ring.clone(), v.alive.clone()),
            Err(_) => return,
        };
        let Some(ring) = ring else { return };
        for lock in locks.state() {
            if !scope.allows(&lock.namespace().unwrap_or_default()) {
                continue;
            }
            let key = key_of(&lock);
            let label = lock.labels().get(SHARD_LABEL).map(String::as_str);
            match stslock_shard::decide(label, ring.owner(&key), &self.cfg.id, &alive) {
                Decision::Claim => self.set_owner(&lock, &self.cfg.id, "claim").await,
                Decision::Release { to } => self.hand_off(&lock, &to).await,
                Decision::Own | Decision::WaitForHandoff { .. } | Decision::NotMine => {}
            }
        }
    }

    /// Drain a lock (no new reconciles, wait for the one in flight), then move its label.
    async fn hand_off(&self, lock: &StatefulSetLock, to: &str) {
        let key = key_of(lock);
        if let Ok(mut d) = self.draining.lock() {
            d.insert(key.clone());
        }
        let deadline = Instant::now() + self.cfg.api_timeout * 2;
        while self
            .inflight
            .lock()
            .map(|m| m.contains_key(&key))
            .unwrap_or(false)
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        {
            use tracing::Instrument;
            let span = crate::telemetry::handoff_span(
                &lock.namespace().unwrap_or_default(),
                &lock.name_any(),
                &self.cfg.id,
                to,
            );
            self.set_owner(lock, to, "handoff").instrument(span).await;
        }
        if let Ok(mut d) = self.draining.lock() {
            d.remove(&key);
        }
    }

    /// Write the ownership label with compare-and-swap on the lock's resourceVersion.
    async fn set_owner(&self, lock: &StatefulSetLock, owner: &str, why: &str) {
        let ns = lock.namespace().unwrap_or_default();
        let api: Api<StatefulSetLock> = Api::namespaced(self.client.clone(), &ns);
        let patch = json!({"metadata": {"resourceVersion": lock.resource_version(), "labels": {SHARD_LABEL: owner}}});
        let what = format!(
            "{why}: StatefulSetLock {ns}/{} → shard {owner}",
            lock.name_any()
        );
        // Bounded by the fence window like every write of this replica.
        let timeout = self.cfg.api_timeout.min(self.write_window());
        if timeout.is_zero() {
            return;
        }
        match call(
            &what,
            timeout,
            api.patch(
                &lock.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            ),
        )
        .await
        {
            Ok(updated) => {
                if owner != self.cfg.id
                    && let Ok(mut r) = self.released.lock()
                {
                    let rv = updated
                        .resource_version()
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(u64::MAX);
                    r.insert(key_of(lock), rv);
                }
                if why == "handoff" {
                    crate::metrics::with_current(|m| m.handoff());
                }
                // The handoff span's outcome, when there is one.
                tracing::Span::current().record("stslock.outcome", "ok");
                tracing::info!(shard = %self.cfg.id, lock = %key_of(lock), to = owner, "{why}")
            }
            // Lost the race (someone changed the lock): the next pass sees the new state.
            Err(e) if e.is_conflict() || e.is_not_found() => {
                tracing::Span::current().record("stslock.outcome", e.metric_label());
            }
            Err(e) => {
                tracing::Span::current().record("stslock.outcome", e.metric_label());
                tracing::warn!(error = %e, "ownership label")
            }
        }
    }

    /// Graceful leave: hand every owned lock to its next owner, then delete the membership
    /// Lease so peers rebalance at once.
    pub async fn leave(&self, locks: &Store<StatefulSetLock>) {
        self.leaving
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.recompute();
        let ring = self.view.read().ok().and_then(|v| v.ring.clone());
        if let Some(ring) = ring {
            for lock in locks.state() {
                if lock.labels().get(SHARD_LABEL) == Some(&self.cfg.id)
                    && let Some(to) = ring.owner(&key_of(&lock)).map(str::to_string)
                {
                    self.hand_off(&lock, &to).await;
                }
            }
        }
        let name = self.lease_name();
        if let Err(e) = call_opt(
            &format!("deleting membership Lease {name}"),
            self.cfg.api_timeout,
            self.leases().delete(&name, &DeleteParams::default()),
        )
        .await
        {
            tracing::warn!(error = %e, "leaving the shard group");
        }
    }
}
