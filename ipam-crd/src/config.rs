//! The `ipam.store` object of `type` [`TYPE`]: how to reach the API server.

use std::path::PathBuf;
use std::time::Duration;

use cni_core::StoreError;
use serde::{Deserialize, Serialize};

/// The `type` of the store object.
pub const TYPE: &str = "kubernetes";

/// The `ipam.store` object for the Kubernetes datastore.
///
/// ```json
/// "store": {"type": "kubernetes", "kubeconfig": "/etc/cni/net.d/cnikit-kubeconfig"}
/// ```
/// Without `kubeconfig`, the in-cluster service account is used (token and CA under
/// `/var/run/secrets/kubernetes.io/serviceaccount`, the server from
/// `KUBERNETES_SERVICE_HOST`/`_PORT`), as for a plugin installed by a DaemonSet whose
/// kubeconfig points at it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Config {
    /// Always [`TYPE`].
    #[serde(rename = "type")]
    pub kind: String,
    /// A kubeconfig file (its current context); none: in-cluster credentials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubeconfig: Option<PathBuf>,
    /// Prefix of every key, which names the pool's objects (default `/cnikit`: objects
    /// `cnikit`, `cnikit.<block>`, `cnikit.<node>`).
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// Deadline of every request, in milliseconds.
    #[serde(default = "default_timeout")]
    pub timeout_ms: u64,
    /// The namespace of the node registry's Leases (one per node), default `kube-system`.
    #[serde(default = "default_lease_namespace")]
    pub lease_namespace: String,
}

fn default_lease_namespace() -> String {
    "kube-system".to_owned()
}

fn default_prefix() -> String {
    cni_core::ipam::block::DEFAULT_KEY_PREFIX.to_owned()
}

fn default_timeout() -> u64 {
    5_000
}

impl Config {
    /// A configuration for a kubeconfig file (`None`: in-cluster).
    pub fn new(kubeconfig: Option<PathBuf>) -> Self {
        Config {
            kind: TYPE.to_owned(),
            kubeconfig,
            prefix: default_prefix(),
            timeout_ms: default_timeout(),
            lease_namespace: default_lease_namespace(),
        }
    }

    /// Parses the `ipam.store` object. Errors: code 7 naming the bad key.
    pub fn from_value(value: &serde_json::Value) -> cni_core::Result<Self> {
        let config: Config = serde_json::from_value(value.clone())
            .map_err(|e| cni_core::Error::invalid_config("ipam.store", e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// Checks the values. Errors: code 7.
    pub fn validate(&self) -> cni_core::Result<()> {
        if self.kind != TYPE {
            return Err(cni_core::Error::invalid_config(
                "ipam.store.type",
                format!("{:?} is not {TYPE:?}", self.kind),
            ));
        }
        if !self.prefix.starts_with('/') || crate::store::pool_name(&self.prefix).is_empty() {
            return Err(cni_core::Error::invalid_config(
                "ipam.store.prefix",
                format!("{:?} must start with '/' and name something", self.prefix),
            ));
        }
        if let Some(k) = &self.kubeconfig
            && !k.is_absolute()
        {
            return Err(cni_core::Error::invalid_config(
                "ipam.store.kubeconfig",
                format!("{} is not an absolute path", k.display()),
            ));
        }
        if !crate::store::is_dns_subdomain(&self.lease_namespace)
            || self.lease_namespace.contains('.')
            || self.lease_namespace.len() > 63
        {
            return Err(cni_core::Error::invalid_config(
                "ipam.store.leaseNamespace",
                format!("{:?} is not a namespace name", self.lease_namespace),
            ));
        }
        if self.timeout_ms == 0 {
            return Err(cni_core::Error::invalid_config(
                "ipam.store.timeoutMs",
                "must be more than 0",
            ));
        }
        Ok(())
    }

    /// A client: from the kubeconfig file, or in-cluster. Reads files, sends nothing.
    pub async fn client(&self) -> Result<kube::Client, StoreError> {
        let config_error =
            |what: String, e: Box<dyn std::error::Error + Send + Sync>| StoreError::Config {
                reason: what,
                source: Some(e),
            };
        let mut config = match &self.kubeconfig {
            Some(path) => {
                let kubeconfig = kube::config::Kubeconfig::read_from(path).map_err(|e| {
                    config_error(
                        format!("cannot read kubeconfig {}", path.display()),
                        e.into(),
                    )
                })?;
                kube::Config::from_custom_kubeconfig(
                    kubeconfig,
                    &kube::config::KubeConfigOptions::default(),
                )
                .await
                .map_err(|e| {
                    config_error(
                        format!("kubeconfig {} is unusable", path.display()),
                        e.into(),
                    )
                })?
            }
            None => kube::Config::incluster().map_err(|e| {
                config_error(
                    "no in-cluster service account (and no ipam.store.kubeconfig)".to_owned(),
                    e.into(),
                )
            })?,
        };
        let timeout = Duration::from_millis(self.timeout_ms);
        config.connect_timeout = Some(timeout);
        config.read_timeout = Some(timeout);
        config.write_timeout = Some(timeout);
        kube::Client::try_from(config)
            .map_err(|e| config_error("cannot build a Kubernetes client".to_owned(), e.into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_validates() {
        let c = Config::from_value(&serde_json::json!({
            "type": "kubernetes", "kubeconfig": "/etc/kube.conf"
        }))
        .unwrap();
        assert_eq!(
            c.kubeconfig.as_deref(),
            Some(std::path::Path::new("/etc/kube.conf"))
        );
        assert_eq!(c.prefix, "/cnikit");
        for bad in [
            serde_json::json!({"type": "kubernetes", "kubeconfig": "relative"}),
            serde_json::json!({"type": "kubernetes", "prefix": "x"}),
            serde_json::json!({"type": "kubernetes", "timeoutMs": 0}),
            serde_json::json!({"type": "kubernetes", "leaseNamespace": "Kube_System"}),
            serde_json::json!({"type": "kubernetes", "nope": 1}),
        ] {
            let e = Config::from_value(&bad).unwrap_err();
            assert_eq!(e.code().0, 7, "{bad}: {e}");
        }
    }
}
