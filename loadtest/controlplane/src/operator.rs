//! The operator under test as a real client: its namespace, its ServiceAccount and exactly
//! the repository's `deploy/rbac/` manifests, and credentials from the TokenRequest API.
//! Nothing here hands out admin credentials to the operator.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams};
use kube::discovery::{self, Scope};
use kube::{Api, Client};

use crate::pod_lifecycle::is_status;
use crate::{CALL_TIMEOUT, ControlPlane, kubeconfig, timed};

/// Where `deploy/default/kustomization.yaml` puts the operator.
pub const NAMESPACE: &str = "stslock-system";
pub const SERVICE_ACCOUNT: &str = "stslock";

/// The operator's identity on a control plane.
#[derive(Clone, Debug)]
pub struct OperatorIdentity {
    /// `system:serviceaccount:stslock-system:stslock`: what the audit log records as user.
    pub username: String,
    /// Server, CA and the bound ServiceAccount token (no client certificate).
    pub kubeconfig_path: PathBuf,
    pub user_agent: String,
}

impl OperatorIdentity {
    /// A client authenticated by the token, over TLS verified against the control plane's CA.
    pub async fn client(&self) -> Result<Client> {
        kubeconfig::client(&self.kubeconfig_path, &self.user_agent).await
    }
}

impl ControlPlane {
    /// Creates namespace `stslock-system`, applies the manifests `rbac_dir/kustomization.yaml`
    /// lists (namespaced ones into `stslock-system`, as `deploy/default` does), checks that they
    /// include ServiceAccount `stslock`, and returns credentials for that ServiceAccount from
    /// the TokenRequest API, valid for `token_lifetime`. Requests with them carry `user_agent`.
    pub async fn install_operator_identity(
        &self,
        rbac_dir: &Path,
        user_agent: &str,
        token_lifetime: Duration,
    ) -> Result<OperatorIdentity> {
        let admin = self.admin_client().await?;
        let token = issue_operator_token(&admin, rbac_dir, token_lifetime).await?;
        let kubeconfig_path = self.data_dir.join("operator.kubeconfig");
        let username = operator_username();
        kubeconfig::write(
            &kubeconfig_path,
            &self.server,
            &self.ca_path,
            &username,
            kubeconfig::Credentials::Token(&token),
        )?;
        Ok(OperatorIdentity {
            username,
            kubeconfig_path,
            user_agent: user_agent.to_string(),
        })
    }
}

/// What the audit log records as the operator's user.
pub fn operator_username() -> String {
    format!("system:serviceaccount:{NAMESPACE}:{SERVICE_ACCOUNT}")
}

/// [`ControlPlane::install_operator_identity`] on any cluster: `admin_kubeconfig` (its current
/// context) creates the namespace, applies `rbac_dir` and requests the token; the operator's
/// kubeconfig, written to `out`, keeps only that context's cluster (server, CA) and carries the
/// token as its one credential.
pub async fn install_operator_identity_with_kubeconfig(
    admin_kubeconfig: &Path,
    out: &Path,
    rbac_dir: &Path,
    user_agent: &str,
    token_lifetime: Duration,
) -> Result<OperatorIdentity> {
    let admin = kubeconfig::client(admin_kubeconfig, "controlplane-admin").await?;
    let token = issue_operator_token(&admin, rbac_dir, token_lifetime).await?;
    let config = kube::config::Kubeconfig::read_from(admin_kubeconfig)
        .with_context(|| format!("reading {}", admin_kubeconfig.display()))?;
    let context = config
        .current_context
        .as_deref()
        .context("the admin kubeconfig has no current-context")?;
    let cluster_name = config
        .contexts
        .iter()
        .find(|c| c.name == context)
        .and_then(|c| c.context.as_ref())
        .map(|c| c.cluster.clone())
        .with_context(|| format!("context {context} is not in the admin kubeconfig"))?;
    let cluster = config
        .clusters
        .iter()
        .find(|c| c.name == cluster_name)
        .and_then(|c| c.cluster.as_ref())
        .with_context(|| format!("cluster {cluster_name} is not in the admin kubeconfig"))?;
    // `read_from` made a CA file path absolute already.
    let cluster = serde_json::to_value(cluster).context("serializing the cluster")?;
    let username = operator_username();
    kubeconfig::write_with_cluster(
        out,
        cluster,
        &username,
        kubeconfig::Credentials::Token(&token),
    )?;
    Ok(OperatorIdentity {
        username,
        kubeconfig_path: out.to_path_buf(),
        user_agent: user_agent.to_string(),
    })
}

