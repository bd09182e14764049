//! TODO
/// Delegated.
pub struct DelegatedIpam;
