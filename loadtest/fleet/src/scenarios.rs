//! The scenarios other than `faults` (see `faults.rs`): chaos, noisy, capacity, rolling.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rand::Rng;
use stslock::config::LeaveStrategy;

use crate::Args;
use crate::driver::*;

pub(crate) async fn chaos(args: &Args) -> anyhow::Result<()> {
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

pub(crate) async fn noisy(args: &Args) -> anyhow::Result<()> {
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

pub(crate) async fn capacity(args: &Args) -> anyhow::Result<()> {
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
                // Renewal lateness p99 within 1 s (a tenth of the Lease for shorter ones).
                && p99 <= (u64::try_from(args.lease_seconds).unwrap_or(0) * 100).min(1000);
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
            "capacity: {r1} replica(s) {c1} locks, {rn} replicas {cn} locks: {:.2}× (target ≥ 3.8× for 1 → 4)",
            *cn as f64 / (*c1).max(1) as f64
        );
    }
    Ok(())
}

pub(crate) async fn rolling(args: &Args) -> anyhow::Result<()> {
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
