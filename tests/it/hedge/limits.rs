//! `upstreams[].max_concurrent_requests` through the real binary: a gated
//! upstream counts the NAR streams it is serving at once (each sends its
//! head and first bytes, then holds the rest until the test opens the
//! gate), so the cap is measured where it applies, not inferred.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::{hedging, with_upstream_keys, LIMIT};
use crate::fake::random_bytes;
use crate::faults::fetch::fetch;
use crate::harness::NcroProcess;
use crate::metrics::scrape;
use crate::routing::{db_dir, NcroConfig};
use crate::server::eventually;

const NAR: &str = "/nar/1w1fff338fvdw53sqgamddn1b2xgds473pv6y13gizdbqjv4i5p3.nar";
const BODY: usize = 256 * 1024;
/// Sent with the head before the gate.
const FIRST: usize = 1024;

#[derive(Default)]
struct GateState {
    active: AtomicUsize,
    peak: AtomicUsize,
    served: AtomicUsize,
    open: Mutex<bool>,
    wake: Condvar,
    stop: AtomicBool,
}

/// Serves `body` at [`NAR`] (404 elsewhere), one thread per connection,
/// `Connection: close`.
struct Gated {
    addr: SocketAddr,
    st: Arc<GateState>,
    body: Arc<Vec<u8>>,
}

impl Gated {
    fn start() -> Gated {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        let st = Arc::new(GateState::default());
        let body = Arc::new(random_bytes(BODY));
        let (st2, body2) = (st.clone(), body.clone());
        std::thread::spawn(move || {
            for conn in l.incoming() {
                if st2.stop.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(conn) = conn else { continue };
                let (st, body) = (st2.clone(), body2.clone());
                std::thread::spawn(move || serve(conn, &st, &body));
            }
        });
        Gated { addr, st, body }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn open(&self) {
        *self.st.open.lock().unwrap() = true;
        self.st.wake.notify_all();
    }

    fn active(&self) -> usize {
        self.st.active.load(Ordering::SeqCst)
    }

    fn peak(&self) -> usize {
        self.st.peak.load(Ordering::SeqCst)
    }
}

impl Drop for Gated {
    fn drop(&mut self) {
        self.st.stop.store(true, Ordering::SeqCst);
        self.open();
        let _ = TcpStream::connect(self.addr); // wakes the acceptor
    }
}

fn serve(mut conn: TcpStream, st: &GateState, body: &[u8]) {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let line = String::from_utf8_lossy(&head);
    let target = line.split_whitespace().nth(1).unwrap_or_default();
    if !line.starts_with("GET ") || target != NAR {
        let _ = conn.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        return;
    }
    let now = st.active.fetch_add(1, Ordering::SeqCst) + 1;
    st.peak.fetch_max(now, Ordering::SeqCst);
    let h = format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nContent-Type: application/x-nix-nar\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let sent = conn.write_all(h.as_bytes()).is_ok() && conn.write_all(&body[..FIRST]).is_ok();
    if sent {
        let guard = st.open.lock().unwrap();
        let _open = st
            .wake
            .wait_timeout_while(guard, Duration::from_secs(60), |open| !*open)
            .unwrap();
        drop(_open);
        if conn.write_all(&body[FIRST..]).is_ok() {
            st.served.fetch_add(1, Ordering::SeqCst);
        }
    }
    st.active.fetch_sub(1, Ordering::SeqCst);
}

/// ncro with one worker in front of `gated` alone, capped at `cap`.
fn ncro_for(gated: &Gated, cap: i64, first_byte: &str, db: &std::path::Path) -> NcroProcess {
    let ups = [(gated.url(), 10, String::new())];
    let cfg = NcroConfig::new(&ups, db)
        .set("server", "workers", 1)
        .set("timeouts", "first_byte", first_byte)
        .set("timeouts", "idle", "60s")
        .set("cache", "nar_hedging", hedging(false, "1s", 1));
    let text = with_upstream_keys(&cfg, &[(0, "max_concurrent_requests", cap.into())]);
    NcroProcess::start(&text)
}

/// SO_LINGER 0: closing the socket sends RST.
fn reset_on_close(s: &TcpStream) {
    use std::os::fd::AsRawFd;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid fd owned by `s`; the option outlives the call.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "SO_LINGER");
}

