use super::*;

fn ts(s: i64) -> Timestamp {
    Timestamp::from_second(1_800_000_000 + s).expect("ts")
}

fn pod(i: u32, ready: bool) -> Candidate {
    Candidate::example(i, format!("uid-{i}-0"), ready, ts(0))
}

fn observed(pods: Vec<Candidate>) -> Observed {
    Observed::example(pods, ts(0))
}

fn cfg() -> Config {
    Config::example()
}

fn lease(holder: &str, uid: &str, transitions: i64, renewed: i64) -> LeaseView {
    LeaseView::example(holder, uid, transitions, ts(0), ts(renewed))
}

/// The plan's first Lease write (after the epoch reservation and any leftover demotions).
fn lease_step(plan: &Plan) -> &Step {
    plan.steps
        .iter()
        .find(|s| matches!(s, Step::CreateLease { .. } | Step::UpdateLease { .. }))
        .expect("a Lease write")
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
        Step::ReserveEpoch {
            epoch: 0,
            uid: "uid-1-0".into()
        },
        "the epoch is recorded on the lock before the Lease carries it"
    );
    assert_eq!(
        *lease_step(&plan),
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
        matches!(lease_step(&plan), Step::UpdateLease { holder, transitions: 4, acquire: true, .. } if holder == "db-1")
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
        matches!(lease_step(&plan), Step::UpdateLease { holder, transitions: 2, .. } if holder == "db-1")
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
        matches!(lease_step(&plan), Step::UpdateLease { holder, transitions: 1, .. } if holder == "db-1")
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
    assert!(matches!(lease_step(&late), Step::UpdateLease { holder, .. } if holder == "db-1"));
}

#[test]
fn a_writer_keeps_its_lease_as_long_as_it_keeps_the_label() {
    // A NotReady writer waiting out failoverDelaySeconds keeps the label, so its Lease is
    // renewed when due (same holder, same epoch, no transition): the Lease moves only with
    // the label.
    let mut pods = vec![pod(0, false), pod(1, true)];
    pods[0].role = Some(Role::Writer);
    pods[0].epoch = Some(3);
    pods[0].ready_since = Some(ts(100));
    pods[1].role = Some(Role::Reader);
    let mut o = observed(pods);
    o.failover_delay_seconds = 60;
    o.lease = Some(lease("db-0", "uid-0-0", 3, 100));
    let renewal = Step::UpdateLease {
        expected_resource_version: "7".into(),
        holder: "db-0".into(),
        holder_uid: "uid-0-0".into(),
        transitions: 3,
        acquire: false,
    };
    let waiting = decide(&o, ts(116), &cfg());
    assert_eq!(waiting.steps, vec![renewal.clone()]);
    assert!(waiting.transition.is_none());
    assert_eq!(waiting.renew_after, Some(Duration::from_secs(15)));
    // Not due yet: nothing written, the renewal stays scheduled.
    let early = decide(&o, ts(104), &cfg());
    assert!(early.steps.is_empty(), "{:?}", early.steps);
    assert_eq!(early.renew_after, Some(Duration::from_secs(11)));
    // No other pod Ready: the writer keeps label and Lease.
    o.failover_delay_seconds = 0;
    o.pods[1].ready = false;
    let stuck = decide(&o, ts(116), &cfg());
    assert_eq!(stuck.steps, vec![renewal]);
    assert_eq!(stuck.renew_after, Some(Duration::from_secs(15)));
    // A failover: the new holder's renewal is due half a duration after the Lease write.
    o.pods[1].ready = true;
    let failover = decide(&o, ts(116), &cfg());
    assert!(
        matches!(lease_step(&failover), Step::UpdateLease { holder, transitions: 4, .. } if holder == "db-1")
    );
    assert_eq!(failover.renew_after, Some(Duration::from_secs(15)));
    assert!(failover.restores_writer());
    // Interrupted after the Lease moved: the promotion that completes it restores the writer
    // too (it goes first in its namespace's budget), though it is no transition of its own.
    o.pods[0].role = Some(Role::Reader);
    o.pods[0].epoch = None;
    o.lease = Some(lease("db-1", "uid-1-0", 4, 116));
    o.status.highest_epoch = Some(4);
    o.status.highest_epoch_uid = Some("uid-1-0".into());
    let completion = decide(&o, ts(117), &cfg());
    assert!(completion.transition.is_none());
    assert!(
        completion.steps.iter().any(
            |s| matches!(s, Step::Label { pod, role: Some(Role::Writer), .. } if pod == "db-1")
        ),
        "{:?}",
        completion.steps
    );
    assert!(completion.restores_writer());
    // A switchover from a healthy writer does not go first.
    o.pods[1].role = Some(Role::Writer);
    o.pods[1].epoch = Some(4);
    o.pods[0].ready = true;
    o.preferred_writer = Some("db-0".into());
    let switchover = decide(&o, ts(117), &cfg());
    assert_eq!(
        switchover.transition.as_ref().map(|t| t.kind),
        Some(TransitionKind::Switchover)
    );
    assert!(!switchover.restores_writer());
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
        matches!(lease_step(&plan), Step::UpdateLease { holder, transitions: 1, .. } if holder == "db-1")
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
    // Roles stay as they are; the sitting holder's Lease is still renewed (same epoch).
    assert!(
        matches!(plan.steps.as_slice(), [Step::UpdateLease { holder, transitions: 0, .. }] if holder == "db-0"),
        "{:?}",
        plan.steps
    );
    assert!(plan.renew_after.is_some());
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
        matches!(lease_step(&plan), Step::CreateLease { holder, transitions: 8, .. } if holder == "db-0")
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
                if let Some(p) = o
                    .pods
                    .iter_mut()
                    .find(|p| &p.name == pod && (uid.is_empty() || &p.uid == uid))
                {
                    p.role = *role;
                    p.epoch = *epoch;
                }
            }
            Step::DeleteLease { .. } => o.lease = None,
            Step::ReserveEpoch { epoch, uid } => {
                o.status.highest_epoch = Some(*epoch);
                o.status.highest_epoch_uid = Some(uid.clone());
            }
            Step::ConfirmLease { .. } => {}
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
                    .is_none_or(|tr| tr.kind == TransitionKind::Election),
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

