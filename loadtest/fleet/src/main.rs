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
//!   lapses and renewal lateness p99 stays within a tenth of the Lease duration. Reports the
//!   largest sustained count per replica count and their ratio.
//! - `rolling`: a rolling update of the operator (replicas stopped gracefully one at a time,
//!   highest id first, each replaced by one with the same id after `--restart-delay-ms`), once
//!   per shutdown strategy (`--leave handoff`, then `keep`), each on a fresh cluster in one
//!   run. Reports ownership moves, renewal lateness and lapses during the update.
//! - `faults`: the acceptance run of P5 (see `faults.rs`): random real-apiserver faults, writer
//!   flaps and replica kills for `--seconds`, then convergence; fails on any invariant violation.
//!   Its defaults differ: 500 locks, 3 pods, 10 s Leases, 600 s, api timeout 2 s, a fault every
//!   ~1 s, a writer flap every ~500 ms, a replica kill every ~30 s.

mod faults;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches, Parser, ValueEnum};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{ListParams, PostParams};
use kube::{Api, ResourceExt};
use rand::Rng;
use serde_json::json;
use stslock::api::{SHARD_LABEL, StatefulSetLock};
use stslock::config::{LeaveStrategy, OperatorArgs};
use tokio::sync::oneshot;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    Chaos,
    Noisy,
    Capacity,
    Rolling,
    Faults,
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

struct Replica {
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

fn pct(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[(((sorted.len() - 1) as f64) * p).round() as usize]
}

/// A writer failed by the driver: (when, namespace, lock/StatefulSet, pod).
type Flap = (u64, String, String, String);

/// Renewal statistics of one window.
struct Renewals {
    lateness: Vec<u64>,
    lapses: usize,
    writes: u64,
}

struct Fleet {
    sim: kubesim::Sim,
    client: kube::Client,
    args: Args,
    replicas: Vec<Option<Replica>>,
    /// (namespace, name) of every lock created.
    locks: Vec<(String, String)>,
    leave: LeaveStrategy,
}

impl Fleet {
    fn new(args: &Args) -> Fleet {
        let mut cfg = kubesim::SimConfig::default();
        cfg.controllers.pod_ready_delay = Duration::from_millis(50);
        cfg.store.history_window = Duration::from_secs(180);
        cfg.store.recorded_labels = vec![SHARD_LABEL.to_string()];
        let sim = kubesim::Sim::start(cfg);
        let client = sim.client_as("fleet");
        Fleet {
            sim,
            client,
            args: args.clone(),
            replicas: vec![],
            locks: vec![],
            leave: LeaveStrategy::Handoff,
        }
    }

    async fn install(&self, namespaces: &[String]) -> anyhow::Result<()> {
        stslock::dev::install_crd(&self.client).await?;
        let ns_api: Api<Namespace> = Api::all(self.client.clone());
        for ns in namespaces {
            ns_api
                .create(
                    &PostParams::default(),
                    &serde_json::from_value(json!({"metadata": {"name": ns}}))?,
                )
                .await
                .with_context(|| format!("creating namespace {ns}"))?;
        }
        Ok(())
    }

    /// Create `n` locks (each with its StatefulSet), round-robin over `namespaces`.
    async fn add_locks(&mut self, namespaces: &[String], n: usize) -> anyhow::Result<()> {
        for _ in 0..n {
            let i = self.locks.len();
            let ns = &namespaces[i % namespaces.len()];
            let name = format!("db{i}");
            let sets: Api<StatefulSet> = Api::namespaced(self.client.clone(), ns);
            let locks: Api<StatefulSetLock> = Api::namespaced(self.client.clone(), ns);
            let sts: StatefulSet = serde_json::from_value(json!({
                "metadata": {"name": name},
                "spec": {"serviceName": "db", "replicas": self.args.pods, "podManagementPolicy": "Parallel",
                         "selector": {"matchLabels": {"app": name}},
                         "template": {"metadata": {"labels": {"app": name}}, "spec": {"containers": [{"name": "c", "image": "postgres:15"}]}}}
            }))?;
            sets.create(&PostParams::default(), &sts)
                .await
                .with_context(|| format!("creating StatefulSet {ns}/{name}"))?;
            let lock: StatefulSetLock = serde_json::from_value(json!({
                "apiVersion": "app.anukkrit.me/v1", "kind": "StatefulSetLock",
                "metadata": {"name": name},
                "spec": {"statefulSetName": name, "leaseName": format!("{name}-lease"), "leaseDurationSeconds": self.args.lease_seconds}
            }))?;
            locks
                .create(&PostParams::default(), &lock)
                .await
                .with_context(|| format!("creating StatefulSetLock {ns}/{name}"))?;
            self.locks.push((ns.clone(), name));
        }
        Ok(())
    }

