//! OpenAPI v3 documents per group-version (`/openapi/v3`, `/openapi/v3/apis/<g>/<v>`).
//!
//! What clients need from them, and so what is modelled:
//! - kubectl's validation (`--validate=strict`, the default) first checks whether the server
//!   validates fields itself: it looks for a PATCH operation tagged with the kind's
//!   `x-kubernetes-group-version-kind` that accepts the `fieldValidation` query parameter. It
//!   does, so kubectl sends `fieldValidation=Strict` and kubesim rejects unknown fields of
//!   custom resources with the apiserver's message.
//! - `kubectl explain` renders the schema whose `x-kubernetes-group-version-kind` matches:
//!   the CRD's own schema for custom resources, a short description for built-in kinds.
//! - PATCH operations do not advertise strategic merge patch, so `kubectl apply` computes
//!   strategic patches for built-in kinds from its compiled-in types, as it does against an
//!   apiserver whose OpenAPI lacks patch metadata.

use serde_json::{Map, Value, json};

use crate::registry::{Registry, ResourceType};

fn gv_path(group: &str, version: &str) -> String {
    if group.is_empty() {
        format!("api/{version}")
    } else {
        format!("apis/{group}/{version}")
    }
}

/// Name of a kind's schema in `components.schemas` (the apiserver's naming).
fn schema_name(rt: &ResourceType) -> String {
    if rt.crd.is_some() {
        let rev: Vec<&str> = rt.group.split('.').rev().collect();
        format!("{}.{}.{}", rev.join("."), rt.version, rt.kind)
    } else {
        let pkg = match rt.group.as_str() {
            "" => "core".to_string(),
            g => g.split('.').next().unwrap_or(g).to_string(),
        };
        let prefix = if rt.group == "apiextensions.k8s.io" {
            "io.k8s.apiextensions-apiserver.pkg.apis.apiextensions".to_string()
        } else {
            format!("io.k8s.api.{pkg}")
        };
        format!("{prefix}.{}.{}", rt.version, rt.kind)
    }
}

fn fnv(s: &str) -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100000001b3);
    }
    format!("{h:016X}")
}

pub fn index(reg: &Registry) -> Value {
    let mut paths = Map::new();
    let mut gvs: Vec<(String, String)> = vec![("".into(), "v1".into())];
    for (g, vs) in reg.groups() {
        for v in vs {
            gvs.push((g.clone(), v));
        }
    }
    for (g, v) in gvs {
        let p = gv_path(&g, &v);
        if let Some(doc) = document(reg, &p) {
            let hash = fnv(&doc.to_string());
            paths.insert(
                p.clone(),
                json!({"serverRelativeURL": format!("/openapi/v3/{p}?hash={hash}")}),
            );
        }
    }
    json!({"paths": paths})
}

fn gvk(rt: &ResourceType) -> Value {
    json!({"group": rt.group, "version": rt.version, "kind": rt.kind})
}

fn param(name: &str, desc: &str) -> Value {
    json!({"name": name, "in": "query", "description": desc, "schema": {"type": "string", "uniqueItems": true}})
}

fn object_meta_schema() -> Value {
    json!({
        "description": "Standard object's metadata. More info: https://git.k8s.io/community/contributors/devel/sig-architecture/api-conventions.md#metadata",
        "type": "object",
        "properties": {
            "name": {"type": "string", "description": "Name must be unique within a namespace."},
            "namespace": {"type": "string", "description": "Namespace defines the space within which each name must be unique."},
            "labels": {"type": "object", "additionalProperties": {"type": "string"}, "description": "Map of string keys and values that can be used to organize and categorize (scope and select) objects."},
            "annotations": {"type": "object", "additionalProperties": {"type": "string"}, "description": "Annotations is an unstructured key value map stored with a resource that may be set by external tools to store and retrieve arbitrary metadata."},
            "finalizers": {"type": "array", "items": {"type": "string"}, "description": "Must be empty before the object is deleted from the registry."},
            "uid": {"type": "string", "description": "UID is the unique in time and space value for this object."},
            "resourceVersion": {"type": "string", "description": "An opaque value that represents the internal version of this object."},
            "generation": {"type": "integer", "format": "int64", "description": "A sequence number representing a specific generation of the desired state."},
            "creationTimestamp": {"type": "string", "format": "date-time", "description": "CreationTimestamp is a timestamp representing the server time when this object was created."},
            "deletionTimestamp": {"type": "string", "format": "date-time", "description": "DeletionTimestamp is RFC 3339 date and time at which this resource will be deleted."},
            "ownerReferences": {"type": "array", "items": {"type": "object"}, "description": "List of objects depended by this object."}
        }
    })
}

