//! ncro's integration test binary: one binary, one module per area.
//!
//! - [`fake`]: a fake upstream binary cache with fault injection, plus
//!   independently written Nix test data (keys, narinfos, NARs).
//! - [`harness`]: runs the real `ncro` binary and talks HTTP/1.1 to it.
//! - [`e2e_nix`]: the real Nix client through the real `ncro` binary.
//! - [`health`]: health probing, routing order, cooldowns and limits.

mod e2e_nix;
mod fake;
mod harness;
mod health;
