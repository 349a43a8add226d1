//! filter (placeholder types; the full module lands with the proto work)
use serde::{Deserialize, Serialize};

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum FilterAction {
    #[default]
    Allow,
    Deny,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum FilterField {
    #[default]
    Name,
    StorePath,
    Reference,
    Deriver,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FilterRule {
    #[serde(default)]
    pub action: FilterAction,
    #[serde(default)]
    pub field: FilterField,
    pub pattern: String,
}
