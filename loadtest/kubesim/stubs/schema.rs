use serde_json::Value;
pub struct Cause {
    pub reason: &'static str,
    pub field: String,
    pub message: String,
}
pub struct Schema;
impl Schema {
    pub fn compile(_s: &Value) -> Result<Schema, String> {
        Ok(Schema)
    }
    pub fn apply_defaults(&self, _o: &mut Value) {}
    pub fn prune(&self, _o: &mut Value) -> Vec<String> {
        vec![]
    }
    pub fn validate(&self, _o: &Value, _old: Option<&Value>) -> Vec<Cause> {
        vec![]
    }
}
