//! NAR hedging with the real Nix client: cache A's server answers every
//! NAR request 3 s late (`cachehttp.py --fault nar/=delay=3`), a second
//! server holds the very same files (cache A's directory served again as
//! "B", its narinfos 0.3 s late so that A wins the narinfo races and every
//! NAR of A's closure is routed to the slow server first). With hedging
//! (delay 200 ms) the client substitutes the closure without waiting for
//! the slow server: every NAR routed to it is won by a hedge, the slow
//! attempt is cancelled, and no NAR error is counted. The same flow with
//! `[cache.nar_hedging] enabled = false` waits the 3 s per NAR; both times
//! go into the report.

use super::{caches, fetch, serve_with, summary, Report, Run};
use crate::harness::{test_config, NcroProcess};
use crate::metrics::{scrape, Scrape};

struct Outcome {
    run: Run,
    after: Scrape,
    urls: [String; 3],
}

fn flow(tag: &str, hedging: bool) -> Outcome {
    let c = caches();
    let served = serve_with(
        c,
        tag,
        ["A", "A", "C"],
        &[
            ("NH_SERVE_ARGS_A", "--fault nar/=delay=3"),
            ("NH_SERVE_ARGS_B", "--fault narinfo=delay=0.3"),
        ],
    );
    let db = tempfile::tempdir().expect("tempdir");
    let keys = [&c.keys[0], &c.keys[0], &c.keys[2]];
    let ups: Vec<(&str, i32, &str)> = (0..3)
        .map(|i| (served.urls[i].as_str(), 50, keys[i].as_str()))
        .collect();
    let mut config = test_config("127.0.0.1:0", &ups, &db.path().join("routes.db"));
    config.push_str(&format!(
        "\n[cache.nar_hedging]\nenabled = {hedging}\ndelay = \"200ms\"\nmax_inflight = 2\n"
    ));
    let ncro = NcroProcess::try_start(&config).unwrap_or_else(|e| panic!("start ncro: {e}"));
    let paths = [c.role("chain_a_top"), c.role("large_a")];
    let all_keys = c.keys.join(" ");
    let log = db.path().join("fetch.log");
    let run = fetch(&c.scripts, &ncro.url(), &all_keys, &paths, &[], &log);
    let after = scrape(&ncro);
    if run.code != Some(0) {
        eprintln!("{}\n{}", served.access_logs(), ncro.logs());
    }
    Outcome {
        run,
        after,
        urls: served.urls.clone(),
    }
}

fn hedges(o: &Outcome, event: &str, up: usize) -> f64 {
    o.after.value(
        "ncro_nar_hedges_total",
        &[("event", event), ("upstream", &o.urls[up])],
    )
}

#[test]
fn nix_client_substitutes_through_hedging_past_a_slow_upstream() {
    let mut report = Report::default();
    let with = flow("hedge-on", true);
    let won: f64 = (0..3).map(|i| hedges(&with, "won", i)).sum();
    let cancelled_a = hedges(&with, "cancelled", 0);
    let errors = with.after.value("ncro_nar_errors_total", &[]);
    report.step("with", with.run.code == Some(0), &summary(&with.run), &with.run.output);
    report.step(
        "with_counted",
        won >= 2.0 && hedges(&with, "won", 1) == won && cancelled_a == won && errors == 0.0,
        &format!(
            "hedges won={won} (by the mirror: {}), slow attempts cancelled={cancelled_a}, NAR errors={errors}",
            hedges(&with, "won", 1)
        ),
        &with.after.text,
    );
    let without = flow("hedge-off", false);
    let started: f64 = (0..3).map(|i| hedges(&without, "started", i)).sum();
    report.step(
        "without",
        without.run.code == Some(0) && started == 0.0,
        &format!("hedging off: {}; hedges started={started}", summary(&without.run)),
        &without.run.output,
    );
    report.finish(&format!(
        "real Nix client, NARs of one upstream answered 3 s late: {:.2} s with hedging (delay 200 ms), {:.2} s without",
        with.run.secs, without.run.secs
    ));
}
