//! Logs and traces: the `tracing` subscriber (human or JSON logs on stderr) and, when asked
//! for, OpenTelemetry trace export over OTLP/gRPC.
//!
//! It owns the spans' shape — names, attribute keys, which decisions deserve a span — so the
//! reconciler only says *where* a span starts. It must never slow or stop reconciliation:
//! spans go through a batch processor with a bounded queue (full queue = dropped spans), the
//! exporter runs on the processor's own thread with a short timeout, and shutdown is bounded.

use std::future::Future;
use std::time::Duration;

use anyhow::Context as _;
use opentelemetry::KeyValue;
use opentelemetry::trace::{TraceContextExt as _, TracerProvider as _};
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{BatchConfigBuilder, BatchSpanProcessor, SdkTracerProvider};
use tracing::field::Empty;
use tracing::{Instrument as _, Span};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt as _;

use crate::elect::{Observed, Plan, Step};

/// Where traces go.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Otlp {
    /// No trace export.
    Off,
    /// Export when the standard `OTEL_EXPORTER_OTLP_ENDPOINT` (or `..._TRACES_ENDPOINT`) is
    /// set and `OTEL_SDK_DISABLED` is not `true`; every other `OTEL_*` setting applies.
    #[default]
    FromEnv,
    /// Export to this endpoint (e.g. `http://127.0.0.1:4317`), whatever the environment says.
    Endpoint(String),
}

#[derive(Debug, Clone)]
pub struct TelemetryConfig {
    /// One JSON object per log event (for log collectors) instead of a human-readable line.
    pub json_logs: bool,
    /// Log filter directives; None: `RUST_LOG`, else `info,kube=warn`.
    pub log_filter: Option<String>,
    pub otlp: Otlp,
    /// The replica's shard id, a resource attribute (None when one process runs several).
    pub shard: Option<String>,
    /// Timeout of one export call (retries included); `OTEL_EXPORTER_OTLP_TIMEOUT` wins.
    pub export_timeout: Duration,
    /// Spans waiting for export beyond this are dropped, never waited for.
    pub max_queue: usize,
    /// How long shutdown may spend flushing.
    pub shutdown_timeout: Duration,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            json_logs: false,
            log_filter: None,
            otlp: Otlp::FromEnv,
            shard: None,
            export_timeout: Duration::from_secs(3),
            max_queue: 4096,
            shutdown_timeout: Duration::from_secs(5),
        }
    }
}

/// Keeps the trace pipeline alive; [`TelemetryGuard::shutdown`] (or drop) flushes what is
/// queued, bounded by the configured timeout.
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
    shutdown_timeout: Duration,
}

impl TelemetryGuard {
    /// Whether spans are exported.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// Export what is queued now. The export runs on a blocking thread so the runtime
    /// (which drives the gRPC connection) stays free; gives up after the shutdown timeout.
    pub async fn flush(&self) {
        if let Some(p) = self.provider.clone() {
            let job = tokio::task::spawn_blocking(move || p.force_flush());
            match tokio::time::timeout(self.shutdown_timeout, job).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => tracing::debug!(error = %e, "trace flush"),
                Ok(Err(e)) => tracing::debug!(error = %e, "trace flush task"),
                Err(_) => tracing::debug!("trace flush timed out"),
            }
        }
    }

    /// Flush and stop the exporter, bounded by the shutdown timeout.
    pub async fn shutdown(mut self) {
        if let Some(p) = self.provider.take() {
            let timeout = self.shutdown_timeout;
            let job = tokio::task::spawn_blocking(move || p.shutdown_with_timeout(timeout));
            match tokio::time::timeout(timeout + Duration::from_millis(200), job).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => tracing::warn!(error = %e, "trace export shutdown"),
                Ok(Err(e)) => tracing::warn!(error = %e, "trace export shutdown task"),
                Err(_) => tracing::warn!("trace export shutdown timed out; spans dropped"),
            }
        }
    }
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        // Not shut down explicitly (an error path): flush here, still bounded.
        if let Some(p) = self.provider.take()
            && let Err(e) = p.shutdown_with_timeout(self.shutdown_timeout)
        {
            eprintln!("stslock: trace export shutdown: {e}");
        }
    }
}

