//! Issue P9: the API going away under the operator. On the real control plane kube-apiserver
//! and etcd are killed with SIGKILL and restarted with their data (DESIGN §9); on kubesim, which
//! has no process to kill, every request fails with 503 and every watch ends for as long. The
//! operator must ride it out as Kubernetes' own controllers do: no second writer (the harness's
//! record, not the operator's), no failover the outage caused, no Lease of a healthy writer
//! left to lapse, no write by a replica that did not own the lock, and failovers work again at
//! once after each restart.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on setup failures

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::json;

mod common;
use common::{Env, Options, Write};

const SETS: usize = 4;
/// The Leases' duration: an outage of a few seconds (plus the restart) must not make a
/// healthy writer's Lease lapse, whatever the phase of its renewals (every 15 s).
const LEASE_SECONDS: i32 = 30;

/// The lock a write to something other than a lock is for: lock `l{i}` has Lease `lease{i}`
/// and pods `s{i}-*`.
fn lock_of(w: &Write) -> Option<String> {
    match w.resource.as_str() {
        "leases" => w.name.strip_prefix("lease").map(|i| format!("l{i}")),
        "pods" => w
            .name
            .strip_prefix('s')
            .and_then(|r| r.split_once('-'))
            .map(|(i, _)| format!("l{i}")),
        _ => None,
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
    let last_outage_ms = env.elapsed_ms();
    // Every Lease renewed after the last outage, by its writer.
    let lease_writes = |log: &[Write], i: usize| -> Vec<u64> {
        log.iter()
            .filter(|w| w.resource == "leases" && w.name == format!("lease{i}"))
            .map(|w| w.at_ms)
            .collect()
    };
    env.commits_until(
        (LEASE_SECONDS as u64) + 15,
        "every Lease written after the last outage",
        |log| {
            (0..SETS)
                .all(|i| lease_writes(log, i).iter().any(|t| *t > last_outage_ms))
                .then_some(())
        },
    )
    .await;
    for (i, writer) in &writers {
        env.wait_writer(&format!("s{i}"), writer).await;
        env.wait_lease_holder(&format!("lease{i}"), writer).await;
    }
    // No failover but the two the test caused: the untouched Leases never changed hands.
    for i in 2..SETS {
        let lease = env.leases().get(&format!("lease{i}")).await.unwrap();
        assert_eq!(
            lease.spec.unwrap().lease_transitions,
            Some(0),
            "lease{i} changed hands across the outages"
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
    let c = env.owner_check(lock_of).await;
    println!(
        "{} operator writes checked against the lock's owner at the time, {} by a non-owner, {} ambiguous; attempts by a non-owner: {} refused, {} of unknown outcome",
        c.checked,
        c.violations.len(),
        c.ambiguous,
        c.refused,
        c.unknown_outcome.len()
    );
    assert!(c.checked > 0, "no write checked: {c:?}");
    assert!(c.violations.is_empty(), "{:#?}", c.violations);
}
