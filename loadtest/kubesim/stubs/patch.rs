//! The four patch types of the Kubernetes API: JSON patch (RFC 6902), JSON merge patch
//! (RFC 7386), strategic merge patch for built-in kinds, and server-side apply (without
//! managedFields: the applied configuration is merged into the live object).

use serde_json::{Map, Value};

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct PatchError(String);

/// List fields merged element-wise by a key, by field name (the Go types' patchMergeKey).
const MERGE_KEYS: &[(&str, &str)] = &[
    ("containers", "name"),
    ("initContainers", "name"),
    ("ephemeralContainers", "name"),
    ("volumes", "name"),
    ("env", "name"),
    ("imagePullSecrets", "name"),
    ("volumeMounts", "mountPath"),
    ("volumeDevices", "devicePath"),
    ("conditions", "type"),
    ("ownerReferences", "uid"),
    ("hostAliases", "ip"),
    ("topologySpreadConstraints", "topologyKey"),
];

/// Primitive lists with patch strategy `merge` (set union).
const MERGE_PRIMITIVE_LISTS: &[&str] = &["finalizers"];

fn merge_key(field: &str, items: &[Value]) -> Option<&'static str> {
    if field == "ports" {
        // Container ports merge by containerPort, Service ports by port.
        let container = items.iter().any(|i| i.get("containerPort").is_some());
        return Some(if container { "containerPort" } else { "port" });
    }
    MERGE_KEYS
        .iter()
        .find(|(f, _)| *f == field)
        .map(|(_, k)| *k)
}

pub fn json_patch(t: &Value, p: &Value) -> Result<Value, PatchError> {
    let ops: json_patch::Patch = serde_json::from_value(p.clone())
        .map_err(|e| PatchError(format!("invalid JSON patch: {e}")))?;
    let mut t = t.clone();
    json_patch::patch(&mut t, &ops).map_err(|e| PatchError(e.to_string()))?;
    Ok(t)
}

pub fn merge_patch(t: &Value, p: &Value) -> Result<Value, PatchError> {
    let mut t = t.clone();
    json_patch::merge(&mut t, p);
    Ok(t)
}

pub fn strategic_merge_patch(t: &Value, p: &Value) -> Result<Value, PatchError> {
    if !p.is_object() {
        return Err(PatchError(
            "strategic merge patch must be a JSON object".into(),
        ));
    }
    merge_map_value(t, p, true)
}

/// Server-side apply without managed fields: the applied configuration merged into the live
/// object (maps recursively, keyed lists by key, other lists replaced).
pub fn server_side_apply(live: Option<&Value>, applied: &Value) -> Result<Value, PatchError> {
    match live {
        None => Ok(applied.clone()),
        Some(l) => merge_map_value(l, applied, false),
    }
}

fn merge_map_value(target: &Value, patch: &Value, strategic: bool) -> Result<Value, PatchError> {
    let Some(pm) = patch.as_object() else {
        return Ok(patch.clone());
    };
    match pm.get("$patch").and_then(Value::as_str) {
        Some("replace") if strategic => {
            let mut out = pm.clone();
            out.remove("$patch");
            return Ok(Value::Object(strip_directives(out)));
        }
        Some("delete") if strategic => return Ok(Value::Null),
        Some(other) if strategic && other != "merge" => {
            return Err(PatchError(format!("unknown patch type: {other}")));
        }
        _ => {}
    }
    let mut out: Map<String, Value> = target.as_object().cloned().unwrap_or_default();
    let retain: Option<Vec<String>> = pm.get("$retainKeys").and_then(Value::as_array).map(|a| {
        a.iter()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect()
    });
    for (k, v) in pm {
        if k.starts_with('$') {
            if strategic
                && let Some(field) = k.strip_prefix("$deleteFromPrimitiveList/")
                && let (Some(Value::Array(cur)), Some(del)) = (out.get_mut(field), v.as_array())
            {
                cur.retain(|x| !del.contains(x));
            }
            continue;
        }
        if v.is_null() {
            out.remove(k);
            continue;
        }
        let merged = match (out.get(k), v) {
            (Some(cur @ Value::Object(_)), Value::Object(_)) => merge_map_value(cur, v, strategic)?,
            (Some(Value::Array(cur)), Value::Array(items)) => {
                let order = if strategic {
                    pm.get(&format!("$setElementOrder/{k}"))
                        .and_then(Value::as_array)
                } else {
                    None
                };
                merge_list(k, cur, items, order, strategic)?
            }
            (None, Value::Object(m)) => Value::Object(strip_directives(m.clone())),
            (None, Value::Array(items)) => merge_list(k, &[], items, None, strategic)?,
            _ => v.clone(),
        };
        if merged.is_null() {
            out.remove(k);
        } else {
            out.insert(k.clone(), merged);
        }
    }
    if let Some(keep) = retain {
        out.retain(|k, _| keep.contains(k));
    }
    Ok(Value::Object(out))
}

