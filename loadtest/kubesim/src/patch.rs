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
    let ops: json_patch::Patch = serde_json::from_value(patch.clone())
        .map_err(|e| PatchError::InvalidJsonPatch(e.to_string()))?;
    let mut doc = target.clone();
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
    let mut doc = target.clone();
    json_patch::merge(&mut doc, patch);
    Ok(doc)
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
    let Value::Object(patch) = patch else {
        return Err(PatchError::NotAnObject);
    };
    let original = match target {
        Value::Object(map) => map.clone(),
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
// Strategic merge patch. The structure follows strategicpatch's mergeMap/mergeSlice with
// MergeParallelList and IgnoreUnmatchedNulls set, as StrategicMergeMapPatch uses them, so that
// element order and error cases come out as the apiserver's do.

/// Merges `patch` into `original`; `None` means the map was deleted with `$patch: delete`.
fn merge_map(mut original: Object, patch: &Object) -> Result<Option<Object>, PatchError> {
    if let Some(directive) = patch.get(PATCH_DIRECTIVE) {
        return match directive.as_str() {
            Some("replace") => {
                let mut rest = patch.clone();
                rest.remove(PATCH_DIRECTIVE);
                // Merging into nothing strips the directives nested in the replacement.
                merge_map(Object::new(), &rest)
            }
            Some("delete") => Ok(None),
            _ => Err(unknown_patch_directive(directive, patch)),
        };
    }

    apply_retain_keys(&mut original, patch)?;

    // Ordered lists are merged together with their order directive first, so the main loop
    // must skip them.
    let mut ordered: Vec<&str> = Vec::new();
    for (key, order) in patch {
        let Some(field) = directive_field(key, SET_ELEMENT_ORDER)? else {
            continue;
        };
        if apply_element_order(&mut original, field, order, patch.get(field))? {
            ordered.push(field);
        }
    }

    for (key, value) in patch {
        if key == RETAIN_KEYS
            || key.starts_with(SET_ELEMENT_ORDER)
            || ordered.contains(&key.as_str())
        {
            continue;
        }
        if let Some(field) = directive_field(key, DELETE_FROM_PRIMITIVE_LIST)? {
            delete_from_primitive_list(&mut original, field, value)?;
            continue;
        }
        // Unknown `$`-prefixed keys are plain fields to strategicpatch too (JSONSchemaProps has
        // `$schema` and `$ref`), so they merge like any other key.
        if value.is_null() {
            original.remove(key);
            continue;
        }
        let current = original.remove(key);
        if let Some(merged) = merge_value(key, current, value)? {
            original.insert(key.clone(), merged);
        }
    }
    Ok(Some(original))
}

/// Merges one patch value into the live value of `field`; `None` removes the field.
fn merge_value(
    field: &str,
    current: Option<Value>,
    patch: &Value,
) -> Result<Option<Value>, PatchError> {
    Ok(match patch {
        Value::Object(patch) => {
            // A value of another type is replaced; merging into nothing still processes the
            // directives and drops the nulls of the new value, which the apiserver does too.
            let base = match current {
                Some(Value::Object(map)) => map,
                _ => Object::new(),
            };
            merge_map(base, patch)?.map(Value::Object)
        }
        Value::Array(patch) => {
            let live = match current {
                Some(Value::Array(list)) => list,
                _ => Vec::new(),
            };
            let kind = list_kind(field, &[&live, patch]);
            Some(Value::Array(merge_list(field, live, patch, kind)?))
        }
        scalar => Some(scalar.clone()),
    })
}

fn merge_list(
    field: &str,
    live: Vec<Value>,
    patch: &[Value],
    kind: ListKind,
) -> Result<Vec<Value>, PatchError> {
    match kind {
        ListKind::Atomic => fresh_list(patch),
        ListKind::Set => merge_primitive_set(field, live, patch),
        ListKind::Keyed(key) => merge_keyed_list(field, live, patch, key),
    }
}

fn merge_primitive_set(
    field: &str,
    live: Vec<Value>,
    patch: &[Value],
) -> Result<Vec<Value>, PatchError> {
    ensure_primitives(field, &live)?;
    ensure_primitives(field, patch)?;
    let mut merged: Vec<Value> = Vec::with_capacity(live.len() + patch.len());
    for item in live.iter().chain(patch) {
        if !merged.iter().any(|seen| same(seen, item)) {
            merged.push(item.clone());
        }
    }
    let (patch_items, server_only) = merged
        .into_iter()
        .partition(|item| position(patch, item, None).is_some());
    Ok(normalize_order(
        patch_items,
        server_only,
        patch,
        &live,
        None,
    ))
}

fn merge_keyed_list(
    field: &str,
    live: Vec<Value>,
    patch: &[Value],
    key: &'static str,
) -> Result<Vec<Value>, PatchError> {
    let mut merged = live.clone();
    let mut plain: Vec<Value> = Vec::with_capacity(patch.len());
    let mut replace = false;
    for item in patch {
        let Value::Object(element) = item else {
            return Err(not_an_object_element(field, item));
        };
        let Some(directive) = element.get(PATCH_DIRECTIVE) else {
            plain.push(item.clone());
            continue;
        };
        match directive.as_str() {
            Some("delete") => {
                let id = merge_key_value(item, key)?;
                merged.retain(|live| !live.get(key).is_some_and(|v| same(v, id)));
            }
            // Later elements are still scanned so that their directives are checked too.
            Some("replace") => replace = true,
            Some("merge") => return Err(PatchError::ListMergeDirective),
            _ => return Err(unknown_patch_directive(directive, element)),
        }
    }
    if replace {
        return fresh_list(&plain);
    }

    for item in &plain {
        let id = merge_key_value(item, key)?;
        let Value::Object(element) = item else {
            return Err(not_an_object_element(field, item));
        };
        let found = merged
            .iter()
            .position(|live| live.get(key).is_some_and(|v| same(v, id)));
        match found {
            Some(index) => {
                let base = match std::mem::take(&mut merged[index]) {
                    Value::Object(map) => map,
                    _ => Object::new(),
                };
                merged[index] = Value::Object(merge_map(base, element)?.unwrap_or_default());
            }
            None => merged.push(Value::Object(
                merge_map(Object::new(), element)?.unwrap_or_default(),
            )),
        }
    }

    let (patch_items, server_only) = partition_by_presence(merged, &plain, Some(key))?;
    Ok(normalize_order(
        patch_items,
        server_only,
        &plain,
        &live,
        Some(key),
    ))
}

/// A list value with no live counterpart: directives processed and nulls dropped.
fn fresh_list(items: &[Value]) -> Result<Vec<Value>, PatchError> {
    let mut out = Vec::with_capacity(items.len());
    for item in items {
        match item {
            Value::Object(element) => {
                if let Some(element) = merge_map(Object::new(), element)? {
                    out.push(Value::Object(element));
                }
            }
            Value::Array(inner) => out.push(Value::Array(fresh_list(inner)?)),
            scalar => out.push(scalar.clone()),
        }
    }
    Ok(out)
}

/// Processes `$setElementOrder/<field>` together with the patch list of `field`. Returns
/// whether the field was handled here.
fn apply_element_order(
    original: &mut Object,
    field: &str,
    order: &Value,
    patch_list: Option<&Value>,
) -> Result<bool, PatchError> {
    let Value::Array(order) = order else {
        return Err(PatchError::InvalidDirective {
            directive: format!("{SET_ELEMENT_ORDER}/{field}"),
            reason: "it must be a list".to_owned(),
        });
    };
    let patch_list = match patch_list {
        None => None,
        Some(Value::Array(list)) => Some(list.as_slice()),
        // `field: null` deletes the list; there is nothing left to order.
        Some(Value::Null) => return Ok(false),
        Some(other) => return Err(not_a_list(field, other)),
    };
    let live = match original.get(field) {
        None | Some(Value::Null) => None,
        Some(Value::Array(list)) => Some(list.clone()),
        Some(other) => return Err(not_a_list(field, other)),
    };
    let kind = list_kind(
        field,
        &[
            live.as_deref().unwrap_or_default(),
            patch_list.unwrap_or_default(),
            order,
        ],
    );
    if kind == ListKind::Atomic {
        // Only merging lists can be reordered; a replaced list already has the patch's order.
        return Ok(false);
    }
    let key = kind.key();
    if let Some(key) = key {
        for item in order {
            merge_key_value(item, key)?;
        }
    }
    if let Some(patch_list) = patch_list {
        validate_element_order(field, patch_list, order, key)?;
    }

    let live_order = live.clone().unwrap_or_default();
    let merged = match (live, patch_list) {
        (None, None) => return Ok(true),
        (Some(live), None) => live,
        (live, Some(patch_list)) => merge_list(field, live.unwrap_or_default(), patch_list, kind)?,
    };
    let server_order = match (kind, patch_list) {
        (ListKind::Keyed(key), Some(patch_list)) => {
            aliased_live_order(&live_order, patch_list, key)
        }
        _ => live_order,
    };
    let (patch_items, server_only) = partition_by_presence(merged, order, key)?;
    let ordered = normalize_order(patch_items, server_only, order, &server_order, key);
    original.insert(field.to_owned(), Value::Array(ordered));
    Ok(true)
}

/// The live order that strategicpatch sorts server-only elements by under `$setElementOrder`.
/// It deletes and appends elements in place in the live list's Go backing array and then reads
/// that array at the live list's original length, so a slot freed by a `$patch: delete` shows
/// the element appended after it. Mimicking this keeps element order identical to the
/// apiserver's, e.g. for a kubectl apply that swaps one container for another.
fn aliased_live_order(live: &[Value], patch: &[Value], key: &str) -> Vec<Value> {
    let matches = |item: &Value, id: &Value| item.get(key).is_some_and(|v| same(v, id));
    let mut view = live.to_vec();
    let mut len = view.len();
    let mut replace = false;
    for item in patch {
        match item.get(PATCH_DIRECTIVE).and_then(Value::as_str) {
            Some("delete") => {
                let Some(id) = item.get(key) else { continue };
                while let Some(i) = view[..len].iter().position(|v| matches(v, id)) {
                    // Go's append(s[:i], s[i+1:]...) shifts the tail left and leaves a copy
                    // of the old last element in the slot past the new end.
                    for j in i..len - 1 {
                        view[j] = view[j + 1].clone();
                    }
                    len -= 1;
                }
            }
            Some("replace") => replace = true,
            _ => {}
        }
    }
    if replace {
        return view;
    }
    let mut working: Vec<Value> = view[..len].to_vec();
    for item in patch {
        if item.get(PATCH_DIRECTIVE).is_some() {
            continue;
        }
        let Some(id) = item.get(key) else { continue };
        if working.iter().any(|v| matches(v, id)) {
            continue;
        }
        if let Some(slot) = view.get_mut(working.len()) {
            *slot = item.clone();
        }
        working.push(item.clone());
    }
    view
}

/// The patch list must name its elements in the same relative order as `$setElementOrder`, and
/// only elements that it names (deletions aside).
fn validate_element_order(
    field: &str,
    patch: &[Value],
    order: &[Value],
    key: Option<&'static str>,
) -> Result<(), PatchError> {
    if patch.is_empty() || order.is_empty() {
        return Ok(());
    }
    let items: Vec<&Value> = patch
        .iter()
        .filter(|item| {
            key.is_none() || item.get(PATCH_DIRECTIVE).and_then(Value::as_str) != Some("delete")
        })
        .collect();
    let (mut in_patch, mut in_order) = (0, 0);
    while in_patch < items.len() && in_order < order.len() {
        let item = items[in_patch];
        if item.get(PATCH_DIRECTIVE).is_some() {
            in_patch += 1;
            continue;
        }
        let equal = match key {
            Some(key) => same(
                merge_key_value(item, key)?,
                merge_key_value(&order[in_order], key)?,
            ),
            None => same(item, &order[in_order]),
        };
        if equal {
            in_patch += 1;
        }
        in_order += 1;
    }
    if in_patch < items.len() {
        return Err(PatchError::SetElementOrderMismatch {
            field: field.to_owned(),
        });
    }
    Ok(())
}

/// `$retainKeys`: fields of the live map not listed are cleared before merging.
fn apply_retain_keys(original: &mut Object, patch: &Object) -> Result<(), PatchError> {
    let Some(retain) = patch.get(RETAIN_KEYS) else {
        return Ok(());
    };
    let Value::Array(retain) = retain else {
        return Err(PatchError::InvalidDirective {
            directive: RETAIN_KEYS.to_owned(),
            reason: "it must be a list".to_owned(),
        });
    };
    let retained = |key: &str| retain.iter().any(|r| r.as_str() == Some(key));
    for (key, value) in patch {
        if key == RETAIN_KEYS
            || value.is_null()
            || key.starts_with(DELETE_FROM_PRIMITIVE_LIST)
            || key.starts_with(SET_ELEMENT_ORDER)
        {
            continue;
        }
        if !retained(key) {
            return Err(PatchError::RetainKeysMismatch(key.clone()));
        }
    }
    original.retain(|key, _| retained(key));
    Ok(())
}

fn delete_from_primitive_list(
    original: &mut Object,
    field: &str,
    values: &Value,
) -> Result<(), PatchError> {
    let Value::Array(values) = values else {
        return Err(PatchError::InvalidDirective {
            directive: format!("{DELETE_FROM_PRIMITIVE_LIST}/{field}"),
            reason: "it must be a list".to_owned(),
        });
    };
    // A list that does not exist is not created by deleting from it.
    if let Some(Value::Array(live)) = original.get_mut(field) {
        live.retain(|item| !values.iter().any(|v| same(item, v)));
    }
    Ok(())
}

/// The field a `prefix/field` directive key applies to, `None` when `key` is not that directive.
fn directive_field<'a>(key: &'a str, prefix: &str) -> Result<Option<&'a str>, PatchError> {
    if !key.starts_with(prefix) {
        return Ok(None);
    }
    match key.split_once('/') {
        Some((head, field)) if head == prefix && !field.is_empty() => Ok(Some(field)),
        _ => Err(PatchError::InvalidDirective {
            directive: key.to_owned(),
            reason: format!("expected {prefix}/<field>"),
        }),
    }
}

