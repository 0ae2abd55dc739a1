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

/// How a shard group places locks on its replicas.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum Placement {
    /// Each lock on its owner on the consistent-hash ring.
    #[default]
    Ring,
    /// The ring with every replica's share capped 2 % above the mean (bounded loads): the
    /// busiest replica's write budget, not the ring's luck, sets the group's capacity.
    Bounded,
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

    /// How the shard group places locks on its replicas. `bounded` takes effect once every
    /// replica on the ring runs with it (each says so on its membership Lease); until then the
    /// group places by the ring, so a rolling change never has two rules at once.
    #[arg(long, env = "STSLOCK_PLACEMENT", value_enum, default_value_t = Placement::Ring)]
    pub placement: Placement,

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
    /// Locks and StatefulSets of other namespaces are not cached either.
    #[arg(long, env = "STSLOCK_NAMESPACES", value_delimiter = ',')]
    pub namespaces: Vec<String>,

    /// Only handle StatefulSetLocks in namespaces matching this label selector
    /// (e.g. `stslock=enabled`); combined with `--namespaces` when both are given.
    #[arg(long, env = "STSLOCK_NAMESPACE_SELECTOR")]
    pub namespace_selector: Option<String>,
    /// Address of `/metrics`, `/healthz` and `/readyz` (port 0 picks a free port). `stslock
    /// dev` keeps the port but binds loopback unless a specific address is given.
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
            placement: Placement::Ring,
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

    /// Check, before anything is written, every value the replica writes into a name, a label
    /// or a selector: the shard id and group (label values on locks and membership Leases, and
    /// the membership Lease's name `<group>-<id>`), the role label key, and the namespaces.
    /// The error names the flag, the value and what is wrong with it.
    pub fn validate(&self) -> Result<(), String> {
        let id = self.identity();
        let flag = |name: &str, value: &str, why: String| format!("{name} {value:?}: {why}");
        label_value(&id).map_err(|w| flag("--shard-id", &id, w))?;
        label_value(&self.shard_group).map_err(|w| flag("--shard-group", &self.shard_group, w))?;
        if self.shard_group.is_empty() {
            return Err(flag("--shard-group", "", "must not be empty".into()));
        }
        let lease = format!("{}-{id}", self.shard_group);
        dns_subdomain(&lease).map_err(|w| {
            format!(
                "--shard-group {:?} and --shard-id {id:?} name the membership Lease {lease:?}, which {w}",
                self.shard_group
            )
        })?;
        qualified_name(&self.role_label).map_err(|w| flag("--role-label", &self.role_label, w))?;
        let namespaces = self.namespace.iter().map(|n| ("--namespace", n));
        for (name, ns) in namespaces.chain(self.namespaces.iter().map(|n| ("--namespaces", n))) {
            dns_label(ns).map_err(|w| flag(name, ns, format!("not a namespace name: {w}")))?;
        }
        Ok(())
    }
}

fn alnum(c: char) -> bool {
    c.is_ascii_alphanumeric()
}

/// A label value: at most 63 characters, empty or alphanumerics at both ends with `-`, `_`, `.`
/// and alphanumerics between (apimachinery's `IsValidLabelValue`).
pub fn label_value(v: &str) -> Result<(), String> {
    if v.len() > 63 {
        return Err(format!(
            "must be no more than 63 characters (is {})",
            v.len()
        ));
    }
    let ok = v.is_empty()
        || (v.starts_with(alnum)
            && v.ends_with(alnum)
            && v.chars().all(|c| alnum(c) || matches!(c, '-' | '_' | '.')));
    if ok {
        Ok(())
    } else {
        Err("a valid label value must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character".into())
    }
}

/// Lower-case alphanumerics or `-`, alphanumeric at both ends (one part of a DNS-1123 name).
fn dns_part(v: &str) -> bool {
    let lower = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    v.starts_with(lower) && v.ends_with(lower) && v.chars().all(|c| lower(c) || c == '-')
}

/// A DNS-1123 label: at most 63 lower-case alphanumerics or `-`, alphanumeric at both ends.
pub fn dns_label(v: &str) -> Result<(), String> {
    if v.is_empty() || v.len() > 63 {
        return Err("must be 1 to 63 characters".into());
    }
    if dns_part(v) {
        Ok(())
    } else {
        Err("must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character".into())
    }
}

