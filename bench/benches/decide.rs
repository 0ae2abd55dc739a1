//! `decide` (the pure election core) on the decisions a replica makes most: the steady state of
//! a healthy lock (a renewal or nothing), a failover, and a first election — for StatefulSets of
//! 3 and 50 pods, with 200 rival locks in the namespace.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use jiff::Timestamp;
use std::hint::black_box;
use stslock::api::StatefulSetLockStatus;
use stslock::elect::{Candidate, Config, LeaseView, Observed, Rival, Role, decide};

fn ts(s: i64) -> Timestamp {
    Timestamp::from_second(1_800_000_000 + s).unwrap()
}

fn pod(i: u32, ready: bool, role: Option<Role>, epoch: Option<i64>) -> Candidate {
    Candidate {
        role,
        epoch,
        ..Candidate::example(i, format!("uid-{i}"), ready, ts(0))
    }
}

/// A lock of `pods` pods whose writer db-0 holds the Lease at epoch 3, renewed at `renewed`,
/// in a namespace of 200 other locks.
fn observed(pods: u32, writer_ready: bool, renewed: i64) -> Observed {
    let mut ps: Vec<Candidate> = (1..pods)
        .map(|i| pod(i, true, Some(Role::Reader), None))
        .collect();
    ps.insert(0, pod(0, writer_ready, Some(Role::Writer), Some(3)));
    let mut lease = LeaseView::example("db-0", "uid-0", 3, ts(0), ts(renewed));
    lease.renewed_mark = lease.renew_time;
    Observed {
        namespace: "tenant-1".into(),
        name: "db".into(),
        lease: Some(LeaseView {
            owner: Some("tenant-1/db".into()),
            ..lease
        }),
        rivals: (0..200)
            .map(|i| Rival {
                name: format!("other-{i}"),
                created: ts(i),
                statefulset: format!("other-{i}"),
                lease_name: format!("other-{i}-lease"),
            })
            .collect(),
        status: StatefulSetLockStatus {
            writer_pod: Some("db-0".into()),
            writer_uid: Some("uid-0".into()),
            writer_epoch: Some(3),
            highest_epoch: Some(3),
            highest_epoch_uid: Some("uid-0".into()),
            ..StatefulSetLockStatus::default()
        },
        ..Observed::example(ps, ts(0))
    }
}

fn bench(c: &mut Criterion) {
    let cfg = Config::example();
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
