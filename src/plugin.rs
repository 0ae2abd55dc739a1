//! `kubectl stslock`: the operator's kubectl plugin (the `stslock` binary installed, or linked,
//! as `kubectl-stslock` on `PATH`; `stslock kubectl …` is the same). Modelled on CloudNativePG's
//! `kubectl cnpg`:
//!
//! - `status`: the fleet at a glance — locks by condition, the ones without a writer, locks per
//!   shard with each shard's membership Lease, the last writer changes.
//! - `switchover LOCK [--to POD]`: sets `spec.preferredWriter` and waits until that pod is the
//!   writer (label and status), or says why not.
//! - `pause LOCK` / `resume LOCK`: sets `spec.paused` and waits until the operator has seen it.
//! - `why LOCK`: what the operator last decided and why — conditions, the Lease, the pods'
//!   roles, the lock's recent Events with their trace ids.
//!
//! Everything it reads and writes goes through the API server with the caller's kubeconfig
//! (`--kubeconfig`, `--context`, `-n`, as kubectl), every call under `--request-timeout`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, bail};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::events::v1::Event;
use kube::api::{ListParams, Patch, PatchParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;

use crate::api::{Condition, SHARD_LABEL, StatefulSetLock};

/// `kubectl stslock` (argv[0] `kubectl-stslock`).
#[derive(Debug, clap::Parser)]
#[command(
    name = "kubectl-stslock",
    version,
    about = "Inspect and drive stslock's writer election from kubectl"
)]
pub struct PluginCli {
    /// Path to the kubeconfig file (default: $KUBECONFIG, then ~/.kube/config).
    #[arg(long, global = true)]
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context to use.
    #[arg(long, global = true)]
    pub context: Option<String>,
    /// Namespace of the lock (default: the context's, else `default`).
    #[arg(short, long, global = true)]
    pub namespace: Option<String>,
    /// The pod label that carries the role (the operator's `--role-label`).
    #[arg(long, global = true, default_value = "sts-role")]
    pub role_label: String,
    /// Timeout of each API call (e.g. `10s`, `1m`).
    #[arg(long, global = true, default_value = "10s", value_parser = parse_request_timeout)]
    pub request_timeout: Duration,
    #[command(subcommand)]
    pub command: PluginCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum PluginCommand {
    /// Locks by condition, locks without a writer, locks per shard, the last writer changes.
    Status {
        /// Every namespace instead of one.
        #[arg(short = 'A', long)]
        all_namespaces: bool,
        /// How many recent writer changes (elections, failovers, switchovers) to list.
        #[arg(long, default_value_t = 10)]
        changes: usize,
    },
    /// Hand the writer role to another Ready pod (sets `spec.preferredWriter`) and wait for it.
    Switchover {
        /// The StatefulSetLock.
        lock: String,
        /// The pod to promote (default: the Ready reader with the lowest ordinal).
        #[arg(long)]
        to: Option<String>,
        /// How long to wait for the new writer (e.g. `60s`).
        #[arg(long, default_value = "60s", value_parser = parse_duration)]
        timeout: Duration,
    },
    /// Freeze the lock's roles: no relabelling and no Lease transitions until `resume`.
    Pause {
        lock: String,
        /// How long to wait for the operator to see it.
        #[arg(long, default_value = "30s", value_parser = parse_duration)]
        timeout: Duration,
    },
    /// Undo `pause`: elections and failovers resume.
    Resume {
        lock: String,
        /// How long to wait for the operator to see it.
        #[arg(long, default_value = "30s", value_parser = parse_duration)]
        timeout: Duration,
    },
    /// What the operator last decided for a lock, and why.
    Why {
        lock: String,
        /// How many recent Events to show.
        #[arg(long, default_value_t = 10)]
        events: usize,
    },
}

/// `90`, `90s`, `2m`, `1h`, `500ms`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map_or((s, ""), |i| s.split_at(i));
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (e.g. 30s, 2m, 500ms)"))?;
    let secs = match unit {
        "" | "s" => n,
        "ms" => n / 1000.0,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        other => return Err(format!("{s:?}: unknown unit {other:?} (ms, s, m, h)")),
    };
    Duration::try_from_secs_f64(secs).map_err(|e| format!("{s:?}: {e}"))
}

