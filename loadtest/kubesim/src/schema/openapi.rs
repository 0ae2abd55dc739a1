//! OpenAPI validation (kube-openapi's SchemaValidator as the apiserver drives it).

use super::*;

pub(super) fn old_child<'a>(old: Option<&'a Value>, k: &str) -> Option<&'a Value> {
    old?.as_object()?.get(k)
}

/// The old item an array item correlates with: only list-type maps correlate, by their keys.
pub(super) fn old_item<'a>(s: &Node, old: Option<&'a Value>, item: &Value) -> Option<&'a Value> {
    if s.list_type.as_deref() != Some("map") {
        return None;
    }
    let item = item.as_object()?;
    old?.as_array()?.iter().find(|o| {
        o.as_object()
            .is_some_and(|om| s.list_map_keys.iter().all(|k| om.get(k) == item.get(k)))
    })
}

/// Validates one node; when it has a correlated old value equal to the new one, its errors are
/// dropped (ratcheting turns them into warnings, which this simulator does not surface).
pub(super) fn openapi(s: &Node, v: &Value, old: Option<&Value>, path: &str, out: &mut Vec<Cause>) {
    let start = out.len();
    openapi_node(s, v, old, path, out);
    if out.len() > start && old.is_some_and(|o| o == v) {
        out.truncate(start);
    }
}

pub(super) fn schema_types(s: &Node) -> Vec<&str> {
    if s.int_or_string {
        vec!["integer", "string"]
    } else {
        s.ty.as_deref().into_iter().collect()
    }
}

pub(super) fn openapi_node(
    s: &Node,
    v: &Value,
    old: Option<&Value>,
    path: &str,
    out: &mut Vec<Cause>,
) {
    if v.is_null() {
        let types = schema_types(s);
        if !types.is_empty() && !s.nullable {
            out.push(type_error(path, &types.join(","), "null"));
        }
        enum_check(s, v, path, out);
        return;
    }
    type_check(s, v, path, out);
    composites(s, v, path, out);
    if let Value::String(st) = v {
        string_checks(s, st, path, out);
        format_check(s, st, path, out);
    }
    if let Value::Number(n) = v {
        number_checks(s, n, path, out);
    }
    if let Value::Array(a) = v {
        array_checks(s, a, old, path, out);
    }
    enum_check(s, v, path, out);
    if let Value::Object(m) = v {
        object_checks(s, m, old, path, out);
    }
}

pub(super) fn type_error(path: &str, expected: &str, actual: &str) -> Cause {
    let q = go_quote(actual);
    type_invalid(
        path,
        &q,
        &format!("{path} in body must be of type {expected}: {q}"),
    )
}

/// kube-openapi's typeValidator, quirks included: a JSON float that is integral passes as an
/// integer, and with a string `format` the check keys on the Go kind of the value.
pub(super) fn type_check(s: &Node, v: &Value, path: &str, out: &mut Vec<Cause>) {
    let types = schema_types(s);
    if types.is_empty() && s.format.is_none() {
        return;
    }
    let (actual, actual_format) = go_kind(v);
    let has = |t: &str| types.contains(&t);
    let float_int = actual == "number" && has("integer") && v.as_f64().is_some_and(is_json_integer);
    let int_float = actual == "integer" && has("number");
    let string_or_array = v.is_string() || v.is_array();
    if let Some(f) = &s.format {
        if !(string_or_array || has(actual) || actual_format == f || float_int || int_float) {
            out.push(type_error(path, f, actual_format));
            return;
        }
        if !(has("number") || has("integer")) && string_or_array {
            return;
        }
    }
    if !(has(actual) || float_int || int_float) {
        out.push(type_error(path, &types.join(","), actual));
    }
}

pub(super) fn composite_error(detail: &str) -> Cause {
    invalid("", "\"\"", detail)
}

