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
use crate::faults::{FaultConfig, Faults, LostAs, MAX_HANG, Verdict, WatchShape};
use crate::meta;
use crate::patch;
use crate::registry::ResourceType;
use crate::selector::{FieldSelector, LabelSelector};
use crate::store::{DeleteOpts, Event, EventType, Propagation, Store, Subresource, WriteOpts};
use crate::table;
use crate::{discovery, openapi};

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

fn json_response(code: StatusCode, v: &Value) -> Response<Body> {
    let body = serde_json::to_vec(v).unwrap_or_default();
    let mut r = Response::new(Body::from(body));
    *r.status_mut() = code;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

fn error_response(e: &ApiError) -> Response<Body> {
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
    if let Verdict::Fail(e) = app.faults.admit(&ua, is_write).await {
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
            &path,
            truthy(&query, "watch"),
        );
        if !crate::auth::authorize(&st, &user, &attrs) {
            return error_response(&crate::auth::forbidden(&user, &attrs));
        }
    }
    match route(
        &app,
        &parts.method,
        &path,
        &query,
        &parts.headers,
        body,
        &ua,
    )
    .await
    {
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
        if !fate.hold.is_zero() {
            tokio::time::sleep(fate.hold).await;
        }
        let operation = match *method {
            Method::POST => "create",
            Method::PUT => "update",
            Method::PATCH => "patch",
            Method::DELETE => "delete",
            _ => "write",
        };
        match fate.lost {
            None => res,
            Some(LostAs::Hang) => {
                // Until the client gives up: dropping the request (a timeout, a closed
                // connection) drops this future.
                tokio::time::sleep(MAX_HANG).await;
                Err(ApiError::request_timeout())
            }
            Some(LostAs::ServerTimeout) => {
                Err(ApiError::server_timeout(&rt.group, &rt.plural, operation))
            }
            Some(LostAs::Timeout) => Err(ApiError::request_timeout()),
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

    fn patch(
        &self,
        name: &str,
        subres: Option<Subresource>,
        scale: bool,
        body: &[u8],
    ) -> ApiResult<Response<Body>> {
        let ct = self
            .content_type
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_string();
        let apply = ct == "application/apply-patch+yaml" || ct == "application/apply-patch+cbor";
        let known = matches!(
            ct.as_str(),
            "application/json-patch+json"
                | "application/merge-patch+json"
                | "application/strategic-merge-patch+json"
        );
        if !known && !apply {
            return Err(ApiError {
                details: Some(json!({})),
                ..ApiError::new(415, "UnsupportedMediaType", "415: Unsupported Media Type")
            });
        }
        let patch_doc: Value = if apply {
            let s = std::str::from_utf8(body)
                .map_err(|e| ApiError::bad_request(format!("body is not UTF-8: {e}")))?;
            serde_saphyr::from_str(s)
                .map_err(|e| ApiError::bad_request(format!("error decoding YAML: {e}")))?
        } else {
            serde_json::from_slice(body)
                .map_err(|e| ApiError::bad_request(format!("error decoding patch: {e}")))?
        };
        if apply && self.query.get("fieldManager").is_none_or(String::is_empty) {
            return Err(ApiError {
                details: Some(
                    json!({"group": "meta.k8s.io", "kind": "PatchOptions", "causes": [{"reason": "FieldValueRequired", "message": "Required value: is required for apply patch", "field": "fieldManager"}]}),
                ),
                ..ApiError::new(
                    422,
                    "Invalid",
                    "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch",
                )
            });
        }
        let kind = match ct.as_str() {
            "application/json-patch+json" => PatchKind::Json,
            "application/merge-patch+json" => PatchKind::Merge,
            "application/strategic-merge-patch+json" => {
                if self.rt.crd.is_some() {
                    return Err(ApiError::new(
                        415,
                        "UnsupportedMediaType",
                        "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml",
                    ));
                }
                PatchKind::Strategic
            }
            _ if apply => PatchKind::Apply,
            other => {
                return Err(ApiError::new(
                    415,
                    "UnsupportedMediaType",
                    format!(
                        "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml, application/strategic-merge-patch+json (got {other})"
                    ),
                ));
            }
        };
        let rt = self.rt.clone();
        let sub = subres.unwrap_or(Subresource::Main);
        let create_if_missing = kind == PatchKind::Apply && !scale && sub == Subresource::Main;
        let created = create_if_missing && self.app.store.get(&self.rt, self.ns(), name).is_err();
        let this = self;
        let updated = self.app.store.update_with(
            &self.rt,
            self.ns(),
            name,
            sub,
            &self.write_opts(),
            &mut |cur| {
                let served = match cur {
                    Some(c) if scale => this.to_scale(c),
                    Some(c) => convert::to_served(&rt, c),
                    None => Value::Null,
                };
                let mut patched = match kind {
                    PatchKind::Json => patch::json_patch(&served, &patch_doc),
                    PatchKind::Merge => patch::merge_patch(&served, &patch_doc),
                    PatchKind::Strategic => patch::strategic_merge_patch(&served, &patch_doc),
                    PatchKind::Apply => patch::server_side_apply(cur.map(|_| &served), &patch_doc),
                }
                .map_err(|e| {
                    if kind == PatchKind::Json {
                        // A JSON patch that cannot be applied (a failed test, a missing path).
                        ApiError {
                            details: Some(json!({})),
                            ..ApiError::new(
                                422,
                                "Invalid",
                                "the server rejected our request due to an error in our request",
                            )
                        }
                    } else {
                        ApiError::bad_request(e.to_string())
                    }
                })?;
                if scale {
                    let cur = cur.ok_or_else(|| ApiError::not_found(&rt, name))?;
                    return apply_scale(&rt, cur, &patched);
                }
                // metadata.uid cannot be patched: a different uid is an invalid update (twice:
                // both metadata validations of an update report it), not a precondition.
                if let Some(c) = cur
                    && let Some(uid) = meta::meta_str(&patched, "uid")
                    && !uid.is_empty()
                    && uid != meta::uid(c)
                {
                    let cause = (
                        "FieldValueInvalid".to_string(),
                        "metadata.uid".to_string(),
                        format!("Invalid value: {:?}: field is immutable", uid),
                    );
                    return Err(ApiError::invalid(&rt, name, &[cause.clone(), cause]));
                }
                // A patch that does not name a resourceVersion is applied to the latest
                // object, never rejected as stale.
                let patch_rv = patch_doc
                    .pointer("/metadata/resourceVersion")
                    .and_then(Value::as_str);
                if patch_rv.is_none() && kind != PatchKind::Json {
                    meta::meta_mut(&mut patched).remove("resourceVersion");
                }
                Ok(convert::to_stored(&rt, &patched))
            },
            create_if_missing,
        )?;
        if scale {
            return Ok(json_response(StatusCode::OK, &self.to_scale(&updated)));
        }
        let code = if created {
            StatusCode::CREATED
        } else {
            StatusCode::OK
        };
        Ok(self.respond_one(code, &updated))
    }

    fn to_scale(&self, obj: &Value) -> Value {
        let paths = self.rt.scale.clone();
        let (spec, status, sel) = match &paths {
            Some(p) => (
                meta::get_path(obj, &p.spec_replicas)
                    .cloned()
                    .unwrap_or(json!(0)),
                meta::get_path(obj, &p.status_replicas)
                    .cloned()
                    .unwrap_or(json!(0)),
                p.label_selector
                    .as_ref()
                    .and_then(|s| meta::get_path(obj, s))
                    .cloned(),
            ),
            None => (json!(0), json!(0), None),
        };
        let selector = sel.or_else(|| {
            obj.pointer("/spec/selector").map(|s| {
                json!(
                    crate::selector::LabelSelector::from_json(s)
                        .map(|l| l.to_string())
                        .unwrap_or_default()
                )
            })
        });
        let m = meta::meta(obj).cloned().unwrap_or_default();
        let mut md = serde_json::Map::new();
        for f in [
            "name",
            "namespace",
            "uid",
            "resourceVersion",
            "creationTimestamp",
        ] {
            if let Some(v) = m.get(f) {
                md.insert(f.into(), v.clone());
            }
        }
        let mut status_obj = json!({"replicas": status});
        if let Some(s) = selector {
            status_obj["selector"] = s;
        }
        json!({
            "kind": "Scale",
            "apiVersion": "autoscaling/v1",
            "metadata": md,
            "spec": if spec == json!(0) { json!({}) } else { json!({"replicas": spec}) },
            "status": status_obj,
        })
    }

    /// One stored object in the representation the client asked for.
    fn represent(&self, obj: &Value) -> Value {
        let served = convert::to_served(&self.rt, obj);
        match self.repr {
            Repr::Full => served,
            Repr::Metadata => partial_metadata(&served),
            Repr::Table => self.table(
                std::slice::from_ref(&served),
                json!({"resourceVersion": meta::meta_str(obj, "resourceVersion")}),
            ),
        }
    }

    fn respond_one(&self, code: StatusCode, obj: &Value) -> Response<Body> {
        json_response(code, &self.represent(obj))
    }

    fn table(&self, objects: &[Value], list_meta: Value) -> Value {
        let crd_cols = self
            .rt
            .crd
            .as_ref()
            .map(|c| c.printer_columns.clone().unwrap_or(json!([])));
        let columns = table::columns(&self.rt.group, &self.rt.plural, crd_cols.as_ref());
        let include = match self.query.get("includeObject").map(String::as_str) {
            Some("None") => table::IncludeObject::None,
            Some("Object") => table::IncludeObject::Object,
            _ => table::IncludeObject::Metadata,
        };
        table::to_table(
            &columns,
            objects,
            include,
            list_meta,
            jiff::Timestamp::now(),
        )
    }

    /// The label and field selector of the request as one predicate over stored objects.
    fn filter(&self) -> ApiResult<impl Fn(&Value) -> bool + use<>> {
        let labels = LabelSelector::parse(
            self.query
                .get("labelSelector")
                .map(String::as_str)
                .unwrap_or(""),
        )
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
        let fields = FieldSelector::parse(
            self.query
                .get("fieldSelector")
                .map(String::as_str)
                .unwrap_or(""),
        )
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
        fields
            .validate_for(&self.rt.group, &self.rt.plural)
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
        let rt = self.rt.clone();
        Ok(move |o: &Value| {
            labels.matches(meta::labels(o))
                && (fields.is_empty() || fields.matches(&convert::to_served(&rt, o)))
        })
    }

    /// How stale a read may be: `Some` for a `resourceVersion=0` read that a
    /// [`crate::faults::StaleRead`] fault matches (served from a lagging snapshot, as from the
    /// apiserver's watch cache); None for quorum reads and unfaulted ones.
    fn stale_lag(&self) -> Option<Duration> {
        if self.query.get("resourceVersion").map(String::as_str) != Some("0") {
            return None;
        }
        self.app
            .faults
            .stale_read_lag(&self.ua, &self.rt.group, &self.rt.plural)
    }

    fn list(&self) -> ApiResult<Response<Body>> {
        if self
            .query
            .get("resourceVersionMatch")
            .is_some_and(|m| !m.is_empty())
            && self
                .query
                .get("resourceVersion")
                .is_none_or(String::is_empty)
        {
            return Err(ApiError {
                details: Some(
                    json!({"group": "meta.k8s.io", "kind": "ListOptions", "causes": [{"reason": "FieldValueForbidden", "message": "Forbidden: resourceVersionMatch is forbidden unless resourceVersion is provided", "field": "resourceVersionMatch"}]}),
                ),
                ..ApiError::new(
                    422,
                    "Invalid",
                    "ListOptions.meta.k8s.io \"\" is invalid: resourceVersionMatch: Forbidden: resourceVersionMatch is forbidden unless resourceVersion is provided",
                )
            });
        }
        let keep = self.filter()?;
        let limit = self
            .query
            .get("limit")
            .and_then(|l| l.parse::<usize>().ok())
            .filter(|l| *l > 0);
        let res = match self.stale_lag() {
            Some(age) => self
                .app
                .store
                .list_as_of(&self.rt, self.ns(), &|o| keep(o), age)?,
            None => self.app.store.list(
                &self.rt,
                self.ns(),
                &|o| keep(o),
                limit,
                self.query
                    .get("continue")
                    .map(String::as_str)
                    .filter(|c| !c.is_empty()),
            )?,
        };
        let mut list_meta = json!({"resourceVersion": res.rv.to_string()});
        if let Some(c) = &res.continue_token {
            list_meta["continue"] = json!(c);
        }
        let selected = ["labelSelector", "fieldSelector"]
            .iter()
            .any(|k| self.query.get(*k).is_some_and(|v| !v.is_empty()));
        if let Some(r) = res.remaining.filter(|_| !selected) {
            list_meta["remainingItemCount"] = json!(r);
        }
        let items: Vec<Value> = res
            .items
            .iter()
            .map(|o| convert::to_served(&self.rt, o))
            .collect();
        let out = match self.repr {
            Repr::Table => self.table(&items, list_meta),
            Repr::Metadata => json!({
                "kind": "PartialObjectMetadataList",
                "apiVersion": "meta.k8s.io/v1",
                "metadata": list_meta,
                "items": items.iter().map(partial_metadata).collect::<Vec<_>>(),
            }),
            Repr::Full => json!({
                "kind": format!("{}List", self.rt.kind),
                "apiVersion": self.rt.api_version(),
                "metadata": list_meta,
                "items": items,
            }),
        };
        Ok(json_response(StatusCode::OK, &out))
    }

    fn watch(self) -> ApiResult<Response<Body>> {
        let keep = self.filter()?;
        let rv_param = self
            .query
            .get("resourceVersion")
            .cloned()
            .unwrap_or_default();
        let send_initial = truthy(&self.query, "sendInitialEvents");
        let bookmarks = truthy(&self.query, "allowWatchBookmarks");
        let from_rv = if send_initial || rv_param.is_empty() || rv_param == "0" {
            None
        } else {
            Some(rv_param.parse::<u64>().map_err(|_| {
                ApiError::bad_request(format!("invalid resource version: {rv_param}"))
            })?)
        };
        let timeout = self
            .query
            .get("timeoutSeconds")
            .and_then(|t| t.parse::<u64>().ok())
            .map(Duration::from_secs)
            .unwrap_or(Duration::from_secs(1800));
        let selector = self.query.get("labelSelector").cloned().unwrap_or_default();
        let (tx, rx) = mpsc::channel::<Result<Bytes, Infallible>>(256);
        let start = self.app.store.watch(&self.rt, from_rv);
        let mut epoch = self.app.faults.watch_epoch();
        epoch.mark_unchanged();
        // Taken before the stream's shape is first computed: no change can fall in between.
        let mut changes = self.app.faults.changes();
        changes.mark_unchanged();
        let this = Arc::new(self);
        tokio::spawn(async move {
            let start = match start {
                Ok(s) => s,
                Err(e) => {
                    let _ = tx.send(Ok(line("ERROR", &e.status_json()))).await;
                    return;
                }
            };
            let mut out = Outbox {
                tx,
                held: VecDeque::new(),
                shape: this.watch_shape(&selector),
                changes,
                who: this.clone(),
                selector,
            };
            let mut last_rv = start.rv;
            for o in &start.initial {
                if this.in_scope(o) && keep(o) && !out.push(this.event_line("ADDED", o)).await {
                    return;
                }
            }
            if send_initial && bookmarks && !out.push(this.bookmark(start.rv, true)).await {
                return;
            }
            for ev in &start.backlog {
                if let Some(l) = this.render(ev, &keep)
                    && !out.push(l).await
                {
                    return;
                }
                last_rv = ev.rv;
            }
            let mut live = start.rx;
            let deadline = tokio::time::sleep(timeout);
            tokio::pin!(deadline);
            // Past `timeoutSeconds` while stalled: the stream stays open (half-open) until the
            // stall is lifted, then delivers what it held and ends.
            let mut expired = false;
            let mut tick = tokio::time::interval(this.app.bookmark_interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            tick.tick().await;
            loop {
                out.refresh();
                if expired && !out.shape.stall {
                    out.flush().await;
                    return;
                }
                let due = out.next_due();
                tokio::select! {
                    _ = &mut deadline, if !expired => {
                        if !out.shape.stall {
                            return;
                        }
                        expired = true;
                    }
                    _ = epoch.changed() => return,
                    _ = out.tx.closed() => return,
                    _ = out.changes.changed() => out.reshape(),
                    _ = tokio::time::sleep_until(due.unwrap_or_else(tokio::time::Instant::now)),
                        if due.is_some() => {
                        if !out.deliver_due().await { return; }
                    }
                    _ = tick.tick(), if bookmarks && !out.shape.stall => {
                        // A bookmark must never run ahead of an event this watcher has not
                        // sent yet: read the version first, then drain everything committed
                        // up to it (commits publish under the lock that version is read under).
                        let rv = this.app.store.current_rv();
                        loop {
                            match live.try_recv() {
                                Ok(ev) => {
                                    if ev.rv <= last_rv { continue; }
                                    last_rv = ev.rv;
                                    if let Some(l) = this.render(&ev, &keep)
                                        && !out.push(l).await { return; }
                                }
                                Err(tokio::sync::broadcast::error::TryRecvError::Empty) => break,
                                Err(_) => return,
                            }
                        }
                        last_rv = last_rv.max(rv);
                        if !out.push(this.bookmark(last_rv, false)).await { return; }
                    }
                    ev = live.recv() => match ev {
                        Ok(ev) => {
                            if ev.rv <= last_rv { continue; }
                            last_rv = ev.rv;
                            if let Some(l) = this.render(&ev, &keep)
                                && !out.push(l).await { return; }
                        }
                        // A watcher too slow for the feed is ended; it resumes from its last
                        // resourceVersion out of the history, like after any dropped watch.
                        Err(_) => return,
                    }
                }
                if this.app.faults.snapshot().down || this.app.faults.is_partitioned(&this.ua) {
                    return;
                }
            }
        });
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
        let mut r = Response::new(Body::from_stream(stream));
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        r.headers_mut().insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        Ok(r)
    }

    fn watch_shape(&self, selector: &str) -> WatchShape {
        Faults::watch_shape(
            &self.app.faults.snapshot(),
            &self.ua,
            &self.rt.group,
            &self.rt.plural,
            selector,
        )
    }

    fn in_scope(&self, o: &Value) -> bool {
        match self.ns() {
            Some(ns) => meta::namespace(o) == ns,
            None => true,
        }
    }

    fn render(&self, ev: &Event, keep: &impl Fn(&Value) -> bool) -> Option<Bytes> {
        if ev.key != self.rt.store_key() || !self.in_scope(&ev.object) {
            return None;
        }
        let now = keep(&ev.object);
        let before = ev.old.as_deref().is_some_and(keep);
        // An object entering or leaving the selector is seen as added or deleted by this
        // watcher, as the apiserver's watch cache reports it.
        let t = match (ev.type_, before, now) {
            (EventType::Deleted, _, true) => "DELETED",
            (EventType::Deleted, _, false) => return None,
            (EventType::Added, _, true) => "ADDED",
            (EventType::Modified, true, true) => "MODIFIED",
            (EventType::Modified, false, true) => "ADDED",
            (EventType::Modified, true, false) => "DELETED",
            _ => return None,
        };
        // Most watchers send the stored object as is: serialize it once for all of them.
        let stored_as_served = self.repr == Repr::Full
            && !self.rt.is_event_view()
            && ev.object.get("apiVersion").and_then(Value::as_str)
                == Some(self.rt.api_version().as_str());
        if stored_as_served {
            let obj = ev.encoded();
            let mut out = Vec::with_capacity(obj.len() + 32);
            out.extend_from_slice(b"{\"type\":\"");
            out.extend_from_slice(t.as_bytes());
            out.extend_from_slice(b"\",\"object\":");
            out.extend_from_slice(obj);
            out.extend_from_slice(b"}\n");
            return Some(Bytes::from(out));
        }
        Some(self.event_line(t, &ev.object))
    }

    fn event_line(&self, t: &str, obj: &Value) -> Bytes {
        line(t, &self.represent(obj))
    }

    fn bookmark(&self, rv: u64, initial_end: bool) -> Bytes {
        let mut md = json!({"resourceVersion": rv.to_string()});
        if initial_end {
            md["annotations"] = json!({"k8s.io/initial-events-end": "true"});
        }
        let (api_version, kind) = match self.repr {
            Repr::Metadata => (
                "meta.k8s.io/v1".to_string(),
                "PartialObjectMetadata".to_string(),
            ),
            _ => (self.rt.api_version(), self.rt.kind.clone()),
        };
        line(
            "BOOKMARK",
            &json!({"kind": kind, "apiVersion": api_version, "metadata": md}),
        )
    }
}

/// The sending side of one watch stream, with the events a [`crate::faults::WatchFault`]
/// holds back (lagging: until due; stalled: until lifted). Empty while the stream is not
/// faulted, so unfaulted streams send straight through.
struct Outbox {
    tx: mpsc::Sender<Result<Bytes, Infallible>>,
    held: VecDeque<(tokio::time::Instant, Bytes)>,
    shape: WatchShape,
    /// Fault configuration changes since `shape` was computed.
    changes: tokio::sync::watch::Receiver<u64>,
    who: Arc<Ctx>,
    selector: String,
}

impl Outbox {
    fn reshape(&mut self) {
        self.shape = self.who.watch_shape(&self.selector);
    }

    /// Re-evaluate the stream's faults if the configuration changed. Called before every line
    /// is queued, so an event committed after a fault was set is always shaped by it (the
    /// select loop may see the event before it sees the change).
    fn refresh(&mut self) {
        if self.changes.has_changed().unwrap_or(false) {
            self.changes.mark_unchanged();
            self.reshape();
        }
    }

    /// Queue or send one line; false when the stream must end (the client is gone, or more
    /// than `max_held` lines are held: the apiserver's slow-watcher close).
    async fn push(&mut self, l: Bytes) -> bool {
        self.refresh();
        if self.shape.is_normal() && self.held.is_empty() {
            return self.tx.send(Ok(l)).await.is_ok();
        }
        if self.held.len() >= self.shape.max_held {
            tracing::warn!(
                held = self.held.len(),
                "closing a lagging/stalled watch: too many events held"
            );
            return false;
        }
        self.held.push_back((tokio::time::Instant::now(), l));
        true
    }

    /// When the oldest held line is due (None: nothing held, or stalled).
    fn next_due(&self) -> Option<tokio::time::Instant> {
        if self.shape.stall {
            return None;
        }
        self.held.front().map(|(at, _)| *at + self.shape.lag)
    }

    /// Send every held line that is due, in order; false when the client is gone.
    async fn deliver_due(&mut self) -> bool {
        let now = tokio::time::Instant::now();
        while let Some(due) = self.next_due()
            && due <= now
        {
            if let Some((_, l)) = self.held.pop_front()
                && self.tx.send(Ok(l)).await.is_err()
            {
                return false;
            }
        }
        true
    }

    /// Send everything held, now.
    async fn flush(&mut self) {
        while let Some((_, l)) = self.held.pop_front() {
            if self.tx.send(Ok(l)).await.is_err() {
                return;
            }
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum PatchKind {
    Json,
    Merge,
    Strategic,
    Apply,
}

fn line(t: &str, obj: &Value) -> Bytes {
    let mut v = serde_json::to_vec(&json!({"type": t, "object": obj})).unwrap_or_default();
    v.push(b'\n');
    Bytes::from(v)
}

fn partial_metadata(obj: &Value) -> Value {
    json!({
        "kind": "PartialObjectMetadata",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": obj.get("metadata").cloned().unwrap_or(json!({})),
    })
}

/// Write a Scale's `spec.replicas` back to the scaled object.
fn apply_scale(rt: &ResourceType, cur: &Value, scale: &Value) -> ApiResult<Value> {
    let replicas = scale
        .pointer("/spec/replicas")
        .and_then(Value::as_i64)
        .ok_or_else(|| {
            ApiError::invalid(
                rt,
                meta::name(cur),
                &[(
                    "FieldValueRequired".into(),
                    "spec.replicas".into(),
                    "Required value".into(),
                )],
            )
        })?;
    if replicas < 0 {
        return Err(ApiError::invalid(
            rt,
            meta::name(cur),
            &[(
                "FieldValueInvalid".into(),
                "spec.replicas".into(),
                format!("Invalid value: {replicas}: must be greater than or equal to 0"),
            )],
        ));
    }
    if let Some(rv) = scale
        .pointer("/metadata/resourceVersion")
        .and_then(Value::as_str)
        && Some(rv) != meta::meta_str(cur, "resourceVersion")
    {
        return Err(ApiError::stale(rt, meta::name(cur)));
    }
    let mut obj = cur.clone();
    let path = rt
        .scale
        .as_ref()
        .map(|s| s.spec_replicas.clone())
        .unwrap_or(".spec.replicas".into());
    meta::set_path(&mut obj, &path, json!(replicas));
    Ok(obj)
}

async fn sim_endpoint(app: &Arc<App>, method: &Method, rest: &str, body: &[u8]) -> Response<Body> {
    let parse = |b: &[u8]| -> ApiResult<Value> {
        if b.is_empty() {
            return Ok(json!({}));
        }
        serde_json::from_slice(b)
            .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
    };
    let segs: Vec<&str> = rest.split('/').filter(|s| !s.is_empty()).collect();
    let res: ApiResult<Value> = match (method.clone(), segs.as_slice()) {
        (Method::GET, ["report"]) => {
            let st = app.store.lock();
            serde_json::to_value(st.recorder.report(app.store.elapsed_ms()))
                .map_err(|e| ApiError::internal(e.to_string()))
        }
        (Method::GET, ["faults"]) => {
            serde_json::to_value(app.faults.get()).map_err(|e| ApiError::internal(e.to_string()))
        }
        (Method::PUT, ["faults"]) | (Method::POST, ["faults"]) => parse(body).and_then(|v| {
            let cfg: FaultConfig = serde_json::from_value(v)
                .map_err(|e| ApiError::bad_request(format!("invalid fault config: {e}")))?;
            app.faults.set(cfg.clone());
            serde_json::to_value(cfg).map_err(|e| ApiError::internal(e.to_string()))
        }),
        (Method::POST, ["compact"]) => Ok(json!({"compactedThrough": app.store.compact()})),
        (Method::POST, ["drop-watches"]) => {
            app.faults.drop_watches();
            Ok(json!({"dropped": true}))
        }
        (Method::GET, ["requests"]) => serde_json::to_value(app.store.commit_log())
            .map_err(|e| ApiError::internal(e.to_string())),
        (Method::POST, ["pods", ns, name, action]) => app
            .pods
            .act(ns, name, action)
            .map(|_| json!({"pod": format!("{ns}/{name}"), "action": action})),
        (Method::POST, ["nodes", node, action]) => app
            .pods
            .node(node, action)
            .map(|n| json!({"node": node, "action": action, "pods": n})),
        _ => Err(ApiError::new(
            404,
            "NotFound",
            format!("no such simulator endpoint: /sim/{rest}"),
        )),
    };
    match res {
        Ok(v) => json_response(StatusCode::OK, &v),
        Err(e) => error_response(&e),
    }
}
