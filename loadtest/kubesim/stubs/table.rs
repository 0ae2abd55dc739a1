use serde_json::{Value, json};
pub enum IncludeObject {
    None,
    Metadata,
    Object,
}
pub struct PrinterColumn;
pub fn columns(_g: &str, _p: &str, _c: Option<&Value>) -> Vec<PrinterColumn> {
    vec![]
}
pub fn to_table(
    _c: &[PrinterColumn],
    _o: &[Value],
    _i: IncludeObject,
    m: Value,
    _n: jiff::Timestamp,
) -> Value {
    json!({"metadata": m})
}