pub(super) fn composites(s: &Node, v: &Value, path: &str, out: &mut Vec<Cause>) {
    let quoted = go_quote(path);
    let check = |n: &Node| {
        let mut e = Vec::new();
        openapi_node(n, v, None, path, &mut e);
        e
    };
    if !s.any_of.is_empty() {
        let mut best: Option<Vec<Cause>> = None;
        let mut ok = false;
        for n in &s.any_of {
            let e = check(n);
            if e.is_empty() {
                ok = true;
                best = None;
                break;
            }
            best.get_or_insert(e);
        }
        if !ok {
            out.push(composite_error(&format!(
                "{quoted} must validate at least one schema (anyOf)"
            )));
        }
        out.extend(best.unwrap_or_default());
    }
    if !s.one_of.is_empty() {
        let mut best: Option<Vec<Cause>> = None;
        let mut valid = 0;
        for n in &s.one_of {
            let e = check(n);
            if e.is_empty() {
                valid += 1;
                best = None;
            } else if valid == 0 && best.is_none() {
                best = Some(e);
            }
        }
        if valid != 1 {
            let extra = if valid == 0 {
                "Found none valid".to_string()
            } else {
                format!("Found {valid} valid alternatives")
            };
            out.push(composite_error(&format!(
                "{quoted} must validate one and only one schema (oneOf). {extra}"
            )));
            out.extend(best.unwrap_or_default());
        }
    }
    if !s.all_of.is_empty() {
        let mut valid = 0;
        for n in &s.all_of {
            let e = check(n);
            if e.is_empty() {
                valid += 1;
            }
            out.extend(e);
        }
        if valid != s.all_of.len() {
            let extra = if valid == 0 { ". None validated" } else { "" };
            out.push(composite_error(&format!(
                "{quoted} must validate all the schemas (allOf){extra}"
            )));
        }
    }
    if let Some(n) = &s.not
        && check(n).is_empty()
    {
        out.push(composite_error(&format!(
            "{quoted} must not validate the schema (not)"
        )));
    }
}

/// kube-openapi stops at the first failing string keyword (maxLength, minLength, pattern).
pub(super) fn string_checks(s: &Node, st: &str, path: &str, out: &mut Vec<Cause>) {
    let len = i64::try_from(st.chars().count()).unwrap_or(i64::MAX);
    if let Some(max) = s.max_length
        && len > max
    {
        out.push(too_long(path, max));
        return;
    }
    let q = go_quote(st);
    if let Some(min) = s.min_length
        && len < min
    {
        out.push(invalid(
            path,
            &q,
            &format!("{path} in body should be at least {min} chars long"),
        ));
        return;
    }
    if let Some(p) = &s.pattern {
        match &p.compiled {
            Ok(re) if re.is_match(st) => {}
            Ok(_) => out.push(invalid(
                path,
                &q,
                &format!("{path} in body should match '{}'", p.source),
            )),
            Err(e) => out.push(invalid(
                path,
                &q,
                &format!(
                    "{path} in body should match '{}, but pattern is invalid: {e}'",
                    p.source
                ),
            )),
        }
    }
}

pub(super) fn format_check(s: &Node, st: &str, path: &str, out: &mut Vec<Cause>) {
    if let Some(f) = &s.format
        && !format_ok(f, st)
    {
        let q = go_quote(st);
        out.push(type_invalid(
            path,
            &q,
            &format!("{path} in body must be of type {f}: {q}"),
        ));
    }
}

pub(super) static FORMAT_PATTERNS: LazyLock<Vec<(&'static str, Regex)>> = LazyLock::new(|| {
    [
        (
            "uuid",
            "(?i)^[0-9a-f]{8}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{12}$",
        ),
        (
            "uuid3",
            "(?i)^[0-9a-f]{8}-?[0-9a-f]{4}-?3[0-9a-f]{3}-?[0-9a-f]{4}-?[0-9a-f]{12}$",
        ),
        (
            "uuid4",
            "(?i)^[0-9a-f]{8}-?[0-9a-f]{4}-?4[0-9a-f]{3}-?[89ab][0-9a-f]{3}-?[0-9a-f]{12}$",
        ),
        (
            "uuid5",
            "(?i)^[0-9a-f]{8}-?[0-9a-f]{4}-?5[0-9a-f]{3}-?[89ab][0-9a-f]{3}-?[0-9a-f]{12}$",
        ),
        (
            "time",
            "^([0-9]{2}):([0-9]{2}):([0-9]{2})(.[0-9]+)?(z|([+-][0-9]{2}:[0-9]{2}))$",
        ),
    ]
    .into_iter()
    .filter_map(|(name, p)| Regex::new(p).ok().map(|re| (name, re)))
    .collect()
});

pub(super) fn format_regex(name: &str) -> Option<&'static Regex> {
    FORMAT_PATTERNS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, re)| re)
}

/// The formats this module checks; the other formats the apiserver supports pass unchecked.
pub(super) fn format_ok(format: &str, s: &str) -> bool {
    match format.replace('-', "").as_str() {
        "date" => is_date(s),
        "datetime" => is_date_time(s),
        f @ ("uuid" | "uuid3" | "uuid4" | "uuid5") => {
            format_regex(f).is_none_or(|re| re.is_match(s))
        }
        "ipv4" => s.parse::<IpAddr>().is_ok() && s.contains('.'),
        "ipv6" => s.parse::<IpAddr>().is_ok() && s.contains(':'),
        "cidr" => is_cidr(s),
        _ => true,
    }
}

