//! `fleet`: the fleet load and chaos driver. Creates StatefulSets with locks across namespaces
//! in an in-process kubesim, runs operator replicas, injects chaos and reports from kubesim's
//! commit log and invariant report. Everything is in-process on 127.0.0.1 and stops by itself.
//!
//! Scenarios:
//! - `chaos` (default): N locks, R replicas, optional replica kills and writer failures; reports
//!   ownership, balance, renewal lateness, lease lapses, failover latency, dual-writer time.
//! - `noisy`: a quiet phase then a noisy phase in one run. Both fail random writers in the quiet
//!   namespaces at the same rate; the noisy phase also fails writers of one namespace of
//!   `--noisy-locks` locks as fast as `--noisy-flap-every-ms`. Reports the quiet namespaces'
//!   failover latency in both phases and the ratio of their p99s.
//! - `capacity`: for each replica count of `--capacity-replicas`, a fresh cluster whose replicas
//!   each have the write budget `--qps`/`--burst`; locks are added in steps (fractions of the
//!   theoretical per-replica renewal capacity qps × lease/2, times the replica count) and each
//!   step is held for `--seconds`. A step is sustained when every lock is elected, no Lease
//!   lapses and renewal lateness p99 stays within 1 s (P10; a tenth of the Lease when that is
//!   shorter). Reports the largest sustained count per replica count and their ratio.
//! - `rolling`: a rolling update of the operator (replicas stopped gracefully one at a time,
//!   highest id first, each replaced by one with the same id after `--restart-delay-ms`), once
//!   per shutdown strategy (`--leave handoff`, then `keep`), each on a fresh cluster in one
//!   run. Reports ownership moves, renewal lateness and lapses during the update.
//! - `faults`: the acceptance run of P5 (see `faults.rs`): random real-apiserver faults, writer
//!   flaps and replica kills for `--seconds`, then convergence; fails on any invariant violation.
//!   Its defaults differ: 500 locks, 3 pods, 10 s Leases, 600 s, api timeout 2 s, a fault every
//!   ~1 s, a writer flap every ~500 ms, a replica kill every ~30 s. The soak of P9 adds graceful
//!   restarts, StatefulSet scale events and node loss (`--graceful-share`, `--scale-every-ms`,
//!   `--node-loss-every-ms`) and writes an HTML report (`--html-out`).
//! - `memory`: the operator's memory with kubesim and every replica as separate processes
//!   (see `memory.rs`): a replica with no locks, one with every lock, then `--replicas` sharing
//!   them; reports each replica's RSS, private memory and Pss, and the sharded totals against
//!   the singleton's.
//! - `failover`: failover latency against its floor (see `floor.rs`): writers fail every
//!   `--flap-every-ms` (200 ms when 0), alternating between the fleet's locks and the
//!   `--floor-sets` StatefulSets of a minimal client that does only what a failover must
//!   (watch pods; CAS the Lease, demote, promote). Reports both latencies (readiness change to
//!   promotion, from kubesim's commit log) and their ratio.

mod driver;
mod faults;
mod floor;
mod memory;
mod scenarios;

use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches, Parser, ValueEnum};

pub(crate) use driver::{Fleet, pct, tenants};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    /// Locks, replicas, optional kills and writer failures (the default).
    Chaos,
    /// A quiet phase, then one namespace failing writers fast.
    Noisy,
    /// The most locks 1 and N replicas sustain with a fixed write budget.
    Capacity,
    /// A rolling update of the operator.
    Rolling,
    /// P5/P9's fault soak: API faults, flaps, kills, then convergence.
    Faults,
    /// The operator's memory: separate processes, 1 replica against N.
    Memory,
    /// Failover latency against a minimal floor client on the same cluster.
    Failover,
}

