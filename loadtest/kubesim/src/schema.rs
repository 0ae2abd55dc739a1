//! CRD schemas: this module owns what kube-apiserver does with a CRD version's
//! `schema.openAPIV3Schema` when a custom resource is written — defaulting, structural pruning,
//! OpenAPI validation (ratcheted on update), `x-kubernetes-list-type` invariants and
//! `x-kubernetes-validations` rules run by a small CEL interpreter — using the wording of
//! kube-apiserver 1.32 (apiextensions-apiserver, kube-openapi and apimachinery field errors),
//! because kubectl and kube-rs users see those messages verbatim.
//!
//! Deliberate limits, so nobody mistakes them for apiserver behaviour: CEL is a subset (see
//! [`cel`]), `format` checks cover `date`, `date-time`, `uuid*`, `ipv4`, `ipv6` and `cidr`
//! (other formats the apiserver knows are accepted unchecked), there is no CEL cost budget,
//! and `date-time`/`duration` strings stay strings in CEL instead of becoming timestamps.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::net::IpAddr;
use std::rc::Rc;
use std::sync::LazyLock;

use regex::Regex;
use serde_json::{Map, Number, Value};

/// One entry of a 422's `details.causes`: `reason` is the `metav1.CauseType`, `message` is the
/// error body without the field (apimachinery's `field.Error.ErrorBody()`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cause {
    pub reason: &'static str,
    pub field: String,
    pub message: String,
}

const INVALID: &str = "FieldValueInvalid";
const REQUIRED: &str = "FieldValueRequired";
const NOT_SUPPORTED: &str = "FieldValueNotSupported";
const TOO_LONG: &str = "FieldValueTooLong";
const TOO_MANY: &str = "FieldValueTooMany";
const TYPE_INVALID: &str = "FieldValueTypeInvalid";
const FORBIDDEN: &str = "FieldValueForbidden";
const DUPLICATE: &str = "FieldValueDuplicate";

/// Cause types after which the apiserver refuses to run CEL rules (`hasBlockingErr` in the
/// custom resource strategy): rules written against the schema's types would only produce
/// noise on an object that does not have those types.
const BLOCKING: [&str; 5] = [NOT_SUPPORTED, REQUIRED, TOO_LONG, TOO_MANY, TYPE_INVALID];

/// Formats the 422 message as `apierrors.NewInvalid` does: `<Kind>.<group> "<name>" is invalid:
/// <field>: <message>`, bracketed and comma-joined for several causes, duplicates dropped
/// (the apiserver aggregates through a set of rendered messages).
pub fn invalid_message(kind: &str, group: &str, name: &str, causes: &[Cause]) -> String {
    let qualified = if group.is_empty() {
        kind.to_string()
    } else {
        format!("{kind}.{group}")
    };
    let mut rendered: Vec<String> = Vec::new();
    for c in causes {
        let m = format!("{}: {}", c.field, c.message);
        if !rendered.contains(&m) {
            rendered.push(m);
        }
    }
    let name = go_quote(name);
    match rendered.as_slice() {
        [] => format!("{qualified} {name} is invalid"),
        [one] => format!("{qualified} {name} is invalid: {one}"),
        many => format!("{qualified} {name} is invalid: [{}]", many.join(", ")),
    }
}

// ---------------------------------------------------------------------------------------------
// Field errors, rendered like apimachinery's field.Error

/// A nil `*field.Path` renders as `<nil>`; the apiserver validates from a nil root, so errors
/// about the object itself (root CEL rules, composite schema failures) carry that field.
fn field_name(path: &str) -> String {
    if path.is_empty() {
        "<nil>".to_string()
    } else {
        path.to_string()
    }
}

fn with_detail(mut s: String, detail: &str) -> String {
    if !detail.is_empty() {
        s.push_str(": ");
        s.push_str(detail);
    }
    s
}

fn cause(reason: &'static str, path: &str, message: String) -> Cause {
    Cause {
        reason,
        field: field_name(path),
        message,
    }
}

/// `value` is already rendered (see [`go_value`]).
fn invalid(path: &str, value: &str, detail: &str) -> Cause {
    cause(
        INVALID,
        path,
        with_detail(format!("Invalid value: {value}"), detail),
    )
}

fn type_invalid(path: &str, value: &str, detail: &str) -> Cause {
    cause(
        TYPE_INVALID,
        path,
        with_detail(format!("Invalid value: {value}"), detail),
    )
}

fn required(path: &str, detail: &str) -> Cause {
    cause(
        REQUIRED,
        path,
        with_detail("Required value".to_string(), detail),
    )
}

fn forbidden(path: &str, detail: &str) -> Cause {
    cause(
        FORBIDDEN,
        path,
        with_detail("Forbidden".to_string(), detail),
    )
}

fn duplicate(path: &str, value: &str) -> Cause {
    cause(DUPLICATE, path, format!("Duplicate value: {value}"))
}

fn not_supported(path: &str, value: &str, supported: &[String]) -> Cause {
    let mut msg = format!("Unsupported value: {value}");
    if !supported.is_empty() {
        let quoted: Vec<String> = supported.iter().map(|s| go_quote(s)).collect();
        msg.push_str(": supported values: ");
        msg.push_str(&quoted.join(", "));
    }
    cause(NOT_SUPPORTED, path, msg)
}

/// Since 1.32 the apiserver reports maxLength with `field.TooLong`, which omits the value and
/// says "bytes" even though kube-openapi counted characters.
fn too_long(path: &str, max: i64) -> Cause {
    let msg = if max >= 0 {
        format!("Too long: may not be more than {max} bytes")
    } else {
        "Too long: value is too long".to_string()
    };
    cause(TOO_LONG, path, msg)
}

fn too_many(path: &str, actual: i64, max: i64) -> Cause {
    cause(
        TOO_MANY,
        path,
        format!("Too many: {actual}: must have at most {max} items"),
    )
}

fn blocking_cause() -> Cause {
    invalid(
        "",
        "\"null\"",
        "some validation rules were not checked because the object was invalid; correct the existing errors to complete validation",
    )
}

fn child(path: &str, name: &str) -> String {
    if path.is_empty() {
        name.to_string()
    } else {
        format!("{path}.{name}")
    }
}

fn index(path: &str, i: usize) -> String {
    format!("{path}[{i}]")
}

fn key(path: &str, k: &str) -> String {
    format!("{path}[{k}]")
}

// ---------------------------------------------------------------------------------------------
// Go value rendering: the messages embed values through fmt's %v, %q and %#v

/// Go's `strconv.Quote`.
fn go_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{7}' => out.push_str("\\a"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{b}' => out.push_str("\\v"),
            c if go_is_print(c) => out.push(c),
            c if (c as u32) < 0x80 => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c if (c as u32) < 0x10000 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => {
                let _ = write!(out, "\\U{:08x}", c as u32);
            }
        }
    }
    out.push('"');
    out
}

/// Approximates Go's `strconv.IsPrint`: letters, marks, numbers, punctuation, symbols and the
/// ASCII space; other spaces, controls, format characters and private use are escaped.
fn go_is_print(c: char) -> bool {
    if c == ' ' {
        return true;
    }
    if c.is_control() || c.is_whitespace() {
        return false;
    }
    !matches!(c as u32,
        0xAD | 0x600..=0x605 | 0x61C | 0x6DD | 0x70F | 0x180E | 0x200B..=0x200F
        | 0x202A..=0x202E | 0x2060..=0x206F | 0xFEFF | 0xFFF9..=0xFFFB | 0xE000..=0xF8FF
        | 0xF0000..=0x10FFFF)
}

/// Go's `%v` for a float64 (`strconv.FormatFloat(f, 'g', -1, 64)`): shortest digits, with an
/// exponent once the decimal exponent is below -4 or at least 6 (so 1e6 prints as `1e+06`).
fn go_float(f: f64) -> String {
    if f.is_nan() {
        return "NaN".to_string();
    }
    if f.is_infinite() {
        return if f > 0.0 { "+Inf" } else { "-Inf" }.to_string();
    }
    if f == 0.0 {
        return if f.is_sign_negative() { "-0" } else { "0" }.to_string();
    }
    let sci = format!("{f:e}");
    let Some((mantissa, exp)) = sci.split_once('e') else {
        return sci;
    };
    let exp: i32 = exp.parse().unwrap_or(0);
    if !(-4..6).contains(&exp) {
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{mantissa}e{sign}{:02}", exp.abs())
    } else {
        format!("{f}")
    }
}

/// JSON numbers as the apiserver decodes them: int64 when they fit, float64 otherwise.
fn go_number(n: &Number) -> String {
    match n.as_i64() {
        Some(i) => i.to_string(),
        None => go_float(n.as_f64().unwrap_or(f64::NAN)),
    }
}

/// How `field.Error.ErrorBody` prints a bad value: numbers and bools bare, strings quoted, nil
/// as `"null"`, and anything compound through `%#v`.
fn go_value(v: &Value) -> String {
    match v {
        Value::Null => go_quote("null"),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => go_number(n),
        Value::String(s) => go_quote(s),
        Value::Array(_) | Value::Object(_) => go_sharp(v),
    }
}

/// Go's `%#v` of a decoded JSON value (`map[string]interface {}` / `[]interface {}`).
fn go_sharp(v: &Value) -> String {
    match v {
        Value::Null => "interface {}(nil)".to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => go_number(n),
        Value::String(s) => go_quote(s),
        Value::Array(a) => {
            let items: Vec<String> = a.iter().map(go_sharp).collect();
            format!("[]interface {{}}{{{}}}", items.join(", "))
        }
        Value::Object(m) => {
            let items: Vec<String> = m
                .iter()
                .map(|(k, v)| format!("{}:{}", go_quote(k), go_sharp(v)))
                .collect();
            format!("map[string]interface {{}}{{{}}}", items.join(", "))
        }
    }
}

/// `json.Marshal` of an enum value, which the apiserver quotes into "supported values".
fn go_json(v: &Value) -> String {
    match v {
        Value::Number(n) if n.as_i64().is_none() => {
            let f = n.as_f64().unwrap_or(f64::NAN);
            // Go writes integral floats without a fraction ("1", not "1.0").
            format!("{f}")
        }
        _ => v.to_string(),
    }
}

/// `swag.IsFloat64AJSONInteger`: integral (within a relative 1e-9) and within ±2^53.
fn is_json_integer(f: f64) -> bool {
    if !f.is_finite() || f.abs() > 9_007_199_254_740_992.0 {
        return false;
    }
    if f.fract() == 0.0 {
        return true;
    }
    let g = f.trunc();
    let diff = (f - g).abs();
    diff / (f.abs() + g.abs()) < 1e-9
}

/// The JSON type name and Go-side format kube-openapi infers for a decoded value.
fn go_kind(v: &Value) -> (&'static str, &'static str) {
    match v {
        Value::Null => ("null", ""),
        Value::Bool(_) => ("boolean", ""),
        Value::String(_) => ("string", ""),
        Value::Array(_) => ("array", ""),
        Value::Object(_) => ("object", ""),
        Value::Number(n) if n.as_i64().is_some() => ("integer", "int64"),
        Value::Number(_) => ("number", "float64"),
    }
}

// ---------------------------------------------------------------------------------------------
// Regular expressions

/// Compiles a Go (RE2) pattern with the `regex` crate. The syntaxes nearly coincide; what
/// differs is patched here: Go's `\d`, `\w`, `\s` and `\b` are ASCII-only while Rust's are
/// Unicode, and Rust gives meaning to `[` inside classes, `&&`/`~~` and stray braces, which Go
/// reads literally.
fn go_regex(pattern: &str) -> Result<Regex, regex::Error> {
    let chars: Vec<char> = pattern.chars().collect();
    let mut out = String::with_capacity(pattern.len() + 16);
    let mut in_class = false;
    let mut class_start = false;
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        i += 1;
        let at_class_start = class_start;
        class_start = false;
        match c {
            '\\' => {
                let Some(&n) = chars.get(i) else {
                    out.push('\\');
                    break;
                };
                i += 1;
                let replacement = match (n, in_class) {
                    ('d', false) => Some("[0-9]"),
                    ('d', true) => Some("0-9"),
                    ('D', false) => Some("[^0-9]"),
                    ('w', false) => Some("[0-9A-Za-z_]"),
                    ('w', true) => Some("0-9A-Za-z_"),
                    ('W', false) => Some("[^0-9A-Za-z_]"),
                    ('s', false) => Some("[\\t\\n\\f\\r ]"),
                    ('s', true) => Some("\\t\\n\\f\\r "),
                    ('S', false) => Some("[^\\t\\n\\f\\r ]"),
                    ('b', false) => Some("(?-u:\\b)"),
                    ('B', false) => Some("(?-u:\\B)"),
                    _ => None,
                };
                match replacement {
                    Some(r) => out.push_str(r),
                    None => {
                        out.push('\\');
                        out.push(n);
                    }
                }
            }
            '[' if !in_class => {
                in_class = true;
                out.push('[');
                if chars.get(i) == Some(&'^') {
                    out.push('^');
                    i += 1;
                }
                class_start = true;
            }
            '[' if chars.get(i) == Some(&':') => {
                // A POSIX class such as [:alpha:], copied through its closing ":]".
                out.push('[');
                while i < chars.len() {
                    out.push(chars[i]);
                    if chars[i] == ']' && chars.get(i.wrapping_sub(1)) == Some(&':') {
                        i += 1;
                        break;
                    }
                    i += 1;
                }
            }
            '[' | '&' | '~' if in_class => {
                out.push('\\');
                out.push(c);
            }
            ']' if in_class && !at_class_start => {
                in_class = false;
                out.push(']');
            }
            '{' if !in_class => match repetition_len(&chars[i..]) {
                Some(len) => {
                    out.push('{');
                    out.extend(&chars[i..i + len]);
                    i += len;
                }
                None => out.push_str("\\{"),
            },
            '}' if !in_class => out.push_str("\\}"),
            _ => out.push(c),
        }
    }
    Regex::new(&out)
}

/// Length of `n}`, `n,}` or `n,m}` at the start of `rest`, when it is a repetition.
fn repetition_len(rest: &[char]) -> Option<usize> {
    let mut i = 0;
    let digits = |i: &mut usize| {
        let start = *i;
        while rest.get(*i).is_some_and(char::is_ascii_digit) {
            *i += 1;
        }
        *i > start
    };
    if !digits(&mut i) {
        return None;
    }
    if rest.get(i) == Some(&',') {
        i += 1;
        digits(&mut i);
    }
    (rest.get(i) == Some(&'}')).then_some(i + 1)
}

// ---------------------------------------------------------------------------------------------
// Compiled schema

#[derive(Debug, Default)]
enum Additional {
    #[default]
    Absent,
    Bool(bool),
    Schema(Box<Node>),
}

impl Additional {
    /// What pruning recurses with for keys that are not properties: a schema, or (for a bare
    /// `additionalProperties: true|false`) nothing, which prunes the value's own fields.
    fn for_prune(&self) -> Option<Option<&Node>> {
        match self {
            Additional::Absent => None,
            Additional::Bool(_) => Some(None),
            Additional::Schema(n) => Some(Some(n)),
        }
    }
}

