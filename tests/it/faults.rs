//! The fault-injection matrix: every way an upstream can fail, for narinfo
//! and for NAR requests, through the real `ncro` binary.
//!
//! [`ROWS`] is the matrix. Each row names an upstream fault, what the Nix
//! client gets for its request, what ncro keeps afterwards and which metric
//! counts it, and what the client gets when a healthy second upstream sits
//! in the same tier. [`run`] turns every field into assertions (one ncro
//! and fresh fakes per row and setup, so rows cannot leak cooldowns or
//! routes into each other); `docs_match_the_matrix` checks that
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

mod fetch;
mod run;

use std::path::Path;

/// Which request the fault hits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    Narinfo,
    Nar,
}

/// The upstream misbehaviour, installed on the faulty upstream for the
/// target path only (see `run::install`).
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
}

const fn row(
    fault: &'static str,
    target: Target,
    inject: Inject,
    sees: Sees,
    kept: Kept,
    counted: Counted,
    with_healthy: Sees,
) -> Row {
    Row {
        fault,
        target,
        inject,
        sees,
        kept,
        counted,
        with_healthy,
    }
}

use Counted::{NarError, NarOk, Outcome};
use Inject as I;
use Kept::{Negative, Nothing, Route};
use Sees::{CutShort, FromHealthy, LooksComplete, Redirected, Served, Status};
use Target::{Nar, Narinfo};

#[rustfmt::skip]
pub const ROWS: &[Row] = &[
    row("404", Narinfo, I::Status(404), Status(404), Negative, Outcome("not_found"), FromHealthy),
    row("403", Narinfo, I::Status(403), Status(404), Negative, Outcome("not_found"), FromHealthy),
    row("500", Narinfo, I::Status(500), Status(502), Nothing, Outcome("status_5xx"), FromHealthy),
    row("502", Narinfo, I::Status(502), Status(502), Nothing, Outcome("status_5xx"), FromHealthy),
    row("503 with Retry-After", Narinfo, I::Unavailable, Status(502), Nothing, Outcome("status_5xx"), FromHealthy),
    row("reset before headers", Narinfo, I::ResetBeforeHead, Status(502), Nothing, Outcome("reset"), FromHealthy),
    row("reset mid-body", Narinfo, I::ResetMidBody, Status(502), Nothing, Outcome("reset"), FromHealthy),
    row("hang before headers", Narinfo, I::HangBeforeHead, Status(504), Nothing, Outcome("timeout"), FromHealthy),
    row("hang mid-body", Narinfo, I::HangMidBody, Status(504), Nothing, Outcome("timeout"), FromHealthy),
    row("truncated body, Content-Length", Narinfo, I::TruncatedWithLength, Status(502), Nothing, Outcome("reset"), FromHealthy),
    row("truncated body, no Content-Length", Narinfo, I::TruncatedNoLength, Status(502), Nothing, Outcome("malformed"), FromHealthy),
    row("chunked framing error", Narinfo, I::BadChunked, Status(502), Nothing, Outcome("protocol"), FromHealthy),
    row("bad signature", Narinfo, I::BadSignature, Status(502), Nothing, Outcome("bad_signature"), FromHealthy),
    row("wrong StorePath", Narinfo, I::WrongStorePath, Status(404), Negative, Outcome("wrong_store_path"), FromHealthy),
    row("malformed narinfo", Narinfo, I::Malformed, Status(502), Nothing, Outcome("malformed"), FromHealthy),
    row("CRLF narinfo", Narinfo, I::Crlf, Status(502), Nothing, Outcome("malformed"), FromHealthy),
    row("redirect", Narinfo, I::Redirect, Status(502), Nothing, Outcome("status_other"), FromHealthy),
    row("enormous headers", Narinfo, I::EnormousHeaders, Status(502), Nothing, Outcome("protocol"), FromHealthy),
    row("slow trickle", Narinfo, I::Trickle, Served, Route, Outcome("accepted"), FromHealthy),
    row("404", Nar, I::Status(404), Status(404), Nothing, NarError, FromHealthy),
    row("403", Nar, I::Status(403), Status(404), Nothing, NarError, FromHealthy),
    row("500", Nar, I::Status(500), Status(502), Nothing, NarError, FromHealthy),
    row("502", Nar, I::Status(502), Status(502), Nothing, NarError, FromHealthy),
    row("503 with Retry-After", Nar, I::Unavailable, Status(502), Nothing, NarError, FromHealthy),
    row("reset before headers", Nar, I::ResetBeforeHead, Status(502), Nothing, NarError, FromHealthy),
    row("reset mid-body", Nar, I::ResetMidBody, CutShort, Nothing, NarError, CutShort),
    row("hang before headers", Nar, I::HangBeforeHead, Status(504), Nothing, NarError, FromHealthy),
    row("hang mid-body", Nar, I::HangMidBody, CutShort, Nothing, NarError, CutShort),
    row("truncated body, Content-Length", Nar, I::TruncatedWithLength, CutShort, Nothing, NarError, CutShort),
    row("truncated body, no Content-Length", Nar, I::TruncatedNoLength, LooksComplete, Nothing, NarOk, LooksComplete),
    row("chunked framing error", Nar, I::BadChunked, CutShort, Nothing, NarError, CutShort),
    row("redirect", Nar, I::Redirect, Redirected, Nothing, NarOk, Redirected),
    row("enormous headers", Nar, I::EnormousHeaders, Status(502), Nothing, NarError, FromHealthy),
    row("slow trickle", Nar, I::Trickle, Served, Nothing, NarOk, Served),
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
        (Redirected, _) => "302 relayed with its `Location`".into(),
        (LooksComplete, _) => "200, close-delimited body ends early: looks whole (note 1)".into(),
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
        "| upstream fault | request | client sees | ncro keeps | counted in | with a healthy second upstream |\n\
         |---|---|---|---|---|---|\n",
    );
    for r in ROWS {
        let target = match r.target {
            Narinfo => "narinfo",
            Nar => "NAR",
        };
        out.push_str(&format!(
            "| {} | {target} | {} | {} | {} | {} |\n",
            r.fault,
            sees_text(r.sees, false),
            kept_text(r.kept, r.target),
            counted_text(r.counted),
            sees_text(r.with_healthy, true),
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
            I::BadSignature | I::WrongStorePath | I::Malformed | I::Crlf
        );
        let twins = ROWS
            .iter()
            .filter(|n| n.target == Nar && n.inject == r.inject)
            .count();
        assert_eq!(twins, usize::from(!narinfo_only), "{}", r.fault);
    }
}

/// Runs every row for `target`; reports all failing rows at once.
fn sweep(target: Target, healthy: bool, relay: &str) {
    let failed: Vec<String> = ROWS
        .iter()
        .filter(|r| r.target == target)
        .filter_map(|r| {
            let outcome = std::panic::catch_unwind(|| run::run(r, healthy, relay));
            outcome
                .err()
                .map(|_| format!("{} ({:?})", r.fault, r.target))
        })
        .collect();
    assert!(failed.is_empty(), "rows that failed: {failed:?}");
}

#[test]
fn narinfo_faults_alone() {
    sweep(Narinfo, false, "auto");
}

#[test]
fn narinfo_faults_beside_a_healthy_upstream() {
    sweep(Narinfo, true, "auto");
}

#[test]
fn nar_faults_alone_copy() {
    sweep(Nar, false, "copy");
}

#[test]
fn nar_faults_alone_splice() {
    sweep(Nar, false, "splice");
}

#[test]
fn nar_faults_beside_a_healthy_upstream() {
    sweep(Nar, true, "auto");
}
