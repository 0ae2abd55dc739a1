use super::*;

fn ts(s: i64) -> Timestamp {
    Timestamp::from_second(1_800_000_000 + s).expect("ts")
}

fn pod(i: u32, ready: bool) -> Candidate {
    Candidate {
        name: format!("db-{i}"),
        uid: format!("uid-{i}-0"),
        ordinal: Some(i),
        ready,
        ready_since: Some(ts(0)),
        terminating: false,
        role: None,
        epoch: None,
    }
}

fn observed(pods: Vec<Candidate>) -> Observed {
    Observed {
        namespace: "ns".into(),
        name: "lock".into(),
        created: ts(0),
        generation: 1,
        deleting: false,
        has_finalizer: true,
        statefulset_name: "db".into(),
        lease_name: "db-lease".into(),
        lease_duration_seconds: 30,
        paused: false,
        failover_delay_seconds: 0,
        preferred_writer: None,
        replicas: Some(pods.len() as i32),
        pods,
        lease: None,
        rivals: vec![],
        status: StatefulSetLockStatus::default(),
    }
}

fn cfg() -> Config {
    Config {
        on_delete: OnDelete::KeepWriter,
        identity: "shard-a".into(),
        max_locks_per_namespace: None,
    }
}

fn lease(holder: &str, uid: &str, transitions: i64, renewed: i64) -> LeaseView {
    LeaseView {
        holder: Some(holder.into()),
        holder_uid: Some(uid.into()),
        transitions,
        renew_time: Some(ts(renewed)),
        acquire_time: Some(ts(0)),
        duration_seconds: 30,
        resource_version: "7".into(),
        owner: Some("ns/lock".into()),
    }
}

/// Labels as they would be after applying `plan` to `o` (for settled-state assertions).
fn labelled(o: &Observed, plan: &Plan) -> Observed {
    let mut o = o.clone();
    for s in &plan.steps {
        if let Step::Label {
            pod, role, epoch, ..
        } = s
            && let Some(p) = o.pods.iter_mut().find(|p| &p.name == pod)
        {
            p.role = *role;
            p.epoch = *epoch;
        }
    }
    o
}

#[test]
fn initial_election_picks_lowest_ready_ordinal_lease_first() {
    let o = observed(vec![pod(0, false), pod(1, true), pod(2, true)]);
    let plan = decide(&o, ts(10), &cfg());
    assert_eq!(
        plan.steps[0],
        Step::CreateLease {
            holder: "db-1".into(),
            holder_uid: "uid-1-0".into(),
            transitions: 0
        }
    );
    assert!(plan.steps.contains(&Step::Label {
        pod: "db-1".into(),
        uid: "uid-1-0".into(),
        role: Some(Role::Writer),
        epoch: Some(0)
    }));
    assert!(plan.steps.contains(&Step::Label {
        pod: "db-0".into(),
        uid: "uid-0-0".into(),
        role: Some(Role::Reader),
        epoch: None
    }));
    let st = plan.status.expect("status");
    assert_eq!(st.writer_pod.as_deref(), Some("db-1"));
    assert_eq!(st.observed_generation, Some(1));
    assert!(
        st.conditions
            .iter()
            .any(|c| c.type_ == "Available" && c.status == "True")
    );
    assert_eq!(plan.events[0].reason, "Elected");
}

#[test]
fn settled_lock_plans_nothing_until_renewal_is_due() {
    let mut o = observed(vec![pod(0, true), pod(1, true)]);
    o.lease = Some(lease("db-0", "uid-0-0", 3, 0));
    let first = decide(&o, ts(1), &cfg());
    let mut settled = labelled(&o, &first);
    settled.status = first.status.clone().expect("status");
    let again = decide(&settled, ts(2), &cfg());
    assert!(again.steps.is_empty(), "{:?}", again.steps);
    assert!(again.status.is_none(), "no status write without a diff");
    assert!(again.events.is_empty());
    assert_eq!(again.requeue_after, Some(Duration::from_secs(13)));
    assert_eq!(again.renew_after, Some(Duration::from_secs(13)));
    // At half the duration: one renewal, same holder, same epoch.
    let due = decide(&settled, ts(15), &cfg());
    assert_eq!(
        due.steps,
        vec![Step::UpdateLease {
            expected_resource_version: "7".into(),
            holder: "db-0".into(),
            holder_uid: "uid-0-0".into(),
            transitions: 3,
            acquire: false
        }]
    );
}