// ---- P5: deciding from stale views and meddled-with records (DESIGN §2 rules 12 and 13) ----

/// Index of the first step matching `f`.
fn position(plan: &Plan, f: impl Fn(&Step) -> bool) -> Option<usize> {
    plan.steps.iter().position(f)
}

fn is_label(s: &Step, name: &str, want: Role) -> bool {
    matches!(s, Step::Label { pod, role: Some(r), .. } if pod == name && *r == want)
}

#[test]
fn handover_from_a_stale_pod_view_demotes_the_lease_holder_by_uid_first() {
    // The Lease already names db-1 (epoch 6), but the pod cache still shows db-1 as a reader;
    // db-1 turns NotReady. The next plan must demote db-1 — by UID, whatever the cache says —
    // before it promotes anyone, or db-1 and the new writer both carry `writer`.
    let mut pods = vec![pod(0, true), pod(1, false), pod(2, true)];
    pods[1].role = Some(Role::Reader);
    let mut o = observed(pods);
    o.lease = Some(lease("db-1", "uid-1-0", 6, 9));
    o.status.writer_pod = Some("db-1".into());
    o.status.writer_uid = Some("uid-1-0".into());
    o.status.writer_epoch = Some(6);
    let plan = decide(&o, ts(10), &cfg());
    let demote = position(&plan, |s| {
        matches!(s, Step::Label { pod, uid, role: Some(Role::Reader), .. } if pod == "db-1" && uid == "uid-1-0")
    })
    .expect("the Lease's holder is demoted by UID");
    let promote = position(&plan, |s| is_label(s, "db-0", Role::Writer)).expect("db-0 promoted");
    assert!(demote < promote, "{:?}", plan.steps);
    assert!(
        matches!(lease_step(&plan), Step::UpdateLease { holder, transitions: 7, .. } if holder == "db-0")
    );
}

#[test]
fn a_labels_only_plan_confirms_the_lease_before_it_promotes() {
    // The Lease moved db-0 → db-1 (epoch 5), the Lease cache still shows db-0 (epoch 4), and
    // db-0 — a reader now — is Ready again: a plan from that view would relabel db-0 `writer`
    // with the old epoch while the Lease names db-1.
    let mut pods = vec![pod(0, true), pod(1, true)];
    pods[0].role = Some(Role::Reader);
    pods[1].role = Some(Role::Reader);
    let mut o = observed(pods);
    o.lease = Some(lease("db-0", "uid-0-0", 4, 9));
    let plan = decide(&o, ts(10), &cfg());
    // Carried out against the truth, the plan must stop before labelling anyone writer against
    // the Lease: a fresh read of the Lease (the plan's `ConfirmLease`) disagrees with the view.
    let (truth_holder, truth_epoch) = ("db-1", 5);
    let mut promoted_against_the_lease = None;
    for s in &plan.steps {
        if let Step::Label {
            pod,
            role: Some(Role::Writer),
            epoch,
            ..
        } = s
            && (pod != truth_holder || *epoch != Some(truth_epoch))
        {
            promoted_against_the_lease = Some(s.clone());
            break;
        }
        // Debug name, not a pattern: the step is what this test is about.
        if format!("{s:?}").starts_with("ConfirmLease") {
            assert!(
                format!("{s:?}").contains("\"db-0\""),
                "confirms the view it was made from: {s:?}"
            );
            break; // the truth names db-1: the confirmation fails and the plan stops here
        }
    }
    assert_eq!(
        promoted_against_the_lease, None,
        "labelled writer against the Lease: {:?}",
        plan.steps
    );
}

