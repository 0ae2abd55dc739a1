//! The driver every scenario uses: an in-process kubesim with StatefulSets and locks across
//! namespaces, operator replicas started, killed and replaced by id, and the measurements read
//! back from kubesim (renewal lateness, lapses, failover latency).

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use anyhow::Context;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{ListParams, PostParams};
use kube::{Api, ResourceExt};
use serde_json::json;
use stslock::api::{SHARD_LABEL, StatefulSetLock};
use stslock::config::{LeaveStrategy, OperatorArgs};
use tokio::sync::oneshot;

use crate::Args;

pub(crate) struct Replica {
    pub(crate) stop: oneshot::Sender<()>,
    pub(crate) task: tokio::task::JoinHandle<()>,
}

pub(crate) use kubesim::html::pct;

/// A writer failed by the driver: (when, in µs of the store's clock, namespace,
/// lock/StatefulSet, pod).
pub(crate) type Flap = (u64, String, String, String);

/// Renewal statistics of one window.
pub(crate) struct Renewals {
    pub(crate) lateness: Vec<u64>,
    pub(crate) lapses: usize,
    pub(crate) writes: u64,
}

pub(crate) struct Fleet {
    pub(crate) sim: kubesim::Sim,
    pub(crate) client: kube::Client,
    pub(crate) args: Args,
    pub(crate) replicas: Vec<Option<Replica>>,
    /// (namespace, name) of every lock created.
    pub(crate) locks: Vec<(String, String)>,
    pub(crate) leave: LeaveStrategy,
}

impl Fleet {
    pub(crate) fn new(args: &Args) -> Fleet {
        let mut cfg = kubesim::SimConfig::default();
        cfg.controllers.pod_ready_delay = Duration::from_millis(50);
        cfg.store.history_window = Duration::from_secs(180);
        // The role label too: a dual-writer interval's commit rows say which way each pod write went.
        cfg.store.recorded_labels = vec![
            SHARD_LABEL.to_string(),
            crate::faults::ROLE_LABEL.to_string(),
        ];
        // The faults scenario tells lapses of an owner cut off by faults apart with it.
        cfg.store.attempt_log_max = 1_000_000;
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

    pub(crate) async fn install(&self, namespaces: &[String]) -> anyhow::Result<()> {
        install(&self.client, namespaces).await
    }

    /// Create `n` locks (each with its StatefulSet), round-robin over `namespaces`.
    pub(crate) async fn add_locks(
        &mut self,
        namespaces: &[String],
        n: usize,
    ) -> anyhow::Result<()> {
        let (pods, lease) = (self.args.pods, self.args.lease_seconds);
        for _ in 0..n {
            let i = self.locks.len();
            let lock = create_lock(&self.client, namespaces, i, pods, lease).await?;
            self.locks.push(lock);
        }
        Ok(())
    }

    pub(crate) fn start_replica(&mut self, i: usize) {
        let id = format!("r{i}");
        let mut a = OperatorArgs::for_shard(&id);
        a.membership_lease_seconds = self.args.membership_seconds;
        a.qps = self.args.qps;
        a.burst = self.args.burst;
        a.tenant_qps = self.args.tenant_qps;
        a.leave = self.leave;
        a.placement = self.args.placement;
        if let Some(t) = self.args.api_timeout_seconds {
            a.api_timeout_seconds = t;
        }
        let client = self.sim.client_as(&format!("stslock/{id}"));
        let (stop, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let shutdown = async {
                let _ = rx.await;
            };
            if let Err(e) = stslock::replica::run(client, a, shutdown).await {
                eprintln!("replica stopped with an error: {e:#}");
            }
        });
        if self.replicas.len() <= i {
            self.replicas.resize_with(i + 1, || None);
        }
        self.replicas[i] = Some(Replica { stop, task });
    }

    /// Abrupt: no handoff, no membership Lease deletion.
    pub(crate) fn kill_replica(&mut self, i: usize) -> bool {
        match self.replicas.get_mut(i).and_then(Option::take) {
            Some(r) => {
                r.task.abort();
                true
            }
            None => false,
        }
    }

    /// Graceful, without waiting: the replica is told to stop (what SIGTERM does) and hands
    /// its locks off in the background; the handle says when it is gone.
    pub(crate) fn begin_stop(&mut self, i: usize) -> Option<tokio::task::JoinHandle<()>> {
        let r = self.replicas.get_mut(i).and_then(Option::take)?;
        let _ = r.stop.send(());
        Some(r.task)
    }

    /// Graceful: what the replica does on SIGTERM.
    pub(crate) async fn stop_replica(&mut self, i: usize) {
        if let Some(r) = self.replicas.get_mut(i).and_then(Option::take) {
            let _ = r.stop.send(());
            let _ = tokio::time::timeout(Duration::from_secs(30), r.task).await;
        }
    }

