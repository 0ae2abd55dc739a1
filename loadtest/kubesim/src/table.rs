//! Server-side `meta.k8s.io/v1` Table output: the columns `kubectl get` prints, computed as
//! the apiserver's printers compute them, and a CRD's `additionalPrinterColumns`.

use serde_json::{Map, Value, json};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IncludeObject {
    None,
    Metadata,
    Object,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PrinterColumn {
    pub name: String,
    pub type_: String,
    pub format: String,
    pub description: String,
    pub priority: i64,
    /// How to compute the cell: a built-in printer or a JSONPath.
    pub source: Source,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    Name,
    Age,
    JsonPath(String),
    Builtin(&'static str),
}

const NAME_DESC: &str = "Name must be unique within a namespace. Is required when creating resources, although some resources may allow a client to request the generation of an appropriate name automatically. Name is primarily intended for creation idempotence and configuration definition. Cannot be updated. More info: https://kubernetes.io/docs/concepts/overview/working-with-objects/names#names";
const AGE_DESC: &str = "CreationTimestamp is a timestamp representing the server time when this object was created. It is not guaranteed to be set in happens-before order across separate operations. Clients may not set this value. It is represented in RFC3339 form and is in UTC.\n\nPopulated by the system. Read-only. Null for lists. More info: https://git.k8s.io/community/contributors/devel/sig-architecture/api-conventions.md#metadata";

fn col(name: &str, type_: &str, priority: i64, source: Source) -> PrinterColumn {
    PrinterColumn {
        name: name.into(),
        type_: type_.into(),
        format: if matches!(source, Source::Name) {
            "name".into()
        } else {
            String::new()
        },
        description: match source {
            Source::Name => NAME_DESC.into(),
            Source::Age => AGE_DESC.into(),
            _ => String::new(),
        },
        priority,
        source,
    }
}

fn b(name: &str, priority: i64, key: &'static str) -> PrinterColumn {
    let t = if key.ends_with("#int") {
        "integer"
    } else {
        "string"
    };
    col(name, t, priority, Source::Builtin(key))
}

/// Columns for a kind: built-in printers by (group, plural), or a CRD's printer columns.
pub fn columns(group: &str, plural: &str, crd_columns: Option<&Value>) -> Vec<PrinterColumn> {
    let name = col("Name", "string", 0, Source::Name);
    let age = col("Age", "string", 0, Source::Age);
    if let Some(cols) = crd_columns {
        let mut out = vec![name];
        let list = cols.as_array().cloned().unwrap_or_default();
        if list.is_empty() {
            out.push(col(
                "Age",
                "date",
                0,
                Source::JsonPath(".metadata.creationTimestamp".into()),
            ));
        }
        for c in list {
            let s = |k: &str| c.get(k).and_then(Value::as_str).unwrap_or("").to_string();
            out.push(PrinterColumn {
                name: s("name"),
                type_: s("type"),
                format: s("format"),
                description: s("description"),
                priority: c.get("priority").and_then(Value::as_i64).unwrap_or(0),
                source: Source::JsonPath(s("jsonPath")),
            });
        }
        return out;
    }
    match (group, plural) {
        ("", "pods") => vec![
            name,
            b("Ready", 0, "pod.ready"),
            b("Status", 0, "pod.status"),
            b("Restarts", 0, "pod.restarts#int"),
            age,
            b("IP", 1, "pod.ip"),
            b("Node", 1, "pod.node"),
            b("Nominated Node", 1, "none"),
            b("Readiness Gates", 1, "none"),
        ],
        ("apps", "statefulsets") => vec![
            name,
            b("Ready", 0, "sts.ready"),
            age,
            b("Containers", 1, "containers"),
            b("Images", 1, "images"),
        ],
        ("apps", "deployments") => vec![
            name,
            b("Ready", 0, "deploy.ready"),
            b("Up-to-date", 0, "deploy.updated#int"),
            b("Available", 0, "deploy.available#int"),
            age,
            b("Containers", 1, "containers"),
            b("Images", 1, "images"),
            b("Selector", 1, "selector"),
        ],
        ("", "services") => vec![
            name,
            b("Type", 0, "svc.type"),
            b("Cluster-IP", 0, "svc.clusterip"),
            b("External-IP", 0, "none"),
            b("Port(s)", 0, "svc.ports"),
            age,
            b("Selector", 1, "svc.selector"),
        ],
        ("coordination.k8s.io", "leases") => vec![name, b("Holder", 0, "lease.holder"), age],
        ("", "namespaces") => vec![name, b("Status", 0, "ns.status"), age],
        ("", "configmaps") => vec![name, b("Data", 0, "cm.data#int"), age],
        ("", "serviceaccounts") => vec![name, b("Secrets", 0, "sa.secrets#int"), age],
        ("", "nodes") => vec![
            name,
            b("Status", 0, "node.status"),
            b("Roles", 0, "none"),
            age,
            b("Version", 0, "node.version"),
        ],
        ("", "events") | ("events.k8s.io", "events") => vec![
            b("Last Seen", 0, "ev.lastseen"),
            b("Type", 0, "ev.type"),
            b("Reason", 0, "ev.reason"),
            b("Object", 0, "ev.object"),
            b("Message", 0, "ev.message"),
        ],
        ("policy", "poddisruptionbudgets") => vec![
            name,
            b("Min Available", 0, "pdb.min"),
            b("Max Unavailable", 0, "pdb.max"),
            b("Allowed Disruptions", 0, "pdb.allowed#int"),
            age,
        ],
        _ => vec![
            name,
            col(
                "Created At",
                "date",
                0,
                Source::JsonPath(".metadata.creationTimestamp".into()),
            ),
        ],
    }
}

/// `k8s.io/apimachinery/pkg/util/duration.HumanDuration`.
pub fn human_duration(seconds: i64) -> String {
    if seconds < -1 {
        return "<invalid>".into();
    } else if seconds < 0 {
        return "0s".into();
    } else if seconds < 120 {
        return format!("{seconds}s");
    }
    let minutes = seconds / 60;
    if minutes < 10 {
        let s = seconds % 60;
        return if s == 0 {
            format!("{minutes}m")
        } else {
            format!("{minutes}m{s}s")
        };
    } else if minutes < 180 {
        return format!("{minutes}m");
    }
    let hours = seconds / 3600;
    if hours < 8 {
        let m = minutes % 60;
        return if m == 0 {
            format!("{hours}h")
        } else {
            format!("{hours}h{m}m")
        };
    } else if hours < 48 {
        return format!("{hours}h");
    } else if hours < 24 * 8 {
        let h = hours % 24;
        return if h == 0 {
            format!("{}d", hours / 24)
        } else {
            format!("{}d{h}h", hours / 24)
        };
    } else if hours < 24 * 365 * 2 {
        return format!("{}d", hours / 24);
    } else if hours < 24 * 365 * 8 {
        let d = (hours / 24) % 365;
        return if d == 0 {
            format!("{}y", hours / 24 / 365)
        } else {
            format!("{}y{d}d", hours / 24 / 365)
        };
    }
    format!("{}y", hours / 24 / 365)
}

fn age_of(ts: Option<&str>, now: jiff::Timestamp) -> Value {
    match ts.and_then(|t| t.parse::<jiff::Timestamp>().ok()) {
        Some(t) => json!(human_duration(now.duration_since(t).as_secs())),
        None => json!("<unknown>"),
    }
}

fn s<'a>(o: &'a Value, ptr: &str) -> Option<&'a str> {
    o.pointer(ptr).and_then(Value::as_str)
}

