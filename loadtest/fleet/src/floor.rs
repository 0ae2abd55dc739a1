//! `failover` (P10): the operator's failover latency as a multiple of the floor of the same
//! backend under the same load. The floor is what any failover must pay: one watch delivery
//! (the pod turning NotReady) and the three writes a failover needs, one after the other — the
//! Lease compare-and-swap, the old writer's demotion, the new writer's promotion — made by a
//! minimal client with nothing else to do, on StatefulSets of their own in the same cluster,
//! while the operator fails over the fleet's locks. Both are measured the same way: from the
//! commit of the readiness change to the commit of the promotion (kubesim's commit log).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::Api;
use kube::api::{ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use serde_json::json;

use crate::Args;
use crate::driver::*;

const FLOOR_NS: &str = "floor";
const ROLE: &str = "sts-role";

/// One StatefulSet the floor client fails over: its pods, its writer and its Lease as last
/// written.
struct FloorSet {
    pods: Vec<String>,
    writer: String,
    lease: Lease,
}

pub(crate) async fn failover(args: &Args) -> anyhow::Result<()> {
    anyhow::ensure!(args.pods >= 2, "failover: --pods must be at least 2");
    let mut fleet = Fleet::new(args);
    let nss = tenants("tenant", args.namespaces);
    let mut all_ns = nss.clone();
    all_ns.push(FLOOR_NS.to_string());
    fleet.install(&all_ns).await?;
    fleet.add_locks(&nss, args.locks).await?;
    let floor_sets = args.floor_sets.max(1);
    for i in 0..floor_sets {
        create_set(&fleet.client, &format!("floor{i}"), args.pods).await?;
    }
    for i in 0..args.replicas {
        fleet.start_replica(i);
    }
    settle(
        &fleet,
        &format!(
            "failover: {} locks in {} namespaces, {} replicas",
            args.locks,
            nss.len(),
            args.replicas
        ),
    )
    .await?;
    let floor_client = fleet.sim.client_as("floor");
    let sets = elect_floor(&floor_client, floor_sets, args.pods).await?;
    let writers: HashMap<String, String> = sets
        .iter()
        .map(|(k, v)| (k.clone(), v.writer.clone()))
        .collect();
    let writers = std::sync::Arc::new(std::sync::Mutex::new(writers));
    let floor_task = tokio::spawn(run_floor(floor_client, sets, writers.clone()));
    // Let the floor client's watch open before the first failure.
    tokio::time::sleep(Duration::from_secs(1)).await;

    // One failure every `--flap-every-ms` (200 ms when not set), alternating between the two.
    let every = Duration::from_millis(if args.flap_every_ms == 0 {
        200
    } else {
        args.flap_every_ms
    });
    let run = Instant::now();
    let cpu_before = cpu_seconds();
    let mut next = Instant::now();
    let (mut ops, mut floors) = (vec![], vec![]);
    let mut n = 0usize;
    while run.elapsed() < Duration::from_secs(args.seconds) {
        // Alternate: a lock of the operator, then a floor set, so both see the same load.
        if n.is_multiple_of(2) {
            let i = rand::random_range(0..fleet.locks.len());
            ops.extend(fleet.flap(i).await);
        } else {
            let set = format!("floor{}", (n / 2) % floor_sets);
            let w = writers
                .lock()
                .map_err(|_| anyhow::anyhow!("floor writers poisoned"))?
                .get(&set)
                .cloned();
            if let Some(w) = w {
                floors.extend(fleet.fail_pod(FLOOR_NS, &set, &w));
            }
        }
        n += 1;
        next += every;
        tokio::time::sleep_until(next.into()).await;
    }
    let busy = (cpu_seconds() - cpu_before) / run.elapsed().as_secs_f64();
    // Let the last failovers finish before reading the log.
    tokio::time::sleep(Duration::from_secs(3)).await;
    // The floor client runs until aborted here; an error that ended it early is the run's
    // (its failovers would be missing from the figures below).
    if floor_task.is_finished() {
        match floor_task.await {
            Ok(Ok(())) => anyhow::bail!("the floor client stopped before the run ended"),
            Ok(Err(e)) => return Err(e.context("the floor client failed")),
            Err(e) => anyhow::bail!("the floor client panicked: {e}"),
        }
    }
    floor_task.abort();
    let op = fleet.failovers_us(&ops, "stslock/");
    let fl = fleet.failovers_us(&floors, "floor");
    let line = |what: &str, v: &[u64], of: usize| {
        format!(
            "{what}: {} of {of} failed over; p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            v.len(),
            pct(v, 0.5) as f64 / 1e3,
            pct(v, 0.99) as f64 / 1e3,
            v.last().copied().unwrap_or(0) as f64 / 1e3
        )
    };
    println!(
        "this process (kubesim, {} replicas, floor client, driver) used {busy:.2} cores during the run",
        args.replicas
    );
    println!("{}", line("operator failover", &op, ops.len()));
    println!(
        "{}",
        line(
            "floor (watch delivery + Lease CAS + demote + promote)",
            &fl,
            floors.len()
        )
    );
    // Where the floor's time goes: the watch delivery and the Lease write (to the Lease's
    // commit), then each label write.
    let log = fleet.sim.commit_log();
    let (mut to_lease, mut to_demote) = (vec![], vec![]);
    for (at, _, set, pod) in &floors {
        let after = |pred: &dyn Fn(&kubesim::store::CommitRecord) -> bool| {
            log.iter()
                .find(|c| c.at_us > *at && c.actor == "floor" && pred(c))
                .map(|c| c.at_us - at)
        };
        let lease = format!("{set}-lease");
        if let (Some(l), Some(d)) = (
            after(&|c| c.resource == "leases" && c.name == lease),
            after(&|c| c.resource == "pods" && c.name == *pod),
        ) {
            to_lease.push(l);
            to_demote.push(d);
        }
    }
    to_lease.sort_unstable();
    to_demote.sort_unstable();
    println!(
        "  floor steps, p50: Lease committed {:.2} ms, demotion {:.2} ms, promotion {:.2} ms after the failure",
        pct(&to_lease, 0.5) as f64 / 1e3,
        pct(&to_demote, 0.5) as f64 / 1e3,
        pct(&fl, 0.5) as f64 / 1e3
    );
    let ratio = |p: f64| pct(&op, p) as f64 / (pct(&fl, p).max(1)) as f64;
    println!(
        "operator / floor: p50 {:.2}x, p99 {:.2}x",
        ratio(0.5),
        ratio(0.99)
    );
    let report = fleet.sim.report();
    println!(
        "dual-writer intervals: {} ({} ms)",
        report.dual_writer_intervals, report.dual_writer_ms
    );
    fleet.stop_all().await;
    anyhow::ensure!(
        report.dual_writer_intervals == 0,
        "failover: two writers at once"
    );
    anyhow::ensure!(
        op.len() == ops.len() && fl.len() == floors.len(),
        "failover: {} of {} operator and {} of {} floor failures were not failed over",
        ops.len() - op.len(),
        ops.len(),
        floors.len() - fl.len(),
        floors.len()
    );
    Ok(())
}

/// CPU time (user + system) this process has used, in seconds (Linux; 0 elsewhere).
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may hold spaces): utime and stime are the 12th and
    // 13th, in clock ticks (100 per second on Linux).
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

