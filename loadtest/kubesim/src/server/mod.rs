//! The HTTP face of kubesim: routing of Kubernetes REST paths, content negotiation (JSON,
//! Table, PartialObjectMetadata), verbs, watch streams, and the `/sim/` control endpoints.
//!
//! Everything a client sees passes through [`handle`]; it parses the request, applies faults,
//! and calls the store. It holds no state of its own beyond [`App`].

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::controllers::PodFaults;
use crate::convert;
use crate::error::{ApiError, ApiResult};
use crate::faults::{FaultConfig, Faults, Verdict, WatchShape};
use crate::meta;
use crate::patch;
use crate::registry::ResourceType;
use crate::selector::{FieldSelector, LabelSelector};
use crate::store::{DeleteOpts, Event, EventType, Propagation, Store, Subresource, WriteOpts};
use crate::table;
use crate::{discovery, openapi};

mod read;
mod sim;
mod watch;
pub(crate) use watch::line as watch_line;
mod write;

use sim::*;
use write::*;

/// Shared state of the HTTP layer.
pub struct App {
    pub store: Arc<Store>,
    pub faults: Arc<Faults>,
    pub auth: Arc<crate::auth::Auth>,
    pub pods: PodFaults,
    pub bookmark_interval: Duration,
}

pub fn router(app: Arc<App>) -> axum::Router {
    axum::Router::new().fallback(move |req: Request<Body>| {
        let app = app.clone();
        async move { handle(app, req).await }
    })
}

type Query = HashMap<String, String>;

fn parse_query(q: Option<&str>) -> Query {
    q.map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default()
}

pub(crate) fn json_response(code: StatusCode, v: &Value) -> Response<Body> {
    let body = serde_json::to_vec(v).unwrap_or_default();
    let mut r = Response::new(Body::from(body));
    *r.status_mut() = code;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

pub(crate) fn error_response(e: &ApiError) -> Response<Body> {
    let code = StatusCode::from_u16(e.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut r = json_response(code, &e.status_json());
    if let Some(s) = e.retry_after
        && let Ok(v) = HeaderValue::from_str(&s.to_string())
    {
        r.headers_mut().insert(header::RETRY_AFTER, v);
    }
    r
}

/// What representation the client asked for in `Accept`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Repr {
    Full,
    Table,
    Metadata,
}

fn repr(headers: &HeaderMap) -> Repr {
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    // The first acceptable media type wins, as in the apiserver's negotiation.
    for part in accept.split(',') {
        let p = part.replace(' ', "");
        if p.contains("as=Table") {
            return Repr::Table;
        }
        if p.contains("as=PartialObjectMetadata") {
            return Repr::Metadata;
        }
        if p.starts_with("application/json") || p.starts_with("*/*") || p.is_empty() {
            return Repr::Full;
        }
    }
    Repr::Full
}

fn agent(headers: &HeaderMap) -> String {
    headers
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("unknown")
        .to_string()
}

pub async fn handle(app: Arc<App>, req: Request<Body>) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path().to_string();
    let query = parse_query(parts.uri.query());
    let body = match axum::body::to_bytes(body, 64 << 20).await {
        Ok(b) => b,
        Err(e) => return error_response(&ApiError::bad_request(format!("reading body: {e}"))),
    };
    if let Some(rest) = path.strip_prefix("/sim/") {
        return sim_endpoint(&app, &parts.method, rest, &body).await;
    }
    let ua = agent(&parts.headers);
    let is_write = parts.method != Method::GET;
    // Recorded when answered, or when dropped unanswered (the client gave up).
    let attempt = (is_write && app.store.config.attempt_log_max > 0)
        .then(|| Attempt::start(&app, &ua, &parts.method, &path));
    let late = if is_write {
        let (group, plural) = crate::proxy::resource_of(&path);
        let (_, _, name) = object_of(&path);
        app.faults.late_commit(&ua, &group, &plural, &name)
    } else {
        Duration::ZERO
    };
    let answer = if late.is_zero() {
        handle_api(&app, &parts, &path, &query, body, &ua, is_write).await
    } else {
        // Served in a task of its own: it commits even if this request is dropped.
        let app = app.clone();
        let mut copy = Request::builder()
            .method(parts.method.clone())
            .uri(parts.uri.clone())
            .version(parts.version);
        for (k, v) in &parts.headers {
            copy = copy.header(k, v);
        }
        let parts = match copy.body(()) {
            Ok(r) => r.into_parts().0,
            Err(e) => {
                return error_response(&ApiError::internal(format!("late commit: {e}")));
            }
        };
        let ua = ua.clone();
        let served = tokio::spawn(crate::store::SERVING_LATE.scope(true, async move {
            tokio::time::sleep(late).await;
            handle_api(&app, &parts, &path, &query, body, &ua, true).await
        }));
        match served.await {
            Ok(answer) => answer,
            Err(e) => error_response(&ApiError::internal(format!("late commit: {e}"))),
        }
    };
    if let Some(mut a) = attempt {
        a.answered(answer.status().as_u16());
    }
    answer
}

