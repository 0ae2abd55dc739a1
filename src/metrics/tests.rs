#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;
use crate::api::StatefulSetLockStatus;
use crate::elect::TransitionKind;
use crate::elect::{Candidate, Config, LeaseView, decide};

fn ts(ms: i64) -> Timestamp {
    Timestamp::from_millisecond(1_800_000_000_000 + ms).unwrap()
}

fn pod(i: u32, ready: bool, role: Option<Role>) -> Candidate {
    Candidate {
        role,
        epoch: role.map(|_| 3),
        ..Candidate::example(i, format!("uid-{i}"), ready, ts(0))
    }
}

fn lease(holder: &str, renewed_ms: i64) -> LeaseView {
    let uid = format!("uid-{}", holder.trim_start_matches("db-"));
    LeaseView::example(holder, &uid, 3, ts(0), ts(renewed_ms))
}

fn observed(pods: Vec<Candidate>, lease: Option<LeaseView>) -> Observed {
    Observed {
        lease,
        status: StatefulSetLockStatus {
            writer_pod: Some("db-0".into()),
            ..Default::default()
        },
        ..Observed::example(pods, ts(0))
    }
}

fn cfg() -> Config {
    Config::example()
}

/// The value of one sample line (`name{labels} value`) of the exposition.
fn sample(m: &Metrics, series: &str) -> f64 {
    let text = m.render().unwrap();
    text.lines()
        .find_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            (name == series).then(|| value.parse::<f64>().unwrap())
        })
        .unwrap_or_else(|| panic!("no sample {series} in:\n{text}"))
}

#[test]
fn a_notready_writer_failover_is_timed_from_its_notready_transition() {
    let m = Metrics::new("shard-a");
    let mut writer = pod(0, false, Some(Role::Writer));
    writer.ready_since = Some(ts(10_000));
    let o = observed(
        vec![writer, pod(1, true, Some(Role::Reader))],
        Some(lease("db-0", 5_000)),
    );
    let plan = decide(&o, ts(12_000), &cfg());
    assert_eq!(
        plan.transition.as_ref().map(|t| t.kind),
        Some(TransitionKind::Failover)
    );
    m.observed(&o);
    m.applied(&o, &plan, ts(12_000), ts(12_250), None);
    assert_eq!(sample(&m, "stslock_failover_duration_seconds_count"), 1.0);
    assert_eq!(sample(&m, "stslock_failover_duration_seconds_sum"), 2.25);
    assert_eq!(
        sample(&m, "stslock_failover_duration_seconds_bucket{le=\"2.5\"}"),
        1.0
    );
    assert_eq!(
        sample(&m, "stslock_failover_duration_seconds_bucket{le=\"1.0\"}"),
        0.0
    );
    assert_eq!(sample(&m, "stslock_writerless_seconds_total"), 2.25);
    assert_eq!(
        sample(&m, "stslock_writer_changes_total{kind=\"failover\"}"),
        1.0
    );
    // A failover is not a renewal, and one writer is not two.
    assert_eq!(sample(&m, "stslock_lease_renewals_total"), 0.0);
    assert_eq!(sample(&m, "stslock_dual_writer_detections_total"), 0.0);
    assert_eq!(sample(&m, "stslock_writerless_locks"), 0.0);
}

#[test]
fn a_notready_transition_seen_by_the_watch_beats_the_second_precision_condition() {
    let m = Metrics::new("shard-a");
    let mut writer = pod(0, false, Some(Role::Writer));
    // The condition says 10.000 s (truncated); the watch saw it at 10.600 s.
    writer.ready_since = Some(ts(10_000));
    let o = observed(
        vec![writer, pod(1, true, Some(Role::Reader))],
        Some(lease("db-0", 5_000)),
    );
    let plan = decide(&o, ts(10_620), &cfg());
    let t = plan.transition.clone().unwrap();
    assert_eq!(
        failover_started_at(&o, &t, ts(10_620), Some(ts(10_600))),
        Some(ts(10_600))
    );
    m.applied(&o, &plan, ts(10_620), ts(10_650), Some(ts(10_600)));
    assert!((sample(&m, "stslock_failover_duration_seconds_sum") - 0.05).abs() < 1e-9);
    assert_eq!(
        sample(&m, "stslock_failover_duration_seconds_bucket{le=\"0.05\"}"),
        1.0
    );
}

