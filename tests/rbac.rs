//! The shipped role is minimal, shown on a real apiserver (RBAC enforced): with every verb of
//! `deploy/rbac/role.yaml` the operator — authenticated as its ServiceAccount, nothing else —
//! plays a whole story (election, a Lease deleted behind its back, failover, Events in series,
//! lock deletion); with any single verb removed, some part of that story breaks — and for a
//! write verb the audit log shows the operator being refused exactly that verb (the audit
//! policy records writes only).
//!
//! Needs the real control plane (`loadtest/controlplane`, built from source on first use).
//! Run: `cargo test --test rbac -- --nocapture`.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: panics are failures

use std::path::{Path, PathBuf};
use std::time::Duration;

use controlplane::{ControlPlane, Options, repo_path};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::events::v1::Event;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::{Value, json};
use stslock::api::StatefulSetLock;
use stslock::config::OperatorArgs;

mod common;
use common::db_and_lock;

/// How long a stage of the story may take before it counts as broken.
const STAGE: Duration = Duration::from_secs(12);

/// One rule's verb, as (rule index, verb).
type Grant = (usize, String);

fn role() -> Value {
    let text = std::fs::read_to_string(repo_path("deploy/rbac/role.yaml")).unwrap();
    serde_saphyr::from_str(&text).unwrap()
}

fn grants(role: &Value) -> Vec<Grant> {
    role["rules"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .flat_map(|(i, r)| {
            r["verbs"]
                .as_array()
                .unwrap()
                .iter()
                .map(move |v| (i, v.as_str().unwrap().to_string()))
        })
        .collect()
}

fn describe(role: &Value, (i, verb): &Grant) -> String {
    let r = &role["rules"][*i];
    format!("{verb} {}", r["resources"][0].as_str().unwrap())
}

/// `deploy/rbac/` with `without` removed from the role, in a directory of its own.
fn rbac_dir(dir: &Path, role: &Value, without: Option<&Grant>) -> PathBuf {
    let mut role = role.clone();
    if let Some((i, verb)) = without {
        let verbs = role["rules"][*i]["verbs"].as_array_mut().unwrap();
        verbs.retain(|v| v.as_str() != Some(verb.as_str()));
    }
    role["rules"]
        .as_array_mut()
        .unwrap()
        .retain(|r| !r["verbs"].as_array().unwrap().is_empty());
    std::fs::create_dir_all(dir).unwrap();
    for f in [
        "kustomization.yaml",
        "service_account.yaml",
        "role_binding.yaml",
    ] {
        std::fs::copy(repo_path("deploy/rbac").join(f), dir.join(f)).unwrap();
    }
    std::fs::write(dir.join("role.yaml"), serde_json::to_string(&role).unwrap()).unwrap();
    dir.to_path_buf()
}

async fn until<T>(what: &str, mut f: impl AsyncFnMut() -> Option<T>) -> Result<T, String> {
    let deadline = tokio::time::Instant::now() + STAGE;
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        if tokio::time::Instant::now() > deadline {
            return Err(what.to_string());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn writer(pods: &Api<Pod>) -> Option<String> {
    let list = pods
        .list(&ListParams::default().labels("app=db"))
        .await
        .ok()?;
    let writers: Vec<String> = list
        .items
        .iter()
        .filter(|p| {
            p.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get("sts-role"))
                .map(String::as_str)
                == Some("writer")
        })
        .filter_map(|p| p.metadata.name.clone())
        .collect();
    assert!(writers.len() <= 1, "two writers: {writers:?}");
    writers.into_iter().next()
}

/// The status code of `GET path` on the operator's metrics address (0: no answer).
async fn status_of(addr: std::net::SocketAddr, path: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fetch = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).await.ok()?;
        out.split_whitespace().nth(1)?.parse().ok()
    };
    tokio::time::timeout(Duration::from_secs(2), fetch)
        .await
        .ok()
        .flatten()
        .unwrap_or(0)
}

