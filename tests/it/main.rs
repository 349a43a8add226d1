//! ncro's integration test binary: one binary, one module per area.
//!
//! - [`alerts`]: the Prometheus alert rules (`promtool check`/`test rules`)
//!   and the metrics they use, against a live `/metrics`.
//! - [`architecture`]: the shape of `src/`: no import cycles between
//!   sibling modules, no file over 700 lines before its tests.
//! - [`fake`]: a fake upstream binary cache with fault injection, plus
//!   independently written Nix test data (keys, narinfos, NARs).
//! - [`harness`]: runs the real `ncro` binary and talks HTTP/1.1 to it.
//! - [`e2e_nix`]: the real Nix client through the real `ncro` binary.
//! - [`routing`]: races, tiers, miss versus outage, single-flight and
//!   persisted routes through the real `ncro` binary and fake upstreams.
//! - [`early_start`]: tier skipping: the next tier started with one that
//!   keeps missing, never in strict mode, within the request budget.
//! - [`narinfo_side`]: `[fallback_cache]`, `narinfo_timeout`,
//!   `want_mass_query`, the resolution policy, the partial-outage answer
//!   and the provenance headers.
//! - [`nar`]: NAR routing, fallback, ranges and broken upstream bodies.
//! - [`metrics`]: `/metrics` values after known traffic, ncro 2.2 names,
//!   the Grafana dashboard's queries.
//! - [`logging`]: log formats, logging config errors, no per-request lines
//!   at info, the debug access log, secrets kept out of logs.
//! - [`server`]: the HTTP/1.1 server, workers, drain and upstream side of
//!   the real `ncro` binary over loopback sockets.
//! - [`cli`]: the command line (`--version`, `check-config`, `NCRO_CONFIG`).
//! - [`ops`]: journald-framed logs, `--check`, `--generate-mesh-key`,
//!   netrc credentials, S3 upload-only parameters, `check-config` notes.
//! - [`bench`]: `ncro bench upstream`, `run` and `local` as real processes.
//! - [`systemd`]: socket activation, sd_notify and the watchdog, with the
//!   test playing systemd.
//! - [`health`]: health probing, routing order, cooldowns and limits.
//! - [`status`]: `/status` fields and `/health`'s 503 as upstreams go down.
//! - [`discovery`]: mDNS discovery in a network namespace the test makes.
//! - [`failover`]: mid-stream NAR failover to another upstream holding
//!   the same NAR, and when it must not happen.
//! - [`hedge`]: NAR hedging (a slow first upstream, `allow_hedging`,
//!   `max_inflight`), `upstreams[].nar_timeout` and
//!   `max_concurrent_requests`.
//! - [`ranged`]: large NARs fetched as parallel ranges
//!   (`[cache.nar_ranges]`): wrong range answers, a dying holder, stalls,
//!   a slow client, client ranges on top.
//! - [`faults`]: the fault-injection matrix (every upstream fault, for
//!   narinfo and NAR requests), checked against docs/failure-modes.md.
//! - [`endpoints`]: the binary-cache side paths (logs, listings,
//!   realisations, build traces, debuginfo) and the batch narinfo endpoint.
//! - [`farm`]: three `ncro` nodes behind the shipped HAProxy config
//!   (`packaging/haproxy/ncro-farm.cfg`) with the real Nix client and
//!   `ncro bench run` through rolling restarts and a SIGKILL; locality;
//!   the `server.drain_delay` lame duck.
//! - [`mesh`]: signed gossip between three `ncro` processes; forged,
//!   replayed and oversized datagrams; ncro 2.2's encoding accepted.
//! - [`index`]: index-aware routing: upstream NixBloom filters and RFC 0195
//!   indexes, staleness and errors, ncro's own filter read by another ncro.
//! - [`s3`]: S3 upstreams against a real Garage server (with the real Nix
//!   client) and against a fake S3 for the 403 rules.

//! - [`client`]: the upstream HTTP client (`ncro::http::client`) against
//!   tiny blocking fake servers, on io_uring and on epoll.
//! - [`route_persist`]: route persistence through real processes (SIGKILL
//!   mid-write) and at full size.
//! - [`fuzz_corpus`]: the committed fuzz regressions replayed on stable.
//! - [`crash`]: the route database under SIGKILL, an unopenable path, a
//!   read-only and a full file system.
//! - [`overload`]: a burst of misses is shed with 503 while hits stay fast.
//! - [`realdata`]: the real-data corpus (`shared/realdata`, other projects'
//!   narinfos, NARs, keys and signature vectors) through the narinfo
//!   parser, fingerprint, signature and content-address checks; and
//!   (`realdata::proxy`) through the real binary: exact bytes served,
//!   forgeries refused, NARs relayed byte for byte.

mod alerts;
mod architecture;
mod bench;
mod canonical;
mod canonical_hedge;
mod cli;
mod client;
mod crash;
mod discovery;
mod e2e_nix;
mod early_start;
mod endpoints;
mod failover;
mod fake;
mod farm;
mod faults;
mod fuzz_corpus;
mod harness;
mod health;
mod hedge;
mod index;
mod logging;
mod mesh;
mod metrics;
mod nar;
mod narinfo_side;
mod ops;
mod overload;
mod parity;
mod ranged;
mod realdata;
mod route_persist;
mod routing;
mod s3;
mod server;
mod status;
mod systemd;
mod tier_hedge;
