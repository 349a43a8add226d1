use super::*;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};

/// How a tiny loopback server answers `/nix-cache-info`.
#[derive(Clone, Copy)]
enum Serve {
    /// This status to both HEAD and GET.
    Both(u16),
    /// HEAD refused with this status, GET answered 200 (Harmonia-like).
    HeadRefused(u16),
    /// Never answer.
    Hang,
}

/// Serves `mode` on 127.0.0.1 until the test process ends; counts requests.
fn server(mode: Serve) -> (String, Arc<std::sync::atomic::AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = count.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let seen = seen.clone();
            std::thread::spawn(move || answer(conn, mode, &seen));
        }
    });
    (url, count)
}

fn answer(mut conn: TcpStream, mode: Serve, seen: &std::sync::atomic::AtomicUsize) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head: Vec<u8> = buf.drain(..end + 4).collect();
            seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let is_head = head.starts_with(b"HEAD ");
            let status = match mode {
                Serve::Both(s) => s,
                Serve::HeadRefused(s) if is_head => s,
                Serve::HeadRefused(_) => 200,
                Serve::Hang => {
                    std::thread::sleep(Duration::from_secs(3));
                    return;
                }
            };
            let body = if is_head {
                ""
            } else {
                "StoreDir: /nix/store\n"
            };
            let reply = format!(
                "HTTP/1.1 {status} X\r\nContent-Length: {}\r\n\r\n{body}",
                if is_head { 21 } else { body.len() }
            );
            if conn.write_all(reply.as_bytes()).is_err() {
                return;
            }
        }
        match conn.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

fn run_probe(url: &str, use_get: bool, timeout: Duration) -> Probed {
    let origin = Origin::parse(url, None).expect("origin");
    let tls = crate::http::tls::client_config_with(&[]).expect("tls");
    monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
        .enable_timer()
        .build()
        .expect("runtime")
        .block_on(async {
            let client = LocalClient::new(
                Resolver::new(Duration::from_secs(60)),
                tls,
                ClientTimeouts::default(),
                Default::default(),
            );
            probe(&client, &origin, 0, use_get, timeout).await
        })
}

const T: Duration = Duration::from_secs(2);

#[test]
fn a_2xx_head_is_up_with_cache_info() {
    let (url, count) = server(Serve::Both(200));
    let p = run_probe(&url, false, T);
    assert!(matches!(
        p.result,
        ProbeResult::Up {
            cache_info: true,
            ..
        }
    ));
    assert!(!p.needs_get);
    assert_eq!(count.load(std::sync::atomic::Ordering::SeqCst), 1);
}

#[test]
fn a_refused_head_falls_back_to_get_and_is_remembered() {
    let (url, count) = server(Serve::HeadRefused(405));
    let p = run_probe(&url, false, T);
    assert!(matches!(
        p.result,
        ProbeResult::Up {
            cache_info: true,
            ..
        }
    ));
    assert!(p.needs_get, "next probes go straight to GET");
    let p = run_probe(&url, true, T);
    assert!(matches!(
        p.result,
        ProbeResult::Up {
            cache_info: true,
            ..
        }
    ));
    assert_eq!(count.load(std::sync::atomic::Ordering::SeqCst), 3);
}

#[test]
fn a_missing_cache_info_is_alive_but_flagged() {
    let (url, _) = server(Serve::Both(404));
    let p = run_probe(&url, false, T);
    assert!(matches!(
        p.result,
        ProbeResult::Up {
            cache_info: false,
            ..
        }
    ));
}

#[test]
fn errors_statuses_refusals_and_silence_are_failures() {
    let (url, _) = server(Serve::Both(503));
    assert_eq!(run_probe(&url, false, T).result, ProbeResult::Failed);
    let (url, _) = server(Serve::Both(401));
    assert_eq!(run_probe(&url, false, T).result, ProbeResult::Failed);
    // A port nobody listens on: connection refused.
    let free = TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}", free.local_addr().expect("addr"));
    drop(free);
    assert_eq!(run_probe(&url, false, T).result, ProbeResult::Failed);
    let (url, _) = server(Serve::Hang);
    let started = Instant::now();
    let p = run_probe(&url, false, Duration::from_millis(150));
    assert_eq!(p.result, ProbeResult::Failed);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "bounded by probe_timeout"
    );
}

#[test]
fn restore_maps_rows_by_url_and_ignores_unknown_ones() {
    let cfg = crate::config::Config::from_toml(
        "[[upstreams]]\nurl = \"http://127.0.0.1:1\"\npriority = 1\n\
         [[upstreams]]\nurl = \"http://127.0.0.1:2\"\npriority = 2\n",
        crate::config::Source::Embedded,
        "t",
        &crate::config::env::MapEnv::new(&[]),
    )
    .expect("config");
    let set = UpstreamSet::from_config(&cfg).expect("set");
    let row = |url: &str, ema, fails| HealthRow {
        url: url.into(),
        ema_latency: ema,
        consecutive_fails: fails,
        total_queries: 3,
    };
    let now = Instant::now();
    let table = restore(
        &set,
        &[
            row("http://127.0.0.1:2", 7.5, 12),
            row("http://gone", 1.0, 0),
        ],
        now,
    );
    assert_eq!(table[0], UpstreamHealth::new(now));
    assert_eq!(table[1].state(), State::Down);
    assert_eq!(table[1].ema_ms, Some(7.5));
}

