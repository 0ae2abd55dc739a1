//! stslock: writer election for StatefulSets, backed by coordination.k8s.io Leases.
#![forbid(unsafe_code)]

pub mod api;
