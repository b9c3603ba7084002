//! The per-test network (client ─ router ─ server, server2) and its
//! addresses: the fixture every real-kernel test starts from.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use super::*;

/// Client address (on the client's `eth0`), the "outside world".
pub const CLIENT_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
/// Router address on the client-facing side ([`ROUTER_EXT_IF`]), i.e. the
/// host's public address that DNAT rules match.
pub const ROUTER_EXT_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
/// Router address on the internal side ([`ROUTER_INT_IF`], the bridge).
pub const ROUTER_INT_V4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
/// Internal server (the DNAT target, like a container or a VM).
pub const SERVER_V4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
/// Second internal host on the same bridge (for hairpin tests).
pub const SERVER2_V4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 3);
/// Prefix length of both IPv4 segments.
pub const PREFIX_V4: u8 = 24;

/// IPv6 counterpart of [`CLIENT_V4`].
pub const CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 2);
/// IPv6 counterpart of [`ROUTER_EXT_V4`].
pub const ROUTER_EXT_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 1);
/// IPv6 counterpart of [`ROUTER_INT_V4`].
pub const ROUTER_INT_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 1);
/// IPv6 counterpart of [`SERVER_V4`].
pub const SERVER_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 2);
/// IPv6 counterpart of [`SERVER2_V4`].
pub const SERVER2_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 3);
/// Prefix length of both IPv6 segments.
pub const PREFIX_V6: u8 = 64;

/// Router interface facing the client (a veth; its peer is the client's `eth0`).
pub const ROUTER_EXT_IF: &str = "ext0";
/// Router interface facing the servers: a bridge holding the router's
/// internal addresses, with one veth port per server.
pub const ROUTER_INT_IF: &str = "br0";
/// Interface name of client, server and server2 (each in its own namespace).
pub const HOST_IF: &str = "eth0";

/// The per-test network of DESIGN.md §8:
///
/// ```text
/// client(eth0) ─veth─ (ext0)router(br0) ─┬─veth─ (eth0)server
///                                        └─veth─ (eth0)server2
/// ```
///
/// * Addresses: see the `*_V4` / `*_V6` constants; client, server and
///   server2 have default routes (v4 and v6) via the router.
/// * Router: `net.ipv4.ip_forward=1`, `net.ipv6.conf.all.forwarding=1`,
///   filter `FORWARD` policy `DROP` in iptables and ip6tables (like a Docker
///   host): nothing is forwarded until a rule (natmap's, or the test's)
///   accepts it. On the nftables pass (`NATMAP_TEST_BACKEND=nftables`) the
///   router also has Docker's `DOCKER-USER` chain (`-j RETURN`, jumped
///   first from `FORWARD`), where that backend puts its one accept.
/// * The internal side is a bridge (`br0`) holding the router's internal
///   addresses, so server2 can reach the router's *external* address
///   (hairpin) while server and server2 talk to each other directly at L2.
///   Bridged server↔server2 frames do NOT pass the router's iptables: the
///   harness sets `net.bridge.bridge-nf-call-ip{,6}tables=0` in the router
///   (br_netfilter, if loaded, defaults to 1 in new namespaces); see
///   [`Topology::set_bridge_netfilter`] to get the Docker-host behaviour.
/// * All links are created inside the namespaces (`ip -n router link add …
///   peer … netns other`), never in the test's own namespace, so interface
///   names are fixed and nothing leaks when namespaces are deleted.
///
/// Dropping the topology deletes all four namespaces (and with them every
/// interface, address, route and iptables rule in them).
#[derive(Debug)]
pub struct Topology {
    pub client: Netns,
    pub router: Netns,
    pub server: Netns,
    pub server2: Netns,
}

