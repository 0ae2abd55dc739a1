//! Kubeconfig files for the control plane's users (written as JSON, which is YAML) and
//! clients built from them. Every client gets a User-Agent of its own, so the audit log and
//! the apiserver's metrics tell the users apart.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use http::{HeaderValue, header};
use kube::config::{KubeConfigOptions, Kubeconfig};

pub(crate) enum Credentials<'a> {
    ClientCert { cert: &'a Path, key: &'a Path },
    Token(&'a str),
}

/// Writes a kubeconfig with one cluster, user and (current) context, readable by its owner only.
pub(crate) fn write(
    path: &Path,
    server: &str,
    ca: &Path,
    user: &str,
    credentials: Credentials<'_>,
) -> Result<()> {
    let cluster = serde_json::json!({ "server": server, "certificate-authority": ca });
    write_with_cluster(path, cluster, user, credentials)
}

/// Writes a kubeconfig with the given cluster entry (`server`, CA, …) and one user.
pub(crate) fn write_with_cluster(
    path: &Path,
    cluster: serde_json::Value,
    user: &str,
    credentials: Credentials<'_>,
) -> Result<()> {
    let user_entry = match credentials {
        Credentials::ClientCert { cert, key } => serde_json::json!({
            "client-certificate": cert, "client-key": key,
        }),
        Credentials::Token(token) => serde_json::json!({ "token": token }),
    };
    let doc = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{ "name": "controlplane", "cluster": cluster }],
        "users": [{ "name": user, "user": user_entry }],
        "contexts": [{ "name": user, "context": { "cluster": "controlplane", "user": user } }],
        "current-context": user,
    });
    let text = serde_json::to_string_pretty(&doc).context("serializing the kubeconfig")?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(text.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}

/// A client from a kubeconfig file, with `user_agent` and a connect timeout. Request
/// timeouts are the caller's (watches must be allowed to stay open).
pub async fn client(path: &Path, user_agent: &str) -> Result<kube::Client> {
    let kubeconfig =
        Kubeconfig::read_from(path).with_context(|| format!("reading {}", path.display()))?;
    let mut config =
        kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
            .await
            .with_context(|| format!("loading {}", path.display()))?;
    config.connect_timeout = Some(Duration::from_secs(5));
    let agent =
        HeaderValue::from_str(user_agent).with_context(|| format!("User-Agent {user_agent:?}"))?;
    config.headers.push((header::USER_AGENT, agent));
    kube::Client::try_from(config)
        .with_context(|| format!("building a client from {}", path.display()))
}