/// A DNS-1123 subdomain as Kubernetes checks object names: at most 253 characters,
/// dot-separated parts of lower-case alphanumerics or `-`, alphanumeric at both ends (no
/// per-part length limit, as apimachinery's `IsDNS1123Subdomain`).
pub fn dns_subdomain(v: &str) -> Result<(), String> {
    if v.len() > 253 {
        return Err(format!(
            "must be no more than 253 characters (is {})",
            v.len()
        ));
    }
    if v.split('.').all(dns_part) {
        Ok(())
    } else {
        Err("must be a lower case RFC 1123 subdomain (lower case alphanumerics, '-' and '.', alphanumeric at both ends)".into())
    }
}

/// A label key: an optional DNS subdomain prefix and `/`, then a name of at most 63
/// characters, alphanumeric at both ends with `-`, `_`, `.` between.
pub fn qualified_name(v: &str) -> Result<(), String> {
    let (prefix, name) = match v.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, v),
    };
    if let Some(p) = prefix {
        dns_subdomain(p).map_err(|w| format!("prefix {p:?} {w}"))?;
    }
    if name.is_empty() {
        return Err("name part must not be empty".into());
    }
    label_value(name).map_err(|w| format!("name part {w}"))
}

/// The client configuration from the kubeconfig at `path` (else `$KUBECONFIG`, then
/// `~/.kube/config`, then the in-cluster config), with `context` when given: what `stslock run`
/// and `kubectl stslock` both connect with.
pub async fn kube_config(
    path: Option<&std::path::Path>,
    context: Option<String>,
) -> anyhow::Result<kube::Config> {
    use anyhow::Context as _;
    let options = kube::config::KubeConfigOptions {
        context,
        ..Default::default()
    };
    match path {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &options)
                .await
                .with_context(|| format!("loading kubeconfig {}", path.display()))
        }
        None if options.context.is_some() => kube::Config::from_kubeconfig(&options)
            .await
            .context("loading the kubeconfig ($KUBECONFIG, ~/.kube/config)"),
        None => kube::Config::infer()
            .await
            .context("no kubeconfig ($KUBECONFIG, ~/.kube/config) and not running in a cluster"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Edit = Box<dyn FnOnce(&mut OperatorArgs)>;

    fn args(f: impl FnOnce(&mut OperatorArgs)) -> Result<(), String> {
        let mut a = OperatorArgs::for_shard("stslock-0");
        f(&mut a);
        a.validate()
    }

    #[test]
    fn the_defaults_and_usual_values_pass() {
        assert_eq!(args(|_| {}), Ok(()));
        // A Lease name longer than a DNS label is fine (object names are subdomains).
        assert_eq!(
            args(|a| a.shard_group = format!("g{}", "x".repeat(60))),
            Ok(())
        );
        assert_eq!(
            args(|a| {
                a.role_label = "example.com/role".into();
                a.namespace = Some("stslock-system".into());
                a.namespaces = vec!["team-a".into(), "b".into()];
                a.shard_id = Some("stslock-7f9c-0".into());
            }),
            Ok(())
        );
    }

    #[test]
    fn every_value_written_into_a_name_or_label_is_checked_with_the_flag_named() {
        let cases: [(&str, Edit); 8] = [
            (
                "--shard-id \"bad id\"",
                Box::new(|a| a.shard_id = Some("bad id".into())),
            ),
            (
                "--shard-id",
                Box::new(|a| a.shard_id = Some("x".repeat(64))),
            ),
            // A valid label value, but the membership Lease name must be lower case.
            (
                "membership Lease \"stslock-Node_1\"",
                Box::new(|a| a.shard_id = Some("Node_1".into())),
            ),
            (
                "--shard-group \"-g\"",
                Box::new(|a| a.shard_group = "-g".into()),
            ),
            (
                "--shard-group \"\": must not be empty",
                Box::new(|a| a.shard_group = String::new()),
            ),
            (
                "--role-label \"role!\"",
                Box::new(|a| a.role_label = "role!".into()),
            ),
            (
                "--namespace \"Team\"",
                Box::new(|a| a.namespace = Some("Team".into())),
            ),
            (
                "--namespaces \"a_b\"",
                Box::new(|a| a.namespaces = vec!["ok".into(), "a_b".into()]),
            ),
        ];
        for (expected, f) in cases {
            let err = args(f).expect_err(expected);
            assert!(err.contains(expected), "{err:?} should name {expected:?}");
        }
    }
}
