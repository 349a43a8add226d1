//! Mesh gossip between real `ncro` processes on loopback aliases
//! (127.0.0.2-4; Linux routes all of 127/8 to `lo` without setup), keys
//! made by `ncro keygen`, and a test that plays a peer over UDP: forged,
//! replayed, oversized, malformed and unknown-sender datagrams are dropped
//! and counted; packets encoded by ncro 2.2's own encoder (rmp-serde,
//! array and map form) and the reference's golden bytes are accepted.

use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ed25519_dalek::{Signer as _, SigningKey};
use serde::Serialize;

use crate::fake::{FakeUpstream, TestKey, TestPath};
use crate::harness::{free_port, NcroProcess};
use crate::metrics::{scrape, Scrape};
use crate::routing::{db_dir, entry, NcroConfig};

/// Short rounds keep the test quick; ncro's default is 30 s.
const GOSSIP_INTERVAL: &str = "200ms";
const WAIT: Duration = Duration::from_secs(10);

/// `ncro keygen --out PATH`: the key file and the printed public key.
pub(crate) fn keygen(dir: &Path, name: &str) -> (PathBuf, String) {
    let path = dir.join(name);
    let out = Command::new(env!("CARGO_BIN_EXE_ncro"))
        .args(["keygen", "--out"])
        .arg(&path)
        .output()
        .expect("run ncro keygen");
    assert!(out.status.success(), "{out:?}");
    let public = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert_eq!(public.len(), 64, "{public}");
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!(meta.len(), 32);
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    (path, public)
}

/// A UDP port free on `ip` (and never handed to another test).
pub(crate) fn udp_addr(ip: &str) -> SocketAddr {
    for _ in 0..100 {
        let addr: SocketAddr = format!("{ip}:{}", free_port()).parse().unwrap();
        if UdpSocket::bind(addr).is_ok() {
            return addr;
        }
    }
    panic!("no free UDP port on {ip}");
}

pub(crate) fn peer(addr: SocketAddr, public: &str) -> toml::Value {
    let mut t = toml::Table::new();
    t.insert("addr".into(), addr.to_string().into());
    t.insert("public_key".into(), public.into());
    toml::Value::Table(t)
}

/// A node listening on `ip` with gossip on `udp`.
fn node(
    ip: &str,
    up: &FakeUpstream,
    key: &TestKey,
    db: &Path,
    private_key: &Path,
    udp: SocketAddr,
    peers: Vec<toml::Value>,
) -> NcroProcess {
    NcroConfig::new(&[entry(up.url(), 10, key)], db)
        .set("server", "listen", format!("{ip}:0"))
        .set("server", "workers", 1)
        .set("mesh", "enabled", true)
        .set("mesh", "bind_addr", udp.to_string())
        .set(
            "mesh",
            "private_key",
            private_key.to_string_lossy().as_ref(),
        )
        .set("mesh", "gossip_interval", GOSSIP_INTERVAL)
        .set("mesh", "peers", toml::Value::Array(peers))
        .start()
}

fn narinfo_requests(up: &FakeUpstream) -> usize {
    up.requests()
        .iter()
        .filter(|r| r.path.ends_with(".narinfo"))
        .count()
}

/// Polls `/metrics` until `ready` holds (the gossip is asynchronous).
fn scrape_until(ncro: &NcroProcess, what: &str, ready: impl Fn(&Scrape) -> bool) -> Scrape {
    crate::metrics::scrape_until(ncro, what, WAIT, ready)
}

fn packets(m: &Scrape, result: &str) -> f64 {
    m.value("ncro_mesh_packets_total", &[("result", result)])
}

