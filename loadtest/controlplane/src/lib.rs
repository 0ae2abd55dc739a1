//! A real Kubernetes control plane on loopback for tests: etcd, kube-apiserver and
//! kube-controller-manager built from their Go modules (`build.sh`), started with TLS,
//! ServiceAccount tokens, RBAC, PodSecurity and ValidatingAdmissionPolicy admission and an
//! audit log, plus a stand-in for kubelet and scheduler ([`pod_lifecycle`]) so StatefulSet pods
//! become Running and Ready. It is the ground truth kubesim is compared with (DESIGN §9).
//!
//! Everything it starts it stops: on [`ControlPlane::stop`], on drop (also while unwinding from
//! a panic) and, through a watchdog per process, when the process that started it dies or its
//! maximum lifetime passes.

#![forbid(unsafe_code)]

pub mod binaries;
mod kubeconfig;
pub mod operator;
pub mod pod_lifecycle;
mod process;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::Api;

pub use binaries::Binaries;
pub use kubeconfig::client as client_from_kubeconfig;
pub use operator::{OperatorIdentity, install_operator_identity_with_kubeconfig};
pub use pod_lifecycle::PodLifecycleOptions;

use process::{Component, free_port};

/// The kubectl a test drives this control plane with: `kubectl.1.33` beside the binary `kubectl`
/// links to (`$STSLOCK_KUBECTL` overrides). Kubernetes 1.34 supports clients one minor older.
pub fn kubectl() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("STSLOCK_KUBECTL") {
        return Ok(PathBuf::from(path));
    }
    let path = std::env::var_os("PATH").context("PATH is not set")?;
    let on_path = std::env::split_paths(&path)
        .map(|dir| dir.join("kubectl"))
        .find(|p| p.is_file())
        .context("no kubectl on the PATH")?;
    let real = std::fs::canonicalize(&on_path)
        .with_context(|| format!("resolving {}", on_path.display()))?;
    let skew = real
        .parent()
        .context("kubectl has no parent directory")?
        .join("kubectl.1.33");
    anyhow::ensure!(skew.is_file(), "{} is missing", skew.display());
    Ok(skew)
}

/// Runs one API call (or any future) with a deadline; the error says what timed out.
pub async fn timed<T, E>(
    what: &str,
    limit: Duration,
    call: impl Future<Output = Result<T, E>>,
) -> Result<T>
where
    E: std::error::Error + Send + Sync + 'static,
{
    tokio::time::timeout(limit, call)
        .await
        .with_context(|| format!("{what}: no answer within {limit:?}"))?
        .with_context(|| what.to_string())
}

/// The timeout of single API calls made here.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone, Debug)]
pub struct Options {
    /// Where the binaries are; `None`: [`Binaries::build_or_reuse`].
    pub binaries: Option<Binaries>,
    /// How long a build may take when the binaries are not there yet.
    pub build_timeout: Duration,
    /// A directory that does not exist yet (or is empty); `None`: a fresh one under the
    /// system's temp dir.
    pub data_dir: Option<PathBuf>,
    /// Keep the data dir (etcd data, certificates, logs, audit log) after stopping. It is
    /// always kept when stopping because of a panic, and its path logged.
    pub keep_data_dir: bool,
    /// Every process is stopped after this long, whatever happens to the caller.
    pub max_lifetime: Duration,
    /// How long etcd, the apiserver and the controller manager get to become ready.
    pub startup_timeout: Duration,
    /// Nodes and pod lifecycle without a kubelet; `None`: pods stay Pending and unbound.
    pub pod_lifecycle: Option<PodLifecycleOptions>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            binaries: None,
            build_timeout: Duration::from_secs(3 * 3600),
            data_dir: None,
            keep_data_dir: false,
            max_lifetime: Duration::from_secs(3600),
            startup_timeout: Duration::from_secs(120),
            pod_lifecycle: Some(PodLifecycleOptions::default()),
        }
    }
}

/// A running control plane. Dropping it stops everything it started.
pub struct ControlPlane {
    /// Admin kubeconfig (client certificate in group `system:masters`).
    pub kubeconfig_path: PathBuf,
    /// The apiserver's audit log (JSON lines; every write at level Metadata, StatefulSetLock
    /// writes with their bodies).
    pub audit_log_path: PathBuf,
    /// `https://127.0.0.1:<port>`.
    pub server: String,
    /// The CA every serving and client certificate is signed by.
    pub ca_path: PathBuf,
    pub data_dir: PathBuf,
    pub binaries: Binaries,
    pki_dir: PathBuf,
    /// In start order; stopped in reverse.
    components: Vec<Component>,
    pod_lifecycle: Option<pod_lifecycle::PodLifecycle>,
    keep_data_dir: bool,
}

