//! PATCH bodies: applying each patch content type the apiserver accepts to a live object.
//!
//! This module owns the four patch semantics and nothing else (no storage, no validation of the
//! result): RFC 6902 JSON patch, RFC 7386 JSON merge patch, Kubernetes strategic merge patch as
//! `k8s.io/apimachinery/pkg/util/strategicpatch` applies it server-side, and a server-side apply
//! that merges without managedFields. Every function takes and returns whole objects as JSON and
//! never mutates its inputs.
//!
//! The real apiserver learns list merge keys and strategies from Go struct tags; kubesim has no Go
//! types, so strategic merge and server-side apply look the strategy up by field name in
//! `LIST_STRATEGIES`.

use serde_json::{Map, Value};

mod apply;
mod strategic;
#[cfg(test)]
mod tests;

use apply::*;
use strategic::*;

type Object = Map<String, Value>;

const PATCH_DIRECTIVE: &str = "$patch";
const RETAIN_KEYS: &str = "$retainKeys";
const SET_ELEMENT_ORDER: &str = "$setElementOrder";
const DELETE_FROM_PRIMITIVE_LIST: &str = "$deleteFromPrimitiveList";

/// Why a patch could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum PatchError {
    #[error("invalid JSON patch: {0}")]
    InvalidJsonPatch(String),
    #[error("JSON patch operation {operation} failed: test of path {path:?} did not match")]
    TestFailed { operation: usize, path: String },
    #[error("JSON patch operation {operation} failed: path {path:?} does not exist")]
    PathNotFound { operation: usize, path: String },
    #[error("JSON patch operation {operation} failed at path {path:?}: {reason}")]
    JsonPatchFailed {
        operation: usize,
        path: String,
        reason: String,
    },
    #[error("invalid JSON document: the patch must be a JSON object")]
    NotAnObject,
    #[error("unknown patch type: {directive} in map: {map}")]
    UnknownPatchDirective { directive: String, map: String },
    #[error("merging lists cannot yet be specified in the patch")]
    ListMergeDirective,
    #[error("map: {element} does not contain declared merge key: {key}")]
    MissingMergeKey { key: &'static str, element: String },
    #[error("invalid patch format of {directive}: {reason}")]
    InvalidDirective { directive: String, reason: String },
    #[error("patch content doesn't match retainKeys list: field {0:?} is not retained")]
    RetainKeysMismatch(String),
    #[error("the order in patch list {field:?} doesn't match its $setElementOrder list")]
    SetElementOrderMismatch { field: String },
    #[error("field {field:?} cannot be merged: {reason}")]
    InvalidList { field: String, reason: String },
    #[error("duplicate entries for {id} in list {field:?} of the applied configuration")]
    DuplicateListEntry { field: String, id: String },
}

/// How a list field merges, as the Go types' `patchStrategy`/`patchMergeKey` tags say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ListStrategy {
    /// A list of objects merged element by element on the value of this key.
    MergeKey(&'static str),
    /// `ports`: container ports merge on `containerPort`, Service ports on `port`. The field
    /// name alone cannot tell them apart, so the elements' shape decides.
    Ports,
    /// A list of primitives merged as an ordered set.
    PrimitiveSet,
}

/// List fields that merge rather than being replaced, by field name. Any list field not named
/// here is atomic: a patch or applied configuration replaces it whole. That is deliberately the
/// case for `tolerations`, `args` and `command`, whose Go types carry no merge strategy.
const LIST_STRATEGIES: &[(&str, ListStrategy)] = &[
    ("containers", ListStrategy::MergeKey("name")),
    ("initContainers", ListStrategy::MergeKey("name")),
    ("ephemeralContainers", ListStrategy::MergeKey("name")),
    ("volumes", ListStrategy::MergeKey("name")),
    ("env", ListStrategy::MergeKey("name")),
    ("imagePullSecrets", ListStrategy::MergeKey("name")),
    ("volumeMounts", ListStrategy::MergeKey("mountPath")),
    ("volumeDevices", ListStrategy::MergeKey("devicePath")),
    ("ports", ListStrategy::Ports),
    ("conditions", ListStrategy::MergeKey("type")),
    ("ownerReferences", ListStrategy::MergeKey("uid")),
    ("hostAliases", ListStrategy::MergeKey("ip")),
    (
        "topologySpreadConstraints",
        ListStrategy::MergeKey("topologyKey"),
    ),
    ("finalizers", ListStrategy::PrimitiveSet),
];

/// The strategy of one list, resolved against the lists actually being merged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ListKind {
    Atomic,
    Set,
    Keyed(&'static str),
}

impl ListKind {
    fn key(self) -> Option<&'static str> {
        match self {
            ListKind::Keyed(key) => Some(key),
            ListKind::Atomic | ListKind::Set => None,
        }
    }
}

fn list_kind(field: &str, lists: &[&[Value]]) -> ListKind {
    let strategy = LIST_STRATEGIES
        .iter()
        .find(|(name, _)| *name == field)
        .map(|(_, strategy)| *strategy);
    match strategy {
        None => ListKind::Atomic,
        Some(ListStrategy::PrimitiveSet) => ListKind::Set,
        Some(ListStrategy::MergeKey(key)) => ListKind::Keyed(key),
        Some(ListStrategy::Ports) => {
            let container_ports = lists
                .iter()
                .flat_map(|list| list.iter())
                .any(|item| item.get("containerPort").is_some());
            ListKind::Keyed(if container_ports {
                "containerPort"
            } else {
                "port"
            })
        }
    }
}

/// RFC 6902 JSON Patch (`application/json-patch+json`).
pub fn json_patch(target: &Value, patch: &Value) -> Result<Value, PatchError> {
    json_patch_owned(target.clone(), patch)
}

