//! [`BlockIpamConfig`], its validation, and the address arithmetic of pools and blocks.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Default block prefix length of IPv4 pools (64 addresses).
pub const DEFAULT_BLOCK_PREFIX_V4: u8 = 26;
/// Default block prefix length of IPv6 pools (64 addresses).
pub const DEFAULT_BLOCK_PREFIX_V6: u8 = 122;
/// Default datastore key prefix.
pub const DEFAULT_KEY_PREFIX: &str = "/cnikit";

/// Which addresses of a block are not handed out to pods.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Reserve {
    /// Every address of a block is usable (routed pod networks: pods get /32 or /128 routes,
    /// so the block's network and last addresses are ordinary hosts).
    #[default]
    None,
    /// The block is a subnet on a bridge: its network address and last address are never
    /// handed out, and its first host address is the gateway, returned in
    /// [`IpConfig::gateway`](crate::spec::IpConfig::gateway).
    Gateway,
}

/// Configuration of a [`BlockIpam`](super::BlockIpam).
///
/// In a network configuration it is the `ipam` object, for example
/// `{"pool": "10.244.0.0/16", "blockSize": 26, "maxBlocksPerNode": 8}`; `node` and `network`
/// are usually filled in by the plugin (node name, network `name`). Deserializing picks the
/// block size default by address family.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", from = "RawConfig")]
pub struct BlockIpamConfig {
    /// The pool every block is cut from (`ipam.pool`), for example `10.244.0.0/16`.
    pub pool: IpNet,
    /// Prefix length of a block (`ipam.blockSize`); default 26 for IPv4, 122 for IPv6.
    #[serde(rename = "blockSize")]
    pub block_prefix: u8,
    /// Name of this node (`ipam.node`); blocks and addresses are held per node.
    pub node: String,
    /// The network name (the configuration's `name`): [`gc`](crate::ipam::Ipam::gc) only
    /// releases attachments of this network.
    pub network: String,
    /// How many blocks one node may hold (`ipam.maxBlocksPerNode`), at least 1; no limit by
    /// default.
    pub max_blocks_per_node: u32,
    /// Which addresses of a block are kept back (`ipam.reserve`: `none` or `gateway`).
    pub reserve: Reserve,
    /// Prefix of every datastore key (`ipam.keyPrefix`), default `/cnikit`. Pools that share
    /// a datastore need distinct prefixes.
    pub key_prefix: String,
}

/// The serialized form, with the optional fields optional.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawConfig {
    #[serde(deserialize_with = "crate::spec::cidr::deserialize")]
    pool: IpNet,
    #[serde(default)]
    block_size: Option<u8>,
    #[serde(default)]
    node: String,
    #[serde(default)]
    network: String,
    #[serde(default)]
    max_blocks_per_node: Option<u32>,
    #[serde(default)]
    reserve: Reserve,
    #[serde(default)]
    key_prefix: Option<String>,
}

impl From<RawConfig> for BlockIpamConfig {
    fn from(raw: RawConfig) -> Self {
        let mut config = BlockIpamConfig::new(raw.pool, raw.node, raw.network);
        if let Some(b) = raw.block_size {
            config.block_prefix = b;
        }
        if let Some(m) = raw.max_blocks_per_node {
            config.max_blocks_per_node = m;
        }
        config.reserve = raw.reserve;
        if let Some(p) = raw.key_prefix {
            config.key_prefix = p;
        }
        config
    }
}

impl BlockIpamConfig {
    /// A configuration with the defaults: block size by address family, no block limit,
    /// [`Reserve::None`], key prefix `/cnikit`.
    pub fn new(pool: IpNet, node: impl Into<String>, network: impl Into<String>) -> Self {
        BlockIpamConfig {
            pool,
            block_prefix: match pool {
                IpNet::V4(_) => DEFAULT_BLOCK_PREFIX_V4,
                IpNet::V6(_) => DEFAULT_BLOCK_PREFIX_V6,
            },
            node: node.into(),
            network: network.into(),
            max_blocks_per_node: u32::MAX,
            reserve: Reserve::None,
            key_prefix: DEFAULT_KEY_PREFIX.to_owned(),
        }
    }

