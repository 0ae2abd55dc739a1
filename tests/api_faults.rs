//! Issue P9: API faults under the operator, on both backends (DESIGN §9).
//!
//! - Outages: on the real control plane kube-apiserver and etcd are killed with SIGKILL and
//!   restarted with their data; on kubesim, which has no process to kill, every request fails
//!   with 503 and every watch ends for as long.
//! - P5's faults from one fault layer: kubesim's own, or on the real control plane kubesim as a
//!   fault-injecting proxy in front of the apiserver (`kubesim::proxy`): lost and held
//!   answers of committed writes, stalled watches, error storms.
//!
//! The operator must ride them out: no second writer (the harness's record, not the
//! operator's), no failover a fault caused, no Lease of a healthy writer left to lapse, no
//! write by a replica that did not own the lock, and failovers work under each fault or right
//! after it.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on setup failures

use std::collections::BTreeMap;
use std::time::Duration;

use kubesim::{HoldResponse, LoseResponse, WatchFault};
use serde_json::json;
use stslock::api::SHARD_LABEL;

mod common;
use common::report::Fault;
use common::{Env, Options, Write, assert_only_owners_wrote};

const SETS: usize = 4;
/// The Leases' duration: an outage of a few seconds (plus the restart) must not make a
/// healthy writer's Lease lapse, whatever the phase of its renewals (every 15 s).
const LEASE_SECONDS: i32 = 30;

