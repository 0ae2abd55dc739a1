//! The write budget of one replica, in one place: every write the reconcile and renewal lanes
//! make asks here first.
//!
//! - A global budget (`--qps`, `--burst`, GCRA via `governor`) caps what one replica sends.
//! - Renewals are budgeted first: while a renewal waits for a token, reconciles do not take
//!   one, so a reconcile storm can delay elections but never make a Lease lapse.
//! - A per-namespace budget (`--tenant-qps`, burst twice that) applies to reconciles only. It
//!   is checked without waiting: a reconcile whose namespace is over budget is put back on the
//!   queue, so a noisy tenant cannot park the shared workers and starve other namespaces
//!   (head-of-line blocking). Over budget, the plan's writes are reserved at once (as
//!   `golang.org/x/time/rate`'s `Reserve`): the lock comes back exactly when its tokens are
//!   there, in the order the namespace's locks asked, and is then admitted without paying
//!   again — no retries bunched at the first free token, none pushed behind newcomers, no
//!   time lost past the budget's own wait.
//! - A plan that restores a writer (a failover, a first election, the promotion completing
//!   one) is urgent: the StatefulSet has no usable writer until it lands. It is charged like
//!   any other plan and never borrows, but it is served before every plan of its namespace
//!   that is not urgent and still waits (status updates, switchovers), which move back by its
//!   writes: the namespace's rate holds, only the order changes. Urgent plans are served in
//!   the order they asked.
//! - A lock that comes back with a bigger plan than it reserved for (a status update that
//!   became a failover) pays the difference: nothing is sent that was not charged.
//!
//! Membership and ownership writes of the shard runtime are not budgeted: their number is
//! bounded by the locks that move between replicas, never by what tenants do, and delaying
//! them would delay a handoff.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::sync::Notify;
use tokio::time::Instant;

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
    /// Where time spent waiting for the global budget is counted.
    metrics: Option<std::sync::Arc<crate::metrics::Metrics>>,
    tenant: Option<TenantBudget>,
    renewals_waiting: AtomicUsize,
    renewal_done: Notify,
    clock: DefaultClock,
}

/// The per-namespace budget: GCRA (a token bucket kept as one "theoretical arrival time" per
/// namespace) with reservations. On tokio's clock, so tests run it on paused time.
struct TenantBudget {
    /// Time one write's token takes to come back.
    period: Duration,
    burst: u32,
    /// Per namespace, sharded: workers of different namespaces do not queue on one lock.
    spaces: dashmap::DashMap<String, Space>,
}

#[derive(Default)]
struct Space {
    /// When the namespace's bucket is full again (at or before now: full).
    tat: Option<Instant>,
    /// Locks whose writes are paid for, and from when they may send them.
    reserved: HashMap<String, Reservation>,
}

#[derive(Clone, Copy)]
struct Reservation {
    at: Instant,
    writes: u32,
    /// It restores a writer: no plan that does not is ever put before it.
    urgent: bool,
}

/// A reservation not used this long after its time (the lock was deleted, or had nothing left
/// to write) is dropped.
const UNUSED_RESERVATION: Duration = Duration::from_secs(60);

