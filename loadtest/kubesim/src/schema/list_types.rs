//! `x-kubernetes-list-type` invariants.

use super::*;

pub(super) fn list_types(s: &Node, v: &Value, path: &str, out: &mut Vec<Cause>) {
    if let Value::Object(m) = v {
        lt_object(s, m, path, out);
    }
}

pub(super) fn lt_object(s: &Node, m: &Map<String, Value>, path: &str, out: &mut Vec<Cause>) {
    if let Additional::Schema(ap) = &s.additional {
        for (k, v) in m {
            lt_value(ap, v, &key(path, k), out);
        }
    }
    for (k, v) in m {
        if let Some(p) = s.properties.get(k) {
            lt_value(p, v, &child(path, k), out);
        }
    }
}

pub(super) fn lt_value(s: &Node, v: &Value, path: &str, out: &mut Vec<Cause>) {
    match v {
        Value::Array(a) => lt_array(s, a, path, out),
        Value::Object(m) => lt_object(s, m, path, out),
        _ => {}
    }
}

/// A canonical rendering for duplicate detection; scalars and compounds never collide, and
/// 1 and 1.0 stay distinct, as with the apiserver's Go map keys.
pub(super) fn canonical(v: Option<&Value>) -> String {
    match v {
        None => "u".to_string(),
        Some(v @ (Value::Object(_) | Value::Array(_))) => format!("c{v}"),
        Some(v) => format!("s{v}"),
    }
}

/// Indexes of second occurrences (later repeats are not reported, as in the apiserver).
pub(super) fn duplicate_indexes(keys: &[String]) -> Vec<usize> {
    if keys.len() <= 1 {
        return Vec::new();
    }
    let mut seen: HashMap<&str, u32> = HashMap::new();
    let mut out = Vec::new();
    for (i, k) in keys.iter().enumerate() {
        let n = seen.entry(k.as_str()).or_insert(0);
        *n += 1;
        if *n == 2 {
            out.push(i);
        }
    }
    out
}

pub(super) fn lt_array(s: &Node, a: &[Value], path: &str, out: &mut Vec<Cause>) {
    match s.list_type.as_deref() {
        Some("set") => {
            let keys: Vec<String> = a.iter().map(|x| canonical(Some(x))).collect();
            for i in duplicate_indexes(&keys) {
                out.push(duplicate(&index(path, i), &go_value(&a[i])));
            }
        }
        Some("map") => lt_map(s, a, path, out),
        _ => {}
    }
    if let Some(items) = s.items.as_deref() {
        for (i, x) in a.iter().enumerate() {
            lt_value(items, x, &index(path, i), out);
        }
    }
}

pub(super) fn lt_map(s: &Node, a: &[Value], path: &str, out: &mut Vec<Cause>) {
    for (i, x) in a.iter().enumerate() {
        if !x.is_null() && !x.is_object() {
            out.push(invalid(
                &index(path, i),
                &go_value(x),
                "must be an object for an array of list-type map",
            ));
            return;
        }
    }
    if let [key_field] = s.list_map_keys.as_slice() {
        let keys: Vec<Option<&Value>> = a.iter().map(|x| x.get(key_field)).collect();
        let canon: Vec<String> = keys.iter().map(|k| canonical(*k)).collect();
        for i in duplicate_indexes(&canon) {
            let mut m = Map::new();
            if let Some(k) = keys[i] {
                m.insert(key_field.clone(), k.clone());
            }
            out.push(duplicate(&index(path, i), &go_value(&Value::Object(m))));
        }
    } else {
        let keys: Vec<Value> = a
            .iter()
            .map(|x| {
                let mut m = Map::new();
                for kf in &s.list_map_keys {
                    if let Some(v) = x.get(kf) {
                        m.insert(kf.clone(), v.clone());
                    }
                }
                Value::Object(m)
            })
            .collect();
        let canon: Vec<String> = keys.iter().map(|k| canonical(Some(k))).collect();
        for i in duplicate_indexes(&canon) {
            out.push(duplicate(&index(path, i), &go_value(&keys[i])));
        }
    }
}
