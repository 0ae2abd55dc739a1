//! The object store: every object kubesim holds, the global resourceVersion counter, the
//! watch history and the commit log.
//!
//! All writes go through [`Store::commit`] under one lock, which gives the same guarantees
//! clients rely on from etcd + the apiserver: a strictly increasing resourceVersion per write,
//! compare-and-swap on `metadata.resourceVersion`, and watch events delivered in commit order
//! without gaps (a watcher subscribes under the same lock that commits). The lock is held only
//! for in-memory work; nothing here awaits.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::sync::broadcast;

use crate::admission;
use crate::error::{ApiError, ApiResult};
use crate::meta;
use crate::recorder::Recorder;
use crate::registry::{Registry, ResourceType};

pub type StoreKey = (String, String);
type ObjKey = (String, String);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

/// One committed change.
#[derive(Debug)]
pub struct Event {
    pub rv: u64,
    pub type_: EventType,
    pub key: StoreKey,
    pub object: Arc<Value>,
    pub old: Option<Arc<Value>>,
    pub at: Instant,
    /// The object serialized once, shared by every watcher that sends it unchanged.
    pub encoded: std::sync::OnceLock<bytes::Bytes>,
}

/// One committed change as the watch history keeps it: the objects serialized, since a JSON
/// tree takes several times the memory of its text and the history holds every version of the
/// last minutes. Decoded again only when a watch resumes from it or a read asks for an older
/// state.
struct Past {
    rv: u64,
    type_: EventType,
    key: StoreKey,
    obj: ObjKey,
    at: Instant,
    object: bytes::Bytes,
    old: Option<bytes::Bytes>,
}

fn decode(b: &bytes::Bytes) -> Arc<Value> {
    // The bytes are this store's own serialization of a Value: they always parse.
    Arc::new(serde_json::from_slice(b).unwrap_or(Value::Null))
}

impl Past {
    /// The event as it was published.
    fn event(&self) -> Arc<Event> {
        Arc::new(Event {
            rv: self.rv,
            type_: self.type_,
            key: self.key.clone(),
            object: decode(&self.object),
            old: self.old.as_ref().map(decode),
            at: self.at,
            encoded: std::sync::OnceLock::from(self.object.clone()),
        })
    }

    /// The object as it was before this change (None: it did not exist).
    fn before(&self) -> Option<Arc<Value>> {
        match self.type_ {
            EventType::Added => None,
            EventType::Modified | EventType::Deleted => {
                Some(decode(self.old.as_ref().unwrap_or(&self.object)))
            }
        }
    }
}

impl Event {
    pub fn encoded(&self) -> &bytes::Bytes {
        self.encoded.get_or_init(|| {
            bytes::Bytes::from(serde_json::to_vec(&*self.object).unwrap_or_default())
        })
    }
}

/// One committed write, attributed to the client that made it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CommitRecord {
    pub rv: u64,
    /// Milliseconds since the store started.
    pub at_ms: u64,
    /// Microseconds since the store started (for latencies of a few milliseconds).
    pub at_us: u64,
    pub actor: String,
    pub verb: &'static str,
    pub group: String,
    pub resource: String,
    pub namespace: String,
    pub name: String,
    /// Values of the labels named in [`StoreConfig::recorded_labels`] on the committed object
    /// (e.g. an ownership label, to check who owned an object when something wrote for it).
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub labels: std::collections::BTreeMap<String, String>,
    /// Served late ([`crate::LateCommit`]): applied by the server after its client may have
    /// given up on it.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub late: bool,
}

tokio::task_local! {
    /// Set while a write is served late (see [`crate::LateCommit`]): its commits say so.
    pub static SERVING_LATE: bool;
}

#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// Watch history kept: events older than this are compacted (410 Gone to a watcher
    /// resuming from before it).
    pub history_window: Duration,
    /// Upper bound on history entries regardless of age.
    pub history_max: usize,
    /// Commit log entries kept (oldest dropped first).
    pub commit_log_max: usize,
    /// Write attempts kept ([`WriteAttempt`], oldest dropped first); 0 (the default) keeps
    /// none: drivers that classify failures turn it on.
    pub attempt_log_max: usize,
    /// The label whose value `writer` the invariant recorder watches on pods.
    pub role_label: String,
    /// Label keys whose values the commit log records with each write.
    pub recorded_labels: Vec<String>,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            history_window: Duration::from_secs(300),
            history_max: 500_000,
            commit_log_max: 1_000_000,
            attempt_log_max: 0,
            role_label: "sts-role".into(),
            recorded_labels: vec![],
        }
    }
}

