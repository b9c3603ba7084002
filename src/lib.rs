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
//! - [`rules`]: pure `rules -> ruleset -> iptables-restore text`.
//! - [`netfilter`]: running iptables (real and recording executors).
//! - [`state`]: `state.json`, atomic and durable.
//!
//! The pipeline of every change: validate → reserve ports → new state →
//! desired ruleset → one `iptables-restore --noflush` per changed family →
//! persist → listen → answer.

pub mod cli;
pub mod client;
pub mod config;
pub mod daemon;
pub mod docker;
pub mod firewall;
pub mod model;
pub mod proto;
pub mod state;