impl TenantBudget {
    fn admit(
        &self,
        namespace: &str,
        lock: &str,
        writes: u32,
        urgent: bool,
    ) -> Result<(), Duration> {
        let now = Instant::now();
        // A plan larger than the burst can never pass whole: charge it the burst.
        let n = writes.clamp(1, self.burst);
        let mut entry = self.spaces.entry(namespace.to_string()).or_default();
        let space = &mut *entry;
        // Back with a reservation (another trigger, or its time has come): its place and the
        // writes it paid for are kept.
        let prior = space.reserved.remove(lock);
        let paid = prior.map_or(0, |r| r.writes);
        // Writes not paid for (a new plan; or one that grew while it waited, as a status
        // update that became a failover) are charged now, at the end of the namespace's
        // queue: the plan may go once the bucket holds them, and not before its old place.
        let unpaid = n.saturating_sub(paid);
        let (at, behind) = match prior {
            Some(r) if unpaid == 0 => (r.at, r.at),
            _ => {
                let tat = space.tat.map_or(now, |t| t.max(now)) + self.period * unpaid;
                space.tat = Some(tat);
                // Allowed once `tat` is at most a burst ahead.
                let ready = now
                    + tat
                        .saturating_duration_since(now)
                        .saturating_sub(self.period * self.burst);
                (
                    prior.map_or(ready, |r| r.at.max(ready)),
                    tat + self.period * self.burst,
                )
            }
        };
        let was_urgent = prior.is_some_and(|r| r.urgent);
        // An urgent plan moves up, once: when it asks first, when it turns urgent (it lost
        // its writer while it waited), or when it grew and was charged at the end again.
        let moves_up = urgent && !(was_urgent && unpaid == 0);
        let at = if moves_up {
            // Ahead of every plan that is not urgent and still waits (those placed before
            // `behind`): each moves back by this plan's writes, so the namespace's rate holds.
            let mut overtaken = 0;
            for r in space
                .reserved
                .values_mut()
                .filter(|r| !r.urgent && r.at > now && r.at < behind)
            {
                overtaken += r.writes;
                r.at += self.period * n.max(paid);
            }
            at.checked_sub(self.period * overtaken)
                .map_or(now, |t| t.max(now))
        } else {
            at
        };
        if at <= now {
            return Ok(());
        }
        space.reserved.insert(
            lock.to_string(),
            Reservation {
                at,
                writes: n.max(paid),
                urgent: urgent || was_urgent,
            },
        );
        Err(at - now)
    }

    fn deferred(&self) -> usize {
        let now = Instant::now();
        self.spaces
            .iter()
            .map(|s| s.reserved.values().filter(|r| r.at > now).count())
            .sum()
    }

    fn forget_idle(&self) {
        let now = Instant::now();
        self.spaces.retain(|_, s| {
            s.reserved.retain(|_, r| r.at + UNUSED_RESERVATION > now);
            !s.reserved.is_empty() || s.tat.is_some_and(|t| t > now)
        });
        self.spaces.shrink_to_fit();
    }
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
        let tenant = (tenant_qps.is_finite() && tenant_qps > 0.0).then(|| TenantBudget {
            period: Duration::from_secs_f64(1.0 / tenant_qps).max(Duration::from_nanos(1)),
            burst: tenant_burst,
            spaces: Default::default(),
        });
        Limits {
            global: quota(qps, burst).map(RateLimiter::direct),
            metrics: None,
            tenant,
            renewals_waiting: AtomicUsize::new(0),
            renewal_done: Notify::new(),
            clock: DefaultClock::default(),
        }
    }

    /// Count the time writes wait for the budget in `metrics`.
    pub fn with_metrics(mut self, metrics: std::sync::Arc<crate::metrics::Metrics>) -> Limits {
        self.metrics = Some(metrics);
        self
    }

    /// No limits at all.
    pub fn unlimited() -> Limits {
        Limits::new(0.0, 1, 0.0)
    }

    /// Admit the reconcile of `lock` and its `writes` writes against `namespace`'s budget,
    /// without waiting. `Err(wait)` means the namespace is over budget: the writes are
    /// reserved, and the lock is admitted when it comes back after `wait` (not before, and
    /// without paying again). Its namespace's other locks queue behind it, not in front.
    /// An `urgent` plan (one that restores a writer) goes before waiting plans that are not.
    pub fn tenant_admit(
        &self,
        namespace: &str,
        lock: &str,
        writes: u32,
        urgent: bool,
    ) -> Result<(), Duration> {
        match &self.tenant {
            Some(t) if writes > 0 => t.admit(namespace, lock, writes, urgent),
            _ => Ok(()),
        }
    }

    /// Locks currently deferred by their namespace's budget.
    pub fn deferred_locks(&self) -> usize {
        self.tenant.as_ref().map_or(0, TenantBudget::deferred)
    }

    /// Wait for one token of the global budget; renewals go first. Returns the time waited.
    pub async fn acquire(&self, lane: Lane) -> Duration {
        let Some(global) = &self.global else {
            return Duration::ZERO;
        };
        let start = tokio::time::Instant::now();
        match lane {
            Lane::Renewal => {
                // Counted down on drop: a renewal whose wait is cancelled (its task aborted, a
                // timeout around it) must not hold the reconcile lane back for ever.
                let _waiting = RenewalWaiting::new(self);
                global.until_ready().await;
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
        if !waited.is_zero()
            && let Some(m) = &self.metrics
        {
            m.rate_limit_wait(waited);
        }
        waited
    }

    /// Forget idle namespaces' budget state (call now and then).
    pub fn forget_idle(&self) {
        if let Some(t) = &self.tenant {
            t.forget_idle();
        }
    }
}

/// A renewal waiting for the global budget, from `new` until dropped.
struct RenewalWaiting<'a>(&'a Limits);

