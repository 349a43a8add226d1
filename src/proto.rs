//! Pure Nix binary-cache formats. Nothing here does I/O; everything that
//! parses bytes from the network lives here and is fuzzed.

pub mod base32;
pub mod cache_index;
pub mod cache_info;
pub mod content_address;
pub mod narinfo;
pub mod nixbloom;
pub mod signature;
pub mod store_path;
