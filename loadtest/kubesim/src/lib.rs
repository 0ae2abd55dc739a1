//! kubesim: an embedded Kubernetes API server for tests, demos and load tests.
//!
//! It serves the Kubernetes REST API over plain HTTP on loopback (for `kubectl`, kube-rs and
//! any other client) and in-process through [`Sim::client`], backed by an in-memory store with
//! the apiserver's semantics (resourceVersions, optimistic concurrency, watches with history
//! and compaction, finalizers, garbage collection, CRDs validated by their schemas), plus the
//! StatefulSet controller and a kubelet stand-in. Faults can be injected from Rust or over
//! HTTP under `/sim/`, and an invariant recorder reports every interval during which a
//! StatefulSet had two writer-labelled pods or no Ready writer. The fault layer also has the
//! failure modes of a real apiserver: writes that commit but lose or delay their answer,
//! watches of one resource that lag or stall half-open, and stale `resourceVersion=0` reads
//! (see [`faults`]).
#![forbid(unsafe_code)]

pub mod admission;
pub mod auth;
pub mod controllers;
pub mod convert;
pub mod discovery;
pub mod error;
pub mod faults;
pub mod html;
pub mod meta;
pub mod openapi;
pub mod patch;
pub mod proxy;
pub mod recorder;
pub mod registry;
pub mod schema;
pub mod selector;
pub mod server;
pub mod store;
pub mod table;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use http::{HeaderValue, Request, header};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub use auth::{ADMIN_TOKEN, User};
pub use controllers::{ControllerConfig, PodFaults};
pub use faults::{
    FaultConfig, Faults, HoldResponse, LateCommit, LoseResponse, LostAs, StaleRead, WatchFault,
};
pub use recorder::Report;
pub use store::{CommitRecord, Store, StoreConfig, WriteAttempt};

#[derive(Debug, Clone)]
pub struct SimConfig {
    pub store: StoreConfig,
    pub controllers: ControllerConfig,
    /// How often open watches that asked for bookmarks get one.
    pub bookmark_interval: Duration,
    /// Authenticate and authorize requests as the apiserver does with RBAC (see
    /// [`auth`]): bearer tokens ([`ADMIN_TOKEN`], [`SimConfig::tokens`], ServiceAccount tokens
    /// issued through TokenRequest), Roles, ClusterRoles and their bindings. Off (the
    /// default), every request is allowed.
    pub rbac: bool,
    /// Static bearer tokens with RBAC on: token -> user.
    pub tokens: std::collections::BTreeMap<String, auth::User>,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            store: StoreConfig::default(),
            controllers: ControllerConfig::default(),
            bookmark_interval: Duration::from_secs(5),
            rbac: false,
            tokens: Default::default(),
        }
    }
}

/// A running simulator. Dropping it stops its controllers and its HTTP server.
pub struct Sim {
    app: Arc<server::App>,
    tasks: Vec<JoinHandle<()>>,
    addr: Option<SocketAddr>,
    shutdown: Option<oneshot::Sender<()>>,
}

impl Sim {
    /// Start the store and the controllers in this tokio runtime (no socket yet).
    pub fn start(cfg: SimConfig) -> Sim {
        let store = Store::new(cfg.store.clone());
        let tasks = controllers::start(store.clone(), cfg.controllers.clone());
        let app = Arc::new(server::App {
            store: store.clone(),
            faults: Arc::new(Faults::default()),
            auth: Arc::new(auth::Auth::new(cfg.rbac, cfg.tokens.clone())),
            pods: PodFaults {
                store,
                cfg: cfg.controllers,
            },
            bookmark_interval: cfg.bookmark_interval,
        });
        Sim {
            app,
            tasks,
            addr: None,
            shutdown: None,
        }
    }

    /// Serve HTTP on `addr` (port 0 picks a free port); returns the bound address.
    pub async fn serve(&mut self, addr: SocketAddr) -> anyhow::Result<SocketAddr> {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        let bound = listener.local_addr().context("reading bound address")?;
        let (tx, rx) = oneshot::channel::<()>();
        let router = server::router(self.app.clone());
        self.tasks.push(tokio::spawn(async move {
            let served = axum::serve(listener, router)
                .with_graceful_shutdown(async {
                    let _ = rx.await;
                })
                .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "kubesim HTTP server stopped");
            }
        }));
        self.addr = Some(bound);
        self.shutdown = Some(tx);
        Ok(bound)
    }

    pub fn addr(&self) -> Option<SocketAddr> {
        self.addr
    }

    pub fn url(&self) -> Option<String> {
        self.addr.map(|a| format!("http://{a}"))
    }

    /// A kube client talking to this simulator in-process (no socket), identified by the
    /// User-Agent `kubesim-inprocess`.
    pub fn client(&self) -> kube::Client {
        self.client_as("kubesim-inprocess")
    }

    /// An in-process client with its own User-Agent (what partitions select on).
    pub fn client_as(&self, agent: &str) -> kube::Client {
        let ua =
            HeaderValue::from_str(agent).unwrap_or(HeaderValue::from_static("kubesim-inprocess"));
        let rbac = self.app.auth.enabled;
        let svc = tower::ServiceBuilder::new()
            .map_request(move |mut r: Request<kube::client::Body>| {
                r.headers_mut().insert(header::USER_AGENT, ua.clone());
                if rbac && !r.headers().contains_key(header::AUTHORIZATION) {
                    r.headers_mut().insert(
                        header::AUTHORIZATION,
                        HeaderValue::from_static(concat!("Bearer ", "kubesim")),
                    );
                }
                r
            })
            .service(server::router(self.app.clone()));
        kube::Client::new(svc, "default")
    }

    /// A kubeconfig for the HTTP endpoint (None before [`Sim::serve`]).
    pub fn kubeconfig(&self) -> Option<String> {
        self.url().map(|u| kubeconfig_for(&u))
    }

    pub fn write_kubeconfig(&self, path: &Path) -> anyhow::Result<()> {
        let k = self
            .kubeconfig()
            .context("kubesim is not serving HTTP yet: call serve() first")?;
        std::fs::write(path, k).with_context(|| format!("writing {}", path.display()))
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.app.store
    }

    pub fn faults(&self) -> &Faults {
        &self.app.faults
    }

    pub fn pods(&self) -> &PodFaults {
        &self.app.pods
    }

    /// The invariant report for the label the store was configured with.
    pub fn report(&self) -> Report {
        let now = self.app.store.elapsed_ms();
        self.app.store.lock().recorder.report(now)
    }

    pub fn commit_log(&self) -> Vec<CommitRecord> {
        self.app.store.commit_log()
    }

    /// Every write request's outcome as its client saw it (see [`store::WriteAttempt`]).
    pub fn write_attempts(&self) -> Vec<store::WriteAttempt> {
        self.app.store.write_attempts()
    }

    /// Forget the watch history (watchers resuming from before now get 410 Gone).
    pub fn compact(&self) -> u64 {
        self.app.store.compact()
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        for t in &self.tasks {
            t.abort();
        }
    }
}

pub fn kubeconfig_for(url: &str) -> String {
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: kubesim
  cluster:
    server: {url}
contexts:
- name: kubesim
  context:
    cluster: kubesim
    user: kubesim
    namespace: default
current-context: kubesim
preferences: {{}}
users:
- name: kubesim
  user:
    token: kubesim
"
    )
}
