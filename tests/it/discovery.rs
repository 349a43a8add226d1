//! mDNS discovery through the real `ncro` binary, on real multicast.
//!
//! The test thread moves into a network namespace of its own
//! (`unshare(CLONE_NEWNET)`, which only affects that thread) and builds a
//! small LAN there: a veth pair `va` (10.77.0.1, fd77::1) and `vb`
//! (10.77.0.2, fd77::2), so the cache is announced at real, non-loopback
//! addresses that ncro accepts as it would on a LAN. Everything the thread
//! starts lives in that namespace: ncro (a child process), the fake
//! upstreams (their threads), and the announcer, an mdns-sd responder
//! running in this test process. Nothing reaches the host's network. The
//! namespace has no name and goes away by itself once the thread and the
//! processes and sockets it made are gone, so a failing test leaves nothing
//! behind.
//!
//! Needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN) and `ip` from iproute2. CI
//! runs as root; elsewhere, without root and without `CI` set, the test
//! says it is skipped and passes.

use std::net::{IpAddr, SocketAddr};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::fake::{FakeUpstream, TestKey, TestPath};
use crate::harness::NcroProcess;
use crate::server::eventually;

const SERVICE: &str = "_nix-serve._tcp.local.";
const INSTANCE: &str = "ncro-it-cache";
/// `discovery.discovery_time` in these tests.
const ROUND: Duration = Duration::from_secs(1);

