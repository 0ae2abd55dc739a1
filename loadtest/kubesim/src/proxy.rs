//! kubesim as a fault-injecting proxy in front of a real API server (DESIGN §9: one fault layer,
//! two backends). Clients talk plain HTTP on loopback to the proxy, which forwards each request
//! to the upstream apiserver over TLS with the client's own `Authorization` header (bearer
//! tokens: a ServiceAccount's, as the operator uses) and its `User-Agent`, so the apiserver's
//! audit log still says who wrote what. The same [`Faults`] as the embedded server shape what
//! passes, selected by User-Agent as there:
//!
//! - before a request is forwarded: partitions (it hangs until healed), the API down (503),
//!   latency, error rates (500/503/429 with `Retry-After`);
//! - after a write was served: held answers, and lost answers (committed upstream, the client
//!   gets no answer, a 500 `ServerTimeout` or a 504);
//! - watch streams (newline-delimited JSON events): lag and half-open stalls per resource,
//!   client and label selector; dropped watches (`/sim/drop-watches`, a partition starting, the
//!   API down) end open streams.
//!
//! - compactions (`POST /sim/compact`, [`Proxy::compact`]): a watch resumed from a
//!   `resourceVersion` older than the newest one the proxy has passed on at the compaction
//!   gets 410 Gone (one `ERROR` event, as kube-apiserver answers a version its watch cache or
//!   etcd no longer has) and must re-list. Open streams go on, as on the embedded server: a
//!   compaction bites when a watch resumes (drop them to make every watch resume).
//!
//! Not injected here: stale `resourceVersion=0` reads (the proxy keeps no history to serve
//! them from; the real apiserver's watch cache serves such reads itself). Faults are set with
//! `PUT /sim/faults`, as on the embedded server.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;
use axum::body::Body;
use bytes::Bytes;
use futures::StreamExt;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::error::ApiError;
use crate::faults::{FaultConfig, Faults, Verdict};
use crate::server::{error_response, json_response, watch_line};

/// A request that is not a watch gets its answer from upstream within this: longer than the
/// API server's own request timeout (60 s), so that its 504 is what the client sees.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(70);
/// Headers not forwarded (hop-by-hop, or set by the connection to upstream).
const HOP_BY_HOP: [&str; 6] = [
    "host",
    "connection",
    "content-length",
    "transfer-encoding",
    "keep-alive",
    "upgrade",
];

