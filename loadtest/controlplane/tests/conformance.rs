//! Differential conformance (DESIGN §9): ONE script of API interactions
//! (`tests/conformance/script.yaml`) runs against kubesim over HTTP and against a real
//! kube-apiserver 1.34 (with RBAC, the default admission plugins and a kube-controller-manager),
//! as a client would send them: raw HTTP requests through kube-rs clients, with the same headers.
//! Answers are normalized (uids, resourceVersions, timestamps, generated names, managedFields,
//! tokens) and compared step by step: status code, and the Status fields or the named parts of
//! the body. Any divergence whose step id is not in the "Known differences" table of
//! `loadtest/kubesim/README.md` fails the test; rows that no longer differ are reported.
//!
//! kubesim runs with RBAC on (bearer tokens, TokenRequest, Roles and bindings) and its kubelet
//! stand-in off; the real control plane runs without its pod-lifecycle stand-in, so pods stay
//! Pending and unbound on both unless a step writes their status.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: setup failures may panic

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use controlplane::{ControlPlane, Options};
use http::{HeaderValue, Method, Request, header};
use kube::config::{AuthInfo, KubeConfigOptions, Kubeconfig};
use regex::Regex;
use serde::Deserialize;
use serde_json::{Map, Value, json};

const SCRIPT: &str = include_str!("conformance/script.yaml");
const README: &str = include_str!("../../kubesim/README.md");
const TABLE_ACCEPT: &str = "application/json;as=Table;v=v1;g=meta.k8s.io,application/json;as=Table;v=v1beta1;g=meta.k8s.io,application/json";
const USER_AGENT: &str = "stslock-conformance/1";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Step {
    id: String,
    #[serde(default = "get")]
    method: String,
    path: String,
    #[serde(default)]
    query: BTreeMap<String, String>,
    #[serde(default, rename = "as")]
    as_: Option<String>,
    #[serde(default)]
    patch: Option<String>,
    #[serde(default)]
    accept: Option<String>,
    #[serde(default)]
    body: Option<Value>,
    #[serde(default)]
    raw: Option<String>,
    #[serde(default)]
    compare: Option<Value>,
    #[serde(default)]
    save: BTreeMap<String, String>,
    #[serde(default)]
    until: Option<Until>,
    #[serde(default)]
    watch: bool,
    #[serde(default)]
    only: Option<String>,
    #[serde(default)]
    identity: Option<String>,
}

