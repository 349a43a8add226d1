//! ncro's integration test binary: one binary, one module per area.
//!
//! - [`fake`]: a fake upstream binary cache with fault injection, plus
//!   independently written Nix test data (keys, narinfos, NARs).
//! - [`harness`]: runs the real `ncro` binary and talks HTTP/1.1 to it.
//! - [`e2e_nix`]: the real Nix client through the real `ncro` binary.
//! - [`metrics`]: `/metrics` values after known traffic, ncro 2.2 names,
//!   the Grafana dashboard's queries.
//! - [`logging`]: log formats, logging config errors, no per-request lines
//!   at info, the debug access log, secrets kept out of logs.

mod e2e_nix;
mod fake;
mod harness;
mod logging;
mod metrics;
