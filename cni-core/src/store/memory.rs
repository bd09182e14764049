//! TODO
/// Mem.
pub struct MemoryStore;
