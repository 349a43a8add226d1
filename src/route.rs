//! route
pub mod persist;