/// Whether to export, and to which endpoint when it is not the environment's: `None` is no
/// export, `Some(None)` export where `OTEL_*` says. `env` reads a variable.
fn export_target(otlp: &Otlp, env: impl Fn(&str) -> Option<String>) -> Option<Option<String>> {
    let env = |k: &str| env(k).filter(|v| !v.trim().is_empty());
    match otlp {
        Otlp::Off => None,
        Otlp::Endpoint(e) => Some(Some(e.clone())),
        Otlp::FromEnv => {
            let disabled = env("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true"))
                || env("OTEL_TRACES_EXPORTER").is_some_and(|v| v.eq_ignore_ascii_case("none"));
            let configured = env("OTEL_EXPORTER_OTLP_ENDPOINT").is_some()
                || env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_some();
            // The exporter reads the endpoint from the environment itself.
            (configured && !disabled).then_some(None)
        }
    }
}

fn resource(shard: Option<&str>) -> Resource {
    let mut attrs = vec![KeyValue::new("service.version", env!("CARGO_PKG_VERSION"))];
    if let Some(s) = shard {
        attrs.push(KeyValue::new("stslock.shard", s.to_string()));
    }
    for (var, key) in [
        ("POD_NAME", "k8s.pod.name"),
        ("POD_NAMESPACE", "k8s.namespace.name"),
    ] {
        if let Ok(v) = std::env::var(var)
            && !v.is_empty()
        {
            attrs.push(KeyValue::new(key, v));
        }
    }
    Resource::builder()
        .with_service_name("stslock")
        .with_attributes(attrs)
        .build()
}

fn tracer_provider(
    cfg: &TelemetryConfig,
    endpoint: Option<String>,
) -> anyhow::Result<SdkTracerProvider> {
    let mut builder = opentelemetry_otlp::SpanExporter::builder().with_tonic();
    if let Some(e) = endpoint {
        builder = builder.with_endpoint(e);
    }
    // An explicit timeout would override the standard variables; set it only without them.
    if std::env::var_os("OTEL_EXPORTER_OTLP_TIMEOUT").is_none()
        && std::env::var_os("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT").is_none()
    {
        builder = builder.with_timeout(cfg.export_timeout);
    }
    let exporter = builder.build().context("building the OTLP span exporter")?;
    let processor = BatchSpanProcessor::builder(exporter)
        .with_batch_config(
            BatchConfigBuilder::default()
                .with_max_queue_size(cfg.max_queue)
                .build(),
        )
        .build();
    Ok(SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_resource(resource(cfg.shard.as_deref()))
        .build())
}

/// Build the subscriber without installing it (tests scope it to a thread). Must be called
/// inside a Tokio runtime when export is on: the gRPC channel's worker is spawned there.
pub fn build(cfg: &TelemetryConfig) -> anyhow::Result<(tracing::Dispatch, TelemetryGuard)> {
    let filter = match &cfg.log_filter {
        Some(f) => tracing_subscriber::EnvFilter::try_new(f)
            .with_context(|| format!("bad log filter {f:?}"))?,
        None => tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,kube=warn")),
    };
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = if cfg.json_logs {
        fmt.json().flatten_event(true).boxed()
    } else {
        fmt.boxed()
    }
    .with_filter(filter);
    let provider = match export_target(&cfg.otlp, |k| std::env::var(k).ok()) {
        Some(endpoint) => Some(tracer_provider(cfg, endpoint)?),
        None => None,
    };
    let otel = provider.as_ref().map(|p| {
        // stslock's own spans only: the reconcile, decision and API-call spans. API-call spans
        // are at debug level so that without export they cost nothing.
        let targets = tracing_subscriber::filter::Targets::new()
            .with_target("stslock", tracing::Level::INFO)
            .with_target(API_TARGET, tracing::Level::DEBUG);
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("stslock"))
            .with_threads(false)
            .with_tracked_inactivity(false)
            .with_filter(targets)
    });
    let subscriber = tracing_subscriber::registry().with(fmt).with(otel);
    Ok((
        tracing::Dispatch::new(subscriber),
        TelemetryGuard {
            provider,
            shutdown_timeout: cfg.shutdown_timeout,
        },
    ))
}

/// Build and install the process-wide subscriber.
pub fn init(cfg: &TelemetryConfig) -> anyhow::Result<TelemetryGuard> {
    let (dispatch, guard) = build(cfg)?;
    // Also routes `log` records (rustls, among others) into it, as `fmt().init()` did.
    tracing_subscriber::util::SubscriberInitExt::try_init(dispatch)
        .context("a tracing subscriber is already installed")?;
    if guard.exporting() {
        tracing::info!("exporting traces over OTLP/gRPC");
    }
    Ok(guard)
}

/// The trace id of the current span as 32 hex digits, when traces are exported.
pub fn current_trace_id() -> Option<String> {
    let cx = Span::current().context();
    let span = cx.span();
    let sc = span.span_context();
    sc.is_valid().then(|| sc.trace_id().to_string())
}

