//! Integration tests for the upstream client (`ncro::http::client`) against
//! tiny blocking fake servers on loopback. Each test builds its monoio
//! runtime by hand; the key scenarios run on both FusionDriver (io_uring
//! when available) and the epoll LegacyDriver. The descriptor-leak test
//! runs in a child process of its own (see `alone_in_a_child`): in the
//! shared `it` binary other modules' tests open descriptors meanwhile.

use std::future::Future;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use ncro::http::client::{
    ClientError, ClientTimeouts, LocalClient, Method, Origin, PoolOptions, RelayError, RelayMode,
    Request, Response,
};
use ncro::http::resolve::Resolver;

/// The fd-leak test takes this exclusively; everything else shares it, so
/// no other test opens or closes descriptors while it counts them.
static FD_GUARD: RwLock<()> = RwLock::new(());

fn shared() -> std::sync::RwLockReadGuard<'static, ()> {
    FD_GUARD.read().unwrap_or_else(|e| e.into_inner())
}

fn on_fusion<F: Future>(f: F) -> F::Output {
    monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
        .enable_timer()
        .build()
        .expect("fusion runtime")
        .block_on(f)
}

fn on_legacy<F: Future>(f: F) -> F::Output {
    monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
        .enable_timer()
        .build()
        .expect("legacy runtime")
        .block_on(f)
}

/// Runs an async scenario once per driver.
macro_rules! both_drivers {
    ($scenario:ident: $fusion:ident, $legacy:ident) => {
        #[test]
        fn $fusion() {
            let _g = shared();
            on_fusion($scenario());
        }
        #[test]
        fn $legacy() {
            let _g = shared();
            on_legacy($scenario());
        }
    };
}

// ---------------------------------------------------------------- fake server

enum Reply {
    /// Write the bytes, then wait for the next request on this connection.
    Send(Vec<u8>),
    /// Write the bytes, then close the connection.
    SendClose(Vec<u8>),
    /// Write the bytes, then neither answer nor close until the client does.
    SendHang(Vec<u8>),
    /// Write the first bytes, wait, write the second (unasked for), then
    /// wait for the next request on this connection.
    SendThen(Vec<u8>, Duration, Vec<u8>),
}

type Handler = dyn Fn(&str) -> Reply + Send + Sync;

struct Server {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    live: Arc<AtomicUsize>,
    heads: Arc<Mutex<Vec<String>>>,
}

impl Server {
    fn start(handler: impl Fn(&str) -> Reply + Send + Sync + 'static) -> Server {
        Self::start_on("127.0.0.1:0", handler).expect("bind loopback")
    }

    fn start_on(
        bind: &str,
        handler: impl Fn(&str) -> Reply + Send + Sync + 'static,
    ) -> std::io::Result<Server> {
        let listener = TcpListener::bind(bind)?;
        let server = Server {
            addr: listener.local_addr()?,
            accepted: Arc::default(),
            live: Arc::default(),
            heads: Arc::default(),
        };
        let handler: Arc<Handler> = Arc::new(handler);
        let (accepted, live, heads) = (
            server.accepted.clone(),
            server.live.clone(),
            server.heads.clone(),
        );
        thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { break };
                accepted.fetch_add(1, Ordering::SeqCst);
                live.fetch_add(1, Ordering::SeqCst);
                let (handler, live, heads) = (handler.clone(), live.clone(), heads.clone());
                thread::spawn(move || {
                    serve_conn(conn, &*handler, &heads);
                    live.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        Ok(server)
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    fn last_head(&self) -> String {
        self.heads
            .lock()
            .expect("heads")
            .last()
            .cloned()
            .unwrap_or_default()
    }

    /// Waits (bounded) until the server closed every connection. Sleeps on
    /// the runtime, so io_uring gets to submit the client-side closes.
    async fn wait_no_live_connections(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.live.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            monoio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(
            self.live.load(Ordering::SeqCst),
            0,
            "server connections still open"
        );
    }
}

fn serve_conn(mut conn: TcpStream, handler: &Handler, heads: &Mutex<Vec<String>>) {
    // Bounds every hang: a test that forgets to close cannot wedge a thread.
    let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
    let mut pending = Vec::new();
    while let Some(head) = read_request_head(&mut conn, &mut pending) {
        heads.lock().expect("heads").push(head.clone());
        match handler(&head) {
            Reply::Send(bytes) => {
                if conn.write_all(&bytes).is_err() {
                    return;
                }
            }
            Reply::SendClose(bytes) => {
                let _ = conn.write_all(&bytes);
                return;
            }
            Reply::SendHang(bytes) => {
                let _ = conn.write_all(&bytes);
                let mut sink = [0u8; 1024];
                while matches!(conn.read(&mut sink), Ok(n) if n > 0) {}
                return;
            }
            Reply::SendThen(first, wait, second) => {
                if conn.write_all(&first).is_err() {
                    return;
                }
                thread::sleep(wait);
                if conn.write_all(&second).is_err() {
                    return;
                }
            }
        }
    }
}

fn read_request_head(conn: &mut TcpStream, pending: &mut Vec<u8>) -> Option<String> {
    loop {
        if let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
            let head: Vec<u8> = pending.drain(..end + 4).collect();
            return Some(String::from_utf8_lossy(&head).into_owned());
        }
        let mut chunk = [0u8; 4096];
        match conn.read(&mut chunk) {
            Ok(0) | Err(_) => return None,
            Ok(n) => pending.extend_from_slice(&chunk[..n]),
        }
    }
}

fn with_length(body: &[u8]) -> Vec<u8> {
    let mut out = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len()).into_bytes();
    out.extend_from_slice(body);
    out
}

fn chunked_wire(body: &[u8], chunk: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for piece in body.chunks(chunk) {
        out.extend_from_slice(format!("{:x};ext=1\r\n", piece.len()).as_bytes());
        out.extend_from_slice(piece);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\nX-Trailer: t\r\n\r\n");
    out
}

fn with_chunked(body: &[u8], chunk: usize) -> Vec<u8> {
    let mut out = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    out.extend_from_slice(&chunked_wire(body, chunk));
    out
}

/// Deterministic, non-repeating-ish body so misplaced bytes show up.
fn pattern(len: usize) -> Vec<u8> {
    let mut x: u32 = 0x9e37_79b9;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 24) as u8
        })
        .collect()
}

