//! A CNI plugin composed of swappable parts: an [`Ipam`] and a [`PodNetwork`].
//!
//! [`Composed`] implements the runner's [`Plugin`] for any [`Parts`]: a factory that builds
//! (and validates) both parts from the request before either acts. The ADD sequence is the
//! one every main CNI plugin follows:
//!
//! 1. build and validate both parts, and check that `CNI_NETNS` is a network namespace
//!    (nothing touched yet);
//! 2. allocate addresses (idempotent per attachment);
//! 3. plug the pod in; if that fails, release the addresses again (unless the attachment
//!    held them before this ADD) and return the error ([`Error::AlreadySetUp`] when the
//!    attachment held its addresses and its interface exists: a repeated ADD);
//! 4. return the result with the configuration's `dns` when the IPAM gave none.
//!
//! DEL releases and then unplugs (the order of the reference plugins), running both steps
//! even if one fails, and succeeds when the attachment is already gone. CHECK asks both
//! parts; GC goes to the IPAM; STATUS asks [`Parts::status`].
//!
//! ```no_run
//! use async_trait::async_trait;
//! use cni_core::compose::{Composed, Parts};
//! use cni_core::ipam::{DelegatedIpam, Ipam};
//! use cni_core::linux::{NetNs, RoutedConfig, RoutedNetwork};
//! use cni_core::network::PodNetwork;
//! use cni_core::runner::Request;
//!
//! /// Routed pods, addresses from whatever IPAM plugin the configuration names.
//! struct MyParts;
//!
//! #[async_trait]
//! impl Parts for MyParts {
//!     async fn ipam(&self, request: &Request) -> cni_core::Result<Box<dyn Ipam>> {
//!         Ok(Box::new(DelegatedIpam::new(request)?))
//!     }
//!     async fn network(&self, request: &Request) -> cni_core::Result<Box<dyn PodNetwork>> {
//!         let config: RoutedConfig = request.config.plugin_config()?;
//!         Ok(Box::new(RoutedNetwork::new(config, NetNs::current().await?)?))
//!     }
//! }
//!
//! # async fn demo() {
//! let plugin = Composed::new(MyParts);
//! // cni_core::runner::run(&plugin, std::env::vars(), &stdin, &mut std::io::stdout()).await;
//! # }
//! ```

use async_trait::async_trait;

use crate::error::{Error, Result};
use crate::ipam::{Attachment, Ipam};
use crate::network::{Pod, PodNetwork};
use crate::runner::{Plugin, Request};
use crate::spec::CniResult;

/// Builds the parts of a composed plugin for one request.
///
/// Both builders must validate their configuration without side effects; [`Composed`]
/// builds both before either acts, so a bad configuration creates nothing.
#[async_trait]
pub trait Parts: Send + Sync {
    /// The IPAM for this request. Errors: 7 for a bad `ipam` section.
    async fn ipam(&self, request: &Request) -> Result<Box<dyn Ipam>>;

    /// The pod network for this request. Errors: 7 for a bad configuration.
    async fn network(&self, request: &Request) -> Result<Box<dyn PodNetwork>>;

    /// STATUS: `Ok` when ADD can work now; [`Error::NotReady`] (code 50) otherwise.
    /// The default is always ready.
    async fn status(&self, request: &Request) -> Result<()> {
        let _ = request;
        Ok(())
    }

    /// `CNI_ARGS` keys these parts understand, besides the well-known ones.
    fn extra_args(&self) -> &'static [&'static str] {
        &[]
    }
}

/// A [`Plugin`] made of an [`Ipam`] and a [`PodNetwork`] built by `P`.
#[derive(Debug, Clone, Default)]
pub struct Composed<P> {
    parts: P,
}

impl<P: Parts> Composed<P> {
    /// Composes a plugin from a parts factory.
    pub fn new(parts: P) -> Self {
        Composed { parts }
    }

