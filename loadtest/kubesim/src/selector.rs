//! Label and field selectors as the apiserver parses and evaluates them.

use std::collections::BTreeSet;

use serde_json::{Map, Value};

#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct SelectorError(pub String);

#[derive(Debug, Clone, PartialEq, Eq)]
enum Op {
    Eq(String),
    NotEq(String),
    In(BTreeSet<String>),
    NotIn(BTreeSet<String>),
    Exists,
    DoesNotExist,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Requirement {
    key: String,
    op: Op,
}

/// A label selector: requirements ANDed together.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelSelector {
    reqs: Vec<Requirement>,
    /// `metav1.LabelSelector` can be null (match nothing) — unused by kubesim's callers but kept
    /// distinct from the empty selector.
    nothing: bool,
}

fn valid_key(k: &str) -> bool {
    let (prefix, name) = match k.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, k),
    };
    let name_ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric());
    name_ok && prefix.is_none_or(|p| !p.is_empty() && p.len() <= 253)
}

fn valid_value(v: &str) -> bool {
    v.is_empty()
        || (v.len() <= 63
            && v.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            && v.starts_with(|c: char| c.is_ascii_alphanumeric())
            && v.ends_with(|c: char| c.is_ascii_alphanumeric()))
}

fn err(msg: String) -> SelectorError {
    SelectorError(format!("unable to parse requirement: {msg}"))
}

/// Split on commas that are not inside parentheses.
fn split_top(s: &str) -> Vec<String> {
    let mut out = vec![];
    let mut depth = 0;
    let mut cur = String::new();
    for c in s.chars() {
        match c {
            '(' => {
                depth += 1;
                cur.push(c);
            }
            ')' => {
                depth -= 1;
                cur.push(c);
            }
            ',' if depth == 0 => out.push(std::mem::take(&mut cur)),
            _ => cur.push(c),
        }
    }
    out.push(cur);
    out
}

fn parse_set(s: &str) -> Result<BTreeSet<String>, SelectorError> {
    let inner = s
        .trim()
        .strip_prefix('(')
        .and_then(|x| x.strip_suffix(')'))
        .ok_or_else(|| err(format!("found '{s}' expected: '('")))?;
    let vals: BTreeSet<String> = inner
        .split(',')
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
        .collect();
    for v in &vals {
        if !valid_value(v) {
            return Err(err(format!("invalid label value: \"{v}\"")));
        }
    }
    Ok(vals)
}

impl LabelSelector {
    pub fn parse(s: &str) -> Result<Self, SelectorError> {
        let mut reqs = vec![];
        if s.trim().is_empty() {
            return Ok(LabelSelector::default());
        }
        for part in split_top(s) {
            let p = part.trim();
            if p.is_empty() {
                return Err(err("found '', expected: identifier".into()));
            }
            let req = if let Some(k) = p.strip_prefix('!') {
                Requirement {
                    key: k.trim().to_string(),
                    op: Op::DoesNotExist,
                }
            } else if let Some((k, v)) = p.split_once("!=") {
                Requirement {
                    key: k.trim().to_string(),
                    op: Op::NotEq(v.trim().to_string()),
                }
            } else if let Some((k, v)) = p.split_once("==") {
                Requirement {
                    key: k.trim().to_string(),
                    op: Op::Eq(v.trim().to_string()),
                }
            } else if let Some((k, v)) = p.split_once('=') {
                Requirement {
                    key: k.trim().to_string(),
                    op: Op::Eq(v.trim().to_string()),
                }
            } else if let Some(idx) = p.find(" notin ") {
                Requirement {
                    key: p[..idx].trim().to_string(),
                    op: Op::NotIn(parse_set(&p[idx + 7..])?),
                }
            } else if let Some(idx) = p.find(" in ") {
                Requirement {
                    key: p[..idx].trim().to_string(),
                    op: Op::In(parse_set(&p[idx + 4..])?),
                }
            } else if p.contains(['(', ')', ' ', '<', '>']) {
                return Err(err(format!(
                    "found '{p}', expected: in, notin, =, ==, !=, gt, lt"
                )));
            } else {
                Requirement {
                    key: p.to_string(),
                    op: Op::Exists,
                }
            };
            if !valid_key(&req.key) {
                return Err(err(format!("invalid label key \"{}\"", req.key)));
            }
            if let Op::Eq(v) | Op::NotEq(v) = &req.op
                && !valid_value(v)
            {
                return Err(err(format!("invalid label value: \"{v}\"")));
            }
            reqs.push(req);
        }
        Ok(LabelSelector {
            reqs,
            nothing: false,
        })
    }

