//! TODO
/// Block IPAM.
pub struct BlockIpam;
/// Block IPAM config.
pub struct BlockIpamConfig;
