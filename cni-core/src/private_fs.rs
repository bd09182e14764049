//! Files and directories of a node that only their owner (root) may read: the data
//! directory, the file store, the node state file, log files. They name every pod, its
//! addresses and the node's peers, and the runtime's other users have no business there.
//!
//! Created directories get mode 0700 and created files 0600 (before the umask, which can
//! only take bits away); what already exists keeps the mode it has.

use std::fs::{DirBuilder, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;

/// Mode of the directories created here.
pub const DIR_MODE: u32 = 0o700;
/// Mode of the files created here.
pub const FILE_MODE: u32 = 0o600;

/// Like `mkdir -p -m 0700 PATH`: creates `path` and its missing parents with [`DIR_MODE`].
pub fn create_dir_all(path: &Path) -> io::Result<()> {
    DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(path)
}

/// [`OpenOptions`] that create files with [`FILE_MODE`]; set the access mode as usual.
pub fn open_options() -> OpenOptions {
    let mut options = OpenOptions::new();
    options.mode(FILE_MODE);
    options
}

/// Like [`std::fs::write`], creating the file with [`FILE_MODE`].
pub fn write(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::io::Write;
    open_options()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?
        .write_all(bytes)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn created_dirs_and_files_are_owner_only() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a/b");
        create_dir_all(&dir).unwrap();
        assert_eq!(mode(&tmp.path().join("a")) & 0o077, 0);
        assert_eq!(mode(&dir) & 0o077, 0);
        write(&dir.join("f"), b"x").unwrap();
        assert_eq!(mode(&dir.join("f")) & 0o077, 0);
        // Existing directories are left as they are.
        create_dir_all(tmp.path()).unwrap();
    }
}