    /// From a `metav1.LabelSelector` object.
    pub fn from_json(v: &Value) -> Result<Self, SelectorError> {
        if v.is_null() {
            return Ok(LabelSelector {
                reqs: vec![],
                nothing: true,
            });
        }
        let mut reqs = vec![];
        if let Some(m) = v.get("matchLabels").and_then(Value::as_object) {
            for (k, val) in m {
                let val = val.as_str().unwrap_or_default().to_string();
                reqs.push(Requirement {
                    key: k.clone(),
                    op: Op::Eq(val),
                });
            }
        }
        if let Some(exprs) = v.get("matchExpressions").and_then(Value::as_array) {
            for e in exprs {
                let key = e
                    .get("key")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string();
                let values: BTreeSet<String> = e
                    .get("values")
                    .and_then(Value::as_array)
                    .map(|a| {
                        a.iter()
                            .filter_map(|x| x.as_str().map(str::to_string))
                            .collect()
                    })
                    .unwrap_or_default();
                let op = match e.get("operator").and_then(Value::as_str) {
                    Some("In") => Op::In(values),
                    Some("NotIn") => Op::NotIn(values),
                    Some("Exists") => Op::Exists,
                    Some("DoesNotExist") => Op::DoesNotExist,
                    other => {
                        return Err(SelectorError(format!(
                            "{:?} is not a valid label selector operator",
                            other.unwrap_or("")
                        )));
                    }
                };
                reqs.push(Requirement { key, op });
            }
        }
        Ok(LabelSelector {
            reqs,
            nothing: false,
        })
    }

    pub fn matches(&self, labels: Option<&Map<String, Value>>) -> bool {
        if self.nothing {
            return false;
        }
        let get = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        self.reqs.iter().all(|r| match &r.op {
            Op::Eq(v) => get(&r.key) == Some(v.as_str()),
            Op::NotEq(v) => get(&r.key) != Some(v.as_str()),
            Op::In(vs) => get(&r.key).is_some_and(|x| vs.contains(x)),
            Op::NotIn(vs) => get(&r.key).is_none_or(|x| !vs.contains(x)),
            Op::Exists => get(&r.key).is_some(),
            Op::DoesNotExist => get(&r.key).is_none(),
        })
    }

    pub fn matches_everything(&self) -> bool {
        !self.nothing && self.reqs.is_empty()
    }
}

impl std::fmt::Display for LabelSelector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let join = |s: &BTreeSet<String>| s.iter().cloned().collect::<Vec<_>>().join(",");
        let parts: Vec<String> = self
            .reqs
            .iter()
            .map(|r| match &r.op {
                Op::Eq(v) => format!("{}={v}", r.key),
                Op::NotEq(v) => format!("{}!={v}", r.key),
                Op::In(vs) => format!("{} in ({})", r.key, join(vs)),
                Op::NotIn(vs) => format!("{} notin ({})", r.key, join(vs)),
                Op::Exists => r.key.clone(),
                Op::DoesNotExist => format!("!{}", r.key),
            })
            .collect();
        write!(f, "{}", parts.join(","))
    }
}

/// A field selector: `field=value`, `field==value`, `field!=value`, ANDed.
#[derive(Debug, Clone, Default)]
pub struct FieldSelector {
    reqs: Vec<(String, bool, String)>,
}

const COMMON_FIELDS: &[&str] = &["metadata.name", "metadata.namespace"];

fn supported(group: &str, plural: &str) -> &'static [&'static str] {
    match (group, plural) {
        ("", "pods") => &[
            "spec.nodeName",
            "spec.restartPolicy",
            "spec.schedulerName",
            "spec.serviceAccountName",
            "spec.hostNetwork",
            "status.phase",
            "status.podIP",
            "status.podIPs",
            "status.nominatedNodeName",
        ],
        ("", "events") => &[
            "involvedObject.kind",
            "involvedObject.namespace",
            "involvedObject.name",
            "involvedObject.uid",
            "involvedObject.apiVersion",
            "involvedObject.resourceVersion",
            "involvedObject.fieldPath",
            "reason",
            "reportingComponent",
            "source",
            "type",
        ],
        ("events.k8s.io", "events") => &[
            "regarding.kind",
            "regarding.namespace",
            "regarding.name",
            "regarding.uid",
            "regarding.apiVersion",
            "regarding.resourceVersion",
            "regarding.fieldPath",
            "reason",
            "reportingController",
            "type",
        ],
        ("", "secrets") => &["type"],
        ("", "namespaces") => &["status.phase"],
        ("", "nodes") => &["spec.unschedulable"],
        _ => &[],
    }
}

