//! Per-kind defaulting and validation on the write path, and what a commit of some kinds
//! implies for the registry (a CRD starts or stops being served).
//!
//! Only what clients of this project can observe is modelled: name rules, the fields the
//! apiserver defaults that kubectl prints or operators read, immutability rules that decide
//! whether a write is accepted, and CRD schemas (through [`crate::schema`]).

use std::sync::Arc;

use serde_json::{Value, json};

use crate::error::{ApiError, ApiResult};
use crate::meta;
use crate::registry::{CrdVersion, ResourceType, ScalePaths};
use crate::schema::Schema;
use crate::store::{State, Store, WriteOpts};

type Cause = (String, String, String);

fn invalid_value(field: &str, value: &Value, detail: &str) -> Cause {
    (
        "FieldValueInvalid".into(),
        field.into(),
        format!("Invalid value: {}: {detail}", value),
    )
}

fn validate_name(rt: &ResourceType, name: &str) -> Vec<Cause> {
    let label_kinds = rt.group.is_empty() && (rt.plural == "namespaces" || rt.plural == "services");
    let msgs = if label_kinds {
        meta::dns1123_label_errors(name)
    } else if rt.group.is_empty() && rt.plural == "events" {
        vec![]
    } else {
        meta::dns1123_subdomain_errors(name)
    };
    msgs.iter()
        .map(|m| invalid_value("metadata.name", &json!(name), m))
        .collect()
}

pub const CRD_CLEANUP_FINALIZER: &str = "customresourcecleanup.apiextensions.k8s.io";

/// Finalizer names the apiserver knows without a domain prefix.
const STANDARD_FINALIZERS: &[&str] = &["kubernetes", "orphan", "foregroundDeletion"];

/// `ValidateObjectMeta`'s checks of labels, annotations and finalizers.
fn validate_meta(obj: &Value, causes: &mut Vec<Cause>) {
    let Some(m) = meta::meta(obj) else { return };
    if let Some(labels) = m.get("labels").and_then(Value::as_object) {
        for (k, v) in labels {
            for msg in meta::qualified_name_errors(k) {
                causes.push(invalid_value("metadata.labels", &json!(k), &msg));
            }
            let v = v.as_str().unwrap_or("");
            for msg in meta::label_value_errors(v) {
                causes.push(invalid_value("metadata.labels", &json!(v), &msg));
            }
        }
    }
    if let Some(ann) = m.get("annotations").and_then(Value::as_object) {
        for k in ann.keys() {
            for msg in meta::qualified_name_errors(&k.to_lowercase()) {
                causes.push(invalid_value("metadata.annotations", &json!(k), &msg));
            }
        }
    }
    for (i, f) in meta::finalizers(obj).iter().enumerate() {
        let errs = meta::qualified_name_errors(f);
        for msg in &errs {
            causes.push(invalid_value("metadata.finalizers", &json!(f), msg));
        }
        if !f.contains('/') && !STANDARD_FINALIZERS.contains(&f.as_str()) {
            causes.push(invalid_value(
                &format!("metadata.finalizers[{i}]"),
                &json!(f),
                "name is neither a standard finalizer name nor is it fully qualified",
            ));
        }
    }
}

/// Labels and annotations are maps of strings: anything else fails decoding (400), before
/// validation.
pub fn check_meta_types(rt: &ResourceType, obj: &Value) -> ApiResult<()> {
    for field in ["labels", "annotations"] {
        let Some(m) = meta::meta(obj).and_then(|m| m.get(field)) else {
            continue;
        };
        let bad = match m {
            Value::Null => None,
            Value::Object(map) => map.values().find(|v| !v.is_string()),
            other => Some(other),
        };
        if let Some(v) = bad {
            let t = match v {
                Value::Bool(_) => "bool",
                Value::Number(_) => "number",
                Value::Array(_) => "array",
                Value::Object(_) => "object",
                _ => "value",
            };
            let into = if m.is_object() {
                format!("Go struct field ObjectMeta.metadata.{field} of type string")
            } else {
                format!("Go struct field ObjectMeta.metadata.{field} of type map[string]string")
            };
            return Err(ApiError::bad_request(format!(
                "{} in version \"{}\" cannot be handled as a {}: json: cannot unmarshal {t} into {into}",
                rt.kind, rt.version, rt.kind
            )));
        }
    }
    Ok(())
}