impl<'a> RenewalWaiting<'a> {
    fn new(limits: &'a Limits) -> Self {
        limits.renewals_waiting.fetch_add(1, Ordering::SeqCst);
        RenewalWaiting(limits)
    }
}

impl Drop for RenewalWaiting<'_> {
    fn drop(&mut self) {
        self.0.renewals_waiting.fetch_sub(1, Ordering::SeqCst);
        self.0.renewal_done.notify_waiters();
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
        assert!(l.tenant_admit("a", "x", 100, false).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn tenant_budget_defers_only_the_noisy_namespace() {
        let l = Limits::new(0.0, 1, 5.0); // 5/s per namespace, burst 10
        let mut admitted = 0;
        let mut waits = vec![];
        for i in 0..50 {
            match l.tenant_admit("noisy", &format!("l{i}"), 1, false) {
                Ok(()) => admitted += 1,
                Err(w) => waits.push(w),
            }
        }
        assert_eq!(admitted, 10, "burst of a 5 qps tenant is 10");
        assert_eq!(l.deferred_locks(), 40);
        // The k-th deferred lock comes back exactly when its token is there: 200 ms apart,
        // in the order they asked, the last after the 8 s the budget needs for 40 writes.
        let expected: Vec<Duration> = (1..=40).map(|k| Duration::from_millis(200 * k)).collect();
        assert_eq!(waits, expected);
        assert!(
            l.tenant_admit("quiet", "q", 1, false).is_ok(),
            "another namespace is unaffected"
        );
        // A plan bigger than the burst is admitted against the burst, not refused forever.
        assert!(l.tenant_admit("big", "b", 1000, false).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn a_deferred_lock_keeps_its_place_and_pays_once() {
        let l = Limits::new(0.0, 1, 5.0); // 5/s per namespace, burst 10
        assert!(
            l.tenant_admit("ns", "big", 10, false).is_ok(),
            "the whole burst"
        );
        assert_eq!(
            l.tenant_admit("ns", "a", 2, false),
            Err(Duration::from_millis(400))
        );
        assert_eq!(
            l.tenant_admit("ns", "b", 1, false),
            Err(Duration::from_millis(600))
        );
        // `a` triggered again early: same place, nothing charged again.
        tokio::time::advance(Duration::from_millis(100)).await;
        assert_eq!(
            l.tenant_admit("ns", "a", 2, false),
            Err(Duration::from_millis(300))
        );
        // A newcomer queues behind both.
        assert_eq!(
            l.tenant_admit("ns", "c", 1, false),
            Err(Duration::from_millis(700))
        );
        tokio::time::advance(Duration::from_millis(300)).await;
        assert!(
            l.tenant_admit("ns", "a", 2, false).is_ok(),
            "prepaid: admitted on time"
        );
        assert_eq!(l.deferred_locks(), 2);
        tokio::time::advance(Duration::from_millis(400)).await;
        assert!(l.tenant_admit("ns", "b", 1, false).is_ok());
        assert!(l.tenant_admit("ns", "c", 1, false).is_ok());
        assert_eq!(l.deferred_locks(), 0);
        // Reservations never used are dropped; a full bucket is forgotten.
        assert!(l.tenant_admit("ns", "gone", 1, false).is_err());
        tokio::time::advance(Duration::from_secs(120)).await;
        l.forget_idle();
        assert!(l.tenant.as_ref().unwrap().spaces.is_empty());
        assert!(
            l.tenant_admit("ns", "e", 10, false).is_ok(),
            "bucket full again"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_plan_that_restores_a_writer_goes_first_and_pays_its_way() {
        let l = Limits::new(0.0, 1, 5.0); // 5/s per namespace, burst 10
        assert!(l.tenant_admit("ns", "elections", 10, false).is_ok());
        // The bucket is empty: a status update waits for its 2 writes...
        assert_eq!(
            l.tenant_admit("ns", "status", 2, false),
            Err(Duration::from_millis(400))
        );
        // ...and a failover never borrows: it waits for tokens too, but takes the status
        // update's place, which moves back by the failover's writes.
        assert_eq!(
            l.tenant_admit("ns", "f0", 2, true),
            Err(Duration::from_millis(400))
        );
        assert_eq!(
            l.tenant_admit("ns", "status", 2, false),
            Err(Duration::from_millis(800))
        );
        // Urgent plans keep their order among themselves.
        assert_eq!(
            l.tenant_admit("ns", "f1", 3, true),
            Err(Duration::from_millis(1000))
        );
        assert_eq!(
            l.tenant_admit("ns", "status", 2, false),
            Err(Duration::from_millis(1400))
        );
        // Nothing was given away: a newcomer waits for every write charged before it.
        assert_eq!(
            l.tenant_admit("ns", "late", 1, false),
            Err(Duration::from_millis(1600))
        );
        tokio::time::advance(Duration::from_millis(400)).await;
        assert!(l.tenant_admit("ns", "f0", 2, true).is_ok());
        // A waiting plan that turns urgent moves ahead of the plans that are not, behind f1,
        // without paying again.
        assert_eq!(
            l.tenant_admit("ns", "late", 1, true),
            Err(Duration::from_millis(800))
        );
        assert_eq!(
            l.tenant_admit("ns", "status", 2, false),
            Err(Duration::from_millis(1200))
        );
        assert_eq!(l.deferred_locks(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_plan_that_grew_while_it_waited_pays_the_difference() {
        let l = Limits::new(0.0, 1, 5.0); // 5/s per namespace, burst 10
        assert!(l.tenant_admit("ns", "elections", 10, false).is_ok());
        // A status write reserved for 1 write...
        assert_eq!(
            l.tenant_admit("ns", "a", 1, false),
            Err(Duration::from_millis(200))
        );
        assert_eq!(
            l.tenant_admit("ns", "b", 1, false),
            Err(Duration::from_millis(400))
        );
        // ...comes back as a failover of 4: the 3 writes it did not pay for are charged at
        // the end of the queue (1.0 s), then it moves ahead of b, which moves back by 4 writes.
        assert_eq!(
            l.tenant_admit("ns", "a", 4, true),
            Err(Duration::from_millis(800))
        );
        assert_eq!(
            l.tenant_admit("ns", "b", 1, false),
            Err(Duration::from_millis(1200))
        );
        // Every write was charged: a newcomer waits until the bucket has refilled all 16
        // (3.2 s) but its burst of 10 (2 s).
        assert_eq!(
            l.tenant_admit("ns", "c", 1, false),
            Err(Duration::from_millis(1200))
        );
        // On time, with what it paid for, it passes; a plan that grew after its time waits for
        // the rest.
        tokio::time::advance(Duration::from_millis(800)).await;
        assert!(l.tenant_admit("ns", "a", 4, true).is_ok());
        tokio::time::advance(Duration::from_millis(400)).await;
        assert_eq!(
            l.tenant_admit("ns", "b", 3, false),
            Err(Duration::from_millis(400))
        );
    }

    /// A renewal whose wait for the budget is cancelled stops counting as waiting: before, the
    /// counter stayed up and every later reconcile write waited for ever (and with it the
    /// replica's graceful stop, which waits for running reconciles).
    #[tokio::test]
    async fn a_cancelled_renewal_wait_does_not_hold_reconciles_back() {
        // 1 qps, burst 1: the first token goes at once, the next in a second.
        let l = Limits::new(1.0, 1, 0.0);
        l.acquire(Lane::Reconcile).await;
        let cancelled =
            tokio::time::timeout(Duration::from_millis(50), l.acquire(Lane::Renewal)).await;
        assert!(cancelled.is_err(), "the renewal had to wait for a token");
        let reconcile = tokio::time::timeout(Duration::from_secs(5), l.acquire(Lane::Reconcile))
            .await
            .expect("a reconcile write gets the next token");
        assert!(reconcile <= Duration::from_secs(2), "waited {reconcile:?}");
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
