//! `x-kubernetes-validations`: the CEL view of a value and the rules run over it.

use super::*;

/// The CEL view of a value typed by its schema: objects with properties expose only those
/// (plus apiVersion, kind and metadata.name/generateName on resources), `number` fields are
/// doubles even when written as integers, and untyped preserved data only supports equality.
pub(super) fn to_cel(v: &Value, s: Option<&Node>, resource: bool) -> cel::Val {
    use cel::Val;
    let Some(s) = s else {
        return json_to_cel(v);
    };
    let resource = resource || s.embedded;
    match v {
        Value::Null => Val::Null,
        _ if s.int_or_string => json_to_cel(v),
        _ if s.ty.is_none() && s.preserve_unknown && s.properties.is_empty() && !resource => {
            Val::Opaque(Rc::new(v.clone()))
        }
        Value::Object(m) => {
            let mut entries = Vec::new();
            if resource || !s.properties.is_empty() {
                for (k, x) in m {
                    if resource && (k == "apiVersion" || k == "kind") {
                        entries.push((cel::str_val(k), json_to_cel(x)));
                    } else if resource && k == "metadata" {
                        let meta: Vec<(Val, Val)> = ["name", "generateName"]
                            .into_iter()
                            .filter_map(|f| {
                                x.get(f)
                                    .and_then(Value::as_str)
                                    .map(|s| (cel::str_val(f), cel::str_val(s)))
                            })
                            .collect();
                        entries.push((cel::str_val(k), Val::Map(Rc::new(meta))));
                    } else if let Some(p) = s.properties.get(k) {
                        entries.push((cel::str_val(k), to_cel(x, Some(p), false)));
                    }
                }
            } else if let Additional::Schema(ap) = &s.additional {
                for (k, x) in m {
                    entries.push((cel::str_val(k), to_cel(x, Some(ap), false)));
                }
            } else if s.preserve_unknown || matches!(s.additional, Additional::Bool(true)) {
                return json_to_cel(v);
            }
            Val::Map(Rc::new(entries))
        }
        Value::Array(a) => {
            let items = s.items.as_deref();
            Val::List(Rc::new(a.iter().map(|x| to_cel(x, items, false)).collect()))
        }
        Value::Number(n) => match s.ty.as_deref() {
            Some("number") => Val::Double(n.as_f64().unwrap_or(f64::NAN)),
            _ => json_to_cel(v),
        },
        _ => json_to_cel(v),
    }
}

/// Schema-less conversion: integers that fit int64 are ints, other numbers doubles.
pub(super) fn json_to_cel(v: &Value) -> cel::Val {
    use cel::Val;
    match v {
        Value::Null => Val::Null,
        Value::Bool(b) => Val::Bool(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => Val::Int(i),
            None => Val::Double(n.as_f64().unwrap_or(f64::NAN)),
        },
        Value::String(s) => cel::str_val(s),
        Value::Array(a) => Val::List(Rc::new(a.iter().map(json_to_cel).collect())),
        Value::Object(m) => Val::Map(Rc::new(
            m.iter()
                .map(|(k, x)| (cel::str_val(k), json_to_cel(x)))
                .collect(),
        )),
    }
}

/// Runs rules top-down. Only non-null values are validated, and transition rules need a
/// correlated old value (same property or map key, or same list-map keys).
pub(super) fn cel_validate(
    s: &Node,
    v: &Value,
    old: Option<&Value>,
    path: &str,
    resource: bool,
    out: &mut Vec<Cause>,
) {
    if v.is_null() || !s.has_rules {
        return;
    }
    let old = old.filter(|o| !o.is_null());
    if !s.rules.is_empty() {
        eval_rules(s, v, old, path, resource, out);
    }
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                if let Some(p) = s.properties.get(k) {
                    cel_validate(p, x, old_child(old, k), &child(path, k), false, out);
                } else if let Additional::Schema(ap) = &s.additional {
                    cel_validate(ap, x, old_child(old, k), &key(path, k), false, out);
                }
            }
        }
        Value::Array(a) => {
            if let Some(items) = s.items.as_deref() {
                for (i, x) in a.iter().enumerate() {
                    cel_validate(items, x, old_item(s, old, x), &index(path, i), false, out);
                }
            }
        }
        _ => {}
    }
}

pub(super) fn eval_rules(
    s: &Node,
    v: &Value,
    old: Option<&Value>,
    path: &str,
    resource: bool,
    out: &mut Vec<Cause>,
) {
    // The apiserver reports the schema node's type as the "value" of a failed rule.
    let type_name = go_quote(s.ty.as_deref().unwrap_or(""));
    let self_val = to_cel(v, Some(s), resource);
    let old_val = old.map(|o| to_cel(o, Some(s), resource));
    let unchanged = old.is_some_and(|o| o == v);
    for rule in &s.rules {
        if rule.uses_old_self && old_val.is_none() {
            continue;
        }
        let mut env = cel::Env::new(&self_val, old_val.as_ref());
        match cel::eval(&rule.expr, &mut env) {
            Ok(cel::Val::Bool(true)) => {}
            Err(e) => {
                let detail = if e.starts_with(cel::NO_OVERLOAD) {
                    format!(
                        "'{e}': call arguments did not match a supported operator, function or macro signature for rule: {}",
                        rule.error_string()
                    )
                } else {
                    format!("{e} evaluating rule: {}", rule.error_string())
                };
                out.push(invalid(path, &type_name, &detail));
            }
            Ok(_) => {
                // Ratcheting: a rule that does not look at oldSelf may keep failing on an
                // unchanged value.
                if !rule.uses_old_self && unchanged {
                    continue;
                }
                let field = match &rule.field_path {
                    Some(fp) => child(path, fp),
                    None => path.to_string(),
                };
                let detail = rule
                    .message_expression
                    .as_ref()
                    .and_then(|me| match cel::eval(me, &mut env) {
                        Ok(cel::Val::Str(m))
                            if !m.trim().is_empty() && !m.contains(['\n', '\r']) =>
                        {
                            Some(m.to_string())
                        }
                        _ => None,
                    })
                    .unwrap_or_else(|| rule.message_or_default());
                out.push(match rule.reason {
                    Some(FORBIDDEN) => forbidden(&field, &detail),
                    Some(REQUIRED) => required(&field, &detail),
                    Some(DUPLICATE) => duplicate(&field, &type_name),
                    _ => invalid(&field, &type_name, &detail),
                });
            }
        }
    }
}
