//! The write budget of one replica, in one place: every write the reconcile and renewal lanes
//! make asks here first.
//!
//! - A global budget (`--qps`, `--burst`, GCRA via `governor`) caps what one replica sends.
//! - Renewals are budgeted first: while a renewal waits for a token, reconciles do not take
//!   one, so a reconcile storm can delay elections but never make a Lease lapse.
//! - A keyed per-namespace budget (`--tenant-qps`) applies to reconciles only. It is checked
//!   without waiting: a reconcile whose namespace is over budget is put back on the queue
//!   with the budget's own wait time, so a noisy tenant cannot park the shared workers and
//!   starve other namespaces (head-of-line blocking).
//!
//! Membership and ownership writes of the shard runtime are not budgeted: their number is
//! bounded by the locks that move between replicas, never by what tenants do, and delaying
//! them would delay a handoff.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};
use tokio::sync::Notify;

/// Which lane a write belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    /// A Lease renewal for the same holder: served before any reconcile write.
    Renewal,
    /// Everything else a reconcile writes (Leases, pod labels, status, Events).
    Reconcile,
}

pub struct Limits {
    global: Option<DefaultDirectRateLimiter>,
    tenant: Option<DefaultKeyedRateLimiter<String>>,
    tenant_burst: u32,
    tenant_qps: f64,
    /// Locks waiting for their namespace's budget, by namespace: a deferred lock comes back at
    /// a random point of the time the budget needs to serve all of them, not all at once.
    deferred:
        std::sync::Mutex<std::collections::HashMap<String, std::collections::HashSet<String>>>,
    renewals_waiting: AtomicUsize,
    renewal_done: Notify,
    clock: DefaultClock,
}

fn quota(qps: f64, burst: u32) -> Option<Quota> {
    if !(qps.is_finite() && qps > 0.0) {
        return None;
    }
    let period = Duration::from_secs_f64(1.0 / qps).max(Duration::from_nanos(1));
    let burst = NonZeroU32::new(burst.max(1))?;
    Some(Quota::with_period(period)?.allow_burst(burst))
}

impl Limits {
    /// `qps` ≤ 0 disables the global budget; `tenant_qps` ≤ 0 disables the per-namespace one
    /// (its burst is twice its rate, at least 1).
    pub fn new(qps: f64, burst: u32, tenant_qps: f64) -> Limits {
        let tenant_burst = (tenant_qps * 2.0).ceil().clamp(1.0, f64::from(u32::MAX)) as u32;
        Limits {
            global: quota(qps, burst).map(RateLimiter::direct),
            tenant: quota(tenant_qps, tenant_burst).map(RateLimiter::keyed),
            tenant_burst,
            tenant_qps,
            deferred: Default::default(),
            renewals_waiting: AtomicUsize::new(0),
            renewal_done: Notify::new(),
            clock: DefaultClock::default(),
        }
    }

    /// No limits at all.
    pub fn unlimited() -> Limits {
        Limits::new(0.0, 1, 0.0)
    }

    /// Reserve `writes` tokens of `namespace`'s budget for the reconcile of `lock`, without
    /// waiting. `Err(wait)` means the namespace is over budget: requeue the lock after `wait`,
    /// which spreads the namespace's deferred locks over the time its budget needs for them
    /// (so they do not all wake together and spin the reconcile lane).
    pub fn tenant_admit(&self, namespace: &str, lock: &str, writes: u32) -> Result<(), Duration> {
        let (Some(tenant), Some(n)) = (&self.tenant, NonZeroU32::new(writes)) else {
            return Ok(());
        };
        // A plan larger than the burst can never pass whole: admit it against the burst.
        let n = n.min(NonZeroU32::new(self.tenant_burst).unwrap_or(NonZeroU32::MIN));
        let mut deferred = self.deferred.lock().unwrap_or_else(|p| p.into_inner());
        match tenant.check_key_n(&namespace.to_string(), n) {
            Ok(Ok(())) | Err(_) => {
                if let Some(set) = deferred.get_mut(namespace) {
                    set.remove(lock);
                    if set.is_empty() {
                        deferred.remove(namespace);
                    }
                }
                Ok(())
            }
            Ok(Err(not_until)) => {
                let waiting = {
                    let set = deferred.entry(namespace.to_string()).or_default();
                    set.insert(lock.to_string());
                    set.len()
                };
                let base = not_until.wait_time_from(self.clock.now());
                // Each deferred lock needs about `n` tokens.
                let backlog = Duration::from_secs_f64(
                    (waiting as f64 * f64::from(n.get()) / self.tenant_qps).min(300.0),
                );
                Err((base + backlog.mul_f64(rand::random::<f64>())).max(Duration::from_millis(10)))
            }
        }
    }

    /// Locks currently deferred by their namespace's budget.
    pub fn deferred_locks(&self) -> usize {
        self.deferred
            .lock()
            .map(|d| d.values().map(|s| s.len()).sum())
            .unwrap_or(0)
    }

