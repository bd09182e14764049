//! Network namespace handles.
//!
//! A [`NetNs`] owns an open namespace file and a netlink connection whose socket was created
//! inside that namespace (on a short-lived thread that called `setns`), then driven from the
//! normal tokio runtime. No tokio worker ever changes namespace, and nothing depends on "the
//! current namespace" of a thread.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, IntoRawFd};
use std::path::{Path, PathBuf};

use nix::sched::{CloneFlags, setns};
use nix::sys::statfs::{NSFS_MAGIC, fstatfs};
use tokio::task::JoinHandle;

use crate::error::{Error, Result};

/// Where `ip netns` keeps named namespaces.
pub const NETNS_RUN_DIR: &str = "/run/netns";

/// `ioctl(NS_GET_NSTYPE)`: returns the `CLONE_NEW*` type of a namespace file.
const NS_GET_NSTYPE: libc::c_ulong = 0xb703;

/// An open network namespace with a netlink connection inside it.
///
/// Dropping the handle closes the connection; the namespace itself lives on (it belongs to
/// whoever created it).
pub struct NetNs {
    file: File,
    path: PathBuf,
    handle: rtnetlink::Handle,
    connection: JoinHandle<()>,
}

impl std::fmt::Debug for NetNs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetNs").field("path", &self.path).finish()
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        self.connection.abort();
    }
}

impl NetNs {
    /// Opens the network namespace at `path` (`/proc/PID/ns/net`, `/run/netns/NAME`, a bind
    /// mount…). Refuses anything that is not a network namespace with [`Error::NotANetns`].
    ///
    /// Must be called from within a tokio runtime.
    pub async fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = open_netns_file(&path)?;
        Self::from_file(file, path).await
    }

    /// Opens the namespace of the calling process (the node's namespace for a CNI plugin).
    pub async fn current() -> Result<Self> {
        Self::open("/proc/self/ns/net").await
    }

    /// Opens the namespace created by `ip netns add NAME`.
    pub async fn named(name: &str) -> Result<Self> {
        Self::open(Path::new(NETNS_RUN_DIR).join(name)).await
    }

    async fn from_file(file: File, path: PathBuf) -> Result<Self> {
        let dup = file
            .try_clone()
            .map_err(|e| Error::kernel(format!("dup netns fd of {}", path.display()), e))?;
        let raw = run_in_netns(dup, || {
            netlink_sys::Socket::new(netlink_sys::protocols::NETLINK_ROUTE).map(|s| s.into_raw_fd())
        })
        .await
        .and_then(|r| r.map_err(|e| Error::kernel("open netlink socket in netns", e)))?;
        // SAFETY: `raw` was just produced by `into_raw_fd` and is owned by nobody else.
        let socket = unsafe { netlink_sys::TokioSocket::from_raw_fd(raw) };
        let (connection, handle, _) = rtnetlink::from_socket(socket);
        let connection = tokio::spawn(connection);
        Ok(NetNs {
            file,
            path,
            handle,
            connection,
        })
    }

    /// The netlink handle bound to this namespace.
    pub fn handle(&self) -> &rtnetlink::Handle {
        &self.handle
    }

    /// The path this namespace was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The namespace file descriptor (for `IFLA_NET_NS_FD`).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// Runs `f` on a fresh thread that has entered this namespace, and returns its result.
    /// The thread exits afterwards, so the namespace switch never leaks to other work.
    /// For the few things netlink cannot do: `/proc/sys` writes, sockets bound in the pod.
    pub async fn run<F, R>(&self, f: F) -> Result<R>
    where
        F: FnOnce() -> R + Send + 'static,
        R: Send + 'static,
    {
        let dup = self
            .file
            .try_clone()
            .map_err(|e| Error::kernel(format!("dup netns fd of {}", self.path.display()), e))?;
        run_in_netns(dup, f).await
    }

    /// Writes a sysctl inside this namespace, like `sysctl -w key=value` there.
    /// `key` is dotted (`net.ipv4.conf.eth0.proxy_arp`); interface names may contain dots,
    /// so pass them already as path segments with [`sysctl_path`].
    pub async fn set_sysctl(&self, key: &str, value: &str) -> Result<()> {
        let path = sysctl_path(key);
        let value = value.to_owned();
        let what = format!("sysctl -w {key}={value}");
        self.run(move || std::fs::write(&path, value.as_bytes()))
            .await?
            .map_err(|e| Error::kernel(what, e))
    }

    /// Reads a sysctl inside this namespace, trimmed.
    pub async fn get_sysctl(&self, key: &str) -> Result<String> {
        let path = sysctl_path(key);
        let what = format!("sysctl {key}");
        self.run(move || std::fs::read_to_string(&path))
            .await?
            .map(|s| s.trim().to_owned())
            .map_err(|e| Error::kernel(what, e))
    }
}