#[test]
fn notready_writer_fails_over_demote_first_and_stays_reader_after_recovery() {
    let mut pods = vec![pod(0, false), pod(1, true), pod(2, true)];
    pods[0].role = Some(Role::Writer);
    pods[0].epoch = Some(3);
    let mut o = observed(pods);
    o.lease = Some(lease("db-0", "uid-0-0", 3, 5));
    let plan = decide(&o, ts(10), &cfg());
    assert!(
        matches!(&plan.steps[0], Step::UpdateLease { holder, transitions: 4, acquire: true, .. } if holder == "db-1")
    );
    let demote = plan
        .steps
        .iter()
        .position(
            |s| matches!(s, Step::Label { pod, role: Some(Role::Reader), .. } if pod == "db-0"),
        )
        .expect("demote");
    let promote = plan.steps.iter().position(|s| matches!(s, Step::Label { pod, role: Some(Role::Writer), epoch: Some(4), .. } if pod == "db-1")).expect("promote");
    assert!(demote < promote, "demote before promote");
    assert_eq!(plan.events[0].reason, "Failover");
    // db-0 recovers: it stays reader (no failback).
    let mut after = labelled(&o, &plan);
    after.pods[0].ready = true;
    after.lease = Some(lease("db-1", "uid-1-0", 4, 10));
    after.status = plan.status.expect("status");
    let next = decide(&after, ts(11), &cfg());
    assert!(next.steps.is_empty(), "{:?}", next.steps);
}

#[test]
fn recreated_writer_is_a_new_pod_and_gets_reader() {
    let mut pods = vec![pod(0, true), pod(1, true)];
    pods[0].uid = "uid-0-new".into();
    let mut o = observed(pods);
    o.lease = Some(lease("db-0", "uid-0-0", 1, 5));
    let plan = decide(&o, ts(10), &cfg());
    assert!(
        matches!(&plan.steps[0], Step::UpdateLease { holder, transitions: 2, .. } if holder == "db-1")
    );
    assert!(plan.steps.contains(&Step::Label {
        pod: "db-0".into(),
        uid: "uid-0-new".into(),
        role: Some(Role::Reader),
        epoch: None
    }));
    assert!(
        plan.transition
            .expect("transition")
            .reason
            .contains("recreated")
    );
}

#[test]
fn terminating_writer_is_handed_over_at_once_even_with_a_delay() {
    let mut pods = vec![pod(0, true), pod(1, true)];
    pods[0].terminating = true;
    pods[0].role = Some(Role::Writer);
    let mut o = observed(pods);
    o.failover_delay_seconds = 60;
    o.lease = Some(lease("db-0", "uid-0-0", 0, 5));
    let plan = decide(&o, ts(6), &cfg());
    assert!(
        matches!(&plan.steps[0], Step::UpdateLease { holder, transitions: 1, .. } if holder == "db-1")
    );
}

#[test]
fn expired_lease_with_same_ready_holder_is_reacquired_without_transition() {
    let mut pods = vec![pod(0, true), pod(1, true)];
    pods[0].role = Some(Role::Writer);
    pods[0].epoch = Some(5);
    pods[1].role = Some(Role::Reader);
    let mut o = observed(pods);
    o.lease = Some(lease("db-0", "uid-0-0", 5, 0));
    let plan = decide(&o, ts(500), &cfg());
    assert_eq!(
        plan.steps,
        vec![Step::UpdateLease {
            expected_resource_version: "7".into(),
            holder: "db-0".into(),
            holder_uid: "uid-0-0".into(),
            transitions: 5,
            acquire: true
        }]
    );
    assert!(plan.transition.is_none());
    assert!(plan.events.is_empty());
}

