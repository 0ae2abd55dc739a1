//! Membership: every replica holds a Lease `<group>-<id>`; a member is alive while its Lease
//! is renewed (`renew + duration > now`, by the observer's clock).

use std::time::Duration;

/// A member as seen from its membership Lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub id: String,
    /// Milliseconds on the observer's clock when the Lease was last seen renewed.
    pub renewed_at_ms: u64,
    pub duration: Duration,
    /// The Lease is being deleted (graceful leave): not a member any more.
    pub leaving: bool,
}

/// The Lease name of member `id` in `group`.
pub fn membership_lease_name(group: &str, id: &str) -> String {
    format!("{group}-{id}")
}

/// Members whose Lease is live at `now_ms`, sorted. `grace` is added to each member's duration:
/// an observer only declares a peer dead after its Lease has been expired for the grace, which
/// covers clock-rate differences between the observer and the holder (see [`crate::fence`]).
pub fn alive_members(members: &[Member], now_ms: u64, grace: Duration) -> Vec<String> {
    let mut out: Vec<String> = members
        .iter()
        .filter(|m| !m.leaving)
        .filter(|m| {
            let deadline = m.renewed_at_ms + (m.duration + grace).as_millis() as u64;
            now_ms < deadline
        })
        .map(|m| m.id.clone())
        .collect();
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(id: &str, at: u64, leaving: bool) -> Member {
        Member {
            id: id.into(),
            renewed_at_ms: at,
            duration: Duration::from_secs(15),
            leaving,
        }
    }

    #[test]
    fn alive_until_duration_plus_grace() {
        let ms = vec![
            m("b", 0, false),
            m("a", 10_000, false),
            m("c", 10_000, true),
        ];
        let grace = Duration::from_secs(2);
        assert_eq!(alive_members(&ms, 16_999, grace), vec!["a", "b"]);
        assert_eq!(alive_members(&ms, 17_000, grace), vec!["a"]);
        assert_eq!(
            membership_lease_name("stslock", "stslock-0"),
            "stslock-stslock-0"
        );
    }
}
