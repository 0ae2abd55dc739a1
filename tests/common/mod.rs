//! The integration suites' one harness: the same test body runs against kubesim (in-process,
//! the default) or a real Kubernetes control plane (DESIGN §9).
//!
//! - `STSLOCK_TEST_BACKEND=real`: one real control plane (kube-apiserver 1.34, etcd,
//!   kube-controller-manager and the pod-lifecycle stand-in, `loadtest/controlplane`) per test
//!   binary, started by the first test that needs it. Tests take turns on it (one at a time:
//!   two cores cannot run two timing-sensitive tests and a control plane without skewing
//!   them), each in a fresh namespace, with its operator replicas scoped to that namespace.
//! - `STSLOCK_TEST_KUBECONFIG=<path>`: the same on any cluster; that kubeconfig's identity does
//!   the setup. The audit log is read from `STSLOCK_TEST_AUDIT_LOG` when given.
//!
//! On either backend the operator authenticates only as itself: on kubesim as the User-Agent
//! `stslock/<id>`, on a real cluster as ServiceAccount `stslock-system/stslock` with exactly
//! `deploy/rbac/` (a TokenRequest token), each replica with its own User-Agent. The admin
//! client is for setup and for what a test does to the world (readiness, deletions).
//!
//! Invariants are checked from records the operator did not write: kubesim's history
//! (`Sim::report`, `Sim::commit_log`); on a real cluster an independent pod watch per test
//! namespace, fed to kubesim's recorder, and the apiserver's audit log. Who owned each lock
//! when it was written for ([`Env::owner_check`]): kubesim's commit log, or the audit log with
//! an independent lock watch.
//!
//! Faults on both backends: a replica cut off from the API server ([`Env::partition`]; on a
//! real cluster a TCP proxy of the harness in front of it) and every operator write failing
//! with 500 ([`Env::fail_operator_writes`]; on a real cluster a validating webhook that cannot
//! be reached). Tests that need the rest of kubesim's fault API or its internals call
//! [`kubesim_only`], which prints why a test is skipped on the real backend (to stderr, past
//! libtest's output capture).
#![allow(dead_code)] // each suite uses part of the harness

pub mod report;
pub mod sim;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::io::{BufRead, Seek, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use controlplane::{ControlPlane, OperatorIdentity, PodLifecycleOptions};
use futures::StreamExt;
use futures::future::BoxFuture;
use k8s_openapi::api::admissionregistration::v1::ValidatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Event, Namespace, Pod, ServiceAccount};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use kubesim::recorder::Recorder;
use kubesim::{Report, Sim, SimConfig};
use serde_json::{Value, json};
use stslock::api::{SHARD_LABEL, StatefulSetLock, StatefulSetLockStatus};
use stslock::config::OperatorArgs;
use stslock::replica::RunOptions;
use tokio::sync::{OnceCell, Semaphore, SemaphorePermit, oneshot, watch};

/// The pod label the operator writes (the default `--role-label`).
pub const ROLE_LABEL: &str = "sts-role";
/// The timeout of every API call the harness makes.
pub const CALL: Duration = Duration::from_secs(10);
/// How long the real backend's stand-in kubelet takes to make a bound pod Ready (one value per
/// control plane; kubesim's is per test, [`Options::pod_ready_delay`]).
pub const REAL_POD_READY_DELAY: Duration = Duration::from_millis(20);
/// The finalizer through which the real backend keeps a deleted pod terminating for
/// [`Options::pod_terminate_delay`], as kubesim's kubelet does.
const TERMINATE_FINALIZER: &str = "stslock.test/terminate-delay";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Kubesim,
    Real,
}

pub fn backend() -> Backend {
    if std::env::var_os("STSLOCK_TEST_KUBECONFIG").is_some_and(|v| !v.is_empty()) {
        return Backend::Real;
    }
    match std::env::var("STSLOCK_TEST_BACKEND").as_deref() {
        Ok("real") => Backend::Real,
        Ok("kubesim") | Ok("") | Err(_) => Backend::Kubesim,
        Ok(other) => panic!("STSLOCK_TEST_BACKEND={other}: expected `kubesim` or `real`"),
    }
}

/// The current test's name (libtest names the thread after it).
pub fn test_name() -> String {
    std::thread::current()
        .name()
        .unwrap_or("unnamed")
        .to_string()
}

/// False (and says so on stderr, which libtest does not capture when written to directly) on
/// the real backend: for tests that need kubesim's faults or internals.
pub fn kubesim_only(reason: &str) -> bool {
    if backend() == Backend::Kubesim {
        return true;
    }
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED on the real backend: {}: {reason}",
        test_name()
    );
    false
}

/// The lock a write to something other than a lock is for, in suites whose lock `l{i}` has
/// Lease `lease{i}` and StatefulSet `s{i}` (pods `s{i}-*`).
pub fn lock_of(w: &Write) -> Option<String> {
    match w.resource.as_str() {
        "leases" => w.name.strip_prefix("lease").map(|i| format!("l{i}")),
        "pods" => w
            .name
            .strip_prefix('s')
            .and_then(|r| r.split_once('-'))
            .map(|(i, _)| format!("l{i}")),
        _ => None,
    }
}

/// No replica wrote for a lock it did not own at the time ([`Env::owner_check`] with
/// [`lock_of`]; `what` names the scenario), and more than `min_checked` writes were checked.
/// Call it once the operators are stopped.
pub async fn assert_only_owners_wrote(env: &Env, what: &str, min_checked: usize) {
    let c = env.owner_check(lock_of).await;
    println!(
        "{what}: {} operator writes checked against the lock's owner at the time ({:?} backend; {} of them exactly: the committed lock, or the write's revision after the lock's), {} by a non-owner, {} ambiguous by timestamps; attempts by a non-owner: {} refused, {} of unknown outcome {:?}",
        c.checked,
        env.backend(),
        c.exact,
        c.violations.len(),
        c.ambiguous,
        c.refused,
        c.unknown_outcome.len(),
        c.unknown_outcome
    );
    assert!(c.checked > min_checked, "too few writes checked: {c:?}");
    assert!(c.violations.is_empty(), "{:#?}", c.violations);
}

/// Runs a call with the harness's timeout; panics with what failed.
pub async fn call<T, E: std::fmt::Debug>(
    what: &str,
    f: impl Future<Output = Result<T, E>>,
) -> Result<T, E> {
    match tokio::time::timeout(CALL, f).await {
        Ok(r) => r,
        Err(_) => panic!("{what}: no answer within {CALL:?}"),
    }
}

fn status_code(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(s) => Some(s.code),
        _ => None,
    }
}

/// How an [`Env`] is set up. `Options::default()` is what `tests/operator.rs` needs.
#[derive(Clone)]
pub struct Options {
    pub replicas: usize,
    /// kubesim's kubelet: from created to Ready.
    pub pod_ready_delay: Duration,
    /// From deletion to gone (both backends).
    pub pod_terminate_delay: Duration,
    pub install_crd: bool,
    /// kubesim: also serve HTTP on loopback (for `kubectl`).
    pub serve_http: bool,
    /// Shard id of replica `i`; its User-Agent is `stslock/<id>`.
    pub shard_id: fn(usize) -> String,
    /// Adjusts every replica's arguments (after the harness's defaults, before scoping).
    pub operator_args: fn(&mut OperatorArgs),
    /// Adjusts kubesim's configuration (ignored on the real backend).
    pub sim: fn(&mut SimConfig),
    /// Real backend: each replica reaches the API server through a TCP proxy of the harness,
    /// so that [`Env::partition`] can cut it off (kubesim partitions any client).
    pub partitionable: bool,
    /// Record each lock's owner (its shard label) over time, for [`Env::owner_check`]: kubesim
    /// records the label with every commit; on a real cluster the harness watches the locks.
    pub record_owners: bool,
    /// Real backend: every replica reaches the API server through one kubesim fault proxy
    /// (`kubesim::proxy`), so that [`Env::faults`] injects the same faults on both backends.
    pub fault_proxy: bool,
}

impl Options {
    /// The cluster as a user meets it with `kubectl`: served over HTTP, no CRD yet (the test
    /// installs it as `make install` does) and no operator (the test starts it when the story
    /// gets there).
    pub fn user_story() -> Options {
        Options {
            replicas: 0,
            pod_ready_delay: Duration::from_millis(50),
            install_crd: false,
            serve_http: true,
            ..Options::default()
        }
    }
}

impl Default for Options {
    fn default() -> Self {
        Options {
            replicas: 1,
            pod_ready_delay: Duration::from_millis(20),
            pod_terminate_delay: Duration::from_millis(100),
            install_crd: true,
            serve_http: false,
            shard_id: |i| format!("test-{i}"),
            operator_args: |_| {},
            sim: |_| {},
            partitionable: false,
            record_owners: false,
            fault_proxy: false,
        }
    }
}

/// One write as the API server saw it: from kubesim's commit log, or from the real apiserver's
/// audit log (stage ResponseComplete).
#[derive(Clone, Debug, Default)]
pub struct Write {
    /// Order: kubesim's resourceVersion; on a real cluster the audit log's order of request
    /// arrival (a request sent after another's response is later).
    pub seq: u64,
    /// Milliseconds since the environment started: kubesim's commit time; on a real cluster
    /// the audit event's stageTimestamp (response complete, just after the commit).
    pub at_ms: u64,
    /// On a real cluster: when the API server received the request and when it had answered
    /// it (the commit is in between), in microseconds since the Unix epoch, the clock of
    /// [`Env::owner_check`]'s lock watch. On kubesim both are the commit time
    /// (`at_ms` in microseconds).
    pub received_us: i64,
    pub completed_us: i64,
    /// The client's User-Agent.
    pub actor: String,
    /// Authenticated user (real clusters only).
    pub user: Option<String>,
    pub verb: String,
    pub group: String,
    pub resource: String,
    /// `status`, `binding`, …; empty for the object itself (real clusters only).
    pub subresource: String,
    pub namespace: String,
    pub name: String,
    /// The response code; kubesim records committed writes only (200).
    pub code: u16,
    /// The labels of the object as committed: kubesim's record; on a real cluster those of
    /// the answer of a StatefulSetLock write (the audit log keeps its bodies), else empty.
    pub labels: BTreeMap<String, String>,
    /// `labels` are the committed object's (kubesim, or a real answer the audit log kept).
    pub labels_known: bool,
    /// Real clusters: the request itself wrote the lock's owner label (a claim or a handoff).
    pub sets_owner: bool,
    /// The committed object's resourceVersion: kubesim's; on a real cluster the answer's when
    /// the audit log keeps it (locks, and the operator's pod and Lease writes). Real
    /// resourceVersions are etcd revisions: one order over every object.
    pub committed_rv: Option<u64>,
}

impl Write {
    pub fn committed(&self) -> bool {
        (200..300).contains(&self.code)
    }
    /// Committed, or of unknown outcome: a real apiserver may commit a write it answers with
    /// a server error (504: the request's timeout ran out, the storage write did not stop).
    pub fn maybe_committed(&self) -> bool {
        !(400..500).contains(&self.code)
    }
    pub fn by_operator(&self) -> bool {
        self.actor.starts_with("stslock/")
    }
}

/// A started operator replica.
struct Replica {
    id: String,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
    /// Where its metrics server bound (`--metrics-addr` port 0), once asked for.
    bound: Mutex<Option<oneshot::Receiver<SocketAddr>>>,
    metrics: OnceCell<SocketAddr>,
}

pub struct Env {
    /// The namespace the test works in (kubesim: `default`).
    pub ns: String,
    /// Setup client: CRDs, fixtures, what the world does to pods. Never the operator's.
    pub admin: Client,
    pub opts: Options,
    started: Instant,
    inner: Inner,
    operators: Vec<Replica>,
    home: PathBuf,
}

enum Inner {
    Sim(Box<Sim>),
    Real(Box<Real>),
}

struct Real {
    cluster: &'static Cluster,
    watch: Arc<Mutex<Watched>>,
    /// One pod watch per namespace of the test.
    watch_tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    audit: Mutex<AuditTail>,
    namespaces: Mutex<Vec<String>>,
    started_at: jiff::Timestamp,
    /// Each lock's owner over time ([`Options::record_owners`]).
    owners: Option<Arc<Mutex<Owners>>>,
    /// Replica id → its proxy ([`Options::partitionable`]).
    proxies: Mutex<HashMap<String, Proxy>>,
    /// The ValidatingWebhookConfiguration of [`Env::fail_operator_writes`], while it exists.
    failing_writes: Mutex<Option<String>>,
    /// The replicas' fault proxy ([`Options::fault_proxy`]).
    fault_proxy: Option<kubesim::proxy::Proxy>,
    _turn: SemaphorePermit<'static>,
}