/// `SETS` StatefulSets `s{i}` of two pods with locks `l{i}` (Leases `lease{i}`), each
/// writer elected.
async fn elected(env: &Env) {
    for i in 0..SETS {
        env.statefulset(&format!("s{i}"), 2).await;
        env.lock(
            &format!("l{i}"),
            &format!("s{i}"),
            &format!("lease{i}"),
            LEASE_SECONDS,
            json!({}),
        )
        .await;
    }
    for i in 0..SETS {
        env.wait_writer(&format!("s{i}"), &format!("s{i}-0")).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_apiserver_and_etcd_crash_and_restart_under_three_replicas() {
    let mut env = Env::start_with(Options {
        replicas: 3,
        record_owners: true,
        ..Options::default()
    })
    .await;
    elected(&env).await;
    let mut writers: BTreeMap<usize, String> = (0..SETS).map(|i| (i, format!("s{i}-0"))).collect();

    // Each outage, then a failover right after it: s0 after the apiserver's, s1 after etcd's.
    for (component, failing) in [("kube-apiserver", 0), ("etcd", 1)] {
        let back = env.api_outage(component, Duration::from_secs(3)).await;
        println!(
            "{component}: down 3 s, serving again {} ms after its restart ({:?} backend)",
            back.as_millis(),
            env.backend()
        );
        let old = writers[&failing].clone();
        env.set_ready(&old, false).await;
        let new = format!("s{failing}-1");
        env.wait_writer(&format!("s{failing}"), &new).await;
        writers.insert(failing, new);
    }
    settled(&mut env, &writers, &[1, 1, 0, 0]).await;
}

/// After the faults: every Lease renewed by its writer after them, each Lease changed hands
/// exactly as often as the test made its writer fail (`transitions[i]`: no failover a fault
/// caused, none repeated), no Lease went a whole duration without a write, never two
/// writers, and (operators stopped) no write by a replica that did not own the lock.
async fn settled(env: &mut Env, writers: &BTreeMap<usize, String>, transitions: &[i32; SETS]) {
    let last_fault_ms = env.elapsed_ms();
    let lease_writes = |log: &[Write], i: usize| -> Vec<u64> {
        log.iter()
            .filter(|w| w.resource == "leases" && w.name == format!("lease{i}"))
            .map(|w| w.at_ms)
            .collect()
    };
    // Renewals are due every half duration: each Lease is written within that after the
    // faults (as the API server says; the audit log is checked below).
    let leases = env.leases();
    let since = jiff::Timestamp::now();
    env.until(
        (LEASE_SECONDS as u64) / 2 + 10,
        "every Lease renewed after the last fault",
        move || {
            let leases = leases.clone();
            Box::pin(async move {
                let mut all = true;
                for i in 0..SETS {
                    let l = leases.get(&format!("lease{i}")).await.ok()?;
                    let renewed = l.spec.and_then(|s| s.renew_time).map(|t| t.0);
                    all &= renewed.is_some_and(|t| t > since);
                }
                all.then_some(())
            })
        },
    )
    .await;
    env.commits_until(
        15,
        "every Lease's renewal after the last fault in the audit log",
        |log| {
            (0..SETS)
                .all(|i| lease_writes(log, i).iter().any(|t| *t > last_fault_ms))
                .then_some(())
        },
    )
    .await;
    for (i, writer) in writers {
        env.wait_writer(&format!("s{i}"), writer).await;
        env.wait_lease_holder(&format!("lease{i}"), writer).await;
    }
    for (i, want) in transitions.iter().enumerate() {
        let lease = env.leases().get(&format!("lease{i}")).await.unwrap();
        assert_eq!(
            lease.spec.unwrap().lease_transitions,
            Some(*want),
            "lease{i} changed hands other than as its writer failed"
        );
    }
    // No Lease went a whole duration without a write (it would have lapsed meanwhile).
    let log = env.commit_log();
    for i in 0..SETS {
        let writes = lease_writes(&log, i);
        let gap = writes.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0);
        println!("lease{i}: {} writes, longest gap {gap} ms", writes.len());
        assert!(
            gap < LEASE_SECONDS as u64 * 1000,
            "lease{i} went {gap} ms without a write"
        );
    }
    env.assert_never_two_writers().await;
    env.stop_operators().await;
    assert_only_owners_wrote(env, "after the faults", 0).await;
}

/// P5's faults through one fault layer on both backends, each while a writer fails over:
/// every Lease write's answer lost (committed, the client hangs until its timeout); every
/// replica's pod watch stalled half-open (the failover is seen only when it is lifted); a 503
/// storm on half the requests; every pod write's answer held 1.5 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_and_held_answers_stalled_watches_and_error_storms_on_both_backends() {
    let mut env = Env::start_with(Options {
        replicas: 3,
        record_owners: true,
        fault_proxy: true,
        ..Options::default()
    })
    .await;
    elected(&env).await;
    let mut writers: BTreeMap<usize, String> = (0..SETS).map(|i| (i, format!("s{i}-0"))).collect();
    let mut fail_over = async |env: &Env, i: usize, hold: Duration| {
        let old = writers[&i].clone();
        env.set_ready(&old, false).await;
        tokio::time::sleep(hold).await;
        env.faults().set(Default::default());
        let new = format!("s{i}-1");
        env.wait_writer(&format!("s{i}"), &new).await;
        writers.insert(i, new);
    };
    let operators = || vec!["stslock/".to_string()];
    env.faults().update(|c| {
        c.lose_responses = vec![LoseResponse::hang().resource("leases").agent("stslock/")];
    });
    fail_over(&env, 0, Duration::from_secs(4)).await;
    env.faults().update(|c| {
        c.watch_faults = vec![WatchFault::stall("pods").agent("stslock/")];
    });
    fail_over(&env, 1, Duration::from_secs(3)).await;
    env.faults().update(|c| {
        c.error_rate = 0.5;
        c.error_code = 503;
        c.agents = operators();
    });
    fail_over(&env, 2, Duration::from_secs(4)).await;
    env.faults().update(|c| {
        c.hold_responses = vec![HoldResponse {
            delay_ms: 1500,
            agents: operators(),
            resources: vec!["pods".into()],
            ..HoldResponse::default()
        }];
    });
    fail_over(&env, 3, Duration::from_secs(4)).await;
    settled(&mut env, &writers, &[1, 1, 1, 1]).await;
}

/// Count a fault of the chaos run that lasts `back` from now and record it for the report.
fn timed_fault(
    env: &Env,
    counts: &mut BTreeMap<&'static str, u32>,
    faults: &mut Vec<Fault>,
    kind: &'static str,
    back: Duration,
    detail: String,
) {
    *counts.entry(kind).or_default() += 1;
    let start_ms = env.elapsed_ms();
    faults.push(Fault {
        start_ms,
        end_ms: start_ms + back.as_millis() as u64,
        kind,
        detail,
    });
}