/// Splits merged elements into those the patch (or order list) names and the server-only rest.
fn partition_by_presence(
    merged: Vec<Value>,
    named: &[Value],
    key: Option<&'static str>,
) -> Result<(Vec<Value>, Vec<Value>), PatchError> {
    let mut in_patch = Vec::new();
    let mut server_only = Vec::new();
    for item in merged {
        if let Some(key) = key {
            merge_key_value(&item, key)?;
        }
        if position(named, &item, key).is_some() {
            in_patch.push(item);
        } else {
            server_only.push(item);
        }
    }
    Ok((in_patch, server_only))
}

/// Sorts the patch's elements by `patch_order` and the server-only ones by `server_order`, then
/// interleaves them as strategicpatch's normalizeElementOrder does: a server-only element goes
/// before a patch element only when both are in the live list and it came first there. So an
/// element the live list did not have ends up before the server-only elements that follow it,
/// which is why a new element without `$setElementOrder` lands at the front of the list.
fn normalize_order(
    mut patch_items: Vec<Value>,
    mut server_only: Vec<Value>,
    patch_order: &[Value],
    server_order: &[Value],
    key: Option<&str>,
) -> Vec<Value> {
    patch_items.sort_by_cached_key(|item| position(patch_order, item, key).unwrap_or(usize::MAX));
    server_only.sort_by_cached_key(|item| position(server_order, item, key).unwrap_or(usize::MAX));

    let mut out = Vec::with_capacity(patch_items.len() + server_only.len());
    let mut left = server_only.into_iter().peekable();
    let mut right = patch_items.into_iter().peekable();
    loop {
        let take_left = match (left.peek(), right.peek()) {
            (None, None) => break,
            (Some(_), None) => true,
            (None, Some(_)) => false,
            (Some(l), Some(r)) => matches!(
                (position(server_order, l, key), position(server_order, r, key)),
                (Some(li), Some(ri)) if li < ri
            ),
        };
        out.extend(if take_left { left.next() } else { right.next() });
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Server-side apply.

fn apply_map(mut live: Object, applied: &Object) -> Result<Object, PatchError> {
    for (key, value) in applied {
        match value {
            Value::Null => {
                live.remove(key);
            }
            Value::Object(applied) => {
                let base = match live.remove(key) {
                    Some(Value::Object(map)) => map,
                    _ => Object::new(),
                };
                live.insert(key.clone(), Value::Object(apply_map(base, applied)?));
            }
            Value::Array(applied) => {
                let base = match live.remove(key) {
                    Some(Value::Array(list)) => list,
                    _ => Vec::new(),
                };
                live.insert(key.clone(), Value::Array(apply_list(key, base, applied)?));
            }
            scalar => {
                live.insert(key.clone(), scalar.clone());
            }
        }
    }
    Ok(live)
}

/// Merges an associative list or set the way structured-merge-diff orders it: live-only
/// elements keep their place, shared and new elements follow the applied order, and new
/// elements are placed after the shared one that precedes them in the applied list.
fn apply_list(field: &str, live: Vec<Value>, applied: &[Value]) -> Result<Vec<Value>, PatchError> {
    let kind = list_kind(field, &[&live, applied]);
    let key = match kind {
        ListKind::Atomic => return applied.iter().map(fresh_applied).collect(),
        ListKind::Set => {
            ensure_primitives(field, applied)?;
            None
        }
        ListKind::Keyed(key) => Some(key),
    };

    let mut applied_ids: Vec<Value> = Vec::with_capacity(applied.len());
    for item in applied {
        let id = match key {
            Some(key) => {
                if !item.is_object() {
                    return Err(not_an_object_element(field, item));
                }
                merge_key_value(item, key)?;
                apply_identity(field, item, Some(key)).unwrap_or_default()
            }
            None => item.clone(),
        };
        if applied_ids.iter().any(|seen| same_id(seen, &id)) {
            return Err(PatchError::DuplicateListEntry {
                field: field.to_owned(),
                id: id.to_string(),
            });
        }
        applied_ids.push(id);
    }
    // For each live element, the applied element with the same identity. Live elements without
    // the key cannot be matched and stay as they are.
    let live_match: Vec<Option<usize>> = live
        .iter()
        .map(|item| {
            apply_identity(field, item, key)
                .and_then(|id| applied_ids.iter().position(|applied| same_id(applied, &id)))
        })
        .collect();
    let first_live: Vec<Option<usize>> = (0..applied.len())
        .map(|a| live_match.iter().position(|m| *m == Some(a)))
        .collect();
    let mut shared = (0..applied.len()).filter(|a| first_live[*a].is_some());
    let mut next_shared = shared.next();

    let mut live: Vec<Option<Value>> = live.into_iter().map(Some).collect();
    let mut merged = vec![false; applied.len()];
    let mut out = Vec::with_capacity(live.len() + applied.len());
    let (mut l, mut a) = (0, 0);
    while l < live.len() || a < applied.len() {
        let step = (l, a);
        if l < live.len() && a < applied.len() {
            if live_match[l] == Some(a) {
                let base = first_live[a].and_then(|i| live[i].take());
                out.push(apply_element(key, base, &applied[a])?);
                merged[a] = true;
                l += 1;
                a += 1;
                next_shared = shared.next();
                continue;
            }
            if let Some(m) = live_match[l]
                && next_shared.is_some_and(|s| s != m)
            {
                // A shared element whose turn in the applied order has not come yet.
                l += 1;
                continue;
            }
        }
        if l < live.len() {
            match live_match[l] {
                None => {
                    out.extend(live[l].take());
                    l += 1;
                    continue;
                }
                // Already merged with its applied element; structured-merge-diff then goes
                // on to the next applied element in the same step.
                Some(m) if merged[m] => l += 1,
                Some(_) => {}
            }
        }
        if a < applied.len() {
            let base = first_live[a].and_then(|i| live[i].take());
            out.push(apply_element(key, base, &applied[a])?);
            merged[a] = true;
            if next_shared == Some(a) {
                next_shared = shared.next();
            }
            a += 1;
        }
        if (l, a) == step {
            // Unreachable by construction; guarantees termination all the same.
            out.extend(live[l].take());
            l += 1;
        }
    }
    Ok(out)
}

/// Server-side apply keys some lists on more fields than strategic merge does (the Go types'
/// `listMapKey`s): (field, extra key, its default when absent).
const APPLY_EXTRA_KEYS: &[(&str, &str, Option<&str>)] = &[
    ("ports", "protocol", Some("TCP")),
    ("topologySpreadConstraints", "whenUnsatisfiable", None),
];

/// What server-side apply matches a list element on.
fn apply_identity(field: &str, item: &Value, key: Option<&str>) -> Option<Value> {
    let id = identity(item, key)?.clone();
    let Some((_, extra, default)) = APPLY_EXTRA_KEYS.iter().find(|(f, _, _)| *f == field) else {
        return Some(id);
    };
    let extra = item
        .get(*extra)
        .cloned()
        .or_else(|| default.map(Value::from))
        .unwrap_or_default();
    Some(Value::Array(vec![id, extra]))
}

fn same_id(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Array(a), Value::Array(b)) => {
            a.len() == b.len() && a.iter().zip(b).all(|(x, y)| same(x, y))
        }
        _ => same(a, b),
    }
}

