//! Progress of a long step (apply, export, calibration), reported by the library and drawn by the
//! CLI, so that no library module knows about terminals.

/// Receives the progress of one step at a time.
pub trait Progress {
    fn start(&mut self, what: &str, total: u64);
    fn advance(&mut self, done: u64);
    fn finish(&mut self);
}
