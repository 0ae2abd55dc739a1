//! Conversion between a served version and the stored form of an object.
//!
//! The only real conversion is the one the apiserver does for Events: `events.k8s.io/v1`
//! Events are stored as core `v1` Events, so an Event written by an operator through
//! `events.k8s.io` is what `kubectl describe` finds through the core API.

use serde_json::{Map, Value, json};

use crate::registry::ResourceType;

const RENAMES: &[(&str, &str)] = &[
    ("regarding", "involvedObject"),
    ("note", "message"),
    ("reportingController", "reportingComponent"),
    ("deprecatedSource", "source"),
    ("deprecatedFirstTimestamp", "firstTimestamp"),
    ("deprecatedLastTimestamp", "lastTimestamp"),
    ("deprecatedCount", "count"),
];

fn rename(obj: &Value, to_core: bool) -> Value {
    let Some(m) = obj.as_object() else {
        return obj.clone();
    };
    let mut out = Map::new();
    for (k, v) in m {
        let renamed = RENAMES.iter().find_map(|(events, core)| {
            if to_core && k == events {
                Some(*core)
            } else if !to_core && k == core {
                Some(*events)
            } else {
                None
            }
        });
        out.insert(renamed.unwrap_or(k).to_string(), v.clone());
    }
    Value::Object(out)
}

/// Stored form → the form served for `rt`.
pub fn to_served(rt: &ResourceType, stored: &Value) -> Value {
    let mut v = if rt.is_event_view() {
        rename(stored, false)
    } else {
        stored.clone()
    };
    v["apiVersion"] = json!(rt.api_version());
    v["kind"] = json!(rt.kind);
    v
}

/// Served form of `rt` → stored form.
pub fn to_stored(rt: &ResourceType, served: &Value) -> Value {
    into_stored(rt, served.clone())
}

/// [`to_stored`] of an object the caller owns: no copy unless the kind is renamed.
pub fn into_stored(rt: &ResourceType, served: Value) -> Value {
    if rt.is_event_view() {
        let mut v = rename(&served, true);
        v["apiVersion"] = json!("v1");
        v["kind"] = json!("Event");
        // Core Events need a source and timestamps for kubectl's describe/get printers.
        if v.get("source").is_none()
            && let Some(c) = v.get("reportingComponent").cloned()
        {
            v["source"] = json!({"component": c});
        }
        if v.get("lastTimestamp").is_none()
            && let Some(t) = v
                .get("eventTime")
                .and_then(Value::as_str)
                .map(str::to_string)
        {
            let t = t.as_str();
            let secs = t.split('.').next().unwrap_or(t).trim_end_matches('Z');
            v["lastTimestamp"] = json!(format!("{secs}Z"));
            if v.get("firstTimestamp").is_none() {
                v["firstTimestamp"] = json!(format!("{secs}Z"));
            }
        }
        v
    } else {
        served
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::Registry;

    #[test]
    fn events_round_trip_between_groups() {
        let reg = Registry::with_builtins();
        let view = reg
            .get("events.k8s.io", "v1", "events")
            .expect("events.k8s.io served");
        let ev = json!({
            "apiVersion": "events.k8s.io/v1", "kind": "Event",
            "metadata": {"name": "x.1", "namespace": "default"},
            "regarding": {"kind": "StatefulSetLock", "name": "lock"},
            "note": "elected db-0", "reason": "Elected", "type": "Normal",
            "reportingController": "stslock", "reportingInstance": "stslock-0",
            "eventTime": "2026-11-24T10:00:00.123456Z", "action": "Elect"
        });
        let core = to_stored(&view, &ev);
        assert_eq!(core["involvedObject"]["name"], "lock");
        assert_eq!(core["message"], "elected db-0");
        assert_eq!(core["source"]["component"], "stslock");
        assert_eq!(core["lastTimestamp"], "2026-11-24T10:00:00Z");
        let back = to_served(&view, &core);
        assert_eq!(back["regarding"], ev["regarding"]);
        assert_eq!(back["note"], ev["note"]);
        assert_eq!(back["apiVersion"], "events.k8s.io/v1");
    }
}