#[derive(Debug)]
struct Pattern {
    source: String,
    /// An invalid pattern does not stop the CRD from being created; the apiserver reports it
    /// on every value it should have checked, so the error is kept for that.
    compiled: Result<Regex, String>,
}

#[derive(Debug)]
struct Rule {
    rule: String,
    expr: cel::Expr,
    message: Option<String>,
    message_expression: Option<cel::Expr>,
    field_path: Option<String>,
    reason: Option<&'static str>,
    uses_old_self: bool,
}

impl Rule {
    /// `ruleErrorString`: the message when there is one, else the rule.
    fn error_string(&self) -> &str {
        self.message.as_deref().unwrap_or(self.rule.trim())
    }

    fn message_or_default(&self) -> String {
        match &self.message {
            Some(m) => m.clone(),
            None => format!("failed rule: {}", self.rule.trim()),
        }
    }
}

#[derive(Debug, Default)]
struct Node {
    ty: Option<String>,
    nullable: bool,
    int_or_string: bool,
    preserve_unknown: bool,
    embedded: bool,
    properties: BTreeMap<String, Node>,
    required: Vec<String>,
    additional: Additional,
    items: Option<Box<Node>>,
    maximum: Option<f64>,
    exclusive_maximum: bool,
    minimum: Option<f64>,
    exclusive_minimum: bool,
    multiple_of: Option<f64>,
    max_length: Option<i64>,
    min_length: Option<i64>,
    pattern: Option<Pattern>,
    enum_values: Option<Vec<Value>>,
    /// Only formats the apiserver supports; it strips the others (int32, int64, ...) before
    /// validating, so they have no effect at all.
    format: Option<String>,
    max_items: Option<i64>,
    min_items: Option<i64>,
    max_properties: Option<i64>,
    min_properties: Option<i64>,
    list_type: Option<String>,
    list_map_keys: Vec<String>,
    default: Option<Value>,
    all_of: Vec<Node>,
    any_of: Vec<Node>,
    one_of: Vec<Node>,
    not: Option<Box<Node>>,
    rules: Vec<Rule>,
    /// Rules here or below, so validation can skip rule-free subtrees.
    has_rules: bool,
}

const SUPPORTED_FORMATS: [&str; 24] = [
    "bsonobjectid",
    "uri",
    "email",
    "hostname",
    "ipv4",
    "ipv6",
    "cidr",
    "mac",
    "uuid",
    "uuid3",
    "uuid4",
    "uuid5",
    "isbn",
    "isbn10",
    "isbn13",
    "creditcard",
    "ssn",
    "hexcolor",
    "rgbcolor",
    "byte",
    "password",
    "date",
    "duration",
    "datetime",
];

const TYPES: [&str; 6] = ["array", "boolean", "integer", "number", "object", "string"];

fn at(path: &str, segment: &str) -> String {
    if path.is_empty() {
        segment.to_string()
    } else {
        format!("{path}.{segment}")
    }
}

fn kw_bool(m: &Map<String, Value>, k: &str) -> bool {
    m.get(k).and_then(Value::as_bool).unwrap_or(false)
}

fn kw_f64(m: &Map<String, Value>, k: &str) -> Option<f64> {
    m.get(k).and_then(Value::as_f64)
}

fn kw_i64(m: &Map<String, Value>, k: &str) -> Option<i64> {
    m.get(k)
        .and_then(|v| v.as_i64().or_else(|| v.as_u64().map(|_| i64::MAX)))
}

fn kw_strings(m: &Map<String, Value>, k: &str) -> Vec<String> {
    m.get(k)
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// `path` names the node for error messages (`properties[spec].properties[x]`);
/// `uncorrelatable` is set below a list whose items cannot be matched with the old object's
/// (anything but a list-type map), where transition rules are meaningless.
fn compile_node(v: &Value, path: &str, uncorrelatable: Option<&str>) -> Result<Node, String> {
    let here = if path.is_empty() { "<root>" } else { path };
    let Some(m) = v.as_object() else {
        return Err(format!(
            "{here}: Invalid value: a schema must be a JSON object"
        ));
    };
    let mut n = Node::default();
    if let Some(t) = m.get("type") {
        let t = t.as_str().unwrap_or("<non-string>");
        if !t.is_empty() {
            if !TYPES.contains(&t) {
                let supported: Vec<String> = TYPES.iter().map(|t| go_quote(t)).collect();
                return Err(format!(
                    "{}: Unsupported value: {}: supported values: {}",
                    at(path, "type"),
                    go_quote(t),
                    supported.join(", ")
                ));
            }
            n.ty = Some(t.to_string());
        }
    }
    n.nullable = kw_bool(m, "nullable");
    n.int_or_string = kw_bool(m, "x-kubernetes-int-or-string");
    n.preserve_unknown = kw_bool(m, "x-kubernetes-preserve-unknown-fields");
    n.embedded = kw_bool(m, "x-kubernetes-embedded-resource");
    if let Some(props) = m.get("properties").and_then(Value::as_object) {
        for (k, pv) in props {
            let p = compile_node(pv, &at(path, &format!("properties[{k}]")), uncorrelatable)?;
            n.properties.insert(k.clone(), p);
        }
    }
    n.required = kw_strings(m, "required");
    n.additional = match m.get("additionalProperties") {
        None | Some(Value::Null) => Additional::Absent,
        Some(Value::Bool(b)) => Additional::Bool(*b),
        Some(ap) => Additional::Schema(Box::new(compile_node(
            ap,
            &at(path, "additionalProperties"),
            uncorrelatable,
        )?)),
    };
    if let Some(lt) = m.get("x-kubernetes-list-type").and_then(Value::as_str) {
        if !matches!(lt, "atomic" | "set" | "map") {
            return Err(format!(
                "{}: Unsupported value: {}: supported values: \"atomic\", \"map\", \"set\"",
                at(path, "x-kubernetes-list-type"),
                go_quote(lt)
            ));
        }
        n.list_type = Some(lt.to_string());
    }
    n.list_map_keys = kw_strings(m, "x-kubernetes-list-map-keys");
    if n.list_type.as_deref() == Some("map") && n.list_map_keys.is_empty() {
        return Err(format!(
            "{}: Required value: must not be empty if x-kubernetes-list-type is map",
            at(path, "x-kubernetes-list-map-keys")
        ));
    }
    match m.get("items") {
        None | Some(Value::Null) => {}
        Some(Value::Array(_)) => {
            return Err(format!(
                "{}: Forbidden: items must be a schema object and not an array",
                at(path, "items")
            ));
        }
        Some(items) => {
            let items_path = at(path, "items");
            let below = match (uncorrelatable, n.list_type.as_deref()) {
                (Some(u), _) => Some(u.to_string()),
                (None, Some("map")) => None,
                (None, _) => Some(here.to_string()),
            };
            n.items = Some(Box::new(compile_node(
                items,
                &items_path,
                below.as_deref(),
            )?));
        }
    }
    n.maximum = kw_f64(m, "maximum");
    n.exclusive_maximum = kw_bool(m, "exclusiveMaximum");
    n.minimum = kw_f64(m, "minimum");
    n.exclusive_minimum = kw_bool(m, "exclusiveMinimum");
    n.multiple_of = kw_f64(m, "multipleOf");
    n.max_length = kw_i64(m, "maxLength");
    n.min_length = kw_i64(m, "minLength");
    if let Some(p) = m.get("pattern").and_then(Value::as_str) {
        n.pattern = Some(Pattern {
            source: p.to_string(),
            compiled: go_regex(p).map_err(|e| e.to_string()),
        });
    }
    n.enum_values = m.get("enum").and_then(Value::as_array).cloned();
    if let Some(f) = m.get("format").and_then(Value::as_str)
        && SUPPORTED_FORMATS.contains(&f.replace('-', "").as_str())
    {
        n.format = Some(f.to_string());
    }
    n.max_items = kw_i64(m, "maxItems");
    n.min_items = kw_i64(m, "minItems");
    if kw_bool(m, "uniqueItems") {
        return Err(format!(
            "{}: Forbidden: uniqueItems cannot be set to true since the runtime complexity becomes quadratic",
            at(path, "uniqueItems")
        ));
    }
    n.max_properties = kw_i64(m, "maxProperties");
    n.min_properties = kw_i64(m, "minProperties");
    n.default = m.get("default").cloned();
    for (kw, list) in [
        ("allOf", &mut n.all_of),
        ("anyOf", &mut n.any_of),
        ("oneOf", &mut n.one_of),
    ] {
        if let Some(alts) = m.get(kw).and_then(Value::as_array) {
            for (i, alt) in alts.iter().enumerate() {
                list.push(compile_node(
                    alt,
                    &at(path, &format!("{kw}[{i}]")),
                    uncorrelatable,
                )?);
            }
        }
    }
    if let Some(not) = m.get("not") {
        n.not = Some(Box::new(compile_node(
            not,
            &at(path, "not"),
            uncorrelatable,
        )?));
    }
    n.rules = compile_rules(m, &n, path, uncorrelatable)?;
    n.has_rules = !n.rules.is_empty()
        || n.properties.values().any(|p| p.has_rules)
        || n.items.as_ref().is_some_and(|i| i.has_rules)
        || matches!(&n.additional, Additional::Schema(ap) if ap.has_rules);
    Ok(n)
}

fn compile_rules(
    m: &Map<String, Value>,
    node: &Node,
    path: &str,
    uncorrelatable: Option<&str>,
) -> Result<Vec<Rule>, String> {
    let Some(list) = m.get("x-kubernetes-validations") else {
        return Ok(Vec::new());
    };
    let Some(list) = list.as_array() else {
        return Err(format!(
            "{}: Invalid value: must be a list of validation rules",
            at(path, "x-kubernetes-validations")
        ));
    };
    let mut rules = Vec::with_capacity(list.len());
    for (i, r) in list.iter().enumerate() {
        let rp = at(path, &format!("x-kubernetes-validations[{i}]"));
        let source = r
            .get("rule")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let compile_err = |e: String| {
            format!(
                "{}: Invalid value: {}: compilation failed: {e}",
                at(&rp, "rule"),
                go_quote(&source)
            )
        };
        if source.trim().is_empty() {
            return Err(format!("{}: Required value", at(&rp, "rule")));
        }
        let message = match r.get("message").and_then(Value::as_str) {
            None => None,
            Some(msg) if msg.trim().is_empty() => {
                return Err(format!(
                    "{}: Invalid value: {}: message must be non-empty if specified",
                    at(&rp, "message"),
                    go_quote(msg)
                ));
            }
            Some(msg) if msg.trim().contains(['\n', '\r']) => {
                return Err(format!(
                    "{}: Invalid value: {}: message must not contain line breaks",
                    at(&rp, "message"),
                    go_quote(msg)
                ));
            }
            Some(msg) => Some(msg.trim().to_string()),
        };
        if message.is_none() && source.trim().contains(['\n', '\r']) {
            return Err(format!(
                "{}: Required value: message must be specified if rule contains line breaks",
                at(&rp, "message")
            ));
        }
        let expr = cel::parse(&source).map_err(compile_err)?;
        let uses_old_self = cel::check(&expr).map_err(compile_err)?;
        if uses_old_self && let Some(u) = uncorrelatable {
            return Err(format!(
                "{}: Invalid value: {}: oldSelf cannot be used on the uncorrelatable portion of the schema within {u}",
                at(&rp, "rule"),
                go_quote(&source)
            ));
        }
        let message_expression = match r.get("messageExpression").and_then(Value::as_str) {
            None => None,
            Some(me) if me.trim().is_empty() => {
                return Err(format!(
                    "{}: Required value: messageExpression must be non-empty if specified",
                    at(&rp, "messageExpression")
                ));
            }
            Some(me) => {
                let me_err = |e: String| {
                    format!(
                        "{}: Invalid value: {}: messageExpression compilation failed: {e}",
                        at(&rp, "messageExpression"),
                        go_quote(me)
                    )
                };
                let e = cel::parse(me).map_err(me_err)?;
                cel::check(&e).map_err(me_err)?;
                Some(e)
            }
        };
        let reason = match r.get("reason").and_then(Value::as_str) {
            None => None,
            Some("FieldValueInvalid") => Some(INVALID),
            Some("FieldValueForbidden") => Some(FORBIDDEN),
            Some("FieldValueRequired") => Some(REQUIRED),
            Some("FieldValueDuplicate") => Some(DUPLICATE),
            Some(other) => {
                return Err(format!(
                    "{}: Unsupported value: {}: supported values: \"FieldValueDuplicate\", \"FieldValueForbidden\", \"FieldValueInvalid\", \"FieldValueRequired\"",
                    at(&rp, "reason"),
                    go_quote(other)
                ));
            }
        };
        let field_path = match r.get("fieldPath").and_then(Value::as_str) {
            None | Some("") => None,
            Some(fp) => Some(normalize_field_path(node, fp).ok_or_else(|| {
                format!(
                    "{}: Invalid value: {}: fieldPath must be a valid path",
                    at(&rp, "fieldPath"),
                    go_quote(fp)
                )
            })?),
        };
        rules.push(Rule {
            rule: source,
            expr,
            message,
            message_expression,
            field_path,
            reason,
            uses_old_self,
        });
    }
    Ok(rules)
}

/// Resolves a rule's `fieldPath` (`.a.b`, `['a.b']`) against the schema and returns it in
/// field-path notation (`a.b`, map keys as `[k]`), or `None` when it names no field.
fn normalize_field_path(node: &Node, fp: &str) -> Option<String> {
    let chars: Vec<char> = fp.trim().chars().collect();
    let mut cur = node;
    let mut out = String::new();
    let mut i = 0;
    if chars.is_empty() {
        return None;
    }
    while i < chars.len() {
        let name: String = match chars[i] {
            '.' => {
                i += 1;
                let start = i;
                while i < chars.len() && chars[i] != '.' && chars[i] != '[' {
                    i += 1;
                }
                chars[start..i].iter().collect()
            }
            '[' if chars.get(i + 1) == Some(&'\'') => {
                i += 2;
                let start = i;
                while i < chars.len() && chars[i] != '\'' {
                    i += 1;
                }
                let name: String = chars[start..i].iter().collect();
                if chars.get(i + 1) != Some(&']') {
                    return None;
                }
                i += 2;
                name
            }
            // Numeric indexes are not supported by the apiserver either.
            _ => return None,
        };
        if name.is_empty() {
            return None;
        }
        if let Some(p) = cur.properties.get(&name) {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(&name);
            cur = p;
        } else if let Additional::Schema(ap) = &cur.additional {
            let _ = write!(out, "[{name}]");
            cur = ap;
        } else {
            return None;
        }
    }
    Some(out)
}

/// A compiled `openAPIV3Schema` of one CRD version.
#[derive(Debug)]
pub struct Schema {
    root: Node,
}

const META_FIELDS: [&str; 3] = ["apiVersion", "kind", "metadata"];

fn is_meta(k: &str) -> bool {
    META_FIELDS.contains(&k)
}

impl Schema {
    /// Compiles a schema, rejecting what the apiserver rejects when the CRD is written and this
    /// module can check: unknown types or list types, `uniqueItems: true`, and CEL rules that do
    /// not parse, use unknown names or functions, or use `oldSelf` where no old value can be
    /// correlated. An invalid `pattern` is not an error, as in the apiserver: it fails the
    /// values it should check instead.
    pub fn compile(open_api_v3_schema: &Value) -> Result<Schema, String> {
        Ok(Schema {
            root: compile_node(open_api_v3_schema, "", None)?,
        })
    }

    /// Applies `default`s to absent properties (and to `null`s where null is not allowed),
    /// recursively through properties, array items and additionalProperties, then drops the
    /// remaining non-nullable nulls, as the apiserver does on decode. Root `apiVersion`, `kind`
    /// and `metadata` are left alone.
    pub fn apply_defaults(&self, obj: &mut Value) {
        default_value(obj, &self.root, true);
        prune_nulls(obj, Some(&self.root), true);
    }

    /// Structural pruning: removes fields the schema does not declare (except under
    /// `x-kubernetes-preserve-unknown-fields`, and except `apiVersion`, `kind` and `metadata` at
    /// the root and in embedded resources). Returns the removed paths, sorted, as `.spec.foo`.
    pub fn prune(&self, obj: &mut Value) -> Vec<String> {
        let mut found = Vec::new();
        let mut path = String::new();
        prune_value(obj, Some(&self.root), true, &mut path, &mut found);
        found.sort();
        found.into_iter().map(|p| format!(".{p}")).collect()
    }

    /// Validates a (defaulted, pruned) object. `old` is the stored object on update: errors in
    /// parts that did not change are dropped (CRD validation ratcheting, on by default since
    /// 1.30), and transition rules (those using `oldSelf`) run only where an old value exists.
    pub fn validate(&self, obj: &Value, old: Option<&Value>) -> Vec<Cause> {
        let mut causes = Vec::new();
        openapi(&self.root, obj, old, "", &mut causes);
        // List-type invariants ratchet all-or-nothing: an old object that already broke them
        // cannot be rejected for still breaking them.
        let old_lists_ok = old.is_none_or(|o| {
            let mut e = Vec::new();
            list_types(&self.root, o, "", &mut e);
            e.is_empty()
        });
        if old_lists_ok {
            list_types(&self.root, obj, "", &mut causes);
        }
        if self.root.has_rules {
            if causes.iter().any(|c| BLOCKING.contains(&c.reason)) {
                causes.push(blocking_cause());
            } else {
                cel_validate(&self.root, obj, old, "", true, &mut causes);
            }
        }
        causes
    }
}

// ---------------------------------------------------------------------------------------------
// Defaulting and pruning

fn default_value(x: &mut Value, s: &Node, root: bool) {
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

fn field_schema<'a>(s: Option<&'a Node>, k: &str) -> Option<&'a Node> {
    let s = s?;
    if let Some(p) = s.properties.get(k) {
        return Some(p);
    }
    match &s.additional {
        Additional::Schema(ap) => Some(ap),
        _ => None,
    }
}