/// A client-side socket for relays: accepts one connection and returns
/// every byte received until EOF.
fn sink() -> (SocketAddr, JoinHandle<Vec<u8>>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind sink");
    let addr = listener.local_addr().expect("sink addr");
    let handle = thread::spawn(move || {
        let (mut conn, _) = listener.accept().expect("sink accept");
        let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
        let mut out = Vec::new();
        let _ = conn.read_to_end(&mut out);
        out
    });
    (addr, handle)
}

/// A sink that reads in small steps with pauses, so the relay finds the
/// client's socket full again and again (the splice relay's wait for room).
fn slow_sink() -> (SocketAddr, JoinHandle<Vec<u8>>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind sink");
    let addr = listener.local_addr().expect("sink addr");
    let handle = thread::spawn(move || {
        let (mut conn, _) = listener.accept().expect("sink accept");
        let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
        let mut out = Vec::new();
        let mut buf = [0u8; 16 * 1024];
        let mut reads = 0u32;
        loop {
            match conn.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
            reads += 1;
            if reads % 8 == 0 {
                thread::sleep(Duration::from_millis(2));
            }
        }
        out
    });
    (addr, handle)
}

fn client_with(timeouts: ClientTimeouts) -> LocalClient {
    let tls = ncro::http::tls::client_config(None).expect("tls config");
    LocalClient::new(
        Resolver::new(Duration::from_secs(60)),
        tls,
        timeouts,
        PoolOptions::default(),
    )
}

fn client() -> LocalClient {
    client_with(ClientTimeouts::default())
}

fn short_timeouts() -> ClientTimeouts {
    ClientTimeouts {
        connect: Duration::from_secs(2),
        first_byte: Duration::from_millis(300),
        idle: Duration::from_millis(300),
    }
}

fn origin(url: &str) -> Origin {
    Origin::parse(url, None).expect("origin")
}

async fn get(client: &LocalClient, origin: &Origin, path: &str) -> Result<Response, ClientError> {
    client.send(origin, &Request::get(path)).await
}

/// Relays `resp` into a fresh sink and returns (relay result, bytes seen).
async fn relay(resp: &mut Response, mode: RelayMode) -> (Result<u64, RelayError>, Vec<u8>) {
    let (addr, handle) = sink();
    let mut dst = monoio::net::TcpStream::connect_addr(addr)
        .await
        .expect("connect sink");
    let result = resp.relay_to(&mut dst, mode).await;
    // Synchronous shutdown, so the sink sees EOF before we join it.
    monoio::io::AsyncWriteRent::shutdown(&mut dst)
        .await
        .expect("shutdown sink");
    drop(dst);
    (result, handle.join().expect("sink thread"))
}

// ---------------------------------------------------------------- scenarios

async fn content_length_body() {
    let body = pattern(700_000);
    let reply = with_length(&body);
    let server = Server::start(move |_| Reply::Send(reply.clone()));
    let c = client();
    let o = origin(&server.url());
    let resp = get(&c, &o, "/x.nar").await.expect("response");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.content_length(), Some(body.len() as u64));
    assert!(!resp.is_chunked());
    let got = resp.read_to_end(1 << 20).await.expect("body");
    assert_eq!(&got[..], &body[..]);
    assert_eq!(
        c.idle_connections(&o),
        1,
        "connection went back to the pool"
    );
}
both_drivers!(content_length_body: content_length_fusion, content_length_legacy);

async fn chunked_body_decoded() {
    let body = pattern(300_000);
    let reply = with_chunked(&body, 7_777);
    let server = Server::start(move |_| Reply::Send(reply.clone()));
    let c = client();
    let o = origin(&server.url());
    let mut resp = get(&c, &o, "/x.nar").await.expect("response");
    assert!(resp.is_chunked());
    assert_eq!(resp.content_length(), None);
    let mut got = Vec::new();
    while let Some(piece) = resp.read_chunk().await.expect("chunk") {
        got.extend_from_slice(piece);
    }
    assert_eq!(got, body);
    assert!(resp.is_complete());
    drop(resp);
    assert_eq!(c.idle_connections(&o), 1);
    get(&c, &o, "/again")
        .await
        .expect("reuse")
        .read_to_end(1 << 20)
        .await
        .expect("body");
    assert_eq!(server.accepted(), 1);
}
both_drivers!(chunked_body_decoded: chunked_decoded_fusion, chunked_decoded_legacy);

