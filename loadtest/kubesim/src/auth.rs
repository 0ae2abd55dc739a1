//! Opt-in authentication and RBAC authorization ([`crate::SimConfig::rbac`]), as the apiserver
//! does them for the requests this project makes.
//!
//! - Authentication: `Authorization: Bearer <token>`. [`ADMIN_TOKEN`] (the token of
//!   [`crate::kubeconfig_for`] and of in-process clients) is a `system:masters` user; static
//!   tokens come from [`crate::SimConfig::tokens`]; ServiceAccount tokens are issued by the
//!   TokenRequest subresource (`POST .../serviceaccounts/<name>/token`) and are valid while that
//!   ServiceAccount (same UID) exists and until they expire. A token nobody issued is answered
//!   401 Unauthorized; a request without one is `system:anonymous`.
//! - Authorization: `system:masters` may do anything. Otherwise ClusterRoleBindings (to
//!   ClusterRoles) and RoleBindings of the request's namespace (to Roles or ClusterRoles) are
//!   evaluated for the verb, API group, resource, subresource and name, with RBAC v1's rule
//!   semantics (`*`, `*/subresource`, `resourceNames`, `nonResourceURLs`). Discovery, `/version`,
//!   `/openapi` and health paths are open to authenticated users (the bootstrap
//!   `system:discovery` and `system:public-info-viewer` roles); `/version` and health paths
//!   to anonymous ones too. Denials are 403 Forbidden with the apiserver's message:
//!   `pods "x" is forbidden: User "system:serviceaccount:ns:sa" cannot patch resource
//!   "pods/status" in API group "" in the namespace "ns"`.
//!
//! Not modelled: aggregated ClusterRoles, the bootstrap roles beyond the above, escalation
//! checks on writing Roles and bindings, impersonation, client certificates.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::error::ApiError;
use crate::meta;
use crate::store::State;

/// The admin's bearer token (a `system:masters` user).
pub const ADMIN_TOKEN: &str = "kubesim";

/// An authenticated user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    pub name: String,
    #[serde(default)]
    pub groups: Vec<String>,
}

impl User {
    pub fn new(name: impl Into<String>, groups: &[&str]) -> User {
        User {
            name: name.into(),
            groups: groups.iter().map(|g| g.to_string()).collect(),
        }
    }

    pub fn admin() -> User {
        User::new("kubesim-admin", &["system:masters", "system:authenticated"])
    }

    pub fn anonymous() -> User {
        User::new("system:anonymous", &["system:unauthenticated"])
    }

    pub fn service_account(ns: &str, name: &str) -> User {
        User {
            name: format!("system:serviceaccount:{ns}:{name}"),
            groups: vec![
                "system:serviceaccounts".into(),
                format!("system:serviceaccounts:{ns}"),
                "system:authenticated".into(),
            ],
        }
    }

    fn in_group(&self, g: &str) -> bool {
        self.groups.iter().any(|x| x == g)
    }
}

struct Issued {
    namespace: String,
    name: String,
    uid: String,
    expires: Instant,
}

/// Tokens and the RBAC switch.
pub struct Auth {
    pub enabled: bool,
    statics: BTreeMap<String, User>,
    issued: Mutex<HashMap<String, Issued>>,
}

impl Auth {
    pub fn new(enabled: bool, statics: BTreeMap<String, User>) -> Auth {
        Auth {
            enabled,
            statics,
            issued: Mutex::new(HashMap::new()),
        }
    }

    fn issued(&self) -> std::sync::MutexGuard<'_, HashMap<String, Issued>> {
        match self.issued.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// A token for ServiceAccount `ns/name` (uid `uid`), valid for `ttl`.
    pub fn issue(&self, ns: &str, name: &str, uid: &str, ttl: Duration) -> String {
        let token = format!(
            "kubesim-sa.{}{}",
            uuid::Uuid::new_v4().simple(),
            uuid::Uuid::new_v4().simple()
        );
        self.issued().insert(
            token.clone(),
            Issued {
                namespace: ns.into(),
                name: name.into(),
                uid: uid.into(),
                expires: Instant::now() + ttl,
            },
        );
        token
    }

