//! The per-lock state every write of every worker touches (the shard runtime's write permit:
//! is the lock being handed off, is this view older than our own handoff, count the write in
//! flight, check again; drop: uncount it), kept behind one `Mutex` per map as before, or in
//! `dashmap` maps as now. 1, 4 and 16 threads (the reconcile workers) each run the handshake
//! for their own locks out of 2,000. The time reported is wall time per handshake of all
//! threads together (inverse throughput): it should fall as threads are added up to the
//! number of cores and stay there, not rise because threads queue on a shared lock. Compare
//! the two variants at the same thread count.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{HashMap, HashSet};
use std::hint::black_box;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use dashmap::{DashMap, DashSet};

const LOCKS: usize = 2_000;

trait PerLock: Sync {
    fn permit(&self, key: &str) -> bool;
    fn release(&self, key: &str);
}

#[derive(Default)]
struct Mutexes {
    draining: Mutex<HashSet<String>>,
    unresolved: Mutex<HashSet<String>>,
    released: Mutex<HashMap<String, u64>>,
    writes: Mutex<HashMap<String, (usize, Option<Instant>)>>,
}

impl Mutexes {
    fn draining(&self, key: &str) -> bool {
        self.draining.lock().unwrap().contains(key) || self.unresolved.lock().unwrap().contains(key)
    }
}

impl PerLock for Mutexes {
    fn permit(&self, key: &str) -> bool {
        if self.draining(key)
            || self
                .released
                .lock()
                .unwrap()
                .get(key)
                .is_some_and(|rv| *rv > 7)
        {
            return false;
        }
        self.writes
            .lock()
            .unwrap()
            .entry(key.to_string())
            .or_default()
            .0 += 1;
        !self.draining(key)
    }

    fn release(&self, key: &str) {
        let mut w = self.writes.lock().unwrap();
        if let Some(e) = w.get_mut(key) {
            e.0 -= 1;
            if e.0 == 0 && e.1.is_none() {
                w.remove(key);
            }
        }
    }
}

#[derive(Default)]
struct Sharded {
    draining: DashSet<String>,
    unresolved: DashSet<String>,
    released: DashMap<String, u64>,
    writes: DashMap<String, (usize, Option<Instant>)>,
}

impl Sharded {
    fn draining(&self, key: &str) -> bool {
        self.draining.contains(key) || self.unresolved.contains(key)
    }
}

impl PerLock for Sharded {
    fn permit(&self, key: &str) -> bool {
        if self.draining(key) || self.released.get(key).is_some_and(|rv| *rv > 7) {
            return false;
        }
        self.writes.entry(key.to_string()).or_default().0 += 1;
        !self.draining(key)
    }

    fn release(&self, key: &str) {
        if let Some(mut e) = self.writes.get_mut(key) {
            e.0 -= 1;
        }
        self.writes
            .remove_if(key, |_, (n, unknown)| *n == 0 && unknown.is_none());
    }
}

/// `threads` threads, each running `per_thread` handshakes over its own share of the locks;
/// returns the wall time.
fn run(state: &dyn PerLock, keys: &[String], threads: usize, per_thread: u64) -> Duration {
    let start = Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads {
            s.spawn(move || {
                let mine: Vec<&String> = keys.iter().skip(t).step_by(threads).collect();
                for i in 0..per_thread {
                    let key = mine[(i as usize) % mine.len()];
                    if state.permit(black_box(key)) {
                        state.release(key);
                    }
                }
            });
        }
    });
    start.elapsed()
}

fn bench(c: &mut Criterion) {
    let keys: Vec<String> = (0..LOCKS)
        .map(|i| format!("tenant-{}/lock-{i}", i % 20))
        .collect();
    let mut g = c.benchmark_group("per_lock_state");
    for threads in [1, 4, 16] {
        let variants: [(&str, Box<dyn PerLock>); 2] = [
            ("mutex_hashmap", Box::new(Mutexes::default())),
            ("dashmap", Box::new(Sharded::default())),
        ];
        for (name, state) in variants {
            g.bench_with_input(BenchmarkId::new(name, threads), &threads, |b, &threads| {
                b.iter_custom(|iters| {
                    let per_thread = iters.div_ceil(threads as u64).max(1);
                    run(state.as_ref(), &keys, threads, per_thread)
                })
            });
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