#[test]
fn failover_delay_waits_then_fails_over() {
    let mut pods = vec![pod(0, false), pod(1, true)];
    pods[0].role = Some(Role::Writer);
    pods[0].epoch = Some(0);
    pods[0].ready_since = Some(ts(100));
    pods[1].role = Some(Role::Reader);
    let mut o = observed(pods);
    o.failover_delay_seconds = 10;
    o.lease = Some(lease("db-0", "uid-0-0", 0, 100));
    let early = decide(&o, ts(104), &cfg());
    assert!(early.steps.is_empty(), "{:?}", early.steps);
    assert_eq!(early.requeue_after, Some(Duration::from_secs(6)));
    let late = decide(&o, ts(110), &cfg());
    assert!(matches!(&late.steps[0], Step::UpdateLease { holder, .. } if holder == "db-1"));
}

#[test]
fn preferred_writer_switches_over_when_ready_and_waits_when_not() {
    let mut pods = vec![pod(0, true), pod(1, true), pod(2, false)];
    pods[0].role = Some(Role::Writer);
    pods[0].epoch = Some(0);
    pods[1].role = Some(Role::Reader);
    pods[2].role = Some(Role::Reader);
    let mut o = observed(pods);
    o.lease = Some(lease("db-0", "uid-0-0", 0, 5));
    o.preferred_writer = Some("db-1".into());
    let plan = decide(&o, ts(6), &cfg());
    assert!(
        matches!(&plan.steps[0], Step::UpdateLease { holder, transitions: 1, .. } if holder == "db-1")
    );
    assert_eq!(plan.events[0].reason, "Switchover");
    o.preferred_writer = Some("db-2".into());
    let wait = decide(&o, ts(6), &cfg());
    assert!(wait.steps.is_empty());
    let st = wait.status.expect("status");
    assert!(
        st.conditions
            .iter()
            .any(|c| c.reason == "PreferredWriterNotReady")
    );
}

#[test]
fn paused_freezes_roles() {
    let mut o = observed(vec![pod(0, false), pod(1, true)]);
    o.pods[0].role = Some(Role::Writer);
    o.lease = Some(lease("db-0", "uid-0-0", 0, 5));
    o.paused = true;
    let plan = decide(&o, ts(100), &cfg());
    assert!(plan.steps.is_empty());
    assert!(
        plan.status
            .expect("status")
            .conditions
            .iter()
            .any(|c| c.type_ == "Progressing" && c.reason == "Paused")
    );
}

