//! The fault-injection matrix: every way an upstream can fail, for narinfo
//! and for NAR requests, through the real `ncro` binary.
//!
//! [`ROWS`] is the matrix. Each row names an upstream fault, what the Nix
//! client gets for its request, what ncro keeps afterwards and which metric
//! counts it, and what the client gets when a second upstream sits in the
//! same tier: a healthy one (the race must answer from it) or one without
//! the path (a failure beside a 404 must not become a 404). `run::run`
//! turns every field into assertions (one ncro and fresh fakes per row and
//! setup, so rows cannot leak cooldowns or routes into each other); the
//! faulty upstream recovers (`FakeUpstream::heal`) before the follow-up
//! requests that show what was kept. `docs_match_the_matrix` checks that
//! docs/failure-modes.md holds exactly the rendered table, so the document
//! cannot drift from what is tested. After changing a row, regenerate the
//! table with
//! `NCRO_WRITE_FAILURE_MODES=1 cargo test --test it faults::docs_match_the_matrix`.
//!
//! Rows that only the narinfo side can have (signatures, store paths and
//! narinfo syntax) have no NAR twin: NARs are checked by the client against
//! the signed `NarHash`. Existing tests that pin single cases in more
//! depth stay where they are (`routing`, `nar`); the matrix is the
//! complete sweep.

pub mod fetch;
mod run;

use std::path::Path;

/// Which request the fault hits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    Narinfo,
    Nar,
}

/// The upstream misbehaviour, installed on the faulty upstream for the
/// target path only (see `run::fault_for`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Inject {
    Status(u16),
    /// 503 with `Retry-After: 30`.
    Unavailable,
    ResetBeforeHead,
    ResetMidBody,
    HangBeforeHead,
    HangMidBody,
    TruncatedWithLength,
    TruncatedNoLength,
    BadChunked,
    /// Signed by a key with the trusted name but other key material.
    BadSignature,
    /// A valid, signed narinfo of another store path.
    WrongStorePath,
    /// `NarSize` that is not a number.
    Malformed,
    /// The real narinfo with CRLF line ends.
    Crlf,
    /// The narinfo without its signatures and with a `CA:` that does not
    /// compute to its store path (a forged content address).
    ForgedCa,
    /// The narinfo padded with an unknown field past `MAX_NARINFO_SIZE`.
    Oversize,
    /// 302 to an absolute URL on a healthy server.
    Redirect,
    /// About 200 KiB of response headers.
    EnormousHeaders,
    /// The body in small pieces, each within the idle timeout, all within
    /// the race deadline.
    Trickle,
}

/// What the client gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sees {
    /// A complete answer with this status and ncro's own short body.
    Status(u16),
    /// 200 with the whole, correct body (from the faulty upstream, once
    /// beside a healthy one: the fault only slowed it down).
    Served,
    /// Beside a healthy upstream: 200 with the whole body, from that one.
    FromHealthy,
    /// NAR: 200 whose head promises the whole NAR, fewer bytes, then the
    /// connection closes; the `Range` resume that Nix sends next is served.
    CutShort,
    /// NAR, beside a healthy upstream: 200 with the whole body in one
    /// response, its rest from the healthy upstream by a `Range` request
    /// from where the faulty one stopped (docs/nar-failover.md).
    FailedOver,
    /// NAR: the upstream's 302 and its `Location`, relayed.
    Redirected,
    /// NAR: a close-delimited body that ended early; ncro cannot tell it
    /// from a whole one (the client's NarHash check rejects it).
    LooksComplete,
}

/// What ncro remembers about the path afterwards.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kept {
    /// Nothing: the next request asks the upstream again, and once the
    /// fault clears the path is served.
    Nothing,
    /// A negative entry: 404 without asking, for `cache.negative_ttl`.
    Negative,
    /// A route: the narinfo is served from memory afterwards.
    Route,
}

/// Where the first request shows up in `/metrics`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counted {
    /// `ncro_upstream_requests_total{upstream=faulty, outcome=..}` + 1.
    Outcome(&'static str),
    /// `ncro_nar_errors_total` + 1.
    NarError,
    /// Not an error: `ncro_nar_errors_total` unchanged.
    NarOk,
}

#[derive(Clone, Copy, Debug)]
pub struct Row {
    pub fault: &'static str,
    pub target: Target,
    pub inject: Inject,
    pub sees: Sees,
    pub kept: Kept,
    pub counted: Counted,
    /// What the client gets with a healthy second upstream in the tier.
    pub with_healthy: Sees,
    /// What the client gets when the second upstream in the tier does not
    /// have the path (answers 404): a failure beside a miss is no miss.
    pub with_empty: Sees,
}

