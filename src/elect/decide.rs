//! The election rules (DESIGN §2), in order of precedence: deletion, finalizer, conflicts,
//! foreign Lease, missing StatefulSet, no replicas, paused, then election / renewal /
//! failover / switchover.

use std::time::Duration;

use jiff::{SignedDuration, Timestamp};

use super::types::*;
use crate::api::{Condition, StatefulSetLockStatus};

/// Decide what to do for one lock. Pure: same inputs, same plan.
pub fn decide(o: &Observed, now: Timestamp, cfg: &Config) -> Plan {
    let mut b = Builder::new(o, now, cfg);
    if o.deleting {
        b.delete();
        return b.finish();
    }
    // Someone else renews our Lease (another operator still running — the Go operator during a
    // migration, say): do not fight it. Nothing is written for the lock until that Lease expires
    // unrenewed, except the condition that says so.
    if let Some(l) = &o.lease
        && l.owner.as_deref() == Some(o.key().as_str())
        && l.renewed_elsewhere()
        && !lease_expired(l, now)
    {
        b.concurrent_writer(l);
        return b.finish();
    }
    // Our finalizer, replacing the Go operator's in the same write.
    if !o.has_finalizer || o.go_finalizer {
        b.plan.steps.push(Step::AddFinalizer);
    }
    if let Some(winner) = conflict(o) {
        b.error(
            "Conflict",
            format!("{winner}; this lock is ignored until it is deleted or changed"),
        );
        return b.finish();
    }
    if let Some(max) = cfg.max_locks_per_namespace {
        let older = o
            .rivals
            .iter()
            .filter(|r| (r.created, r.name.as_str()) < (o.created, o.name.as_str()))
            .count();
        if older >= max {
            b.error(
                "QuotaExceeded",
                format!("namespace {} already has {older} older StatefulSetLocks; the limit is {max} (--max-locks-per-namespace)", o.namespace),
            );
            return b.finish();
        }
    }
    if let Some(l) = &o.lease
        && l.owner.as_deref() != Some(o.key().as_str())
        && !adoptable(o, l)
    {
        b.error(
            "LeaseNotOwned",
            format!(
                "Lease {} exists and was not created by stslock for this lock (owner: {}); it is never overwritten: choose another leaseName or delete that Lease",
                o.lease_name,
                l.owner.as_deref().unwrap_or("none")
            ),
        );
        return b.finish();
    }
    let Some(replicas) = o.replicas else {
        b.error(
            "StatefulSetNotFound",
            format!(
                "StatefulSet {} not found in namespace {}",
                o.statefulset_name, o.namespace
            ),
        );
        return b.finish();
    };
    if replicas == 0 {
        b.unavailable(
            "NoReplicas",
            format!("StatefulSet {} has 0 replicas", o.statefulset_name),
            Severity::Normal,
        );
        return b.finish();
    }
    if o.paused {
        b.paused();
        return b.finish();
    }
    b.elect();
    b.finish()
}

/// A Lease the Go operator left for this lock (DESIGN §10): no stslock marks, nothing else's
/// marks either (no label, annotation or owner reference), held by a pod of the lock's
/// StatefulSet (one the cache shows, or one named like its pods: the holder may be gone). Such a
/// Lease is adopted by compare-and-swap; any other Lease stays someone else's.
pub fn adoptable(o: &Observed, l: &LeaseView) -> bool {
    l.owner.is_none()
        && l.unmarked
        && l.holder.as_deref().is_some_and(|h| {
            o.pods.iter().any(|p| p.name == h) || is_pod_name_of(h, &o.statefulset_name)
        })
}

/// `<statefulset>-<ordinal>`, the name the StatefulSet controller gives its pods.
fn is_pod_name_of(pod: &str, statefulset: &str) -> bool {
    pod.strip_prefix(statefulset)
        .and_then(|rest| rest.strip_prefix('-'))
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// The rival that wins over this lock, if any: the oldest lock (then the smallest name) on the
/// same StatefulSet or the same lease name.
fn conflict(o: &Observed) -> Option<String> {
    let older = |r: &Rival| (r.created, r.name.as_str()) < (o.created, o.name.as_str());
    o.rivals.iter().filter(|r| older(r)).find_map(|r| {
        if r.statefulset == o.statefulset_name {
            Some(format!(
                "StatefulSet {} is already managed by StatefulSetLock {}",
                o.statefulset_name, r.name
            ))
        } else if r.lease_name == o.lease_name {
            Some(format!(
                "Lease {} is already used by StatefulSetLock {}",
                o.lease_name, r.name
            ))
        } else {
            None
        }
    })
}

struct Builder<'a> {
    o: &'a Observed,
    now: Timestamp,
    cfg: &'a Config,
    plan: Plan,
    status: StatefulSetLockStatus,
}

fn lease_expired(l: &LeaseView, now: Timestamp) -> bool {
    l.expiry().is_none_or(|e| e <= now)
}

fn secs_until(from: Timestamp, to: Timestamp) -> Duration {
    let d = to.duration_since(from);
    if d.is_negative() {
        Duration::ZERO
    } else {
        d.unsigned_abs()
    }
}