    /// Who a request's `Authorization` header says it is; 401 for a token nobody issued.
    pub fn authenticate(&self, st: &State, authorization: Option<&str>) -> Result<User, ApiError> {
        let Some(h) = authorization else {
            return Ok(User::anonymous());
        };
        let token = h
            .strip_prefix("Bearer ")
            .or_else(|| h.strip_prefix("bearer "))
            .map(str::trim)
            .ok_or_else(unauthorized)?;
        if token == ADMIN_TOKEN {
            return Ok(User::admin());
        }
        if let Some(u) = self.statics.get(token) {
            return Ok(u.clone());
        }
        let issued = self.issued();
        let i = issued.get(token).ok_or_else(unauthorized)?;
        if i.expires < Instant::now() {
            return Err(unauthorized());
        }
        let sa = st
            .registry
            .get("", "v1", "serviceaccounts")
            .and_then(|rt| st.get(&rt, Some(&i.namespace), &i.name));
        match sa {
            Some(sa) if meta::uid(&sa) == i.uid => Ok(User::service_account(&i.namespace, &i.name)),
            _ => Err(unauthorized()),
        }
    }
}

pub fn unauthorized() -> ApiError {
    ApiError::new(401, "Unauthorized", "Unauthorized")
}

/// What a request asks to do, as the apiserver's request-info resolver sees it.
#[derive(Debug, Clone, Default)]
pub struct Attributes {
    pub verb: String,
    /// False for non-resource paths (`/version`, `/api`, ...).
    pub resource_request: bool,
    pub path: String,
    pub group: String,
    pub namespace: String,
    pub resource: String,
    pub subresource: String,
    pub name: String,
}

impl Attributes {
    /// Parse a request path the way the apiserver does (before knowing whether the resource
    /// exists): `/api/v1/...` or `/apis/<group>/<version>/...`, `namespaces/<ns>/<resource>/
    /// <name>/<subresource>`; `namespaces/<name>` is resource `namespaces` in namespace `<name>`.
    pub fn from_request(method: &str, path: &str, watch: bool) -> Attributes {
        let segs: Vec<&str> = path
            .trim_matches('/')
            .split('/')
            .filter(|s| !s.is_empty())
            .collect();
        let mut a = Attributes {
            path: path.to_string(),
            ..Default::default()
        };
        let rest: &[&str] = match segs.as_slice() {
            ["api", _v, rest @ ..] if !rest.is_empty() => rest,
            ["apis", g, _v, rest @ ..] if !rest.is_empty() => {
                a.group = g.to_string();
                rest
            }
            _ => {
                a.verb = method.to_lowercase();
                return a;
            }
        };
        a.resource_request = true;
        let mut parts: Vec<&str> = rest.to_vec();
        if parts.first() == Some(&"namespaces") && parts.len() > 1 {
            a.namespace = parts[1].to_string();
            if parts.len() > 2 && !matches!(parts[2], "status" | "finalize") {
                parts = parts[2..].to_vec();
            }
        }
        a.resource = parts.first().map(|s| s.to_string()).unwrap_or_default();
        a.name = parts.get(1).map(|s| s.to_string()).unwrap_or_default();
        a.subresource = parts.get(2).map(|s| s.to_string()).unwrap_or_default();
        a.verb = match (method, a.name.is_empty()) {
            ("GET" | "HEAD", true) if watch => "watch",
            ("GET" | "HEAD", true) => "list",
            ("GET" | "HEAD", false) => "get",
            ("POST", _) => "create",
            ("PUT", _) => "update",
            ("PATCH", _) => "patch",
            ("DELETE", true) => "deletecollection",
            ("DELETE", false) => "delete",
            (m, _) => {
                return Attributes {
                    verb: m.to_lowercase(),
                    ..a
                };
            }
        }
        .to_string();
        a
    }

