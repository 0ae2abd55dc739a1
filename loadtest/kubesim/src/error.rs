//! API errors in the wire format of the real kube-apiserver (`metav1.Status`).
//!
//! Clients branch on `reason` and `code` (kube-rs maps 409 to a conflict, kubectl prints
//! `message` verbatim and formats `details.causes` of 422s), so wording and fields follow the
//! apiserver's `k8s.io/apimachinery/pkg/api/errors` constructors exactly.

use serde_json::{Value, json};

use crate::registry::ResourceType;

#[derive(Debug, Clone)]
pub struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
    pub details: Option<Value>,
    /// Seconds for a `Retry-After` header (429/503 faults).
    pub retry_after: Option<u64>,
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}): {}", self.code, self.reason, self.message)
    }
}

impl std::error::Error for ApiError {}

fn details(rt: &ResourceType, name: &str) -> Value {
    let mut d = json!({ "name": name, "kind": rt.plural });
    if !rt.group.is_empty() {
        d["group"] = json!(rt.group);
    }
    d
}

impl ApiError {
    pub fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            code,
            reason,
            message: message.into(),
            details: None,
            retry_after: None,
        }
    }

    pub fn not_found(rt: &ResourceType, name: &str) -> Self {
        ApiError {
            details: Some(details(rt, name)),
            ..Self::new(
                404,
                "NotFound",
                format!("{} \"{}\" not found", rt.group_resource(), name),
            )
        }
    }

    pub fn namespace_not_found(ns: &str) -> Self {
        ApiError {
            details: Some(json!({"name": ns, "kind": "namespaces"})),
            ..Self::new(404, "NotFound", format!("namespaces \"{ns}\" not found"))
        }
    }

    pub fn already_exists(rt: &ResourceType, name: &str) -> Self {
        ApiError {
            details: Some(details(rt, name)),
            ..Self::new(
                409,
                "AlreadyExists",
                format!("{} \"{}\" already exists", rt.group_resource(), name),
            )
        }
    }

    pub fn conflict(rt: &ResourceType, name: &str, why: &str) -> Self {
        ApiError {
            details: Some(details(rt, name)),
            ..Self::new(
                409,
                "Conflict",
                format!(
                    "Operation cannot be fulfilled on {} \"{}\": {}",
                    rt.group_resource(),
                    name,
                    why
                ),
            )
        }
    }

    pub fn stale(rt: &ResourceType, name: &str) -> Self {
        Self::conflict(
            rt,
            name,
            "the object has been modified; please apply your changes to the latest version and try again",
        )
    }

    /// 422 with field causes; `causes` are `(reason, field, message)`.
    pub fn invalid(rt: &ResourceType, name: &str, causes: &[(String, String, String)]) -> Self {
        // The message names each distinct finding once (the causes keep duplicates).
        let mut parts: Vec<String> = vec![];
        for (_, field, msg) in causes {
            let p = if field.is_empty() {
                msg.clone()
            } else {
                format!("{field}: {msg}")
            };
            if !parts.contains(&p) {
                parts.push(p);
            }
        }
        let joined = if parts.len() == 1 {
            parts[0].clone()
        } else {
            format!("[{}]", parts.join(", "))
        };
        let qualified = if rt.group.is_empty() {
            rt.kind.clone()
        } else {
            format!("{}.{}", rt.kind, rt.group)
        };
        let causes_json: Vec<Value> = causes
            .iter()
            .map(|(reason, field, msg)| json!({"reason": reason, "message": msg, "field": field}))
            .collect();
        let mut d = json!({"kind": rt.kind, "causes": causes_json});
        if !name.is_empty() {
            d["name"] = json!(name);
        }
        if !rt.group.is_empty() {
            d["group"] = json!(rt.group);
        }
        ApiError {
            details: Some(d),
            ..Self::new(
                422,
                "Invalid",
                format!("{qualified} \"{name}\" is invalid: {joined}"),
            )
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }

    pub fn method_not_supported(rt: &ResourceType, verb: &str) -> Self {
        ApiError {
            details: Some(json!({"kind": rt.plural})),
            ..Self::new(
                405,
                "MethodNotAllowed",
                format!(
                    "{verb} is not supported on resources of kind \"{}\"",
                    rt.group_resource()
                ),
            )
        }
    }

    pub fn gone(message: impl Into<String>) -> Self {
        Self::new(410, "Expired", message)
    }

    /// 500 ServerTimeout, as `errors.NewServerTimeout`: what the apiserver answers when
    /// storage did not confirm a write in time (the write may still have been committed).
    pub fn server_timeout(group: &str, plural: &str, operation: &str) -> Self {
        let qualified = if group.is_empty() {
            plural.to_string()
        } else {
            format!("{plural}.{group}")
        };
        let mut d = json!({"name": operation, "kind": plural});
        if !group.is_empty() {
            d["group"] = json!(group);
        }
        ApiError {
            details: Some(d),
            ..Self::new(
                500,
                "ServerTimeout",
                format!(
                    "The {operation} operation against {qualified} could not be completed at this time, please try again."
                ),
            )
        }
    }

    /// 504 Timeout, as the apiserver's request-timeout filter answers (`errors.NewTimeoutError`).
    pub fn request_timeout() -> Self {
        ApiError {
            details: Some(json!({})),
            ..Self::new(
                504,
                "Timeout",
                "Timeout: request did not complete within requested timeout - context deadline exceeded",
            )
        }
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(500, "InternalError", message)
    }

    pub fn status_json(&self) -> Value {
        let mut s = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if let Some(d) = &self.details {
            s["details"] = d.clone();
        }
        if let Some(secs) = self.retry_after {
            let d = s["details"].as_object_mut().map(|m| {
                m.insert("retryAfterSeconds".into(), json!(secs));
            });
            if d.is_none() {
                s["details"] = json!({"retryAfterSeconds": secs});
            }
        }
        s
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
