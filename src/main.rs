//! The `stslock` command line: `run` (the operator), `dev` (kubesim + operator + samples),
//! `crd` (print the CRD).

use anyhow::Context;
use clap::{Parser, Subcommand};

use stslock::config::OperatorArgs;

/// jemalloc, not glibc's malloc: a replica holds many small objects that a burst of handoffs
/// allocates from several threads, and glibc's per-thread arenas kept about a third more than
/// the live heap (see `Cargo.toml`).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

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
    /// The kubectl plugin (`kubectl stslock …`: link this binary as `kubectl-stslock` on
    /// PATH); `stslock kubectl --help` lists its commands.
    #[command(disable_help_flag = true)]
    Kubectl {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

/// Logs (and traces, when OTLP is configured); the guard flushes traces on the way out.
fn init_telemetry(
    args: &OperatorArgs,
    otlp: stslock::telemetry::Otlp,
    shard: Option<String>,
) -> anyhow::Result<stslock::telemetry::TelemetryGuard> {
    stslock::telemetry::init(&stslock::telemetry::TelemetryConfig {
        json_logs: args.log_format == stslock::config::LogFormat::Json,
        otlp,
        shard,
        ..Default::default()
    })
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
    let config = stslock::config::kube_config(args.kubeconfig.as_deref(), None).await?;
    kube::Client::try_from(config).context("building the Kubernetes client")
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Installed (or linked) as `kubectl-stslock`, kubectl runs it as `kubectl stslock …`.
    let invoked_as = std::env::args_os()
        .next()
        .and_then(|a| {
            std::path::Path::new(&a)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
        })
        .unwrap_or_default();
    if invoked_as.starts_with("kubectl-stslock") {
        return plugin(stslock::plugin::PluginCli::parse()).await;
    }
    let cli = Cli::parse();
    match cli.command {
        Command::Kubectl { args } => {
            let argv = std::iter::once("kubectl-stslock".to_string()).chain(args);
            return plugin(stslock::plugin::PluginCli::parse_from(argv)).await;
        }
        Command::Crd => {
            print!("{}", stslock::api::crd_yaml()?);
        }
        Command::Run(args) => {
            args.validate()
                .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
            let telemetry = init_telemetry(
                &args,
                stslock::telemetry::Otlp::FromEnv,
                Some(args.identity()),
            )?;
            let client = client_for(&args).await?;
            let result = stslock::replica::run(client, args, shutdown_signal()).await;
            telemetry.shutdown().await;
            result?;
        }
        #[cfg(feature = "dev")]
        Command::Dev { dev, operator } => {
            let otlp = match &dev.otlp_endpoint {
                Some(e) => stslock::telemetry::Otlp::Endpoint(e.clone()),
                None => stslock::telemetry::Otlp::FromEnv,
            };
            // Several shards share this process: the shard is on each span, not the resource.
            let telemetry = init_telemetry(&operator, otlp, None)?;
            let result = stslock::dev::run(dev, operator, shutdown_signal()).await;
            telemetry.shutdown().await;
            result?;
        }
    }
    Ok(())
}

async fn plugin(cli: stslock::plugin::PluginCli) -> anyhow::Result<()> {
    stslock::plugin::run(cli, &mut std::io::stdout().lock()).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
        stslock::plugin::PluginCli::command().debug_assert();
    }

    #[test]
    fn the_plugin_gets_its_own_help_and_flags() {
        let cli = Cli::try_parse_from(["stslock", "kubectl", "--help"]).expect("passed through");
        assert!(
            matches!(&cli.command, Command::Kubectl { args } if args == &["--help"]),
            "{cli:?}"
        );
        let err = stslock::plugin::PluginCli::try_parse_from([
            "kubectl-stslock",
            "--request-timeout",
            "0",
            "status",
        ])
        .expect_err("a zero request timeout");
        assert!(err.to_string().contains("must be above zero"), "{err}");
    }
}
