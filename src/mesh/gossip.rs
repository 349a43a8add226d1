//! The two gossip tasks on the control thread: the receiver checks every
//! datagram ([`Trust`]) and merges what passes ([`merge::adopt`]); the
//! sender, every interval, packs the routes learned since the last round
//! into datagrams and sends them to each peer. They share the socket (an
//! `Rc`: both live on the control thread) and nothing else.

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket as StdUdpSocket};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ed25519_dalek::SigningKey;
use monoio::net::udp::UdpSocket;

use super::catch_up::History;
use super::codec::{self, Outgoing, WireRoute};
use super::trust::Trust;
use super::{identity, merge, Peer};
use crate::control::Job;
use crate::http::resolve::Resolver;
use crate::metrics::MeshCounters;
use crate::route::persist::unix_now;
use crate::route::{Learned, RouteTable};
use crate::upstream::Upstreams;

/// Receive buffer: the largest UDP payload, so an oversized datagram is
/// seen whole (and counted as such) instead of truncated into garbage.
const RECV_BUF: usize = 65_536;
/// Datagrams sent to one peer back to back before a 1 ms pause, so a large
/// round does not overrun the peer's socket buffer (~45 MB/s at most).
const PACE_EVERY: usize = 32;
/// At most one warning per kind of trouble in this long; the rest go to debug.
const WARN_EVERY: Duration = Duration::from_secs(60);
/// Gossip rounds that start with a hello to every peer (the first two: one
/// lost datagram does not cost the catch-up).
const HELLO_ROUNDS: u32 = 2;
/// Hellos waiting for the sender before more are dropped.
const HELLO_QUEUE: usize = 64;

/// Everything the gossip job needs, built by [`super::start`].
pub struct Gossip {
    pub key: SigningKey,
    pub socket: StdUdpSocket,
    pub peers: Vec<Peer>,
    pub trust: Trust,
    pub feed: flume::Receiver<Learned>,
    pub routes: Arc<RouteTable>,
    pub upstreams: Arc<Upstreams>,
    pub resolver: Resolver,
    pub counters: Arc<MeshCounters>,
    pub interval: Duration,
    pub max_ttl: u64,
    /// A last round on demand (the drain): the sender answers on the
    /// enclosed channel when it has sent it.
    pub flush: flume::Receiver<flume::Sender<()>>,
}

impl Gossip {
    pub fn into_job(self) -> Job {
        Box::new(move || Box::pin(self.run()))
    }

    async fn run(self) {
        // monoio's own bind sets O_NONBLOCK only for the epoll driver;
        // io_uring must see a blocking socket.
        let socket = self.socket;
        let nonblocking = monoio::utils::is_legacy();
        let socket = match socket
            .set_nonblocking(nonblocking)
            .and_then(|()| UdpSocket::from_std(socket))
        {
            Ok(s) => Rc::new(s),
            Err(e) => {
                tracing::error!(error = %e, "mesh: cannot use the gossip socket; gossip is off");
                return;
            }
        };
        let (hello_tx, hello_rx) = flume::bounded(HELLO_QUEUE);
        let receiver = Receiver {
            hellos: hello_tx,
            socket: socket.clone(),
            trust: self.trust,
            routes: self.routes,
            upstreams: self.upstreams,
            counters: self.counters.clone(),
            max_ttl: self.max_ttl,
            warned: Warned::default(),
        };
        // Not spawned: the control thread drops this future at shutdown,
        // and with it the receive in flight (see `crate::rt::settle`).
        let receiving = receiver.run();
        let sender = Sender {
            node_id: identity::node_id(self.key.verifying_key().as_bytes()),
            key: self.key,
            socket,
            other_family: None,
            peers: self.peers,
            feed: self.feed,
            resolver: self.resolver,
            counters: self.counters,
            last_timestamp: 0,
            warned: Warned::default(),
            history: History::default(),
            hellos: hello_rx,
            flush: self.flush,
        };
        monoio::join!(receiving, sender.run(self.interval));
    }
}

fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}

