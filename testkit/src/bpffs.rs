//! A BPF filesystem of one test's own.

use std::path::{Path, PathBuf};

/// A BPF filesystem mounted on a fresh directory under the temporary directory
/// (`cnkt-bpffs-<tag>-<pid>`), unmounted (with every pin in it) and removed on drop, also
/// when the test panics: a test's pins never touch the machine's `/sys/fs/bpf`, which every
/// network namespace shares. Each mount of `bpf` is a file system of its own.
#[derive(Debug)]
pub struct Bpffs {
    dir: PathBuf,
}

impl Bpffs {
    /// Mounts it, like `mount -t bpf bpf DIR`; panics when it cannot (needs root).
    pub fn mount(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("cnkt-bpffs-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        nix::mount::mount(
            Some("bpf"),
            &dir,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .unwrap_or_else(|e| panic!("mount -t bpf bpf {}: {e}", dir.display()));
        Bpffs { dir }
    }

    /// Where it is mounted.
    pub fn path(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        if let Err(e) = nix::mount::umount2(&self.dir, nix::mount::MntFlags::MNT_DETACH) {
            eprintln!("cannot unmount {}: {e}", self.dir.display());
        }
        if let Err(e) = std::fs::remove_dir(&self.dir) {
            eprintln!("cannot remove {}: {e}", self.dir.display());
        }
    }
}
