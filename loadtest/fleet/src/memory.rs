//! `memory` (P10): the operator's own memory. kubesim runs as a process of its own (the
//! `kubesim` binary) and every operator replica as a separate `stslock run` process, so each
//! figure is one process's resident set (`VmRSS` from `/proc`) with nothing of the driver or
//! the API server in it. In one run, on one cluster: a replica with no locks (the fixed cost),
//! one replica holding every lock, then `--replicas` replicas sharing them. Reports the RSS of
//! each replica, the sharded replicas' total against the singleton's, and the singleton's RSS
//! per cached pod.
//!
//! The binaries are looked up beside `fleet` (`cargo build --release -p fleet -p stslock
//! -p kubesim` puts them there).

use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{Value, json};

use crate::Args;
use crate::driver::{create_lock, install, ownership_and_elected, tenants};

/// Child processes, killed when dropped (an error anywhere leaves nothing running).
struct Procs {
    dir: PathBuf,
    kids: Vec<(String, Child)>,
}

impl Drop for Procs {
    fn drop(&mut self) {
        for (_, c) in &mut self.kids {
            signal_group(c, "-KILL");
            let _ = c.wait();
        }
    }
}

/// Signal a child's whole process group (each child leads its own): a wrapper such as
/// `heaptrack` and the operator it runs get it alike.
fn signal_group(child: &Child, signal: &str) {
    let _ = Command::new("kill")
        .args([signal, "--", &format!("-{}", child.id())])
        .status();
}

impl Procs {
    fn spawn(&mut self, name: &str, mut cmd: Command) -> anyhow::Result<u32> {
        let log = std::fs::File::create(self.dir.join(format!("{name}.log")))?;
        let child = cmd
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {name}: {cmd:?}"))?;
        let pid = child.id();
        self.kids.push((name.to_string(), child));
        Ok(pid)
    }

    /// SIGTERM (what Kubernetes sends), then SIGKILL after 30 s.
    async fn stop(&mut self, name: &str) -> anyhow::Result<()> {
        let Some(i) = self.kids.iter().position(|(n, _)| n == name) else {
            return Ok(());
        };
        let (_, mut child) = self.kids.remove(i);
        signal_group(&child, "-TERM");
        let deadline = Instant::now() + Duration::from_secs(30);
        while child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                eprintln!("{name} did not stop within 30 s of SIGTERM: killed");
                signal_group(&child, "-KILL");
                child.wait()?;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    }

    fn pid(&self, name: &str) -> Option<u32> {
        self.kids
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, c)| c.id())
    }

    /// Fails when a process has exited on its own (its log says why).
    fn check_alive(&mut self) -> anyhow::Result<()> {
        for (name, c) in &mut self.kids {
            if let Some(status) = c.try_wait()? {
                anyhow::bail!(
                    "{name} exited ({status}); its log: {}",
                    self.dir.join(format!("{name}.log")).display()
                );
            }
        }
        Ok(())
    }
}

/// Resident set of a process, KiB.
fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    kubesim::html::rss_kib(&pid.to_string())
        .with_context(|| format!("no VmRSS in /proc/{pid}/status"))
}

fn binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating fleet")?;
    let path = exe
        .parent()
        .map(|d| d.join(name))
        .context("fleet has no directory")?;
    anyhow::ensure!(
        path.exists(),
        "{} not found: build it beside fleet (cargo build --release -p fleet -p stslock -p kubesim)",
        path.display()
    );
    Ok(path)
}

/// One process's memory as sampled, KiB: resident set (last and peak) and its private part
/// (`RssAnon`, last; the rest is mapped files, mostly the binary, shared by every process that
/// runs it).
#[derive(Clone, Copy, Default)]
struct Rss {
    last: u64,
    peak: u64,
    anon: u64,
    /// Proportional set size, last: the shared pages (the binary) split among the processes
    /// that map them, so the replicas' sum counts the binary once.
    pss: u64,
}

