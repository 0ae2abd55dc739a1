//! A model check of the whole decision loop: the real [`stslock::elect::decide`] driven by a
//! model of the reconciler shell, several operator replicas and a hostile world, with every
//! invariant checked after every single committed write.
//!
//! The world is one StatefulSet of three pods, its Lease and its StatefulSetLock, each object
//! with its full history of committed versions. Each replica sees every object through its own
//! cache, which lags the truth independently (it advances to some newer committed version at
//! random moments, never backwards). Writes can fail before committing, or commit and lose their
//! response. Replicas crash at any step (and restart with caches that may be older than the
//! truth), hand locks off and claim dead peers' locks. A third party deletes the Lease, edits its
//! holder or lowers its `leaseTransitions`, strips role labels; pods flap, are deleted and
//! recreated under the same name.
//!
//! The shell modelled here is the one `stslock::reconcile` implements (DESIGN §2 rules 12–16):
//! write responses update the caches; a write with an unknown outcome, a restart, a claim or a
//! closed fence makes the lock untrusted, and an untrusted lock is re-read (quorum reads) before
//! it is decided again; every write re-checks ownership; a handoff aborts the old owner's plan
//! before the label moves. The model is the specification of those mechanisms; the integration
//! tests check the real shell against kubesim with the same faults.
//!
//! A pod label write can also be served late: the replica gets no answer (an unknown outcome)
//! and the write is applied at some later moment, its guards checked then — after the replica
//! moved on, crashed, or lost the lock. The shell fences against that (DESIGN §2 rule 12): a
//! promotion is a compare-and-swap on the pod version its plan saw, and a demotion always makes
//! a new version of the pod. `STSLOCK_MODEL_UNFENCED=1` models the shell without either (a
//! demotion of a reader is a no-op, a promotion is guarded by UID only), to show what they are
//! for (with `STSLOCK_MODEL_REPORT=1`: violations of invariants 1 and 2).
//!
//! Invariants, after every commit:
//! 1. at most one pod labelled `writer`;
//! 2. a writer-labelled pod is the Lease holder the operator last wrote (same UID), or the
//!    holder before it (during the demote step of a handover);
//! 3. every epoch the operator writes (Lease `leaseTransitions` for a holder, a writer's epoch
//!    annotation) was issued to that pod only, and new epochs are strictly above all earlier ones;
//! 4. no operator write for the lock commits from a replica that does not own it at that commit
//!    (a write served late is applied by the apiserver after its replica gave up on it: it is
//!    held to 1–3 only).
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: panics are failures

use std::collections::BTreeMap;

use jiff::{SignedDuration, Timestamp};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use stslock::api::StatefulSetLockStatus;
use stslock::elect::OnDelete;
use stslock::elect::{Candidate, Config, LeaseView, Observed, Plan, Role, Step, decide};

const PODS: usize = 3;
const LEASE_SECONDS: i64 = 3;

#[derive(Debug, Clone, PartialEq)]
struct PodT {
    uid: String,
    ready: bool,
    ready_since: Timestamp,
    terminating: bool,
    role: Option<Role>,
    epoch: Option<i64>,
}

#[derive(Debug, Clone, PartialEq)]
struct LeaseT {
    holder: Option<String>,
    holder_uid: Option<String>,
    transitions: i64,
    renew_time: Timestamp,
    acquire_time: Timestamp,
    duration: i64,
}

#[derive(Debug, Clone, PartialEq)]
struct LockT {
    status: StatefulSetLockStatus,
    shard: Option<usize>,
    finalizer: bool,
}

/// Every committed version of one object; `None` is absent (deleted).
#[derive(Debug, Clone)]
struct Hist<T> {
    versions: Vec<(u64, Option<T>)>,
}

