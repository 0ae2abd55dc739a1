//! stslock: writer election for StatefulSets, backed by coordination.k8s.io Leases.
#![forbid(unsafe_code)]

pub mod api;
pub mod cache;
pub mod call;
pub mod config;
#[cfg(feature = "dev")]
pub mod dev;
pub mod elect;
pub mod error;
pub mod limits;
pub mod metrics;
pub mod plugin;
pub mod probe;
pub mod reconcile;
pub mod renew;
pub mod replica;
pub mod scope;
pub mod sharding;
pub mod telemetry;