fn apply_element(
    key: Option<&str>,
    live: Option<Value>,
    applied: &Value,
) -> Result<Value, PatchError> {
    match (key, live, applied) {
        (Some(_), Some(Value::Object(live)), Value::Object(applied)) => {
            Ok(Value::Object(apply_map(live, applied)?))
        }
        _ => fresh_applied(applied),
    }
}

/// An applied value with nothing live under it: its nulls mean "absent".
fn fresh_applied(value: &Value) -> Result<Value, PatchError> {
    Ok(match value {
        Value::Object(map) => Value::Object(apply_map(Object::new(), map)?),
        Value::Array(list) => {
            Value::Array(list.iter().map(fresh_applied).collect::<Result<_, _>>()?)
        }
        scalar => scalar.clone(),
    })
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn smp(target: Value, patch: Value) -> Value {
        strategic_merge_patch(&target, &patch).unwrap()
    }

    fn names(list: &Value) -> Vec<&str> {
        list.as_array()
            .unwrap()
            .iter()
            .map(|item| item["name"].as_str().unwrap())
            .collect()
    }

    fn pod() -> Value {
        json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": "db-0",
                "namespace": "default",
                "labels": {"app": "db", "sts-role": "reader"},
                "finalizers": ["a.example.com/keep"],
            },
            "spec": {
                "containers": [
                    {"name": "db", "image": "postgres:16", "args": ["-c", "fsync=on"],
                     "ports": [{"containerPort": 5432, "name": "pg"}],
                     "env": [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}]},
                    {"name": "exporter", "image": "exporter:1"},
                ],
                "tolerations": [{"key": "k", "operator": "Exists"}],
            },
            "status": {
                "phase": "Running",
                "conditions": [
                    {"type": "Initialized", "status": "True"},
                    {"type": "Ready", "status": "True", "lastTransitionTime": "t0"},
                    {"type": "ContainersReady", "status": "True"},
                    {"type": "PodScheduled", "status": "True"},
                ],
            },
        })
    }

    // --- strategic merge patch -----------------------------------------------------------

    #[test]
    fn label_patch_merges_into_labels() {
        let out = smp(
            pod(),
            json!({"metadata": {"labels": {"sts-role": "writer"}}}),
        );
        assert_eq!(
            out["metadata"]["labels"],
            json!({"app": "db", "sts-role": "writer"})
        );
        assert_eq!(out["spec"], pod()["spec"]);
    }

    #[test]
    fn null_removes_a_label_and_unmatched_null_is_ignored() {
        let out = smp(
            pod(),
            json!({"metadata": {"labels": {"sts-role": null, "absent": null}}}),
        );
        assert_eq!(out["metadata"]["labels"], json!({"app": "db"}));
    }

    #[test]
    fn annotate_creates_missing_map() {
        let out = smp(
            pod(),
            json!({"metadata": {"annotations": {"note": "x", "gone": null}}}),
        );
        assert_eq!(out["metadata"]["annotations"], json!({"note": "x"}));
    }

    #[test]
    fn status_patch_updates_only_the_named_condition() {
        let out = smp(
            pod(),
            json!({"status": {"conditions": [{"type": "Ready", "status": "False"}]}}),
        );
        assert_eq!(
            out["status"]["conditions"],
            json!([
                {"type": "Initialized", "status": "True"},
                {"type": "Ready", "status": "False", "lastTransitionTime": "t0"},
                {"type": "ContainersReady", "status": "True"},
                {"type": "PodScheduled", "status": "True"},
            ])
        );
        assert_eq!(out["status"]["phase"], "Running");
    }

    fn statefulset() -> Value {
        json!({
            "apiVersion": "apps/v1",
            "kind": "StatefulSet",
            "metadata": {"name": "db", "annotations": {
                "kubectl.kubernetes.io/last-applied-configuration": "{}"}},
            "spec": {
                "replicas": 3,
                "template": {
                    "metadata": {"labels": {"app": "db"}},
                    "spec": {
                        "containers": [
                            {"name": "db", "image": "postgres:16",
                             "env": [{"name": "A", "value": "1"}],
                             "resources": {}, "terminationMessagePath": "/dev/termination-log"},
                            {"name": "exporter", "image": "exporter:1"},
                        ],
                        "restartPolicy": "Always",
                    },
                },
            },
        })
    }

    #[test]
    fn kubectl_apply_three_way_patch_changes_one_image() {
        let patch = json!({
            "metadata": {"annotations": {
                "kubectl.kubernetes.io/last-applied-configuration": "{\"new\":1}"}},
            "spec": {"template": {"spec": {
                "$setElementOrder/containers": [{"name": "db"}, {"name": "exporter"}],
                "containers": [{"image": "postgres:17", "name": "db"}],
            }}},
        });
        let out = smp(statefulset(), patch);
        let containers = &out["spec"]["template"]["spec"]["containers"];
        assert_eq!(names(containers), ["db", "exporter"]);
        assert_eq!(containers[0]["image"], "postgres:17");
        assert_eq!(containers[0]["env"], json!([{"name": "A", "value": "1"}]));
        assert_eq!(
            containers[0]["terminationMessagePath"],
            "/dev/termination-log"
        );
        assert_eq!(
            containers[1],
            json!({"name": "exporter", "image": "exporter:1"})
        );
        assert_eq!(out["spec"]["replicas"], 3);
        assert_eq!(
            out["metadata"]["annotations"]["kubectl.kubernetes.io/last-applied-configuration"],
            "{\"new\":1}"
        );
        assert!(!out.to_string().contains('$'));
    }

    #[test]
    fn set_element_order_reorders_and_adds() {
        let patch = json!({"spec": {"template": {"spec": {
            "$setElementOrder/containers": [{"name": "sidecar"}, {"name": "exporter"}, {"name": "db"}],
            "containers": [{"name": "sidecar", "image": "busybox"}],
        }}}});
        let out = smp(statefulset(), patch);
        assert_eq!(
            names(&out["spec"]["template"]["spec"]["containers"]),
            ["sidecar", "exporter", "db"]
        );
    }

    #[test]
    fn set_element_order_keeps_server_only_elements_in_live_position() {
        let live = json!({"spec": {"containers": [
            {"name": "a"}, {"name": "injected"}, {"name": "b"}]}});
        let patch = json!({"spec": {
            "$setElementOrder/containers": [{"name": "a"}, {"name": "b"}],
            "containers": [{"name": "b", "image": "b:2"}],
        }});
        let out = smp(live, patch);
        assert_eq!(names(&out["spec"]["containers"]), ["a", "injected", "b"]);
        assert_eq!(out["spec"]["containers"][2]["image"], "b:2");
    }

    #[test]
    fn set_element_order_that_contradicts_the_patch_is_rejected() {
        let live = json!({"spec": {"containers": [{"name": "a"}, {"name": "b"}]}});
        let patch = json!({"spec": {
            "$setElementOrder/containers": [{"name": "a"}, {"name": "b"}],
            "containers": [{"name": "b"}, {"name": "a"}],
        }});
        let err = strategic_merge_patch(&live, &patch).unwrap_err();
        assert!(
            matches!(err, PatchError::SetElementOrderMismatch { .. }),
            "{err}"
        );
    }

    #[test]
    fn new_element_without_order_goes_first_as_in_the_apiserver() {
        let live = json!({"spec": {"containers": [{"name": "a"}, {"name": "b"}]}});
        let out = smp(live, json!({"spec": {"containers": [{"name": "c"}]}}));
        assert_eq!(names(&out["spec"]["containers"]), ["c", "a", "b"]);
    }

    #[test]
    fn patch_order_wins_over_live_order() {
        let live = json!({"spec": {"containers": [{"name": "1"}, {"name": "2"}, {"name": "3"}]}});
        let out = smp(
            live,
            json!({"spec": {"containers": [{"name": "3", "x": 1}, {"name": "1", "x": 2}]}}),
        );
        assert_eq!(names(&out["spec"]["containers"]), ["2", "3", "1"]);
    }

    #[test]
    fn swapping_a_container_orders_like_the_apiserver() {
        // kubectl apply replacing "old" by "new" next to a container the server injected.
        let live = json!({"spec": {"containers": [
            {"name": "old"}, {"name": "app"}, {"name": "injected"}]}});
        let patch = json!({"spec": {
            "$setElementOrder/containers": [{"name": "app"}, {"name": "new"}],
            "containers": [{"name": "new", "image": "n"}, {"$patch": "delete", "name": "old"}],
        }});
        let out = smp(live, patch);
        assert_eq!(
            names(&out["spec"]["containers"]),
            ["app", "injected", "new"]
        );
    }

    #[test]
    fn patch_delete_removes_a_container() {
        let patch = json!({"spec": {"template": {"spec": {
            "$setElementOrder/containers": [{"name": "db"}],
            "containers": [{"$patch": "delete", "name": "exporter"}],
        }}}});
        let out = smp(statefulset(), patch);
        assert_eq!(
            names(&out["spec"]["template"]["spec"]["containers"]),
            ["db"]
        );
    }

    #[test]
    fn patch_replace_in_a_list_replaces_it() {
        let patch = json!({"spec": {"template": {"spec": {"containers": [
            {"$patch": "replace"}, {"name": "only", "image": "x", "bogus": null},
        ]}}}});
        let out = smp(statefulset(), patch);
        assert_eq!(
            out["spec"]["template"]["spec"]["containers"],
            json!([{"name": "only", "image": "x"}])
        );
    }

    #[test]
    fn patch_merge_in_a_list_is_rejected() {
        let patch = json!({"spec": {"containers": [{"$patch": "merge", "name": "a"}]}});
        let err = strategic_merge_patch(&pod(), &patch).unwrap_err();
        assert!(matches!(err, PatchError::ListMergeDirective));
    }

    #[test]
    fn patch_replace_and_delete_on_maps() {
        let out = smp(
            pod(),
            json!({"metadata": {"labels": {"$patch": "replace", "only": "this"}}}),
        );
        assert_eq!(out["metadata"]["labels"], json!({"only": "this"}));

        let out = smp(pod(), json!({"metadata": {"labels": {"$patch": "delete"}}}));
        assert!(out["metadata"].get("labels").is_none());
        assert_eq!(out["metadata"]["name"], "db-0");

        let out = smp(pod(), json!({"$patch": "replace", "kind": "Pod"}));
        assert_eq!(out, json!({"kind": "Pod"}));
    }

    #[test]
    fn unknown_patch_directive_is_an_error() {
        let err =
            strategic_merge_patch(&pod(), &json!({"metadata": {"$patch": "explode"}})).unwrap_err();
        assert!(matches!(err, PatchError::UnknownPatchDirective { .. }));
        assert!(err.to_string().contains("explode"), "{err}");

        let patch = json!({"spec": {"containers": [{"$patch": "nope", "name": "db"}]}});
        assert!(matches!(
            strategic_merge_patch(&pod(), &patch),
            Err(PatchError::UnknownPatchDirective { .. })
        ));
    }

    #[test]
    fn finalizers_are_unioned() {
        let out = smp(
            pod(),
            json!({"metadata": {"finalizers": ["b.example.com/x", "a.example.com/keep"]}}),
        );
        let finalizers = out["metadata"]["finalizers"].as_array().unwrap();
        assert_eq!(finalizers.len(), 2);
        assert!(finalizers.contains(&json!("a.example.com/keep")));
        assert!(finalizers.contains(&json!("b.example.com/x")));

        // With the order kubectl sends, live comes first and the new one follows.
        let out = smp(
            pod(),
            json!({"metadata": {
                "$setElementOrder/finalizers": ["a.example.com/keep", "b.example.com/x"],
                "finalizers": ["b.example.com/x"],
            }}),
        );
        assert_eq!(
            out["metadata"]["finalizers"],
            json!(["a.example.com/keep", "b.example.com/x"])
        );
    }

    #[test]
    fn delete_from_primitive_list() {
        let live = json!({"metadata": {"finalizers": ["a", "b", "c"]}});
        let out = smp(
            live.clone(),
            json!({"metadata": {"$deleteFromPrimitiveList/finalizers": ["b", "zzz"]}}),
        );
        assert_eq!(out["metadata"]["finalizers"], json!(["a", "c"]));
        // Deleting from a list that does not exist does not create it.
        let out = smp(
            json!({"metadata": {}}),
            json!({"metadata": {"$deleteFromPrimitiveList/finalizers": ["b"]}}),
        );
        assert_eq!(out, json!({"metadata": {}}));
    }

    #[test]
    fn other_primitive_lists_and_unkeyed_lists_are_replaced() {
        let patch = json!({"spec": {
            "containers": [{"name": "db", "args": ["-c", "fsync=off"]}],
            "tolerations": [{"key": "other", "operator": "Exists"}],
        }});
        let out = smp(pod(), patch);
        assert_eq!(
            out["spec"]["containers"][0]["args"],
            json!(["-c", "fsync=off"])
        );
        assert_eq!(
            out["spec"]["tolerations"],
            json!([{"key": "other", "operator": "Exists"}])
        );
        // An empty merging list changes nothing; an empty atomic list empties it.
        let out = smp(
            pod(),
            json!({"spec": {"containers": [], "tolerations": []}}),
        );
        assert_eq!(out["spec"]["containers"], pod()["spec"]["containers"]);
        assert_eq!(out["spec"]["tolerations"], json!([]));
    }

    #[test]
    fn nested_lists_merge_by_their_own_keys() {
        let patch = json!({"spec": {"containers": [{"name": "db",
            "env": [{"name": "B", "value": "20"}, {"name": "A", "$patch": "delete"}],
            "ports": [{"containerPort": 9187, "name": "metrics"}],
        }]}});
        let out = smp(pod(), patch);
        let db = &out["spec"]["containers"][0];
        assert_eq!(db["env"], json!([{"name": "B", "value": "20"}]));
        let ports: Vec<_> = db["ports"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["containerPort"].as_u64().unwrap())
            .collect();
        assert_eq!(ports, [9187, 5432]);
    }

    #[test]
    fn service_ports_merge_on_port() {
        let svc = json!({"spec": {"ports": [
            {"name": "http", "port": 80, "targetPort": 8080},
            {"name": "https", "port": 443, "targetPort": 8443},
        ]}});
        let out = smp(
            svc,
            json!({"spec": {"ports": [{"port": 80, "targetPort": 9090}]}}),
        );
        assert_eq!(
            out["spec"]["ports"],
            json!([
                {"name": "http", "port": 80, "targetPort": 9090},
                {"name": "https", "port": 443, "targetPort": 8443},
            ])
        );
    }

    #[test]
    fn retain_keys_clears_unlisted_fields() {
        let live = json!({"spec": {"strategy": {
            "type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1}}}});
        let patch = json!({"spec": {"strategy": {
            "$retainKeys": ["type"], "type": "Recreate"}}});
        let out = smp(live.clone(), patch);
        assert_eq!(out["spec"]["strategy"], json!({"type": "Recreate"}));

        let bad = json!({"spec": {"strategy": {"$retainKeys": ["type"], "other": 1}}});
        assert!(matches!(
            strategic_merge_patch(&live, &bad),
            Err(PatchError::RetainKeysMismatch(field)) if field == "other"
        ));
    }

    #[test]
    fn retain_keys_in_volume_elements() {
        let live = json!({"spec": {"volumes": [
            {"name": "data", "emptyDir": {}},
            {"name": "cfg", "configMap": {"name": "c"}},
        ]}});
        let patch = json!({"spec": {
            "$setElementOrder/volumes": [{"name": "data"}, {"name": "cfg"}],
            "volumes": [{"$retainKeys": ["name", "persistentVolumeClaim"], "name": "data",
                         "persistentVolumeClaim": {"claimName": "pvc"}, "emptyDir": null}],
        }});
        let out = smp(live, patch);
        assert_eq!(
            out["spec"]["volumes"],
            json!([
                {"name": "data", "persistentVolumeClaim": {"claimName": "pvc"}},
                {"name": "cfg", "configMap": {"name": "c"}},
            ])
        );
    }

    #[test]
    fn directives_never_reach_the_result() {
        let patch = json!({"spec": {"containers": [{"name": "new", "image": "x",
            "$setElementOrder/env": [{"name": "E"}],
            "env": [{"name": "E", "value": "1"}, {"name": "F", "$patch": "delete"}],
            "resources": {"$patch": "replace", "limits": {"cpu": "1"}},
        }]}});
        let out = smp(pod(), patch);
        assert!(!out.to_string().contains("$patch"), "{out}");
        assert!(!out.to_string().contains("$setElementOrder"), "{out}");
        let new = &out["spec"]["containers"][0];
        assert_eq!(new["name"], "new");
        assert_eq!(new["env"], json!([{"name": "E", "value": "1"}]));
        assert_eq!(new["resources"], json!({"limits": {"cpu": "1"}}));
    }

    #[test]
    fn missing_merge_key_is_an_error() {
        let patch = json!({"spec": {"containers": [{"image": "x"}]}});
        let err = strategic_merge_patch(&pod(), &patch).unwrap_err();
        assert!(
            matches!(err, PatchError::MissingMergeKey { key: "name", .. }),
            "{err}"
        );
    }

    #[test]
    fn type_changes_replace_the_value() {
        let out = smp(
            json!({"a": "text", "b": {"x": 1}}),
            json!({"a": {"k": "v", "n": null}, "b": "flat"}),
        );
        assert_eq!(out, json!({"a": {"k": "v"}, "b": "flat"}));
    }

    #[test]
    fn non_object_patch_is_rejected_and_null_target_is_empty() {
        assert!(matches!(
            strategic_merge_patch(&pod(), &json!([1])),
            Err(PatchError::NotAnObject)
        ));
        assert_eq!(smp(Value::Null, json!({"a": 1})), json!({"a": 1}));
    }

    #[test]
    fn smp_does_not_touch_inputs_and_is_idempotent_for_labels() {
        let live = pod();
        let patch = json!({"metadata": {"labels": {"sts-role": "writer"}}});
        let once = smp(live.clone(), patch.clone());
        let twice = smp(once.clone(), patch);
        assert_eq!(once, twice);
        assert_eq!(live, pod());
    }

    // --- JSON patch ----------------------------------------------------------------------

    #[test]
    fn json_patch_add_replace_remove_test() {
        let patch = json!([
            {"op": "test", "path": "/metadata/labels/app", "value": "db"},
            {"op": "add", "path": "/metadata/labels/sts-role", "value": "writer"},
            {"op": "replace", "path": "/spec/containers/0/image", "value": "postgres:17"},
            {"op": "remove", "path": "/spec/tolerations"},
            {"op": "add", "path": "/metadata/finalizers/-", "value": "z"},
        ]);
        let out = json_patch(&pod(), &patch).unwrap();
        assert_eq!(out["metadata"]["labels"]["sts-role"], "writer");
        assert_eq!(out["spec"]["containers"][0]["image"], "postgres:17");
        assert!(out["spec"].get("tolerations").is_none());
        assert_eq!(
            out["metadata"]["finalizers"],
            json!(["a.example.com/keep", "z"])
        );
    }

    #[test]
    fn json_patch_failing_test_is_an_error() {
        let patch = json!([
            {"op": "add", "path": "/metadata/labels/x", "value": "1"},
            {"op": "test", "path": "/metadata/labels/app", "value": "web"},
        ]);
        let err = json_patch(&pod(), &patch).unwrap_err();
        assert!(
            matches!(&err, PatchError::TestFailed { operation: 1, path } if path == "/metadata/labels/app"),
            "{err}"
        );
    }

    #[test]
    fn json_patch_missing_path_and_bad_documents() {
        let err =
            json_patch(&pod(), &json!([{"op": "remove", "path": "/metadata/nope"}])).unwrap_err();
        assert!(
            matches!(err, PatchError::PathNotFound { operation: 0, .. }),
            "{err}"
        );
        let err = json_patch(
            &pod(),
            &json!([{"op": "replace", "path": "/spec/nope", "value": 1}]),
        )
        .unwrap_err();
        assert!(matches!(err, PatchError::PathNotFound { .. }), "{err}");
        let err = json_patch(&pod(), &json!({"op": "add"})).unwrap_err();
        assert!(matches!(err, PatchError::InvalidJsonPatch(_)), "{err}");
        let err = json_patch(&pod(), &json!([{"op": "frobnicate", "path": "/a"}])).unwrap_err();
        assert!(matches!(err, PatchError::InvalidJsonPatch(_)), "{err}");
        let err = json_patch(
            &pod(),
            &json!([{"op": "move", "from": "/nope", "path": "/a"}]),
        )
        .unwrap_err();
        assert!(matches!(err, PatchError::JsonPatchFailed { .. }), "{err}");
    }

    // --- merge patch ---------------------------------------------------------------------

    #[test]
    fn merge_patch_merges_maps_deletes_nulls_and_replaces_lists() {
        let patch = json!({
            "metadata": {"labels": {"sts-role": null, "new": "1"}},
            "spec": {"containers": [{"name": "only"}]},
        });
        let out = merge_patch(&pod(), &patch).unwrap();
        assert_eq!(out["metadata"]["labels"], json!({"app": "db", "new": "1"}));
        assert_eq!(out["spec"]["containers"], json!([{"name": "only"}]));
        assert_eq!(out["spec"]["tolerations"], pod()["spec"]["tolerations"]);
    }

    #[test]
    fn merge_patch_non_object_replaces_document() {
        assert_eq!(merge_patch(&pod(), &json!([1, 2])).unwrap(), json!([1, 2]));
    }

    // --- server-side apply ---------------------------------------------------------------

    #[test]
    fn apply_creates_from_the_applied_configuration() {
        let applied = json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "c", "labels": {"a": "1", "b": null}},
            "data": {"k": "v"},
        });
        let out = server_side_apply(None, &applied).unwrap();
        assert_eq!(
            out,
            json!({
                "apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": "c", "labels": {"a": "1"}},
                "data": {"k": "v"},
            })
        );
    }

    #[test]
    fn apply_merges_labels_containers_by_name_and_replaces_args() {
        let applied = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "db-0", "labels": {"sts-role": "writer", "tier": "data"}},
            "spec": {"containers": [
                {"name": "db", "image": "postgres:17", "args": ["-c", "fsync=off"]},
                {"name": "sidecar", "image": "busybox"},
            ]},
        });
        let out = server_side_apply(Some(&pod()), &applied).unwrap();
        assert_eq!(
            out["metadata"]["labels"],
            json!({"app": "db", "sts-role": "writer", "tier": "data"})
        );
        let containers = &out["spec"]["containers"];
        assert_eq!(names(containers), ["db", "exporter", "sidecar"]);
        assert_eq!(containers[0]["image"], "postgres:17");
        assert_eq!(containers[0]["args"], json!(["-c", "fsync=off"]));
        assert_eq!(containers[0]["env"], pod()["spec"]["containers"][0]["env"]);
        assert_eq!(containers[1], pod()["spec"]["containers"][1]);
        assert_eq!(out["spec"]["tolerations"], pod()["spec"]["tolerations"]);
        assert_eq!(out["status"], pod()["status"]);
    }

    #[test]
    fn apply_null_removes_and_atomic_lists_are_replaced() {
        let applied = json!({
            "metadata": {"labels": {"app": null}},
            "spec": {"tolerations": [{"key": "new", "operator": "Exists"}]},
        });
        let out = server_side_apply(Some(&pod()), &applied).unwrap();
        assert_eq!(out["metadata"]["labels"], json!({"sts-role": "reader"}));
        assert_eq!(
            out["spec"]["tolerations"],
            json!([{"key": "new", "operator": "Exists"}])
        );
    }

    #[test]
    fn apply_list_order_follows_structured_merge_diff() {
        let live = json!({"spec": {"containers": [
            {"name": "a"}, {"name": "b"}, {"name": "c"}]}});
        // Shared elements take the applied order, new ones follow the shared one before them,
        // live-only ones keep their place.
        let applied = json!({"spec": {"containers": [
            {"name": "c"}, {"name": "new"}, {"name": "a"}]}});
        let out = server_side_apply(Some(&live), &applied).unwrap();
        assert_eq!(names(&out["spec"]["containers"]), ["b", "c", "new", "a"]);

        let applied = json!({"spec": {"containers": [{"name": "z"}]}});
        let out = server_side_apply(Some(&live), &applied).unwrap();
        assert_eq!(names(&out["spec"]["containers"]), ["a", "b", "c", "z"]);
    }

    #[test]
    fn apply_unions_finalizers_and_merges_conditions() {
        let applied = json!({
            "metadata": {"finalizers": ["b.example.com/x"]},
            "status": {"conditions": [{"type": "Ready", "status": "False"}]},
        });
        let out = server_side_apply(Some(&pod()), &applied).unwrap();
        assert_eq!(
            out["metadata"]["finalizers"],
            json!(["a.example.com/keep", "b.example.com/x"])
        );
        let conditions = out["status"]["conditions"].as_array().unwrap();
        assert_eq!(conditions.len(), 4);
        assert_eq!(
            conditions[1],
            json!({"type": "Ready", "status": "False", "lastTransitionTime": "t0"})
        );
    }

    #[test]
    fn apply_keys_ports_on_port_and_protocol() {
        let live = json!({"spec": {"containers": [{"name": "dns", "ports": [
            {"containerPort": 53, "protocol": "UDP", "name": "dns"}]}]}});
        let applied = json!({"spec": {"containers": [{"name": "dns", "ports": [
            {"containerPort": 53, "protocol": "UDP", "name": "dns"},
            {"containerPort": 53, "name": "dns-tcp"}]}]}});
        let out = server_side_apply(Some(&live), &applied).unwrap();
        assert_eq!(
            out["spec"]["containers"][0]["ports"],
            json!([
                {"containerPort": 53, "protocol": "UDP", "name": "dns"},
                {"containerPort": 53, "name": "dns-tcp"},
            ])
        );
        let dup = json!({"spec": {"ports": [
            {"port": 80, "protocol": "TCP"}, {"port": 80}]}});
        assert!(matches!(
            server_side_apply(None, &dup),
            Err(PatchError::DuplicateListEntry { .. })
        ));
    }

    #[test]
    fn apply_rejects_duplicates_missing_keys_and_non_objects() {
        let dup = json!({"spec": {"containers": [{"name": "a"}, {"name": "a"}]}});
        assert!(matches!(
            server_side_apply(Some(&pod()), &dup),
            Err(PatchError::DuplicateListEntry { .. })
        ));
        let missing = json!({"spec": {"containers": [{"image": "x"}]}});
        assert!(matches!(
            server_side_apply(Some(&pod()), &missing),
            Err(PatchError::MissingMergeKey { .. })
        ));
        assert!(matches!(
            server_side_apply(None, &json!("x")),
            Err(PatchError::NotAnObject)
        ));
    }
}
