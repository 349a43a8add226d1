//! Workers and I/O drivers: SO_REUSEPORT spreads connections over the
//! workers, both drivers serve, and a second ncro cannot share the port.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::{cache_info_body, config, fake_with, metric, start, start_with_env};
use crate::fake::{TestKey, TestPath};
use crate::harness::{http_get, HttpConn};

#[test]
fn connections_spread_over_both_workers() {
    let n = start(&[], "[server]\nworkers = 2\n");
    // Each connection is accepted by one of the two SO_REUSEPORT listeners,
    // picked by a hash of its address pair: 40 fresh connections all
    // landing on one worker has odds of 2^-39.
    for i in 0..40 {
        let r = http_get(n.addr(), "/nix-cache-info").unwrap();
        assert_eq!(r.status, 200, "connection {i}");
    }
    let page = n.get("/metrics").text();
    let per_worker: Vec<u64> = (0..2)
        .map(|w| {
            metric(
                &page,
                &format!("ncro_worker_connections_total{{worker=\"{w}\"}}"),
            )
            .unwrap_or_else(|| panic!("no counter for worker {w}:\n{page}"))
        })
        .collect();
    assert!(per_worker.iter().all(|&c| c > 0), "{per_worker:?}");
    assert!(per_worker.iter().sum::<u64>() >= 41, "{per_worker:?}");
    assert!(
        metric(&page, "ncro_worker_connections_total{worker=\"2\"}").is_none(),
        "only two workers were asked for:\n{page}"
    );
}

/// The driver a FusionDriver worker picks in this environment.
fn native_driver() -> &'static str {
    if monoio::utils::detect_uring() {
        "io_uring"
    } else {
        "epoll"
    }
}

/// Cache info, a narinfo hit and miss, and a NAR through ncro on the driver
/// `env` selects; /health, /metrics and the startup line name `driver`.
fn smoke_on_driver(env: &[(&str, &str)], driver: &str) {
    let key = TestKey::generate("drv-1");
    let p = TestPath::new("driver-smoke");
    let up = fake_with(std::slice::from_ref(&p), &key);
    let n = start_with_env(
        &[(&up.url(), &key.public_key())],
        "[server]\nworkers = 2\n",
        env,
    );
    let mut c = HttpConn::connect(n.addr()).unwrap();
    assert_eq!(
        c.get("/nix-cache-info").unwrap().text(),
        cache_info_body(30)
    );
    let r = c.get(&p.narinfo_request_path()).unwrap();
    assert_eq!(r.status, 200);
    assert!(r.text().contains(&p.store_path()), "{}", r.text());
    assert_eq!(c.get(&p.nar_request_path()).unwrap().body, p.nar);
    let miss = format!("/{}.narinfo", crate::fake::random_hash());
    assert_eq!(c.get(&miss).unwrap().status, 404);

    let health: serde_json::Value =
        serde_json::from_slice(&c.get("/health").unwrap().body).expect("/health is JSON");
    assert_eq!(health["driver"], driver, "{health}");
    assert_eq!(health["workers"], 2, "{health}");
    let page = c.get("/metrics").unwrap().text();
    for w in 0..2 {
        let sample = format!("ncro_worker_driver_info{{worker=\"{w}\",driver=\"{driver}\"}}");
        assert_eq!(metric(&page, &sample), Some(1), "{sample} in\n{page}");
    }
    let line = n
        .stdout()
        .lines()
        .find(|l| l.contains("ncro listening"))
        .map(str::to_owned)
        .unwrap_or_else(|| panic!("no startup line\n{}", n.logs()));
    assert!(
        line.contains(&format!("driver=\"{driver}\""))
            || line.contains(&format!("driver={driver}")),
        "{line}"
    );
}

#[test]
fn default_driver_serves() {
    smoke_on_driver(&[], native_driver());
}

#[test]
fn legacy_epoll_driver_serves() {
    smoke_on_driver(&[("MONOIO_FORCE_LEGACY_DRIVER", "1")], "epoll");
}

#[test]
fn second_instance_on_the_same_port_is_refused() {
    let first = start(&[], "");
    let db = tempfile::tempdir().unwrap();
    let listen = format!("[server]\nlisten = \"{}\"\n", first.addr());
    let path = db.path().join("second.toml");
    std::fs::write(&path, config(db.path(), &[], &listen)).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ncro"));
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("NCRO_") {
            cmd.env_remove(k);
        }
    }
    let mut child = cmd
        .arg("serve")
        .arg("--config")
        .arg(&path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn second ncro");
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill(); // only our own child; reaped just below
            let _ = child.wait();
            panic!("the second ncro is still running: it shares the port");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!status.success(), "{status}\n{text}");
    // It waited for the port a few seconds (a process that has just exited
    // may hold it for a moment), said so once, then refused.
    assert_eq!(
        text.matches("address in use; retrying").count(),
        1,
        "{text}"
    );
    assert!(text.contains("already in use"), "{text}");
    assert!(text.contains(&first.addr().to_string()), "{text}");
    // The first one never noticed.
    for _ in 0..5 {
        assert_eq!(first.get("/nix-cache-info").text(), cache_info_body(30));
    }
}
