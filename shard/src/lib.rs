//! stslock-shard: which operator replica may write for which lock.
//!
//! Replicas are members of a shard group, each holding a membership Lease. The alive members
//! form a consistent-hash [`Ring`]; ownership of a key is recorded on the object itself (a label
//! written with compare-and-swap), and [`ownership::decide`] says what a replica must do about a
//! key given that label, the ring and who is alive. [`fence::Fence`] stops a replica from
//! writing once its own membership may have lapsed.
//!
//! This crate knows nothing about StatefulSets or Kubernetes clients: it is pure logic over
//! plain values and an injected clock.
#![forbid(unsafe_code)]

pub mod balance;
pub mod fence;
pub mod membership;
pub mod ownership;
pub mod rejoin;
pub mod ring;

pub use fence::Fence;
pub use membership::{Member, alive_members, membership_lease_name};
pub use ownership::{Decision, decide};
pub use rejoin::Rejoin;
pub use ring::Ring;
