//! SIGTERM and SIGINT: ncro stops accepting, lets the request in flight
//! finish, and exits 0 well within `server.shutdown_grace`.

use std::io::ErrorKind;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use super::{eventually, start};
use crate::fake::{FakeUpstream, Fault, TestKey, TestPath};
use crate::harness::HttpConn;

/// How long the fake holds the narinfo: long enough to watch the drain
/// while the request is still in flight on a busy machine.
const UPSTREAM_DELAY: Duration = Duration::from_secs(3);
const GRACE: Duration = Duration::from_secs(20);

/// True once a connect to `addr` is refused (every listener closed).
fn refused_within(addr: SocketAddr, within: Duration) -> bool {
    eventually(within, || {
        match TcpStream::connect_timeout(&addr, Duration::from_millis(500)) {
            Err(e) => e.kind() == ErrorKind::ConnectionRefused,
            // Accepted by a listener that is about to close; try again.
            Ok(_) => false,
        }
    })
}

/// Sends `signal` (`times` times, 200 ms apart) while a request is in
/// flight and checks the drain.
fn drain_on(signal: libc::c_int, name: &str, times: usize) {
    let key = TestKey::generate("drain-1");
    let p = TestPath::new("slow");
    let narinfo = p.narinfo_request_path();
    let up = FakeUpstream::builder()
        .path(&p, &key)
        .rule(narinfo.as_str(), Fault::Delay(UPSTREAM_DELAY))
        .start();
    let extra = format!(
        "[server]\nworkers = 2\nshutdown_grace = \"{}s\"\n",
        GRACE.as_secs()
    );
    let mut n = start(&[(&up.url(), &key.public_key())], &extra);
    let addr = n.addr();
    let mut idle = HttpConn::connect(addr).unwrap();
    assert_eq!(idle.get("/nix-cache-info").unwrap().status, 200);

    let path = narinfo.clone();
    let in_flight = std::thread::spawn(move || {
        let mut c = HttpConn::connect(addr).expect("connect");
        let r = c.get(&path);
        let closed = c.wait_closed(Duration::from_secs(5));
        (r, closed)
    });
    assert!(
        eventually(Duration::from_secs(10), || up.request_count(&narinfo) == 1),
        "the request never reached the upstream\n{}",
        n.logs()
    );
    let signalled = Instant::now();
    n.signal(signal);
    assert!(
        n.wait_for_log("shutting down", Duration::from_secs(5)),
        "{name}: no drain log\n{}",
        n.logs()
    );
    assert!(
        refused_within(addr, Duration::from_secs(5)),
        "{name}: still accepting during the drain"
    );
    assert!(
        !in_flight.is_finished(),
        "{name}: the in-flight request ended before the listener closed; the test proves nothing"
    );
    for _ in 1..times {
        n.signal(signal);
        std::thread::sleep(Duration::from_millis(100));
    }
    // An idle keep-alive connection is closed at once, not after the grace.
    assert!(idle.wait_closed(Duration::from_secs(2)).unwrap());

    let (resp, closed) = in_flight.join().expect("client thread");
    let resp = resp.unwrap_or_else(|e| panic!("{name}: in-flight request failed: {e}"));
    assert_eq!(resp.status, 200, "{name}");
    assert!(resp.text().contains(&p.store_path()), "{}", resp.text());
    assert_eq!(resp.header("Connection"), Some("close"), "{name}");
    assert!(
        closed.unwrap(),
        "{name}: connection left open after the drain"
    );

    let status = n.wait_exit(GRACE + Duration::from_secs(10));
    let took = signalled.elapsed();
    assert!(status.success(), "{name}: {status}\n{}", n.logs());
    assert!(
        took < GRACE / 2,
        "{name}: exit took {took:?}; the drain waited for the grace period"
    );
    assert!(n.stdout().contains("ncro stopped"), "{}", n.logs());
    assert!(TcpStream::connect(addr).is_err());
}

#[test]
fn sigterm_drains_in_flight_requests() {
    drain_on(libc::SIGTERM, "SIGTERM", 1);
}

#[test]
fn sigint_drains_in_flight_requests() {
    drain_on(libc::SIGINT, "SIGINT", 1);
}

/// A second signal during the drain (an impatient operator, a supervisor
/// that repeats itself) must not kill the process from a helper thread
/// that never blocked the signal.
#[test]
fn repeated_signals_do_not_cut_the_drain_short() {
    drain_on(libc::SIGTERM, "SIGTERM x3", 3);
}

#[test]
fn grace_period_bounds_a_hung_request() {
    let key = TestKey::generate("drain-2");
    let p = TestPath::new("hung");
    let narinfo = p.narinfo_request_path();
    let up = FakeUpstream::builder()
        .path(&p, &key)
        .rule(narinfo.as_str(), Fault::Hang)
        .start();
    let mut n = start(
        &[(&up.url(), &key.public_key())],
        "[server]\nshutdown_grace = \"2s\"\n[timeouts]\nfirst_byte = \"60s\"\nrace_deadline = \"60s\"\n",
    );
    let addr = n.addr();
    let hung =
        std::thread::spawn(move || HttpConn::connect(addr).and_then(|mut c| c.get(&narinfo)));
    assert!(eventually(Duration::from_secs(10), || up.requests().len() == 1));
    let signalled = Instant::now();
    n.sigterm();
    let status = n.wait_exit(Duration::from_secs(20));
    let took = signalled.elapsed();
    assert!(status.success(), "{status}\n{}", n.logs());
    assert!(
        took >= Duration::from_millis(1500),
        "exited after {took:?}, before the 2 s grace"
    );
    assert!(took < Duration::from_secs(10), "exit took {took:?}");
    assert!(n.stdout().contains("grace period over"), "{}", n.logs());
    // The client is not left hanging: its connection ends with the process.
    assert!(hung.join().expect("client thread").is_err());
}
