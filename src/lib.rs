//! natmap: one daemon that owns a host's NAT rules, and its CLI.
//!
//! # Layout
//! - [`cli`]: clap definitions (`Opts`) and the client commands; `cli::run`
//!   is the whole program behind `main`.
//! - [`proto`]: the request/response types shared by client and daemon.
//! - [`client`]: send one request over the Unix socket, read one response.
//! - [`daemon`]: socket server, the single state owner ([`daemon::engine`]),
//!   port reservations and the loopback relay.
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
//! - [`state`]: `state.json` and its append-only journal, atomic and durable.
//!
//! The pipeline of every change: validate → reserve ports → new state →
//! desired rules → the firewall driver (iptables: one
//! `iptables-restore --noflush` per changed family; nftables: one netlink
//! batch of map elements) → persist (one journal line) → listen → answer.

pub mod cli;
pub mod client;
pub mod config;
pub mod daemon;
pub mod docker;
pub mod firewall;
pub mod model;
pub mod proto;
pub mod state;
