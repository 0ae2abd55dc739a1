//! Hysteresis on handoffs: a peer that left this observer's ring and came back is handed locks
//! only after it has stayed on the ring for a hold time.
//!
//! Without it, a peer whose membership flaps (renewals failing around a restart, a leave whose
//! mark was not seen, a Lease deleted and re-created) has its share of the locks moved away and
//! back within a second: each move is a handoff (a Lease renewal, a label write, the new owner's
//! first renewal), and under API faults a lock handed back and forth has no renewing owner for as
//! long as the moves take. Only handoffs wait: the ring itself follows liveness at once (so claims
//! and the locks a peer keeps are decided as before, and a peer that looked gone only because
//! this observer's view was stale costs nothing but the delayed handoffs). Peers never on the
//! ring before (a start, a new replica) are handed locks at once.

use std::collections::{HashMap, HashSet};

#[derive(Debug, Default)]
pub struct Rejoin {
    hold_ms: u64,
    /// Peers on the ring as last observed.
    on: HashSet<String>,
    /// Peers that have been on the ring at some time.
    seen: HashSet<String>,
    /// Peers back on the ring after being off it: since when (observer's clock, ms).
    back_since: HashMap<String, u64>,
}

impl Rejoin {
    pub fn new(hold_ms: u64) -> Rejoin {
        Rejoin {
            hold_ms,
            ..Rejoin::default()
        }
    }

    /// Note the ring's members at `now_ms`.
    pub fn observe(&mut self, ring: &[String], now_ms: u64) {
        let now: HashSet<String> = ring.iter().cloned().collect();
        for id in &now {
            if !self.on.contains(id) && self.seen.contains(id) {
                self.back_since.insert(id.clone(), now_ms);
            }
        }
        let hold = self.hold_ms;
        self.back_since
            .retain(|id, since| now.contains(id) && now_ms.saturating_sub(*since) < hold);
        self.seen.extend(now.iter().cloned());
        self.on = now;
    }

    /// Whether locks may be handed to `id` at `now_ms`: not while it is back on the ring for
    /// less than the hold.
    pub fn may_hand_to(&self, id: &str, now_ms: u64) -> bool {
        self.back_since
            .get(id)
            .is_none_or(|since| now_ms.saturating_sub(*since) >= self.hold_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn new_peers_get_locks_at_once_and_returning_ones_after_the_hold() {
        let mut r = Rejoin::new(5000);
        r.observe(&ids(&["a", "b"]), 0);
        assert!(r.may_hand_to("b", 0));
        // A third replica starts: at once.
        r.observe(&ids(&["a", "b", "c"]), 100);
        assert!(r.may_hand_to("c", 100));
        // b drops off and comes back 300 ms later: held for 5 s from its return.
        r.observe(&ids(&["a", "c"]), 1000);
        r.observe(&ids(&["a", "b", "c"]), 1300);
        assert!(!r.may_hand_to("b", 1300));
        assert!(!r.may_hand_to("b", 6299));
        assert!(r.may_hand_to("c", 6299));
        assert!(r.may_hand_to("b", 6300));
        r.observe(&ids(&["a", "b", "c"]), 6300);
        assert!(r.back_since.is_empty());
    }

    #[test]
    fn dropping_off_again_while_held_starts_the_hold_again() {
        let mut r = Rejoin::new(1000);
        r.observe(&ids(&["a", "b"]), 0);
        r.observe(&ids(&["a"]), 10);
        r.observe(&ids(&["a", "b"]), 20);
        r.observe(&ids(&["a"]), 500);
        r.observe(&ids(&["a", "b"]), 900);
        assert!(!r.may_hand_to("b", 1899));
        assert!(r.may_hand_to("b", 1900));
    }
}