/// The `/proc/sys` path of a dotted sysctl key, e.g. `net.ipv4.ip_forward`.
///
/// Interface names with dots are written with `/` in the key instead
/// (`net/ipv4/conf/eth0.100/proxy_arp`): a key containing `/` is used as a path as is.
pub fn sysctl_path(key: &str) -> PathBuf {
    if key.contains('/') {
        Path::new("/proc/sys").join(key)
    } else {
        Path::new("/proc/sys").join(key.replace('.', "/"))
    }
}

/// Checks that `path` is a network namespace (`/proc/PID/ns/net`, `/run/netns/NAME`, a
/// bind mount…) without keeping it open or entering it. Errors: [`Error::NotANetns`]
/// (code 4).
pub fn verify(path: &Path) -> Result<()> {
    open_netns_file(path).map(drop)
}

/// Opens `path` and checks that it is a network namespace file. Errors:
/// [`Error::NotANetns`] (code 4).
pub(crate) fn open_netns_file(path: &Path) -> Result<File> {
    let not_netns = |reason: String| Error::NotANetns {
        path: path.to_path_buf(),
        reason,
    };
    let file = File::open(path).map_err(|e| {
        not_netns(match e.kind() {
            std::io::ErrorKind::NotFound => "no such file".into(),
            std::io::ErrorKind::PermissionDenied => "permission denied".into(),
            _ => e.to_string(),
        })
    })?;
    let fs = fstatfs(&file).map_err(|e| not_netns(e.to_string()))?;
    if fs.filesystem_type() != NSFS_MAGIC {
        return Err(not_netns("not a namespace file (nsfs)".into()));
    }
    // SAFETY: NS_GET_NSTYPE takes no argument and only reads the fd.
    let kind = unsafe { libc::ioctl(file.as_raw_fd(), NS_GET_NSTYPE as _) };
    if kind < 0 {
        return Err(not_netns(std::io::Error::last_os_error().to_string()));
    }
    if kind != libc::CLONE_NEWNET {
        return Err(not_netns("a namespace, but not a network namespace".into()));
    }
    Ok(file)
}

/// Runs `f` on a new OS thread inside the namespace `ns`.
async fn run_in_netns<F, R>(ns: File, f: F) -> Result<R>
where
    F: FnOnce() -> R + Send + 'static,
    R: Send + 'static,
{
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("cnikit-netns".into())
        .spawn(move || {
            // Entering the namespace the thread is already in changes nothing, and setns
            // needs CAP_SYS_ADMIN even then: an agent that acts in its own namespace runs
            // without it.
            let entered = if is_current(&ns) {
                Ok(())
            } else {
                setns(&ns, CloneFlags::CLONE_NEWNET)
                    .map_err(|e| Error::kernel("setns(CLONE_NEWNET)", e))
            };
            let result = entered.map(|()| f());
            let _ = tx.send(result);
        })
        .map_err(|e| Error::kernel("spawn netns thread", e))?;
    rx.await
        .map_err(|_| Error::kernel("netns thread", std::io::Error::other("thread panicked")))?
}

/// Whether `ns` is the network namespace of the calling thread (same nsfs device and inode).
fn is_current(ns: &File) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (ns.metadata(), std::fs::metadata("/proc/thread-self/ns/net")) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// Creates a named network namespace, like `ip netns add NAME`, and returns its path.
///
/// Used by tests and the lab; CNI plugins never create namespaces.
pub fn create_named(name: &str) -> Result<PathBuf> {
    let dir = Path::new(NETNS_RUN_DIR);
    let path = dir.join(name);
    let io = |what: &str, e: std::io::Error| Error::Io {
        what: format!("{what} {}", path.display()),
        source: e,
    };
    std::fs::create_dir_all(dir).map_err(|e| io("create", e))?;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(|e| io("create", e))?;
    let target = path.clone();
    let bound = std::thread::spawn(move || -> nix::Result<()> {
        nix::sched::unshare(CloneFlags::CLONE_NEWNET)?;
        nix::mount::mount(
            Some("/proc/thread-self/ns/net"),
            &target,
            None::<&str>,
            nix::mount::MsFlags::MS_BIND,
            None::<&str>,
        )
    })
    .join()
    .unwrap_or(Err(nix::Error::EINVAL));
    if let Err(e) = bound {
        let _ = std::fs::remove_file(&path);
        return Err(Error::kernel(format!("ip netns add {name}"), e));
    }
    Ok(path)
}

/// Removes a named network namespace, like `ip netns del NAME`. `Ok` if it does not exist.
pub fn delete_named(name: &str) -> Result<()> {
    let path = Path::new(NETNS_RUN_DIR).join(name);
    if !path.exists() {
        return Ok(());
    }
    match nix::mount::umount2(&path, nix::mount::MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::Error::EINVAL) => {}
        Err(e) => return Err(Error::kernel(format!("ip netns del {name}"), e)),
    }
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::Io {
            what: format!("remove {}", path.display()),
            source: e,
        }),
    }
}