/// The story; Err names the first stage that did not complete.
async fn story(admin: &Client, ns: &str, metrics: std::net::SocketAddr) -> Result<(), String> {
    let namespaces: Api<Namespace> = Api::all(admin.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": ns}})).unwrap(),
        )
        .await
        .unwrap();
    // Into the operator's scope only once it is ready (its caches and the namespaces in scope
    // listed): it must notice by its watches.
    until("the operator ready (/readyz)", async || {
        (status_of(metrics, "/readyz").await == 200).then_some(())
    })
    .await?;
    namespaces
        .patch(
            ns,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"stslock-rbac": "on"}}})),
        )
        .await
        .unwrap();
    db_and_lock(admin, ns, 2).await;
    let locks: Api<StatefulSetLock> = Api::namespaced(admin.clone(), ns);
    let pods: Api<Pod> = Api::namespaced(admin.clone(), ns);
    let leases: Api<Lease> = Api::namespaced(admin.clone(), ns);
    let events: Api<Event> = Api::namespaced(admin.clone(), ns);
    let holder = async |leases: &Api<Lease>| {
        leases
            .get_opt("db-lease")
            .await
            .ok()
            .flatten()
            .and_then(|l| l.spec.and_then(|s| s.holder_identity))
    };
    until("election", async || {
        let available = locks
            .get("lock")
            .await
            .ok()?
            .status?
            .conditions
            .iter()
            .any(|c| c.type_ == "Available" && c.status == "True");
        (available
            && writer(&pods).await.as_deref() == Some("db-0")
            && holder(&leases).await.as_deref() == Some("db-0"))
        .then_some(())
    })
    .await?;
    let lease = leases.get("db-lease").await.unwrap();
    leases
        .delete("db-lease", &DeleteParams::default())
        .await
        .unwrap();
    until(
        "Lease re-created after a deletion behind the operator's back",
        async || {
            let l = leases.get_opt("db-lease").await.ok()??;
            (l.metadata.uid != lease.metadata.uid
                && l.spec.as_ref()?.holder_identity.as_deref() == Some("db-0"))
            .then_some(())
        },
    )
    .await?;
    pods.patch_status(
        "db-0",
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"conditions": [{"type": "Ready", "status": "False"}]}})),
    )
    .await
    .unwrap();
    until("failover", async || {
        (writer(&pods).await.as_deref() == Some("db-1")).then_some(())
    })
    .await?;
    for paused in [true, false, true] {
        locks
            .patch(
                "lock",
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"paused": paused}})),
            )
            .await
            .unwrap();
        if paused {
            // Each pause is observed before the next toggle, so both are decided.
            until("paused observed", async || {
                let l = locks.get("lock").await.ok()?;
                l.status?
                    .conditions
                    .iter()
                    .any(|c| c.type_ == "Progressing" && c.reason == "Paused")
                    .then_some(())
            })
            .await?;
        } else {
            until("resumed observed", async || {
                let l = locks.get("lock").await.ok()?;
                (!l.status?
                    .conditions
                    .iter()
                    .any(|c| c.type_ == "Progressing" && c.reason == "Paused"))
                .then_some(())
            })
            .await?;
        }
    }
    until(
        "the repeated Paused Event recorded as a series",
        async || {
            let list = events.list(&ListParams::default()).await.ok()?;
            list.items
                .iter()
                .any(|e| {
                    e.reason.as_deref() == Some("Paused")
                        && e.series.as_ref().is_some_and(|s| s.count >= 2)
                })
                .then_some(())
        },
    )
    .await?;
    locks
        .delete("lock", &DeleteParams::default())
        .await
        .unwrap();
    until(
        "lock deletion (finalizer removed, Lease deleted)",
        async || {
            (locks.get_opt("lock").await.ok()?.is_none()
                && leases.get_opt("db-lease").await.ok()?.is_none())
            .then_some(())
        },
    )
    .await?;
    Ok(())
}

