//! Ring build, lookup and rebalance for 10k keys and 2–32 shards.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use std::hint::black_box;
use stslock_shard::Ring;

fn members(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("stslock-{i}")).collect()
}

fn keys() -> Vec<String> {
    (0..10_000)
        .map(|i| format!("tenant-{}/lock-{i}", i % 37))
        .collect()
}

fn bench(c: &mut Criterion) {
    let ks = keys();
    let mut g = c.benchmark_group("ring");
    for n in [2usize, 4, 8, 16, 32] {
        let ms = members(n);
        g.bench_with_input(BenchmarkId::new("build", n), &ms, |b, ms| {
            b.iter(|| Ring::new(black_box(ms)))
        });
        let ring = Ring::new(&ms);
        g.bench_with_input(BenchmarkId::new("lookup_10k", n), &ring, |b, ring| {
            b.iter(|| {
                ks.iter()
                    .filter(|k| ring.owner(k) == Some("stslock-0"))
                    .count()
            })
        });
        let bigger = members(n + 1);
        g.bench_with_input(BenchmarkId::new("rebalance_10k", n), &n, |b, _| {
            b.iter(|| {
                let next = Ring::new(black_box(&bigger));
                ks.iter().filter(|k| ring.owner(k) != next.owner(k)).count()
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
