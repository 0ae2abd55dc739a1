//! PATCH in its four content types, and the scale subresource.

use super::*;

impl Ctx {
    pub(super) fn patch(
        &self,
        name: &str,
        subres: Option<Subresource>,
        scale: bool,
        body: &[u8],
    ) -> ApiResult<Response<Body>> {
        let ct = self
            .content_type
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_string();
        let apply = ct == "application/apply-patch+yaml" || ct == "application/apply-patch+cbor";
        let known = matches!(
            ct.as_str(),
            "application/json-patch+json"
                | "application/merge-patch+json"
                | "application/strategic-merge-patch+json"
        );
        if !known && !apply {
            return Err(ApiError {
                details: Some(json!({})),
                ..ApiError::new(415, "UnsupportedMediaType", "415: Unsupported Media Type")
            });
        }
        let patch_doc: Value = if apply {
            let s = std::str::from_utf8(body)
                .map_err(|e| ApiError::bad_request(format!("body is not UTF-8: {e}")))?;
            serde_saphyr::from_str(s)
                .map_err(|e| ApiError::bad_request(format!("error decoding YAML: {e}")))?
        } else {
            serde_json::from_slice(body)
                .map_err(|e| ApiError::bad_request(format!("error decoding patch: {e}")))?
        };
        if apply && self.query.get("fieldManager").is_none_or(String::is_empty) {
            return Err(ApiError {
                details: Some(
                    json!({"group": "meta.k8s.io", "kind": "PatchOptions", "causes": [{"reason": "FieldValueRequired", "message": "Required value: is required for apply patch", "field": "fieldManager"}]}),
                ),
                ..ApiError::new(
                    422,
                    "Invalid",
                    "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch",
                )
            });
        }
        let kind = match ct.as_str() {
            "application/json-patch+json" => PatchKind::Json,
            "application/merge-patch+json" => PatchKind::Merge,
            "application/strategic-merge-patch+json" => {
                if self.rt.crd.is_some() {
                    return Err(ApiError::new(
                        415,
                        "UnsupportedMediaType",
                        "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml",
                    ));
                }
                PatchKind::Strategic
            }
            _ if apply => PatchKind::Apply,
            other => {
                return Err(ApiError::new(
                    415,
                    "UnsupportedMediaType",
                    format!(
                        "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml, application/strategic-merge-patch+json (got {other})"
                    ),
                ));
            }
        };
        let rt = self.rt.clone();
        let sub = subres.unwrap_or(Subresource::Main);
        let create_if_missing = kind == PatchKind::Apply && !scale && sub == Subresource::Main;
        let created = create_if_missing && self.app.store.get(&self.rt, self.ns(), name).is_err();
        let this = self;
        let updated = self.app.store.update_with(
            &self.rt,
            self.ns(),
            name,
            sub,
            &self.write_opts(),
            &mut |cur| {
                let served = match cur {
                    Some(c) if scale => this.to_scale(c),
                    Some(c) => convert::to_served(&rt, c),
                    None => Value::Null,
                };
                let mut patched = match kind {
                    PatchKind::Json => patch::json_patch_owned(served, &patch_doc),
                    PatchKind::Merge => Ok(patch::merge_patch_owned(served, &patch_doc)),
                    PatchKind::Strategic => patch::strategic_merge_patch_owned(served, &patch_doc),
                    PatchKind::Apply => patch::server_side_apply(cur.map(|_| &served), &patch_doc),
                }
                .map_err(|e| {
                    if kind == PatchKind::Json {
                        // A JSON patch that cannot be applied (a failed test, a missing path).
                        ApiError {
                            details: Some(json!({})),
                            ..ApiError::new(
                                422,
                                "Invalid",
                                "the server rejected our request due to an error in our request",
                            )
                        }
                    } else {
                        ApiError::bad_request(e.to_string())
                    }
                })?;
                if scale {
                    let cur = cur.ok_or_else(|| ApiError::not_found(&rt, name))?;
                    return apply_scale(&rt, cur, &patched);
                }
                // metadata.uid cannot be patched: a different uid is an invalid update (twice:
                // both metadata validations of an update report it), not a precondition.
                if let Some(c) = cur
                    && let Some(uid) = meta::meta_str(&patched, "uid")
                    && !uid.is_empty()
                    && uid != meta::uid(c)
                {
                    let cause = (
                        "FieldValueInvalid".to_string(),
                        "metadata.uid".to_string(),
                        format!("Invalid value: {:?}: field is immutable", uid),
                    );
                    return Err(ApiError::invalid(&rt, name, &[cause.clone(), cause]));
                }
                // A patch that does not name a resourceVersion is applied to the latest
                // object, never rejected as stale.
                let patch_rv = patch_doc
                    .pointer("/metadata/resourceVersion")
                    .and_then(Value::as_str);
                if patch_rv.is_none() && kind != PatchKind::Json {
                    meta::meta_mut(&mut patched).remove("resourceVersion");
                }
                Ok(convert::into_stored(&rt, patched))
            },
            create_if_missing,
        )?;
        if scale {
            return Ok(json_response(StatusCode::OK, &self.to_scale(&updated)));
        }
        let code = if created {
            StatusCode::CREATED
        } else {
            StatusCode::OK
        };
        Ok(self.respond_one(code, &updated))
    }