async fn chunked_body_relayed_with_framing() {
    let body = pattern(1_000_000);
    let wire = chunked_wire(&body, 50_000);
    let reply = with_chunked(&body, 50_000);
    let server = Server::start(move |_| Reply::Send(reply.clone()));
    let c = client();
    let o = origin(&server.url());
    for mode in [RelayMode::Copy, RelayMode::Splice] {
        let mut resp = get(&c, &o, "/x.nar").await.expect("response");
        let (result, seen) = relay(&mut resp, mode).await;
        assert_eq!(result.expect("relay"), wire.len() as u64);
        assert_eq!(seen, wire, "framing forwarded verbatim ({mode:?})");
        assert!(resp.is_complete());
    }
    assert_eq!(server.accepted(), 1, "connection reused after relays");
}
both_drivers!(chunked_body_relayed_with_framing: chunked_relay_fusion, chunked_relay_legacy);

async fn relay_copy_and_splice_identical() {
    let body = pattern(3 * 1024 * 1024 + 12_345);
    let reply = with_length(&body);
    let server = Server::start(move |_| Reply::Send(reply.clone()));
    let c = client();
    let o = origin(&server.url());
    for mode in [RelayMode::Copy, RelayMode::Splice, RelayMode::Splice] {
        let mut resp = get(&c, &o, "/x.nar").await.expect("response");
        let (result, seen) = relay(&mut resp, mode).await;
        assert_eq!(result.expect("relay"), body.len() as u64, "{mode:?}");
        assert!(seen == body, "{mode:?} output differs");
    }
    assert_eq!(server.accepted(), 1, "splice never read past the body");
}
both_drivers!(relay_copy_and_splice_identical: relay_identical_fusion, relay_identical_legacy);

/// The splice relay against a client slower than the upstream, then the
/// same client socket used again by the runtime: the relay must leave both
/// sockets in the mode the driver expects (blocking under io_uring).
async fn splice_to_a_slow_client_then_reuse_both_sockets() {
    let body = pattern(4 * 1024 * 1024 + 7);
    let reply = with_length(&body);
    let server = Server::start(move |_| Reply::Send(reply.clone()));
    let c = client();
    let o = origin(&server.url());
    let (addr, handle) = slow_sink();
    let mut dst = monoio::net::TcpStream::connect_addr(addr)
        .await
        .expect("connect sink");
    let mut resp = get(&c, &o, "/x.nar").await.expect("response");
    let sent = resp.relay_to(&mut dst, RelayMode::Splice).await;
    assert_eq!(sent.expect("relay"), body.len() as u64);
    let (written, _) = monoio::io::AsyncWriteRentExt::write_all(&mut dst, b"tail".to_vec()).await;
    written.expect("client socket still usable by the runtime");
    monoio::io::AsyncWriteRent::shutdown(&mut dst)
        .await
        .expect("shutdown sink");
    drop(dst);
    let mut want = body.clone();
    want.extend_from_slice(b"tail");
    assert!(handle.join().expect("sink thread") == want, "bytes differ");
    let again = get(&c, &o, "/again").await.expect("pooled upstream reused");
    assert_eq!(
        again.read_to_end(8 << 20).await.expect("body").len(),
        body.len()
    );
    assert_eq!(server.accepted(), 1);
}
both_drivers!(
    splice_to_a_slow_client_then_reuse_both_sockets: splice_slow_client_fusion,
    splice_slow_client_legacy
);

async fn keep_alive_reuse() {
    let server = Server::start(|_| Reply::Send(with_length(b"hello")));
    let c = client();
    let o = origin(&server.url());
    for _ in 0..5 {
        let body = get(&c, &o, "/a")
            .await
            .expect("resp")
            .read_to_end(100)
            .await
            .expect("body");
        assert_eq!(&body[..], b"hello");
    }
    assert_eq!(server.accepted(), 1);
}
both_drivers!(keep_alive_reuse: keep_alive_fusion, keep_alive_legacy);

/// An error body that arrived with its head is consumed without any I/O
/// and its connection pooled at once (the narinfo race's 404s: no task to
/// drain them); one still on its way is left unread for the caller.
async fn buffered_error_body_finishes_without_io() {
    let whole = b"HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\n\r\nnot found".to_vec();
    let part = b"HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\n\r\nnot ".to_vec();
    let server = Server::start(move |head| {
        if head.contains("/split") {
            Reply::SendThen(part.clone(), Duration::from_millis(200), b"found".to_vec())
        } else {
            Reply::Send(whole.clone())
        }
    });
    let c = client();
    let o = origin(&server.url());
    let mut resp = get(&c, &o, "/whole").await.expect("response");
    assert_eq!(resp.status(), 404);
    assert!(resp.finish_buffered(), "the whole body came with the head");
    assert!(resp.is_complete());
    assert_eq!(
        c.idle_connections(&o),
        1,
        "pooled before the response is dropped"
    );
    drop(resp);
    let mut resp = get(&c, &o, "/split").await.expect("same connection");
    assert!(!resp.finish_buffered(), "five bytes are still on their way");
    assert_eq!(c.idle_connections(&o), 0);
    let body = resp.read_to_end(100).await.expect("body");
    assert_eq!(
        &body[..],
        b"not found",
        "nothing was consumed by the refusal"
    );
    assert_eq!(c.idle_connections(&o), 1);
    assert_eq!(server.accepted(), 1);
}
both_drivers!(
    buffered_error_body_finishes_without_io: buffered_error_body_fusion,
    buffered_error_body_legacy
);

