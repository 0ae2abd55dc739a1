//! A stand-in for the scheduler and kubelets, so pods have a lifecycle on a control plane
//! without nodes: it registers Nodes, binds pending pods to them (`pods/binding`), marks
//! each bound pod Running and Ready once, a little later (`pods/status`), and finalizes pods
//! being deleted (delete with grace period 0, as a kubelet does once containers stopped).
//!
//! It must never undo what a test does: it acts on a pod's readiness exactly once, and only
//! while the pod has no Ready condition yet; a later readiness change made through
//! `pods/status` stays as it is.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Binding, Node, ObjectReference, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use serde_json::json;

use crate::{CALL_TIMEOUT, timed};

#[derive(Clone, Debug)]
pub struct PodLifecycleOptions {
    /// How many Nodes to register (`<node_prefix>-0`, …).
    pub nodes: usize,
    pub node_prefix: String,
    /// Between binding a pod and marking it Running and Ready (a kubelet pulling and starting).
    pub ready_after: Duration,
}

impl Default for PodLifecycleOptions {
    fn default() -> Self {
        PodLifecycleOptions {
            nodes: 1,
            node_prefix: "standin".to_string(),
            ready_after: Duration::from_millis(500),
        }
    }
}

/// What the stand-in does next with a pod; decided from the pod alone plus what it already did.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    Bind { node: String },
    MarkReady,
    Finalize,
    Nothing,
}

/// `started`: UIDs of pods whose readiness the stand-in already set (or is about to).
pub fn next_step(pod: &Pod, nodes: &[String], started: &HashSet<String>) -> Step {
    let node = pod.spec.as_ref().and_then(|s| s.node_name.as_deref());
    let ours = node.is_some_and(|n| nodes.iter().any(|m| m == n));
    if pod.metadata.deletion_timestamp.is_some() {
        // Unbound pods are deleted by the apiserver at once; bound ones wait for their kubelet.
        return if ours { Step::Finalize } else { Step::Nothing };
    }
    if node.is_none() {
        if nodes.is_empty() {
            return Step::Nothing;
        }
        let name = pod.metadata.name.as_deref().unwrap_or_default();
        // Spread by name so a StatefulSet's pods land on different nodes, deterministically.
        let i = name
            .bytes()
            .fold(0usize, |h, b| h.wrapping_mul(31).wrapping_add(b as usize))
            % nodes.len();
        return Step::Bind {
            node: nodes[i].clone(),
        };
    }
    let uid = pod.metadata.uid.as_deref().unwrap_or_default();
    let has_ready = pod
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready"));
    let terminal = pod
        .status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .is_some_and(|p| p == "Succeeded" || p == "Failed");
    if ours && !uid.is_empty() && !started.contains(uid) && !has_ready && !terminal {
        Step::MarkReady
    } else {
        Step::Nothing
    }
}

