//! What a replica does about one key, from the ownership label on the object, the ring and the
//! alive members (DESIGN §4). Ownership is recorded on the object, never inferred: two replicas
//! with different ring views can disagree about the ring, but only one of them can win the
//! compare-and-swap that writes the label, and only the labelled replica writes.

use std::collections::HashSet;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Labelled with me and the ring agrees: do the work.
    Own,
    /// Unlabelled, or labelled with a dead member, and the ring says me: claim it (CAS).
    Claim,
    /// Labelled with me but the ring says another alive member: drain (stop new work, wait for
    /// in-flight work and timers), then hand the label over (CAS).
    Release { to: String },
    /// Labelled with an alive member that must hand it to me: wait.
    WaitForHandoff { from: String },
    /// Someone else's.
    NotMine,
}

/// Decide for one key. `label` is the owner recorded on the object, `ring_owner` the ring's
/// answer among `alive` members.
pub fn decide(
    label: Option<&str>,
    ring_owner: Option<&str>,
    me: &str,
    alive: &HashSet<String>,
) -> Decision {
    let labelled_alive = label.filter(|l| alive.contains(*l));
    match (labelled_alive, ring_owner) {
        // Nobody alive holds it: the ring owner claims it.
        (None, Some(r)) if r == me => Decision::Claim,
        (None, _) => Decision::NotMine,
        (Some(l), Some(r)) if l == me && r == me => Decision::Own,
        (Some(l), Some(r)) if l == me => Decision::Release { to: r.to_string() },
        // An empty ring means I do not see myself alive: keep what is labelled mine, the fence
        // decides whether I may write.
        (Some(l), None) if l == me => Decision::Own,
        (Some(l), Some(r)) if r == me => Decision::WaitForHandoff {
            from: l.to_string(),
        },
        (Some(_), _) => Decision::NotMine,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alive(ids: &[&str]) -> HashSet<String> {
        ids.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_rules() {
        let a = alive(&["a", "b"]);
        assert_eq!(decide(None, Some("a"), "a", &a), Decision::Claim);
        assert_eq!(decide(None, Some("b"), "a", &a), Decision::NotMine);
        assert_eq!(decide(Some("dead"), Some("a"), "a", &a), Decision::Claim);
        assert_eq!(decide(Some("a"), Some("a"), "a", &a), Decision::Own);
        assert_eq!(
            decide(Some("a"), Some("b"), "a", &a),
            Decision::Release { to: "b".into() }
        );
        assert_eq!(
            decide(Some("b"), Some("a"), "a", &a),
            Decision::WaitForHandoff { from: "b".into() }
        );
        assert_eq!(decide(Some("b"), Some("b"), "a", &a), Decision::NotMine);
    }

    /// For any labels and any two replicas' (possibly different) ring views, at most one of
    /// them decides Own for a key: the label names one replica.
    #[test]
    fn at_most_one_owner_whatever_the_views() {
        let ids = ["a", "b", "c"];
        let a = alive(&ids);
        for label in [None, Some("a"), Some("b"), Some("c"), Some("dead")] {
            for view_a in ids {
                for view_b in ids {
                    let da = decide(label, Some(view_a), "a", &a);
                    let db = decide(label, Some(view_b), "b", &a);
                    assert!(!(da == Decision::Own && db == Decision::Own));
                }
            }
        }
    }
}