#[test]
fn a_deleted_writer_failover_is_timed_from_the_takeover_decision() {
    let m = Metrics::new("shard-a");
    let o = observed(
        vec![pod(1, true, Some(Role::Reader))],
        Some(lease("db-0", 5_000)),
    );
    let plan = decide(&o, ts(12_000), &cfg());
    let t = plan.transition.clone().unwrap();
    assert_eq!(t.kind, TransitionKind::Failover);
    assert_eq!(
        failover_started_at(&o, &t, ts(12_000), None),
        Some(ts(12_000))
    );
    m.applied(&o, &plan, ts(12_000), ts(12_040), None);
    assert_eq!(sample(&m, "stslock_failover_duration_seconds_count"), 1.0);
    assert!((sample(&m, "stslock_failover_duration_seconds_sum") - 0.04).abs() < 1e-9);
}

#[test]
fn an_election_is_not_a_failover() {
    let m = Metrics::new("shard-a");
    let mut o = observed(vec![pod(0, true, None), pod(1, true, None)], None);
    o.status = StatefulSetLockStatus::default();
    let plan = decide(&o, ts(1_000), &cfg());
    assert_eq!(
        plan.transition.as_ref().map(|t| t.kind),
        Some(TransitionKind::Election)
    );
    m.applied(&o, &plan, ts(1_000), ts(1_010), None);
    assert_eq!(sample(&m, "stslock_failover_duration_seconds_count"), 0.0);
    assert_eq!(
        sample(&m, "stslock_writer_changes_total{kind=\"election\"}"),
        1.0
    );
}

#[test]
fn renewals_report_lateness_past_half_the_duration_and_lapses() {
    let m = Metrics::new("shard-a");
    let pods = vec![
        pod(0, true, Some(Role::Writer)),
        pod(1, true, Some(Role::Reader)),
    ];
    // Renewed at 0, due at 15 s, renewed at 16 s: one second late.
    let o = observed(pods.clone(), Some(lease("db-0", 0)));
    let plan = decide(&o, ts(16_000), &cfg());
    assert_eq!(
        renewal(&o, &plan, ts(16_000)),
        Some(Renewal {
            lateness: Duration::from_secs(1),
            lapsed: false
        })
    );
    m.applied(&o, &plan, ts(16_000), ts(16_005), None);
    // Not due yet: no write, no renewal.
    let early = decide(&o, ts(10_000), &cfg());
    assert_eq!(renewal(&o, &early, ts(10_000)), None);
    m.applied(&o, &early, ts(10_000), ts(10_000), None);
    // Expired (30 s) before the renewal: a lapse.
    let plan = decide(&o, ts(40_000), &cfg());
    m.applied(&o, &plan, ts(40_000), ts(40_010), None);
    assert_eq!(sample(&m, "stslock_lease_renewals_total"), 2.0);
    assert_eq!(sample(&m, "stslock_lease_lapses_total"), 1.0);
    assert_eq!(
        sample(&m, "stslock_lease_renewal_lateness_seconds_sum"),
        26.0
    );
    assert_eq!(
        sample(
            &m,
            "stslock_lease_renewal_lateness_seconds_bucket{le=\"1.0\"}"
        ),
        1.0
    );
}

#[test]
fn two_writer_labels_in_one_statefulset_are_detected() {
    let m = Metrics::new("shard-a");
    let o = observed(
        vec![
            pod(0, true, Some(Role::Writer)),
            pod(1, true, Some(Role::Writer)),
        ],
        Some(lease("db-0", 0)),
    );
    m.observed(&o);
    assert_eq!(sample(&m, "stslock_dual_writer_detections_total"), 1.0);
}

#[test]
fn a_lock_waiting_out_its_failover_delay_is_writerless_until_the_writer_recovers() {
    let m = Metrics::new("shard-a");
    let mut writer = pod(0, false, Some(Role::Writer));
    writer.ready_since = Some(ts(9_000));
    let mut o = observed(
        vec![writer, pod(1, true, Some(Role::Reader))],
        Some(lease("db-0", 5_000)),
    );
    o.failover_delay_seconds = 60;
    let plan = decide(&o, ts(10_000), &cfg());
    assert!(
        plan.transition.is_none(),
        "still within failoverDelaySeconds"
    );
    m.applied(&o, &plan, ts(10_000), ts(10_010), None);
    assert_eq!(sample(&m, "stslock_writerless_locks"), 1.0);
    // The writer comes back: 3.5 s without a Ready writer are counted (from the reconcile
    // that saw it, to the one that saw it back).
    o.pods[0].ready = true;
    let plan = decide(&o, ts(13_000), &cfg());
    m.applied(&o, &plan, ts(13_000), ts(13_500), None);
    assert_eq!(sample(&m, "stslock_writerless_locks"), 0.0);
    assert_eq!(sample(&m, "stslock_writerless_seconds_total"), 3.5);
    // Handing a writer-less lock off stops tracking it on this replica.
    o.pods[0].ready = false;
    let plan = decide(&o, ts(20_000), &cfg());
    m.applied(&o, &plan, ts(20_000), ts(20_000), None);
    assert_eq!(sample(&m, "stslock_writerless_locks"), 1.0);
    m.forget_lock("ns/lock");
    assert_eq!(sample(&m, "stslock_writerless_locks"), 0.0);
}

