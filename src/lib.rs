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
//!   outside it but the model's iptables-compatible spellings) and a
//!   recording one for tests.
//! - [`state`]: `state.json`, atomic and durable.
//!
//! The pipeline of every change: validate → reserve ports → new state →
//! desired rules → the firewall driver (with iptables, one
//! `iptables-restore --noflush` per changed family) → persist → listen →
//! answer.

pub mod cli;
pub mod client;
pub mod config;
pub mod daemon;
pub mod docker;
pub mod firewall;
pub mod model;
pub mod proto;
pub mod state;