/// The kubesim soak's mix, shorter, on both backends (on the real control plane through the
/// fault proxy, with kube-apiserver and etcd crashes): for `STSLOCK_CHAOS_SECONDS` (default
/// 45) one random fault after another — error storms (500/503/429), latency, lost and held
/// answers, stalled and lagging watches, a partitioned replica, dropped watches, a compaction
/// (every watch resumed from before it gets 410 Gone and re-lists), a replica killed (or
/// stopped gracefully) and restarted with the same id, an API outage — while writers fail and
/// recover,
/// nodes are lost (the pods of one ordinal in every set NotReady at once) and StatefulSets
/// are scaled down to one pod and back (the writer's pod deleted when it is the last one).
/// Then every lock converges, and the record says: never two writers, no write by a replica
/// that did not own the lock, no Lease of a Ready writer lapsed ([`ready_writer_lapses`]).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_faults_restarts_and_writer_failures_on_both_backends() {
    use rand::{Rng, SeedableRng};
    let seconds: u64 = std::env::var("STSLOCK_CHAOS_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(45);
    let seed: u64 = std::env::var("STSLOCK_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20261204);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut env = Env::start_with(Options {
        replicas: 3,
        record_owners: true,
        fault_proxy: true,
        ..Options::default()
    })
    .await;
    elected(&env).await;
    let ids = env.operator_ids();
    let operators = || vec!["stslock/".to_string()];
    let resources = ["leases", "pods", "statefulsetlocks"];
    let deadline = std::time::Instant::now() + Duration::from_secs(seconds);
    // Pods made NotReady (writer failures, node losses), and when each recovers.
    let mut failed: Vec<(String, std::time::Instant)> = vec![];
    // StatefulSets scaled down to one pod (`s{i}-1` deleted), and when each is scaled back.
    let mut scaled: Vec<(usize, std::time::Instant)> = vec![];
    // A pod a scale-down deleted (or is deleting) is not failed nor recovered.
    let scaled_away = |scaled: &[(usize, std::time::Instant)], pod: &str| {
        scaled.iter().any(|(i, _)| pod == format!("s{i}-1"))
    };
    let mut counts: BTreeMap<&str, u32> = BTreeMap::new();
    // For the report: what was injected when, and this process's memory.
    let from_ms = env.elapsed_ms();
    let mut faults: Vec<Fault> = vec![];
    let mut rss: Vec<(u64, u64)> = vec![];
    while std::time::Instant::now() < deadline {
        rss.extend(kubesim::html::rss_kib("self").map(|k| (env.elapsed_ms(), k)));
        // Recoveries due, then a new writer failure now and then.
        let now = std::time::Instant::now();
        for (pod, _) in failed.iter().filter(|(_, at)| *at <= now) {
            env.set_ready(pod, true).await;
        }
        failed.retain(|(_, at)| *at > now);
        for (i, _) in scaled.iter().filter(|(_, at)| *at <= now) {
            scale(&env, *i, 2).await;
        }
        scaled.retain(|(_, at)| *at > now);
        if rng.random_bool(0.6) {
            let i = rng.random_range(0..SETS);
            let roles = env.roles(&format!("s{i}")).await;
            if let Some((writer, _)) = roles
                .iter()
                .find(|(_, r)| r.as_deref() == Some("writer"))
                .filter(|(p, _)| failed.iter().all(|(f, _)| f != p))
                .filter(|(p, _)| !scaled_away(&scaled, p))
            {
                env.set_ready(writer, false).await;
                let back = Duration::from_millis(rng.random_range(1000..6000));
                failed.push((writer.clone(), std::time::Instant::now() + back));
                let detail = format!("{writer} NotReady for {back:?}");
                timed_fault(
                    &env,
                    &mut counts,
                    &mut faults,
                    "writer failure",
                    back,
                    detail,
                );
            }
        }
        if rng.random_bool(0.15) {
            // A node lost: it hosted the pods of one ordinal of every set.
            let k = rng.random_range(0..2);
            let back = Duration::from_millis(rng.random_range(2000..8000));
            let mut lost = vec![];
            for i in 0..SETS {
                let pod = format!("s{i}-{k}");
                // Only pods that are there: one scaled back may not be re-created yet (on a
                // real cluster not before its predecessor is Ready).
                let there = env
                    .roles(&format!("s{i}"))
                    .await
                    .iter()
                    .any(|(p, _)| *p == pod);
                if !there || failed.iter().any(|(f, _)| *f == pod) || scaled_away(&scaled, &pod) {
                    continue;
                }
                env.set_ready(&pod, false).await;
                failed.push((pod.clone(), std::time::Instant::now() + back));
                lost.push(pod);
            }
            let detail = format!("{lost:?} NotReady for {back:?}");
            timed_fault(&env, &mut counts, &mut faults, "node loss", back, detail);
        }
        // A scale-down to one pod and back: `s{i}-1` is deleted, the writer or not (a set
        // already scaled down, or whose `s{i}-1` is failed, is not picked).
        let scalable: Vec<usize> = (0..SETS)
            .filter(|i| !scaled.iter().any(|(s, _)| s == i))
            .filter(|i| failed.iter().all(|(f, _)| *f != format!("s{i}-1")))
            .collect();
        if !scalable.is_empty() && rng.random_bool(0.2) {
            let i = scalable[rng.random_range(0..scalable.len())];
            let last = format!("s{i}-1");
            let back = Duration::from_millis(rng.random_range(2000..8000));
            let writer = env
                .roles(&format!("s{i}"))
                .await
                .into_iter()
                .any(|(p, r)| p == last && r.as_deref() == Some("writer"));
            scale(&env, i, 1).await;
            scaled.push((i, std::time::Instant::now() + back));
            let detail = format!(
                "s{i} to 1 pod for {back:?} ({last} {})",
                if writer { "the writer" } else { "a reader" }
            );
            timed_fault(&env, &mut counts, &mut faults, "scale event", back, detail);
        }
        let hold = Duration::from_millis(rng.random_range(500..3000));
        let resource = resources[rng.random_range(0..resources.len())];
        let kind = rng.random_range(0..12);
        let start_ms = env.elapsed_ms();
        let name = match kind {
            0 => {
                let code = [500, 503, 429][rng.random_range(0..3)];
                let rate = rng.random_range(0.1..0.5);
                env.faults().update(|c| {
                    c.error_rate = rate;
                    c.error_code = code;
                    c.agents = operators();
                });
                "error storm"
            }
            1 => {
                let ms = rng.random_range(50..600);
                env.faults().update(|c| {
                    c.latency_ms = ms;
                    c.latency_jitter_ms = ms;
                    c.agents = operators();
                });
                "latency"
            }
            2 => {
                let lost = [
                    LoseResponse::hang(),
                    LoseResponse::server_timeout(),
                    LoseResponse::timeout(),
                ][rng.random_range(0..3)]
                .clone();
                let p = rng.random_range(0.2..0.6);
                env.faults().update(|c| {
                    c.lose_responses = vec![LoseResponse {
                        probability: p,
                        ..lost.resource(resource).agent("stslock/")
                    }];
                });
                "lost answers"
            }
            3 => {
                let ms = rng.random_range(200..1500);
                env.faults().update(|c| {
                    c.hold_responses =
                        vec![HoldResponse::new(ms).resource(resource).agent("stslock/")];
                });
                "held answers"
            }
            4 => {
                let id = &ids[rng.random_range(0..ids.len())];
                let stall = WatchFault::stall(resource).agent(&format!("stslock/{id}"));
                env.faults().update(|c| c.watch_faults = vec![stall]);
                "stalled watch"
            }
            5 => {
                let lag = WatchFault::lag(resource, rng.random_range(200..2000));
                env.faults().update(|c| c.watch_faults = vec![lag]);
                "lagging watches"
            }
            6 => {
                let id = &ids[rng.random_range(0..ids.len())];
                let agent = format!("stslock/{id}");
                env.faults().update(|c| c.partitioned = vec![agent]);
                "partitioned replica"
            }
            7 => {
                env.faults().drop_watches();
                "dropped watches"
            }
            11 => {
                env.compact();
                "compaction"
            }
            8 => {
                // Killed (no handoff: its locks wait for it, or for its membership to
                // expire), or stopped as SIGTERM would (it hands its locks off and leaves),
                // then started again with the same id.
                let id = ids[rng.random_range(0..ids.len())].clone();
                let graceful = rng.random_bool(0.3);
                if graceful {
                    env.stop_operator(&id).await;
                } else {
                    env.kill_operator(&id).await;
                }
                tokio::time::sleep(hold).await;
                let args = env.operator_args(&id);
                env.start_operator_with(&id, args).await;
                if graceful {
                    "replica stopped and restarted"
                } else {
                    "replica killed and restarted"
                }
            }
            9 => {
                env.api_outage("kube-apiserver", hold).await;
                "kube-apiserver crash"
            }
            _ => {
                env.api_outage("etcd", hold).await;
                "etcd crash"
            }
        };
        *counts.entry(name).or_default() += 1;
        if kind <= 6 {
            tokio::time::sleep(hold).await;
            env.faults().set(Default::default());
        }
        faults.push(Fault {
            start_ms,
            end_ms: env.elapsed_ms(),
            kind: name,
            detail: match kind {
                0..=6 => format!("{resource}, {hold:?}"),
                7 | 11 => "every watch".to_string(),
                _ => format!("{hold:?}"),
            },
        });
    }
    let lift_ms = env.elapsed_ms();
    for (pod, _) in &failed {
        env.set_ready(pod, true).await;
    }
    for (i, _) in &scaled {
        scale(&env, *i, 2).await;
    }
    println!(
        "chaos ({:?} backend, seed {seed}, {seconds} s): {counts:?}",
        env.backend()
    );
    // Converged: each StatefulSet has exactly one writer, Ready, holding the Lease.
    for i in 0..SETS {
        let set = format!("s{i}");
        let roles = env.roles(&set).await;
        let writer = env
            .until(30, &format!("{set} to have a Ready writer"), {
                let pods = env.pods();
                let set = set.clone();
                move || {
                    let (pods, set) = (pods.clone(), set.clone());
                    Box::pin(async move {
                        let l = pods
                            .list(&kube::api::ListParams::default().labels(&format!("app={set}")))
                            .await
                            .ok()?;
                        let writers: Vec<_> = l
                            .items
                            .iter()
                            .filter(|p| {
                                p.metadata
                                    .labels
                                    .as_ref()
                                    .and_then(|l| l.get("sts-role"))
                                    .map(String::as_str)
                                    == Some("writer")
                            })
                            .collect();
                        (writers.len() == 1 && common::pod_ready(writers[0]))
                            .then(|| writers[0].metadata.name.clone().unwrap_or_default())
                    })
                }
            })
            .await;
        println!("{set}: writer {writer} (roles {roles:?})");
        env.wait_lease_holder(&format!("lease{i}"), &writer).await;
    }
    let report = env.report().await;
    // Lease lapses of a Ready writer, from the write log (kubesim's commits, or the audit
    // log) and the harness's record of the pods: see `ready_writer_lapses`.
    let to_ms = env.elapsed_ms();
    let log = env.commit_log();
    let mut lapses = vec![];
    for i in 0..SETS {
        let set = report.statefulsets.get(&format!("{}/s{i}", env.ns));
        let writerless = set.map_or(&[][..], |s| &s.no_ready_writer[..]);
        let lease = format!("lease{i}");
        let writes: Vec<u64> = log
            .iter()
            .filter(|w| w.resource == "leases" && w.name == lease)
            .map(|w| w.at_ms)
            .collect();
        let gap = writes.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0);
        println!("{lease}: {} writes, longest gap {gap} ms", writes.len());
        let dur_ms = LEASE_SECONDS as u64 * 1000;
        for (s, e) in ready_writer_lapses(&writes, writerless, dur_ms, to_ms) {
            lapses.push(format!(
                "{lease} expired with s{i} having a Ready writer from {s} ms to {e} ms; faults meanwhile: {:?}",
                faults
                    .iter()
                    .filter(|f| f.end_ms + dur_ms / 2 >= s && f.start_ms <= e)
                    .map(|f| format!("{} {}..{} ms: {}", f.kind, f.start_ms, f.end_ms, f.detail))
                    .collect::<Vec<_>>()
            ));
        }
    }
    env.stop_operators().await;
    let owners = env.owner_check(common::lock_of).await;
    // The report, whatever the verdict: into $STSLOCK_REPORT_DIR, else the target's tmp dir.
    let dir = std::env::var_os("STSLOCK_REPORT_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("reports"));
    std::fs::create_dir_all(&dir).unwrap();
    let page = dir.join(format!("chaos-{:?}.html", env.backend()).to_lowercase());
    let mut violations = vec![];
    if report.dual_writer_intervals > 0 {
        violations.push(format!(
            "{} dual-writer intervals ({} ms)",
            report.dual_writer_intervals, report.dual_writer_ms
        ));
    }
    violations.extend(owners.violations.iter().cloned());
    violations.extend(lapses.iter().cloned());
    let (judged, api) = match env.backend() {
        common::Backend::Real => (
            "Judged from the harness's pod and lock watches and the apiserver's audit log (lock writes with their committed bodies).",
            "kube-apiserver 1.34 and etcd (killed and restarted)",
        ),
        common::Backend::Kubesim => ("Judged from what kubesim committed.", "kubesim"),
    };
    let writes = env.writes();
    let html = common::report::page(&common::report::ChaosRun {
        title: format!("chaos on {api}: 3 replicas, {SETS} locks, seed {seed}, {seconds} s"),
        judged: judged.into(),
        from_ms,
        lift_ms,
        to_ms: env.elapsed_ms(),
        report: &report,
        writes: &writes,
        faults: &faults,
        rss: &rss,
        lease_seconds: LEASE_SECONDS as u64,
        summary: vec![
            ("backend".into(), api.into()),
            (
                "fault period".into(),
                format!("{:.1} s, seed {seed}", (lift_ms - from_ms) as f64 / 1000.0),
            ),
            ("faults by kind".into(), format!("{counts:?}")),
            (
                "dual-writer intervals".into(),
                format!(
                    "{} ({} ms)",
                    report.dual_writer_intervals, report.dual_writer_ms
                ),
            ),
            (
                "writes for a lock by a non-owner".into(),
                format!(
                    "{} of {} checked ({} exactly from the committed lock)",
                    owners.violations.len(),
                    owners.checked,
                    owners.exact
                ),
            ),
            (
                "Lease lapses of a Ready writer".into(),
                format!(
                    "{} (Leases of {LEASE_SECONDS} s, renewed every half)",
                    lapses.len()
                ),
            ),
            (
                "converged after the faults".into(),
                format!("{SETS}/{SETS}: one Ready writer holding its Lease"),
            ),
        ],
        violations,
    });
    std::fs::write(&page, &html).unwrap();
    println!("report: {}", page.display());
    // Chromium renders it: every figure's marker is in the screenshot.
    let figures = kubesim::html::markers(&html);
    assert_eq!(figures.len(), 8, "{figures:?}");
    let pixels = kubesim::html::screenshot(&page, &page.with_extension("png"), (1060, 4200))
        .unwrap_or_else(|e| panic!("{e}"));
    for (id, colour) in &figures {
        let seen = pixels.iter().filter(|p| *p == colour).count();
        assert!(seen >= 100, "figure {id}: its marker covers {seen} pixels");
    }
    assert_eq!(report.dual_writer_intervals, 0, "{:?}", report.statefulsets);
    assert!(
        lapses.is_empty(),
        "Lease lapses of a Ready writer: {lapses:#?}"
    );
    assert_only_owners_wrote(&env, "after the chaos", 0).await;
}

