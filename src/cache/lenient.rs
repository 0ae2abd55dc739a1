//! Watches that survive objects they cannot decode (DESIGN §10: "no object it cannot decode
//! stops the others").
//!
//! kube-runtime's `watcher` decodes a whole list page into `ObjectList<K>`: one object that does
//! not fit `K` (a StatefulSetLock without `spec`, which the Go operator's CRD allowed) fails the
//! list, the watcher retries it forever, and every lock in the cluster goes unreconciled. Here
//! each object is decoded on its own ([`Lenient`]); one that fails is reported (log line, metric,
//! and an Event on it when it is a lock) and left out of the stream, the others flow.

use std::borrow::Cow;
use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use futures::{Stream, StreamExt};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::runtime::watcher as kw;
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};

/// One object of kind `K` as the API server sent it: decoded, or not decodable as `K` (with
/// its metadata, when even that decodes, and why).
#[derive(Clone, Debug)]
pub enum Lenient<K> {
    Ok(K),
    Bad {
        metadata: Box<ObjectMeta>,
        error: String,
    },
}

impl<'de, K: DeserializeOwned + Resource> Deserialize<'de> for Lenient<K> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let mut value = serde_json::Value::deserialize(d)?;
        // Both parts are decoded from the owned tree (its strings move into the object, none is
        // copied; this runs for every object of every watch event): the metadata first, so an
        // object that does not fit `K` is still named, then the rest with empty metadata.
        let metadata = match value.get_mut("metadata") {
            Some(m) => ObjectMeta::deserialize(std::mem::replace(m, serde_json::json!({}))),
            None => Ok(ObjectMeta::default()),
        };
        let metadata = match metadata {
            Ok(m) => m,
            Err(e) => {
                return Ok(Lenient::Bad {
                    metadata: Box::default(),
                    error: format!("metadata: {e}"),
                });
            }
        };
        match K::deserialize(value) {
            Ok(mut k) => {
                *k.meta_mut() = metadata;
                Ok(Lenient::Ok(k))
            }
            Err(e) => Ok(Lenient::Bad {
                metadata: Box::new(metadata),
                error: e.to_string(),
            }),
        }
    }
}

impl<K: Resource> Resource for Lenient<K> {
    type DynamicType = K::DynamicType;
    type Scope = K::Scope;

    fn kind(dt: &Self::DynamicType) -> Cow<'_, str> {
        K::kind(dt)
    }
    fn group(dt: &Self::DynamicType) -> Cow<'_, str> {
        K::group(dt)
    }
    fn version(dt: &Self::DynamicType) -> Cow<'_, str> {
        K::version(dt)
    }
    fn plural(dt: &Self::DynamicType) -> Cow<'_, str> {
        K::plural(dt)
    }
    fn meta(&self) -> &ObjectMeta {
        match self {
            Lenient::Ok(k) => k.meta(),
            Lenient::Bad { metadata, .. } => metadata,
        }
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        match self {
            Lenient::Ok(k) => k.meta_mut(),
            Lenient::Bad { metadata, .. } => metadata,
        }
    }
}

/// A stand-in of `K` carrying only metadata: what a deletion of an undecodable object is
/// forwarded as, so a cache that held an earlier, decodable version of it lets it go.
pub trait FromMeta {
    fn from_meta(metadata: ObjectMeta) -> Self;
}

macro_rules! from_meta_default {
    ($($t:ty),*) => {$(
        impl FromMeta for $t {
            fn from_meta(metadata: ObjectMeta) -> Self {
                Self { metadata, ..Default::default() }
            }
        }
    )*};
}
from_meta_default!(
    k8s_openapi::api::core::v1::Pod,
    k8s_openapi::api::apps::v1::StatefulSet,
    k8s_openapi::api::coordination::v1::Lease,
    crate::cache::watch::CachedStatefulSet
);

impl FromMeta for crate::api::StatefulSetLock {
    fn from_meta(metadata: ObjectMeta) -> Self {
        Self {
            metadata,
            spec: crate::api::StatefulSetLockSpec::default(),
            status: None,
        }
    }
}