/// `note` with ` trace_id=<32 hex>` appended when there is a trace to point at.
pub fn with_trace_id(note: &str) -> String {
    match current_trace_id() {
        Some(id) => format!("{note} trace_id={id}"),
        None => note.to_string(),
    }
}

/// The span of one reconcile: the parent of everything that reconcile does.
pub fn reconcile_span(lock: &crate::api::StatefulSetLock, shard: &str) -> Span {
    use kube::ResourceExt as _;
    let (namespace, name) = (lock.namespace().unwrap_or_default(), lock.name_any());
    tracing::info_span!(
        "reconcile",
        "stslock.lock" = %format_args!("{namespace}/{name}"),
        "k8s.namespace.name" = namespace.as_str(),
        "stslock.shard" = shard,
        "stslock.outcome" = Empty,
    )
}

/// Run `fut` inside `span` and record its outcome there.
pub async fn traced<T>(
    span: Span,
    fut: impl Future<Output = crate::error::Result<T>>,
) -> crate::error::Result<T> {
    let result = fut.instrument(span.clone()).await;
    span.record(
        "stslock.outcome",
        match &result {
            Ok(_) => "ok",
            Err(e) => e.metric_label(),
        },
    );
    result
}

/// Apply a plan inside its decision span (when it has one, see [`decision_span`]), recording
/// the outcome; a failed renewal gets a span of its own.
pub async fn traced_apply(
    o: &Observed,
    plan: &Plan,
    shard: &str,
    apply: impl Future<Output = crate::error::Result<()>>,
) -> crate::error::Result<()> {
    let span = decision_span(o, plan, shard);
    let result = apply.instrument(span.clone()).await;
    record_outcome(&span, o, plan, &result);
    if let Err(e) = &result
        && plan.renews(o.lease.as_ref().and_then(|l| l.holder.as_deref()))
    {
        let lease = o.lease.as_ref();
        renewal_failed(
            &o.namespace,
            &o.name,
            shard,
            lease.and_then(|l| l.holder.as_deref()),
            lease.map(|l| l.transitions).unwrap_or_default(),
            e,
        );
    }
    result
}

/// The span of a plan that changes the writer (election, failover, switchover) or re-creates
/// a missing Lease for the sitting writer; a disabled span for any other plan, so that
/// renewals and no-ops add nothing to the trace.
pub fn decision_span(o: &Observed, plan: &Plan, shard: &str) -> Span {
    // No transition but a new Lease: the same writer keeps the role and the epoch.
    let recreated = plan.steps.iter().find_map(|s| match s {
        Step::CreateLease {
            holder,
            transitions,
            ..
        } => Some((holder, *transitions)),
        _ => None,
    });
    let (kind, old, new, reason, epoch) = match (&plan.transition, recreated) {
        (Some(t), _) => (
            t.kind.as_str(),
            t.old_writer.clone(),
            t.new_writer.clone(),
            t.reason.clone(),
            t.epoch,
        ),
        (None, Some((holder, epoch))) => (
            "lease_recreated",
            Some(holder.clone()),
            holder.clone(),
            format!("Lease {} was missing", o.lease_name),
            epoch,
        ),
        (None, None) => return Span::none(),
    };
    tracing::info_span!(
        "election",
        "otel.name" = kind,
        "otel.status_code" = Empty,
        "stslock.lock" = %o.key(),
        "k8s.namespace.name" = o.namespace.as_str(),
        "stslock.shard" = shard,
        "stslock.kind" = kind,
        "stslock.writer.old" = old.as_deref().unwrap_or(""),
        "stslock.writer.new" = new.as_str(),
        "stslock.reason" = reason.as_str(),
        "stslock.epoch" = epoch,
        "stslock.outcome" = Empty,
        "stslock.writerless_seconds" = Empty,
        "error" = Empty,
    )
}

/// Record how a plan ended on its decision span (a no-op on a disabled span).
pub fn record_outcome(span: &Span, o: &Observed, plan: &Plan, result: &crate::error::Result<()>) {
    if span.is_disabled() {
        return;
    }
    match result {
        Ok(()) => {
            span.record("stslock.outcome", "ok");
            if let Some(s) = writerless_seconds(o, plan, jiff::Timestamp::now()) {
                span.record("stslock.writerless_seconds", s);
            }
        }
        Err(e) => {
            span.record("stslock.outcome", e.metric_label());
            span.record("otel.status_code", "ERROR");
            span.record("error", tracing::field::display(e));
        }
    }
}