fn containers(o: &Value, field: &str) -> String {
    o.pointer("/spec/template/spec/containers")
        .and_then(Value::as_array)
        .map(|cs| {
            cs.iter()
                .filter_map(|c| c.get(field).and_then(Value::as_str))
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default()
}

fn selector_string(m: Option<&Map<String, Value>>) -> String {
    match m {
        Some(m) if !m.is_empty() => {
            let mut pairs: Vec<String> = m
                .iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
                .collect();
            pairs.sort();
            pairs.join(",")
        }
        _ => "<none>".into(),
    }
}

fn pod_status(o: &Value) -> String {
    if o.pointer("/metadata/deletionTimestamp")
        .is_some_and(|v| !v.is_null())
    {
        return "Terminating".into();
    }
    if let Some(r) = s(o, "/status/reason") {
        return r.into();
    }
    let mut reason = s(o, "/status/phase").unwrap_or("Pending").to_string();
    if let Some(cs) = o
        .pointer("/status/containerStatuses")
        .and_then(Value::as_array)
    {
        for c in cs {
            if let Some(r) = c.pointer("/state/waiting/reason").and_then(Value::as_str) {
                reason = r.into();
            } else if let Some(r) = c
                .pointer("/state/terminated/reason")
                .and_then(Value::as_str)
            {
                reason = r.into();
            }
        }
    }
    reason
}

fn builtin(key: &str, o: &Value, now: jiff::Timestamp) -> Value {
    match key {
        "none" => json!("<none>"),
        "pod.ready" => {
            let total = o
                .pointer("/spec/containers")
                .and_then(Value::as_array)
                .map_or(0, Vec::len);
            let ready = o
                .pointer("/status/containerStatuses")
                .and_then(Value::as_array)
                .map_or(0, |cs| {
                    cs.iter()
                        .filter(|c| c.get("ready").and_then(Value::as_bool) == Some(true))
                        .count()
                });
            json!(format!("{ready}/{total}"))
        }
        "pod.status" => json!(pod_status(o)),
        // A string cell, as the apiserver prints it ("2", or "2 (5m ago)" with a last
        // termination).
        "pod.restarts#int" => json!(
            o.pointer("/status/containerStatuses")
                .and_then(Value::as_array)
                .map_or(0, |cs| cs
                    .iter()
                    .filter_map(|c| c.get("restartCount").and_then(Value::as_i64))
                    .sum::<i64>())
                .to_string()
        ),
        "pod.ip" => json!(s(o, "/status/podIP").unwrap_or("<none>")),
        "pod.node" => json!(s(o, "/spec/nodeName").unwrap_or("<none>")),
        "sts.ready" => json!(format!(
            "{}/{}",
            o.pointer("/status/readyReplicas")
                .and_then(Value::as_i64)
                .unwrap_or(0),
            o.pointer("/spec/replicas")
                .and_then(Value::as_i64)
                .unwrap_or(0)
        )),
        "deploy.ready" => json!(format!(
            "{}/{}",
            o.pointer("/status/readyReplicas")
                .and_then(Value::as_i64)
                .unwrap_or(0),
            o.pointer("/spec/replicas")
                .and_then(Value::as_i64)
                .unwrap_or(0)
        )),
        "deploy.updated#int" => json!(
            o.pointer("/status/updatedReplicas")
                .and_then(Value::as_i64)
                .unwrap_or(0)
        ),
        "deploy.available#int" => json!(
            o.pointer("/status/availableReplicas")
                .and_then(Value::as_i64)
                .unwrap_or(0)
        ),
        "containers" => json!(containers(o, "name")),
        "images" => json!(containers(o, "image")),
        "selector" => json!(selector_string(
            o.pointer("/spec/selector/matchLabels")
                .and_then(Value::as_object)
        )),
        "svc.type" => json!(s(o, "/spec/type").unwrap_or("ClusterIP")),
        "svc.clusterip" => json!(s(o, "/spec/clusterIP").unwrap_or("<none>")),
        "svc.ports" => {
            let ports = o
                .pointer("/spec/ports")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            if ports.is_empty() {
                return json!("<none>");
            }
            let parts: Vec<String> = ports
                .iter()
                .map(|p| {
                    let port = p.get("port").map(|v| v.to_string()).unwrap_or_default();
                    let proto = p.get("protocol").and_then(Value::as_str).unwrap_or("TCP");
                    match p.get("nodePort").and_then(Value::as_i64) {
                        Some(np) => format!("{port}:{np}/{proto}"),
                        None => format!("{port}/{proto}"),
                    }
                })
                .collect();
            json!(parts.join(","))
        }
        "svc.selector" => json!(selector_string(
            o.pointer("/spec/selector").and_then(Value::as_object)
        )),
        "lease.holder" => json!(s(o, "/spec/holderIdentity").unwrap_or("")),
        "ns.status" => json!(s(o, "/status/phase").unwrap_or("Active")),
        "cm.data#int" => json!(
            o.get("data").and_then(Value::as_object).map_or(0, Map::len)
                + o.get("binaryData")
                    .and_then(Value::as_object)
                    .map_or(0, Map::len)
        ),
        "sa.secrets#int" => json!(
            o.get("secrets")
                .and_then(Value::as_array)
                .map_or(0, Vec::len)
        ),
        "node.status" => {
            let ready = o
                .pointer("/status/conditions")
                .and_then(Value::as_array)
                .and_then(|cs| cs.iter().find(|c| c["type"] == "Ready"))
                .and_then(|c| c.get("status").and_then(Value::as_str));
            json!(if ready == Some("True") {
                "Ready"
            } else {
                "NotReady"
            })
        }
        "node.version" => json!(s(o, "/status/nodeInfo/kubeletVersion").unwrap_or("v1.32.0")),
        "ev.lastseen" => {
            let t = s(o, "/lastTimestamp")
                .or_else(|| s(o, "/deprecatedLastTimestamp"))
                .or_else(|| s(o, "/eventTime"))
                .or_else(|| s(o, "/metadata/creationTimestamp"));
            age_of(t, now)
        }
        "ev.type" => json!(s(o, "/type").unwrap_or("")),
        "ev.reason" => json!(s(o, "/reason").unwrap_or("")),
        "ev.object" => {
            let r = o.get("involvedObject").or_else(|| o.get("regarding"));
            let kind = r
                .and_then(|r| r.get("kind"))
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_lowercase();
            let name = r
                .and_then(|r| r.get("name"))
                .and_then(Value::as_str)
                .unwrap_or("");
            json!(format!("{kind}/{name}"))
        }
        "ev.message" => json!(s(o, "/message").or_else(|| s(o, "/note")).unwrap_or("")),
        "pdb.min" => o
            .pointer("/spec/minAvailable")
            .cloned()
            .map_or(json!("N/A"), |v| json!(v.to_string().trim_matches('"'))),
        "pdb.max" => o
            .pointer("/spec/maxUnavailable")
            .cloned()
            .map_or(json!("N/A"), |v| json!(v.to_string().trim_matches('"'))),
        "pdb.allowed#int" => json!(
            o.pointer("/status/disruptionsAllowed")
                .and_then(Value::as_i64)
                .unwrap_or(0)
        ),
        _ => Value::Null,
    }
}

/// Evaluate a CRD printer column's JSONPath (Kubernetes syntax, e.g. `.status.writerPod` or
/// `.status.conditions[?(@.type=="Available")].status`); the first result.
fn json_path(o: &Value, path: &str) -> Option<Value> {
    let expr = format!("${}", path.trim());
    let found = jsonpath_rust::JsonPath::query(o, &expr).ok()?;
    found.into_iter().next().cloned()
}

fn cell(c: &PrinterColumn, o: &Value, now: jiff::Timestamp) -> Value {
    match &c.source {
        Source::Name => json!(s(o, "/metadata/name").unwrap_or("")),
        Source::Age => age_of(s(o, "/metadata/creationTimestamp"), now),
        Source::Builtin(k) => builtin(k, o, now),
        Source::JsonPath(p) => match json_path(o, p) {
            None | Some(Value::Null) => Value::Null,
            Some(v) => match c.type_.as_str() {
                "date" => age_of(v.as_str(), now),
                "integer" | "number" | "boolean" => v,
                _ => match v {
                    Value::String(s) => json!(s),
                    other => json!(other.to_string()),
                },
            },
        },
    }
}

pub fn to_table(
    columns: &[PrinterColumn],
    objects: &[Value],
    include: IncludeObject,
    list_metadata: Value,
    now: jiff::Timestamp,
) -> Value {
    let defs: Vec<Value> = columns
        .iter()
        .map(|c| {
            json!({"name": c.name, "type": c.type_, "format": c.format, "description": c.description, "priority": c.priority})
        })
        .collect();
    let rows: Vec<Value> = objects
        .iter()
        .map(|o| {
            let cells: Vec<Value> = columns.iter().map(|c| cell(c, o, now)).collect();
            let mut row = json!({"cells": cells});
            match include {
                IncludeObject::None => {}
                IncludeObject::Metadata => {
                    row["object"] = json!({
                        "kind": "PartialObjectMetadata",
                        "apiVersion": "meta.k8s.io/v1",
                        "metadata": o.get("metadata").cloned().unwrap_or(json!({})),
                    })
                }
                IncludeObject::Object => row["object"] = o.clone(),
            }
            row
        })
        .collect();
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": list_metadata,
        "columnDefinitions": defs,
        "rows": rows,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_durations() {
        for (secs, want) in [
            (-5, "<invalid>"),
            (-1, "0s"),
            (0, "0s"),
            (119, "119s"),
            (120, "2m"),
            (599, "9m59s"),
            (600, "10m"),
            (3 * 3600, "3h"),
            (7 * 3600 + 59 * 60, "7h59m"),
            (47 * 3600, "47h"),
            (2 * 86400, "2d"),
            (8 * 86400, "8d"),
        ] {
            assert_eq!(human_duration(secs), want, "{secs}");
        }
    }

    #[test]
    fn pod_rows() {
        let now: jiff::Timestamp = "2026-01-01T00:10:00Z".parse().expect("ts");
        let pod = json!({"metadata": {"name": "p", "creationTimestamp": "2026-01-01T00:00:00Z"},
            "spec": {"containers": [{"name": "c"}], "nodeName": "n1"},
            "status": {"phase": "Running", "podIP": "10.0.0.1", "containerStatuses": [{"ready": true, "restartCount": 2}]}});
        let t = to_table(
            &columns("", "pods", None),
            std::slice::from_ref(&pod),
            IncludeObject::Metadata,
            json!({}),
            now,
        );
        assert_eq!(
            t["rows"][0]["cells"],
            json!([
                "p", "1/1", "Running", "2", "10m", "10.0.0.1", "n1", "<none>", "<none>"
            ])
        );
        assert_eq!(t["rows"][0]["object"]["kind"], "PartialObjectMetadata");
        let mut term = pod.clone();
        term["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:10:00Z");
        let t = to_table(
            &columns("", "pods", None),
            &[term],
            IncludeObject::None,
            json!({}),
            now,
        );
        assert_eq!(t["rows"][0]["cells"][2], "Terminating");
        assert!(t["rows"][0].get("object").is_none());
    }

    #[test]
    fn crd_columns_with_filters() {
        let now: jiff::Timestamp = "2026-01-01T00:00:30Z".parse().expect("ts");
        let cols = json!([
            {"name": "Writer", "type": "string", "jsonPath": ".status.writerPod"},
            {"name": "Epoch", "type": "integer", "jsonPath": ".status.writerEpoch"},
            {"name": "Available", "type": "string", "jsonPath": ".status.conditions[?(@.type==\"Available\")].status"},
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}
        ]);
        let lock = json!({"metadata": {"name": "l", "creationTimestamp": "2026-01-01T00:00:00Z"},
            "status": {"writerPod": "db-0", "writerEpoch": 3, "conditions": [{"type": "Progressing", "status": "False"}, {"type": "Available", "status": "True"}]}});
        let t = to_table(
            &columns("x", "y", Some(&cols)),
            &[lock],
            IncludeObject::Metadata,
            json!({}),
            now,
        );
        assert_eq!(
            t["rows"][0]["cells"],
            json!(["l", "db-0", 3, "True", "30s"])
        );
        let empty = columns("x", "y", Some(&json!([])));
        assert_eq!(
            empty.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(),
            ["Name", "Age"]
        );
    }

    #[test]
    fn other_builtins() {
        let now = jiff::Timestamp::now();
        let sts = json!({"metadata": {"name": "s"}, "spec": {"replicas": 3, "template": {"spec": {"containers": [{"name": "a", "image": "i:1"}]}}}, "status": {"readyReplicas": 2}});
        let t = to_table(
            &columns("apps", "statefulsets", None),
            &[sts],
            IncludeObject::None,
            json!({}),
            now,
        );
        assert_eq!(t["rows"][0]["cells"][1], "2/3");
        assert_eq!(t["rows"][0]["cells"][4], "i:1");
        let lease = json!({"metadata": {"name": "l"}, "spec": {"holderIdentity": "db-0"}});
        let t = to_table(
            &columns("coordination.k8s.io", "leases", None),
            &[lease],
            IncludeObject::None,
            json!({}),
            now,
        );
        assert_eq!(t["rows"][0]["cells"][1], "db-0");
        let svc = json!({"metadata": {"name": "s"}, "spec": {"type": "ClusterIP", "clusterIP": "10.96.0.1", "ports": [{"port": 5432, "protocol": "TCP"}], "selector": {"b": "2", "a": "1"}}});
        let t = to_table(
            &columns("", "services", None),
            &[svc],
            IncludeObject::None,
            json!({}),
            now,
        );
        assert_eq!(t["rows"][0]["cells"][4], "5432/TCP");
        assert_eq!(t["rows"][0]["cells"][6], "a=1,b=2");
    }
}
