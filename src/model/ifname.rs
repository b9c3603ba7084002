//! Network interface names, validated by the kernel's rules and then some.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::ParseError;

/// A network interface name that is safe to put into an iptables rule.
///
/// The kernel accepts 1–15 bytes without `/`, `:` or whitespace, and not `.` or `..`.
/// natmap is stricter: ASCII letters, digits and `. _ - @ +` only, and no leading `-`,
/// so that a name can never be read as an option, a negation (`!`) or a quoted
/// token by `iptables-restore`. A trailing `+` is iptables' wildcard (`eth+`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct IfName(String);

/// Longest interface name the kernel accepts (IFNAMSIZ - 1).
pub const IFNAME_MAX: usize = 15;

impl IfName {
    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether this is the bare wildcard `+`, which matches every
    /// interface: iptables stores it as no interface match at all (and
    /// `iptables -S` prints none), so natmap renders none either.
    pub fn is_any(&self) -> bool {
        self.0 == "+"
    }

    /// The `-i`/`-o` match as iptables prints it back, with a trailing
    /// space; nothing for the wildcard `+`.
    pub fn as_match(&self, flag: &str) -> String {
        if self.is_any() {
            String::new()
        } else {
            format!("{flag} {} ", self.0)
        }
    }
}

impl FromStr for IfName {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        const FORM: &str =
            "1-15 characters of A-Z a-z 0-9 . _ - @ + (not starting with '-', not '.' or '..')";
        let ok = !s.is_empty()
            && s.len() <= IFNAME_MAX
            && s != "."
            && s != ".."
            && !s.starts_with('-')
            && s.bytes().all(|b| {
                b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'@' | b'+')
            });
        if ok {
            Ok(IfName(s.to_owned()))
        } else {
            Err(ParseError::new("interface", s, FORM))
        }
    }
}

impl TryFrom<String> for IfName {
    type Error = ParseError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<IfName> for String {
    fn from(n: IfName) -> String {
        n.0
    }
}

impl fmt::Display for IfName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_real_names() {
        for n in [
            "eth0",
            "enp3s0f1",
            "wg0",
            "br-1a2b3c4d5e6f",
            "veth@if3",
            "eth+",
            "tailscale0",
        ] {
            assert!(n.parse::<IfName>().is_ok(), "{n}");
        }
    }

    #[test]
    fn rejects_dangerous_or_invalid_names() {
        for n in [
            "",
            ".",
            "..",
            "sixteen-chars-xx",
            "eth0\n-A",
            "eth 0",
            "eth/0",
            "eth:0",
            "-i",
            "!eth0",
            "eth\"0",
            "eth0\0",
        ] {
            let err = n.parse::<IfName>().unwrap_err();
            assert!(err.to_string().contains("interface"), "{n:?}: {err}");
        }
    }
}