/// Scales StatefulSet `s{i}` to `replicas` pods (the harness's client: no fault applies).
async fn scale(env: &Env, i: usize, replicas: i32) {
    use kube::api::{Patch, PatchParams};
    let patch = json!({"spec": {"replicas": replicas}});
    common::call(
        "scale statefulset",
        env.api::<k8s_openapi::api::apps::v1::StatefulSet>().patch(
            &format!("s{i}"),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        ),
    )
    .await
    .unwrap_or_else(|e| panic!("scaling s{i} to {replicas}: {e}"));
}

/// The stretches (from, to; milliseconds of the write log) in which a Lease had expired while
/// its StatefulSet had a Ready writer: after each committed write of the Lease, from the
/// write plus the Lease's duration to its next committed write (or `to_ms`), less the
/// intervals in which the set had no Ready writer (`writerless`, the harness's record).
/// A write commits no earlier than the renewTime it carries, so the real expiry is no later
/// than this one: a lapse is never missed by the write's own latency, and is counted only
/// when the Lease had surely expired. The operator keeps renewing a holder that is not Ready
/// when no other pod is, so only a holder that is gone (scaled away) leaves its Lease
/// unrenewed, and then the set has no Ready writer until a new one is elected.
fn ready_writer_lapses(
    writes: &[u64],
    writerless: &[kubesim::recorder::Interval],
    dur_ms: u64,
    to_ms: u64,
) -> Vec<(u64, u64)> {
    let mut out = vec![];
    let ends = writes.iter().skip(1).copied().chain(std::iter::once(to_ms));
    for (w, next) in writes.iter().zip(ends) {
        let mut from = w + dur_ms;
        if from >= next {
            continue;
        }
        let mut gaps: Vec<(u64, u64)> = writerless
            .iter()
            .map(|g| (g.start_ms, g.end_ms.unwrap_or(to_ms)))
            .filter(|(s, e)| *e > from && *s < next)
            .collect();
        gaps.sort_unstable();
        for (s, e) in gaps {
            if s > from {
                out.push((from, s));
            }
            from = from.max(e);
        }
        if from < next {
            out.push((from, next));
        }
    }
    out
}