/// Default and validate `obj` before it is committed. `old` is the stored object on update.
pub fn admit(
    st: &mut State,
    rt: &ResourceType,
    obj: &mut Value,
    old: Option<&Arc<Value>>,
    opts: &WriteOpts,
) -> ApiResult<()> {
    let name = meta::name(obj).to_string();
    check_meta_types(rt, obj)?;
    let mut causes = Vec::new();
    if old.is_none() {
        causes.extend(validate_name(rt, &name));
    }
    let mut meta_causes = vec![];
    validate_meta(obj, &mut meta_causes);
    // On update the apiserver checks object metadata twice (the strategy's ValidateUpdate
    // and the registry's own ValidateObjectMetaUpdate), and reports each finding twice.
    let times = if old.is_some() { 2 } else { 1 };
    for _ in 0..times {
        causes.extend(meta_causes.iter().cloned());
    }
    if let Some(crd) = &rt.crd {
        admit_custom(rt, crd, obj, old, opts, &mut causes)?;
    } else {
        match (rt.group.as_str(), rt.plural.as_str()) {
            ("", "pods") => default_pod(obj, old.is_none()),
            ("", "namespaces") => {
                if old.is_none() {
                    meta::set_path(obj, ".status", json!({"phase": "Active"}));
                    if obj.pointer("/spec/finalizers").is_none() {
                        meta::set_path(obj, ".spec.finalizers", json!(["kubernetes"]));
                    }
                } else if obj.pointer("/status/phase").is_none() {
                    meta::set_path(obj, ".status.phase", json!("Active"));
                }
                let name = meta::name(obj).to_string();
                if !name.is_empty() {
                    let m = meta::meta_mut(obj);
                    let labels = m.entry("labels").or_insert_with(|| json!({}));
                    if !labels.is_object() {
                        *labels = json!({});
                    }
                    labels["kubernetes.io/metadata.name"] = json!(name);
                }
            }
            ("", "services") => default_service(st, obj, old),
            ("apps", "statefulsets") => admit_statefulset(obj, old, &mut causes),
            ("coordination.k8s.io", "leases") => {
                check_lease_types(rt, obj)?;
                for f in ["leaseDurationSeconds", "leaseTransitions"] {
                    if let Some(v) = obj.pointer(&format!("/spec/{f}"))
                        && (v.as_i64().is_none() || v.as_i64().is_some_and(|n| n < 0))
                    {
                        let detail = if f == "leaseDurationSeconds" {
                            "must be greater than 0"
                        } else {
                            "must be greater than or equal to 0"
                        };
                        causes.push(invalid_value(&format!("spec.{f}"), v, detail));
                    }
                }
                if obj
                    .pointer("/spec/leaseDurationSeconds")
                    .and_then(Value::as_i64)
                    == Some(0)
                {
                    causes.push(invalid_value(
                        "spec.leaseDurationSeconds",
                        &json!(0),
                        "must be greater than 0",
                    ));
                }
            }
            ("apiextensions.k8s.io", "customresourcedefinitions") => admit_crd(obj, &mut causes),
            ("", "events") if old.is_none() => validate_event(obj, false, &mut causes),
            ("events.k8s.io", "events") if old.is_none() => validate_event(obj, true, &mut causes),
            _ => {}
        }
    }
    if causes.is_empty() {
        Ok(())
    } else if rt.is_event_view()
        && let Some(core) = st.registry.get("", "v1", "events")
    {
        // events.k8s.io Events are validated as core Events (and reported as such).
        Err(ApiError::invalid(&core, &name, &causes))
    } else {
        Err(ApiError::invalid(rt, &name, &causes))
    }
}

