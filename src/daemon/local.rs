//! Which addresses are this host's right now.
//!
//! natmap forwards traffic for an address only while the host owns it
//! (design §9): a typo'd `--ext-ip` or a VIP held by the peer must never
//! capture traffic meant for another machine. The engine asks here at every
//! request and every tick; one `getifaddrs` costs tens of microseconds,
//! whatever the number of rules.

use std::collections::HashSet;
use std::net::IpAddr;

/// Where the engine learns the host's addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressSource {
    /// The kernel, through `getifaddrs` (the daemon).
    Kernel,
    /// Every address counts as local (engine unit tests, which use
    /// documentation addresses the test machine does not have).
    AssumeAllLocal,
}

/// The host's addresses at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalAddresses {
    /// `None`: every address counts as local.
    addresses: Option<HashSet<IpAddr>>,
    /// The host's interface names at that moment; `None`: ask the kernel
    /// each time (see [`LocalAddresses::has_interface`]).
    interfaces: Option<HashSet<String>>,
}

impl AddressSource {
    /// The addresses now, or `None` when the kernel cannot be asked (out of
    /// descriptors, say): the caller keeps what it knew, since a failed
    /// question says nothing about the addresses, and reading it as "none"
    /// would withdraw every rule.
    pub fn snapshot(self) -> Option<LocalAddresses> {
        match self {
            AddressSource::AssumeAllLocal => Some(LocalAddresses {
                addresses: None,
                interfaces: None,
            }),
            AddressSource::Kernel => match nix::ifaddrs::getifaddrs() {
                Ok(list) => {
                    let (mut addresses, mut interfaces) = (HashSet::new(), HashSet::new());
                    // getifaddrs lists every interface (its link-layer
                    // entry), with or without an IP address.
                    for a in list {
                        addresses.extend(a.address.as_ref().and_then(ip_of));
                        interfaces.insert(a.interface_name);
                    }
                    Some(LocalAddresses {
                        addresses: Some(addresses),
                        interfaces: Some(interfaces),
                    })
                }
                Err(e) => {
                    tracing::warn!(
                        "cannot list the host's addresses ({e}); keeping the last known ones"
                    );
                    None
                }
            },
        }
    }
}

/// The IP address of an interface address `getifaddrs` listed (none for a
/// link-layer or other non-IP address).
pub fn ip_of(addr: &nix::sys::socket::SockaddrStorage) -> Option<IpAddr> {
    addr.as_sockaddr_in()
        .map(|v4| IpAddr::V4(v4.ip()))
        .or_else(|| addr.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip())))
}

impl Default for LocalAddresses {
    /// None known: nothing that needs a local address is installed.
    fn default() -> LocalAddresses {
        LocalAddresses {
            addresses: Some(HashSet::new()),
            interfaces: None,
        }
    }
}

impl LocalAddresses {
    /// Whether `ip` is an address of this host.
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.addresses.as_ref().is_none_or(|a| a.contains(&ip))
    }

    /// Whether interface `name` exists (a `+` wildcard always does). From
    /// the snapshot when there is one: `ls` of 12,000 snat rules asked the
    /// kernel 12,000 times (a socket and an ioctl each).
    pub fn has_interface(&self, name: &str) -> bool {
        name.ends_with('+')
            || match &self.interfaces {
                Some(names) => names.contains(name),
                None => nix::net::if_::if_nametoindex(name).is_ok(),
            }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_local_and_a_documentation_address_is_not() {
        let now = AddressSource::Kernel.snapshot().unwrap();
        assert!(now.contains("127.0.0.1".parse().unwrap()));
        assert!(!now.contains("198.51.100.77".parse().unwrap()));
        assert!(AddressSource::AssumeAllLocal
            .snapshot()
            .unwrap()
            .contains("198.51.100.77".parse().unwrap()));
    }
}
