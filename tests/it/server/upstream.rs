//! The upstream side through the proxy: keep-alive connection reuse, a
//! pooled connection the upstream closed, one it sent unasked-for bytes
//! on, and HTTPS upstreams with a private CA.

use std::time::Duration;

use super::tls_front::{toml_path, TestCa, TlsFront};
use super::{eventually, fake_with, metric, start};
use crate::fake::{FakeUpstream, Fault, PathMatch, TestKey, TestPath};
use crate::harness::http_get;

#[test]
fn sequential_misses_reuse_upstream_connections() {
    let key = TestKey::generate("pool-1");
    let paths: Vec<TestPath> = (0..20).map(|i| TestPath::new(&format!("p{i}"))).collect();
    let up = fake_with(&paths, &key);
    let n = start(&[(&up.url(), &key.public_key())], "[server]\nworkers = 2\n");
    // A fresh client connection each time, so both workers take part.
    for p in &paths {
        let r = http_get(n.addr(), &p.narinfo_request_path()).unwrap();
        assert_eq!(r.status, 200, "{}", p.hash);
    }
    for p in &paths {
        assert_eq!(up.request_count(&p.narinfo_request_path()), 1, "{}", p.hash);
    }
    // Each worker keeps its own pool: one connection each when reuse works,
    // a little slack for a connection lost to timing.
    let conns = up.connections();
    assert!(
        (1..=4).contains(&conns),
        "20 sequential misses used {conns} upstream connections"
    );
}

#[test]
fn concurrent_misses_keep_their_upstream_connections() {
    // Three rounds of 20 misses at once on one worker, each held 150 ms by
    // the upstream, so each round has many requests in flight together.
    // ncro never needs more connections than requests in flight (20), as
    // long as every connection that answered goes back to the pool; a pool
    // smaller than the race's in-flight limit closed the ones past it after
    // each round and opened new ones for the next.
    const AT_ONCE: usize = 20;
    let key = TestKey::generate("pool-2");
    let paths: Vec<TestPath> = (0..3 * AT_ONCE)
        .map(|i| TestPath::new(&format!("c{i}")))
        .collect();
    let up = paths
        .iter()
        .fold(FakeUpstream::builder(), |f, p| f.path(p, &key))
        .latency(Duration::from_millis(150))
        .start();
    let n = start(&[(&up.url(), &key.public_key())], "[server]\nworkers = 1\n");
    let addr = n.addr();
    for round in paths.chunks(AT_ONCE) {
        std::thread::scope(|s| {
            let asks: Vec<_> = round
                .iter()
                .map(|p| s.spawn(move || http_get(addr, &p.narinfo_request_path())))
                .collect();
            for (ask, p) in asks.into_iter().zip(round) {
                let r = ask.join().unwrap().expect("narinfo through ncro");
                assert_eq!(r.status, 200, "{}", p.hash);
            }
        });
    }
    for p in &paths {
        assert_eq!(up.request_count(&p.narinfo_request_path()), 1, "{}", p.hash);
    }
    let conns = up.connections();
    assert!(
        conns <= AT_ONCE,
        "{} misses, at most {AT_ONCE} at once, opened {conns} upstream connections",
        paths.len()
    );
}

#[test]
fn stale_pooled_connection_is_replaced_transparently() {
    let key = TestKey::generate("stale-1");
    let (a, b, c) = (TestPath::new("a"), TestPath::new("b"), TestPath::new("c"));
    let up = [&a, &b, &c]
        .iter()
        .fold(FakeUpstream::builder(), |f, p| f.path(p, &key))
        .idle_timeout(Duration::from_millis(300))
        .start();
    let n = start(&[(&up.url(), &key.public_key())], "[server]\nworkers = 1\n");
    assert_eq!(n.get(&a.narinfo_request_path()).status, 200);
    assert_eq!(up.connections(), 1);
    // The fake closes the pooled connection behind ncro's back.
    std::thread::sleep(Duration::from_millis(1200));
    let r = n.get(&b.narinfo_request_path());
    assert_eq!(r.status, 200, "{}", n.logs());
    assert!(r.text().contains(&b.store_path()));
    assert_eq!(up.connections(), 2);
    assert_eq!(up.requests().len(), 2, "{:?}", up.requests());
    // The close was seen at checkout (a close that lands after checkout
    // takes the transparent retry instead).
    let eof = "ncro_upstream_pool_discards_total{reason=\"eof\"}";
    assert_eq!(metric(&n.get("/metrics").text(), eof), Some(1));
    // And the replacement is pooled in turn.
    assert_eq!(n.get(&c.narinfo_request_path()).status, 200);
    assert_eq!(up.connections(), 2);
}