#[test]
fn a_route_raced_on_one_node_is_served_by_its_peers_without_asking_upstream() {
    let key = TestKey::generate("mesh-cache-1");
    let p = TestPath::new("gossiped");
    let up = FakeUpstream::builder().path(&p, &key).start();
    let keys_dir = tempfile::tempdir().unwrap();
    let ips = ["127.0.0.2", "127.0.0.3", "127.0.0.4"];
    let ids: Vec<(PathBuf, String)> = (0..3)
        .map(|i| keygen(keys_dir.path(), &format!("node{i}.key")))
        .collect();
    let udps: Vec<SocketAddr> = ips.iter().map(|ip| udp_addr(ip)).collect();
    let dbs: Vec<_> = (0..3).map(|_| db_dir()).collect();
    let nodes: Vec<NcroProcess> = (0..3)
        .map(|i| {
            let peers = (0..3)
                .filter(|&j| j != i)
                .map(|j| peer(udps[j], &ids[j].1))
                .collect();
            node(
                ips[i],
                &up,
                &key,
                &dbs[i].path().join("routes.db"),
                &ids[i].0,
                udps[i],
                peers,
            )
        })
        .collect();
    for (n, (_, public)) in nodes.iter().zip(&ids) {
        assert!(n.wait_for_log("mesh node identity", WAIT), "{}", n.logs());
        assert!(
            n.stdout().contains(public.as_str()),
            "identity logs the public key\n{}",
            n.logs()
        );
    }

    let first = nodes[0].get(&p.narinfo_request_path());
    assert_eq!(first.status, 200, "{}", nodes[0].logs());
    assert_eq!(narinfo_requests(&up), 1);
    for n in &nodes[1..] {
        scrape_until(n, "the route to be merged", |m| {
            m.value("ncro_mesh_routes_merged_total", &[]) >= 1.0
        });
        let r = n.get(&p.narinfo_request_path());
        assert_eq!(r.status, 200, "{}", n.logs());
        assert_eq!(r.body, first.body, "the same verified narinfo");
        // The NAR is routed to the gossiped upstream too.
        let nar = n.get(&p.nar_request_path());
        assert_eq!(nar.status, 200);
        assert_eq!(nar.body.len() as u64, p.nar_size());
    }
    assert_eq!(
        narinfo_requests(&up),
        1,
        "no peer asked the upstream for the narinfo"
    );
    let m = scrape(&nodes[0]);
    assert!(
        m.value("ncro_mesh_routes_sent_total", &[]) >= 2.0,
        "{}",
        m.text
    );
    assert_eq!(
        packets(&m, "bad_signature") + packets(&m, "unknown_sender"),
        0.0
    );
    // A route is announced once, by the node that raced it: peers do not
    // echo what they merged, so node 0 never merges its own route back.
    assert_eq!(
        m.value("ncro_mesh_routes_merged_total", &[]),
        0.0,
        "{}",
        m.text
    );
}

/// One node gossips over IPv4, the other over IPv6 (`bind_addr = [::1]:P`,
/// peer written `[::1]:P`): each reaches the other from a second socket of
/// the peer's family.
#[test]
fn gossip_crosses_between_ipv4_and_ipv6_nodes() {
    let key = TestKey::generate("mesh-cache-3");
    let (p4, p6) = (TestPath::new("raced-on-v4"), TestPath::new("raced-on-v6"));
    let up = FakeUpstream::builder()
        .path(&p4, &key)
        .path(&p6, &key)
        .start();
    let keys_dir = tempfile::tempdir().unwrap();
    let (k4, pub4) = keygen(keys_dir.path(), "v4.key");
    let (k6, pub6) = keygen(keys_dir.path(), "v6.key");
    let (udp4, udp6) = (udp_addr("127.0.0.2"), udp_addr("[::1]"));
    let (db4, db6) = (db_dir(), db_dir());
    let v4 = node(
        "127.0.0.2",
        &up,
        &key,
        &db4.path().join("r.db"),
        &k4,
        udp4,
        vec![peer(udp6, &pub6)],
    );
    let v6 = node(
        "127.0.0.3",
        &up,
        &key,
        &db6.path().join("r.db"),
        &k6,
        udp6,
        vec![peer(udp4, &pub4)],
    );
    assert_eq!(v4.get(&p4.narinfo_request_path()).status, 200);
    assert_eq!(v6.get(&p6.narinfo_request_path()).status, 200);
    for n in [&v4, &v6] {
        scrape_until(n, "the other node's route", |m| {
            m.value("ncro_mesh_routes_merged_total", &[]) >= 1.0
        });
    }
    assert_eq!(v6.get(&p4.narinfo_request_path()).status, 200);
    assert_eq!(v4.get(&p6.narinfo_request_path()).status, 200);
    assert_eq!(
        narinfo_requests(&up),
        2,
        "each path raced once, on one node"
    );
}