/// Rate limit for warnings, per kind.
#[derive(Default)]
struct Warned(HashMap<&'static str, Instant>);

impl Warned {
    /// True when a warning of `kind` may be logged now.
    fn allow(&mut self, kind: &'static str) -> bool {
        let now = Instant::now();
        match self.0.get(kind) {
            Some(&at) if now.duration_since(at) < WARN_EVERY => false,
            _ => {
                self.0.insert(kind, now);
                true
            }
        }
    }
}

struct Receiver {
    /// Listed peers that said hello, for the sender to catch up.
    hellos: flume::Sender<[u8; 32]>,
    socket: Rc<UdpSocket>,
    trust: Trust,
    routes: Arc<RouteTable>,
    upstreams: Arc<Upstreams>,
    counters: Arc<MeshCounters>,
    max_ttl: u64,
    warned: Warned,
}

impl Receiver {
    async fn run(mut self) {
        let mut buf = Vec::with_capacity(RECV_BUF);
        loop {
            let (res, b) = self.socket.recv_from(buf).await;
            buf = b;
            match res {
                Ok((n, src)) => self.handle(&buf[..n.min(buf.len())], src),
                Err(e) => {
                    if self.warned.allow("recv") {
                        tracing::warn!(error = %e, "mesh: receiving failed");
                    }
                    // An error that repeats must not spin the control core.
                    monoio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    fn handle(&mut self, packet: &[u8], src: SocketAddr) {
        let accepted = match self.trust.check(packet, now_ns()) {
            Ok(a) => a,
            Err(r) => {
                self.counters.packet(r.label());
                let why = r.label();
                if self.warned.allow(why) {
                    tracing::warn!(%src, result = why, bytes = packet.len(), "mesh: rejected a gossip packet (further ones of this kind for a minute are logged at debug)");
                } else {
                    tracing::debug!(%src, result = why, bytes = packet.len(), "mesh: rejected a gossip packet");
                }
                return;
            }
        };
        self.counters.packet("accepted");
        if accepted.announce.routes.is_empty() {
            // A hello: the sender (re)started. Only listed peers are
            // answered (see `catch_up`).
            if accepted.listed {
                tracing::debug!(%src, node = %accepted.announce.node_id, "mesh: hello from a peer; sending it the routes it missed");
                let _ = self.hellos.try_send(accepted.sender); // full: it gets the next one
            }
            return;
        }
        // The current set: discovery may have added or retired upstreams.
        let set = self.upstreams.load();
        let local = merge::Local {
            upstreams: &set,
            routes: &self.routes,
            max_ttl: self.max_ttl,
        };
        let now = unix_now();
        let (mut merged, total) = (0usize, accepted.announce.routes.len());
        for r in &accepted.announce.routes {
            match merge::adopt(&local, r, accepted.listed, now) {
                Ok((hash, entry)) => {
                    self.routes.insert_from_peer(hash, entry);
                    self.counters.routes_merged.inc();
                    merged += 1;
                }
                Err(skip) => {
                    self.counters.rejected(skip.label());
                    tracing::debug!(%src, store = %r.store_path, upstream = %r.upstream_url, reason = skip.label(), "mesh: gossiped route not adopted");
                }
            }
        }
        tracing::debug!(%src, node = %accepted.announce.node_id, routes = total, merged, "mesh: announcement accepted");
    }
}

struct Sender {
    key: SigningKey,
    node_id: String,
    /// The bound socket: replies and firewalls see `mesh.bind_addr`'s port.
    socket: Rc<UdpSocket>,
    /// For peers of the other address family than the bound socket.
    other_family: Option<Rc<UdpSocket>>,
    peers: Vec<Peer>,
    feed: flume::Receiver<Learned>,
    resolver: Resolver,
    counters: Arc<MeshCounters>,
    /// Receivers drop a timestamp not newer than the last one they
    /// accepted from us, so ours strictly increase.
    last_timestamp: i64,
    warned: Warned,
    /// Routes announced lately, for peers that come back.
    history: History,
    hellos: flume::Receiver<[u8; 32]>,
    flush: flume::Receiver<flume::Sender<()>>,
}

/// What the sender does next.
enum Next {
    Round,
    CatchUp([u8; 32]),
    Flush(flume::Sender<()>),
}

/// Gossip form of a route this node raced.
fn wire_route(
    hash: &crate::proto::store_path::StoreHash,
    e: &crate::route::RouteEntry,
) -> WireRoute {
    let latency = f64::from(e.latency_ms);
    WireRoute {
        store_path: hash.as_str().to_owned(),
        upstream_url: e.upstream.to_string(),
        latency_ms: latency,
        latency_ema: latency,
        last_verified: i64::try_from(e.verified_at).unwrap_or(i64::MAX),
        query_count: 1,
        failure_count: 0,
        ttl: i64::try_from(e.expires_at).unwrap_or(i64::MAX),
        nar_hash: e.nar_hash.to_string(),
        nar_size: e.nar_size,
        nar_url: e.nar_url.to_string(),
        narinfo: Some(e.narinfo.to_vec()),
    }
}

impl Sender {
    async fn run(mut self, interval: Duration) {
        let mut tick = monoio::time::interval(interval);
        let mut rounds = 0u32;
        loop {
            let next = monoio::select! {
                _ = tick.tick() => Next::Round,
                Ok(peer) = self.hellos.recv_async() => Next::CatchUp(peer),
                Ok(done) = self.flush.recv_async() => Next::Flush(done),
            };
            match next {
                Next::Round => {
                    if rounds < HELLO_ROUNDS {
                        rounds += 1;
                        self.hello().await;
                    }
                    self.round().await;
                }
                Next::CatchUp(peer) => self.catch_up(peer).await,
                Next::Flush(done) => {
                    self.round().await;
                    let _ = done.send(()); // the drain may have stopped waiting
                }
            }
        }
    }

    /// Sends the routes learnt since the last round to every peer.
    async fn round(&mut self) {
        let learned = self.learned_since_last_round(unix_now());
        if learned.is_empty() {
            return;
        }
        let routes: Vec<WireRoute> = learned.iter().map(|(h, e)| wire_route(h, e)).collect();
        self.history.record(Instant::now(), learned);
        let packed = self.pack(&routes);
        for i in 0..self.peers.len() {
            let peer = self.peers[i].clone();
            self.send_round(&peer, &packed.datagrams).await;
        }
    }

    fn pack(&mut self, routes: &[WireRoute]) -> codec::Packed {
        let last = &mut self.last_timestamp;
        let packed = codec::pack(&self.key, &self.node_id, routes, || {
            *last = now_ns().max(last.saturating_add(1));
            *last
        });
        if packed.stripped + packed.unsendable > 0 {
            tracing::debug!(stripped = packed.stripped, unsendable = packed.unsendable, "mesh: routes too large for a datagram were sent without narinfo bytes or not at all");
        }
        packed
    }

    /// Tells every peer this node (re)started, so they send what it missed.
    async fn hello(&mut self) {
        self.last_timestamp = now_ns().max(self.last_timestamp.saturating_add(1));
        let hello = [codec::hello(&self.key, &self.node_id, self.last_timestamp)];
        for i in 0..self.peers.len() {
            let peer = self.peers[i].clone();
            self.send_round(&peer, &hello).await;
        }
    }

    /// Answers a listed peer's hello with the routes it may have missed.
    async fn catch_up(&mut self, key: [u8; 32]) {
        let routes = self.history.for_peer(key, Instant::now(), unix_now());
        let targets: Vec<Peer> = self
            .peers
            .iter()
            .filter(|p| p.key == Some(key))
            .cloned()
            .collect();
        if routes.is_empty() {
            return;
        }
        tracing::info!(
            routes = routes.len(),
            peers = targets.len(),
            "mesh: a peer (re)started; sending it the routes announced since it last said hello"
        );
        let wire: Vec<WireRoute> = routes.iter().map(|(h, e)| wire_route(h, e)).collect();
        let packed = self.pack(&wire);
        for peer in &targets {
            self.counters.catch_ups.inc();
            self.send_round(peer, &packed.datagrams).await;
        }
    }

    /// Drains the feed: each hash once (its latest route), still live.
    fn learned_since_last_round(&self, now: u64) -> Vec<crate::route::Learned> {
        let mut latest: HashMap<_, _> = HashMap::new();
        let mut order = Vec::new();
        for (hash, entry) in self.feed.drain() {
            if latest.insert(hash, entry).is_none() {
                order.push(hash);
            }
        }
        order
            .into_iter()
            .filter_map(|h| latest.remove(&h).map(|e| (h, e)))
            .filter(|(_, e)| e.expires_at > now)
            .collect()
    }

    async fn send_round(&mut self, peer: &Peer, datagrams: &[Outgoing]) {
        let Some(addr) = self.resolve(peer).await else {
            self.counters.send_errors.add(datagrams.len() as u64);
            return;
        };
        let socket = match self.socket_for(addr) {
            Ok(s) => s,
            Err(e) => {
                if self.warned.allow("socket") {
                    tracing::warn!(peer = %addr, error = %e, "mesh: no socket for this peer's address family");
                }
                self.counters.send_errors.add(datagrams.len() as u64);
                return;
            }
        };
        for (i, d) in datagrams.iter().enumerate() {
            if i > 0 && i % PACE_EVERY == 0 {
                monoio::time::sleep(Duration::from_millis(1)).await;
            }
            let (res, _) = socket.send_to(d.bytes.clone(), addr).await;
            match res {
                Ok(_) => {
                    self.counters.datagrams_sent.inc();
                    self.counters.routes_sent.add(d.routes as u64);
                }
                Err(e) => {
                    self.counters.send_errors.inc();
                    if self.warned.allow("send") {
                        tracing::warn!(peer = %addr, error = %e, "mesh: sending gossip failed");
                    }
                }
            }
        }
    }

    /// The peer's address, preferring the bound socket's family.
    async fn resolve(&mut self, peer: &Peer) -> Option<SocketAddr> {
        match self.resolver.resolve(&peer.host, peer.port).await {
            Ok(addrs) => {
                let v6 = self.socket.local_addr().is_ok_and(|a| a.is_ipv6());
                addrs
                    .iter()
                    .find(|a| a.is_ipv6() == v6)
                    .or_else(|| addrs.first())
                    .copied()
            }
            Err(e) => {
                if self.warned.allow("resolve") {
                    tracing::warn!(peer = %peer.host, error = %e, "mesh: cannot resolve peer");
                }
                None
            }
        }
    }

    fn socket_for(&mut self, addr: SocketAddr) -> std::io::Result<Rc<UdpSocket>> {
        let bound_v6 = self.socket.local_addr()?.is_ipv6();
        if addr.is_ipv6() == bound_v6 {
            return Ok(self.socket.clone());
        }
        if let Some(s) = &self.other_family {
            return Ok(s.clone());
        }
        let any: SocketAddr = if addr.is_ipv6() {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
        };
        let s = Rc::new(UdpSocket::bind(any)?);
        self.other_family = Some(s.clone());
        Ok(s)
    }
}
