//! The invariant recorder: from every committed pod write, the intervals during which a
//! StatefulSet had two or more pods labelled writer (must never happen) and during which it
//! had no Ready writer (the failover gap).
//!
//! It is fed inside the store's commit lock, so its view is exactly the committed history in
//! commit order; it never reads the store and never blocks.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::Value;

use crate::meta;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Interval {
    /// Milliseconds since the simulator started.
    pub start_ms: u64,
    /// None while the interval is still open.
    pub end_ms: Option<u64>,
}

impl Interval {
    pub fn duration_ms(&self, now_ms: u64) -> u64 {
        self.end_ms.unwrap_or(now_ms).saturating_sub(self.start_ms)
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct PodState {
    writer: bool,
    ready: bool,
}

#[derive(Debug, Clone, Default)]
struct Track {
    pods: BTreeMap<String, PodState>,
    dual: Vec<Interval>,
    gap: Vec<Interval>,
    /// Gaps are counted only once a StatefulSet has had a Ready writer: before the first
    /// election there is nothing to fail over from.
    seen_writer: bool,
    first_writer_ms: Option<u64>,
    /// Who carried the writer label when: (pod, interval), in the order they began.
    held: Vec<(String, Interval)>,
}

impl Track {
    fn update(&mut self, at: u64) {
        let writers = self.pods.values().filter(|p| p.writer).count();
        let ready_writer = self.pods.values().any(|p| p.writer && p.ready);
        let dual_open = self.dual.last().is_some_and(|i| i.end_ms.is_none());
        if writers >= 2 && !dual_open {
            self.dual.push(Interval {
                start_ms: at,
                end_ms: None,
            });
        } else if writers < 2
            && dual_open
            && let Some(i) = self.dual.last_mut()
        {
            i.end_ms = Some(at);
        }
        if ready_writer && !self.seen_writer {
            self.seen_writer = true;
            self.first_writer_ms = Some(at);
        }
        let gap_open = self.gap.last().is_some_and(|i| i.end_ms.is_none());
        if self.seen_writer && !ready_writer && !gap_open {
            self.gap.push(Interval {
                start_ms: at,
                end_ms: None,
            });
        } else if ready_writer
            && gap_open
            && let Some(i) = self.gap.last_mut()
        {
            i.end_ms = Some(at);
        }
    }
}

#[derive(Debug, Clone)]
pub struct Recorder {
    label_key: String,
    sets: BTreeMap<String, Track>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SetReport {
    pub pods: usize,
    pub writers: Vec<String>,
    pub first_writer_ms: Option<u64>,
    pub dual_writer: Vec<Interval>,
    pub no_ready_writer: Vec<Interval>,
    pub dual_writer_ms: u64,
    pub no_ready_writer_ms: u64,
    /// Who carried the writer label when (pod, interval), in the order they began.
    #[serde(skip)]
    pub writer_periods: Vec<(String, Interval)>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub label_key: String,
    pub now_ms: u64,
    pub statefulsets: BTreeMap<String, SetReport>,
    /// Sum over StatefulSets of time with two or more writers: must be 0.
    pub dual_writer_ms: u64,
    pub dual_writer_intervals: usize,
    pub no_ready_writer_ms: u64,
    pub no_ready_writer_intervals: usize,
    pub max_no_ready_writer_ms: u64,
}

fn owner_set(pod: &Value) -> Option<String> {
    let r = meta::controller_ref(pod)?;
    if r.get("kind").and_then(Value::as_str) != Some("StatefulSet") {
        return None;
    }
    let name = r.get("name").and_then(Value::as_str)?;
    Some(format!("{}/{}", meta::namespace(pod), name))
}

impl Report {
    /// The length of every interval without a Ready writer that began at or after `from_ms`
    /// (a failover's latency, or a writer failure's), across the StatefulSets.
    pub fn writerless_ms(&self, from_ms: u64) -> Vec<u64> {
        self.statefulsets
            .values()
            .flat_map(|s| s.no_ready_writer.iter())
            .filter(|i| i.start_ms >= from_ms)
            .map(|i| i.duration_ms(self.now_ms))
            .collect()
    }
}

impl Recorder {
    pub fn new(label_key: impl Into<String>) -> Self {
        Recorder {
            label_key: label_key.into(),
            sets: BTreeMap::new(),
        }
    }

    pub fn label_key(&self) -> &str {
        &self.label_key
    }

    /// A pod write was committed at `at_ms`: `old` is the state before (None on create),
    /// `new` the state after (None on delete).
    pub fn observe_pod(&mut self, at_ms: u64, old: Option<&Value>, new: Option<&Value>) {
        let Some(pod) = new.or(old) else { return };
        let Some(set) = owner_set(pod) else { return };
        let name = meta::name(pod).to_string();
        let track = self.sets.entry(set).or_default();
        let was_writer = track.pods.get(&name).is_some_and(|p| p.writer);
        match new {
            Some(p) => {
                let state = PodState {
                    writer: meta::label(p, &self.label_key) == Some("writer"),
                    ready: meta::pod_ready(p),
                };
                track.pods.insert(name.clone(), state);
            }
            None => {
                track.pods.remove(&name);
            }
        }
        let is_writer = track.pods.get(&name).is_some_and(|p| p.writer);
        if is_writer && !was_writer {
            track.held.push((
                name,
                Interval {
                    start_ms: at_ms,
                    end_ms: None,
                },
            ));
        } else if was_writer
            && !is_writer
            && let Some((_, i)) = track
                .held
                .iter_mut()
                .rev()
                .find(|(p, i)| *p == name && i.end_ms.is_none())
        {
            i.end_ms = Some(at_ms);
        }
        track.update(at_ms);
    }

    pub fn report(&self, now_ms: u64) -> Report {
        let mut statefulsets = BTreeMap::new();
        let (mut dual_ms, mut dual_n, mut gap_ms, mut gap_n, mut gap_max) = (0, 0, 0, 0, 0);
        for (k, t) in &self.sets {
            let d: u64 = t.dual.iter().map(|i| i.duration_ms(now_ms)).sum();
            let g: u64 = t.gap.iter().map(|i| i.duration_ms(now_ms)).sum();
            dual_ms += d;
            dual_n += t.dual.len();
            gap_ms += g;
            gap_n += t.gap.len();
            gap_max = t
                .gap
                .iter()
                .map(|i| i.duration_ms(now_ms))
                .fold(gap_max, u64::max);
            statefulsets.insert(
                k.clone(),
                SetReport {
                    pods: t.pods.len(),
                    writers: t
                        .pods
                        .iter()
                        .filter(|(_, p)| p.writer)
                        .map(|(n, _)| n.clone())
                        .collect(),
                    first_writer_ms: t.first_writer_ms,
                    dual_writer: t.dual.clone(),
                    no_ready_writer: t.gap.clone(),
                    dual_writer_ms: d,
                    no_ready_writer_ms: g,
                    writer_periods: t.held.clone(),
                },
            );
        }
        Report {
            label_key: self.label_key.clone(),
            now_ms,
            statefulsets,
            dual_writer_ms: dual_ms,
            dual_writer_intervals: dual_n,
            no_ready_writer_ms: gap_ms,
            no_ready_writer_intervals: gap_n,
            max_no_ready_writer_ms: gap_max,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(name: &str, role: Option<&str>, ready: bool) -> Value {
        let mut labels = json!({});
        if let Some(r) = role {
            labels["sts-role"] = json!(r);
        }
        json!({
            "metadata": {"name": name, "namespace": "ns", "labels": labels,
                "ownerReferences": [{"kind": "StatefulSet", "name": "db", "controller": true, "uid": "u"}]},
            "status": {"conditions": [{"type": "Ready", "status": if ready {"True"} else {"False"}}]}
        })
    }

    #[test]
    fn records_dual_writer_and_gap_intervals() {
        let mut r = Recorder::new("sts-role");
        r.observe_pod(0, None, Some(&pod("db-0", None, true)));
        r.observe_pod(0, None, Some(&pod("db-1", None, true)));
        // Before any writer there is no gap.
        assert_eq!(r.report(5).no_ready_writer_intervals, 0);
        r.observe_pod(
            10,
            Some(&pod("db-0", None, true)),
            Some(&pod("db-0", Some("writer"), true)),
        );
        // Writer goes NotReady at 20: gap opens.
        r.observe_pod(20, None, Some(&pod("db-0", Some("writer"), false)));
        // Wrong order: db-1 promoted before db-0 demoted: dual writer 30..35.
        r.observe_pod(30, None, Some(&pod("db-1", Some("writer"), true)));
        r.observe_pod(35, None, Some(&pod("db-0", Some("reader"), false)));
        let rep = r.report(100);
        let s = &rep.statefulsets["ns/db"];
        assert_eq!(
            s.dual_writer,
            vec![Interval {
                start_ms: 30,
                end_ms: Some(35)
            }]
        );
        assert_eq!(
            s.no_ready_writer,
            vec![Interval {
                start_ms: 20,
                end_ms: Some(30)
            }]
        );
        assert_eq!(rep.dual_writer_ms, 5);
        assert_eq!(rep.max_no_ready_writer_ms, 10);
        assert_eq!(s.writers, vec!["db-1".to_string()]);
        // Who carried the label: db-0 10..35 (Ready or not), db-1 from 30, still.
        let held = |start_ms, end_ms| Interval { start_ms, end_ms };
        assert_eq!(
            s.writer_periods,
            vec![
                ("db-0".to_string(), held(10, Some(35))),
                ("db-1".to_string(), held(30, None)),
            ]
        );
    }

    #[test]
    fn deleting_the_writer_opens_a_gap_and_label_key_is_a_parameter() {
        let mut r = Recorder::new("role");
        let mut p = pod("db-0", None, true);
        p["metadata"]["labels"]["role"] = json!("writer");
        r.observe_pod(0, None, Some(&p));
        r.observe_pod(7, Some(&p), None);
        let rep = r.report(10);
        assert_eq!(rep.no_ready_writer_intervals, 1);
        assert_eq!(rep.statefulsets["ns/db"].no_ready_writer[0].end_ms, None);
        assert_eq!(rep.no_ready_writer_ms, 3);
    }
}
