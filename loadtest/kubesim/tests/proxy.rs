//! kubesim as a fault-injecting proxy (`kubesim::proxy`), here in front of another kubesim
//! serving HTTP (on the real control plane it stands in front of kube-apiserver: the stslock
//! suite `api_faults`). What passes is forwarded unchanged, with the client's User-Agent; the
//! faults act as on the embedded server: before forwarding (errors with Retry-After), after a
//! write was served (lost and held answers of committed writes), and on watch streams (stall
//! and lag, dropped watches).
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on setup failures

use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use kubesim::proxy::Proxy;
use kubesim::{HoldResponse, LoseResponse, Sim, SimConfig, WatchFault};
use serde_json::json;

fn cm(name: &str, v: &str) -> ConfigMap {
    serde_json::from_value(json!({"metadata": {"name": name}, "data": {"v": v}})).unwrap()
}

/// An upstream kubesim serving HTTP, a proxy in front of it, and a client of the proxy with
/// User-Agent `agent`.
async fn proxied(agent: &str) -> (Sim, Proxy, kube::Client, tempdir::Dir) {
    let mut sim = Sim::start(SimConfig::default());
    sim.serve("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let dir = tempdir::Dir::new();
    let upstream = dir.0.join("upstream.kubeconfig");
    sim.write_kubeconfig(&upstream).unwrap();
    let proxy = Proxy::start("127.0.0.1:0".parse().unwrap(), &upstream)
        .await
        .unwrap();
    let mut config = kube::Config::new(proxy.url().parse().unwrap());
    config.default_namespace = "default".into();
    config.read_timeout = Some(Duration::from_secs(3));
    // Each answer as the proxy gave it (kube retries 429, 503 and 504 by default).
    config.default_retry = false;
    config.headers.push((
        http::header::USER_AGENT,
        http::HeaderValue::from_str(agent).unwrap(),
    ));
    let client = kube::Client::try_from(config).unwrap();
    (sim, proxy, client, dir)
}

mod tempdir {
    pub struct Dir(pub std::path::PathBuf);
    impl Dir {
        pub fn new() -> Dir {
            let p =
                std::env::temp_dir().join(format!("kubesim-proxy-{:08x}", rand::random::<u32>()));
            std::fs::create_dir_all(&p).unwrap();
            Dir(p)
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_pass_through_with_the_clients_user_agent() {
    let (sim, _proxy, client, _dir) = proxied("stslock/r1").await;
    let maps: Api<ConfigMap> = Api::default_namespaced(client);
    maps.create(&PostParams::default(), &cm("a", "1"))
        .await
        .unwrap();
    assert_eq!(maps.get("a").await.unwrap().data.unwrap()["v"], "1");
    let log = sim.commit_log();
    let created = log.iter().find(|c| c.name == "a").unwrap();
    assert_eq!(
        created.actor, "stslock/r1",
        "the upstream sees the client's User-Agent"
    );
    // An upstream error is passed on as it is.
    let err = maps.get("missing").await.unwrap_err();
    assert!(
        matches!(err, kube::Error::Api(ref s) if s.code == 404),
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_lost_and_held_answers_act_as_on_the_embedded_server() {
    let (sim, proxy, client, _dir) = proxied("stslock/r1").await;
    let maps: Api<ConfigMap> = Api::default_namespaced(client);
    maps.create(&PostParams::default(), &cm("a", "1"))
        .await
        .unwrap();

    // Errors before forwarding, for the selected client only.
    proxy.faults().update(|c| {
        c.error_rate = 1.0;
        c.error_code = 429;
        c.agents = vec!["stslock/r1".into()];
    });
    let err = maps.get("a").await.unwrap_err();
    assert!(
        matches!(err, kube::Error::Api(ref s) if s.code == 429),
        "{err:?}"
    );
    proxy
        .faults()
        .update(|c| c.agents = vec!["someone-else".into()]);
    maps.get("a").await.unwrap();
    proxy.faults().set(Default::default());

    // A lost answer: committed upstream, the client waits until its own timeout.
    proxy.faults().update(|c| {
        c.lose_responses = vec![LoseResponse::hang().resource("configmaps")];
    });
    let patch = Patch::Merge(json!({"data": {"v": "2"}}));
    let sent = Instant::now();
    let lost = tokio::time::timeout(
        Duration::from_secs(20),
        maps.patch("a", &PatchParams::default(), &patch),
    )
    .await
    .expect("the client's own timeout ends the request");
    assert!(lost.is_err(), "the answer was lost: {lost:?}");
    assert!(
        sent.elapsed() >= Duration::from_secs(2),
        "the client waited for its timeout"
    );
    let upstream: Api<ConfigMap> = Api::default_namespaced(sim.client());
    assert_eq!(
        upstream.get("a").await.unwrap().data.unwrap()["v"],
        "2",
        "committed"
    );
    proxy.faults().set(Default::default());

    // A held answer: committed, delivered late.
    proxy.faults().update(|c| {
        c.hold_responses = vec![HoldResponse::new(700).resource("configmaps")];
    });
    let sent = Instant::now();
    let patch = Patch::Merge(json!({"data": {"v": "3"}}));
    maps.patch("a", &PatchParams::default(), &patch)
        .await
        .unwrap();
    assert!(sent.elapsed() >= Duration::from_millis(700));
    proxy.faults().set(Default::default());

    // The API down: 503 with Retry-After.
    proxy.faults().update(|c| c.down = true);
    let err = maps.get("a").await.unwrap_err();
    assert!(
        matches!(err, kube::Error::Api(ref s) if s.code == 503),
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_watch_delivers_nothing_until_lifted_and_a_dropped_one_ends() {
    let (sim, proxy, client, _dir) = proxied("stslock/r1").await;
    let maps: Api<ConfigMap> = Api::default_namespaced(client);
    let upstream: Api<ConfigMap> = Api::default_namespaced(sim.client());
    upstream
        .create(&PostParams::default(), &cm("a", "1"))
        .await
        .unwrap();
    let rv = upstream
        .get("a")
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();
    proxy.faults().update(|c| {
        c.watch_faults = vec![WatchFault::stall("configmaps").agent("stslock/r1")];
    });
    let mut events = maps
        .watch(&WatchParams::default().timeout(30).disable_bookmarks(), &rv)
        .await
        .unwrap()
        .boxed();
    upstream
        .patch(
            "a",
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"v": "2"}})),
        )
        .await
        .unwrap();
    let held = tokio::time::timeout(Duration::from_millis(800), events.next()).await;
    assert!(
        held.is_err(),
        "a stalled watch delivered an event: {held:?}"
    );
    proxy.faults().set(Default::default());
    let ev = tokio::time::timeout(Duration::from_secs(5), events.next())
        .await
        .expect("delivered once the stall is lifted")
        .unwrap()
        .unwrap();
    match ev {
        WatchEvent::Modified(m) => assert_eq!(m.data.unwrap()["v"], "2"),
        other => panic!("unexpected event {other:?}"),
    }
    // A lagging watch delivers late but in order.
    proxy.faults().update(|c| {
        c.watch_faults = vec![WatchFault::lag("configmaps", 600)];
    });
    let sent = Instant::now();
    upstream
        .patch(
            "a",
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"v": "3"}})),
        )
        .await
        .unwrap();
    let ev = tokio::time::timeout(Duration::from_secs(5), events.next())
        .await
        .expect("delivered after the lag")
        .unwrap()
        .unwrap();
    assert!(
        sent.elapsed() >= Duration::from_millis(550),
        "{:?}",
        sent.elapsed()
    );
    assert!(matches!(ev, WatchEvent::Modified(_)), "{ev:?}");
    proxy.faults().set(Default::default());
    // Dropped watches end.
    proxy.faults().drop_watches();
    let end = tokio::time::timeout(Duration::from_secs(5), events.next())
        .await
        .expect("the stream ends");
    assert!(end.is_none() || matches!(end, Some(Err(_))), "{end:?}");
}

