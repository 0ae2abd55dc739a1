//! The HTML report of a chaos test (issue P9): the figures of `fleet`'s report
//! (`kubesim::html`), drawn from what the harness records on either backend — the pod watch's
//! invariant recorder (writers, dual-writer and writer-less intervals), the write log
//! (kubesim's commit log, or the real apiserver's audit log, whose StatefulSetLock entries
//! carry the committed lock) and the faults the test injected.

use std::collections::{BTreeMap, HashMap};

use kubesim::html::{self, Fill, Row, Segment, Series};
use stslock::api::SHARD_LABEL;

use super::Write;

/// One fault the test injected, in the environment's milliseconds.
pub struct Fault {
    pub start_ms: u64,
    pub end_ms: u64,
    pub kind: &'static str,
    pub detail: String,
}

/// Everything the page draws; times are the environment's milliseconds
/// ([`super::Env::elapsed_ms`]).
pub struct ChaosRun<'a> {
    pub title: String,
    /// What the verdict rests on (the summary's caption).
    pub judged: String,
    /// The fault period, and the end of the run (after convergence).
    pub from_ms: u64,
    pub lift_ms: u64,
    pub to_ms: u64,
    pub report: &'a kubesim::Report,
    pub writes: &'a [Write],
    pub faults: &'a [Fault],
    /// (ms, KiB): the test process's resident set.
    pub rss: &'a [(u64, u64)],
    pub lease_seconds: u64,
    pub summary: Vec<(String, String)>,
    pub violations: Vec<String>,
}

/// The whole page.
pub fn page(r: &ChaosRun<'_>) -> String {
    let secs = |ms: u64| (ms as f64 - r.from_ms as f64) / 1000.0;
    let span = (secs(r.from_ms), secs(r.to_ms));
    let verdict = if r.violations.is_empty() {
        "PASS: every invariant held".to_string()
    } else {
        format!("FAIL: {}", r.violations.join("; "))
    };
    let mut sections = vec![html::summary(
        &verdict,
        r.violations.is_empty(),
        &r.summary,
        &r.judged,
    )];
    let writerless = r.report.writerless_ms(r.from_ms);
    sections.push(html::histogram(
        "failover-latency",
        "Failover latency (time without a Ready writer)",
        "Every interval in which a StatefulSet had no Ready pod labelled writer, as the harness's pod watch saw it, from the fault period on.",
        &writerless,
    ));
    sections.push(writer_timeline(r, &secs, span));
    sections.push(ownership(r, &secs));
    sections.push(renewal_lateness(r, &secs));
    sections.push(api_writes(r));
    sections.push(html::line_chart(
        "memory",
        "Memory (resident set)",
        "The test process's RSS: the harness and every operator replica run in it, so this is their sum; the apiserver and etcd (real backend) or kubesim are not in it.",
        ("seconds", "MiB"),
        &[Series {
            name: "test process".into(),
            points: r
                .rss
                .iter()
                .map(|(ms, kib)| (secs(*ms), *kib as f64 / 1024.0))
                .collect(),
        }],
    ));
    sections.push(faults(r, &secs, span));
    html::page(&r.title, &sections)
}

fn writer_timeline(r: &ChaosRun<'_>, secs: &dyn Fn(u64) -> f64, span: (f64, f64)) -> String {
    let now = r.report.now_ms;
    let mut ordinals = 0;
    // Rows are named by StatefulSet alone when they all share one namespace.
    let namespaces: std::collections::BTreeSet<&str> = r
        .report
        .statefulsets
        .keys()
        .filter_map(|k| k.split_once('/').map(|(ns, _)| ns))
        .collect();
    let name = |set: &str| match set.split_once('/') {
        Some((_, n)) if namespaces.len() == 1 => n.to_string(),
        _ => set.to_string(),
    };
    let rows: Vec<Row> = r
        .report
        .statefulsets
        .iter()
        .map(|(set, s)| {
            let mut segments = vec![];
            for (pod, i) in &s.writer_periods {
                let ordinal = pod
                    .rsplit_once('-')
                    .and_then(|(_, o)| o.parse::<usize>().ok())
                    .unwrap_or(0);
                ordinals = ordinals.max(ordinal + 1);
                let end = i.end_ms.unwrap_or(now);
                if end >= r.from_ms {
                    segments.push(Segment {
                        start: secs(i.start_ms.max(r.from_ms)),
                        end: secs(end),
                        fill: Fill::Series(ordinal),
                        title: format!("{pod} writer"),
                    });
                }
            }
            segments.extend(html::invariant_segments(s, r.from_ms, now, secs));
            Row {
                label: name(set),
                segments,
            }
        })
        .collect();
    let legend = html::writer_legend(ordinals);
    html::timeline(
        "writer-timeline",
        "Writer per StatefulSet",
        "Who carried the writer label (the harness's pod watch), with writer-less intervals (dark) and dual-writer intervals (red) marked.",
        span,
        &rows,
        &legend,
    )
}