impl<'a> Builder<'a> {
    fn new(o: &'a Observed, now: Timestamp, cfg: &'a Config) -> Self {
        let mut status = o.status.clone();
        status.observed_generation = Some(o.generation);
        status.shard = Some(cfg.identity.clone());
        status.ready_replicas =
            Some(o.pods.iter().filter(|p| p.ready && !p.terminating).count() as i32);
        Builder {
            o,
            now,
            cfg,
            plan: Plan::default(),
            status,
        }
    }

    fn finish(mut self) -> Plan {
        if self.status != self.o.status && !self.o.deleting {
            self.plan.status = Some(self.status);
        }
        self.plan
    }

    /// Set a condition with metav1.Condition semantics; returns whether its status changed.
    fn condition(&mut self, type_: &str, status: bool, reason: &str, message: String) -> bool {
        let s = if status { "True" } else { "False" };
        let now = crate::api::format_time(self.now);
        let generation = Some(self.o.generation);
        match self.status.conditions.iter_mut().find(|c| c.type_ == type_) {
            Some(c) => {
                let changed = c.status != s;
                if changed {
                    c.last_transition_time = now;
                }
                c.status = s.into();
                c.reason = reason.into();
                c.message = message;
                c.observed_generation = generation;
                changed
            }
            None => {
                self.status.conditions.push(Condition {
                    type_: type_.into(),
                    status: s.into(),
                    last_transition_time: now,
                    observed_generation: generation,
                    reason: reason.into(),
                    message,
                });
                true
            }
        }
    }

    fn event(
        &mut self,
        severity: Severity,
        reason: &'static str,
        action: &'static str,
        message: String,
    ) {
        self.plan.events.push(Note {
            severity,
            reason,
            action,
            message,
        });
    }

    /// Does the observed status already report this error (so its Event was sent)?
    fn error_reported(&self, reason: &str) -> bool {
        self.o
            .status
            .conditions
            .iter()
            .any(|c| c.type_ == "Error" && c.status == "True" && c.reason == reason)
    }

    /// An error condition: Error=True, Available=False. The Event fires when the error first
    /// appears or its reason changes, not on every reconcile.
    fn error(&mut self, reason: &'static str, message: String) {
        let already = self.error_reported(reason);
        self.condition("Error", true, reason, message.clone());
        self.condition("Available", false, reason, message.clone());
        self.condition(
            "Progressing",
            false,
            reason,
            "waiting for the error to be fixed".into(),
        );
        if !already {
            self.event(Severity::Warning, reason, "Validate", message);
        }
        // Foreign Leases are not watched (only stslock's are), so their removal is noticed by
        // polling; everything else that can fix an error arrives as a watch event.
        self.plan.requeue_after = Some(Duration::from_secs(if reason == "LeaseNotOwned" {
            5
        } else {
            30
        }));
    }

    fn clear_error(&mut self) {
        if self.status.conditions.iter().any(|c| c.type_ == "Error") {
            self.condition("Error", false, "NoError", String::new());
        }
    }

    fn unavailable(&mut self, reason: &'static str, message: String, severity: Severity) {
        self.clear_error();
        let changed = self.condition("Available", false, reason, message.clone());
        let reason_changed = self
            .o
            .status
            .conditions
            .iter()
            .find(|c| c.type_ == "Available")
            .is_none_or(|c| c.reason != reason);
        self.condition("Progressing", true, reason, message.clone());
        if changed || reason_changed {
            self.event(severity, reason, "Elect", message);
        }
    }

    fn paused(&mut self) {
        self.clear_error();
        let writer = self.current_writer();
        // Roles are frozen, but the Lease keeps saying who the writer is: the sitting holder
        // (same UID, still there) is renewed as usual, with no transition and no relabelling.
        if let (Some(lease), Some(w)) = (&self.o.lease, writer)
            && self.lease_epoch_sound(lease)
        {
            self.renew_if_due(lease, w);
        }
        let ok = writer.is_some_and(|w| w.ready && !w.terminating && w.role == Some(Role::Writer));
        self.condition(
            "Available",
            ok,
            if ok { "WriterReady" } else { "Paused" },
            match writer {
                Some(w) => format!("writer {} (paused)", w.name),
                None => "no writer (paused)".into(),
            },
        );
        // The Event marks the lock becoming paused: Progressing keeps its status (False) when a
        // stable lock is paused, so its reason is what changes.
        let was_paused = self
            .o
            .status
            .conditions
            .iter()
            .any(|c| c.type_ == "Progressing" && c.reason == "Paused");
        self.condition(
            "Progressing",
            false,
            "Paused",
            "spec.paused is true: roles are frozen".into(),
        );
        if !was_paused {
            self.event(
                Severity::Normal,
                "Paused",
                "Pause",
                "roles frozen: spec.paused is true".into(),
            );
        }
    }

    /// The highest epoch any record shows: the Lease, the lock's status (the writer's epoch and
    /// the highest one reserved) and every pod's epoch annotation. None before any election.
    fn epoch_floor(&self) -> Option<i64> {
        let o = self.o;
        o.pods
            .iter()
            .filter_map(|p| p.epoch)
            .chain(o.status.writer_epoch)
            .chain(o.status.highest_epoch)
            .chain(o.lease.as_ref().map(|l| l.transitions))
            .max()
    }