#[test]
fn an_edited_lease_holder_gets_a_new_epoch_not_the_old_writers() {
    // `kubectl edit lease`: holderIdentity (and the UID annotation) now name db-1, but epoch 6
    // is db-0's (the status and db-0's own annotation say so). db-1 must not become writer with
    // epoch 6: two pods would have held it.
    let mut pods = vec![pod(0, true), pod(1, true)];
    pods[0].role = Some(Role::Writer);
    pods[0].epoch = Some(6);
    pods[1].role = Some(Role::Reader);
    let mut o = observed(pods);
    o.lease = Some(lease("db-1", "uid-1-0", 6, 9));
    o.status.writer_pod = Some("db-0".into());
    o.status.writer_uid = Some("uid-0-0".into());
    o.status.writer_epoch = Some(6);
    let plan = decide(&o, ts(10), &cfg());
    for s in &plan.steps {
        if let Step::Label {
            role: Some(Role::Writer),
            epoch,
            ..
        } = s
        {
            assert!(epoch.is_some_and(|e| e > 6), "{s:?}");
        }
    }
    assert!(
        matches!(lease_step(&plan), Step::UpdateLease { transitions, .. } if *transitions > 6),
        "{:?}",
        plan.steps
    );
    let t = plan.transition.clone().expect("counted as a transition");
    assert!(t.epoch > 6);
    // db-0 (the writer by every other record) is demoted before anyone is promoted.
    let demote = position(&plan, |s| is_label(s, "db-0", Role::Reader)).expect("db-0 demoted");
    let promote = position(&plan, |s| {
        matches!(
            s,
            Step::Label {
                role: Some(Role::Writer),
                ..
            }
        )
    })
    .expect("a promotion");
    assert!(demote < promote);
}

#[test]
fn a_lowered_lease_transitions_never_rewrites_the_writers_epoch_downwards() {
    // Someone lowered leaseTransitions from 6 to 2 while db-0 is the healthy writer.
    let mut pods = vec![pod(0, true), pod(1, true)];
    pods[0].role = Some(Role::Writer);
    pods[0].epoch = Some(6);
    pods[1].role = Some(Role::Reader);
    let mut o = observed(pods);
    o.lease = Some(lease("db-0", "uid-0-0", 2, 9));
    o.status.writer_pod = Some("db-0".into());
    o.status.writer_uid = Some("uid-0-0".into());
    o.status.writer_epoch = Some(6);
    let plan = decide(&o, ts(10), &cfg());
    for s in &plan.steps {
        match s {
            Step::Label { epoch: Some(e), .. } => {
                assert!(*e > 6, "epoch annotation rewritten to {e}: {s:?}")
            }
            Step::UpdateLease { transitions, .. } | Step::CreateLease { transitions, .. } => {
                assert!(*transitions > 6, "Lease written with epoch {transitions}")
            }
            _ => {}
        }
    }
    assert!(
        matches!(lease_step(&plan), Step::UpdateLease { holder, .. } if holder == "db-0"),
        "the healthy writer keeps the role, under a fresh epoch"
    );
}

#[test]
fn deleting_a_lock_that_lost_a_conflict_or_a_lease_never_strips_the_winners_writer() {
    let mut pods = vec![pod(0, true), pod(1, true)];
    pods[0].role = Some(Role::Writer);
    pods[0].epoch = Some(3);
    pods[1].role = Some(Role::Reader);
    let remove = Config {
        on_delete: OnDelete::RemoveLabels,
        ..cfg()
    };
    // Lost a conflict: an older lock manages the same StatefulSet.
    let mut o = observed(pods.clone());
    o.deleting = true;
    o.rivals = vec![Rival {
        name: "older".into(),
        created: ts(-100),
        statefulset: "db".into(),
        lease_name: "other-lease".into(),
    }];
    let plan = decide(&o, ts(10), &remove);
    assert!(
        !plan.steps.iter().any(|s| matches!(s, Step::Label { .. })),
        "{:?}",
        plan.steps
    );
    assert!(plan.steps.contains(&Step::RemoveFinalizer));
    // LeaseNotOwned: the Lease belongs to another lock.
    let mut o = observed(pods.clone());
    o.deleting = true;
    let mut l = lease("db-0", "uid-0-0", 3, 9);
    l.owner = Some("ns/someone-else".into());
    o.lease = Some(l);
    let plan = decide(&o, ts(10), &remove);
    assert!(
        !plan
            .steps
            .iter()
            .any(|s| matches!(s, Step::Label { .. } | Step::DeleteLease { .. })),
        "{:?}",
        plan.steps
    );
    // The lock that does manage the set still removes the labels it put there.
    let mut o = observed(pods);
    o.deleting = true;
    o.lease = Some(lease("db-0", "uid-0-0", 3, 9));
    let plan = decide(&o, ts(10), &remove);
    assert!(
        plan.steps
            .iter()
            .any(|s| matches!(s, Step::Label { role: None, .. }))
    );
}

#[test]
fn paused_keeps_renewing_and_a_duration_edit_reaches_the_lease_at_once() {
    let mut pods = vec![pod(0, true), pod(1, true)];
    pods[0].role = Some(Role::Writer);
    pods[0].epoch = Some(3);
    pods[1].role = Some(Role::Reader);
    let mut o = observed(pods);
    o.lease = Some(lease("db-0", "uid-0-0", 3, 0));
    o.status.writer_pod = Some("db-0".into());
    o.status.writer_uid = Some("uid-0-0".into());
    o.status.writer_epoch = Some(3);
    // Paused, renewal due (30 s lease renewed 16 s ago): renewed, nothing else.
    o.paused = true;
    let plan = decide(&o, ts(16), &cfg());
    assert!(
        matches!(plan.steps.as_slice(), [Step::UpdateLease { holder, transitions: 3, acquire: false, .. }] if holder == "db-0"),
        "{:?}",
        plan.steps
    );
    assert_eq!(plan.renew_after, Some(std::time::Duration::from_secs(15)));
    // Not paused, renewed 2 s ago, but leaseDurationSeconds changed 30 → 10: the Lease gets
    // the new duration now and the next renewal is due at half of it.
    o.paused = false;
    o.lease_duration_seconds = 10;
    let plan = decide(&o, ts(2), &cfg());
    assert!(
        plan.steps.iter().any(
            |s| matches!(s, Step::UpdateLease { holder, transitions: 3, .. } if holder == "db-0")
        ),
        "{:?}",
        plan.steps
    );
    assert_eq!(plan.renew_after, Some(std::time::Duration::from_secs(5)));
}

