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
        compile(json!({"type": "object", "properties": {"x": {"type": "string", "maxLength": 2}}}))
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
    let obj =
        json!({"a": 3, "b": "x", "name": "db-0", "list": ["a", "b", "c"], "m": {"k": 1}, "r": 0.5});
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