    fn start_replica(&mut self, i: usize) {
        let id = format!("r{i}");
        let mut a = OperatorArgs::for_shard(&id);
        a.membership_lease_seconds = self.args.membership_seconds;
        a.qps = self.args.qps;
        a.burst = self.args.burst;
        a.tenant_qps = self.args.tenant_qps;
        a.leave = self.leave;
        if let Some(t) = self.args.api_timeout_seconds {
            a.api_timeout_seconds = t;
        }
        let client = self.sim.client_as(&format!("stslock/{id}"));
        let (stop, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let shutdown = async {
                let _ = rx.await;
            };
            if let Err(e) = stslock::reconcile::run(client, a, shutdown).await {
                eprintln!("replica stopped with an error: {e:#}");
            }
        });
        if self.replicas.len() <= i {
            self.replicas.resize_with(i + 1, || None);
        }
        self.replicas[i] = Some(Replica { stop, task });
    }

    /// Abrupt: no handoff, no membership Lease deletion.
    fn kill_replica(&mut self, i: usize) -> bool {
        match self.replicas.get_mut(i).and_then(Option::take) {
            Some(r) => {
                r.task.abort();
                true
            }
            None => false,
        }
    }

    /// Graceful: what the replica does on SIGTERM.
    async fn stop_replica(&mut self, i: usize) {
        if let Some(r) = self.replicas.get_mut(i).and_then(Option::take) {
            let _ = r.stop.send(());
            let _ = tokio::time::timeout(Duration::from_secs(30), r.task).await;
        }
    }

    /// Ownership label changes of locks committed in [from_ms, to_ms].
    fn moves(&self, from_ms: u64, to_ms: u64) -> usize {
        let mut last: HashMap<(String, String), Option<String>> = HashMap::new();
        let mut moves = 0;
        for c in self
            .sim
            .commit_log()
            .iter()
            .filter(|c| c.resource == "statefulsetlocks" && c.at_ms <= to_ms)
        {
            let owner = c.labels.get(SHARD_LABEL).cloned();
            let prev = last.insert((c.namespace.clone(), c.name.clone()), owner.clone());
            if c.at_ms >= from_ms && prev.is_some_and(|p| p.is_some() && p != owner) {
                moves += 1;
            }
        }
        moves
    }

    async fn stop_all(&mut self) {
        for r in self.replicas.drain(..).flatten() {
            let _ = r.stop.send(());
            let _ = tokio::time::timeout(Duration::from_secs(30), r.task).await;
        }
    }

    /// Wait until every lock created has a writer; returns how many have one.
    async fn wait_settled(&self, limit: Duration) -> anyhow::Result<usize> {
        let start = Instant::now();
        let all: Api<StatefulSetLock> = Api::all(self.client.clone());
        loop {
            let l = all.list(&ListParams::default()).await?;
            let settled = l
                .items
                .iter()
                .filter(|x| {
                    x.status
                        .as_ref()
                        .and_then(|s| s.writer_pod.as_ref())
                        .is_some()
                })
                .count();
            if settled >= self.locks.len() || start.elapsed() >= limit {
                return Ok(settled);
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Fail the writer of `locks[i]`; it comes back Ready (as a reader) 2 s later.
    async fn flap(&self, i: usize) -> Option<Flap> {
        let (ns, name) = self.locks.get(i)?;
        let l = Api::<StatefulSetLock>::namespaced(self.client.clone(), ns)
            .get(name)
            .await
            .ok()?;
        let w = l.status.and_then(|s| s.writer_pod)?;
        self.sim.pods().set_ready(ns, &w, false).ok()?;
        let at = self.sim.store().elapsed_ms();
        let pods = self.sim.pods().clone();
        let (ns2, w2) = (ns.clone(), w.clone());
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(2)).await;
            let _ = pods.set_ready(&ns2, &w2, true);
        });
        Some((at, ns.clone(), name.clone(), w))
    }