fn get() -> String {
    "GET".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Until {
    #[serde(default)]
    code: Option<u16>,
    #[serde(default)]
    pointer: Option<String>,
    #[serde(default)]
    equals: Option<Value>,
    #[serde(default)]
    exists: Option<bool>,
}

/// One API server under test, with the clients and values the script made so far.
struct Backend {
    name: &'static str,
    config: kube::Config,
    admin: kube::Client,
    identities: HashMap<String, kube::Client>,
    vars: BTreeMap<String, String>,
}

impl Backend {
    fn client_with_token(&self, token: &str) -> Result<kube::Client> {
        let mut config = self.config.clone();
        config.auth_info = serde_json::from_value::<AuthInfo>(json!({ "token": token }))?;
        config.headers = vec![(header::USER_AGENT, HeaderValue::from_static(USER_AGENT))];
        Ok(kube::Client::try_from(config)?)
    }

    fn client(&mut self, who: Option<&str>) -> Result<kube::Client> {
        match who {
            None | Some("admin") => Ok(self.admin.clone()),
            Some(name) => {
                if let Some(c) = self.identities.get(name) {
                    return Ok(c.clone());
                }
                // An identity nobody issued: a token no server knows.
                let c = self.client_with_token("not-a-valid-token")?;
                self.identities.insert(name.to_string(), c.clone());
                Ok(c)
            }
        }
    }

    fn subst(&self, s: &str) -> String {
        let rep = Regex::new(r"\$\{(.)\*(\d+)\}").unwrap();
        let s = rep.replace_all(s, |c: &regex::Captures| {
            c[1].repeat(c[2].parse::<usize>().unwrap_or(0))
        });
        let var = Regex::new(r"\$\{([A-Za-z0-9_]+)\}").unwrap();
        var.replace_all(&s, |c: &regex::Captures| {
            self.vars.get(&c[1]).cloned().unwrap_or_default()
        })
        .into_owned()
    }

    fn subst_value(&self, v: &Value) -> Value {
        match v {
            Value::String(s) => Value::String(self.subst(s)),
            Value::Array(a) => Value::Array(a.iter().map(|x| self.subst_value(x)).collect()),
            Value::Object(m) => Value::Object(
                m.iter()
                    .map(|(k, x)| (self.subst(k), self.subst_value(x)))
                    .collect(),
            ),
            other => other.clone(),
        }
    }

    /// Send one step's request; (status code, body as JSON or as a string).
    async fn send(&mut self, step: &Step) -> Result<(u16, Value)> {
        let client = self.client(step.as_.as_deref())?;
        let mut uri = self.subst(&step.path);
        if !step.query.is_empty() {
            let mut q = form_urlencoded::Serializer::new(String::new());
            for (k, v) in &step.query {
                q.append_pair(k, &self.subst(v));
            }
            uri = format!("{uri}?{}", q.finish());
        }
        let content_type = match step.patch.as_deref() {
            None => "application/json",
            Some("json") => "application/json-patch+json",
            Some("merge") => "application/merge-patch+json",
            Some("strategic") => "application/strategic-merge-patch+json",
            Some("apply") => "application/apply-patch+yaml",
            Some(other) => other,
        };
        let accept = match step.accept.as_deref() {
            None => "application/json",
            Some("table") => TABLE_ACCEPT,
            Some(other) => other,
        };
        let body: Vec<u8> = match (&step.raw, &step.body) {
            (Some(raw), _) => raw.clone().into_bytes(),
            (None, Some(b)) => serde_json::to_vec(&self.subst_value(b))?,
            (None, None) => Vec::new(),
        };
        let method = Method::from_bytes(step.method.as_bytes())?;
        let mut req = Request::builder()
            .method(method)
            .uri(uri)
            .header(header::ACCEPT, accept);
        if !body.is_empty() {
            req = req.header(header::CONTENT_TYPE, content_type);
        }
        let req = req.body(kube::client::Body::from(body))?;
        let limit = if step.watch {
            Duration::from_secs(20)
        } else {
            Duration::from_secs(15)
        };
        let res = tokio::time::timeout(limit, async {
            let res = client.send(req).await?;
            let code = res.status().as_u16();
            let bytes = res.into_body().collect_bytes().await?;
            anyhow::Ok((code, bytes))
        })
        .await
        .with_context(|| format!("{}: {} timed out", self.name, step.id))??;
        let (code, bytes) = res;
        let text = String::from_utf8_lossy(&bytes).into_owned();
        if step.watch && code == 200 {
            let events: Vec<Value> = text
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(|l| serde_json::from_str(l).unwrap_or(Value::String(l.to_string())))
                .collect();
            return Ok((code, Value::Array(events)));
        }
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Ok((code, body))
    }

    fn until_met(u: &Until, code: u16, body: &Value) -> bool {
        if let Some(c) = u.code
            && c != code
        {
            return false;
        }
        if let Some(p) = &u.pointer {
            let v = body.pointer(p).filter(|v| !v.is_null());
            if let Some(e) = &u.equals
                && v != Some(e)
            {
                return false;
            }
            if let Some(x) = u.exists
                && v.is_some() != x
            {
                return false;
            }
        }
        true
    }

    /// Run one step: its outcome as compared, or None when it does not run here.
    async fn run(&mut self, step: &Step) -> Result<Option<Value>> {
        if let Some(only) = &step.only
            && only != self.name
        {
            return Ok(None);
        }
        let started = Instant::now();
        let (code, body, timed_out) = loop {
            let (code, body) = self.send(step).await?;
            match &step.until {
                None => break (code, body, false),
                Some(u) if Self::until_met(u, code, &body) => break (code, body, false),
                Some(_) if started.elapsed() > Duration::from_secs(60) => break (code, body, true),
                Some(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        };
        for (var, ptr) in &step.save {
            if let Some(v) = body.pointer(ptr) {
                let s = match v {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                self.vars.insert(var.clone(), s);
            }
        }
        if let Some(name) = &step.identity
            && let Some(token) = body.pointer("/status/token").and_then(Value::as_str)
        {
            let c = self.client_with_token(token)?;
            self.identities.insert(name.clone(), c);
            self.vars.insert(format!("token_{name}"), token.to_string());
        }
        let mut out = Map::new();
        out.insert("code".into(), json!(code));
        if timed_out {
            out.insert("until".into(), json!("not reached within 60 s"));
        }
        if step.watch && code == 200 {
            let events = body.as_array().cloned().unwrap_or_default();
            let picked: Vec<Value> = events
                .iter()
                .filter(|e| {
                    // Periodic bookmarks come at each server's own pace; the end-of-initial-
                    // events bookmark is compared.
                    e["type"] != "BOOKMARK"
                        || e.pointer("/object/metadata/annotations/k8s.io~1initial-events-end")
                            .is_some()
                })
                .map(|e| {
                    let obj = &e["object"];
                    let mut ev = json!({"type": e["type"], "name": obj.pointer("/metadata/name")});
                    if e["type"] == "ERROR" {
                        ev["status"] = status_fields(obj);
                    } else if let Some(Value::Array(ptrs)) = &step.compare {
                        for p in ptrs.iter().filter_map(Value::as_str) {
                            ev[p] = pick(obj, p);
                        }
                    }
                    ev
                })
                .collect();
            out.insert("events".into(), Value::Array(picked));
        } else {
            let body = table_ages(body);
            let is_status = body.get("kind").and_then(Value::as_str) == Some("Status");
            match &step.compare {
                Some(Value::String(s)) if s == "full" => {
                    out.insert("body".into(), body.clone());
                }
                Some(Value::String(s)) if s == "code" => {}
                Some(Value::Array(ptrs)) => {
                    if is_status && code >= 300 {
                        out.insert("status".into(), status_fields(&body));
                    } else {
                        for p in ptrs.iter().filter_map(Value::as_str) {
                            out.insert(p.to_string(), pick(&body, p));
                        }
                    }
                }
                _ => {
                    if is_status {
                        out.insert("status".into(), status_fields(&body));
                    } else if let Some(s) = body.as_str() {
                        out.insert("text".into(), json!(s));
                    } else {
                        out.insert("kind".into(), body["kind"].clone());
                    }
                }
            }
        }
        Ok(Some(normalize(&Value::Object(out), &self.vars)))
    }
}

fn status_fields(s: &Value) -> Value {
    let mut out = json!({
        "status": s["status"], "reason": s["reason"], "message": s["message"], "code": s["code"],
    });
    if let Some(d) = s.get("details") {
        out["details"] = d.clone();
    }
    // The apiserver validates a map (labels, annotations) in Go's randomized map order, so the
    // causes of one invalid object, and the aggregate message listing them, come in any order:
    // compare them as a set.
    let causes: Option<Vec<Value>> = out
        .pointer_mut("/details/causes")
        .and_then(Value::as_array_mut)
        .map(|c| {
            c.sort_by_key(|v| v.to_string());
            c.clone()
        });
    if let (Some(causes), Some(message)) = (causes, out["message"].as_str().map(String::from))
        && let Some((head, rest)) = message.split_once(": [")
        && rest.ends_with(']')
        && causes.len() > 1
    {
        let mut items: Vec<String> = causes
            .iter()
            .map(|c| {
                format!(
                    "{}: {}",
                    c["field"].as_str().unwrap_or(""),
                    c["message"].as_str().unwrap_or("")
                )
            })
            .collect();
        items.sort();
        out["message"] = json!(format!("{head}: [{}]", items.join(", ")));
    }
    out
}

/// The value at a JSON pointer; `*` segments expand over arrays (giving an array).
fn pick(v: &Value, ptr: &str) -> Value {
    fn go(v: &Value, segs: &[&str]) -> Value {
        match segs.split_first() {
            None => v.clone(),
            Some((&"*", rest)) => match v {
                Value::Array(a) => Value::Array(a.iter().map(|x| go(x, rest)).collect()),
                _ => Value::Null,
            },
            Some((seg, rest)) => {
                let seg = seg.replace("~1", "/").replace("~0", "~");
                let next = match v {
                    Value::Object(m) => m.get(&seg),
                    Value::Array(a) => seg.parse::<usize>().ok().and_then(|i| a.get(i)),
                    _ => None,
                };
                next.map_or(Value::Null, |n| go(n, rest))
            }
        }
    }
    let segs: Vec<&str> = ptr.trim_start_matches('/').split('/').collect();
    go(v, &segs)
}

/// Age cells of a Table say how old an object is: different on every run.
fn table_ages(mut body: Value) -> Value {
    if body.get("kind").and_then(Value::as_str) != Some("Table") {
        return body;
    }
    let age = body["columnDefinitions"]
        .as_array()
        .and_then(|cs| cs.iter().position(|c| c["name"] == "Age"));
    if let (Some(i), Some(rows)) = (age, body["rows"].as_array_mut()) {
        for r in rows {
            if let Some(c) = r["cells"].get_mut(i) {
                *c = json!("<age>");
            }
        }
    }
    body
}

fn normalize(v: &Value, vars: &BTreeMap<String, String>) -> Value {
    let uuid = Regex::new(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}").unwrap();
    let time = Regex::new(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)$").unwrap();
    let rv_msg =
        Regex::new(r"(?i)(resource ?version(?: in (?:precondition|object meta))?:? )\d+").unwrap();
    let too_old = Regex::new(r"too old resource version: \d+ \(\d+\)").unwrap();
    let hash = Regex::new(r"\?hash=[0-9A-F]+").unwrap();
    let in_record =
        Regex::new(r"(ResourceVersion in (?:the precondition|record) )\(\d+\)").unwrap();
    // Saved values that differ between servers (generated names, tokens): long enough not to
    // hit ordinary words.
    let saved: Vec<(&String, &String)> = vars
        .iter()
        .filter(|(k, v)| v.len() >= 8 && (k.starts_with("gen") || k.starts_with("token")))
        .collect();
    fn walk(
        v: &Value,
        key: Option<&str>,
        f: &dyn Fn(&str) -> String,
        time: &Regex,
    ) -> Option<Value> {
        Some(match v {
            Value::Object(m) => Value::Object(
                m.iter()
                    .filter(|(k, _)| !matches!(k.as_str(), "managedFields" | "selfLink"))
                    .filter_map(|(k, x)| walk(x, Some(k), f, time).map(|x| (k.clone(), x)))
                    .collect(),
            ),
            Value::Array(a) => {
                Value::Array(a.iter().filter_map(|x| walk(x, None, f, time)).collect())
            }
            Value::String(s) => match key {
                Some("resourceVersion") if !s.is_empty() => json!("<rv>"),
                Some(k) if (k == "continue" || k.ends_with("/continue")) && !s.is_empty() => {
                    json!("<continue>")
                }
                Some("token") => json!("<token>"),
                _ if time.is_match(s) => json!("<time>"),
                _ => Value::String(f(s)),
            },
            other => other.clone(),
        })
    }
    let f = |s: &str| -> String {
        let mut s = uuid.replace_all(s, "<uid>").into_owned();
        s = too_old
            .replace_all(&s, "too old resource version: <rv> (<rv>)")
            .into_owned();
        s = rv_msg.replace_all(&s, "${1}<rv>").into_owned();
        s = hash.replace_all(&s, "?hash=<hash>").into_owned();
        s = in_record.replace_all(&s, "${1}(<rv>)").into_owned();
        for (k, v) in &saved {
            s = s.replace(v.as_str(), &format!("<{k}>"));
        }
        s
    };
    walk(v, None, &f, &time).unwrap_or(Value::Null)
}

/// Step ids of the "Known differences" table in kubesim's README (first cell, in backticks).
fn known_differences() -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut inside = false;
    let tick = Regex::new(r"`([^`]+)`").unwrap();
    for line in README.lines() {
        if line.starts_with('#') {
            inside = line.to_lowercase().contains("known differences");
            continue;
        }
        if !inside || !line.starts_with('|') || line.starts_with("|--") || line.starts_with("|-") {
            continue;
        }
        let first = line.trim_matches('|').split('|').next().unwrap_or("");
        for c in tick.captures_iter(first) {
            out.insert(c[1].to_string());
        }
    }
    out
}

async fn kubesim_backend() -> Result<(kubesim::Sim, Backend)> {
    let mut cfg = kubesim::SimConfig {
        rbac: true,
        ..Default::default()
    };
    cfg.controllers.kubelet = false;
    let mut sim = kubesim::Sim::start(cfg);
    let addr = sim.serve(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
    let mut config = kube::Config::new(format!("http://{addr}").parse()?);
    config.auth_info = serde_json::from_value(json!({"token": kubesim::ADMIN_TOKEN}))?;
    config.headers = vec![(header::USER_AGENT, HeaderValue::from_static(USER_AGENT))];
    let admin = kube::Client::try_from(config.clone())?;
    Ok((
        sim,
        Backend {
            name: "kubesim",
            config,
            admin,
            identities: HashMap::new(),
            vars: BTreeMap::new(),
        },
    ))
}

async fn real_backend() -> Result<(ControlPlane, Backend)> {
    let cp = ControlPlane::start(Options {
        pod_lifecycle: None,
        ..Options::default()
    })
    .await?;
    let kubeconfig = Kubeconfig::read_from(&cp.kubeconfig_path)?;
    let mut config =
        kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
    config.headers = vec![(header::USER_AGENT, HeaderValue::from_static(USER_AGENT))];
    let admin = kube::Client::try_from(config.clone())?;
    Ok((
        cp,
        Backend {
            name: "real",
            config,
            admin,
            identities: HashMap::new(),
            vars: BTreeMap::new(),
        },
    ))
}

async fn run_all(b: &mut Backend, steps: &[Step]) -> Result<Vec<Option<Value>>> {
    let mut out = Vec::new();
    for s in steps {
        out.push(
            b.run(s)
                .await
                .with_context(|| format!("{}: step {}", b.name, s.id))?,
        );
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubesim_matches_the_real_apiserver() -> Result<()> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
    let steps: Vec<Step> = serde_saphyr::from_str(SCRIPT).context("parsing the script")?;
    let mut ids = BTreeSet::new();
    for s in &steps {
        anyhow::ensure!(ids.insert(s.id.clone()), "step id {} twice", s.id);
    }
    let known = known_differences();
    for k in &known {
        anyhow::ensure!(
            ids.contains(k),
            "Known differences names {k}, which is no step of the script"
        );
    }
    let ((_sim, mut sim_b), (cp, mut real_b)) =
        tokio::try_join!(kubesim_backend(), real_backend())?;
    let started = Instant::now();
    let (sim_out, real_out) =
        tokio::join!(run_all(&mut sim_b, &steps), run_all(&mut real_b, &steps));
    let (sim_out, real_out) = (sim_out?, real_out?);
    println!(
        "{} steps on both backends in {:.1} s",
        steps.len(),
        started.elapsed().as_secs_f64()
    );
    let dump = std::env::var_os("CONFORMANCE_DUMP").is_some();
    let mut unexpected = Vec::new();
    let mut listed = 0;
    let mut stale = Vec::new();
    for ((s, a), b) in steps.iter().zip(&sim_out).zip(&real_out) {
        let (Some(a), Some(b)) = (a, b) else { continue };
        if dump {
            println!("[{}] {}", s.id, serde_json::to_string(b)?);
        }
        if a == b {
            if known.contains(&s.id) {
                stale.push(s.id.clone());
            }
            continue;
        }
        if known.contains(&s.id) {
            listed += 1;
            println!("known difference {}:\n  kubesim: {a}\n  real:    {b}", s.id);
        } else {
            unexpected.push(s.id.clone());
            println!(
                "DIVERGENCE {}:\n  kubesim: {}\n  real:    {}",
                s.id,
                serde_json::to_string(a)?,
                serde_json::to_string(b)?
            );
        }
    }
    for id in &stale {
        println!("known difference {id} no longer differs: remove its row");
    }
    println!(
        "{} steps compared, {} known differences, {} unexpected",
        sim_out
            .iter()
            .zip(&real_out)
            .filter(|(a, b)| a.is_some() && b.is_some())
            .count(),
        listed,
        unexpected.len()
    );
    cp.stop().await?;
    if !unexpected.is_empty() {
        bail!(
            "{} divergences not in kubesim's Known differences: {}",
            unexpected.len(),
            unexpected.join(", ")
        );
    }
    Ok(())
}