/// Creates namespace `stslock-system`, applies the manifests `rbac_dir/kustomization.yaml`
/// lists, checks that they include ServiceAccount `stslock` and returns a token for it from
/// the TokenRequest API.
async fn issue_operator_token(
    admin: &Client,
    rbac_dir: &Path,
    token_lifetime: Duration,
) -> Result<String> {
    let namespaces: Api<Namespace> = Api::all(admin.clone());
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some(NAMESPACE.to_string()),
            ..ObjectMeta::default()
        },
        ..Namespace::default()
    };
    match timed(
        "create namespace stslock-system",
        CALL_TIMEOUT,
        namespaces.create(&PostParams::default(), &ns),
    )
    .await
    {
        Ok(_) => {}
        Err(e) if is_status(&e, 409) => {}
        Err(e) => return Err(e),
    }

    let mut service_account_applied = false;
    for file in kustomization_resources(rbac_dir)? {
        let text = std::fs::read_to_string(&file)
            .with_context(|| format!("reading {}", file.display()))?;
        let docs: Vec<DynamicObject> = serde_saphyr::from_multiple(&text)
            .with_context(|| format!("parsing {}", file.display()))?;
        for doc in docs {
            let (kind, name) = apply(admin, doc)
                .await
                .with_context(|| format!("applying {}", file.display()))?;
            service_account_applied |= kind == "ServiceAccount" && name == SERVICE_ACCOUNT;
        }
    }
    anyhow::ensure!(
        service_account_applied,
        "{} does not define ServiceAccount {SERVICE_ACCOUNT}",
        rbac_dir.display()
    );

    let accounts: Api<ServiceAccount> = Api::namespaced(admin.clone(), NAMESPACE);
    let request = TokenRequest {
        // No audiences: the apiserver's own (its issuer).
        spec: Some(TokenRequestSpec {
            expiration_seconds: Some(
                i64::try_from(token_lifetime.as_secs()).context("token lifetime")?,
            ),
            ..TokenRequestSpec::default()
        }),
        ..TokenRequest::default()
    };
    let issued = timed(
        "create token for serviceaccount stslock-system/stslock",
        CALL_TIMEOUT,
        accounts.create_token_request(SERVICE_ACCOUNT, &PostParams::default(), &request),
    )
    .await?;
    issued
        .status
        .and_then(|s| s.token)
        .context("TokenRequest answered without a token")
}

/// The files `kustomization.yaml` lists under `resources`, in its order.
fn kustomization_resources(dir: &Path) -> Result<Vec<PathBuf>> {
    #[derive(serde::Deserialize)]
    struct Kustomization {
        #[serde(default)]
        resources: Vec<String>,
        namespace: Option<String>,
        #[serde(rename = "namePrefix")]
        name_prefix: Option<String>,
    }
    let path = dir.join("kustomization.yaml");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let k: Kustomization =
        serde_saphyr::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    // Names and namespaces come from the manifests as they are; a kustomization that rewrites
    // them would make what is applied here differ from what `kubectl apply -k` applies.
    anyhow::ensure!(
        k.name_prefix.is_none() && k.namespace.as_deref().is_none_or(|n| n == NAMESPACE),
        "{} rewrites names or namespaces; not supported here",
        path.display()
    );
    Ok(k.resources.iter().map(|r| dir.join(r)).collect())
}

/// Server-side apply of one manifest; returns its kind and name.
async fn apply(client: &Client, mut obj: DynamicObject) -> Result<(String, String)> {
    let types = obj
        .types
        .clone()
        .context("manifest without apiVersion/kind")?;
    let gvk = GroupVersionKind::try_from(&types).context("apiVersion")?;
    let name = obj
        .metadata
        .name
        .clone()
        .context("manifest without metadata.name")?;
    let (resource, caps) = timed(
        &format!("discover {}", types.kind),
        CALL_TIMEOUT,
        discovery::pinned_kind(client, &gvk),
    )
    .await?;
    let api: Api<DynamicObject> = match caps.scope {
        Scope::Namespaced => {
            let ns = obj
                .metadata
                .namespace
                .get_or_insert_with(|| NAMESPACE.to_string())
                .clone();
            Api::namespaced_with(client.clone(), &ns, &resource)
        }
        Scope::Cluster => Api::all_with(client.clone(), &resource),
    };
    let params = PatchParams::apply("controlplane").force();
    timed(
        &format!("apply {} {name}", types.kind),
        CALL_TIMEOUT,
        api.patch(&name, &params, &Patch::Apply(&obj)),
    )
    .await?;
    Ok((types.kind, name))
}