    /// Does the Lease's epoch belong to its holder alone? Not when some record shows a higher
    /// epoch (leaseTransitions lowered, or a Lease write committed behind a lost response and
    /// then overwritten), nor when another pod holds this epoch by the lock's status or its
    /// writer label and annotation (holderIdentity edited without a transition).
    fn lease_epoch_sound(&self, l: &LeaseView) -> bool {
        let o = self.o;
        if self.epoch_floor().is_some_and(|f| f > l.transitions) {
            return false;
        }
        let holder_uid = l.holder_uid.as_deref();
        let status_claims = (o.status.writer_epoch == Some(l.transitions)
            && o.status.writer_uid.is_some()
            && o.status.writer_uid.as_deref() != holder_uid)
            || (o.status.highest_epoch == Some(l.transitions)
                && o.status.highest_epoch_uid.is_some()
                && o.status.highest_epoch_uid.as_deref() != holder_uid);
        let pod_claims = o.pods.iter().any(|p| {
            p.role == Some(Role::Writer)
                && p.epoch == Some(l.transitions)
                && Some(p.uid.as_str()) != holder_uid
        });
        !(status_claims || pod_claims)
    }

    /// The epoch reserved on the lock and the pod it is for, when that reservation is the only
    /// record above the Lease's epoch (no pod, nor the lock's writer, carries a higher one).
    fn unfinished_reservation(&self, l: &LeaseView) -> Option<(i64, String)> {
        let o = self.o;
        let reserved = o.status.highest_epoch.filter(|h| *h > l.transitions)?;
        let above = |e: Option<i64>| e.is_some_and(|e| e > l.transitions);
        if above(o.status.writer_epoch) || o.pods.iter().any(|p| above(p.epoch)) {
            return None;
        }
        let uid = o.status.highest_epoch_uid.as_deref()?;
        let pod = o
            .pods
            .iter()
            .find(|p| p.uid == uid)
            .map_or_else(|| format!("pod UID {uid}"), |p| p.name.clone());
        Some((reserved, pod))
    }

    /// The epoch for a new holder `uid`: the one the lock already reserved for that very pod,
    /// when no other record has reached it (an earlier plan reserved it, then stopped — its
    /// answer lost, a conflict, a timeout — before the Lease moved); else the next one. A
    /// reservation names its pod and is only ever written upwards (compare-and-swap), so an
    /// epoch reserved for `uid` was never issued to another pod. Reusing it spares a lock write
    /// per retry; without it, a replica whose lock writes keep losing their answers reserved a
    /// new epoch on every attempt and never reached the Lease.
    fn epoch_for(&self, uid: &str) -> i64 {
        let o = self.o;
        let issued = o
            .pods
            .iter()
            .filter_map(|p| p.epoch)
            .chain(o.status.writer_epoch)
            .chain(o.lease.as_ref().map(|l| l.transitions))
            .max();
        match (
            o.status.highest_epoch,
            o.status.highest_epoch_uid.as_deref(),
        ) {
            (Some(h), Some(u)) if u == uid && issued.is_none_or(|i| i < h) => h,
            _ => self.next_epoch(),
        }
    }

    /// The next epoch to issue: above every record of any earlier one.
    fn next_epoch(&self) -> i64 {
        self.epoch_floor().map_or(0, |e| e + 1)
    }

    /// Renew the Lease for its sitting holder `w` when half its duration has passed, it
    /// expired, or the lock's leaseDurationSeconds changed; schedule the next renewal.
    fn renew_if_due(&mut self, lease: &LeaseView, w: &Candidate) {
        let expired = lease_expired(lease, self.now);
        let half_due = lease
            .renew_time
            .and_then(|t| {
                t.checked_add(SignedDuration::from_millis(
                    lease.duration_seconds.max(1) * 500,
                ))
                .ok()
            })
            .is_none_or(|d| d <= self.now);
        let resized = lease.duration_seconds != self.o.lease_duration_seconds;
        if expired || half_due || resized {
            // Renew for the same holder: no transition, no new epoch, even when the Lease
            // lapsed while the operator was away (the holder is the same pod).
            self.plan.steps.push(Step::UpdateLease {
                expected_resource_version: lease.resource_version.clone(),
                holder: w.name.clone(),
                holder_uid: w.uid.clone(),
                transitions: lease.transitions,
                acquire: expired,
            });
            self.schedule_renewal(true);
        } else {
            self.schedule_renewal_from(lease.renew_time);
        }
    }