#[test]
fn an_epoch_issued_behind_a_lost_response_is_never_issued_again_after_the_lease_is_deleted() {
    // A switchover db-0 → db-1 reserved epoch 7 and moved the Lease (committed, answer lost);
    // then someone deleted the Lease. db-0 is still the labelled, Ready writer with epoch 6.
    let mut pods = vec![pod(0, true), pod(1, true)];
    pods[0].role = Some(Role::Writer);
    pods[0].epoch = Some(6);
    pods[1].role = Some(Role::Reader);
    let mut o = observed(pods);
    o.status.writer_pod = Some("db-0".into());
    o.status.writer_uid = Some("uid-0-0".into());
    o.status.writer_epoch = Some(6);
    o.status.highest_epoch = Some(7);
    o.status.highest_epoch_uid = Some("uid-1-0".into());
    let plan = decide(&o, ts(10), &cfg());
    match lease_step(&plan) {
        Step::CreateLease { transitions, .. } => assert!(*transitions >= 8, "{:?}", plan.steps),
        s => panic!("expected a new Lease, got {s:?}"),
    }
    for s in &plan.steps {
        if let Step::Label { epoch: Some(e), .. } = s {
            assert!(*e >= 8, "{s:?}");
        }
    }
}

#[test]
fn pausing_a_stable_lock_is_an_event_once() {
    let mut pods = vec![pod(0, true), pod(1, true)];
    pods[0].role = Some(Role::Writer);
    pods[0].epoch = Some(3);
    pods[1].role = Some(Role::Reader);
    let mut o = observed(pods);
    o.lease = Some(lease("db-0", "uid-0-0", 3, 9));
    let settled = decide(&o, ts(10), &cfg());
    o.status = settled.status.expect("status");
    o.paused = true;
    let plan = decide(&o, ts(11), &cfg());
    assert!(
        plan.events.iter().any(|e| e.reason == "Paused"),
        "{:?}",
        plan.events
    );
    o.status = plan.status.expect("status");
    let again = decide(&o, ts(12), &cfg());
    assert!(again.events.is_empty(), "{:?}", again.events);
}

// --- Taking over from the Go operator (DESIGN §10) ------------------------------------------

/// The state the Go operator leaves: its finalizer on the lock, a Lease with a holder and no
/// marks at all, role labels without epochs, no stslock status.
fn go_state(pods: Vec<Candidate>, holder: &str, transitions: i64) -> Observed {
    let mut o = observed(pods);
    o.has_finalizer = false;
    o.go_finalizer = true;
    let mut l = lease(holder, "", transitions, 0);
    l.holder_uid = None;
    l.owner = None;
    l.unmarked = true;
    o.lease = Some(l);
    o
}

fn role(mut p: Candidate, r: Role) -> Candidate {
    p.role = Some(r);
    p
}

fn demotes(s: &Step) -> bool {
    matches!(
        s,
        Step::Label {
            role: Some(Role::Reader),
            ..
        }
    )
}

#[test]
fn a_go_lease_with_a_ready_holder_is_adopted_for_the_same_holder_and_epoch_demote_first() {
    // db-1 holds the Go Lease (Ready); db-0 is the stale NotReady writer the Go operator left.
    let o = go_state(
        vec![
            role(pod(0, false), Role::Writer),
            role(pod(1, true), Role::Writer),
            role(pod(2, true), Role::Reader),
        ],
        "db-1",
        4,
    );
    let plan = decide(&o, ts(5), &cfg());
    // The stale writer is demoted before anything else is written for the lock.
    assert_eq!(
        plan.steps[0],
        Step::Label {
            pod: "db-0".into(),
            uid: "uid-0-0".into(),
            role: Some(Role::Reader),
            epoch: None
        },
        "{:?}",
        plan.steps
    );
    assert_eq!(plan.steps[1], Step::AddFinalizer, "{:?}", plan.steps);
    assert_eq!(
        *lease_step(&plan),
        Step::UpdateLease {
            expected_resource_version: "7".into(),
            holder: "db-1".into(),
            holder_uid: "uid-1-0".into(),
            transitions: 4,
            acquire: false,
        },
        "same holder, same epoch, compare-and-swap on the Go Lease"
    );
    assert!(
        !plan
            .steps
            .iter()
            .any(|s| matches!(s, Step::ReserveEpoch { .. })),
        "no new epoch"
    );
    assert!(plan.steps.contains(&Step::Label {
        pod: "db-1".into(),
        uid: "uid-1-0".into(),
        role: Some(Role::Writer),
        epoch: Some(4)
    }));
    let writers_promoted: Vec<_> = plan
        .steps
        .iter()
        .filter(|s| matches!(s, Step::Label { role: Some(Role::Writer), pod, .. } if pod != "db-1"))
        .collect();
    assert!(writers_promoted.is_empty(), "{writers_promoted:?}");
    assert_eq!(plan.events[0].reason, "Adopted");
    assert_eq!(
        plan.transition.as_ref().map(|t| t.kind),
        Some(TransitionKind::Adoption)
    );
    let st = plan.status.expect("status");
    assert_eq!(st.writer_pod.as_deref(), Some("db-1"));
    assert_eq!(st.writer_uid.as_deref(), Some("uid-1-0"));
    assert_eq!(st.writer_epoch, Some(4));
    assert!(
        plan.renew_after.is_some(),
        "the adopted Lease gets a renewal entry"
    );
}

