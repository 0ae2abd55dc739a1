//! `decide` (the pure election core) on the decisions a replica makes most: the steady state of
//! a healthy lock (a renewal or nothing), a failover, and a first election — for StatefulSets of
//! 3 and 50 pods, with 200 rival locks in the namespace.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use jiff::Timestamp;
use std::hint::black_box;
use stslock::api::StatefulSetLockStatus;
use stslock::elect::{Candidate, Config, LeaseView, Observed, OnDelete, Rival, Role, decide};

fn ts(s: i64) -> Timestamp {
    Timestamp::from_second(1_800_000_000 + s).unwrap()
}

fn pod(i: u32, ready: bool, role: Option<Role>, epoch: Option<i64>) -> Candidate {
    Candidate {
        name: format!("db-{i}"),
        uid: format!("uid-{i}"),
        ordinal: Some(i),
        ready,
        ready_since: Some(ts(0)),
        terminating: false,
        role,
        epoch,
    }
}

/// A lock of `pods` pods whose writer db-0 holds the Lease at epoch 3, renewed at `renewed`.
fn observed(pods: u32, writer_ready: bool, renewed: i64) -> Observed {
    let mut ps: Vec<Candidate> = (1..pods)
        .map(|i| pod(i, true, Some(Role::Reader), None))
        .collect();
    ps.insert(0, pod(0, writer_ready, Some(Role::Writer), Some(3)));
    let status = StatefulSetLockStatus {
        writer_pod: Some("db-0".into()),
        writer_uid: Some("uid-0".into()),
        writer_epoch: Some(3),
        highest_epoch: Some(3),
        highest_epoch_uid: Some("uid-0".into()),
        ..StatefulSetLockStatus::default()
    };
    Observed {
        namespace: "tenant-1".into(),
        name: "db".into(),
        created: ts(0),
        generation: 1,
        deleting: false,
        has_finalizer: true,
        go_finalizer: false,
        statefulset_name: "db".into(),
        lease_name: "db-lease".into(),
        lease_duration_seconds: 30,
        paused: false,
        failover_delay_seconds: 0,
        preferred_writer: None,
        replicas: Some(pods as i32),
        pods: ps,
        lease: Some(LeaseView {
            holder: Some("db-0".into()),
            holder_uid: Some("uid-0".into()),
            transitions: 3,
            renew_time: Some(ts(renewed)),
            acquire_time: Some(ts(0)),
            duration_seconds: 30,
            resource_version: "42".into(),
            owner: Some("tenant-1/db".into()),
            unmarked: false,
            renewed_mark: Some(ts(renewed)),
        }),
        rivals: (0..200)
            .map(|i| Rival {
                name: format!("other-{i}"),
                created: ts(i),
                statefulset: format!("other-{i}"),
                lease_name: format!("other-{i}-lease"),
            })
            .collect(),
        status,
    }
}

fn bench(c: &mut Criterion) {
    let cfg = Config {
        on_delete: OnDelete::KeepWriter,
        identity: "stslock-0".into(),
        max_locks_per_namespace: None,
    };
    let now = ts(100);
    let mut g = c.benchmark_group("decide");
    for pods in [3u32, 50] {
        let steady = observed(pods, true, 95);
        let due = observed(pods, true, 80);
        let failover = observed(pods, false, 95);
        let mut first = observed(pods, true, 95);
        first.lease = None;
        first.status = StatefulSetLockStatus::default();
        for p in &mut first.pods {
            p.role = None;
            p.epoch = None;
        }
        for (name, o) in [
            ("steady", &steady),
            ("renewal_due", &due),
            ("failover", &failover),
            ("first_election", &first),
        ] {
            g.bench_with_input(BenchmarkId::new(name, pods), o, |b, o| {
                b.iter(|| decide(black_box(o), now, &cfg))
            });
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