    /// Ownership label changes of locks committed in [from_ms, to_ms].
    pub(crate) fn moves(&self, from_ms: u64, to_ms: u64) -> usize {
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

    pub(crate) async fn stop_all(&mut self) {
        for r in self.replicas.drain(..).flatten() {
            let _ = r.stop.send(());
            let _ = tokio::time::timeout(Duration::from_secs(30), r.task).await;
        }
    }

    /// Wait until every lock created has a writer; returns how many have one.
    pub(crate) async fn wait_settled(&self, limit: Duration) -> anyhow::Result<usize> {
        wait_elected(&self.client, self.locks.len(), limit).await
    }

    /// Fail the writer of `locks[i]`; it comes back Ready (as a reader) 2 s later.
    pub(crate) async fn flap(&self, i: usize) -> Option<Flap> {
        let (ns, name) = self.locks.get(i)?;
        let l = Api::<StatefulSetLock>::namespaced(self.client.clone(), ns)
            .get(name)
            .await
            .ok()?;
        let w = l.status.and_then(|s| s.writer_pod)?;
        self.fail_pod(ns, name, &w)
    }

    /// Fail `pod` of the StatefulSet `set` (it turns NotReady, and Ready again 2 s later).
    pub(crate) fn fail_pod(&self, ns: &str, set: &str, pod: &str) -> Option<Flap> {
        let failed = self.sim.pods().set_ready(ns, pod, false).ok()?;
        // The commit time of the readiness change itself (a copy of the whole log would hold
        // the store for as long as it takes).
        let rv: u64 = failed
            .pointer("/metadata/resourceVersion")
            .and_then(|v| v.as_str())
            .and_then(|v| v.parse().ok())?;
        let at = self
            .sim
            .store()
            .commits_since(rv)
            .iter()
            .find(|c| c.rv == rv)
            .map(|c| c.at_us)?;
        let pods = self.sim.pods().clone();
        let (ns2, w2) = (ns.to_string(), pod.to_string());
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(2)).await;
            let _ = pods.set_ready(&ns2, &w2, true);
        });
        Some((at, ns.to_string(), set.to_string(), pod.to_string()))
    }

    /// Renewal lateness (gap between consecutive writes of a lock's Lease beyond half its
    /// duration) and lapses (a gap beyond the whole duration, or no write for longer than the
    /// duration before the window's end) over [from_ms, to_ms].
    pub(crate) fn renewals(&self, from_ms: u64, to_ms: u64) -> Renewals {
        self.renewals_in(from_ms, to_ms, |_| true)
    }

    /// [`Fleet::renewals`] of the Leases in the namespaces `only` accepts.
    pub(crate) fn renewals_in(
        &self,
        from_ms: u64,
        to_ms: u64,
        only: impl Fn(&str) -> bool,
    ) -> Renewals {
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
    pub(crate) fn failovers(&self, flaps: &[Flap]) -> Vec<u64> {
        let mut out: Vec<u64> = self
            .failovers_us(flaps, "stslock/")
            .into_iter()
            .map(|us| us / 1000)
            .collect();
        out.sort_unstable();
        out
    }

    /// [`Fleet::failovers`] in microseconds, of the label writes of the clients whose name
    /// starts with `actor`; failures nobody failed over are left out.
    pub(crate) fn failovers_us(&self, flaps: &[Flap], actor: &str) -> Vec<u64> {
        let log = self.sim.commit_log();
        let mut out: Vec<u64> = flaps
            .iter()
            .filter_map(|(at, ns, set, pod)| {
                let prefix = format!("{set}-");
                log.iter()
                    .find(|d| {
                        d.at_us > *at
                            && d.resource == "pods"
                            && d.actor.starts_with(actor)
                            && &d.namespace == ns
                            && &d.name != pod
                            && d.name.starts_with(&prefix)
                    })
                    .map(|p| p.at_us - at)
            })
            .collect();
        out.sort_unstable();
        out
    }

    pub(crate) async fn ownership(&self) -> anyhow::Result<BTreeMap<String, usize>> {
        ownership(&self.client).await
    }
}