fn strip_directives(mut m: Map<String, Value>) -> Map<String, Value> {
    m.retain(|k, _| !k.starts_with('$'));
    for v in m.values_mut() {
        match v {
            Value::Object(inner) => *v = Value::Object(strip_directives(std::mem::take(inner))),
            Value::Array(items) => {
                items.retain(|i| i.get("$patch").and_then(Value::as_str) != Some("delete"));
                for i in items.iter_mut() {
                    if let Value::Object(inner) = i {
                        *i = Value::Object(strip_directives(std::mem::take(inner)));
                    }
                }
            }
            _ => {}
        }
    }
    m
}

fn merge_list(
    field: &str,
    cur: &[Value],
    items: &[Value],
    order: Option<&Vec<Value>>,
    strategic: bool,
) -> Result<Value, PatchError> {
    if strategic
        && items
            .iter()
            .any(|i| i.get("$patch").and_then(Value::as_str) == Some("replace"))
    {
        let kept: Vec<Value> = items
            .iter()
            .filter(|i| i.get("$patch").is_none())
            .cloned()
            .collect();
        return Ok(Value::Array(kept));
    }
    if items.iter().all(|i| !i.is_object()) && cur.iter().all(|i| !i.is_object()) {
        if strategic && MERGE_PRIMITIVE_LISTS.contains(&field) {
            let mut out = cur.to_vec();
            for i in items {
                if !out.contains(i) {
                    out.push(i.clone());
                }
            }
            return Ok(Value::Array(reorder(out, order, None)));
        }
        return Ok(Value::Array(items.to_vec()));
    }
    let all: Vec<Value> = cur.iter().chain(items.iter()).cloned().collect();
    let Some(key) = merge_key(field, &all) else {
        return Ok(Value::Array(
            items
                .iter()
                .map(|i| {
                    i.as_object()
                        .map_or(i.clone(), |m| Value::Object(strip_directives(m.clone())))
                })
                .collect(),
        ));
    };
    let mut out: Vec<Value> = cur.to_vec();
    for item in items {
        let id = item.get(key);
        let pos = id.and_then(|id| out.iter().position(|o| o.get(key) == Some(id)));
        let delete = strategic && item.get("$patch").and_then(Value::as_str) == Some("delete");
        match (pos, delete) {
            (Some(p), true) => {
                out.remove(p);
            }
            (None, true) => {}
            (Some(p), false) => out[p] = merge_map_value(&out[p], item, strategic)?,
            (None, false) => out.push(
                item.as_object()
                    .map_or(item.clone(), |m| Value::Object(strip_directives(m.clone()))),
            ),
        }
    }
    Ok(Value::Array(reorder(out, order, Some(key))))
}

