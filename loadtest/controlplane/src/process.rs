//! The processes a control plane is made of: each spawned with its output in a log file and
//! watched by a small external watchdog, stopped gracefully (SIGTERM, then SIGKILL).
//!
//! Signals only ever go to processes this module spawned, by their pid, and only while they have
//! not been reaped (so the pid cannot belong to anyone else yet).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

/// Kills the child when this process is gone (SIGKILL, a test aborted with Ctrl-C or by the
/// harness) or when the deadline (unix seconds) passes, whichever is first. It is what makes
/// `--max-seconds` and "stops on abort" hold even when no destructor runs.
const WATCHDOG: &str = r#"parent=$1 child=$2 deadline=$3
while kill -0 "$parent" 2>/dev/null && kill -0 "$child" 2>/dev/null && [ "$(date +%s)" -lt "$deadline" ]; do sleep 1; done
kill -0 "$child" 2>/dev/null || exit 0
kill -TERM "$child" 2>/dev/null
i=0
while kill -0 "$child" 2>/dev/null && [ "$i" -lt 10 ]; do sleep 1; i=$((i+1)); done
kill -KILL "$child" 2>/dev/null
exit 0"#;

pub(crate) struct Component {
    pub(crate) name: &'static str,
    child: Child,
    watchdog: Option<Child>,
    pub(crate) log_path: PathBuf,
    exit: Option<ExitStatus>,
    /// How it was started, for [`Component::kill_and_respawn`].
    program: PathBuf,
    pub(crate) args: Vec<String>,
    deadline_unix: u64,
}

/// The process and its watchdog, output appended to `log_path` (created when `fresh`).
fn start(
    name: &str,
    program: &Path,
    args: &[String],
    log_path: &Path,
    fresh: bool,
    deadline_unix: u64,
) -> Result<(Child, Child)> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .append(!fresh)
        .truncate(fresh)
        .open(log_path)
        .with_context(|| format!("opening {}", log_path.display()))?;
    let log_err = log.try_clone().context("duplicating the log file handle")?;
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        .spawn()
        .with_context(|| format!("starting {name} ({})", program.display()))?;
    let watchdog = Command::new("sh")
        .args(["-c", WATCHDOG, "controlplane-watchdog"])
        .arg(std::process::id().to_string())
        .arg(child.id().to_string())
        .arg(deadline_unix.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    match watchdog.context("starting the watchdog (sh)") {
        Ok(w) => Ok((child, w)),
        Err(e) => {
            // Without its watchdog a component could outlive an aborted test: refuse to run it.
            let _ = child.kill();
            let _ = child.wait();
            Err(e)
        }
    }
}

impl Component {
    pub(crate) fn spawn(
        name: &'static str,
        program: &Path,
        args: &[String],
        log_path: PathBuf,
        deadline_unix: u64,
    ) -> Result<Self> {
        let (child, watchdog) = start(name, program, args, &log_path, true, deadline_unix)?;
        Ok(Component {
            name,
            child,
            watchdog: Some(watchdog),
            log_path,
            exit: None,
            program: program.to_path_buf(),
            args: args.to_vec(),
            deadline_unix,
        })
    }

    /// SIGKILL (no chance to clean up, as a crashed or OOM-killed process), reaped here.
    pub(crate) fn kill(&mut self) {
        if self.exited().is_none() {
            // Still ours and unreaped, so the pid is this process.
            let _ = self.child.kill();
            self.exit = self.child.wait().ok();
        }
        if let Some(mut watchdog) = self.watchdog.take() {
            let _ = watchdog.kill();
            let _ = watchdog.wait();
        }
    }

    /// Start it again as it was started (same program, arguments and data), its output
    /// appended to the same log. It must have exited (see [`Component::kill`]).
    pub(crate) fn respawn(&mut self) -> Result<()> {
        anyhow::ensure!(
            self.exited().is_some(),
            "{} is still running: it is not started twice",
            self.name
        );
        let (child, watchdog) = start(
            self.name,
            &self.program,
            &self.args,
            &self.log_path,
            false,
            self.deadline_unix,
        )?;
        self.child = child;
        self.watchdog = Some(watchdog);
        self.exit = None;
        Ok(())
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `Some` once the process has exited (it is reaped here).
    pub(crate) fn exited(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none() {
            self.exit = self.child.try_wait().ok().flatten();
        }
        self.exit
    }

    /// The last `lines` lines of its log, for error messages.
    pub(crate) fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// An error naming the component, how it exited and the end of its log, if it has exited.
    pub(crate) fn check_running(&mut self) -> Result<()> {
        match self.exited() {
            None => Ok(()),
            Some(status) => anyhow::bail!(
                "{} exited ({status}); last lines of {}:\n{}",
                self.name,
                self.log_path.display(),
                self.log_tail(30)
            ),
        }
    }

    /// SIGTERM, up to `grace` to exit, then SIGKILL. Idempotent. Blocking (used from `Drop`).
    pub(crate) fn stop(&mut self, grace: Duration) {
        if self.exited().is_none() {
            // Still ours and unreaped, so the pid is this process.
            let _ = Command::new("kill")
                .args(["-TERM", &self.child.id().to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            let until = Instant::now() + grace;
            while self.exited().is_none() && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(50));
            }
            if self.exited().is_none() {
                tracing::warn!(
                    component = self.name,
                    "did not stop within {grace:?} of SIGTERM; killing it"
                );
                let _ = self.child.kill();
                self.exit = self.child.wait().ok();
            }
        }
        if let Some(mut watchdog) = self.watchdog.take() {
            let _ = watchdog.kill();
            let _ = watchdog.wait();
        }
    }
}

impl Drop for Component {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(10));
    }
}

/// A loopback port nobody listens on right now. Another process may take it before the
/// component binds it; the component then fails to start and says so in its log.
pub(crate) fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?;
    Ok(listener
        .local_addr()
        .context("reading the bound address")?
        .port())
}
