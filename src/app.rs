//! Startup wiring (filled by the foundation work).

/// Process entry point; returns the exit code.
pub fn main_entry() -> i32 {
    0
}