/// [`json_patch`] of a document the caller already owns (the write path's copy of the object).
pub fn json_patch_owned(mut doc: Value, patch: &Value) -> Result<Value, PatchError> {
    let ops: json_patch::Patch = serde_json::from_value(patch.clone())
        .map_err(|e| PatchError::InvalidJsonPatch(e.to_string()))?;
    json_patch::patch(&mut doc, &ops).map_err(|e| {
        let operation = e.operation;
        let path = e.path.to_string();
        match e.kind {
            json_patch::PatchErrorKind::TestFailed => PatchError::TestFailed { operation, path },
            json_patch::PatchErrorKind::InvalidPointer => {
                PatchError::PathNotFound { operation, path }
            }
            kind => PatchError::JsonPatchFailed {
                operation,
                path,
                reason: kind.to_string(),
            },
        }
    })?;
    Ok(doc)
}

/// RFC 7386 JSON merge patch (`application/merge-patch+json`). A patch that is not an object
/// replaces the whole document, as the RFC says.
pub fn merge_patch(target: &Value, patch: &Value) -> Result<Value, PatchError> {
    Ok(merge_patch_owned(target.clone(), patch))
}

/// [`merge_patch`] of a document the caller already owns.
pub fn merge_patch_owned(mut doc: Value, patch: &Value) -> Value {
    json_patch::merge(&mut doc, patch);
    doc
}

/// Kubernetes strategic merge patch (`application/strategic-merge-patch+json`) for built-in
/// kinds, with the directives kubectl sends: `$patch` (`replace`/`delete`, in maps and list
/// elements), `$retainKeys`, `$setElementOrder/<list>` and `$deleteFromPrimitiveList/<list>`.
/// A target that is not an object is patched as an empty object.
///
/// Element order, error cases and `null` handling follow strategicpatch. Two deliberate
/// differences, both invisible once the apiserver has round-tripped the result through its Go
/// types in the common cases: a nested map with `$patch: delete` is removed (strategicpatch
/// leaves `{}`), and directives nested in a value that has no live counterpart are processed
/// rather than copied verbatim. Unrecognised `$`-prefixed keys are ordinary fields, as there.
pub fn strategic_merge_patch(target: &Value, patch: &Value) -> Result<Value, PatchError> {
    strategic_merge_patch_owned(target.clone(), patch)
}

/// [`strategic_merge_patch`] of a document the caller already owns.
pub fn strategic_merge_patch_owned(target: Value, patch: &Value) -> Result<Value, PatchError> {
    let Value::Object(patch) = patch else {
        return Err(PatchError::NotAnObject);
    };
    let original = match target {
        Value::Object(map) => map,
        _ => Object::new(),
    };
    // A top-level `$patch: delete` empties the object, as in strategicpatch; there is no parent
    // to remove it from.
    Ok(Value::Object(
        merge_map(original, patch)?.unwrap_or_default(),
    ))
}

/// Server-side apply without managedFields (`application/apply-patch+yaml`, already parsed to
/// JSON): merges the applied configuration into the live object, or into nothing when the object
/// does not exist yet. Maps merge recursively, lists with a merge key in `LIST_STRATEGIES`
/// merge by key and primitive sets are unioned (in the order structured-merge-diff gives), other
/// lists are replaced, and a `null` removes the field. Without field ownership a field that an
/// earlier apply set and this one omits is kept, never removed.
pub fn server_side_apply(live: Option<&Value>, applied: &Value) -> Result<Value, PatchError> {
    let Value::Object(applied) = applied else {
        return Err(PatchError::NotAnObject);
    };
    let base = match live {
        Some(Value::Object(map)) => map.clone(),
        _ => Object::new(),
    };
    Ok(Value::Object(apply_map(base, applied)?))
}

// ---------------------------------------------------------------------------------------------
// Shared helpers.

/// JSON equality where numbers compare by value, as Go's `==` on decoded float64s does.
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x == y || x.as_f64() == y.as_f64(),
        _ => a == b,
    }
}

/// What an element is matched on: its merge key value, or itself in a primitive list.
fn identity<'a>(item: &'a Value, key: Option<&str>) -> Option<&'a Value> {
    match key {
        Some(key) => item.get(key),
        None => Some(item),
    }
}

fn position(list: &[Value], item: &Value, key: Option<&str>) -> Option<usize> {
    let id = identity(item, key)?;
    list.iter()
        .position(|other| identity(other, key).is_some_and(|other| same(other, id)))
}

fn merge_key_value<'a>(item: &'a Value, key: &'static str) -> Result<&'a Value, PatchError> {
    item.get(key).ok_or_else(|| PatchError::MissingMergeKey {
        key,
        element: item.to_string(),
    })
}

fn ensure_primitives(field: &str, list: &[Value]) -> Result<(), PatchError> {
    match list.iter().find(|item| item.is_object() || item.is_array()) {
        Some(item) => Err(PatchError::InvalidList {
            field: field.to_owned(),
            reason: format!("it is a list of primitives, but has the element {item}"),
        }),
        None => Ok(()),
    }
}

fn not_an_object_element(field: &str, item: &Value) -> PatchError {
    PatchError::InvalidList {
        field: field.to_owned(),
        reason: format!("it is a list of objects, but has the element {item}"),
    }
}

fn not_a_list(field: &str, value: &Value) -> PatchError {
    PatchError::InvalidList {
        field: field.to_owned(),
        reason: format!("expected a list, got {value}"),
    }
}

fn unknown_patch_directive(directive: &Value, map: &Object) -> PatchError {
    PatchError::UnknownPatchDirective {
        directive: directive
            .as_str()
            .map_or_else(|| directive.to_string(), str::to_owned),
        map: Value::Object(map.clone()).to_string(),
    }
}
