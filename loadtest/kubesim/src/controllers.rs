//! The control loops a cluster runs besides the apiserver, reduced to what StatefulSet
//! workloads need: the StatefulSet controller, a kubelet stand-in, the garbage collector, and
//! the pod/node fault actions.
//!
//! They react to committed events (never poll), write through the same store path as any
//! client (so watchers, the commit log and the invariant recorder see their writes), and are
//! attributed as `kubesim/<controller>` in the commit log.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::{Notify, broadcast};

use crate::error::{ApiError, ApiResult};
use crate::meta;
use crate::registry::ResourceType;
use crate::store::{DeleteOpts, Event, EventType, Propagation, Store, Subresource, WriteOpts};

#[derive(Debug, Clone)]
pub struct ControllerConfig {
    /// Time from a pod being scheduled to it being Running and Ready.
    pub pod_ready_delay: Duration,
    /// Upper bound on how long a deleted pod stays Terminating (its grace period is used
    /// when shorter).
    pub pod_terminate_delay: Duration,
    /// Time a crashed container takes to restart and be Ready again.
    pub crash_restart_delay: Duration,
    pub nodes: usize,
    /// The scheduler and kubelet stand-in: pods are bound to a node and become Running and
    /// Ready. Off, pods stay Pending and unbound, as on a cluster without nodes.
    pub kubelet: bool,
}

impl Default for ControllerConfig {
    fn default() -> Self {
        ControllerConfig {
            pod_ready_delay: Duration::from_millis(300),
            pod_terminate_delay: Duration::from_millis(500),
            crash_restart_delay: Duration::from_secs(2),
            nodes: 3,
            kubelet: true,
        }
    }
}

fn writer(actor: &str) -> WriteOpts {
    WriteOpts {
        actor: format!("kubesim/{actor}"),
        ..Default::default()
    }
}

fn rt(store: &Store, g: &str, plural: &str) -> ApiResult<Arc<ResourceType>> {
    let v = "v1";
    store
        .lock()
        .registry
        .get(g, v, plural)
        .ok_or_else(|| ApiError::internal(format!("{plural} not served")))
}

pub fn is_ready(pod: &Value) -> bool {
    meta::pod_ready(pod)
}

/// Start every controller; they stop when the returned handles are dropped or aborted.
pub fn start(store: Arc<Store>, cfg: ControllerConfig) -> Vec<tokio::task::JoinHandle<()>> {
    create_nodes(&store, cfg.nodes);
    let sts = StatefulSets::new(store.clone());
    let mut handles = vec![];
    let rx = store.subscribe();
    handles.push(tokio::spawn(sts.clone().run_events(rx)));
    handles.push(tokio::spawn(sts.run_worker()));
    let kubelet = Kubelet {
        store: store.clone(),
        cfg: cfg.clone(),
        next_node: Arc::new(AtomicUsize::new(0)),
    };
    if cfg.kubelet {
        handles.push(tokio::spawn(kubelet.run(store.subscribe())));
    }
    handles.push(tokio::spawn(gc(store.clone(), store.subscribe())));
    handles.push(tokio::spawn(finalizers(store.clone(), store.subscribe())));
    handles
}

/// How long the namespace and CRD finalizers take to act after a deletion (the apiserver's
/// controllers are asynchronous too: a namespace is seen Terminating before it goes).
const FINALIZE_DELAY: Duration = Duration::from_millis(100);

/// The namespace controller and the CRD finalizer: a Terminating namespace has its content
/// deleted (objects with finalizers stay Terminating until those are removed) and goes when
/// it is empty; a deleted CRD has its custom resources deleted, then goes.
async fn finalizers(store: Arc<Store>, mut rx: broadcast::Receiver<Arc<Event>>) {
    loop {
        let ev = match rx.recv().await {
            Ok(ev) => ev,
            Err(broadcast::error::RecvError::Lagged(_)) => {
                // Missed events: sweep everything that is terminating.
                sweep_all(&store);
                continue;
            }
            Err(broadcast::error::RecvError::Closed) => return,
        };
        let (group, plural) = (&ev.key.0, &ev.key.1);
        let st = store.lock();
        let mut todo: Vec<(bool, String)> = vec![];
        if group.is_empty() && plural == "namespaces" {
            if meta::is_terminating(&ev.object) && ev.type_ != EventType::Deleted {
                todo.push((true, meta::name(&ev.object).to_string()));
            }
        } else if group == "apiextensions.k8s.io" && plural == "customresourcedefinitions" {
            if meta::is_terminating(&ev.object) && ev.type_ != EventType::Deleted {
                todo.push((false, meta::name(&ev.object).to_string()));
            }
        } else if ev.type_ != EventType::Deleted && !meta::is_terminating(&ev.object) {
            // Only removals and new terminations can unblock a finalizer.
        } else {
            let ns = meta::namespace(&ev.object);
            if !ns.is_empty()
                && let Some(nsrt) = st.registry.get("", "v1", "namespaces")
                && st
                    .get(&nsrt, None, ns)
                    .is_some_and(|n| meta::is_terminating(&n))
            {
                todo.push((true, ns.to_string()));
            }
            if let Some(rt) = st.registry.by_store_key(group, plural)
                && let Some(crd) = &rt.crd
            {
                todo.push((false, crd.crd_name.clone()));
            }
        }
        drop(st);
        for (is_ns, name) in todo {
            let store = store.clone();
            tokio::spawn(async move {
                tokio::time::sleep(FINALIZE_DELAY).await;
                if is_ns {
                    sweep_namespace(&store, &name);
                } else {
                    sweep_crd(&store, &name);
                }
            });
        }
    }
}