/// Lease fields that fail decoding (400) before validation: integers that are not, and
/// MicroTime fields that do not parse.
fn check_lease_types(rt: &ResourceType, obj: &Value) -> ApiResult<()> {
    let fail = |why: String| {
        Err(ApiError::bad_request(format!(
            "{} in version \"{}\" cannot be handled as a {}: {why}",
            rt.kind, rt.version, rt.kind
        )))
    };
    for f in ["leaseDurationSeconds", "leaseTransitions"] {
        if let Some(v) = obj.pointer(&format!("/spec/{f}"))
            && !v.is_null()
            && !v.is_i64()
        {
            let t = match v {
                Value::String(_) => "string",
                Value::Bool(_) => "bool",
                Value::Number(_) => "number",
                Value::Array(_) => "array",
                _ => "object",
            };
            return fail(format!(
                "json: cannot unmarshal {t} into Go struct field LeaseSpec.spec.{f} of type int32"
            ));
        }
    }
    for f in ["acquireTime", "renewTime"] {
        if let Some(Value::String(t)) = obj.pointer(&format!("/spec/{f}"))
            && meta::parse_time(t).is_none()
        {
            return fail(format!(
                "parsing time {t:?} as \"2006-01-02T15:04:05.000000Z07:00\": cannot parse {t:?} as \"2006\""
            ));
        }
    }
    Ok(())
}

/// `ValidateEventCreate` on the core form of an Event: the legacy checks for every Event, and
/// for events.k8s.io/v1 (`strict`) the required `eventTime` and type.
fn validate_event(obj: &Value, strict: bool, causes: &mut Vec<Cause>) {
    let s = |p: &str| obj.pointer(p).and_then(Value::as_str).unwrap_or("");
    let ns = meta::namespace(obj);
    let involved_ns = s("/involvedObject/namespace");
    let has_time = obj.get("eventTime").is_some_and(|t| !t.is_null());
    let mismatch = || {
        invalid_value(
            "involvedObject.namespace",
            &json!(involved_ns),
            "does not match event.namespace",
        )
    };
    let empty = json!("");
    if !has_time {
        if involved_ns.is_empty() {
            if !ns.is_empty() && ns != "default" {
                causes.push(mismatch());
            }
        } else if ns != involved_ns {
            causes.push(mismatch());
        }
    } else {
        if involved_ns.is_empty() && ns != "default" && ns != "kube-system" {
            causes.push(mismatch());
        }
        let controller_field = if strict {
            "reportingController"
        } else {
            "reportingComponent"
        };
        let controller = s("/reportingComponent");
        if controller.is_empty() {
            causes.push((
                "FieldValueRequired".into(),
                controller_field.into(),
                "Required value".into(),
            ));
        }
        for m in meta::qualified_name_errors(controller) {
            causes.push(invalid_value(controller_field, &json!(controller), &m));
        }
        for (field, limit) in [("reportingInstance", 128), ("action", 128), ("reason", 128)] {
            let v = s(&format!("/{field}"));
            if v.is_empty() {
                causes.push((
                    "FieldValueRequired".into(),
                    field.into(),
                    "Required value".into(),
                ));
            }
            if v.len() > limit {
                causes.push(invalid_value(
                    field,
                    &empty,
                    &format!("can have at most {limit} characters"),
                ));
            }
        }
        if s("/message").len() > 1024 {
            causes.push(invalid_value(
                "message",
                &empty,
                "can have at most 1024 characters",
            ));
        }
    }
    if !strict {
        return;
    }
    if !has_time {
        causes.push((
            "FieldValueRequired".into(),
            "eventTime".into(),
            "Required value".into(),
        ));
    }
    let t = s("/type");
    if t != "Normal" && t != "Warning" {
        causes.push(invalid_value(
            "type",
            &empty,
            &format!("has invalid value: {t}"),
        ));
    }
}

fn admit_custom(
    rt: &ResourceType,
    crd: &CrdVersion,
    obj: &mut Value,
    old: Option<&Arc<Value>>,
    opts: &WriteOpts,
    causes: &mut Vec<Cause>,
) -> ApiResult<()> {
    let Some(schema) = &crd.schema else {
        return Ok(());
    };
    schema.apply_defaults(obj);
    let pruned = schema.prune(obj);
    if opts.strict && !pruned.is_empty() {
        let fields: Vec<String> = pruned
            .iter()
            .map(|p| format!("unknown field \"{}\"", p.trim_start_matches('.')))
            .collect();
        return Err(ApiError::bad_request(format!(
            "{} in version \"{}\" cannot be handled as a {}: strict decoding error: {}",
            rt.kind,
            rt.version,
            rt.kind,
            fields.join(", ")
        )));
    }
    for c in schema.validate(obj, old.map(|o| &**o)) {
        causes.push((c.reason.to_string(), c.field, c.message));
    }
    Ok(())
}