/// A stall outlasts the watch's own timeout: the upstream ends the stream at `timeoutSeconds`,
/// the client's stream stays open, half-open, until the stall is lifted — with nothing held as
/// well (here nothing happens meanwhile), as a real stream whose peer went silent; then it ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stall_keeps_the_stream_open_past_its_timeout() {
    let (sim, proxy, client, _dir) = proxied("stslock/r1").await;
    let maps: Api<ConfigMap> = Api::default_namespaced(client);
    let upstream: Api<ConfigMap> = Api::default_namespaced(sim.client());
    upstream
        .create(&PostParams::default(), &cm("a", "1"))
        .await
        .unwrap();
    let rv = upstream
        .get("a")
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();
    proxy.faults().update(|c| {
        c.watch_faults = vec![WatchFault::stall("configmaps")];
    });
    let mut events = maps
        .watch(&WatchParams::default().timeout(1).disable_bookmarks(), &rv)
        .await
        .unwrap()
        .boxed();
    let quiet = tokio::time::timeout(Duration::from_millis(2500), events.next()).await;
    assert!(
        quiet.is_err(),
        "a stalled stream ended or delivered past its timeout: {quiet:?}"
    );
    proxy.faults().set(Default::default());
    let end = tokio::time::timeout(Duration::from_secs(5), events.next())
        .await
        .expect("the stream ends once the stall is lifted");
    assert!(end.is_none() || matches!(end, Some(Err(_))), "{end:?}");
}

