//! The `stslock` command line: `run` (the operator), `dev` (kubesim + operator + samples),
//! `crd` (print the CRD).

use anyhow::Context;
use clap::{Parser, Subcommand};

use stslock::config::OperatorArgs;

#[derive(Debug, Parser)]
#[command(
    name = "stslock",
    version,
    about = "Writer election for StatefulSets, backed by Leases"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the operator against the cluster of the kubeconfig (or in-cluster config).
    Run(OperatorArgs),
    /// Run kubesim, the operator and the seed's samples on this machine, for kubectl.
    #[cfg(feature = "dev")]
    Dev {
        #[command(flatten)]
        dev: stslock::dev::DevArgs,
        #[command(flatten)]
        operator: OperatorArgs,
    },
    /// Print the StatefulSetLock CRD as YAML.
    Crd,
}

fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,kube=warn")),
        )
        .with_writer(std::io::stderr)
        .init();
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
    tracing::info!("shutdown requested");
}

async fn client_for(args: &OperatorArgs) -> anyhow::Result<kube::Client> {
    let config = match &args.kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .with_context(|| format!("loading kubeconfig {}", path.display()))?
        }
        None => kube::Config::infer()
            .await
            .context("no kubeconfig ($KUBECONFIG, ~/.kube/config) and not running in a cluster")?,
    };
    kube::Client::try_from(config).context("building the Kubernetes client")
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Crd => {
            print!("{}", stslock::api::crd_yaml()?);
        }
        Command::Run(args) => {
            init_logging();
            let client = client_for(&args).await?;
            stslock::reconcile::run(client, args, shutdown_signal()).await?;
        }
        #[cfg(feature = "dev")]
        Command::Dev { dev, operator } => {
            init_logging();
            stslock::dev::run(dev, operator, shutdown_signal()).await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }
}