fn prune_nulls(x: &mut Value, s: Option<&Node>, root: bool) {
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
fn push_key(path: &mut String, k: &str) -> usize {
    let len = path.len();
    if !path.is_empty() {
        path.push('.');
    }
    path.push_str(k);
    len
}

fn prune_value(
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
fn skip_prune(x: &mut Value, s: &Node, root: bool, path: &mut String, found: &mut Vec<String>) {
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

// ---------------------------------------------------------------------------------------------
// OpenAPI validation (kube-openapi's SchemaValidator as the apiserver drives it)

fn old_child<'a>(old: Option<&'a Value>, k: &str) -> Option<&'a Value> {
    old?.as_object()?.get(k)
}

/// The old item an array item correlates with: only list-type maps correlate, by their keys.
fn old_item<'a>(s: &Node, old: Option<&'a Value>, item: &Value) -> Option<&'a Value> {
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
fn openapi(s: &Node, v: &Value, old: Option<&Value>, path: &str, out: &mut Vec<Cause>) {
    let start = out.len();
    openapi_node(s, v, old, path, out);
    if out.len() > start && old.is_some_and(|o| o == v) {
        out.truncate(start);
    }
}

fn schema_types(s: &Node) -> Vec<&str> {
    if s.int_or_string {
        vec!["integer", "string"]
    } else {
        s.ty.as_deref().into_iter().collect()
    }
}