/// Go's `time.Parse("2006-01-02", s)`.
pub(super) fn is_date(s: &str) -> bool {
    let b = s.as_bytes();
    if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
        return false;
    }
    let num = |r: std::ops::Range<usize>| -> Option<u32> {
        let part = s.get(r)?;
        if part.bytes().all(|c| c.is_ascii_digit()) {
            part.parse().ok()
        } else {
            None
        }
    };
    let (Some(year), Some(month), Some(day)) = (num(0..4), num(5..7), num(8..10)) else {
        return false;
    };
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let days = match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        2 => 28,
        _ => return false,
    };
    (1..=days).contains(&day)
}

/// strfmt's `IsDateTime`: a date, a `t`, then a time matched by a loose regex.
pub(super) fn is_date_time(s: &str) -> bool {
    if s.len() < 4 {
        return false;
    }
    let lower = s.to_lowercase();
    let parts: Vec<&str> = lower.split('t').collect();
    if parts.len() < 2 || !is_date(parts[0]) {
        return false;
    }
    let Some(re) = format_regex("time") else {
        return true;
    };
    let Some(c) = re.captures(parts[1]) else {
        return false;
    };
    let part = |i: usize| c.get(i).map_or("", |m| m.as_str());
    part(1) <= "23" && part(2) <= "59" && part(3) <= "59"
}

pub(super) fn is_cidr(s: &str) -> bool {
    let Some((ip, bits)) = s.split_once('/') else {
        return false;
    };
    let Ok(ip) = ip.parse::<IpAddr>() else {
        return false;
    };
    if bits.is_empty() || !bits.bytes().all(|c| c.is_ascii_digit()) {
        return false;
    }
    let max = if ip.is_ipv4() { 32 } else { 128 };
    bits.parse::<u32>().is_ok_and(|b| b <= max)
}

/// multipleOf, minimum, maximum — in that order. Integers compare against the bound truncated
/// to int64 (and print it that way), floats as floats, as kube-openapi's native-type checks do.
pub(super) fn number_checks(s: &Node, n: &Number, path: &str, out: &mut Vec<Cause>) {
    let repr = go_number(n);
    let bound = |excl: bool, above: bool| match (above, excl) {
        (true, false) => "less than or equal to",
        (true, true) => "less than",
        (false, false) => "greater than or equal to",
        (false, true) => "greater than",
    };
    if let Some(i) = n.as_i64() {
        if let Some(m) = s.multiple_of {
            let f = m as i64;
            if f <= 0 {
                out.push(invalid(
                    path,
                    &f.to_string(),
                    &format!("factor MultipleOf declared for {path} must be positive: {f}"),
                ));
            } else if i % f != 0 {
                out.push(invalid(
                    path,
                    &repr,
                    &format!("{path} in body should be a multiple of {f}"),
                ));
            }
        }
        if let Some(min) = s.minimum {
            let m = min as i64;
            let excl = s.exclusive_minimum;
            if (!excl && i < m) || (excl && i <= m) {
                out.push(invalid(
                    path,
                    &repr,
                    &format!("{path} in body should be {} {m}", bound(excl, false)),
                ));
            }
        }
        if let Some(max) = s.maximum {
            let m = max as i64;
            let excl = s.exclusive_maximum;
            if (!excl && i > m) || (excl && i >= m) {
                out.push(invalid(
                    path,
                    &repr,
                    &format!("{path} in body should be {} {m}", bound(excl, true)),
                ));
            }
        }
        return;
    }
    let d = n.as_f64().unwrap_or(f64::NAN);
    if let Some(m) = s.multiple_of {
        if m <= 0.0 {
            out.push(invalid(
                path,
                &go_float(m),
                &format!(
                    "factor MultipleOf declared for {path} must be positive: {}",
                    go_float(m)
                ),
            ));
        } else {
            let mult = if m < 1.0 { 1.0 / m * d } else { d / m };
            if !is_json_integer(mult) {
                out.push(invalid(
                    path,
                    &repr,
                    &format!("{path} in body should be a multiple of {}", go_float(m)),
                ));
            }
        }
    }
    if let Some(min) = s.minimum {
        let excl = s.exclusive_minimum;
        if (!excl && d < min) || (excl && d <= min) {
            out.push(invalid(
                path,
                &repr,
                &format!(
                    "{path} in body should be {} {}",
                    bound(excl, false),
                    go_float(min)
                ),
            ));
        }
    }
    if let Some(max) = s.maximum {
        let excl = s.exclusive_maximum;
        if (!excl && d > max) || (excl && d >= max) {
            out.push(invalid(
                path,
                &repr,
                &format!(
                    "{path} in body should be {} {}",
                    bound(excl, true),
                    go_float(max)
                ),
            ));
        }
    }
}