/// A node that was down while its peer raced a path gets that route when
/// it starts again: it says hello, the peer answers with the routes it
/// announced since (a catch-up), and the returning node serves the path
/// without asking the upstream. Before catch-ups, routes gossiped while a
/// node was down were lost to it.
#[test]
fn a_restarted_node_catches_up_on_routes_raced_while_it_was_down() {
    let key = TestKey::generate("mesh-cache-4");
    let (early, missed) = (TestPath::new("before-restart"), TestPath::new("while-down"));
    let up = FakeUpstream::builder()
        .path(&early, &key)
        .path(&missed, &key)
        .start();
    let keys_dir = tempfile::tempdir().unwrap();
    let (ka, pa) = keygen(keys_dir.path(), "a.key");
    let (kb, pb) = keygen(keys_dir.path(), "b.key");
    let (udp_a, udp_b) = (udp_addr("127.0.0.2"), udp_addr("127.0.0.3"));
    let (db_a, db_b) = (db_dir(), db_dir());
    let a = node(
        "127.0.0.2",
        &up,
        &key,
        &db_a.path().join("r.db"),
        &ka,
        udp_a,
        vec![peer(udp_b, &pb)],
    );
    let config_b = NcroConfig::new(&[entry(up.url(), 10, &key)], &db_b.path().join("r.db"))
        .set("server", "listen", "127.0.0.3:0")
        .set("server", "workers", 1)
        .set("mesh", "enabled", true)
        .set("mesh", "bind_addr", udp_b.to_string())
        .set("mesh", "private_key", kb.to_string_lossy().as_ref())
        .set("mesh", "gossip_interval", GOSSIP_INTERVAL)
        .set("mesh", "peers", toml::Value::Array(vec![peer(udp_a, &pa)]))
        .render();
    let mut b = NcroProcess::start(&config_b);
    assert_eq!(a.get(&early.narinfo_request_path()).status, 200);
    scrape_until(&b, "the first route", |m| {
        m.value("ncro_mesh_routes_merged_total", &[]) >= 1.0
    });
    b.sigterm();
    assert!(b.wait_exit(WAIT).success());
    // While b is down: a races a path, and its gossip to b is lost.
    assert_eq!(a.get(&missed.narinfo_request_path()).status, 200);
    scrape_until(&a, "the round b missed", |m| {
        m.value("ncro_mesh_routes_sent_total", &[]) >= 2.0
    });
    let b = NcroProcess::start(&config_b);
    let m = scrape_until(&b, "the catch-up", |m| {
        m.value("ncro_mesh_routes_merged_total", &[]) >= 1.0
    });
    assert_eq!(packets(&m, "bad_signature"), 0.0);
    let r = b.get(&missed.narinfo_request_path());
    assert_eq!(r.status, 200, "{}", b.logs());
    assert_eq!(
        narinfo_requests(&up),
        2,
        "the restarted node served the missed path from the catch-up"
    );
    let m = scrape(&a);
    assert!(
        m.value("ncro_mesh_catch_ups_total", &[]) >= 1.0,
        "{}",
        m.text
    );
    assert!(a.wait_for_log("sending it the routes announced since", WAIT));
}