    /// The pod the Lease names, if it is still the same pod (same UID).
    fn current_writer(&self) -> Option<&'a Candidate> {
        let l = self.o.lease.as_ref()?;
        let holder = l.holder.as_deref()?;
        self.o
            .pods
            .iter()
            .find(|p| p.name == holder && l.holder_uid.as_deref().is_none_or(|u| u == p.uid))
    }

    fn eligible(p: &Candidate) -> bool {
        p.ready && !p.terminating
    }

    /// Lowest-ordinal Ready, non-terminating pod, excluding `not`.
    fn best_candidate(&self, not: Option<&str>) -> Option<&'a Candidate> {
        let mut c: Vec<&Candidate> = self
            .o
            .pods
            .iter()
            .filter(|p| Self::eligible(p) && Some(p.name.as_str()) != not)
            .collect();
        c.sort_by_key(|p| (p.ordinal.unwrap_or(u32::MAX), p.name.clone()));
        c.first().copied()
    }

    fn preferred(&self) -> Option<&'a Candidate> {
        let name = self.o.preferred_writer.as_deref()?;
        self.o
            .pods
            .iter()
            .find(|p| p.name == name && Self::eligible(p))
    }

    /// Label steps so that exactly `writer` (if any) is writer with `epoch` and every other pod
    /// is reader: demotions first, then the promotion, then the remaining readers.
    ///
    /// The pod cache may lag: a pod it shows as a reader may carry `writer` by now. So besides
    /// every pod the cache shows as a writer, the Lease's holder and the writer the lock's
    /// status records are demoted by UID whatever the cache says (a fencing write even when
    /// they are readers already, see `reconcile::apply`). A promotion in a plan that does not
    /// write the Lease first is preceded by a fresh read of the Lease: the label must not
    /// contradict the Lease it is based on.
    fn relabel(&mut self, writer: Option<&Candidate>, epoch: i64) {
        let (demote, promote, readers) = self.label_steps(writer, epoch);
        self.plan.steps.extend(demote);
        self.push_promotion(promote);
        self.plan.steps.extend(readers);
    }

    /// A promotion, preceded by a confirmation of the Lease unless this plan writes the Lease
    /// before it.
    fn push_promotion(&mut self, promote: Option<Step>) {
        let Some(promote) = promote else { return };
        let lease_written = self
            .plan
            .steps
            .iter()
            .any(|s| matches!(s, Step::CreateLease { .. } | Step::UpdateLease { .. }));
        if !lease_written
            && let Step::Label {
                pod,
                uid,
                epoch: Some(epoch),
                ..
            } = &promote
        {
            self.plan.steps.push(Step::ConfirmLease {
                holder: pod.clone(),
                holder_uid: uid.clone(),
                transitions: *epoch,
            });
        }
        self.plan.steps.push(promote);
    }

    /// The label steps of [`Self::relabel`]: (demotions, the promotion, the other readers).
    fn label_steps(
        &self,
        writer: Option<&Candidate>,
        epoch: i64,
    ) -> (Vec<Step>, Option<Step>, Vec<Step>) {
        let o = self.o;
        let is_writer = |name: &str, uid: Option<&str>| {
            writer.is_some_and(|w| w.name == name && uid.is_none_or(|u| u == w.uid))
        };
        let mut demote: Vec<(String, String)> = vec![];
        let mut readers = vec![];
        for p in &o.pods {
            if writer.is_some_and(|w| w.uid == p.uid) {
                continue;
            }
            match p.role {
                Some(Role::Writer) => demote.push((p.name.clone(), p.uid.clone())),
                Some(Role::Reader) if p.epoch.is_none() => {}
                _ => readers.push(p),
            }
        }
        let recorded = [
            o.lease
                .as_ref()
                .and_then(|l| l.holder.clone().map(|h| (h, l.holder_uid.clone()))),
            o.status
                .writer_pod
                .clone()
                .map(|w| (w, o.status.writer_uid.clone())),
            self.reserved_for(),
        ];
        for (name, uid) in recorded.into_iter().flatten() {
            if is_writer(&name, uid.as_deref()) {
                continue;
            }
            // The cache already shows a newer pod under that name: the recorded one is gone
            // (caches only move forward, and a name is reused only after deletion).
            if let Some(u) = &uid
                && o.pods.iter().any(|p| p.name == name && p.uid != *u)
            {
                continue;
            }
            // The UID guard keeps a recreated pod of the same name out of it; without a
            // recorded UID the demotion is unguarded (demoting is always safe).
            let uid = uid
                .or_else(|| {
                    o.pods
                        .iter()
                        .find(|p| p.name == name)
                        .map(|p| p.uid.clone())
                })
                .unwrap_or_default();
            if !demote.iter().any(|(n, u)| *n == name && *u == uid) {
                demote.push((name, uid));
            }
        }
        readers.retain(|p| !demote.iter().any(|(n, _)| *n == p.name));
        let done: Vec<(String, String)> = self
            .plan
            .steps
            .iter()
            .filter_map(|s| match s {
                Step::Label {
                    pod,
                    uid,
                    role: Some(Role::Reader),
                    ..
                } => Some((pod.clone(), uid.clone())),
                _ => None,
            })
            .collect();
        demote.retain(|d| !done.contains(d));
        readers.retain(|p| !done.iter().any(|(n, _)| *n == p.name));
        let demote = demote
            .into_iter()
            .map(|(pod, uid)| Step::Label {
                pod,
                uid,
                role: Some(Role::Reader),
                epoch: None,
            })
            .collect();
        let promote = writer
            .filter(|w| w.role != Some(Role::Writer) || w.epoch != Some(epoch))
            .map(|w| Step::Label {
                pod: w.name.clone(),
                uid: w.uid.clone(),
                role: Some(Role::Writer),
                epoch: Some(epoch),
            });
        let readers = readers
            .into_iter()
            .map(|p| Step::Label {
                pod: p.name.clone(),
                uid: p.uid.clone(),
                role: Some(Role::Reader),
                epoch: None,
            })
            .collect();
        (demote, promote, readers)
    }

    fn set_writer_status(&mut self, w: &Candidate, epoch: i64, changed_at: Option<Timestamp>) {
        self.status.writer_pod = Some(w.name.clone());
        self.status.writer_uid = Some(w.uid.clone());
        self.status.writer_epoch = Some(epoch);
        if let Some(t) = changed_at {
            self.status.last_failover_time = Some(crate::api::format_time(t));
        }
        self.clear_error();
        self.condition(
            "Available",
            true,
            "WriterReady",
            format!("{} is the writer (epoch {epoch})", w.name),
        );
        self.condition(
            "Progressing",
            false,
            "Stable",
            "writer elected and labelled".into(),
        );
    }

    /// Renewal: the holder keeps the Lease, renewed at half its duration (the lock's
    /// duration: an edit of leaseDurationSeconds takes effect at the next renewal).
    fn schedule_renewal(&mut self, renewed_now: bool) {
        let last = renewed_now.then_some(self.now);
        self.schedule_renewal_from(last);
    }

    fn schedule_renewal_from(&mut self, last: Option<Timestamp>) {
        let half = SignedDuration::from_millis(self.o.lease_duration_seconds.max(1) * 500);
        let due = last
            .and_then(|t| t.checked_add(half).ok())
            .unwrap_or(self.now);
        let after = secs_until(self.now, due);
        self.plan.renew_after = Some(after);
        self.requeue(after);
    }

    fn requeue(&mut self, after: Duration) {
        self.plan.requeue_after = Some(match self.plan.requeue_after {
            Some(cur) => cur.min(after),
            None => after,
        });
    }

    fn elect(&mut self) {
        let o = self.o;
        let Some(lease) = &o.lease else {
            self.elect_without_lease();
            return;
        };
        if lease.owner.is_none() {
            self.adopt(lease);
            return;
        }
        let epoch = lease.transitions;
        let writer = self.current_writer();
        if !self.lease_epoch_sound(lease) {
            // Someone else moved the Lease's holder without a transition, or lowered its
            // epoch: the epoch it shows may belong to another pod. Whoever becomes writer now
            // gets a fresh epoch above every record (rule 13).
            let holder = lease.holder.as_deref().unwrap_or("none");
            let why = match self.unfinished_reservation(lease) {
                // The usual way there: a handover of this lock reserved the epoch and its Lease
                // write then failed (a conflict with a renewal, a timeout), which is not a
                // change from outside — but a write committed behind a lost answer and then
                // overwritten looks the same, so the repair is the same.
                Some((reserved, pod)) => format!(
                    "the lock reserved epoch {reserved} for {pod} but the Lease shows epoch {epoch} (holder {holder}): a handover that did not finish, or the Lease was changed since"
                ),
                None => format!(
                    "the Lease's holder or epoch was changed outside stslock (holder {holder}, epoch {epoch})"
                ),
            };
            let to = writer
                .filter(|w| Self::eligible(w))
                .or_else(|| self.preferred())
                .or_else(|| self.best_candidate(None));
            match to {
                Some(to) => self.handover(
                    lease,
                    writer,
                    to,
                    "EpochRepaired",
                    TransitionKind::EpochRepair,
                    why,
                ),
                None => {
                    self.relabel(None, epoch);
                    self.unavailable(
                        "NoReadyPod",
                        format!("{why} and no pod is Ready"),
                        Severity::Warning,
                    );
                }
            }
            return;
        }
        // Why the current writer cannot stay, if it cannot.
        let problem: Option<String> = match writer {
            None => Some(match lease.holder.as_deref() {
                Some(h) if o.pods.iter().any(|p| p.name == h) => {
                    format!("writer {h} was recreated (new UID)")
                }
                Some(h) => format!("writer {h} was deleted"),
                None => "the Lease has no holder".into(),
            }),
            Some(w) if w.terminating => Some(format!("writer {} is terminating", w.name)),
            Some(w) if !w.ready => Some(format!("writer {} is not Ready", w.name)),
            Some(_) => None,
        };
        match (writer, problem) {
            (Some(w), None) => {
                // A healthy writer: keep it, unless a Ready preferred writer asks for a switchover.
                if let Some(p) = self.preferred()
                    && p.uid != w.uid
                {
                    self.handover(
                        lease,
                        Some(w),
                        p,
                        "Switchover",
                        TransitionKind::Switchover,
                        format!("switchover from {} to preferred writer {}", w.name, p.name),
                    );
                    return;
                }
                self.renew_if_due(lease, w);
                self.relabel(Some(w), epoch);
                self.set_writer_status(w, epoch, None);
                if let Some(name) = &o.preferred_writer
                    && self.preferred().is_none()
                    && name != &w.name
                {
                    self.condition(
                        "Progressing",
                        true,
                        "PreferredWriterNotReady",
                        format!("preferred writer {name} is not Ready; keeping {}", w.name),
                    );
                }
            }
            (w, Some(why)) => {
                // Anti-flap: a NotReady (not deleted, not terminating) writer gets
                // failoverDelaySeconds to come back.
                if let Some(w) = w
                    && !w.ready
                    && !w.terminating
                    && o.failover_delay_seconds > 0
                {
                    let since = w.ready_since.unwrap_or(self.now);
                    let deadline = since
                        .checked_add(SignedDuration::from_secs(o.failover_delay_seconds))
                        .unwrap_or(self.now);
                    if deadline > self.now {
                        self.requeue(secs_until(self.now, deadline));
                        // It keeps the label meanwhile, so it keeps the Lease too.
                        self.renew_if_due(lease, w);
                        self.relabel(Some(w), epoch);
                        self.condition(
                            "Available",
                            false,
                            "WriterNotReady",
                            format!(
                                "{why}; failover in {}s unless it recovers",
                                secs_until(self.now, deadline).as_secs()
                            ),
                        );
                        self.condition("Progressing", true, "FailoverPending", why);
                        return;
                    }
                }
                let candidate = self
                    .preferred()
                    .filter(|p| w.is_none_or(|w| w.uid != p.uid))
                    .or_else(|| self.best_candidate(lease.holder.as_deref()));
                match candidate {
                    Some(c) => {
                        self.handover(lease, w, c, "Failover", TransitionKind::Failover, why)
                    }
                    None => {
                        // No one to hand over to: keep the Lease (renewed) and the label where
                        // they are (demoting would only create a writer-less gap with no gain),
                        // but make sure no other pod claims the role.
                        if let Some(w) = w {
                            self.renew_if_due(lease, w);
                        }
                        self.relabel(w, epoch);
                        self.unavailable(
                            "NoReadyPod",
                            format!("{why} and no other pod is Ready"),
                            Severity::Warning,
                        );
                    }
                }
            }
            (None, None) => {}
        }
    }

    /// No Lease: a first election, or the Lease was deleted behind our back.
    fn elect_without_lease(&mut self) {
        let o = self.o;
        // A healthy labelled writer keeps the role (re-created Lease, no failover) — but only
        // with an epoch no record shows as issued after it: if any record is higher (a Lease
        // write that committed behind a lost response, say), the epoch it carries may not be
        // its own any more, and it gets a fresh one.
        let floor = self.epoch_floor();
        let sitting = o.pods.iter().find(|p| {
            p.role == Some(Role::Writer)
                && Self::eligible(p)
                && o.status.writer_uid.as_deref().is_none_or(|u| u == p.uid)
                && p.epoch.is_some()
                && p.epoch == floor
        });
        // A lock stslock never elected for (no epoch anywhere: the Go operator's, whose Lease
        // is gone) whose one Ready writer-labelled pod is the writer the Go operator chose: it
        // keeps the role under a first epoch, no needless failover. With two such pods nobody
        // is trusted and a normal election (demote first) follows.
        let go_writers: Vec<&Candidate> = o
            .pods
            .iter()
            .filter(|p| p.role == Some(Role::Writer) && Self::eligible(p))
            .collect();
        let sitting = sitting.or(match go_writers.as_slice() {
            [w] if floor.is_none() && o.status.writer_uid.is_none() => Some(*w),
            _ => None,
        });
        let keep = match (sitting, self.preferred()) {
            (Some(w), None) => Some(w),
            (Some(w), Some(p)) if p.uid == w.uid => Some(w),
            _ => None,
        };
        if let Some(w) = keep {
            let epoch = w.epoch.or(floor).unwrap_or(0);
            self.plan.steps.push(Step::CreateLease {
                holder: w.name.clone(),
                holder_uid: w.uid.clone(),
                transitions: epoch,
            });
            self.relabel(Some(w), epoch);
            self.set_writer_status(w, epoch, None);
            self.event(
                Severity::Warning,
                "LeaseRecreated",
                "Elect",
                format!(
                    "Lease {} was missing; re-created for the current writer {} (epoch {epoch})",
                    o.lease_name, w.name
                ),
            );
            self.schedule_renewal(true);
            return;
        }
        let Some(w) = self.preferred().or_else(|| self.best_candidate(None)) else {
            // Nobody can be writer: make sure nobody claims to be (no Lease means no
            // legitimate writer), and wait for a Ready pod.
            self.relabel(None, 0);
            self.status.writer_pod = None;
            self.status.writer_uid = None;
            self.unavailable(
                "NoReadyPod",
                format!("no Ready pod in StatefulSet {}", o.statefulset_name),
                Severity::Normal, // before the first election this is the usual wait for pods
            );
            return;
        };
        let epoch = self.epoch_for(&w.uid);
        if let Some(last) = o.status.writer_uid.as_deref() {
            self.demote_leftovers(Some(last));
        }
        let (demote, promote, readers) = self.label_steps(Some(w), epoch);
        self.plan.steps.extend(demote);
        self.reserve(epoch, &w.uid);
        self.plan.steps.push(Step::CreateLease {
            holder: w.name.clone(),
            holder_uid: w.uid.clone(),
            transitions: epoch,
        });
        self.push_promotion(promote);
        self.plan.steps.extend(readers);
        self.set_writer_status(w, epoch, Some(self.now));
        self.event(
            Severity::Normal,
            "Elected",
            "Elect",
            format!("elected {} as writer (epoch {epoch})", w.name),
        );
        self.plan.transition = Some(Transition {
            kind: TransitionKind::Election,
            old_writer: None,
            new_writer: w.name.clone(),
            reason: "no Lease: election".into(),
            epoch,
        });
        self.schedule_renewal(true);
    }

    /// The pod the highest reserved epoch was for (it may carry `writer` by now, whatever the
    /// cache says), if the cache knows it by UID.
    fn reserved_for(&self) -> Option<(String, Option<String>)> {
        let uid = self.o.status.highest_epoch_uid.as_deref()?;
        let p = self.o.pods.iter().find(|p| p.uid == uid)?;
        Some((p.name.clone(), Some(p.uid.clone())))
    }

    /// Before the Lease moves again, demote every writer left over from an interrupted earlier
    /// handover (a pod the cache or the status shows as writer that is not `holder_uid`, the
    /// Lease's holder now): so at any moment the only writers are the holder and, during the
    /// demote step, the previous holder.
    fn demote_leftovers(&mut self, holder_uid: Option<&str>) {
        let o = self.o;
        let mut leftovers: Vec<(String, String)> = o
            .pods
            .iter()
            .filter(|p| p.role == Some(Role::Writer) && Some(p.uid.as_str()) != holder_uid)
            .map(|p| (p.name.clone(), p.uid.clone()))
            .collect();
        let recorded = [
            o.status.writer_pod.clone().zip(o.status.writer_uid.clone()),
            self.reserved_for().and_then(|(n, u)| u.map(|u| (n, u))),
        ];
        for (name, uid) in recorded.into_iter().flatten() {
            if holder_uid.is_some()
                && Some(uid.as_str()) != holder_uid
                && !leftovers.iter().any(|(_, u)| *u == uid)
            {
                leftovers.push((name, uid));
            }
        }
        for (pod, uid) in leftovers {
            self.plan.steps.push(Step::Label {
                pod,
                uid,
                role: Some(Role::Reader),
                epoch: None,
            });
        }
    }

    /// Record `epoch` (and the pod it is for) on the lock before anything carries it.
    fn reserve(&mut self, epoch: i64, uid: &str) {
        if self.o.status.highest_epoch.is_none_or(|h| h < epoch) {
            self.plan.steps.push(Step::ReserveEpoch {
                epoch,
                uid: uid.to_string(),
            });
            self.status.highest_epoch = Some(epoch);
            self.status.highest_epoch_uid = Some(uid.to_string());
        }
    }

    /// Move the Lease to `to` under a new epoch (reserved on the lock first), demote everyone
    /// else — the previous holder by UID whatever the cache says — then promote `to`.
    fn handover(
        &mut self,
        lease: &LeaseView,
        from: Option<&Candidate>,
        to: &Candidate,
        reason: &'static str,
        kind: TransitionKind,
        why: String,
    ) {
        let epoch = self.epoch_for(&to.uid);
        // After an edit from outside, the Lease's holder is not a holder stslock made: only
        // the pod taking over may keep `writer` while the Lease moves.
        let keep = if kind == TransitionKind::EpochRepair {
            Some(to.uid.as_str())
        } else {
            lease.holder_uid.as_deref()
        };
        self.demote_leftovers(keep);
        // Everyone but `to` — the holder first of all — is demoted before the Lease moves, and
        // the epoch reserved meanwhile (the reconciler sends these together): demoting is
        // always safe, and the promotion waits for the Lease.
        let (demote, promote, readers) = self.label_steps(Some(to), epoch);
        self.plan.steps.extend(demote);
        self.reserve(epoch, &to.uid);
        self.plan.steps.push(Step::UpdateLease {
            expected_resource_version: lease.resource_version.clone(),
            holder: to.name.clone(),
            holder_uid: to.uid.clone(),
            transitions: epoch,
            acquire: true,
        });
        self.push_promotion(promote);
        self.plan.steps.extend(readers);
        self.set_writer_status(to, epoch, Some(self.now));
        let old = from
            .map(|f| f.name.clone())
            .or_else(|| lease.holder.clone());
        self.event(
            Severity::Normal,
            reason,
            match kind {
                TransitionKind::Failover => "Failover",
                TransitionKind::Switchover => "Switchover",
                _ => "RepairEpoch",
            },
            format!("{why}: {} is the writer now (epoch {epoch})", to.name),
        );
        self.plan.transition = Some(Transition {
            kind,
            old_writer: old,
            new_writer: to.name.clone(),
            reason: why,
            epoch,
        });
        // The new holder's renewal is due from the Lease write on.
        self.schedule_renewal(true);
    }

    /// Take over a Lease the Go operator left ([`adoptable`]): by compare-and-swap, in one
    /// write that adds stslock's marks. A Ready holder keeps the role and its epoch (no
    /// failover); any other writer-labelled pod the Go operator left is demoted first, before
    /// anything else is written for the lock (the finalizer swap included). A holder that is
    /// not Ready is failed over as usual, the Lease write adopting it.
    fn adopt(&mut self, lease: &LeaseView) {
        let o = self.o;
        let holder = lease.holder.clone().unwrap_or_default();
        let w = o.pods.iter().find(|p| p.name == holder);
        let problem = match w {
            None => Some(format!("writer {holder} was deleted")),
            Some(w) if w.terminating => Some(format!("writer {} is terminating", w.name)),
            Some(w) if !w.ready => Some(format!("writer {} is not Ready", w.name)),
            Some(_) => None,
        };
        let epoch = lease.transitions;
        let sound = self.epoch_floor().is_none_or(|f| f <= epoch);
        match (w, problem) {
            (Some(w), None) if sound => {
                let (demote, promote, readers) = self.label_steps(Some(w), epoch);
                let n = self.plan.steps.len() + demote.len();
                self.plan.steps.extend(demote);
                self.plan.steps.push(Step::UpdateLease {
                    expected_resource_version: lease.resource_version.clone(),
                    holder: w.name.clone(),
                    holder_uid: w.uid.clone(),
                    transitions: epoch,
                    acquire: lease_expired(lease, self.now),
                });
                self.plan.steps.extend(promote);
                self.plan.steps.extend(readers);
                self.finalizer_after_demotions(n);
                self.set_writer_status(w, epoch, None);
                self.schedule_renewal(true);
                self.event(
                    Severity::Normal,
                    "Adopted",
                    "Adopt",
                    format!(
                        "adopted Lease {} from the Go operator: {} stays the writer (epoch {epoch})",
                        o.lease_name, w.name
                    ),
                );
                self.plan.transition = Some(Transition {
                    kind: TransitionKind::Adoption,
                    old_writer: Some(w.name.clone()),
                    new_writer: w.name.clone(),
                    reason: "Lease left by the Go operator adopted".into(),
                    epoch,
                });
            }
            (w, problem) => {
                let why = problem.unwrap_or_else(|| {
                    format!("the Lease's epoch {epoch} is below one stslock issued")
                });
                let candidate = self
                    .preferred()
                    .filter(|p| w.is_none_or(|w| w.uid != p.uid))
                    .or_else(|| self.best_candidate(Some(holder.as_str())))
                    .or_else(|| w.filter(|w| Self::eligible(w)));
                let Some(c) = candidate else {
                    // Nobody to hand over to: the Lease stays as the Go operator left it
                    // (adopting it for a writer that cannot write gains nothing).
                    self.unavailable(
                        "NoReadyPod",
                        format!("{why} and no other pod is Ready"),
                        Severity::Warning,
                    );
                    self.requeue(Duration::from_secs(5));
                    return;
                };
                let before = self.plan.steps.len();
                self.handover(lease, w, c, "Failover", TransitionKind::Failover, why);
                let demotions = self.plan.steps[before..]
                    .iter()
                    .take_while(|s| {
                        matches!(
                            s,
                            Step::Label {
                                role: Some(Role::Reader),
                                ..
                            }
                        )
                    })
                    .count();
                self.finalizer_after_demotions(before + demotions);
                self.event(
                    Severity::Normal,
                    "Adopted",
                    "Adopt",
                    format!(
                        "adopted Lease {} from the Go operator; its holder {holder} could not stay the writer",
                        o.lease_name
                    ),
                );
            }
        }
    }

    /// Move a pending finalizer write from before step `end` to just before it (after the
    /// demotions that end there).
    fn finalizer_after_demotions(&mut self, end: usize) {
        if let Some(i) = self
            .plan
            .steps
            .iter()
            .position(|s| *s == Step::AddFinalizer)
            && i < end
        {
            let f = self.plan.steps.remove(i);
            self.plan
                .steps
                .insert((end - 1).min(self.plan.steps.len()), f);
        }
    }

    /// Our Lease is renewed by another writer: report it on the lock and wait (no step at all).
    /// Only the Error condition is set — the other conditions and fields stay as found, so an
    /// operator that rewrites them is not answered with a rewrite of ours.
    fn concurrent_writer(&mut self, l: &LeaseView) {
        self.status = self.o.status.clone();
        let already = self.error_reported("ConcurrentWriter");
        let message = format!(
            "Lease {} was renewed by another writer than stslock (holder {}); is the Go sts-leader-elect-operator (or another stslock install) still running? stslock writes nothing for this lock until that Lease expires unrenewed",
            self.o.lease_name,
            l.holder.as_deref().unwrap_or("none")
        );
        self.condition("Error", true, "ConcurrentWriter", message.clone());
        if !already {
            self.event(Severity::Warning, "ConcurrentWriter", "Validate", message);
        }
        let expiry = l.expiry().unwrap_or(self.now);
        self.requeue(secs_until(self.now, expiry) + Duration::from_millis(500));
    }

    fn delete(&mut self) {
        let o = self.o;
        if !o.has_finalizer && !o.go_finalizer {
            return;
        }
        let ours = |l: &LeaseView| l.owner.as_deref() == Some(o.key().as_str()) || adoptable(o, l);
        if let Some(l) = &o.lease
            && ours(l)
        {
            self.plan.steps.push(Step::DeleteLease {
                expected_resource_version: l.resource_version.clone(),
            });
        }
        // Only the lock that manages the StatefulSet may strip its labels: a lock that lost a
        // conflict, or whose Lease belongs to someone else, never touched them, and removing
        // them would take the winner's writer away.
        let manages = conflict(o).is_none() && o.lease.as_ref().is_none_or(ours);
        if self.cfg.on_delete == OnDelete::RemoveLabels && manages {
            for p in o.pods.iter().filter(|p| p.role.is_some()) {
                self.plan.steps.push(Step::Label {
                    pod: p.name.clone(),
                    uid: p.uid.clone(),
                    role: None,
                    epoch: None,
                });
            }
        }
        self.plan.steps.push(Step::RemoveFinalizer);
    }
}

#[cfg(test)]
mod tests;