/// The running stand-in; dropping it stops it (the Nodes stay).
pub(crate) struct PodLifecycle {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for PodLifecycle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Shared {
    client: Client,
    opts: PodLifecycleOptions,
    nodes: Vec<String>,
    /// Node name → its InternalIP (the pods' hostIP).
    node_ips: HashMap<String, String>,
    started: Mutex<HashSet<String>>,
    next_ip: AtomicU32,
}

impl PodLifecycle {
    pub(crate) async fn start(client: Client, opts: PodLifecycleOptions) -> Result<PodLifecycle> {
        let mut nodes = Vec::new();
        let mut node_ips = HashMap::new();
        for i in 0..opts.nodes {
            let name = format!("{}-{i}", opts.node_prefix);
            let ip = format!("10.255.0.{}", i + 1);
            register_node(&client, &name, &ip, i).await?;
            node_ips.insert(name.clone(), ip);
            nodes.push(name);
        }
        let shared = Arc::new(Shared {
            client,
            opts,
            nodes,
            node_ips,
            started: Mutex::new(HashSet::new()),
            next_ip: AtomicU32::new(0),
        });
        let task = tokio::spawn(run(shared));
        Ok(PodLifecycle { task })
    }
}

async fn register_node(client: &Client, name: &str, ip: &str, index: usize) -> Result<()> {
    let api: Api<Node> = Api::all(client.clone());
    let node = Node {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            labels: Some(
                [
                    ("kubernetes.io/hostname".to_string(), name.to_string()),
                    ("kubernetes.io/os".to_string(), "linux".to_string()),
                    (
                        "controlplane.stslock.dev/stand-in".to_string(),
                        "true".to_string(),
                    ),
                ]
                .into(),
            ),
            ..ObjectMeta::default()
        },
        ..Node::default()
    };
    match timed(
        &format!("create node {name}"),
        CALL_TIMEOUT,
        api.create(&PostParams::default(), &node),
    )
    .await
    {
        Ok(_) => {}
        Err(e) if is_status(&e, 409) => {}
        Err(e) => return Err(e),
    }
    let now = now()?;
    let status = json!({
        "status": {
            "capacity": { "cpu": "32", "memory": "128Gi", "pods": "250" },
            "allocatable": { "cpu": "32", "memory": "128Gi", "pods": "250" },
            "addresses": [ { "type": "InternalIP", "address": ip }, { "type": "Hostname", "address": name } ],
            "conditions": [
                { "type": "Ready", "status": "True", "reason": "KubeletReady", "message": "stand-in kubelet",
                  "lastHeartbeatTime": now, "lastTransitionTime": now },
            ],
            "nodeInfo": {
                "architecture": "amd64", "operatingSystem": "linux", "kubeletVersion": "v1.34.4",
                "kubeProxyVersion": "", "containerRuntimeVersion": "stand-in://0", "kernelVersion": "",
                "osImage": "controlplane stand-in", "bootID": "", "machineID": format!("standin{index}"), "systemUUID": "",
            },
        }
    });
    timed(
        &format!("patch node {name} status"),
        CALL_TIMEOUT,
        api.patch_status(name, &PatchParams::default(), &Patch::Merge(&status)),
    )
    .await?;
    // TaintNodesByCondition put node.kubernetes.io/not-ready on the new Node; the node
    // lifecycle controller that would lift it is not running (it would also evict our pods).
    let untaint = json!({ "spec": { "taints": null } });
    timed(
        &format!("untaint node {name}"),
        CALL_TIMEOUT,
        api.patch(name, &PatchParams::default(), &Patch::Merge(&untaint)),
    )
    .await?;
    Ok(())
}

async fn run(shared: Arc<Shared>) {
    let pods: Api<Pod> = Api::all(shared.client.clone());
    let mut events = watcher(pods, watcher::Config::default())
        .default_backoff()
        .applied_objects()
        .boxed();
    while let Some(event) = events.next().await {
        match event {
            Ok(pod) => handle(&shared, pod),
            Err(e) => tracing::warn!("pod-lifecycle watch: {e}"),
        }
    }
}

fn handle(shared: &Arc<Shared>, pod: Pod) {
    let step = match shared.started.lock() {
        Ok(started) => next_step(&pod, &shared.nodes, &started),
        Err(_) => return,
    };
    let (Some(ns), Some(name), Some(uid)) = (
        pod.metadata.namespace.clone(),
        pod.metadata.name.clone(),
        pod.metadata.uid.clone(),
    ) else {
        return;
    };
    let shared = shared.clone();
    match step {
        Step::Nothing => {}
        Step::Bind { node } => {
            tokio::spawn(async move {
                if let Err(e) = bind(&shared.client, &ns, &name, &uid, &node).await {
                    tracing::warn!(pod = %format!("{ns}/{name}"), "binding: {e:#}");
                }
            });
        }
        Step::MarkReady => {
            if let Ok(mut started) = shared.started.lock() {
                started.insert(uid.clone());
            }
            tokio::spawn(async move {
                tokio::time::sleep(shared.opts.ready_after).await;
                if let Err(e) = mark_ready(&shared, &ns, &name, &uid).await {
                    tracing::warn!(pod = %format!("{ns}/{name}"), "marking Ready: {e:#}");
                    // Let a later event of this pod try again.
                    if let Ok(mut started) = shared.started.lock() {
                        started.remove(&uid);
                    }
                }
            });
        }
        Step::Finalize => {
            tokio::spawn(async move {
                let api: Api<Pod> = Api::namespaced(shared.client.clone(), &ns);
                let params = DeleteParams {
                    grace_period_seconds: Some(0),
                    preconditions: Some(Preconditions {
                        uid: Some(uid),
                        resource_version: None,
                    }),
                    ..DeleteParams::default()
                };
                match timed(
                    &format!("finalize pod {ns}/{name}"),
                    CALL_TIMEOUT,
                    api.delete(&name, &params),
                )
                .await
                {
                    Ok(_) => {}
                    Err(e) if is_status(&e, 404) || is_status(&e, 409) => {}
                    Err(e) => tracing::warn!("{e:#}"),
                }
            });
        }
    }
}