    /// The parts factory.
    pub fn parts(&self) -> &P {
        &self.parts
    }
}

fn pod_of(request: &Request) -> Pod {
    Pod {
        attachment: request.attachment(),
        netns: request.netns.clone(),
    }
}

#[async_trait]
impl<P: Parts> Plugin for Composed<P> {
    async fn add(&self, request: &Request) -> Result<CniResult> {
        let ipam = self.parts.ipam(request).await?;
        let network = self.parts.network(request).await?;
        let pod = pod_of(request);
        // A bad CNI_NETNS would only show in the pod network, after the IPAM has claimed a
        // block or written its records: refuse it before anything is allocated.
        if let Some(path) = &pod.netns {
            crate::linux::netns::verify(path)?;
        }
        let allocation = ipam.allocate(&pod.attachment).await?;
        let mut result = match network.add(&pod, &allocation).await {
            Ok(result) => result,
            Err(err) => {
                // Addresses the attachment held before this ADD (a repeated ADD of a running
                // pod) may be in use: they stay, and the runtime's DEL releases them.
                if allocation.existing {
                    tracing::warn!(
                        attachment = ?pod.attachment,
                        error = %err,
                        "ADD failed; the addresses the attachment held before are kept"
                    );
                    // Its addresses held and its interface there: this ADD repeats one
                    // that worked. Say so, rather than only what the kernel said.
                    if matches!(err, Error::LinkExists { .. }) {
                        return Err(Error::AlreadySetUp {
                            container_id: pod.attachment.container_id.clone(),
                            ifname: pod.attachment.ifname.clone(),
                            addresses: allocation
                                .ips
                                .iter()
                                .map(|ip| ip.address.to_string())
                                .collect::<Vec<_>>()
                                .join(", "),
                            source: Box::new(err),
                        });
                    }
                    return Err(err);
                }
                if let Err(release) = ipam.release(&pod.attachment).await {
                    tracing::error!(
                        attachment = ?pod.attachment,
                        error = %release,
                        "rollback: releasing the addresses failed"
                    );
                    return Err(Error::Multiple(vec![err, release]));
                }
                return Err(err);
            }
        };
        if result.dns.is_empty()
            && let Some(dns) = &request.config.dns
        {
            result.dns = dns.clone();
        }
        Ok(result)
    }

    async fn del(&self, request: &Request) -> Result<()> {
        let ipam = self.parts.ipam(request).await?;
        let network = self.parts.network(request).await?;
        let pod = pod_of(request);
        let mut errors = Vec::new();
        // The addresses first, while the pod's interface still exists, as the reference
        // plugins do: a delegated IPAM may need it to release (dhcp sends its release from
        // the pod's interface). Either failing does not stop the other.
        if let Err(e) = ipam.release(&pod.attachment).await {
            errors.push(e);
        }
        if let Err(e) = network.del(&pod, request.prev_result.as_ref()).await {
            errors.push(e);
        }
        Error::collect(errors)
    }

    async fn check(&self, request: &Request) -> Result<()> {
        let ipam = self.parts.ipam(request).await?;
        let network = self.parts.network(request).await?;
        let pod = pod_of(request);
        let prev = request
            .prev_result
            .as_ref()
            .ok_or_else(|| Error::invalid_config("prevResult", "CHECK needs the ADD result"))?;
        let allocation = ipam.check(&pod.attachment).await?;
        for ip in &allocation.ips {
            if !prev
                .ips
                .iter()
                .any(|p| p.address.addr() == ip.address.addr())
            {
                return Err(Error::invalid_config(
                    "prevResult.ips",
                    format!("{} is allocated but not in prevResult", ip.address),
                ));
            }
        }
        network.check(&pod, prev).await
    }

    async fn gc(&self, request: &Request, valid: &[Attachment]) -> Result<()> {
        let ipam = self.parts.ipam(request).await?;
        let report = ipam.gc(valid).await?;
        for gone in &report.released {
            tracing::info!(attachment = ?gone, "gc released a stale attachment");
        }
        Ok(())
    }