fn sweep_all(store: &Store) {
    let (namespaces, crds): (Vec<String>, Vec<String>) = {
        let st = store.lock();
        let names = |g: &str, p: &str| -> Vec<String> {
            st.objects_of(&(g.to_string(), p.to_string()))
                .filter(|o| meta::is_terminating(o))
                .map(|o| meta::name(o).to_string())
                .collect()
        };
        (
            names("", "namespaces"),
            names("apiextensions.k8s.io", "customresourcedefinitions"),
        )
    };
    for n in namespaces {
        sweep_namespace(store, &n);
    }
    for c in crds {
        sweep_crd(store, &c);
    }
}

fn finalizer_opts(actor: &str) -> DeleteOpts {
    DeleteOpts {
        write: writer(actor),
        ..Default::default()
    }
}

/// Delete what is left of the objects of `key` (in `ns`); returns what remains afterwards
/// (objects held by finalizers or a graceful deletion) and their finalizers.
fn delete_all(
    st: &mut crate::store::State,
    store: &Store,
    rt: &ResourceType,
    ns: Option<&str>,
    actor: &str,
) -> (usize, BTreeMap<String, usize>) {
    let key = rt.store_key();
    let victims: Vec<Arc<Value>> = st
        .objects_of(&key)
        .filter(|o| ns.is_none_or(|n| meta::namespace(o) == n))
        .cloned()
        .collect();
    let opts = finalizer_opts(actor);
    for v in &victims {
        if !meta::is_terminating(v) {
            let vns = meta::namespace(v).to_string();
            let _ = st.delete_locked(
                store,
                rt,
                Some(&vns).filter(|n| !n.is_empty()).map(String::as_str),
                meta::name(v),
                &opts,
            );
        }
    }
    let mut left = 0;
    let mut fins = BTreeMap::new();
    for o in st
        .objects_of(&key)
        .filter(|o| ns.is_none_or(|n| meta::namespace(o) == n))
    {
        left += 1;
        for f in meta::finalizers(o) {
            *fins.entry(f).or_insert(0) += 1;
        }
    }
    (left, fins)
}

fn sweep_namespace(store: &Store, name: &str) {
    let mut st = store.lock();
    let Some(nsrt) = st.registry.get("", "v1", "namespaces") else {
        return;
    };
    let Some(cur) = st.get(&nsrt, None, name) else {
        return;
    };
    if !meta::is_terminating(&cur) {
        return;
    }
    let types: Vec<Arc<ResourceType>> = {
        let mut seen = HashSet::new();
        st.registry
            .all()
            .filter(|t| t.namespaced && t.storage.is_none())
            .filter(|t| seen.insert(t.store_key()))
            .cloned()
            .collect()
    };
    let mut remaining: Vec<String> = vec![];
    let mut fins: BTreeMap<String, usize> = BTreeMap::new();
    for t in &types {
        let (left, f) = delete_all(&mut st, store, t, Some(name), "namespace-controller");
        if left > 0 {
            remaining.push(format!(
                "{}.{} has {left} resource instances",
                t.plural, t.group
            ));
        }
        for (k, n) in f {
            *fins.entry(k).or_insert(0) += n;
        }
    }
    let Some(cur) = st.get(&nsrt, None, name) else {
        return;
    };
    let key = nsrt.store_key();
    if remaining.is_empty() {
        let mut obj = (*cur).clone();
        if let Some(a) = obj
            .pointer_mut("/spec/finalizers")
            .and_then(Value::as_array_mut)
        {
            a.retain(|f| f != "kubernetes");
        }
        if meta::finalizers(&obj).is_empty()
            && obj
                .pointer("/spec/finalizers")
                .and_then(Value::as_array)
                .is_none_or(Vec::is_empty)
        {
            st.remove(
                store,
                &nsrt,
                &key,
                obj,
                Some(cur),
                "kubesim/namespace-controller",
            );
        }
        return;
    }
    let now = meta::now_rfc3339();
    let cond = |t: &str, status: &str, reason: &str, msg: String| json!({"type": t, "status": status, "lastTransitionTime": now, "reason": reason, "message": msg});
    let fin_msg = fins
        .iter()
        .map(|(f, n)| format!("{f} in {n} resource instances"))
        .collect::<Vec<_>>()
        .join(", ");
    let mut conditions = vec![
        cond(
            "NamespaceDeletionDiscoveryFailure",
            "False",
            "ResourcesDiscovered",
            "All resources successfully discovered".into(),
        ),
        cond(
            "NamespaceDeletionGroupVersionParsingFailure",
            "False",
            "ParsedGroupVersions",
            "All legacy kube types successfully parsed".into(),
        ),
        cond(
            "NamespaceDeletionContentFailure",
            "False",
            "ContentDeleted",
            "All content successfully deleted, may be waiting on finalization".into(),
        ),
        cond(
            "NamespaceContentRemaining",
            "True",
            "SomeResourcesRemain",
            format!("Some resources are remaining: {}", remaining.join(", ")),
        ),
    ];
    if !fins.is_empty() {
        conditions.push(cond(
            "NamespaceFinalizersRemaining",
            "True",
            "SomeFinalizersRemain",
            format!("Some content in the namespace has finalizers remaining: {fin_msg}"),
        ));
    } else {
        conditions.push(cond(
            "NamespaceFinalizersRemaining",
            "False",
            "ContentHasNoFinalizers",
            "All content-preserving finalizers finished".into(),
        ));
    }
    let same = |a: Option<&Value>| {
        let strip = |v: &Value| {
            let mut v = v.clone();
            if let Some(a) = v.as_array_mut() {
                for c in a {
                    if let Some(m) = c.as_object_mut() {
                        m.remove("lastTransitionTime");
                    }
                }
            }
            v
        };
        a.map(strip) == Some(strip(&json!(conditions)))
    };
    if same(cur.pointer("/status/conditions")) {
        return;
    }
    let mut obj = (*cur).clone();
    meta::set_path(&mut obj, ".status.conditions", json!(conditions));
    let _ = st.update_locked(
        store,
        &nsrt,
        &cur,
        obj,
        Subresource::Status,
        &writer("namespace-controller"),
    );
}