async fn bind(client: &Client, ns: &str, name: &str, uid: &str, node: &str) -> Result<()> {
    let api: Api<Pod> = Api::namespaced(client.clone(), ns);
    let binding = Binding {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            uid: Some(uid.to_string()),
            ..ObjectMeta::default()
        },
        target: ObjectReference {
            api_version: Some("v1".to_string()),
            kind: Some("Node".to_string()),
            name: Some(node.to_string()),
            ..ObjectReference::default()
        },
    };
    let what = format!("bind pod {ns}/{name} to {node}");
    let params = PostParams::default();
    let call = api.create_subresource::<_, serde_json::Value>("binding", name, &params, &binding);
    match timed(&what, CALL_TIMEOUT, call).await {
        Ok(_) => Ok(()),
        // Already bound (an earlier event of the same pod), or gone.
        Err(e) if is_status(&e, 409) || is_status(&e, 404) => Ok(()),
        Err(e) => Err(e),
    }
}

async fn mark_ready(shared: &Shared, ns: &str, name: &str, uid: &str) -> Result<()> {
    let api: Api<Pod> = Api::namespaced(shared.client.clone(), ns);
    for _ in 0..5 {
        let Some(pod) = timed(
            &format!("get pod {ns}/{name}"),
            CALL_TIMEOUT,
            api.get_opt(name),
        )
        .await?
        else {
            return Ok(());
        };
        // Re-decide on the fresh pod: a test may have set its readiness meanwhile.
        let fresh = HashSet::new();
        if pod.metadata.uid.as_deref() != Some(uid)
            || next_step(&pod, &shared.nodes, &fresh) != Step::MarkReady
        {
            return Ok(());
        }
        let node = pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .unwrap_or_default();
        let host_ip = shared.node_ips.get(&node).cloned().unwrap_or_default();
        // A pod's IP never changes once set (a kubelet keeps it for the pod's life).
        let pod_ip = match pod.status.as_ref().and_then(|s| s.pod_ip.clone()) {
            Some(ip) => ip,
            None => {
                let n = shared.next_ip.fetch_add(1, Ordering::Relaxed);
                format!("10.244.{}.{}", (n / 250) % 250, n % 250 + 2)
            }
        };
        let now = now()?;
        let containers = pod
            .spec
            .as_ref()
            .map(|s| s.containers.clone())
            .unwrap_or_default();
        let statuses: Vec<_> = containers
            .iter()
            .map(|c| {
                json!({
                    "name": c.name, "image": c.image.clone().unwrap_or_default(), "imageID": "",
                    "ready": true, "started": true, "restartCount": 0,
                    "state": { "running": { "startedAt": now } },
                })
            })
            .collect();
        let condition = |t: &str| json!({ "type": t, "status": "True", "lastTransitionTime": now });
        // Strategic merge: conditions merge by type, so PodScheduled (set by the binding) stays.
        // The resourceVersion makes it conditional: a test's write in between wins.
        let patch = json!({
            "metadata": { "resourceVersion": pod.metadata.resource_version },
            "status": {
                "phase": "Running",
                "hostIP": host_ip, "hostIPs": [ { "ip": host_ip } ],
                "podIP": pod_ip, "podIPs": [ { "ip": pod_ip } ],
                "startTime": now,
                "conditions": [
                    condition("PodReadyToStartContainers"), condition("Initialized"),
                    condition("ContainersReady"), condition("Ready"),
                ],
                "containerStatuses": statuses,
            }
        });
        let what = format!("patch pod {ns}/{name} status Running/Ready");
        match timed(
            &what,
            CALL_TIMEOUT,
            api.patch_status(name, &PatchParams::default(), &Patch::Strategic(&patch)),
        )
        .await
        {
            Ok(_) => return Ok(()),
            Err(e) if is_status(&e, 409) => continue,
            Err(e) if is_status(&e, 404) => return Ok(()),
            Err(e) => return Err(e),
        }
    }
    anyhow::bail!("pod {ns}/{name} kept changing; gave up marking it Ready")
}