/// A running proxy. Dropping it stops serving (open streams end).
pub struct Proxy {
    addr: SocketAddr,
    inner: Arc<Inner>,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

struct Inner {
    upstream: kube::Client,
    faults: Faults,
    /// The newest `resourceVersion` in any answer passed on (JSON bodies and watch events).
    newest: AtomicU64,
    /// Watches resumed from a version older than this get 410 Gone (0: never compacted).
    compacted: AtomicU64,
}

impl Proxy {
    /// Serve on `listen` (port 0 picks one), forwarding to the apiserver of the kubeconfig at
    /// `upstream` (its server and CA; its credentials are not used: each request carries the
    /// client's own).
    pub async fn start(listen: SocketAddr, upstream: &Path) -> anyhow::Result<Proxy> {
        let kubeconfig = kube::config::Kubeconfig::read_from(upstream)
            .with_context(|| format!("reading {}", upstream.display()))?;
        let mut config = kube::Config::from_custom_kubeconfig(
            kubeconfig,
            &kube::config::KubeConfigOptions::default(),
        )
        .await
        .with_context(|| format!("the kubeconfig {}", upstream.display()))?;
        config.auth_info = kube::config::AuthInfo::default();
        // Every answer as the API server gave it: kube retries 429, 503 and 504 by default,
        // which would hide the server's throttling and outages, and resend a write whose 504
        // may have been a commit.
        config.default_retry = false;
        // A watch stays open as long as its client asks for (timeoutSeconds).
        config.read_timeout = None;
        let client = kube::Client::try_from(config).context("a client for the upstream")?;
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("binding {listen}"))?;
        let addr = listener.local_addr().context("reading the bound address")?;
        let inner = Arc::new(Inner {
            upstream: client,
            faults: Faults::default(),
            newest: AtomicU64::new(0),
            compacted: AtomicU64::new(0),
        });
        let router = axum::Router::new().fallback({
            let inner = inner.clone();
            move |req: Request<Body>| handle(inner.clone(), req)
        });
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let served = axum::serve(listener, router)
                .with_graceful_shutdown(async {
                    let _ = rx.await;
                })
                .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "kubesim proxy stopped");
            }
        });
        Ok(Proxy {
            addr,
            inner,
            shutdown: Some(tx),
            task,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://<addr>`: the server for clients' kubeconfigs.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn faults(&self) -> &Faults {
        &self.inner.faults
    }

    /// Compact at the newest `resourceVersion` the proxy has passed on: from now on a watch
    /// resumed from an older one gets 410 Gone. Returns that version (0 when nothing with a
    /// version has passed yet: then nothing is compacted).
    pub fn compact(&self) -> u64 {
        self.inner.compact()
    }

    /// The kubeconfig at `upstream` pointing at this proxy instead (plain HTTP on loopback: no
    /// CA, no TLS server name); its credentials stay, and go through to the API server.
    pub fn kubeconfig(&self, upstream: &Path) -> anyhow::Result<kube::config::Kubeconfig> {
        let mut k = kube::config::Kubeconfig::read_from(upstream)
            .with_context(|| format!("reading {}", upstream.display()))?;
        for c in &mut k.clusters {
            if let Some(cluster) = c.cluster.as_mut() {
                cluster.server = Some(self.url());
                cluster.certificate_authority = None;
                cluster.certificate_authority_data = None;
                cluster.tls_server_name = None;
            }
        }
        Ok(k)
    }
}

impl Inner {
    fn compact(&self) -> u64 {
        let at = self.newest.load(Ordering::SeqCst);
        self.compacted.fetch_max(at, Ordering::SeqCst);
        at
    }

    fn saw(&self, body: &[u8]) {
        if let Some(rv) = newest_resource_version(body) {
            self.newest.fetch_max(rv, Ordering::SeqCst);
        }
    }

    /// 410 Gone for a watch resumed from before the compaction (`resourceVersion` set, not
    /// "0", and no `sendInitialEvents`, which starts from a list, not from history).
    fn too_old(&self, query: Option<&str>) -> Option<ApiError> {
        let compacted = self.compacted.load(Ordering::SeqCst);
        let params: Vec<(String, String)> = form_urlencoded::parse(query?.as_bytes())
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        let get = |key: &str| {
            params
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.as_str())
        };
        if get("sendInitialEvents") == Some("true") {
            return None;
        }
        let rv: u64 = get("resourceVersion")?.parse().ok()?;
        (rv > 0 && rv < compacted)
            .then(|| ApiError::gone(format!("too old resource version: {rv} ({compacted})")))
    }
}

/// The newest `"resourceVersion":"N"` in a JSON answer or watch event (every object's and the
/// list's), if any.
fn newest_resource_version(body: &[u8]) -> Option<u64> {
    const KEY: &[u8] = b"\"resourceVersion\":\"";
    let mut newest = None;
    let mut rest = body;
    while let Some(at) = rest.windows(KEY.len()).position(|w| w == KEY) {
        rest = &rest[at + KEY.len()..];
        let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
        let rv = std::str::from_utf8(&rest[..digits])
            .ok()
            .and_then(|d| d.parse::<u64>().ok());
        newest = newest.max(rv);
        rest = &rest[digits..];
    }
    newest
}

impl Drop for Proxy {
    fn drop(&mut self) {
        // Open watch streams would keep a graceful shutdown waiting: end them first.
        self.inner.faults.drop_watches();
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.task.abort();
    }
}