#[test]
fn bytes_sent_after_a_complete_answer_never_become_the_next_answer() {
    let key = TestKey::generate("unsolicited-1");
    let p = TestPath::new("after-head");
    let nar = p.nar_request_path();
    // After its answer to the first NAR request (a HEAD: no body), the
    // upstream sends a whole response nobody asked for, while ncro holds
    // the connection idle in its pool.
    let forged = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nforged".to_vec();
    let up = FakeUpstream::builder()
        .path(&p, &key)
        .rule(
            PathMatch::exact(&nar),
            Fault::nth(1, Fault::Unsolicited(Duration::from_millis(50), forged)),
        )
        .start();
    let n = start(&[(&up.url(), &key.public_key())], "[server]\nworkers = 1\n");
    let head = n.request("HEAD", &nar, &[]).expect("HEAD through ncro");
    assert_eq!(head.status, 200, "{}", n.logs());
    assert!(
        eventually(Duration::from_secs(5), || up.request_count(&nar) == 1),
        "{:?}",
        up.requests()
    );
    // Let the forged bytes reach ncro's idle connection.
    std::thread::sleep(Duration::from_millis(400));
    let r = n.get(&nar);
    assert_eq!(r.status, 200, "{}", n.logs());
    assert!(r.body == p.nar, "the NAR, not the unsolicited bytes");
    assert_eq!(
        up.connections(),
        2,
        "the polluted connection was not reused"
    );
    assert_eq!(up.request_count(&nar), 2);
    let page = n.get("/metrics").text();
    let discards = |reason: &str| {
        metric(
            &page,
            &format!("ncro_upstream_pool_discards_total{{reason=\"{reason}\"}}"),
        )
    };
    assert_eq!(
        (discards("unsolicited"), discards("eof")),
        (Some(1), Some(0))
    );
}

/// A fake behind a TLS front, and ncro pointed at `https://localhost:PORT`
/// with `tls_ca_file` set when `trust`.
fn tls_setup(trust: bool) -> (FakeUpstream, TestCa, TlsFront, TestPath, super::Running) {
    let key = TestKey::generate("tls-1");
    let p = TestPath::new("over-tls");
    let up = fake_with(std::slice::from_ref(&p), &key);
    let ca = TestCa::generate();
    let front = TlsFront::start(&ca, up.addr());
    let url = format!("https://localhost:{}", front.port());
    let extra = if trust {
        format!(
            "[[upstreams]]\nurl = \"{url}\"\npriority = 10\npublic_key = \"{}\"\ntls_ca_file = {}\n",
            key.public_key(),
            toml_path(&ca.ca_file())
        )
    } else {
        String::new()
    };
    let n = if trust {
        start(&[], &extra)
    } else {
        start(&[(&url, &key.public_key())], "")
    };
    (up, ca, front, p, n)
}

#[test]
fn https_upstream_with_private_ca() {
    let (up, _ca, front, p, n) = tls_setup(true);
    let r = n.get(&p.narinfo_request_path());
    assert_eq!(r.status, 200, "{}", n.logs());
    assert!(r.text().contains(&p.store_path()), "{}", r.text());
    let nar = n.get(&p.nar_request_path());
    assert_eq!((nar.status, nar.body.len()), (200, p.nar.len()));
    assert_eq!(nar.body, p.nar);
    assert!(front.handshakes() >= 1);
    let req = &up.requests()[0];
    assert_eq!(req.path, p.narinfo_request_path());
    assert_eq!(
        req.header("host"),
        Some(format!("localhost:{}", front.port()).as_str())
    );
}

#[test]
fn https_upstream_with_unknown_ca_is_502_not_404() {
    let (up, _ca, front, p, n) = tls_setup(false);
    for _ in 0..2 {
        // Not cached as a miss either: the second try is also a 502.
        let r = n.get(&p.narinfo_request_path());
        assert_eq!(r.status, 502, "{}", n.logs());
    }
    assert_eq!(front.handshakes(), 0);
    assert!(up.requests().is_empty(), "{:?}", up.requests());
}