/// What sits in the tier beside the faulty upstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Beside {
    Nothing,
    /// Has the path; its narinfo answers a little later.
    Healthy,
    /// Has no path at all (404 for everything but `/nix-cache-info`).
    Empty,
}

/// One table line: the fault, then what happens with the faulty upstream
/// alone (client, ncro keeps, counted in), then beside a healthy upstream
/// and beside one without the path.
const fn row(
    fault: &'static str,
    target: Target,
    inject: Inject,
    (sees, kept, counted): (Sees, Kept, Counted),
    (with_healthy, with_empty): (Sees, Sees),
) -> Row {
    Row {
        fault,
        target,
        inject,
        sees,
        kept,
        counted,
        with_healthy,
        with_empty,
    }
}

use Counted::{NarError, NarOk, Outcome};
use Inject as I;
use Kept::{Negative, Nothing, Route};
use Sees::{CutShort, FailedOver, FromHealthy, LooksComplete, Redirected, Served, Status};
use Target::{Nar, Narinfo};

#[rustfmt::skip]
pub const ROWS: &[Row] = &[
    row("404", Narinfo, I::Status(404), (Status(404), Negative, Outcome("not_found")), (FromHealthy, Status(404))),
    row("403", Narinfo, I::Status(403), (Status(404), Negative, Outcome("not_found")), (FromHealthy, Status(404))),
    row("500", Narinfo, I::Status(500), (Status(502), Nothing, Outcome("status_5xx")), (FromHealthy, Status(502))),
    row("502", Narinfo, I::Status(502), (Status(502), Nothing, Outcome("status_5xx")), (FromHealthy, Status(502))),
    row("503 with Retry-After", Narinfo, I::Unavailable, (Status(502), Nothing, Outcome("status_5xx")), (FromHealthy, Status(502))),
    row("reset before headers", Narinfo, I::ResetBeforeHead, (Status(502), Nothing, Outcome("reset")), (FromHealthy, Status(502))),
    row("reset mid-body", Narinfo, I::ResetMidBody, (Status(502), Nothing, Outcome("reset")), (FromHealthy, Status(502))),
    row("hang before headers", Narinfo, I::HangBeforeHead, (Status(504), Nothing, Outcome("timeout")), (FromHealthy, Status(504))),
    row("hang mid-body", Narinfo, I::HangMidBody, (Status(504), Nothing, Outcome("timeout")), (FromHealthy, Status(504))),
    row("truncated body, Content-Length", Narinfo, I::TruncatedWithLength, (Status(502), Nothing, Outcome("reset")), (FromHealthy, Status(502))),
    row("truncated body, no Content-Length", Narinfo, I::TruncatedNoLength, (Status(502), Nothing, Outcome("malformed")), (FromHealthy, Status(502))),
    row("chunked framing error", Narinfo, I::BadChunked, (Status(502), Nothing, Outcome("protocol")), (FromHealthy, Status(502))),
    row("bad signature", Narinfo, I::BadSignature, (Status(502), Nothing, Outcome("bad_signature")), (FromHealthy, Status(502))),
    row("wrong StorePath", Narinfo, I::WrongStorePath, (Status(404), Negative, Outcome("wrong_store_path")), (FromHealthy, Status(404))),
    row("malformed narinfo", Narinfo, I::Malformed, (Status(502), Nothing, Outcome("malformed")), (FromHealthy, Status(502))),
    row("CRLF narinfo", Narinfo, I::Crlf, (Status(502), Nothing, Outcome("malformed")), (FromHealthy, Status(502))),
    row("forged content address", Narinfo, I::ForgedCa, (Status(502), Nothing, Outcome("bad_signature")), (FromHealthy, Status(502))),
    row("narinfo over 4 MiB", Narinfo, I::Oversize, (Status(502), Nothing, Outcome("too_large")), (FromHealthy, Status(502))),
    row("redirect", Narinfo, I::Redirect, (Status(502), Nothing, Outcome("status_other")), (FromHealthy, Status(502))),
    row("enormous headers", Narinfo, I::EnormousHeaders, (Status(502), Nothing, Outcome("protocol")), (FromHealthy, Status(502))),
    row("slow trickle", Narinfo, I::Trickle, (Served, Route, Outcome("accepted")), (FromHealthy, Served)),
    row("404", Nar, I::Status(404), (Status(404), Nothing, NarError), (FromHealthy, Status(404))),
    row("403", Nar, I::Status(403), (Status(404), Nothing, NarError), (FromHealthy, Status(404))),
    row("500", Nar, I::Status(500), (Status(502), Nothing, NarError), (FromHealthy, Status(502))),
    row("502", Nar, I::Status(502), (Status(502), Nothing, NarError), (FromHealthy, Status(502))),
    row("503 with Retry-After", Nar, I::Unavailable, (Status(502), Nothing, NarError), (FromHealthy, Status(502))),
    row("reset before headers", Nar, I::ResetBeforeHead, (Status(502), Nothing, NarError), (FromHealthy, Status(502))),
    row("reset mid-body", Nar, I::ResetMidBody, (CutShort, Nothing, NarError), (FailedOver, CutShort)),
    row("hang before headers", Nar, I::HangBeforeHead, (Status(504), Nothing, NarError), (FromHealthy, Status(504))),
    row("hang mid-body", Nar, I::HangMidBody, (CutShort, Nothing, NarError), (FailedOver, CutShort)),
    row("truncated body, Content-Length", Nar, I::TruncatedWithLength, (CutShort, Nothing, NarError), (FailedOver, CutShort)),
    row("truncated body, no Content-Length", Nar, I::TruncatedNoLength, (LooksComplete, Nothing, NarOk), (LooksComplete, LooksComplete)),
    row("chunked framing error", Nar, I::BadChunked, (CutShort, Nothing, NarError), (CutShort, CutShort)),
    row("redirect", Nar, I::Redirect, (Redirected, Nothing, NarOk), (Redirected, Redirected)),
    row("enormous headers", Nar, I::EnormousHeaders, (Status(502), Nothing, NarError), (FromHealthy, Status(502))),
    row("slow trickle", Nar, I::Trickle, (Served, Nothing, NarOk), (Served, Served)),
];