#[test]
fn a_go_lease_whose_holder_is_not_ready_is_adopted_by_a_failover_demote_first() {
    let o = go_state(
        vec![
            role(pod(0, false), Role::Writer),
            role(pod(1, true), Role::Reader),
        ],
        "db-0",
        2,
    );
    let plan = decide(&o, ts(5), &cfg());
    let lease_at = plan
        .steps
        .iter()
        .position(|s| matches!(s, Step::UpdateLease { .. }))
        .expect("a Lease write");
    assert!(demotes(&plan.steps[0]), "{:?}", plan.steps);
    assert!(
        plan.steps[..lease_at].iter().any(
            |s| matches!(s, Step::Label { pod, role: Some(Role::Reader), .. } if pod == "db-0")
        ),
        "the Go writer is demoted before the Lease moves: {:?}",
        plan.steps
    );
    assert!(matches!(
        &plan.steps[lease_at],
        Step::UpdateLease { holder, transitions: 3, acquire: true, .. } if holder == "db-1"
    ));
    let finalizer_at = plan
        .steps
        .iter()
        .position(|s| *s == Step::AddFinalizer)
        .expect("finalizer swap");
    assert!(
        plan.steps[..finalizer_at].iter().all(demotes),
        "{:?}",
        plan.steps
    );
    assert!(plan.events.iter().any(|e| e.reason == "Adopted"));
    assert_eq!(
        plan.transition.as_ref().map(|t| t.kind),
        Some(TransitionKind::Failover)
    );
}

#[test]
fn a_lease_that_only_looks_like_the_go_operators_is_never_written() {
    let pods = vec![role(pod(0, true), Role::Writer), pod(1, true)];
    // Held by something that is not a pod of this StatefulSet.
    let mut other_holder = go_state(pods.clone(), "some-other-app-0", 1);
    // Marked by another workload (a label, an annotation or an owner reference).
    let mut marked = go_state(pods.clone(), "db-0", 1);
    marked.lease.as_mut().expect("lease").unmarked = false;
    for o in [&mut other_holder, &mut marked] {
        let plan = decide(o, ts(5), &cfg());
        assert!(
            !plan.steps.iter().any(|s| matches!(
                s,
                Step::UpdateLease { .. } | Step::CreateLease { .. } | Step::DeleteLease { .. }
            )),
            "{:?}",
            plan.steps
        );
        assert!(
            !plan.steps.iter().any(|s| matches!(s, Step::Label { .. })),
            "labels are not touched either: {:?}",
            plan.steps
        );
        assert_eq!(plan.events[0].reason, "LeaseNotOwned");
        // The Go finalizer is still replaced: a deleted lock must not hang on it.
        assert_eq!(plan.steps, vec![Step::AddFinalizer]);
        // Deleting it never deletes that Lease nor strips labels.
        o.deleting = true;
        let del = decide(
            o,
            ts(6),
            &Config {
                on_delete: OnDelete::RemoveLabels,
                ..cfg()
            },
        );
        assert_eq!(del.steps, vec![Step::RemoveFinalizer]);
    }
    assert!(is_pod_name_of("db-12", "db"));
    assert!(!is_pod_name_of("db-", "db") && !is_pod_name_of("db-x1", "db"));
    assert!(!is_pod_name_of("dbx-1", "db"));
}

#[test]
fn a_lock_with_only_the_go_finalizer_is_deleted_and_its_go_lease_with_it() {
    let mut o = go_state(vec![role(pod(0, true), Role::Writer)], "db-0", 0);
    o.deleting = true;
    let plan = decide(&o, ts(5), &cfg());
    assert_eq!(
        plan.steps,
        vec![
            Step::DeleteLease {
                expected_resource_version: "7".into()
            },
            Step::RemoveFinalizer
        ]
    );
}

