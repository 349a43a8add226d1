//! Per-upstream allow/deny filter rules as written in the config file;
//! [`crate::upstream::filter`] applies them to fetched narinfos.

use serde::Deserialize;

#[derive(Deserialize, serde::Serialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum FilterAction {
    #[default]
    Allow,
    Deny,
}

/// Which part of the narinfo a pattern is matched against.
#[derive(Deserialize, serde::Serialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum FilterField {
    /// The store path name: what follows the first `-` of the basename.
    #[default]
    Name,
    /// The full `StorePath` (`/nix/store/<hash>-<name>`).
    StorePath,
    /// Any one `References` entry (a basename).
    Reference,
    /// The `Deriver` basename; a narinfo without one never matches.
    Deriver,
}

/// One rule as written in the config file.
#[derive(Deserialize, serde::Serialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FilterRule {
    #[serde(default)]
    pub action: FilterAction,
    #[serde(default)]
    pub field: FilterField,
    /// `*` matches any run of characters; everything else is literal and
    /// case-sensitive.
    pub pattern: String,
}