fn kind_schema(rt: &ResourceType) -> Value {
    let mut schema = match rt.crd.as_ref().and_then(|c| c.raw_schema.clone()) {
        Some(s) => s,
        None => {
            let mut props = json!({
                "spec": {"type": "object", "description": format!("Spec defines the desired state of the {}.", rt.kind), "x-kubernetes-preserve-unknown-fields": true},
            });
            if rt.status {
                props["status"] = json!({"type": "object", "description": format!("Most recently observed status of the {}.", rt.kind), "x-kubernetes-preserve-unknown-fields": true});
            }
            json!({"type": "object", "description": rt.description, "properties": props})
        }
    };
    if let Value::Object(m) = &mut schema {
        if !m.contains_key("description") {
            m.insert("description".into(), json!(rt.description));
        }
        let props = m.entry("properties").or_insert_with(|| json!({}));
        if let Value::Object(p) = props {
            p.insert("apiVersion".into(), json!({"type": "string", "description": "APIVersion defines the versioned schema of this representation of an object."}));
            p.insert("kind".into(), json!({"type": "string", "description": "Kind is a string value representing the REST resource this object represents."}));
            p.insert("metadata".into(), object_meta_schema());
        }
        m.insert("x-kubernetes-group-version-kind".into(), json!([gvk(rt)]));
    }
    schema
}

fn operations(rt: &ResourceType, item: bool) -> Value {
    let ref_ = json!({"$ref": format!("#/components/schemas/{}", schema_name(rt))});
    let ok = |d: &str| json!({"200": {"description": d, "content": {"application/json": {"schema": ref_.clone()}}}});
    let tag = rt.group.replace('.', "_");
    let op = |action: &str, params: Vec<Value>, body: Option<Value>| {
        let mut o = json!({
            "tags": [tag],
            "description": format!("{action} {}", rt.kind),
            "operationId": format!("{action}{}", rt.kind),
            "parameters": params,
            "responses": ok("OK"),
            "x-kubernetes-action": action,
            "x-kubernetes-group-version-kind": gvk(rt),
        });
        if let Some(b) = body {
            o["requestBody"] = b;
        }
        o
    };
    let write_params = || {
        vec![
            param(
                "dryRun",
                "When present, indicates that modifications should not be persisted.",
            ),
            param(
                "fieldManager",
                "fieldManager is a name associated with the actor or entity that is making these changes.",
            ),
            param(
                "fieldValidation",
                "fieldValidation instructs the server on how to handle objects in the request containing unknown or duplicate fields. Valid values are: Ignore, Warn, Strict.",
            ),
        ]
    };
    let json_body = json!({"content": {"*/*": {"schema": ref_.clone()}}, "required": true});
    if item {
        let mut patch_params = write_params();
        patch_params.push(param(
            "force",
            "Force is going to \"force\" Apply requests.",
        ));
        let patch_body = json!({"content": {
            "application/apply-patch+yaml": {"schema": {"type": "object"}},
            "application/json-patch+json": {"schema": {"type": "object"}},
            "application/merge-patch+json": {"schema": {"type": "object"}}
        }, "required": true});
        json!({
            "get": op("get", vec![], None),
            "put": op("put", write_params(), Some(json_body)),
            "patch": op("patch", patch_params, Some(patch_body)),
            "delete": op("delete", vec![param("gracePeriodSeconds", "The duration in seconds before the object should be deleted."), param("propagationPolicy", "Whether and how garbage collection will be performed.")], None),
            "parameters": [
                {"name": "name", "in": "path", "required": true, "description": format!("name of the {}", rt.kind), "schema": {"type": "string", "uniqueItems": true}}
            ]
        })
    } else {
        json!({
            "get": op("list", vec![param("labelSelector", "A selector to restrict the list of returned objects by their labels."), param("fieldSelector", "A selector to restrict the list of returned objects by their fields."), param("watch", "Watch for changes to the described resources.")], None),
            "post": op("post", write_params(), Some(json_body)),
        })
    }
}

/// The document for `api/v1` or `apis/<group>/<version>`, None when not served.
pub fn document(reg: &Registry, gv: &str) -> Option<Value> {
    let segs: Vec<&str> = gv.split('/').collect();
    let (group, version) = match segs.as_slice() {
        ["api", v] => ("", *v),
        ["apis", g, v] => (*g, *v),
        _ => return None,
    };
    let mut paths = Map::new();
    let mut schemas = Map::new();
    let base = gv_path(group, version);
    for rt in reg.in_group_version(group, version) {
        let collection = if rt.namespaced {
            format!("/{base}/namespaces/{{namespace}}/{}", rt.plural)
        } else {
            format!("/{base}/{}", rt.plural)
        };
        paths.insert(collection.clone(), operations(rt, false));
        paths.insert(format!("{collection}/{{name}}"), operations(rt, true));
        if rt.status {
            paths.insert(
                format!("{collection}/{{name}}/status"),
                operations(rt, true),
            );
        }
        schemas.insert(schema_name(rt), kind_schema(rt));
    }
    if paths.is_empty() {
        return None;
    }
    Some(json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": format!("v1.{}.0", crate::discovery::KUBE_MINOR)},
        "paths": paths,
        "components": {"schemas": schemas},
    }))
}

