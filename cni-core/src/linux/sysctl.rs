//! Several sysctls at once.
//!
//! `/proc/sys/net` shows the namespace of the reading thread, so writing one needs a thread
//! inside the namespace: [`ensure`] does a whole batch on a single such thread.

use super::NetNs;
use super::netns::sysctl_path;
use crate::error::{Error, Result};

/// Sets each `(key, value)` in `ns`, like `sysctl -w KEY=VALUE …` there, writing only those
/// whose current value differs (some writes have side effects even when nothing changes,
/// and a read is cheaper). Keys are dotted (`net.ipv4.ip_forward`) or, for interface names
/// with dots, slash-separated. Stops at the first failure.
pub async fn ensure(ns: &NetNs, settings: Vec<(String, String)>) -> Result<()> {
    if settings.is_empty() {
        return Ok(());
    }
    ns.run(move || {
        for (key, value) in &settings {
            let path = sysctl_path(key);
            let current = std::fs::read_to_string(&path)
                .map_err(|e| Error::kernel(format!("sysctl {key}"), e))?;
            if current.trim() != value {
                std::fs::write(&path, value.as_bytes()).map_err(|e| {
                    // A container's /proc/sys is read-only unless it is privileged.
                    let hint = if e.raw_os_error() == Some(libc::EROFS) {
                        format!(" (/proc/sys is read-only here: set {key}={value} on the node)")
                    } else {
                        String::new()
                    };
                    Error::kernel(format!("sysctl -w {key}={value}{hint}"), e)
                })?;
            }
        }
        Ok(())
    })
    .await?
}
