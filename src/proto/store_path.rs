//! store_path