/// A node that stops sends the routes it learnt since its last round
/// before it exits: with a 60 s interval, the route raced just before
/// SIGTERM reaches the peer at once instead of never.
#[test]
fn a_stopping_node_sends_its_last_routes_before_it_exits() {
    let key = TestKey::generate("mesh-cache-5");
    let p = TestPath::new("raced-before-stop");
    let up = FakeUpstream::builder().path(&p, &key).start();
    let keys_dir = tempfile::tempdir().unwrap();
    let (ka, pa) = keygen(keys_dir.path(), "a.key");
    let (kb, pb) = keygen(keys_dir.path(), "b.key");
    let (udp_a, udp_b) = (udp_addr("127.0.0.2"), udp_addr("127.0.0.3"));
    let (db_a, db_b) = (db_dir(), db_dir());
    let mut a = NcroConfig::new(&[entry(up.url(), 10, &key)], &db_a.path().join("r.db"))
        .set("server", "listen", "127.0.0.2:0")
        .set("server", "workers", 1)
        .set("mesh", "enabled", true)
        .set("mesh", "bind_addr", udp_a.to_string())
        .set("mesh", "private_key", ka.to_string_lossy().as_ref())
        .set("mesh", "gossip_interval", "60s")
        .set("mesh", "peers", toml::Value::Array(vec![peer(udp_b, &pb)]))
        .start();
    let b = node(
        "127.0.0.3",
        &up,
        &key,
        &db_b.path().join("r.db"),
        &kb,
        udp_b,
        vec![peer(udp_a, &pa)],
    );
    assert_eq!(a.get(&p.narinfo_request_path()).status, 200);
    a.sigterm();
    assert!(a.wait_exit(WAIT).success());
    scrape_until(&b, "the last round", |m| {
        m.value("ncro_mesh_routes_merged_total", &[]) >= 1.0
    });
    assert_eq!(b.get(&p.narinfo_request_path()).status, 200);
    assert_eq!(narinfo_requests(&up), 1);
}

/// ncro 2.2's `RouteEntry`/`Message`, serialised with the encoder it uses.
#[derive(Serialize)]
enum MessageType {
    Announce,
}

#[derive(Serialize)]
struct RouteEntry {
    store_path: String,
    upstream_url: String,
    latency_ms: f64,
    latency_ema: f64,
    last_verified: chrono::DateTime<chrono::Utc>,
    query_count: u32,
    failure_count: u32,
    ttl: chrono::DateTime<chrono::Utc>,
    nar_hash: String,
    nar_size: u64,
    nar_url: String,
    narinfo_bytes: Option<Vec<u8>>,
}

#[derive(Serialize)]
struct Message {
    r#type: MessageType,
    node_id: String,
    timestamp: i64,
    routes: Vec<RouteEntry>,
}

fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i64
}

/// The reference's one-route body, byte for byte, with its timestamp
/// (bytes 28..36, after `cf`) set to `ts` so it is fresh.
fn golden_body(ts: i64) -> Vec<u8> {
    let mut b = hex::decode(
        concat!(
            "94a8416e6e6f756e6365b030303131323233333434353536363737",
            "cf18b3d491bb8dcd15",
            "919ca3616263a8687474703a2f2f75cb3ff8000000000000cb4000000000000000",
            "b4323032362d30352d32385432303a32363a34305a0100",
            "b4323032362d30352d32385432303a32363a34305a",
            "a8736861323536 3a78cd012ca96e61722f782e6e6172 9253ccff"
        )
        .replace(' ', ""),
    )
    .unwrap();
    assert_eq!(b[27], 0xcf);
    b[28..36].copy_from_slice(&ts.to_be_bytes());
    b
}

fn seal(key: &SigningKey, body: &[u8]) -> Vec<u8> {
    let mut out = key.verifying_key().to_bytes().to_vec();
    out.extend_from_slice(&key.sign(body).to_bytes());
    out.extend_from_slice(body);
    out
}

fn route_of(p: &TestPath, key: &TestKey, upstream: &str) -> RouteEntry {
    // chrono is built without its clock here; whole seconds, as ncro 2.2
    // sends rows read back from SQLite.
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let now = chrono::DateTime::from_timestamp(secs, 0).unwrap();
    RouteEntry {
        store_path: p.narinfo_request_path()[1..33].to_owned(),
        upstream_url: upstream.to_owned(),
        latency_ms: 5.0,
        latency_ema: 5.0,
        last_verified: now,
        query_count: 1,
        failure_count: 0,
        ttl: now + chrono::Duration::hours(1),
        nar_hash: p.nar_hash(),
        nar_size: p.nar_size(),
        nar_url: p.nar_url(),
        narinfo_bytes: Some(p.narinfo(&[key]).into_bytes()),
    }
}