async fn create_set(client: &kube::Client, name: &str, pods: i32) -> anyhow::Result<()> {
    let sets: Api<StatefulSet> = Api::namespaced(client.clone(), FLOOR_NS);
    let sts: StatefulSet = serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"serviceName": name, "replicas": pods, "podManagementPolicy": "Parallel",
                 "selector": {"matchLabels": {"app": name}},
                 "template": {"metadata": {"labels": {"app": name}}, "spec": {"containers": [{"name": "c", "image": "postgres:15"}]}}}
    }))?;
    sets.create(&PostParams::default(), &sts)
        .await
        .with_context(|| format!("creating StatefulSet {FLOOR_NS}/{name}"))?;
    Ok(())
}

fn now() -> MicroTime {
    MicroTime(jiff::Timestamp::now())
}

/// Pod 0 of every floor set is its first writer, the others readers, and each set gets its
/// Lease.
async fn elect_floor(
    client: &kube::Client,
    n: usize,
    pods: i32,
) -> anyhow::Result<HashMap<String, FloorSet>> {
    let pod_api: Api<Pod> = Api::namespaced(client.clone(), FLOOR_NS);
    let leases: Api<Lease> = Api::namespaced(client.clone(), FLOOR_NS);
    let mut sets = HashMap::new();
    for i in 0..n {
        let set = format!("floor{i}");
        let names: Vec<String> = (0..pods).map(|p| format!("{set}-{p}")).collect();
        for (p, name) in names.iter().enumerate() {
            let role = if p == 0 { "writer" } else { "reader" };
            label(&pod_api, name, role).await?;
        }
        let lease: Lease = serde_json::from_value(json!({
            "metadata": {"name": format!("{set}-lease")},
            "spec": {"holderIdentity": names[0], "leaseDurationSeconds": 30,
                     "acquireTime": now(), "renewTime": now(), "leaseTransitions": 0}
        }))?;
        let lease = leases
            .create(&PostParams::default(), &lease)
            .await
            .with_context(|| format!("creating the Lease of {set}"))?;
        sets.insert(
            set,
            FloorSet {
                writer: names[0].clone(),
                pods: names,
                lease,
            },
        );
    }
    Ok(sets)
}

