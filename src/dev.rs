//! `stslock dev`: the whole story on one machine. Starts kubesim on 127.0.0.1, writes a
//! kubeconfig for `kubectl`, installs the CRD, applies the seed's samples, and runs the
//! operator against it until Ctrl-C.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use kube::api::{DynamicObject, Patch, PatchParams};
use kube::core::GroupVersionKind;
use kube::discovery::pinned_kind;
use kube::{Api, Client, CustomResourceExt};

use crate::api::StatefulSetLock;

/// The seed's samples, verbatim (deploy/samples/).
pub const SAMPLES: &[(&str, &str)] = &[
    (
        "postgres-statefulset.yaml",
        include_str!("../deploy/samples/postgres-statefulset.yaml"),
    ),
    (
        "postgres-services.yaml",
        include_str!("../deploy/samples/postgres-services.yaml"),
    ),
    (
        "app_v1_statefulsetlock.yaml",
        include_str!("../deploy/samples/app_v1_statefulsetlock.yaml"),
    ),
];

#[derive(Debug, Clone, Args)]
pub struct DevArgs {
    /// Address kubesim listens on (port 0 picks a free one).
    #[arg(long, env = "STSLOCK_DEV_ADDR", default_value = "127.0.0.1:0")]
    pub addr: SocketAddr,
    /// Where to write the kubeconfig for kubectl.
    #[arg(
        long,
        env = "STSLOCK_DEV_KUBECONFIG",
        default_value = "./stslock-dev.kubeconfig"
    )]
    pub kubeconfig_out: PathBuf,
    /// Do not apply the seed's samples.
    #[arg(long)]
    pub no_samples: bool,
    /// Operator replicas (shards) to run, as `stslock-0`, `stslock-1`, ...
    #[arg(long, env = "STSLOCK_DEV_SHARDS", default_value_t = 3)]
    pub shards: usize,
    /// Export traces over OTLP/gRPC to this endpoint (e.g. http://127.0.0.1:4317); without
    /// it the standard OTEL_EXPORTER_OTLP_ENDPOINT applies.
    #[arg(long, env = "STSLOCK_DEV_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
}

/// Install (server-side apply) the StatefulSetLock CRD.
pub async fn install_crd(client: &Client) -> anyhow::Result<()> {
    let crds: Api<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition> =
        Api::all(client.clone());
    let crd = StatefulSetLock::crd();
    let name = crd.metadata.name.clone().unwrap_or_default();
    crds.patch(
        &name,
        &PatchParams::apply("stslock").force(),
        &Patch::Apply(&crd),
    )
    .await
    .with_context(|| format!("installing CRD {name}"))?;
    Ok(())
}

/// Apply every document of a multi-document YAML file with server-side apply.
pub async fn apply_yaml(
    client: &Client,
    namespace: &str,
    source: &str,
    yaml: &str,
) -> anyhow::Result<Vec<String>> {
    let docs: Vec<serde_json::Value> =
        serde_saphyr::from_multiple(yaml).with_context(|| format!("parsing {source}"))?;
    let mut applied = vec![];
    for doc in docs.into_iter().filter(|d| d.is_object()) {
        let obj: DynamicObject = serde_json::from_value(doc)
            .with_context(|| format!("reading an object of {source}"))?;
        let types = obj
            .types
            .clone()
            .with_context(|| format!("{source}: object without apiVersion/kind"))?;
        let gvk = GroupVersionKind::try_from(&types)
            .with_context(|| format!("{source}: bad apiVersion"))?;
        let (ar, caps) = pinned_kind(client, &gvk)
            .await
            .with_context(|| format!("{source}: kind {} is not served", gvk.kind))?;
        let api: Api<DynamicObject> = if caps.scope == kube::discovery::Scope::Namespaced {
            Api::namespaced_with(client.clone(), namespace, &ar)
        } else {
            Api::all_with(client.clone(), &ar)
        };
        let name = obj
            .metadata
            .name
            .clone()
            .with_context(|| format!("{source}: object without a name"))?;
        api.patch(
            &name,
            &PatchParams::apply("stslock-dev").force(),
            &Patch::Apply(&obj),
        )
        .await
        .with_context(|| format!("applying {} {name} from {source}", gvk.kind))?;
        applied.push(format!("{}/{name}", gvk.kind.to_lowercase()));
    }
    Ok(applied)
}

pub async fn apply_samples(client: &Client) -> anyhow::Result<Vec<String>> {
    let mut all = vec![];
    for (file, yaml) in SAMPLES {
        all.extend(apply_yaml(client, "default", file, yaml).await?);
    }
    Ok(all)
}

