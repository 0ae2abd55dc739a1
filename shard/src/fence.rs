//! Self-fencing: a replica stops every write once its membership Lease may have lapsed in its
//! peers' eyes, and peers take its keys only after that.
//!
//! The argument. Let S be the membership Lease duration. The holder measures from the instant
//! *before* it sent the renew request (t0, its own monotonic clock); the apiserver records the
//! renewal at some later instant, so any peer's view of the renewal is no earlier than t0. The
//! holder writes only while `elapsed(t0) < S − margin`. A peer declares the holder dead only
//! when, by its own clock, `S + grace` has passed since it saw the renewal. If the two clocks'
//! rates differ by at most a factor ρ (quartz drift is ~10⁻⁵; allow ρ = 1.01), the holder stops
//! at real time ≤ (S − margin)·ρ after t0, while the peer acts at real time ≥ (S + grace)/ρ
//! after t0. With margin and grace ≥ 2% of S this holds with room to spare; the defaults
//! (S = 15 s, margin = 3 s, grace = 2 s) give a window of ≥ 4.9 s between the holder's last
//! write and a peer's first.

use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Fence {
    duration: Duration,
    margin: Duration,
    /// Monotonic time (any origin) taken before the last successful renew was sent.
    last_renew_start: Option<Duration>,
}

impl Fence {
    pub fn new(duration: Duration, margin: Duration) -> Fence {
        Fence {
            duration,
            margin,
            last_renew_start: None,
        }
    }

    /// A renew sent at `started` (read before sending) succeeded.
    pub fn renewed(&mut self, started: Duration) {
        self.last_renew_start = Some(self.last_renew_start.map_or(started, |t| t.max(started)));
    }

    /// Has the Lease possibly expired since the last successful renewal, as of `now` (more
    /// than its duration since that renew was sent, or never renewed)? Only then may peers
    /// have taken keys away.
    pub fn may_have_expired(&self, now: Duration) -> bool {
        self.last_renew_start
            .is_none_or(|t| now.saturating_sub(t) >= self.duration)
    }

    /// May this replica write at monotonic time `now`?
    pub fn may_write(&self, now: Duration) -> bool {
        !self.remaining(now).is_zero()
    }

    /// How long writes stay allowed from `now`. A write must also *complete* within this
    /// (use it to bound the request's timeout): a request answered after the fence closed
    /// could land after a peer took over.
    pub fn remaining(&self, now: Duration) -> Duration {
        match self.last_renew_start {
            Some(t) => (t + self.duration.saturating_sub(self.margin)).saturating_sub(now),
            None => Duration::ZERO,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stops_writing_before_the_lease_could_lapse() {
        let s = Duration::from_secs;
        let mut f = Fence::new(s(15), s(3));
        assert!(!f.may_write(s(0)), "never renewed: no writes");
        f.renewed(s(10));
        assert!(f.may_write(s(21)));
        assert_eq!(f.remaining(s(21)), s(1));
        assert!(!f.may_write(s(22)));
        // A late, older success does not extend the window.
        f.renewed(s(5));
        assert!(!f.may_write(s(22)));
        f.renewed(s(20));
        assert!(f.may_write(s(31)));
    }
}
