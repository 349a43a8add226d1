//! `/metrics` through the real binary: exact counter values after known
//! traffic, every ncro 2.2 metric with its type, and every metric the
//! Grafana dashboard queries.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::time::{Duration, Instant};

use crate::fake::{random_bytes, random_hash, FakeUpstream, Fault, PathMatch, TestKey, TestPath};
use crate::harness::{test_config, NcroProcess};

/// ncro 2.2's metrics (reference §9): name and type.
const NCRO22: [(&str, &str); 12] = [
    ("ncro_narinfo_cache_hits_total", "counter"),
    ("ncro_narinfo_cache_misses_total", "counter"),
    ("ncro_narinfo_memory_negative_hits_total", "counter"),
    ("ncro_narinfo_singleflight_waiters_total", "counter"),
    ("ncro_narinfo_requests_total", "counter"),
    ("ncro_nar_requests_total", "counter"),
    ("ncro_narinfo_upstream_attempts_total", "counter"),
    ("ncro_narinfo_upstream_attempts_per_resolve", "histogram"),
    ("ncro_narinfo_race_wait_seconds", "histogram"),
    ("ncro_upstream_race_wins_total", "counter"),
    ("ncro_upstream_latency_seconds", "histogram"),
    ("ncro_route_entries", "gauge"),
];

/// Label pairs sorted by name.
type Labels = Vec<(String, String)>;

/// One parsed text exposition.
pub struct Scrape {
    pub text: String,
    /// Family name -> type from `# TYPE` lines.
    pub types: HashMap<String, String>,
    samples: Vec<(String, Labels, f64)>,
}

impl Scrape {
    pub fn parse(text: &str) -> Scrape {
        let mut types = HashMap::new();
        let mut samples = Vec::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("TYPE line has a type");
                types.insert(name.to_owned(), kind.to_owned());
            } else if !line.starts_with('#') && !line.is_empty() {
                samples.push(parse_sample(line));
            }
        }
        Scrape {
            text: text.to_owned(),
            types,
            samples,
        }
    }

    /// The sample with exactly this name and label set (any order).
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let mut want: Labels = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        want.sort();
        self.samples
            .iter()
            .find(|(n, l, _)| n == name && *l == want)
            .map(|(_, _, v)| *v)
    }

    /// Like [`Self::get`] but panics with the whole scrape when missing.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels)
            .unwrap_or_else(|| panic!("no sample {name}{labels:?} in\n{}", self.text))
    }

    /// The sum of every sample of `name`, whatever its labels (0 if none).
    pub fn sum(&self, name: &str) -> f64 {
        self.samples
            .iter()
            .filter(|(n, _, _)| n == name)
            .map(|(_, _, v)| v)
            .sum()
    }

    /// Whether `name` is a family here, or a histogram's `_bucket`, `_sum`
    /// or `_count` series.
    pub fn has_metric(&self, name: &str) -> bool {
        if self.types.contains_key(name) {
            return true;
        }
        ["_bucket", "_sum", "_count"].iter().any(|s| {
            name.strip_suffix(s)
                .is_some_and(|base| self.types.get(base).is_some_and(|t| t == "histogram"))
        })
    }
}

/// `name{k="v",...} value` or `name value`.
fn parse_sample(line: &str) -> (String, Labels, f64) {
    let (series, value) = line.rsplit_once(' ').expect("sample has a value");
    let value: f64 = value
        .parse()
        .unwrap_or_else(|_| panic!("bad value: {line}"));
    let Some((name, rest)) = series.split_once('{') else {
        return (series.to_owned(), Vec::new(), value);
    };
    let mut labels = Vec::new();
    let mut chars = rest.trim_end_matches('}').chars().peekable();
    while chars.peek().is_some() {
        let key: String = chars.by_ref().take_while(|&c| c != '=').collect();
        assert_eq!(chars.next(), Some('"'), "label value quoted: {line}");
        let mut val = String::new();
        while let Some(c) = chars.next() {
            match c {
                '\\' => val.push(chars.next().expect("escape completes")),
                '"' => break,
                c => val.push(c),
            }
        }
        if chars.peek() == Some(&',') {
            chars.next();
        }
        labels.push((key.trim().to_owned(), val));
    }
    labels.sort();
    (name.to_owned(), labels, value)
}

