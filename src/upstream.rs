//! The set of upstream caches as workers see it: an immutable snapshot
//! built at start (later republished by the control thread as health and
//! discovery change it). Workers index it by position; routes name an
//! upstream by its URL, which survives snapshot changes.

pub mod filter;

use std::collections::HashMap;
use std::sync::Arc;

use crate::config::{Config, UpstreamKind};
use crate::http::client::Origin;
use crate::proto::signature::PublicKey;
use filter::FilterRule;

/// One upstream cache, ready for requests.
#[derive(Debug)]
pub struct Upstream {
    /// As configured (no trailing slash): the identity used by routes,
    /// metric labels and /health.
    pub url: Arc<str>,
    pub origin: Origin,
    pub priority: i32,
    /// Empty: narinfos from this upstream are not verified (as in ncro 2.2
    /// without `public_key`); Nix clients still check them.
    pub keys: Vec<PublicKey>,
    pub filters: Vec<FilterRule>,
}

#[derive(Debug, Default)]
pub struct UpstreamSet {
    pub list: Vec<Upstream>,
    by_url: HashMap<Arc<str>, usize>,
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("upstream {url}: {why}")]
    Invalid { url: String, why: String },
}

impl UpstreamSet {
    /// Builds the HTTP(S) upstreams of `cfg`. S3 upstreams are returned by
    /// name in the second value: they need the S3 client, which this build
    /// does not have yet, and are left out of routing with a warning.
    pub fn from_config(cfg: &Config) -> Result<(UpstreamSet, Vec<String>), UpstreamError> {
        let mut set = UpstreamSet::default();
        let mut skipped = Vec::new();
        for u in &cfg.upstreams {
            if let UpstreamKind::S3(_) = u.kind {
                skipped.push(u.url.clone());
                continue;
            }
            let invalid = |why: String| UpstreamError::Invalid {
                url: u.url.clone(),
                why,
            };
            let auth = u
                .basic_auth
                .as_ref()
                .map(|(user, pw)| (user.as_str(), pw.as_deref()));
            let origin = Origin::parse(&u.url, auth).map_err(|e| invalid(e.to_string()))?;
            let keys = u
                .public_keys
                .iter()
                .map(|k| PublicKey::parse(k).map_err(|e| invalid(e.to_string())))
                .collect::<Result<_, _>>()?;
            set.push(Upstream {
                url: Arc::from(u.url.as_str()),
                origin,
                priority: u.priority,
                keys,
                filters: u.filters.clone(),
            });
        }
        Ok((set, skipped))
    }

    pub fn push(&mut self, u: Upstream) {
        self.by_url.insert(u.url.clone(), self.list.len());
        self.list.push(u);
    }

    pub fn index_of(&self, url: &str) -> Option<usize> {
        self.by_url.get(url).copied()
    }

    pub fn get(&self, i: usize) -> Option<&Upstream> {
        self.list.get(i)
    }

    pub fn len(&self) -> usize {
        self.list.len()
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }
}
