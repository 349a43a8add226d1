//! upstream
pub mod filter;
