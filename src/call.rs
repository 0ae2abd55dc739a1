//! Every API call the operator makes, each under a timeout, so a stuck apiserver can stall
//! one reconcile but never a lane. Errors carry what was being done.

use std::future::Future;
use std::time::Duration;

use tracing::Instrument;

use crate::error::{Error, Result};

/// Run one API call under `timeout`, naming it for errors and logs; it is a span (a child of
/// whatever reconcile or election made it) named after `what`.
pub async fn call<T, F>(what: &str, timeout: Duration, f: F) -> Result<T>
where
    F: Future<Output = std::result::Result<T, kube::Error>>,
{
    let span = crate::telemetry::api_span(what);
    let result = tokio::time::timeout(timeout, f)
        .instrument(span.clone())
        .await;
    crate::metrics::record_api_call(what, &response_code(&result));
    let result = match result {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(Error::Kube {
            context: what.to_string(),
            source: Box::new(e),
        }),
        Err(_) => Err(Error::Timeout {
            context: what.to_string(),
            after: timeout,
        }),
    };
    if let Err(e) = &result
        && !span.is_disabled()
    {
        span.record("otel.status_code", "ERROR");
        span.record("error", tracing::field::display(e));
    }
    result
}

/// The `code` label of an API request: the HTTP status of an API error, `2xx` for success
/// (the client does not report which), `transport` or `timeout` when there was no answer.
fn response_code<T, E>(
    result: &std::result::Result<std::result::Result<T, kube::Error>, E>,
) -> String {
    match result {
        Ok(Ok(_)) => "2xx".into(),
        Ok(Err(kube::Error::Api(s))) => s.code.to_string(),
        Ok(Err(_)) => "transport".into(),
        Err(_) => "timeout".into(),
    }
}

/// Like [`call`] but a 404 is `Ok(None)`.
pub async fn call_opt<T, F>(what: &str, timeout: Duration, f: F) -> Result<Option<T>>
where
    F: Future<Output = std::result::Result<T, kube::Error>>,
{
    match call(what, timeout, f).await {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.is_not_found() => Ok(None),
        Err(e) => Err(e),
    }
}

const KINDS: &[(&str, &str)] = &[
    ("statefulsetlock", "statefulsetlocks"),
    ("statefulset", "statefulsets"),
    ("lease", "leases"),
    ("pod", "pods"),
    ("event", "events"),
];

/// (verb, resource) of an API call from its description, e.g. "updating Lease ns/x" →
/// ("patch", "leases"), for metrics labels and span attributes. The operator's calls are
/// described in a fixed vocabulary (the call sites in `reconcile` and `sharding`); anything
/// else is "other".
pub fn verb_and_resource(what: &str) -> (&'static str, &'static str) {
    let mut words = what.split_whitespace();
    let verb = match words.next().map(|w| w.trim_end_matches(':')) {
        Some("creating" | "recording") => "create",
        Some("updating" | "labelling" | "writing" | "renewing" | "claim" | "handoff") => "patch",
        Some("deleting") => "delete",
        Some("getting" | "reading") => "get",
        Some("listing") => "list",
        _ => "other",
    };
    let resource = what
        .split_whitespace()
        .find_map(|w| {
            let w = w.to_ascii_lowercase();
            KINDS.iter().find(|(k, _)| *k == w).map(|(_, r)| *r)
        })
        .unwrap_or("other");
    (verb, resource)
}