/// The namespace, resource and name a request path is for (empty when it names none):
/// …/namespaces/<ns>/<resource>/<name>[/<sub>], or a cluster-scoped
/// /api(s)/…/<version>/<resource>/<name>.
fn object_of(path: &str) -> (String, String, String) {
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let seg = |i: usize| segs.get(i).copied().unwrap_or_default().to_string();
    match segs.iter().position(|s| *s == "namespaces") {
        Some(i) if segs.len() > i + 2 => (seg(i + 1), seg(i + 2), seg(i + 3)),
        _ => {
            let base = if segs.first() == Some(&"api") { 2 } else { 3 };
            (String::new(), seg(base), seg(base + 1))
        }
    }
}

/// A write request in flight: recorded in the store's attempt log when answered or dropped.
struct Attempt {
    app: Arc<App>,
    record: Option<crate::store::WriteAttempt>,
    started: std::time::Instant,
}

impl Attempt {
    fn start(app: &Arc<App>, ua: &str, method: &Method, path: &str) -> Attempt {
        let (namespace, resource, name) = object_of(path);
        Attempt {
            app: app.clone(),
            record: Some(crate::store::WriteAttempt {
                at_ms: app.store.elapsed_ms(),
                actor: ua.to_string(),
                method: method.to_string(),
                namespace,
                resource,
                name,
                status: 0,
                elapsed_ms: 0,
            }),
            started: std::time::Instant::now(),
        }
    }

    fn answered(&mut self, status: u16) {
        if let Some(r) = self.record.as_mut() {
            r.status = status;
        }
    }
}

impl Drop for Attempt {
    fn drop(&mut self) {
        if let Some(mut r) = self.record.take() {
            r.elapsed_ms = self.started.elapsed().as_millis() as u64;
            self.app.store.record_attempt(r);
        }
    }
}

async fn handle_api(
    app: &Arc<App>,
    parts: &http::request::Parts,
    path: &str,
    query: &Query,
    body: Bytes,
    ua: &str,
    is_write: bool,
) -> Response<Body> {
    let (group, plural) = crate::proxy::resource_of(path);
    if let Verdict::Fail(e) = app.faults.admit(ua, is_write, (&group, &plural)).await {
        return error_response(&e);
    }
    if app.auth.enabled {
        let authorization = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        let st = app.store.lock();
        let user = match app.auth.authenticate(&st, authorization) {
            Ok(u) => u,
            Err(e) => return error_response(&e),
        };
        let attrs = crate::auth::Attributes::from_request(
            parts.method.as_str(),
            path,
            truthy(query, "watch"),
        );
        if !crate::auth::authorize(&st, &user, &attrs) {
            return error_response(&crate::auth::forbidden(&user, &attrs));
        }
    }
    match route(app, &parts.method, path, query, &parts.headers, body, ua).await {
        Ok(r) => r,
        Err(e) => error_response(&e),
    }
}