pub(super) fn array_checks(
    s: &Node,
    a: &[Value],
    old: Option<&Value>,
    path: &str,
    out: &mut Vec<Cause>,
) {
    if let Some(items) = s.items.as_deref() {
        for (i, x) in a.iter().enumerate() {
            openapi(items, x, old_item(s, old, x), &index(path, i), out);
        }
    }
    let len = i64::try_from(a.len()).unwrap_or(i64::MAX);
    if let Some(min) = s.min_items
        && len < min
    {
        out.push(invalid(
            path,
            &len.to_string(),
            &format!("{path} in body should have at least {min} items"),
        ));
    }
    if let Some(max) = s.max_items
        && len > max
    {
        out.push(too_many(path, len, max));
    }
}

/// kube-openapi's enum check converts the value to each enum member's Go type before
/// comparing, so a float matches an integer member after truncation, and an integer matches a
/// one-character string member through Go's int-to-rune conversion.
pub(super) fn enum_match(data: &Value, member: &Value) -> bool {
    match (member, data) {
        (Value::String(a), Value::String(b)) => a == b,
        (Value::String(a), Value::Number(n)) => n.as_i64().is_some_and(|i| {
            let c = u32::try_from(i)
                .ok()
                .and_then(char::from_u32)
                .unwrap_or('\u{FFFD}');
            a.chars().eq(std::iter::once(c))
        }),
        (Value::Bool(a), Value::Bool(b)) => a == b,
        (Value::Number(e), Value::Number(d)) => match (e.as_i64(), d.as_i64()) {
            (Some(ei), Some(di)) => ei == di,
            (Some(ei), None) => d.as_f64().is_some_and(|f| f as i64 == ei),
            (None, Some(di)) => e.as_f64() == Some(di as f64),
            (None, None) => e.as_f64() == d.as_f64(),
        },
        (Value::Array(_), Value::Array(_)) | (Value::Object(_), Value::Object(_)) => member == data,
        _ => false,
    }
}

pub(super) fn enum_check(s: &Node, v: &Value, path: &str, out: &mut Vec<Cause>) {
    let Some(members) = &s.enum_values else {
        return;
    };
    if members.is_empty() || members.iter().any(|m| enum_match(v, m)) {
        return;
    }
    let supported: Vec<String> = members
        .iter()
        .map(|m| match m {
            Value::String(s) => s.clone(),
            other => go_json(other),
        })
        .collect();
    out.push(not_supported(path, &go_value(v), &supported));
}

pub(super) fn object_checks(
    s: &Node,
    m: &Map<String, Value>,
    old: Option<&Value>,
    path: &str,
    out: &mut Vec<Cause>,
) {
    let count = i64::try_from(m.len()).unwrap_or(i64::MAX);
    if let Some(min) = s.min_properties
        && count < min
    {
        out.push(invalid(
            path,
            &count.to_string(),
            &format!("{path} in body should have at least {min} properties"),
        ));
    }
    if let Some(max) = s.max_properties
        && count > max
    {
        out.push(too_many(path, count, max));
    }
    // The root's apiVersion and kind never ratchet.
    let old_of = |k: &str| {
        if path.is_empty() && (k == "apiVersion" || k == "kind") {
            None
        } else {
            old_child(old, k)
        }
    };
    match &s.additional {
        Additional::Bool(false) => {
            for k in m.keys().filter(|k| !s.properties.contains_key(*k)) {
                out.push(invalid(
                    path,
                    "\"\"",
                    &format!("{path}.{k} in body is a forbidden property"),
                ));
            }
        }
        Additional::Schema(ap) => {
            for (k, x) in m.iter().filter(|(k, _)| !s.properties.contains_key(*k)) {
                openapi(ap, x, old_of(k), &child(path, k), out);
            }
        }
        Additional::Absent | Additional::Bool(true) => {}
    }
    for (k, p) in &s.properties {
        if let Some(x) = m.get(k) {
            openapi(p, x, old_of(k), &child(path, k), out);
        }
    }
    for k in &s.required {
        if !m.contains_key(k) {
            out.push(required(&child(path, k), ""));
        }
    }
}