#[derive(Debug, Clone, Parser)]
#[command(
    name = "fleet",
    about = "Fleet load and chaos driver for stslock against kubesim"
)]
struct Args {
    #[arg(long, value_enum, default_value_t = Scenario::Chaos)]
    scenario: Scenario,
    /// Locks (each with its own StatefulSet); in `noisy`, including the noisy namespace's.
    #[arg(long, default_value_t = 1000)]
    locks: usize,
    /// Namespaces (tenants) the locks are spread over (in `noisy`: the quiet ones).
    #[arg(long, default_value_t = 10)]
    namespaces: usize,
    /// Operator replicas.
    #[arg(long, default_value_t = 3)]
    replicas: usize,
    /// Pods per StatefulSet.
    #[arg(long, default_value_t = 2)]
    pods: i32,
    /// Lease duration of every lock, seconds.
    #[arg(long, default_value_t = 30)]
    lease_seconds: i32,
    /// Membership Lease duration of the replicas, seconds.
    #[arg(long, default_value_t = 15)]
    membership_seconds: u64,
    /// Measured run (per phase or step) after the fleet has settled, seconds.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// Kill (abruptly) and restart a random replica every this many seconds (0: never).
    #[arg(long, default_value_t = 0)]
    kill_every: u64,
    /// Fail a random (quiet) lock's writer every this many milliseconds (0: never).
    #[arg(long, default_value_t = 0)]
    flap_every_ms: u64,
    /// Each replica's write budget, writes per second (0: unlimited).
    #[arg(long, default_value_t = 200.0)]
    qps: f64,
    /// Each replica's write burst.
    #[arg(long, default_value_t = 400)]
    burst: u32,
    /// Each replica's per-namespace reconcile write budget (0: unlimited).
    #[arg(long, default_value_t = 50.0)]
    tenant_qps: f64,
    /// How the replicas place locks (the operator's `--placement`).
    #[arg(long, value_enum, default_value_t = stslock::config::Placement::Ring)]
    placement: stslock::config::Placement,
    /// `noisy`: locks in the noisy namespace.
    #[arg(long, default_value_t = 2000)]
    noisy_locks: usize,
    /// `noisy`: fail a random writer of the noisy namespace this often.
    #[arg(long, default_value_t = 10)]
    noisy_flap_every_ms: u64,
    /// `capacity`: replica counts to compare, in one run.
    #[arg(long, value_delimiter = ',', default_value = "1,4")]
    capacity_replicas: Vec<usize>,
    /// `capacity`: load steps, as fractions of the theoretical renewal capacity.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "0.6,0.7,0.75,0.8,0.85,0.9,0.95,1.0,1.05"
    )]
    capacity_steps: Vec<f64>,
    /// `failover`: StatefulSets the floor client fails over (each is failed again only after
    /// its last failure has come back Ready).
    #[arg(long, default_value_t = 20)]
    floor_sets: usize,
    /// `rolling`: time between a replica's stop and its replacement's start.
    #[arg(long, default_value_t = 3000)]
    restart_delay_ms: u64,
    /// `rolling`: time a replacement gets before the next replica is stopped.
    #[arg(long, default_value_t = 5000)]
    ready_wait_ms: u64,
    /// The operators' API call timeout, seconds (default: the operator's; `faults`: 2).
    #[arg(long)]
    api_timeout_seconds: Option<u64>,
    /// `faults`: mean time between two injected faults, milliseconds.
    #[arg(long, default_value_t = 1000)]
    fault_every_ms: u64,
    /// `faults`: every lock must converge within this long after the faults are lifted.
    #[arg(long, default_value_t = 30)]
    converge_seconds: u64,
    /// `faults`: seed of the fault schedule (default: random, printed).
    #[arg(long)]
    seed: Option<u64>,
    /// `faults`: stop a replica every this many milliseconds (on average) instead of
    /// `--kill-every` seconds.
    #[arg(long)]
    kill_every_ms: Option<u64>,
    /// `faults`: share of the replica stops that are graceful (what SIGTERM does: hand the
    /// locks off, leave) instead of abrupt kills.
    #[arg(long, default_value_t = 0.0)]
    graceful_share: f64,
    /// `faults`: scale a random StatefulSet down by one pod, and back after 2–8 s, every this
    /// many milliseconds on average (0: never).
    #[arg(long, default_value_t = 0)]
    scale_every_ms: u64,
    /// `faults`: lose a random node (the kubelet stops reporting: its pods turn NotReady) for
    /// 2–15 s, every this many milliseconds on average (0: never).
    #[arg(long, default_value_t = 0)]
    node_loss_every_ms: u64,
    /// `faults`: Lease lapses of Ready writers caused by the operator are reported (text, JSON,
    /// HTML) but do not fail the run. Lapses whose lock's owner was down when the renewal was
    /// due (and back less than half a Lease before the expiry) never fail it: they are the fault
    /// injector's. Dual writers, writes by a non-owner and convergence always fail it.
    #[arg(long)]
    lapses_reported_only: bool,
    /// `faults`: also write the report as one self-contained HTML page (inline SVG, no
    /// scripts, nothing fetched).
    #[arg(long)]
    html_out: Option<std::path::PathBuf>,
    /// Print the report as JSON (`faults`; progress goes to stderr).
    #[arg(long)]
    json: bool,
    /// Also write the JSON report to this file.
    #[arg(long)]
    json_out: Option<std::path::PathBuf>,
}

impl Args {
    /// Parse, then give `faults` its own defaults for what was not set explicitly.
    fn parse_with_defaults() -> anyhow::Result<Args> {
        let m = Args::command().get_matches();
        let mut a = Args::from_arg_matches(&m)?;
        if a.scenario == Scenario::Faults {
            let default = |id: &str| m.value_source(id) == Some(ValueSource::DefaultValue);
            if default("locks") {
                a.locks = 500;
            }
            if default("pods") {
                a.pods = 3;
            }
            if default("lease_seconds") {
                a.lease_seconds = 10;
            }
            if default("seconds") {
                a.seconds = 600;
            }
            if default("kill_every") {
                a.kill_every = 30;
            }
            if default("flap_every_ms") {
                a.flap_every_ms = 500;
            }
            a.api_timeout_seconds.get_or_insert(2);
        }
        Ok(a)
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse_with_defaults()?;
    // The operators' own logs, only when asked for (RUST_LOG=stslock=info …): they run in
    // this process, so every line carries its replica's shard id.
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    match args.scenario {
        Scenario::Faults => faults::faults(&args).await,
        Scenario::Chaos => scenarios::chaos(&args).await,
        Scenario::Noisy => scenarios::noisy(&args).await,
        Scenario::Capacity => scenarios::capacity(&args).await,
        Scenario::Rolling => scenarios::rolling(&args).await,
        Scenario::Memory => memory::memory(&args).await,
        Scenario::Failover => floor::failover(&args).await,
    }
}
