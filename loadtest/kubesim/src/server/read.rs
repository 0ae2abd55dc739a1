//! Reads: one object or a list, in the representation the client asked for (JSON, Table, PartialObjectMetadata), with selectors and stale-read faults.

use super::*;

impl Ctx {
    /// One stored object in the representation the client asked for.
    pub(super) fn represent(&self, obj: &Value) -> Value {
        let served = convert::to_served(&self.rt, obj);
        match self.repr {
            Repr::Full => served,
            Repr::Metadata => partial_metadata(&served),
            Repr::Table => self.table(
                std::slice::from_ref(&served),
                json!({"resourceVersion": meta::meta_str(obj, "resourceVersion")}),
            ),
        }
    }

    pub(super) fn respond_one(&self, code: StatusCode, obj: &Value) -> Response<Body> {
        json_response(code, &self.represent(obj))
    }

    pub(super) fn table(&self, objects: &[Value], list_meta: Value) -> Value {
        let crd_cols = self
            .rt
            .crd
            .as_ref()
            .map(|c| c.printer_columns.clone().unwrap_or(json!([])));
        let columns = table::columns(&self.rt.group, &self.rt.plural, crd_cols.as_ref());
        let include = match self.query.get("includeObject").map(String::as_str) {
            Some("None") => table::IncludeObject::None,
            Some("Object") => table::IncludeObject::Object,
            _ => table::IncludeObject::Metadata,
        };
        table::to_table(
            &columns,
            objects,
            include,
            list_meta,
            jiff::Timestamp::now(),
        )
    }

    /// The label and field selector of the request as one predicate over stored objects.
    pub(super) fn filter(&self) -> ApiResult<impl Fn(&Value) -> bool + use<>> {
        let labels = LabelSelector::parse(
            self.query
                .get("labelSelector")
                .map(String::as_str)
                .unwrap_or(""),
        )
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
        let fields = FieldSelector::parse(
            self.query
                .get("fieldSelector")
                .map(String::as_str)
                .unwrap_or(""),
        )
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
        fields
            .validate_for(&self.rt.group, &self.rt.plural)
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
        let rt = self.rt.clone();
        Ok(move |o: &Value| {
            labels.matches(meta::labels(o))
                && (fields.is_empty() || fields.matches(&convert::to_served(&rt, o)))
        })
    }

    /// How stale a read may be: `Some` for a `resourceVersion=0` read that a
    /// [`crate::faults::StaleRead`] fault matches (served from a lagging snapshot, as from the
    /// apiserver's watch cache); None for quorum reads and unfaulted ones.
    pub(super) fn stale_lag(&self) -> Option<Duration> {
        if self.query.get("resourceVersion").map(String::as_str) != Some("0") {
            return None;
        }
        self.app
            .faults
            .stale_read_lag(&self.ua, &self.rt.group, &self.rt.plural)
    }

    pub(super) fn list(&self) -> ApiResult<Response<Body>> {
        if self
            .query
            .get("resourceVersionMatch")
            .is_some_and(|m| !m.is_empty())
            && self
                .query
                .get("resourceVersion")
                .is_none_or(String::is_empty)
        {
            return Err(ApiError {
                details: Some(
                    json!({"group": "meta.k8s.io", "kind": "ListOptions", "causes": [{"reason": "FieldValueForbidden", "message": "Forbidden: resourceVersionMatch is forbidden unless resourceVersion is provided", "field": "resourceVersionMatch"}]}),
                ),
                ..ApiError::new(
                    422,
                    "Invalid",
                    "ListOptions.meta.k8s.io \"\" is invalid: resourceVersionMatch: Forbidden: resourceVersionMatch is forbidden unless resourceVersion is provided",
                )
            });
        }
        let keep = self.filter()?;
        let limit = self
            .query
            .get("limit")
            .and_then(|l| l.parse::<usize>().ok())
            .filter(|l| *l > 0);
        let res = match self.stale_lag() {
            Some(age) => self
                .app
                .store
                .list_as_of(&self.rt, self.ns(), &|o| keep(o), age)?,
            None => self.app.store.list(
                &self.rt,
                self.ns(),
                &|o| keep(o),
                limit,
                self.query
                    .get("continue")
                    .map(String::as_str)
                    .filter(|c| !c.is_empty()),
            )?,
        };
        let mut list_meta = json!({"resourceVersion": res.rv.to_string()});
        if let Some(c) = &res.continue_token {
            list_meta["continue"] = json!(c);
        }
        let selected = ["labelSelector", "fieldSelector"]
            .iter()
            .any(|k| self.query.get(*k).is_some_and(|v| !v.is_empty()));
        if let Some(r) = res.remaining.filter(|_| !selected) {
            list_meta["remainingItemCount"] = json!(r);
        }
        let items: Vec<Value> = res
            .items
            .iter()
            .map(|o| convert::to_served(&self.rt, o))
            .collect();
        let out = match self.repr {
            Repr::Table => self.table(&items, list_meta),
            Repr::Metadata => json!({
                "kind": "PartialObjectMetadataList",
                "apiVersion": "meta.k8s.io/v1",
                "metadata": list_meta,
                "items": items.iter().map(partial_metadata).collect::<Vec<_>>(),
            }),
            Repr::Full => json!({
                "kind": format!("{}List", self.rt.kind),
                "apiVersion": self.rt.api_version(),
                "metadata": list_meta,
                "items": items,
            }),
        };
        Ok(json_response(StatusCode::OK, &out))
    }
}

pub(super) fn partial_metadata(obj: &Value) -> Value {
    json!({
        "kind": "PartialObjectMetadata",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": obj.get("metadata").cloned().unwrap_or(json!({})),
    })
}