/// Locks per owner over time, from the owner label of every lock write whose committed lock
/// the write log gives.
fn ownership(r: &ChaosRun<'_>, secs: &dyn Fn(u64) -> f64) -> String {
    let mut owner: HashMap<(String, String), String> = HashMap::new();
    let mut count: BTreeMap<String, i64> = BTreeMap::new();
    let mut samples: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    let mut lock_writes: Vec<&Write> = r
        .writes
        .iter()
        .filter(|w| w.resource == "statefulsetlocks" && w.labels_known && w.committed())
        .collect();
    lock_writes.sort_by_key(|w| w.completed_us);
    for w in lock_writes {
        let now = w.labels.get(SHARD_LABEL).cloned().unwrap_or_default();
        let prev = owner.insert((w.namespace.clone(), w.name.clone()), now.clone());
        if prev.as_deref() != Some(now.as_str()) {
            // A step: every owner's count just before the change and just after.
            let at = secs(w.at_ms.max(r.from_ms));
            let mut sample = |count: &BTreeMap<String, i64>| {
                for (id, n) in count {
                    samples.entry(id.clone()).or_default().push((at, *n as f64));
                }
            };
            sample(&count);
            if let Some(p) = prev {
                *count.entry(p).or_default() -= 1;
            }
            *count.entry(now).or_default() += 1;
            sample(&count);
        }
    }
    let end = secs(r.to_ms);
    let series: Vec<Series> = samples
        .into_iter()
        .map(|(id, mut points)| {
            if let Some(&(_, last)) = points.last() {
                points.push((end, last));
            }
            Series {
                name: if id.is_empty() { "unowned".into() } else { id },
                points,
            }
        })
        .collect();
    html::line_chart(
        "ownership",
        "Locks owned per replica",
        "The shard label of each lock as committed by every write to it (kubesim's commit log, or the audit log's committed lock).",
        ("seconds", "locks"),
        &series,
    )
}

/// How much later than half the Lease duration each Lease was written again by the same
/// replica (the write log's commit times).
fn renewal_lateness(r: &ChaosRun<'_>, secs: &dyn Fn(u64) -> f64) -> String {
    let half_ms = r.lease_seconds * 1000 / 2;
    let mut last: HashMap<(&str, &str), (&str, u64)> = HashMap::new();
    let mut late: Vec<(f64, f64)> = vec![];
    let mut lease_writes: Vec<&Write> = r
        .writes
        .iter()
        .filter(|w| w.resource == "leases" && w.by_operator() && w.committed())
        .filter(|w| w.verb == "patch" || w.verb == "update")
        .collect();
    lease_writes.sort_by_key(|w| w.at_ms);
    for w in lease_writes {
        let key = (w.namespace.as_str(), w.name.as_str());
        if let Some((actor, at)) = last.insert(key, (w.actor.as_str(), w.at_ms))
            && actor == w.actor
            && w.at_ms >= r.from_ms
        {
            let lateness = (w.at_ms - at).saturating_sub(half_ms);
            late.push((secs(w.at_ms), lateness as f64));
        }
    }
    html::line_chart(
        "renewal-lateness",
        "Renewal lateness",
        "For each Lease written again by the same replica: how much later than half the Lease's duration (0: on time, or earlier for a failover).",
        ("seconds", "ms late"),
        &[Series {
            name: "renewal lateness".into(),
            points: late,
        }],
    )
}

fn api_writes(r: &ChaosRun<'_>) -> String {
    let series = html::per_second(
        r.writes
            .iter()
            .filter(|w| w.maybe_committed())
            .filter_map(|w| {
                w.actor
                    .strip_prefix("stslock/")
                    .map(|id| (id.to_string(), w.at_ms))
            }),
        r.from_ms,
        r.to_ms,
    );
    html::line_chart(
        "api-writes",
        "API writes per second, per replica",
        "Writes by each replica (its User-Agent) that were or may have been committed, per second.",
        ("seconds", "writes/s"),
        &series,
    )
}

fn faults(r: &ChaosRun<'_>, secs: &dyn Fn(u64) -> f64, span: (f64, f64)) -> String {
    let mut kinds: BTreeMap<&str, Vec<Segment>> = BTreeMap::new();
    for (n, f) in r.faults.iter().enumerate() {
        kinds.entry(f.kind).or_default().push(Segment {
            start: secs(f.start_ms),
            end: secs(
                f.end_ms
                    .max(f.start_ms + 200)
                    .min(r.lift_ms.max(f.start_ms + 200)),
            ),
            fill: Fill::Series(n % 3),
            title: format!("{}: {}", f.kind, f.detail),
        });
    }
    let rows: Vec<Row> = kinds
        .into_iter()
        .map(|(k, segments)| Row {
            label: format!("{k} ({})", segments.len()),
            segments,
        })
        .collect();
    html::timeline(
        "faults",
        "Faults injected",
        "Each fault, outage, replica kill and writer failure as the test injected it (hover for details).",
        span,
        &rows,
        &[],
    )
}