/// Who is writing and how (query parameters of the request).
#[derive(Debug, Clone, Default)]
pub struct WriteOpts {
    pub actor: String,
    pub dry_run: bool,
    /// `fieldValidation=Strict`: unknown fields are an error instead of being pruned.
    pub strict: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subresource {
    Main,
    Status,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Propagation {
    Background,
    Foreground,
    Orphan,
}

#[derive(Debug, Clone)]
pub struct DeleteOpts {
    pub write: WriteOpts,
    pub grace_seconds: Option<i64>,
    pub propagation: Propagation,
    pub precondition_uid: Option<String>,
    pub precondition_rv: Option<String>,
}

impl Default for DeleteOpts {
    fn default() -> Self {
        DeleteOpts {
            write: WriteOpts::default(),
            grace_seconds: None,
            propagation: Propagation::Background,
            precondition_uid: None,
            precondition_rv: None,
        }
    }
}

pub struct State {
    pub rv: u64,
    pub registry: Registry,
    objects: HashMap<StoreKey, BTreeMap<ObjKey, Arc<Value>>>,
    history: VecDeque<Past>,
    /// The serialized form of each object's latest version in the history (its resourceVersion
    /// and bytes, shared with that entry): the next change of the object keeps it as its old
    /// version without serializing it again.
    latest: HashMap<(StoreKey, ObjKey), (u64, bytes::Bytes)>,
    /// Events with rv <= compacted are gone.
    compacted: u64,
    commit_log: VecDeque<CommitRecord>,
    pub recorder: Recorder,
    next_ip: u32,
}

pub struct Store {
    state: Mutex<State>,
    tx: broadcast::Sender<Arc<Event>>,
    pub config: StoreConfig,
    started: Instant,
    attempts: Mutex<VecDeque<WriteAttempt>>,
}

/// One write request as its client experienced it, faults included: when it arrived, how long
/// until it was answered, and with what status (0: never answered — the client went away
/// first, e.g. it timed out during a partition or a held answer). The commit log says what was
/// committed; this says which tries a client made and what the fault layer did to them.
#[derive(Debug, Clone, serde::Serialize)]
pub struct WriteAttempt {
    /// Milliseconds since the store started, at arrival.
    pub at_ms: u64,
    pub actor: String,
    pub method: String,
    /// The object the request was for (empty when the path names none, e.g. a create).
    pub namespace: String,
    pub resource: String,
    pub name: String,
    pub status: u16,
    pub elapsed_ms: u64,
}

/// What a watch starts with: the events to replay, then the live feed.
pub struct WatchStart {
    pub backlog: Vec<Arc<Event>>,
    pub initial: Vec<Arc<Value>>,
    pub rx: broadcast::Receiver<Arc<Event>>,
    pub rv: u64,
}

pub struct ListResult {
    pub items: Vec<Arc<Value>>,
    pub rv: u64,
    pub continue_token: Option<String>,
    pub remaining: Option<u64>,
}

impl Store {
    pub fn new(config: StoreConfig) -> Arc<Store> {
        let (tx, _) = broadcast::channel(1 << 16);
        let recorder = Recorder::new(config.role_label.clone());
        let store = Arc::new(Store {
            state: Mutex::new(State {
                rv: 0,
                registry: Registry::with_builtins(),
                objects: HashMap::new(),
                history: VecDeque::new(),
                latest: HashMap::new(),
                compacted: 0,
                commit_log: VecDeque::new(),
                recorder,
                next_ip: 1,
            }),
            tx,
            config,
            started: Instant::now(),
            attempts: Mutex::new(VecDeque::new()),
        });
        let ns = store.registry().get("", "v1", "namespaces");
        if let Some(ns) = ns {
            for name in ["default", "kube-system", "kube-public", "kube-node-lease"] {
                let obj =
                    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}});
                let opts = WriteOpts {
                    actor: "kubesim".into(),
                    ..Default::default()
                };
                if let Err(e) = store.create(&ns, None, obj, &opts) {
                    tracing::error!(error = %e, "creating namespace {name}");
                }
            }
        }
        store
    }

    pub fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves consistent data (every mutation is applied
        // whole or not at all), so a poisoned lock is still safe to use.
        match self.state.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    pub fn registry(&self) -> Registry {
        self.lock().registry.clone()
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Event>> {
        self.tx.subscribe()
    }

    pub fn elapsed_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    pub fn elapsed_us(&self) -> u64 {
        self.started.elapsed().as_micros() as u64
    }

    pub fn current_rv(&self) -> u64 {
        self.lock().rv
    }

    pub fn get(&self, rt: &ResourceType, ns: Option<&str>, name: &str) -> ApiResult<Arc<Value>> {
        let st = self.lock();
        st.get(rt, ns, name)
            .ok_or_else(|| ApiError::not_found(rt, name))
    }

    /// List objects of a kind, optionally in one namespace, filtered by `keep`; paginated by
    /// `limit` and an opaque continue token (the last key returned).
    pub fn list(
        &self,
        rt: &ResourceType,
        ns: Option<&str>,
        keep: &dyn Fn(&Value) -> bool,
        limit: Option<usize>,
        continue_token: Option<&str>,
    ) -> ApiResult<ListResult> {
        let st = self.lock();
        let (start_rv, after) = match continue_token {
            Some(tok) => decode_continue(tok)?,
            None => (st.rv, None),
        };
        let Some(map) = st.objects.get(&rt.store_key()) else {
            return Ok(ListResult {
                items: vec![],
                rv: start_rv,
                continue_token: None,
                remaining: None,
            });
        };
        let mut items = Vec::new();
        let mut last_key = None;
        let mut more = 0u64;
        let iter: Box<dyn Iterator<Item = (&ObjKey, &Arc<Value>)>> = match (ns, &after) {
            (_, Some(k)) => Box::new(map.range((
                std::ops::Bound::Excluded(k.clone()),
                std::ops::Bound::Unbounded,
            ))),
            (Some(ns), None) => Box::new(map.range((ns.to_string(), String::new())..)),
            (None, None) => Box::new(map.iter()),
        };
        for (k, v) in iter {
            if let Some(ns) = ns
                && k.0 != ns
            {
                if k.0.as_str() > ns {
                    break;
                }
                continue;
            }
            if !keep(v) {
                continue;
            }
            if limit.is_some_and(|l| items.len() >= l) {
                more += 1;
                continue;
            }
            items.push(v.clone());
            last_key = Some(k.clone());
        }
        let continue_token = if more > 0 {
            last_key.map(|k| encode_continue(start_rv, &k))
        } else {
            None
        };
        Ok(ListResult {
            items,
            rv: start_rv,
            continue_token,
            remaining: (more > 0).then_some(more),
        })
    }

    /// The objects of `rt` (in `ns`, filtered by `keep`) as they were at least `age` ago: the
    /// current ones with every newer event of the watch history undone, newest first. The
    /// history is bounded ([`StoreConfig::history_window`], `history_max`, compaction), so the
    /// snapshot is never older than the history kept. Returns the snapshot's resourceVersion;
    /// no pagination (the apiserver's watch cache ignores `limit` for `resourceVersion=0`).
    pub fn list_as_of(
        &self,
        rt: &ResourceType,
        ns: Option<&str>,
        keep: &dyn Fn(&Value) -> bool,
        age: Duration,
    ) -> ApiResult<ListResult> {
        let key = rt.store_key();
        let in_ns = |k: &ObjKey| ns.is_none_or(|n| k.0 == n);
        let (map, rv) = {
            let st = self.lock();
            let mut map: BTreeMap<ObjKey, Arc<Value>> = st
                .objects
                .get(&key)
                .map(|m| {
                    m.iter()
                        .filter(|(k, _)| in_ns(k))
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect()
                })
                .unwrap_or_default();
            let rv = st.undo_newer(&key, age, |k, before| {
                if !in_ns(&k) {
                    return;
                }
                match before {
                    Some(v) => map.insert(k, v),
                    None => map.remove(&k),
                };
            });
            (map, rv)
        };
        Ok(ListResult {
            items: map.into_values().filter(|v| keep(v)).collect(),
            rv,
            continue_token: None,
            remaining: None,
        })
    }

    /// One object as it was at least `age` ago (see [`Store::list_as_of`]).
    pub fn get_as_of(
        &self,
        rt: &ResourceType,
        ns: Option<&str>,
        name: &str,
        age: Duration,
    ) -> ApiResult<Arc<Value>> {
        let key = rt.store_key();
        let want = obj_key(rt, ns, name);
        let st = self.lock();
        let mut cur = st.get(rt, ns, name);
        st.undo_newer(&key, age, |k, before| {
            if k == want {
                cur = before;
            }
        });
        cur.ok_or_else(|| ApiError::not_found(rt, name))
    }

    /// Start a watch: replay history after `from_rv`, or, when `from_rv` is None, return the
    /// current objects to send as synthetic ADDED events. Subscribing happens under the commit
    /// lock, so no event falls between the replay and the live feed.
    pub fn watch(&self, rt: &ResourceType, from_rv: Option<u64>) -> ApiResult<WatchStart> {
        let st = self.lock();
        let key = rt.store_key();
        let rx = self.tx.subscribe();
        match from_rv {
            None => {
                let initial = st
                    .objects
                    .get(&key)
                    .map(|m| m.values().cloned().collect())
                    .unwrap_or_default();
                Ok(WatchStart {
                    backlog: vec![],
                    initial,
                    rx,
                    rv: st.rv,
                })
            }
            Some(rv) => {
                if rv < st.compacted {
                    return Err(ApiError::gone(format!(
                        "too old resource version: {rv} ({})",
                        st.compacted + 1
                    )));
                }
                let backlog = st
                    .history
                    .iter()
                    .filter(|e| e.rv > rv && e.key == key)
                    .map(Past::event)
                    .collect();
                Ok(WatchStart {
                    backlog,
                    initial: vec![],
                    rx,
                    rv: st.rv,
                })
            }
        }
    }

    /// Forget all watch history: every watcher that resumes from an older resourceVersion gets
    /// 410 Gone and must relist.
    pub fn compact(&self) -> u64 {
        let mut st = self.lock();
        st.history.clear();
        st.latest.clear();
        st.compacted = st.rv;
        st.rv
    }

    pub fn commit_log(&self) -> Vec<CommitRecord> {
        self.lock().commit_log.iter().cloned().collect()
    }

    /// Record a write request's outcome (bounded like the commit log).
    pub fn record_attempt(&self, a: WriteAttempt) {
        if self.config.attempt_log_max == 0 {
            return;
        }
        let mut log = self
            .attempts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if log.len() >= self.config.attempt_log_max {
            log.pop_front();
        }
        log.push_back(a);
    }

    /// Every write request recorded, oldest first (see [`WriteAttempt`]).
    pub fn write_attempts(&self) -> Vec<WriteAttempt> {
        self.attempts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .cloned()
            .collect()
    }

    /// The commit log's records with a resourceVersion of `rv` or newer: a copy of the tail
    /// only (the log is in resourceVersion order), for drivers that look at it while writing.
    pub fn commits_since(&self, rv: u64) -> Vec<CommitRecord> {
        let st = self.lock();
        let from = st.commit_log.partition_point(|c| c.rv < rv);
        st.commit_log.range(from..).cloned().collect()
    }

    pub fn create(
        &self,
        rt: &ResourceType,
        ns: Option<&str>,
        obj: Value,
        opts: &WriteOpts,
    ) -> ApiResult<Arc<Value>> {
        let mut st = self.lock();
        let created = st.create_locked(self, rt, ns, obj, opts)?;
        Ok(created)
    }

    /// Replace an object (PUT) or run `f` on its current state (PATCH), with
    /// compare-and-swap when the result carries a resourceVersion.
    pub fn update_with(
        &self,
        rt: &ResourceType,
        ns: Option<&str>,
        name: &str,
        sub: Subresource,
        opts: &WriteOpts,
        f: &mut dyn FnMut(Option<&Value>) -> ApiResult<Value>,
        create_if_missing: bool,
    ) -> ApiResult<Arc<Value>> {
        let mut st = self.lock();
        let current = st.get(rt, ns, name);
        let Some(current) = current else {
            if create_if_missing {
                let mut obj = f(None)?;
                let m = meta::meta_mut(&mut obj);
                m.insert("name".into(), json!(name));
                m.remove("resourceVersion");
                return st.create_locked(self, rt, ns, obj, opts);
            }
            return Err(ApiError::not_found(rt, name));
        };
        let new = f(Some(&current))?;
        st.update_locked(self, rt, &current, new, sub, opts)
    }

    pub fn delete(
        &self,
        rt: &ResourceType,
        ns: Option<&str>,
        name: &str,
        opts: &DeleteOpts,
    ) -> ApiResult<Arc<Value>> {
        let mut st = self.lock();
        st.delete_locked(self, rt, ns, name, opts)
    }

    fn publish(&self, st: &mut State, ev: Event, obj: ObjKey) {
        let ev = Arc::new(ev);
        let cutoff = ev.at.checked_sub(self.config.history_window);
        let object = ev.encoded().clone();
        let latest_key = (ev.key.clone(), obj);
        let old = ev.old.as_ref().map(|old| {
            let old_rv = meta::meta_str(old, "resourceVersion").and_then(|v| v.parse().ok());
            match st.latest.get(&latest_key) {
                Some((rv, bytes)) if Some(*rv) == old_rv => bytes.clone(),
                _ => bytes::Bytes::from(serde_json::to_vec(&**old).unwrap_or_default()),
            }
        });
        if ev.type_ == EventType::Deleted {
            st.latest.remove(&latest_key);
        } else {
            st.latest
                .insert(latest_key.clone(), (ev.rv, object.clone()));
        }
        st.history.push_back(Past {
            rv: ev.rv,
            type_: ev.type_,
            key: latest_key.0,
            obj: latest_key.1,
            at: ev.at,
            object,
            old,
        });
        while st.history.len() > self.config.history_max
            || st
                .history
                .front()
                .zip(cutoff)
                .is_some_and(|(e, c)| e.at < c)
        {
            if let Some(gone) = st.history.pop_front() {
                st.compacted = st.compacted.max(gone.rv);
                let k = (gone.key, gone.obj);
                if st.latest.get(&k).is_some_and(|(rv, _)| *rv == gone.rv) {
                    st.latest.remove(&k);
                }
            }
        }
        // No receivers is fine: nobody is watching.
        let _ = self.tx.send(ev);
    }
}

fn encode_continue(rv: u64, k: &ObjKey) -> String {
    let raw = json!({"rv": rv, "ns": k.0, "name": k.1}).to_string();
    hex_encode(raw.as_bytes())
}

fn decode_continue(tok: &str) -> ApiResult<(u64, Option<ObjKey>)> {
    let bad = || ApiError::bad_request(format!("invalid continue token: {tok:?}"));
    let raw = hex_decode(tok).ok_or_else(bad)?;
    let v: Value = serde_json::from_slice(&raw).map_err(|_| bad())?;
    let rv = v["rv"].as_u64().ok_or_else(bad)?;
    let ns = v["ns"].as_str().ok_or_else(bad)?.to_string();
    let name = v["name"].as_str().ok_or_else(bad)?.to_string();
    Ok((rv, Some((ns, name))))
}

fn hex_encode(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn hex_decode(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

fn obj_key(rt: &ResourceType, ns: Option<&str>, name: &str) -> ObjKey {
    (
        if rt.namespaced {
            ns.unwrap_or("").to_string()
        } else {
            String::new()
        },
        name.to_string(),
    )
}

/// Whether the apiserver keeps `metadata.generation` for a kind: custom resources and the
/// kinds with a spec that controllers observe (not ConfigMaps, Leases, Events, RBAC, ...).
fn has_generation(rt: &ResourceType) -> bool {
    rt.crd.is_some()
        || matches!(
            (rt.group.as_str(), rt.plural.as_str()),
            ("", "pods")
                | ("apps", _)
                | ("policy", _)
                | ("networking.k8s.io", _)
                | ("apiextensions.k8s.io", _)
                | ("batch", _)
        )
}

/// The registry key etcd would hold an object under (quoted in storage errors).
fn storage_key(rt: &ResourceType, obj: &Value) -> String {
    let prefix = if rt.crd.is_some() {
        format!("/registry/{}/{}", rt.group, rt.plural)
    } else {
        format!("/registry/{}", rt.plural)
    };
    let ns = meta::namespace(obj);
    if ns.is_empty() {
        format!("{prefix}/{}", meta::name(obj))
    } else {
        format!("{prefix}/{ns}/{}", meta::name(obj))
    }
}

/// The parts of an object that count as its spec for `metadata.generation`.
/// `a` and `b` are equal but for the top-level fields `skip` says to leave out (compared in
/// place: the write path compares whole objects on every update).
fn equal_except(a: &Value, b: &Value, skip: &dyn Fn(&str) -> bool) -> bool {
    let (Value::Object(a), Value::Object(b)) = (a, b) else {
        return a == b;
    };
    let kept = |m: &serde_json::Map<String, Value>| m.keys().filter(|k| !skip(k)).count();
    kept(a) == kept(b)
        && a.iter()
            .filter(|(k, _)| !skip(k))
            .all(|(k, v)| b.get(k) == Some(v))
}

/// The spec part of two objects (everything but metadata, type and, for kinds with a status
/// subresource, status) is the same: a change of it bumps `metadata.generation`.
fn same_spec(a: &Value, b: &Value, has_status: bool) -> bool {
    equal_except(a, b, &|k| {
        matches!(k, "metadata" | "apiVersion" | "kind") || (has_status && k == "status")
    })
}

/// `new` is `current` but for its resourceVersion: an update that changes nothing.
fn same_but_resource_version(new: &Value, current: &Value) -> bool {
    equal_except(new, current, &|k| k == "metadata")
        && equal_except(
            new.get("metadata").unwrap_or(&Value::Null),
            current.get("metadata").unwrap_or(&Value::Null),
            &|k| k == "resourceVersion",
        )
}

impl State {
    pub fn get(&self, rt: &ResourceType, ns: Option<&str>, name: &str) -> Option<Arc<Value>> {
        self.objects
            .get(&rt.store_key())
            .and_then(|m| m.get(&obj_key(rt, ns, name)))
            .cloned()
    }

    /// Walk the history of `key` newer than `age`, newest first, calling `undo` with each
    /// changed object's key and its state before the change (None: it did not exist). Returns
    /// the resourceVersion of the state before the oldest change walked (the current one when
    /// none is).
    fn undo_newer(
        &self,
        key: &StoreKey,
        age: Duration,
        mut undo: impl FnMut(ObjKey, Option<Arc<Value>>),
    ) -> u64 {
        let cutoff = Instant::now().checked_sub(age);
        let mut rv = self.rv;
        for ev in self.history.iter().rev() {
            if cutoff.is_some_and(|c| ev.at <= c) {
                break;
            }
            rv = ev.rv.saturating_sub(1);
            if ev.key != *key {
                continue;
            }
            undo(ev.obj.clone(), ev.before());
        }
        rv
    }

    pub fn objects_of(&self, key: &StoreKey) -> impl Iterator<Item = &Arc<Value>> {
        self.objects.get(key).into_iter().flat_map(|m| m.values())
    }

    /// The objects of `key` in namespace `ns` whose names start with `prefix`: a range of the
    /// store's ordered map, not a scan of every object of the kind.
    pub fn objects_named<'a>(
        &'a self,
        key: &StoreKey,
        ns: &'a str,
        prefix: &'a str,
    ) -> impl Iterator<Item = &'a Arc<Value>> + 'a {
        let start = (ns.to_string(), prefix.to_string());
        self.objects
            .get(key)
            .into_iter()
            .flat_map(move |m| m.range(start.clone()..))
            .take_while(move |((n, name), _)| n == ns && name.starts_with(prefix))
            .map(|(_, v)| v)
    }

    pub fn allocate_ip(&mut self, prefix: &str) -> String {
        let n = self.next_ip;
        self.next_ip += 1;
        format!("{prefix}.{}.{}", (n / 250) % 250, n % 250 + 1)
    }

    fn record(
        &mut self,
        store: &Store,
        verb: &'static str,
        key: &StoreKey,
        obj: &Value,
        actor: &str,
    ) {
        if store.config.commit_log_max == 0 {
            return;
        }
        if self.commit_log.len() >= store.config.commit_log_max {
            self.commit_log.pop_front();
        }
        let at = store.started.elapsed();
        self.commit_log.push_back(CommitRecord {
            rv: self.rv,
            at_ms: at.as_millis() as u64,
            at_us: at.as_micros() as u64,
            actor: actor.to_string(),
            verb,
            group: key.0.clone(),
            resource: key.1.clone(),
            namespace: meta::namespace(obj).to_string(),
            name: meta::name(obj).to_string(),
            labels: store
                .config
                .recorded_labels
                .iter()
                .filter_map(|k| meta::label(obj, k).map(|v| (k.clone(), v.to_string())))
                .collect(),
            late: SERVING_LATE.try_with(|l| *l).unwrap_or(false),
        });
    }

    fn put(
        &mut self,
        store: &Store,
        key: StoreKey,
        type_: EventType,
        obj: Value,
        old: Option<Arc<Value>>,
        actor: &str,
    ) -> Arc<Value> {
        let obj = Arc::new(obj);
        let k = (
            meta::namespace(&obj).to_string(),
            meta::name(&obj).to_string(),
        );
        let map = self.objects.entry(key.clone()).or_default();
        match type_ {
            EventType::Deleted => {
                map.remove(&k);
            }
            _ => {
                map.insert(k.clone(), obj.clone());
            }
        }
        if key.0.is_empty() && key.1 == "pods" {
            let at = store.elapsed_ms();
            let new = (type_ != EventType::Deleted).then_some(&*obj);
            self.recorder.observe_pod(at, old.as_deref(), new);
        }
        let verb = match type_ {
            EventType::Added => "create",
            EventType::Modified => "update",
            EventType::Deleted => "delete",
        };
        self.record(store, verb, &key, &obj, actor);
        let ev = Event {
            rv: self.rv,
            type_,
            key,
            object: obj.clone(),
            old,
            at: Instant::now(),
            encoded: std::sync::OnceLock::new(),
        };
        store.publish(self, ev, k);
        obj
    }

    pub fn create_locked(
        &mut self,
        store: &Store,
        rt: &ResourceType,
        ns: Option<&str>,
        mut obj: Value,
        opts: &WriteOpts,
    ) -> ApiResult<Arc<Value>> {
        if !obj.is_object() {
            return Err(ApiError::bad_request(
                "the body of the request was not an object",
            ));
        }
        obj["apiVersion"] = json!(rt.api_version());
        obj["kind"] = json!(rt.kind);
        let ns = if rt.namespaced {
            let body_ns = meta::namespace(&obj).to_string();
            let ns = ns.map(str::to_string).unwrap_or(body_ns.clone());
            if !body_ns.is_empty() && body_ns != ns {
                return Err(ApiError::bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request",
                ));
            }
            let ns = if ns.is_empty() {
                "default".to_string()
            } else {
                ns
            };
            Some(ns)
        } else {
            None
        };
        {
            let m = meta::meta_mut(&mut obj);
            let has_name = m
                .get("name")
                .and_then(Value::as_str)
                .is_some_and(|s| !s.is_empty());
            if !has_name {
                match m.get("generateName").and_then(Value::as_str) {
                    Some(prefix) if !prefix.is_empty() => {
                        let suffix: String =
                            uuid::Uuid::new_v4().simple().to_string()[..5].to_string();
                        m.insert("name".into(), json!(format!("{prefix}{suffix}")));
                    }
                    _ => {
                        let causes = vec![(
                            "FieldValueRequired".to_string(),
                            "metadata.name".to_string(),
                            "Required value: name or generateName is required".to_string(),
                        )];
                        return Err(ApiError::invalid(rt, "", &causes));
                    }
                }
            }
            if let Some(ns) = &ns {
                m.insert("namespace".into(), json!(ns));
            } else {
                m.remove("namespace");
            }
        }
        let name = meta::name(&obj).to_string();
        if let Some(ns) = &ns {
            let exists = self
                .objects
                .get(&(String::new(), "namespaces".to_string()))
                .is_some_and(|m| m.contains_key(&(String::new(), ns.clone())));
            if !(exists || rt.group.is_empty() && rt.plural == "namespaces") {
                return Err(ApiError::namespace_not_found(ns));
            }
            let terminating = self
                .objects
                .get(&(String::new(), "namespaces".to_string()))
                .and_then(|m| m.get(&(String::new(), ns.clone())))
                .is_some_and(|n| meta::is_terminating(n));
            if terminating {
                return Err(ApiError {
                    details: Some(
                        json!({"name": name, "kind": rt.plural, "causes": [{"reason": "NamespaceTerminating", "message": format!("namespace {ns} is being terminated"), "field": "metadata.namespace"}]}),
                    ),
                    ..ApiError::new(
                        403,
                        "Forbidden",
                        format!(
                            "{} \"{name}\" is forbidden: unable to create new content in namespace {ns} because it is being terminated",
                            rt.group_resource()
                        ),
                    )
                });
            }
        }
        if let Some(crd) = &rt.crd {
            let terminating = self
                .objects
                .get(&(
                    "apiextensions.k8s.io".to_string(),
                    "customresourcedefinitions".to_string(),
                ))
                .and_then(|m| m.get(&(String::new(), crd.crd_name.clone())))
                .is_some_and(|c| meta::is_terminating(c));
            if terminating {
                return Err(ApiError {
                    details: Some(json!({"name": name, "group": rt.group, "kind": rt.plural})),
                    ..ApiError::new(
                        403,
                        "Forbidden",
                        format!(
                            "{} \"{name}\" is forbidden: create not allowed while custom resource definition is terminating",
                            rt.group_resource()
                        ),
                    )
                });
            }
        }
        if self.get(rt, ns.as_deref(), &name).is_some() {
            return Err(ApiError::already_exists(rt, &name));
        }
        let rv = self.rv + 1;
        {
            let m = meta::meta_mut(&mut obj);
            m.insert("uid".into(), json!(uuid::Uuid::new_v4().to_string()));
            m.insert("creationTimestamp".into(), json!(meta::now_rfc3339()));
            if has_generation(rt) {
                m.insert("generation".into(), json!(1));
            } else {
                m.remove("generation");
            }
            m.insert("resourceVersion".into(), json!(rv.to_string()));
            m.remove("deletionTimestamp");
            m.remove("deletionGracePeriodSeconds");
            m.remove("managedFields");
            m.remove("selfLink");
        }
        // A custom resource with a status subresource is created without status: status is
        // written through /status only.
        if rt.crd.is_some()
            && rt.status
            && let Value::Object(m) = &mut obj
        {
            m.remove("status");
        }
        admission::admit(self, rt, &mut obj, None, opts)?;
        if opts.dry_run {
            return Ok(Arc::new(obj));
        }
        self.rv = rv;
        let key = rt.store_key();
        let created = self.put(store, key, EventType::Added, obj, None, &opts.actor);
        admission::after_commit(self, store, rt, &created);
        Ok(created)
    }

    pub fn update_locked(
        &mut self,
        store: &Store,
        rt: &ResourceType,
        current: &Arc<Value>,
        mut new: Value,
        sub: Subresource,
        opts: &WriteOpts,
    ) -> ApiResult<Arc<Value>> {
        let name = meta::name(current).to_string();
        if !new.is_object() {
            return Err(ApiError::bad_request(
                "the body of the request was not an object",
            ));
        }
        if let Some(rv) = meta::meta_str(&new, "resourceVersion")
            && !rv.is_empty()
            && Some(rv) != meta::meta_str(current, "resourceVersion")
        {
            return Err(ApiError::stale(rt, &name));
        }
        if let Some(uid) = meta::meta_str(&new, "uid")
            && !uid.is_empty()
            && uid != meta::uid(current)
        {
            return Err(ApiError::conflict(
                rt,
                &name,
                &format!(
                    "StorageError: invalid object, Code: 4, Key: {}, ResourceVersion: 0, AdditionalErrorMsg: Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                    storage_key(rt, current),
                    meta::uid(current)
                ),
            ));
        }
        let body_name = meta::name(&new);
        if !body_name.is_empty() && body_name != name {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({body_name}) does not match the name on the URL ({name})"
            )));
        }
        new["apiVersion"] = json!(rt.api_version());
        new["kind"] = json!(rt.kind);
        // Subresource semantics: a status write changes only status; a main-resource write of a
        // kind with a status subresource cannot change status.
        if rt.status {
            match sub {
                Subresource::Status => {
                    let status = new.as_object_mut().and_then(|m| m.remove("status"));
                    let mut merged = (**current).clone();
                    match status {
                        Some(s) => merged["status"] = s,
                        None => {
                            if let Value::Object(m) = &mut merged {
                                m.remove("status");
                            }
                        }
                    }
                    new = merged;
                }
                Subresource::Main => match current.get("status") {
                    Some(s) => new["status"] = s.clone(),
                    None => {
                        if let Value::Object(m) = &mut new {
                            m.remove("status");
                        }
                    }
                },
            }
        }
        let cur_meta = meta::meta(current).cloned().unwrap_or_default();
        let terminating = meta::is_terminating(current);
        if terminating {
            let old_f = meta::finalizers(current);
            let added: Vec<String> = meta::finalizers(&new)
                .into_iter()
                .filter(|f| !old_f.contains(f))
                .collect();
            if !added.is_empty() {
                let causes = vec![(
                    "FieldValueForbidden".to_string(),
                    "metadata.finalizers".to_string(),
                    format!(
                        "Forbidden: no new finalizers can be added if the object is being deleted, found new finalizers []string{{{}}}",
                        added
                            .iter()
                            .map(|f| format!("{f:?}"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                )];
                // Reported by both metadata validations of an update.
                let causes = [causes.clone(), causes].concat();
                return Err(ApiError::invalid(rt, &name, &causes));
            }
        }
        {
            let m = meta::meta_mut(&mut new);
            for f in [
                "name",
                "namespace",
                "uid",
                "creationTimestamp",
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
                "generation",
            ] {
                match cur_meta.get(f) {
                    Some(v) => m.insert(f.into(), v.clone()),
                    None => m.remove(f),
                };
            }
            m.remove("managedFields");
            m.remove("selfLink");
        }
        admission::admit(self, rt, &mut new, Some(current), opts)?;
        if has_generation(rt) && !same_spec(&new, current, rt.status) {
            let g = cur_meta
                .get("generation")
                .and_then(Value::as_i64)
                .unwrap_or(0)
                + 1;
            meta::meta_mut(&mut new).insert("generation".into(), json!(g));
        }
        // An update that changes nothing is not a write: same resourceVersion, no event, as
        // the apiserver does (clients rely on this to keep quiet systems quiet).
        if same_but_resource_version(&new, current) {
            return Ok(current.clone());
        }
        if opts.dry_run {
            return Ok(Arc::new(new));
        }
        let key = rt.store_key();
        // A terminating object leaves the store when its last finalizer goes, unless it is in
        // a graceful deletion (a pod whose kubelet has not confirmed yet): that one leaves when
        // the kubelet deletes it with grace 0.
        let grace_pending = cur_meta
            .get("deletionGracePeriodSeconds")
            .and_then(Value::as_i64)
            .is_some_and(|g| g > 0);
        let spec_finalizers = new
            .pointer("/spec/finalizers")
            .and_then(Value::as_array)
            .is_some_and(|a| !a.is_empty())
            && rt.group.is_empty()
            && rt.plural == "namespaces";
        if terminating && !grace_pending && !spec_finalizers && meta::finalizers(&new).is_empty() {
            return Ok(self.remove(store, rt, &key, new, Some(current.clone()), &opts.actor));
        }
        self.rv += 1;
        meta::meta_mut(&mut new).insert("resourceVersion".into(), json!(self.rv.to_string()));
        let updated = self.put(
            store,
            key,
            EventType::Modified,
            new,
            Some(current.clone()),
            &opts.actor,
        );
        admission::after_commit(self, store, rt, &updated);
        Ok(updated)
    }

    pub(crate) fn remove(
        &mut self,
        store: &Store,
        rt: &ResourceType,
        key: &StoreKey,
        mut obj: Value,
        old: Option<Arc<Value>>,
        actor: &str,
    ) -> Arc<Value> {
        self.rv += 1;
        meta::meta_mut(&mut obj).insert("resourceVersion".into(), json!(self.rv.to_string()));
        let removed = self.put(store, key.clone(), EventType::Deleted, obj, old, actor);
        admission::after_delete(self, store, rt, &removed);
        removed
    }

    pub fn delete_locked(
        &mut self,
        store: &Store,
        rt: &ResourceType,
        ns: Option<&str>,
        name: &str,
        opts: &DeleteOpts,
    ) -> ApiResult<Arc<Value>> {
        let Some(current) = self.get(rt, ns, name) else {
            return Err(ApiError::not_found(rt, name));
        };
        if let Some(uid) = &opts.precondition_uid
            && uid != meta::uid(&current)
        {
            return Err(ApiError {
                details: Some(json!({"name": name, "kind": rt.kind})),
                ..ApiError::new(
                    409,
                    "Conflict",
                    format!(
                        "Operation cannot be fulfilled on {} {name:?}: the UID in the precondition ({uid}) does not match the UID in record ({}). The object might have been deleted and then recreated",
                        rt.kind,
                        meta::uid(&current)
                    ),
                )
            });
        }
        if let Some(rv) = &opts.precondition_rv
            && Some(rv.as_str()) != meta::meta_str(&current, "resourceVersion")
        {
            return Err(ApiError {
                details: Some(json!({"name": name, "kind": rt.kind})),
                ..ApiError::new(
                    409,
                    "Conflict",
                    format!(
                        "Operation cannot be fulfilled on {} {name:?}: the ResourceVersion in the precondition ({rv}) does not match the ResourceVersion in record ({}). The object might have been modified",
                        rt.kind,
                        meta::meta_str(&current, "resourceVersion").unwrap_or("")
                    ),
                )
            });
        }
        if opts.write.dry_run {
            return Ok(current);
        }
        let key = rt.store_key();
        let mut obj = (*current).clone();
        // A namespace with spec.finalizers (`kubernetes`) turns Terminating; the namespace
        // controller deletes its content, then the namespace.
        let ns_finalizers = obj
            .pointer("/spec/finalizers")
            .and_then(Value::as_array)
            .is_some_and(|a| !a.is_empty());
        if rt.group.is_empty() && rt.plural == "namespaces" && ns_finalizers {
            if meta::is_terminating(&current) {
                return Ok(current);
            }
            let m = meta::meta_mut(&mut obj);
            m.insert("deletionTimestamp".into(), json!(meta::now_rfc3339()));
            m.insert("deletionGracePeriodSeconds".into(), json!(0));
            self.rv += 1;
            m.insert("resourceVersion".into(), json!(self.rv.to_string()));
            meta::set_path(&mut obj, ".status.phase", json!("Terminating"));
            return Ok(self.put(
                store,
                key,
                EventType::Modified,
                obj,
                Some(current),
                &opts.write.actor,
            ));
        }
        let mut finalizers = meta::finalizers(&obj);
        match opts.propagation {
            Propagation::Foreground if !finalizers.iter().any(|f| f == "foregroundDeletion") => {
                finalizers.push("foregroundDeletion".into());
            }
            Propagation::Orphan if !finalizers.iter().any(|f| f == "orphan") => {
                finalizers.push("orphan".into());
            }
            _ => {}
        }
        // A CRD's deletion first deletes its custom resources (the apiserver's finalizer).
        if rt.group == "apiextensions.k8s.io"
            && rt.plural == "customresourcedefinitions"
            && !meta::is_terminating(&current)
            && !finalizers
                .iter()
                .any(|f| f == admission::CRD_CLEANUP_FINALIZER)
        {
            finalizers.push(admission::CRD_CLEANUP_FINALIZER.into());
        }
        let graceful = admission::graceful_delete_seconds(rt, &current, opts.grace_seconds);
        let already_terminating = meta::is_terminating(&current);
        if !finalizers.is_empty() || graceful.is_some() {
            if already_terminating {
                // A second delete can only shorten the grace period; at 0 the object goes as
                // soon as no finalizer holds it.
                if opts.grace_seconds == Some(0) {
                    if finalizers.is_empty() {
                        return Ok(self.remove(
                            store,
                            rt,
                            &key,
                            obj,
                            Some(current),
                            &opts.write.actor,
                        ));
                    }
                    if meta::meta(&current)
                        .and_then(|m| m.get("deletionGracePeriodSeconds"))
                        .and_then(Value::as_i64)
                        != Some(0)
                    {
                        let m = meta::meta_mut(&mut obj);
                        m.insert("deletionGracePeriodSeconds".into(), json!(0));
                        self.rv += 1;
                        m.insert("resourceVersion".into(), json!(self.rv.to_string()));
                        return Ok(self.put(
                            store,
                            key,
                            EventType::Modified,
                            obj,
                            Some(current),
                            &opts.write.actor,
                        ));
                    }
                }
                return Ok(current);
            }
            let grace = graceful.unwrap_or(0);
            let when = jiff::Timestamp::now()
                .checked_add(jiff::SignedDuration::from_secs(grace))
                .unwrap_or_else(|_| jiff::Timestamp::now());
            let m = meta::meta_mut(&mut obj);
            m.insert("deletionTimestamp".into(), json!(meta::format_time(when)));
            m.insert("deletionGracePeriodSeconds".into(), json!(grace));
            m.insert("finalizers".into(), json!(finalizers));
            self.rv += 1;
            m.insert("resourceVersion".into(), json!(self.rv.to_string()));
            let updated = self.put(
                store,
                key,
                EventType::Modified,
                obj,
                Some(current),
                &opts.write.actor,
            );
            admission::after_commit(self, store, rt, &updated);
            return Ok(updated);
        }
        Ok(self.remove(store, rt, &key, obj, Some(current), &opts.write.actor))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn write(store: &Store, rt: &ResourceType, name: &str, data: &str) -> Arc<Value> {
        let opts = WriteOpts::default();
        store
            .update_with(
                rt,
                Some("default"),
                name,
                Subresource::Main,
                &opts,
                &mut |_| Ok(json!({"metadata": {"name": name}, "data": {"v": data}})),
                true,
            )
            .expect("write")
    }

    /// The packed history gives back what was published: a watch resuming from an old version
    /// replays every change with its object and old object, and reads at an age see the
    /// versions of then, deleted objects included.
    #[test]
    fn the_packed_history_replays_and_undoes_exactly() {
        let store = Store::new(StoreConfig::default());
        let rt = store
            .registry()
            .get("", "v1", "configmaps")
            .expect("configmaps");
        let first = write(&store, &rt, "a", "1");
        let start: u64 = meta::meta_str(&first, "resourceVersion")
            .unwrap()
            .parse()
            .unwrap();
        std::thread::sleep(Duration::from_millis(30));
        let second = write(&store, &rt, "a", "2");
        let third = write(&store, &rt, "a", "3");
        write(&store, &rt, "b", "x");
        store
            .delete(&rt, Some("default"), "b", &DeleteOpts::default())
            .expect("delete");
        let replay = store.watch(&rt, Some(start)).expect("watch").backlog;
        let seen: Vec<_> = replay
            .iter()
            .map(|e| {
                (
                    e.type_,
                    e.object["data"]["v"].clone(),
                    e.old.as_ref().map(|o| o["data"]["v"].clone()),
                )
            })
            .collect();
        assert_eq!(
            seen,
            vec![
                (EventType::Modified, json!("2"), Some(json!("1"))),
                (EventType::Modified, json!("3"), Some(json!("2"))),
                (EventType::Added, json!("x"), None),
                (EventType::Deleted, json!("x"), Some(json!("x"))),
            ]
        );
        assert_eq!(*replay[0].object, *second);
        assert_eq!(*replay[1].object, *third);
        assert_eq!(replay[1].encoded(), &serde_json::to_vec(&*third).unwrap());
        // 20 ms ago: after the first write, before the rest.
        let then = store
            .get_as_of(&rt, Some("default"), "a", Duration::from_millis(20))
            .expect("a as of then");
        assert_eq!(*then, *first);
        let listed = store
            .list_as_of(&rt, Some("default"), &|_| true, Duration::from_millis(20))
            .expect("list as of then");
        assert_eq!(listed.items.len(), 1, "b did not exist then");
        assert_eq!(listed.rv, start);
        // A compaction drops the history: resuming from before it is 410 Gone.
        store.compact();
        assert!(store.watch(&rt, Some(start)).is_err());
    }
}
