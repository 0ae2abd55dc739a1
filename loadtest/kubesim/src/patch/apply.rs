//! Server-side apply: merges without managedFields.

use super::*;

pub(super) fn apply_map(mut live: Object, applied: &Object) -> Result<Object, PatchError> {
    for (key, value) in applied {
        match value {
            Value::Null => {
                live.remove(key);
            }
            Value::Object(applied) => {
                let base = match live.remove(key) {
                    Some(Value::Object(map)) => map,
                    _ => Object::new(),
                };
                live.insert(key.clone(), Value::Object(apply_map(base, applied)?));
            }
            Value::Array(applied) => {
                let base = match live.remove(key) {
                    Some(Value::Array(list)) => list,
                    _ => Vec::new(),
                };
                live.insert(key.clone(), Value::Array(apply_list(key, base, applied)?));
            }
            scalar => {
                live.insert(key.clone(), scalar.clone());
            }
        }
    }
    Ok(live)
}

/// Merges an associative list or set the way structured-merge-diff orders it: live-only
/// elements keep their place, shared and new elements follow the applied order, and new
/// elements are placed after the shared one that precedes them in the applied list.
pub(super) fn apply_list(
    field: &str,
    live: Vec<Value>,
    applied: &[Value],
) -> Result<Vec<Value>, PatchError> {
    let kind = list_kind(field, &[&live, applied]);
    let key = match kind {
        ListKind::Atomic => return applied.iter().map(fresh_applied).collect(),
        ListKind::Set => {
            ensure_primitives(field, applied)?;
            None
        }
        ListKind::Keyed(key) => Some(key),
    };

    let mut applied_ids: Vec<Value> = Vec::with_capacity(applied.len());
    for item in applied {
        let id = match key {
            Some(key) => {
                if !item.is_object() {
                    return Err(not_an_object_element(field, item));
                }
                merge_key_value(item, key)?;
                apply_identity(field, item, Some(key)).unwrap_or_default()
            }
            None => item.clone(),
        };
        if applied_ids.iter().any(|seen| same_id(seen, &id)) {
            return Err(PatchError::DuplicateListEntry {
                field: field.to_owned(),
                id: id.to_string(),
            });
        }
        applied_ids.push(id);
    }
    // For each live element, the applied element with the same identity. Live elements without
    // the key cannot be matched and stay as they are.
    let live_match: Vec<Option<usize>> = live
        .iter()
        .map(|item| {
            apply_identity(field, item, key)
                .and_then(|id| applied_ids.iter().position(|applied| same_id(applied, &id)))
        })
        .collect();
    let first_live: Vec<Option<usize>> = (0..applied.len())
        .map(|a| live_match.iter().position(|m| *m == Some(a)))
        .collect();
    let mut shared = (0..applied.len()).filter(|a| first_live[*a].is_some());
    let mut next_shared = shared.next();

    let mut live: Vec<Option<Value>> = live.into_iter().map(Some).collect();
    let mut merged = vec![false; applied.len()];
    let mut out = Vec::with_capacity(live.len() + applied.len());
    let (mut l, mut a) = (0, 0);
    while l < live.len() || a < applied.len() {
        let step = (l, a);
        if l < live.len() && a < applied.len() {
            if live_match[l] == Some(a) {
                let base = first_live[a].and_then(|i| live[i].take());
                out.push(apply_element(key, base, &applied[a])?);
                merged[a] = true;
                l += 1;
                a += 1;
                next_shared = shared.next();
                continue;
            }
            if let Some(m) = live_match[l]
                && next_shared.is_some_and(|s| s != m)
            {
                // A shared element whose turn in the applied order has not come yet.
                l += 1;
                continue;
            }
        }
        if l < live.len() {
            match live_match[l] {
                None => {
                    out.extend(live[l].take());
                    l += 1;
                    continue;
                }
                // Already merged with its applied element; structured-merge-diff then goes
                // on to the next applied element in the same step.
                Some(m) if merged[m] => l += 1,
                Some(_) => {}
            }
        }
        if a < applied.len() {
            let base = first_live[a].and_then(|i| live[i].take());
            out.push(apply_element(key, base, &applied[a])?);
            merged[a] = true;
            if next_shared == Some(a) {
                next_shared = shared.next();
            }
            a += 1;
        }
        if (l, a) == step {
            // Unreachable by construction; guarantees termination all the same.
            out.extend(live[l].take());
            l += 1;
        }
    }
    Ok(out)
}

/// Server-side apply keys some lists on more fields than strategic merge does (the Go types'
/// `listMapKey`s): (field, extra key, its default when absent).
pub(super) const APPLY_EXTRA_KEYS: &[(&str, &str, Option<&str>)] = &[
    ("ports", "protocol", Some("TCP")),
    ("topologySpreadConstraints", "whenUnsatisfiable", None),
];

/// What server-side apply matches a list element on.
pub(super) fn apply_identity(field: &str, item: &Value, key: Option<&str>) -> Option<Value> {
    let id = identity(item, key)?.clone();
    let Some((_, extra, default)) = APPLY_EXTRA_KEYS.iter().find(|(f, _, _)| *f == field) else {
        return Some(id);
    };
    let extra = item
        .get(*extra)
        .cloned()
        .or_else(|| default.map(Value::from))
        .unwrap_or_default();
    Some(Value::Array(vec![id, extra]))
}

pub(super) fn same_id(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Array(a), Value::Array(b)) => {
            a.len() == b.len() && a.iter().zip(b).all(|(x, y)| same(x, y))
        }
        _ => same(a, b),
    }
}

pub(super) fn apply_element(
    key: Option<&str>,
    live: Option<Value>,
    applied: &Value,
) -> Result<Value, PatchError> {
    match (key, live, applied) {
        (Some(_), Some(Value::Object(live)), Value::Object(applied)) => {
            Ok(Value::Object(apply_map(live, applied)?))
        }
        _ => fresh_applied(applied),
    }
}

/// An applied value with nothing live under it: its nulls mean "absent".
pub(super) fn fresh_applied(value: &Value) -> Result<Value, PatchError> {
    Ok(match value {
        Value::Object(map) => Value::Object(apply_map(Object::new(), map)?),
        Value::Array(list) => {
            Value::Array(list.iter().map(fresh_applied).collect::<Result<_, _>>()?)
        }
        scalar => scalar.clone(),
    })
}
