//! tokio-util's DelayQueue (a hierarchical timing wheel) at 100k entries: insert, reset,
//! expire — the renewal lane's operations.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use futures::StreamExt;
use tokio_util::time::DelayQueue;

const N: u64 = 100_000;

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    let mut g = c.benchmark_group("timer_wheel_100k");
    g.sample_size(10);
    g.bench_function("insert", |b| {
        b.iter(|| {
            let _guard = rt.enter();
            let mut q = DelayQueue::with_capacity(N as usize);
            for i in 0..N {
                q.insert(i, Duration::from_millis(15_000 + i % 1_000));
            }
            q.len()
        })
    });
    g.bench_function("reset", |b| {
        let _guard = rt.enter();
        let mut q = DelayQueue::with_capacity(N as usize);
        let keys: Vec<_> = (0..N)
            .map(|i| q.insert(i, Duration::from_millis(15_000 + i % 1_000)))
            .collect();
        b.iter(|| {
            for (i, k) in keys.iter().enumerate() {
                q.reset(k, Duration::from_millis(15_000 + (i as u64 * 7) % 1_000));
            }
        })
    });
    g.bench_function("expire", |b| {
        b.iter(|| {
            rt.block_on(async {
                let mut q = DelayQueue::with_capacity(N as usize);
                for i in 0..N {
                    q.insert(i, Duration::from_millis(1 + i % 1_000));
                }
                tokio::time::advance(Duration::from_millis(1_001)).await;
                let mut n = 0;
                while n < N {
                    if q.next().await.is_some() {
                        n += 1;
                    }
                }
                n
            })
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