/// Runs `body` on a thread in a new network namespace with the veth pair
/// up. `None` when the test cannot run here and is skipped.
fn in_private_lan<T: Send>(body: impl FnOnce() -> T + Send) -> Option<T> {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root && std::env::var_os("CI").is_none() {
        eprintln!("SKIPPED discovery test: needs root for a network namespace (CI runs it)");
        return None;
    }
    std::thread::scope(|s| {
        let t = s.spawn(|| {
            // SAFETY: unshare(2) with CLONE_NEWNET moves only this thread
            // into a new network namespace; no memory is involved.
            let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
            assert_eq!(
                rc,
                0,
                "unshare(CLONE_NEWNET): {}",
                std::io::Error::last_os_error()
            );
            for args in [
                "link set lo up",
                "link add va type veth peer name vb",
                "addr add 10.77.0.1/24 dev va",
                "addr add 10.77.0.2/24 dev vb",
                "-6 addr add fd77::1/64 dev va nodad",
                "-6 addr add fd77::2/64 dev vb nodad",
                "link set va up",
                "link set vb up",
            ] {
                ip(args);
            }
            body()
        });
        Some(t.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
    })
}

/// Runs `ip ARGS` in the calling thread's namespace (a child inherits it).
fn ip(args: &str) {
    // Not every root PATH has the sbin directories.
    let program = ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .unwrap_or("ip");
    let out = Command::new(program)
        .args(args.split(' '))
        .output()
        .unwrap_or_else(|e| panic!("running `ip {args}` (install iproute2): {e}"));
    assert!(
        out.status.success(),
        "ip {args}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An mdns-sd responder announcing a cache at `addrs`, port `port`, until
/// dropped (or [`Announcer::stop`]ped).
struct Announcer(Option<mdns_sd::ServiceDaemon>);

impl Announcer {
    fn start(addrs: &[IpAddr], port: u16) -> Announcer {
        let daemon = mdns_sd::ServiceDaemon::new().expect("mDNS responder");
        let info =
            mdns_sd::ServiceInfo::new(SERVICE, INSTANCE, "ncro-it-cache.local.", addrs, port, None)
                .expect("service info");
        daemon.register(info).expect("register");
        Announcer(Some(daemon))
    }

    fn stop(&mut self) {
        if let Some(d) = self.0.take() {
            let status = d.shutdown().expect("shutdown");
            // Bounded: the daemon thread answers once it has cleaned up.
            let _ = status.recv_timeout(Duration::from_secs(5)); // gone either way
        }
    }
}

impl Drop for Announcer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// ncro with one configured upstream (priority 10) and discovery on;
/// `health` turns probes on (every 300 ms).
fn config(configured: &str, db: &std::path::Path, health: bool) -> String {
    let q = |s: &str| toml::Value::String(s.to_owned()).to_string();
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nworkers = 2\n\n\
         [[upstreams]]\nurl = {}\npriority = 10\n\n\
         [cache]\ndb_path = {}\n\n\
         [health]\nenabled = {health}\nprobe_interval = \"300ms\"\nprobe_timeout = \"1s\"\n\n\
         [discovery]\nenabled = true\ndiscovery_time = \"{}ms\"\naddress_family = \"{}\"\n\n\
         [logging]\nlevel = \"debug\"\nformat = \"text\"\n",
        q(configured),
        q(&db.to_string_lossy()),
        ROUND.as_millis(),
        if health { "any" } else { "ipv4" },
    )
}

fn health(ncro: &NcroProcess) -> Value {
    let r = ncro.get("/health");
    assert_eq!(r.status, 200);
    serde_json::from_slice(&r.body).expect("/health is JSON")
}

/// `(url, source)` of every upstream in `/health`.
fn listed(ncro: &NcroProcess) -> Vec<(String, String)> {
    let h = health(ncro);
    let list = h["upstreams"].as_array().cloned().unwrap_or_default();
    list.iter()
        .map(|u| {
            let s = |k: &str| u[k].as_str().unwrap_or_default().to_owned();
            (s("url"), s("source"))
        })
        .collect()
}

fn metric(ncro: &NcroProcess, line_start: &str) -> Option<f64> {
    let body = String::from_utf8(ncro.get("/metrics").body).expect("utf-8");
    body.lines()
        .find_map(|l| l.strip_prefix(line_start)?.trim().parse().ok())
}

#[test]
fn an_announced_cache_is_discovered_raced_kept_and_dropped_after_silence() {
    in_private_lan(|| {
        let key = TestKey::generate("ncro-it-lan-1");
        let (first, later) = (TestPath::new("first"), TestPath::new("later"));
        // The configured cache has neither path: races fall through to the
        // discovered one (priority 20, a later tier).
        let configured = FakeUpstream::builder().cache_info(40).start();
        let lan = FakeUpstream::builder()
            .cache_info(40)
            .path(&first, &key)
            .path(&later, &key)
            .start_on(SocketAddr::from(([0u16; 8], 0)))
            .expect("bind the LAN cache on [::]");
        let port = lan.addr().port();
        let db = tempfile::tempdir().expect("tempdir");
        let ncro = NcroProcess::start(&config(&configured.url(), &db.path().join("r.db"), true));
        let v4 = format!("http://10.77.0.2:{port}");
        let v6 = format!("http://[fd77::2]:{port}");
        let loopback = ["127.0.0.1", "::1"].map(|a| a.parse::<IpAddr>().expect("ip"));
        let announced = [
            "10.77.0.2".parse().expect("ip"),
            "fd77::2".parse().expect("ip"),
            loopback[0],
            loopback[1],
        ];
        let mut announcer = Announcer::start(&announced, port);
        let announced_at = Instant::now();

        let found = eventually(Duration::from_secs(15), || {
            listed(&ncro).contains(&(v4.clone(), "discovered".into()))
        });
        assert!(
            found,
            "{v4} never discovered: {:?}\n{}",
            listed(&ncro),
            ncro.logs()
        );
        let found_after = announced_at.elapsed();
        assert!(ncro.wait_for_log("discovered nix-serve instance", Duration::from_secs(1)));
        let discovered = listed(&ncro);
        for (url, source) in listed(&ncro) {
            let expected = url == configured.url() || url == v4 || url == v6;
            assert!(
                expected,
                "unexpected upstream {url} ({source}): never loopback"
            );
        }
        let gauge = metric(&ncro, "ncro_discovery_upstreams ").expect("gauge");
        assert!(
            (1.0..=2.0).contains(&gauge),
            "ncro_discovery_upstreams {gauge}"
        );

        // Used in races: the discovered cache answers what the configured
        // one does not have.
        let r = ncro.get(&first.narinfo_request_path());
        assert_eq!(r.status, 200, "{}", ncro.logs());
        assert!(String::from_utf8_lossy(&r.body).contains(&first.store_path()));
        assert_eq!(configured.request_count(&first.narinfo_request_path()), 1);
        // Once per discovered URL at most (IPv4, and IPv6 when heard too):
        // the tier is raced at once, the loser dropped.
        let asked = lan.request_count(&first.narinfo_request_path());
        assert!((1..=2).contains(&asked), "LAN cache asked {asked} times");
        // And health probing.
        let probed = eventually(Duration::from_secs(5), || {
            lan.request_count("/nix-cache-info") > 0
        });
        assert!(probed, "the discovered cache is never probed");

        // Regression (ncro 2.2 dropped live caches after 15-25 s): a cache
        // that keeps answering stays, over more than three rounds.
        let watch = Instant::now();
        while watch.elapsed() < ROUND * 4 {
            assert!(
                listed(&ncro).contains(&(v4.clone(), "discovered".into())),
                "a live cache was dropped after {:?}\n{}",
                watch.elapsed(),
                ncro.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }

        // Silence: gone within three rounds (plus the round in progress),
        // not at once.
        announcer.stop();
        let silent = Instant::now();
        let gone = eventually(ROUND * 8, || {
            !listed(&ncro)
                .iter()
                .any(|(_, source)| source == "discovered")
        });
        let after = silent.elapsed();
        assert!(
            gone,
            "still listed after {after:?}: {:?}\n{}",
            listed(&ncro),
            ncro.logs()
        );
        assert!(
            after >= ROUND * 2,
            "dropped after {after:?}: before three silent rounds"
        );
        assert!(ncro.wait_for_log("removing stale peer", Duration::from_secs(1)));
        assert_eq!(metric(&ncro, "ncro_discovery_upstreams "), Some(0.0));
        assert_eq!(listed(&ncro), [(configured.url(), "configured".into())]);

        // No longer raced: the LAN cache sees nothing for a new lookup.
        let before = lan.requests().len();
        let r = ncro.get(&later.narinfo_request_path());
        assert_eq!(r.status, 404, "only the configured cache was asked");
        let lookups = lan.requests()[before..]
            .iter()
            .filter(|q| q.path.ends_with(".narinfo"))
            .count();
        assert_eq!(lookups, 0);
        eprintln!("discovery: found after {found_after:?} as {discovered:?}, asked {asked}x, dropped {after:?} after silence");
    });
}

/// Without health probes the prober still keeps the upstream set: a
/// discovered cache is raced all the same. `address_family = "ipv4"` keeps
/// the IPv6 address out.
#[test]
fn discovery_works_with_health_probes_off_and_one_address_family() {
    in_private_lan(|| {
        let key = TestKey::generate("ncro-it-lan-2");
        let path = TestPath::new("only-on-the-lan");
        let configured = FakeUpstream::builder().start();
        let lan = FakeUpstream::builder()
            .path(&path, &key)
            .start_on(SocketAddr::from(([0u16; 8], 0)))
            .expect("bind the LAN cache on [::]");
        let port = lan.addr().port();
        let db = tempfile::tempdir().expect("tempdir");
        let ncro = NcroProcess::start(&config(&configured.url(), &db.path().join("r.db"), false));
        let v4 = format!("http://10.77.0.2:{port}");
        let addrs = ["10.77.0.2", "fd77::2"].map(|a| a.parse::<IpAddr>().expect("ip"));
        let _announcer = Announcer::start(&addrs, port);
        let found = eventually(Duration::from_secs(15), || {
            listed(&ncro).contains(&(v4.clone(), "discovered".into()))
        });
        assert!(
            found,
            "{v4} never discovered: {:?}\n{}",
            listed(&ncro),
            ncro.logs()
        );
        // One more round: an IPv6 URL would have been heard by now.
        std::thread::sleep(ROUND * 2);
        let urls: Vec<_> = listed(&ncro).into_iter().map(|(u, _)| u).collect();
        assert_eq!(urls.len(), 2, "{urls:?}");
        assert!(
            urls.iter().all(|u| !u.contains('[')),
            "IPv6 kept out: {urls:?}"
        );
        let r = ncro.get(&path.narinfo_request_path());
        assert_eq!(r.status, 200, "{}", ncro.logs());
        assert_eq!(lan.request_count(&path.narinfo_request_path()), 1);
        assert_eq!(lan.request_count("/nix-cache-info"), 0, "no probes");
    });
}