#[test]
fn bad_input_gets_conditions_and_events_and_writes_nothing() {
    // Missing StatefulSet.
    let mut o = observed(vec![]);
    o.replicas = None;
    let plan = decide(&o, ts(1), &cfg());
    assert!(plan.steps.is_empty());
    assert_eq!(plan.events[0].reason, "StatefulSetNotFound");
    let st = plan.status.clone().expect("status");
    assert!(
        st.conditions
            .iter()
            .any(|c| c.type_ == "Error" && c.status == "True" && c.reason == "StatefulSetNotFound")
    );
    // Same error again: no second Event.
    o.status = st;
    assert!(decide(&o, ts(2), &cfg()).events.is_empty());
    // Fixed: Error clears, Available returns.
    o.replicas = Some(1);
    o.pods = vec![pod(0, true)];
    let fixed = decide(&o, ts(3), &cfg());
    let st = fixed.status.expect("status");
    assert!(
        st.conditions
            .iter()
            .any(|c| c.type_ == "Error" && c.status == "False")
    );
    assert!(
        st.conditions
            .iter()
            .any(|c| c.type_ == "Available" && c.status == "True")
    );

    // Foreign Lease: never written.
    let mut o = observed(vec![pod(0, true)]);
    let mut l = lease("someone", "x", 0, 0);
    l.owner = None;
    o.lease = Some(l);
    let plan = decide(&o, ts(1), &cfg());
    assert!(plan.steps.is_empty());
    assert_eq!(plan.events[0].reason, "LeaseNotOwned");

    // Second lock on the same StatefulSet: the younger one reports Conflict and does nothing.
    let mut o = observed(vec![pod(0, true)]);
    o.rivals = vec![Rival {
        name: "older".into(),
        created: ts(-10),
        statefulset: "db".into(),
        lease_name: "other".into(),
    }];
    let plan = decide(&o, ts(1), &cfg());
    assert!(plan.steps.is_empty());
    assert_eq!(plan.events[0].reason, "Conflict");
    // Same lease name, different StatefulSet: also a conflict.
    o.rivals = vec![Rival {
        name: "older".into(),
        created: ts(-10),
        statefulset: "other".into(),
        lease_name: "db-lease".into(),
    }];
    assert_eq!(decide(&o, ts(1), &cfg()).events[0].reason, "Conflict");
    // The older lock is unaffected by a younger rival.
    o.rivals[0].created = ts(10);
    assert!(
        decide(&o, ts(1), &cfg())
            .events
            .iter()
            .all(|e| e.reason != "Conflict")
    );

    // No Ready pod: keep what is there, say why.
    let mut o = observed(vec![pod(0, false)]);
    o.pods[0].role = Some(Role::Writer);
    o.lease = Some(lease("db-0", "uid-0-0", 0, 0));
    let plan = decide(&o, ts(5), &cfg());
    assert!(
        plan.steps
            .iter()
            .all(|s| !matches!(s, Step::UpdateLease { .. }))
    );
    assert!(
        plan.status
            .expect("status")
            .conditions
            .iter()
            .any(|c| c.type_ == "Available" && c.reason == "NoReadyPod")
    );

    // Zero replicas.
    let mut o = observed(vec![]);
    o.replicas = Some(0);
    assert_eq!(decide(&o, ts(1), &cfg()).events[0].reason, "NoReplicas");
}

#[test]
fn locks_beyond_the_namespace_quota_report_quota_exceeded() {
    let mut o = observed(vec![pod(0, true)]);
    o.rivals = (0..2)
        .map(|i| Rival {
            name: format!("r{i}"),
            created: ts(-10 + i),
            statefulset: format!("other{i}"),
            lease_name: format!("l{i}"),
        })
        .collect();
    let limited = Config {
        max_locks_per_namespace: Some(2),
        ..cfg()
    };
    let plan = decide(&o, ts(1), &limited);
    assert!(
        plan.steps.iter().all(|s| matches!(s, Step::AddFinalizer))
            && plan.events[0].reason == "QuotaExceeded"
    );
    let roomy = Config {
        max_locks_per_namespace: Some(3),
        ..cfg()
    };
    assert!(
        decide(&o, ts(1), &roomy)
            .steps
            .iter()
            .any(|s| matches!(s, Step::CreateLease { .. }))
    );
}

#[test]
fn finalizer_added_first_and_deletion_cleans_up() {
    let mut o = observed(vec![pod(0, true)]);
    o.has_finalizer = false;
    assert_eq!(decide(&o, ts(1), &cfg()).steps[0], Step::AddFinalizer);
    let mut o = observed(vec![pod(0, true), pod(1, true)]);
    o.pods[0].role = Some(Role::Writer);
    o.pods[1].role = Some(Role::Reader);
    o.lease = Some(lease("db-0", "uid-0-0", 0, 0));
    o.deleting = true;
    let keep = decide(&o, ts(1), &cfg());
    assert_eq!(
        keep.steps,
        vec![
            Step::DeleteLease {
                expected_resource_version: "7".into()
            },
            Step::RemoveFinalizer
        ]
    );
    let remove = decide(
        &o,
        ts(1),
        &Config {
            on_delete: OnDelete::RemoveLabels,
            identity: "x".into(),
            max_locks_per_namespace: None,
        },
    );
    assert_eq!(remove.steps.len(), 4);
    assert_eq!(remove.steps[3], Step::RemoveFinalizer);
    // A Lease not owned by this lock is never deleted.
    o.lease.as_mut().expect("lease").owner = None;
    assert_eq!(decide(&o, ts(1), &cfg()).steps, vec![Step::RemoveFinalizer]);
}