/// An object that could not be decoded, as reported.
#[derive(Clone, Debug)]
pub struct Undecodable {
    pub kind: String,
    pub metadata: ObjectMeta,
    pub error: String,
}

/// Where undecodable objects are reported. Each version of an object is reported once.
#[derive(Clone)]
pub struct Reporter {
    seen: Arc<Mutex<HashSet<(String, String, String)>>>,
    sink: Arc<dyn Fn(Undecodable) + Send + Sync>,
}

impl Reporter {
    pub fn new(sink: impl Fn(Undecodable) + Send + Sync + 'static) -> Self {
        Reporter {
            seen: Arc::default(),
            sink: Arc::new(sink),
        }
    }

    fn report(&self, u: Undecodable) {
        let key = (
            u.kind.clone(),
            u.metadata.uid.clone().unwrap_or_default(),
            u.metadata.resource_version.clone().unwrap_or_default(),
        );
        let first = self
            .seen
            .lock()
            .map(|mut s| {
                if s.len() > 10_000 {
                    s.clear();
                }
                s.insert(key)
            })
            .unwrap_or(true);
        if first {
            tracing::warn!(
                kind = %u.kind,
                namespace = u.metadata.namespace.as_deref().unwrap_or(""),
                name = u.metadata.name.as_deref().unwrap_or(""),
                error = %u.error,
                "object cannot be decoded: skipped (every other object is still watched)"
            );
            (self.sink)(u);
        }
    }
}

/// `kube::runtime::watcher` over all namespaces for `K`, decoding each object on its own: an
/// undecodable one is reported and skipped.
pub fn watcher<K>(
    client: Client,
    cfg: kw::Config,
    reporter: Reporter,
) -> impl Stream<Item = Result<kw::Event<K>, kw::Error>> + Send + 'static
where
    K: Resource + FromMeta + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Default + Clone + Eq + std::hash::Hash + Send + Sync,
{
    let api: Api<Lenient<K>> = Api::all(client);
    let kind = K::kind(&K::DynamicType::default()).to_string();
    kw::watcher(api, cfg).filter_map(move |ev| {
        let out = match ev {
            Err(e) => Some(Err(e)),
            Ok(ev) => convert(ev, &kind, &reporter).map(Ok),
        };
        std::future::ready(out)
    })
}