#[test]
fn a_new_lock_waiting_for_its_first_ready_pod_is_not_writerless() {
    let mut o = observed(vec![pod(0, false, None), pod(1, false, None)], None);
    o.status = StatefulSetLockStatus::default();
    let plan = decide(&o, ts(1_000), &cfg());
    assert!(plan.transition.is_none());
    assert_eq!(writerless(&o, &plan), None);
    // Once it has had a writer, losing every Ready pod is writer-less.
    let mut o = observed(
        vec![pod(0, false, Some(Role::Writer)), pod(1, false, None)],
        Some(lease("db-0", 0)),
    );
    o.status.writer_pod = Some("db-0".into());
    let plan = decide(&o, ts(1_000), &cfg());
    assert_eq!(writerless(&o, &plan), Some(true));
}

#[test]
fn scaled_to_zero_and_paused_locks_are_not_writerless() {
    let mut o = observed(vec![], None);
    o.replicas = Some(0);
    assert_eq!(writerless(&o, &Plan::default()), None);
    let mut o = observed(vec![pod(0, false, Some(Role::Writer))], None);
    o.paused = true;
    assert_eq!(writerless(&o, &Plan::default()), None);
}

#[test]
fn api_calls_are_counted_by_verb_resource_and_code() {
    let m = Metrics::new("shard-a");
    m.api_request("create", "leases", "409");
    m.api_request("create", "leases", "409");
    assert_eq!(
        sample(
            &m,
            "stslock_api_requests_total{verb=\"create\",resource=\"leases\",code=\"409\"}"
        ),
        2.0
    );
}

#[test]
fn api_calls_count_in_their_replicas_metrics_only() {
    let a = Metrics::new("a");
    let b = Metrics::new("b");
    a.api_request("get", "leases", "2xx");
    let series = "stslock_api_requests_total{verb=\"get\",resource=\"leases\",code=\"2xx\"}";
    assert_eq!(sample(&a, series), 1.0);
    assert!(!b.render().unwrap().contains(series));
}

#[test]
fn rate_limit_waits_are_counted_with_their_seconds() {
    let m = Metrics::new("shard-a");
    m.rate_limit_wait(Duration::from_millis(250));
    m.rate_limit_wait(Duration::from_millis(500));
    assert_eq!(sample(&m, "stslock_rate_limit_waits_total"), 2.0);
    assert_eq!(sample(&m, "stslock_rate_limit_wait_seconds_total"), 0.75);
}

#[test]
fn shard_state_is_labelled_by_shard() {
    let m = Metrics::new("stslock-1");
    m.shard_state(7, 3, true);
    assert_eq!(sample(&m, "stslock_owned_locks{shard=\"stslock-1\"}"), 7.0);
    assert_eq!(sample(&m, "stslock_ring_members"), 3.0);
    assert_eq!(sample(&m, "stslock_shard_ready"), 1.0);
}

#[test]
fn error_kinds_and_writer_changes_start_at_zero() {
    let m = Metrics::new("shard-a");
    for kind in crate::error::ErrorKind::ALL.map(|k| k.label()) {
        assert_eq!(
            sample(
                &m,
                &format!("stslock_reconcile_errors_total{{kind=\"{kind}\"}}")
            ),
            0.0
        );
    }
    let e = Error::Timeout {
        context: "getting Lease ns/l".into(),
        after: Duration::from_secs(1),
    };
    let others = [
        Error::Invalid("x".into()),
        Error::Fenced,
        Error::Serialize(serde_json::from_str::<u8>("x").unwrap_err()),
    ];
    for err in others.iter().chain([&e]) {
        assert!(crate::error::ErrorKind::ALL.contains(&err.kind()), "{err}");
    }
    m.reconcile_finished(Duration::from_millis(3), Some(&e));
    m.reconcile_finished(Duration::from_millis(3), None);
    assert_eq!(sample(&m, "stslock_reconciles_total"), 2.0);
    assert_eq!(
        sample(&m, "stslock_reconcile_errors_total{kind=\"timeout\"}"),
        1.0
    );
    assert_eq!(sample(&m, "stslock_owned_locks{shard=\"shard-a\"}"), 0.0);
}