async fn stale_pooled_connection_is_retried() {
    // Answers keep-alive style, then closes anyway: the pooled connection
    // is dead by the time the next request uses it.
    let server = Server::start(|_| Reply::SendClose(with_length(b"once")));
    let c = client();
    let o = origin(&server.url());
    for round in 1..=3 {
        let body = get(&c, &o, "/a")
            .await
            .expect("resp")
            .read_to_end(100)
            .await;
        assert_eq!(&body.expect("body")[..], b"once", "round {round}");
        monoio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(server.accepted(), 3);
}
both_drivers!(stale_pooled_connection_is_retried: stale_retry_fusion, stale_retry_legacy);

async fn unsolicited_bytes_are_never_read_as_the_next_response() {
    // After a HEAD answer, a 204 and a complete body, the upstream sends a
    // whole fake response nobody asked for while the connection idles in
    // the pool. Each next request must get its own answer, on a fresh
    // connection.
    const FORGED: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nforged";
    let server = Server::start(|head| {
        let later = Duration::from_millis(20);
        let path = head.split(' ').nth(1).unwrap_or_default();
        match path {
            "/head" => Reply::SendThen(
                b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n".to_vec(),
                later,
                FORGED.to_vec(),
            ),
            "/204" => Reply::SendThen(
                b"HTTP/1.1 204 No Content\r\n\r\n".to_vec(),
                later,
                FORGED.to_vec(),
            ),
            "/body" => Reply::SendThen(with_length(b"body"), later, FORGED.to_vec()),
            _ => Reply::Send(with_length(b"real")),
        }
    });
    let c = client();
    let o = origin(&server.url());
    // Each answer is complete, so its connection goes to the pool, where
    // the forged bytes arrive 20 ms later, before the next checkout.
    let settle = || monoio::time::sleep(Duration::from_millis(150));
    let head = c.send(&o, &Request::head("/head")).await.expect("head");
    assert!(head.is_complete());
    drop(head);
    settle().await;
    assert_eq!(c.idle_connections(&o), 1);
    let resp = get(&c, &o, "/204").await.expect("204");
    assert_eq!(resp.status(), 204, "the answer to this request");
    drop(resp);
    settle().await;
    let body = get(&c, &o, "/body")
        .await
        .expect("resp")
        .read_to_end(100)
        .await;
    assert_eq!(&body.expect("body")[..], b"body");
    settle().await;
    for round in 0..3 {
        let body = get(&c, &o, "/real")
            .await
            .expect("resp")
            .read_to_end(100)
            .await;
        assert_eq!(&body.expect("body")[..], b"real", "round {round}");
    }
    assert_eq!(c.pool_discards().counts(), [3, 0], "unsolicited, eof");
    assert_eq!(server.accepted(), 4, "a fresh connection each time");
}
both_drivers!(
    unsolicited_bytes_are_never_read_as_the_next_response: unsolicited_fusion,
    unsolicited_legacy
);

async fn idle_timeout_mid_body() {
    let mut reply = b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n".to_vec();
    reply.extend_from_slice(&[7u8; 10]);
    let server = Server::start(move |_| Reply::SendHang(reply.clone()));
    let c = client_with(short_timeouts());
    let o = origin(&server.url());
    let mut resp = get(&c, &o, "/x").await.expect("head");
    assert_eq!(
        resp.read_chunk().await.expect("prefix").map(<[u8]>::len),
        Some(10)
    );
    let started = Instant::now();
    let err = resp.read_chunk().await.expect_err("stalls");
    assert!(matches!(err, ClientError::IdleTimeout), "{err:?}");
    assert_eq!(err.kind(), "timeout");
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(matches!(resp.read_chunk().await, Err(ClientError::Aborted)));
    drop(resp);
    assert_eq!(c.idle_connections(&o), 0);
}
both_drivers!(idle_timeout_mid_body: idle_timeout_fusion, idle_timeout_legacy);

async fn tls_round_trip() {
    let pki = TestPki::new();
    let server = tls_server(&pki, with_length(b"over tls"));
    let tls = ncro::http::tls::client_config(Some(pki.ca_file.path())).expect("tls config");
    let c = LocalClient::new(
        Resolver::new(Duration::from_secs(60)),
        tls,
        ClientTimeouts::default(),
        PoolOptions::default(),
    );
    // "localhost" goes through the resolver thread and may yield ::1
    // first, where nothing listens: the client must walk on to 127.0.0.1.
    let o = origin(&format!("https://localhost:{}/prefix", server.port()));
    for _ in 0..2 {
        let resp = get(&c, &o, "/nix-cache-info").await.expect("tls response");
        assert_eq!(&resp.read_to_end(100).await.expect("body")[..], b"over tls");
    }
    let heads = server.heads.lock().expect("heads").clone();
    assert_eq!(heads.len(), 2);
    assert!(heads[0].starts_with("GET /prefix/nix-cache-info HTTP/1.1\r\n"));
    assert!(heads[0].contains(&format!("\r\nHost: localhost:{}\r\n", server.port())));
    assert_eq!(
        server.accepted.load(Ordering::SeqCst),
        1,
        "TLS connection reused"
    );
}
both_drivers!(tls_round_trip: tls_fusion, tls_legacy);

// ------------------------------------------------------- single-driver tests

#[test]
fn head_request_has_no_body_and_keeps_connection() {
    let _g = shared();
    let server = Server::start(|head| {
        if head.starts_with("HEAD ") {
            Reply::Send(b"HTTP/1.1 200 OK\r\nContent-Length: 12345\r\n\r\n".to_vec())
        } else {
            Reply::Send(with_length(b"get"))
        }
    });
    on_fusion(async {
        let c = client();
        let o = origin(&server.url());
        let resp = c
            .send(&o, &Request::head("/x.narinfo"))
            .await
            .expect("head");
        assert_eq!(resp.content_length(), Some(12345));
        assert!(resp.is_complete(), "HEAD responses are complete at once");
        assert!(resp.read_to_end(10).await.expect("empty").is_empty());
        let body = get(&c, &o, "/x")
            .await
            .expect("get")
            .read_to_end(10)
            .await
            .expect("body");
        assert_eq!(&body[..], b"get");
    });
    assert_eq!(server.accepted(), 1);
}

#[test]
fn no_content_and_not_modified_have_no_body() {
    let _g = shared();
    let server = Server::start(|head| {
        if head.contains("If-None-Match") {
            Reply::Send(b"HTTP/1.1 304 Not Modified\r\nETag: \"e\"\r\n\r\n".to_vec())
        } else {
            Reply::Send(b"HTTP/1.1 204 No Content\r\n\r\n".to_vec())
        }
    });
    on_fusion(async {
        let c = client();
        let o = origin(&server.url());
        let resp = get(&c, &o, "/a").await.expect("204");
        assert_eq!(resp.status(), 204);
        assert!(resp.read_to_end(0).await.expect("empty").is_empty());
        let headers = [("If-None-Match", &b"\"e\""[..])];
        let req = Request::get("/b").with_headers(&headers);
        let resp = c.send(&o, &req).await.expect("304");
        assert_eq!(resp.status(), 304);
        assert_eq!(resp.header("etag"), Some(&b"\"e\""[..]));
        assert!(resp.is_complete());
    });
    assert_eq!(server.accepted(), 1);
}

#[test]
fn request_head_carries_auth_prefix_and_extra_headers() {
    let _g = shared();
    let server = Server::start(|_| Reply::Send(with_length(b"")));
    let url = format!("{}/cache/sub/", server.url());
    on_fusion(async {
        let c = client();
        let o = Origin::parse(&url, Some(("nix", Some("s3cret")))).expect("origin");
        let headers = [("Range", &b"bytes=0-99"[..])];
        let req = Request::get("/abc.narinfo?x=1").with_headers(&headers);
        c.send(&o, &req).await.expect("resp");
    });
    let head = server.last_head();
    assert!(
        head.starts_with("GET /cache/sub/abc.narinfo?x=1 HTTP/1.1\r\n"),
        "{head}"
    );
    assert!(head.contains(&format!("\r\nHost: {}\r\n", server.addr)));
    assert!(head.contains("\r\nAuthorization: Basic bml4OnMzY3JldA==\r\n"));
    assert!(head.contains(&format!(
        "\r\nUser-Agent: ncro/{}\r\n",
        env!("CARGO_PKG_VERSION")
    )));
    assert!(head.contains("\r\nAccept: */*\r\n"));
    assert!(head.contains("\r\nRange: bytes=0-99\r\n"));
}

#[test]
fn invalid_requests_are_refused_before_sending() {
    let _g = shared();
    let server = Server::start(|_| Reply::Send(with_length(b"")));
    on_fusion(async {
        let c = client();
        let o = origin(&server.url());
        let bad_value = [("Range", &b"x\r\nInjected: 1"[..])];
        let bad_name = [("Bad Name", &b"x"[..])];
        for req in [
            Request::get("no-slash"),
            Request::get("/a b"),
            Request::get("/x").with_headers(&bad_value),
            Request::get("/x").with_headers(&bad_name),
        ] {
            let err = c.send(&o, &req).await.expect_err("refused");
            assert_eq!(err.kind(), "request", "{err:?}");
        }
    });
    assert_eq!(server.accepted(), 0);
}

#[test]
fn connection_refused_is_a_connect_error() {
    let _g = shared();
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    on_fusion(async {
        let c = client();
        let err = get(&c, &origin(&format!("http://127.0.0.1:{port}")), "/")
            .await
            .expect_err("refused");
        assert!(matches!(err, ClientError::Connect(_)), "{err:?}");
        assert_eq!(err.kind(), "connect");
        assert!(err.retry_elsewhere());
    });
}

#[test]
fn connect_timeout_when_the_accept_queue_is_full() {
    use std::os::fd::AsRawFd;
    let _g = shared();
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    // Re-listening with backlog 0 shrinks the accept queue to one entry;
    // once it is full, Linux drops further SYNs and connects hang.
    // SAFETY: plain syscall on a descriptor the listener owns.
    assert_eq!(unsafe { libc::listen(listener.as_raw_fd(), 0) }, 0);
    let addr = listener.local_addr().expect("addr");
    let mut fillers = Vec::new();
    let full =
        (0..16).any(
            |_| match TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
                Ok(s) => {
                    fillers.push(s);
                    false
                }
                Err(_) => true,
            },
        );
    if !full {
        eprintln!("skipping: could not fill the accept queue here");
        return;
    }
    on_fusion(async {
        let timeouts = ClientTimeouts {
            connect: Duration::from_millis(300),
            ..short_timeouts()
        };
        let started = Instant::now();
        let err = get(
            &client_with(timeouts),
            &origin(&format!("http://{addr}")),
            "/",
        )
        .await
        .expect_err("queue full");
        assert!(matches!(err, ClientError::ConnectTimeout), "{err:?}");
        assert!(err.is_timeout());
        assert!(started.elapsed() >= Duration::from_millis(250));
        assert!(started.elapsed() < Duration::from_secs(3));
    });
    drop(fillers);
}