/// Every write (and nothing else) at level Metadata: who (user, groups, user agent, source
/// IP), what (verb, resource, name) and the response code. Writes to StatefulSetLocks also
/// with their bodies (RequestResponse): the answer is the lock as committed, so its owner
/// label at that commit is known exactly, whatever a watch missed or a crash left unlogged.
/// The operator's ServiceAccount's writes to pods and Leases with their bodies too: the
/// answer's resourceVersion is the write's etcd revision, one order with the locks' versions,
/// so the lock's owner when the write was committed is known by that order, not bounded by
/// timestamps.
const AUDIT_POLICY: &str = r#"apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: ["RequestReceived"]
rules:
- level: RequestResponse
  verbs: ["create", "update", "patch"]
  resources:
  - group: "app.anukkrit.me"
    resources: ["statefulsetlocks", "statefulsetlocks/status"]
- level: RequestResponse
  users: ["system:serviceaccount:stslock-system:stslock"]
  verbs: ["create", "update", "patch"]
  resources:
  - group: ""
    resources: ["pods"]
  - group: "coordination.k8s.io"
    resources: ["leases"]
- level: Metadata
  verbs: ["create", "update", "patch", "delete", "deletecollection"]
- level: None
"#;

/// The controllers a StatefulSet operator's world needs; node lifecycle, pod GC and the rest
/// stay off (they would fight the stand-in kubelet).
const CONTROLLERS: &str = "statefulset-controller,garbage-collector-controller,namespace-controller,\
serviceaccount-controller,serviceaccount-token-controller,root-ca-certificate-publisher-controller,\
clusterrole-aggregation-controller,validatingadmissionpolicy-status-controller";

pub const SERVICE_ACCOUNT_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

impl ControlPlane {
    pub async fn start(opts: Options) -> Result<ControlPlane> {
        let binaries = match opts.binaries.clone() {
            Some(b) => b,
            None => Binaries::build_or_reuse(opts.build_timeout).await?,
        };
        // Free ports are picked before the components bind them; on a machine shared with
        // other test runs one may be taken in between. The failed attempt is stopped and its
        // data dir removed (dropped), so the next one starts fresh with new ports.
        let mut attempt = 1;
        loop {
            match Self::start_once(&opts, binaries.clone()).await {
                Err(e) if attempt < 3 && format!("{e:#}").contains("address already in use") => {
                    tracing::warn!("a port was taken while starting; retrying with others: {e:#}");
                    attempt += 1;
                }
                result => return result,
            }
        }
    }