#[test]
fn per_namespace_series_exist_only_with_the_flag() {
    let plain = Metrics::new("shard-a");
    assert!(!plain.render().unwrap().contains("namespace_"));
    let m = Metrics::new_with("shard-a", true);
    let mut writer = pod(0, false, Some(Role::Writer));
    writer.ready_since = Some(ts(10_000));
    let mut o = observed(
        vec![writer, pod(1, false, Some(Role::Reader))],
        Some(lease("db-0", 5_000)),
    );
    o.namespace = "tenant-a".into();
    o.lease.as_mut().unwrap().owner = Some("tenant-a/lock".into());
    // No Ready pod: writer-less in tenant-a.
    let plan = decide(&o, ts(11_000), &cfg());
    m.applied(&o, &plan, ts(11_000), ts(11_000), None);
    assert_eq!(
        sample(
            &m,
            "stslock_namespace_writerless_locks{namespace=\"tenant-a\"}"
        ),
        1.0
    );
    // db-1 becomes Ready: a failover in tenant-a, no longer writer-less.
    o.pods[1].ready = true;
    let plan = decide(&o, ts(12_000), &cfg());
    assert_eq!(
        plan.transition.as_ref().map(|t| t.kind),
        Some(TransitionKind::Failover),
        "{plan:?}"
    );
    m.applied(&o, &plan, ts(12_000), ts(12_010), None);
    assert_eq!(
        sample(
            &m,
            "stslock_namespace_failovers_total{namespace=\"tenant-a\"}"
        ),
        1.0
    );
    assert_eq!(
        sample(
            &m,
            "stslock_namespace_writerless_locks{namespace=\"tenant-a\"}"
        ),
        0.0
    );
    assert_eq!(sample(&m, "stslock_failover_duration_seconds_count"), 1.0);
}

#[test]
fn the_go_operators_metrics_are_exported_with_its_names_and_labels_only_when_asked() {
    let mut writer = pod(0, false, Some(Role::Writer));
    writer.ready_since = Some(ts(10_000));
    let o = observed(
        vec![writer, pod(1, true, Some(Role::Reader))],
        Some(lease("db-0", 5_000)),
    );
    let plan = decide(&o, ts(12_000), &cfg());
    let off = Metrics::new("shard-a");
    off.applied(&o, &plan, ts(12_000), ts(12_250), None);
    assert!(
        !off.render().unwrap().contains("statefulsetlock_"),
        "per-lock Go series are behind --go-metrics"
    );

    let m = Metrics::new("shard-a").with_go_metrics(true);
    m.applied(&o, &plan, ts(12_000), ts(12_250), None);
    let lock = r#"namespace="ns",statefulsetlock="lock""#;
    assert_eq!(
        sample(
            &m,
            &format!(
                r#"statefulsetlock_leader_elections_total{{{lock},statefulset="db",reason="failover"}}"#
            )
        ),
        1.0
    );
    assert_eq!(
        sample(
            &m,
            &format!(
                r#"statefulsetlock_leader_election_duration_seconds_sum{{{lock},statefulset="db"}}"#
            )
        ),
        0.25
    );
    assert_eq!(
        sample(
            &m,
            &format!(
                r#"statefulsetlock_current_leader_info{{{lock},statefulset="db",leader_pod="db-1"}}"#
            )
        ),
        1.0
    );
    assert_eq!(
        sample(
            &m,
            &format!(r#"statefulsetlock_ready_pods{{{lock},statefulset="db"}}"#)
        ),
        1.0
    );
    // The stslock_ series are still there, and the exposition ends once.
    assert_eq!(
        sample(&m, "stslock_writer_changes_total{kind=\"failover\"}"),
        1.0
    );
    let text = m.render().unwrap();
    assert_eq!(text.matches("# EOF").count(), 1, "{text}");
    assert!(text.trim_end().ends_with("# EOF"));
    // A renewal by the renewal lane.
    let id = go_id(&o);
    m.go()
        .unwrap()
        .renewal(&id, Duration::from_millis(20), 30.0);
    assert_eq!(
        sample(
            &m,
            &format!(r#"statefulsetlock_lease_renewals_total{{{lock},lease_name="db-lease"}}"#)
        ),
        1.0
    );
    assert_eq!(
        sample(
            &m,
            &format!(r#"statefulsetlock_lease_expiration_seconds{{{lock},lease_name="db-lease"}}"#)
        ),
        30.0
    );
    // A lock this replica gives up: its gauges go, the new owner exports them.
    m.forget_lock("ns/lock");
    let text = m.render().unwrap();
    assert!(
        !text.contains("statefulsetlock_current_leader_info{"),
        "{text}"
    );
    assert!(!text.contains("statefulsetlock_ready_pods{"), "{text}");
}