fn sweep_crd(store: &Store, name: &str) {
    let mut st = store.lock();
    let Some(crdrt) = st
        .registry
        .get("apiextensions.k8s.io", "v1", "customresourcedefinitions")
    else {
        return;
    };
    let Some(cur) = st.get(&crdrt, None, name) else {
        return;
    };
    if !meta::is_terminating(&cur) {
        return;
    }
    let rt = st
        .registry
        .all()
        .find(|t| t.crd.as_ref().is_some_and(|c| c.crd_name == name))
        .cloned();
    if let Some(rt) = rt {
        let (left, _) = delete_all(&mut st, store, &rt, None, "crd-finalizer");
        if left > 0 {
            return;
        }
    }
    let Some(cur) = st.get(&crdrt, None, name) else {
        return;
    };
    let mut obj = (*cur).clone();
    let f: Vec<String> = meta::finalizers(&obj)
        .into_iter()
        .filter(|f| f != crate::admission::CRD_CLEANUP_FINALIZER)
        .collect();
    meta::meta_mut(&mut obj).insert("finalizers".into(), json!(f));
    let _ = st.update_locked(
        store,
        &crdrt,
        &cur,
        obj,
        Subresource::Main,
        &writer("crd-finalizer"),
    );
}

fn create_nodes(store: &Store, n: usize) {
    let Ok(nodes) = rt(store, "", "nodes") else {
        return;
    };
    for i in 1..=n {
        let node = json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": format!("kubesim-node-{i}"), "labels": {"kubernetes.io/hostname": format!("kubesim-node-{i}")}},
            "status": {
                "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "kubelet is posting ready status"}],
                "addresses": [{"type": "InternalIP", "address": format!("192.168.0.{i}")}]
            }
        });
        if let Err(e) = store.create(&nodes, None, node, &writer("node-controller"))
            && e.code != 409
        {
            tracing::error!(error = %e, "creating node");
        }
    }
}

// ---------------------------------------------------------------------------------------
// StatefulSet controller

#[derive(Clone)]
struct StatefulSets {
    store: Arc<Store>,
    pending: Arc<std::sync::Mutex<BTreeSet<(String, String)>>>,
    notify: Arc<Notify>,
}

fn ordinal_of(pod: &str, set: &str) -> Option<i64> {
    pod.strip_prefix(set)?.strip_prefix('-')?.parse().ok()
}

fn revision_of(sts: &Value) -> String {
    let t = sts
        .pointer("/spec/template")
        .cloned()
        .unwrap_or(Value::Null)
        .to_string();
    let mut h: u32 = 2166136261;
    for b in t.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(16777619);
    }
    // Same alphabet the real controller uses for hashes in names.
    const ALPHA: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut s = String::new();
    for _ in 0..10 {
        s.push(ALPHA[(h % ALPHA.len() as u32) as usize] as char);
        h /= ALPHA.len() as u32;
        if h == 0 {
            h = 7919;
        }
    }
    format!("{}-{s}", meta::name(sts))
}

impl StatefulSets {
    fn new(store: Arc<Store>) -> Self {
        StatefulSets {
            store,
            pending: Arc::default(),
            notify: Arc::default(),
        }
    }

    fn enqueue(&self, ns: &str, name: &str) {
        if let Ok(mut p) = self.pending.lock() {
            p.insert((ns.to_string(), name.to_string()));
        }
        self.notify.notify_one();
    }

    fn enqueue_all(&self) {
        let st = self.store.lock();
        let sets: Vec<(String, String)> = st
            .objects_of(&("apps".into(), "statefulsets".into()))
            .map(|s| (meta::namespace(s).to_string(), meta::name(s).to_string()))
            .collect();
        drop(st);
        for (ns, n) in sets {
            self.enqueue(&ns, &n);
        }
    }

