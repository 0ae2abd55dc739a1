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
}
