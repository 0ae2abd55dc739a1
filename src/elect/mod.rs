//! Writer election as one pure function: [`decide`] turns what was observed about a lock (its
//! spec, its StatefulSet's pods, its Lease, rival locks) and the current time into a [`Plan`]:
//! the ordered steps to apply, the status to write and the Events to emit.
//!
//! It performs no I/O and reads no clock; the reconciler gathers [`Observed`] and applies the
//! plan in order. The order is the safety argument:
//! 1. the Lease moves first (compare-and-swap on its resourceVersion): it is the record of
//!    intent, so a crash after it reconverges to the same writer;
//! 2. the old writer is demoted before anyone is promoted, so no instant has two writers;
//! 3. status last, only when it differs.

mod decide;
mod types;

pub use decide::decide;
pub use types::*;
