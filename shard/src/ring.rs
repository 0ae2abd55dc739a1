//! The consistent-hash ring of alive members, with virtual nodes.
//!
//! `hashring` hashes with SipHash under fixed keys, so every replica that sees the same members
//! builds the same ring — the property ownership relies on. It has no virtual nodes of its own:
//! each member is added as `VNODES` entries `(member, i)`, in one `batch_add` (it re-sorts on
//! every add).

use std::hash::BuildHasher;

use hashring::{DefaultHashBuilder, HashRing};

/// Virtual nodes per member. Chosen by `ring::tests::vnode_balance_table` (printed with
/// `cargo test -p stslock-shard vnode_balance -- --nocapture`): at 128 the busiest of 3 members
/// owns 1.07× the mean of 10k keys (16 vnodes: 1.21, 64: 1.08, 256: 1.07) and 32 members stay
/// under 1.2×, while build and lookup stay cheap (`cargo bench -p stslock-bench`).
pub const VNODES: u32 = 128;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct VNode {
    member: String,
    index: u32,
}

#[derive(Clone)]
pub struct Ring {
    ring: HashRing<VNode>,
    members: Vec<String>,
    /// The virtual nodes as `ring` places them (hash, index into `members`), sorted: for walks
    /// past the owner ([`Ring::walk`]).
    points: Vec<(u64, usize)>,
}

impl Ring {
    /// A ring of `members` (order does not matter) with [`VNODES`] virtual nodes each.
    pub fn new(members: &[String]) -> Ring {
        Self::with_vnodes(members, VNODES)
    }

    pub fn with_vnodes(members: &[String], vnodes: u32) -> Ring {
        let mut sorted: Vec<String> = members.to_vec();
        sorted.sort();
        sorted.dedup();
        let mut ring = HashRing::new();
        let nodes: Vec<(usize, VNode)> = sorted
            .iter()
            .enumerate()
            .flat_map(|(i, m)| {
                (0..vnodes).map(move |index| {
                    (
                        i,
                        VNode {
                            member: m.clone(),
                            index,
                        },
                    )
                })
            })
            .collect();
        // The hashes `hashring` gives the same nodes, in its order (a stable sort by hash of
        // the nodes in insertion order).
        let mut points: Vec<(u64, usize)> = nodes
            .iter()
            .map(|(i, n)| (DefaultHashBuilder.hash_one(n), *i))
            .collect();
        let nodes: Vec<VNode> = nodes.into_iter().map(|(_, n)| n).collect();
        points.sort_by_key(|(h, _)| *h);
        ring.batch_add(nodes);
        Ring {
            ring,
            members: sorted,
            points,
        }
    }

    /// The member that owns `key` (e.g. `namespace/name`), None for an empty ring.
    pub fn owner(&self, key: &str) -> Option<&str> {
        self.ring.get(&key).map(|v| v.member.as_str())
    }

    /// Where `key` sits on the ring: the hash [`Ring::owner`] looks up.
    pub fn position(key: &str) -> u64 {
        DefaultHashBuilder.hash_one(key)
    }

    /// Indices into [`Ring::members`] in the order a clockwise walk from `key` meets them:
    /// [`Ring::owner`] first, then each other member once.
    pub fn walk(&self, key: &str) -> impl Iterator<Item = usize> + '_ {
        let position = Self::position(key);
        let start = self.points.partition_point(|(h, _)| *h < position);
        let mut seen = vec![false; self.members.len()];
        let len = self.points.len();
        (0..len)
            .map(move |i| self.points[(start + i) % len].1)
            .filter(move |m| !std::mem::replace(&mut seen[*m], true))
            .take(self.members.len())
    }

    pub fn members(&self) -> &[String] {
        &self.members
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn members(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("stslock-{i}")).collect()
    }

    fn keys(n: usize) -> Vec<String> {
        (0..n)
            .map(|i| format!("tenant-{}/lock-{i}", i % 37))
            .collect()
    }

    fn load(ring: &Ring, keys: &[String]) -> HashMap<String, usize> {
        let mut m = HashMap::new();
        for k in keys {
            *m.entry(ring.owner(k).unwrap_or("").to_string())
                .or_default() += 1;
        }
        m
    }

    fn max_over_mean(ring: &Ring, keys: &[String]) -> f64 {
        let l = load(ring, keys);
        let max = l.values().copied().max().unwrap_or(0) as f64;
        max / (keys.len() as f64 / ring.members().len() as f64)
    }

    #[test]
    fn same_members_same_ring_in_any_order() {
        let a = Ring::new(&["b".into(), "a".into(), "c".into()]);
        let b = Ring::new(&["c".into(), "a".into(), "b".into(), "a".into()]);
        for k in keys(500) {
            assert_eq!(a.owner(&k), b.owner(&k));
        }
        assert!(Ring::new(&[]).owner("x").is_none());
    }

    #[test]
    fn a_walk_starts_at_the_owner_and_meets_every_member_once() {
        let ring = Ring::new(&members(5));
        for k in keys(2_000) {
            let walk: Vec<usize> = ring.walk(&k).collect();
            assert_eq!(
                ring.members().get(walk[0]).map(String::as_str),
                ring.owner(&k),
                "{k}"
            );
            let mut sorted = walk.clone();
            sorted.sort();
            assert_eq!(sorted, vec![0, 1, 2, 3, 4], "{k}");
        }
        assert_eq!(Ring::new(&[]).walk("x").count(), 0);
    }

    #[test]
    fn balanced_with_three_members() {
        let ks = keys(1000);
        let r = max_over_mean(&Ring::new(&members(3)), &ks);
        assert!(r <= 1.15, "busiest member owns {r:.3}x the mean");
    }

    #[test]
    fn adding_a_member_moves_about_its_share_and_removing_moves_only_its_keys() {
        let ks = keys(1000);
        let three = Ring::new(&members(3));
        let four = Ring::new(&members(4));
        let moved = ks
            .iter()
            .filter(|k| three.owner(k) != four.owner(k))
            .count();
        assert!(
            (moved as f64) <= 1.3 / 4.0 * ks.len() as f64,
            "{moved} of 1000 moved"
        );
        // Every key that moved went to the new member.
        assert!(
            ks.iter()
                .filter(|k| three.owner(k) != four.owner(k))
                .all(|k| four.owner(k) == Some("stslock-3"))
        );
        // Removing a member moves only the keys it owned.
        let without_1: Vec<String> = members(4)
            .into_iter()
            .filter(|m| m != "stslock-1")
            .collect();
        let three_again = Ring::new(&without_1);
        for k in &ks {
            if four.owner(k) != Some("stslock-1") {
                assert_eq!(four.owner(k), three_again.owner(k));
            }
        }
    }

    /// The measurement behind [`VNODES`]: balance (max/mean) for 10k keys by vnode count and
    /// member count.
    #[test]
    fn vnode_balance_table() {
        let ks = keys(10_000);
        let mut rows = vec![];
        for v in [16u32, 32, 64, 128, 256] {
            let mut row = format!("vnodes {v:>3}:");
            for n in [2usize, 3, 4, 8, 16, 32] {
                let r = max_over_mean(&Ring::with_vnodes(&members(n), v), &ks);
                row.push_str(&format!(" {n}→{r:.3}"));
            }
            rows.push(row);
        }
        println!("max/mean load, 10k keys, by members:\n{}", rows.join("\n"));
        let chosen = max_over_mean(&Ring::new(&members(3)), &ks);
        assert!(
            chosen <= 1.1,
            "chosen vnode count gives {chosen:.3} for 3 members"
        );
    }
}