/// One configured upstream (`http://127.0.0.1:1`), two discovery slots.
fn discovery_prober() -> (Arc<Upstreams>, Arc<Routing>, Prober, LoopState) {
    let cfg = crate::config::Config::from_toml(
        "[[upstreams]]\nurl = \"http://127.0.0.1:1\"\npriority = 10\n\
         [discovery]\nenabled = true\nmax_upstreams = 2\n",
        crate::config::Source::Embedded,
        "t",
        &crate::config::env::MapEnv::new(&[]),
    )
    .expect("config");
    let mut set = UpstreamSet::from_config(&cfg).expect("set");
    set.reserve_discovered(2);
    let ups = Arc::new(Upstreams::new(set));
    let tls = crate::http::tls::client_config_with(&[]).expect("tls");
    let resolver = Resolver::new(Duration::from_secs(60));
    let (routing, mut prober) = setup(&cfg, ups.clone(), &[], None, resolver, tls);
    let _tx = prober.discovery_sender();
    let st = LoopState::new(1, Duration::from_secs(30), false, true);
    (ups, routing, prober, st)
}

fn discovered(urls: &[&str]) -> Discovered {
    Discovered {
        priority: 20,
        found: urls
            .iter()
            .map(|u| crate::control::discovery::Found {
                url: (*u).into(),
                instance: "c._nix-serve._tcp.local.".into(),
            })
            .collect(),
    }
}

#[test]
fn discovered_urls_join_and_leave_the_set_and_the_health_snapshot() {
    let (ups, routing, mut prober, mut st) = discovery_prober();
    let t0 = Instant::now();
    let twin = "http://127.0.0.1:1";
    assert!(prober.reconcile(discovered(&["http://10.0.0.9:80", twin]), &mut st, t0));
    let labels: Vec<_> = ups
        .load()
        .live_urls()
        .into_iter()
        .map(|(i, u)| (i, u.to_string()))
        .collect();
    assert_eq!(labels, [(0, twin.into()), (1, "http://10.0.0.9:80".into())]);
    assert_eq!(
        ups.load().get(0).map(|u| u.priority),
        Some(10),
        "configured one kept"
    );
    assert_eq!(routing.snapshot().routable(), &[0, 1]);
    assert!(
        !prober.reconcile(discovered(&["http://10.0.0.9:80"]), &mut st, t0),
        "no change"
    );

    assert!(prober.reconcile(discovered(&[]), &mut st, t0));
    assert_eq!((ups.load().len(), ups.load().live_len()), (2, 1));
    assert_eq!(routing.snapshot().routable(), &[0]);
    assert!(routing.route_is_down(&ups, "http://10.0.0.9:80"));

    assert!(prober.reconcile(discovered(&["http://10.0.0.9:80"]), &mut st, t0));
    assert_eq!(
        ups.load().index_of("http://10.0.0.9:80"),
        Some(1),
        "same slot again"
    );
    assert_eq!(routing.snapshot().routable(), &[0, 1]);
}

#[test]
fn a_probe_answer_from_a_slots_earlier_life_is_ignored() {
    let (ups, _routing, mut prober, mut st) = discovery_prober();
    let t0 = Instant::now();
    prober.reconcile(discovered(&["http://10.0.0.9:80"]), &mut st, t0);
    let life = st.life[1];
    prober.reconcile(discovered(&[]), &mut st, t0);
    prober.reconcile(discovered(&["http://10.0.0.9:80"]), &mut st, t0);
    assert_ne!(st.life[1], life);
    let late = Probed {
        upstream: 1,
        result: ProbeResult::Failed,
        needs_get: false,
    };
    prober.handle(Event::Probed(life, late), &mut st, t0);
    assert_eq!(
        prober.table[1].consecutive_fails, 0,
        "the new life starts clean"
    );
    assert!(ups.load().is_live(1));
}

#[test]
fn the_route_table_follows_slot_assignments_before_they_are_published() {
    use crate::proto::store_path::StoreHash;
    use crate::route::{Cached, RouteEntry, RouteTable};
    let (ups, _routing, mut prober, mut st) = discovery_prober();
    let set = ups.load();
    let urls = set.list.iter().map(|u| u.url.clone()).collect();
    let routes = Arc::new(RouteTable::new(100, urls, None).with_slot_capacity(set.capacity()));
    prober.follow_routes(routes.clone());
    let t0 = Instant::now();
    let route = |url: &str| {
        Arc::new(RouteEntry {
            upstream: url.into(),
            narinfo: bytes::Bytes::from_static(b"x"),
            nar_url: "".into(),
            nar_hash: "".into(),
            nar_size: 1,
            expires_at: 100,
            verified_at: 1,
            latency_ms: 1.0,
        })
    };
    let h = StoreHash::parse(b"0mdqa9w1p6cmli6976v4wi0sw9r4p5pr").unwrap();
    let (a, b, c) = (
        "http://10.0.0.1:80",
        "http://10.0.0.2:80",
        "http://10.0.0.3:80",
    );
    prober.reconcile(discovered(&[a, b]), &mut st, t0);
    routes.insert(h, route(a));
    assert!(
        matches!(routes.get(&h, 0), Some(Cached::Hit(hit)) if hit.upstream == 1),
        "a discovered upstream's route is kept"
    );
    // a goes; c then takes a's slot (every reserved slot has been used).
    prober.reconcile(discovered(&[b]), &mut st, t0);
    assert!(routes.get(&h, 0).is_some(), "retired, not reused: kept");
    prober.reconcile(discovered(&[b, c]), &mut st, t0);
    assert_eq!(ups.load().index_of(c), Some(1), "slot 1 recycled");
    assert!(routes.get(&h, 0).is_none(), "a's route is not c's");
}