/// How long the lock had no Ready writer, when known: from the moment the old writer went
/// NotReady (or started terminating) to `now`, just after the new writer was labelled.
pub fn writerless_seconds(o: &Observed, plan: &Plan, now: jiff::Timestamp) -> Option<f64> {
    let t = plan.transition.as_ref()?;
    let old = o
        .pods
        .iter()
        .find(|p| Some(&p.name) == t.old_writer.as_ref())?;
    if old.ready && !old.terminating {
        return None; // a switchover from a healthy writer: never writer-less
    }
    let since = old.ready_since?;
    let secs = now.duration_since(since).as_secs_f64();
    (secs >= 0.0).then_some(secs)
}

/// A renewal that failed: one short span, in the trace of whatever tried it (a reconcile, or
/// its own trace in the renewal lane). Renewals that succeed get no span of their own.
pub fn renewal_failed(
    namespace: &str,
    lock: &str,
    shard: &str,
    holder: Option<&str>,
    epoch: i64,
    error: &crate::error::Error,
) {
    let _span = tracing::info_span!(
        "renewal failed",
        "otel.status_code" = "ERROR",
        "stslock.lock" = %format_args!("{namespace}/{lock}"),
        "k8s.namespace.name" = namespace,
        "stslock.shard" = shard,
        "stslock.writer.old" = holder.unwrap_or(""),
        "stslock.epoch" = epoch,
        "stslock.outcome" = error.metric_label(),
        "error" = %error,
    );
}

/// The span of a shard handoff: one lock's ownership label moving to another replica.
pub fn handoff_span(namespace: &str, name: &str, from: &str, to: &str) -> Span {
    tracing::info_span!(
        "handoff",
        "stslock.lock" = %format_args!("{namespace}/{name}"),
        "k8s.namespace.name" = namespace,
        "stslock.shard" = from,
        "stslock.shard.to" = to,
        "stslock.reason" = "ring changed",
        "stslock.outcome" = Empty,
    )
}

/// The target of API-call spans (debug level: exported, but not logged by default).
pub const API_TARGET: &str = "stslock::api_call";

/// The span of one API call (see [`crate::call`]), named after what it does.
///
/// Only inside another span (a reconcile, a decision, a handoff): calls made outside any —
/// every Lease renewal of the renewal lane, membership renewals, claims — would each be a
/// trace of their own, the per-renewal cost this module avoids. A failed renewal has its
/// own span ([`renewal_failed`]).
pub fn api_span(what: &str, verb: &str, resource: &str) -> Span {
    if Span::current().is_none() {
        return Span::none();
    }
    tracing::debug_span!(
        target: API_TARGET,
        "api",
        "otel.name" = what,
        "otel.kind" = "client",
        "otel.status_code" = Empty,
        "k8s.verb" = verb,
        "k8s.resource" = resource,
        "error" = Empty,
    )
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    #[test]
    fn export_follows_the_standard_variables() {
        let with = |vars: &[(&str, &str)]| {
            let vars: HashMap<String, String> = vars
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            move |k: &str| vars.get(k).cloned()
        };
        let ep = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317");
        assert_eq!(export_target(&Otlp::FromEnv, with(&[])), None);
        assert_eq!(export_target(&Otlp::FromEnv, with(&[ep])), Some(None));
        assert_eq!(
            export_target(
                &Otlp::FromEnv,
                with(&[("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://c:4317")])
            ),
            Some(None)
        );
        assert_eq!(
            export_target(
                &Otlp::FromEnv,
                with(&[("OTEL_EXPORTER_OTLP_ENDPOINT", " ")])
            ),
            None
        );
        assert_eq!(
            export_target(&Otlp::FromEnv, with(&[ep, ("OTEL_SDK_DISABLED", "TRUE")])),
            None
        );
        assert_eq!(
            export_target(&Otlp::FromEnv, with(&[ep, ("OTEL_SDK_DISABLED", "false")])),
            Some(None)
        );
        assert_eq!(
            export_target(
                &Otlp::FromEnv,
                with(&[ep, ("OTEL_TRACES_EXPORTER", "none")])
            ),
            None
        );
        assert_eq!(export_target(&Otlp::Off, with(&[ep])), None);
        assert_eq!(
            export_target(&Otlp::Endpoint("http://x:4317".into()), with(&[])),
            Some(Some("http://x:4317".into()))
        );
    }

    #[test]
    fn no_trace_id_without_export() {
        assert_eq!(current_trace_id(), None);
        assert_eq!(with_trace_id("elected db-0"), "elected db-0");
    }

    #[test]
    fn otlp_off_builds_a_plain_logger() {
        let cfg = TelemetryConfig {
            otlp: Otlp::Off,
            ..TelemetryConfig::default()
        };
        let (_dispatch, guard) = build(&cfg).unwrap();
        assert!(!guard.exporting());
    }
}
