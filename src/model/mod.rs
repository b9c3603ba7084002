//! Typed values. Every piece of text from a request is parsed into one of these
//! before it is used, so nothing unvalidated reaches an iptables line or a socket.

mod addr;
mod docker;
mod ifname;
mod l4;
mod ports;
mod rule;

pub use addr::{CanonicalIp, Family, HostIp, Network};
pub use docker::{AutoSource, ContainerRef, DockerRule, Endpoint, PortSpec, MAX_RANGE_PORTS};
pub use ifname::{IfName, IFNAME_MAX};
pub use l4::Proto;
pub use ports::{parse_port, PortDirection, PortList, PortRange, MAX_PORTS_PER_RULE};
pub use rule::{
    DnatRule, HairpinRule, PolicyRouteRule, PortClaim, Rule, RuleId, RuleSpec, SnatRule,
};

use std::fmt;

/// A value that did not parse: names the field, echoes the input (escaped) and
/// says which form is accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    /// The request field or CLI flag, e.g. `ports`.
    pub field: String,
    /// The rejected input, escaped so control characters are visible.
    pub input: String,
    /// The accepted form.
    pub expected: String,
}

impl ParseError {
    /// A new error for `field`.
    pub fn new(field: impl Into<String>, input: &str, expected: impl Into<String>) -> ParseError {
        let mut shown: String = input.escape_debug().collect();
        if shown.len() > 80 {
            let cut = (0..=80)
                .rev()
                .find(|i| shown.is_char_boundary(*i))
                .unwrap_or(0);
            shown.truncate(cut);
            shown.push('…');
        }
        ParseError {
            field: field.into(),
            input: shown,
            expected: expected.into(),
        }
    }

    /// The same error attributed to another field name (a CLI flag, say).
    pub fn with_field(mut self, field: impl Into<String>) -> ParseError {
        self.field = field.into();
        self
    }
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid {} \"{}\": expected {}",
            self.field, self.input, self.expected
        )
    }
}

impl std::error::Error for ParseError {}
