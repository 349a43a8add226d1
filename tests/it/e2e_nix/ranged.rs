//! Parallel ranged NAR fetches with the real Nix client: cache A is
//! reached through a TCP relay that caps every connection at 16 MiB/s
//! (as S3 or a CDN edge may), and the client substitutes A's 64 MiB NAR
//! through ncro with `[cache.nar_ranges]` on. Nix verifies the NAR hash,
//! so a wrong byte anywhere fails the step; the relay must have seen
//! several connections and cache A several `Range` requests for the NAR.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{caches, fetch, serve_with, summary, Report};
use crate::harness::{test_config, NcroProcess};

/// Bytes per second per connection, upstream to client.
const CAP: u64 = 16 << 20;

/// A loopback TCP relay to `to` that paces every connection's answers
/// at `CAP`; counts the connections it accepted.
struct CappedRelay {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl CappedRelay {
    fn start(to: SocketAddr) -> CappedRelay {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind relay");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("addr");
        let accepted = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (n, halt) = (accepted.clone(), stop.clone());
        std::thread::spawn(move || {
            while !halt.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((client, _)) => {
                        n.fetch_add(1, Ordering::Relaxed);
                        std::thread::spawn(move || relay(client, to));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        CappedRelay {
            addr,
            accepted,
            stop,
        }
    }
}

impl Drop for CappedRelay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn relay(client: TcpStream, to: SocketAddr) {
    let Ok(up) = TcpStream::connect(to) else {
        return;
    };
    let (Ok(mut c_read), Ok(mut up_write)) = (client.try_clone(), up.try_clone()) else {
        return;
    };
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 16 * 1024];
        while let Ok(n) = c_read.read(&mut buf) {
            if n == 0 || up_write.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = up_write.shutdown(Shutdown::Write);
    });
    let (mut up_read, mut c_write) = (up, client);
    let mut buf = vec![0u8; 16 * 1024];
    let started = Instant::now();
    let mut sent = 0u64;
    while let Ok(n) = up_read.read(&mut buf) {
        if n == 0 || c_write.write_all(&buf[..n]).is_err() {
            break;
        }
        sent += n as u64;
        let due = Duration::from_secs_f64(sent as f64 / CAP as f64);
        if let Some(wait) = due.checked_sub(started.elapsed()) {
            std::thread::sleep(wait);
        }
    }
    let _ = c_write.shutdown(Shutdown::Both);
}

#[test]
fn nix_client_substitutes_a_large_nar_through_a_capped_upstream() {
    let c = caches();
    let served = serve_with(c, "ranged", ["A", "B", "C"], &[]);
    let a_addr: SocketAddr = served.urls[0]
        .strip_prefix("http://")
        .and_then(|a| a.parse().ok())
        .expect("cache A address");
    let capped = CappedRelay::start(a_addr);
    let capped_url = format!("http://{}", capped.addr);
    let db = tempfile::tempdir().expect("tempdir");
    let ups = [
        (capped_url.as_str(), 50, c.keys[0].as_str()),
        (served.urls[1].as_str(), 50, c.keys[1].as_str()),
        (served.urls[2].as_str(), 50, c.keys[2].as_str()),
    ];
    let mut config = test_config("127.0.0.1:0", &ups, &db.path().join("routes.db"));
    config.push_str(
        "\n[cache.nar_ranges]\nenabled = true\nmin_size = \"8MiB\"\nchunk_size = \"2MiB\"\nconnections = 8\nmin_latency = \"0s\"\n",
    );
    let ncro = NcroProcess::try_start(&config).unwrap_or_else(|e| panic!("start ncro: {e}"));
    let paths = [c.role("large_a")];
    let all_keys = c.keys.join(" ");
    let log = db.path().join("fetch.log");
    let run = fetch(&c.scripts, &ncro.url(), &all_keys, &paths, &[], &log);
    let a_log =
        std::fs::read_to_string(served.root.join("serve").join("A.log")).unwrap_or_default();
    let ranges = a_log
        .lines()
        .filter(|l| {
            l.contains("path=/nar/") && l.contains("range=bytes=") && l.contains("status=206")
        })
        .count();
    let conns = capped.accepted.load(Ordering::Relaxed);
    let mut report = Report::default();
    report.step(
        "substituted",
        run.code == Some(0),
        &summary(&run),
        &run.output,
    );
    report.step(
        "in_ranges",
        ranges >= 4 && conns >= 3,
        &format!("cache A answered {ranges} NAR range requests over {conns} capped connections"),
        &format!("{}\n{}", served.access_logs(), ncro.logs()),
    );
    report.finish(&format!(
        "real Nix client, 64 MiB NAR from an upstream capped at 16 MiB/s per connection: {:.2} s",
        run.secs
    ));
}