/// Order per `$setElementOrder`: listed elements first in that order, the rest after in their
/// current order.
fn reorder(items: Vec<Value>, order: Option<&Vec<Value>>, key: Option<&str>) -> Vec<Value> {
    let Some(order) = order else { return items };
    let id = |v: &Value| -> Value {
        match key {
            Some(k) => v.get(k).cloned().unwrap_or(Value::Null),
            None => v.clone(),
        }
    };
    let wanted: Vec<Value> = order.iter().map(id).collect();
    let mut rest = items;
    let mut out = Vec::with_capacity(rest.len());
    for w in &wanted {
        if let Some(p) = rest.iter().position(|i| &id(i) == w) {
            out.push(rest.remove(p));
        }
    }
    out.extend(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn labels_and_null_deletion() {
        let o = json!({"metadata": {"labels": {"a": "1", "b": "2"}}});
        let p = strategic_merge_patch(
            &o,
            &json!({"metadata": {"labels": {"sts-role": "writer", "a": null}}}),
        )
        .expect("patch");
        assert_eq!(
            p,
            json!({"metadata": {"labels": {"b": "2", "sts-role": "writer"}}})
        );
    }

    #[test]
    fn status_condition_merges_by_type() {
        let o = json!({"status": {"conditions": [
            {"type": "Initialized", "status": "True"}, {"type": "Ready", "status": "True", "reason": "x"}, {"type": "ContainersReady", "status": "True"}]}});
        let p = strategic_merge_patch(
            &o,
            &json!({"status": {"conditions": [{"type": "Ready", "status": "False"}]}}),
        )
        .expect("patch");
        assert_eq!(p["status"]["conditions"][0]["type"], "Initialized");
        assert_eq!(
            p["status"]["conditions"][1],
            json!({"type": "Ready", "status": "False", "reason": "x"})
        );
        assert_eq!(p["status"]["conditions"].as_array().map(Vec::len), Some(3));
    }

    #[test]
    fn kubectl_apply_three_way_patch() {
        let live = json!({"spec": {"template": {"spec": {"containers": [
            {"name": "a", "image": "a:1", "args": ["x"]}, {"name": "b", "image": "b:1"}]}}}});
        let patch = json!({"spec": {"template": {"spec": {
            "$setElementOrder/containers": [{"name": "b"}, {"name": "a"}],
            "containers": [{"name": "a", "image": "a:2"}]}}}});
        let p = strategic_merge_patch(&live, &patch).expect("patch");
        let cs = &p["spec"]["template"]["spec"]["containers"];
        assert_eq!(cs[0]["name"], "b");
        assert_eq!(cs[1], json!({"name": "a", "image": "a:2", "args": ["x"]}));
        assert!(p.to_string().find('$').is_none());
        let del = strategic_merge_patch(&live, &json!({"spec": {"template": {"spec": {"containers": [{"name": "b", "$patch": "delete"}]}}}})).expect("patch");
        assert_eq!(
            del["spec"]["template"]["spec"]["containers"]
                .as_array()
                .map(Vec::len),
            Some(1)
        );
    }

    #[test]
    fn finalizers_union_retain_keys_and_primitive_delete() {
        let o = json!({"metadata": {"finalizers": ["a"]}, "spec": {"x": 1, "y": 2}});
        let p =
            strategic_merge_patch(&o, &json!({"metadata": {"finalizers": ["b"]}})).expect("patch");
        assert_eq!(p["metadata"]["finalizers"], json!(["a", "b"]));
        let p = strategic_merge_patch(&o, &json!({"spec": {"$retainKeys": ["y", "z"], "z": 3}}))
            .expect("patch");
        assert_eq!(p["spec"], json!({"y": 2, "z": 3}));
        let p = strategic_merge_patch(
            &o,
            &json!({"metadata": {"$deleteFromPrimitiveList/finalizers": ["a"]}}),
        )
        .expect("patch");
        assert_eq!(p["metadata"]["finalizers"], json!([]));
    }

    #[test]
    fn json_and_merge_patches() {
        let o = json!({"spec": {"holder": "a", "n": 0}});
        let p = json_patch(&o, &json!([{"op": "test", "path": "/spec/holder", "value": "a"}, {"op": "replace", "path": "/spec/n", "value": 1}])).expect("patch");
        assert_eq!(p["spec"]["n"], 1);
        assert!(
            json_patch(
                &o,
                &json!([{"op": "test", "path": "/spec/holder", "value": "z"}])
            )
            .is_err()
        );
        let p = merge_patch(&o, &json!({"spec": {"holder": null}})).expect("merge");
        assert_eq!(p, json!({"spec": {"n": 0}}));
    }

    #[test]
    fn server_side_apply_merges() {
        let live = json!({"metadata": {"labels": {"a": "1"}}, "spec": {"containers": [{"name": "c", "image": "i:1", "args": ["x"]}]}});
        let applied = json!({"metadata": {"labels": {"b": "2"}}, "spec": {"containers": [{"name": "c", "args": ["y"]}]}});
        let p = server_side_apply(Some(&live), &applied).expect("apply");
        assert_eq!(p["metadata"]["labels"], json!({"a": "1", "b": "2"}));
        assert_eq!(
            p["spec"]["containers"][0],
            json!({"name": "c", "image": "i:1", "args": ["y"]})
        );
        assert_eq!(server_side_apply(None, &applied).expect("create"), applied);
    }
}
