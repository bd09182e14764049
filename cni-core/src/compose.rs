//! A CNI plugin composed of swappable parts: an [`Ipam`] and a [`PodNetwork`].
//!
//! [`Composed`] implements the runner's [`Plugin`] for any [`Parts`]: a factory that builds
//! (and validates) both parts from the request before either acts. The ADD sequence is the
//! one every main CNI plugin follows:
//!
//! 1. build and validate both parts (nothing touched yet);
//! 2. allocate addresses (idempotent per attachment);
//! 3. plug the pod in; if that fails, release the addresses again and return the error;
//! 4. return the result with the configuration's `dns` when the IPAM gave none.
//!
//! DEL unplugs and releases, running both steps even if one fails, and succeeds when the
//! attachment is already gone. CHECK asks both parts; GC goes to the IPAM; STATUS asks
//! [`Parts::status`].
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
        let allocation = ipam.allocate(&pod.attachment).await?;
        let mut result = match network.add(&pod, &allocation).await {
            Ok(result) => result,
            Err(err) => {
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
        if result.dns.is_empty() {
            if let Some(dns) = &request.config.dns {
                result.dns = dns.clone();
            }
        }
        Ok(result)
    }

    async fn del(&self, request: &Request) -> Result<()> {
        let ipam = self.parts.ipam(request).await?;
        let network = self.parts.network(request).await?;
        let pod = pod_of(request);
        let mut errors = Vec::new();
        if let Err(e) = network.del(&pod, request.prev_result.as_ref()).await {
            errors.push(e);
        }
        if let Err(e) = ipam.release(&pod.attachment).await {
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
