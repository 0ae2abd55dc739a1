//! `fleet`: the fleet load and chaos driver (first version). Creates N StatefulSets with locks
//! across M namespaces in an in-process kubesim, runs R operator replicas, optionally kills
//! and restarts replicas and fails writers, and reports ownership, balance, renewal lateness,
//! lease lapses, failover latency and dual-writer time from kubesim's commit log and invariant
//! report. Everything is in-process on 127.0.0.1 and stops by itself after `--seconds`.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{ListParams, PostParams};
use kube::{Api, ResourceExt};
use rand::Rng;
use serde_json::json;
use stslock::api::{SHARD_LABEL, StatefulSetLock};
use stslock::config::OperatorArgs;
use tokio::sync::oneshot;

#[derive(Debug, Parser)]
#[command(
    name = "fleet",
    about = "Fleet load and chaos driver for stslock against kubesim"
)]
struct Args {
    /// Locks (each with its own StatefulSet).
    #[arg(long, default_value_t = 1000)]
    locks: usize,
    /// Namespaces (tenants) the locks are spread over.
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
    /// Measured run after the fleet has settled, seconds.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// Kill (abruptly) and restart a random replica every this many seconds (0: never).
    #[arg(long, default_value_t = 0)]
    kill_every: u64,
    /// Fail a random lock's writer every this many milliseconds (0: never).
    #[arg(long, default_value_t = 0)]
    flap_every_ms: u64,
}

struct Replica {
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

fn start(sim: &kubesim::Sim, id: &str, args: &Args) -> Replica {
    let mut a = OperatorArgs::for_shard(id);
    a.membership_lease_seconds = args.membership_seconds;
    let client = sim.client_as(&format!("stslock/{id}"));
    let (stop, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let shutdown = async {
            let _ = rx.await;
        };
        if let Err(e) = stslock::reconcile::run(client, a, shutdown).await {
            eprintln!("replica stopped with an error: {e:#}");
        }
    });
    Replica { stop, task }
}