fn limited(ncro: &NcroProcess, up: &str) -> f64 {
    scrape(ncro).value("ncro_nar_streams_limited", &[("upstream", up)])
}

/// Six clients at once against a cap of two: the upstream never serves
/// more than two; the others wait for a permit and all six get the whole
/// NAR once the gate opens.
#[test]
fn the_cap_holds_under_concurrent_clients_and_waiters_get_through() {
    let gated = Gated::start();
    let db = db_dir();
    let ncro = ncro_for(&gated, 2, "60s", &db.path().join("r.db"));
    let addr = ncro.addr();
    let clients: Vec<_> = (0..6)
        .map(|_| std::thread::spawn(move || fetch(addr, NAR, &[], Duration::from_secs(60))))
        .collect();
    assert!(
        eventually(Duration::from_secs(20), || gated.active() == 2),
        "{}",
        ncro.logs()
    );
    // The others are waiting inside ncro, not at the upstream.
    let waiting = eventually(Duration::from_secs(20), || {
        scrape(&ncro).value("ncro_nar_limit_skips_total", &[("upstream", &gated.url())]) == 4.0
    });
    assert!(waiting, "{}", scrape(&ncro).text);
    assert_eq!(limited(&ncro, &gated.url()), 2.0);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(gated.peak(), 2);
    gated.open();
    for c in clients {
        let got = c.join().expect("client thread");
        assert_eq!(got.status, 200, "{}", ncro.logs());
        assert!(got.complete && got.body[..] == gated.body[..], "{}", ncro.logs());
    }
    assert_eq!(gated.peak(), 2, "the cap was exceeded");
    let sc = scrape(&ncro);
    assert_eq!(
        sc.value("ncro_nar_limit_waits_total", &[("result", "granted")]),
        4.0
    );
    assert_eq!(sc.value("ncro_nar_limit_waits_total", &[("result", "refused")]), 0.0);
    assert_eq!(limited(&ncro, &gated.url()), 0.0);
}

/// A client that goes away mid-stream gives its permit back; a request
/// that finds the only holder full for longer than `timeouts.first_byte`
/// gets 503 with Retry-After.
#[test]
fn a_cancelled_stream_gives_its_permit_back_and_a_full_upstream_gives_503() {
    let gated = Gated::start();
    let db = db_dir();
    let ncro = ncro_for(&gated, 1, "1s", &db.path().join("r.db"));
    // Client 1 reads the head, then resets its connection.
    let mut c1 = TcpStream::connect(ncro.addr()).expect("connect");
    c1.write_all(format!("GET {NAR} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes())
        .expect("send");
    let mut first = [0u8; 512];
    let n = c1.read(&mut first).expect("head");
    assert!(first[..n].starts_with(b"HTTP/1.1 200"), "{}", ncro.logs());
    assert!(eventually(Duration::from_secs(10), || gated.active() == 1));
    assert_eq!(limited(&ncro, &gated.url()), 1.0);
    // Meanwhile the only holder is full: 503 after the 1 s wait.
    let t = Instant::now();
    let busy = fetch(ncro.addr(), NAR, &[], LIMIT);
    assert_eq!(busy.status, 503, "{}", ncro.logs());
    assert_eq!(busy.header("Retry-After"), Some("1"));
    assert!(t.elapsed() >= Duration::from_millis(900), "{:?}", t.elapsed());
    assert_eq!(
        scrape(&ncro).value("ncro_nar_limit_waits_total", &[("result", "refused")]),
        1.0
    );
    // Client 1 leaves with unread bytes (RST); the rest arrives and ncro's
    // write fails: the stream ends and its permit is given back.
    reset_on_close(&c1);
    drop(c1);
    gated.open();
    let released = eventually(Duration::from_secs(20), || limited(&ncro, &gated.url()) == 0.0);
    assert!(released, "{}", ncro.logs());
    let got = fetch(ncro.addr(), NAR, &[], LIMIT);
    assert_eq!(got.status, 200, "{}", ncro.logs());
    assert!(got.complete && got.body[..] == gated.body[..]);
}