pub fn banner(url: &str, kubeconfig: &std::path::Path) -> String {
    let kc = kubeconfig.display();
    format!(
        "stslock dev: kubesim listening on {url}
kubeconfig written to {kc}

In another terminal:
  export KUBECONFIG={kc}
  kubectl get ssl -o wide                          # the lock: writer, epoch, Available, shard
  kubectl get pods -l app=postgres --show-labels   # sts-role=writer on one pod, reader on the others
  kubectl get lease postgres-cluster-leader-lease -o yaml
  kubectl describe ssl postgres-cluster-lock       # the Events: election, failovers

Fail the writer and watch the failover:
  kubectl patch pod postgres-cluster-0 --subresource=status -p '{{\"status\":{{\"conditions\":[{{\"type\":\"Ready\",\"status\":\"False\"}}]}}}}'
  kubectl delete pod postgres-cluster-1            # or delete the writer
Ctrl-C stops everything.
"
    )
}

/// Shard `i`'s metrics address: one port per shard from `--metrics-addr` (port 0 stays 0, a
/// free port for each), since all shards share this machine.
pub fn shard_metrics_addr(base: SocketAddr, i: usize) -> SocketAddr {
    let port = match base.port() {
        0 => 0,
        p => p.saturating_add(u16::try_from(i).unwrap_or(u16::MAX)),
    };
    SocketAddr::new(base.ip(), port)
}

/// `stslock dev` is a single-machine tool: an address on every interface (the `run` default)
/// becomes the same port on loopback. A specific address is kept.
pub fn loopback(addr: SocketAddr) -> SocketAddr {
    if addr.ip().is_unspecified() {
        SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), addr.port())
    } else {
        addr
    }
}

/// Run kubesim, install the CRD, apply the samples, run the operator until `shutdown`.
pub async fn run(
    dev: DevArgs,
    operator: crate::config::OperatorArgs,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let mut sim = kubesim::Sim::start(kubesim::SimConfig::default());
    let addr = sim.serve(dev.addr).await?;
    sim.write_kubeconfig(&dev.kubeconfig_out)?;
    let client = sim.client_as("stslock-dev/setup");
    install_crd(&client).await?;
    if !dev.no_samples {
        let applied = apply_samples(&client).await?;
        tracing::info!(objects = ?applied, "applied the seed's samples");
    }
    eprintln!("{}", banner(&format!("http://{addr}"), &dev.kubeconfig_out));
    // Every shard is a full operator replica with its own identity and User-Agent (what
    // kubesim's partitions select on); they split the locks through their membership Leases.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut replicas = vec![];
    for i in 0..dev.shards.max(1) {
        let mut args = operator.clone();
        let id = format!("stslock-{i}");
        args.shard_id = Some(id.clone());
        args.metrics_addr = shard_metrics_addr(loopback(operator.metrics_addr), i);
        let client = sim.client_as(&format!("stslock/{id}"));
        let mut stop = stop_rx.clone();
        let (bound_tx, bound_rx) = tokio::sync::oneshot::channel();
        let options = crate::replica::RunOptions {
            metrics_bound: Some(bound_tx),
        };
        let shard = id.clone();
        replicas.push(tokio::spawn(async move {
            let shutdown = async move {
                let _ = stop.wait_for(|s| *s).await;
            };
            if let Err(e) = crate::replica::run_with(client, args, shutdown, options).await {
                tracing::error!(error = %e, shard = %shard, "operator replica stopped");
            }
        }));
        match bound_rx.await {
            Ok(addr) => eprintln!(
                "shard {id}: http://{addr}/metrics  http://{addr}/readyz  http://{addr}/healthz"
            ),
            Err(_) => anyhow::bail!("shard {id} stopped before serving its metrics"),
        }
    }
    shutdown.await;
    let _ = stop_tx.send(true);
    for r in replicas {
        let _ = r.await;
    }
    drop(sim);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_shard_gets_its_own_metrics_port() {
        let base: SocketAddr = "127.0.0.1:8080".parse().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(shard_metrics_addr(base, 0), base);
        let everywhere: SocketAddr = "0.0.0.0:8080".parse().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            loopback(everywhere),
            "127.0.0.1:8080".parse().unwrap_or_else(|e| panic!("{e}"))
        );
        assert_eq!(loopback(base), base, "a chosen address is kept");
        assert_eq!(
            shard_metrics_addr(base, 2),
            "127.0.0.1:8082".parse().unwrap_or_else(|e| panic!("{e}"))
        );
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(shard_metrics_addr(any, 5), any);
        let top: SocketAddr = "0.0.0.0:65535".parse().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(shard_metrics_addr(top, 3).port(), 65535);
    }
}