#[test]
fn deleted_lease_is_recreated_for_the_sitting_writer_and_the_epoch_never_goes_back() {
    let mut pods = vec![pod(0, true), pod(1, true)];
    pods[1].role = Some(Role::Writer);
    pods[1].epoch = Some(7);
    pods[0].role = Some(Role::Reader);
    let mut o = observed(pods);
    o.status.writer_epoch = Some(7);
    o.status.writer_uid = Some("uid-1-0".into());
    let plan = decide(&o, ts(1), &cfg());
    assert_eq!(
        plan.steps,
        vec![Step::CreateLease {
            holder: "db-1".into(),
            holder_uid: "uid-1-0".into(),
            transitions: 7
        }],
        "same writer, same epoch, no relabelling"
    );
    assert!(plan.transition.is_none());
    assert_eq!(plan.events[0].reason, "LeaseRecreated");
    // The sitting writer is gone: a new election continues the epoch.
    o.pods[1].ready = false;
    let plan = decide(&o, ts(2), &cfg());
    assert!(
        matches!(&plan.steps[0], Step::CreateLease { holder, transitions: 8, .. } if holder == "db-0")
    );
}

/// A tiny world: pods with labels and a Lease, changed by random events and by applying
/// plans — possibly only a prefix of one, as when the operator crashes mid-plan.
mod world {
    use super::*;

    pub struct Rng(u64);
    impl Rng {
        pub fn new(seed: u64) -> Rng {
            Rng(seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407))
        }
        pub fn next(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n.max(1)
        }
    }

    pub fn writers(o: &Observed) -> usize {
        o.pods
            .iter()
            .filter(|p| p.role == Some(Role::Writer))
            .count()
    }

    /// Apply one step to the world.
    pub fn apply(o: &mut Observed, step: &Step, now: Timestamp) {
        match step {
            Step::CreateLease {
                holder,
                holder_uid,
                transitions,
            } => {
                let mut l = lease(holder, holder_uid, *transitions, 0);
                l.renew_time = Some(now);
                l.acquire_time = Some(now);
                o.lease = Some(l);
            }
            Step::UpdateLease {
                expected_resource_version,
                holder,
                holder_uid,
                transitions,
                ..
            } => {
                let l = o.lease.as_mut().expect("lease exists for update");
                assert_eq!(
                    &l.resource_version, expected_resource_version,
                    "CAS on a stale version"
                );
                assert!(*transitions >= l.transitions, "epoch never decreases");
                l.holder = Some(holder.clone());
                l.holder_uid = Some(holder_uid.clone());
                l.transitions = *transitions;
                l.renew_time = Some(now);
                l.resource_version =
                    format!("{}", l.resource_version.parse::<u64>().unwrap_or(0) + 1);
            }
            Step::Label {
                pod,
                uid,
                role,
                epoch,
            } => {
                if let Some(p) = o.pods.iter_mut().find(|p| &p.name == pod && &p.uid == uid) {
                    p.role = *role;
                    p.epoch = *epoch;
                }
            }
            Step::DeleteLease { .. } => o.lease = None,
            Step::AddFinalizer => o.has_finalizer = true,
            Step::RemoveFinalizer => o.has_finalizer = false,
        }
    }
}