impl Topology {
    /// Builds the whole topology and waits until its links are up.
    pub fn new() -> Topology {
        let topo = Topology {
            client: Netns::new("client"),
            router: Netns::new("router"),
            server: Netns::new("server"),
            server2: Netns::new("server2"),
        };
        let r = &topo.router;

        // Links, all created from inside the router namespace.
        r.ip(&[
            "link",
            "add",
            ROUTER_EXT_IF,
            "type",
            "veth",
            "peer",
            "name",
            HOST_IF,
            "netns",
            &topo.client.name,
        ]);
        r.ip(&[
            "link",
            "add",
            ROUTER_INT_IF,
            "type",
            "bridge",
            "forward_delay",
            "0",
            "stp_state",
            "0",
            "mcast_snooping",
            "0",
        ]);
        for (port, host) in [("veth-srv", &topo.server), ("veth-srv2", &topo.server2)] {
            r.ip(&[
                "link", "add", port, "type", "veth", "peer", "name", HOST_IF, "netns", &host.name,
            ]);
            r.ip(&["link", "set", port, "master", ROUTER_INT_IF]);
            r.ip(&["link", "set", port, "up"]);
        }
        for (dev, v4, v6) in [
            (ROUTER_EXT_IF, ROUTER_EXT_V4, ROUTER_EXT_V6),
            (ROUTER_INT_IF, ROUTER_INT_V4, ROUTER_INT_V6),
        ] {
            r.ip(&["addr", "add", &format!("{v4}/{PREFIX_V4}"), "dev", dev]);
            r.ip(&[
                "addr",
                "add",
                &format!("{v6}/{PREFIX_V6}"),
                "dev",
                dev,
                "nodad",
            ]);
            r.ip(&["link", "set", dev, "up"]);
        }
        r.sysctl_set("net.ipv4.ip_forward", "1");
        r.sysctl_set("net.ipv6.conf.all.forwarding", "1");
        topo.set_bridge_netfilter(false);
        for v6 in [false, true] {
            iptables(r, v6, &["-P", "FORWARD", "DROP"]);
            if testing_nftables() {
                // The nftables backend never creates DOCKER-USER (its one
                // iptables rule goes into Docker's chain where it exists;
                // operator guide, "Beside Docker 20–28"): the router is a
                // Docker host then, with the chain Docker makes.
                for args in [
                    &["-N", "DOCKER-USER"][..],
                    &["-A", "DOCKER-USER", "-j", "RETURN"],
                    &["-A", "FORWARD", "-j", "DOCKER-USER"],
                ] {
                    iptables(r, v6, args);
                }
            }
        }

        for (host, v4, v6, gw4, gw6) in [
            (
                &topo.client,
                CLIENT_V4,
                CLIENT_V6,
                ROUTER_EXT_V4,
                ROUTER_EXT_V6,
            ),
            (
                &topo.server,
                SERVER_V4,
                SERVER_V6,
                ROUTER_INT_V4,
                ROUTER_INT_V6,
            ),
            (
                &topo.server2,
                SERVER2_V4,
                SERVER2_V6,
                ROUTER_INT_V4,
                ROUTER_INT_V6,
            ),
        ] {
            host.ip(&["addr", "add", &format!("{v4}/{PREFIX_V4}"), "dev", HOST_IF]);
            host.ip(&[
                "addr",
                "add",
                &format!("{v6}/{PREFIX_V6}"),
                "dev",
                HOST_IF,
                "nodad",
            ]);
            host.ip(&["link", "set", HOST_IF, "up"]);
            host.ip(&["-4", "route", "add", "default", "via", &gw4.to_string()]);
            host.ip(&["-6", "route", "add", "default", "via", &gw6.to_string()]);
        }

        for (ns, dev) in [
            (&topo.router, ROUTER_EXT_IF),
            (&topo.router, ROUTER_INT_IF),
            (&topo.client, HOST_IF),
            (&topo.server, HOST_IF),
            (&topo.server2, HOST_IF),
        ] {
            wait_link_up(ns, dev, Duration::from_secs(5));
        }
        topo
    }

    /// Router interface facing the client ("ext0"), e.g. for `--ext-if`.
    pub fn router_ext_if(&self) -> &'static str {
        ROUTER_EXT_IF
    }

    /// Router interface facing the servers (the bridge "br0"), e.g. for `snat --ext-if`
    /// in the reverse direction or for checking rules.
    pub fn router_int_if(&self) -> &'static str {
        ROUTER_INT_IF
    }

    /// The four namespaces, client first.
    pub fn all(&self) -> [&Netns; 4] {
        [&self.client, &self.router, &self.server, &self.server2]
    }

    /// Names of the four namespaces (e.g. to check they are gone after drop).
    pub fn names(&self) -> Vec<String> {
        self.all().iter().map(|ns| ns.name.clone()).collect()
    }

    /// Whether bridged server↔server2 traffic passes the router's
    /// iptables/ip6tables (`net.bridge.bridge-nf-call-ip{,6}tables`), as on
    /// a Docker host with br_netfilter. Off by default. Without the
    /// br_netfilter module the sysctls do not exist: turning it off is then
    /// a no-op, turning it on panics.
    pub fn set_bridge_netfilter(&self, on: bool) {
        let value = if on { "1" } else { "0" };
        for key in [
            "net.bridge.bridge-nf-call-iptables",
            "net.bridge.bridge-nf-call-ip6tables",
        ] {
            if self.router.sysctl_get(key).is_some() {
                self.router.sysctl_set(key, value);
            } else if on {
                panic!("{key} does not exist: br_netfilter is not loaded");
            }
        }
    }
}

impl Default for Topology {
    fn default() -> Self {
        Self::new()
    }
}

/// Waits until `dev` in `ns` is operationally up (`state UP`, or `UNKNOWN`
/// for devices without carrier reporting); panics after `timeout`.
pub fn wait_link_up(ns: &Netns, dev: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let out = ns.ip(&["-o", "link", "show", "dev", dev]);
        if out.contains("state UP") || out.contains("state UNKNOWN") {
            return;
        }
        if Instant::now() >= deadline {
            panic!(
                "[netns {}] link {dev} not up after {timeout:?}: {out}",
                ns.name
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A namespace with the router's external address on loopback, enough for
/// reservations and port checks.
pub fn bare_router() -> Netns {
    let ns = Netns::new("router");
    ns.ip(&["addr", "add", &format!("{ROUTER_EXT_V4}/32"), "dev", "lo"]);
    ns
}
