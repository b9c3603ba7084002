//! natmap's packet filter: the driver seam and its iptables implementation.

pub mod iptables;