    fn combined_resource(&self) -> String {
        if self.subresource.is_empty() {
            self.resource.clone()
        } else {
            format!("{}/{}", self.resource, self.subresource)
        }
    }
}

fn strs(v: &Value, key: &str) -> Vec<String> {
    v.get(key)
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

fn has(list: &[String], x: &str) -> bool {
    list.iter().any(|v| v == "*" || v == x)
}

fn rule_allows(rule: &Value, a: &Attributes) -> bool {
    if !has(&strs(rule, "verbs"), &a.verb) {
        return false;
    }
    if !a.resource_request {
        return strs(rule, "nonResourceURLs").iter().any(|u| {
            u == "*" || *u == a.path || u.strip_suffix('*').is_some_and(|p| a.path.starts_with(p))
        });
    }
    if !has(&strs(rule, "apiGroups"), &a.group) {
        return false;
    }
    let combined = a.combined_resource();
    let resource_ok = strs(rule, "resources").iter().any(|r| {
        r == "*"
            || *r == combined
            || (!a.subresource.is_empty() && *r == format!("*/{}", a.subresource))
    });
    if !resource_ok {
        return false;
    }
    let names = strs(rule, "resourceNames");
    names.is_empty() || names.contains(&a.name)
}

fn subject_matches(s: &Value, user: &User, binding_ns: &str) -> bool {
    let name = s.get("name").and_then(Value::as_str).unwrap_or("");
    match s.get("kind").and_then(Value::as_str) {
        Some("User") => user.name == name,
        Some("Group") => user.in_group(name),
        Some("ServiceAccount") => {
            let ns = s
                .get("namespace")
                .and_then(Value::as_str)
                .filter(|n| !n.is_empty())
                .unwrap_or(binding_ns);
            user.name == format!("system:serviceaccount:{ns}:{name}")
        }
        _ => false,
    }
}

fn objects(st: &State, plural: &str) -> Vec<std::sync::Arc<Value>> {
    let key = ("rbac.authorization.k8s.io".to_string(), plural.to_string());
    st.objects_of(&key).cloned().collect()
}

fn role_rules(st: &State, kind: &str, name: &str, ns: &str) -> Vec<Value> {
    let (plural, ns) = if kind == "ClusterRole" {
        ("clusterroles", "")
    } else {
        ("roles", ns)
    };
    objects(st, plural)
        .into_iter()
        .find(|r| meta::name(r) == name && meta::namespace(r) == ns)
        .and_then(|r| r.get("rules").and_then(Value::as_array).cloned())
        .unwrap_or_default()
}

/// Whether `user` may do `a`, by the bindings and roles in the store.
pub fn authorize(st: &State, user: &User, a: &Attributes) -> bool {
    if user.in_group("system:masters") {
        return true;
    }
    if !a.resource_request && a.verb == "get" {
        let public = matches!(
            a.path.as_str(),
            "/version" | "/healthz" | "/livez" | "/readyz"
        ) || a.path.starts_with("/version/");
        let discovery = a.path == "/api"
            || a.path == "/apis"
            || a.path.starts_with("/api/")
            || a.path.starts_with("/apis/")
            || a.path.starts_with("/openapi/");
        if public || (discovery && user.in_group("system:authenticated")) {
            return true;
        }
    }
    let allows = |kind: &str, name: &str, ns: &str| {
        role_rules(st, kind, name, ns)
            .iter()
            .any(|r| rule_allows(r, a))
    };
    let bound = |b: &Value, ns: &str| {
        b.get("subjects")
            .and_then(Value::as_array)
            .is_some_and(|ss| ss.iter().any(|s| subject_matches(s, user, ns)))
    };
    for b in &objects(st, "clusterrolebindings") {
        let kind = b.pointer("/roleRef/kind").and_then(Value::as_str);
        let name = b
            .pointer("/roleRef/name")
            .and_then(Value::as_str)
            .unwrap_or("");
        if kind == Some("ClusterRole") && bound(b, "") && allows("ClusterRole", name, "") {
            return true;
        }
    }
    if !a.namespace.is_empty() {
        for b in objects(st, "rolebindings")
            .iter()
            .filter(|b| meta::namespace(b) == a.namespace)
        {
            let kind = b
                .pointer("/roleRef/kind")
                .and_then(Value::as_str)
                .unwrap_or("");
            let name = b
                .pointer("/roleRef/name")
                .and_then(Value::as_str)
                .unwrap_or("");
            if bound(b, &a.namespace) && allows(kind, name, &a.namespace) {
                return true;
            }
        }
    }
    false
}

/// The apiserver's 403 for a denied request.
pub fn forbidden(user: &User, a: &Attributes) -> ApiError {
    if !a.resource_request {
        return ApiError {
            details: Some(json!({})),
            ..ApiError::new(
                403,
                "Forbidden",
                format!(
                    "forbidden: User {:?} cannot {} path {:?}",
                    user.name, a.verb, a.path
                ),
            )
        };
    }
    let why = if a.namespace.is_empty() {
        format!(
            "User {:?} cannot {} resource {:?} in API group {:?} at the cluster scope",
            user.name,
            a.verb,
            a.combined_resource(),
            a.group
        )
    } else {
        format!(
            "User {:?} cannot {} resource {:?} in API group {:?} in the namespace {:?}",
            user.name,
            a.verb,
            a.combined_resource(),
            a.group,
            a.namespace
        )
    };
    let qualified = if a.group.is_empty() {
        a.resource.clone()
    } else {
        format!("{}.{}", a.resource, a.group)
    };
    let message = if a.name.is_empty() {
        format!("{qualified} is forbidden: {why}")
    } else {
        format!("{qualified} {:?} is forbidden: {why}", a.name)
    };
    let mut details = json!({"kind": a.resource});
    if !a.name.is_empty() {
        details["name"] = json!(a.name);
    }
    if !a.group.is_empty() {
        details["group"] = json!(a.group);
    }
    ApiError {
        details: Some(details),
        ..ApiError::new(403, "Forbidden", message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_attributes() {
        let a = Attributes::from_request("PATCH", "/api/v1/namespaces/x/pods/p/status", false);
        assert_eq!(
            (
                a.verb.as_str(),
                a.namespace.as_str(),
                a.combined_resource(),
                a.name.as_str()
            ),
            ("patch", "x", "pods/status".to_string(), "p")
        );
        let a = Attributes::from_request("GET", "/api/v1/namespaces/x", false);
        assert_eq!(
            (a.resource.as_str(), a.namespace.as_str(), a.name.as_str()),
            ("namespaces", "x", "x")
        );
        let a = Attributes::from_request("GET", "/apis/coordination.k8s.io/v1/leases", true);
        assert_eq!(
            (a.verb.as_str(), a.group.as_str()),
            ("watch", "coordination.k8s.io")
        );
        let a = Attributes::from_request("GET", "/version", false);
        assert!(!a.resource_request);
    }

    #[test]
    fn rules() {
        let a = Attributes::from_request("GET", "/api/v1/namespaces/x/pods/p/status", false);
        let r = json!({"apiGroups": [""], "resources": ["*/status"], "verbs": ["get"]});
        assert!(rule_allows(&r, &a));
        let r = json!({"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]});
        assert!(!rule_allows(&r, &a));
        let r = json!({"apiGroups": ["*"], "resources": ["pods/status"], "verbs": ["*"], "resourceNames": ["q"]});
        assert!(!rule_allows(&r, &a));
    }

    #[test]
    fn forbidden_message() {
        let u = User::service_account("ns", "sa");
        let a = Attributes::from_request("PATCH", "/api/v1/namespaces/x/pods/p", false);
        assert_eq!(
            forbidden(&u, &a).message,
            "pods \"p\" is forbidden: User \"system:serviceaccount:ns:sa\" cannot patch resource \"pods\" in API group \"\" in the namespace \"x\""
        );
    }
}
