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
