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

/// What kind of failure an [`Error`] is, for metrics labels (`kind`) and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    Conflict,
    NotFound,
    Throttled,
    ServerError,
    ApiError,
    Transport,
    Timeout,
    Invalid,
    Fenced,
    Serialize,
    Stale,
}

impl ErrorKind {
    pub const ALL: [ErrorKind; 11] = [
        ErrorKind::Conflict,
        ErrorKind::NotFound,
        ErrorKind::Throttled,
        ErrorKind::ServerError,
        ErrorKind::ApiError,
        ErrorKind::Transport,
        ErrorKind::Timeout,
        ErrorKind::Invalid,
        ErrorKind::Fenced,
        ErrorKind::Serialize,
        ErrorKind::Stale,
    ];

    pub fn label(self) -> &'static str {
        match self {
            ErrorKind::Conflict => "conflict",
            ErrorKind::NotFound => "not_found",
            ErrorKind::Throttled => "throttled",
            ErrorKind::ServerError => "server_error",
            ErrorKind::ApiError => "api_error",
            ErrorKind::Transport => "transport",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Invalid => "invalid",
            ErrorKind::Fenced => "fenced",
            ErrorKind::Serialize => "serialize",
            ErrorKind::Stale => "stale",
        }
    }
}

impl Error {
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Kube { source, .. } => match source.as_ref() {
                kube::Error::Api(s) if s.code == 409 => ErrorKind::Conflict,
                kube::Error::Api(s) if s.code == 404 => ErrorKind::NotFound,
                kube::Error::Api(s) if s.code == 429 => ErrorKind::Throttled,
                kube::Error::Api(s) if s.code >= 500 => ErrorKind::ServerError,
                kube::Error::Api(_) => ErrorKind::ApiError,
                _ => ErrorKind::Transport,
            },
            Error::Timeout { .. } => ErrorKind::Timeout,
            Error::Invalid(_) => ErrorKind::Invalid,
            Error::Fenced => ErrorKind::Fenced,
            Error::Serialize(_) => ErrorKind::Serialize,
            Error::Stale(_) => ErrorKind::Stale,
        }
    }

    pub fn metric_label(&self) -> &'static str {
        self.kind().label()
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