#[test]
fn a_lapse_is_an_expired_lease_while_the_set_had_a_ready_writer() {
    use kubesim::recorder::Interval;
    let gap = |start_ms, end_ms| Interval { start_ms, end_ms };
    // Renewed in time: nothing.
    assert!(ready_writer_lapses(&[0, 10, 20], &[], 15, 30).is_empty());
    // Expired at 15, written again at 40: lapsed from 15 to 40 but for the writer-less 20..30.
    assert_eq!(
        ready_writer_lapses(&[0, 40], &[gap(20, Some(30))], 15, 50),
        vec![(15, 20), (30, 40)]
    );
    // Writer-less over the whole expired stretch (the holder gone, no one Ready): no lapse.
    assert!(ready_writer_lapses(&[0, 40], &[gap(10, Some(45))], 15, 50).is_empty());
    // The last write expired before the end and the set still had no Ready writer at the
    // end; an open writer-less interval runs to the end.
    assert!(ready_writer_lapses(&[0], &[gap(12, None)], 15, 50).is_empty());
    assert_eq!(ready_writer_lapses(&[0], &[], 15, 50), vec![(15, 50)]);
}

/// The owner check has teeth on both backends: writes for a lock by a replica that does not
/// own it are reported — one to the lock (exact: kubesim's commit log, or the committed lock
/// the real apiserver's audit log keeps) and one to its Lease (on a real cluster bounded by
/// timestamps against the harness's lock watch) — while the owner's own writes are not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_owner_check_reports_writes_by_a_replica_that_does_not_own_the_lock() {
    use kube::api::{Patch, PatchParams};
    let mut env = Env::start_with(Options {
        replicas: 1,
        record_owners: true,
        ..Options::default()
    })
    .await;
    env.statefulset("s0", 2).await;
    env.lock("l0", "s0", "lease0", LEASE_SECONDS, json!({}))
        .await;
    env.wait_writer("s0", "s0-0").await;
    env.stop_operators().await;
    let intruder = env.operator_client("intruder").await;
    let pp = PatchParams::default();
    let mark = Patch::Merge(json!({"metadata": {"annotations": {"stslock.test/intruder": "1"}}}));
    kube::Api::<stslock::api::StatefulSetLock>::namespaced(intruder.clone(), &env.ns)
        .patch("l0", &pp, &mark)
        .await
        .unwrap();
    kube::Api::<k8s_openapi::api::coordination::v1::Lease>::namespaced(intruder, &env.ns)
        .patch("lease0", &pp, &mark)
        .await
        .unwrap();
    let c = env.owner_check(common::lock_of).await;
    println!("{:?} backend: {c:#?}", env.backend());
    assert_eq!(c.violations.len(), 2, "{c:#?}");
    assert!(
        c.violations.iter().all(|v| v.starts_with("intruder wrote")),
        "{c:#?}"
    );
    assert!(
        c.violations.iter().any(|v| v.contains("statefulsetlocks"))
            && c.violations.iter().any(|v| v.contains("leases")),
        "{c:#?}"
    );
    // The owner's writes (finalizer, Lease, labels, status) were checked and passed.
    assert!(c.checked > 2, "{c:#?}");
    assert!(c.exact >= 1, "{c:#?}");
}

