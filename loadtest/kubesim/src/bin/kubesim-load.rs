//! `kubesim-load`: measure kubesim's own throughput: sustained pod status patches per second
//! from many concurrent clients while several watches are open, with latency percentiles.
//!
//! Everything runs against 127.0.0.1 and stops by itself after `--seconds`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::{ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use serde_json::json;

#[derive(Debug, Parser)]
#[command(
    name = "kubesim-load",
    about = "Measure kubesim's throughput under concurrent pod status patches"
)]
struct Args {
    /// Concurrent patching clients (each its own connection pool).
    #[arg(long, default_value_t = 64)]
    clients: usize,
    /// Open watches on all pods.
    #[arg(long, default_value_t = 8)]
    watches: usize,
    /// Pods to patch (spread over the clients).
    #[arg(long, default_value_t = 640)]
    pods: usize,
    /// Measured duration.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Talk to kubesim in-process instead of over loopback HTTP.
    #[arg(long)]
    in_process: bool,
    /// Open loop: offer this many patches per second in total, each client at its share of
    /// the rate on a fixed schedule, and measure each patch's latency from the time it was due
    /// (so a server that falls behind shows in the latency, not only in the rate). Default:
    /// closed loop, each client sends its next patch when the last one is answered.
    #[arg(long)]
    rate: Option<f64>,
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

/// mimalloc: the store clones and frees JSON trees on every write, which glibc's malloc
/// serves at several times the cost.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut cfg = kubesim::SimConfig::default();
    cfg.controllers.pod_ready_delay = Duration::from_millis(10);
    let mut sim = kubesim::Sim::start(cfg);
    let addr = sim.serve("127.0.0.1:0".parse().context("addr")?).await?;
    let client_for = |i: usize| -> anyhow::Result<kube::Client> {
        if args.in_process {
            return Ok(sim.client_as(&format!("load-{i}")));
        }
        let url = format!("http://{addr}").parse().context("url")?;
        kube::Client::try_from(kube::Config::new(url)).context("client")
    };
    let setup: Api<Pod> = Api::namespaced(client_for(usize::MAX)?, "default");
    for i in 0..args.pods {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": format!("load-{i}"), "labels": {"app": "load"}},
            "spec": {"containers": [{"name": "c", "image": "busybox:1"}]}
        }))?;
        setup.create(&PostParams::default(), &pod).await?;
    }
    // Open the watches.
    let events = Arc::new(AtomicU64::new(0));
    let restarts = Arc::new(AtomicU64::new(0));
    let rv = setup
        .list(&ListParams::default())
        .await?
        .metadata
        .resource_version
        .unwrap_or_default();
    let mut watchers = vec![];
    for i in 0..args.watches {
        let api: Api<Pod> = Api::namespaced(client_for(1000 + i)?, "default");
        let events = events.clone();
        let restarts = restarts.clone();
        let mut rv = rv.clone();
        // A watch that ends (e.g. too slow for the feed) resumes from the last version it saw,
        // as every real client does; restarts are counted.
        watchers.push(tokio::spawn(async move {
            loop {
                let Ok(s) = api.watch(&WatchParams::default(), &rv).await else {
                    return;
                };
                let mut s = s.boxed();
                while let Some(Ok(ev)) = s.next().await {
                    match ev {
                        WatchEvent::Added(p) | WatchEvent::Modified(p) | WatchEvent::Deleted(p) => {
                            events.fetch_add(1, Ordering::Relaxed);
                            if let Some(v) = p.metadata.resource_version {
                                rv = v;
                            }
                        }
                        WatchEvent::Bookmark(b) => rv = b.metadata.resource_version,
                        WatchEvent::Error(_) => return,
                    }
                }
                restarts.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let writes_before = sim.store().current_rv();
    let events_before = events.load(Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(args.seconds);
    let started = Instant::now();
    let mut tasks = vec![];
    for c in 0..args.clients {
        let api: Api<Pod> = Api::namespaced(client_for(c)?, "default");
        let pods: Vec<String> = (0..args.pods)
            .filter(|p| p % args.clients == c)
            .map(|p| format!("load-{p}"))
            .collect();
        let interval = args
            .rate
            .map(|r| Duration::from_secs_f64(args.clients as f64 / r.max(1.0)));
        let offset = interval
            .unwrap_or_default()
            .mul_f64(c as f64 / args.clients as f64);
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0u64;
            let mut n = 0u64;
            // Spread the clients' schedules over one interval.
            let mut due = started + offset;
            while Instant::now() < deadline {
                for name in &pods {
                    n += 1;
                    let patch = json!({"status": {"conditions": [
                        {"type": "example.com/Load", "status": "True", "message": n.to_string()}
                    ]}});
                    let t = match interval {
                        Some(every) => {
                            tokio::time::sleep_until(due.into()).await;
                            let t = due;
                            due += every;
                            t
                        }
                        None => Instant::now(),
                    };
                    match api
                        .patch_status(name, &PatchParams::default(), &Patch::Strategic(patch))
                        .await
                    {
                        Ok(_) => lat.push(t.elapsed()),
                        Err(_) => errors += 1,
                    }
                    if Instant::now() >= deadline {
                        break;
                    }
                }
            }
            (lat, errors)
        }));
    }
    let mut all = vec![];
    let mut errors = 0;
    for t in tasks {
        let (lat, e) = t.await.context("client task")?;
        all.extend(lat);
        errors += e;
    }
    let elapsed = started.elapsed();
    let writes = sim.store().current_rv() - writes_before;
    let delivered_at_stop = events.load(Ordering::Relaxed) - events_before;
    // Let the watchers drain what is still in flight (bounded), and say how long it took.
    let expected = writes * args.watches as u64;
    let drain_start = Instant::now();
    while events.load(Ordering::Relaxed) - events_before < expected
        && drain_start.elapsed() < Duration::from_secs(60)
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let drain = drain_start.elapsed();
    let delivered = events.load(Ordering::Relaxed) - events_before;
    all.sort();
    let rate = all.len() as f64 / elapsed.as_secs_f64();
    println!(
        "kubesim-load: transport={} clients={} watches={} pods={} seconds={:.1} load={}",
        if args.in_process {
            "in-process"
        } else {
            "loopback-http"
        },
        args.clients,
        args.watches,
        args.pods,
        elapsed.as_secs_f64(),
        match args.rate {
            Some(r) => format!("open loop, {r:.0} patches/s offered"),
            None => "closed loop".into(),
        }
    );
    println!("  status patches ok:   {} ({errors} errors)", all.len());
    println!("  throughput:          {rate:.0} patches/s (store writes {writes})");
    println!(
        "  latency:             p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms",
        percentile(&all, 0.50).as_secs_f64() * 1e3,
        percentile(&all, 0.99).as_secs_f64() * 1e3,
        all.last().copied().unwrap_or_default().as_secs_f64() * 1e3
    );
    println!(
        "  watch events:        {delivered_at_stop} delivered while writing ({:.0} events/s); {delivered} of {expected} after draining for {:.2} s",
        delivered_at_stop as f64 / elapsed.as_secs_f64(),
        drain.as_secs_f64()
    );
    println!(
        "  watch restarts:      {}",
        restarts.load(Ordering::Relaxed)
    );
    for w in watchers {
        w.abort();
    }
    Ok(())
}