/// A request timeout: a duration above zero (every API call has one).
fn parse_request_timeout(s: &str) -> Result<Duration, String> {
    parse_duration(s).and_then(|d| {
        if d.is_zero() {
            Err("must be above zero: every API call has a timeout".into())
        } else {
            Ok(d)
        }
    })
}

/// Run the plugin; what it prints goes to `out`.
pub async fn run(cli: PluginCli, out: &mut impl std::io::Write) -> anyhow::Result<()> {
    let (client, default_ns) = connect(&cli).await?;
    let ns = cli.namespace.clone().unwrap_or(default_ns);
    let p = Plugin {
        client,
        ns,
        role_label: cli.role_label.clone(),
        timeout: cli.request_timeout,
    };
    let text = match cli.command {
        PluginCommand::Status {
            all_namespaces,
            changes,
        } => p.status(all_namespaces, changes).await?,
        PluginCommand::Switchover { lock, to, timeout } => {
            p.switchover(&lock, to.as_deref(), timeout).await?
        }
        PluginCommand::Pause { lock, timeout } => p.set_paused(&lock, true, timeout).await?,
        PluginCommand::Resume { lock, timeout } => p.set_paused(&lock, false, timeout).await?,
        PluginCommand::Why { lock, events } => p.why(&lock, events).await?,
    };
    out.write_all(text.as_bytes())
        .context("writing to stdout")?;
    Ok(())
}

async fn connect(cli: &PluginCli) -> anyhow::Result<(Client, String)> {
    let config = crate::config::kube_config(cli.kubeconfig.as_deref(), cli.context.clone()).await?;
    let ns = config.default_namespace.clone();
    let client = Client::try_from(config).context("building the Kubernetes client")?;
    Ok((client, ns))
}

struct Plugin {
    client: Client,
    ns: String,
    role_label: String,
    timeout: Duration,
}

/// One API call under the request timeout, with what it was for in the error.
async fn call<T, E: std::error::Error + Send + Sync + 'static>(
    timeout: Duration,
    what: impl std::fmt::Display,
    fut: impl Future<Output = Result<T, E>>,
) -> anyhow::Result<T> {
    match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r.with_context(|| what.to_string()),
        Err(_) => bail!("{what}: no answer within {timeout:?}"),
    }
}

fn condition<'a>(lock: &'a StatefulSetLock, type_: &str) -> Option<&'a Condition> {
    lock.status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == type_))
}

fn is_true(lock: &StatefulSetLock, type_: &str) -> bool {
    condition(lock, type_).is_some_and(|c| c.status == "True")
}

fn writer_of(lock: &StatefulSetLock) -> Option<&str> {
    lock.status.as_ref().and_then(|s| s.writer_pod.as_deref())
}

