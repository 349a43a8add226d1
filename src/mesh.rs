//! COLD: signed UDP gossip of race results between ncro nodes, on the
//! control core. One node's race saves its peers theirs: every
//! `mesh.gossip_interval` a node announces the routes it learned since the
//! last round; a peer that verifies the announcement (and the narinfo in
//! it) serves those paths without asking any upstream.
//!
//! The wire format is ncro 2.2's, so mixed meshes work both ways
//! (docs/mesh.md has the byte layout, trust model and merge rule):
//! - [`codec`]: datagram framing, MessagePack body, splitting at 1400 bytes;
//! - [`identity`]: the node key file and `ncro keygen`;
//! - [`trust`]: allow-list, signatures, replay window;
//! - [`merge`]: which gossiped routes are adopted;
//! - [`gossip`]: the send and receive tasks;
//! - [`catch_up`]: what a peer that (re)starts is sent.

pub mod catch_up;
pub mod codec;
pub mod gossip;
pub mod identity;
pub mod merge;
pub mod msgpack;
pub mod rfc3339;
pub mod trust;

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;

use thiserror::Error;

pub use crate::config::peer::parse_peer_addr;
use crate::config::Config;
use crate::control::Job;
use crate::http::resolve::Resolver;
use crate::metrics::MeshCounters;
use crate::route::RouteTable;
use crate::upstream::Upstreams;
use identity::Identity;

/// Learned routes waiting for the next gossip round before new ones are
/// dropped (and counted): a few rounds' worth at a busy node's race rate.
const FEED_CAPACITY: usize = 16_384;

#[derive(Debug, Error)]
pub enum MeshError {
    #[error(transparent)]
    Identity(#[from] identity::IdentityError),
    #[error("mesh.bind_addr {addr}: cannot bind UDP: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("mesh.peers[{index}]: addr {addr:?} is not host:port")]
    PeerAddr { index: usize, addr: String },
    #[error("mesh.peers[{index}]: public_key is not 32 hex-encoded bytes")]
    PeerKey { index: usize },
}

/// A peer as configured: where to send (resolved every round, so a DNS
/// change is followed) and, when given, the key it must sign with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub host: String,
    pub port: u16,
    pub key: Option<[u8; 32]>,
}

fn peers(cfg: &Config) -> Result<Vec<Peer>, MeshError> {
    cfg.mesh
        .peers
        .iter()
        .enumerate()
        .map(|(index, p)| {
            let (host, port) = parse_peer_addr(&p.addr).ok_or_else(|| MeshError::PeerAddr {
                index,
                addr: p.addr.clone(),
            })?;
            let key = match p.public_key.trim() {
                "" => None,
                k => Some(
                    hex::decode(k)
                        .ok()
                        .and_then(|b| <[u8; 32]>::try_from(b).ok())
                        .ok_or(MeshError::PeerKey { index })?,
                ),
            };
            Ok(Peer { host, port, key })
        })
        .collect()
}

/// Asks the gossip task for one last round (the drain): routes learnt
/// since the previous round reach the peers before this node stops.
pub struct Flush(flume::Sender<flume::Sender<()>>);

impl Flush {
    /// Waits up to `limit` for the round to be sent; false if it was not.
    pub fn run(&self, limit: std::time::Duration) -> bool {
        let (tx, rx) = flume::bounded(1);
        self.0.try_send(tx).is_ok() && rx.recv_timeout(limit).is_ok()
    }
}

/// Loads the identity, binds the gossip socket and opens the route feed;
/// returns the job to run on the control thread and its [`Flush`]. Called
/// at start, before workers run, so errors stop the process with a clear
/// message.
pub fn start(
    cfg: &Config,
    routes: &Arc<RouteTable>,
    upstreams: Arc<Upstreams>,
    counters: Arc<MeshCounters>,
    resolver: Resolver,
) -> Result<(Job, Flush), MeshError> {
    let m = &cfg.mesh;
    let peers = peers(cfg)?;
    let identity = Identity::load_or_create(&m.private_key)?;
    if !m.private_key.is_empty() && identity::readable_by_others(&m.private_key) {
        tracing::warn!(path = %m.private_key, "mesh key file is readable by group or others; chmod 600 it");
    }
    tracing::info!(
        node_id = %identity.node_id(),
        public_key = %identity.public_hex(),
        key = ?identity.origin,
        "mesh node identity"
    );
    let open = peers.iter().any(|p| p.key.is_none());
    if open {
        // Config only allows keyless peers with allow_unauthenticated.
        tracing::warn!("mesh.allow_unauthenticated: a peer has no public_key, so any sender with a valid self-signature is accepted; set every peer's public_key");
    } else if m.allow_unauthenticated {
        tracing::info!("mesh.allow_unauthenticated is set but every peer has a public_key: only those keys are accepted");
    }
    let addr: SocketAddr = m.bind_addr.parse().map_err(|e| MeshError::Bind {
        addr: m.bind_addr.clone(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, e),
    })?;
    // Without SO_REUSEADDR/SO_REUSEPORT: a live process on the port keeps
    // it; one that has just exited is waited for (crate::rt::bind_retrying).
    let what = format!("mesh.bind_addr {addr}");
    let socket = crate::rt::bind_retrying(&what, || UdpSocket::bind(addr)).map_err(|source| {
        MeshError::Bind {
            addr: m.bind_addr.clone(),
            source,
        }
    })?;
    let local = socket.local_addr().map_or(addr, |a| a);
    tracing::info!(addr = %local, peers = peers.len(), interval = ?m.gossip_interval.0, "mesh gossip listening");
    let feed = routes
        .learned_feed(FEED_CAPACITY)
        .unwrap_or_else(|| flume::bounded(1).1); // only one mesh per table
    let trust = trust::Trust::new(peers.iter().filter_map(|p| p.key), open, m.replay_window.0);
    let (flush_tx, flush_rx) = flume::bounded(1);
    let job = gossip::Gossip {
        key: identity.key,
        socket,
        peers,
        trust,
        feed,
        routes: routes.clone(),
        upstreams,
        resolver,
        counters,
        interval: m.gossip_interval.0,
        max_ttl: cfg.cache.ttl.as_secs(),
        flush: flush_rx,
    }
    .into_job();
    Ok((job, Flush(flush_tx)))
}

/// `ncro --generate-mesh-key PATH` (today's ncro's flag): the public key
/// in hex of the key file at `path`, which is created (random seed, mode
/// 0600) when missing and read otherwise, so every run prints the same.
pub fn generate_or_read_key(path: &std::path::Path) -> Result<String, identity::IdentityError> {
    let text = path.to_str().filter(|p| !p.is_empty());
    let Some(text) = text else {
        return Err(identity::IdentityError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "the key path must be a non-empty UTF-8 path",
            ),
        });
    };
    Ok(Identity::load_or_create(text)?.public_hex())
}

/// `ncro keygen --out PATH`: writes a new node key (raw 32-byte seed, mode
/// 0600; never overwrites) and returns the public key in hex.
pub fn keygen(path: &std::path::Path) -> Result<String, identity::IdentityError> {
    let key = identity::write_new(path)?;
    Ok(hex::encode(key.verifying_key().as_bytes()))
}