fn openapi_node(s: &Node, v: &Value, old: Option<&Value>, path: &str, out: &mut Vec<Cause>) {
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

fn type_error(path: &str, expected: &str, actual: &str) -> Cause {
    let q = go_quote(actual);
    type_invalid(
        path,
        &q,
        &format!("{path} in body must be of type {expected}: {q}"),
    )
}

/// kube-openapi's typeValidator, quirks included: a JSON float that is integral passes as an
/// integer, and with a string `format` the check keys on the Go kind of the value.
fn type_check(s: &Node, v: &Value, path: &str, out: &mut Vec<Cause>) {
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

fn composite_error(detail: &str) -> Cause {
    invalid("", "\"\"", detail)
}

fn composites(s: &Node, v: &Value, path: &str, out: &mut Vec<Cause>) {
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
fn string_checks(s: &Node, st: &str, path: &str, out: &mut Vec<Cause>) {
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

fn format_check(s: &Node, st: &str, path: &str, out: &mut Vec<Cause>) {
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

static FORMAT_PATTERNS: LazyLock<Vec<(&'static str, Regex)>> = LazyLock::new(|| {
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

fn format_regex(name: &str) -> Option<&'static Regex> {
    FORMAT_PATTERNS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, re)| re)
}

/// The formats this module checks; the other formats the apiserver supports pass unchecked.
fn format_ok(format: &str, s: &str) -> bool {
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
fn is_date(s: &str) -> bool {
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
fn is_date_time(s: &str) -> bool {
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

fn is_cidr(s: &str) -> bool {
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
fn number_checks(s: &Node, n: &Number, path: &str, out: &mut Vec<Cause>) {
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

fn array_checks(s: &Node, a: &[Value], old: Option<&Value>, path: &str, out: &mut Vec<Cause>) {
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
fn enum_match(data: &Value, member: &Value) -> bool {
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

fn enum_check(s: &Node, v: &Value, path: &str, out: &mut Vec<Cause>) {
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

fn object_checks(
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

// ---------------------------------------------------------------------------------------------
// x-kubernetes-list-type invariants

fn list_types(s: &Node, v: &Value, path: &str, out: &mut Vec<Cause>) {
    if let Value::Object(m) = v {
        lt_object(s, m, path, out);
    }
}

fn lt_object(s: &Node, m: &Map<String, Value>, path: &str, out: &mut Vec<Cause>) {
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

fn lt_value(s: &Node, v: &Value, path: &str, out: &mut Vec<Cause>) {
    match v {
        Value::Array(a) => lt_array(s, a, path, out),
        Value::Object(m) => lt_object(s, m, path, out),
        _ => {}
    }
}

/// A canonical rendering for duplicate detection; scalars and compounds never collide, and
/// 1 and 1.0 stay distinct, as with the apiserver's Go map keys.
fn canonical(v: Option<&Value>) -> String {
    match v {
        None => "u".to_string(),
        Some(v @ (Value::Object(_) | Value::Array(_))) => format!("c{v}"),
        Some(v) => format!("s{v}"),
    }
}

/// Indexes of second occurrences (later repeats are not reported, as in the apiserver).
fn duplicate_indexes(keys: &[String]) -> Vec<usize> {
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

fn lt_array(s: &Node, a: &[Value], path: &str, out: &mut Vec<Cause>) {
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

fn lt_map(s: &Node, a: &[Value], path: &str, out: &mut Vec<Cause>) {
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

// ---------------------------------------------------------------------------------------------
// x-kubernetes-validations

/// The CEL view of a value typed by its schema: objects with properties expose only those
/// (plus apiVersion, kind and metadata.name/generateName on resources), `number` fields are
/// doubles even when written as integers, and untyped preserved data only supports equality.
fn to_cel(v: &Value, s: Option<&Node>, resource: bool) -> cel::Val {
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
fn json_to_cel(v: &Value) -> cel::Val {
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
fn cel_validate(
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

fn eval_rules(
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

/// A small CEL interpreter for `x-kubernetes-validations`.
///
/// Supported: int (incl. hex), uint (`1u`), double, string (`'…'`, `"…"`, triple-quoted, raw
/// `r'…'`, escapes), bool and null literals; list and map literals; `self`, `oldSelf` and
/// comprehension variables; field selection, `has()`, indexing; `! -`,
/// `* / % + - < <= > >= == != in && ||` (with CEL's commutative error handling for `&&`/`||`)
/// and `?:`; `size`, `startsWith`, `endsWith`, `contains`, `matches`, `lowerAscii`,
/// `upperAscii`, `trim`, `join`, `int`, `uint`, `double`, `string`, `bool`, `dyn`; and the
/// macros `all`, `exists`, `exists_one`, `map`, `filter`. Runtime errors use cel-go's wording
/// (`no such key: x`, `no such overload`, `division by zero`, `integer overflow`, ...).
/// Not supported (rejected when the schema compiles): other functions, bytes, timestamps,
/// durations, optionals, type checking beyond runtime types.
mod cel {
    use std::cmp::Ordering;
    use std::rc::Rc;

    use regex::Regex;
    use serde_json::Value;

    pub(super) const NO_OVERLOAD: &str = "no such overload";

    #[derive(Debug, Clone, PartialEq)]
    pub(super) enum Lit {
        Null,
        Bool(bool),
        Int(i64),
        Uint(u64),
        Double(f64),
        Str(String),
    }

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub(super) enum BinOp {
        Eq,
        Ne,
        Lt,
        Le,
        Gt,
        Ge,
        Add,
        Sub,
        Mul,
        Div,
        Rem,
        In,
    }

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub(super) enum CompKind {
        All,
        Exists,
        ExistsOne,
        Map,
        Filter,
    }

    #[derive(Debug, Clone)]
    pub(super) enum Expr {
        Lit(Lit),
        Ident(String),
        Select(Box<Expr>, String),
        Has(Box<Expr>, String),
        Index(Box<Expr>, Box<Expr>),
        Call {
            target: Option<Box<Expr>>,
            name: String,
            args: Vec<Expr>,
        },
        /// `matches` with a literal pattern, compiled once.
        Matches(Box<Expr>, Regex),
        Not(Box<Expr>),
        Neg(Box<Expr>),
        Bin(BinOp, Box<Expr>, Box<Expr>),
        And(Box<Expr>, Box<Expr>),
        Or(Box<Expr>, Box<Expr>),
        Cond(Box<Expr>, Box<Expr>, Box<Expr>),
        List(Vec<Expr>),
        Map(Vec<(Expr, Expr)>),
        /// `body` is the predicate, or for `map` the transform (`pred` being its filter).
        Comp {
            kind: CompKind,
            target: Box<Expr>,
            var: String,
            pred: Option<Box<Expr>>,
            body: Box<Expr>,
        },
    }

    // ----- lexing

    #[derive(Debug, Clone, PartialEq)]
    enum Tok {
        Int(u64),
        Uint(u64),
        Double(f64),
        Str(String),
        Bool(bool),
        Null,
        Ident(String),
        Sym(&'static str),
        Eof,
    }

    const SYMS: [&str; 24] = [
        "==", "!=", "<=", ">=", "&&", "||", "<", ">", "!", "+", "-", "*", "/", "%", "?", ":", ".",
        ",", "(", ")", "[", "]", "{", "}",
    ];

    const RESERVED: [&str; 17] = [
        "as",
        "break",
        "const",
        "continue",
        "else",
        "for",
        "function",
        "if",
        "import",
        "let",
        "loop",
        "package",
        "namespace",
        "return",
        "var",
        "void",
        "while",
    ];

    fn location(src: &str, at: usize) -> (usize, usize) {
        let mut line = 1;
        let mut col = 1;
        for c in src.chars().take(at) {
            if c == '\n' {
                line += 1;
                col = 1;
            } else {
                col += 1;
            }
        }
        (line, col)
    }

    fn syntax_error(src: &str, at: usize, msg: &str) -> String {
        let (line, col) = location(src, at);
        format!("ERROR: <input>:{line}:{col}: Syntax error: {msg}")
    }

    fn check_error(src: &str, at: usize, msg: &str) -> String {
        let (line, col) = location(src, at);
        format!("ERROR: <input>:{line}:{col}: {msg}")
    }

    fn describe(t: &Tok) -> String {
        match t {
            Tok::Eof => "<EOF>".to_string(),
            Tok::Sym(s) => (*s).to_string(),
            Tok::Ident(s) => s.clone(),
            Tok::Int(i) => i.to_string(),
            Tok::Uint(u) => format!("{u}u"),
            Tok::Double(d) => d.to_string(),
            Tok::Str(s) => format!("{s:?}"),
            Tok::Bool(b) => b.to_string(),
            Tok::Null => "null".to_string(),
        }
    }

    fn tokenize(src: &str) -> Result<Vec<(Tok, usize)>, String> {
        let cs: Vec<char> = src.chars().collect();
        let mut out = Vec::new();
        let mut i = 0;
        while i < cs.len() {
            let c = cs[i];
            let start = i;
            if c.is_whitespace() {
                i += 1;
                continue;
            }
            if c == '/' && cs.get(i + 1) == Some(&'/') {
                while i < cs.len() && cs[i] != '\n' {
                    i += 1;
                }
                continue;
            }
            if c.is_ascii_digit() {
                let (tok, next) = lex_number(&cs, i).map_err(|m| syntax_error(src, start, &m))?;
                out.push((tok, start));
                i = next;
                continue;
            }
            if c == '"' || c == '\'' {
                let (s, next) =
                    lex_string(&cs, i, false).map_err(|m| syntax_error(src, start, &m))?;
                out.push((Tok::Str(s), start));
                i = next;
                continue;
            }
            if c == '_' || c.is_ascii_alphabetic() {
                let mut j = i;
                while j < cs.len() && (cs[j] == '_' || cs[j].is_ascii_alphanumeric()) {
                    j += 1;
                }
                let word: String = cs[i..j].iter().collect();
                let quote_follows = matches!(cs.get(j), Some('"' | '\''));
                if quote_follows && matches!(word.as_str(), "r" | "R") {
                    let (s, next) =
                        lex_string(&cs, j, true).map_err(|m| syntax_error(src, start, &m))?;
                    out.push((Tok::Str(s), start));
                    i = next;
                    continue;
                }
                if quote_follows && matches!(word.to_ascii_lowercase().as_str(), "b" | "rb" | "br")
                {
                    return Err(syntax_error(
                        src,
                        start,
                        "bytes literals are not supported by kubesim's CEL subset",
                    ));
                }
                let tok = match word.as_str() {
                    "true" => Tok::Bool(true),
                    "false" => Tok::Bool(false),
                    "null" => Tok::Null,
                    "in" => Tok::Sym("in"),
                    w if RESERVED.contains(&w) => {
                        return Err(syntax_error(
                            src,
                            start,
                            &format!("reserved identifier: {w}"),
                        ));
                    }
                    _ => Tok::Ident(word),
                };
                out.push((tok, start));
                i = j;
                continue;
            }
            let sym = SYMS.iter().find(|s| {
                s.chars()
                    .enumerate()
                    .all(|(k, sc)| cs.get(i + k) == Some(&sc))
            });
            match sym {
                Some(s) => {
                    out.push((Tok::Sym(s), start));
                    i += s.chars().count();
                }
                None => {
                    return Err(syntax_error(
                        src,
                        start,
                        &format!("token recognition error at: '{c}'"),
                    ));
                }
            }
        }
        out.push((Tok::Eof, cs.len()));
        Ok(out)
    }

    fn lex_number(cs: &[char], start: usize) -> Result<(Tok, usize), String> {
        let mut i = start;
        let unsigned = |i: &mut usize| {
            if matches!(cs.get(*i), Some('u' | 'U')) {
                *i += 1;
                true
            } else {
                false
            }
        };
        if cs[i] == '0' && matches!(cs.get(i + 1), Some('x' | 'X')) {
            i += 2;
            let digits_start = i;
            while i < cs.len() && cs[i].is_ascii_hexdigit() {
                i += 1;
            }
            let digits: String = cs[digits_start..i].iter().collect();
            let v =
                u64::from_str_radix(&digits, 16).map_err(|_| "invalid int literal".to_string())?;
            let tok = if unsigned(&mut i) {
                Tok::Uint(v)
            } else {
                Tok::Int(v)
            };
            return Ok((tok, i));
        }
        while i < cs.len() && cs[i].is_ascii_digit() {
            i += 1;
        }
        let mut float = false;
        if cs.get(i) == Some(&'.') && cs.get(i + 1).is_some_and(char::is_ascii_digit) {
            float = true;
            i += 1;
            while i < cs.len() && cs[i].is_ascii_digit() {
                i += 1;
            }
        }
        if matches!(cs.get(i), Some('e' | 'E')) {
            let mut j = i + 1;
            if matches!(cs.get(j), Some('+' | '-')) {
                j += 1;
            }
            if cs.get(j).is_some_and(char::is_ascii_digit) {
                float = true;
                i = j;
                while i < cs.len() && cs[i].is_ascii_digit() {
                    i += 1;
                }
            }
        }
        let text: String = cs[start..i].iter().collect();
        if float {
            let v: f64 = text
                .parse()
                .map_err(|_| "invalid double literal".to_string())?;
            return Ok((Tok::Double(v), i));
        }
        let v: u64 = text
            .parse()
            .map_err(|_| "invalid int literal".to_string())?;
        let tok = if unsigned(&mut i) {
            Tok::Uint(v)
        } else {
            Tok::Int(v)
        };
        Ok((tok, i))
    }

    fn lex_string(cs: &[char], start: usize, raw: bool) -> Result<(String, usize), String> {
        let q = cs[start];
        let triple = cs.get(start + 1) == Some(&q) && cs.get(start + 2) == Some(&q);
        let mut i = start + if triple { 3 } else { 1 };
        let mut out = String::new();
        loop {
            let Some(&c) = cs.get(i) else {
                return Err("unterminated string literal".to_string());
            };
            if c == q && (!triple || (cs.get(i + 1) == Some(&q) && cs.get(i + 2) == Some(&q))) {
                return Ok((out, i + if triple { 3 } else { 1 }));
            }
            if (c == '\n' || c == '\r') && !triple {
                return Err("unterminated string literal".to_string());
            }
            if c != '\\' || raw {
                out.push(c);
                i += 1;
                continue;
            }
            let Some(&e) = cs.get(i + 1) else {
                return Err("unterminated string literal".to_string());
            };
            i += 2;
            let simple = match e {
                '\\' => Some('\\'),
                '\'' => Some('\''),
                '"' => Some('"'),
                '`' => Some('`'),
                '?' => Some('?'),
                'a' => Some('\u{7}'),
                'b' => Some('\u{8}'),
                'f' => Some('\u{c}'),
                'n' => Some('\n'),
                'r' => Some('\r'),
                't' => Some('\t'),
                'v' => Some('\u{b}'),
                _ => None,
            };
            if let Some(c) = simple {
                out.push(c);
                continue;
            }
            let (radix, len) = match e {
                'x' | 'X' => (16, 2),
                'u' => (16, 4),
                'U' => (16, 8),
                '0'..='3' => {
                    i -= 1;
                    (8, 3)
                }
                _ => return Err(format!("invalid escape sequence '\\{e}'")),
            };
            let digits: String = cs.get(i..i + len).unwrap_or_default().iter().collect();
            let code = u32::from_str_radix(&digits, radix)
                .ok()
                .filter(|_| digits.chars().count() == len)
                .and_then(char::from_u32)
                .ok_or_else(|| format!("invalid escape sequence '\\{e}{digits}'"))?;
            out.push(code);
            i += len;
        }
    }

    // ----- parsing

    struct Parser<'a> {
        src: &'a str,
        toks: Vec<(Tok, usize)>,
        pos: usize,
        depth: u32,
        eof: Tok,
    }

    pub(super) fn parse(src: &str) -> Result<Expr, String> {
        let toks = tokenize(src)?;
        let mut p = Parser {
            src,
            toks,
            pos: 0,
            depth: 0,
            eof: Tok::Eof,
        };
        let e = p.expr()?;
        if *p.peek() != Tok::Eof {
            return Err(p.err(&format!(
                "extraneous input '{}' expecting <EOF>",
                describe(p.peek())
            )));
        }
        Ok(e)
    }

    pub(super) fn compile_regex(pattern: &str) -> Result<Regex, String> {
        super::go_regex(pattern).map_err(|e| format!("invalid regular expression: {e}"))
    }

    impl Parser<'_> {
        fn peek(&self) -> &Tok {
            self.toks.get(self.pos).map_or(&self.eof, |t| &t.0)
        }

        fn at(&self) -> usize {
            self.toks.get(self.pos).map_or(0, |t| t.1)
        }

        fn bump(&mut self) -> Tok {
            let t = self.peek().clone();
            if self.pos < self.toks.len() {
                self.pos += 1;
            }
            t
        }

        fn eat(&mut self, s: &str) -> bool {
            if matches!(self.peek(), Tok::Sym(x) if *x == s) {
                self.pos += 1;
                true
            } else {
                false
            }
        }

        fn expect_sym(&mut self, s: &str) -> Result<(), String> {
            if self.eat(s) {
                Ok(())
            } else {
                Err(self.err(&format!(
                    "mismatched input '{}' expecting '{s}'",
                    describe(self.peek())
                )))
            }
        }

        fn err(&self, msg: &str) -> String {
            syntax_error(self.src, self.at(), msg)
        }

        fn expr(&mut self) -> Result<Expr, String> {
            self.depth += 1;
            if self.depth > 200 {
                return Err(self.err("expression recursion limit exceeded"));
            }
            let r = self.conditional();
            self.depth -= 1;
            r
        }

        fn conditional(&mut self) -> Result<Expr, String> {
            let c = self.or()?;
            if !self.eat("?") {
                return Ok(c);
            }
            let a = self.or()?;
            self.expect_sym(":")?;
            let b = self.expr()?;
            Ok(Expr::Cond(Box::new(c), Box::new(a), Box::new(b)))
        }

        fn or(&mut self) -> Result<Expr, String> {
            let mut l = self.and()?;
            while self.eat("||") {
                let r = self.and()?;
                l = Expr::Or(Box::new(l), Box::new(r));
            }
            Ok(l)
        }

        fn and(&mut self) -> Result<Expr, String> {
            let mut l = self.rel()?;
            while self.eat("&&") {
                let r = self.rel()?;
                l = Expr::And(Box::new(l), Box::new(r));
            }
            Ok(l)
        }

        fn rel(&mut self) -> Result<Expr, String> {
            let mut l = self.add()?;
            loop {
                let op = match self.peek() {
                    Tok::Sym("==") => BinOp::Eq,
                    Tok::Sym("!=") => BinOp::Ne,
                    Tok::Sym("<") => BinOp::Lt,
                    Tok::Sym("<=") => BinOp::Le,
                    Tok::Sym(">") => BinOp::Gt,
                    Tok::Sym(">=") => BinOp::Ge,
                    Tok::Sym("in") => BinOp::In,
                    _ => return Ok(l),
                };
                self.pos += 1;
                let r = self.add()?;
                l = Expr::Bin(op, Box::new(l), Box::new(r));
            }
        }

        fn add(&mut self) -> Result<Expr, String> {
            let mut l = self.mul()?;
            loop {
                let op = match self.peek() {
                    Tok::Sym("+") => BinOp::Add,
                    Tok::Sym("-") => BinOp::Sub,
                    _ => return Ok(l),
                };
                self.pos += 1;
                let r = self.mul()?;
                l = Expr::Bin(op, Box::new(l), Box::new(r));
            }
        }

        fn mul(&mut self) -> Result<Expr, String> {
            let mut l = self.unary()?;
            loop {
                let op = match self.peek() {
                    Tok::Sym("*") => BinOp::Mul,
                    Tok::Sym("/") => BinOp::Div,
                    Tok::Sym("%") => BinOp::Rem,
                    _ => return Ok(l),
                };
                self.pos += 1;
                let r = self.unary()?;
                l = Expr::Bin(op, Box::new(l), Box::new(r));
            }
        }

        fn unary(&mut self) -> Result<Expr, String> {
            if self.eat("!") {
                let e = self.unary()?;
                return Ok(Expr::Not(Box::new(e)));
            }
            if self.eat("-") {
                // Fold negative int literals so that -9223372036854775808 is expressible.
                if let Tok::Int(u) = *self.peek() {
                    let at = self.at();
                    self.pos += 1;
                    let v = if u == 1 << 63 {
                        i64::MIN
                    } else {
                        i64::try_from(u)
                            .map(|v| -v)
                            .map_err(|_| syntax_error(self.src, at, "invalid int literal"))?
                    };
                    return self.suffix(Expr::Lit(Lit::Int(v)));
                }
                let e = self.unary()?;
                return Ok(Expr::Neg(Box::new(e)));
            }
            let p = self.primary()?;
            self.suffix(p)
        }

        fn suffix(&mut self, mut e: Expr) -> Result<Expr, String> {
            loop {
                if self.eat(".") {
                    let at = self.at();
                    let name = match self.bump() {
                        Tok::Ident(n) => n,
                        t => {
                            return Err(syntax_error(
                                self.src,
                                at,
                                &format!(
                                    "mismatched input '{}' expecting IDENTIFIER",
                                    describe(&t)
                                ),
                            ));
                        }
                    };
                    if self.eat("(") {
                        let args = self.args(")")?;
                        e = self.method(e, name, args, at)?;
                    } else {
                        e = Expr::Select(Box::new(e), name);
                    }
                } else if self.eat("[") {
                    let i = self.expr()?;
                    self.expect_sym("]")?;
                    e = Expr::Index(Box::new(e), Box::new(i));
                } else {
                    return Ok(e);
                }
            }
        }

        fn args(&mut self, close: &str) -> Result<Vec<Expr>, String> {
            let mut v = Vec::new();
            if self.eat(close) {
                return Ok(v);
            }
            loop {
                v.push(self.expr()?);
                if self.eat(",") {
                    if self.eat(close) {
                        return Ok(v);
                    }
                    continue;
                }
                self.expect_sym(close)?;
                return Ok(v);
            }
        }

        fn primary(&mut self) -> Result<Expr, String> {
            let at = self.at();
            match self.bump() {
                Tok::Int(u) => i64::try_from(u)
                    .map(|i| Expr::Lit(Lit::Int(i)))
                    .map_err(|_| syntax_error(self.src, at, "invalid int literal")),
                Tok::Uint(u) => Ok(Expr::Lit(Lit::Uint(u))),
                Tok::Double(d) => Ok(Expr::Lit(Lit::Double(d))),
                Tok::Str(s) => Ok(Expr::Lit(Lit::Str(s))),
                Tok::Bool(b) => Ok(Expr::Lit(Lit::Bool(b))),
                Tok::Null => Ok(Expr::Lit(Lit::Null)),
                Tok::Ident(name) => self.ident(name, at),
                Tok::Sym(".") => match self.bump() {
                    Tok::Ident(name) => self.ident(name, at),
                    t => Err(syntax_error(
                        self.src,
                        at,
                        &format!("mismatched input '{}' expecting IDENTIFIER", describe(&t)),
                    )),
                },
                Tok::Sym("(") => {
                    let e = self.expr()?;
                    self.expect_sym(")")?;
                    Ok(e)
                }
                Tok::Sym("[") => Ok(Expr::List(self.args("]")?)),
                Tok::Sym("{") => {
                    let mut entries = Vec::new();
                    if self.eat("}") {
                        return Ok(Expr::Map(entries));
                    }
                    loop {
                        let k = self.expr()?;
                        self.expect_sym(":")?;
                        let v = self.expr()?;
                        entries.push((k, v));
                        if self.eat(",") {
                            if self.eat("}") {
                                return Ok(Expr::Map(entries));
                            }
                            continue;
                        }
                        self.expect_sym("}")?;
                        return Ok(Expr::Map(entries));
                    }
                }
                t => Err(syntax_error(
                    self.src,
                    at,
                    &format!(
                        "mismatched input '{}' expecting an expression",
                        describe(&t)
                    ),
                )),
            }
        }

        fn ident(&mut self, name: String, at: usize) -> Result<Expr, String> {
            if !self.eat("(") {
                return Ok(Expr::Ident(name));
            }
            let mut args = self.args(")")?;
            match (name.as_str(), args.len()) {
                ("has", 1) => match args.pop() {
                    Some(Expr::Select(t, f)) => Ok(Expr::Has(t, f)),
                    _ => Err(check_error(self.src, at, "invalid argument to has() macro")),
                },
                ("matches", 2) => {
                    if let Some(Expr::Lit(Lit::Str(p))) = args.get(1) {
                        let re = compile_regex(p).map_err(|e| check_error(self.src, at, &e))?;
                        let target = args.swap_remove(0);
                        return Ok(Expr::Matches(Box::new(target), re));
                    }
                    Ok(Expr::Call {
                        target: None,
                        name,
                        args,
                    })
                }
                ("size" | "int" | "uint" | "double" | "string" | "bool" | "dyn", 1) => {
                    Ok(Expr::Call {
                        target: None,
                        name,
                        args,
                    })
                }
                _ => Err(check_error(
                    self.src,
                    at,
                    &format!("undeclared reference to '{name}' (in container '')"),
                )),
            }
        }

        fn method(
            &self,
            target: Expr,
            name: String,
            args: Vec<Expr>,
            at: usize,
        ) -> Result<Expr, String> {
            let kind = match name.as_str() {
                "all" => Some(CompKind::All),
                "exists" => Some(CompKind::Exists),
                "exists_one" => Some(CompKind::ExistsOne),
                "map" => Some(CompKind::Map),
                "filter" => Some(CompKind::Filter),
                _ => None,
            };
            if let Some(kind) = kind {
                let arity_ok = args.len() == 2 || (kind == CompKind::Map && args.len() == 3);
                if !arity_ok {
                    return Err(check_error(
                        self.src,
                        at,
                        &format!("found no matching overload for '{name}'"),
                    ));
                }
                let mut it = args.into_iter();
                let var = match it.next() {
                    Some(Expr::Ident(v)) => v,
                    _ => return Err(check_error(self.src, at, "argument must be a simple name")),
                };
                let (pred, body) = match (it.next(), it.next()) {
                    (Some(p), Some(t)) => (Some(Box::new(p)), t),
                    (Some(b), None) => (None, b),
                    _ => return Err(check_error(self.src, at, "missing macro argument")),
                };
                return Ok(Expr::Comp {
                    kind,
                    target: Box::new(target),
                    var,
                    pred,
                    body: Box::new(body),
                });
            }
            match (name.as_str(), args.as_slice()) {
                ("matches", [Expr::Lit(Lit::Str(p))]) => {
                    let re = compile_regex(p).map_err(|e| check_error(self.src, at, &e))?;
                    Ok(Expr::Matches(Box::new(target), re))
                }
                ("size" | "lowerAscii" | "upperAscii" | "trim", [])
                | ("startsWith" | "endsWith" | "contains" | "matches", [_])
                | ("join", [] | [_]) => Ok(Expr::Call {
                    target: Some(Box::new(target)),
                    name,
                    args,
                }),
                _ => Err(check_error(
                    self.src,
                    at,
                    &format!("undeclared reference to '{name}' (in container '')"),
                )),
            }
        }
    }

    /// Rejects names other than `self`, `oldSelf` and comprehension variables; returns
    /// whether `oldSelf` is used, which makes the rule a transition rule.
    pub(super) fn check(e: &Expr) -> Result<bool, String> {
        let mut bound = Vec::new();
        let mut uses_old = false;
        check_in(e, &mut bound, &mut uses_old)?;
        Ok(uses_old)
    }

    fn check_in(e: &Expr, bound: &mut Vec<String>, uses_old: &mut bool) -> Result<(), String> {
        match e {
            Expr::Lit(_) => Ok(()),
            Expr::Ident(n) => {
                if bound.iter().any(|b| b == n) || n == "self" {
                    Ok(())
                } else if n == "oldSelf" {
                    *uses_old = true;
                    Ok(())
                } else {
                    Err(format!(
                        "ERROR: <input>: undeclared reference to '{n}' (in container '')"
                    ))
                }
            }
            Expr::Select(t, _)
            | Expr::Has(t, _)
            | Expr::Matches(t, _)
            | Expr::Not(t)
            | Expr::Neg(t) => check_in(t, bound, uses_old),
            Expr::Index(a, b) | Expr::Bin(_, a, b) | Expr::And(a, b) | Expr::Or(a, b) => {
                check_in(a, bound, uses_old)?;
                check_in(b, bound, uses_old)
            }
            Expr::Cond(a, b, c) => {
                check_in(a, bound, uses_old)?;
                check_in(b, bound, uses_old)?;
                check_in(c, bound, uses_old)
            }
            Expr::Call { target, args, .. } => {
                if let Some(t) = target {
                    check_in(t, bound, uses_old)?;
                }
                args.iter().try_for_each(|a| check_in(a, bound, uses_old))
            }
            Expr::List(xs) => xs.iter().try_for_each(|x| check_in(x, bound, uses_old)),
            Expr::Map(kvs) => kvs.iter().try_for_each(|(k, v)| {
                check_in(k, bound, uses_old)?;
                check_in(v, bound, uses_old)
            }),
            Expr::Comp {
                target,
                var,
                pred,
                body,
                ..
            } => {
                check_in(target, bound, uses_old)?;
                bound.push(var.clone());
                let r = pred
                    .iter()
                    .try_for_each(|p| check_in(p, bound, uses_old))
                    .and_then(|()| check_in(body, bound, uses_old));
                bound.pop();
                r
            }
        }
    }

    // ----- evaluation

    #[derive(Debug, Clone)]
    pub(super) enum Val {
        Null,
        Bool(bool),
        Int(i64),
        Uint(u64),
        Double(f64),
        Str(Rc<str>),
        List(Rc<Vec<Val>>),
        /// Insertion-ordered entries; CEL maps from JSON objects are small.
        Map(Rc<Vec<(Val, Val)>>),
        /// Data under x-kubernetes-preserve-unknown-fields with no type: equality only.
        Opaque(Rc<Value>),
    }

    pub(super) fn str_val(s: &str) -> Val {
        Val::Str(Rc::from(s))
    }

    pub(super) struct Env<'a> {
        self_val: &'a Val,
        old: Option<&'a Val>,
        locals: Vec<(String, Val)>,
    }

    impl<'a> Env<'a> {
        pub(super) fn new(self_val: &'a Val, old: Option<&'a Val>) -> Self {
            Env {
                self_val,
                old,
                locals: Vec::new(),
            }
        }
    }

    fn no_overload<T>() -> Result<T, String> {
        Err(NO_OVERLOAD.to_string())
    }

    fn lit(l: &Lit) -> Val {
        match l {
            Lit::Null => Val::Null,
            Lit::Bool(b) => Val::Bool(*b),
            Lit::Int(i) => Val::Int(*i),
            Lit::Uint(u) => Val::Uint(*u),
            Lit::Double(d) => Val::Double(*d),
            Lit::Str(s) => str_val(s),
        }
    }

    /// CEL escapes property names that are not identifiers (`__dash__`, `__dot__`, ...).
    fn unescape_field(name: &str) -> Option<String> {
        if !name.contains("__") {
            return None;
        }
        if let Some(inner) = name.strip_prefix("__").and_then(|n| n.strip_suffix("__"))
            && (RESERVED.contains(&inner) || matches!(inner, "true" | "false" | "null" | "in"))
        {
            return Some(inner.to_string());
        }
        Some(
            name.replace("__underscores__", "\u{0}")
                .replace("__dot__", ".")
                .replace("__dash__", "-")
                .replace("__slash__", "/")
                .replace('\u{0}', "__"),
        )
    }

    fn field<'v>(m: &'v [(Val, Val)], name: &str) -> Option<&'v Val> {
        let find = |n: &str| {
            m.iter()
                .find(|(k, _)| matches!(k, Val::Str(s) if &**s == n))
                .map(|(_, v)| v)
        };
        find(name).or_else(|| unescape_field(name).and_then(|n| find(&n)))
    }

    fn key_text(v: &Val) -> String {
        match v {
            Val::Str(s) => s.to_string(),
            Val::Int(i) => i.to_string(),
            Val::Uint(u) => u.to_string(),
            Val::Bool(b) => b.to_string(),
            Val::Double(d) => super::go_float(*d),
            _ => "?".to_string(),
        }
    }

    pub(super) fn eval(e: &Expr, env: &mut Env<'_>) -> Result<Val, String> {
        match e {
            Expr::Lit(l) => Ok(lit(l)),
            Expr::Ident(n) => {
                if let Some((_, v)) = env.locals.iter().rev().find(|(name, _)| name == n) {
                    return Ok(v.clone());
                }
                match n.as_str() {
                    "self" => Ok(env.self_val.clone()),
                    "oldSelf" => env
                        .old
                        .cloned()
                        .ok_or_else(|| "no such attribute: oldSelf".to_string()),
                    _ => Err(format!("no such attribute: {n}")),
                }
            }
            Expr::Select(t, f) => match eval(t, env)? {
                Val::Map(m) => field(&m, f)
                    .cloned()
                    .ok_or_else(|| format!("no such key: {f}")),
                _ => no_overload(),
            },
            Expr::Has(t, f) => match eval(t, env)? {
                Val::Map(m) => Ok(Val::Bool(field(&m, f).is_some())),
                _ => no_overload(),
            },
            Expr::Index(t, i) => {
                let t = eval(t, env)?;
                let i = eval(i, env)?;
                index(&t, &i)
            }
            Expr::Call { target, name, args } => call(target.as_deref(), name, args, env),
            Expr::Matches(t, re) => match eval(t, env)? {
                Val::Str(s) => Ok(Val::Bool(re.is_match(&s))),
                _ => no_overload(),
            },
            Expr::Not(x) => match eval(x, env)? {
                Val::Bool(b) => Ok(Val::Bool(!b)),
                _ => no_overload(),
            },
            Expr::Neg(x) => match eval(x, env)? {
                Val::Int(i) => i
                    .checked_neg()
                    .map(Val::Int)
                    .ok_or_else(|| "integer overflow".to_string()),
                Val::Double(d) => Ok(Val::Double(-d)),
                _ => no_overload(),
            },
            Expr::Bin(op, a, b) => {
                let a = eval(a, env)?;
                let b = eval(b, env)?;
                binop(*op, &a, &b)
            }
            Expr::And(a, b) => logic(a, b, false, env),
            Expr::Or(a, b) => logic(a, b, true, env),
            Expr::Cond(c, a, b) => match eval(c, env)? {
                Val::Bool(true) => eval(a, env),
                Val::Bool(false) => eval(b, env),
                _ => no_overload(),
            },
            Expr::List(xs) => {
                let mut out = Vec::with_capacity(xs.len());
                for x in xs {
                    out.push(eval(x, env)?);
                }
                Ok(Val::List(Rc::new(out)))
            }
            Expr::Map(kvs) => {
                let mut out: Vec<(Val, Val)> = Vec::with_capacity(kvs.len());
                for (k, v) in kvs {
                    let k = eval(k, env)?;
                    if !matches!(k, Val::Str(_) | Val::Int(_) | Val::Uint(_) | Val::Bool(_)) {
                        return Err(format!("unsupported key type: {}", key_text(&k)));
                    }
                    if out.iter().any(|(existing, _)| equal(existing, &k)) {
                        return Err(format!("Failed with repeated key: {}", key_text(&k)));
                    }
                    let v = eval(v, env)?;
                    out.push((k, v));
                }
                Ok(Val::Map(Rc::new(out)))
            }
            Expr::Comp {
                kind,
                target,
                var,
                pred,
                body,
            } => comprehension(*kind, target, var, pred.as_deref(), body, env),
        }
    }

    /// CEL's `&&`/`||` are commutative over errors: `false && error` and `error && false` are
    /// both false; an error only surfaces when the other side does not decide the result.
    fn logic(a: &Expr, b: &Expr, decisive: bool, env: &mut Env<'_>) -> Result<Val, String> {
        let av = eval(a, env);
        if let Ok(Val::Bool(x)) = &av
            && *x == decisive
        {
            return Ok(Val::Bool(decisive));
        }
        let bv = eval(b, env);
        if let Ok(Val::Bool(y)) = &bv
            && *y == decisive
        {
            return Ok(Val::Bool(decisive));
        }
        match (av, bv) {
            (Ok(Val::Bool(_)), Ok(Val::Bool(_))) => Ok(Val::Bool(!decisive)),
            (Err(e), _) | (_, Err(e)) => Err(e),
            _ => no_overload(),
        }
    }

    fn with_local(env: &mut Env<'_>, var: &str, item: Val, e: &Expr) -> Result<Val, String> {
        env.locals.push((var.to_string(), item));
        let r = eval(e, env);
        env.locals.pop();
        r
    }

    fn comprehension(
        kind: CompKind,
        target: &Expr,
        var: &str,
        pred: Option<&Expr>,
        body: &Expr,
        env: &mut Env<'_>,
    ) -> Result<Val, String> {
        let items: Vec<Val> = match eval(target, env)? {
            Val::List(l) => l.as_ref().clone(),
            Val::Map(m) => m.iter().map(|(k, _)| k.clone()).collect(),
            _ => return no_overload(),
        };
        match kind {
            CompKind::All | CompKind::Exists => {
                let decisive = kind == CompKind::Exists;
                let mut err = None;
                for item in items {
                    match with_local(env, var, item, body) {
                        Ok(Val::Bool(b)) if b == decisive => return Ok(Val::Bool(decisive)),
                        Ok(Val::Bool(_)) => {}
                        Ok(_) => {
                            err.get_or_insert_with(|| NO_OVERLOAD.to_string());
                        }
                        Err(e) => {
                            err.get_or_insert(e);
                        }
                    }
                }
                match err {
                    Some(e) => Err(e),
                    None => Ok(Val::Bool(!decisive)),
                }
            }
            CompKind::ExistsOne => {
                let mut n = 0;
                for item in items {
                    match with_local(env, var, item, body)? {
                        Val::Bool(true) => n += 1,
                        Val::Bool(false) => {}
                        _ => return no_overload(),
                    }
                }
                Ok(Val::Bool(n == 1))
            }
            CompKind::Filter => {
                let mut out = Vec::new();
                for item in items {
                    match with_local(env, var, item.clone(), body)? {
                        Val::Bool(true) => out.push(item),
                        Val::Bool(false) => {}
                        _ => return no_overload(),
                    }
                }
                Ok(Val::List(Rc::new(out)))
            }
            CompKind::Map => {
                let mut out = Vec::new();
                for item in items {
                    if let Some(p) = pred {
                        match with_local(env, var, item.clone(), p)? {
                            Val::Bool(true) => {}
                            Val::Bool(false) => continue,
                            _ => return no_overload(),
                        }
                    }
                    out.push(with_local(env, var, item, body)?);
                }
                Ok(Val::List(Rc::new(out)))
            }
        }
    }

    fn index(t: &Val, i: &Val) -> Result<Val, String> {
        match t {
            Val::List(l) => {
                let idx = match i {
                    Val::Int(i) => *i,
                    Val::Uint(u) => i64::try_from(*u).unwrap_or(i64::MAX),
                    _ => return no_overload(),
                };
                usize::try_from(idx)
                    .ok()
                    .and_then(|n| l.get(n))
                    .cloned()
                    .ok_or_else(|| format!("index out of bounds: {idx}"))
            }
            Val::Map(m) => m
                .iter()
                .find(|(k, _)| equal(k, i))
                .map(|(_, v)| v.clone())
                .ok_or_else(|| format!("no such key: {}", key_text(i))),
            _ => no_overload(),
        }
    }

    fn call(
        target: Option<&Expr>,
        name: &str,
        args: &[Expr],
        env: &mut Env<'_>,
    ) -> Result<Val, String> {
        let t = match target {
            Some(t) => Some(eval(t, env)?),
            None => None,
        };
        let mut vals = Vec::with_capacity(args.len());
        for a in args {
            vals.push(eval(a, env)?);
        }
        let b = |v: bool| Ok(Val::Bool(v));
        match (name, t.as_ref(), vals.as_slice()) {
            ("size", Some(x), []) | ("size", None, [x]) => match x {
                Val::Str(s) => Ok(Val::Int(
                    i64::try_from(s.chars().count()).unwrap_or(i64::MAX),
                )),
                Val::List(l) => Ok(Val::Int(i64::try_from(l.len()).unwrap_or(i64::MAX))),
                Val::Map(m) => Ok(Val::Int(i64::try_from(m.len()).unwrap_or(i64::MAX))),
                _ => no_overload(),
            },
            ("startsWith", Some(Val::Str(s)), [Val::Str(p)]) => b(s.starts_with(&**p)),
            ("endsWith", Some(Val::Str(s)), [Val::Str(p)]) => b(s.ends_with(&**p)),
            ("contains", Some(Val::Str(s)), [Val::Str(p)]) => b(s.contains(&**p)),
            ("matches", Some(Val::Str(s)), [Val::Str(p)])
            | ("matches", None, [Val::Str(s), Val::Str(p)]) => b(compile_regex(p)?.is_match(s)),
            ("lowerAscii", Some(Val::Str(s)), []) => Ok(str_val(&s.to_ascii_lowercase())),
            ("upperAscii", Some(Val::Str(s)), []) => Ok(str_val(&s.to_ascii_uppercase())),
            ("trim", Some(Val::Str(s)), []) => Ok(str_val(s.trim())),
            ("join", Some(Val::List(l)), rest) => {
                let sep = match rest {
                    [] => "",
                    [Val::Str(sep)] => &**sep,
                    _ => return no_overload(),
                };
                let mut parts = Vec::with_capacity(l.len());
                for x in l.iter() {
                    match x {
                        Val::Str(s) => parts.push(s.to_string()),
                        _ => return no_overload(),
                    }
                }
                Ok(str_val(&parts.join(sep)))
            }
            ("int", None, [x]) => to_int(x),
            ("uint", None, [x]) => to_uint(x),
            ("double", None, [x]) => match x {
                Val::Int(i) => Ok(Val::Double(*i as f64)),
                Val::Uint(u) => Ok(Val::Double(*u as f64)),
                Val::Double(d) => Ok(Val::Double(*d)),
                Val::Str(s) => s
                    .parse()
                    .map(Val::Double)
                    .map_err(|_| format!("cannot convert '{s}' to double")),
                _ => no_overload(),
            },
            ("string", None, [x]) => match x {
                Val::Str(_) => Ok(x.clone()),
                Val::Int(i) => Ok(str_val(&i.to_string())),
                Val::Uint(u) => Ok(str_val(&u.to_string())),
                Val::Double(d) => Ok(str_val(&super::go_float(*d))),
                Val::Bool(v) => Ok(str_val(&v.to_string())),
                _ => no_overload(),
            },
            ("bool", None, [x]) => match x {
                Val::Bool(_) => Ok(x.clone()),
                Val::Str(s) => match &**s {
                    "1" | "t" | "true" | "TRUE" | "True" => b(true),
                    "0" | "f" | "false" | "FALSE" | "False" => b(false),
                    _ => Err(format!(
                        "type conversion error from 'string' to 'bool': {s}"
                    )),
                },
                _ => no_overload(),
            },
            ("dyn", None, [x]) => Ok(x.clone()),
            _ => no_overload(),
        }
    }

    fn to_int(x: &Val) -> Result<Val, String> {
        let overflow = || "integer overflow".to_string();
        match x {
            Val::Int(i) => Ok(Val::Int(*i)),
            Val::Uint(u) => i64::try_from(*u).map(Val::Int).map_err(|_| overflow()),
            Val::Double(d) => {
                if d.is_finite() && *d > -9.223_372_036_854_776e18 && *d < 9.223_372_036_854_776e18
                {
                    Ok(Val::Int(d.trunc() as i64))
                } else {
                    Err(overflow())
                }
            }
            Val::Str(s) => s
                .parse()
                .map(Val::Int)
                .map_err(|_| format!("cannot convert '{s}' to int")),
            _ => no_overload(),
        }
    }

    fn to_uint(x: &Val) -> Result<Val, String> {
        let overflow = || "unsigned integer overflow".to_string();
        match x {
            Val::Uint(u) => Ok(Val::Uint(*u)),
            Val::Int(i) => u64::try_from(*i).map(Val::Uint).map_err(|_| overflow()),
            Val::Double(d) => {
                if d.is_finite() && *d >= 0.0 && *d < 1.844_674_407_370_955_2e19 {
                    Ok(Val::Uint(d.trunc() as u64))
                } else {
                    Err(overflow())
                }
            }
            Val::Str(s) => s
                .parse()
                .map(Val::Uint)
                .map_err(|_| format!("cannot convert '{s}' to uint")),
            _ => no_overload(),
        }
    }

    #[derive(Clone, Copy)]
    enum Num {
        I(i64),
        U(u64),
        D(f64),
    }

    fn num(v: &Val) -> Option<Num> {
        match v {
            Val::Int(i) => Some(Num::I(*i)),
            Val::Uint(u) => Some(Num::U(*u)),
            Val::Double(d) => Some(Num::D(*d)),
            _ => None,
        }
    }

    /// Numeric comparison across int, uint and double, as CEL's heterogeneous comparisons.
    fn num_cmp(a: Num, b: Num) -> Option<Ordering> {
        match (a, b) {
            (Num::I(x), Num::I(y)) => Some(x.cmp(&y)),
            (Num::U(x), Num::U(y)) => Some(x.cmp(&y)),
            (Num::I(x), Num::U(y)) => Some(i128::from(x).cmp(&i128::from(y))),
            (Num::U(x), Num::I(y)) => Some(i128::from(x).cmp(&i128::from(y))),
            (Num::D(x), Num::D(y)) => x.partial_cmp(&y),
            (Num::I(x), Num::D(y)) => (x as f64).partial_cmp(&y),
            (Num::U(x), Num::D(y)) => (x as f64).partial_cmp(&y),
            (Num::D(x), Num::I(y)) => x.partial_cmp(&(y as f64)),
            (Num::D(x), Num::U(y)) => x.partial_cmp(&(y as f64)),
        }
    }

    fn to_json(v: &Val) -> Option<Value> {
        Some(match v {
            Val::Null => Value::Null,
            Val::Bool(b) => Value::Bool(*b),
            Val::Int(i) => Value::from(*i),
            Val::Uint(u) => Value::from(*u),
            Val::Double(d) => Value::Number(serde_json::Number::from_f64(*d)?),
            Val::Str(s) => Value::String(s.to_string()),
            Val::List(l) => Value::Array(l.iter().map(to_json).collect::<Option<_>>()?),
            Val::Map(m) => Value::Object(
                m.iter()
                    .map(|(k, v)| match k {
                        Val::Str(k) => Some((k.to_string(), to_json(v)?)),
                        _ => None,
                    })
                    .collect::<Option<_>>()?,
            ),
            Val::Opaque(o) => o.as_ref().clone(),
        })
    }

    /// CEL equality: heterogeneous values are unequal rather than an error, and numbers
    /// compare by value across int, uint and double.
    pub(super) fn equal(a: &Val, b: &Val) -> bool {
        if let (Some(x), Some(y)) = (num(a), num(b)) {
            return num_cmp(x, y) == Some(Ordering::Equal);
        }
        match (a, b) {
            (Val::Null, Val::Null) => true,
            (Val::Bool(x), Val::Bool(y)) => x == y,
            (Val::Str(x), Val::Str(y)) => x == y,
            (Val::List(x), Val::List(y)) => {
                x.len() == y.len() && x.iter().zip(y.iter()).all(|(p, q)| equal(p, q))
            }
            (Val::Map(x), Val::Map(y)) => {
                x.len() == y.len()
                    && x.iter().all(|(k, v)| {
                        y.iter()
                            .find(|(k2, _)| equal(k, k2))
                            .is_some_and(|(_, v2)| equal(v, v2))
                    })
            }
            (Val::Opaque(x), other) | (other, Val::Opaque(x)) => {
                to_json(other).is_some_and(|o| o == **x)
            }
            _ => false,
        }
    }

    fn compare(a: &Val, b: &Val) -> Result<Option<Ordering>, String> {
        match (a, b) {
            (Val::Str(x), Val::Str(y)) => Ok(Some(x.cmp(y))),
            (Val::Bool(x), Val::Bool(y)) => Ok(Some(x.cmp(y))),
            _ => match (num(a), num(b)) {
                (Some(x), Some(y)) => Ok(num_cmp(x, y)),
                _ => no_overload(),
            },
        }
    }

    fn binop(op: BinOp, a: &Val, b: &Val) -> Result<Val, String> {
        let overflow = || "integer overflow".to_string();
        let uoverflow = || "unsigned integer overflow".to_string();
        match op {
            BinOp::Eq => Ok(Val::Bool(equal(a, b))),
            BinOp::Ne => Ok(Val::Bool(!equal(a, b))),
            BinOp::Lt | BinOp::Le | BinOp::Gt | BinOp::Ge => {
                let r = compare(a, b)?.is_some_and(|o| match op {
                    BinOp::Lt => o == Ordering::Less,
                    BinOp::Le => o != Ordering::Greater,
                    BinOp::Gt => o == Ordering::Greater,
                    _ => o != Ordering::Less,
                });
                Ok(Val::Bool(r))
            }
            BinOp::In => match b {
                Val::List(l) => Ok(Val::Bool(l.iter().any(|x| equal(a, x)))),
                Val::Map(m) => Ok(Val::Bool(m.iter().any(|(k, _)| equal(a, k)))),
                _ => no_overload(),
            },
            BinOp::Add => match (a, b) {
                (Val::Int(x), Val::Int(y)) => x.checked_add(*y).map(Val::Int).ok_or_else(overflow),
                (Val::Uint(x), Val::Uint(y)) => {
                    x.checked_add(*y).map(Val::Uint).ok_or_else(uoverflow)
                }
                (Val::Double(x), Val::Double(y)) => Ok(Val::Double(x + y)),
                (Val::Str(x), Val::Str(y)) => Ok(str_val(&format!("{x}{y}"))),
                (Val::List(x), Val::List(y)) => Ok(Val::List(Rc::new(
                    x.iter().chain(y.iter()).cloned().collect(),
                ))),
                _ => no_overload(),
            },
            BinOp::Sub => match (a, b) {
                (Val::Int(x), Val::Int(y)) => x.checked_sub(*y).map(Val::Int).ok_or_else(overflow),
                (Val::Uint(x), Val::Uint(y)) => {
                    x.checked_sub(*y).map(Val::Uint).ok_or_else(uoverflow)
                }
                (Val::Double(x), Val::Double(y)) => Ok(Val::Double(x - y)),
                _ => no_overload(),
            },
            BinOp::Mul => match (a, b) {
                (Val::Int(x), Val::Int(y)) => x.checked_mul(*y).map(Val::Int).ok_or_else(overflow),
                (Val::Uint(x), Val::Uint(y)) => {
                    x.checked_mul(*y).map(Val::Uint).ok_or_else(uoverflow)
                }
                (Val::Double(x), Val::Double(y)) => Ok(Val::Double(x * y)),
                _ => no_overload(),
            },
            BinOp::Div => match (a, b) {
                (Val::Int(_), Val::Int(0)) | (Val::Uint(_), Val::Uint(0)) => {
                    Err("division by zero".to_string())
                }
                (Val::Int(x), Val::Int(y)) => x.checked_div(*y).map(Val::Int).ok_or_else(overflow),
                (Val::Uint(x), Val::Uint(y)) => Ok(Val::Uint(x / y)),
                (Val::Double(x), Val::Double(y)) => Ok(Val::Double(x / y)),
                _ => no_overload(),
            },
            BinOp::Rem => match (a, b) {
                (Val::Int(_), Val::Int(0)) | (Val::Uint(_), Val::Uint(0)) => {
                    Err("modulus by zero".to_string())
                }
                (Val::Int(x), Val::Int(y)) => x.checked_rem(*y).map(Val::Int).ok_or_else(overflow),
                (Val::Uint(x), Val::Uint(y)) => Ok(Val::Uint(x % y)),
                _ => no_overload(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const DNS1123: &str = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";

    /// Shaped like the StatefulSetLock CRD's v1 schema.
    fn lock_schema_json() -> Value {
        json!({
            "type": "object",
            "properties": {
                "apiVersion": {"type": "string"},
                "kind": {"type": "string"},
                "metadata": {"type": "object"},
                "spec": {
                    "type": "object",
                    "required": ["statefulSetName", "leaseName", "leaseDurationSeconds"],
                    "properties": {
                        "statefulSetName": {
                            "type": "string", "minLength": 1, "maxLength": 253, "pattern": DNS1123,
                            "x-kubernetes-validations": [
                                {"rule": "self == oldSelf", "message": "statefulSetName is immutable"}
                            ]
                        },
                        "leaseName": {"type": "string", "minLength": 1, "maxLength": 253, "pattern": DNS1123},
                        "leaseDurationSeconds": {"type": "integer", "format": "int32", "minimum": 1, "maximum": 3600},
                        "paused": {"type": "boolean", "default": false},
                        "failoverDelaySeconds": {"type": "integer", "minimum": 0, "default": 0},
                        "onDelete": {"type": "string", "enum": ["keep-writer", "remove-labels"], "default": "keep-writer"}
                    },
                    "x-kubernetes-validations": [{
                        "rule": "!has(self.failoverDelaySeconds) || self.failoverDelaySeconds < self.leaseDurationSeconds * 10",
                        "message": "failoverDelaySeconds must be shorter than ten lease durations"
                    }]
                },
                "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}
            }
        })
    }

    fn lock_schema() -> Schema {
        match Schema::compile(&lock_schema_json()) {
            Ok(s) => s,
            Err(e) => panic!("lock schema must compile: {e}"),
        }
    }

    fn lock(spec: Value) -> Value {
        json!({
            "apiVersion": "stslock.dev/v1alpha1",
            "kind": "StatefulSetLock",
            "metadata": {"name": "db", "namespace": "default", "resourceVersion": "7"},
            "spec": spec
        })
    }

    fn good_spec() -> Value {
        json!({"statefulSetName": "db", "leaseName": "db-writer", "leaseDurationSeconds": 15})
    }

    fn with_spec(field: &str, value: Value) -> Value {
        let mut spec = good_spec();
        spec[field] = value;
        lock(spec)
    }

    fn c(reason: &'static str, field: &str, message: &str) -> Cause {
        Cause {
            reason,
            field: field.to_string(),
            message: message.to_string(),
        }
    }

    fn blocked() -> Cause {
        c(
            INVALID,
            "<nil>",
            "Invalid value: \"null\": some validation rules were not checked because the object was invalid; correct the existing errors to complete validation",
        )
    }

    fn compile(schema: Value) -> Schema {
        match Schema::compile(&schema) {
            Ok(s) => s,
            Err(e) => panic!("schema must compile: {e}"),
        }
    }

    #[test]
    fn schema_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Schema>();
    }

    #[test]
    fn valid_lock_passes_and_gets_defaults() {
        let s = lock_schema();
        let mut obj = lock(good_spec());
        s.apply_defaults(&mut obj);
        assert_eq!(obj["spec"]["paused"], json!(false));
        assert_eq!(obj["spec"]["failoverDelaySeconds"], json!(0));
        assert_eq!(obj["spec"]["onDelete"], json!("keep-writer"));
        assert!(s.prune(&mut obj).is_empty());
        assert_eq!(s.validate(&obj, None), vec![]);
    }

    #[test]
    fn defaults_replace_non_nullable_nulls_and_other_nulls_are_dropped() {
        let s = lock_schema();
        let mut obj = with_spec("paused", Value::Null);
        obj["spec"]["leaseName"] = Value::Null;
        s.apply_defaults(&mut obj);
        assert_eq!(obj["spec"]["paused"], json!(false));
        assert!(obj["spec"].get("leaseName").is_none());
        assert_eq!(
            s.validate(&obj, None),
            vec![c(REQUIRED, "spec.leaseName", "Required value"), blocked()]
        );
    }

    #[test]
    fn defaults_apply_inside_items_and_additional_properties() {
        let s = compile(json!({
            "type": "object",
            "properties": {
                "list": {"type": "array", "items": {"type": "object", "properties": {
                    "weight": {"type": "integer", "default": 1}
                }}},
                "byName": {"type": "object", "additionalProperties": {"type": "object", "properties": {
                    "enabled": {"type": "boolean", "default": true}
                }}},
                "nested": {"type": "object", "default": {}, "properties": {
                    "inner": {"type": "string", "default": "x"}
                }}
            }
        }));
        let mut obj = json!({"list": [{}, {"weight": 5}], "byName": {"a": {}}});
        s.apply_defaults(&mut obj);
        assert_eq!(
            obj,
            json!({
                "list": [{"weight": 1}, {"weight": 5}],
                "byName": {"a": {"enabled": true}},
                "nested": {"inner": "x"}
            })
        );
    }

    #[test]
    fn out_of_range_integers() {
        let s = lock_schema();
        assert_eq!(
            s.validate(&with_spec("leaseDurationSeconds", json!(5000)), None),
            vec![c(
                INVALID,
                "spec.leaseDurationSeconds",
                "Invalid value: 5000: spec.leaseDurationSeconds in body should be less than or equal to 3600"
            )]
        );
        assert_eq!(
            s.validate(&with_spec("leaseDurationSeconds", json!(0)), None),
            vec![c(
                INVALID,
                "spec.leaseDurationSeconds",
                "Invalid value: 0: spec.leaseDurationSeconds in body should be greater than or equal to 1"
            )]
        );
    }

    #[test]
    fn exclusive_bounds_and_floats() {
        let s = compile(json!({"type": "object", "properties": {
            "ratio": {"type": "number", "minimum": 0, "exclusiveMinimum": true, "maximum": 1.5, "exclusiveMaximum": true}
        }}));
        assert_eq!(
            s.validate(&json!({"ratio": 0}), None),
            vec![c(
                INVALID,
                "ratio",
                "Invalid value: 0: ratio in body should be greater than 0"
            )]
        );
        assert_eq!(
            s.validate(&json!({"ratio": 1.5}), None),
            vec![c(
                INVALID,
                "ratio",
                "Invalid value: 1.5: ratio in body should be less than 1.5"
            )]
        );
        // kube-openapi compares an integer against the bound truncated to int64, so 1 fails an
        // exclusive maximum of 1.5; this quirk is reproduced on purpose.
        assert_eq!(
            s.validate(&json!({"ratio": 1}), None),
            vec![c(
                INVALID,
                "ratio",
                "Invalid value: 1: ratio in body should be less than 1"
            )]
        );
        assert_eq!(s.validate(&json!({"ratio": 0.7}), None), vec![]);
    }

    #[test]
    fn missing_required_field_blocks_rules() {
        let s = lock_schema();
        let obj = lock(json!({"statefulSetName": "db", "leaseDurationSeconds": 15}));
        assert_eq!(
            s.validate(&obj, None),
            vec![c(REQUIRED, "spec.leaseName", "Required value"), blocked()]
        );
    }

    #[test]
    fn wrong_types() {
        let s = lock_schema();
        assert_eq!(
            s.validate(&with_spec("leaseDurationSeconds", json!("30")), None),
            vec![
                c(
                    TYPE_INVALID,
                    "spec.leaseDurationSeconds",
                    "Invalid value: \"string\": spec.leaseDurationSeconds in body must be of type integer: \"string\""
                ),
                blocked()
            ]
        );
        assert_eq!(
            s.validate(&with_spec("leaseDurationSeconds", json!(1.5)), None)[0].message,
            "Invalid value: \"number\": spec.leaseDurationSeconds in body must be of type integer: \"number\""
        );
        assert_eq!(
            s.validate(&with_spec("paused", json!("yes")), None)[0].message,
            "Invalid value: \"string\": spec.paused in body must be of type boolean: \"string\""
        );
        assert_eq!(
            s.validate(&with_spec("leaseName", json!(7)), None)[0].message,
            "Invalid value: \"integer\": spec.leaseName in body must be of type string: \"integer\""
        );
        // A float that is integral passes as an integer, as in kube-openapi.
        assert_eq!(
            s.validate(&with_spec("leaseDurationSeconds", json!(30.0)), None),
            vec![]
        );
    }

    #[test]
    fn string_keywords() {
        let s = lock_schema();
        assert_eq!(
            s.validate(&with_spec("statefulSetName", json!("Bad_Name")), None),
            vec![c(
                INVALID,
                "spec.statefulSetName",
                &format!(
                    "Invalid value: \"Bad_Name\": spec.statefulSetName in body should match '{DNS1123}'"
                )
            )]
        );
        // Only the first failing string keyword is reported: minLength, not pattern.
        assert_eq!(
            s.validate(&with_spec("leaseName", json!("")), None),
            vec![c(
                INVALID,
                "spec.leaseName",
                "Invalid value: \"\": spec.leaseName in body should be at least 1 chars long"
            )]
        );
        assert_eq!(
            s.validate(&with_spec("leaseName", json!("a".repeat(254))), None),
            vec![
                c(
                    TOO_LONG,
                    "spec.leaseName",
                    "Too long: may not be more than 253 bytes"
                ),
                blocked()
            ]
        );
        // Characters, not bytes, are counted.
        assert_eq!(
            compile(
                json!({"type": "object", "properties": {"x": {"type": "string", "maxLength": 2}}})
            )
            .validate(&json!({"x": "éé"}), None),
            vec![]
        );
    }

    #[test]
    fn enum_values() {
        let s = lock_schema();
        assert_eq!(
            s.validate(&with_spec("onDelete", json!("foo")), None),
            vec![
                c(
                    NOT_SUPPORTED,
                    "spec.onDelete",
                    "Unsupported value: \"foo\": supported values: \"keep-writer\", \"remove-labels\""
                ),
                blocked()
            ]
        );
        let s = compile(
            json!({"type": "object", "properties": {"n": {"type": "integer", "enum": [1, 2]}}}),
        );
        assert_eq!(
            s.validate(&json!({"n": 3}), None)[0].message,
            "Unsupported value: 3: supported values: \"1\", \"2\""
        );
    }

    #[test]
    fn immutability_is_a_transition_rule() {
        let s = lock_schema();
        let old = lock(good_spec());
        assert_eq!(s.validate(&old, None), vec![]);
        assert_eq!(s.validate(&old, Some(&old)), vec![]);
        let renamed = with_spec("statefulSetName", json!("db2"));
        assert_eq!(s.validate(&renamed, None), vec![]);
        assert_eq!(
            s.validate(&renamed, Some(&old)),
            vec![c(
                INVALID,
                "spec.statefulSetName",
                "Invalid value: \"string\": statefulSetName is immutable"
            )]
        );
        // No old value at the node (the field was absent before): the rule is skipped.
        let mut old_without = old.clone();
        if let Some(spec) = old_without["spec"].as_object_mut() {
            spec.remove("statefulSetName");
        }
        assert_eq!(s.validate(&renamed, Some(&old_without)), vec![]);
    }

    #[test]
    fn object_rule_with_and_has_and_arithmetic() {
        let s = lock_schema();
        let obj = with_spec("failoverDelaySeconds", json!(300));
        assert_eq!(
            s.validate(&obj, None),
            vec![c(
                INVALID,
                "spec",
                "Invalid value: \"object\": failoverDelaySeconds must be shorter than ten lease durations"
            )]
        );
        assert_eq!(
            s.validate(&with_spec("failoverDelaySeconds", json!(100)), None),
            vec![]
        );
    }

    #[test]
    fn ratcheting_keeps_unchanged_invalid_values() {
        let s = lock_schema();
        let old = with_spec("leaseDurationSeconds", json!(5000));
        let mut new = old.clone();
        new["spec"]["paused"] = json!(true);
        assert_eq!(s.validate(&new, Some(&old)), vec![]);
        new["spec"]["leaseDurationSeconds"] = json!(6000);
        assert_eq!(
            s.validate(&new, Some(&old))[0].message,
            "Invalid value: 6000: spec.leaseDurationSeconds in body should be less than or equal to 3600"
        );
    }

    #[test]
    fn pruning_reports_unknown_fields() {
        let s = lock_schema();
        let mut obj = lock(json!({
            "statefulSetName": "db", "leaseName": "w", "leaseDurationSeconds": 15,
            "foo": 1, "bar": {"x": 1}
        }));
        obj["extra"] = json!(true);
        obj["metadata"]["labels"] = json!({"a": "b"});
        obj["status"] = json!({"anything": {"goes": [1, 2]}});
        let pruned = s.prune(&mut obj);
        assert_eq!(pruned, vec![".extra", ".spec.bar", ".spec.foo"]);
        assert!(obj.get("extra").is_none());
        assert!(obj["spec"].get("foo").is_none());
        assert_eq!(obj["metadata"]["labels"], json!({"a": "b"}));
        assert_eq!(obj["status"], json!({"anything": {"goes": [1, 2]}}));
        assert_eq!(obj["apiVersion"], json!("stslock.dev/v1alpha1"));
    }

    #[test]
    fn pruning_inside_arrays_and_maps() {
        let s = compile(json!({"type": "object", "properties": {
            "items": {"type": "array", "items": {"type": "object", "properties": {"a": {"type": "string"}}}},
            "labels": {"type": "object", "additionalProperties": {"type": "object", "properties": {"v": {"type": "string"}}}},
            "raw": {"type": "object", "x-kubernetes-preserve-unknown-fields": true, "properties": {
                "typed": {"type": "object", "properties": {"k": {"type": "string"}}}
            }}
        }}));
        let mut obj = json!({
            "items": [{"a": "x", "b": 1}],
            "labels": {"one": {"v": "1", "w": 2}},
            "raw": {"free": 1, "typed": {"k": "v", "drop": 1}}
        });
        assert_eq!(
            s.prune(&mut obj),
            vec![".items[0].b", ".labels.one.w", ".raw.typed.drop"]
        );
        assert_eq!(
            obj,
            json!({"items": [{"a": "x"}], "labels": {"one": {"v": "1"}}, "raw": {"free": 1, "typed": {"k": "v"}}})
        );
    }

    #[test]
    fn invalid_message_formats() {
        let one = [c(
            INVALID,
            "spec.leaseDurationSeconds",
            "Invalid value: 5000: spec.leaseDurationSeconds in body should be less than or equal to 3600",
        )];
        assert_eq!(
            invalid_message("StatefulSetLock", "stslock.dev", "db", &one),
            "StatefulSetLock.stslock.dev \"db\" is invalid: spec.leaseDurationSeconds: Invalid value: 5000: spec.leaseDurationSeconds in body should be less than or equal to 3600"
        );
        let two = [
            c(REQUIRED, "spec.leaseName", "Required value"),
            c(REQUIRED, "spec.leaseName", "Required value"),
            blocked(),
        ];
        assert_eq!(
            invalid_message("StatefulSetLock", "stslock.dev", "db", &two),
            "StatefulSetLock.stslock.dev \"db\" is invalid: [spec.leaseName: Required value, <nil>: Invalid value: \"null\": some validation rules were not checked because the object was invalid; correct the existing errors to complete validation]"
        );
        assert_eq!(invalid_message("Pod", "", "p", &[]), "Pod \"p\" is invalid");
    }

    #[test]
    fn list_types_detect_duplicates() {
        let s = compile(json!({"type": "object", "properties": {
            "tags": {"type": "array", "x-kubernetes-list-type": "set", "items": {"type": "string"}},
            "ports": {"type": "array", "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"],
                "items": {"type": "object", "properties": {"name": {"type": "string"}, "port": {"type": "integer"}}}}
        }}));
        let obj = json!({
            "tags": ["a", "b", "a", "a"],
            "ports": [{"name": "http", "port": 80}, {"name": "http", "port": 81}]
        });
        assert_eq!(
            s.validate(&obj, None),
            vec![
                c(
                    DUPLICATE,
                    "ports[1]",
                    "Duplicate value: map[string]interface {}{\"name\":\"http\"}"
                ),
                c(DUPLICATE, "tags[2]", "Duplicate value: \"a\""),
            ]
        );
    }

    #[test]
    fn arrays_and_objects_counts() {
        let s = compile(json!({"type": "object", "properties": {
            "xs": {"type": "array", "maxItems": 3, "minItems": 1, "items": {"type": "integer"}},
            "m": {"type": "object", "minProperties": 1, "additionalProperties": {"type": "string"}}
        }}));
        assert_eq!(
            s.validate(&json!({"xs": [1, 2, 3, 4, 5]}), None),
            vec![c(TOO_MANY, "xs", "Too many: 5: must have at most 3 items")]
        );
        assert_eq!(
            s.validate(&json!({"xs": [], "m": {}}), None),
            vec![
                c(
                    INVALID,
                    "m",
                    "Invalid value: 0: m in body should have at least 1 properties"
                ),
                c(
                    INVALID,
                    "xs",
                    "Invalid value: 0: xs in body should have at least 1 items"
                ),
            ]
        );
        assert_eq!(
            s.validate(&json!({"xs": [1, "two"], "m": {"k": 1}}), None),
            vec![
                c(
                    TYPE_INVALID,
                    "m.k",
                    "Invalid value: \"integer\": m.k in body must be of type string: \"integer\""
                ),
                c(
                    TYPE_INVALID,
                    "xs[1]",
                    "Invalid value: \"string\": xs[1] in body must be of type integer: \"string\""
                ),
            ]
        );
    }

    #[test]
    fn nullable_int_or_string_and_formats() {
        let s = compile(json!({"type": "object", "properties": {
            "maybe": {"type": "string", "nullable": true},
            "port": {"x-kubernetes-int-or-string": true},
            "at": {"type": "string", "format": "date-time"},
            "id": {"type": "string", "format": "uuid"},
            "n": {"type": "integer", "format": "int32"}
        }}));
        let ok = json!({
            "maybe": null, "port": "http", "at": "2024-02-29T10:00:00Z",
            "id": "123e4567-e89b-12d3-a456-426614174000", "n": 5_000_000_000i64
        });
        assert_eq!(s.validate(&ok, None), vec![]);
        assert_eq!(s.validate(&json!({"port": 80}), None), vec![]);
        assert_eq!(
            s.validate(&json!({"port": true}), None),
            vec![c(
                TYPE_INVALID,
                "port",
                "Invalid value: \"boolean\": port in body must be of type integer,string: \"boolean\""
            )]
        );
        assert_eq!(
            s.validate(&json!({"at": "2023-02-29T10:00:00Z"}), None),
            vec![c(
                TYPE_INVALID,
                "at",
                "Invalid value: \"2023-02-29T10:00:00Z\": at in body must be of type date-time: \"2023-02-29T10:00:00Z\""
            )]
        );
        let mut with_null = json!({"maybe": null, "at": null});
        s.apply_defaults(&mut with_null);
        assert_eq!(with_null, json!({"maybe": null}));
    }

    #[test]
    fn any_of_reports_composite_failure() {
        let s = compile(json!({"type": "object", "properties": {
            "spec": {"type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "string"}},
                "anyOf": [{"required": ["a"]}, {"required": ["b"]}]}
        }}));
        assert_eq!(s.validate(&json!({"spec": {"a": "x"}}), None), vec![]);
        assert_eq!(
            s.validate(&json!({"spec": {}}), None),
            vec![
                c(
                    INVALID,
                    "<nil>",
                    "Invalid value: \"\": \"spec\" must validate at least one schema (anyOf)"
                ),
                c(REQUIRED, "spec.a", "Required value"),
            ]
        );
    }

    #[test]
    fn invalid_pattern_fails_values_not_the_schema() {
        let s = compile(
            json!({"type": "object", "properties": {"x": {"type": "string", "pattern": "a(b"}}}),
        );
        let causes = s.validate(&json!({"x": "ab"}), None);
        assert_eq!(causes.len(), 1);
        assert!(
            causes[0].message.starts_with(
                "Invalid value: \"ab\": x in body should match 'a(b, but pattern is invalid: "
            ),
            "{causes:?}"
        );
    }

    #[test]
    fn go_regex_keeps_go_semantics() {
        let re = |p: &str| match go_regex(p) {
            Ok(r) => r,
            Err(e) => panic!("{p}: {e}"),
        };
        assert!(!re(r"^\d+$").is_match("٣"));
        assert!(re(r"^\d+$").is_match("42"));
        assert!(re(r"^[\w.-]+$").is_match("a_b.c-d"));
        assert!(!re(r"^\w+$").is_match("é"));
        assert!(re(r"\bfoo\b").is_match("a foo b"));
        assert!(re(r"^a{2}$").is_match("aa"));
        assert!(re(r"^{}$").is_match("{}"));
        assert!(re(r"^[[a]+$").is_match("[a["));
        assert!(re(r"^[]a]+$").is_match("]a"));
        assert!(re(r"^[[:alpha:]]+$").is_match("abc"));
    }

    #[test]
    fn go_rendering() {
        assert_eq!(go_float(3600.0), "3600");
        assert_eq!(go_float(0.5), "0.5");
        assert_eq!(go_float(123456.0), "123456");
        assert_eq!(go_float(1e6), "1e+06");
        assert_eq!(go_float(1234567.0), "1.234567e+06");
        assert_eq!(go_float(0.0001), "0.0001");
        assert_eq!(go_float(0.00001), "1e-05");
        assert_eq!(go_float(1.5e300), "1.5e+300");
        assert_eq!(go_float(-2.5), "-2.5");
        assert_eq!(go_quote("a\"b\\\n\u{1}é"), "\"a\\\"b\\\\\\n\\x01é\"");
        assert_eq!(
            go_value(&json!({"b": [1, null], "a": "x"})),
            "map[string]interface {}{\"a\":\"x\", \"b\":[]interface {}{1, interface {}(nil)}}"
        );
        assert_eq!(
            go_value(&json!(18446744073709551615u64)),
            "1.8446744073709552e+19"
        );
    }

    fn cel_eval(src: &str, self_json: Value) -> Result<cel::Val, String> {
        let expr = cel::parse(src)?;
        cel::check(&expr)?;
        let v = json_to_cel(&self_json);
        let mut env = cel::Env::new(&v, None);
        cel::eval(&expr, &mut env)
    }

    fn cel_true(src: &str, self_json: Value) -> bool {
        match cel_eval(src, self_json) {
            Ok(cel::Val::Bool(b)) => b,
            other => panic!("{src}: {other:?}"),
        }
    }

    #[test]
    fn cel_expressions() {
        let obj = json!({"a": 3, "b": "x", "name": "db-0", "list": ["a", "b", "c"], "m": {"k": 1}, "r": 0.5});
        for rule in [
            "self.a > 1 && self.b == 'x'",
            "!has(self.c) && has(self.a)",
            "size(self.list) == 3 && self.list.size() == 3 && size(self.name) == 4",
            "(self.a > 1 ? 'big' : 'small') == 'big'",
            "'b' in self.list && 'k' in self.m && !('z' in self.list)",
            "self.name.startsWith('db') && self.name.endsWith('-0') && self.name.contains('b-')",
            "self.name.matches('^[a-z]+-[0-9]$') && matches(self.name, 'db')",
            "self.list.all(x, x != '') && self.list.exists(x, x == 'b') && self.list.exists_one(x, x == 'c')",
            "self.list.map(x, x + '!') == ['a!', 'b!', 'c!'] && self.list.filter(x, x > 'a') == ['b', 'c']",
            "[1, 2, 3].map(x, x > 1, x * 2) == [4, 6]",
            "{'a': 1}['a'] == 1 && self.m['k'] == 1 && self.list[1] == 'b'",
            "1 == 1.0 && 1 < 1.5 && 2u > 1 && self.r < 1",
            "-9223372036854775808 < 0 && -self.a == -3 && 7 % 4 == 3 && 7 / 2 == 3 && 0x10 == 16",
            "\"dq\" + 'sq' + r'\\d' == 'dqsq\\\\d' && '''tri\nple''' == 'tri\\nple'",
            "int('42') == 42 && string(42) == '42' && double(1) == 1.0 && self.b.upperAscii() == 'X'",
            "['a', 'b'].join('-') == 'a-b' && ' x '.trim() == 'x'",
            "!(false && self.missing == 1)",
            "self.missing == 1 || true",
            "self.m.all(k, k == 'k')",
            "null == null && self.list != []",
        ] {
            assert!(cel_true(rule, obj.clone()), "{rule}");
        }
        assert!(!cel_true("self.a < 2 || self.b == 'y'", obj.clone()));
    }

    #[test]
    fn cel_runtime_errors() {
        let obj = json!({"a": 1, "list": [1]});
        let err = |src: &str| match cel_eval(src, obj.clone()) {
            Err(e) => e,
            Ok(v) => panic!("{src} evaluated to {v:?}"),
        };
        assert_eq!(err("self.missing == 1"), "no such key: missing");
        assert_eq!(err("self.list[3] == 1"), "index out of bounds: 3");
        assert_eq!(err("1 / 0 == 1"), "division by zero");
        assert_eq!(err("1 % 0 == 1"), "modulus by zero");
        assert_eq!(err("9223372036854775807 + 1 > 0"), "integer overflow");
        assert_eq!(err("'a' + 1 == 'a1'"), "no such overload");
        assert_eq!(err("self.a < 'b'"), "no such overload");
        assert_eq!(err("true && self.missing"), "no such key: missing");
    }

    #[test]
    fn cel_compile_errors() {
        for (rule, expected) in [
            ("self ==", "Syntax error"),
            ("self.a = 1", "token recognition error"),
            ("foo(self)", "undeclared reference to 'foo'"),
            ("bar == 1", "undeclared reference to 'bar'"),
            (
                "self.x.frobnicate()",
                "undeclared reference to 'frobnicate'",
            ),
            ("self.matches('a(')", "invalid regular expression"),
            ("has(self)", "invalid argument to has() macro"),
            ("'unterminated", "unterminated string"),
        ] {
            let schema = json!({"type": "object", "x-kubernetes-validations": [{"rule": rule}]});
            match Schema::compile(&schema) {
                Ok(_) => panic!("{rule} compiled"),
                Err(e) => {
                    assert!(e.contains(expected), "{rule}: {e}");
                    assert!(
                        e.starts_with("x-kubernetes-validations[0].rule: Invalid value: "),
                        "{e}"
                    );
                }
            }
        }
    }

    #[test]
    fn schema_compile_errors() {
        let err = |schema: Value| match Schema::compile(&schema) {
            Ok(_) => panic!("compiled: {schema}"),
            Err(e) => e,
        };
        assert_eq!(
            err(
                json!({"type": "object", "properties": {"xs": {"type": "array", "uniqueItems": true, "items": {"type": "string"}}}})
            ),
            "properties[xs].uniqueItems: Forbidden: uniqueItems cannot be set to true since the runtime complexity becomes quadratic"
        );
        assert!(
            err(
                json!({"type": "object", "properties": {"xs": {"type": "array", "items": {
                    "type": "string", "x-kubernetes-validations": [{"rule": "self == oldSelf"}]
                }}}})
            )
            .contains("oldSelf cannot be used on the uncorrelatable portion of the schema")
        );
        assert!(err(json!({"type": "thing"})).starts_with("type: Unsupported value: \"thing\""));
        assert!(err(json!({"type": "object", "x-kubernetes-validations": [{"rule": "true", "reason": "Nope"}]}))
            .contains("reason: Unsupported value: \"Nope\""));
        assert!(err(json!({"type": "object", "x-kubernetes-validations": [{"rule": "true", "fieldPath": ".nope"}]}))
            .contains("fieldPath must be a valid path"));
        // oldSelf on list-map items is fine: they correlate by key.
        compile(
            json!({"type": "object", "properties": {"xs": {"type": "array",
            "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"],
            "items": {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}},
                "x-kubernetes-validations": [{"rule": "self == oldSelf"}]}}}}),
        );
    }

    #[test]
    fn rule_options_reason_field_path_message_expression() {
        let s = compile(
            json!({"type": "object", "properties": {"spec": {"type": "object",
            "properties": {"min": {"type": "integer"}, "max": {"type": "integer"}, "name": {"type": "string"}},
            "x-kubernetes-validations": [
                {"rule": "self.min <= self.max", "fieldPath": ".min", "reason": "FieldValueForbidden",
                 "messageExpression": "'min ' + string(self.min) + ' exceeds max ' + string(self.max)"},
                {"rule": "self.name != 'x'"},
                {"rule": "self.missing > 0", "message": "needs missing"}
            ]}}}),
        );
        assert_eq!(
            s.validate(&json!({"spec": {"min": 5, "max": 1, "name": "x"}}), None),
            vec![
                c(FORBIDDEN, "spec.min", "Forbidden: min 5 exceeds max 1"),
                c(
                    INVALID,
                    "spec",
                    "Invalid value: \"object\": failed rule: self.name != 'x'"
                ),
                c(
                    INVALID,
                    "spec",
                    "Invalid value: \"object\": no such key: missing evaluating rule: needs missing"
                ),
            ]
        );
    }

    #[test]
    fn root_rules_see_metadata_name_and_report_nil_field() {
        let s = compile(json!({"type": "object",
            "properties": {"metadata": {"type": "object"}, "spec": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}},
            "x-kubernetes-validations": [{"rule": "self.metadata.name.startsWith('db')", "message": "name must start with db"},
                                          {"rule": "!has(self.metadata.__namespace__)"}]
        }));
        assert_eq!(s.validate(&lock(json!({})), None), vec![]);
        let mut other = lock(json!({}));
        other["metadata"]["name"] = json!("web");
        assert_eq!(
            s.validate(&other, None),
            vec![c(
                INVALID,
                "<nil>",
                "Invalid value: \"object\": name must start with db"
            )]
        );
    }

    #[test]
    fn rule_failures_ratchet_but_transition_rules_do_not() {
        let s = compile(json!({"type": "object", "properties": {
            "spec": {"type": "object", "properties": {"replicas": {"type": "integer"}, "note": {"type": "string"}},
                "x-kubernetes-validations": [{"rule": "self.replicas <= 5", "message": "too many"}]},
            "blob": {"x-kubernetes-preserve-unknown-fields": true,
                "x-kubernetes-validations": [{"rule": "self == oldSelf", "message": "blob is immutable"}]},
            "count": {"type": "integer",
                "x-kubernetes-validations": [{"rule": "self > oldSelf", "message": "must grow"}]}
        }}));
        let old = json!({"spec": {"replicas": 9}, "blob": {"a": [1, 2]}, "count": 3});
        assert_eq!(
            s.validate(&old, None),
            vec![c(INVALID, "spec", "Invalid value: \"object\": too many")]
        );
        // Unchanged spec: the failing non-transition rule is ratcheted; the unchanged count still
        // fails its transition rule, which never ratchets.
        assert_eq!(
            s.validate(&old, Some(&old)),
            vec![c(INVALID, "count", "Invalid value: \"integer\": must grow")]
        );
        let mut new = old.clone();
        new["spec"]["note"] = json!("changed");
        new["blob"] = json!({"a": [1, 3]});
        new["count"] = json!(4);
        assert_eq!(
            s.validate(&new, Some(&old)),
            vec![
                c(INVALID, "blob", "Invalid value: \"\": blob is immutable"),
                c(INVALID, "spec", "Invalid value: \"object\": too many"),
            ]
        );
    }

    #[test]
    fn message_expression_falls_back_and_overload_errors_are_explained() {
        let s = compile(
            json!({"type": "object", "properties": {"spec": {"type": "object",
            "properties": {"port": {"x-kubernetes-int-or-string": true}},
            "x-kubernetes-validations": [
                {"rule": "self.port != 'bad'", "messageExpression": "''", "message": "port is bad"},
                {"rule": "self.port > 0", "reason": "FieldValueDuplicate"}
            ]}}}),
        );
        assert_eq!(
            s.validate(&json!({"spec": {"port": "bad"}}), None),
            vec![
                c(INVALID, "spec", "Invalid value: \"object\": port is bad"),
                c(
                    INVALID,
                    "spec",
                    "Invalid value: \"object\": 'no such overload': call arguments did not match a supported operator, function or macro signature for rule: self.port > 0"
                ),
            ]
        );
        assert_eq!(
            s.validate(&json!({"spec": {"port": 0}}), None),
            vec![c(DUPLICATE, "spec", "Duplicate value: \"object\"")]
        );
    }

    #[test]
    fn transition_rules_on_list_map_items_and_map_values() {
        let s = compile(json!({"type": "object", "properties": {
            "xs": {"type": "array", "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"],
                "items": {"type": "object", "properties": {"name": {"type": "string"}, "v": {"type": "integer"}},
                    "x-kubernetes-validations": [{"rule": "self.v >= oldSelf.v", "message": "v may not decrease"}]}},
            "byName": {"type": "object", "additionalProperties": {"type": "integer",
                "x-kubernetes-validations": [{"rule": "self >= oldSelf"}]}}
        }}));
        let old = json!({"xs": [{"name": "a", "v": 2}, {"name": "b", "v": 2}], "byName": {"k": 3}});
        let new = json!({"xs": [{"name": "b", "v": 1}, {"name": "c", "v": 0}, {"name": "a", "v": 3}], "byName": {"k": 2, "new": 0}});
        assert_eq!(
            s.validate(&new, Some(&old)),
            vec![
                c(
                    INVALID,
                    "byName[k]",
                    "Invalid value: \"integer\": failed rule: self >= oldSelf"
                ),
                c(
                    INVALID,
                    "xs[0]",
                    "Invalid value: \"object\": v may not decrease"
                ),
            ]
        );
    }
}
