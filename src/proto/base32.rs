//! base32