/// The API group and plural of a resource path (`/api/v1/namespaces/ns/pods/p` →
/// ("", "pods"); `/apis/coordination.k8s.io/v1/namespaces/ns/leases` →
/// ("coordination.k8s.io", "leases")); empty for discovery and other paths.
pub fn resource_of(path: &str) -> (String, String) {
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let (group, rest) = match segs.as_slice() {
        ["api", _version, rest @ ..] => ("", rest),
        ["apis", group, _version, rest @ ..] => (*group, rest),
        _ => return (String::new(), String::new()),
    };
    let plural = match rest {
        ["namespaces", _ns, plural, ..] => *plural,
        // The namespaces themselves.
        [plural, ..] => *plural,
        [] => "",
    };
    (group.to_string(), plural.to_string())
}

fn is_watch(query: Option<&str>) -> bool {
    query.is_some_and(|q| {
        form_urlencoded::parse(q.as_bytes()).any(|(k, v)| k == "watch" && (v == "true" || v == "1"))
    })
}

fn label_selector(query: Option<&str>) -> String {
    query
        .and_then(|q| {
            form_urlencoded::parse(q.as_bytes())
                .find(|(k, _)| k == "labelSelector")
                .map(|(_, v)| v.into_owned())
        })
        .unwrap_or_default()
}

async fn handle(p: Arc<Inner>, req: Request<Body>) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path().to_string();
    let body = match axum::body::to_bytes(body, 64 << 20).await {
        Ok(b) => b,
        Err(e) => return error_response(&ApiError::bad_request(format!("reading body: {e}"))),
    };
    if let Some(rest) = path.strip_prefix("/sim/") {
        return sim_endpoint(&p, &parts.method, rest, &body);
    }
    let agent = parts
        .headers
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("unknown")
        .to_string();
    let is_write = parts.method != Method::GET;
    let (group, plural) = resource_of(&path);
    if let Verdict::Fail(e) = p.faults.admit(&agent, is_write, (&group, &plural)).await {
        return error_response(&e);
    }
    let query = parts.uri.query().map(str::to_string);
    let mut up = Request::builder().method(parts.method.clone()).uri(
        parts
            .uri
            .path_and_query()
            .map(|pq| pq.as_str())
            .unwrap_or("/"),
    );
    for (name, value) in &parts.headers {
        if !HOP_BY_HOP.contains(&name.as_str()) {
            up = up.header(name, value);
        }
    }
    let up = match up.body(kube::client::Body::from(body.to_vec())) {
        Ok(r) => r,
        Err(e) => return error_response(&ApiError::bad_request(format!("request: {e}"))),
    };
    if parts.method == Method::GET && is_watch(query.as_deref()) {
        if let Some(gone) = p.too_old(query.as_deref()) {
            // As kube-apiserver answers it: 200, then one ERROR event carrying the 410.
            return json_line_response(watch_line("ERROR", &gone.status_json()));
        }
        // Taken before the request is sent: a fault set meanwhile shapes the stream.
        let mut epoch = p.faults.watch_epoch();
        epoch.mark_unchanged();
        let mut changes = p.faults.changes();
        changes.mark_unchanged();
        let answer = match tokio::time::timeout(UPSTREAM_TIMEOUT, p.upstream.send(up)).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => return upstream_error(&e.to_string()),
            Err(_) => return upstream_error("no answer in time"),
        };
        let shaping = Shaping {
            faults: p.clone(),
            agent,
            group,
            plural,
            selector: label_selector(query.as_deref()),
            epoch,
            changes,
        };
        return shaped_watch(answer, shaping);
    }
    let answer = match tokio::time::timeout(UPSTREAM_TIMEOUT, async {
        let r = p.upstream.send(up).await?;
        let (parts, body) = r.into_parts();
        let bytes = body.collect().await.map(|c| c.to_bytes())?;
        Ok::<_, kube::Error>((parts, bytes))
    })
    .await
    {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return upstream_error(&e.to_string()),
        Err(_) => return upstream_error("no answer in time"),
    };
    let (head, bytes) = answer;
    p.saw(&bytes);
    if is_write {
        let dry_run = query.as_deref().is_some_and(|q| {
            form_urlencoded::parse(q.as_bytes()).any(|(k, v)| k == "dryRun" && v == "All")
        });
        let succeeded = !dry_run && head.status.is_success();
        let fate = p.faults.write_fate(&agent, &group, &plural, succeeded);
        if let Some(lost) = fate.apply(&parts.method, &group, &plural).await {
            return error_response(&lost);
        }
    }
    let mut r = Response::from_parts(head, Body::from(bytes));
    // The body is whole now: its length is what it is, whatever the upstream framing was.
    r.headers_mut().remove(header::TRANSFER_ENCODING);
    r.headers_mut().remove(header::CONTENT_LENGTH);
    r
}

