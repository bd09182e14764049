//! An L2 segment of test namespaces: a "switch" namespace holding a bridge `br0`, and
//! other namespaces plugged into it by veth pairs made inside the switch namespace.

use std::sync::atomic::{AtomicU32, Ordering};

use crate::{Namespaces, ip};

/// A switch namespace with a bridge `br0`, up.
#[derive(Debug)]
pub struct Segment {
    switch: String,
    ports: AtomicU32,
}

impl Segment {
    /// Creates the switch namespace `suffix` of `namespaces` with its bridge.
    pub fn new(namespaces: &Namespaces, suffix: &str) -> Self {
        let switch = namespaces.add(suffix);
        ip(&switch, &["link", "add", "br0", "type", "bridge"]);
        ip(&switch, &["link", "set", "br0", "up"]);
        Segment {
            switch,
            ports: AtomicU32::new(0),
        }
    }

    /// The switch namespace's full name.
    pub fn name(&self) -> &str {
        &self.switch
    }

    /// Plugs the namespace `ns` in: a veth `ifname` there with `cidr`, up, and `lo` up.
    pub fn plug(&self, ns: &str, ifname: &str, cidr: &str) {
        let port = format!("p{}", self.ports.fetch_add(1, Ordering::Relaxed));
        ip(
            &self.switch,
            &[
                "link", "add", &port, "type", "veth", "peer", "name", ifname, "netns", ns,
            ],
        );
        ip(&self.switch, &["link", "set", &port, "master", "br0", "up"]);
        ip(ns, &["addr", "add", cidr, "dev", ifname]);
        ip(ns, &["link", "set", ifname, "up"]);
        ip(ns, &["link", "set", "lo", "up"]);
    }
}