fn default_pod(obj: &mut Value, create: bool) {
    if create {
        if obj.pointer("/spec/restartPolicy").is_none() {
            meta::set_path(obj, ".spec.restartPolicy", json!("Always"));
        }
        if obj.pointer("/spec/terminationGracePeriodSeconds").is_none() {
            meta::set_path(obj, ".spec.terminationGracePeriodSeconds", json!(30));
        }
        if obj.pointer("/spec/dnsPolicy").is_none() {
            meta::set_path(obj, ".spec.dnsPolicy", json!("ClusterFirst"));
        }
        if obj.pointer("/spec/schedulerName").is_none() {
            meta::set_path(obj, ".spec.schedulerName", json!("default-scheduler"));
        }
        if obj.pointer("/spec/serviceAccountName").is_none() {
            meta::set_path(obj, ".spec.serviceAccountName", json!("default"));
        }
        if let Some(cs) = obj
            .pointer_mut("/spec/containers")
            .and_then(Value::as_array_mut)
        {
            for c in cs {
                if c.get("imagePullPolicy").is_none() {
                    let latest = c
                        .get("image")
                        .and_then(Value::as_str)
                        .is_some_and(|i| !i.contains(':') || i.ends_with(":latest"));
                    c["imagePullPolicy"] = json!(if latest { "Always" } else { "IfNotPresent" });
                }
                if c.get("terminationMessagePath").is_none() {
                    c["terminationMessagePath"] = json!("/dev/termination-log");
                    c["terminationMessagePolicy"] = json!("File");
                }
            }
        }
        if obj.get("status").is_none_or(|s| s.get("phase").is_none()) {
            meta::set_path(obj, ".status.phase", json!("Pending"));
            meta::set_path(obj, ".status.qosClass", json!("BestEffort"));
        }
    }
}

fn default_service(st: &mut State, obj: &mut Value, old: Option<&Arc<Value>>) {
    if obj.pointer("/spec/type").is_none() {
        meta::set_path(obj, ".spec.type", json!("ClusterIP"));
    }
    if obj.pointer("/spec/sessionAffinity").is_none() {
        meta::set_path(obj, ".spec.sessionAffinity", json!("None"));
    }
    if let Some(ports) = obj.pointer_mut("/spec/ports").and_then(Value::as_array_mut) {
        for p in ports {
            if p.get("protocol").is_none() {
                p["protocol"] = json!("TCP");
            }
            if p.get("targetPort").is_none()
                && let Some(port) = p.get("port").cloned()
            {
                p["targetPort"] = port;
            }
        }
    }
    // The cluster IP is allocated once and is immutable afterwards.
    let old_ip = old.and_then(|o| o.pointer("/spec/clusterIP")).cloned();
    match old_ip {
        Some(ip) => {
            meta::set_path(obj, ".spec.clusterIP", ip.clone());
            meta::set_path(obj, ".spec.clusterIPs", json!([ip]));
        }
        None if obj.pointer("/spec/clusterIP").is_none() => {
            let ip = json!(st.allocate_ip("10.96"));
            meta::set_path(obj, ".spec.clusterIP", ip.clone());
            meta::set_path(obj, ".spec.clusterIPs", json!([ip]));
        }
        None => {}
    }
    if obj.pointer("/spec/ipFamilies").is_none() {
        meta::set_path(obj, ".spec.ipFamilies", json!(["IPv4"]));
        meta::set_path(obj, ".spec.ipFamilyPolicy", json!("SingleStack"));
        meta::set_path(obj, ".spec.internalTrafficPolicy", json!("Cluster"));
    }
}