impl Drop for Real {
    fn drop(&mut self) {
        for t in self.watch_tasks.lock().unwrap().drain(..) {
            t.abort();
        }
        for (_, p) in self.proxies.lock().unwrap().drain() {
            p.task.abort();
        }
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.home);
    }
}

/// `STSLOCK_TEST_LOG=<filter>`: the operator's log (and the harness's) on stderr.
pub fn init_test_log() {
    if let Ok(filter) = std::env::var("STSLOCK_TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_writer(std::io::stderr)
            .try_init();
    }
}

impl Env {
    pub async fn start(replicas: usize) -> Env {
        Self::start_with(Options {
            replicas,
            ..Options::default()
        })
        .await
    }

    pub async fn start_with(opts: Options) -> Env {
        init_test_log();
        let started = Instant::now();
        let home = std::env::temp_dir().join(format!(
            "stslock-test-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&home).unwrap();
        let mut env = match backend() {
            Backend::Kubesim => {
                let mut cfg = SimConfig::default();
                cfg.controllers.pod_ready_delay = opts.pod_ready_delay;
                cfg.controllers.pod_terminate_delay = opts.pod_terminate_delay;
                if opts.record_owners {
                    cfg.store.recorded_labels.push(SHARD_LABEL.to_string());
                }
                (opts.sim)(&mut cfg);
                let mut sim = Sim::start(cfg);
                if opts.serve_http {
                    sim.serve("127.0.0.1:0".parse().unwrap()).await.unwrap();
                }
                let admin = sim.client_as("test");
                if opts.install_crd {
                    stslock::dev::install_crd(&admin).await.expect("crd");
                }
                Env {
                    ns: "default".into(),
                    admin,
                    opts,
                    started,
                    inner: Inner::Sim(Box::new(sim)),
                    operators: vec![],
                    home,
                }
            }
            Backend::Real => Self::start_real(opts, home).await,
        };
        env.start_operators().await;
        env
    }

    async fn start_real(opts: Options, home: PathBuf) -> Env {
        static TURN: Semaphore = Semaphore::const_new(1);
        let turn = TURN.acquire().await.unwrap();
        let cluster = cluster().await;
        // The time base of `elapsed_ms`, of the audit log's `Write::at_ms` and of the pod
        // recorder: one instant, taken once this test has the cluster (the wait for the turn
        // and for the control plane to start is not part of the test). Taken apart, writes were
        // dated up to a previous test's length too early.
        let (started, started_at) = (Instant::now(), jiff::Timestamp::now());
        let admin =
            controlplane::client_from_kubeconfig(&cluster.admin_kubeconfig, "stslock-test/admin")
                .await
                .unwrap();
        let ns = namespace_name();
        create_namespace(&admin, &ns, json!({})).await;
        if opts.install_crd {
            install_crd_and_wait(&admin).await;
        }
        let watch = Arc::new(Mutex::new(Watched::new()));
        let watch_task = tokio::spawn(record_pods(
            Api::namespaced(admin.clone(), &ns),
            watch.clone(),
            started,
        ));
        let mut watch_tasks = vec![watch_task];
        let owners = opts
            .record_owners
            .then(|| Arc::new(Mutex::new(Owners::default())));
        if let Some(owners) = &owners {
            watch_tasks.push(tokio::spawn(record_owners(
                Api::namespaced(admin.clone(), &ns),
                owners.clone(),
            )));
        }
        let watch_tasks = Mutex::new(watch_tasks);
        let fault_proxy = if opts.fault_proxy {
            let upstream = &cluster.operator.kubeconfig_path;
            Some(
                kubesim::proxy::Proxy::start("127.0.0.1:0".parse().unwrap(), upstream)
                    .await
                    .unwrap(),
            )
        } else {
            None
        };
        let audit = AuditTail::new(cluster.audit_log.clone(), ns.clone());
        let ns_for_list = ns.clone();
        let _ = writeln!(
            std::io::stderr(),
            "real backend: {} in namespace {ns} on {}",
            test_name(),
            cluster.what
        );
        Env {
            ns,
            admin,
            opts,
            started,
            inner: Inner::Real(Box::new(Real {
                cluster,
                watch,
                watch_tasks,
                audit: Mutex::new(audit),
                namespaces: Mutex::new(vec![ns_for_list]),
                started_at,
                owners,
                proxies: Mutex::new(HashMap::new()),
                failing_writes: Mutex::new(None),
                fault_proxy,
                _turn: turn,
            })),
            operators: vec![],
            home,
        }
    }

    /// Another namespace for this test, with `labels`: `name` itself on kubesim, a unique name
    /// from it on a real cluster (returned); the invariant recorder and the write log cover it.
    pub async fn add_namespace(&self, name: &str, labels: Value) -> String {
        match &self.inner {
            Inner::Sim(_) => {
                let namespace: Namespace =
                    serde_json::from_value(json!({"metadata": {"name": name, "labels": labels}}))
                        .unwrap();
                call(
                    "create namespace",
                    Api::<Namespace>::all(self.admin.clone())
                        .create(&PostParams::default(), &namespace),
                )
                .await
                .unwrap();
                name.to_string()
            }
            Inner::Real(real) => {
                let unique = format!("t-{name}-{:06x}", rand::random::<u32>() & 0xff_ffff);
                create_namespace(&self.admin, &unique, labels).await;
                real.audit.lock().unwrap().namespaces.push(unique.clone());
                let task = tokio::spawn(record_pods(
                    Api::namespaced(self.admin.clone(), &unique),
                    real.watch.clone(),
                    self.started,
                ));
                real.watch_tasks.lock().unwrap().push(task);
                if let Some(owners) = &real.owners {
                    let task = tokio::spawn(record_owners(
                        Api::namespaced(self.admin.clone(), &unique),
                        owners.clone(),
                    ));
                    real.watch_tasks.lock().unwrap().push(task);
                }
                real.namespaces.lock().unwrap().push(unique.clone());
                unique
            }
        }
    }

    /// Every namespace of this test.
    fn namespaces(&self) -> Vec<String> {
        match &self.inner {
            Inner::Sim(_) => vec![self.ns.clone()],
            Inner::Real(real) => real.namespaces.lock().unwrap().clone(),
        }
    }

    pub fn backend(&self) -> Backend {
        match self.inner {
            Inner::Sim(_) => Backend::Kubesim,
            Inner::Real(_) => Backend::Real,
        }
    }

    /// kubesim itself, for kubesim-only tests (None on the real backend).
    pub fn sim(&self) -> Option<&Sim> {
        match &self.inner {
            Inner::Sim(sim) => Some(sim),
            Inner::Real(_) => None,
        }
    }

    /// Milliseconds since the environment started (the time base of [`Write::at_ms`] on a
    /// real cluster and of the real backend's invariant report).
    pub fn elapsed_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    // --- the operator ------------------------------------------------------------------

    /// The arguments of replica `id`: the harness's defaults, the suite's [`Options`], and on a
    /// shared real cluster the scoping to this test's namespace (locks, membership Leases and
    /// the shard group), so tests cannot see each other's operators.
    pub fn operator_args(&self, id: &str) -> OperatorArgs {
        self.operator_args_with(id, |_| {})
    }

    /// [`Env::operator_args`] with `f` applied before the scoping (which applies only when `f`
    /// left both `namespaces` and `namespace_selector` unset).
    pub fn operator_args_with(&self, id: &str, f: impl FnOnce(&mut OperatorArgs)) -> OperatorArgs {
        let mut a = OperatorArgs::for_shard(id);
        a.api_timeout_seconds = 5;
        (self.opts.operator_args)(&mut a);
        f(&mut a);
        if self.backend() == Backend::Real {
            if a.namespaces.is_empty() && a.namespace_selector.is_none() {
                a.namespaces = vec![self.ns.clone()];
            }
            a.namespace = Some(self.ns.clone());
            a.shard_group = self.ns.clone();
        }
        a
    }

    /// A client for operator replica `id`, as that replica and nobody else (through its
    /// proxy on a real cluster when [`Options::partitionable`]).
    pub async fn operator_client(&self, id: &str) -> Client {
        self.client_as(id, &format!("stslock/{id}")).await
    }

    /// A client with the operator's credentials (on a real cluster its ServiceAccount, through
    /// the fault proxy or the partition proxy when the test has one, named `id` there) and
    /// user agent `agent`: the commit log attributes its writes to `agent`.
    pub async fn client_as(&self, id: &str, agent: &str) -> Client {
        let agent = agent.to_string();
        match &self.inner {
            Inner::Sim(sim) => sim.client_as(&agent),
            Inner::Real(real) if real.fault_proxy.is_some() => {
                let kubeconfig = self.fault_proxy_kubeconfig(real, id);
                controlplane::client_from_kubeconfig(&kubeconfig, &agent)
                    .await
                    .unwrap()
            }
            Inner::Real(real) if self.opts.partitionable => {
                let kubeconfig = self.proxied_kubeconfig(real, id).await;
                controlplane::client_from_kubeconfig(&kubeconfig, &agent)
                    .await
                    .unwrap()
            }
            Inner::Real(real) => OperatorIdentity {
                user_agent: agent,
                ..real.cluster.operator.clone()
            }
            .client()
            .await
            .unwrap(),
        }
    }

    pub async fn start_operators(&mut self) {
        for i in 0..self.opts.replicas {
            let id = (self.opts.shard_id)(i);
            self.start_operator_with(&id, self.operator_args(&id)).await;
        }
    }

    pub async fn start_operator_with(&mut self, id: &str, args: OperatorArgs) {
        let client = self.operator_client(id).await;
        let (stop, rx) = oneshot::channel::<()>();
        let (bound_tx, bound_rx) = oneshot::channel();
        let task = tokio::spawn(async move {
            let shutdown = async {
                let _ = rx.await;
            };
            let options = RunOptions {
                metrics_bound: Some(bound_tx),
            };
            stslock::replica::run_with(client, args, shutdown, options)
                .await
                .expect("operator");
        });
        self.operators.push(Replica {
            id: id.to_string(),
            stop,
            task,
            bound: Mutex::new(Some(bound_rx)),
            metrics: OnceCell::new(),
        });
    }

    pub async fn stop_operators(&mut self) {
        for r in self.operators.drain(..) {
            let _ = r.stop.send(());
            let _ = tokio::time::timeout(Duration::from_secs(15), r.task).await;
        }
    }

    fn take_operator(&mut self, id: &str) -> Replica {
        let i = self
            .operators
            .iter()
            .position(|r| r.id == id)
            .unwrap_or_else(|| panic!("no operator replica {id}"));
        self.operators.remove(i)
    }

    /// Stops replica `id` as SIGTERM would (it leaves per `--leave`), waiting up to 30 s.
    pub async fn stop_operator(&mut self, id: &str) {
        let r = self.take_operator(id);
        let _ = r.stop.send(());
        let _ = tokio::time::timeout(Duration::from_secs(30), r.task).await;
    }

    /// Kills replica `id` abruptly: no handoff, no leave, its membership Lease just stops
    /// being renewed (every task of the replica ends with it).
    pub async fn kill_operator(&mut self, id: &str) {
        let r = self.take_operator(id);
        r.task.abort();
        let _ = r.task.await;
    }

    /// Where replica `id` serves `/metrics`, `/healthz` and `/readyz`.
    pub async fn metrics_addr(&self, id: &str) -> SocketAddr {
        let r = self
            .operators
            .iter()
            .find(|r| r.id == id)
            .unwrap_or_else(|| panic!("no operator replica {id}"));
        *r.metrics
            .get_or_init(|| async {
                let bound = r.bound.lock().unwrap().take().expect("asked once");
                tokio::time::timeout(Duration::from_secs(10), bound)
                    .await
                    .expect("metrics address in time")
                    .expect("metrics address")
            })
            .await
    }

    // --- faults --------------------------------------------------------------------------

    /// Cuts replica `id` off from the API server as a black-holed network does, also before
    /// it starts: kubesim's partition by User-Agent (requests hang until healed, watches
    /// end); on a real cluster (with [`Options::partitionable`]) its proxy drops every open
    /// connection and holds new ones unanswered.
    pub async fn partition(&self, id: &str) {
        match &self.inner {
            Inner::Sim(sim) => {
                let agent = format!("stslock/{id}");
                sim.faults().update(|f| f.partitioned.push(agent));
            }
            // The replicas talk to the fault proxy: it partitions them as kubesim does.
            Inner::Real(real) if real.fault_proxy.is_some() => {
                let agent = format!("stslock/{id}");
                self.faults().update(|f| f.partitioned.push(agent));
            }
            Inner::Real(real) => {
                assert!(
                    self.opts.partitionable,
                    "partition on a real cluster needs Options::partitionable"
                );
                self.proxy(real, id).await.set_cut(true);
            }
        }
    }

    /// The API goes away for `down`, then comes back. On our real control plane
    /// `component` (`kube-apiserver` or `etcd`) is killed with SIGKILL and restarted with the
    /// same data once `down` has passed (the call returns when it serves again); on kubesim,
    /// which has no process to kill, every request fails with 503 and open watches end for
    /// `down`. Panics on a real cluster this harness did not start.
    pub async fn api_outage(&self, component: &'static str, down: Duration) -> Duration {
        match &self.inner {
            Inner::Sim(sim) => {
                let started = Instant::now();
                sim.faults().update(|f| f.down = true);
                tokio::time::sleep(down).await;
                sim.faults().update(|f| f.down = false);
                started.elapsed().saturating_sub(down)
            }
            Inner::Real(real) => {
                let crashes = real
                    .cluster
                    .crashes
                    .as_ref()
                    .expect("API outages need the control plane this harness starts");
                let (tx, rx) = oneshot::channel();
                crashes.send((component, down, tx)).unwrap();
                rx.await
                    .expect("the control plane's thread answers")
                    .unwrap_or_else(|e| panic!("restarting {component}: {e}"))
            }
        }
    }

    /// Ends [`Env::partition`] of `id`. On a real cluster the connections held during the
    /// partition are closed, not forwarded: nothing sent while cut off arrives late.
    pub async fn heal(&self, id: &str) {
        match &self.inner {
            Inner::Sim(sim) => {
                let agent = format!("stslock/{id}");
                sim.faults()
                    .update(|f| f.partitioned.retain(|p| *p != agent));
            }
            Inner::Real(real) if real.fault_proxy.is_some() => {
                let agent = format!("stslock/{id}");
                self.faults()
                    .update(|f| f.partitioned.retain(|p| *p != agent));
            }
            Inner::Real(real) => {
                self.proxy(real, id).await.set_cut(false);
            }
        }
    }

    /// Replica `id`'s proxy on a real cluster, started on first use.
    async fn proxy(&self, real: &Real, id: &str) -> ProxyHandle {
        if let Some(p) = real.proxies.lock().unwrap().get(id) {
            return p.handle();
        }
        let upstream = server_of(&real.cluster.operator.kubeconfig_path).1;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (cut, cut_rx) = watch::channel(false);
        let task = tokio::spawn(run_proxy(listener, upstream, cut_rx));
        let mut proxies = real.proxies.lock().unwrap();
        let p = proxies.entry(id.to_string()).or_insert(Proxy {
            addr,
            cut: Arc::new(cut),
            task,
        });
        p.handle()
    }

    /// The operator's kubeconfig with the fault proxy (plain HTTP on loopback) as its server;
    /// the ServiceAccount token goes through it to the API server.
    fn fault_proxy_kubeconfig(&self, real: &Real, id: &str) -> PathBuf {
        let proxy = real.fault_proxy.as_ref().expect("a fault proxy");
        let k = proxy
            .kubeconfig(&real.cluster.operator.kubeconfig_path)
            .unwrap();
        let path = self.home.join(format!("operator-{id}-faults.kubeconfig"));
        std::fs::write(&path, serde_json::to_vec_pretty(&k).unwrap()).unwrap();
        path
    }

    /// The fault layer between the operator's replicas and the API server: kubesim's own, or
    /// on a real cluster the kubesim proxy in front of it ([`Options::fault_proxy`]). Faults
    /// select clients by User-Agent (`stslock/<id>` for replica `id`).
    pub fn faults(&self) -> &kubesim::Faults {
        match &self.inner {
            Inner::Sim(sim) => sim.faults(),
            Inner::Real(real) => real
                .fault_proxy
                .as_ref()
                .expect("faults on a real cluster need Options::fault_proxy")
                .faults(),
        }
    }

    /// A compaction of the watch history, then every watch dropped, so that each resumes from
    /// its last version and gets 410 Gone: kubesim compacts its own history; on a real cluster
    /// the fault proxy answers resumes from before the newest version it had passed on
    /// ([`kubesim::proxy::Proxy::compact`]). Returns the version compacted at.
    pub fn compact(&self) -> u64 {
        let at = match &self.inner {
            Inner::Sim(sim) => sim.compact(),
            Inner::Real(real) => real
                .fault_proxy
                .as_ref()
                .expect("compactions on a real cluster need Options::fault_proxy")
                .compact(),
        };
        self.faults().drop_watches();
        at
    }

    /// The operator's kubeconfig with replica `id`'s proxy as its server.
    async fn proxied_kubeconfig(&self, real: &Real, id: &str) -> PathBuf {
        let proxy = self.proxy(real, id).await;
        let source = &real.cluster.operator.kubeconfig_path;
        let (host, _) = server_of(source);
        let mut k = kube::config::Kubeconfig::read_from(source).unwrap();
        for c in &mut k.clusters {
            if let Some(cluster) = c.cluster.as_mut() {
                cluster.server = Some(format!("https://{}", proxy.addr));
                // The serving certificate names the server's host, not the proxy's address.
                if host.parse::<std::net::IpAddr>().is_err() {
                    cluster.tls_server_name = Some(host.clone());
                }
            }
        }
        let path = self.home.join(format!("operator-{id}.kubeconfig"));
        std::fs::write(&path, serde_json::to_vec_pretty(&k).unwrap()).unwrap();
        path
    }

    /// Every write of the operator's replicas is answered with a server error (500) until
    /// [`Env::heal_operator_writes`]: kubesim's error fault for User-Agents `stslock/`; on a
    /// real cluster a validating webhook that cannot be reached (failurePolicy Fail) for the
    /// operator's ServiceAccount in the test's namespaces, which kube-apiserver answers with
    /// 500 InternalError "failed calling webhook". The API server loads webhook
    /// configurations from a watch: wait for the failures, not for this call.
    pub async fn fail_operator_writes(&self) {
        match &self.inner {
            Inner::Sim(sim) => sim.faults().update(|f| {
                f.error_rate = 1.0;
                f.error_code = 500;
                f.writes_only = true;
                f.agents = vec!["stslock/".into()];
            }),
            Inner::Real(real) => {
                // A port that was just free: connections to it are refused.
                let closed = std::net::TcpListener::bind("127.0.0.1:0")
                    .unwrap()
                    .local_addr()
                    .unwrap();
                let name = format!("{}-fail-operator-writes", self.ns);
                let config: ValidatingWebhookConfiguration = serde_json::from_value(json!({
                    "metadata": {"name": name, "labels": {"stslock.test/harness": "true"}},
                    "webhooks": [{
                        "name": "fail.stslock.test",
                        "clientConfig": {"url": format!("https://{closed}/fail")},
                        "rules": [{
                            "apiGroups": ["*"], "apiVersions": ["*"],
                            "operations": ["CREATE", "UPDATE", "DELETE"],
                            "resources": ["*/*"], "scope": "Namespaced",
                        }],
                        "namespaceSelector": {"matchExpressions": [{
                            "key": "kubernetes.io/metadata.name", "operator": "In",
                            "values": self.namespaces(),
                        }]},
                        "matchConditions": [{
                            "name": "operator",
                            "expression": format!("request.userInfo.username == '{}'", real.cluster.operator.username),
                        }],
                        "failurePolicy": "Fail",
                        "sideEffects": "None",
                        "admissionReviewVersions": ["v1"],
                        "timeoutSeconds": 1,
                    }],
                }))
                .unwrap();
                call(
                    "create webhook configuration",
                    Api::<ValidatingWebhookConfiguration>::all(self.admin.clone())
                        .create(&PostParams::default(), &config),
                )
                .await
                .unwrap();
                *real.failing_writes.lock().unwrap() = Some(name);
            }
        }
    }

    /// Ends [`Env::fail_operator_writes`].
    pub async fn heal_operator_writes(&self) {
        match &self.inner {
            Inner::Sim(sim) => sim.faults().update(|f| {
                let none = kubesim::FaultConfig::default();
                f.error_rate = none.error_rate;
                f.error_code = none.error_code;
                f.writes_only = none.writes_only;
                f.agents = none.agents;
            }),
            Inner::Real(real) => {
                let name = real.failing_writes.lock().unwrap().take();
                if let Some(name) = name {
                    call(
                        "delete webhook configuration",
                        Api::<ValidatingWebhookConfiguration>::all(self.admin.clone())
                            .delete(&name, &DeleteParams::default()),
                    )
                    .await
                    .unwrap();
                }
            }
        }
    }

    pub fn operator_ids(&self) -> Vec<String> {
        self.operators.iter().map(|r| r.id.clone()).collect()
    }

    // --- fixtures ------------------------------------------------------------------------

    pub fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as kube::Resource>::DynamicType: Default,
    {
        Api::namespaced(self.admin.clone(), &self.ns)
    }

    pub fn pods(&self) -> Api<Pod> {
        self.api()
    }

    pub fn locks(&self) -> Api<StatefulSetLock> {
        self.api()
    }

    pub fn leases(&self) -> Api<Lease> {
        self.api()
    }

    pub async fn statefulset(&self, name: &str, replicas: i32) {
        let sts: StatefulSet = serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {"serviceName": name, "replicas": replicas, "selector": {"matchLabels": {"app": name}},
                     "template": {"metadata": {"labels": {"app": name}}, "spec": {"containers": [{"name": "c", "image": "postgres:15"}]}}}
        }))
        .unwrap();
        call(
            "create statefulset",
            self.api::<StatefulSet>()
                .create(&PostParams::default(), &sts),
        )
        .await
        .expect("create sts");
    }

    pub async fn lock(&self, name: &str, sts: &str, lease: &str, duration: i32, extra: Value) {
        let mut spec =
            json!({"statefulSetName": sts, "leaseName": lease, "leaseDurationSeconds": duration});
        if let Value::Object(m) = extra {
            for (k, v) in m {
                spec[k] = v;
            }
        }
        let l: StatefulSetLock = serde_json::from_value(json!({"apiVersion": "app.anukkrit.me/v1", "kind": "StatefulSetLock", "metadata": {"name": name}, "spec": spec})).unwrap();
        call(
            "create lock",
            self.locks().create(&PostParams::default(), &l),
        )
        .await
        .expect("create lock");
    }

    /// The seed's samples (`deploy/samples/`) applied into the test namespace, as
    /// `stslock::dev::apply_samples` applies them into `default`.
    pub async fn apply_samples(&self) -> Vec<String> {
        let mut all = vec![];
        for (file, yaml) in stslock::dev::SAMPLES {
            let applied = tokio::time::timeout(
                CALL,
                stslock::dev::apply_yaml(&self.admin, &self.ns, file, yaml),
            )
            .await
            .expect("applying samples in time")
            .expect("samples");
            all.extend(applied);
        }
        all
    }

    // --- what the world does -------------------------------------------------------------

    /// Flips a pod's readiness as its kubelet would report it (Ready and ContainersReady,
    /// container statuses): kubesim's fault API, or `pods/status` as admin on a real cluster
    /// (the stand-in never touches a readiness it did not set first).
    pub async fn set_ready(&self, pod: &str, ready: bool) {
        match &self.inner {
            Inner::Sim(sim) => {
                sim.pods().set_ready(&self.ns, pod, ready).unwrap();
            }
            Inner::Real(_) => {
                let pods = self.pods();
                for _ in 0..10 {
                    let cur = call("get pod", pods.get(pod)).await.unwrap();
                    let patch = readiness_patch(&cur, ready);
                    match call(
                        "patch pod status",
                        pods.patch_status(pod, &PatchParams::default(), &Patch::Merge(&patch)),
                    )
                    .await
                    {
                        Ok(_) => return,
                        Err(e) if status_code(&e) == Some(409) => continue,
                        Err(e) => panic!("set_ready {pod} {ready}: {e}"),
                    }
                }
                panic!("set_ready {pod}: conflicts on every attempt");
            }
        }
    }

    /// The actor ([`Write::actor`]) of [`Env::set_ready`]'s writes.
    pub fn readiness_actor(&self) -> &'static str {
        match self.inner {
            Inner::Sim(_) => "kubesim/kubelet",
            Inner::Real(_) => "stslock-test/admin",
        }
    }

    /// Deletes a pod; it stays terminating for [`Options::pod_terminate_delay`] (kubesim's
    /// kubelet; on a real cluster a finalizer of the harness, as the stand-in finalizes at
    /// once).
    pub async fn delete_pod(&self, pod: &str) {
        let pods = self.pods();
        if self.backend() == Backend::Real && !self.opts.pod_terminate_delay.is_zero() {
            let cur = call("get pod", pods.get(pod)).await.unwrap();
            let mut finalizers = cur.finalizers().to_vec();
            finalizers.push(TERMINATE_FINALIZER.to_string());
            let patch = json!({"metadata": {"finalizers": finalizers, "resourceVersion": cur.resource_version()}});
            call(
                "add finalizer",
                pods.patch(pod, &PatchParams::default(), &Patch::Merge(&patch)),
            )
            .await
            .unwrap();
            let (pods2, name, delay) =
                (pods.clone(), pod.to_string(), self.opts.pod_terminate_delay);
            let uid = cur.uid();
            tokio::spawn(async move {
                // Simulated time a kubelet takes to stop the containers, not a wait for a state.
                tokio::time::sleep(delay).await;
                release_finalizer(&pods2, &name, uid.as_deref()).await;
            });
        }
        call("delete pod", pods.delete(pod, &DeleteParams::default()))
            .await
            .unwrap();
    }

    // --- observing -----------------------------------------------------------------------

    /// Polls until `f` holds, failing after `secs`.
    pub async fn until<T>(
        &self,
        secs: u64,
        what: &str,
        f: impl FnMut() -> BoxFuture<'static, Option<T>>,
    ) -> T {
        poll(secs, what, f).await
    }

    /// Pod name → role label, for pods of `app`.
    pub async fn roles(&self, app: &str) -> Vec<(String, Option<String>)> {
        let l = call(
            "list pods",
            self.pods()
                .list(&ListParams::default().labels(&format!("app={app}"))),
        )
        .await
        .unwrap();
        let mut v: Vec<_> = l
            .items
            .iter()
            .map(|p| (p.name_any(), p.labels().get(ROLE_LABEL).cloned()))
            .collect();
        v.sort();
        v
    }

    /// Until `writer` is the writer of `app` and every other pod a reader, with as many pods
    /// as the StatefulSet `app` asks for (when there is one): under the default OrderedReady
    /// policy a real StatefulSet controller creates the next pod only once every earlier one
    /// is Ready, so a test that turns the writer NotReady before its successor exists waits
    /// for a pod that is never created. The election gets 15 s from when every pod exists
    /// (creating them one after another gets up to 30 s more); a timeout shows the pods.
    pub async fn wait_writer(&self, app: &str, writer: &str) {
        let (pods, sets) = (self.pods(), self.api::<StatefulSet>());
        let started = tokio::time::Instant::now();
        let mut all_there: Option<tokio::time::Instant> = None;
        loop {
            // The StatefulSet whose selector is app=APP: the tests name it APP (one read);
            // the seed's samples do not (a list of the namespace's sets, which at fleet size
            // is thousands of objects, so only then).
            let selects = |s: &StatefulSet| {
                s.spec
                    .selector
                    .match_labels
                    .as_ref()
                    .and_then(|m| m.get("app"))
                    .is_some_and(|a| a == app)
            };
            let replicas = |s: &StatefulSet| s.spec.replicas.map(|n| n as usize);
            let (want, mut seen) = match call("get statefulset", sets.get_opt(app)).await {
                Ok(Some(s)) if selects(&s) => (replicas(&s), String::new()),
                Ok(_) => match call("list statefulsets", sets.list(&ListParams::default())).await {
                    Ok(l) => (
                        l.items.iter().find(|s| selects(s)).and_then(replicas),
                        String::new(),
                    ),
                    Err(e) => (None, format!("list statefulsets: {e}; ")),
                },
                Err(e) => (None, format!("get statefulset: {e}; ")),
            };
            match call(
                "list pods",
                pods.list(&ListParams::default().labels(&format!("app={app}"))),
            )
            .await
            {
                Ok(l) => {
                    let complete = !l.items.is_empty() && want.is_none_or(|n| l.items.len() == n);
                    let elected = l.items.iter().all(|p| {
                        let role = p.labels().get(ROLE_LABEL).map(String::as_str);
                        role == Some(if p.name_any() == writer {
                            "writer"
                        } else {
                            "reader"
                        })
                    });
                    if complete && elected {
                        return;
                    }
                    if complete && all_there.is_none() {
                        all_there = Some(tokio::time::Instant::now());
                    }
                    seen += &format!(
                        "{} of {want:?} pods: {}",
                        l.items.len(),
                        describe_pods(&l.items)
                    );
                }
                Err(e) => seen += &format!("list pods: {e}"),
            }
            let waited = started.elapsed();
            let electing = all_there.map(|t| t.elapsed());
            assert!(
                electing.is_none_or(|e| e < Duration::from_secs(15))
                    && waited < Duration::from_secs(45),
                "timed out after {waited:?} ({electing:?} with every pod there) waiting for {writer} sole writer of {app}; last seen: {seen}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Until Lease `lease` is held by `pod` and `pod` carries the writer label.
    pub async fn wait_lease_holder(&self, lease: &str, pod: &str) {
        let (leases, pods) = (self.leases(), self.pods());
        let (lease, pod) = (lease.to_string(), pod.to_string());
        self.until(15, &format!("{pod} holding {lease}"), move || {
            let (leases, pods) = (leases.clone(), pods.clone());
            let (lease, pod) = (lease.clone(), pod.clone());
            Box::pin(async move {
                let labelled = call("get pod", pods.get_opt(&pod))
                    .await
                    .ok()
                    .flatten()
                    .is_some_and(|p| {
                        p.labels().get(ROLE_LABEL).map(String::as_str) == Some("writer")
                    });
                let holder = call("get lease", leases.get_opt(&lease))
                    .await
                    .ok()??
                    .spec?
                    .holder_identity;
                (labelled && holder.as_deref() == Some(pod.as_str())).then_some(())
            })
        })
        .await;
    }

    pub async fn lock_status(&self, name: &str) -> StatefulSetLockStatus {
        call("get lock", self.locks().get(name))
            .await
            .unwrap()
            .status
            .unwrap_or_default()
    }

    pub async fn wait_condition(&self, lock: &str, type_: &str, status: &str, reason: &str) {
        let locks = self.locks();
        let (lock, type_, status, reason) = (
            lock.to_string(),
            type_.to_string(),
            status.to_string(),
            reason.to_string(),
        );
        self.until(
            15,
            &format!("{lock} {type_}={status} {reason}"),
            move || {
                let locks = locks.clone();
                let (lock, type_, status, reason) =
                    (lock.clone(), type_.clone(), status.clone(), reason.clone());
                Box::pin(async move {
                    let l = call("get lock", locks.get(&lock)).await.ok()?;
                    l.status?
                        .conditions
                        .iter()
                        .any(|c| c.type_ == type_ && c.status == status && c.reason == reason)
                        .then_some(())
                })
            },
        )
        .await;
    }

    /// (reason, message) of the Events about `lock` (core/v1 view; the operator writes
    /// events.k8s.io/v1).
    pub async fn events(&self, lock: &str) -> Vec<(String, String)> {
        let l = call(
            "list events",
            self.api::<Event>()
                .list(&ListParams::default().fields(&format!("involvedObject.name={lock}"))),
        )
        .await
        .unwrap();
        l.items
            .iter()
            .map(|e| {
                (
                    e.reason.clone().unwrap_or_default(),
                    e.message.clone().unwrap_or_default(),
                )
            })
            .collect()
    }

    /// Until an Event about `lock` matches `pred(reason, message)`; returns all of them.
    /// (The operator writes an Event after the change it reports, so a test that has seen the
    /// change may still be ahead of the Event.)
    pub async fn wait_event(
        &self,
        lock: &str,
        what: &str,
        pred: impl Fn(&str, &str) -> bool,
    ) -> Vec<(String, String)> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            let evs = self.events(lock).await;
            if evs.iter().any(|(r, m)| pred(r, m)) {
                return evs;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for the Event {what} about {lock}; Events: {evs:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Until `app` has exactly `n` pods and each carries a role (under OrderedReady the
    /// StatefulSet controller creates them one after another, and a real one takes its time).
    pub async fn wait_roles(&self, app: &str, n: usize) {
        let (pods, locks) = (self.pods(), self.locks());
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let seen = match call(
                "list pods",
                pods.list(&ListParams::default().labels(&format!("app={app}"))),
            )
            .await
            {
                Ok(l) => {
                    if l.items.len() == n
                        && l.items.iter().all(|p| p.labels().contains_key(ROLE_LABEL))
                    {
                        return;
                    }
                    describe_pods(&l.items)
                }
                Err(e) => format!("list pods: {e}"),
            };
            if tokio::time::Instant::now() >= deadline {
                // What the operator said about the StatefulSet's locks, for the failure.
                let said: Vec<String> = call("list locks", locks.list(&ListParams::default()))
                    .await
                    .map(|l| l.items)
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|l| l.spec.stateful_set_name == app)
                    .map(|l| {
                        let (name, owner) = (l.name_any(), l.labels().get(SHARD_LABEL).cloned());
                        let conditions: Vec<_> = l
                            .status
                            .map(|s| s.conditions)
                            .unwrap_or_default()
                            .into_iter()
                            .map(|c| {
                                format!("{}={} {}: {}", c.type_, c.status, c.reason, c.message)
                            })
                            .collect();
                        format!("{name} (owner {owner:?}): {conditions:?}")
                    })
                    .collect();
                panic!(
                    "timed out after 30s waiting for {n} pods of {app} with a role; pods: {seen}; locks: {said:?}"
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Until every lock sits where the ring of the running replicas puts it, its status names
    /// that owner, and nothing changes for 300 ms: the replicas start one by one, so locks
    /// elected by the first ones move once the group has formed, and each move writes the new
    /// owner's `status.shard`. A window measured after this sees no ownership moves.
    pub async fn wait_ring_settled(&self, secs: u64) {
        let mut ids: Vec<String> = self.operators.iter().map(|r| r.id.clone()).collect();
        ids.sort();
        let ring = stslock_shard::Ring::new(&ids);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        // name → (owner label, status.shard)
        type Placed = BTreeMap<String, (Option<String>, Option<String>)>;
        let mut last: Option<Placed> = None;
        loop {
            let now: Placed = call("list locks", self.locks().list(&ListParams::default()))
                .await
                .expect("list locks")
                .items
                .iter()
                .map(|l| {
                    let shard = l.status.as_ref().and_then(|s| s.shard.clone());
                    (l.name_any(), (l.labels().get(SHARD_LABEL).cloned(), shard))
                })
                .collect();
            let misplaced: Vec<&String> = now
                .iter()
                .filter(|(name, (owner, shard))| {
                    let want = ring.owner(&format!("{}/{name}", self.ns));
                    owner.as_deref() != want || shard != owner
                })
                .map(|(name, _)| name)
                .collect();
            if misplaced.is_empty() && last.as_ref() == Some(&now) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "after {secs}s, locks not settled on the ring of {ids:?} (owner label, status.shard): {:?}",
                misplaced.iter().map(|n| (n, &now[*n])).collect::<Vec<_>>()
            );
            last = misplaced.is_empty().then_some(now);
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    /// The invariant report (two writers at once, no Ready writer): kubesim's history, or on a
    /// real cluster the harness's own pod watch, once it has seen every pod as it is now.
    pub async fn report(&self) -> Report {
        match &self.inner {
            Inner::Sim(sim) => sim.report(),
            Inner::Real(real) => {
                let apis: Vec<Api<Pod>> = self
                    .namespaces()
                    .iter()
                    .map(|ns| Api::namespaced(self.admin.clone(), ns))
                    .collect();
                let watch = real.watch.clone();
                self.until(
                    15,
                    "the pod watch to catch up with a fresh list",
                    move || {
                        let (apis, watch) = (apis.clone(), watch.clone());
                        Box::pin(async move {
                            let mut want: HashMap<String, u64> = HashMap::new();
                            for pods in &apis {
                                let listed = call("list pods", pods.list(&ListParams::default()))
                                    .await
                                    .ok()?;
                                want.extend(listed.items.iter().map(|p| (pod_key(p), rv(p))));
                            }
                            let w = watch.lock().unwrap();
                            let caught_up = want.len() == w.pods.len()
                                && want.iter().all(|(name, rv)| {
                                    w.pods.get(name).is_some_and(|(seen, _)| seen >= rv)
                                });
                            caught_up.then_some(())
                        })
                    },
                )
                .await;
                let w = real.watch.lock().unwrap();
                if w.relists > 0 {
                    let _ = writeln!(
                        std::io::stderr(),
                        "note: the pod watch of {} re-listed {} time(s); states between may be missing",
                        self.ns,
                        w.relists
                    );
                }
                w.recorder.report(self.elapsed_ms())
            }
        }
    }

    pub async fn assert_never_two_writers(&self) {
        let r = self.report().await;
        assert_eq!(
            r.dual_writer_intervals, 0,
            "two writers at once: {:?}",
            r.statefulsets
        );
    }

    /// Whether [`Env::writes`] has a source (always on kubesim and on our control plane; on
    /// another cluster only with `STSLOCK_TEST_AUDIT_LOG`).
    pub fn has_write_log(&self) -> bool {
        match &self.inner {
            Inner::Sim(_) => true,
            Inner::Real(real) => real.cluster.audit_log.is_some(),
        }
    }

    /// Every write in the test namespace since the environment started, in [`Write::seq`]
    /// order, failed ones included on a real cluster.
    pub fn writes(&self) -> Vec<Write> {
        match &self.inner {
            Inner::Sim(sim) => sim
                .commit_log()
                .into_iter()
                .map(|c| Write {
                    seq: c.rv,
                    at_ms: c.at_ms,
                    received_us: c.at_ms as i64 * 1000,
                    completed_us: c.at_ms as i64 * 1000,
                    actor: c.actor,
                    user: None,
                    verb: c.verb.to_string(),
                    group: c.group,
                    resource: c.resource,
                    subresource: String::new(),
                    namespace: c.namespace,
                    name: c.name,
                    code: 200,
                    labels: c.labels,
                    labels_known: true,
                    sets_owner: false,
                    committed_rv: Some(c.rv),
                })
                .collect(),
            Inner::Real(real) => {
                let mut tail = real.audit.lock().unwrap();
                tail.read(real.started_at);
                tail.writes.clone()
            }
        }
    }

    /// The committed writes ([`Env::writes`] with a 2xx answer).
    pub fn commit_log(&self) -> Vec<Write> {
        self.writes().into_iter().filter(Write::committed).collect()
    }

    /// Polls the committed writes until `f` finds what it needs (a real apiserver writes an
    /// audit event just after answering).
    pub async fn commits_until<T>(
        &self,
        secs: u64,
        what: &str,
        mut f: impl FnMut(&[Write]) -> Option<T>,
    ) -> T {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        loop {
            let log = self.commit_log();
            if let Some(v) = f(&log) {
                return v;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out after {secs}s waiting in the write log for: {what}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Whether every committed operator write for a lock (the lock's status and finalizers,
    /// its Lease, its pods' labels: `lock_of` names the lock of a write to anything but the
    /// lock itself) came from the replica that owned the lock when it was committed. Call it
    /// once the operators are stopped. Needs [`Options::record_owners`].
    ///
    /// kubesim: exact, from the commit log, which records the owner label with every write
    /// to a lock; a write that changes the label (a claim, a handoff) is not checked.
    ///
    /// Real cluster: the audit log says who wrote what, with when the request arrived and
    /// when it was answered (the commit is in between); the harness's lock watch delivers
    /// every version of each lock, so it says each lock's owner after each change and when
    /// it saw the change (after its commit). The n-th version of a lock was committed after
    /// the n-th arrival of a committed write to it. A write counts as the owner's when the
    /// owner may have held the lock at some instant of the write; as a violation when no
    /// instant of it can fall in the writer's tenure (every violation reported is proven);
    /// as ambiguous when the owner may have changed during the write. A write to the lock
    /// that may be the ownership change itself is not checked. A re-list of the lock watch may
    /// have jumped over versions (and owners): a write in such a gap is ambiguous too.
    pub async fn owner_check(&self, lock_of: impl Fn(&Write) -> Option<String>) -> OwnerCheck {
        assert!(
            self.opts.record_owners,
            "owner_check needs Options::record_owners"
        );
        let lock_of = |w: &Write| -> Option<String> {
            if w.resource == "statefulsetlocks" {
                Some(w.name.clone())
            } else {
                lock_of(w)
            }
        };
        match &self.inner {
            Inner::Sim(_) => exact_owner_check(&self.writes(), lock_of),
            Inner::Real(real) => {
                let owners = real.owners.clone().expect("lock watch");
                let apis: Vec<Api<StatefulSetLock>> = self
                    .namespaces()
                    .iter()
                    .map(|ns| Api::namespaced(self.admin.clone(), ns))
                    .collect();
                let watched = owners.clone();
                self.until(
                    15,
                    "the lock watch to catch up with a fresh list",
                    move || {
                        let (apis, watched) = (apis.clone(), watched.clone());
                        Box::pin(async move {
                            let mut want = vec![];
                            for locks in &apis {
                                let listed = call("list locks", locks.list(&ListParams::default()))
                                    .await
                                    .ok()?;
                                want.extend(listed.items.iter().map(|l| {
                                    let rv = l
                                        .resource_version()
                                        .and_then(|v| v.parse::<u64>().ok())
                                        .unwrap_or(0);
                                    ((l.namespace().unwrap_or_default(), l.name_any()), rv)
                                }));
                            }
                            let o = watched.lock().unwrap();
                            want.iter()
                                .all(|(key, rv)| o.seen.get(key).is_some_and(|seen| seen >= rv))
                                .then_some(())
                        })
                    },
                )
                .await;
                let writes = self.writes();
                let o = owners.lock().unwrap();
                if o.relists > 0 {
                    let _ = writeln!(
                        std::io::stderr(),
                        "note: the lock watch of {} re-listed {} time(s); writes where it may have missed owners count as ambiguous",
                        self.ns,
                        o.relists
                    );
                }
                timed_owner_check(&writes, &o, lock_of)
            }
        }
    }

    // --- kubectl ---------------------------------------------------------------------------

    /// `kubectl` against this environment, its current namespace the test's: kubectl 1.32
    /// (`$KUBECTL`) against kubesim (needs [`Options::serve_http`]), `kubectl.1.33` against
    /// the real apiserver (1.34 supports one minor older).
    pub fn kubectl(&self) -> Kubectl {
        let kubeconfig = self.home.join("kubeconfig");
        let bin = match &self.inner {
            Inner::Sim(sim) => {
                sim.write_kubeconfig(&kubeconfig).unwrap();
                PathBuf::from(std::env::var("KUBECTL").unwrap_or_else(|_| "kubectl".into()))
            }
            Inner::Real(real) => {
                let mut k =
                    kube::config::Kubeconfig::read_from(&real.cluster.admin_kubeconfig).unwrap();
                let current = k.current_context.clone().unwrap();
                for c in &mut k.contexts {
                    if c.name == current
                        && let Some(ctx) = c.context.as_mut()
                    {
                        ctx.namespace = Some(self.ns.clone());
                    }
                }
                std::fs::write(&kubeconfig, serde_json::to_vec_pretty(&k).unwrap()).unwrap();
                real.cluster.kubectl.clone()
            }
        };
        Kubectl {
            bin,
            kubeconfig,
            home: self.home.clone(),
            plugins: None,
        }
    }
}

fn pod_key(p: &Pod) -> String {
    format!("{}/{}", p.namespace().unwrap_or_default(), p.name_any())
}

async fn create_namespace(admin: &Client, ns: &str, labels: Value) {
    let mut labels = labels;
    labels["stslock.test/harness"] = json!("true");
    let namespace: Namespace =
        serde_json::from_value(json!({"metadata": {"name": ns, "labels": labels}})).unwrap();
    call(
        "create namespace",
        Api::<Namespace>::all(admin.clone()).create(&PostParams::default(), &namespace),
    )
    .await
    .unwrap();
    // Pods are admitted only once the namespace's `default` ServiceAccount exists. Its
    // creator, kube-controller-manager, can take longer than 30 s right after a test that
    // killed kube-apiserver and etcd (seen once, in the test after the crash tests).
    let accounts: Api<ServiceAccount> = Api::namespaced(admin.clone(), ns);
    poll(90, "ServiceAccount default in a test namespace", || {
        let accounts = accounts.clone();
        Box::pin(async move {
            call("get serviceaccount", accounts.get_opt("default"))
                .await
                .ok()
                .flatten()
        })
    })
    .await;
}

fn is_writer(p: &Pod) -> bool {
    p.labels().get(ROLE_LABEL).map(String::as_str) == Some("writer")
}

fn rv(p: &Pod) -> u64 {
    p.resource_version()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// StatefulSet `db` (`replicas` pods labelled `app=db`, an image nothing pulls) and
/// StatefulSetLock `lock` for it (Lease `db-lease`, 30 s), created in `ns` as `client`: the
/// smallest story, for suites that drive a control plane without an [`Env`].
pub async fn db_and_lock(client: &kube::Client, ns: &str, replicas: i32) {
    let sets: Api<StatefulSet> = Api::namespaced(client.clone(), ns);
    call(
    "create StatefulSet db",
    sets.create(
        &PostParams::default(),
        &serde_json::from_value(json!({
            "metadata": {"name": "db"},
            "spec": {"replicas": replicas, "serviceName": "db", "selector": {"matchLabels": {"app": "db"}},
                "template": {"metadata": {"labels": {"app": "db"}},
                    "spec": {"containers": [{"name": "db", "image": "registry.invalid/db:1"}]}}}
        }))
        .expect("StatefulSet"),
    ),
)
.await
.expect("create StatefulSet db");
    let locks: Api<StatefulSetLock> = Api::namespaced(client.clone(), ns);
    call(
    "create lock",
    locks.create(
        &PostParams::default(),
        &serde_json::from_value(json!({
            "apiVersion": "app.anukkrit.me/v1", "kind": "StatefulSetLock",
            "metadata": {"name": "lock"},
            "spec": {"statefulSetName": "db", "leaseName": "db-lease", "leaseDurationSeconds": 30}
        }))
        .expect("lock"),
    ),
)
.await
.expect("create lock");
}

/// Is the pod Ready (its `Ready` condition `True`)?
pub fn pod_ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The shard label of every lock `locks` lists (None when unlabelled), by lock name.
/// Each pod's name, role label and Ready condition, for failure messages.
pub fn describe_pods(pods: &[Pod]) -> String {
    let v: Vec<_> = pods
        .iter()
        .map(|p| {
            let ready = p
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
                .map(|c| c.status.clone());
            (p.name_any(), p.labels().get(ROLE_LABEL).cloned(), ready)
        })
        .collect();
    format!("{v:?}")
}

pub async fn lock_owners(locks: &Api<StatefulSetLock>) -> BTreeMap<String, Option<String>> {
    call("list locks", locks.list(&ListParams::default()))
        .await
        .expect("list locks")
        .items
        .iter()
        .map(|l| (l.name_any(), l.labels().get(SHARD_LABEL).cloned()))
        .collect()
}

/// Polls until `f` holds, failing after `secs`.
pub async fn poll<T>(
    secs: u64,
    what: &str,
    mut f: impl FnMut() -> BoxFuture<'static, Option<T>>,
) -> T {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {secs}s waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A merge patch of `pods/status` that sets readiness as kubesim's kubelet does.
fn readiness_patch(pod: &Pod, ready: bool) -> Value {
    let now = jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string();
    let value = serde_json::to_value(pod).unwrap();
    let mut conds: Vec<Value> = value
        .pointer("/status/conditions")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let was_ready = conds
        .iter()
        .any(|c| c["type"] == "Ready" && c["status"] == "True");
    let status = if ready { "True" } else { "False" };
    for t in ["Ready", "ContainersReady"] {
        match conds.iter_mut().find(|c| c["type"] == t) {
            Some(c) => {
                c["status"] = json!(status);
                if was_ready != ready {
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
            None => conds.push(json!({"type": t, "status": status, "lastTransitionTime": now})),
        }
    }
    let mut patch = json!({
        "metadata": {"resourceVersion": pod.resource_version()},
        "status": {"conditions": conds},
    });
    if let Some(cs) = value
        .pointer("/status/containerStatuses")
        .and_then(Value::as_array)
    {
        let cs: Vec<Value> = cs
            .iter()
            .map(|c| {
                let mut c = c.clone();
                c["ready"] = json!(ready);
                c
            })
            .collect();
        patch["status"]["containerStatuses"] = json!(cs);
    }
    patch
}

async fn release_finalizer(pods: &Api<Pod>, name: &str, uid: Option<&str>) {
    for _ in 0..20 {
        let Ok(Some(cur)) = call("get pod", pods.get_opt(name)).await else {
            return;
        };
        if cur.uid().as_deref() != uid {
            return;
        }
        let finalizers: Vec<String> = cur
            .finalizers()
            .iter()
            .filter(|f| *f != TERMINATE_FINALIZER)
            .cloned()
            .collect();
        let patch = json!({"metadata": {"finalizers": finalizers, "resourceVersion": cur.resource_version()}});
        match call(
            "remove finalizer",
            pods.patch(name, &PatchParams::default(), &Patch::Merge(&patch)),
        )
        .await
        {
            Ok(_) => return,
            Err(e) if status_code(&e) == Some(404) => return,
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// A unique, readable namespace name from the test's name.
fn namespace_name() -> String {
    let name = test_name();
    let mut s: String = name
        .rsplit("::")
        .take(2)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect::<Vec<_>>()
        .join("-")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    s.truncate(48);
    let s = s.trim_matches('-').to_string();
    format!("t-{s}-{:06x}", rand::random::<u32>() & 0xff_ffff)
}

async fn install_crd_and_wait(admin: &Client) {
    tokio::time::timeout(CALL, stslock::dev::install_crd(admin))
        .await
        .expect("installing the CRD in time")
        .expect("crd");
    let crds: Api<CustomResourceDefinition> = Api::all(admin.clone());
    poll(30, "CRD Established", || {
        let crds = crds.clone();
        Box::pin(async move {
            let crd = call("get crd", crds.get("statefulsetlocks.app.anukkrit.me"))
                .await
                .ok()?;
            crd.status?
                .conditions?
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True")
                .then_some(())
        })
    })
    .await;
}

// --- the real cluster, shared by the tests of one binary -------------------------------------

struct Cluster {
    admin_kubeconfig: PathBuf,
    audit_log: Option<PathBuf>,
    /// The operator's ServiceAccount identity (its User-Agent is set per replica).
    operator: OperatorIdentity,
    kubectl: PathBuf,
    what: String,
    /// Crashes of our own control plane's components ([`Env::api_outage`]); none on a cluster
    /// we did not start.
    crashes: Option<tokio::sync::mpsc::UnboundedSender<Crash>>,
}

/// Kill -9 `component`, leave it down for `down`, restart it: the answer is how long it took to
/// serve again, or why it did not.
type Crash = (
    &'static str,
    Duration,
    oneshot::Sender<Result<Duration, String>>,
);

async fn cluster() -> &'static Cluster {
    static CLUSTER: OnceCell<Cluster> = OnceCell::const_new();
    CLUSTER
        .get_or_try_init(|| async {
            match std::env::var_os("STSLOCK_TEST_KUBECONFIG").filter(|v| !v.is_empty()) {
                Some(path) => existing_cluster(PathBuf::from(path)).await,
                None => start_control_plane().await,
            }
        })
        .await
        .map_err(|e: anyhow::Error| format!("{e:#}"))
        .unwrap()
}

fn repo(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

async fn existing_cluster(kubeconfig: PathBuf) -> anyhow::Result<Cluster> {
    let dir = std::env::temp_dir().join(format!("stslock-test-cluster-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let operator = controlplane::install_operator_identity_with_kubeconfig(
        &kubeconfig,
        &dir.join("operator.kubeconfig"),
        &repo("deploy/rbac"),
        "stslock/harness",
        Duration::from_secs(4 * 3600),
    )
    .await?;
    Ok(Cluster {
        what: format!("the cluster of {}", kubeconfig.display()),
        admin_kubeconfig: kubeconfig,
        audit_log: std::env::var_os("STSLOCK_TEST_AUDIT_LOG").map(PathBuf::from),
        operator,
        kubectl: controlplane::kubectl()?,
        crashes: None,
    })
}

/// Starts a control plane on a thread and runtime of its own (each test has its own runtime,
/// which ends with the test), and keeps it until the test binary exits; the launcher's
/// watchdogs stop its processes then. Its data dir is under the target's tmp dir; those of
/// earlier runs whose process is gone are removed here.
async fn start_control_plane() -> anyhow::Result<Cluster> {
    let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("stslock-controlplane");
    std::fs::create_dir_all(&base)?;
    for entry in std::fs::read_dir(&base)?.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        if let Some(pid) = name.rsplit('-').next()
            && !Path::new("/proc").join(pid).exists()
        {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
    let exe = std::env::current_exe()?
        .file_stem()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_default();
    let data_dir = base.join(format!("{exe}-{}", std::process::id()));
    let (tx, rx) = oneshot::channel::<anyhow::Result<Cluster>>();
    std::thread::Builder::new()
        .name("controlplane".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = tx.send(Err(e.into()));
                    return;
                }
            };
            rt.block_on(async move {
                let started = Instant::now();
                let opts = controlplane::Options {
                    data_dir: Some(data_dir),
                    max_lifetime: Duration::from_secs(3 * 3600),
                    pod_lifecycle: Some(PodLifecycleOptions {
                        ready_after: REAL_POD_READY_DELAY,
                        ..PodLifecycleOptions::default()
                    }),
                    ..controlplane::Options::default()
                };
                let (crashes, mut crash_rx) = tokio::sync::mpsc::unbounded_channel::<Crash>();
                let up = async {
                    let cp = ControlPlane::start(opts).await?;
                    let operator = cp
                        .install_operator_identity(
                            &repo("deploy/rbac"),
                            "stslock/harness",
                            Duration::from_secs(4 * 3600),
                        )
                        .await?;
                    let cluster = Cluster {
                        admin_kubeconfig: cp.kubeconfig_path.clone(),
                        audit_log: Some(cp.audit_log_path.clone()),
                        operator,
                        kubectl: controlplane::kubectl()?,
                        what: format!(
                            "kube-apiserver 1.34.4 at {} (started in {} ms, data in {})",
                            cp.server,
                            started.elapsed().as_millis(),
                            cp.data_dir.display()
                        ),
                        crashes: Some(crashes),
                    };
                    anyhow::Ok((cp, cluster))
                };
                match up.await {
                    Ok((mut cp, cluster)) => {
                        let _ = tx.send(Ok(cluster));
                        while let Some((component, down, answer)) = crash_rx.recv().await {
                            let result = cp.kill_and_restart(component, down).await;
                            let _ = answer.send(result.map_err(|e| format!("{e:#}")));
                        }
                        std::future::pending::<()>().await;
                        drop(cp);
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                    }
                }
            });
        })
        .context("starting the control plane's thread")?;
    rx.await.context("the control plane's thread ended")?
}

// --- the real backend's independent records ------------------------------------------------

/// What the harness's own pod watch saw: kubesim's recorder fed with every pod state in
/// resourceVersion order (one watch per namespace delivers them in that order).
struct Watched {
    recorder: Recorder,
    /// name → (resourceVersion, last state).
    pods: HashMap<String, (u64, Value)>,
    /// Re-lists after the first list (a watch that could not resume): states may be missing.
    relists: usize,
    lists: usize,
    init: HashSet<String>,
    /// The pods of the list in progress, applied when it is complete.
    listed: Vec<Pod>,
}

impl Watched {
    fn new() -> Self {
        Watched {
            recorder: Recorder::new(ROLE_LABEL),
            pods: HashMap::new(),
            relists: 0,
            lists: 0,
            init: HashSet::new(),
            listed: Vec::new(),
        }
    }

    fn apply(&mut self, at_ms: u64, pod: &Pod) {
        let name = pod_key(pod);
        let new = serde_json::to_value(pod).unwrap_or(Value::Null);
        let old = self.pods.get(&name).map(|(_, v)| v.clone());
        self.recorder.observe_pod(at_ms, old.as_ref(), Some(&new));
        self.pods.insert(name, (rv(pod), new));
    }

    fn delete(&mut self, at_ms: u64, name: &str) {
        if let Some((_, old)) = self.pods.remove(name) {
            self.recorder.observe_pod(at_ms, Some(&old), None);
        }
    }
}

async fn record_pods(pods: Api<Pod>, watched: Arc<Mutex<Watched>>, started: Instant) {
    let ns = pods.namespace().unwrap_or_default().to_string();
    let mut stream = watcher(pods, watcher::Config::default())
        .default_backoff()
        .boxed();
    while let Some(event) = stream.next().await {
        let at = started.elapsed().as_millis() as u64;
        let mut w = watched.lock().unwrap();
        let prefix = format!("{ns}/");
        match event {
            Ok(watcher::Event::Init) => {
                w.listed.clear();
                w.lists += 1;
                if w.lists > 1 {
                    w.relists += 1;
                }
                w.init.clear();
            }
            Ok(watcher::Event::InitApply(p)) => {
                w.init.insert(pod_key(&p));
                w.listed.push(p);
            }
            Ok(watcher::Event::InitDone) => {
                // A list gives each pod's latest state, in name order: applied in that order
                // after a re-list, a demotion listed after a promotion showed two writers for a
                // moment that never had them. In resourceVersion order the listed states follow
                // each other as they were committed.
                // What happened between the last event seen and the list is unknown: the
                // listed states are applied demotions first (in resourceVersion order within
                // each group), so a writer the watch missed being demoted never shows beside
                // its successor for an instant that the list itself does not show. Two writers
                // in the list still show. Pods the list no longer has go before any of it: a
                // writer deleted behind the watch (a scale-down) showed beside its successor,
                // listed as writer, for the instant between the two.
                let gone: Vec<String> = w
                    .pods
                    .keys()
                    .filter(|n| n.starts_with(&prefix) && !w.init.contains(*n))
                    .cloned()
                    .collect();
                for n in gone {
                    w.delete(at, &n);
                }
                let mut listed = std::mem::take(&mut w.listed);
                listed.sort_by_key(|p| (is_writer(p), rv(p)));
                for p in &listed {
                    w.apply(at, p);
                }
            }
            Ok(watcher::Event::Apply(p)) => w.apply(at, &p),
            Ok(watcher::Event::Delete(p)) => w.delete(at, &pod_key(&p)),
            Err(e) => tracing::warn!("harness pod watch: {e}"),
        }
    }
}

/// Reads the apiserver's audit log from where it was when the environment started, keeping
/// the test namespace's writes.
struct AuditTail {
    path: Option<PathBuf>,
    namespaces: Vec<String>,
    offset: Option<u64>,
    writes: Vec<Write>,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct AuditEvent {
    stage: String,
    verb: String,
    #[serde(default)]
    user: AuditUser,
    #[serde(default)]
    user_agent: String,
    object_ref: Option<AuditObjectRef>,
    response_status: Option<AuditStatus>,
    /// Only for the writes the policy logs with bodies (StatefulSetLocks; the operator's pods
    /// and Leases).
    #[serde(default)]
    request_object: Option<Value>,
    #[serde(default)]
    response_object: Option<Value>,
    request_received_timestamp: String,
    stage_timestamp: String,
}

#[derive(serde::Deserialize, Default)]
struct AuditUser {
    #[serde(default)]
    username: String,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct AuditObjectRef {
    #[serde(default)]
    resource: String,
    #[serde(default)]
    namespace: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    api_group: String,
    #[serde(default)]
    subresource: String,
}

#[derive(serde::Deserialize)]
struct AuditStatus {
    code: Option<u16>,
}

impl AuditTail {
    fn new(path: Option<PathBuf>, ns: String) -> Self {
        let offset = path
            .as_ref()
            .and_then(|p| std::fs::metadata(p).ok())
            .map(|m| m.len());
        AuditTail {
            path,
            namespaces: vec![ns],
            offset: Some(offset.unwrap_or(0)),
            writes: vec![],
        }
    }

    fn read(&mut self, started_at: jiff::Timestamp) {
        let Some(path) = &self.path else {
            panic!(
                "no audit log for this cluster: set STSLOCK_TEST_AUDIT_LOG (or check has_write_log())"
            );
        };
        let Ok(mut file) = std::fs::File::open(path) else {
            return;
        };
        let offset = self.offset.unwrap_or(0);
        if file.seek(std::io::SeekFrom::Start(offset)).is_err() {
            return;
        }
        let mut reader = std::io::BufReader::new(file);
        let mut read = 0u64;
        let mut new = vec![];
        loop {
            let mut line = String::new();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => break,
                Ok(n) => read += n as u64,
            }
            if !line.ends_with('\n') {
                // An event still being written: read it whole next time.
                read -= line.len() as u64;
                break;
            }
            let Ok(ev) = serde_json::from_str::<AuditEvent>(&line) else {
                continue;
            };
            let Some(obj) = ev.object_ref else { continue };
            if ev.stage != "ResponseComplete" || !self.namespaces.contains(&obj.namespace) {
                continue;
            }
            let us = |ts: &str| -> i64 {
                ts.parse::<jiff::Timestamp>()
                    .map(|t| t.as_microsecond())
                    .unwrap_or(0)
            };
            let (received_us, completed_us) =
                (us(&ev.request_received_timestamp), us(&ev.stage_timestamp));
            let code = ev.response_status.and_then(|s| s.code).unwrap_or(0);
            let committed_labels = ev
                .response_object
                .as_ref()
                .filter(|_| (200..300).contains(&code))
                .and_then(|o| o.get("metadata"))
                .map(|m| {
                    m.get("labels")
                        .and_then(|l| serde_json::from_value(l.clone()).ok())
                        .unwrap_or_default()
                });
            let committed_rv = ev
                .response_object
                .as_ref()
                .filter(|_| (200..300).contains(&code))
                .and_then(|o| o.pointer("/metadata/resourceVersion"))
                .and_then(Value::as_str)
                .and_then(|v| v.parse::<u64>().ok());
            let sets_owner = ev
                .request_object
                .as_ref()
                .filter(|_| ev.verb == "patch")
                .and_then(|o| o.pointer("/metadata/labels"))
                .is_some_and(|l| l.get(SHARD_LABEL).is_some());
            new.push((
                ev.request_received_timestamp.clone(),
                Write {
                    seq: 0,
                    at_ms: ((completed_us - started_at.as_microsecond()) / 1000).max(0) as u64,
                    received_us,
                    completed_us,
                    actor: ev.user_agent,
                    user: Some(ev.user.username),
                    verb: ev.verb,
                    group: obj.api_group,
                    resource: obj.resource,
                    subresource: obj.subresource,
                    namespace: obj.namespace,
                    name: obj.name,
                    code,
                    labels_known: committed_labels.is_some(),
                    labels: committed_labels.unwrap_or_default(),
                    sets_owner,
                    committed_rv,
                },
            ));
        }
        self.offset = Some(offset + read);
        // Events are written as requests complete; order them by arrival (microseconds).
        new.sort_by(|a, b| a.0.cmp(&b.0));
        let mut seq = self.writes.last().map(|w| w.seq).unwrap_or(0);
        for (_, mut w) in new {
            seq += 1;
            w.seq = seq;
            self.writes.push(w);
        }
    }
}

// --- ownership of locks over time -----------------------------------------------------------

/// What [`Env::owner_check`] found.
#[derive(Debug, Default)]
pub struct OwnerCheck {
    /// Committed operator writes checked against the lock's owner.
    pub checked: usize,
    /// Committed writes by a replica that did not own the lock then (proven).
    pub violations: Vec<String>,
    /// Real cluster: checked writes whose owner at the commit is exact, like kubesim's commit
    /// log: lock writes whose committed owner label the audit log gave, and writes whose
    /// committed revision follows a known lock version with none missing between; the rest
    /// are bounded by timestamps.
    pub exact: usize,
    /// Real cluster: checked writes during which the owner may have changed (timestamps
    /// cannot order them; the commit order kubesim records can).
    pub ambiguous: usize,
    /// Real cluster: writes by a non-owner that the API server refused (nothing written).
    pub refused: usize,
    /// Real cluster: writes by a non-owner answered with a server error (5xx), which may or
    /// may not have been committed.
    pub unknown_outcome: Vec<String>,
}

/// Each lock's owner over time, from the harness's own lock watch.
#[derive(Default)]
pub struct Owners {
    /// (namespace, lock) → every version of it the watch delivered, in resourceVersion order.
    pub locks: HashMap<(String, String), Vec<OwnerVersion>>,
    /// (namespace, lock) → the last resourceVersion seen.
    seen: HashMap<(String, String), u64>,
    /// Re-lists after a watch's first list: changes between may be missing.
    relists: usize,
    /// A re-list is being delivered.
    relisting: bool,
}

pub struct OwnerVersion {
    pub rv: u64,
    pub owner: Option<String>,
    /// When the watch delivered it (after its commit), microseconds since the Unix epoch.
    pub seen_us: i64,
    /// Delivered by a re-list, newer than the last version the watch had delivered (or the
    /// first of its lock): versions between, and the owners they named, may be missing.
    pub after_gap: bool,
}

impl Owners {
    fn observe(&mut self, lock: &StatefulSetLock, deleted: bool) {
        let key = (lock.namespace().unwrap_or_default(), lock.name_any());
        let owner = if deleted {
            None
        } else {
            lock.labels().get(SHARD_LABEL).cloned()
        };
        let rv = lock
            .resource_version()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        self.seen.insert(key.clone(), rv);
        let relisting = self.relisting;
        let versions = self.locks.entry(key).or_default();
        // A re-list delivers the current version again.
        if deleted || versions.last().is_none_or(|v| v.rv < rv) {
            versions.push(OwnerVersion {
                rv,
                owner,
                seen_us: jiff::Timestamp::now().as_microsecond(),
                after_gap: relisting && !deleted,
            });
        }
    }
}

async fn record_owners(locks: Api<StatefulSetLock>, owners: Arc<Mutex<Owners>>) {
    let mut stream = watcher(locks, watcher::Config::default())
        .default_backoff()
        .boxed();
    let mut lists = 0;
    while let Some(event) = stream.next().await {
        let mut o = owners.lock().unwrap();
        match event {
            Ok(watcher::Event::Init) => {
                lists += 1;
                if lists > 1 {
                    o.relists += 1;
                    o.relisting = true;
                }
            }
            Ok(watcher::Event::InitApply(l)) | Ok(watcher::Event::Apply(l)) => o.observe(&l, false),
            Ok(watcher::Event::Delete(l)) => o.observe(&l, true),
            Ok(watcher::Event::InitDone) => o.relisting = false,
            Err(e) => tracing::warn!("harness lock watch: {e}"),
        }
    }
}

/// [`Env::owner_check`] from kubesim's commit log (owner label recorded with each commit).
fn exact_owner_check(log: &[Write], lock_of: impl Fn(&Write) -> Option<String>) -> OwnerCheck {
    let mut owner: HashMap<(String, String), String> = HashMap::new();
    let mut out = OwnerCheck::default();
    for c in log.iter().filter(|c| c.committed()) {
        let Some(lock) = lock_of(c) else { continue };
        let key = (c.namespace.clone(), lock.clone());
        let mut label_change = false;
        if c.resource == "statefulsetlocks" {
            let before = owner.get(&key).cloned();
            if let Some(o) = c.labels.get(SHARD_LABEL) {
                owner.insert(key.clone(), o.clone());
            }
            // A status or finalizer write must come from the owner before this commit (a
            // label change itself may come from the previous owner handing off, or a claimer).
            label_change = before.as_deref() != c.labels.get(SHARD_LABEL).map(String::as_str);
        }
        let Some(actor) = c.actor.strip_prefix("stslock/") else {
            continue;
        };
        if label_change {
            continue;
        }
        out.checked += 1;
        out.exact += 1;
        if owner.get(&key).map(String::as_str) != Some(actor) {
            out.violations.push(format!(
                "{actor} wrote {} {} for lock {lock} owned by {:?} (rv {})",
                c.resource,
                c.name,
                owner.get(&key),
                c.seq
            ));
        }
    }
    out
}

/// One lock's versions in etcd's order, from the harness's watch and the audit log's answers
/// to lock writes, and the revisions between which the watch may have missed versions.
#[derive(Default)]
struct RvHistory {
    /// (resourceVersion, owner label), ascending, one entry per version.
    versions: Vec<(u64, Option<String>)>,
    /// (a, b): versions strictly between may be missing (before the watch's first version, and
    /// each re-list's jump). The audit log's answers may fill a gap but cannot show it full.
    gaps: Vec<(u64, u64)>,
}

impl RvHistory {
    fn of_locks(writes: &[Write], owners: &Owners) -> HashMap<(String, String), RvHistory> {
        let mut out: HashMap<(String, String), RvHistory> = HashMap::new();
        // A lock the watch never delivered has no history known to be whole: the audit log's
        // answers alone may miss a version (one committed as kube-apiserver crashed).
        let unwatched = || RvHistory {
            versions: vec![],
            gaps: vec![(0, u64::MAX)],
        };
        for (key, versions) in &owners.locks {
            let h = out.entry(key.clone()).or_default();
            let mut previous = 0;
            for (k, v) in versions.iter().enumerate() {
                if k == 0 || v.after_gap {
                    h.gaps.push((previous, v.rv));
                }
                previous = v.rv;
                h.versions.push((v.rv, v.owner.clone()));
            }
        }
        for w in writes {
            if w.resource == "statefulsetlocks"
                && w.labels_known
                && w.committed()
                && let Some(rv) = w.committed_rv
            {
                out.entry((w.namespace.clone(), w.name.clone()))
                    .or_insert_with(unwatched)
                    .versions
                    .push((rv, w.labels.get(SHARD_LABEL).cloned()));
            }
        }
        for h in out.values_mut() {
            h.versions.sort_by_key(|(rv, _)| *rv);
            h.versions.dedup_by_key(|(rv, _)| *rv);
        }
        out
    }

    /// The newest version committed before `rv` and the owner it names, when no version
    /// between may be missing and it names one (a deleted or unclaimed lock decides nothing).
    fn owner_before(&self, rv: u64) -> Option<(u64, &str)> {
        let i = self.versions.partition_point(|(v, _)| *v < rv);
        let (version, owner) = self.versions.get(i.checked_sub(1)?)?;
        let missing = self.gaps.iter().any(|(a, b)| *a < rv && *b > *version);
        if missing {
            return None;
        }
        Some((*version, owner.as_deref()?))
    }
}

/// One owner's tenure of a lock, as far as timestamps bound it.
struct Tenure {
    owner: Option<String>,
    /// The change that began it was committed in `[from_us, seen_us]`.
    from_us: i64,
    seen_us: i64,
}

/// [`Env::owner_check`] from the audit log and the lock watch (see there).
pub fn timed_owner_check(
    writes: &[Write],
    owners: &Owners,
    lock_of: impl Fn(&Write) -> Option<String>,
) -> OwnerCheck {
    // Arrival times of the writes to each lock (itself or its status) that may have been
    // committed, in order.
    let mut arrivals: HashMap<(String, String), Vec<i64>> = HashMap::new();
    for w in writes {
        if w.resource == "statefulsetlocks" && w.maybe_committed() {
            arrivals
                .entry((w.namespace.clone(), w.name.clone()))
                .or_default()
                .push(w.received_us);
        }
    }
    for a in arrivals.values_mut() {
        a.sort_unstable();
    }
    let mut tenures: HashMap<&(String, String), Vec<Tenure>> = HashMap::new();
    // Per lock, the times in which its watch may have missed versions (a re-list jumped over
    // them): any replica may have owned it then.
    let mut gaps: HashMap<&(String, String), Vec<(i64, i64)>> = HashMap::new();
    for (key, versions) in &owners.locks {
        let arrived = arrivals.get(key).map(Vec::as_slice).unwrap_or(&[]);
        let mut list: Vec<Tenure> = vec![];
        for (k, v) in versions.iter().enumerate() {
            if v.after_gap {
                // The missed versions were committed after the last delivered one, which was
                // committed after its own write arrived (the k-th arrival bounds it).
                let from = k
                    .checked_sub(1)
                    .and_then(|p| arrived.get(p).copied())
                    .unwrap_or(i64::MIN);
                gaps.entry(key).or_default().push((from, v.seen_us));
            }
            if list.last().is_some_and(|t| t.owner == v.owner) {
                continue;
            }
            // The k+1 versions up to this one were committed, in this order, by k+1 distinct
            // writes, each after its own arrival: this commit follows at least k+1 arrivals.
            // (A write that changed nothing, or a version the watch missed, only makes this
            // bound earlier.)
            let from_us = match list.last() {
                None => i64::MIN,
                Some(previous) => arrived
                    .get(k)
                    .copied()
                    .unwrap_or(previous.from_us)
                    .max(previous.from_us),
            };
            assert!(
                from_us <= v.seen_us,
                "harness: {key:?} version {} (rv {}) was seen before the write that made it can \
                 have arrived: the audit log misses writes to it",
                k + 1,
                v.rv
            );
            list.push(Tenure {
                owner: v.owner.clone(),
                from_us,
                seen_us: v.seen_us,
            });
        }
        tenures.insert(key, list);
    }
    let in_order = RvHistory::of_locks(writes, owners);
    let none = vec![];
    let mut out = OwnerCheck::default();
    for w in writes {
        let Some(actor) = w.actor.strip_prefix("stslock/") else {
            continue;
        };
        let Some(lock) = lock_of(w) else { continue };
        if w.resource != "statefulsetlocks"
            && w.committed()
            && let Some((version, owner)) = w.committed_rv.and_then(|rv| {
                in_order
                    .get(&(w.namespace.clone(), lock.clone()))?
                    .owner_before(rv)
            })
        {
            // Committed at a known revision, after a known version of the lock with none
            // missing between: the owner then is known exactly, as on kubesim.
            out.checked += 1;
            out.exact += 1;
            if owner != actor {
                out.violations.push(format!(
                    "{actor} wrote {} {}{} {} for lock {lock}, committed at resourceVersion {}, after the lock's version {version} naming owner {owner:?} (none between)",
                    w.verb,
                    w.resource,
                    if w.subresource.is_empty() { String::new() } else { format!("/{}", w.subresource) },
                    w.name,
                    w.committed_rv.unwrap_or_default(),
                ));
            }
            continue;
        }
        if w.resource == "statefulsetlocks" && w.labels_known {
            // The answer is the lock as committed: its owner label then is known exactly.
            if w.sets_owner {
                continue; // a claim or a handoff: an ownership change (as on kubesim)
            }
            out.checked += 1;
            out.exact += 1;
            let owner = w.labels.get(SHARD_LABEL);
            if owner.map(String::as_str) != Some(actor) {
                out.violations.push(format!(
                    "{actor} wrote {} {}/{} {} (arrived {}, {}) and the lock as committed names owner {owner:?}",
                    w.verb,
                    w.resource,
                    w.subresource,
                    w.name,
                    jiff::Timestamp::from_microsecond(w.received_us)
                        .map(|t| t.to_string())
                        .unwrap_or_default(),
                    w.code
                ));
            }
            continue;
        }
        let key = (w.namespace.clone(), lock.clone());
        let tenures = tenures.get(&key).unwrap_or(&none);
        let (from, to) = (w.received_us, w.completed_us);
        if w.resource == "statefulsetlocks"
            && w.subresource.is_empty()
            && w.maybe_committed()
            && tenures
                .iter()
                .skip(1)
                .any(|t| from <= t.seen_us && to >= t.from_us)
        {
            continue; // may be an ownership change
        }
        // The owners whose tenure may overlap the write.
        let mut possible: Vec<Option<&str>> = vec![];
        for (k, t) in tenures.iter().enumerate() {
            let ends_after_arrival = tenures.get(k + 1).is_none_or(|next| next.seen_us > from);
            if t.from_us <= to && ends_after_arrival && !possible.contains(&t.owner.as_deref()) {
                possible.push(t.owner.as_deref());
            }
        }
        // Inside a re-list's gap the owner is unknown: not provable either way.
        let in_gap = gaps
            .get(&key)
            .is_some_and(|g| g.iter().any(|(gs, ge)| from <= *ge && to >= *gs));
        let owned = possible.contains(&Some(actor)) || in_gap;
        if !w.maybe_committed() {
            if !owned {
                out.refused += 1;
            }
            continue;
        }
        if !w.committed() {
            if !owned {
                out.unknown_outcome.push(format!(
                    "{actor} {} {}{} {} for lock {lock}: {} while owned by {possible:?}",
                    w.verb,
                    w.resource,
                    if w.subresource.is_empty() {
                        String::new()
                    } else {
                        format!("/{}", w.subresource)
                    },
                    w.name,
                    w.code
                ));
            }
            continue;
        }
        out.checked += 1;
        if !owned {
            let at = jiff::Timestamp::from_microsecond(from)
                .map(|t| t.to_string())
                .unwrap_or_default();
            // What the verdict rests on: the lock's tenures and the writes to it around then.
            let near = |t: i64| (t - from).abs() < 3_000_000;
            let history: Vec<String> = tenures
                .iter()
                .filter(|t| near(t.seen_us))
                .map(|t| {
                    format!(
                        "owner {:?} from {} µs, seen {} µs",
                        t.owner,
                        t.from_us.max(from - 9_999_999) - from,
                        t.seen_us - from
                    )
                })
                .chain(
                    writes
                        .iter()
                        .filter(|x| {
                            x.resource == "statefulsetlocks"
                                && x.namespace == w.namespace
                                && x.name == lock
                                && near(x.received_us)
                        })
                        .map(|x| {
                            format!(
                                "{} {} {}/{} {}: {} .. {} µs",
                                x.actor,
                                x.verb,
                                x.resource,
                                x.subresource,
                                x.code,
                                x.received_us - from,
                                x.completed_us - from
                            )
                        }),
                )
                .collect();
            out.violations.push(format!(
                "{actor} wrote {} {}{} {} for lock {lock} (arrived {at}, answered {} µs later, {}) while owned by {possible:?}; around it (µs from its arrival): {history:#?}",
                w.verb,
                w.resource,
                if w.subresource.is_empty() { String::new() } else { format!("/{}", w.subresource) },
                w.name,
                to - from,
                w.code
            ));
        } else if possible.len() > 1 || in_gap {
            out.ambiguous += 1;
        }
    }
    out
}

// --- the proxy that partitions a replica on a real cluster ----------------------------------

struct Proxy {
    addr: SocketAddr,
    cut: Arc<watch::Sender<bool>>,
    task: tokio::task::JoinHandle<()>,
}

struct ProxyHandle {
    addr: SocketAddr,
    cut: Arc<watch::Sender<bool>>,
}

impl Proxy {
    fn handle(&self) -> ProxyHandle {
        ProxyHandle {
            addr: self.addr,
            cut: self.cut.clone(),
        }
    }
}

impl ProxyHandle {
    fn set_cut(&self, cut: bool) {
        self.cut.send_replace(cut);
    }
}

/// The host of a kubeconfig's server, and its address.
fn server_of(kubeconfig: &Path) -> (String, SocketAddr) {
    use std::net::ToSocketAddrs;
    let k = kube::config::Kubeconfig::read_from(kubeconfig).unwrap();
    let server = k
        .clusters
        .iter()
        .find_map(|c| c.cluster.as_ref()?.server.clone())
        .expect("a server in the kubeconfig");
    let authority = server
        .strip_prefix("https://")
        .unwrap_or(&server)
        .split('/')
        .next()
        .unwrap()
        .to_string();
    let host = match authority.rsplit_once(':') {
        Some((host, _)) => host.trim_matches(['[', ']']).to_string(),
        None => authority.clone(),
    };
    let with_port = if authority.contains(':') && !authority.ends_with(']') {
        authority.clone()
    } else {
        format!("{authority}:443")
    };
    let addr = with_port
        .to_socket_addrs()
        .unwrap()
        .next()
        .expect("the server resolves");
    (host, addr)
}

/// Forwards connections to `upstream` while not cut. Cutting drops every open connection;
/// a connection made while cut gets no answer and is closed when the cut ends.
async fn run_proxy(
    listener: tokio::net::TcpListener,
    upstream: SocketAddr,
    cut: watch::Receiver<bool>,
) {
    loop {
        let mut conn = match listener.accept().await {
            Ok((conn, _)) => conn,
            Err(_) => {
                // Out of file descriptors or the like: try again shortly.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let mut cut = cut.clone();
        tokio::spawn(async move {
            let held = *cut.borrow_and_update();
            if held {
                let _ = cut.wait_for(|c| !*c).await;
                return;
            }
            let Ok(mut up) = tokio::net::TcpStream::connect(upstream).await else {
                return;
            };
            tokio::select! {
                _ = tokio::io::copy_bidirectional(&mut conn, &mut up) => {}
                _ = cut.wait_for(|c| *c) => {}
            }
        });
    }
}

/// A tool the tests run, built (or found in the cache) by one of the repository's build scripts:
/// `$var` when set, else the path the script prints last (`script args…`, run from the
/// repository root), e.g. `built_tool("HELM", "loadtest/tools/tool.sh", &["helm"])`.
pub fn built_tool(var: &str, script: &str, args: &[&str]) -> PathBuf {
    if let Some(p) = std::env::var_os(var) {
        return PathBuf::from(p);
    }
    let out = std::process::Command::new(controlplane::repo_path(script))
        .args(args)
        .current_dir(controlplane::repo_path("."))
        .output()
        .unwrap_or_else(|e| panic!("run {script}: {e}"));
    assert!(
        out.status.success(),
        "{script} {args:?} failed (set {var} to use a build of your own):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed = String::from_utf8_lossy(&out.stdout);
    PathBuf::from(
        printed
            .lines()
            .last()
            .unwrap_or_else(|| panic!("{script} printed no path"))
            .trim(),
    )
}

/// `kubectl` with its own kubeconfig and HOME (no cache shared between tests).
pub struct Kubectl {
    pub bin: PathBuf,
    pub kubeconfig: PathBuf,
    pub home: PathBuf,
    /// A directory put first on kubectl's PATH (its plugins).
    pub plugins: Option<PathBuf>,
}

impl Kubectl {
    /// With the `stslock` binary of this build installed as the `kubectl-stslock` plugin (a
    /// link on kubectl's PATH), as a user installs it.
    pub fn with_plugin(mut self) -> Kubectl {
        let dir = self.home.join("plugins");
        std::fs::create_dir_all(&dir).expect("plugin directory");
        let link = dir.join("kubectl-stslock");
        if !link.exists() {
            std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_stslock"), &link)
                .expect("link kubectl-stslock");
        }
        self.plugins = Some(dir);
        self
    }

    /// The skew-matched kubectl as the admin of `cp`, with a HOME of its own.
    pub fn admin_of(cp: &ControlPlane) -> Kubectl {
        let home = std::env::temp_dir().join(format!("stslock-kubectl-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&home).expect("kubectl HOME");
        Kubectl {
            bin: controlplane::kubectl().expect("kubectl for the control plane"),
            kubeconfig: cp.kubeconfig_path.clone(),
            home,
            plugins: None,
        }
    }

    pub async fn try_run(&self, args: &[&str]) -> (bool, String, String) {
        let out = tokio::time::timeout(Duration::from_secs(60), {
            let mut cmd = tokio::process::Command::new(&self.bin);
            cmd.args(args)
                .current_dir(env!("CARGO_MANIFEST_DIR"))
                .env("KUBECONFIG", &self.kubeconfig)
                .env("HOME", &self.home)
                .kill_on_drop(true);
            if let Some(dir) = &self.plugins {
                let path = std::env::var_os("PATH").unwrap_or_default();
                let mut dirs = vec![dir.clone()];
                dirs.extend(std::env::split_paths(&path));
                cmd.env("PATH", std::env::join_paths(dirs).expect("PATH"));
            }
            cmd.output()
        })
        .await
        .expect("kubectl in time")
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {} (install kubectl or set KUBECTL): {e}",
                self.bin.display()
            )
        });
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    pub async fn run(&self, args: &[&str]) -> String {
        let (ok, out, err) = self.try_run(args).await;
        assert!(ok, "kubectl {args:?}: {out}\n{err}");
        out
    }

    /// `kubectl apply -f crd`, then wait until the StatefulSetLock CRD is Established (as a user
    /// does after `make install`).
    pub async fn install_crd(&self, crd: &str) {
        self.run(&["apply", "-f", crd]).await;
        self.run(&[
            "wait",
            "--for=condition=Established",
            "crd/statefulsetlocks.app.anukkrit.me",
            "--timeout=30s",
        ])
        .await;
    }

    pub async fn until(&self, args: &[&str], what: &str, pred: impl Fn(&str) -> bool) -> String {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let (_, out, _) = self.try_run(args).await;
            if pred(&out) {
                return out;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}; last output:\n{out}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
