//! Strategic merge patch. The structure follows strategicpatch's mergeMap/mergeSlice with
//! MergeParallelList and IgnoreUnmatchedNulls set, as StrategicMergeMapPatch uses them, so that
//! element order and error cases come out as the apiserver's do.

use super::*;

/// Merges `patch` into `original`; `None` means the map was deleted with `$patch: delete`.
pub(super) fn merge_map(
    mut original: Object,
    patch: &Object,
) -> Result<Option<Object>, PatchError> {
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
pub(super) fn merge_value(
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

pub(super) fn merge_list(
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

pub(super) fn merge_primitive_set(
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

pub(super) fn merge_keyed_list(
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
pub(super) fn fresh_list(items: &[Value]) -> Result<Vec<Value>, PatchError> {
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
pub(super) fn apply_element_order(
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
pub(super) fn aliased_live_order(live: &[Value], patch: &[Value], key: &str) -> Vec<Value> {
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
pub(super) fn validate_element_order(
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
pub(super) fn apply_retain_keys(original: &mut Object, patch: &Object) -> Result<(), PatchError> {
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

pub(super) fn delete_from_primitive_list(
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
pub(super) fn directive_field<'a>(
    key: &'a str,
    prefix: &str,
) -> Result<Option<&'a str>, PatchError> {
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
pub(super) fn partition_by_presence(
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
pub(super) fn normalize_order(
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