fn admit_statefulset(obj: &mut Value, old: Option<&Arc<Value>>, causes: &mut Vec<Cause>) {
    let defaults = [
        (".spec.replicas", json!(1)),
        (".spec.podManagementPolicy", json!("OrderedReady")),
        (
            ".spec.updateStrategy",
            json!({"type": "RollingUpdate", "rollingUpdate": {"partition": 0}}),
        ),
        (".spec.revisionHistoryLimit", json!(10)),
        (
            ".spec.persistentVolumeClaimRetentionPolicy",
            json!({"whenDeleted": "Retain", "whenScaled": "Retain"}),
        ),
    ];
    for (path, v) in defaults {
        if meta::get_path(obj, path).is_none() {
            meta::set_path(obj, path, v);
        }
    }
    match obj.pointer("/spec/selector") {
        None => causes.push((
            "FieldValueRequired".into(),
            "spec.selector".into(),
            "Required value".into(),
        )),
        Some(sel) => match crate::selector::LabelSelector::from_json(sel) {
            Ok(s) => {
                let labels = obj
                    .pointer("/spec/template/metadata/labels")
                    .and_then(Value::as_object);
                if s.matches_everything() {
                    causes.push(invalid_value(
                        "spec.selector",
                        sel,
                        "empty selector is invalid for statefulset",
                    ));
                } else if !s.matches(labels) {
                    let shown = labels
                        .map(|l| {
                            let pairs: Vec<String> =
                                l.iter().map(|(k, v)| format!("{k:?}:{}", v)).collect();
                            format!("{{{}}}", pairs.join(","))
                        })
                        .unwrap_or_else(|| "null".into());
                    causes.push((
                        "FieldValueInvalid".into(),
                        "spec.template.metadata.labels".into(),
                        format!(
                            "Invalid value: {shown}: `selector` does not match template `labels`"
                        ),
                    ));
                }
            }
            Err(e) => causes.push(invalid_value("spec.selector", sel, &e.to_string())),
        },
    }
    if let Some(r) = obj.pointer("/spec/replicas").and_then(Value::as_i64)
        && r < 0
    {
        causes.push(invalid_value(
            "spec.replicas",
            &json!(r),
            "must be greater than or equal to 0",
        ));
    }
    if let Some(old) = old {
        let mutable = [
            "replicas",
            "ordinals",
            "template",
            "updateStrategy",
            "revisionHistoryLimit",
            "persistentVolumeClaimRetentionPolicy",
            "minReadySeconds",
        ];
        let strip = |v: &Value| -> Value {
            let mut s = v.get("spec").cloned().unwrap_or(json!({}));
            if let Value::Object(m) = &mut s {
                for f in mutable {
                    m.remove(f);
                }
            }
            s
        };
        if strip(obj) != strip(old) {
            causes.push((
                "FieldValueForbidden".into(),
                "spec".into(),
                "Forbidden: updates to statefulset spec for fields other than 'replicas', 'ordinals', 'template', 'updateStrategy', 'revisionHistoryLimit', 'persistentVolumeClaimRetentionPolicy' and 'minReadySeconds' are forbidden".into(),
            ));
        }
    }
}

