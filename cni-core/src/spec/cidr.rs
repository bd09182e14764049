//! Addresses with a prefix length (`10.244.0.0/16`), read with messages that say which part
//! is wrong: `ipnet` answers "invalid IP address syntax" for a bad address and a bad prefix
//! length alike.

use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Deserializer};

/// Parses `address/prefix`; the error says what is wrong (no `/`, the address, or the prefix
/// length and how long it may be). The prefix length is plain decimal: no sign, no leading
/// zero.
pub fn parse(text: &str) -> Result<IpNet, String> {
    let (address, prefix) = text.split_once('/').ok_or_else(|| {
        format!("{text:?} has no prefix length (write it like 10.244.0.0/16 or fd00::/64)")
    })?;
    let address: IpAddr = address
        .parse()
        .map_err(|_| format!("{text:?}: {address:?} is not an IPv4 or IPv6 address"))?;
    let max = if address.is_ipv4() { 32 } else { 128 };
    let family = if address.is_ipv4() { "IPv4" } else { "IPv6" };
    // Plain decimal digits without a leading zero, as `ip` writes them: `u8::from_str` alone
    // would also take `+8` and `08`.
    let digits = !prefix.is_empty() && prefix.bytes().all(|b| b.is_ascii_digit());
    let plain = digits && (prefix == "0" || !prefix.starts_with('0'));
    let length = plain.then(|| prefix.parse::<u8>().ok()).flatten();
    let length: u8 = length.filter(|l| *l <= max).ok_or_else(|| {
        format!(
            "{text:?}: prefix length /{prefix} is not valid for an {family} address \
                 (0 to {max})"
        )
    })?;
    IpNet::new(address, length).map_err(|e| format!("{text:?}: {e}"))
}

/// Serde helper for an [`IpNet`] field: `#[serde(deserialize_with = "…")]`, reading with
/// [`parse`].
pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<IpNet, D::Error> {
    let text = String::deserialize(d)?;
    parse(&text).map_err(serde::de::Error::custom)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn says_which_part_is_wrong() {
        assert_eq!(parse("10.0.0.0/8").unwrap(), "10.0.0.0/8".parse().unwrap());
        assert_eq!(parse("fd00::/64").unwrap(), "fd00::/64".parse().unwrap());
        assert_eq!(parse("0.0.0.0/0").unwrap(), "0.0.0.0/0".parse().unwrap());
        let cases = [
            (
                "10.0.0.0/33",
                "prefix length /33 is not valid for an IPv4 address (0 to 32)",
            ),
            (
                "fd00::/129",
                "prefix length /129 is not valid for an IPv6 address (0 to 128)",
            ),
            ("10.0.0.0/x", "prefix length /x is not valid"),
            ("10.0.0.0/", "prefix length / is not valid"),
            (
                "300.1.1.0/24",
                "\"300.1.1.0\" is not an IPv4 or IPv6 address",
            ),
            ("10.0.0.0", "has no prefix length"),
            // Only plain decimal digits, as `ip` and `ipnet` write them.
            (
                "10.0.0.0/+8",
                "prefix length /+8 is not valid for an IPv4 address (0 to 32)",
            ),
            (
                "10.0.0.0/08",
                "prefix length /08 is not valid for an IPv4 address (0 to 32)",
            ),
            (
                "fd00::/064",
                "prefix length /064 is not valid for an IPv6 address (0 to 128)",
            ),
            ("10.0.0.0/00", "prefix length /00 is not valid"),
            ("10.0.0.0/ 8", "prefix length / 8 is not valid"),
        ];
        for (text, says) in cases {
            let e = parse(text).unwrap_err();
            assert!(e.contains(says), "{text}: {e}");
        }
    }
}