#[test]
fn silent_upstream_hits_first_byte_timeout() {
    let _g = shared();
    let server = Server::start(|_| Reply::SendHang(Vec::new()));
    on_fusion(async {
        let c = client_with(short_timeouts());
        let started = Instant::now();
        let err = get(&c, &origin(&server.url()), "/")
            .await
            .expect_err("times out");
        assert!(matches!(err, ClientError::FirstByteTimeout), "{err:?}");
        assert!(started.elapsed() >= Duration::from_millis(250));
        assert!(started.elapsed() < Duration::from_secs(3));
    });
    assert_eq!(server.accepted(), 1, "a timeout is not retried");
}

#[test]
fn truncated_content_length_body_is_an_error() {
    let _g = shared();
    let mut reply = b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n".to_vec();
    reply.extend_from_slice(&pattern(500_000));
    let server = Server::start(move |_| Reply::SendClose(reply.clone()));
    on_fusion(async {
        let c = client();
        let o = origin(&server.url());
        let err = get(&c, &o, "/")
            .await
            .expect("head")
            .read_to_end(2 << 20)
            .await;
        assert!(matches!(err, Err(ClientError::ConnectionClosed)), "{err:?}");
        for mode in [RelayMode::Copy, RelayMode::Splice] {
            let mut resp = get(&c, &o, "/").await.expect("head");
            let (result, seen) = relay(&mut resp, mode).await;
            match result {
                Err(RelayError::Upstream {
                    error: ClientError::ConnectionClosed,
                    sent,
                }) => {
                    assert_eq!(sent, 500_000, "{mode:?}");
                    assert_eq!(seen.len(), 500_000);
                }
                other => panic!("{mode:?}: truncation not reported: {other:?}"),
            }
            assert!(!resp.is_complete());
        }
        assert_eq!(c.idle_connections(&o), 0);
    });
}