#[test]
fn forged_replayed_oversized_and_malformed_packets_are_dropped_and_counted() {
    let key = TestKey::generate("mesh-cache-2");
    let (p_array, p_map) = (
        TestPath::new("from-2-2-array"),
        TestPath::new("from-2-2-map"),
    );
    let up = FakeUpstream::builder()
        .path(&p_array, &key)
        .path(&p_map, &key)
        .start();
    let keys_dir = tempfile::tempdir().unwrap();
    let (node_key, _) = keygen(keys_dir.path(), "node.key");
    let test_udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    let peer_key = SigningKey::from_bytes(&rand::random());
    let stranger = SigningKey::from_bytes(&rand::random());
    let udp = udp_addr("127.0.0.2");
    let db = db_dir();
    let ncro = node(
        "127.0.0.2",
        &up,
        &key,
        &db.path().join("routes.db"),
        &node_key,
        udp,
        vec![peer(
            test_udp.local_addr().unwrap(),
            &hex::encode(peer_key.verifying_key().to_bytes()),
        )],
    );
    let send = |bytes: &[u8]| {
        test_udp.send_to(bytes, udp).unwrap();
    };
    let t0 = now_ns();
    let golden = seal(&peer_key, &golden_body(t0));
    send(&golden); // accepted (its route names no real path: rejected alone)
    send(&golden); // replayed: the same timestamp again
    send(&seal(&peer_key, &golden_body(t0 - 1))); // replayed: older than the last
    send(&seal(&peer_key, &golden_body(t0 - 600_000_000_000))); // replayed: outside the window
    let mut forged = seal(&peer_key, &golden_body(t0 + 1));
    *forged.last_mut().unwrap() ^= 0x01;
    send(&forged); // bad_signature
    send(&seal(&stranger, &golden_body(t0 + 2))); // unknown_sender
    let mut big = seal(&peer_key, &golden_body(t0 + 3));
    big.resize(1401, 0);
    send(&big); // oversized
    send(&golden[..80]); // malformed: shorter than key + signature
    send(&seal(&peer_key, b"\x93\xa8Announce")); // malformed body, validly signed
    let array = Message {
        r#type: MessageType::Announce,
        node_id: hex::encode(&peer_key.verifying_key().to_bytes()[..8]),
        timestamp: t0 + 4,
        routes: vec![route_of(&p_array, &key, &up.url())],
    };
    send(&seal(&peer_key, &rmp_serde::to_vec(&array).unwrap())); // accepted
    let map = Message {
        timestamp: t0 + 5,
        routes: vec![route_of(&p_map, &key, &up.url())],
        ..array
    };
    send(&seal(&peer_key, &rmp_serde::to_vec_named(&map).unwrap())); // accepted

    // A datagram is counted when it is received; the routes of an accepted
    // one are judged after that (the narinfo may be checked first), so wait
    // for all three routes to be merged or rejected as well.
    let m = scrape_until(&ncro, "all 11 datagrams and their 3 routes", |m| {
        let datagrams = [
            "accepted",
            "bad_signature",
            "unknown_sender",
            "malformed",
            "replayed",
            "oversized",
        ]
        .iter()
        .map(|r| packets(m, r))
        .sum::<f64>();
        let judged = m.value("ncro_mesh_routes_merged_total", &[])
            + m.sum("ncro_mesh_routes_rejected_total");
        datagrams >= 11.0 && judged >= 3.0
    });
    let counts = [
        ("accepted", 3.0),
        ("replayed", 3.0),
        ("bad_signature", 1.0),
        ("unknown_sender", 1.0),
        ("oversized", 1.0),
        ("malformed", 2.0),
    ];
    for (result, want) in counts {
        assert_eq!(packets(&m, result), want, "{result}\n{}", m.text);
    }
    assert_eq!(
        m.value("ncro_mesh_routes_merged_total", &[]),
        2.0,
        "{}",
        m.text
    );
    assert_eq!(
        m.value(
            "ncro_mesh_routes_rejected_total",
            &[("reason", "malformed")]
        ),
        1.0,
        "the golden route's store path \"abc\" is not a store hash"
    );
    for p in [&p_array, &p_map] {
        let r = ncro.get(&p.narinfo_request_path());
        assert_eq!(r.status, 200, "{}", ncro.logs());
        assert!(r.text().contains(&p.store_path()));
    }
    assert_eq!(narinfo_requests(&up), 0, "served from gossip alone");
}