    async fn start_once(opts: &Options, binaries: Binaries) -> Result<ControlPlane> {
        let started = Instant::now();
        let data_dir = match &opts.data_dir {
            Some(dir) => dir.clone(),
            None => {
                std::env::temp_dir().join(format!("stslock-controlplane-{}", uuid::Uuid::new_v4()))
            }
        };
        if data_dir.exists() {
            let empty = std::fs::read_dir(&data_dir)
                .with_context(|| format!("reading {}", data_dir.display()))?
                .next()
                .is_none();
            anyhow::ensure!(
                empty,
                "data dir {} is not empty (a control plane starts fresh)",
                data_dir.display()
            );
        }
        let logs = data_dir.join("logs");
        std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
        let pki_dir = data_dir.join("pki");
        let deadline_unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .context("clock before 1970")?
            .as_secs()
            .saturating_add(opts.max_lifetime.as_secs().max(1));

        let mut cp = ControlPlane {
            kubeconfig_path: data_dir.join("admin.kubeconfig"),
            audit_log_path: logs.join("audit.log"),
            server: String::new(),
            ca_path: pki_dir.join("ca.crt"),
            data_dir: data_dir.clone(),
            binaries,
            pki_dir: pki_dir.clone(),
            components: Vec::new(),
            pod_lifecycle: None,
            keep_data_dir: opts.keep_data_dir,
        };
        // From here on an early return drops `cp`, which stops what was started.

        let pki = tokio::process::Command::new(cp.binaries.pki())
            .arg("-dir")
            .arg(&pki_dir)
            .kill_on_drop(true)
            .output();
        let pki = tokio::time::timeout(Duration::from_secs(60), pki)
            .await
            .context("pki did not finish within 60 s")?
            .context("running pki")?;
        anyhow::ensure!(
            pki.status.success(),
            "pki failed: {}",
            String::from_utf8_lossy(&pki.stderr)
        );
        let pki_file = |name: &str| pki_dir.join(name).display().to_string();

        let policy = data_dir.join("audit-policy.yaml");
        std::fs::write(&policy, AUDIT_POLICY)
            .with_context(|| format!("writing {}", policy.display()))?;

        // etcd: TLS with client certificates, on loopback only.
        let (etcd_port, peer_port) = (free_port()?, free_port()?);
        let etcd_url = format!("https://127.0.0.1:{etcd_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let etcd_args = vec![
            "--name=controlplane".to_string(),
            format!("--data-dir={}", data_dir.join("etcd").display()),
            format!("--listen-client-urls={etcd_url}"),
            format!("--advertise-client-urls={etcd_url}"),
            format!("--listen-peer-urls={peer_url}"),
            format!("--initial-advertise-peer-urls={peer_url}"),
            format!("--initial-cluster=controlplane={peer_url}"),
            format!("--cert-file={}", pki_file("etcd-server.crt")),
            format!("--key-file={}", pki_file("etcd-server.key")),
            format!("--trusted-ca-file={}", pki_file("ca.crt")),
            "--client-cert-auth=true".to_string(),
            // A test cluster's data is thrown away: skip fsync, the shared machine's disk is slow.
            "--unsafe-no-fsync=true".to_string(),
            "--log-level=warn".to_string(),
        ];
        cp.spawn("etcd", cp.binaries.etcd(), &etcd_args, deadline_unix)?;
        cp.wait_for_port("etcd", etcd_port, started + opts.startup_timeout)
            .await?;

        let api_port = free_port()?;
        cp.server = format!("https://127.0.0.1:{api_port}");
        let api_args = vec![
            "--bind-address=127.0.0.1".to_string(),
            "--advertise-address=127.0.0.1".to_string(),
            format!("--secure-port={api_port}"),
            format!("--cert-dir={}", data_dir.join("apiserver").display()),
            format!("--tls-cert-file={}", pki_file("apiserver.crt")),
            format!("--tls-private-key-file={}", pki_file("apiserver.key")),
            format!("--client-ca-file={}", pki_file("ca.crt")),
            format!("--etcd-servers={etcd_url}"),
            format!("--etcd-cafile={}", pki_file("ca.crt")),
            format!("--etcd-certfile={}", pki_file("etcd-client.crt")),
            format!("--etcd-keyfile={}", pki_file("etcd-client.key")),
            format!("--service-account-issuer={SERVICE_ACCOUNT_ISSUER}"),
            format!("--service-account-key-file={}", pki_file("sa.pub")),
            format!("--service-account-signing-key-file={}", pki_file("sa.key")),
            "--service-cluster-ip-range=10.0.0.0/24".to_string(),
            "--authorization-mode=RBAC".to_string(),
            // Added to the default plugins (which already include PodSecurity and
            // ValidatingAdmissionPolicy in 1.34; named so a change of defaults cannot drop them).
            "--enable-admission-plugins=PodSecurity,OwnerReferencesPermissionEnforcement,ValidatingAdmissionPolicy"
                .to_string(),
            format!("--audit-policy-file={}", policy.display()),
            format!("--audit-log-path={}", cp.audit_log_path.display()),
            "--audit-log-format=json".to_string(),
            "--audit-log-mode=blocking".to_string(),
            // The `kubernetes` Service would get 127.0.0.1 as its endpoint, which Endpoints
            // validation rejects (loopback); nothing here reaches the apiserver through it.
            "--endpoint-reconciler-type=none".to_string(),
            "--profiling=false".to_string(),
        ];
        cp.spawn(
            "kube-apiserver",
            cp.binaries.kube_apiserver(),
            &api_args,
            deadline_unix,
        )?;
        kubeconfig::write(
            &cp.kubeconfig_path,
            &cp.server,
            &cp.ca_path,
            "admin",
            kubeconfig::Credentials::ClientCert {
                cert: &pki_dir.join("admin.crt"),
                key: &pki_dir.join("admin.key"),
            },
        )?;
        let admin = cp.admin_client().await?;
        cp.wait_for_readyz(&admin, started + opts.startup_timeout)
            .await?;

        let kcm_kubeconfig = data_dir.join("kube-controller-manager.kubeconfig");
        kubeconfig::write(
            &kcm_kubeconfig,
            &cp.server,
            &cp.ca_path,
            "system:kube-controller-manager",
            kubeconfig::Credentials::ClientCert {
                cert: &pki_dir.join("kube-controller-manager.crt"),
                key: &pki_dir.join("kube-controller-manager.key"),
            },
        )?;
        let kcm_args = vec![
            format!("--kubeconfig={}", kcm_kubeconfig.display()),
            "--bind-address=127.0.0.1".to_string(),
            format!("--secure-port={}", free_port()?),
            format!(
                "--cert-dir={}",
                data_dir.join("kube-controller-manager").display()
            ),
            format!("--controllers={CONTROLLERS}"),
            // Each controller acts as its own ServiceAccount, as in a real cluster.
            "--use-service-account-credentials=true".to_string(),
            format!("--service-account-private-key-file={}", pki_file("sa.key")),
            format!("--root-ca-file={}", pki_file("ca.crt")),
            "--leader-elect=false".to_string(),
            "--profiling=false".to_string(),
            // Its client's default budget (20 requests/s, burst 30) would take minutes to create
            // the pods of a few thousand StatefulSets (the 5,000-lock floor comparison); a
            // cluster's controller manager is given far more than that.
            "--kube-api-qps=500".to_string(),
            "--kube-api-burst=1000".to_string(),
        ];
        cp.spawn(
            "kube-controller-manager",
            cp.binaries.kube_controller_manager(),
            &kcm_args,
            deadline_unix,
        )?;
        // The serviceaccount controller creating `default` in `default` shows the controller
        // manager is up (and pods can be admitted: the ServiceAccount plugin needs that account).
        cp.wait_for_default_service_account(&admin, started + opts.startup_timeout)
            .await?;

        if let Some(lifecycle) = &opts.pod_lifecycle {
            let client =
                kubeconfig_client_for(&cp, "pod-lifecycle", "controlplane-pod-lifecycle").await?;
            cp.pod_lifecycle =
                Some(pod_lifecycle::PodLifecycle::start(client, lifecycle.clone()).await?);
        }
        tracing::info!(
            server = %cp.server,
            kubeconfig = %cp.kubeconfig_path.display(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "control plane ready"
        );
        Ok(cp)
    }

    /// A client with the admin kubeconfig (User-Agent `controlplane-admin`).
    pub async fn admin_client(&self) -> Result<kube::Client> {
        kubeconfig::client(&self.kubeconfig_path, "controlplane-admin").await
    }

    /// The log file of a component (`etcd`, `kube-apiserver`, `kube-controller-manager`).
    pub fn log_path(&self, component: &str) -> PathBuf {
        self.data_dir.join("logs").join(format!("{component}.log"))
    }

    /// The processes it started, in start order: (component, pid).
    pub fn pids(&self) -> Vec<(&'static str, u32)> {
        self.components.iter().map(|c| (c.name, c.pid())).collect()
    }

    /// An error if any component has exited.
    pub fn check_running(&mut self) -> Result<()> {
        self.components
            .iter_mut()
            .try_for_each(Component::check_running)
    }

    /// A crash and restart of one component (`etcd` or `kube-apiserver`): SIGKILL, `down`
    /// with it gone, then started again with the same arguments and data (etcd's data dir
    /// survives a kill of the process), and waited for until the apiserver is ready again.
    /// Returns how long that took after the restart. Everything else — the controller
    /// manager, the stand-in kubelet, clients such as the operator — reconnects on its own.
    pub async fn kill_and_restart(&mut self, component: &str, down: Duration) -> Result<Duration> {
        anyhow::ensure!(
            component == "etcd" || component == "kube-apiserver",
            "only etcd and kube-apiserver are restarted, not {component}"
        );
        let index = self
            .components
            .iter()
            .position(|c| c.name == component)
            .with_context(|| format!("no component {component}"))?;
        self.components[index].kill();
        tracing::info!(component, ?down, "killed (SIGKILL)");
        tokio::time::sleep(down).await;
        self.components[index].respawn()?;
        let restarted = Instant::now();
        let deadline = restarted + Duration::from_secs(120);
        if component == "etcd" {
            let port = self.components[index]
                .args
                .iter()
                .find_map(|a| a.strip_prefix("--listen-client-urls=https://127.0.0.1:"))
                .and_then(|p| p.parse().ok())
                .context("etcd's client port")?;
            self.wait_for_port("etcd", port, deadline).await?;
        }
        let admin = self.admin_client().await?;
        self.wait_for_readyz(&admin, deadline).await?;
        tracing::info!(
            component,
            elapsed_ms = restarted.elapsed().as_millis() as u64,
            "serving again"
        );
        Ok(restarted.elapsed())
    }

    /// Stops the stand-in, then the controller manager, the apiserver and etcd (SIGTERM, up to
    /// 10 s each). Also what dropping does.
    pub async fn stop(mut self) -> Result<()> {
        let components = std::mem::take(&mut self.components);
        let lifecycle = self.pod_lifecycle.take();
        tokio::task::spawn_blocking(move || {
            drop(lifecycle);
            stop_all(components);
        })
        .await
        .context("stopping the control plane")?;
        Ok(())
    }

    fn spawn(
        &mut self,
        name: &'static str,
        program: PathBuf,
        args: &[String],
        deadline_unix: u64,
    ) -> Result<()> {
        let log = self.log_path(name);
        let component = Component::spawn(name, &program, args, log, deadline_unix)?;
        tracing::debug!(component = name, pid = component.pid(), "started");
        self.components.push(component);
        Ok(())
    }

    async fn wait_for_port(&mut self, what: &str, port: u16, deadline: Instant) -> Result<()> {
        loop {
            self.check_running()?;
            let connect = tokio::net::TcpStream::connect(("127.0.0.1", port));
            if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(1), connect).await {
                return Ok(());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "{what} did not listen on 127.0.0.1:{port} in time"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn wait_for_readyz(&mut self, admin: &kube::Client, deadline: Instant) -> Result<()> {
        loop {
            self.check_running()?;
            let request = http::Request::get("/readyz")
                .body(Vec::new())
                .context("building GET /readyz")?;
            let last = match timed(
                "GET /readyz",
                Duration::from_secs(5),
                admin.request_text(request),
            )
            .await
            {
                Ok(body) if body.trim() == "ok" => return Ok(()),
                Ok(body) => body,
                Err(e) => format!("{e:#}"),
            };
            anyhow::ensure!(
                Instant::now() < deadline,
                "kube-apiserver not ready in time; last /readyz: {last}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    async fn wait_for_default_service_account(
        &mut self,
        admin: &kube::Client,
        deadline: Instant,
    ) -> Result<()> {
        let accounts: Api<ServiceAccount> = Api::namespaced(admin.clone(), "default");
        loop {
            self.check_running()?;
            if let Ok(Some(_)) = timed(
                "get serviceaccount default/default",
                CALL_TIMEOUT,
                accounts.get_opt("default"),
            )
            .await
            {
                return Ok(());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "kube-controller-manager did not create ServiceAccount default/default in time"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

/// A client with one of the pki's client certificates.
async fn kubeconfig_client_for(
    cp: &ControlPlane,
    cert: &str,
    user_agent: &str,
) -> Result<kube::Client> {
    let path = cp.data_dir.join(format!("{cert}.kubeconfig"));
    kubeconfig::write(
        &path,
        &cp.server,
        &cp.ca_path,
        cert,
        kubeconfig::Credentials::ClientCert {
            cert: &cp.pki_dir.join(format!("{cert}.crt")),
            key: &cp.pki_dir.join(format!("{cert}.key")),
        },
    )?;
    kubeconfig::client(&path, user_agent).await
}

fn stop_all(mut components: Vec<Component>) {
    while let Some(mut component) = components.pop() {
        component.stop(Duration::from_secs(10));
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        drop(self.pod_lifecycle.take());
        stop_all(std::mem::take(&mut self.components));
        if std::thread::panicking() || self.keep_data_dir {
            eprintln!(
                "controlplane: data dir (logs, audit log) kept at {}",
                self.data_dir.display()
            );
        } else if let Err(e) = std::fs::remove_dir_all(&self.data_dir) {
            tracing::warn!(dir = %self.data_dir.display(), "removing the data dir: {e}");
        }
    }
}

/// The path of a repository file (`deploy/…`), from this crate's directory.
pub fn repo_path(relative: impl AsRef<Path>) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(relative)
}
