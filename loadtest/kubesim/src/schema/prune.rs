//! Defaulting and pruning.

use super::*;

pub(super) fn default_value(x: &mut Value, s: &Node, root: bool) {
    match x {
        Value::Object(m) => {
            for (k, prop) in &s.properties {
                if root && is_meta(k) {
                    continue;
                }
                let Some(d) = &prop.default else { continue };
                let missing = match m.get(k) {
                    None => true,
                    Some(Value::Null) => !prop.nullable,
                    Some(_) => false,
                };
                if missing {
                    m.insert(k.clone(), d.clone());
                }
            }
            for (k, v) in m.iter_mut() {
                if root && is_meta(k) {
                    continue;
                }
                if let Some(prop) = s.properties.get(k) {
                    default_value(v, prop, false);
                } else if let Additional::Schema(ap) = &s.additional {
                    if v.is_null()
                        && !ap.nullable
                        && let Some(d) = &ap.default
                    {
                        *v = d.clone();
                    }
                    default_value(v, ap, false);
                }
            }
        }
        Value::Array(a) => {
            if let Some(items) = s.items.as_deref() {
                for v in a.iter_mut() {
                    if v.is_null()
                        && !items.nullable
                        && let Some(d) = &items.default
                    {
                        *v = d.clone();
                    }
                    default_value(v, items, false);
                }
            }
        }
        _ => {}
    }
}

pub(super) fn field_schema<'a>(s: Option<&'a Node>, k: &str) -> Option<&'a Node> {
    let s = s?;
    if let Some(p) = s.properties.get(k) {
        return Some(p);
    }
    match &s.additional {
        Additional::Schema(ap) => Some(ap),
        _ => None,
    }
}

pub(super) fn prune_nulls(x: &mut Value, s: Option<&Node>, root: bool) {
    match x {
        Value::Object(m) => {
            m.retain(|k, v| {
                if root && is_meta(k) {
                    return true;
                }
                let dropped = v.is_null()
                    && field_schema(s, k).is_some_and(|f| !f.nullable && f.default.is_none());
                !dropped
            });
            for (k, v) in m.iter_mut() {
                if root && is_meta(k) {
                    continue;
                }
                prune_nulls(v, field_schema(s, k), false);
            }
        }
        Value::Array(a) => {
            let items = s.and_then(|s| s.items.as_deref());
            for v in a.iter_mut() {
                prune_nulls(v, items, false);
            }
        }
        _ => {}
    }
}

/// Appends `.k` to the path and returns the length to truncate back to.
pub(super) fn push_key(path: &mut String, k: &str) -> usize {
    let len = path.len();
    if !path.is_empty() {
        path.push('.');
    }
    path.push_str(k);
    len
}

pub(super) fn prune_value(
    x: &mut Value,
    s: Option<&Node>,
    root: bool,
    path: &mut String,
    found: &mut Vec<String>,
) {
    if let Some(s) = s
        && s.preserve_unknown
    {
        skip_prune(x, s, root, path, found);
        return;
    }
    match x {
        Value::Object(m) => {
            let Some(s) = s else {
                for k in m.keys() {
                    let len = push_key(path, k);
                    found.push(path.clone());
                    path.truncate(len);
                }
                m.clear();
                return;
            };
            let embedded = root || s.embedded;
            let mut unknown = Vec::new();
            for (k, v) in m.iter_mut() {
                if embedded && is_meta(k) {
                    continue;
                }
                let len = push_key(path, k);
                if let Some(p) = s.properties.get(k) {
                    prune_value(v, Some(p), false, path, found);
                } else if let Some(ap) = s.additional.for_prune() {
                    prune_value(v, ap, false, path, found);
                } else {
                    if !is_meta(k) || len > 0 {
                        found.push(path.clone());
                    }
                    unknown.push(k.clone());
                }
                path.truncate(len);
            }
            for k in unknown {
                m.remove(&k);
            }
        }
        Value::Array(a) => {
            let items = s.and_then(|s| s.items.as_deref());
            for (i, v) in a.iter_mut().enumerate() {
                let len = path.len();
                let _ = write!(path, "[{i}]");
                prune_value(v, items, false, path, found);
                path.truncate(len);
            }
        }
        _ => {}
    }
}

/// Pruning under `x-kubernetes-preserve-unknown-fields`: unknown fields stay, declared ones are
/// still pruned by their own schemas.
pub(super) fn skip_prune(
    x: &mut Value,
    s: &Node,
    root: bool,
    path: &mut String,
    found: &mut Vec<String>,
) {
    match x {
        Value::Object(m) => {
            let embedded = root || s.embedded;
            for (k, v) in m.iter_mut() {
                if embedded && is_meta(k) {
                    continue;
                }
                let len = push_key(path, k);
                if let Some(p) = s.properties.get(k) {
                    prune_value(v, Some(p), false, path, found);
                } else if let Some(ap) = s.additional.for_prune() {
                    prune_value(v, ap, false, path, found);
                }
                path.truncate(len);
            }
        }
        Value::Array(a) => {
            if let Some(items) = s.items.as_deref() {
                for (i, v) in a.iter_mut().enumerate() {
                    let len = path.len();
                    let _ = write!(path, "[{i}]");
                    skip_prune(v, items, false, path, found);
                    path.truncate(len);
                }
            }
        }
        _ => {}
    }
}