#[test]
fn no_two_writers_under_random_events_and_crashes() {
    use world::*;
    for seed in 0..400u64 {
        let mut rng = Rng::new(seed);
        let n = 1 + rng.next(4) as u32;
        let mut o = observed((0..n).map(|i| pod(i, rng.next(3) > 0)).collect());
        o.failover_delay_seconds = if rng.next(2) == 0 { 0 } else { 5 };
        let mut generation = 1u32;
        let mut last_epoch = 0;
        for t in 0..60i64 {
            let now = ts(t * 3);
            // Random world event.
            let i = rng.next(u64::from(n)) as usize;
            match rng.next(6) {
                0 => {
                    o.pods[i].ready = !o.pods[i].ready;
                    o.pods[i].ready_since = Some(now);
                }
                1 => {
                    // Deleted and recreated: new UID, no labels, not Ready yet.
                    generation += 1;
                    o.pods[i].uid = format!("uid-{i}-{generation}");
                    o.pods[i].role = None;
                    o.pods[i].epoch = None;
                    o.pods[i].ready = false;
                    o.pods[i].terminating = false;
                }
                2 => o.pods[i].terminating = true,
                3 if o.pods[i].terminating => {
                    o.pods[i].terminating = false;
                    o.pods[i].ready = true;
                }
                4 => {
                    o.preferred_writer = if rng.next(3) == 0 {
                        Some(format!("db-{}", rng.next(u64::from(n))))
                    } else {
                        None
                    }
                }
                // Someone deletes the Lease behind the operator's back.
                5 if rng.next(4) == 0 => o.lease = None,
                _ => {}
            }
            let plan = decide(&o, now, &cfg());
            // Crash after a random prefix one time in four.
            let upto = if rng.next(4) == 0 {
                rng.next(plan.steps.len() as u64 + 1) as usize
            } else {
                plan.steps.len()
            };
            for s in &plan.steps[..upto] {
                apply(&mut o, s, now);
                assert!(
                    writers(&o) <= 1,
                    "seed {seed} t {t}: two writers after {s:?}"
                );
            }
            if upto == plan.steps.len() {
                if let Some(s) = plan.status {
                    o.status = s;
                }
                // After a complete plan the writer label and the Lease agree.
                if let (Some(w), Some(l)) = (
                    o.pods.iter().find(|p| p.role == Some(Role::Writer)),
                    &o.lease,
                ) {
                    assert_eq!(
                        l.holder.as_deref(),
                        Some(w.name.as_str()),
                        "seed {seed} t {t}"
                    );
                    assert_eq!(
                        l.holder_uid.as_deref(),
                        Some(w.uid.as_str()),
                        "seed {seed} t {t}"
                    );
                    assert_eq!(w.epoch, Some(l.transitions));
                }
            }
            if let Some(l) = &o.lease {
                assert!(l.transitions >= last_epoch);
                last_epoch = l.transitions;
            }
        }
    }
}

#[test]
fn a_healthy_writer_is_never_replaced() {
    use world::*;
    for seed in 0..200u64 {
        let mut rng = Rng::new(seed);
        let mut o = observed((0..3).map(|i| pod(i, true)).collect());
        let mut writer_uid = None;
        for t in 0..40i64 {
            let now = ts(t * 7);
            // Only non-writer pods change.
            let i = rng.next(3) as usize;
            if writer_uid.as_deref() != Some(o.pods[i].uid.as_str()) {
                o.pods[i].ready = rng.next(2) == 0;
            }
            let plan = decide(&o, now, &cfg());
            assert!(
                plan.transition
                    .as_ref()
                    .is_none_or(|tr| tr.kind == "election"),
                "seed {seed}: {:?}",
                plan.transition
            );
            for s in &plan.steps {
                apply(&mut o, s, now);
            }
            if let Some(s) = plan.status {
                o.status = s;
            }
            let w = o
                .pods
                .iter()
                .find(|p| p.role == Some(Role::Writer))
                .map(|p| p.uid.clone());
            if writer_uid.is_some() {
                assert_eq!(w, writer_uid, "seed {seed} t {t}");
            }
            writer_uid = w;
        }
    }
}