    /// Renewal lateness (gap between consecutive writes of a lock's Lease beyond half its
    /// duration) and lapses (a gap beyond the whole duration, or no write for longer than the
    /// duration before the window's end) over [from_ms, to_ms].
    fn renewals(&self, from_ms: u64, to_ms: u64) -> Renewals {
        self.renewals_in(from_ms, to_ms, |_| true)
    }

    /// [`Fleet::renewals`] of the Leases in the namespaces `only` accepts.
    fn renewals_in(&self, from_ms: u64, to_ms: u64, only: impl Fn(&str) -> bool) -> Renewals {
        let dur = (self.args.lease_seconds as u64) * 1000;
        let half = dur / 2;
        let mut by_lease: HashMap<(String, String), Vec<u64>> = HashMap::new();
        let mut writes = 0;
        for c in self
            .sim
            .commit_log()
            .iter()
            .filter(|c| c.at_ms <= to_ms && c.actor.starts_with("stslock/"))
        {
            if c.at_ms >= from_ms {
                writes += 1;
            }
            if c.resource == "leases"
                && c.name.ends_with("-lease")
                && c.at_ms + dur >= from_ms
                && only(&c.namespace)
            {
                by_lease
                    .entry((c.namespace.clone(), c.name.clone()))
                    .or_default()
                    .push(c.at_ms);
            }
        }
        let mut lateness = vec![];
        let mut lapses = 0;
        for at in by_lease.values() {
            for w in at.windows(2).filter(|w| w[1] >= from_ms) {
                let gap = w[1] - w[0];
                lateness.push(gap.saturating_sub(half));
                if gap > dur {
                    lapses += 1;
                }
            }
            if at.last().is_some_and(|last| to_ms - last > dur) {
                lapses += 1;
            }
        }
        lateness.sort_unstable();
        Renewals {
            lateness,
            lapses,
            writes,
        }
    }

    /// Failover latency of each flap: the failure → the first operator label write on another
    /// pod of that StatefulSet (the promotion; the old writer's demotion comes first).
    fn failovers(&self, flaps: &[Flap]) -> Vec<u64> {
        let log = self.sim.commit_log();
        let mut out: Vec<u64> = flaps
            .iter()
            .filter_map(|(at, ns, set, pod)| {
                let prefix = format!("{set}-");
                log.iter()
                    .find(|d| {
                        d.at_ms >= *at
                            && d.resource == "pods"
                            && d.actor.starts_with("stslock/")
                            && &d.namespace == ns
                            && &d.name != pod
                            && d.name.starts_with(&prefix)
                    })
                    .map(|p| p.at_ms - at)
            })
            .collect();
        out.sort_unstable();
        out
    }

    async fn ownership(&self) -> anyhow::Result<BTreeMap<String, usize>> {
        let all: Api<StatefulSetLock> = Api::all(self.client.clone());
        let mut per: BTreeMap<String, usize> = BTreeMap::new();
        for l in all.list(&ListParams::default()).await?.items {
            *per.entry(
                l.labels()
                    .get(SHARD_LABEL)
                    .cloned()
                    .unwrap_or_else(|| "(none)".into()),
            )
            .or_default() += 1;
        }
        Ok(per)
    }
}

fn line_latency(what: &str, v: &[u64]) -> String {
    format!(
        "{what} over {}: p50 {} ms, p99 {} ms, max {} ms",
        v.len(),
        pct(v, 0.5),
        pct(v, 0.99),
        v.last().copied().unwrap_or(0)
    )
}

fn tenants(prefix: &str, n: usize) -> Vec<String> {
    (0..n.max(1)).map(|i| format!("{prefix}-{i}")).collect()
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
        Scenario::Chaos => chaos(&args).await,
        Scenario::Noisy => noisy(&args).await,
        Scenario::Capacity => capacity(&args).await,
        Scenario::Rolling => rolling(&args).await,
    }
}