/// The operator's refused requests in the audit log: (verb, resource[/subresource]).
fn refusals(audit: &Path, user: &str) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(audit).unwrap_or_default();
    text.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|e| e["user"]["username"] == user && e["responseStatus"]["code"] == 403)
        .map(|e| {
            let r = &e["objectRef"];
            let mut resource = r["resource"].as_str().unwrap_or("").to_string();
            if let Some(sub) = r["subresource"].as_str() {
                resource = format!("{resource}/{sub}");
            }
            (e["verb"].as_str().unwrap_or("").to_string(), resource)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_verb_of_the_role_is_needed_on_a_real_apiserver() {
    let cp = ControlPlane::start(Options::default())
        .await
        .expect("control plane");
    let admin = cp.admin_client().await.unwrap();
    stslock::dev::install_crd(&admin).await.expect("crd");
    let role = role();
    let work = tempdir();
    let mut variants: Vec<Option<Grant>> = vec![None];
    variants.extend(grants(&role).into_iter().map(Some));
    let mut report = vec![];
    for (k, without) in variants.iter().enumerate() {
        let dir = rbac_dir(&work.join(format!("rbac-{k}")), &role, without.as_ref());
        let agent = format!("stslock/rbac-{k}");
        let identity = cp
            .install_operator_identity(&dir, &agent, Duration::from_secs(3600))
            .await
            .expect("operator identity");
        let client = identity.client().await.unwrap();
        // RBAC changes reach the authorizer through its informers: give them a moment.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let mut args = OperatorArgs::for_shard(&format!("rbac-{k}"));
        args.shard_group = format!("rbac-{k}");
        args.namespace = Some("stslock-system".into());
        args.namespace_selector = Some("stslock-rbac=on".into());
        args.api_timeout_seconds = 3;
        args.membership_lease_seconds = 6;
        args.metrics_addr = "127.0.0.1:0".parse().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let (bound_tx, bound_rx) = tokio::sync::oneshot::channel();
        let options = stslock::replica::RunOptions {
            metrics_bound: Some(bound_tx),
        };
        let operator = tokio::spawn(stslock::replica::run_with(
            client,
            args,
            async {
                let _ = rx.await;
            },
            options,
        ));
        let metrics = bound_rx.await.expect("metrics address");
        let ns = format!("rbac-{k}");
        let outcome = story(&admin, &ns, metrics).await;
        let _ = tx.send(());
        let _ = tokio::time::timeout(Duration::from_secs(10), operator).await;
        // Out of the selector: the next replica's scope does not include this namespace.
        let namespaces: Api<Namespace> = Api::all(admin.clone());
        let _ = namespaces
            .patch(
                &ns,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"labels": {"stslock-rbac": "off"}}})),
            )
            .await;
        let refused = refusals(&cp.audit_log_path, &identity.username);
        let line = match without {
            None => format!("full role: {outcome:?}"),
            Some(g) => format!("without {}: {outcome:?}", describe(&role, g)),
        };
        println!("{line}");
        report.push((without.clone(), outcome, refused));
    }
    for (without, outcome, refused) in &report {
        match without {
            None => assert_eq!(outcome, &Ok(()), "the full role plays the whole story"),
            Some(g) => {
                let what = describe(&role, g);
                assert!(
                    outcome.is_err(),
                    "nothing broke without {what}: the verb is not needed"
                );
                let (verb, resource) = (
                    g.1.as_str(),
                    role["rules"][g.0]["resources"][0].as_str().unwrap(),
                );
                // The audit policy records writes only (every write, at Metadata level), so the
                // refusal itself is in the log for the write verbs; for reads the broken story
                // is the evidence.
                if ["create", "patch", "delete", "update"].contains(&verb) {
                    assert!(
                        refused.iter().any(|(v, r)| v == verb && r == resource),
                        "without {what} the story broke ({outcome:?}) but the audit log shows no refusal of it: {refused:?}"
                    );
                }
            }
        }
    }
    cp.stop().await.unwrap();
}

fn tempdir() -> PathBuf {
    let d = std::env::temp_dir().join(format!("stslock-rbac-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&d).unwrap();
    d
}