#[test]
fn relay_never_forwards_bytes_past_the_body() {
    let _g = shared();
    let body = pattern((1 << 20) + 333);
    let mut reply = with_length(&body);
    reply.extend_from_slice(b"JUNK AFTER THE BODY");
    let server = Server::start(move |_| Reply::Send(reply.clone()));
    on_fusion(async {
        let c = client();
        let o = origin(&server.url());
        for mode in [RelayMode::Copy, RelayMode::Splice] {
            let mut resp = get(&c, &o, "/").await.expect("head");
            let (result, seen) = relay(&mut resp, mode).await;
            assert_eq!(result.expect("relay"), body.len() as u64, "{mode:?}");
            assert!(seen == body, "{mode:?} forwarded bytes past the body");
            // The junk is still unread in the socket: the connection is
            // discarded at the next checkout, never read as an answer.
            drop(resp);
        }
        let next = get(&c, &o, "/").await.expect("a fresh connection");
        assert_eq!(next.status(), 200);
        assert!(c.pool_discards().counts()[0] >= 1, "the junk was seen");
    });
    assert_eq!(server.accepted(), 3, "no connection with junk was reused");
}

#[test]
fn truncated_chunked_body_is_an_error() {
    let _g = shared();
    let mut reply = with_chunked(&pattern(10_000), 1000);
    reply.truncate(reply.len() - 30);
    let server = Server::start(move |_| Reply::SendClose(reply.clone()));
    on_fusion(async {
        let c = client();
        let o = origin(&server.url());
        let err = get(&c, &o, "/")
            .await
            .expect("head")
            .read_to_end(1 << 20)
            .await;
        assert!(matches!(err, Err(ClientError::ConnectionClosed)), "{err:?}");
        let mut resp = get(&c, &o, "/").await.expect("head");
        let (result, _) = relay(&mut resp, RelayMode::Copy).await;
        assert!(
            matches!(result, Err(RelayError::Upstream { .. })),
            "{result:?}"
        );
    });
}

#[test]
fn bad_chunked_framing_aborts_the_relay() {
    let _g = shared();
    let mut reply = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    reply.extend_from_slice(b"5\r\nhello\r\nZZ\r\nworld\r\n0\r\n\r\n");
    let server = Server::start(move |_| Reply::Send(reply.clone()));
    on_fusion(async {
        let c = client();
        let mut resp = get(&c, &origin(&server.url()), "/").await.expect("head");
        let (result, seen) = relay(&mut resp, RelayMode::Copy).await;
        match result {
            Err(RelayError::Upstream {
                error: ClientError::Chunked(_),
                ..
            }) => {}
            other => panic!("framing error not reported: {other:?}"),
        }
        assert!(
            !seen.windows(2).any(|w| w == b"ZZ"),
            "garbage never forwarded"
        );
    });
}

#[test]
fn read_to_end_enforces_the_limit() {
    let _g = shared();
    let server = Server::start(|head| {
        if head.starts_with("GET /chunked") {
            Reply::Send(with_chunked(&[1u8; 5000], 100))
        } else {
            Reply::Send(with_length(&[1u8; 5000]))
        }
    });
    on_fusion(async {
        let c = client();
        let o = origin(&server.url());
        for path in ["/fixed", "/chunked"] {
            let err = get(&c, &o, path)
                .await
                .expect("head")
                .read_to_end(4999)
                .await;
            assert!(
                matches!(err, Err(ClientError::BodyTooLarge)),
                "{path}: {err:?}"
            );
            let ok = get(&c, &o, path)
                .await
                .expect("head")
                .read_to_end(5000)
                .await;
            assert_eq!(ok.expect("fits").len(), 5000);
        }
    });
}

#[test]
fn response_head_size_is_bounded() {
    let _g = shared();
    let big = format!("HTTP/1.1 200 OK\r\nX-Big: {}\r\n", "a".repeat(70_000));
    let server = Server::start(move |_| Reply::SendHang(big.clone().into_bytes()));
    on_fusion(async {
        let err = get(&client(), &origin(&server.url()), "/")
            .await
            .expect_err("too big");
        assert!(matches!(err, ClientError::HeadTooLarge), "{err:?}");
        assert_eq!(err.kind(), "protocol");
    });
}

