//! cache_info