#[test]
fn keygen_never_overwrites_a_key() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = keygen(dir.path(), "node.key");
    let before = std::fs::read(&path).unwrap();
    let again = Command::new(env!("CARGO_BIN_EXE_ncro"))
        .args(["keygen", "--out"])
        .arg(&path)
        .output()
        .expect("run ncro keygen");
    assert_eq!(again.status.code(), Some(1));
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(err.contains("already exists"), "{err}");
    assert_eq!(std::fs::read(&path).unwrap(), before);
}

/// `allow_unauthenticated = true` with a keyless peer: a warning at start,
/// then any self-signed sender is heard (ncro 2.2's behaviour without
/// keys), while forged signatures are still dropped.
#[test]
fn allow_unauthenticated_accepts_self_signed_strangers_with_a_warning() {
    let key = TestKey::generate("mesh-cache-4");
    let up = FakeUpstream::builder().start();
    let keys_dir = tempfile::tempdir().unwrap();
    let (node_key, _) = keygen(keys_dir.path(), "node.key");
    let test_udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    let udp = udp_addr("127.0.0.2");
    let db = db_dir();
    let mut keyless = toml::Table::new();
    keyless.insert(
        "addr".into(),
        test_udp.local_addr().unwrap().to_string().into(),
    );
    let ncro = NcroConfig::new(&[entry(up.url(), 10, &key)], &db.path().join("r.db"))
        .set("server", "listen", "127.0.0.2:0")
        .set("mesh", "enabled", true)
        .set("mesh", "allow_unauthenticated", true)
        .set("mesh", "bind_addr", udp.to_string())
        .set("mesh", "private_key", node_key.to_string_lossy().as_ref())
        .set(
            "mesh",
            "peers",
            toml::Value::Array(vec![toml::Value::Table(keyless)]),
        )
        .start();
    assert!(
        ncro.wait_for_log("any sender with a valid self-signature is accepted", WAIT),
        "{}",
        ncro.logs()
    );
    let stranger = SigningKey::from_bytes(&rand::random());
    let t0 = now_ns();
    test_udp
        .send_to(&seal(&stranger, &golden_body(t0)), udp)
        .unwrap();
    let mut forged = seal(&stranger, &golden_body(t0 + 1));
    forged[40] ^= 1; // inside the signature
    test_udp.send_to(&forged, udp).unwrap();
    let m = scrape_until(&ncro, "both datagrams", |m| {
        packets(m, "accepted") + packets(m, "bad_signature") >= 2.0
    });
    assert_eq!(packets(&m, "accepted"), 1.0, "{}", m.text);
    assert_eq!(packets(&m, "bad_signature"), 1.0, "{}", m.text);
    assert_eq!(packets(&m, "unknown_sender"), 0.0, "{}", m.text);
}

