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

mod cel;
mod fields;
mod gofmt;
mod goregex;
mod list_types;
mod openapi;
mod prune;
mod rules;
#[cfg(test)]
mod tests;

use fields::*;
use gofmt::*;
use goregex::*;
use list_types::*;
use openapi::*;
use prune::*;
use rules::*;

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
