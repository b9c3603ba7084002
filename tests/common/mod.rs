//! Integration-test harness for natmap: real network namespaces, real
//! iptables, real sockets (DESIGN.md §8).
//!
//! Use it from a test file with `mod common;` and start every test with
//!
//! ```ignore
//! if !common::privileged() { return; }
//! let topo = common::Topology::new();
//! ```
//!
//! Everything here happens inside namespaces this module creates and
//! destroys: no interface, address, route or rule is ever created in the
//! namespace the test process runs in, so tests may run in parallel (each
//! with its own [`Topology`]) and a crashed run leaves at most some named
//! namespaces behind, which the next run removes (see [`privileged`]).
//!
//! ```text
//!  client ──veth── router ──br0──┬──veth── server
//!  eth0            ext0   (bridge)└──veth── server2
//!  192.0.2.2       192.0.2.1   198.51.100.1     198.51.100.2 / .3
//!  2001:db8:1::2   2001:db8:1::1  2001:db8:2::1 2001:db8:2::2 / ::3
//! ```
//!
//! Traffic helpers ([`TcpEcho`], [`UdpEcho`], [`tcp_probe`], [`udp_probe`],
//! the `expect_*` assertions) create their sockets inside a namespace with
//! [`in_netns`], so no external helper program (nc, ping, curl) is needed.
//! Every network operation has a bounded timeout ([`PROBE_TIMEOUT`],
//! [`NEGATIVE_TIMEOUT`]) and every spawned command one as well
//!
//! # Layout
//!
//! One module per job; everything public is re-exported here, so a test
//! file says `common::Daemon` or `use common::*;` whatever module holds it.
//!
//! | module | job |
//! | --- | --- |
//! | `privileges` | may this process run the real-kernel tests; skip or fail |
//! | `command` | external commands with a bounded time |
//! | `netns` | named network namespaces, [`in_netns`] |
//! | `topology` | the per-test network and its addresses |
//! | `traffic` | echo servers, probes, the `expect_*` assertions |
//! | `iptables` | reading iptables, natmap's chains |
//! | `nft` | reading natmap's nftables tables; what natmap installed on either backend |
//! | `daemon` | the daemon process: state dir, start, restart, stop |
//! | `cli` | the natmap CLI against a daemon, [`RuleArgs`] |
//! | `socket` | the control socket spoken raw |
//! | `daemon_log` | no undeclared WARN/ERROR in a daemon's log |
//! | `consistency` | kernel, state file and answers agree |
//! | `load` | seeded randomness, percentiles |
//! | `ledger` | acknowledged changes survive a crash |
//! | [`docker`] | the host's Docker engine, root-namespace daemon |
//! | `docker_proxy` | a Docker socket proxy to stop, slow or hang |
//! | [`auto_discover`] | remote engines, service node, config file |
//!
//! Declare it in a test file as `pub mod common;` (not `mod common;`): the
//! harness is public to the test crate then, so rustc does not call the
//! helpers a given test file happens not to use dead code, and no
//! `allow(dead_code)` is needed. Private helpers are still checked.

mod cli;
mod command;
mod consistency;
mod daemon;
mod daemon_log;
mod docker_proxy;
mod iptables;
mod ledger;
mod load;
mod netns;
mod nft;
mod privileges;
mod socket;
mod topology;
mod traffic;

pub use cli::*;
pub use command::*;
pub use consistency::*;
pub use daemon::*;
pub use daemon_log::*;
pub use docker_proxy::*;
pub use iptables::*;
pub use ledger::*;
pub use load::*;
pub use netns::*;
pub use nft::*;
pub use privileges::*;
pub use socket::*;
pub use topology::*;
pub use traffic::*;

/// Fixtures for the Docker tests (root namespace, real engine).
pub mod docker;

/// Fixtures for the auto-discover tests (remote engine over TCP, service node, config file).
pub mod auto_discover;