/// A node restarted right after it exits comes up on the same HTTP and
/// gossip ports every time (docs/operations.md, "Restarting"): the old
/// process's sockets may outlive it for a moment (io_uring teardown), and
/// neither the port check, the listeners nor the UDP bind may fail on that.
#[test]
fn a_node_restarted_at_once_comes_up_on_the_same_ports() {
    const RESTARTS: usize = 20;
    let key = TestKey::generate("mesh-restart");
    let p = TestPath::new("restarted");
    let up = FakeUpstream::builder().path(&p, &key).start();
    let keys_dir = tempfile::tempdir().unwrap();
    let (private, _) = keygen(keys_dir.path(), "node.key");
    let (_, peer_public) = keygen(keys_dir.path(), "peer.key");
    // The peer: a socket the test holds, so gossip has somewhere to go.
    let sink = UdpSocket::bind("127.0.0.1:0").unwrap();
    let udp = udp_addr("127.0.0.1");
    let db = db_dir();
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let cfg = NcroConfig::new(&[entry(up.url(), 10, &key)], &db.path().join("routes.db"))
        .set("server", "listen", listen.to_string())
        .set("server", "workers", 2)
        .set("mesh", "enabled", true)
        .set("mesh", "bind_addr", udp.to_string())
        .set("mesh", "private_key", private.to_string_lossy().as_ref())
        .set("mesh", "gossip_interval", GOSSIP_INTERVAL)
        .set(
            "mesh",
            "peers",
            toml::Value::Array(vec![peer(sink.local_addr().unwrap(), &peer_public)]),
        )
        .render();
    let mut n = NcroProcess::start(&cfg);
    for round in 0..RESTARTS {
        // Some traffic, so the sockets have had work in flight.
        assert_eq!(n.get(&p.narinfo_request_path()).status, 200, "{}", n.logs());
        n.sigterm();
        let status = n.wait_exit(WAIT);
        assert!(status.success(), "round {round}: {status}\n{}", n.logs());
        n = NcroProcess::try_start(&cfg)
            .unwrap_or_else(|e| panic!("restart {round} on {listen} / udp {udp}: {e}"));
        assert!(
            n.wait_for_log("mesh gossip listening", WAIT),
            "{}",
            n.logs()
        );
    }
    // A node killed outright never closes its sockets itself: the kernel
    // does, after it is gone, and start-up waits for the ports.
    n.kill();
    let n = NcroProcess::try_start(&cfg)
        .unwrap_or_else(|e| panic!("start after SIGKILL on {listen} / udp {udp}: {e}"));
    assert!(
        n.wait_for_log("mesh gossip listening", WAIT),
        "{}",
        n.logs()
    );
    assert_eq!(n.get(&p.narinfo_request_path()).status, 200, "{}", n.logs());
}

/// A gossip port held by a live process stays refused: start-up waits a few
/// seconds for it (a node that has just exited may hold it), says so once,
/// then fails with the bind error. The HTTP port check's twin is
/// `server::workers::second_instance_on_the_same_port_is_refused`.
#[test]
fn a_gossip_port_held_by_a_live_process_is_refused() {
    let key = TestKey::generate("mesh-held");
    let up = FakeUpstream::builder().start();
    let keys_dir = tempfile::tempdir().unwrap();
    let (private, _) = keygen(keys_dir.path(), "node.key");
    let (_, peer_public) = keygen(keys_dir.path(), "peer.key");
    let held = UdpSocket::bind("127.0.0.1:0").unwrap();
    let udp = held.local_addr().unwrap();
    let db = db_dir();
    // A fixed HTTP port: with port 0 the harness would try others on
    // "address already in use".
    let listen = format!("127.0.0.1:{}", free_port());
    let cfg = NcroConfig::new(&[entry(up.url(), 10, &key)], &db.path().join("routes.db"))
        .set("server", "listen", listen)
        .set("mesh", "enabled", true)
        .set("mesh", "bind_addr", udp.to_string())
        .set("mesh", "private_key", private.to_string_lossy().as_ref())
        .set(
            "mesh",
            "peers",
            toml::Value::Array(vec![peer(udp, &peer_public)]),
        )
        .render();
    let started = std::time::Instant::now();
    match NcroProcess::try_start(&cfg) {
        Err(crate::harness::HarnessError::EarlyExit { status, logs, .. }) => {
            assert!(!status.success(), "{logs}");
            let want = format!("mesh.bind_addr {udp}: cannot bind UDP: Address already in use");
            assert!(logs.contains(&want), "{logs}");
            assert_eq!(
                logs.matches("address in use; retrying").count(),
                1,
                "{logs}"
            );
            assert!(
                started.elapsed() >= Duration::from_secs(4),
                "{:?}",
                started.elapsed()
            );
        }
        Err(e) => panic!("{e}"),
        Ok(n) => panic!("ncro started on a gossip port in use\n{}", n.logs()),
    }
    drop(held);
}
