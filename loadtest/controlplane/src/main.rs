//! `controlplane up`: a real control plane on loopback for a person with kubectl.
//! `controlplane build`: builds (or finds) the binaries and prints their directory.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use controlplane::{Binaries, ControlPlane, Options, PodLifecycleOptions};

#[derive(Parser, Debug)]
#[command(
    name = "controlplane",
    about = "A real kube-apiserver, kube-controller-manager and etcd on loopback"
)]
struct Args {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Start a control plane, print its kubeconfig, run until Ctrl-C/SIGTERM or --max-seconds.
    Up(Up),
    /// Build the binaries (or reuse a build) and print their directory.
    Build,
}

#[derive(Parser, Debug)]
struct Up {
    /// Stop after this many seconds (also enforced by a watchdog if this process is killed).
    #[arg(long, env = "STSLOCK_CP_MAX_SECONDS", default_value_t = 3600)]
    max_seconds: u64,
    /// Fake Nodes for the pod-lifecycle stand-in (0: no stand-in, pods stay Pending).
    #[arg(long, env = "STSLOCK_CP_NODES", default_value_t = 1)]
    nodes: usize,
    /// Milliseconds between binding a pod and marking it Running and Ready.
    #[arg(long, env = "STSLOCK_CP_READY_AFTER_MS", default_value_t = 500)]
    ready_after_ms: u64,
    /// Data dir (must not exist or be empty); default: a fresh temp dir.
    #[arg(long, env = "STSLOCK_CP_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Keep the data dir after stopping.
    #[arg(long, env = "STSLOCK_CP_KEEP_DATA")]
    keep_data: bool,
    /// Also install the operator's identity from this RBAC dir (e.g. deploy/rbac) and write
    /// a kubeconfig with its ServiceAccount token.
    #[arg(long, env = "STSLOCK_CP_OPERATOR_RBAC")]
    operator_rbac: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                // kube's client logs every failed request as an error; while the apiserver
                // starts, those are expected (the launcher reports what finally fails).
                .unwrap_or_else(|_| {
                    tracing_subscriber::EnvFilter::new("warn,kube_client::client::builder=off")
                }),
        )
        .with_writer(std::io::stderr)
        .init();
    match Args::parse().command {
        Cmd::Build => {
            let binaries = Binaries::build_or_reuse(Options::default().build_timeout).await?;
            println!("{}", binaries.dir.display());
            Ok(())
        }
        Cmd::Up(up) => run_up(up).await,
    }
}

async fn run_up(up: Up) -> Result<()> {
    let started = Instant::now();
    let max = Duration::from_secs(up.max_seconds);
    let opts = Options {
        data_dir: up.data_dir,
        keep_data_dir: up.keep_data,
        max_lifetime: max,
        pod_lifecycle: (up.nodes > 0).then(|| PodLifecycleOptions {
            nodes: up.nodes,
            ready_after: Duration::from_millis(up.ready_after_ms),
            ..PodLifecycleOptions::default()
        }),
        ..Options::default()
    };
    let cp = ControlPlane::start(opts).await?;
    let operator = match &up.operator_rbac {
        Some(dir) => Some(
            cp.install_operator_identity(
                dir,
                "stslock",
                Duration::from_secs(up.max_seconds.max(600)),
            )
            .await?,
        ),
        None => None,
    };
    let kubectl = controlplane::kubectl()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|e| format!("kubectl  # ({e:#})"));
    println!(
        "control plane ready in {:.1} s at {}",
        started.elapsed().as_secs_f64(),
        cp.server
    );
    println!("binaries:    {}", cp.binaries.dir.display());
    println!("kubeconfig:  {}", cp.kubeconfig_path.display());
    println!("audit log:   {}", cp.audit_log_path.display());
    println!("logs:        {}", cp.data_dir.join("logs").display());
    if let Some(op) = &operator {
        println!(
            "operator:    {} ({})",
            op.kubeconfig_path.display(),
            op.username
        );
    }
    println!();
    println!("  export KUBECONFIG={}", cp.kubeconfig_path.display());
    println!("  {kubectl} get --raw /readyz");
    println!("  {kubectl} apply -f deploy/crd/app.anukkrit.me_statefulsetlocks.yaml");
    println!();
    println!("stops on Ctrl-C, SIGTERM or after {} s", up.max_seconds);

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("SIGTERM handler")?;
    let remaining = max.saturating_sub(started.elapsed());
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("waiting for Ctrl-C")?,
        _ = term.recv() => {}
        _ = tokio::time::sleep(remaining) => eprintln!("--max-seconds reached"),
    }
    eprintln!("stopping");
    cp.stop().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn args() {
        Args::command().debug_assert();
    }
}
