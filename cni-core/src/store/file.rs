//! TODO
/// File.
pub struct FileStore;