/// Lock `ns/l2`'s history as the harness's watch saw it: test-2 from rv 10 (seen at 1 ms),
/// then `second` from rv 50 (seen at 9 ms), delivered by a re-list's jump when `after_gap`.
fn l2_owners(second: &str, after_gap: bool) -> common::Owners {
    let mut o = common::Owners::default();
    let version = |rv, owner: &str, seen_us, after_gap| common::OwnerVersion {
        rv,
        owner: Some(owner.into()),
        seen_us,
        after_gap,
    };
    o.locks.insert(
        ("ns".to_string(), "l2".to_string()),
        vec![
            version(10, "test-2", 1_000, false),
            version(50, second, 9_000, after_gap),
        ],
    );
    o
}

/// A write of `actor` for lock `ns/l2` (its Lease `lease2`, or the lock's status) that arrived at
/// `received_us` and was answered 200 `elapsed_us` later.
fn l2_write(actor: &str, lease: bool, received_us: i64, elapsed_us: i64) -> Write {
    let (group, resource, subresource, name) = if lease {
        ("coordination.k8s.io", "leases", "", "lease2")
    } else {
        ("app.anukkrit.me", "statefulsetlocks", "status", "l2")
    };
    Write {
        actor: format!("stslock/{actor}"),
        verb: "patch".into(),
        group: group.into(),
        resource: resource.into(),
        subresource: subresource.into(),
        namespace: "ns".into(),
        name: name.into(),
        code: 200,
        received_us,
        completed_us: received_us + elapsed_us,
        ..Write::default()
    }
}

