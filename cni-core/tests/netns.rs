//! Namespace handles against the real kernel (needs root; skips loudly without it).

use cni_core::linux::{NetNs, netns};
use futures::TryStreamExt;

fn unique(name: &str) -> String {
    format!("cnkt-{name}-{}", std::process::id())
}

fn root() -> bool {
    testkit::root("netns tests")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handle_sees_only_its_own_namespace() {
    if !root() {
        return;
    }
    let name = unique("h");
    let path = netns::create_named(&name).expect("create netns");
    let guard = scopeguard(name.clone());
    let ns = NetNs::open(&path).await.expect("open netns");
    let links: Vec<_> = ns
        .handle()
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .expect("list links");
    // A fresh namespace has exactly one link: lo.
    assert_eq!(links.len(), 1, "fresh netns should only have lo");

    // A sysctl written in the namespace is visible there and not in ours. The value written
    // is the opposite of ours (a new namespace starts from our IPv4 settings), so a write
    // that reached our namespace would show; ours is only ever read.
    let ours = || {
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward")
            .expect("read our ip_forward")
            .trim()
            .to_owned()
    };
    let before = ours();
    let other = if before == "1" { "0" } else { "1" };
    ns.set_sysctl("net.ipv4.ip_forward", other)
        .await
        .expect("sysctl");
    assert_eq!(ns.get_sysctl("net.ipv4.ip_forward").await.unwrap(), other);
    assert_eq!(ours(), before, "the namespace's sysctl changed ours");
    drop(ns);
    drop(guard);
    assert!(!path.exists());
}

#[tokio::test]
async fn refuses_what_is_not_a_netns() {
    if !root() {
        return;
    }
    let err = NetNs::open("/etc/hostname").await.unwrap_err();
    assert_eq!(err.code().0, 4, "{err}");
    let err = NetNs::open("/proc/self/ns/uts").await.unwrap_err();
    assert_eq!(err.code().0, 4, "{err}");
    let err = NetNs::open("/nonexistent/ns").await.unwrap_err();
    assert_eq!(err.code().0, 4, "{err}");
}

struct Guard(String);
impl Drop for Guard {
    fn drop(&mut self) {
        let _ = netns::delete_named(&self.0);
    }
}
fn scopeguard(name: String) -> Guard {
    Guard(name)
}