fn admit_crd(obj: &mut Value, causes: &mut Vec<Cause>) {
    let name = meta::name(obj).to_string();
    let group = obj
        .pointer("/spec/group")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let plural = obj
        .pointer("/spec/names/plural")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    if plural.is_empty() {
        causes.push((
            "FieldValueRequired".into(),
            "spec.names.plural".into(),
            "Required value".into(),
        ));
    }
    if obj
        .pointer("/spec/names/kind")
        .and_then(Value::as_str)
        .is_none_or(str::is_empty)
    {
        causes.push((
            "FieldValueRequired".into(),
            "spec.names.kind".into(),
            "Required value".into(),
        ));
    }
    if name != format!("{plural}.{group}") {
        causes.push(invalid_value(
            "metadata.name",
            &json!(name),
            "must be spec.names.plural+\".\"+spec.group",
        ));
    }
    let versions = obj
        .pointer("/spec/versions")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if versions.is_empty() {
        causes.push((
            "FieldValueRequired".into(),
            "spec.versions".into(),
            "Required value: must have exactly one version marked as storage version".into(),
        ));
    }
    for (i, v) in versions.iter().enumerate() {
        if let Some(s) = v.pointer("/schema/openAPIV3Schema")
            && let Err(e) = Schema::compile(s)
        {
            causes.push((
                "FieldValueInvalid".into(),
                format!("spec.versions[{i}].schema.openAPIV3Schema"),
                format!("Invalid value: \"object\": {e}"),
            ));
        }
    }
    if obj.pointer("/spec/scope").is_none() {
        meta::set_path(obj, ".spec.scope", json!("Namespaced"));
    }

    // The real apiserver reports these once the names are accepted; `kubectl wait
    // --for=condition=Established` depends on them.
    let now = meta::now_rfc3339();
    let names = obj.pointer("/spec/names").cloned().unwrap_or(json!({}));
    let mut accepted = names.clone();
    if accepted.get("singular").is_none() {
        accepted["singular"] = json!(plural);
    }
    if accepted.get("listKind").is_none()
        && let Some(k) = names.get("kind").and_then(Value::as_str)
    {
        accepted["listKind"] = json!(format!("{k}List"));
    }
    meta::set_path(obj, ".status.acceptedNames", accepted);
    let stored: Vec<Value> = versions
        .iter()
        .filter(|v| v.get("storage").and_then(Value::as_bool) == Some(true))
        .filter_map(|v| v.get("name").cloned())
        .collect();
    meta::set_path(obj, ".status.storedVersions", json!(stored));
    meta::set_path(
        obj,
        ".status.conditions",
        json!([
            {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts", "message": "no conflicts found", "lastTransitionTime": now},
            {"type": "Established", "status": "True", "reason": "InitialNamesAccepted", "message": "the initial names have been accepted", "lastTransitionTime": now}
        ]),
    );
}

/// Resource types served for a stored CRD object.
pub fn crd_types(crd: &Value) -> Vec<ResourceType> {
    let s = |p: &str| {
        crd.pointer(p)
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string()
    };
    let list = |p: &str| -> Vec<String> {
        crd.pointer(p)
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    let group = s("/spec/group");
    let kind = s("/spec/names/kind");
    let plural = s("/spec/names/plural");
    let mut singular = s("/spec/names/singular");
    if singular.is_empty() {
        singular = kind.to_lowercase();
    }
    let namespaced = s("/spec/scope") != "Cluster";
    let crd_name = meta::name(crd).to_string();
    let versions = crd
        .pointer("/spec/versions")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    versions
        .iter()
        .filter(|v| v.get("served").and_then(Value::as_bool) != Some(false))
        .map(|v| {
            let raw_schema = v.pointer("/schema/openAPIV3Schema").cloned();
            let schema = raw_schema
                .as_ref()
                .and_then(|s| Schema::compile(s).ok())
                .map(Arc::new);
            let scale = v.pointer("/subresources/scale").map(|sc| ScalePaths {
                spec_replicas: sc
                    .get("specReplicasPath")
                    .and_then(Value::as_str)
                    .unwrap_or(".spec.replicas")
                    .into(),
                status_replicas: sc
                    .get("statusReplicasPath")
                    .and_then(Value::as_str)
                    .unwrap_or(".status.replicas")
                    .into(),
                label_selector: sc
                    .get("labelSelectorPath")
                    .and_then(Value::as_str)
                    .map(str::to_string),
            });
            let description = raw_schema
                .as_ref()
                .and_then(|s| s.get("description"))
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            ResourceType {
                group: group.clone(),
                version: v.get("name").and_then(Value::as_str).unwrap_or("v1").into(),
                kind: kind.clone(),
                plural: plural.clone(),
                singular: singular.clone(),
                namespaced,
                short_names: list("/spec/names/shortNames"),
                categories: list("/spec/names/categories"),
                status: v.pointer("/subresources/status").is_some(),
                scale,
                crd: Some(CrdVersion {
                    schema,
                    raw_schema,
                    printer_columns: v.get("additionalPrinterColumns").cloned(),
                    crd_name: crd_name.clone(),
                }),
                storage: None,
                description,
            }
        })
        .collect()
}

/// What the ServiceAccount controller puts into every new namespace (the root-CA publisher's
/// `kube-root-ca.crt` ConfigMap is not modelled: tests count ConfigMaps).
fn seed_namespace(st: &mut State, store: &Store, ns: &str) {
    let opts = WriteOpts {
        actor: "kubesim/namespace-seed".into(),
        ..Default::default()
    };
    let seeds = [("serviceaccounts", json!({"metadata": {"name": "default"}}))];
    for (plural, obj) in seeds {
        let Some(rt) = st.registry.get("", "v1", plural) else {
            continue;
        };
        if st.get(&rt, Some(ns), meta::name(&obj)).is_none()
            && let Err(e) = st.create_locked(store, &rt, Some(ns), obj, &opts)
        {
            tracing::warn!(error = %e, "seeding namespace {ns}");
        }
    }
}

/// Side effects of a committed create/update.
pub fn after_commit(st: &mut State, store: &Store, rt: &ResourceType, obj: &Arc<Value>) {
    if rt.group.is_empty() && rt.plural == "namespaces" && !meta::is_terminating(obj) {
        seed_namespace(st, store, meta::name(obj));
    }
    if rt.group == "apiextensions.k8s.io" && rt.plural == "customresourcedefinitions" {
        let name = meta::name(obj).to_string();
        st.registry.remove_crd(&name);
        // A terminating CRD is still served (its objects are being deleted) until it goes.
        for t in crd_types(obj) {
            st.registry.insert(t);
        }
    }
}

/// Side effects of an object leaving the store.
pub fn after_delete(st: &mut State, store: &Store, rt: &ResourceType, obj: &Arc<Value>) {
    if rt.group == "apiextensions.k8s.io" && rt.plural == "customresourcedefinitions" {
        let types = crd_types(obj);
        st.registry.remove_crd(meta::name(obj));
        // Deleting a CRD deletes every custom resource of it.
        if let Some(t) = types.first() {
            purge(st, store, &t.store_key(), None);
        }
    }
    if rt.group.is_empty() && rt.plural == "namespaces" {
        let ns = meta::name(obj).to_string();
        let keys: Vec<_> = st
            .registry
            .all()
            .filter(|t| t.namespaced && t.storage.is_none())
            .map(|t| t.store_key())
            .collect();
        for k in keys {
            purge(st, store, &k, Some(&ns));
        }
    }
}

fn purge(st: &mut State, store: &Store, key: &(String, String), ns: Option<&str>) {
    let victims: Vec<Arc<Value>> = st
        .objects_of(key)
        .filter(|o| ns.is_none_or(|n| meta::namespace(o) == n))
        .cloned()
        .collect();
    for v in victims {
        st.force_remove(store, key, &v, "kubesim/namespace-controller");
    }
}

/// Seconds of graceful deletion for an object, None for immediate removal. Only scheduled
/// pods terminate gracefully (the kubelet confirms their removal).
pub fn graceful_delete_seconds(
    rt: &ResourceType,
    obj: &Value,
    requested: Option<i64>,
) -> Option<i64> {
    if !(rt.group.is_empty() && rt.plural == "pods") {
        return None;
    }
    obj.pointer("/spec/nodeName")?;
    let phase = obj.pointer("/status/phase").and_then(Value::as_str);
    if matches!(phase, Some("Succeeded") | Some("Failed")) {
        return None;
    }
    let g = requested
        .or_else(|| {
            obj.pointer("/spec/terminationGracePeriodSeconds")
                .and_then(Value::as_i64)
        })
        .unwrap_or(30);
    (g > 0).then_some(g)
}

impl State {
    /// Remove an object regardless of finalizers (CRD and namespace cleanup).
    pub fn force_remove(
        &mut self,
        store: &Store,
        key: &(String, String),
        obj: &Arc<Value>,
        actor: &str,
    ) {
        let Some(rt) = self.registry.by_store_key(&key.0, &key.1) else {
            return;
        };
        let mut o = (**obj).clone();
        meta::meta_mut(&mut o).remove("finalizers");
        self.remove(store, &rt, key, o, Some(obj.clone()), actor);
    }
}