fn pct(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[(((sorted.len() - 1) as f64) * p).round() as usize]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut cfg = kubesim::SimConfig::default();
    cfg.controllers.pod_ready_delay = Duration::from_millis(50);
    cfg.store.history_window = Duration::from_secs(120);
    let sim = kubesim::Sim::start(cfg);
    let client = sim.client_as("fleet");
    stslock::dev::install_crd(&client).await?;
    let nss: Vec<String> = (0..args.namespaces.max(1))
        .map(|i| format!("tenant-{i}"))
        .collect();
    let ns_api: Api<Namespace> = Api::all(client.clone());
    for ns in &nss {
        ns_api
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({"metadata": {"name": ns}}))?,
            )
            .await
            .with_context(|| format!("creating namespace {ns}"))?;
    }
    let setup = Instant::now();
    for i in 0..args.locks {
        let ns = &nss[i % nss.len()];
        let sets: Api<StatefulSet> = Api::namespaced(client.clone(), ns);
        let locks: Api<StatefulSetLock> = Api::namespaced(client.clone(), ns);
        let sts: StatefulSet = serde_json::from_value(json!({
            "metadata": {"name": format!("db{i}")},
            "spec": {"serviceName": "db", "replicas": args.pods, "podManagementPolicy": "Parallel",
                     "selector": {"matchLabels": {"app": format!("db{i}")}},
                     "template": {"metadata": {"labels": {"app": format!("db{i}")}}, "spec": {"containers": [{"name": "c", "image": "postgres:15"}]}}}
        }))?;
        sets.create(&PostParams::default(), &sts).await?;
        let lock: StatefulSetLock = serde_json::from_value(
            json!({"apiVersion": "app.anukkrit.me/v1", "kind": "StatefulSetLock",
            "metadata": {"name": format!("db{i}")},
            "spec": {"statefulSetName": format!("db{i}"), "leaseName": format!("db{i}-lease"), "leaseDurationSeconds": args.lease_seconds}}),
        )?;
        locks.create(&PostParams::default(), &lock).await?;
    }
    let mut replicas: Vec<Option<Replica>> = (0..args.replicas)
        .map(|i| Some(start(&sim, &format!("r{i}"), &args)))
        .collect();
    // Settle: every lock has a writer.
    let all_locks: Api<StatefulSetLock> = Api::all(client.clone());
    loop {
        let l = all_locks.list(&ListParams::default()).await?;
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
        if settled == args.locks {
            break;
        }
        anyhow::ensure!(
            setup.elapsed() < Duration::from_secs(600),
            "only {settled} of {} locks elected after 600 s",
            args.locks
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    println!(
        "fleet: {} locks in {} namespaces, {} replicas, settled in {:.1} s",
        args.locks,
        nss.len(),
        args.replicas,
        setup.elapsed().as_secs_f64()
    );

    let start_ms = sim.store().elapsed_ms();
    let run = Instant::now();
    let mut rng = rand::rng();
    let mut next_kill = Instant::now() + Duration::from_secs(args.kill_every.max(1));
    let mut next_flap = Instant::now();
    let mut kills = 0;
    let mut flaps: Vec<(u64, String, String, String)> = vec![];
    while run.elapsed() < Duration::from_secs(args.seconds) {
        if args.kill_every > 0 && Instant::now() >= next_kill {
            let i = rng.random_range(0..replicas.len());
            if let Some(r) = replicas[i].take() {
                r.task.abort();
                kills += 1;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            replicas[i] = Some(start(&sim, &format!("r{i}"), &args));
            next_kill = Instant::now() + Duration::from_secs(args.kill_every);
        }
        if args.flap_every_ms > 0 && Instant::now() >= next_flap {
            let i = rng.random_range(0..args.locks);
            let ns = &nss[i % nss.len()];
            if let Ok(l) = Api::<StatefulSetLock>::namespaced(client.clone(), ns)
                .get(&format!("db{i}"))
                .await
                && let Some(w) = l.status.and_then(|s| s.writer_pod)
            {
                // The failed writer comes back a little later (it stays a reader).
                if sim.pods().set_ready(ns, &w, false).is_ok() {
                    flaps.push((
                        sim.store().elapsed_ms(),
                        ns.clone(),
                        format!("db{i}"),
                        w.clone(),
                    ));
                }
                let pods = sim.pods().clone();
                let (ns, w) = (ns.clone(), w.clone());
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    let _ = pods.set_ready(&ns, &w, true);
                });
            }
            next_flap = Instant::now() + Duration::from_millis(args.flap_every_ms);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let end_ms = sim.store().elapsed_ms();
    let log = sim.commit_log();

    // Renewal lateness: for each writer Lease, gaps between consecutive operator writes
    // beyond half the lease duration; a gap beyond the whole duration is a lapse.
    let half = (args.lease_seconds as u64) * 500;
    let mut by_lease: HashMap<(String, String), Vec<u64>> = HashMap::new();
    let mut writes = 0u64;
    for c in log
        .iter()
        .filter(|c| c.at_ms >= start_ms && c.actor.starts_with("stslock/"))
    {
        writes += 1;
        if c.resource == "leases" && c.name.ends_with("-lease") {
            by_lease
                .entry((c.namespace.clone(), c.name.clone()))
                .or_default()
                .push(c.at_ms);
        }
    }
    let mut lateness: Vec<u64> = vec![];
    let mut lapses = 0;
    for at in by_lease.values() {
        for w in at.windows(2) {
            let gap = w[1] - w[0];
            lateness.push(gap.saturating_sub(half));
            if gap > 2 * half {
                lapses += 1;
            }
        }
    }
    lateness.sort_unstable();
    // Failover latency: a writer failed by the driver → the first operator label write on
    // another pod of that StatefulSet (the promotion; demotion of the old writer comes first).
    let mut failovers: Vec<u64> = vec![];
    for (at, ns, set, pod) in &flaps {
        let prefix = format!("{set}-");
        if let Some(p) = log.iter().find(|d| {
            d.at_ms >= *at
                && d.resource == "pods"
                && d.actor.starts_with("stslock/")
                && &d.namespace == ns
                && &d.name != pod
                && d.name.starts_with(&prefix)
        }) {
            failovers.push(p.at_ms - at);
        }
    }
    failovers.sort_unstable();
    let owners = all_locks.list(&ListParams::default()).await?;
    let mut per: BTreeMap<String, usize> = BTreeMap::new();
    for l in &owners.items {
        *per.entry(
            l.labels()
                .get(SHARD_LABEL)
                .cloned()
                .unwrap_or_else(|| "(none)".into()),
        )
        .or_default() += 1;
    }
    let mean = args.locks as f64 / args.replicas as f64;
    let max = per
        .iter()
        .filter(|(k, _)| k.as_str() != "(none)")
        .map(|(_, v)| *v)
        .max()
        .unwrap_or(0) as f64;
    let report = sim.report();
    let secs = (end_ms - start_ms) as f64 / 1000.0;
    println!(
        "run: {secs:.1} s, {kills} replica kills, {} writer failures",
        flaps.len()
    );
    println!("ownership: {per:?}; busiest/mean {:.3}", max / mean);
    println!(
        "operator writes: {writes} ({:.0}/s); expected renewals alone {:.0}/s",
        writes as f64 / secs,
        args.locks as f64 / (half as f64 / 1000.0)
    );
    println!(
        "renewal lateness over {} renewals: p50 {} ms, p99 {} ms, max {} ms; lease lapses (gap > duration): {lapses}",
        lateness.len(),
        pct(&lateness, 0.5),
        pct(&lateness, 0.99),
        lateness.last().copied().unwrap_or(0)
    );
    println!(
        "failover latency over {} failovers: p50 {} ms, p99 {} ms, max {} ms",
        failovers.len(),
        pct(&failovers, 0.5),
        pct(&failovers, 0.99),
        failovers.last().copied().unwrap_or(0)
    );
    println!(
        "dual-writer intervals: {} ({} ms)",
        report.dual_writer_intervals, report.dual_writer_ms
    );
    for r in replicas.into_iter().flatten() {
        let _ = r.stop.send(());
        let _ = tokio::time::timeout(Duration::from_secs(30), r.task).await;
    }
    Ok(())
}