    async fn status(&self, request: &Request) -> Result<()> {
        self.parts.status(request).await
    }

    fn extra_args(&self) -> &'static [&'static str] {
        self.parts.extra_args()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::ipam::{Allocation, GcReport};
    use crate::network::PodNetwork;

    /// Counts the IPAM calls that write to a datastore; holds at most one attachment.
    #[derive(Default)]
    struct Counting {
        allocations: AtomicUsize,
        releases: AtomicUsize,
        held: std::sync::Mutex<Option<Attachment>>,
    }

    #[async_trait]
    impl Ipam for Arc<Counting> {
        async fn allocate(&self, a: &Attachment) -> Result<Allocation> {
            self.allocations.fetch_add(1, Ordering::SeqCst);
            let existing = self.held.lock().unwrap().replace(a.clone()).as_ref() == Some(a);
            Ok(Allocation {
                existing,
                ..Allocation::default()
            })
        }
        async fn release(&self, _: &Attachment) -> Result<()> {
            self.releases.fetch_add(1, Ordering::SeqCst);
            *self.held.lock().unwrap() = None;
            Ok(())
        }
        async fn check(&self, a: &Attachment) -> Result<Allocation> {
            match &*self.held.lock().unwrap() {
                Some(held) if held == a => Ok(Allocation::default()),
                _ => Err(Error::UnknownContainer {
                    container_id: a.container_id.clone(),
                    ifname: a.ifname.clone(),
                }),
            }
        }
        async fn gc(&self, _: &[Attachment]) -> Result<GcReport> {
            Ok(GcReport::default())
        }
    }

    /// A pod network that touches nothing; its ADD fails when `fail` is set.
    struct Unplugged {
        fail: bool,
    }

    #[async_trait]
    impl PodNetwork for Unplugged {
        fn kind(&self) -> &'static str {
            "none"
        }
        async fn add(&self, _: &Pod, _: &Allocation) -> Result<CniResult> {
            if self.fail {
                return Err(Error::kernel(
                    "ip link add",
                    std::io::Error::other("exists"),
                ));
            }
            Ok(CniResult::default())
        }
        async fn del(&self, _: &Pod, _: Option<&CniResult>) -> Result<()> {
            Ok(())
        }
        async fn check(&self, _: &Pod, _: &CniResult) -> Result<()> {
            Ok(())
        }
    }

    struct TestParts(Arc<Counting>, Arc<std::sync::atomic::AtomicBool>);

    impl TestParts {
        fn new(ipam: &Arc<Counting>) -> Self {
            TestParts(Arc::clone(ipam), Arc::default())
        }
    }

    #[async_trait]
    impl Parts for TestParts {
        async fn ipam(&self, _: &Request) -> Result<Box<dyn Ipam>> {
            Ok(Box::new(Arc::clone(&self.0)))
        }
        async fn network(&self, _: &Request) -> Result<Box<dyn PodNetwork>> {
            Ok(Box::new(Unplugged {
                fail: self.1.load(Ordering::SeqCst),
            }))
        }
    }

    fn add_request(netns: &str) -> Request {
        let env = [
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "ctr"),
            ("CNI_NETNS", netns),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/opt/cni/bin"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned()));
        let conf = br#"{"cniVersion":"1.0.0","name":"n","type":"x","ipam":{"type":"y"}}"#;
        Request::from_env(env, conf, &[]).unwrap()
    }

    #[tokio::test]
    async fn add_refuses_a_bad_netns_before_allocating() {
        let counting = Arc::new(Counting::default());
        let plugin = Composed::new(TestParts::new(&counting));
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("gone");
        for netns in [
            "/etc/hostname",
            "/proc/self/ns/mnt",
            missing.to_str().unwrap(),
        ] {
            let err = plugin.add(&add_request(netns)).await.unwrap_err();
            assert_eq!(err.code().0, 4, "{netns}: {err}");
        }
        assert_eq!(counting.allocations.load(Ordering::SeqCst), 0);
        // The namespace of this process is one: the ADD goes through.
        plugin.add(&add_request("/proc/self/ns/net")).await.unwrap();
        assert_eq!(counting.allocations.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_failed_add_releases_only_what_it_allocated() {
        let counting = Arc::new(Counting::default());
        let parts = TestParts::new(&counting);
        let fail = Arc::clone(&parts.1);
        let plugin = Composed::new(parts);
        let request = add_request("/proc/self/ns/net");

        fail.store(true, Ordering::SeqCst);
        plugin.add(&request).await.unwrap_err();
        assert_eq!(counting.releases.load(Ordering::SeqCst), 1, "rolled back");
        assert!(counting.held.lock().unwrap().is_none());

        fail.store(false, Ordering::SeqCst);
        plugin.add(&request).await.unwrap();
        // The same attachment again, failing this time: its addresses stay.
        fail.store(true, Ordering::SeqCst);
        plugin.add(&request).await.unwrap_err();
        assert_eq!(counting.releases.load(Ordering::SeqCst), 1, "kept");
        assert_eq!(*counting.held.lock().unwrap(), Some(request.attachment()));
    }

    /// Both parts of a DEL, writing what they do into one log; the release fails on demand.
    #[derive(Clone, Default)]
    struct Logged {
        log: Arc<std::sync::Mutex<Vec<&'static str>>>,
        fail_release: bool,
    }

    #[async_trait]
    impl Ipam for Logged {
        async fn allocate(&self, _: &Attachment) -> Result<Allocation> {
            Ok(Allocation::default())
        }
        async fn release(&self, _: &Attachment) -> Result<()> {
            self.log.lock().unwrap().push("release");
            if self.fail_release {
                return Err(Error::Store(crate::error::StoreError::Timeout {
                    endpoint: "test".into(),
                    millis: 1,
                    op: "release",
                }));
            }
            Ok(())
        }
        async fn check(&self, _: &Attachment) -> Result<Allocation> {
            Ok(Allocation::default())
        }
        async fn gc(&self, _: &[Attachment]) -> Result<GcReport> {
            Ok(GcReport::default())
        }
    }

    #[async_trait]
    impl PodNetwork for Logged {
        fn kind(&self) -> &'static str {
            "logged"
        }
        async fn add(&self, _: &Pod, _: &Allocation) -> Result<CniResult> {
            Ok(CniResult::default())
        }
        async fn del(&self, _: &Pod, _: Option<&CniResult>) -> Result<()> {
            self.log.lock().unwrap().push("unplug");
            Ok(())
        }
        async fn check(&self, _: &Pod, _: &CniResult) -> Result<()> {
            Ok(())
        }
    }

    #[async_trait]
    impl Parts for Logged {
        async fn ipam(&self, _: &Request) -> Result<Box<dyn Ipam>> {
            Ok(Box::new(self.clone()))
        }
        async fn network(&self, _: &Request) -> Result<Box<dyn PodNetwork>> {
            Ok(Box::new(self.clone()))
        }
    }

    #[tokio::test]
    async fn del_releases_before_it_unplugs_and_unplugs_when_the_release_fails() {
        let mut request = add_request("/proc/self/ns/net");
        request.command = crate::spec::Command::Del;
        let parts = Logged::default();
        Composed::new(parts.clone()).del(&request).await.unwrap();
        assert_eq!(*parts.log.lock().unwrap(), ["release", "unplug"]);

        let failing = Logged {
            fail_release: true,
            ..Logged::default()
        };
        let err = Composed::new(failing.clone())
            .del(&request)
            .await
            .unwrap_err();
        assert_eq!(err.code().0, 11, "the release's error: {err}");
        assert_eq!(*failing.log.lock().unwrap(), ["release", "unplug"]);
    }
}