/// RSS of each named process, sampled every second for `seconds`.
async fn sample(
    procs: &mut Procs,
    names: &[String],
    seconds: u64,
) -> anyhow::Result<BTreeMap<String, Rss>> {
    let mut out: BTreeMap<String, Rss> = BTreeMap::new();
    for _ in 0..seconds.max(1) {
        procs.check_alive()?;
        for n in names {
            let pid = procs
                .pid(n)
                .with_context(|| format!("{n} is not running"))?;
            let kib = rss_kib(pid)?;
            let anon = kubesim::html::status_kib(&pid.to_string(), "RssAnon").unwrap_or(0);
            let pss = kubesim::html::pss_kib(&pid.to_string()).unwrap_or(0);
            let e = out.entry(n.clone()).or_default();
            *e = Rss {
                last: kib,
                peak: e.peak.max(kib),
                anon,
                pss,
            };
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    Ok(out)
}

/// Wait until the `n` locks are elected and owned by exactly `ids`, each holding some, and
/// the split has not changed for 5 s.
async fn wait_owned(
    client: &kube::Client,
    procs: &mut Procs,
    n: usize,
    ids: &[String],
    limit: Duration,
) -> anyhow::Result<BTreeMap<String, usize>> {
    let start = Instant::now();
    let mut stable_since: Option<(Instant, BTreeMap<String, usize>)> = None;
    loop {
        procs.check_alive()?;
        let (per, elected) = ownership_and_elected(client).await?;
        let done = elected >= n
            && per.len() == ids.len()
            && ids.iter().all(|id| per.get(id).is_some_and(|c| *c > 0));
        stable_since = match stable_since {
            Some((t, prev)) if done && prev == per => {
                if t.elapsed() >= Duration::from_secs(5) {
                    return Ok(per);
                }
                Some((t, prev))
            }
            _ if done => Some((Instant::now(), per.clone())),
            _ => None,
        };
        anyhow::ensure!(
            start.elapsed() < limit,
            "after {:?}: {elected} of {n} locks elected, owners {per:?} (expected {ids:?})",
            limit
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// `stslock run` for replica `id`; with `FLEET_OPERATOR_WRAPPER` set (e.g. `heaptrack`), run
/// under that program (a heap profile of the same run).
fn operator(args: &Args, kubeconfig: &Path, id: &str) -> anyhow::Result<Command> {
    let stslock = binary("stslock")?;
    let mut cmd = match std::env::var_os("FLEET_OPERATOR_WRAPPER") {
        Some(w) => {
            let mut c = Command::new(w);
            c.arg(stslock);
            c
        }
        None => Command::new(stslock),
    };
    cmd.arg("run")
        .args(["--kubeconfig", &kubeconfig.display().to_string()])
        .args(["--shard-id", id])
        .args(["--metrics-addr", "127.0.0.1:0"])
        .args(["--leave", "keep"])
        .args([
            "--membership-lease-seconds",
            &args.membership_seconds.to_string(),
        ])
        .args(["--qps", &args.qps.to_string()])
        .args(["--burst", &args.burst.to_string()])
        .args(["--tenant-qps", &args.tenant_qps.to_string()])
        .args([
            "--placement",
            &format!("{:?}", args.placement).to_lowercase(),
        ])
        .env("RUST_LOG", "warn");
    Ok(cmd)
}

pub(crate) async fn memory(args: &Args) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("stslock-memory-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = run(args, &dir).await;
    if result.is_ok() {
        let _ = std::fs::remove_dir_all(&dir);
    } else {
        eprintln!("logs kept in {}", dir.display());
    }
    result
}

async fn run(args: &Args, dir: &Path) -> anyhow::Result<()> {
    let mut procs = Procs {
        dir: dir.to_path_buf(),
        kids: vec![],
    };
    let kubeconfig = dir.join("kubeconfig");
    let mut sim = Command::new(binary("kubesim")?);
    sim.args(["--addr", "127.0.0.1:0", "--pod-ready-ms", "50"])
        .args(["--kubeconfig", &kubeconfig.display().to_string()]);
    procs.spawn("kubesim", sim)?;
    let client = {
        let start = Instant::now();
        loop {
            procs.check_alive()?;
            let read = kube::config::Kubeconfig::read_from(&kubeconfig);
            if let Ok(k) = read {
                let cfg = kube::Config::from_custom_kubeconfig(k, &Default::default()).await?;
                break kube::Client::try_from(cfg)?;
            }
            anyhow::ensure!(
                start.elapsed() < Duration::from_secs(30),
                "kubesim wrote no kubeconfig in 30 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let namespaces = tenants("tenant", args.namespaces);
    install(&client, &namespaces).await?;
    let window = args.seconds;
    let limit = Duration::from_secs(900);

    // The fixed cost: a replica with nothing to hold.
    procs.spawn("empty", operator(args, &kubeconfig, "empty")?)?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let empty = sample(&mut procs, &["empty".to_string()], window.min(10)).await?;
    procs.stop("empty").await?;
    let empty_kib = empty.get("empty").map_or(0, |v| v.last);
    let empty_anon = empty.get("empty").map_or(0, |v| v.anon);
    println!(
        "no locks: one replica {} MiB ({} MiB private)",
        mib(empty_kib),
        mib(empty_anon)
    );

    let n = args.locks;
    let started = Instant::now();
    for i in 0..n {
        create_lock(&client, &namespaces, i, args.pods, args.lease_seconds).await?;
    }
    println!(
        "created {n} locks ({} pods each) in {} namespaces in {:.1} s",
        args.pods,
        namespaces.len(),
        started.elapsed().as_secs_f64()
    );

    // One replica holding every lock.
    let single = vec!["single".to_string()];
    procs.spawn("single", operator(args, &kubeconfig, "single")?)?;
    let started = Instant::now();
    wait_owned(&client, &mut procs, n, &single, limit).await?;
    println!(
        "one replica: {n} locks elected and owned in {:.1} s; sampling {window} s",
        started.elapsed().as_secs_f64()
    );
    let one = sample(&mut procs, &single, window).await?;
    let sim_one = rss_kib(procs.pid("kubesim").context("kubesim")?)?;
    procs.stop("single").await?;
    let single_kib = one.get("single").map_or(0, |v| v.last);
    let single_anon = one.get("single").map_or(0, |v| v.anon);
    let single_pss = one.get("single").map_or(0, |v| v.pss);
    let pods = n as u64 * u64::try_from(args.pods.max(0)).unwrap_or(0);
    println!(
        "one replica: {} MiB (peak {} MiB, {} MiB private); {:.2} KiB per cached pod above the empty replica",
        mib(single_kib),
        mib(one.get("single").map_or(0, |v| v.peak)),
        mib(single_anon),
        per_pod(single_kib, empty_kib, pods)
    );

    // The same locks shared by `--replicas` replicas.
    let ids: Vec<String> = (0..args.replicas.max(1))
        .map(|i| format!("shard-{i}"))
        .collect();
    for id in &ids {
        procs.spawn(id, operator(args, &kubeconfig, id)?)?;
    }
    let started = Instant::now();
    let split = wait_owned(&client, &mut procs, n, &ids, limit).await?;
    println!(
        "{} replicas: locks split {split:?} in {:.1} s; sampling {window} s",
        ids.len(),
        started.elapsed().as_secs_f64()
    );
    let many = sample(&mut procs, &ids, window).await?;
    let sim_many = rss_kib(procs.pid("kubesim").context("kubesim")?)?;
    for id in &ids {
        procs.stop(id).await?;
    }
    let total: u64 = many.values().map(|v| v.last).sum();
    let ratio = total as f64 / single_kib.max(1) as f64;
    let total_anon: u64 = many.values().map(|v| v.anon).sum();
    let ratio_anon = total_anon as f64 / single_anon.max(1) as f64;
    let total_pss: u64 = many.values().map(|v| v.pss).sum();
    let ratio_pss = total_pss as f64 / single_pss.max(1) as f64;
    for (id, r) in &many {
        println!(
            "  {id}: {} locks, {} MiB (peak {} MiB, {} MiB private, {} MiB proportional)",
            split.get(id).copied().unwrap_or(0),
            mib(r.last),
            mib(r.peak),
            mib(r.anon),
            mib(r.pss)
        );
    }
    println!(
        "{} replicas, proportional set size (Pss: the binary counted once, as on one node): total {} MiB = {ratio_pss:.2}x the singleton's {} MiB",
        ids.len(),
        mib(total_pss),
        mib(single_pss)
    );
    println!(
        "{} replicas, private memory (RssAnon): total {} MiB = {ratio_anon:.2}x the singleton's {} MiB",
        ids.len(),
        mib(total_anon),
        mib(single_anon)
    );
    println!(
        "{} replicas: total {} MiB = {ratio:.2}x the singleton's {} MiB (kubesim: {} MiB with one replica, {} MiB with {})",
        ids.len(),
        mib(total),
        mib(single_kib),
        mib(sim_one),
        mib(sim_many),
        ids.len()
    );
    let report = json!({
        "scenario": "memory",
        "locks": n, "podsPerSet": args.pods, "pods": pods, "namespaces": namespaces.len(),
        "sampleSeconds": window,
        "emptyReplicaKiB": empty_kib,
        "emptyReplicaAnonKiB": empty_anon,
        "singleReplicaKiB": single_kib,
        "singleReplicaAnonKiB": single_anon,
        "singleReplicaPeakKiB": one.get("single").map(|v| v.peak),
        "singleKiBPerCachedPod": per_pod(single_kib, empty_kib, pods),
        "replicas": ids.len(),
        "perReplica": many.iter().map(|(id, r)| (id.clone(), json!({
            "locks": split.get(id), "rssKiB": r.last, "peakKiB": r.peak, "anonKiB": r.anon, "pssKiB": r.pss,
        }))).collect::<serde_json::Map<String, Value>>(),
        "totalKiB": total,
        "totalOverSingle": ratio,
        "totalAnonKiB": total_anon,
        "totalAnonOverSingle": ratio_anon,
        "singleReplicaPssKiB": single_pss,
        "totalPssKiB": total_pss,
        "totalPssOverSingle": ratio_pss,
        "kubesimKiB": {"singleReplica": sim_one, "replicas": sim_many},
    });
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    if let Some(path) = &args.json_out {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn mib(kib: u64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
}

fn per_pod(kib: u64, empty_kib: u64, pods: u64) -> f64 {
    kib.saturating_sub(empty_kib) as f64 / pods.max(1) as f64
}