fn sees_text(s: Sees, healthy: bool) -> String {
    match (s, healthy) {
        (Status(code), _) => code.to_string(),
        (Served, false) => "200, whole body".into(),
        (Served, true) => "200, whole body, from the faulty upstream (only slower)".into(),
        (FromHealthy, _) => "200, whole body, from the healthy upstream".into(),
        (CutShort, false) => {
            "200, body cut short, connection closed; the client's resume is served".into()
        }
        (CutShort, true) => {
            "cut short as alone; the client's resume is served by the healthy upstream".into()
        }
        (FailedOver, _) => {
            "200, whole body in one response: the rest from the healthy upstream (Range from the cut)"
                .into()
        }
        (Redirected, _) => "302 relayed with its `Location`".into(),
        (LooksComplete, _) => "200, close-delimited body ends early: looks whole (note 1)".into(),
    }
}

/// A cell of the "beside an upstream without the path" column: only the
/// answer, the rest is as alone.
fn empty_text(s: Sees) -> String {
    match s {
        CutShort => "cut short as alone".into(),
        other => sees_text(other, false),
    }
}

fn kept_text(k: Kept, t: Target) -> &'static str {
    match (k, t) {
        (Nothing, Narinfo) => "nothing: asked again; served once the fault clears",
        (Nothing, Nar) => "nothing (NARs are never stored); served once the fault clears",
        (Negative, _) => "negative entry for `cache.negative_ttl`",
        (Route, _) => "route: later requests are answered from memory",
    }
}

fn counted_text(c: Counted) -> String {
    match c {
        Outcome(o) => format!("`ncro_upstream_requests_total{{outcome=\"{o}\"}}`"),
        NarError => "`ncro_nar_errors_total`".into(),
        NarOk => "none (not an error to ncro)".into(),
    }
}

/// The matrix as the Markdown table in docs/failure-modes.md.
pub fn render_table() -> String {
    let mut out = String::from(
        "| upstream fault | request | client sees | ncro keeps | counted in | beside a healthy upstream | beside an upstream without the path |\n\
         |---|---|---|---|---|---|---|\n",
    );
    for r in ROWS {
        let target = match r.target {
            Narinfo => "narinfo",
            Nar => "NAR",
        };
        out.push_str(&format!(
            "| {} | {target} | {} | {} | {} | {} | {} |\n",
            r.fault,
            sees_text(r.sees, false),
            kept_text(r.kept, r.target),
            counted_text(r.counted),
            sees_text(r.with_healthy, true),
            empty_text(r.with_empty),
        ));
    }
    out
}

const BEGIN: &str = "<!-- BEGIN fault matrix: generated from tests/it/faults.rs -->\n";
const END: &str = "<!-- END fault matrix -->";

