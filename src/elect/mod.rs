//! Writer election as one pure function: [`decide`] turns what was observed about a lock (its
//! spec, its StatefulSet's pods, its Lease, rival locks) and the current time into a [`Plan`]:
//! the ordered steps to apply, the status to write and the Events to emit.
//!
//! It performs no I/O and reads no clock; the reconciler gathers [`Observed`] and applies the
//! plan in order. The order is the safety argument:
//! 1. everyone but the pod taking over — the previous Lease holder first of all, by UID,
//!    whatever the pod cache says — is demoted, and the new epoch is reserved on the lock
//!    (compare-and-swap on its resourceVersion), before the Lease moves: no later plan can issue
//!    that epoch again, whatever happens to the Lease;
//! 2. the Lease moves (compare-and-swap on its resourceVersion): it is the record of intent, so
//!    a crash after it reconverges to the same writer;
//! 3. the new writer is promoted only once the Lease names it (and, without a Lease write in
//!    the same plan, after a quorum read confirms it), so no instant has two writers;
//! 4. status last, only when it differs.

mod decide;
mod fixtures;
mod types;

pub use decide::decide;
pub use types::*;
