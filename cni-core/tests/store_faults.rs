//! The file store on a disk that fills up: a size-limited tmpfs mounted by the test on a
//! directory of its own (unmounted afterwards, also on failure). Needs root.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use cni_core::ErrorCode;
use cni_core::ipam::block::{BlockIpam, BlockIpamConfig};
use cni_core::ipam::{Attachment, Ipam};
use cni_core::store::FileStore;
use cni_core::store::file::{DATA_FILE, TEMP_FILE};
use nix::mount::{MntFlags, MsFlags, mount, umount2};

/// A tmpfs of `size` on a fresh temporary directory; unmounted and removed on drop.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::tempdir().expect("mount point");
        mount(
            Some("tmpfs"),
            dir.path(),
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            Some(format!("size={size},mode=0700").as_str()),
        )
        .expect("mount a tmpfs");
        Tmpfs { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = umount2(self.dir.path(), MntFlags::MNT_DETACH);
    }
}

/// Fills the file system up with `path`, one 4 KiB page at a time, until a write fails.
fn fill(path: &Path) {
    use std::io::Write;
    let mut f = std::fs::File::create(path).expect("filler");
    let page = [0u8; 4096];
    while f.write_all(&page).is_ok() {}
    let _ = f.sync_all();
}

fn engine(dir: &Path) -> BlockIpam<FileStore> {
    let mut config = BlockIpamConfig::new("10.96.0.0/22".parse().unwrap(), "node-1", "full");
    config.block_prefix = 26;
    BlockIpam::new(FileStore::new(dir), config).expect("engine")
}

fn pod(i: usize) -> Attachment {
    Attachment::new("full", format!("pod-{i}"), "eth0")
}

/// Disk full during ADD: a clear I/O error (code 5, naming the file and the cause), the
/// store as it was (readable, consistent, no partial temporary file taking the last free
/// space); once space is freed, the same ADD works and no address is held twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_full_is_a_clear_error_and_the_store_stays_whole() {
    if !testkit::root("disk_full_is_a_clear_error_and_the_store_stays_whole") {
        return;
    }
    let fs = Tmpfs::mount("256k");
    let dir: PathBuf = fs.path().join("ipam");
    let ipam = engine(&dir);
    let mut held = Vec::new();
    for i in 0..20 {
        held.push(
            ipam.allocate(&pod(i))
                .await
                .expect("ADD with space left")
                .ips[0]
                .address,
        );
    }
    let before = std::fs::read(dir.join(DATA_FILE)).expect("store written");

    let filler = fs.path().join("filler");
    fill(&filler);
    let e = ipam
        .allocate(&pod(20))
        .await
        .expect_err("ADD on a full disk fails");
    let chain = {
        let mut s = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(c) = source {
            s.push_str(": ");
            s.push_str(&c.to_string());
            source = c.source();
        }
        s
    };
    eprintln!("ADD on a full disk: {chain}");
    assert_eq!(e.code(), ErrorCode::IO_FAILURE, "{chain}");
    assert!(
        chain.contains("No space left on device"),
        "says why: {chain}"
    );
    assert!(
        chain.contains(&dir.display().to_string()),
        "names the file: {chain}"
    );

    // The store is the version before the failed ADD, whole.
    assert_eq!(
        std::fs::read(dir.join(DATA_FILE)).expect("store still there"),
        before,
        "the failed ADD changed nothing"
    );
    assert!(
        !dir.join(TEMP_FILE).exists(),
        "a partial {TEMP_FILE} is left taking the disk's last free space"
    );
    // Reads still work while the disk is full: DEL of a pod that was never added, CHECK.
    ipam.release(&pod(20))
        .await
        .expect("DEL of nothing on a full disk");
    ipam.check(&pod(3)).await.expect("CHECK on a full disk");

    std::fs::remove_file(&filler).expect("free the space");
    let again = ipam
        .allocate(&pod(20))
        .await
        .expect("ADD once space is free");
    let addr = again.ips[0].address.addr();
    assert!(!again.existing, "a fresh allocation");

    let allocations = ipam.allocations().await.expect("allocations");
    let ips: BTreeSet<IpAddr> = allocations.iter().map(|(_, ip)| *ip).collect();
    assert_eq!(allocations.len(), 21, "{allocations:?}");
    assert_eq!(ips.len(), 21, "no address held twice: {allocations:?}");
    assert!(ips.contains(&addr));
    for a in &held {
        assert!(ips.contains(&a.addr()), "{a} still held");
    }
    let problems = ipam.audit().await.expect("audit");
    assert!(problems.is_empty(), "store consistent: {problems:?}");
}
