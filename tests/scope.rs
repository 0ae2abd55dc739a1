//! `--namespaces` and `--namespace-selector` scope an install: locks outside the scope are not
//! claimed, finalized, elected or labelled, and a namespace that enters the scope is handled
//! from then on. On kubesim or a real control plane (`tests/common`).
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on setup failures

use std::time::Duration;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use stslock::api::{SHARD_LABEL, StatefulSetLock};

mod common;
use common::{Env, Options};

/// An environment without operators, and one namespace per entry (labelled `stslock=on` or
/// not), each with StatefulSet `db` and its lock; returns the namespaces' names.
async fn setup(namespaces: &[(&str, bool)]) -> (Env, Vec<String>) {
    let env = Env::start_with(Options {
        replicas: 0,
        ..Options::default()
    })
    .await;
    let client = env.admin.clone();
    let mut names = vec![];
    for (ns, labelled) in namespaces {
        let labels = if *labelled {
            json!({"stslock": "on"})
        } else {
            json!({})
        };
        let ns = env.add_namespace(ns, labels).await;
        let sts: StatefulSet = serde_json::from_value(json!({
            "metadata": {"name": "db"},
            "spec": {"serviceName": "db", "replicas": 2, "selector": {"matchLabels": {"app": "db"}},
                     "template": {"metadata": {"labels": {"app": "db"}}, "spec": {"containers": [{"name": "c", "image": "postgres:15"}]}}}
        }))
        .unwrap();
        Api::<StatefulSet>::namespaced(client.clone(), &ns)
            .create(&PostParams::default(), &sts)
            .await
            .unwrap();
        let lock: StatefulSetLock = serde_json::from_value(json!({
            "apiVersion": "app.anukkrit.me/v1", "kind": "StatefulSetLock",
            "metadata": {"name": "db"},
            "spec": {"statefulSetName": "db", "leaseName": "db-lease", "leaseDurationSeconds": 10}
        }))
        .unwrap();
        Api::<StatefulSetLock>::namespaced(client.clone(), &ns)
            .create(&PostParams::default(), &lock)
            .await
            .unwrap();
        names.push(ns);
    }
    (env, names)
}

/// The writer of `ns`'s lock, once every pod carries a role and one is the writer.
async fn writer(client: &Client, ns: &str) -> Option<String> {
    let pods = Api::<Pod>::namespaced(client.clone(), ns)
        .list(&ListParams::default().labels("app=db"))
        .await
        .ok()?;
    let roles: Vec<_> = pods
        .items
        .iter()
        .map(|p| (p.name_any(), p.labels().get("sts-role").cloned()))
        .collect();
    let writers: Vec<_> = roles
        .iter()
        .filter(|(_, r)| r.as_deref() == Some("writer"))
        .collect();
    (roles.len() == 2 && writers.len() == 1 && roles.iter().all(|(_, r)| r.is_some()))
        .then(|| writers[0].0.clone())
}

async fn wait_writer(client: &Client, ns: &str, secs: u64) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(w) = writer(client, ns).await {
            return w;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no writer in {ns} after {secs}s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Nothing of the operator's is on `ns`'s lock, pods or Lease.
async fn untouched(env: &Env, ns: &str) {
    let client = &env.admin;
    let lock = Api::<StatefulSetLock>::namespaced(client.clone(), ns)
        .get("db")
        .await
        .unwrap();
    assert!(
        !lock.labels().contains_key(SHARD_LABEL),
        "{ns}: lock claimed by a shard"
    );
    assert!(lock.finalizers().is_empty(), "{ns}: finalizer added");
    assert!(lock.status.is_none(), "{ns}: status written");
    let pods = Api::<Pod>::namespaced(client.clone(), ns)
        .list(&ListParams::default().labels("app=db"))
        .await
        .unwrap();
    assert_eq!(pods.items.len(), 2);
    for p in &pods.items {
        assert!(
            !p.labels().contains_key("sts-role"),
            "{ns}: pod {} labelled",
            p.name_any()
        );
    }
    // Every write the API server saw, failed attempts included on a real cluster.
    let writes: Vec<_> = env
        .writes()
        .into_iter()
        .filter(|c| c.namespace == ns && c.by_operator())
        .collect();
    assert!(writes.is_empty(), "{ns}: operator wrote {writes:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespaces_flag_limits_the_install() {
    let (mut env, ns) = setup(&[("team-a", false), ("team-b", false)]).await;
    let (team_a, team_b) = (ns[0].clone(), ns[1].clone());
    let args = env.operator_args_with("scoped", |a| a.namespaces = vec![team_a.clone()]);
    env.start_operator_with("scoped", args).await;
    let client = env.admin.clone();
    assert_eq!(wait_writer(&client, &team_a, 15).await, "db-0");
    // Give the out-of-scope lock every chance to be touched (several assignment rounds).
    tokio::time::sleep(Duration::from_secs(2)).await;
    untouched(&env, &team_b).await;
    env.stop_operators().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespace_selector_follows_namespace_labels() {
    let (mut env, ns) = setup(&[("team-a", true), ("team-b", false)]).await;
    let (team_a, team_b) = (ns[0].clone(), ns[1].clone());
    let args = env.operator_args_with("scoped", |a| {
        a.namespace_selector = Some("stslock=on".into())
    });
    env.start_operator_with("scoped", args).await;
    let client = env.admin.clone();
    assert_eq!(wait_writer(&client, &team_a, 15).await, "db-0");
    tokio::time::sleep(Duration::from_secs(2)).await;
    untouched(&env, &team_b).await;
    // Labelling the namespace brings it into the scope.
    Api::<Namespace>::all(client.clone())
        .patch(
            &team_b,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"stslock": "on"}}})),
        )
        .await
        .unwrap();
    assert_eq!(wait_writer(&client, &team_b, 15).await, "db-0");
    env.stop_operators().await;
    env.assert_never_two_writers().await;
}