#[test]
fn interim_1xx_responses_are_skipped() {
    let _g = shared();
    let mut reply =
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: x\r\n\r\n".to_vec();
    reply.extend_from_slice(&with_length(b"final"));
    let server = Server::start(move |_| Reply::Send(reply.clone()));
    on_fusion(async {
        let resp = get(&client(), &origin(&server.url()), "/")
            .await
            .expect("resp");
        assert_eq!(resp.status(), 200);
        assert_eq!(&resp.read_to_end(10).await.expect("body")[..], b"final");
    });
}

#[test]
fn connection_close_and_until_close_bodies_are_not_pooled() {
    let _g = shared();
    let server = Server::start(|head| {
        if head.starts_with("GET /eof") {
            Reply::SendClose(b"HTTP/1.1 200 OK\r\n\r\nuntil eof".to_vec())
        } else {
            Reply::Send(
                b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok".to_vec(),
            )
        }
    });
    on_fusion(async {
        let c = client();
        let o = origin(&server.url());
        let body = get(&c, &o, "/eof")
            .await
            .expect("resp")
            .read_to_end(100)
            .await
            .expect("body");
        assert_eq!(&body[..], b"until eof");
        assert_eq!(c.idle_connections(&o), 0);
        let body = get(&c, &o, "/close")
            .await
            .expect("resp")
            .read_to_end(100)
            .await
            .expect("body");
        assert_eq!(&body[..], b"ok");
        assert_eq!(c.idle_connections(&o), 0);
    });
}

#[test]
fn dropped_body_closes_the_connection() {
    let _g = shared();
    let body = pattern(2 << 20);
    let reply = with_length(&body);
    let server = Server::start(move |_| Reply::Send(reply.clone()));
    on_fusion(async {
        let c = client();
        let o = origin(&server.url());
        let mut resp = get(&c, &o, "/").await.expect("head");
        assert!(resp.read_chunk().await.expect("chunk").is_some());
        drop(resp);
        assert_eq!(c.idle_connections(&o), 0);
        get(&c, &o, "/")
            .await
            .expect("second")
            .read_to_end(4 << 20)
            .await
            .expect("body");
    });
    assert_eq!(
        server.accepted(),
        2,
        "the abandoned connection was not reused"
    );
}

/// Runs the calling test alone in a child process of this test binary
/// (`--exact <name>`), so that descriptors opened by tests of other modules
/// running meanwhile cannot disturb a count of the process's descriptors.
/// Returns true in the child, where the test's body runs; in the parent it
/// waits for the child and fails if the child's test failed.
fn alone_in_a_child(name: &str) -> bool {
    const CHILD: &str = "NCRO_CLIENT_TEST_CHILD";
    if std::env::var_os(CHILD).is_some() {
        return true;
    }
    let exe = std::env::current_exe().expect("test binary path");
    let out = std::process::Command::new(exe)
        .args(["--exact", name, "--nocapture", "--test-threads=1"])
        .env(CHILD, "1")
        .output()
        .expect("run the test in a child process");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("1 passed"),
        "{name} in a child process failed:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    false
}

#[test]
fn cancelled_requests_leak_no_descriptors() {
    if !alone_in_a_child("client::cancelled_requests_leak_no_descriptors") {
        return;
    }
    let _g = FD_GUARD.write().unwrap_or_else(|e| e.into_inner());
    let big = with_length(&pattern(1 << 20));
    let server = Server::start(move |head| {
        if head.starts_with("GET /hang") {
            Reply::SendHang(Vec::new())
        } else {
            Reply::Send(big.clone())
        }
    });
    on_fusion(async {
        let c = client();
        let o = origin(&server.url());
        // Warm up once so lazily created runtime/resolver fds are counted.
        get(&c, &o, "/")
            .await
            .expect("warm")
            .read_to_end(2 << 20)
            .await
            .expect("body");
        drop(c);
        server.wait_no_live_connections().await;
        let before = open_fds();
        let c = client();
        for i in 0..50 {
            if i % 2 == 0 {
                // Race loser mid-head: the send future is dropped.
                let r = monoio::time::timeout(Duration::from_millis(5), get(&c, &o, "/hang")).await;
                assert!(r.is_err(), "hang answered");
            } else {
                // Race loser mid-body: the response is dropped.
                let mut resp = get(&c, &o, "/").await.expect("head");
                let _ = resp.read_chunk().await.expect("chunk");
            }
        }
        assert_eq!(c.idle_connections(&o), 0);
        drop(c);
        server.wait_no_live_connections().await;
        // The server side is closed; give the client-side closes a moment too.
        monoio::time::sleep(Duration::from_millis(20)).await;
        let after = open_fds();
        assert_eq!(before, after, "descriptor leak");
    });
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .count()
}

#[test]
fn ipv6_loopback_literal() {
    let _g = shared();
    let Ok(server) = Server::start_on("[::1]:0", |_| Reply::Send(with_length(b"v6"))) else {
        eprintln!("skipping: no IPv6 loopback here");
        return;
    };
    let url = format!("http://[::1]:{}/p/", server.addr.port());
    on_fusion(async {
        let resp = get(&client(), &origin(&url), "/x").await.expect("v6");
        assert_eq!(&resp.read_to_end(10).await.expect("body")[..], b"v6");
    });
    let head = server.last_head();
    assert!(head.starts_with("GET /p/x HTTP/1.1\r\n"));
    assert!(head.contains(&format!("\r\nHost: [::1]:{}\r\n", server.addr.port())));
}