async fn label(pods: &Api<Pod>, name: &str, role: &str) -> anyhow::Result<()> {
    pods.patch(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {ROLE: role}}})),
    )
    .await
    .with_context(|| format!("labelling {FLOOR_NS}/{name} {role}"))?;
    Ok(())
}

fn ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The floor client: watches every pod of the cluster (as the operator does), and when a
/// floor set's writer turns NotReady moves the Lease to another pod, demotes the old writer
/// and promotes the new one, each write waiting for the one before.
async fn run_floor(
    client: kube::Client,
    mut sets: HashMap<String, FloorSet>,
    writers: std::sync::Arc<std::sync::Mutex<HashMap<String, String>>>,
) -> anyhow::Result<()> {
    let all: Api<Pod> = Api::all(client.clone());
    let pod_api: Api<Pod> = Api::namespaced(client.clone(), FLOOR_NS);
    let leases: Api<Lease> = Api::namespaced(client, FLOOR_NS);
    let mut rv = all
        .list_metadata(&ListParams::default().limit(1))
        .await?
        .metadata
        .resource_version
        .unwrap_or_default();
    loop {
        let mut stream = all
            .watch(&WatchParams::default(), &rv)
            .await
            .context("floor: watching pods")?
            .boxed();
        while let Some(ev) = stream.next().await {
            let pod = match ev.context("floor: pod watch")? {
                WatchEvent::Modified(p) => p,
                WatchEvent::Added(p) | WatchEvent::Deleted(p) => {
                    rv = p.metadata.resource_version.clone().unwrap_or(rv);
                    continue;
                }
                WatchEvent::Bookmark(b) => {
                    rv = b.metadata.resource_version;
                    continue;
                }
                WatchEvent::Error(e) => anyhow::bail!("floor: pod watch: {e:?}"),
            };
            rv = pod.metadata.resource_version.clone().unwrap_or(rv);
            let name = pod.metadata.name.clone().unwrap_or_default();
            if pod.metadata.namespace.as_deref() != Some(FLOOR_NS) || ready(&pod) {
                continue;
            }
            let Some((set, s)) = sets.iter_mut().find(|(_, s)| s.writer == name) else {
                continue;
            };
            let Some(next) = s.pods.iter().find(|p| **p != name).cloned() else {
                continue;
            };
            let mut lease = s.lease.clone();
            if let Some(spec) = lease.spec.as_mut() {
                spec.holder_identity = Some(next.clone());
                spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
                spec.acquire_time = Some(now());
                spec.renew_time = Some(now());
            }
            let lease_name = lease.metadata.name.clone().unwrap_or_default();
            s.lease = leases
                .replace(&lease_name, &PostParams::default(), &lease)
                .await
                .with_context(|| format!("floor: moving {lease_name}"))?;
            label(&pod_api, &name, "reader").await?;
            label(&pod_api, &next, "writer").await?;
            s.writer = next.clone();
            writers
                .lock()
                .map_err(|_| anyhow::anyhow!("floor writers poisoned"))?
                .insert(set.clone(), next);
        }
    }
}