fn unescape(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            if let Some(n) = chars.next() {
                out.push(n);
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Split on unescaped commas.
fn split_escaped(s: &str) -> Vec<String> {
    let mut out = vec![];
    let mut cur = String::new();
    let mut esc = false;
    for c in s.chars() {
        if esc {
            cur.push('\\');
            cur.push(c);
            esc = false;
        } else if c == '\\' {
            esc = true;
        } else if c == ',' {
            out.push(std::mem::take(&mut cur));
        } else {
            cur.push(c);
        }
    }
    out.push(cur);
    out
}

impl FieldSelector {
    pub fn parse(s: &str) -> Result<Self, SelectorError> {
        let mut reqs = vec![];
        if s.trim().is_empty() {
            return Ok(FieldSelector::default());
        }
        for part in split_escaped(s) {
            let p = part.trim();
            let (field, eq, value) = if let Some((f, v)) = p.split_once("!=") {
                (f, false, v)
            } else if let Some((f, v)) = p.split_once("==") {
                (f, true, v)
            } else if let Some((f, v)) = p.split_once('=') {
                (f, true, v)
            } else {
                return Err(SelectorError(format!(
                    "invalid selector: '{s}'; can't understand '{p}'"
                )));
            };
            reqs.push((field.trim().to_string(), eq, unescape(value.trim())));
        }
        Ok(FieldSelector { reqs })
    }

    pub fn is_empty(&self) -> bool {
        self.reqs.is_empty()
    }

    pub fn validate_for(&self, group: &str, plural: &str) -> Result<(), SelectorError> {
        for (f, _, _) in &self.reqs {
            if !COMMON_FIELDS.contains(&f.as_str())
                && !supported(group, plural).contains(&f.as_str())
            {
                if supported(group, plural).is_empty() {
                    return Err(SelectorError(format!(
                        "{f:?} is not a known field selector: only \"metadata.name\", \"metadata.namespace\""
                    )));
                }
                return Err(SelectorError(format!("field label not supported: {f}")));
            }
        }
        Ok(())
    }

    pub fn matches(&self, obj: &Value) -> bool {
        self.reqs.iter().all(|(field, eq, want)| {
            let path = if field == "source" {
                "source.component"
            } else {
                field.as_str()
            };
            let mut cur = Some(obj);
            for seg in path.split('.') {
                cur = cur.and_then(|c| c.get(seg));
            }
            let got = match cur {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Bool(b)) => b.to_string(),
                Some(Value::Number(n)) => n.to_string(),
                _ => String::new(),
            };
            (got == *want) == *eq
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn labels(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap_or_default()
    }

    #[test]
    fn label_selector_forms() {
        let l = labels(json!({"app": "db", "tier": "gold"}));
        for (sel, want) in [
            ("", true),
            ("app=db", true),
            ("app==db", true),
            ("app!=db", false),
            ("app in (db,web)", true),
            ("tier notin (gold)", false),
            ("app", true),
            ("!app", false),
            ("!missing", true),
            ("app=db,tier in (gold, silver)", true),
            ("app=db,tier=tin", false),
        ] {
            assert_eq!(
                LabelSelector::parse(sel).expect(sel).matches(Some(&l)),
                want,
                "{sel}"
            );
        }
        assert!(LabelSelector::parse("app in db").is_err());
        assert!(LabelSelector::parse("a b").is_err());
        assert!(LabelSelector::parse("app=db,").is_err());
    }

    #[test]
    fn from_metav1_selector() {
        let s = LabelSelector::from_json(&json!({"matchLabels": {"app": "db"}, "matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["tin"]}]}))
            .expect("selector");
        assert!(s.matches(Some(&labels(json!({"app": "db"})))));
        assert!(!s.matches(Some(&labels(json!({"app": "db", "tier": "tin"})))));
        assert_eq!(s.to_string(), "app=db,tier notin (tin)");
        assert!(
            LabelSelector::from_json(&json!({}))
                .expect("empty")
                .matches_everything()
        );
    }

    #[test]
    fn field_selectors() {
        let pod = json!({"metadata": {"name": "p"}, "status": {"phase": "Running"}, "spec": {"hostNetwork": false}});
        let f = FieldSelector::parse("status.phase=Running,metadata.name!=q").expect("parse");
        f.validate_for("", "pods").expect("supported");
        assert!(f.matches(&pod));
        assert!(
            FieldSelector::parse("spec.hostNetwork=false")
                .expect("p")
                .matches(&pod)
        );
        let e = FieldSelector::parse("data.k=v")
            .expect("p")
            .validate_for("", "configmaps")
            .expect_err("unsupported");
        assert_eq!(
            e.to_string(),
            r#""data.k" is not a known field selector: only "metadata.name", "metadata.namespace""#
        );
        let ev = json!({"involvedObject": {"name": "a,b"}, "source": {"component": "kubelet"}});
        assert!(
            FieldSelector::parse(r"involvedObject.name=a\,b,source=kubelet")
                .expect("p")
                .matches(&ev)
        );
    }
}