    /// Wait for one token of the global budget; renewals go first. Returns the time waited.
    pub async fn acquire(&self, lane: Lane) -> Duration {
        let Some(global) = &self.global else {
            return Duration::ZERO;
        };
        let start = tokio::time::Instant::now();
        match lane {
            Lane::Renewal => {
                self.renewals_waiting.fetch_add(1, Ordering::SeqCst);
                global.until_ready().await;
                self.renewals_waiting.fetch_sub(1, Ordering::SeqCst);
                self.renewal_done.notify_waiters();
            }
            Lane::Reconcile => loop {
                if self.renewals_waiting.load(Ordering::SeqCst) > 0 {
                    let done = self.renewal_done.notified();
                    // Re-check after registering, so a wake-up between the two is not lost;
                    // the timeout bounds any missed notification.
                    if self.renewals_waiting.load(Ordering::SeqCst) > 0 {
                        let _ = tokio::time::timeout(Duration::from_millis(50), done).await;
                    }
                    continue;
                }
                match global.check() {
                    Ok(()) => break,
                    Err(not_until) => {
                        let wait = not_until.wait_time_from(self.clock.now());
                        tokio::time::sleep(wait.max(Duration::from_micros(100))).await;
                    }
                }
            },
        }
        let waited = start.elapsed();
        if !waited.is_zero() {
            crate::metrics::with_current(|m| m.rate_limit_wait(waited));
        }
        waited
    }

    /// Forget idle namespaces' budget state (call now and then).
    pub fn forget_idle(&self) {
        if let Ok(mut d) = self.deferred.lock() {
            d.retain(|_, s| !s.is_empty());
        }
        if let Some(t) = &self.tenant {
            t.retain_recent();
            t.shrink_to_fit();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test]
    async fn unlimited_never_waits() {
        let l = Limits::unlimited();
        for _ in 0..10_000 {
            assert_eq!(l.acquire(Lane::Reconcile).await, Duration::ZERO);
        }
        assert!(l.tenant_admit("a", "x", 100).is_ok());
    }

    #[tokio::test]
    async fn tenant_budget_defers_only_the_noisy_namespace() {
        let l = Limits::new(0.0, 1, 5.0); // 5/s per namespace, burst 10
        let mut admitted = 0;
        let mut waits = vec![];
        for i in 0..50 {
            match l.tenant_admit("noisy", &format!("l{i}"), 1) {
                Ok(()) => admitted += 1,
                Err(w) => waits.push(w),
            }
        }
        assert_eq!(admitted, 10, "burst of a 5 qps tenant is 10");
        assert_eq!(l.deferred_locks(), 40);
        // 40 deferred locks at 5/s need 8 s: the k-th deferred lock retries at a random point
        // of the k/5 s its namespace's budget needs for the k locks deferred so far, so the
        // retries are spread over the 8 s instead of bunched at the first free token.
        for (k, w) in waits.iter().enumerate() {
            let bound = Duration::from_millis(300) + Duration::from_secs_f64((k + 1) as f64 / 5.0);
            assert!(*w <= bound, "retry {k} at {w:?}, beyond {bound:?}");
        }
        // Spread: (almost surely) several distinct seconds, some in the second half. The
        // expected number beyond 4 s is about 6 (sum over k > 20 of 1 - 20/k); none at all has
        // a probability near 1e-11.
        let seconds: std::collections::BTreeSet<u64> = waits.iter().map(|w| w.as_secs()).collect();
        assert!(seconds.len() >= 4, "retries bunched in {seconds:?}");
        assert!(
            waits.iter().any(|w| *w > Duration::from_secs(4)),
            "no retry in the second half: {waits:?}"
        );
        assert!(
            l.tenant_admit("quiet", "q", 1).is_ok(),
            "another namespace is unaffected"
        );
        // A plan bigger than the burst is admitted against the burst, not refused forever.
        assert!(l.tenant_admit("big", "b", 1000).is_ok());
    }

    #[tokio::test]
    async fn renewals_go_first() {
        // 200 qps, burst 1: tokens arrive every 5 ms. Saturate with reconciles, then ask for
        // renewals: each renewal must get one of the next few tokens, not wait behind the
        // reconcile backlog.
        let l = Arc::new(Limits::new(200.0, 1, 0.0));
        let order = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut tasks = vec![];
        for i in 0..40 {
            let (l, order) = (l.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                let waited = l.acquire(Lane::Reconcile).await;
                order.lock().unwrap().push(("reconcile", i, waited));
            }));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        for i in 0..5 {
            let (l, order) = (l.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                let waited = l.acquire(Lane::Renewal).await;
                order.lock().unwrap().push(("renewal", i, waited));
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let order = order.lock().unwrap();
        let last_renewal = order.iter().rposition(|(k, _, _)| *k == "renewal").unwrap();
        let reconciles_before = order[..last_renewal]
            .iter()
            .filter(|(k, _, _)| *k == "reconcile")
            .count();
        // Without priority the renewals would queue behind ~35 reconciles.
        assert!(
            reconciles_before <= 15,
            "renewals waited behind {reconciles_before} reconciles: {order:?}"
        );
        assert!(order.iter().any(|(_, _, waited)| !waited.is_zero()));
    }
}