#[test]
fn a_lease_renewed_by_another_writer_is_not_fought_until_it_expires() {
    let pods = vec![
        role(pod(0, true), Role::Writer),
        role(pod(1, true), Role::Reader),
    ];
    let mut o = observed(pods);
    let mut l = lease("db-0", "uid-0-0", 3, 10);
    // stslock last wrote renewTime ts(0); someone else renewed at ts(10).
    l.renewed_mark = Some(ts(0));
    o.lease = Some(l.clone());
    o.go_finalizer = true; // the Go operator re-added its finalizer too
    let before = o.status.clone();
    let plan = decide(&o, ts(20), &cfg());
    assert!(plan.steps.is_empty(), "{:?}", plan.steps);
    assert_eq!(plan.events[0].reason, "ConcurrentWriter");
    let st = plan.status.clone().expect("the condition is reported");
    assert!(
        st.conditions
            .iter()
            .any(|c| c.type_ == "Error" && c.status == "True" && c.reason == "ConcurrentWriter")
    );
    assert_eq!(
        st.shard, before.shard,
        "nothing else of the status is rewritten"
    );
    assert_eq!(
        plan.requeue_after,
        Some(Duration::from_millis(20_500)),
        "wait until that Lease expires"
    );
    // Reported once: the same state again writes nothing, sends no Event.
    let mut again = o.clone();
    again.status = st;
    let plan2 = decide(&again, ts(25), &cfg());
    assert!(plan2.steps.is_empty() && plan2.status.is_none() && plan2.events.is_empty());
    // Once it expired unrenewed, stslock takes it back for the same Ready holder, no transition.
    let plan3 = decide(&again, ts(41), &cfg());
    assert!(matches!(
        lease_step(&plan3),
        Step::UpdateLease { holder, transitions: 3, acquire: true, .. } if holder == "db-0"
    ));
    assert!(plan3.transition.is_none());
    // A Lease of ours renewed by us (mark == renewTime), or from before the mark: business as usual.
    l.renewed_mark = l.renew_time;
    o.lease = Some(l);
    assert!(
        decide(&o, ts(11), &cfg())
            .events
            .iter()
            .all(|e| e.reason != "ConcurrentWriter")
    );
}

#[test]
fn without_a_lease_the_go_operators_single_ready_writer_keeps_the_role() {
    let o = observed(vec![
        pod(0, true),
        role(pod(1, true), Role::Writer),
        role(pod(2, false), Role::Writer),
    ]);
    let plan = decide(&o, ts(5), &cfg());
    assert!(matches!(
        lease_step(&plan),
        Step::CreateLease { holder, transitions: 0, .. } if holder == "db-1"
    ));
    assert!(plan.steps.contains(&Step::Label {
        pod: "db-2".into(),
        uid: "uid-2-0".into(),
        role: Some(Role::Reader),
        epoch: None
    }));
    assert!(
        !plan.steps.iter().any(
            |s| matches!(s, Step::Label { pod, role: Some(Role::Writer), .. } if pod != "db-1")
        )
    );
    // Two Ready writers: neither is trusted; a normal election, demote first.
    let two = observed(vec![
        role(pod(0, true), Role::Writer),
        role(pod(1, true), Role::Writer),
    ]);
    let plan = decide(&two, ts(5), &cfg());
    let create = plan
        .steps
        .iter()
        .position(|s| matches!(s, Step::CreateLease { .. }))
        .expect("create");
    assert!(plan.steps[..create].iter().filter(|s| demotes(s)).count() >= 1);
}

/// A failover whose epoch reservation committed but whose answer was lost (the plan stopped
/// there) is retried with the epoch reserved for the same pod, without another reservation;
/// a reservation for another pod, or one the Lease or a pod already carries, is never reused.
#[test]
fn a_reservation_left_by_a_stopped_plan_is_reused_for_the_same_pod_only() {
    let mut pods = vec![pod(0, false), pod(1, true), pod(2, true)];
    pods[0].role = Some(Role::Writer);
    pods[0].epoch = Some(3);
    let mut o = observed(pods);
    o.lease = Some(lease("db-0", "uid-0-0", 3, 5));
    o.status.writer_epoch = Some(3);
    o.status.highest_epoch = Some(4);
    o.status.highest_epoch_uid = Some("uid-1-0".into());
    let plan = decide(&o, ts(10), &cfg());
    assert!(
        matches!(lease_step(&plan), Step::UpdateLease { holder, transitions: 4, .. } if holder == "db-1"),
        "{:?}",
        plan.steps
    );
    assert!(
        !plan
            .steps
            .iter()
            .any(|s| matches!(s, Step::ReserveEpoch { .. })),
        "epoch 4 is already reserved for db-1: {:?}",
        plan.steps
    );
    // Reserved for another pod (db-1 is not Ready now): db-2 gets a new epoch, reserved first.
    let mut other = o.clone();
    other.pods[1].ready = false;
    let plan = decide(&other, ts(10), &cfg());
    assert!(
        matches!(lease_step(&plan), Step::UpdateLease { holder, transitions: 5, .. } if holder == "db-2"),
        "{:?}",
        plan.steps
    );
    assert!(plan.steps.contains(&Step::ReserveEpoch {
        epoch: 5,
        uid: "uid-2-0".into()
    }));
    // The reserved epoch is already on the Lease (for someone): never reused.
    let mut carried = o.clone();
    carried.lease = Some(lease("db-0", "uid-0-0", 4, 5));
    let plan = decide(&carried, ts(10), &cfg());
    assert!(
        plan.steps.iter().all(
            |s| !matches!(s, Step::UpdateLease { transitions: 4, holder, .. } if holder == "db-1")
        ),
        "{:?}",
        plan.steps
    );
}