/// Rewrite v3 `$ref`s (`#/components/schemas/X`) as v2 ones (`#/definitions/X`).
fn v2_refs(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .map(|(k, x)| {
                    let x = match (k.as_str(), x) {
                        ("$ref", Value::String(r)) => {
                            json!(r.replace("#/components/schemas/", "#/definitions/"))
                        }
                        _ => v2_refs(x),
                    };
                    (k.clone(), x)
                })
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(v2_refs).collect()),
        other => other.clone(),
    }
}

/// One v3 operation as a Swagger 2.0 operation: parameters typed inline, the request body as
/// a `body` parameter and `consumes`.
fn v2_operation(op: &Value, strategic: bool) -> Value {
    let mut out = Map::new();
    for k in [
        "tags",
        "description",
        "operationId",
        "x-kubernetes-action",
        "x-kubernetes-group-version-kind",
    ] {
        if let Some(v) = op.get(k) {
            out.insert(k.into(), v.clone());
        }
    }
    let mut params: Vec<Value> = op
        .get("parameters")
        .and_then(Value::as_array)
        .map(|ps| ps.iter().map(v2_parameter).collect())
        .unwrap_or_default();
    if let Some(body) = op.get("requestBody") {
        let content = body.get("content").and_then(Value::as_object);
        let mut consumes: Vec<String> = content
            .map(|c| c.keys().cloned().collect())
            .unwrap_or_default();
        if op.get("x-kubernetes-action").and_then(Value::as_str) == Some("patch") {
            // The apiserver's order; built-in kinds also take strategic merge patches.
            consumes = vec![
                "application/json-patch+json".into(),
                "application/merge-patch+json".into(),
            ];
            if strategic {
                consumes.push("application/strategic-merge-patch+json".into());
            }
            consumes.push("application/apply-patch+yaml".into());
        }
        let schema = content
            .and_then(|c| c.values().next())
            .and_then(|m| m.get("schema"))
            .cloned()
            .unwrap_or(json!({"type": "object"}));
        params.push(
            json!({"name": "body", "in": "body", "required": true, "schema": v2_refs(&schema)}),
        );
        out.insert("consumes".into(), json!(consumes));
    }
    out.insert("parameters".into(), json!(params));
    out.insert(
        "produces".into(),
        json!([
            "application/json",
            "application/yaml",
            "application/vnd.kubernetes.protobuf"
        ]),
    );
    out.insert("schemes".into(), json!(["https"]));
    if let Some(r) = op.get("responses") {
        let mut rs = Map::new();
        if let Some(m) = r.as_object() {
            for (code, resp) in m {
                let schema = resp
                    .pointer("/content/application~1json/schema")
                    .cloned()
                    .unwrap_or(json!({}));
                rs.insert(
                    code.clone(),
                    json!({"description": resp.get("description").cloned().unwrap_or(json!("OK")), "schema": v2_refs(&schema)}),
                );
            }
        }
        out.insert("responses".into(), Value::Object(rs));
    }
    Value::Object(out)
}

fn v2_parameter(p: &Value) -> Value {
    let mut out = Map::new();
    for k in ["name", "in", "description", "required"] {
        if let Some(v) = p.get(k) {
            out.insert(k.into(), v.clone());
        }
    }
    if let Some(Value::Object(s)) = p.get("schema") {
        for (k, v) in s {
            out.insert(k.clone(), v.clone());
        }
    }
    Value::Object(out)
}

/// `/openapi/v2`: one Swagger 2.0 document for every served group-version, derived from the
/// v3 documents (what older clients and tools read: definitions with
/// `x-kubernetes-group-version-kind`, paths with their verbs and patch types).
pub fn v2(reg: &Registry) -> Value {
    let mut gvs: Vec<(String, String)> = vec![("".into(), "v1".into())];
    for (g, vs) in reg.groups() {
        for v in vs {
            gvs.push((g.clone(), v));
        }
    }
    let mut paths = Map::new();
    let mut definitions = Map::new();
    for (g, v) in gvs {
        let Some(doc) = document(reg, &gv_path(&g, &v)) else {
            continue;
        };
        let custom = reg.in_group_version(&g, &v).any(|rt| rt.crd.is_some());
        if let Some(Value::Object(s)) = doc.pointer("/components/schemas") {
            for (name, schema) in s {
                definitions.insert(name.clone(), v2_refs(schema));
            }
        }
        if let Some(Value::Object(ps)) = doc.get("paths") {
            for (path, item) in ps {
                let mut out = Map::new();
                if let Some(m) = item.as_object() {
                    for (verb, op) in m {
                        if verb == "parameters" {
                            let params: Vec<Value> = op
                                .as_array()
                                .map(|a| a.iter().map(v2_parameter).collect())
                                .unwrap_or_default();
                            out.insert(verb.clone(), json!(params));
                        } else {
                            out.insert(verb.clone(), v2_operation(op, !custom));
                        }
                    }
                }
                paths.insert(path.clone(), Value::Object(out));
            }
        }
    }
    json!({
        "swagger": "2.0",
        "info": {"title": "Kubernetes", "version": format!("v1.{}.0", crate::discovery::KUBE_MINOR)},
        "paths": paths,
        "definitions": definitions,
    })
}
