//! kubesim's label selectors (what every list and watch of pods by StatefulSet runs): parsing,
//! and matching 10k pods' labels with equality- and set-based selectors.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use kubesim::selector::LabelSelector;
use serde_json::{Map, Value, json};
use std::hint::black_box;

fn labels(i: usize) -> Map<String, Value> {
    let v = json!({
        "app": format!("db{}", i % 500),
        "tier": if i.is_multiple_of(2) { "data" } else { "cache" },
        "statefulset.kubernetes.io/pod-name": format!("db{}-{}", i % 500, i / 500),
        "sts-role": if i.is_multiple_of(3) { "writer" } else { "reader" },
    });
    match v {
        Value::Object(m) => m,
        _ => unreachable!(),
    }
}

fn bench(c: &mut Criterion) {
    let pods: Vec<Map<String, Value>> = (0..10_000).map(labels).collect();
    let selectors = [
        ("equality", "app=db7,statefulset.kubernetes.io/pod-name"),
        (
            "set_based",
            "tier in (data,cache),sts-role notin (writer),!gone",
        ),
    ];
    let mut g = c.benchmark_group("selector");
    for (name, s) in selectors {
        g.bench_with_input(BenchmarkId::new("parse", name), &s, |b, s| {
            b.iter(|| LabelSelector::parse(black_box(s)).unwrap())
        });
        let sel = LabelSelector::parse(s).unwrap();
        g.bench_with_input(BenchmarkId::new("match_10k", name), &sel, |b, sel| {
            b.iter(|| pods.iter().filter(|l| sel.matches(Some(l))).count())
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