fn now() -> Result<serde_json::Value> {
    let t = Time(k8s_openapi::jiff::Timestamp::now());
    serde_json::to_value(t).context("serializing a timestamp")
}

/// Whether the error chain holds an API error with this HTTP status.
pub(crate) fn is_status(e: &anyhow::Error, code: u16) -> bool {
    e.chain()
        .any(|cause| match cause.downcast_ref::<kube::Error>() {
            Some(kube::Error::Api(status)) => status.code == code,
            _ => false,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{PodCondition, PodSpec, PodStatus};

    fn pod(node: Option<&str>, ready: Option<&str>) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some("db-0".into()),
                uid: Some("u1".into()),
                ..ObjectMeta::default()
            },
            spec: Some(PodSpec {
                node_name: node.map(str::to_string),
                ..PodSpec::default()
            }),
            status: Some(PodStatus {
                phase: Some("Pending".into()),
                conditions: ready.map(|s| {
                    vec![PodCondition {
                        type_: "Ready".into(),
                        status: s.into(),
                        ..PodCondition::default()
                    }]
                }),
                ..PodStatus::default()
            }),
        }
    }

    fn nodes() -> Vec<String> {
        vec!["standin-0".to_string(), "standin-1".to_string()]
    }

    #[test]
    fn binds_unbound_pods_to_one_of_its_nodes() {
        let Step::Bind { node } = next_step(&pod(None, None), &nodes(), &HashSet::new()) else {
            panic!("expected a binding");
        };
        assert!(nodes().contains(&node));
    }

    #[test]
    fn marks_a_bound_pod_ready_once() {
        let p = pod(Some("standin-1"), None);
        assert_eq!(next_step(&p, &nodes(), &HashSet::new()), Step::MarkReady);
        let started: HashSet<String> = ["u1".to_string()].into();
        assert_eq!(next_step(&p, &nodes(), &started), Step::Nothing);
    }

    #[test]
    fn never_touches_readiness_someone_else_set() {
        assert_eq!(
            next_step(
                &pod(Some("standin-0"), Some("False")),
                &nodes(),
                &HashSet::new()
            ),
            Step::Nothing
        );
        assert_eq!(
            next_step(
                &pod(Some("standin-0"), Some("True")),
                &nodes(),
                &HashSet::new()
            ),
            Step::Nothing
        );
    }

    #[test]
    fn leaves_pods_on_other_nodes_alone() {
        assert_eq!(
            next_step(&pod(Some("real-node"), None), &nodes(), &HashSet::new()),
            Step::Nothing
        );
        let mut deleting = pod(Some("real-node"), None);
        deleting.metadata.deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH));
        assert_eq!(
            next_step(&deleting, &nodes(), &HashSet::new()),
            Step::Nothing
        );
    }

    #[test]
    fn finalizes_its_pods_once_deletion_started() {
        let mut p = pod(Some("standin-0"), Some("True"));
        p.metadata.deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH));
        assert_eq!(next_step(&p, &nodes(), &HashSet::new()), Step::Finalize);
    }
}