    async fn run_events(self, mut rx: broadcast::Receiver<Arc<Event>>) {
        self.enqueue_all();
        loop {
            match rx.recv().await {
                Ok(ev) => match (ev.key.0.as_str(), ev.key.1.as_str()) {
                    ("apps", "statefulsets") => {
                        self.enqueue(meta::namespace(&ev.object), meta::name(&ev.object))
                    }
                    ("", "pods") => {
                        if let Some(r) = meta::controller_ref(&ev.object)
                            && r["kind"] == "StatefulSet"
                            && let Some(n) = r["name"].as_str()
                        {
                            self.enqueue(meta::namespace(&ev.object), n);
                        }
                    }
                    _ => {}
                },
                Err(broadcast::error::RecvError::Lagged(_)) => self.enqueue_all(),
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    }

    async fn run_worker(self) {
        loop {
            let next = self.pending.lock().ok().and_then(|mut p| p.pop_first());
            match next {
                Some((ns, name)) => {
                    if let Err(e) = self.reconcile(&ns, &name) {
                        tracing::warn!(error = %e, "statefulset {ns}/{name}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        self.enqueue(&ns, &name);
                    }
                    tokio::task::yield_now().await;
                }
                None => self.notify.notified().await,
            }
        }
    }

    fn reconcile(&self, ns: &str, name: &str) -> ApiResult<()> {
        let sts_rt = rt(&self.store, "apps", "statefulsets")?;
        let pods_rt = rt(&self.store, "", "pods")?;
        let Ok(sts) = self.store.get(&sts_rt, Some(ns), name) else {
            return Ok(());
        };
        if meta::is_terminating(&sts) {
            return Ok(());
        }
        let uid = meta::uid(&sts).to_string();
        let replicas = sts
            .pointer("/spec/replicas")
            .and_then(Value::as_i64)
            .unwrap_or(1);
        let ordered = sts
            .pointer("/spec/podManagementPolicy")
            .and_then(Value::as_str)
            != Some("Parallel");
        let partition = sts
            .pointer("/spec/updateStrategy/rollingUpdate/partition")
            .and_then(Value::as_i64)
            .unwrap_or(0);
        let on_delete = sts
            .pointer("/spec/updateStrategy/type")
            .and_then(Value::as_str)
            == Some("OnDelete");
        let revision = revision_of(&sts);
        let pods: BTreeMap<i64, Arc<Value>> = {
            let st = self.store.lock();
            let prefix = format!("{name}-");
            st.objects_named(&(String::new(), "pods".into()), ns, &prefix)
                .filter(|p| meta::controller_ref(p).is_some_and(|r| r["uid"] == uid.as_str()))
                .filter_map(|p| ordinal_of(meta::name(p), name).map(|o| (o, p.clone())))
                .collect()
        };
        let w = writer("statefulset-controller");
        let healthy = |p: &Value| is_ready(p) && !meta::is_terminating(p);
        // Create missing ordinals (in order, one at a time, each after its predecessors are
        // Ready, under OrderedReady).
        for i in 0..replicas {
            if pods.contains_key(&i) {
                continue;
            }
            if ordered && !(0..i).all(|j| pods.get(&j).is_some_and(|p| healthy(p))) {
                break;
            }
            let pod = pod_from_template(&sts, i, &revision);
            match self.store.create(&pods_rt, Some(ns), pod, &w) {
                Ok(_) => {}
                Err(e) if e.code == 409 => {}
                Err(e) => return Err(e),
            }
            if ordered {
                break;
            }
        }
        // Scale down from the highest ordinal; under OrderedReady one at a time.
        let terminating = pods.values().any(|p| meta::is_terminating(p));
        let extra: Vec<(i64, Arc<Value>)> = pods
            .iter()
            .rev()
            .filter(|(o, _)| **o >= replicas)
            .map(|(o, p)| (*o, p.clone()))
            .collect();
        for (_, p) in &extra {
            if meta::is_terminating(p) {
                if ordered {
                    break;
                }
                continue;
            }
            if ordered && terminating {
                break;
            }
            self.delete_pod(&pods_rt, p)?;
            if ordered {
                break;
            }
        }
        // Rolling update: replace the highest outdated ordinal once all are Ready.
        let all_ready = (0..replicas).all(|i| pods.get(&i).is_some_and(|p| healthy(p)));
        if !on_delete && extra.is_empty() && all_ready {
            let outdated = pods.iter().rev().find(|(o, p)| {
                **o >= partition
                    && **o < replicas
                    && meta::label(p, "controller-revision-hash") != Some(revision.as_str())
            });
            if let Some((_, p)) = outdated {
                self.delete_pod(&pods_rt, p)?;
            }
        }
        // Status.
        let live: Vec<&Arc<Value>> = pods.values().filter(|p| !meta::is_terminating(p)).collect();
        let ready = live.iter().filter(|p| is_ready(p)).count();
        let updated = live
            .iter()
            .filter(|p| meta::label(p, "controller-revision-hash") == Some(revision.as_str()))
            .count();
        let status = json!({
            "observedGeneration": sts.pointer("/metadata/generation").cloned().unwrap_or(json!(1)),
            "replicas": live.len(),
            "readyReplicas": ready,
            "availableReplicas": ready,
            "currentReplicas": updated,
            "updatedReplicas": updated,
            "currentRevision": revision,
            "updateRevision": revision,
            "collisionCount": 0,
        });
        if sts.get("status") != Some(&status) {
            let status_c = status.clone();
            let res = self.store.update_with(
                &sts_rt,
                Some(ns),
                name,
                Subresource::Status,
                &w,
                &mut |cur| {
                    let mut o = cur.cloned().unwrap_or(Value::Null);
                    o["status"] = status_c.clone();
                    meta::meta_mut(&mut o).remove("resourceVersion");
                    Ok(o)
                },
                false,
            );
            match res {
                Ok(_) => {}
                Err(e) if e.code == 404 => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn delete_pod(&self, pods_rt: &ResourceType, p: &Value) -> ApiResult<()> {
        let opts = DeleteOpts {
            write: writer("statefulset-controller"),
            precondition_uid: Some(meta::uid(p).to_string()),
            ..Default::default()
        };
        match self
            .store
            .delete(pods_rt, Some(meta::namespace(p)), meta::name(p), &opts)
        {
            Ok(_) => Ok(()),
            Err(e) if e.code == 404 || e.code == 409 => Ok(()),
            Err(e) => Err(e),
        }
    }
}

fn pod_from_template(sts: &Value, ordinal: i64, revision: &str) -> Value {
    let set = meta::name(sts);
    let name = format!("{set}-{ordinal}");
    let tmpl = sts.pointer("/spec/template").cloned().unwrap_or(json!({}));
    let mut labels = tmpl
        .pointer("/metadata/labels")
        .cloned()
        .unwrap_or(json!({}));
    labels["statefulset.kubernetes.io/pod-name"] = json!(name);
    labels["apps.kubernetes.io/pod-index"] = json!(ordinal.to_string());
    labels["controller-revision-hash"] = json!(revision);
    let mut spec = tmpl.get("spec").cloned().unwrap_or(json!({}));
    spec["hostname"] = json!(name);
    if let Some(svc) = sts.pointer("/spec/serviceName").and_then(Value::as_str) {
        spec["subdomain"] = json!(svc);
    }
    let mut md = json!({
        "name": name,
        "namespace": meta::namespace(sts),
        "labels": labels,
        "ownerReferences": [{
            "apiVersion": "apps/v1", "kind": "StatefulSet", "name": set,
            "uid": meta::uid(sts), "controller": true, "blockOwnerDeletion": true
        }]
    });
    if let Some(a) = tmpl.pointer("/metadata/annotations") {
        md["annotations"] = a.clone();
    }
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": md, "spec": spec})
}

// ---------------------------------------------------------------------------------------
// Kubelet stand-in

#[derive(Clone)]
struct Kubelet {
    store: Arc<Store>,
    cfg: ControllerConfig,
    next_node: Arc<AtomicUsize>,
}

fn condition(t: &str, status: bool, now: &str) -> Value {
    json!({"type": t, "status": if status {"True"} else {"False"}, "lastProbeTime": null, "lastTransitionTime": now})
}

/// Pod status with readiness set to `ready` (conditions and container statuses).
fn with_readiness(pod: &Value, ready: bool, restart: bool) -> Value {
    let now = meta::now_rfc3339();
    let mut o = pod.clone();
    let cur_ready = is_ready(pod);
    let mut conds: Vec<Value> = pod
        .pointer("/status/conditions")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    for t in ["Ready", "ContainersReady"] {
        let transition = cur_ready != ready;
        match conds.iter_mut().find(|c| c["type"] == t) {
            Some(c) => {
                c["status"] = json!(if ready { "True" } else { "False" });
                if transition {
                    c["lastTransitionTime"] = json!(now);
                }
                if ready {
                    if let Value::Object(m) = c {
                        m.remove("reason");
                    }
                } else {
                    c["reason"] = json!("ContainersNotReady");
                }
            }
            None => conds.push(condition(t, ready, &now)),
        }
    }
    o["status"]["conditions"] = json!(conds);
    if let Some(cs) = o
        .pointer_mut("/status/containerStatuses")
        .and_then(Value::as_array_mut)
    {
        for c in cs {
            c["ready"] = json!(ready);
            if restart {
                let n = c["restartCount"].as_i64().unwrap_or(0) + 1;
                c["restartCount"] = json!(n);
                c["lastState"] =
                    json!({"terminated": {"exitCode": 137, "reason": "Error", "finishedAt": now}});
            }
        }
    }
    meta::meta_mut(&mut o).remove("resourceVersion");
    o
}

impl Kubelet {
    async fn run(self, mut rx: broadcast::Receiver<Arc<Event>>) {
        loop {
            match rx.recv().await {
                Ok(ev) if ev.key.0.is_empty() && ev.key.1 == "pods" => self.on_pod(&ev),
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    // Catch up with every pod that may have been missed.
                    let pods: Vec<Arc<Value>> = self
                        .store
                        .lock()
                        .objects_of(&(String::new(), "pods".into()))
                        .cloned()
                        .collect();
                    for p in pods {
                        self.on_pod(&Event {
                            rv: 0,
                            type_: EventType::Modified,
                            key: (String::new(), "pods".into()),
                            object: p,
                            old: None,
                            at: std::time::Instant::now(),
                            encoded: std::sync::OnceLock::new(),
                        });
                    }
                }
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    }

    fn on_pod(&self, ev: &Event) {
        let pod = &ev.object;
        if ev.type_ == EventType::Deleted {
            return;
        }
        let was_terminating = ev.old.as_deref().is_some_and(meta::is_terminating);
        if meta::is_terminating(pod) {
            if !was_terminating || ev.rv == 0 {
                let grace = pod
                    .pointer("/metadata/deletionGracePeriodSeconds")
                    .and_then(Value::as_u64)
                    .unwrap_or(0);
                let delay = Duration::from_secs(grace).min(self.cfg.pod_terminate_delay);
                let this = self.clone();
                let (ns, name, uid) = (
                    meta::namespace(pod).to_string(),
                    meta::name(pod).to_string(),
                    meta::uid(pod).to_string(),
                );
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    this.finish_termination(&ns, &name, &uid);
                });
            }
            return;
        }
        if pod.pointer("/spec/nodeName").is_none() {
            self.schedule(pod);
        }
    }

    fn pods_rt(&self) -> ApiResult<Arc<ResourceType>> {
        rt(&self.store, "", "pods")
    }

    fn finish_termination(&self, ns: &str, name: &str, uid: &str) {
        let Ok(pods) = self.pods_rt() else { return };
        let opts = DeleteOpts {
            write: writer("kubelet"),
            grace_seconds: Some(0),
            propagation: Propagation::Background,
            precondition_uid: Some(uid.to_string()),
            precondition_rv: None,
        };
        match self.store.delete(&pods, Some(ns), name, &opts) {
            Ok(_) => {}
            Err(e) if e.code == 404 || e.code == 409 => {}
            Err(e) => tracing::warn!(error = %e, "kubelet removing {ns}/{name}"),
        }
    }

    fn schedule(&self, pod: &Value) {
        let Ok(pods) = self.pods_rt() else { return };
        let n = self.cfg.nodes.max(1);
        let node = format!(
            "kubesim-node-{}",
            self.next_node.fetch_add(1, Ordering::Relaxed) % n + 1
        );
        let (ns, name, uid) = (
            meta::namespace(pod).to_string(),
            meta::name(pod).to_string(),
            meta::uid(pod).to_string(),
        );
        let node_c = node.clone();
        let res = self.store.update_with(
            &pods,
            Some(&ns),
            &name,
            Subresource::Main,
            &writer("scheduler"),
            &mut |cur| {
                let mut o = cur.cloned().unwrap_or(Value::Null);
                if meta::uid(&o) != uid {
                    return Err(ApiError::new(409, "Conflict", "pod replaced"));
                }
                o["spec"]["nodeName"] = json!(node_c);
                meta::meta_mut(&mut o).remove("resourceVersion");
                Ok(o)
            },
            false,
        );
        if res.is_err() {
            return;
        }
        let now = meta::now_rfc3339();
        let _ = self.store.update_with(
            &pods,
            Some(&ns),
            &name,
            Subresource::Status,
            &writer("kubelet"),
            &mut |cur| {
                let mut o = cur.cloned().unwrap_or(Value::Null);
                o["status"]["conditions"] = json!([condition("PodScheduled", true, &now)]);
                meta::meta_mut(&mut o).remove("resourceVersion");
                Ok(o)
            },
            false,
        );
        let this = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(this.cfg.pod_ready_delay).await;
            this.start_pod(&ns, &name, &uid);
        });
    }

    fn start_pod(&self, ns: &str, name: &str, uid: &str) {
        let Ok(pods) = self.pods_rt() else { return };
        let st = self.store.lock();
        let ip = {
            let mut st = st;
            st.allocate_ip("10.244")
        };
        let now = meta::now_rfc3339();
        let res = self.store.update_with(&pods, Some(ns), name, Subresource::Status, &writer("kubelet"), &mut |cur| {
            let Some(cur) = cur else { return Err(ApiError::internal("gone")) };
            if meta::uid(cur) != uid || meta::is_terminating(cur) {
                return Err(ApiError::new(409, "Conflict", "pod replaced"));
            }
            let mut o = cur.clone();
            let host = cur.pointer("/spec/nodeName").and_then(Value::as_str).unwrap_or("");
            let host_ip = format!("192.168.0.{}", host.rsplit('-').next().unwrap_or("1"));
            let statuses: Vec<Value> = cur
                .pointer("/spec/containers")
                .and_then(Value::as_array)
                .map(|cs| {
                    cs.iter()
                        .map(|c| json!({
                            "name": c["name"], "image": c["image"], "imageID": "", "containerID": format!("containerd://{}", &uid.replace('-', "")),
                            "ready": true, "started": true, "restartCount": 0,
                            "state": {"running": {"startedAt": now}}
                        }))
                        .collect()
                })
                .unwrap_or_default();
            o["status"] = json!({
                "phase": "Running",
                "conditions": [
                    condition("PodReadyToStartContainers", true, &now),
                    condition("Initialized", true, &now),
                    condition("Ready", true, &now),
                    condition("ContainersReady", true, &now),
                    condition("PodScheduled", true, &now),
                ],
                "hostIP": host_ip, "hostIPs": [{"ip": host_ip}],
                "podIP": ip, "podIPs": [{"ip": ip}],
                "startTime": now,
                "containerStatuses": statuses,
                "qosClass": "BestEffort",
            });
            meta::meta_mut(&mut o).remove("resourceVersion");
            Ok(o)
        }, false);
        if let Err(e) = res
            && e.code != 409
            && e.code != 404
            && e.code != 500
        {
            tracing::warn!(error = %e, "kubelet starting {ns}/{name}");
        }
    }
}

// ---------------------------------------------------------------------------------------
// Garbage collector

type Typed = (Arc<ResourceType>, Arc<Value>);

/// Kinds that can own other objects in this simulator; deletions of anything else (pods,
/// events, leases) never trigger a dependents scan, which keeps pod churn cheap.
fn may_own(key: &(String, String)) -> bool {
    !matches!(
        (key.0.as_str(), key.1.as_str()),
        ("", "pods") | ("", "events") | ("coordination.k8s.io", "leases")
    )
}

async fn gc(store: Arc<Store>, mut rx: broadcast::Receiver<Arc<Event>>) {
    loop {
        match rx.recv().await {
            Ok(ev) => {
                let terminating_owner = ev.type_ == EventType::Modified
                    && meta::is_terminating(&ev.object)
                    && meta::finalizers(&ev.object)
                        .iter()
                        .any(|f| f == "foregroundDeletion" || f == "orphan");
                if (ev.type_ == EventType::Deleted && may_own(&ev.key)) || terminating_owner {
                    collect(&store);
                }
            }
            Err(broadcast::error::RecvError::Lagged(_)) => collect(&store),
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

/// One pass of the garbage collector: delete dependents whose owners are all gone, and
/// complete foreground/orphan deletions.
pub fn collect(store: &Store) {
    let (uids, candidates, blocked): (HashSet<String>, Vec<Typed>, Vec<Typed>) = {
        let st = store.lock();
        let types: Vec<Arc<ResourceType>> = st
            .registry
            .all()
            .filter(|t| t.storage.is_none())
            .cloned()
            .collect();
        let mut uids = HashSet::new();
        let mut cands = vec![];
        let mut blocked = vec![];
        let mut seen_keys = HashSet::new();
        for t in types {
            if !seen_keys.insert(t.store_key()) {
                continue;
            }
            for o in st.objects_of(&t.store_key()) {
                uids.insert(meta::uid(o).to_string());
                if !meta::owner_uids(o).is_empty() {
                    cands.push((t.clone(), o.clone()));
                }
                if meta::is_terminating(o)
                    && meta::finalizers(o)
                        .iter()
                        .any(|f| f == "foregroundDeletion" || f == "orphan")
                {
                    blocked.push((t.clone(), o.clone()));
                }
            }
        }
        (uids, cands, blocked)
    };
    let w = writer("garbage-collector");
    let blocking: HashSet<&str> = blocked.iter().map(|(_, o)| meta::uid(o)).collect();
    for (t, o) in &candidates {
        let owners = meta::owner_uids(o);
        let orphaning: Vec<&String> = owners
            .iter()
            .filter(|u| {
                blocked.iter().any(|(_, b)| {
                    meta::uid(b) == u.as_str() && meta::finalizers(b).iter().any(|f| f == "orphan")
                })
            })
            .collect();
        if !orphaning.is_empty() {
            let drop: HashSet<String> = orphaning.iter().map(|s| s.to_string()).collect();
            let _ = store.update_with(
                t,
                Some(meta::namespace(o)),
                meta::name(o),
                Subresource::Main,
                &w,
                &mut |cur| {
                    let mut c = cur.cloned().unwrap_or(Value::Null);
                    if let Some(refs) = c
                        .pointer_mut("/metadata/ownerReferences")
                        .and_then(Value::as_array_mut)
                    {
                        refs.retain(|r| r["uid"].as_str().is_none_or(|u| !drop.contains(u)));
                    }
                    meta::meta_mut(&mut c).remove("resourceVersion");
                    Ok(c)
                },
                false,
            );
            continue;
        }
        let all_gone = owners.iter().all(|u| !uids.contains(u));
        let owner_foreground = owners.iter().any(|u| blocking.contains(u.as_str()));
        if (all_gone || owner_foreground) && !meta::is_terminating(o) {
            let opts = DeleteOpts {
                write: w.clone(),
                precondition_uid: Some(meta::uid(o).to_string()),
                ..Default::default()
            };
            let _ = store.delete(t, Some(meta::namespace(o)), meta::name(o), &opts);
        }
    }
    // Owners waiting in foreground/orphan deletion finish once no dependent refers to them.
    let remaining: HashSet<String> = {
        let st = store.lock();
        let mut s = HashSet::new();
        for t in st.registry.all() {
            for o in st.objects_of(&t.store_key()) {
                for u in meta::owner_uids(o) {
                    s.insert(u);
                }
            }
        }
        s
    };
    for (t, o) in blocked {
        let orphan = meta::finalizers(&o).iter().any(|f| f == "orphan");
        if orphan || !remaining.contains(meta::uid(&o)) {
            let _ = store.update_with(
                &t,
                Some(meta::namespace(&o)),
                meta::name(&o),
                Subresource::Main,
                &w,
                &mut |cur| {
                    let mut c = cur.cloned().unwrap_or(Value::Null);
                    let f: Vec<String> = meta::finalizers(&c)
                        .into_iter()
                        .filter(|f| f != "foregroundDeletion" && f != "orphan")
                        .collect();
                    meta::meta_mut(&mut c).insert("finalizers".into(), json!(f));
                    meta::meta_mut(&mut c).remove("resourceVersion");
                    Ok(c)
                },
                false,
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// Pod and node faults

/// Pod- and node-level faults, as the `/sim/pods` and `/sim/nodes` endpoints and the Rust API
/// offer them.
#[derive(Clone)]
pub struct PodFaults {
    pub store: Arc<Store>,
    pub cfg: ControllerConfig,
}

impl PodFaults {
    /// Flip a pod's readiness as its kubelet would report it.
    pub fn set_ready(&self, ns: &str, name: &str, ready: bool) -> ApiResult<Arc<Value>> {
        self.set_ready_inner(ns, name, ready, false)
    }

    fn set_ready_inner(
        &self,
        ns: &str,
        name: &str,
        ready: bool,
        restart: bool,
    ) -> ApiResult<Arc<Value>> {
        let pods = rt(&self.store, "", "pods")?;
        self.store.update_with(
            &pods,
            Some(ns),
            name,
            Subresource::Status,
            &writer("kubelet"),
            &mut |cur| {
                let cur = cur.ok_or_else(|| ApiError::internal("missing"))?;
                Ok(with_readiness(cur, ready, restart))
            },
            false,
        )
    }

    /// The container crashes: NotReady at once, restarted and Ready again after the crash
    /// restart delay.
    pub fn crash(&self, ns: &str, name: &str) -> ApiResult<Arc<Value>> {
        let pod = self.set_ready_inner(ns, name, false, true)?;
        let this = self.clone();
        let (ns, name, uid) = (
            ns.to_string(),
            name.to_string(),
            meta::uid(&pod).to_string(),
        );
        tokio::spawn(async move {
            tokio::time::sleep(this.cfg.crash_restart_delay).await;
            let pods = match rt(&this.store, "", "pods") {
                Ok(p) => p,
                Err(_) => return,
            };
            if this
                .store
                .get(&pods, Some(&ns), &name)
                .is_ok_and(|p| meta::uid(&p) == uid && !meta::is_terminating(&p))
            {
                let _ = this.set_ready(&ns, &name, true);
            }
        });
        Ok(pod)
    }

    pub fn delete(&self, ns: &str, name: &str, force: bool) -> ApiResult<Arc<Value>> {
        let pods = rt(&self.store, "", "pods")?;
        let opts = DeleteOpts {
            write: writer("fault"),
            grace_seconds: force.then_some(0),
            ..Default::default()
        };
        self.store.delete(&pods, Some(ns), name, &opts)
    }

    pub fn act(&self, ns: &str, name: &str, action: &str) -> ApiResult<Arc<Value>> {
        match action {
            "notready" => self.set_ready(ns, name, false),
            "ready" => self.set_ready(ns, name, true),
            "crash" => self.crash(ns, name),
            "delete" => self.delete(ns, name, false),
            "kill" => self.delete(ns, name, true),
            other => Err(ApiError::bad_request(format!(
                "unknown pod action {other:?}: use notready, ready, crash, delete or kill"
            ))),
        }
    }

    /// `lose`: the node stops reporting; its pods turn NotReady. `restore` undoes it.
    pub fn node(&self, node: &str, action: &str) -> ApiResult<usize> {
        let ready = match action {
            "lose" => false,
            "restore" => true,
            other => {
                return Err(ApiError::bad_request(format!(
                    "unknown node action {other:?}: use lose or restore"
                )));
            }
        };
        let nodes = rt(&self.store, "", "nodes")?;
        self.store.update_with(&nodes, None, node, Subresource::Status, &writer("node-controller"), &mut |cur| {
            let mut o = cur.cloned().unwrap_or(Value::Null);
            o["status"]["conditions"] = json!([{
                "type": "Ready",
                "status": if ready {"True"} else {"Unknown"},
                "reason": if ready {"KubeletReady"} else {"NodeStatusUnknown"},
                "message": if ready {"kubelet is posting ready status"} else {"Kubelet stopped posting node status."},
            }]);
            meta::meta_mut(&mut o).remove("resourceVersion");
            Ok(o)
        }, false)?;
        let on_node: Vec<(String, String)> = self
            .store
            .lock()
            .objects_of(&(String::new(), "pods".into()))
            .filter(|p| p.pointer("/spec/nodeName").and_then(Value::as_str) == Some(node))
            .filter(|p| !meta::is_terminating(p))
            .map(|p| (meta::namespace(p).to_string(), meta::name(p).to_string()))
            .collect();
        for (ns, name) in &on_node {
            self.set_ready(ns, name, ready)?;
        }
        Ok(on_node.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordinals_parse_only_for_the_set() {
        assert_eq!(ordinal_of("db-12", "db"), Some(12));
        assert_eq!(ordinal_of("db-x-1", "db"), None);
        assert_eq!(ordinal_of("dbx-1", "db"), None);
    }

    #[test]
    fn revision_changes_with_template() {
        let a = json!({"metadata": {"name": "db"}, "spec": {"template": {"spec": {"containers": [{"image": "a"}]}}}});
        let mut b = a.clone();
        b["spec"]["template"]["spec"]["containers"][0]["image"] = json!("b");
        assert_ne!(revision_of(&a), revision_of(&b));
        assert!(revision_of(&a).starts_with("db-"));
    }

    #[test]
    fn readiness_flip_keeps_other_conditions() {
        let pod = json!({"status": {"conditions": [
            {"type": "Initialized", "status": "True"},
            {"type": "Ready", "status": "True"},
            {"type": "ContainersReady", "status": "True"}
        ], "containerStatuses": [{"name": "c", "ready": true, "restartCount": 0}]}});
        let p = with_readiness(&pod, false, true);
        assert!(!is_ready(&p));
        assert_eq!(p["status"]["conditions"][0]["status"], "True");
        assert_eq!(p["status"]["containerStatuses"][0]["restartCount"], 1);
        assert!(is_ready(&with_readiness(&p, true, false)));
    }
}