    /// Checks the configuration without touching anything.
    ///
    /// Errors (code 7, naming the key): a pool with host bits set, a block larger than the
    /// pool or longer than an address, a block too small for its reserved addresses, a
    /// block limit of 0, an empty or `/`-containing node or network name, a malformed key
    /// prefix.
    pub fn validate(&self) -> Result<()> {
        let pool = self.pool;
        if pool.trunc() != pool {
            return Err(Error::invalid_config(
                "ipam.pool",
                format!("{pool} has host bits set; the pool is {}", pool.trunc()),
            ));
        }
        let max = pool.max_prefix_len();
        if self.block_prefix > max {
            return Err(Error::invalid_config(
                "ipam.blockSize",
                format!(
                    "/{} is longer than an address of pool {pool} (at most /{max})",
                    self.block_prefix
                ),
            ));
        }
        if self.block_prefix < pool.prefix_len() {
            return Err(Error::invalid_config(
                "ipam.blockSize",
                format!(
                    "a /{} block is larger than the pool {pool}: the block size must be /{} or longer",
                    self.block_prefix,
                    pool.prefix_len()
                ),
            ));
        }
        if self.reserve == Reserve::Gateway && self.block_prefix > max - 2 {
            return Err(Error::invalid_config(
                "ipam.blockSize",
                format!(
                    "a /{} block has no address left for pods once its network address, gateway \
                     and last address are reserved (at most /{} with a gateway)",
                    self.block_prefix,
                    max - 2
                ),
            ));
        }
        if self.max_blocks_per_node == 0 {
            return Err(Error::invalid_config(
                "ipam.maxBlocksPerNode",
                "must be at least 1 (leave it out for no limit)",
            ));
        }
        check_segment("ipam.node", "node name", &self.node)?;
        check_segment("name", "network name", &self.network)?;
        let p = &self.key_prefix;
        if !p.starts_with('/') || p.ends_with('/') || p.contains("//") {
            return Err(Error::invalid_config(
                "ipam.keyPrefix",
                format!("{p:?} must start with '/' and not end with '/' (like \"/cnikit\")"),
            ));
        }
        Ok(())
    }

    /// The block arithmetic of this configuration (call after [`validate`](Self::validate)).
    pub(crate) fn geometry(&self) -> Geometry {
        Geometry {
            pool: self.pool,
            block_prefix: self.block_prefix,
            reserve: self.reserve,
        }
    }
}

/// A name that becomes one datastore key segment.
pub(crate) fn check_segment(field: &str, what: &str, value: &str) -> Result<()> {
    if value.is_empty() {
        return Err(Error::invalid_config(field, format!("the {what} is empty")));
    }
    if value.contains('/') {
        return Err(Error::invalid_config(
            field,
            format!("the {what} {value:?} contains '/'"),
        ));
    }
    Ok(())
}

/// Address arithmetic of a validated configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Geometry {
    pub(crate) pool: IpNet,
    pub(crate) block_prefix: u8,
    pub(crate) reserve: Reserve,
}

impl Geometry {
    /// Whether `block` is one of the pool's blocks.
    pub(crate) fn is_block(&self, block: &IpNet) -> bool {
        block.prefix_len() == self.block_prefix
            && block.trunc() == *block
            && self.pool.contains(block)
    }

    /// The pool's blocks, lowest first.
    pub(crate) fn blocks(&self) -> impl Iterator<Item = IpNet> + use<> {
        // `validate` guarantees pool prefix <= block prefix <= address length, the only
        // condition under which `subnets` fails.
        self.pool.subnets(self.block_prefix).into_iter().flatten()
    }

    /// The first and last address a pod may get in `block`, as integers.
    pub(crate) fn usable_range(&self, block: &IpNet) -> (u128, u128) {
        let first = to_u128(block.network());
        let last = to_u128(block.broadcast());
        match self.reserve {
            Reserve::None => (first, last),
            // `validate` guarantees at least four addresses per block with a gateway.
            Reserve::Gateway => (first + 2, last - 1),
        }
    }

    /// Whether a pod may get `ip` in `block`.
    pub(crate) fn is_usable(&self, block: &IpNet, ip: IpAddr) -> bool {
        let (first, last) = self.usable_range(block);
        let n = to_u128(ip);
        block.contains(&ip) && (first..=last).contains(&n)
    }

    /// The gateway of `block`, if the pod network has one in the block.
    pub(crate) fn gateway(&self, block: &IpNet) -> Option<IpAddr> {
        match self.reserve {
            Reserve::None => None,
            Reserve::Gateway => Some(from_u128(block, to_u128(block.network()) + 1)),
        }
    }
}

/// An address as an integer (IPv4 in the low 32 bits).
pub(crate) fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    }
}

/// The address of `n` in the family of `net`.
pub(crate) fn from_u128(net: &IpNet, n: u128) -> IpAddr {
    match net {
        // Callers only pass integers of addresses inside `net`, so an IPv4 value fits.
        IpNet::V4(_) => IpAddr::V4(Ipv4Addr::from(u32::try_from(n).unwrap_or(u32::MAX))),
        IpNet::V6(_) => IpAddr::V6(Ipv6Addr::from(n)),
    }
}
