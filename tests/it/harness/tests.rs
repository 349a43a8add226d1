//! The harness checked on its own: its HTTP client against the fake
//! upstream, and process handling against a stand-in server (python3), so
//! these pass before ncro serves anything.

use super::*;
use crate::fake::{FakeUpstream, Fault};
use std::ffi::OsString;

/// A tiny HTTP server that reads `server.listen` from `--config FILE`,
/// like `ncro serve` does, and exits 0 on SIGTERM.
const STAND_IN: &str = r#"
import http.server, signal, sys, tomllib
cfg = tomllib.load(open(sys.argv[sys.argv.index("--config") + 1], "rb"))
host, port = cfg["server"]["listen"].rsplit(":", 1)
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        body = b"stand-in " + self.path.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        sys.stderr.write("served %s\n" % self.path)
        sys.stderr.flush()
signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
print("stand-in ready", flush=True)
http.server.HTTPServer((host, int(port)), H).serve_forever()
"#;

fn stand_in(config: &str) -> Result<NcroProcess, HarnessError> {
    NcroProcess::try_start_with("python3", &["-c", STAND_IN], config)
}

fn db() -> &'static Path {
    Path::new("/tmp/unused.db")
}

#[test]
fn test_config_is_ncro_22_toml() {
    let cfg = test_config(
        "127.0.0.1:0",
        &[
            ("http://127.0.0.1:1", 40, "cache-a-1:AAAA"),
            ("http://x\"y", 50, ""),
        ],
        Path::new("/tmp/r.db"),
    );
    let t: toml::Table = toml::from_str(&cfg).unwrap();
    assert_eq!(t["server"]["listen"].as_str(), Some("127.0.0.1:0"));
    let ups = t["upstreams"].as_array().unwrap();
    assert_eq!(ups.len(), 2);
    assert_eq!(ups[0]["url"].as_str(), Some("http://127.0.0.1:1"));
    assert_eq!(ups[0]["priority"].as_integer(), Some(40));
    assert_eq!(ups[0]["public_key"].as_str(), Some("cache-a-1:AAAA"));
    assert_eq!(ups[1]["url"].as_str(), Some("http://x\"y"));
    assert!(ups[1].get("public_key").is_none());
    assert_eq!(t["cache"]["db_path"].as_str(), Some("/tmp/r.db"));
    assert_eq!(t["logging"]["level"].as_str(), Some("debug"));
    assert_eq!(t["logging"]["format"].as_str(), Some("text"));
}

#[test]
fn listen_addresses_map_to_connectable_ones() {
    let addr =
        |l: &str| listen_addr(&toml::from_str(&format!("[server]\nlisten = \"{l}\"")).unwrap());
    assert_eq!(addr(":8080").unwrap(), "127.0.0.1:8080".parse().unwrap());
    assert_eq!(addr("0.0.0.0:1").unwrap(), "127.0.0.1:1".parse().unwrap());
    assert_eq!(addr("[::]:2").unwrap(), "[::1]:2".parse().unwrap());
    assert_eq!(addr("127.0.0.1:0").unwrap().port(), 0);
    assert!(addr("nonsense").is_err());
    assert_eq!(listen_addr(&toml::Table::new()).unwrap().port(), 8080);
}

#[test]
fn free_ports_are_consecutive_and_never_repeat() {
    let a = free_ports(3);
    let b = free_ports(3);
    assert!(b >= a + 3 || a >= b + 3, "{a} {b}");
    for p in [a, a + 1, a + 2] {
        TcpListener::bind(("127.0.0.1", p)).expect("still free");
    }
    assert!(port_taken(
        "Error: bind: Address already in use (os error 98)"
    ));
    assert!(!port_taken("Error: permission denied"));
}

