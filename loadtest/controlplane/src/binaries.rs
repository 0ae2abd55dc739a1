//! Where the control plane's binaries come from: `build.sh` beside this crate builds them
//! from the Go module (or reuses an earlier build) and prints their directory.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result};

/// Overrides the build: a directory that already holds the binaries.
pub const BIN_DIR_ENV: &str = "STSLOCK_CONTROLPLANE_BIN";

/// `loadtest/controlplane/build.sh` of this checkout.
pub fn build_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("build.sh")
}

/// The binaries of one build.
#[derive(Clone, Debug)]
pub struct Binaries {
    pub dir: PathBuf,
}

impl Binaries {
    pub fn etcd(&self) -> PathBuf {
        self.dir.join("etcd")
    }
    pub fn kube_apiserver(&self) -> PathBuf {
        self.dir.join("kube-apiserver")
    }
    pub fn kube_controller_manager(&self) -> PathBuf {
        self.dir.join("kube-controller-manager")
    }
    pub fn pki(&self) -> PathBuf {
        self.dir.join("pki")
    }

    fn check(self) -> Result<Self> {
        for bin in [
            self.etcd(),
            self.kube_apiserver(),
            self.kube_controller_manager(),
            self.pki(),
        ] {
            anyhow::ensure!(bin.is_file(), "{} is missing", bin.display());
        }
        Ok(self)
    }

    /// `$STSLOCK_CONTROLPLANE_BIN` if set, else what `build.sh` builds or reuses. A cold build
    /// takes tens of minutes; its progress goes to stderr.
    pub async fn build_or_reuse(timeout: Duration) -> Result<Self> {
        if let Some(dir) = std::env::var_os(BIN_DIR_ENV) {
            return Binaries {
                dir: PathBuf::from(dir),
            }
            .check()
            .with_context(|| format!("${BIN_DIR_ENV}"));
        }
        Self::build_with(&build_script(), timeout).await
    }

    pub async fn build_with(script: &Path, timeout: Duration) -> Result<Self> {
        let mut cmd = tokio::process::Command::new(script);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        let output = tokio::time::timeout(timeout, cmd.output())
            .await
            .with_context(|| format!("{} did not finish within {timeout:?}", script.display()))?
            .with_context(|| format!("running {}", script.display()))?;
        anyhow::ensure!(
            output.status.success(),
            "{} failed ({})",
            script.display(),
            output.status
        );
        let stdout = String::from_utf8_lossy(&output.stdout);
        let dir = stdout
            .lines()
            .last()
            .with_context(|| format!("{} printed no directory", script.display()))?;
        Binaries {
            dir: PathBuf::from(dir.trim()),
        }
        .check()
    }
}