fn age(since: Option<jiff::Timestamp>) -> String {
    let Some(t) = since else {
        return "-".into();
    };
    let secs = jiff::Timestamp::now().duration_since(t).as_secs().max(0);
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

fn parse_time(s: Option<&str>) -> Option<jiff::Timestamp> {
    s.and_then(|s| s.parse().ok())
}

/// Rows as aligned columns (two spaces between them).
fn table(out: &mut String, rows: &[Vec<String>]) {
    let widths: Vec<usize> = (0..rows.first().map_or(0, Vec::len))
        .map(|i| {
            rows.iter()
                .map(|r| r.get(i).map_or(0, |c| c.chars().count()))
                .max()
                .unwrap_or(0)
        })
        .collect();
    for r in rows {
        let mut line = String::new();
        for (i, cell) in r.iter().enumerate() {
            if i + 1 == r.len() {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:<w$}  ", w = widths[i]);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
}

impl Plugin {
    fn locks(&self) -> Api<StatefulSetLock> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    async fn get_lock(&self, name: &str) -> anyhow::Result<StatefulSetLock> {
        let found = call(
            self.timeout,
            format_args!("reading StatefulSetLock {}/{name}", self.ns),
            self.locks().get_opt(name),
        )
        .await?;
        found.with_context(|| format!("StatefulSetLock {}/{name} not found", self.ns))
    }

    /// The pods of the lock's StatefulSet (by its selector, then by owner), by ordinal.
    async fn pods_of(&self, lock: &StatefulSetLock) -> anyhow::Result<Vec<Pod>> {
        let set = &lock.spec.stateful_set_name;
        let sets: Api<k8s_openapi::api::apps::v1::StatefulSet> =
            Api::namespaced(self.client.clone(), &self.ns);
        let selector = call(
            self.timeout,
            format_args!("reading StatefulSet {}/{set}", self.ns),
            sets.get_opt(set),
        )
        .await?
        .and_then(|s| s.spec.selector.match_labels)
        .map(|labels| {
            labels
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(",")
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "statefulset.kubernetes.io/pod-name".into());
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.ns);
        let list = call(
            self.timeout,
            format_args!("listing the pods of StatefulSet {}/{set}", self.ns),
            pods.list(&ListParams::default().labels(&selector)),
        )
        .await?;
        let mut mine: Vec<Pod> = list
            .items
            .into_iter()
            .filter(|p| {
                p.owner_references()
                    .iter()
                    .any(|o| o.kind == "StatefulSet" && o.name == *set)
            })
            .collect();
        mine.sort_by_key(|p| ordinal(&p.name_any()));
        Ok(mine)
    }

    async fn status(&self, all: bool, changes: usize) -> anyhow::Result<String> {
        let api: Api<StatefulSetLock> = if all {
            Api::all(self.client.clone())
        } else {
            self.locks()
        };
        let scope = if all {
            "all namespaces".to_string()
        } else {
            format!("namespace {}", self.ns)
        };
        let locks = call(
            self.timeout,
            format_args!("listing StatefulSetLocks in {scope}"),
            api.list(&ListParams::default()),
        )
        .await?
        .items;
        let mut out = String::new();
        let _ = writeln!(out, "{} StatefulSetLocks in {scope}", locks.len());

        // By condition.
        let mut by: BTreeMap<&str, usize> = BTreeMap::new();
        let mut errors: BTreeMap<String, usize> = BTreeMap::new();
        for l in &locks {
            for c in ["Available", "Progressing", "Error"] {
                if is_true(l, c) {
                    *by.entry(c).or_default() += 1;
                }
            }
            if let Some(c) = condition(l, "Error").filter(|c| c.status == "True") {
                *errors.entry(c.reason.clone()).or_default() += 1;
            }
            if l.spec.paused {
                *by.entry("Paused").or_default() += 1;
            }
        }
        let mut rows = vec![vec!["CONDITION".to_string(), "LOCKS".into()]];
        for c in ["Available", "Progressing", "Error", "Paused"] {
            let n = by.get(c).copied().unwrap_or(0);
            let detail = if c == "Error" && !errors.is_empty() {
                let reasons: Vec<String> = errors.iter().map(|(r, n)| format!("{r} {n}")).collect();
                format!("{n} ({})", reasons.join(", "))
            } else {
                n.to_string()
            };
            rows.push(vec![c.to_string(), detail]);
        }
        out.push('\n');
        table(&mut out, &rows);

        // Without a writer.
        let writerless: Vec<&StatefulSetLock> = locks
            .iter()
            .filter(|l| writer_of(l).is_none() || !is_true(l, "Available"))
            .collect();
        let _ = writeln!(out, "\nWITHOUT AN AVAILABLE WRITER: {}", writerless.len());
        if !writerless.is_empty() {
            let mut rows = vec![vec![
                "NAMESPACE".to_string(),
                "LOCK".into(),
                "STATEFULSET".into(),
                "SINCE".into(),
                "REASON".into(),
                "MESSAGE".into(),
            ]];
            for l in writerless {
                let c = condition(l, "Available");
                rows.push(vec![
                    l.namespace().unwrap_or_default(),
                    l.name_any(),
                    l.spec.stateful_set_name.clone(),
                    age(c.and_then(|c| parse_time(Some(&c.last_transition_time)))),
                    c.map_or("-".into(), |c| c.reason.clone()),
                    c.map_or_else(
                        || {
                            if l.status.is_none() {
                                "no status yet".into()
                            } else {
                                "no Available condition".into()
                            }
                        },
                        |c| c.message.clone(),
                    ),
                ]);
            }
            table(&mut out, &rows);
        }

        // Per shard, with the membership Leases.
        let mut shards: BTreeMap<String, usize> = BTreeMap::new();
        for l in &locks {
            let shard = l
                .labels()
                .get(SHARD_LABEL)
                .cloned()
                .unwrap_or_else(|| "(unowned)".into());
            *shards.entry(shard).or_default() += 1;
        }
        let members = self.members().await;
        let _ = writeln!(out, "\nSHARDS");
        let mut rows = vec![vec![
            "SHARD".to_string(),
            "LOCKS".into(),
            "MEMBERSHIP".into(),
        ]];
        let mut ids: Vec<String> = shards.keys().cloned().collect();
        if let Ok(m) = &members {
            ids.extend(m.keys().cloned());
        }
        ids.sort();
        ids.dedup();
        for id in ids {
            let membership = match &members {
                Ok(m) => m
                    .get(&id)
                    .cloned()
                    .unwrap_or_else(|| "no membership Lease".into()),
                Err(e) => format!("not readable: {e:#}"),
            };
            rows.push(vec![
                id.clone(),
                shards.get(&id).copied().unwrap_or(0).to_string(),
                membership,
            ]);
        }
        table(&mut out, &rows);

        // The last writer changes.
        let mut recent: Vec<(&StatefulSetLock, jiff::Timestamp)> = locks
            .iter()
            .filter_map(|l| {
                parse_time(l.status.as_ref()?.last_failover_time.as_deref()).map(|t| (l, t))
            })
            .collect();
        recent.sort_by_key(|r| std::cmp::Reverse(r.1));
        recent.truncate(changes);
        let _ = writeln!(out, "\nLAST WRITER CHANGES");
        if recent.is_empty() {
            out.push_str("none recorded\n");
        } else {
            let mut rows = vec![vec![
                "NAMESPACE".to_string(),
                "LOCK".into(),
                "WRITER".into(),
                "EPOCH".into(),
                "AGO".into(),
            ]];
            for (l, t) in recent {
                rows.push(vec![
                    l.namespace().unwrap_or_default(),
                    l.name_any(),
                    writer_of(l).unwrap_or("-").to_string(),
                    l.status
                        .as_ref()
                        .and_then(|s| s.writer_epoch)
                        .map_or("-".into(), |e| e.to_string()),
                    age(Some(t)),
                ]);
            }
            table(&mut out, &rows);
        }
        Ok(out)
    }

    /// Shard id → its membership Lease in words, from every namespace.
    async fn members(&self) -> anyhow::Result<BTreeMap<String, String>> {
        let leases: Api<Lease> = Api::all(self.client.clone());
        let list = call(
            self.timeout,
            "listing membership Leases",
            leases.list(&ListParams::default().labels(crate::sharding::GROUP_LABEL)),
        )
        .await?;
        let mut out = BTreeMap::new();
        for l in list.items {
            let Some(id) = l.spec.as_ref().and_then(|s| s.holder_identity.clone()) else {
                continue;
            };
            let spec = l.spec.as_ref();
            let renewed = spec.and_then(|s| s.renew_time.as_ref()).map(|t| t.0);
            let duration = spec.and_then(|s| s.lease_duration_seconds).unwrap_or(0);
            let live = renewed.is_some_and(|r| {
                jiff::Timestamp::now().duration_since(r).as_secs() <= i64::from(duration)
            });
            out.insert(
                id,
                format!(
                    "{}/{}: renewed {} ago ({})",
                    l.namespace().unwrap_or_default(),
                    l.name_any(),
                    age(renewed),
                    if live { "live" } else { "expired" }
                ),
            );
        }
        Ok(out)
    }

    async fn switchover(
        &self,
        name: &str,
        to: Option<&str>,
        timeout: Duration,
    ) -> anyhow::Result<String> {
        let lock = self.get_lock(name).await?;
        if lock.spec.paused {
            bail!(
                "lock {}/{name} is paused: `kubectl stslock resume {name}` first",
                self.ns
            );
        }
        let pods = self.pods_of(&lock).await?;
        let labelled = self.labelled_writers(&pods);
        let from = writer_of(&lock).map(str::to_string);
        let current = |p: &str| Some(p) == from.as_deref() || labelled.iter().any(|w| w == p);
        let eligible = |p: &Pod| pod_ready(p) && p.metadata.deletion_timestamp.is_none();
        let target = match to {
            Some(t) => {
                let pod = pods.iter().find(|p| p.name_any() == t).with_context(|| {
                    format!(
                        "pod {t} is not a pod of StatefulSet {}/{}",
                        self.ns, lock.spec.stateful_set_name
                    )
                })?;
                if !eligible(pod) {
                    bail!(
                        "pod {t} is not Ready (or is terminating): the operator only hands the writer role to a Ready pod"
                    );
                }
                if from.as_deref() == Some(t) && labelled == [t.to_string()] {
                    return Ok(format!(
                        "{}/{name}: {t} is the writer already; nothing changed\n",
                        self.ns
                    ));
                }
                t.to_string()
            }
            None => pods
                .iter()
                .find(|p| eligible(p) && !current(&p.name_any()))
                .map(ResourceExt::name_any)
                .context("no other Ready pod to hand the writer role to")?,
        };
        call(
            self.timeout,
            format_args!("setting spec.preferredWriter of {}/{name}", self.ns),
            self.locks().patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"preferredWriter": target}})),
            ),
        )
        .await?;
        let clear = format!(
            "kubectl patch ssl {name} -n {} --type merge -p '{{\"spec\":{{\"preferredWriter\":null}}}}'",
            self.ns
        );
        let started = std::time::Instant::now();
        let deadline = deadline_after(timeout);
        // Reads that fail while the writer moves are retried until the deadline: the switchover
        // is under way whatever this command sees.
        loop {
            let last = match self.writer_now(name).await {
                Ok((lock, labelled))
                    if writer_of(&lock) == Some(target.as_str())
                        && labelled == [target.clone()] =>
                {
                    let epoch = lock
                        .status
                        .as_ref()
                        .and_then(|s| s.writer_epoch)
                        .map_or("-".into(), |e| e.to_string());
                    return Ok(format!(
                        "{}/{name}: writer {} -> {target} (epoch {epoch}) in {:.1}s\nspec.preferredWriter stays {target}: the role goes back to it whenever it is Ready again; clear it with\n  {clear}\n",
                        self.ns,
                        from.as_deref().unwrap_or("(none)"),
                        started.elapsed().as_secs_f64(),
                    ));
                }
                Ok((lock, labelled)) => {
                    let available = condition(&lock, "Available")
                        .map(|c| format!("{} {}: {}", c.status, c.reason, c.message))
                        .unwrap_or_else(|| "no Available condition".into());
                    format!(
                        "status writer {}, labelled writers {labelled:?}; Available {available}",
                        writer_of(&lock).unwrap_or("none")
                    )
                }
                Err(e) => format!("last read failed: {e:#}"),
            };
            if tokio::time::Instant::now() + Duration::from_millis(250) >= deadline {
                bail!(
                    "{}/{name}: {target} is not the writer after {timeout:?} ({last}); see `kubectl stslock why {name}`.\nspec.preferredWriter is still {target}: the operator hands it the role once it can; to cancel,\n  {clear}",
                    self.ns,
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// The pods labelled writer, by name.
    fn labelled_writers(&self, pods: &[Pod]) -> Vec<String> {
        pods.iter()
            .filter(|p| p.labels().get(&self.role_label).map(String::as_str) == Some("writer"))
            .map(ResourceExt::name_any)
            .collect()
    }

    /// The lock and the pods labelled writer, as of now.
    async fn writer_now(&self, name: &str) -> anyhow::Result<(StatefulSetLock, Vec<String>)> {
        let lock = self.get_lock(name).await?;
        let labelled = self.labelled_writers(&self.pods_of(&lock).await?);
        Ok((lock, labelled))
    }

    async fn set_paused(
        &self,
        name: &str,
        paused: bool,
        timeout: Duration,
    ) -> anyhow::Result<String> {
        let patched = call(
            self.timeout,
            format_args!("setting spec.paused of {}/{name}", self.ns),
            self.locks().patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"paused": paused}})),
            ),
        )
        .await?;
        let generation = patched.metadata.generation.unwrap_or(0);
        let word = if paused { "paused" } else { "resumed" };
        let deadline = deadline_after(timeout);
        loop {
            let last = match self.get_lock(name).await {
                Ok(lock) => {
                    let seen = lock
                        .status
                        .as_ref()
                        .and_then(|s| s.observed_generation)
                        .unwrap_or(0);
                    if seen >= generation {
                        return Ok(format!(
                            "{}/{name} {word} (writer {}; seen by the operator at generation {seen})\n",
                            self.ns,
                            writer_of(&lock).unwrap_or("none"),
                        ));
                    }
                    format!("it reports generation {seen}")
                }
                Err(e) => format!("last read failed: {e:#}"),
            };
            if tokio::time::Instant::now() + Duration::from_millis(250) >= deadline {
                bail!(
                    "{}/{name}: spec.paused is {paused}, but the operator has not reported generation {generation} within {timeout:?} ({last}): is it running and does it own this namespace?",
                    self.ns
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    async fn why(&self, name: &str, max_events: usize) -> anyhow::Result<String> {
        let lock = self.get_lock(name).await?;
        let mut out = String::new();
        let status = lock.status.clone().unwrap_or_default();
        let _ = writeln!(
            out,
            "StatefulSetLock {}/{name} (StatefulSet {}, Lease {}{})",
            self.ns,
            lock.spec.stateful_set_name,
            lock.spec.lease_name,
            if lock.spec.paused { ", PAUSED" } else { "" }
        );
        let _ = writeln!(
            out,
            "writer {} (epoch {}), shard {}, {} Ready pods, writer changed {}",
            status.writer_pod.as_deref().unwrap_or("none"),
            status.writer_epoch.map_or("-".into(), |e| e.to_string()),
            lock.labels()
                .get(SHARD_LABEL)
                .map_or("(unowned)", String::as_str),
            status.ready_replicas.map_or("-".into(), |n| n.to_string()),
            status
                .last_failover_time
                .as_deref()
                .map_or("never".into(), |t| format!(
                    "{} ago",
                    age(parse_time(Some(t)))
                )),
        );
        if let Some(p) = &lock.spec.preferred_writer {
            let _ = writeln!(out, "preferred writer {p}");
        }
        let generation = lock.metadata.generation.unwrap_or(0);
        if status.observed_generation.unwrap_or(0) < generation {
            let _ = writeln!(
                out,
                "the operator has not seen generation {generation} yet (it reports {})",
                status.observed_generation.unwrap_or(0)
            );
        }

        out.push_str("\nCONDITIONS\n");
        let mut rows = vec![vec![
            "TYPE".to_string(),
            "STATUS".into(),
            "REASON".into(),
            "SINCE".into(),
            "MESSAGE".into(),
        ]];
        for c in &status.conditions {
            rows.push(vec![
                c.type_.clone(),
                c.status.clone(),
                c.reason.clone(),
                age(parse_time(Some(&c.last_transition_time))),
                c.message.clone(),
            ]);
        }
        table(&mut out, &rows);

        out.push_str("\nLEASE\n");
        let leases: Api<Lease> = Api::namespaced(self.client.clone(), &self.ns);
        match call(
            self.timeout,
            format_args!("reading Lease {}/{}", self.ns, lock.spec.lease_name),
            leases.get_opt(&lock.spec.lease_name),
        )
        .await
        {
            Err(e) => {
                let _ = writeln!(out, "not readable: {e:#}");
            }
            Ok(Some(l)) => {
                let spec = l.spec.unwrap_or_default();
                let renewed = spec.renew_time.as_ref().map(|t| t.0);
                let _ = writeln!(
                    out,
                    "holder {}, epoch (leaseTransitions) {}, renewed {} ago, duration {}s",
                    spec.holder_identity.as_deref().unwrap_or("none"),
                    spec.lease_transitions.map_or("-".into(), |t| t.to_string()),
                    age(renewed),
                    spec.lease_duration_seconds
                        .map_or("-".into(), |d| d.to_string()),
                );
            }
            Ok(None) => out.push_str("not found (the operator creates it at the first election)\n"),
        }

        out.push_str("\nPODS\n");
        let mut rows = vec![vec![
            "POD".to_string(),
            "READY".into(),
            "ROLE".into(),
            "EPOCH".into(),
        ]];
        let pods = match self.pods_of(&lock).await {
            Ok(pods) => pods,
            Err(e) => {
                let _ = writeln!(out, "not readable: {e:#}");
                vec![]
            }
        };
        for p in pods {
            let mut ready = if pod_ready(&p) { "True" } else { "False" }.to_string();
            if p.metadata.deletion_timestamp.is_some() {
                ready.push_str(" (terminating)");
            }
            rows.push(vec![
                p.name_any(),
                ready,
                p.labels()
                    .get(&self.role_label)
                    .cloned()
                    .unwrap_or_else(|| "-".into()),
                p.annotations()
                    .get(crate::api::EPOCH_ANNOTATION)
                    .cloned()
                    .unwrap_or_else(|| "-".into()),
            ]);
        }
        if rows.len() > 1 {
            table(&mut out, &rows);
        }

        out.push_str("\nRECENT EVENTS (newest first)\n");
        let events: Api<Event> = Api::namespaced(self.client.clone(), &self.ns);
        let list = match call(
            self.timeout,
            format_args!("listing Events in {}", self.ns),
            events.list(&ListParams::default()),
        )
        .await
        {
            Ok(list) => list.items,
            Err(e) => {
                let _ = writeln!(out, "not readable: {e:#}");
                return Ok(out);
            }
        };
        let mut mine: Vec<(Option<jiff::Timestamp>, Event)> = list
            .into_iter()
            .filter(|e| {
                e.regarding.as_ref().is_some_and(|r| {
                    r.kind.as_deref() == Some("StatefulSetLock") && r.name.as_deref() == Some(name)
                })
            })
            .map(|e| (event_time(&e), e))
            .collect();
        mine.sort_by_key(|e| std::cmp::Reverse(e.0));
        if mine.is_empty() {
            out.push_str("none\n");
        }
        let mut rows = vec![vec![
            "AGO".to_string(),
            "TYPE".into(),
            "REASON".into(),
            "COUNT".into(),
            "TRACE".into(),
            "NOTE".into(),
        ]];
        for (t, e) in mine.into_iter().take(max_events) {
            let note = e.note.clone().unwrap_or_default();
            let (note, trace) = match note.rsplit_once(" trace_id=") {
                Some((n, id)) => (n.to_string(), id.to_string()),
                None => (note, "-".into()),
            };
            rows.push(vec![
                age(t),
                e.type_.clone().unwrap_or_default(),
                e.reason.clone().unwrap_or_default(),
                e.series.as_ref().map_or(1, |s| s.count).to_string(),
                trace,
                note,
            ]);
        }
        if rows.len() > 1 {
            table(&mut out, &rows);
        }
        Ok(out)
    }
}

/// Now + `timeout`, or a day from now when that is out of range.
fn deadline_after(timeout: Duration) -> tokio::time::Instant {
    let now = tokio::time::Instant::now();
    now.checked_add(timeout)
        .unwrap_or_else(|| now + Duration::from_secs(86_400))
}

fn event_time(e: &Event) -> Option<jiff::Timestamp> {
    let micro = e
        .series
        .as_ref()
        .map(|s| s.last_observed_time.0)
        .or(e.event_time.as_ref().map(|t| t.0));
    micro.or(e.deprecated_last_timestamp.as_ref().map(|t| t.0))
}

fn pod_ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn ordinal(name: &str) -> u32 {
    name.rsplit_once('-')
        .and_then(|(_, n)| n.parse().ok())
        .unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("3d").is_err());
    }

    #[test]
    fn columns_line_up() {
        let mut out = String::new();
        table(
            &mut out,
            &[
                vec!["A".into(), "LONGER".into(), "X".into()],
                vec!["long-one".into(), "b".into(), "y z".into()],
            ],
        );
        assert_eq!(out, "A         LONGER  X\nlong-one  b       y z\n");
    }

    #[test]
    fn ordinals_sort_numerically() {
        let mut names = vec!["db-10", "db-2", "db-0"];
        names.sort_by_key(|n| ordinal(n));
        assert_eq!(names, ["db-0", "db-2", "db-10"]);
    }
}
