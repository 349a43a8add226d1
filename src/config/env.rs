//! NCRO_* environment overrides, read through a lookup seam so tests pass a
//! map instead of mutating the process environment.

use std::collections::HashMap;

/// Where environment values come from.
pub trait EnvLookup {
    fn get(&self, key: &str) -> Option<String>;
}

/// The real process environment.
pub struct ProcessEnv;

impl EnvLookup for ProcessEnv {
    fn get(&self, key: &str) -> Option<String> {
        std::env::var(key).ok()
    }
}

impl EnvLookup for HashMap<String, String> {
    fn get(&self, key: &str) -> Option<String> {
        HashMap::get(self, key).cloned()
    }
}

/// A fixed set of variables (tests, `check-config` fixtures).
pub struct MapEnv(pub Vec<(String, String)>);

impl MapEnv {
    pub fn new(vars: &[(&str, &str)]) -> MapEnv {
        MapEnv(
            vars.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }
}

impl EnvLookup for MapEnv {
    fn get(&self, key: &str) -> Option<String> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
    }
}

/// Applies NCRO_LISTEN, NCRO_DB_PATH and NCRO_LOG_LEVEL (when non-empty, as
/// ncro 2.2 did) after the file is parsed and before validation.
pub fn apply_overrides(raw: &mut super::raw::RawConfig, env: &dyn EnvLookup) {
    let non_empty = |k: &str| env.get(k).filter(|v| !v.is_empty());
    if let Some(v) = non_empty("NCRO_LISTEN") {
        raw.server.listen = v;
    }
    if let Some(v) = non_empty("NCRO_DB_PATH") {
        raw.cache.db_path = Some(v);
    }
    if let Some(v) = non_empty("NCRO_LOG_LEVEL") {
        raw.logging.level = v;
    }
}