#[test]
fn tls_without_the_ca_is_rejected() {
    let _g = shared();
    let pki = TestPki::new();
    let server = tls_server(&pki, with_length(b"x"));
    on_fusion(async {
        let o = origin(&format!("https://127.0.0.1:{}", server.port()));
        let err = get(&client(), &o, "/").await.expect_err("unknown issuer");
        assert!(matches!(err, ClientError::Tls(_)), "{err:?}");
        assert_eq!(err.kind(), "tls");
    });
}

#[test]
fn method_enum_is_plain() {
    assert_ne!(Method::Get, Method::Head);
    assert_eq!(Request::head("/x").method, Method::Head);
}

// ---------------------------------------------------------------- TLS server

struct TestPki {
    ca_file: tempfile::NamedTempFile,
    server_config: Arc<rustls::ServerConfig>,
}

impl TestPki {
    fn new() -> TestPki {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
        let ca_key = KeyPair::generate().expect("ca key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).expect("ca cert");
        let leaf_key = KeyPair::generate().expect("leaf key");
        let leaf = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
            .expect("leaf params")
            .signed_by(&leaf_key, &ca, &ca_key)
            .expect("leaf cert");
        let mut ca_file = tempfile::NamedTempFile::new().expect("temp");
        ca_file.write_all(ca.pem().as_bytes()).expect("write ca");
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into());
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let server_config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(vec![leaf.der().clone()], key)
            .expect("server config");
        TestPki {
            ca_file,
            server_config: Arc::new(server_config),
        }
    }
}

struct TlsServer {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    heads: Arc<Mutex<Vec<String>>>,
}

impl TlsServer {
    fn port(&self) -> u16 {
        self.addr.port()
    }
}

/// Keep-alive TLS server answering every request with `reply`.
fn tls_server(pki: &TestPki, reply: Vec<u8>) -> TlsServer {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let server = TlsServer {
        addr: listener.local_addr().expect("addr"),
        accepted: Arc::default(),
        heads: Arc::default(),
    };
    let (config, accepted, heads) = (
        pki.server_config.clone(),
        server.accepted.clone(),
        server.heads.clone(),
    );
    thread::spawn(move || {
        for tcp in listener.incoming() {
            let Ok(tcp) = tcp else { break };
            accepted.fetch_add(1, Ordering::SeqCst);
            let (config, heads, reply) = (config.clone(), heads.clone(), reply.clone());
            thread::spawn(move || {
                let _ = tcp.set_read_timeout(Some(Duration::from_secs(10)));
                let Ok(conn) = rustls::ServerConnection::new(config) else {
                    return;
                };
                let mut tls = rustls::StreamOwned::new(conn, tcp);
                let mut pending = Vec::new();
                while let Some(head) = read_tls_head(&mut tls, &mut pending) {
                    heads.lock().expect("heads").push(head);
                    if tls.write_all(&reply).and_then(|()| tls.flush()).is_err() {
                        return;
                    }
                }
            });
        }
    });
    server
}

fn read_tls_head(tls: &mut impl Read, pending: &mut Vec<u8>) -> Option<String> {
    loop {
        if let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
            let head: Vec<u8> = pending.drain(..end + 4).collect();
            return Some(String::from_utf8_lossy(&head).into_owned());
        }
        let mut chunk = [0u8; 4096];
        match tls.read(&mut chunk) {
            Ok(0) | Err(_) => return None,
            Ok(n) => pending.extend_from_slice(&chunk[..n]),
        }
    }
}

// ------------------------------------------------------------ measurements

/// `cargo test --test it client::relay_throughput -- --ignored --nocapture`
#[test]
#[ignore = "measurement, not a check"]
fn relay_throughput() {
    let _g = FD_GUARD.write().unwrap_or_else(|e| e.into_inner());
    const SIZE: usize = 64 << 20;
    let reply = Arc::new(with_length(&pattern(SIZE)));
    let server = Server::start(move |_| Reply::Send(reply.to_vec()));
    let url = server.url();
    type Runner = fn(std::pin::Pin<Box<dyn Future<Output = ()>>>);
    let drivers: [(&str, Runner); 2] = [("fusion", |f| on_fusion(f)), ("legacy", |f| on_legacy(f))];
    for (name, run) in drivers {
        let url = url.clone();
        run(Box::pin(async move {
            let io_uring = !monoio::utils::is_legacy();
            let c = client();
            let o = origin(&url);
            for mode in [
                RelayMode::Copy,
                RelayMode::Splice,
                RelayMode::Copy,
                RelayMode::Splice,
            ] {
                let mut resp = get(&c, &o, "/").await.expect("head");
                let (addr, handle) = counting_sink();
                let mut dst = monoio::net::TcpStream::connect_addr(addr)
                    .await
                    .expect("sink");
                let started = Instant::now();
                let sent = resp.relay_to(&mut dst, mode).await.expect("relay");
                let secs = started.elapsed().as_secs_f64();
                monoio::io::AsyncWriteRent::shutdown(&mut dst)
                    .await
                    .expect("shutdown");
                drop(dst);
                assert_eq!(handle.join().expect("sink"), SIZE);
                assert_eq!(sent, SIZE as u64);
                println!(
                    "driver={name} io_uring={io_uring} mode={mode:?}: {:.0} MB/s",
                    SIZE as f64 / secs / 1e6
                );
            }
        }));
    }
}

fn counting_sink() -> (SocketAddr, JoinHandle<usize>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind sink");
    let addr = listener.local_addr().expect("addr");
    let handle = thread::spawn(move || {
        let (mut conn, _) = listener.accept().expect("accept");
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0;
        while let Ok(n) = conn.read(&mut buf) {
            if n == 0 {
                break;
            }
            total += n;
        }
        total
    });
    (addr, handle)
}
