//! A TLS front for a fake upstream: a test CA, a server certificate for
//! `localhost` signed by it, and a rustls terminator thread that relays
//! each request to the fake's plain port and the answer back, one exchange
//! at a time (the proxy never pipelines upstream requests). Only GETs with
//! Content-Length answers are relayed: all these tests need.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

const IO_TIMEOUT: Duration = Duration::from_secs(15);

/// A CA whose PEM is written to `ca.pem` in its own temp dir, and a
/// certificate for `localhost` and 127.0.0.1 signed by it.
pub struct TestCa {
    dir: tempfile::TempDir,
    server_cert: CertificateDer<'static>,
    server_key: Vec<u8>,
}

impl TestCa {
    pub fn generate() -> TestCa {
        let ca_key = rcgen::KeyPair::generate().expect("CA key");
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "ncro test CA");
        let ca = ca_params.self_signed(&ca_key).expect("CA cert");
        let key = rcgen::KeyPair::generate().expect("server key");
        let params = rcgen::CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()])
            .expect("server params");
        let cert = params.signed_by(&key, &ca, &ca_key).expect("server cert");
        let dir = tempfile::Builder::new()
            .prefix("ncro-ca-")
            .tempdir()
            .expect("temp dir");
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).expect("write CA");
        TestCa {
            dir,
            server_cert: cert.der().clone(),
            server_key: key.serialize_der(),
        }
    }

    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    fn server_config(&self) -> Arc<rustls::ServerConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.server_key.clone()));
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_no_client_auth()
            .with_single_cert(vec![self.server_cert.clone()], key)
            .expect("server cert and key match");
        Arc::new(config)
    }
}

/// The terminator: TLS on its own port, plain HTTP to `backend`.
pub struct TlsFront {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    handshakes: Arc<AtomicUsize>,
    /// Client sockets still open, shut down on drop to end their threads.
    open: Arc<Mutex<Vec<TcpStream>>>,
    threads: Arc<Mutex<Vec<JoinHandle<()>>>>,
    acceptor: Option<JoinHandle<()>>,
}

impl TlsFront {
    pub fn start(ca: &TestCa, backend: SocketAddr) -> TlsFront {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind TLS front");
        let addr = listener.local_addr().expect("addr");
        let config = ca.server_config();
        let mut front = TlsFront {
            addr,
            stop: Arc::default(),
            handshakes: Arc::default(),
            open: Arc::default(),
            threads: Arc::default(),
            acceptor: None,
        };
        let (stop, handshakes) = (front.stop.clone(), front.handshakes.clone());
        let (open, threads) = (front.open.clone(), front.threads.clone());
        front.acceptor = Some(std::thread::spawn(move || {
            for sock in listener.incoming() {
                if stop.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(sock) = sock else { continue };
                if let Ok(clone) = sock.try_clone() {
                    open.lock().unwrap_or_else(|e| e.into_inner()).push(clone);
                }
                let (config, hs) = (config.clone(), handshakes.clone());
                let t = std::thread::spawn(move || {
                    // Handshake failures (an untrusted CA) just end the connection.
                    let _ = relay(sock, config, backend, &hs);
                });
                threads.lock().unwrap_or_else(|e| e.into_inner()).push(t);
            }
        }));
        front
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// TLS handshakes that completed.
    pub fn handshakes(&self) -> usize {
        self.handshakes.load(Ordering::SeqCst)
    }
}

impl Drop for TlsFront {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the acceptor blocked in accept().
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(a) = self.acceptor.take() {
            let _ = a.join(); // a panic there already failed the test
        }
        for s in self
            .open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            let _ = s.shutdown(Shutdown::Both); // may be closed already
        }
        let threads: Vec<_> = self
            .threads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
            .collect();
        for t in threads {
            let _ = t.join();
        }
    }
}

fn relay(
    sock: TcpStream,
    config: Arc<rustls::ServerConfig>,
    backend: SocketAddr,
    handshakes: &AtomicUsize,
) -> io::Result<()> {
    sock.set_read_timeout(Some(IO_TIMEOUT))?;
    sock.set_write_timeout(Some(IO_TIMEOUT))?;
    let conn = rustls::ServerConnection::new(config).map_err(io::Error::other)?;
    let mut tls = rustls::StreamOwned::new(conn, sock);
    while tls.conn.is_handshaking() {
        tls.conn.complete_io(&mut tls.sock)?;
    }
    handshakes.fetch_add(1, Ordering::SeqCst);
    let mut plain = TcpStream::connect_timeout(&backend, IO_TIMEOUT)?;
    plain.set_read_timeout(Some(IO_TIMEOUT))?;
    let mut from_client = Vec::new();
    let mut from_backend = Vec::new();
    loop {
        let Some(request) = read_head(&mut tls, &mut from_client)? else {
            return Ok(());
        };
        plain.write_all(&request)?;
        let Some(head) = read_head(&mut plain, &mut from_backend)? else {
            return Ok(());
        };
        let len = content_length(&head);
        while from_backend.len() < len {
            if !fill(&mut plain, &mut from_backend)? {
                return Ok(());
            }
        }
        tls.write_all(&head)?;
        tls.write_all(&from_backend.drain(..len).collect::<Vec<_>>())?;
        tls.flush()?;
    }
}

/// One head (through the blank line) taken from `buf`, reading more from
/// `r` as needed; None on a clean EOF.
fn read_head(r: &mut impl Read, buf: &mut Vec<u8>) -> io::Result<Option<Vec<u8>>> {
    loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            return Ok(Some(buf.drain(..i + 4).collect()));
        }
        if !fill(r, buf)? {
            return Ok(None);
        }
    }
}

fn fill(r: &mut impl Read, buf: &mut Vec<u8>) -> io::Result<bool> {
    let mut chunk = [0u8; 16 * 1024];
    let n = r.read(&mut chunk)?;
    buf.extend_from_slice(&chunk[..n]);
    Ok(n > 0)
}

fn content_length(head: &[u8]) -> usize {
    let mut hs = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut hs);
    if resp.parse(head).is_err() {
        return 0;
    }
    resp.headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .and_then(|h| std::str::from_utf8(h.value).ok()?.trim().parse().ok())
        .unwrap_or(0)
}

/// `path` as a TOML string literal.
pub fn toml_path(path: &Path) -> String {
    toml::Value::String(path.display().to_string()).to_string()
}