fn json_line_response(line: Bytes) -> Response<Body> {
    let mut r = Response::new(Body::from(line));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// The upstream failed the request (a reset connection, a crashed API server, no answer in
/// time): 502, which clients do not retry on their own and count as an unknown outcome — the
/// request may have been served (a write committed) before the connection broke.
fn upstream_error(what: &str) -> Response<Body> {
    error_response(&ApiError::new(
        502,
        "BadGateway",
        format!("the upstream API server did not answer: {what}"),
    ))
}

fn sim_endpoint(p: &Inner, method: &Method, rest: &str, body: &[u8]) -> Response<Body> {
    let faults = &p.faults;
    let segs: Vec<&str> = rest.split('/').filter(|s| !s.is_empty()).collect();
    let res: Result<Value, ApiError> = match (method.clone(), segs.as_slice()) {
        (Method::GET, ["faults"]) => {
            serde_json::to_value(faults.get()).map_err(|e| ApiError::internal(e.to_string()))
        }
        (Method::PUT, ["faults"]) | (Method::POST, ["faults"]) => {
            let parsed: Result<FaultConfig, _> = if body.is_empty() {
                Ok(FaultConfig::default())
            } else {
                serde_json::from_slice(body)
            };
            match parsed {
                Ok(cfg) => {
                    faults.set(cfg.clone());
                    serde_json::to_value(cfg).map_err(|e| ApiError::internal(e.to_string()))
                }
                Err(e) => Err(ApiError::bad_request(format!("invalid fault config: {e}"))),
            }
        }
        (Method::POST, ["drop-watches"]) => {
            faults.drop_watches();
            Ok(json!({"dropped": true}))
        }
        (Method::POST, ["compact"]) => Ok(json!({"compacted": p.compact()})),
        _ => Err(ApiError::new(
            404,
            "NotFound",
            format!(
                "no such proxy endpoint: /sim/{rest} (the proxy has faults, drop-watches and compact)"
            ),
        )),
    };
    match res {
        Ok(v) => json_response(StatusCode::OK, &v),
        Err(e) => error_response(&e),
    }
}

/// What shapes one forwarded watch stream.
struct Shaping {
    faults: Arc<Inner>,
    agent: String,
    group: String,
    plural: String,
    selector: String,
    epoch: tokio::sync::watch::Receiver<u64>,
    changes: tokio::sync::watch::Receiver<u64>,
}

impl Shaping {
    fn shape(&self) -> crate::faults::WatchShape {
        Faults::watch_shape(
            &self.faults.faults.snapshot(),
            &self.agent,
            &self.group,
            &self.plural,
            &self.selector,
        )
    }

    /// The stream must end: dropped watches, the API down, the client partitioned.
    fn cut(&self) -> bool {
        let c = self.faults.faults.snapshot();
        c.down || self.faults.faults.is_partitioned(&self.agent)
    }
}

/// Forward a watch's events line by line, each held back as the stream's faults say: lagging
/// (delivered `lag` after it arrived), stalled (held until lifted; the stream stays open
/// half-open, as a real one whose peer went silent), or ended.
fn shaped_watch(answer: Response<kube::client::Body>, mut s: Shaping) -> Response<Body> {
    let (head, body) = answer.into_parts();
    if !head.status.is_success() {
        // An error answer (410 Gone, 403…) is passed on whole.
        let stream = body
            .into_data_stream()
            .map(|c| Ok::<_, Infallible>(c.unwrap_or_default()));
        return Response::from_parts(head, Body::from_stream(stream));
    }
    let (tx, rx) = mpsc::channel::<Result<Bytes, Infallible>>(256);
    tokio::spawn(async move {
        let mut upstream = body.into_data_stream();
        let mut partial: Vec<u8> = vec![];
        let mut held: VecDeque<(tokio::time::Instant, Bytes)> = VecDeque::new();
        let mut shape = s.shape();
        let mut upstream_done = false;
        loop {
            if s.cut() {
                return;
            }
            let due = if shape.stall {
                None
            } else {
                held.front().map(|(at, _)| *at + shape.lag)
            };
            // The upstream ended (its timeoutSeconds, an error): a stalled stream stays open,
            // half-open, until the stall is lifted; otherwise it ends once what it holds is out.
            if upstream_done && held.is_empty() && !shape.stall {
                return;
            }
            tokio::select! {
                _ = s.epoch.changed() => return,
                _ = tx.closed() => return,
                _ = s.changes.changed() => shape = s.shape(),
                _ = tokio::time::sleep_until(due.unwrap_or_else(tokio::time::Instant::now)),
                    if due.is_some() => {
                    let now = tokio::time::Instant::now();
                    while let Some((at, _)) = held.front() {
                        if shape.stall || *at + shape.lag > now {
                            break;
                        }
                        if let Some((_, l)) = held.pop_front()
                            && tx.send(Ok(l)).await.is_err()
                        {
                            return;
                        }
                    }
                }
                chunk = upstream.next(), if !upstream_done => match chunk {
                    Some(Ok(c)) => {
                        // A fault set since the last look shapes this event (the select may
                        // see the event before it sees the change).
                        if s.changes.has_changed().unwrap_or(false) {
                            s.changes.mark_unchanged();
                            shape = s.shape();
                        }
                        partial.extend_from_slice(&c);
                        while let Some(i) = partial.iter().position(|b| *b == b'\n') {
                            let line = Bytes::from(partial.drain(..=i).collect::<Vec<u8>>());
                            s.faults.saw(&line);
                            if held.is_empty() && !shape.stall && shape.lag.is_zero() {
                                if tx.send(Ok(line)).await.is_err() {
                                    return;
                                }
                            } else if held.len() >= shape.max_held {
                                // The apiserver's slow-watcher close.
                                tracing::warn!(held = held.len(), "closing a lagging/stalled watch: too many events held");
                                return;
                            } else {
                                held.push_back((tokio::time::Instant::now(), line));
                            }
                        }
                    }
                    // The upstream ended the stream (its timeout, an error): deliver what is
                    // held as the faults allow, then end.
                    Some(Err(_)) | None => upstream_done = true,
                },
            }
        }
    });
    let mut r = Response::new(Body::from_stream(
        tokio_stream::wrappers::ReceiverStream::new(rx),
    ));
    *r.status_mut() = head.status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        head.headers
            .get(header::CONTENT_TYPE)
            .cloned()
            .unwrap_or(HeaderValue::from_static("application/json")),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::resource_of;

    #[test]
    fn resource_paths() {
        let r = |p: &str| {
            let (g, r) = resource_of(p);
            format!("{g}/{r}")
        };
        assert_eq!(r("/api/v1/namespaces/ns/pods/p"), "/pods");
        assert_eq!(r("/api/v1/namespaces/ns/pods/p/status"), "/pods");
        assert_eq!(r("/api/v1/pods"), "/pods");
        assert_eq!(r("/api/v1/namespaces/ns"), "/namespaces");
        assert_eq!(
            r("/apis/coordination.k8s.io/v1/namespaces/ns/leases"),
            "coordination.k8s.io/leases"
        );
        assert_eq!(
            r("/apis/app.anukkrit.me/v1/statefulsetlocks"),
            "app.anukkrit.me/statefulsetlocks"
        );
        assert_eq!(r("/version"), "/");
        assert_eq!(r("/apis"), "/");
    }
}
