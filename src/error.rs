//! The operator's error type. Every variant has a stable `metric_label()`.

use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{context}: {source}")]
    Kube {
        context: String,
        #[source]
        source: Box<kube::Error>,
    },
    #[error("{context}: no answer within {after:?}")]
    Timeout { context: String, after: Duration },
    #[error("{0}")]
    Invalid(String),
    #[error("this replica is fenced: its membership Lease may have lapsed, so it writes nothing")]
    Fenced,
    /// The view a plan was made from is out of date (a fresh read disagreed with it, or
    /// ownership moved): nothing was written, and the next reconcile starts from fresh state.
    #[error("stale view: {0}")]
    Stale(String),
    #[error("serializing: {0}")]
    Serialize(#[from] serde_json::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Every value [`Error::metric_label`] returns, so metrics can start each at zero.
    pub const METRIC_LABELS: &[&str] = &[
        "conflict",
        "not_found",
        "throttled",
        "server_error",
        "api_error",
        "transport",
        "timeout",
        "invalid",
        "fenced",
        "serialize",
        "stale",
    ];

    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube { source, .. } => match source.as_ref() {
                kube::Error::Api(s) if s.code == 409 => "conflict",
                kube::Error::Api(s) if s.code == 404 => "not_found",
                kube::Error::Api(s) if s.code == 429 => "throttled",
                kube::Error::Api(s) if s.code >= 500 => "server_error",
                kube::Error::Api(_) => "api_error",
                _ => "transport",
            },
            Error::Timeout { .. } => "timeout",
            Error::Invalid(_) => "invalid",
            Error::Fenced => "fenced",
            Error::Serialize(_) => "serialize",
            Error::Stale(_) => "stale",
        }
    }

    fn api_code(&self) -> Option<u16> {
        match self {
            Error::Kube { source, .. } => match source.as_ref() {
                kube::Error::Api(s) => Some(s.code),
                _ => None,
            },
            _ => None,
        }
    }

    pub fn is_not_found(&self) -> bool {
        self.api_code() == Some(404)
    }

    pub fn is_conflict(&self) -> bool {
        self.api_code() == Some(409)
    }

    /// A precondition failed or the view was stale: retry soon, from fresh state.
    pub fn is_retry_soon(&self) -> bool {
        self.is_conflict() || matches!(self, Error::Stale(_))
    }

    /// The API failed for now (throttled, a 5xx, no answer, a broken connection) or this
    /// replica may not write for now (fenced): nothing about the lock is wrong, and retrying
    /// soon after the API recovers is right.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Timeout { .. } | Error::Fenced => true,
            Error::Kube { source, .. } => match source.as_ref() {
                kube::Error::Api(s) => s.code == 429 || s.code >= 500,
                _ => true,
            },
            _ => false,
        }
    }

    /// The write may or may not have been applied: no answer in time, a transport error, or
    /// a 5xx (the apiserver's own timeouts answer 500/504 after the write may have
    /// committed). Whatever the write touched must be read again before it is trusted.
    pub fn outcome_unknown(&self) -> bool {
        match self {
            Error::Timeout { .. } => true,
            Error::Kube { source, .. } => match source.as_ref() {
                kube::Error::Api(s) => s.code >= 500,
                _ => true,
            },
            _ => false,
        }
    }

    /// A guarded write of a pod failed its UID guard: the pod of that name is another pod now.
    /// kubesim answers 409 (a precondition); the real apiserver 422 (`metadata.uid`: field is
    /// immutable).
    pub fn is_uid_mismatch(&self) -> bool {
        match self {
            Error::Kube { source, .. } => match source.as_ref() {
                kube::Error::Api(s) => {
                    s.code == 409
                        || (s.code == 422 && s.message.contains("uid"))
                        || (s.code == 422 && s.message.contains("immutable"))
                }
                _ => false,
            },
            _ => false,
        }
    }
}
