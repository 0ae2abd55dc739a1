use serde_json::Value;
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct PatchError(String);
pub fn json_patch(t: &Value, p: &Value) -> Result<Value, PatchError> {
    let ops: json_patch::Patch = serde_json::from_value(p.clone())
        .map_err(|e| PatchError(format!("invalid JSON patch: {e}")))?;
    let mut t = t.clone();
    json_patch::patch(&mut t, &ops).map_err(|e| PatchError(e.to_string()))?;
    Ok(t)
}
pub fn merge_patch(t: &Value, p: &Value) -> Result<Value, PatchError> {
    let mut t = t.clone();
    json_patch::merge(&mut t, p);
    Ok(t)
}
pub fn strategic_merge_patch(t: &Value, p: &Value) -> Result<Value, PatchError> {
    merge_patch(t, p)
}
pub fn server_side_apply(l: Option<&Value>, a: &Value) -> Result<Value, PatchError> {
    match l {
        Some(l) => merge_patch(l, a),
        None => Ok(a.clone()),
    }
}
