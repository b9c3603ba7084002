//! natmap: one daemon that owns a host's NAT rules, and its CLI.
//!
//! # Layout
//! - [`cli`]: clap definitions (`Opts`) and the client commands; `cli::run`
//!   is the whole program behind `main`.
//! - [`proto`]: the request/response types shared by client and daemon.
//! - [`client`]: send one request over the Unix socket, read one response.
//! - [`daemon`]: socket server, the single state owner ([`daemon::engine`],
//!   in owned parts: persistence, the firewall side, ports, the Docker view,
//!   the host view, upkeep), port reservations, the loopback relay, and the
//!   conntrack cut over ctnetlink.
//! - [`model`]: typed, validated values (addresses, ports, interfaces, rules).
//! - [`firewall`]: the firewall driver seam — [`firewall::FirewallDriver`],
//!   the driver-neutral types the engine speaks ([`firewall::Desired`],
//!   [`firewall::Drift`], [`firewall::FirewallError`]) and the drivers:
//!   [`firewall::iptables`] (rendering, `iptables-restore` transactions,
//!   `iptables-save` parsing, executors; nothing about iptables lives
//!   outside it but the model's iptables-compatible spellings),
//!   [`firewall::nftables`] (natmap's own tables and maps; element changes
//!   in one netlink batch) and a recording one for tests.
//! - [`config`]: the daemon's TOML config file.
//! - [`docker`]: the Docker API client (bollard): inspects and events.
//! - [`state`]: `state.json` and its append-only journal, atomic and durable;
//!   [`state::Delta`], a change to the state.
//! - [`netlink`]: netfilter netlink plumbing (socket, framing, answers) the
//!   nftables driver and the conntrack cut share.
//!
//! The pipeline of every change, through one door (`Engine::commit_next`,
//! `diagrams/transition.dot`): validate → reserve ports → what comes next (a
//! [`state::Delta`] for rule requests and Docker events, a whole state for
//! bulk paths) → the firewall driver ([`firewall::RuleChange`] or
//! [`firewall::Desired`]; iptables: one `iptables-restore --noflush` per
//! changed family; nftables: one netlink batch of map elements) → routes →
//! persist (one journal line) → listen, release, cut flows → answer.

pub mod cli;
pub mod client;
pub mod config;
pub mod daemon;
pub mod docker;
pub mod firewall;
pub mod model;
pub mod netlink;
pub mod proto;
pub mod state;