fn convert<K: FromMeta>(
    ev: kw::Event<Lenient<K>>,
    kind: &str,
    reporter: &Reporter,
) -> Option<kw::Event<K>> {
    use kw::Event as E;
    let bad = |metadata: ObjectMeta, error: String| {
        reporter.report(Undecodable {
            kind: kind.to_string(),
            metadata,
            error,
        })
    };
    match ev {
        E::Init => Some(E::Init),
        E::InitDone => Some(E::InitDone),
        E::InitApply(Lenient::Ok(k)) => Some(E::InitApply(k)),
        E::Apply(Lenient::Ok(k)) => Some(E::Apply(k)),
        E::Delete(Lenient::Ok(k)) => Some(E::Delete(k)),
        E::InitApply(Lenient::Bad { metadata, error })
        | E::Apply(Lenient::Bad { metadata, error }) => {
            bad(*metadata, error);
            None
        }
        E::Delete(Lenient::Bad { metadata, .. }) => Some(E::Delete(K::from_meta(*metadata))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::StatefulSetLock;

    #[test]
    fn one_undecodable_lock_in_a_list_leaves_the_others_decoded() {
        let list = serde_json::json!({
            "apiVersion": "app.anukkrit.me/v1", "kind": "StatefulSetLockList",
            "metadata": {"resourceVersion": "9"},
            "items": [
                {"apiVersion": "app.anukkrit.me/v1", "kind": "StatefulSetLock",
                 "metadata": {"name": "good", "namespace": "a", "uid": "u1"},
                 "spec": {"statefulSetName": "db", "leaseName": "db-lease", "leaseDurationSeconds": 30}},
                {"apiVersion": "app.anukkrit.me/v1", "kind": "StatefulSetLock",
                 "metadata": {"name": "no-spec", "namespace": "a", "uid": "u2"}},
            ]
        });
        // What kube decodes a list page into, from the response's text.
        let text = list.to_string();
        let typed: Result<kube::core::ObjectList<StatefulSetLock>, _> = serde_json::from_str(&text);
        assert!(typed.is_err(), "the strict decode fails the whole page");
        let lenient: kube::core::ObjectList<Lenient<StatefulSetLock>> =
            serde_json::from_str(&text).expect("a lenient page decodes");
        let reported = Arc::new(Mutex::new(vec![]));
        let r = Reporter::new({
            let reported = reported.clone();
            move |u: Undecodable| reported.lock().expect("lock").push(u)
        });
        let out: Vec<_> = lenient
            .items
            .into_iter()
            .filter_map(|l| convert(kw::Event::InitApply(l), "StatefulSetLock", &r))
            .collect();
        assert_eq!(out.len(), 1);
        assert!(
            matches!(&out[0], kw::Event::InitApply(l) if l.metadata.name.as_deref() == Some("good"))
        );
        let reported = reported.lock().expect("lock");
        assert_eq!(reported.len(), 1);
        assert_eq!(reported[0].metadata.name.as_deref(), Some("no-spec"));
        assert!(reported[0].error.contains("spec"), "{}", reported[0].error);
    }

    #[test]
    fn watch_events_decode_good_objects_and_name_bad_ones() {
        // One watch line as kube reads it (`type` first, as every API server sends it).
        let line = |object: serde_json::Value| {
            serde_json::json!({"type": "MODIFIED", "object": object}).to_string()
        };
        let good = line(serde_json::json!({
            "apiVersion": "app.anukkrit.me/v1", "kind": "StatefulSetLock",
            "metadata": {"name": "good", "namespace": "a", "resourceVersion": "7",
                         "labels": {"x": "\"quoted\" é \\ end"}},
            "spec": {"statefulSetName": "db", "leaseName": "db-lease", "leaseDurationSeconds": 30},
            "status": {"writerPod": "db-0"}
        }));
        let ev: kube::core::WatchEvent<Lenient<StatefulSetLock>> =
            serde_json::from_str(&good).expect("decodes");
        let kube::core::WatchEvent::Modified(Lenient::Ok(lock)) = ev else {
            panic!("not a decoded lock: {good}");
        };
        // The same object as the strict decode gives.
        let strict: kube::core::WatchEvent<StatefulSetLock> =
            serde_json::from_str(&good).expect("strict decode");
        let kube::core::WatchEvent::Modified(strict) = strict else {
            panic!("strict");
        };
        assert_eq!(
            serde_json::to_value(&lock).expect("json"),
            serde_json::to_value(&strict).expect("json")
        );
        let bad = line(serde_json::json!({
            "apiVersion": "app.anukkrit.me/v1", "kind": "StatefulSetLock",
            "metadata": {"name": "bad", "namespace": "a", "resourceVersion": "8"},
            "spec": {"statefulSetName": 5, "leaseName": "db-lease", "leaseDurationSeconds": 30}
        }));
        let ev: kube::core::WatchEvent<Lenient<StatefulSetLock>> =
            serde_json::from_str(&bad).expect("a bad object still decodes as an event");
        let kube::core::WatchEvent::Modified(Lenient::Bad { metadata, error }) = ev else {
            panic!("not reported as undecodable: {bad}");
        };
        assert_eq!(metadata.name.as_deref(), Some("bad"));
        assert_eq!(metadata.resource_version.as_deref(), Some("8"));
        assert!(error.contains("invalid type"), "{error}");
        // A key given twice (the tree keeps the last one) is still a lock, as before.
        let twice = r#"{"type":"ADDED","object":{"apiVersion":"app.anukkrit.me/v1","kind":"StatefulSetLock","metadata":{"name":"t","namespace":"a"},"spec":{"statefulSetName":"a","statefulSetName":"db","leaseName":"l","leaseDurationSeconds":30}}}"#;
        let ev: kube::core::WatchEvent<Lenient<StatefulSetLock>> =
            serde_json::from_str(twice).expect("decodes");
        assert!(
            matches!(&ev, kube::core::WatchEvent::Added(Lenient::Ok(l)) if l.spec.stateful_set_name == "db"),
            "{ev:?}"
        );
    }
}
