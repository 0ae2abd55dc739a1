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

const DNS1123_SUBDOMAIN_MSG: &str = "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')";
const DNS1123_LABEL_MSG: &str = "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')";

fn validate_name(rt: &ResourceType, name: &str) -> Option<Cause> {
    let label_kinds = rt.group.is_empty() && (rt.plural == "namespaces" || rt.plural == "services");
    let ok = if label_kinds {
        meta::is_dns1123_label(name)
    } else if rt.group.is_empty() && rt.plural == "events" {
        !name.is_empty()
    } else {
        meta::is_dns1123_subdomain(name)
    };
    (!ok).then(|| {
        invalid_value(
            "metadata.name",
            &json!(name),
            if label_kinds {
                DNS1123_LABEL_MSG
            } else {
                DNS1123_SUBDOMAIN_MSG
            },
        )
    })
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
    let mut causes = Vec::new();
    if old.is_none()
        && let Some(c) = validate_name(rt, &name)
    {
        causes.push(c);
    }
    if let Some(crd) = &rt.crd {
        admit_custom(rt, crd, obj, old, opts, &mut causes)?;
    } else {
        match (rt.group.as_str(), rt.plural.as_str()) {
            ("", "pods") => default_pod(obj, old.is_none()),
            ("", "namespaces") if obj.pointer("/status/phase").is_none() => {
                meta::set_path(obj, ".status.phase", json!("Active"));
            }
            ("", "services") => default_service(st, obj, old),
            ("apps", "statefulsets") => admit_statefulset(obj, old, &mut causes),
            ("coordination.k8s.io", "leases") => {
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
            _ => {}
        }
    }
    if causes.is_empty() {
        Ok(())
    } else {
        Err(ApiError::invalid(rt, &name, &causes))
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
            rt.api_version(),
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
                            format!("map[string]string{{{}}}", pairs.join(", "))
                        })
                        .unwrap_or_else(|| "map[string]string(nil)".into());
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
                "Forbidden: updates to statefulset spec for fields other than 'replicas', 'ordinals', 'template', 'updateStrategy', 'persistentVolumeClaimRetentionPolicy' and 'minReadySeconds' are forbidden".into(),
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

/// Side effects of a committed create/update.
pub fn after_commit(st: &mut State, _store: &Store, rt: &ResourceType, obj: &Arc<Value>) {
    if rt.group == "apiextensions.k8s.io" && rt.plural == "customresourcedefinitions" {
        let name = meta::name(obj).to_string();
        st.registry.remove_crd(&name);
        if !meta::is_terminating(obj) {
            for t in crd_types(obj) {
                st.registry.insert(t);
            }
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