impl<T: Clone> Hist<T> {
    fn new(rv: u64, v: Option<T>) -> Self {
        Hist {
            versions: vec![(rv, v)],
        }
    }
    fn head(&self) -> usize {
        self.versions.len() - 1
    }
    fn truth(&self) -> &Option<T> {
        &self.versions[self.head()].1
    }
    fn rv(&self) -> u64 {
        self.versions[self.head()].0
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Obj {
    Pod(usize),
    Lease,
    Lock,
}

/// One replica's cache positions: an index into each object's history.
#[derive(Debug, Clone)]
struct View {
    pods: [usize; PODS],
    lease: usize,
    lock: usize,
}

#[derive(Debug, Clone)]
struct Running {
    plan: Plan,
    /// The pod versions the plan was made from: (UID, resourceVersion) by pod index.
    seen: [Option<(String, u64)>; PODS],
    next: usize,
    /// The lock resourceVersion the plan's lock writes are compare-and-swap on (advanced by
    /// the plan's own lock writes).
    lock_rv: u64,
    status_done: bool,
}

#[derive(Debug, Clone)]
struct Replica {
    up: bool,
    view: View,
    running: Option<Running>,
    /// The lock was re-read since the last event that makes a view untrustworthy.
    trusted: bool,
}

/// A pod label write the replica gave up on, still to be served (its guards checked then).
#[derive(Debug, Clone)]
struct LateWrite {
    r: usize,
    pod: usize,
    uid: String,
    role: Option<Role>,
    epoch: Option<i64>,
    /// The promotion's compare-and-swap on the pod version its plan saw.
    guard: Option<u64>,
}

struct World {
    rng: StdRng,
    /// The shell without fencing (see the module doc).
    unfenced: bool,
    late: Vec<LateWrite>,
    /// A late write is being applied (invariant 4 does not apply to it).
    landing_late: bool,
    rv: u64,
    now: Timestamp,
    pods: Vec<Hist<PodT>>,
    uids: u64,
    lease: Hist<LeaseT>,
    lock: Hist<LockT>,
    replicas: Vec<Replica>,
    /// epoch → the pod UID it was issued to.
    issued: BTreeMap<i64, String>,
    /// The Lease holder UID the operator last wrote, and the one before it.
    op_holder: Option<String>,
    op_prev_holder: Option<String>,
    /// The trace of what happened, printed on a violation.
    log: Vec<String>,
}

fn pod_name(i: usize) -> String {
    format!("db-{i}")
}

fn cfg(replica: usize) -> Config {
    Config {
        on_delete: OnDelete::KeepWriter,
        identity: format!("r{replica}"),
        max_locks_per_namespace: None,
    }
}

/// What went wrong with one write.
enum WriteErr {
    /// A precondition failed (409): nothing committed.
    Conflict,
    /// The request failed before committing (5xx) or the response was lost after committing:
    /// the replica cannot tell which.
    Unknown,
}

impl World {
    fn new(seed: u64, replicas: usize) -> World {
        let now = Timestamp::from_second(1_800_000_000).unwrap();
        let mut w = World {
            rng: StdRng::seed_from_u64(seed),
            unfenced: std::env::var("STSLOCK_MODEL_UNFENCED").is_ok(),
            late: vec![],
            landing_late: false,
            rv: 1,
            now,
            pods: vec![],
            uids: 0,
            lease: Hist::new(1, None),
            lock: Hist::new(
                1,
                Some(LockT {
                    status: StatefulSetLockStatus::default(),
                    shard: Some(0),
                    finalizer: false,
                }),
            ),
            replicas: vec![],
            issued: BTreeMap::new(),
            op_holder: None,
            op_prev_holder: None,
            log: vec![],
        };
        for _ in 0..PODS {
            let uid = w.new_uid();
            w.pods.push(Hist::new(
                1,
                Some(PodT {
                    uid,
                    ready: true,
                    ready_since: now,
                    terminating: false,
                    role: None,
                    epoch: None,
                }),
            ));
        }
        for _ in 0..replicas {
            w.replicas.push(Replica {
                up: true,
                view: View {
                    pods: [0; PODS],
                    lease: 0,
                    lock: 0,
                },
                running: None,
                trusted: false,
            });
        }
        w
    }

    fn new_uid(&mut self) -> String {
        self.uids += 1;
        format!("uid-{}", self.uids)
    }

    fn next_rv(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    fn hist_len(&self, o: Obj) -> usize {
        match o {
            Obj::Pod(i) => self.pods[i].versions.len(),
            Obj::Lease => self.lease.versions.len(),
            Obj::Lock => self.lock.versions.len(),
        }
    }

    fn view_pos(view: &mut View, o: Obj) -> &mut usize {
        match o {
            Obj::Pod(i) => &mut view.pods[i],
            Obj::Lease => &mut view.lease,
            Obj::Lock => &mut view.lock,
        }
    }

    /// Commit a new version of `o`; `by` is the operator replica that wrote it (None: a third
    /// party or a controller). Invariants are checked right after.
    fn commit_pod(&mut self, i: usize, v: Option<PodT>, by: Option<usize>, what: &str) {
        let rv = self.next_rv();
        self.pods[i].versions.push((rv, v));
        self.committed(Obj::Pod(i), by, what);
    }

    fn commit_lease(&mut self, v: Option<LeaseT>, by: Option<usize>, what: &str) {
        let rv = self.next_rv();
        self.lease.versions.push((rv, v));
        self.committed(Obj::Lease, by, what);
    }

    fn commit_lock(&mut self, v: LockT, by: Option<usize>, what: &str) {
        let rv = self.next_rv();
        self.lock.versions.push((rv, Some(v)));
        self.committed(Obj::Lock, by, what);
    }

    fn fail(&self, why: String) -> ! {
        let tail: Vec<&String> = self.log.iter().rev().take(40).rev().collect();
        panic!("{why}\n--- last events ---\n{}", {
            let lines: Vec<&str> = tail.iter().map(|s| s.as_str()).collect();
            lines.join("\n")
        });
    }

    fn committed(&mut self, o: Obj, by: Option<usize>, what: &str) {
        self.log.push(format!(
            "rv {} {:?} by {} : {what}",
            self.rv,
            o,
            by.map_or("world".into(), |r| format!("r{r}"))
        ));
        // 4. Only the owner writes.
        if let Some(r) = by.filter(|_| !self.landing_late) {
            let owner = self.lock.truth().as_ref().and_then(|l| l.shard);
            // A write to the lock that moves its own label was checked against the label before.
            let before = if o == Obj::Lock {
                let n = self.lock.versions.len();
                self.lock.versions[n - 2].1.as_ref().and_then(|l| l.shard)
            } else {
                owner
            };
            if before != Some(r) {
                self.fail(format!(
                    "invariant 4: replica r{r} wrote {o:?} while the lock is owned by {before:?}"
                ));
            }
        }
        // 1. At most one writer.
        let writers: Vec<(usize, String)> = self
            .pods
            .iter()
            .enumerate()
            .filter_map(|(i, h)| {
                h.truth()
                    .as_ref()
                    .filter(|p| p.role == Some(Role::Writer))
                    .map(|p| (i, p.uid.clone()))
            })
            .collect();
        if writers.len() > 1 {
            self.fail(format!("invariant 1: two writers {writers:?}"));
        }
        // 2. The writer is the holder the operator wrote, or the one before it.
        for (i, uid) in &writers {
            let ok =
                self.op_holder.as_ref() == Some(uid) || self.op_prev_holder.as_ref() == Some(uid);
            if !ok {
                self.fail(format!(
                    "invariant 2: db-{i} ({uid}) is labelled writer; operator's holder {:?}, previous {:?}",
                    self.op_holder, self.op_prev_holder
                ));
            }
        }
        // 3. Epochs: what an operator write carries was issued to that pod only.
        if let Some(r) = by {
            let carried: Option<(i64, String)> = match o {
                Obj::Lease => self
                    .lease
                    .truth()
                    .as_ref()
                    .and_then(|l| l.holder_uid.clone().map(|u| (l.transitions, u))),
                Obj::Pod(i) => self.pods[i]
                    .truth()
                    .as_ref()
                    .filter(|p| p.role == Some(Role::Writer))
                    .and_then(|p| p.epoch.map(|e| (e, p.uid.clone()))),
                Obj::Lock => None,
            };
            if let Some((e, uid)) = carried {
                match self.issued.get(&e) {
                    Some(u) if *u == uid => {}
                    Some(u) => self.fail(format!(
                        "invariant 3: r{r} gave epoch {e} to {uid}; it was issued to {u}"
                    )),
                    None if o == Obj::Lease => {
                        let max = self.issued.keys().next_back().copied();
                        if max.is_some_and(|m| e <= m) {
                            self.fail(format!(
                                "invariant 3: r{r} issued epoch {e} to {uid} after epoch {max:?}"
                            ));
                        }
                        self.issued.insert(e, uid.clone());
                    }
                    None => self.fail(format!(
                        "invariant 3: r{r} labelled {uid} writer with epoch {e}, never issued"
                    )),
                }
            }
            if o == Obj::Lease
                && let Some(l) = self.lease.truth()
                && l.holder_uid != self.op_holder
            {
                self.op_prev_holder = self.op_holder.take();
                self.op_holder = l.holder_uid.clone();
            }
        }
    }

    // ---------------------------------------------------------------- the replicas' views

    /// The replica's cache of `o` moves forward to a random newer committed version.
    fn advance_cache(&mut self, r: usize, o: Obj) {
        let len = self.hist_len(o);
        let pos = *Self::view_pos(&mut self.replicas[r].view, o);
        if pos + 1 < len {
            let to = self.rng.random_range(pos + 1..len);
            *Self::view_pos(&mut self.replicas[r].view, o) = to;
        }
    }

    /// A write response (or a quorum read) puts the head version into the replica's cache.
    fn see_head(&mut self, r: usize, o: Obj) {
        let head = self.hist_len(o) - 1;
        let pos = Self::view_pos(&mut self.replicas[r].view, o);
        *pos = (*pos).max(head);
    }

    fn pod_at(&self, i: usize, pos: usize) -> Option<&PodT> {
        self.pods[i].versions[pos].1.as_ref()
    }

    fn observed(&self, r: usize) -> Option<Observed> {
        let v = &self.replicas[r].view;
        let lock = self.lock.versions[v.lock].1.clone()?;
        let pods = (0..PODS)
            .filter_map(|i| {
                self.pod_at(i, v.pods[i]).map(|p| Candidate {
                    name: pod_name(i),
                    uid: p.uid.clone(),
                    ordinal: Some(i as u32),
                    ready: p.ready,
                    ready_since: Some(p.ready_since),
                    terminating: p.terminating,
                    role: p.role,
                    epoch: p.epoch,
                    resource_version: self.pods[i].versions[v.pods[i]].0,
                })
            })
            .collect();
        let (lrv, lease) = &self.lease.versions[v.lease];
        Some(Observed {
            namespace: "ns".into(),
            name: "lock".into(),
            created: Timestamp::from_second(1_700_000_000).unwrap(),
            generation: 1,
            deleting: false,
            has_finalizer: lock.finalizer,
            go_finalizer: false,
            statefulset_name: "db".into(),
            lease_name: "db-lease".into(),
            lease_duration_seconds: LEASE_SECONDS,
            paused: false,
            failover_delay_seconds: 0,
            preferred_writer: None,
            replicas: Some(PODS as i32),
            pods,
            lease: lease.as_ref().map(|l| LeaseView {
                holder: l.holder.clone(),
                holder_uid: l.holder_uid.clone(),
                transitions: l.transitions,
                renew_time: Some(l.renew_time),
                acquire_time: Some(l.acquire_time),
                duration_seconds: l.duration,
                resource_version: lrv.to_string(),
                owner: Some("ns/lock".into()),
                unmarked: false,
                renewed_mark: None,
            }),
            rivals: vec![],
            status: lock.status,
        })
    }

    fn cached_owner(&self, r: usize) -> Option<usize> {
        self.lock.versions[self.replicas[r].view.lock]
            .1
            .as_ref()
            .and_then(|l| l.shard)
    }

    // ---------------------------------------------------------------- the shell

    /// An untrusted lock is re-read: quorum reads of the lock, the Lease and the pods.
    fn reread(&mut self, r: usize) {
        self.see_head(r, Obj::Lock);
        self.see_head(r, Obj::Lease);
        for i in 0..PODS {
            self.see_head(r, Obj::Pod(i));
        }
        self.replicas[r].trusted = true;
        self.log.push(format!("r{r} re-reads"));
    }

    /// One step of replica `r`: start a plan, or apply the next step of the running one.
    fn replica_step(&mut self, r: usize) {
        if !self.replicas[r].up {
            return;
        }
        if self.replicas[r].running.is_none() {
            if self.cached_owner(r) != Some(r) {
                return;
            }
            if !self.replicas[r].trusted {
                self.reread(r);
                if self.cached_owner(r) != Some(r) {
                    return;
                }
            }
            let Some(o) = self.observed(r) else { return };
            let plan = decide(&o, self.now, &cfg(r));
            if plan.steps.is_empty() && plan.status.is_none() {
                return;
            }
            self.log.push(format!("r{r} plans {:?}", plan.steps));
            let lock_rv = self.lock.versions[self.replicas[r].view.lock].0;
            let view = self.replicas[r].view.clone();
            let seen = std::array::from_fn(|i| {
                let (rv, p) = &self.pods[i].versions[view.pods[i]];
                p.as_ref().map(|p| (p.uid.clone(), *rv))
            });
            self.replicas[r].running = Some(Running {
                plan,
                seen,
                next: 0,
                lock_rv,
                status_done: false,
            });
            return;
        }
        let Some(mut run) = self.replicas[r].running.take() else {
            return;
        };
        // Every write re-checks ownership against the freshest view the replica has.
        if self.cached_owner(r) != Some(r) {
            self.log.push(format!("r{r} drops its plan: not the owner"));
            return;
        }
        let result = if run.next < run.plan.steps.len() {
            let step = run.plan.steps[run.next].clone();
            run.next += 1;
            self.apply_step(r, &step, &mut run)
        } else if let (Some(status), false) = (run.plan.status.clone(), run.status_done) {
            run.status_done = true;
            self.write_lock(r, &mut run, "status", |l| l.status = status)
        } else {
            return;
        };
        match result {
            Ok(()) => self.replicas[r].running = Some(run),
            Err(WriteErr::Conflict) => {
                self.log.push(format!("r{r} 409: plan stops"));
            }
            Err(WriteErr::Unknown) => {
                self.replicas[r].trusted = false;
                self.log.push(format!("r{r} unknown outcome: plan stops"));
            }
        }
    }

    /// Roll the network's dice for one write: Ok(true) commit and answer, Ok(false) commit and
    /// lose the answer, Err fail before committing.
    fn dice(&mut self) -> Result<bool, WriteErr> {
        let x: f64 = self.rng.random();
        if x < 0.04 {
            Err(WriteErr::Unknown)
        } else {
            Ok(x >= 0.08)
        }
    }

    fn write_lock(
        &mut self,
        r: usize,
        run: &mut Running,
        what: &str,
        f: impl FnOnce(&mut LockT),
    ) -> Result<(), WriteErr> {
        if self.lock.rv() != run.lock_rv {
            return Err(WriteErr::Conflict);
        }
        let answered = self.dice()?;
        let mut l = self.lock.truth().clone().expect("the lock exists");
        f(&mut l);
        self.commit_lock(l, Some(r), what);
        if !answered {
            return Err(WriteErr::Unknown);
        }
        run.lock_rv = self.lock.rv();
        self.see_head(r, Obj::Lock);
        Ok(())
    }

    fn apply_step(&mut self, r: usize, step: &Step, run: &mut Running) -> Result<(), WriteErr> {
        match step {
            Step::AddFinalizer => self.write_lock(r, run, "finalizer", |l| l.finalizer = true),
            Step::ReserveEpoch { epoch, uid } => {
                let (e, uid) = (*epoch, uid.clone());
                self.write_lock(r, run, &format!("reserve epoch {e} for {uid}"), |l| {
                    l.status.highest_epoch = Some(e);
                    l.status.highest_epoch_uid = Some(uid);
                })
            }
            Step::ConfirmLease {
                holder,
                holder_uid,
                transitions,
            } => {
                // A quorum read: the truth, which also refreshes the cache.
                self.see_head(r, Obj::Lease);
                match self.lease.truth() {
                    Some(l)
                        if l.holder.as_ref() == Some(holder)
                            && l.holder_uid.as_ref() == Some(holder_uid)
                            && l.transitions == *transitions =>
                    {
                        Ok(())
                    }
                    _ => Err(WriteErr::Conflict),
                }
            }
            Step::RemoveFinalizer => Ok(()),
            Step::CreateLease {
                holder,
                holder_uid,
                transitions,
            } => {
                if self.lease.truth().is_some() {
                    self.see_head(r, Obj::Lease);
                    return Err(WriteErr::Conflict);
                }
                let answered = self.dice()?;
                let l = LeaseT {
                    holder: Some(holder.clone()),
                    holder_uid: Some(holder_uid.clone()),
                    transitions: *transitions,
                    renew_time: self.now,
                    acquire_time: self.now,
                    duration: LEASE_SECONDS,
                };
                self.commit_lease(Some(l), Some(r), "create Lease");
                if !answered {
                    return Err(WriteErr::Unknown);
                }
                self.see_head(r, Obj::Lease);
                Ok(())
            }
            Step::UpdateLease {
                expected_resource_version,
                holder,
                holder_uid,
                transitions,
                acquire,
            } => {
                if self.lease.truth().is_none()
                    || self.lease.rv().to_string() != *expected_resource_version
                {
                    // A 409 on a Lease CAS triggers a fresh GET.
                    self.see_head(r, Obj::Lease);
                    return Err(WriteErr::Conflict);
                }
                let answered = self.dice()?;
                let mut l = self.lease.truth().clone().expect("checked");
                l.holder = Some(holder.clone());
                l.holder_uid = Some(holder_uid.clone());
                l.transitions = *transitions;
                l.renew_time = self.now;
                l.duration = LEASE_SECONDS;
                if *acquire {
                    l.acquire_time = self.now;
                }
                self.commit_lease(Some(l), Some(r), "update Lease");
                if !answered {
                    return Err(WriteErr::Unknown);
                }
                self.see_head(r, Obj::Lease);
                Ok(())
            }
            Step::DeleteLease { .. } => Ok(()),
            Step::Label {
                pod,
                uid,
                role,
                epoch,
            } => {
                let i: usize = pod.trim_start_matches("db-").parse().expect("pod name");
                let demote = *role != Some(Role::Writer);
                let guard = run.seen[i]
                    .as_ref()
                    .filter(|(u, _)| !demote && !self.unfenced && u == uid)
                    .map(|(_, rv)| *rv);
                // Served late: the replica gets no answer; the write is applied later.
                if self.rng.random_bool(0.04) {
                    self.late.push(LateWrite {
                        r,
                        pod: i,
                        uid: uid.clone(),
                        role: *role,
                        epoch: *epoch,
                        guard,
                    });
                    self.log.push(format!(
                        "r{r} label {pod} {role:?} {epoch:?}: no answer, served later"
                    ));
                    return Err(WriteErr::Unknown);
                }
                let Some(p) = self.pods[i].truth().clone() else {
                    // 404: nothing to label; a promotion cannot go on.
                    return if demote {
                        Ok(())
                    } else {
                        Err(WriteErr::Conflict)
                    };
                };
                if !uid.is_empty() && &p.uid != uid {
                    // Another pod under that name: the one meant is gone.
                    self.see_head(r, Obj::Pod(i));
                    return if demote {
                        Ok(())
                    } else {
                        Err(WriteErr::Conflict)
                    };
                }
                if guard.is_some_and(|rv| rv != self.pods[i].rv()) {
                    // A 409 on a promotion fetches the pod afresh.
                    self.see_head(r, Obj::Pod(i));
                    return Err(WriteErr::Conflict);
                }
                if self.unfenced && p.role == *role && p.epoch == *epoch {
                    // A no-op write: no new version.
                    self.see_head(r, Obj::Pod(i));
                    return Ok(());
                }
                let answered = self.dice()?;
                let mut p = p;
                let uid_now = p.uid.clone();
                p.role = *role;
                p.epoch = *epoch;
                self.commit_pod(
                    i,
                    Some(p),
                    Some(r),
                    &format!("label {pod} {role:?} {epoch:?}"),
                );
                if !answered {
                    return Err(WriteErr::Unknown);
                }
                self.see_head(r, Obj::Pod(i));
                // A later promotion of it in this plan is guarded by this write's answer.
                run.seen[i] = Some((uid_now, self.pods[i].rv()));
                Ok(())
            }
        }
    }

    /// One late write is served now, its guards checked against the truth.
    fn land_late(&mut self) {
        if self.late.is_empty() {
            return;
        }
        let w = self
            .late
            .swap_remove(self.rng.random_range(0..self.late.len()));
        let what = format!(
            "r{}'s late label db-{} {:?} {:?}",
            w.r, w.pod, w.role, w.epoch
        );
        let Some(mut p) = self.pods[w.pod].truth().clone() else {
            self.log.push(format!("{what}: 404"));
            return;
        };
        if (!w.uid.is_empty() && p.uid != w.uid)
            || w.guard.is_some_and(|rv| rv != self.pods[w.pod].rv())
        {
            self.log.push(format!("{what}: 409"));
            return;
        }
        if self.unfenced && p.role == w.role && p.epoch == w.epoch {
            return;
        }
        p.role = w.role;
        p.epoch = w.epoch;
        self.landing_late = true;
        self.commit_pod(w.pod, Some(p), Some(w.r), &what);
        self.landing_late = false;
    }

    // ---------------------------------------------------------------- sharding

    /// The owner hands the lock to another live replica: its running plan is stopped first
    /// (the handoff waits for it), then the label moves by compare-and-swap.
    fn hand_off(&mut self, r: usize) {
        let others: Vec<usize> = (0..self.replicas.len())
            .filter(|&o| o != r && self.replicas[o].up)
            .collect();
        if !self.replicas[r].up || self.cached_owner(r) != Some(r) || others.is_empty() {
            return;
        }
        let to = others[self.rng.random_range(0..others.len())];
        self.replicas[r].running = None;
        if self.lock.rv() != self.lock.versions[self.replicas[r].view.lock].0 {
            self.see_head(r, Obj::Lock);
            return;
        }
        let mut l = self.lock.truth().clone().expect("lock");
        l.shard = Some(to);
        self.commit_lock(l, None, &format!("r{r} hands off to r{to}"));
        self.see_head(r, Obj::Lock);
        // Released: if it ever comes back, it is re-read first.
        self.replicas[r].trusted = false;
    }

    /// A live replica claims the lock of a dead owner (after the fence argument's grace, so the
    /// dead owner can no longer write).
    fn claim(&mut self, r: usize) {
        let owner = self.lock.truth().as_ref().and_then(|l| l.shard);
        if !self.replicas[r].up || owner.is_some_and(|o| self.replicas[o].up) {
            return;
        }
        if self.lock.rv() != self.lock.versions[self.replicas[r].view.lock].0 {
            self.see_head(r, Obj::Lock);
            return;
        }
        let mut l = self.lock.truth().clone().expect("lock");
        l.shard = Some(r);
        self.commit_lock(l, None, &format!("r{r} claims"));
        self.see_head(r, Obj::Lock);
        self.replicas[r].trusted = false;
    }

    fn crash(&mut self, r: usize) {
        let rep = &mut self.replicas[r];
        rep.up = false;
        rep.running = None;
        rep.trusted = false;
        self.log.push(format!("r{r} crashes"));
    }

    /// A restart lists every object, possibly from a lagging cache (resourceVersion=0).
    fn restart(&mut self, r: usize) {
        if self.replicas[r].up {
            return;
        }
        let mut view = self.replicas[r].view.clone();
        for o in [Obj::Lease, Obj::Lock, Obj::Pod(0), Obj::Pod(1), Obj::Pod(2)] {
            let len = self.hist_len(o);
            let pos = Self::view_pos(&mut view, o);
            *pos = self.rng.random_range((*pos).min(len - 1)..len);
        }
        let rep = &mut self.replicas[r];
        rep.view = view;
        rep.up = true;
        rep.trusted = false;
        self.log.push(format!("r{r} restarts"));
    }

    // ---------------------------------------------------------------- the world

    fn world_step(&mut self) {
        let i = self.rng.random_range(0..PODS);
        match self.rng.random_range(0..100) {
            0..=29 => {
                // Readiness flap.
                if let Some(mut p) = self.pods[i].truth().clone()
                    && !p.terminating
                {
                    p.ready = !p.ready;
                    p.ready_since = self.now;
                    self.commit_pod(i, Some(p), None, &format!("db-{i} ready flips"));
                }
            }
            30..=37 => {
                // Deletion: terminating first, then gone.
                match self.pods[i].truth().clone() {
                    Some(mut p) if !p.terminating => {
                        p.terminating = true;
                        self.commit_pod(i, Some(p), None, &format!("db-{i} terminating"));
                    }
                    Some(_) => self.commit_pod(i, None, None, &format!("db-{i} deleted")),
                    None => {}
                }
            }
            // The StatefulSet controller recreates a deleted pod under the same name.
            38..=49 if self.pods[i].truth().is_none() => {
                let uid = self.new_uid();
                let p = PodT {
                    uid,
                    ready: self.rng.random_bool(0.5),
                    ready_since: self.now,
                    terminating: false,
                    role: None,
                    epoch: None,
                };
                self.commit_pod(i, Some(p), None, &format!("db-{i} recreated"));
            }
            50..=53 if self.lease.truth().is_some() => {
                self.commit_lease(None, None, "third party deletes the Lease");
            }
            54..=57 => {
                // kubectl edit of holderIdentity (the UID annotation kept, or set to match).
                if let Some(mut l) = self.lease.truth().clone()
                    && let Some(p) = self.pods[i].truth().clone()
                {
                    l.holder = Some(pod_name(i));
                    if self.rng.random_bool(0.5) {
                        l.holder_uid = Some(p.uid);
                    }
                    self.commit_lease(Some(l), None, &format!("third party sets holder db-{i}"));
                }
            }
            58..=61 => {
                if let Some(mut l) = self.lease.truth().clone()
                    && l.transitions > 0
                {
                    l.transitions = self.rng.random_range(0..l.transitions);
                    self.commit_lease(Some(l), None, "third party lowers leaseTransitions");
                }
            }
            62..=64 => {
                // Someone strips a role label (never adds a writer: that is for admission).
                if let Some(mut p) = self.pods[i].truth().clone()
                    && p.role.is_some()
                {
                    p.role = None;
                    p.epoch = None;
                    self.commit_pod(i, Some(p), None, &format!("third party unlabels db-{i}"));
                }
            }
            _ => {}
        }
    }

    fn tick(&mut self) {
        self.now = self
            .now
            .checked_add(SignedDuration::from_millis(self.rng.random_range(0..400)))
            .unwrap();
        let n = self.replicas.len();
        match self.rng.random_range(0..100) {
            0..=44 => {
                let r = self.rng.random_range(0..n);
                self.replica_step(r);
            }
            45..=69 => {
                let r = self.rng.random_range(0..n);
                let o = match self.rng.random_range(0..3) {
                    0 => Obj::Lease,
                    1 => Obj::Lock,
                    _ => Obj::Pod(self.rng.random_range(0..PODS)),
                };
                self.advance_cache(r, o);
            }
            70..=84 => self.world_step(),
            85..=86 => {
                let r = self.rng.random_range(0..n);
                self.hand_off(r);
            }
            87..=88 => self.land_late(),
            89..=91 => {
                let r = self.rng.random_range(0..n);
                if self.replicas.iter().filter(|x| x.up).count() > 1 {
                    self.crash(r);
                }
            }
            92..=95 => {
                let r = self.rng.random_range(0..n);
                self.restart(r);
            }
            _ => {
                let r = self.rng.random_range(0..n);
                self.claim(r);
            }
        }
    }
}

fn run_seed(seed: u64, ticks: usize) {
    let mut w = World::new(seed, 2);
    for _ in 0..ticks {
        w.tick();
    }
}

fn seeds(from: u64, n: u64, ticks: usize) {
    // STSLOCK_MODEL_REPORT=1: run every seed and count violations by invariant instead of
    // stopping at the first.
    if std::env::var("STSLOCK_MODEL_REPORT").is_ok() {
        let mut counts: BTreeMap<String, (u64, u64)> = BTreeMap::new();
        std::panic::set_hook(Box::new(|_| {}));
        for seed in from..from + n {
            if let Err(e) = std::panic::catch_unwind(|| run_seed(seed, ticks)) {
                let msg = e.downcast_ref::<String>().cloned().unwrap_or_default();
                let kind = msg.split(':').next().unwrap_or("?").to_string();
                let c = counts.entry(kind).or_insert((0, seed));
                c.0 += 1;
            }
        }
        let _ = std::panic::take_hook();
        println!("{n} seeds: violations by invariant (count, first seed): {counts:?}");
        assert!(counts.is_empty(), "violations: {counts:?}");
        return;
    }
    for seed in from..from + n {
        let r = std::panic::catch_unwind(|| run_seed(seed, ticks));
        if let Err(e) = r {
            let msg = e
                .downcast_ref::<String>()
                .cloned()
                .unwrap_or_else(|| "panic".into());
            panic!(
                "seed {seed} (the {}th run) violates an invariant: {msg}",
                seed - from + 1
            );
        }
    }
}

/// The default run: 10,000 seeds of 300 steps each.
#[test]
fn decision_loop_keeps_its_invariants_under_stale_views_and_faults() {
    seeds(0, 10_000, 300);
}

/// The soak: `cargo test --release --test model -- --ignored`.
#[test]
#[ignore]
fn decision_loop_soak() {
    let n = std::env::var("STSLOCK_MODEL_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200_000);
    seeds(1_000_000, n, 600);
}