/// Random, even inconsistent, views (pods, Lease, status and spec drawn independently, as
/// stale caches, third parties and old operators can leave them) fed to `decide`: it never
/// panics, never promotes while another pod keeps `writer`, promotes only the Lease's holder,
/// never writes a Lease it does not own, and never issues an epoch at or below one that any
/// record shows as issued. A fixed seed budget runs in the default test run.
mod fuzz {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    const UIDS: [&str; 6] = ["u0", "u1", "u2", "u3", "u4", "gone"];

    fn pick<'a>(rng: &mut StdRng, from: &[&'a str]) -> &'a str {
        from[rng.random_range(0..from.len())]
    }

    fn maybe<T>(rng: &mut StdRng, p: f64, f: impl FnOnce(&mut StdRng) -> T) -> Option<T> {
        rng.random_bool(p).then(|| f(rng))
    }

    fn view(rng: &mut StdRng) -> Observed {
        let n = rng.random_range(0..=4usize);
        let pods: Vec<Candidate> = (0..n)
            .map(|i| {
                let mut p = Candidate::example(
                    i as u32,
                    // Unique per pod, as the API server makes them; records may hold others.
                    UIDS[i].to_string(),
                    rng.random_bool(0.7),
                    ts(rng.random_range(0..100)),
                );
                p.terminating = rng.random_bool(0.1);
                p.role = match rng.random_range(0..3) {
                    0 => None,
                    1 => Some(Role::Writer),
                    _ => Some(Role::Reader),
                };
                p.epoch = maybe(rng, 0.5, |r| r.random_range(0..8));
                p
            })
            .collect();
        let names: Vec<String> = (0..5).map(|i| format!("db-{i}")).collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let mut o = observed(pods);
        o.replicas = maybe(rng, 0.95, |_| n as i32);
        o.paused = rng.random_bool(0.1);
        o.deleting = rng.random_bool(0.05);
        o.has_finalizer = rng.random_bool(0.9);
        o.go_finalizer = rng.random_bool(0.05);
        o.failover_delay_seconds = if rng.random_bool(0.8) {
            0
        } else {
            rng.random_range(1..30)
        };
        o.preferred_writer = maybe(rng, 0.15, |r| pick(r, &names).to_string());
        o.lease = maybe(rng, 0.8, |r| {
            let mut l = lease(
                pick(r, &names),
                pick(r, &UIDS),
                r.random_range(0..8),
                r.random_range(40..100),
            );
            if r.random_bool(0.1) {
                l.holder_uid = None;
            }
            l.duration_seconds = r.random_range(1..60);
            match r.random_range(0..10) {
                0 => l.owner = Some("ns/other".into()),
                1 => {
                    // Left by the Go operator (no marks: no holder UID either), or marked
                    // by someone else.
                    l.owner = None;
                    l.unmarked = r.random_bool(0.5);
                    if l.unmarked {
                        l.holder_uid = None;
                    }
                }
                _ => {}
            }
            l.renewed_mark = match r.random_range(0..3) {
                0 => None,
                1 => l.renew_time,
                _ => Some(ts(r.random_range(0..100))),
            };
            l
        });
        o.status.writer_uid = maybe(rng, 0.6, |r| pick(r, &UIDS).to_string());
        o.status.writer_epoch = maybe(rng, 0.6, |r| r.random_range(0..8));
        o.status.highest_epoch = maybe(rng, 0.6, |r| r.random_range(0..9));
        o.status.highest_epoch_uid = maybe(rng, 0.6, |r| pick(r, &UIDS).to_string());
        o
    }

    /// Every epoch a record shows as issued: the Lease's, the writer's in status, pods'.
    fn issued(o: &Observed) -> Option<i64> {
        o.pods
            .iter()
            .filter_map(|p| p.epoch)
            .chain(o.lease.as_ref().map(|l| l.transitions))
            .chain(o.status.writer_epoch)
            .max()
    }

    fn check(o: &Observed, plan: &Plan) -> Result<(), String> {
        let lease_writes: Vec<(&str, &str, i64)> = plan
            .steps
            .iter()
            .filter_map(|s| match s {
                Step::CreateLease {
                    holder,
                    holder_uid,
                    transitions,
                }
                | Step::UpdateLease {
                    holder,
                    holder_uid,
                    transitions,
                    ..
                } => Some((holder.as_str(), holder_uid.as_str(), *transitions)),
                _ => None,
            })
            .collect();
        let foreign = o.lease.as_ref().is_some_and(|l| {
            l.owner.as_deref().is_some_and(|w| w != "ns/lock") || (l.owner.is_none() && !l.unmarked)
        });
        let touches_lease = plan.steps.iter().any(|s| {
            matches!(
                s,
                Step::UpdateLease { .. } | Step::DeleteLease { .. } | Step::CreateLease { .. }
            )
        });
        if foreign && touches_lease {
            return Err("wrote a Lease another owner marked".into());
        }
        // A new holder's epoch is above every record of an issued one (or exactly the epoch
        // the lock reserved for that very pod and nothing carries yet).
        let before = o.lease.as_ref().and_then(|l| l.holder_uid.as_deref());
        for (name, uid, epoch) in &lease_writes {
            // No Lease: re-created for the sitting writer with the epoch it carries is no new
            // issue, if no record shows a later one.
            // (A writer label without any epoch anywhere — the Go operator's — gets the first.)
            let floor = issued(o);
            let sitting = o.lease.is_none()
                && o.pods.iter().any(|p| {
                    p.uid == *uid
                        && p.role == Some(Role::Writer)
                        && (p.epoch == Some(*epoch)
                            || (p.epoch.is_none() && floor.is_none() && *epoch == 0))
                });
            if sitting {
                if floor.is_some_and(|f| f > *epoch) {
                    return Err(format!(
                        "re-created at epoch {epoch}, issued up to {floor:?}"
                    ));
                }
                continue;
            }
            // The same holder: same name, and same UID where the Lease records one (the Go
            // operator's Leases name the pod only).
            let moved = o.lease.as_ref().is_none_or(|l| {
                l.holder.as_deref() != Some(*name)
                    || l.holder_uid.as_deref().is_some_and(|u| u != *uid)
            });
            if moved && floor.is_some_and(|f| *epoch <= f) {
                return Err(format!(
                    "new holder {uid} got epoch {epoch}, issued up to {floor:?}"
                ));
            }
            if let Some(l) = &o.lease
                && *epoch < l.transitions
            {
                return Err(format!("epoch {epoch} below the Lease's {}", l.transitions));
            }
            let reserved = plan.steps.iter().any(
                |s| matches!(s, Step::ReserveEpoch { epoch: e, uid: u } if e >= epoch && u == uid),
            ) || o.status.highest_epoch.is_some_and(|h| h >= *epoch);
            if moved && !reserved {
                return Err(format!(
                    "epoch {epoch} for {uid} not recorded on the lock first"
                ));
            }
        }
        // Promotions: only with no other writer left, only the Lease's holder.
        let mut roles: Vec<(String, String, Option<Role>)> = o
            .pods
            .iter()
            .map(|p| (p.name.clone(), p.uid.clone(), p.role))
            .collect();
        let mut promoted = vec![];
        for s in &plan.steps {
            if let Step::Label { pod, role, .. } = s
                && let Some(r) = roles.iter_mut().find(|r| &r.0 == pod)
            {
                r.2 = *role;
                if *role == Some(Role::Writer) {
                    promoted.push(r.1.clone());
                }
            }
        }
        if !promoted.is_empty() {
            let writers: Vec<&str> = roles
                .iter()
                .filter(|r| r.2 == Some(Role::Writer))
                .map(|r| r.0.as_str())
                .collect();
            if writers.len() > 1 {
                return Err(format!("promoted while {writers:?} carry writer"));
            }
            let holder = lease_writes.last().map(|w| w.1).or(before);
            if promoted.iter().any(|p| Some(p.as_str()) != holder) {
                return Err(format!(
                    "promoted {promoted:?}, the Lease holder is {holder:?}"
                ));
            }
        }
        Ok(())
    }

    #[test]
    fn random_views_never_promote_a_second_writer_nor_reissue_an_epoch() {
        let cfg = cfg();
        for seed in 0..20_000u64 {
            let mut rng = StdRng::seed_from_u64(seed);
            let o = view(&mut rng);
            let now = ts(rng.random_range(50..140));
            let plan = decide(&o, now, &cfg);
            if let Err(e) = check(&o, &plan) {
                panic!("seed {seed}: {e}\nview: {o:#?}\nplan: {plan:#?}");
            }
        }
    }
}

