//! `kubesim`: serve the embedded Kubernetes API on a loopback address and write a kubeconfig
//! for it, until SIGINT or SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;

#[derive(Debug, Parser)]
#[command(
    name = "kubesim",
    version,
    about = "An embedded Kubernetes API server for tests and demos"
)]
struct Args {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, env = "KUBESIM_ADDR", default_value = "127.0.0.1:0")]
    addr: SocketAddr,
    /// Where to write a kubeconfig pointing at this server.
    #[arg(long, env = "KUBESIM_KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// Milliseconds from a pod being scheduled to it being Ready.
    #[arg(long, env = "KUBESIM_POD_READY_MS", default_value_t = 300)]
    pod_ready_ms: u64,
    /// Upper bound in milliseconds on how long a deleted pod stays Terminating.
    #[arg(long, env = "KUBESIM_POD_TERMINATE_MS", default_value_t = 500)]
    pod_terminate_ms: u64,
    /// Seconds of watch history kept before compaction (410 Gone for older resumes).
    #[arg(long, env = "KUBESIM_HISTORY_SECONDS", default_value_t = 300)]
    history_seconds: u64,
    /// The pod label the invariant recorder watches for `writer`.
    #[arg(long, env = "KUBESIM_ROLE_LABEL", default_value = "sts-role")]
    role_label: String,
    /// Serve as a fault-injecting proxy in front of the API server of this kubeconfig instead
    /// of the embedded API (faults set with `PUT /sim/faults` as on the embedded server;
    /// clients' own bearer tokens are forwarded). `--kubeconfig` then gets a copy of this one
    /// pointing at the proxy.
    #[arg(long, env = "KUBESIM_UPSTREAM")]
    upstream: Option<PathBuf>,
}

/// `kubesim --upstream`: the proxy until SIGINT or SIGTERM.
async fn proxy(args: &Args, upstream: &std::path::Path) -> anyhow::Result<()> {
    let proxy = kubesim::proxy::Proxy::start(args.addr, upstream).await?;
    if let Some(path) = &args.kubeconfig {
        let k = proxy.kubeconfig(upstream)?;
        let yaml = serde_json::to_vec_pretty(&k).context("encoding the kubeconfig")?;
        std::fs::write(path, yaml).with_context(|| format!("writing {}", path.display()))?;
    }
    println!("kubesim proxying {} on {}", upstream.display(), proxy.url());
    shutdown_signal().await?;
    eprintln!("kubesim: shutting down");
    Ok(())
}

async fn shutdown_signal() -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing SIGTERM handler")?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("waiting for SIGINT")?,
        _ = term.recv() => {}
    }
    Ok(())
}

/// mimalloc: the store clones and frees JSON trees on every write, which glibc's malloc
/// serves at several times the cost.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    if let Some(upstream) = &args.upstream {
        return proxy(&args, upstream).await;
    }
    let mut cfg = kubesim::SimConfig::default();
    cfg.controllers.pod_ready_delay = Duration::from_millis(args.pod_ready_ms);
    cfg.controllers.pod_terminate_delay = Duration::from_millis(args.pod_terminate_ms);
    cfg.store.history_window = Duration::from_secs(args.history_seconds);
    cfg.store.role_label = args.role_label;
    let mut sim = kubesim::Sim::start(cfg);
    let addr = sim.serve(args.addr).await?;
    if let Some(path) = &args.kubeconfig {
        sim.write_kubeconfig(path)?;
    }
    println!("kubesim listening on http://{addr}");
    shutdown_signal().await?;
    eprintln!("kubesim: shutting down");
    drop(sim);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn args_are_consistent() {
        Args::command().debug_assert();
    }
}