fn l2_lock_of(w: &Write) -> Option<String> {
    (w.name == "lease2").then(|| "l2".to_string())
}

/// Writes the audit log keeps the answers of (the operator's pod and Lease writes) carry their
/// etcd revision, one order with the lock's versions: where the watch missed no version
/// between, the lock's owner at the commit is known exactly, and a write by another replica
/// is a proven violation even where timestamps cannot order it. Across a re-list's jump the
/// check falls back to the timestamps.
#[test]
fn owner_check_orders_writes_by_revision_where_the_lock_history_is_complete() {
    let at_revision = |actor: &str, received_us: i64, rv: u64| Write {
        committed_rv: Some(rv),
        ..l2_write(actor, true, received_us, 200)
    };
    let writes = vec![
        l2_write("test-2", false, 500, 100),
        at_revision("test-2", 2_000, 20),
        // Before the handoff's commit by revision; by timestamps it may be after it.
        at_revision("test-0", 5_000, 40),
        at_revision("test-0", 9_500, 60),
        l2_write("test-2", false, 8_000, 100),
    ];
    let complete = common::timed_owner_check(&writes, &l2_owners("test-0", false), l2_lock_of);
    assert_eq!(complete.violations.len(), 1, "{complete:?}");
    assert!(
        complete.violations[0].contains("resourceVersion 40"),
        "{complete:?}"
    );
    assert_eq!(complete.exact, 3, "{complete:?}");
    // The watch jumped from 10 to 50: 20 and 40 may follow a version it missed.
    let gap = common::timed_owner_check(&writes, &l2_owners("test-0", true), l2_lock_of);
    assert!(gap.violations.is_empty(), "{gap:?}");
    assert_eq!(gap.exact, 1, "only the write at 60: {gap:?}");
    assert!(gap.ambiguous >= 1, "{gap:?}");
    // A lock the watch never saw: the audit log's answer to a lock write (rv 10, test-2) alone
    // does not order the write at 20 (a version between may be one the log lost).
    let answered = Write {
        labels_known: true,
        labels: BTreeMap::from([(SHARD_LABEL.to_string(), "test-2".to_string())]),
        committed_rv: Some(10),
        ..l2_write("test-2", false, 500, 100)
    };
    let unwatched = common::timed_owner_check(
        &[answered, at_revision("test-2", 2_000, 20)],
        &common::Owners::default(),
        l2_lock_of,
    );
    assert_eq!(unwatched.exact, 0, "{unwatched:?}");
}

/// The real cluster's owner check rests on the harness's lock watch. When that watch re-lists,
/// it jumps over the versions committed meanwhile and the owners they named: a write by a
/// replica that owned the lock only inside such a gap is not a proven violation (as it was
/// taken for one before, once, in the real chaos test), while the same write with the watch's
/// history complete still is.
#[test]
fn owner_check_counts_a_write_inside_a_relist_gap_as_ambiguous() {
    let writes = vec![
        l2_write("test-2", false, 500, 100),
        l2_write("test-2", false, 8_000, 100),
        l2_write("test-0", true, 5_000, 200),
    ];
    let complete = common::timed_owner_check(&writes, &l2_owners("test-2", false), l2_lock_of);
    assert_eq!(complete.violations.len(), 1, "{complete:?}");
    let gap = common::timed_owner_check(&writes, &l2_owners("test-2", true), l2_lock_of);
    assert!(gap.violations.is_empty(), "{gap:?}");
    assert_eq!(gap.ambiguous, 1, "{gap:?}");
}
