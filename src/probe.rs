//! The replica's HTTP endpoints on `--metrics-addr`: `/metrics` (Prometheus text),
//! `/healthz` (the process answers) and `/readyz` (the watch caches have delivered their
//! initial lists and the membership Lease is held, so the replica can do its work).
//!
//! It only reads the replica's state; it never writes to the API server.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context as _;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use kube::ResourceExt;
use kube::runtime::reflector::Store;

use crate::api::{SHARD_LABEL, StatefulSetLock};
use crate::cache::pods::PodIndex;
use crate::metrics::Metrics;
use crate::sharding::Sharding;

/// Which watch caches have delivered their initial list. Set once; a later relist does not
/// make a replica unready (its caches stay usable while it relists).
#[derive(Debug, Default)]
pub struct CacheSync {
    pub locks: AtomicBool,
    pub statefulsets: AtomicBool,
    pub leases: Arc<AtomicBool>,
    /// Woken when `locks` is set.
    locks_set: tokio::sync::Notify,
}

impl CacheSync {
    /// The lock watch has delivered its initial list.
    pub fn set_locks(&self) {
        self.locks.store(true, std::sync::atomic::Ordering::SeqCst);
        self.locks_set.notify_waiters();
    }

    /// Wait until the lock watch has delivered its initial list.
    pub async fn locks_listed(&self) {
        loop {
            let woken = self.locks_set.notified();
            tokio::pin!(woken);
            // Registered before the flag is read: a `set_locks` in between still wakes it.
            woken.as_mut().enable();
            if self.locks.load(std::sync::atomic::Ordering::SeqCst) {
                return;
            }
            woken.await;
        }
    }
}

/// What the endpoints read.
pub struct Probe {
    pub metrics: Arc<Metrics>,
    pub caches: Arc<CacheSync>,
    pub pods: PodIndex,
    pub leases: crate::cache::watch::LeaseCache,
    pub sets: crate::cache::sets::SetIndex,
    pub locks: Store<StatefulSetLock>,
    pub sharding: Arc<Sharding>,
    /// The namespaces in scope (listed, with --namespace-selector).
    pub scope: Arc<crate::scope::Scope>,
}

impl Probe {
    /// Ok when ready, else why not (short, for the 503 body).
    pub fn readiness(&self) -> Result<(), String> {
        let pending: Vec<&str> = [
            ("statefulsetlocks", self.caches.locks.load(Ordering::SeqCst)),
            (
                "statefulsets",
                self.caches.statefulsets.load(Ordering::SeqCst),
            ),
            ("pods", self.pods.is_synced()),
            ("leases", self.caches.leases.load(Ordering::SeqCst)),
            ("namespaces", self.scope.is_synced()),
        ]
        .into_iter()
        .filter(|(_, synced)| !synced)
        .map(|(name, _)| name)
        .collect();
        if !pending.is_empty() {
            return Err(format!("caches not synced: {}", pending.join(", ")));
        }
        if !self.sharding.may_write() {
            return Err("membership Lease not held (fenced)".into());
        }
        Ok(())
    }

    /// Gauges read from the replica's state rather than counted as it happens.
    fn refresh(&self) {
        let id = self.metrics.shard();
        let owned = self
            .locks
            .state()
            .iter()
            .filter(|l| l.labels().get(SHARD_LABEL).map(String::as_str) == Some(id))
            .count();
        self.metrics.shard_state(
            owned,
            self.sharding.ring_members().len(),
            self.readiness().is_ok(),
        );
        self.metrics.cached("locks", self.locks.state().len());
        self.metrics.cached("statefulsets", self.sets.len());
        self.metrics.cached("pods", self.pods.len());
        self.metrics
            .cached("leases", self.leases.read().map(|m| m.len()).unwrap_or(0));
    }
}

/// Bind `addr` (port 0 picks a free port); the bound address is returned for logs and tests.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<(tokio::net::TcpListener, SocketAddr)> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the metrics address {addr}"))?;
    let bound = listener
        .local_addr()
        .with_context(|| format!("reading the bound metrics address for {addr}"))?;
    Ok((listener, bound))
}

pub fn router(probe: Arc<Probe>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(probe)
}

/// Serve until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, probe: Arc<Probe>) {
    if let Err(e) = axum::serve(listener, router(probe)).await {
        tracing::error!(error = %e, "metrics server stopped");
    }
}

async fn metrics(State(probe): State<Arc<Probe>>) -> Response {
    probe.refresh();
    match probe.metrics.render() {
        Ok(body) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding metrics: {e}\n"),
        )
            .into_response(),
    }
}

async fn readyz(State(probe): State<Arc<Probe>>) -> Response {
    match probe.readiness() {
        Ok(()) => (StatusCode::OK, "ready\n".to_string()).into_response(),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")).into_response(),
    }
}