pub fn scrape(ncro: &NcroProcess) -> Scrape {
    let r = ncro.get("/metrics");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("text/plain; version=0.0.4"));
    Scrape::parse(&r.text())
}

/// Polls `/metrics` until `ready` holds (for work ncro does asynchronously:
/// gossip, index refreshes); panics with the last scrape and ncro's logs
/// after `timeout`.
pub fn scrape_until(
    ncro: &NcroProcess,
    what: &str,
    timeout: std::time::Duration,
    ready: impl Fn(&Scrape) -> bool,
) -> Scrape {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let m = scrape(ncro);
        if ready(&m) {
            return m;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}\n{}\n{}",
            m.text,
            ncro.logs()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Two upstreams in one tier: `a` has the paths (slowly), `b` answers 500
/// at once for them and 404 otherwise.
struct Setup {
    ncro: NcroProcess,
    a: FakeUpstream,
    b: FakeUpstream,
    paths: Vec<TestPath>,
    _dir: tempfile::TempDir,
}

/// `a`'s narinfo delay: long enough that `b`'s 500 is always reported
/// before `a` wins (an attempt still running when another upstream wins is
/// cancelled and not counted), even on a loaded machine.
const A_DELAY: Duration = Duration::from_millis(250);

fn setup(workers: usize, unavailable_hash: &str) -> Setup {
    let key = TestKey::generate("metrics-test-1");
    let paths: Vec<TestPath> = (0..4)
        .map(|i| TestPath::with_contents(&format!("p{i}"), &random_bytes(10_000 + i * 7_777)))
        .collect();
    let mut a = FakeUpstream::builder().cache_info(40);
    for p in &paths {
        a = a.path(p, &key);
    }
    let a = a
        .rule(PathMatch::suffix(".narinfo"), Fault::Delay(A_DELAY))
        .start();
    let mut b = FakeUpstream::builder().cache_info(40);
    for hash in paths
        .iter()
        .map(|p| p.hash.as_str())
        .chain([unavailable_hash])
    {
        b = b.rule(format!("/{hash}.narinfo"), Fault::Status(500));
    }
    let b = b.start();
    let dir = tempfile::tempdir().expect("temp dir");
    let pk = key.public_key();
    let cfg = test_config(
        "127.0.0.1:0",
        &[(&a.url(), 10, &pk), (&b.url(), 10, "")],
        &dir.path().join("routes.db"),
    )
    .replace("[server]\n", &format!("[server]\nworkers = {workers}\n"));
    Setup {
        ncro: NcroProcess::start(&cfg),
        a,
        b,
        paths,
        _dir: dir,
    }
}

#[test]
fn exact_values_after_known_traffic() {
    let unavailable = random_hash();
    let s = setup(2, &unavailable);
    let ncro = &s.ncro;
    let get_status = |path: &str| ncro.get(path).status;

    for _ in 0..3 {
        assert_eq!(get_status("/nix-cache-info"), 200);
    }
    // 4 misses resolved by a (b answers 500 first), then 5 hits.
    for p in &s.paths {
        assert_eq!(get_status(&p.narinfo_request_path()), 200);
    }
    for _ in 0..5 {
        assert_eq!(get_status(&s.paths[0].narinfo_request_path()), 200);
    }
    // 2 definite misses, one repeated (a negative hit), one unavailable
    // (a 404, b 500), one invalid hash.
    let (miss1, miss2) = (random_hash(), random_hash());
    for h in [&miss1, &miss2, &miss1] {
        assert_eq!(get_status(&format!("/{h}.narinfo")), 404);
    }
    assert_eq!(get_status(&format!("/{unavailable}.narinfo")), 502);
    assert_eq!(get_status("/not-a-hash.narinfo"), 400);
    // NARs: two bodies, one HEAD (no body bytes), one that nobody has.
    let (p0, p1) = (&s.paths[0], &s.paths[1]);
    for p in [p0, p1] {
        let r = ncro.get(&p.nar_request_path());
        assert_eq!((r.status, r.body.len()), (200, p.nar.len()));
    }
    let head = ncro
        .request("HEAD", &s.paths[2].nar_request_path(), &[])
        .expect("HEAD NAR");
    assert_eq!(head.status, 200);
    // A FileHash-style name: a canonical one (a store hash) would be
    // resolved as a narinfo lookup first (docs/nar-failover.md).
    let file_name = format!("{}{}", random_hash(), &random_hash()[..20]);
    assert_eq!(get_status(&format!("/nar/{file_name}.nar")), 404);

    // A NAR request is counted once its relay has ended, which can be a
    // moment after the client read its last byte.
    let nar_dur = "ncro_nar_request_duration_seconds_count";
    let m = scrape_until(
        ncro,
        "4 NAR requests counted",
        Duration::from_secs(5),
        |m| {
            m.value(nar_dur, &[("outcome", "ok")]) + m.value(nar_dur, &[("outcome", "error")])
                >= 4.0
        },
    );
    let v = |name: &str, labels: &[(&str, &str)]| m.value(name, labels);
    let (a, b) = (s.a.url(), s.b.url());
    assert_eq!(v("ncro_cache_info_requests_total", &[]), 3.0);
    assert_eq!(v("ncro_narinfo_cache_hits_total", &[]), 5.0);
    assert_eq!(v("ncro_narinfo_cache_misses_total", &[]), 7.0);
    assert_eq!(v("ncro_narinfo_memory_negative_hits_total", &[]), 1.0);
    assert_eq!(v("ncro_narinfo_singleflight_waiters_total", &[]), 0.0);
    assert_eq!(v("ncro_narinfo_requests_total", &[("status", "200")]), 9.0);
    assert_eq!(
        v("ncro_narinfo_requests_total", &[("status", "error")]),
        5.0
    );
    assert_eq!(v("ncro_narinfo_races_total", &[]), 7.0);
    assert_eq!(v("ncro_narinfo_upstream_attempts_total", &[]), 14.0);
    assert_eq!(v("ncro_upstream_race_wins_total", &[("upstream", &a)]), 4.0);
    assert_eq!(v("ncro_upstream_race_wins_total", &[("upstream", &b)]), 0.0);
    let outcome = |u: &str, o: &str| {
        v(
            "ncro_upstream_requests_total",
            &[("upstream", u), ("outcome", o)],
        )
    };
    assert_eq!(outcome(&a, "accepted"), 4.0);
    assert_eq!(outcome(&a, "not_found"), 3.0);
    assert_eq!(outcome(&a, "status_5xx"), 0.0);
    assert_eq!(outcome(&b, "status_5xx"), 5.0);
    assert_eq!(outcome(&b, "not_found"), 2.0);
    assert_eq!(outcome(&b, "accepted"), 0.0);
    assert_eq!(outcome(&a, "bad_signature"), 0.0);
    assert_eq!(v("ncro_narinfo_bad_signatures_total", &[]), 0.0);

    // Histograms: counts per label, +Inf equal to _count, sums plausible.
    let per_resolve = "ncro_narinfo_upstream_attempts_per_resolve";
    for (result, count) in [("success", 4.0), ("not_found", 2.0), ("unavailable", 1.0)] {
        let l = [("result", result)];
        assert_eq!(v(&format!("{per_resolve}_count"), &l), count);
        assert_eq!(v(&format!("{per_resolve}_sum"), &l), 2.0 * count);
        let inf = [("result", result), ("le", "+Inf")];
        assert_eq!(v(&format!("{per_resolve}_bucket"), &inf), count);
        let one = [("result", result), ("le", "1")];
        assert_eq!(v(&format!("{per_resolve}_bucket"), &one), 0.0);
    }
    let lat = "ncro_upstream_latency_seconds";
    assert_eq!(v(&format!("{lat}_count"), &[("upstream", &a)]), 4.0);
    assert_eq!(v(&format!("{lat}_count"), &[("upstream", &b)]), 0.0);
    let a_sum = v(&format!("{lat}_sum"), &[("upstream", &a)]);
    assert!(a_sum >= 4.0 * A_DELAY.as_secs_f64(), "{a_sum}");
    let race = "ncro_narinfo_race_duration_seconds";
    assert_eq!(v(&format!("{race}_count"), &[]), 7.0);
    assert_eq!(v(&format!("{race}_bucket"), &[("le", "+Inf")]), 7.0);
    // Every race waited for a's answer (all 7 asked it), so none fits under
    // A_DELAY.
    assert_eq!(v(&format!("{race}_bucket"), &[("le", "0.1")]), 0.0);
    let race_sum = v(&format!("{race}_sum"), &[]);
    assert!(race_sum >= 7.0 * A_DELAY.as_secs_f64(), "{race_sum}");
    // Every race takes a global permit first (no wait here, but observed).
    assert_eq!(
        v(
            "ncro_narinfo_race_wait_seconds_count",
            &[("kind", "global")]
        ),
        7.0
    );

    let nar_bytes = (p0.nar.len() + p1.nar.len()) as f64;
    assert_eq!(v("ncro_nar_requests_total", &[]), 4.0);
    assert_eq!(v("ncro_nar_bytes_total", &[]), nar_bytes);
    assert_eq!(
        v("ncro_upstream_nar_bytes_total", &[("upstream", &a)]),
        nar_bytes
    );
    assert_eq!(v("ncro_upstream_nar_bytes_total", &[("upstream", &b)]), 0.0);
    assert_eq!(v("ncro_nar_errors_total", &[]), 1.0);
    assert_eq!(v(nar_dur, &[("outcome", "ok")]), 3.0);
    assert_eq!(v(nar_dur, &[("outcome", "error")]), 1.0);

    // 4 routes and 2 negative entries.
    assert_eq!(v("ncro_route_entries", &[]), 6.0);
    // Every request so far plus this scrape, summed over both workers.
    let requests = 3.0 + 4.0 + 5.0 + 3.0 + 1.0 + 1.0 + 4.0 + 1.0;
    assert_eq!(v("ncro_http_requests_total", &[]), requests);
    let per_worker: f64 = (0..2)
        .map(|w| v("ncro_worker_requests_total", &[("worker", &w.to_string())]))
        .sum();
    assert_eq!(per_worker, requests);
    assert_eq!(v("ncro_http_bad_requests_total", &[]), 1.0);
    let conns: f64 = (0..2)
        .map(|w| {
            v(
                "ncro_worker_connections_total",
                &[("worker", &w.to_string())],
            )
        })
        .sum();
    assert!(
        conns >= requests,
        "every request used a fresh connection: {conns}"
    );
    for w in ["0", "1"] {
        let driver = ["io_uring", "epoll"].iter().find(|d| {
            m.get("ncro_worker_driver_info", &[("worker", w), ("driver", d)]) == Some(1.0)
        });
        assert!(
            driver.is_some(),
            "worker {w} reports its driver\n{}",
            m.text
        );
    }
    // Nothing else reached the upstreams than what the counters say.
    assert_eq!(
        s.b.requests()
            .iter()
            .filter(|r| r.path.ends_with(".narinfo"))
            .count(),
        7
    );
}

#[test]
fn route_writer_counters_reach_the_database() {
    let unavailable = random_hash();
    let s = setup(1, &unavailable);
    for p in &s.paths {
        assert_eq!(s.ncro.get(&p.narinfo_request_path()).status, 200);
    }
    assert_eq!(
        s.ncro.get(&format!("/{}.narinfo", random_hash())).status,
        404
    );
    // The writer commits asynchronously: poll (bounded) until it has.
    let deadline = Instant::now() + Duration::from_secs(10);
    let m = loop {
        let m = scrape(&s.ncro);
        let committed = m.value("ncro_route_writer_rows_total", &[]) == 5.0;
        if committed || Instant::now() > deadline {
            break m;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(m.value("ncro_route_db_rows", &[]), 4.0, "{}", m.text);
    assert_eq!(m.value("ncro_route_writer_queue_depth", &[]), 0.0);
    let batches = m.value("ncro_route_writer_batches_total", &[]);
    let rows = m.value("ncro_route_writer_rows_total", &[]);
    assert!((1.0..=5.0).contains(&batches), "{batches}");
    assert_eq!(rows, 5.0, "4 routes and a negative entry");
    assert_eq!(m.value("ncro_route_writer_errors_total", &[]), 0.0);
    assert_eq!(m.value("ncro_route_writer_dropped_total", &[]), 0.0);
}

#[test]
fn every_ncro22_metric_is_present_with_its_type() {
    let s = setup(1, &random_hash());
    let m = scrape(&s.ncro);
    for (name, kind) in NCRO22 {
        assert_eq!(
            m.types.get(name).map(String::as_str),
            Some(kind),
            "# TYPE {name} {kind}\n{}",
            m.text
        );
    }
    // ncro 2.2's label names, so existing queries still select.
    let a = s.a.url();
    assert!(m
        .get("ncro_narinfo_requests_total", &[("status", "200")])
        .is_some());
    assert!(m
        .get("ncro_upstream_race_wins_total", &[("upstream", &a)])
        .is_some());
    assert!(m
        .get("ncro_upstream_latency_seconds_count", &[("upstream", &a)])
        .is_some());
    for r in ["success", "not_found", "unavailable"] {
        let l = [("result", r)];
        assert!(m
            .get("ncro_narinfo_upstream_attempts_per_resolve_count", &l)
            .is_some());
    }
    assert!(m
        .get(
            "ncro_narinfo_race_wait_seconds_count",
            &[("kind", "global")]
        )
        .is_some());
    // ncro 2.2's default buckets where its dashboards may use `le`.
    for le in ["0.005", "0.25", "10"] {
        let l = [("upstream", a.as_str()), ("le", le)];
        assert!(
            m.get("ncro_upstream_latency_seconds_bucket", &l).is_some(),
            "le={le}"
        );
    }
}

#[test]
fn docs_list_every_exported_metric() {
    let doc = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/metrics.md");
    let doc = std::fs::read_to_string(doc).expect("docs/metrics.md");
    let s = setup(1, &random_hash());
    let m = scrape(&s.ncro);
    assert!(m.types.len() >= 35, "{}", m.text);
    let undocumented: BTreeSet<_> = m
        .types
        .keys()
        .filter(|name| !doc.contains(&format!("| `{name}` |")))
        .collect();
    assert!(
        undocumented.is_empty(),
        "not in docs/metrics.md: {undocumented:?}"
    );
}

/// Every `ncro_*` name in the dashboard's JSON.
fn dashboard_metric_names(json: &serde_json::Value, out: &mut BTreeSet<String>) {
    match json {
        serde_json::Value::String(s) => {
            let mut rest = s.as_str();
            while let Some(i) = rest.find("ncro_") {
                let tail = &rest[i..];
                let end = tail
                    .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
                    .unwrap_or(tail.len());
                out.insert(tail[..end].to_owned());
                rest = &tail[end..];
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| dashboard_metric_names(v, out)),
        serde_json::Value::Object(o) => o.values().for_each(|v| dashboard_metric_names(v, out)),
        _ => {}
    }
}

#[test]
fn every_metric_the_dashboard_queries_exists() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/grafana/ncro-dashboard.json");
    let text = std::fs::read_to_string(&path).expect("dashboard JSON");
    let json: serde_json::Value = serde_json::from_str(&text).expect("dashboard is JSON");
    let panels = json["panels"].as_array().expect("panels");
    let mut names = BTreeSet::new();
    let mut exprs = 0;
    for panel in panels {
        for t in panel["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().expect("every target has a PromQL expr");
            exprs += 1;
            dashboard_metric_names(&serde_json::Value::String(expr.into()), &mut names);
        }
    }
    // Template variables query metrics too.
    dashboard_metric_names(&json["templating"], &mut names);
    assert!(exprs >= 10, "only {exprs} queries");
    let s = setup(1, &random_hash());
    let m = scrape(&s.ncro);
    let missing: Vec<_> = names.iter().filter(|n| !m.has_metric(n)).collect();
    assert!(
        missing.is_empty(),
        "dashboard queries unknown metrics {missing:?}"
    );
    // The dashboard covers what the issue asks for.
    for needed in [
        "ncro_narinfo_requests_total",
        "ncro_narinfo_cache_hits_total",
        "ncro_narinfo_race_duration_seconds_bucket",
        "ncro_upstream_race_wins_total",
        "ncro_upstream_requests_total",
        "ncro_nar_bytes_total",
        "ncro_upstream_health_state",
    ] {
        assert!(names.contains(needed), "dashboard lacks {needed}");
    }
}

#[test]
fn scrape_parser_reads_labels_and_escapes() {
    let m = Scrape::parse(
        "# TYPE x_seconds histogram\nx_seconds_bucket{a=\"q\\\"uo,te\",le=\"+Inf\"} 3\nx_seconds_count 3\ny NaN\n",
    );
    assert_eq!(
        m.get("x_seconds_bucket", &[("le", "+Inf"), ("a", "q\"uo,te")]),
        Some(3.0)
    );
    assert!(m.has_metric("x_seconds_count"));
    assert!(m.has_metric("x_seconds"));
    assert!(!m.has_metric("y_count"));
    assert!(m.get("y", &[]).is_some_and(f64::is_nan));
}
