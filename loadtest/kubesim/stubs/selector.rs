use serde_json::{Map, Value};
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SelectorError(String);
pub struct LabelSelector;
impl LabelSelector {
    pub fn parse(_s: &str) -> Result<Self, SelectorError> {
        Ok(LabelSelector)
    }
    pub fn from_json(_v: &Value) -> Result<Self, SelectorError> {
        Ok(LabelSelector)
    }
    pub fn matches(&self, _l: Option<&Map<String, Value>>) -> bool {
        true
    }
    pub fn matches_everything(&self) -> bool {
        false
    }
}
impl std::fmt::Display for LabelSelector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "")
    }
}
pub struct FieldSelector;
impl FieldSelector {
    pub fn parse(_s: &str) -> Result<Self, SelectorError> {
        Ok(FieldSelector)
    }
    pub fn validate_for(&self, _g: &str, _p: &str) -> Result<(), SelectorError> {
        Ok(())
    }
    pub fn matches(&self, _o: &Value) -> bool {
        true
    }
    pub fn is_empty(&self) -> bool {
        true
    }
}