async fn settle(fleet: &Fleet, what: &str) -> anyhow::Result<()> {
    let start = Instant::now();
    let settled = fleet.wait_settled(Duration::from_secs(900)).await?;
    anyhow::ensure!(
        settled == fleet.locks.len(),
        "{what}: only {settled} of {} locks elected after 900 s",
        fleet.locks.len()
    );
    println!(
        "{what}: {} locks elected in {:.1} s",
        settled,
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

async fn chaos(args: &Args) -> anyhow::Result<()> {
    let mut fleet = Fleet::new(args);
    let nss = tenants("tenant", args.namespaces);
    fleet.install(&nss).await?;
    fleet.add_locks(&nss, args.locks).await?;
    for i in 0..args.replicas {
        fleet.start_replica(i);
    }
    settle(
        &fleet,
        &format!(
            "fleet: {} namespaces, {} replicas",
            nss.len(),
            args.replicas
        ),
    )
    .await?;
    let start_ms = fleet.sim.store().elapsed_ms();
    let run = Instant::now();
    let mut rng = rand::rng();
    let mut next_kill = Instant::now() + Duration::from_secs(args.kill_every.max(1));
    let mut next_flap = Instant::now();
    let mut kills = 0;
    let mut flaps: Vec<Flap> = vec![];
    while run.elapsed() < Duration::from_secs(args.seconds) {
        if args.kill_every > 0 && Instant::now() >= next_kill {
            let i = rng.random_range(0..args.replicas);
            if fleet.kill_replica(i) {
                kills += 1;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            fleet.start_replica(i);
            next_kill = Instant::now() + Duration::from_secs(args.kill_every);
        }
        if args.flap_every_ms > 0 && Instant::now() >= next_flap {
            let i = rng.random_range(0..fleet.locks.len());
            flaps.extend(fleet.flap(i).await);
            next_flap = Instant::now() + Duration::from_millis(args.flap_every_ms);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let end_ms = fleet.sim.store().elapsed_ms();
    let r = fleet.renewals(start_ms, end_ms);
    let failovers = fleet.failovers(&flaps);
    let per = fleet.ownership().await?;
    let mean = args.locks as f64 / args.replicas as f64;
    let max = per
        .iter()
        .filter(|(k, _)| k.as_str() != "(none)")
        .map(|(_, v)| *v)
        .max()
        .unwrap_or(0) as f64;
    let report = fleet.sim.report();
    let secs = (end_ms - start_ms) as f64 / 1000.0;
    println!(
        "run: {secs:.1} s, {kills} replica kills, {} writer failures",
        flaps.len()
    );
    println!("ownership: {per:?}; busiest/mean {:.3}", max / mean);
    println!(
        "operator writes: {} ({:.0}/s); expected renewals alone {:.0}/s",
        r.writes,
        r.writes as f64 / secs,
        args.locks as f64 / (args.lease_seconds as f64 / 2.0)
    );
    println!(
        "{}; lease lapses: {}",
        line_latency("renewal lateness", &r.lateness),
        r.lapses
    );
    println!("{}", line_latency("failover latency", &failovers));
    println!(
        "dual-writer intervals: {} ({} ms)",
        report.dual_writer_intervals, report.dual_writer_ms
    );
    fleet.stop_all().await;
    Ok(())
}

/// Fail random writers among `range` of the fleet's locks every `every` until `stop`.
async fn flapper(
    fleet: &Fleet,
    range: std::ops::Range<usize>,
    every: Duration,
    stop: &AtomicBool,
) -> Vec<Flap> {
    let mut flaps = vec![];
    let mut next = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        let i = rand::rng().random_range(range.clone());
        flaps.extend(fleet.flap(i).await);
        next += every;
        tokio::time::sleep_until(next.into()).await;
    }
    flaps
}

async fn noisy(args: &Args) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.locks > args.noisy_locks && args.flap_every_ms > 0,
        "noisy: --locks must exceed --noisy-locks and --flap-every-ms must be set"
    );
    let mut fleet = Fleet::new(args);
    let quiet_ns = tenants("quiet", args.namespaces);
    let noisy_ns = vec!["noisy".to_string()];
    let mut all_ns = quiet_ns.clone();
    all_ns.extend(noisy_ns.clone());
    fleet.install(&all_ns).await?;
    let quiet = args.locks - args.noisy_locks;
    fleet.add_locks(&quiet_ns, quiet).await?;
    fleet.add_locks(&noisy_ns, args.noisy_locks).await?;
    for i in 0..args.replicas {
        fleet.start_replica(i);
    }
    settle(
        &fleet,
        &format!(
            "noisy: {quiet} quiet locks in {} namespaces + {} in one noisy namespace, {} replicas (qps {}, tenant-qps {})",
            quiet_ns.len(),
            args.noisy_locks,
            args.replicas,
            args.qps,
            args.tenant_qps
        ),
    )
    .await?;
    let fleet = Arc::new(fleet);
    let mut p99s = vec![];
    for noisy_phase in [false, true] {
        let from = fleet.sim.store().elapsed_ms();
        let stop = Arc::new(AtomicBool::new(false));
        let noise = noisy_phase.then(|| {
            let (fleet, stop) = (fleet.clone(), stop.clone());
            let every = Duration::from_millis(args.noisy_flap_every_ms.max(1));
            tokio::spawn(
                async move { flapper(&fleet, quiet..fleet.locks.len(), every, &stop).await },
            )
        });
        let quiet_flaps = {
            let (fleet, stop2) = (fleet.clone(), stop.clone());
            let every = Duration::from_millis(args.flap_every_ms);
            let t = tokio::spawn(async move { flapper(&fleet, 0..quiet, every, &stop2).await });
            tokio::time::sleep(Duration::from_secs(args.seconds)).await;
            stop.store(true, Ordering::Relaxed);
            t.await?
        };
        let noisy_flaps = match noise {
            Some(t) => t.await?,
            None => vec![],
        };
        // Let the last failovers finish before reading the log.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let to = fleet.sim.store().elapsed_ms();
        let q = fleet.failovers(&quiet_flaps);
        let r = fleet.renewals_in(from, to, |ns| ns != "noisy");
        let rn = fleet.renewals_in(from, to, |ns| ns == "noisy");
        let phase = if noisy_phase {
            "noisy phase"
        } else {
            "quiet phase"
        };
        println!(
            "{phase}: {} quiet writer failures, {} noisy writer failures, {} operator writes ({:.0}/s)",
            quiet_flaps.len(),
            noisy_flaps.len(),
            r.writes,
            r.writes as f64 * 1000.0 / (to - from).max(1) as f64
        );
        println!(
            "  {}",
            line_latency("quiet namespaces' failover latency", &q)
        );
        if noisy_phase {
            println!(
                "  {}",
                line_latency(
                    "noisy namespace's failover latency",
                    &fleet.failovers(&noisy_flaps)
                )
            );
        }
        println!(
            "  quiet namespaces' {}; lease lapses: {}",
            line_latency("renewal lateness", &r.lateness),
            r.lapses
        );
        // A noisy lock whose writer is down and whose failover waits for the namespace's budget
        // is (rightly) not renewed: lapses there are the throttled failovers, not lost leases.
        println!(
            "  noisy namespace's {}; Leases not renewed for a whole duration (writer down, failover throttled): {}",
            line_latency("renewal lateness", &rn.lateness),
            rn.lapses
        );
        p99s.push(pct(&q, 0.99));
    }
    let report = fleet.sim.report();
    println!(
        "quiet namespaces' failover p99: {} ms quiet, {} ms with the noisy tenant: ratio {:.2} (target ≤ 2)",
        p99s[0],
        p99s[1],
        p99s[1] as f64 / p99s[0].max(1) as f64
    );
    println!(
        "dual-writer intervals: {} ({} ms)",
        report.dual_writer_intervals, report.dual_writer_ms
    );
    if let Ok(mut fleet) = Arc::try_unwrap(fleet) {
        fleet.stop_all().await;
    }
    Ok(())
}

async fn capacity(args: &Args) -> anyhow::Result<()> {
    anyhow::ensure!(args.qps > 0.0, "capacity: --qps must be set");
    let per_replica = args.qps * f64::from(args.lease_seconds) / 2.0;
    println!(
        "capacity: per-replica write budget {} qps (burst {}), {} s leases: theoretical renewal capacity {per_replica:.0} locks per replica; steps of {}s",
        args.qps, args.burst, args.lease_seconds, args.seconds
    );
    let mut best: Vec<(usize, usize)> = vec![];
    for &replicas in &args.capacity_replicas {
        let mut fleet = Fleet::new(args);
        let nss = tenants("tenant", args.namespaces);
        fleet.install(&nss).await?;
        for i in 0..replicas {
            fleet.start_replica(i);
        }
        let mut sustained = 0;
        for &f in &args.capacity_steps {
            let target = (f * per_replica * replicas as f64).round() as usize;
            let add = target.saturating_sub(fleet.locks.len());
            fleet.add_locks(&nss, add).await?;
            let settled = fleet.wait_settled(Duration::from_secs(180)).await?;
            let from = fleet.sim.store().elapsed_ms();
            tokio::time::sleep(Duration::from_secs(args.seconds)).await;
            let to = fleet.sim.store().elapsed_ms();
            let r = fleet.renewals(from, to);
            let p99 = pct(&r.lateness, 0.99);
            let ok = settled == target
                && r.lapses == 0
                && p99 <= u64::try_from(args.lease_seconds).unwrap_or(0) * 100;
            let per = fleet.ownership().await?;
            let busiest = per
                .iter()
                .filter(|(k, _)| k.as_str() != "(none)")
                .map(|(_, v)| *v)
                .max()
                .unwrap_or(0);
            println!(
                "  {replicas} replica(s), {target} locks ({f:.2} of capacity; busiest replica {busiest}): elected {settled}, {} renewals, lateness p50 {} ms p99 {p99} ms max {} ms, lapses {} → {}",
                r.lateness.len(),
                pct(&r.lateness, 0.5),
                r.lateness.last().copied().unwrap_or(0),
                r.lapses,
                if ok { "sustained" } else { "NOT sustained" }
            );
            if !ok {
                break;
            }
            sustained = target;
        }
        println!("  {replicas} replica(s) sustain {sustained} locks");
        best.push((replicas, sustained));
        fleet.stop_all().await;
    }
    if let (Some((r1, c1)), Some((rn, cn))) = (best.first(), best.last()) {
        println!(
            "capacity: {r1} replica(s) {c1} locks, {rn} replicas {cn} locks: {:.2}× (target ≥ 3.5× for 1 → 4)",
            *cn as f64 / (*c1).max(1) as f64
        );
    }
    Ok(())
}

async fn rolling(args: &Args) -> anyhow::Result<()> {
    println!(
        "rolling: {} locks, {} replicas, {} s leases, {} s membership; each replica replaced after {} ms, next one {} ms later",
        args.locks,
        args.replicas,
        args.lease_seconds,
        args.membership_seconds,
        args.restart_delay_ms,
        args.ready_wait_ms
    );
    for leave in [LeaveStrategy::Handoff, LeaveStrategy::Keep] {
        let mut fleet = Fleet::new(args);
        fleet.leave = leave;
        let nss = tenants("tenant", args.namespaces);
        fleet.install(&nss).await?;
        fleet.add_locks(&nss, args.locks).await?;
        for i in 0..args.replicas {
            fleet.start_replica(i);
        }
        settle(&fleet, &format!("  --leave {leave:?}")).await?;
        tokio::time::sleep(Duration::from_secs(5)).await;
        let from = fleet.sim.store().elapsed_ms();
        for i in (0..args.replicas).rev() {
            fleet.stop_replica(i).await;
            tokio::time::sleep(Duration::from_millis(args.restart_delay_ms)).await;
            fleet.start_replica(i);
            tokio::time::sleep(Duration::from_millis(args.ready_wait_ms)).await;
        }
        // Until the last replacement has settled in, and every lock renewed at least twice.
        tokio::time::sleep(Duration::from_secs(
            u64::try_from(args.lease_seconds).unwrap_or(30),
        ))
        .await;
        let to = fleet.sim.store().elapsed_ms();
        let r = fleet.renewals(from, to);
        let per = fleet.ownership().await?;
        let report = fleet.sim.report();
        println!(
            "  --leave {leave:?}: {} ownership moves for {} locks over {:.1} s; {}; lapses {}; dual-writer intervals {}; final ownership {per:?}",
            fleet.moves(from, to),
            args.locks,
            (to - from) as f64 / 1000.0,
            line_latency("renewal lateness", &r.lateness),
            r.lapses,
            report.dual_writer_intervals
        );
        fleet.stop_all().await;
    }
    Ok(())
}