/// A compaction through the proxy: a watch resumed from a version older than the newest one
/// the proxy had passed on gets 410 Gone (an `ERROR` event, as from kube-apiserver); a watch
/// from that newest version, or one started from a list, goes on; a watcher re-lists and sees
/// what happened meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_resumed_from_before_a_compaction_is_gone() {
    let (_sim, proxy, client, _dir) = proxied("stslock/r1").await;
    let maps: Api<ConfigMap> = Api::default_namespaced(client);
    // Nothing with a version passed yet: nothing is compacted.
    assert_eq!(proxy.compact(), 0);
    let old = maps
        .create(&PostParams::default(), &cm("a", "1"))
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();
    let newest = maps
        .patch(
            "a",
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"v": "2"}})),
        )
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();
    // A watch opened before the compaction goes on (it bites when a watch resumes).
    let mut open = maps
        .watch(
            &WatchParams::default().timeout(30).disable_bookmarks(),
            &old,
        )
        .await
        .unwrap()
        .boxed();
    assert_eq!(proxy.compact().to_string(), newest);
    let params = WatchParams::default().timeout(5).disable_bookmarks();
    let mut gone = maps.watch(&params, &old).await.unwrap().boxed();
    match tokio::time::timeout(Duration::from_secs(5), gone.next()).await {
        Ok(Some(Ok(WatchEvent::Error(e)))) => {
            assert_eq!(e.code, 410, "{e:?}");
            assert_eq!(e.reason, "Expired", "{e:?}");
            assert!(e.message.contains(&old), "{e:?}");
        }
        other => panic!("a resume from before the compaction: {other:?}"),
    }
    let ev = tokio::time::timeout(Duration::from_secs(5), open.next())
        .await
        .expect("the open watch goes on")
        .unwrap()
        .unwrap();
    assert!(matches!(ev, WatchEvent::Modified(_)), "{ev:?}");
    // From the compaction's version itself: served.
    let mut fresh = maps.watch(&params, &newest).await.unwrap().boxed();
    maps.patch(
        "a",
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"v": "3"}})),
    )
    .await
    .unwrap();
    let ev = tokio::time::timeout(Duration::from_secs(5), fresh.next())
        .await
        .expect("a watch from the compaction's version is served")
        .unwrap()
        .unwrap();
    match ev {
        WatchEvent::Modified(m) => assert_eq!(m.data.unwrap()["v"], "3"),
        other => panic!("unexpected event {other:?}"),
    }
    // A later compaction moves the point on; one with nothing newer passed on keeps it.
    let later = proxy.compact();
    assert!(
        later > newest.parse::<u64>().unwrap(),
        "{later} vs {newest}"
    );
    assert_eq!(proxy.compact(), later);
    let mut gone = maps.watch(&params, &newest).await.unwrap().boxed();
    let ev = tokio::time::timeout(Duration::from_secs(5), gone.next()).await;
    assert!(
        matches!(ev, Ok(Some(Ok(WatchEvent::Error(ref e)))) if e.code == 410),
        "{ev:?}"
    );
}
