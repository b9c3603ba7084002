//! Transport (layer 4) protocol of a forwarded port: TCP or UDP. Named
//! `l4`, not `proto`, so it is not mistaken for the wire protocol
//! (`crate::proto`).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::ParseError;

/// The transport protocol a rule forwards. Only TCP and UDP carry ports.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Default,
)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    /// TCP (the default everywhere a protocol is optional).
    #[default]
    Tcp,
    /// UDP.
    Udp,
}

impl Proto {
    /// The name iptables and conntrack use.
    pub fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Proto {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "tcp" => Ok(Proto::Tcp),
            "udp" => Ok(Proto::Udp),
            _ => Err(ParseError::new("proto", s, "tcp or udp")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_case_insensitively_and_rejects_others() {
        assert_eq!("TCP".parse::<Proto>().unwrap(), Proto::Tcp);
        assert_eq!("udp".parse::<Proto>().unwrap(), Proto::Udp);
        let err = "sctp".parse::<Proto>().unwrap_err();
        assert!(err.to_string().contains("tcp or udp"), "{err}");
    }
}