async fn route(
    app: &Arc<App>,
    method: &Method,
    path: &str,
    query: &Query,
    headers: &HeaderMap,
    body: Bytes,
    ua: &str,
) -> ApiResult<Response<Body>> {
    let segs: Vec<&str> = path
        .trim_matches('/')
        .split('/')
        .filter(|s| !s.is_empty())
        .collect();
    let registry = app.store.registry();
    match segs.as_slice() {
        ["version"] => return Ok(json_response(StatusCode::OK, &discovery::version())),
        ["healthz"] | ["livez"] | ["readyz"] => {
            let mut r = Response::new(Body::from("ok"));
            r.headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
            return Ok(r);
        }
        ["api"] => return Ok(json_response(StatusCode::OK, &discovery::core_versions())),
        ["apis"] => return Ok(json_response(StatusCode::OK, &discovery::groups(&registry))),
        ["api", "v1"] => {
            return Ok(json_response(
                StatusCode::OK,
                &discovery::resources(&registry, "", "v1"),
            ));
        }
        ["apis", g] => {
            return discovery::group(&registry, g)
                .map(|v| json_response(StatusCode::OK, &v))
                .ok_or_else(|| {
                    ApiError::new(
                        404,
                        "NotFound",
                        "the server could not find the requested resource",
                    )
                });
        }
        ["apis", g, v] => {
            if registry.in_group_version(g, v).next().is_none() {
                return Err(ApiError::new(
                    404,
                    "NotFound",
                    "the server could not find the requested resource",
                ));
            }
            return Ok(json_response(
                StatusCode::OK,
                &discovery::resources(&registry, g, v),
            ));
        }
        ["openapi", "v2"] => return Ok(json_response(StatusCode::OK, &openapi::v2(&registry))),
        ["openapi", "v3"] => return Ok(json_response(StatusCode::OK, &openapi::index(&registry))),
        ["openapi", "v3", rest @ ..] => {
            let gv = rest.join("/");
            return openapi::document(&registry, &gv)
                .map(|v| json_response(StatusCode::OK, &v))
                .ok_or_else(|| {
                    ApiError::new(
                        404,
                        "NotFound",
                        "the server could not find the requested resource",
                    )
                });
        }
        _ => {}
    }
    let (group, version, rest) = match segs.as_slice() {
        ["api", v, rest @ ..] => ("", *v, rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => {
            return Err(ApiError::new(
                404,
                "NotFound",
                "the server could not find the requested resource",
            ));
        }
    };
    // /namespaces/{ns}/{plural}/... is namespaced unless {plural} is not a namespaced kind
    // (then it is a subresource of the namespace itself, e.g. namespaces/x/status).
    let (ns, plural, name, sub) = match rest {
        ["namespaces", ns, plural, tail @ ..]
            if registry
                .get(group, version, plural)
                .is_some_and(|t| t.namespaced) =>
        {
            (
                Some(*ns),
                *plural,
                tail.first().copied(),
                tail.get(1).copied(),
            )
        }
        [plural, tail @ ..] => (None, *plural, tail.first().copied(), tail.get(1).copied()),
        [] => {
            return Err(ApiError::new(
                404,
                "NotFound",
                "the server could not find the requested resource",
            ));
        }
    };
    let rt = registry.get(group, version, plural).ok_or_else(|| {
        ApiError::new(
            404,
            "NotFound",
            "the server could not find the requested resource",
        )
    })?;
    let ctx = Ctx {
        app: app.clone(),
        rt,
        ns: ns.map(str::to_string),
        query: query.clone(),
        repr: repr(headers),
        ua: ua.to_string(),
        content_type: headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("application/json")
            .to_string(),
    };
    ctx.serve(method, name, sub, body).await
}

struct Ctx {
    app: Arc<App>,
    rt: Arc<ResourceType>,
    ns: Option<String>,
    query: Query,
    repr: Repr,
    ua: String,
    content_type: String,
}

fn truthy(q: &Query, k: &str) -> bool {
    matches!(q.get(k).map(String::as_str), Some("true") | Some("1"))
}

impl Ctx {
    fn write_opts(&self) -> WriteOpts {
        WriteOpts {
            actor: self.ua.clone(),
            dry_run: self.query.get("dryRun").is_some_and(|d| d == "All"),
            strict: self
                .query
                .get("fieldValidation")
                .is_some_and(|v| v == "Strict"),
        }
    }

    fn ns(&self) -> Option<&str> {
        if self.rt.namespaced {
            self.ns.as_deref()
        } else {
            None
        }
    }

    /// Serve one request on a resource, then apply the faults that act on a served write's
    /// answer ([`crate::faults::HoldResponse`], [`crate::faults::LoseResponse`]). The write is
    /// complete (committed, recorded, its watch event published) before its answer is held or
    /// lost: the store does all of it synchronously inside `serve_verb`.
    async fn serve(
        self,
        method: &Method,
        name: Option<&str>,
        sub: Option<&str>,
        body: Bytes,
    ) -> ApiResult<Response<Body>> {
        if *method == Method::GET {
            return self.serve_verb(method, name, sub, body).await;
        }
        let app = self.app.clone();
        let rt = self.rt.clone();
        let ua = self.ua.clone();
        let dry_run = self.write_opts().dry_run;
        let res = self.serve_verb(method, name, sub, body).await;
        let succeeded = !dry_run && res.as_ref().is_ok_and(|r| r.status().is_success());
        let fate = app.faults.write_fate(&ua, &rt.group, &rt.plural, succeeded);
        match fate.apply(method, &rt.group, &rt.plural).await {
            None => res,
            Some(lost) => Err(lost),
        }
    }

    async fn serve_verb(
        self,
        method: &Method,
        name: Option<&str>,
        sub: Option<&str>,
        body: Bytes,
    ) -> ApiResult<Response<Body>> {
        if sub == Some("token")
            && self.rt.group.is_empty()
            && self.rt.plural == "serviceaccounts"
            && *method == Method::POST
            && let Some(name) = name
        {
            return self.token_request(name, &body);
        }
        let subres = match sub {
            None => None,
            Some("status") if self.rt.status => Some(Subresource::Status),
            Some("scale") if self.rt.scale.is_some() => None,
            Some(_) => {
                return Err(ApiError::new(
                    404,
                    "NotFound",
                    "the server could not find the requested resource",
                ));
            }
        };
        let scale = sub == Some("scale");
        match (method.clone(), name) {
            (Method::GET, None) => {
                if truthy(&self.query, "watch") {
                    self.watch()
                } else {
                    self.list()
                }
            }
            (Method::GET, Some(name)) => {
                let obj = match self.stale_lag() {
                    Some(age) => self.app.store.get_as_of(&self.rt, self.ns(), name, age)?,
                    None => self.app.store.get(&self.rt, self.ns(), name)?,
                };
                if scale {
                    return Ok(json_response(StatusCode::OK, &self.to_scale(&obj)));
                }
                Ok(self.respond_one(StatusCode::OK, &obj))
            }
            (Method::POST, None) => {
                let obj = self.decode_body(&body)?;
                let stored = convert::to_stored(&self.rt, &obj);
                let created =
                    self.app
                        .store
                        .create(&self.rt, self.ns(), stored, &self.write_opts())?;
                Ok(self.respond_one(StatusCode::CREATED, &created))
            }
            (Method::PUT, Some(name)) => {
                let obj = self.decode_body(&body)?;
                // Custom resources do not allow unconditional updates.
                if self.rt.crd.is_some()
                    && !scale
                    && meta::meta_str(&obj, "resourceVersion").is_none_or(str::is_empty)
                {
                    return Err(ApiError {
                        details: Some(
                            json!({"name": name, "group": self.rt.group, "kind": self.rt.plural, "causes": [{"reason": "FieldValueInvalid", "message": "Invalid value: 0: must be specified for an update", "field": "metadata.resourceVersion"}]}),
                        ),
                        ..ApiError::new(
                            422,
                            "Invalid",
                            format!(
                                "{} \"{name}\" is invalid: metadata.resourceVersion: Invalid value: 0: must be specified for an update",
                                self.rt.group_resource()
                            ),
                        )
                    });
                }
                let sub = subres.unwrap_or(Subresource::Main);
                let rt = self.rt.clone();
                let updated = self.app.store.update_with(
                    &self.rt,
                    self.ns(),
                    name,
                    sub,
                    &self.write_opts(),
                    &mut |cur| {
                        if scale {
                            let cur = cur.ok_or_else(|| ApiError::not_found(&rt, name))?;
                            return apply_scale(&rt, cur, &obj);
                        }
                        Ok(convert::to_stored(&rt, &obj))
                    },
                    false,
                )?;
                if scale {
                    return Ok(json_response(StatusCode::OK, &self.to_scale(&updated)));
                }
                Ok(self.respond_one(StatusCode::OK, &updated))
            }
            (Method::PATCH, Some(name)) => self.patch(name, subres, scale, &body),
            (Method::DELETE, Some(name)) => {
                let opts = self.delete_opts(&body)?;
                let obj = self.app.store.delete(&self.rt, self.ns(), name, &opts)?;
                let still_there = self
                    .app
                    .store
                    .get(&self.rt, self.ns(), name)
                    .is_ok_and(|o| meta::uid(&o) == meta::uid(&obj));
                let is_pod = self.rt.group.is_empty() && self.rt.plural == "pods";
                let held = !meta::finalizers(&obj).is_empty();
                if (still_there && !opts.write.dry_run) || (opts.write.dry_run && held) {
                    return Ok(self.respond_one(StatusCode::OK, &obj));
                }
                if is_pod {
                    // Pods answer with the deleted object, marked as deleted now.
                    let mut o = (*obj).clone();
                    let m = meta::meta_mut(&mut o);
                    if !m.contains_key("deletionTimestamp") {
                        m.insert("deletionTimestamp".into(), json!(meta::now_rfc3339()));
                        m.insert("deletionGracePeriodSeconds".into(), json!(0));
                    }
                    return Ok(self.respond_one(StatusCode::OK, &o));
                }
                let mut details =
                    json!({"name": name, "kind": self.rt.plural, "uid": meta::uid(&obj)});
                if !self.rt.group.is_empty() {
                    details["group"] = json!(self.rt.group);
                }
                Ok(json_response(
                    StatusCode::OK,
                    &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "details": details}),
                ))
            }
            (Method::DELETE, None) => {
                let opts = self.delete_opts(&body)?;
                let keep = self.filter()?;
                let list = self
                    .app
                    .store
                    .list(&self.rt, self.ns(), &|o| keep(o), None, None)?;
                for item in &list.items {
                    match self.app.store.delete(
                        &self.rt,
                        Some(meta::namespace(item)),
                        meta::name(item),
                        &opts,
                    ) {
                        Ok(_) => {}
                        Err(e) if e.code == 404 => {}
                        Err(e) => return Err(e),
                    }
                }
                let items: Vec<Value> = list
                    .items
                    .iter()
                    .map(|o| convert::to_served(&self.rt, o))
                    .collect();
                Ok(json_response(
                    StatusCode::OK,
                    &json!({"kind": format!("{}List", self.rt.kind), "apiVersion": self.rt.api_version(), "metadata": {}, "items": items}),
                ))
            }
            (m, _) => Err(ApiError::method_not_supported(&self.rt, m.as_str())),
        }
    }

    /// TokenRequest (`POST .../serviceaccounts/<name>/token`): a bearer token for the
    /// ServiceAccount, which [`crate::auth`] maps to its user while it exists.
    fn token_request(&self, name: &str, body: &[u8]) -> ApiResult<Response<Body>> {
        let sa = self.app.store.get(&self.rt, self.ns(), name)?;
        let req = if body.is_empty() {
            json!({})
        } else {
            self.decode_body(body)?
        };
        let secs = req
            .pointer("/spec/expirationSeconds")
            .and_then(Value::as_i64)
            .unwrap_or(3600);
        if secs < 600 {
            return Err(ApiError {
                details: Some(
                    json!({"kind": "TokenRequest", "group": "authentication.k8s.io", "causes": [{"reason": "FieldValueInvalid", "message": format!("Invalid value: {secs}: may not specify a duration less than 10 minutes"), "field": "spec.expirationSeconds"}]}),
                ),
                ..ApiError::new(
                    422,
                    "Invalid",
                    format!(
                        "TokenRequest.authentication.k8s.io \"\" is invalid: spec.expirationSeconds: Invalid value: {secs}: may not specify a duration less than 10 minutes"
                    ),
                )
            });
        }
        let ns = meta::namespace(&sa).to_string();
        let token = self.app.auth.issue(
            &ns,
            name,
            meta::uid(&sa),
            Duration::from_secs(secs.unsigned_abs()),
        );
        let expires = jiff::Timestamp::now()
            .checked_add(jiff::SignedDuration::from_secs(secs))
            .unwrap_or_else(|_| jiff::Timestamp::now());
        let audiences = req
            .pointer("/spec/audiences")
            .filter(|a| a.as_array().is_some_and(|a| !a.is_empty()))
            .cloned()
            .unwrap_or(json!(["https://kubernetes.default.svc.cluster.local"]));
        Ok(json_response(
            StatusCode::CREATED,
            &json!({
                "kind": "TokenRequest",
                "apiVersion": "authentication.k8s.io/v1",
                "metadata": {"name": name, "namespace": ns, "creationTimestamp": null},
                "spec": {"audiences": audiences, "expirationSeconds": secs, "boundObjectRef": req.pointer("/spec/boundObjectRef").cloned().unwrap_or(Value::Null)},
                "status": {"token": token, "expirationTimestamp": meta::format_time(expires)},
            }),
        ))
    }

    fn decode_body(&self, body: &[u8]) -> ApiResult<Value> {
        if self.content_type.contains("protobuf") {
            return Err(ApiError::new(
                415,
                "UnsupportedMediaType",
                format!(
                    "the body of the request was in an unknown format - accepted media types include: application/json, application/yaml (got {})",
                    self.content_type
                ),
            ));
        }
        let v: Value = if self.content_type.contains("yaml") {
            let s = std::str::from_utf8(body)
                .map_err(|e| ApiError::bad_request(format!("body is not UTF-8: {e}")))?;
            serde_saphyr::from_str(s)
                .map_err(|e| ApiError::bad_request(format!("error decoding YAML: {e}")))?
        } else {
            serde_json::from_slice(body).map_err(|e| {
                ApiError::bad_request(format!("Object '{}' is invalid: {e}", self.rt.kind))
            })?
        };
        Ok(v)
    }

    fn delete_opts(&self, body: &[u8]) -> ApiResult<DeleteOpts> {
        let b: Value = if body.is_empty() {
            json!({})
        } else {
            serde_json::from_slice(body)
                .map_err(|e| ApiError::bad_request(format!("invalid DeleteOptions: {e}")))?
        };
        let prop = self.query.get("propagationPolicy").cloned().or_else(|| {
            b.get("propagationPolicy")
                .and_then(Value::as_str)
                .map(str::to_string)
        });
        let propagation = match prop.as_deref() {
            Some("Foreground") => Propagation::Foreground,
            Some("Orphan") => Propagation::Orphan,
            _ => {
                if b.get("orphanDependents").and_then(Value::as_bool) == Some(true) {
                    Propagation::Orphan
                } else {
                    Propagation::Background
                }
            }
        };
        let grace = self
            .query
            .get("gracePeriodSeconds")
            .and_then(|g| g.parse().ok())
            .or_else(|| b.get("gracePeriodSeconds").and_then(Value::as_i64));
        let mut write = self.write_opts();
        if b.get("dryRun")
            .and_then(Value::as_array)
            .is_some_and(|a| !a.is_empty())
        {
            write.dry_run = true;
        }
        Ok(DeleteOpts {
            write,
            grace_seconds: grace,
            propagation,
            precondition_uid: b
                .pointer("/preconditions/uid")
                .and_then(Value::as_str)
                .map(str::to_string),
            precondition_rv: b
                .pointer("/preconditions/resourceVersion")
                .and_then(Value::as_str)
                .map(str::to_string),
        })
    }
}
