//! Operator configuration: every flag is also settable from the environment (`STSLOCK_*`),
//! and every default works out of the box.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};

pub use crate::elect::OnDelete;

/// `--on-delete` values (the type is the core's: `crate::elect::OnDelete`).
impl ValueEnum for OnDelete {
    fn value_variants<'a>() -> &'a [Self] {
        &[OnDelete::KeepWriter, OnDelete::RemoveLabels]
    }

    fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
        Some(match self {
            OnDelete::KeepWriter => clap::builder::PossibleValue::new("keep-writer").help(
                "Leave the current writer labelled, so deleting the lock is not a write outage",
            ),
            OnDelete::RemoveLabels => clap::builder::PossibleValue::new("remove-labels")
                .help("Remove the role label from every pod of the StatefulSet"),
        })
    }
}

/// How logs are written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum LogFormat {
    /// One human-readable line per event.
    #[default]
    Text,
    /// One JSON object per event (for log collectors).
    Json,
}

/// What a replica does with its locks when it shuts down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum LeaveStrategy {
    /// Hand every lock to its next owner on the ring, then delete the membership Lease.
    #[default]
    Handoff,
    /// Keep the locks and the membership Lease: a replacement with the same shard id (a
    /// StatefulSet pod of the operator) resumes them; if none comes back within the membership
    /// Lease duration, peers claim them.
    Keep,
}

#[derive(Debug, Clone, Args)]
pub struct OperatorArgs {
    /// Kubeconfig to use (default: $KUBECONFIG, ~/.kube/config, then in-cluster config).
    #[arg(long, env = "STSLOCK_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,

    /// Pod label that carries the role (values `writer` and `reader`).
    #[arg(long, env = "STSLOCK_ROLE_LABEL", default_value = "sts-role")]
    pub role_label: String,

    /// What deleting a lock does to the role labels.
    #[arg(long, env = "STSLOCK_ON_DELETE", value_enum, default_value_t = OnDelete::KeepWriter)]
    pub on_delete: OnDelete,

    /// Locks reconciled concurrently.
    #[arg(long, env = "STSLOCK_CONCURRENCY", default_value_t = 16)]
    pub concurrency: u16,

    /// Timeout of every API call, in seconds.
    #[arg(long, env = "STSLOCK_API_TIMEOUT_SECONDS", default_value_t = 10)]
    pub api_timeout_seconds: u64,

    /// This replica's identity (Events' reportingInstance, status.shard). Default: the pod
    /// name from POD_NAME, else the hostname.
    #[arg(long, env = "STSLOCK_SHARD_ID")]
    pub shard_id: Option<String>,

    /// Shard group this replica joins (replicas of one group split the locks).
    #[arg(long, env = "STSLOCK_SHARD_GROUP", default_value = "stslock")]
    pub shard_group: String,

    /// What to do with this replica's locks on shutdown.
    #[arg(long, env = "STSLOCK_LEAVE", value_enum, default_value_t = LeaveStrategy::Handoff)]
    pub leave: LeaveStrategy,

    /// Namespace of the membership Leases. Default: POD_NAMESPACE, else the kubeconfig
    /// context's namespace, else `default`.
    #[arg(long, env = "STSLOCK_NAMESPACE")]
    pub namespace: Option<String>,

    /// At most this many StatefulSetLocks per namespace; younger ones report QuotaExceeded.
    #[arg(long, env = "STSLOCK_MAX_LOCKS_PER_NAMESPACE")]
    pub max_locks_per_namespace: Option<usize>,

    /// Membership Lease duration in seconds (renewed every third of it).
    #[arg(long, env = "STSLOCK_MEMBERSHIP_LEASE_SECONDS", default_value_t = 15)]
    pub membership_lease_seconds: u64,

    /// Write budget of this replica, in writes per second (0: unlimited). Lease renewals are
    /// served first, so reconciles cannot make a Lease lapse by using the budget up.
    #[arg(long, env = "STSLOCK_QPS", default_value_t = 200.0)]
    pub qps: f64,

    /// Writes this replica may send at once above `--qps` after a quiet period.
    #[arg(long, env = "STSLOCK_BURST", default_value_t = 400)]
    pub burst: u32,

    /// Reconcile writes per second per namespace (0: unlimited); a namespace over it waits
    /// without holding a worker, so one noisy tenant cannot starve the others.
    #[arg(long, env = "STSLOCK_TENANT_QPS", default_value_t = 50.0)]
    pub tenant_qps: f64,

    /// Only handle StatefulSetLocks in these namespaces (comma-separated; default: all).
    #[arg(long, env = "STSLOCK_NAMESPACES", value_delimiter = ',')]
    pub namespaces: Vec<String>,

    /// Only handle StatefulSetLocks in namespaces matching this label selector
    /// (e.g. `stslock=enabled`); combined with `--namespaces` when both are given.
    #[arg(long, env = "STSLOCK_NAMESPACE_SELECTOR")]
    pub namespace_selector: Option<String>,
    /// Address of `/metrics`, `/healthz` and `/readyz` (port 0 picks a free port).
    #[arg(long, env = "STSLOCK_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    pub metrics_addr: SocketAddr,

    /// Also export failovers and writer-less locks by namespace (one series per namespace).
    #[arg(long, env = "STSLOCK_NAMESPACE_METRICS")]
    pub namespace_metrics: bool,

    /// Also export the Go operator's `statefulsetlock_*` metrics, with its names and labels
    /// (one series per lock: for dashboards and alerts written for it).
    #[arg(long, env = "STSLOCK_GO_METRICS")]
    pub go_metrics: bool,

    /// Log format on stderr. (Traces: set OTEL_EXPORTER_OTLP_ENDPOINT to export over OTLP/gRPC.)
    #[arg(long, env = "STSLOCK_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

impl OperatorArgs {
    /// Defaults for an operator embedded in tests or `stslock dev`.
    pub fn for_shard(id: &str) -> OperatorArgs {
        OperatorArgs {
            kubeconfig: None,
            role_label: "sts-role".into(),
            on_delete: OnDelete::KeepWriter,
            concurrency: 16,
            api_timeout_seconds: 10,
            shard_id: Some(id.to_string()),
            shard_group: "stslock".into(),
            leave: LeaveStrategy::Handoff,
            namespace: None,
            max_locks_per_namespace: None,
            membership_lease_seconds: 15,
            qps: 200.0,
            burst: 400,
            tenant_qps: 50.0,
            namespaces: vec![],
            namespace_selector: None,
            metrics_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            namespace_metrics: false,
            go_metrics: false,
            log_format: LogFormat::Text,
        }
    }

    pub fn api_timeout(&self) -> Duration {
        Duration::from_secs(self.api_timeout_seconds.max(1))
    }

    pub fn identity(&self) -> String {
        self.shard_id
            .clone()
            .or_else(|| std::env::var("POD_NAME").ok())
            .or_else(|| std::env::var("HOSTNAME").ok())
            .or_else(|| {
                std::fs::read_to_string("/etc/hostname")
                    .ok()
                    .map(|s| s.trim().to_string())
            })
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "stslock".into())
    }
}