#[test]
fn client_handles_keep_alive_head_and_chunked_bodies() {
    let big = crate::fake::random_bytes(100_000);
    let up = FakeUpstream::builder()
        .file("/a", "hello")
        .file("/big", big.clone())
        .rule("/big", Fault::Chunked)
        .start();
    let mut c = HttpConn::connect(up.addr()).unwrap();
    let r = c.get("/a").unwrap();
    assert_eq!((r.status, r.text().as_str()), (200, "hello"));
    let r = c.request("HEAD", "/a", &[]).unwrap();
    assert_eq!((r.header("Content-Length"), r.body.len()), (Some("5"), 0));
    assert_eq!(c.get("/big").unwrap().body, big);
    let r = c.request("GET", "/a", &[("Range", "bytes=1-2")]).unwrap();
    assert_eq!((r.status, r.text().as_str()), (206, "el"));
    assert_eq!(c.get("/nope").unwrap().status, 404);
    assert_eq!(up.connections(), 1);
    assert_eq!(up.requests()[0].header("host"), Some("ncro-test"));
}

#[test]
fn client_reports_truncation_and_close() {
    let up = FakeUpstream::builder()
        .file("/a", "hello world")
        .rule("/a", Fault::nth(1, Fault::Truncate(3)))
        .rule(
            "/raw",
            Fault::Raw(b"HTTP/1.1 200 OK\r\n\r\nuntil close".to_vec()),
        )
        .start();
    let err = http_get(up.addr(), "/a").unwrap_err();
    assert_eq!(err.kind(), ErrorKind::UnexpectedEof);
    assert_eq!(http_get(up.addr(), "/raw").unwrap().text(), "until close");
    let mut c = HttpConn::connect(up.addr()).unwrap();
    let r = c.request("GET", "/a", &[("Connection", "close")]).unwrap();
    assert_eq!(r.text(), "hello world");
    assert!(c.is_closed());
    assert_eq!(c.get("/a").unwrap_err().kind(), ErrorKind::NotConnected);
}

#[test]
fn process_starts_serves_and_stops_on_sigterm() {
    let cfg = test_config("127.0.0.1:0", &[], db());
    let mut p = stand_in(&cfg).expect("stand-in starts");
    assert_ne!(p.addr().port(), 0);
    assert_eq!(p.url(), format!("http://{}", p.addr()));
    let r = p.get("/x.narinfo");
    assert_eq!(r.text(), "stand-in /x.narinfo");
    assert!(p.wait_for_log("served /x.narinfo", Duration::from_secs(5)));
    assert!(p.stdout().contains("stand-in ready"));
    let config = std::fs::read_to_string(p.dir().join("ncro.toml")).unwrap();
    assert!(config.contains(&p.addr().to_string()), "{config}");
    p.sigterm();
    let status = p.wait_exit(Duration::from_secs(5));
    assert!(status.success(), "{status}");
    assert!(TcpStream::connect(p.addr()).is_err());
}

#[test]
fn process_is_killed_on_drop() {
    let p = stand_in(&test_config("127.0.0.1:0", &[], db())).unwrap();
    let pid = p.pid();
    drop(p);
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "pid {pid} still exists"
    );
}

#[test]
fn early_exit_is_reported_with_logs() {
    let cfg = test_config("127.0.0.1:0", &[], db());
    let script = "import sys; sys.stderr.write('boom: bad config\\n'); sys.exit(3)";
    let err = NcroProcess::try_start_with("python3", &["-c", script], &cfg)
        .err()
        .unwrap();
    let msg = err.to_string();
    assert!(matches!(err, HarnessError::EarlyExit { .. }), "{msg}");
    assert!(
        msg.contains("boom: bad config") && msg.contains("exit status: 3"),
        "{msg}"
    );
}

#[test]
fn only_ncro_variables_are_removed() {
    let vars = [
        "NCRO_LISTEN",
        "PATH",
        "NCRO_DB_PATH",
        "XNCRO_",
        "ncro_x",
        "AWS_PROFILE",
    ]
    .map(OsString::from);
    let removed = ncro_vars(vars.into_iter());
    assert_eq!(
        removed,
        [
            OsString::from("NCRO_LISTEN"),
            OsString::from("NCRO_DB_PATH"),
            OsString::from("AWS_PROFILE")
        ]
    );
}