/// The CRD and `namespaces`.
pub(crate) async fn install(client: &kube::Client, namespaces: &[String]) -> anyhow::Result<()> {
    stslock::dev::install_crd(client).await?;
    let ns_api: Api<Namespace> = Api::all(client.clone());
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

/// Lock number `i` (`db<i>`) and its StatefulSet of `pods` pods, in namespace `i` modulo
/// `namespaces`.
pub(crate) async fn create_lock(
    client: &kube::Client,
    namespaces: &[String],
    i: usize,
    pods: i32,
    lease_seconds: i32,
) -> anyhow::Result<(String, String)> {
    let ns = &namespaces[i % namespaces.len()];
    let name = format!("db{i}");
    let sets: Api<StatefulSet> = Api::namespaced(client.clone(), ns);
    let locks: Api<StatefulSetLock> = Api::namespaced(client.clone(), ns);
    let sts: StatefulSet = serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"serviceName": "db", "replicas": pods, "podManagementPolicy": "Parallel",
                 "selector": {"matchLabels": {"app": name}},
                 "template": {"metadata": {"labels": {"app": name}}, "spec": {"containers": [{"name": "c", "image": "postgres:15"}]}}}
    }))?;
    sets.create(&PostParams::default(), &sts)
        .await
        .with_context(|| format!("creating StatefulSet {ns}/{name}"))?;
    let lock: StatefulSetLock = serde_json::from_value(json!({
        "apiVersion": "app.anukkrit.me/v1", "kind": "StatefulSetLock",
        "metadata": {"name": name},
        "spec": {"statefulSetName": name, "leaseName": format!("{name}-lease"), "leaseDurationSeconds": lease_seconds}
    }))?;
    locks
        .create(&PostParams::default(), &lock)
        .await
        .with_context(|| format!("creating StatefulSetLock {ns}/{name}"))?;
    Ok((ns.clone(), name))
}

/// Wait until `n` locks have a writer (or `limit` passed); returns how many have one.
pub(crate) async fn wait_elected(
    client: &kube::Client,
    n: usize,
    limit: Duration,
) -> anyhow::Result<usize> {
    let start = Instant::now();
    let all: Api<StatefulSetLock> = Api::all(client.clone());
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
        if settled >= n || start.elapsed() >= limit {
            return Ok(settled);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Locks per owner (shard label), `(none)` for unowned ones.
pub(crate) async fn ownership(client: &kube::Client) -> anyhow::Result<BTreeMap<String, usize>> {
    Ok(ownership_and_elected(client).await?.0)
}

/// [`ownership`] and how many locks have a writer, from one LIST.
pub(crate) async fn ownership_and_elected(
    client: &kube::Client,
) -> anyhow::Result<(BTreeMap<String, usize>, usize)> {
    let all: Api<StatefulSetLock> = Api::all(client.clone());
    let mut per: BTreeMap<String, usize> = BTreeMap::new();
    let mut elected = 0;
    for l in all.list(&ListParams::default()).await?.items {
        *per.entry(
            l.labels()
                .get(SHARD_LABEL)
                .cloned()
                .unwrap_or_else(|| "(none)".into()),
        )
        .or_default() += 1;
        if l.status.as_ref().is_some_and(|s| s.writer_pod.is_some()) {
            elected += 1;
        }
    }
    Ok((per, elected))
}

pub(crate) fn line_latency(what: &str, v: &[u64]) -> String {
    format!(
        "{what} over {}: p50 {} ms, p99 {} ms, max {} ms",
        v.len(),
        pct(v, 0.5),
        pct(v, 0.99),
        v.last().copied().unwrap_or(0)
    )
}

pub(crate) fn tenants(prefix: &str, n: usize) -> Vec<String> {
    (0..n.max(1)).map(|i| format!("{prefix}-{i}")).collect()
}

pub(crate) async fn settle(fleet: &Fleet, what: &str) -> anyhow::Result<()> {
    let start = Instant::now();
    let from_ms = fleet.sim.store().elapsed_ms();
    let settled = fleet.wait_settled(Duration::from_secs(900)).await?;
    anyhow::ensure!(
        settled == fleet.locks.len(),
        "{what}: only {settled} of {} locks elected after 900 s",
        fleet.locks.len()
    );
    let secs = start.elapsed().as_secs_f64();
    println!("{what}: {settled} locks elected in {secs:.1} s");
    // How much of the write budget the election used: near 100 % it is bounded by the
    // budget, not by the operator.
    let to_ms = fleet.sim.store().elapsed_ms();
    let writes = fleet
        .sim
        .commit_log()
        .iter()
        .filter(|c| c.at_ms >= from_ms && c.at_ms <= to_ms && c.actor.starts_with("stslock/"))
        .count();
    let running = fleet.replicas.iter().flatten().count();
    if fleet.args.qps > 0.0 && running > 0 {
        let budget = fleet.args.qps * running as f64;
        let rate = writes as f64 / secs.max(0.001);
        println!(
            "  election: {writes} operator writes ({:.1} per lock) in {secs:.1} s = {rate:.0}/s, {:.0} % of the write budget ({budget:.0}/s over {running} replicas; renewals of the locks already elected included)",
            writes as f64 / settled.max(1) as f64,
            100.0 * rate / budget
        );
    }
    Ok(())
}
