//! Every API call the operator makes, in one place: each is a structured [`ApiCall`] (verb,
//! resource, target), runs under a timeout (a stuck apiserver can stall one reconcile but never
//! a lane), is counted in its replica's metrics and traced as a child span of whatever made it,
//! and its error says what was being done.

use std::future::Future;
use std::time::Duration;

use tracing::Instrument;

use crate::error::{Error, Result};
use crate::metrics::Metrics;

/// The API verb of a call (the `verb` label of `stslock_api_requests_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    Get,
    List,
    Create,
    Patch,
    Delete,
}

impl Verb {
    pub fn as_str(self) -> &'static str {
        match self {
            Verb::Get => "get",
            Verb::List => "list",
            Verb::Create => "create",
            Verb::Patch => "patch",
            Verb::Delete => "delete",
        }
    }
}

/// The resource a call is about (its kind, and the `resource` label: the plural).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    StatefulSetLock,
    StatefulSet,
    Lease,
    Pod,
    Event,
}

impl Kind {
    pub fn plural(self) -> &'static str {
        match self {
            Kind::StatefulSetLock => "statefulsetlocks",
            Kind::StatefulSet => "statefulsets",
            Kind::Lease => "leases",
            Kind::Pod => "pods",
            Kind::Event => "events",
        }
    }

    pub fn kind(self) -> &'static str {
        match self {
            Kind::StatefulSetLock => "StatefulSetLock",
            Kind::StatefulSet => "StatefulSet",
            Kind::Lease => "Lease",
            Kind::Pod => "Pod",
            Kind::Event => "Event",
        }
    }
}

/// One API call: what it does to what, and why (for people: logs, errors, span names).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiCall {
    pub verb: Verb,
    pub resource: Kind,
    /// `namespace/name` (or what a list selects).
    pub target: String,
    /// Why, when the verb does not say it: "renewal", "reserve epoch 4", "handoff" …
    pub note: Option<String>,
}

impl ApiCall {
    pub fn new(verb: Verb, resource: Kind, target: impl Into<String>) -> ApiCall {
        ApiCall {
            verb,
            resource,
            target: target.into(),
            note: None,
        }
    }

    pub fn get(resource: Kind, target: impl Into<String>) -> ApiCall {
        ApiCall::new(Verb::Get, resource, target)
    }

    pub fn list(resource: Kind, target: impl Into<String>) -> ApiCall {
        ApiCall::new(Verb::List, resource, target)
    }

    pub fn create(resource: Kind, target: impl Into<String>) -> ApiCall {
        ApiCall::new(Verb::Create, resource, target)
    }

    pub fn patch(resource: Kind, target: impl Into<String>) -> ApiCall {
        ApiCall::new(Verb::Patch, resource, target)
    }

    pub fn delete(resource: Kind, target: impl Into<String>) -> ApiCall {
        ApiCall::new(Verb::Delete, resource, target)
    }

    pub fn note(mut self, note: impl Into<String>) -> ApiCall {
        self.note = Some(note.into());
        self
    }
}

impl std::fmt::Display for ApiCall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {} {}",
            self.verb.as_str(),
            self.resource.kind(),
            self.target
        )?;
        if let Some(n) = &self.note {
            write!(f, " ({n})")?;
        }
        Ok(())
    }
}

/// Run `c` (the future `f`) under `timeout`, counted in `metrics` and traced as a span (a child
/// of whatever reconcile or election made it); an error names the call.
pub async fn call<T, F>(metrics: &Metrics, c: ApiCall, timeout: Duration, f: F) -> Result<T>
where
    F: Future<Output = std::result::Result<T, kube::Error>>,
{
    let span = crate::telemetry::api_span(&c.to_string(), c.verb.as_str(), c.resource.plural());
    let result = tokio::time::timeout(timeout, f)
        .instrument(span.clone())
        .await;
    metrics.api_request(c.verb.as_str(), c.resource.plural(), response_code(&result));
    let result = match result {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(Error::Kube {
            context: c.to_string(),
            source: Box::new(e),
        }),
        Err(_) => Err(Error::Timeout {
            context: c.to_string(),
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

/// Like [`call`] but a 404 is `Ok(None)`.
pub async fn call_opt<T, F>(
    metrics: &Metrics,
    c: ApiCall,
    timeout: Duration,
    f: F,
) -> Result<Option<T>>
where
    F: Future<Output = std::result::Result<T, kube::Error>>,
{
    match call(metrics, c, timeout, f).await {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.is_not_found() => Ok(None),
        Err(e) => Err(e),
    }
}

/// The `code` label of an API request: the HTTP status of an API error, `2xx` for success
/// (the client does not report which), `transport` or `timeout` when there was no answer.
fn response_code<T, E>(
    result: &std::result::Result<std::result::Result<T, kube::Error>, E>,
) -> &'static str {
    match result {
        Ok(Ok(_)) => "2xx",
        Ok(Err(kube::Error::Api(s))) => status_label(s.code),
        Ok(Err(_)) => "transport",
        Err(_) => "timeout",
    }
}

/// HTTP status codes as label values (a fixed set, so the label stays bounded).
fn status_label(code: u16) -> &'static str {
    match code {
        400 => "400",
        401 => "401",
        403 => "403",
        404 => "404",
        409 => "409",
        410 => "410",
        422 => "422",
        429 => "429",
        500 => "500",
        502 => "502",
        503 => "503",
        504 => "504",
        c if c >= 500 => "5xx",
        _ => "4xx",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_read_as_what_they_do() {
        let c = ApiCall::patch(Kind::Lease, "ns/db-lease").note("renewal for db-0");
        assert_eq!(c.to_string(), "patch Lease ns/db-lease (renewal for db-0)");
        assert_eq!(
            ApiCall::get(Kind::StatefulSetLock, "ns/db").to_string(),
            "get StatefulSetLock ns/db"
        );
    }

    #[tokio::test]
    async fn a_call_is_counted_with_its_verb_resource_and_code() {
        let m = Metrics::new("shard-a");
        let r: Result<()> = call(
            &m,
            ApiCall::get(Kind::Lease, "ns/l"),
            Duration::from_millis(10),
            std::future::pending(),
        )
        .await;
        assert!(matches!(r, Err(Error::Timeout { .. })), "{r:?}");
        assert!(
            r.unwrap_err()
                .to_string()
                .starts_with("get Lease ns/l: no answer")
        );
        let text = m.render().unwrap();
        assert!(
            text.contains(
                "stslock_api_requests_total{verb=\"get\",resource=\"leases\",code=\"timeout\"} 1"
            ),
            "{text}"
        );
    }
}