#[test]
fn a_failover_retried_after_its_lease_write_failed_says_so_and_keeps_its_epoch() {
    // The first try demoted db-0 and reserved epoch 1 for db-1; its Lease write then lost to
    // a renewal (409). The retry sees a reservation above the Lease's epoch: it repairs the
    // epoch as for an edit from outside (a committed write later overwritten looks the
    // same), with the reserved epoch, and says what it saw.
    let mut pods = vec![pod(0, false), pod(1, true)];
    pods[0].role = Some(Role::Reader);
    pods[1].role = Some(Role::Reader);
    let mut o = observed(pods);
    o.lease = Some(lease("db-0", "uid-0-0", 0, 5));
    o.status.writer_pod = Some("db-0".into());
    o.status.writer_uid = Some("uid-0-0".into());
    o.status.writer_epoch = Some(0);
    o.status.highest_epoch = Some(1);
    o.status.highest_epoch_uid = Some("uid-1-0".into());
    let plan = decide(&o, ts(6), &cfg());
    assert!(
        matches!(lease_step(&plan), Step::UpdateLease { holder, transitions: 1, .. } if holder == "db-1"),
        "{:?}",
        plan.steps
    );
    let t = plan.transition.as_ref().expect("a transition");
    assert_eq!(t.kind, TransitionKind::EpochRepair);
    assert!(
        t.reason
            .contains("reserved epoch 1 for db-1 but the Lease shows epoch 0 (holder db-0)"),
        "{}",
        t.reason
    );
    // A pod carrying an epoch above the Lease's is no unfinished handover of this lock's: the
    // reason is the edit from outside.
    o.pods[1].epoch = Some(2);
    let plan = decide(&o, ts(6), &cfg());
    let t = plan.transition.as_ref().expect("a transition");
    assert!(t.reason.contains("changed outside stslock"), "{}", t.reason);
}