#[test]
fn docs_match_the_matrix() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/failure-modes.md");
    let doc = std::fs::read_to_string(&path).expect("docs/failure-modes.md");
    let start = doc.find(BEGIN).expect("BEGIN marker") + BEGIN.len();
    let end = doc[start..].find(END).expect("END marker") + start;
    let table = render_table();
    if std::env::var_os("NCRO_WRITE_FAILURE_MODES").is_some() {
        let updated = format!("{}{table}{}", &doc[..start], &doc[end..]);
        std::fs::write(&path, updated).expect("write docs/failure-modes.md");
        return;
    }
    assert!(
        doc[start..end] == table,
        "docs/failure-modes.md is out of date; regenerate it with \
         NCRO_WRITE_FAILURE_MODES=1 cargo test --test it faults::docs_match_the_matrix"
    );
}

#[test]
fn every_fault_is_in_the_matrix_for_both_requests() {
    for r in ROWS.iter().filter(|r| r.target == Narinfo) {
        let narinfo_only = matches!(
            r.inject,
            I::BadSignature
                | I::WrongStorePath
                | I::Malformed
                | I::Crlf
                | I::ForgedCa
                | I::Oversize
        );
        let twins = ROWS
            .iter()
            .filter(|n| n.target == Nar && n.inject == r.inject)
            .count();
        assert_eq!(twins, usize::from(!narinfo_only), "{}", r.fault);
    }
}

/// Runs every row for `target`; reports all failing rows at once.
fn sweep(target: Target, beside: Beside, relay: &str) {
    let failed: Vec<String> = ROWS
        .iter()
        .filter(|r| r.target == target)
        .filter_map(|r| {
            let outcome = std::panic::catch_unwind(|| run::run(r, beside, relay));
            outcome
                .err()
                .map(|_| format!("{} ({:?})", r.fault, r.target))
        })
        .collect();
    assert!(failed.is_empty(), "rows that failed: {failed:?}");
}

#[test]
fn narinfo_faults_alone() {
    sweep(Narinfo, Beside::Nothing, "auto");
}

#[test]
fn narinfo_faults_beside_a_healthy_upstream() {
    sweep(Narinfo, Beside::Healthy, "auto");
}

#[test]
fn narinfo_faults_beside_an_empty_upstream() {
    sweep(Narinfo, Beside::Empty, "auto");
}

#[test]
fn nar_faults_alone_copy() {
    sweep(Nar, Beside::Nothing, "copy");
}

#[test]
fn nar_faults_alone_splice() {
    sweep(Nar, Beside::Nothing, "splice");
}

#[test]
fn nar_faults_beside_a_healthy_upstream() {
    sweep(Nar, Beside::Healthy, "auto");
}

#[test]
fn nar_faults_beside_an_empty_upstream() {
    sweep(Nar, Beside::Empty, "auto");
}

/// Regression: an upstream sitting out its cooldown after one reset was
/// not asked at all, so while every other upstream said 404 each lookup of
/// a path only it holds was answered 502 for the whole cooldown (15 s by
/// default), far longer than Nix retries (about 4.5 s) before failing the
/// build. It is now asked last, once the others gave no answer.
#[test]
fn regression_cooling_upstream_is_asked_when_the_others_miss() {
    use crate::fake::{FakeUpstream, Fault, TestKey, TestPath};
    use crate::routing::{db_dir, entry, NcroConfig};
    let k = TestKey::generate("k-1");
    let p = TestPath::new("only-here");
    let flaky = FakeUpstream::builder()
        .path(&p, &k)
        .rule(p.narinfo_request_path(), Fault::first_n(1, Fault::Reset))
        .start();
    let empty = FakeUpstream::builder().start();
    let db = db_dir();
    let ups = [entry(flaky.url(), 10, &k), entry(empty.url(), 10, &k)];
    let mut mass_query = toml::Table::new();
    mass_query.insert("upstream_cooldown".into(), "1h".into());
    let ncro = NcroConfig::new(&ups, &db.path().join("r.db"))
        .set("cache", "mass_query", mass_query)
        .start();
    let path = p.narinfo_request_path();
    assert_eq!(ncro.get(&path).status, 502, "{}", ncro.logs());
    let r = ncro.get(&path);
    assert_eq!(r.status, 200, "{}\n{}", r.text(), ncro.logs());
    assert_eq!(flaky.request_count(&path), 2, "asked again while cooling");
    assert_eq!(empty.request_count(&path), 2);
}