    pub(super) fn to_scale(&self, obj: &Value) -> Value {
        let paths = self.rt.scale.clone();
        let (spec, status, sel) = match &paths {
            Some(p) => (
                meta::get_path(obj, &p.spec_replicas)
                    .cloned()
                    .unwrap_or(json!(0)),
                meta::get_path(obj, &p.status_replicas)
                    .cloned()
                    .unwrap_or(json!(0)),
                p.label_selector
                    .as_ref()
                    .and_then(|s| meta::get_path(obj, s))
                    .cloned(),
            ),
            None => (json!(0), json!(0), None),
        };
        let selector = sel.or_else(|| {
            obj.pointer("/spec/selector").map(|s| {
                json!(
                    crate::selector::LabelSelector::from_json(s)
                        .map(|l| l.to_string())
                        .unwrap_or_default()
                )
            })
        });
        let m = meta::meta(obj).cloned().unwrap_or_default();
        let mut md = serde_json::Map::new();
        for f in [
            "name",
            "namespace",
            "uid",
            "resourceVersion",
            "creationTimestamp",
        ] {
            if let Some(v) = m.get(f) {
                md.insert(f.into(), v.clone());
            }
        }
        let mut status_obj = json!({"replicas": status});
        if let Some(s) = selector {
            status_obj["selector"] = s;
        }
        json!({
            "kind": "Scale",
            "apiVersion": "autoscaling/v1",
            "metadata": md,
            "spec": if spec == json!(0) { json!({}) } else { json!({"replicas": spec}) },
            "status": status_obj,
        })
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum PatchKind {
    Json,
    Merge,
    Strategic,
    Apply,
}

/// Write a Scale's `spec.replicas` back to the scaled object.
pub(super) fn apply_scale(rt: &ResourceType, cur: &Value, scale: &Value) -> ApiResult<Value> {
    let replicas = scale
        .pointer("/spec/replicas")
        .and_then(Value::as_i64)
        .ok_or_else(|| {
            ApiError::invalid(
                rt,
                meta::name(cur),
                &[(
                    "FieldValueRequired".into(),
                    "spec.replicas".into(),
                    "Required value".into(),
                )],
            )
        })?;
    if replicas < 0 {
        return Err(ApiError::invalid(
            rt,
            meta::name(cur),
            &[(
                "FieldValueInvalid".into(),
                "spec.replicas".into(),
                format!("Invalid value: {replicas}: must be greater than or equal to 0"),
            )],
        ));
    }
    if let Some(rv) = scale
        .pointer("/metadata/resourceVersion")
        .and_then(Value::as_str)
        && Some(rv) != meta::meta_str(cur, "resourceVersion")
    {
        return Err(ApiError::stale(rt, meta::name(cur)));
    }
    let mut obj = cur.clone();
    let path = rt
        .scale
        .as_ref()
        .map(|s| s.spec_replicas.clone())
        .unwrap_or(".spec.replicas".into());
    meta::set_path(&mut obj, &path, json!(replicas));
    Ok(obj)
}
