//! A container reaching its own published port through the host's address.
//!
//! The masquerade of that flow is in the ruleset (`render::render_docker`).
//! With br_netfilter the DNAT happens while the frame crosses the bridge,
//! which must then send it back out of the port it came in on: a bridge
//! does that only for a port in hairpin mode. natmap manages that setting:
//!
//! - **Who sets it.** natmap switches hairpin mode on for the bridge port of
//!   every container an active mapping points at, when bridged traffic of
//!   the mapping's family passes the host's filters (see
//!   [`BridgePort::filtered`]); without br_netfilter the flow is routed and
//!   needs none. A port found already in hairpin mode (Docker sets every
//!   port so with `userland-proxy=false`) is someone else's: natmap never
//!   switches it off.
//! - **Restored on removal.** What natmap switched on it switches off when
//!   no active mapping needs it any more (`docker rm`, the container down,
//!   the mapping waiting for its port or address, `clear`, shutdown). A
//!   port is per container and disappears with the container's veth, so a
//!   stopped container needs nothing.
//! - **Container restart.** A new veth, a new port: the re-point's commit
//!   finds it (the cached port is gone, so the address is looked up again).
//! - **Repair.** Every tick re-reads br_netfilter (Docker loads it when it
//!   starts; an operator may switch it off): the ruleset and the ports
//!   follow. A port someone switched off again is switched back on.
//!
//! A daemon killed by SIGKILL leaves the ports it switched on in hairpin
//! mode; the next daemon cannot tell them from Docker's and leaves them
//! (the container then also sees its own broadcasts, as with Docker's
//! `userland-proxy=false`).
//!
//! Only with [`AddressSource::Kernel`]: the engine's unit tests ask no kernel.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use crate::daemon::bridge::{self, BridgePort, PortFinder};
use crate::daemon::local::AddressSource;
use crate::firewall::iptables::render;
use crate::firewall::BridgeNetfilter;
use crate::model::{Family, Network, RuleSpec};

use super::Engine;

/// The engine's view of bridges and the ports it put in hairpin mode.
#[derive(Debug, Default)]
pub(super) struct Hairpin {
    /// Whether bridged traffic passes iptables/ip6tables, as last read:
    /// an input of the ruleset.
    pub(super) netfilter: BridgeNetfilter,
    /// Finds the port of a container address (and remembers what it saw).
    finder: PortFinder,
    /// The bridge port leading to each container address, as last found.
    ports: HashMap<IpAddr, BridgePort>,
    /// Ports natmap switched hairpin mode on, by interface index.
    owned: BTreeMap<u32, BridgePort>,
    /// Ports that need hairpin mode and had it at the last look (natmap's
    /// or someone else's): a commit trusts this, a tick looks again.
    on: BTreeSet<u32>,
    /// Container addresses no port was found for, and why (logged once).
    problems: HashMap<IpAddr, String>,
}

impl Engine {
    fn asks_kernel(&self) -> bool {
        matches!(self.host.addresses, AddressSource::Kernel)
    }

    /// Reads br_netfilter's switches (at start, before the first rendering).
    pub(super) fn read_bridge_netfilter(&mut self) {
        if self.asks_kernel() {
            self.host.hairpin.netfilter = bridge::netfilter();
        }
    }

    /// The tick's part: follows a change of br_netfilter (re-renders the
    /// container mappings' masquerades) and checks every port again.
    pub(super) fn follow_bridges(&mut self) {
        if !self.asks_kernel() || !self.fw().installed() {
            return;
        }
        let now = bridge::netfilter();
        if now != self.host.hairpin.netfilter {
            tracing::info!(
                iptables = now.iptables,
                ip6tables = now.ip6tables,
                "bridge netfilter changed (net.bridge.bridge-nf-call-ip*tables); \
                 container mappings follow"
            );
            self.host.hairpin.netfilter = now;
            let desired = self.desired(&self.state);
            if let Err(e) = self.apply(&desired) {
                tracing::error!("cannot follow the bridge netfilter change: {e}");
            }
        }
        self.sync_ports(true);
    }

    /// Container addresses that active mappings point at, with their
    /// network and the family of the mapping's rules.
    fn container_targets(&self) -> Vec<(IpAddr, Network, Family)> {
        let families = self.families();
        let mut out: Vec<(IpAddr, Network, Family)> = Vec::new();
        for rule in &self.state.rules {
            if self.inactive.contains_key(&rule.id) {
                continue;
            }
            let RuleSpec::Docker(d) = &rule.spec else {
                continue;
            };
            if d.external {
                continue;
            }
            for (family, target) in render::docker_targets(d) {
                let Some(subnet) = target.subnet else {
                    continue;
                };
                let ip = target.ip.ip();
                if families.contains(&family) && !out.iter().any(|(o, _, _)| *o == ip) {
                    out.push((ip, subnet, family));
                }
            }
        }
        out
    }

    /// After a commit: puts exactly the bridge ports that need it in
    /// hairpin mode, trusting what it saw before for the mappings that did
    /// not change (the tick looks again).
    pub(super) fn sync_hairpin(&mut self) {
        self.sync_ports(false);
    }

    /// Puts exactly the bridge ports that need it in hairpin mode (see the
    /// module docs). `verify`: check every cached port and mode in the
    /// kernel again instead of trusting the last look.
    fn sync_ports(&mut self, verify: bool) {
        if !self.asks_kernel() {
            return;
        }
        let targets = self.container_targets();
        let global = self.host.hairpin.netfilter;
        let h = &mut self.host.hairpin;
        h.ports.retain(|ip, port| {
            targets.iter().any(|(t, _, _)| t == ip) && (!verify || port.still_there())
        });
        h.problems
            .retain(|ip, _| targets.iter().any(|(t, _, _)| t == ip));
        let unknown: Vec<(IpAddr, Network)> = targets
            .iter()
            .filter(|(ip, _, _)| !h.ports.contains_key(ip))
            .map(|(ip, net, _)| (*ip, *net))
            .collect();
        if !unknown.is_empty() {
            match h.finder.find(&unknown) {
                Ok(found) => {
                    for (ip, net) in &unknown {
                        match found.get(ip) {
                            Some(port) => {
                                tracing::debug!(container = %ip, "bridge port {port}");
                                h.problems.remove(ip);
                                h.ports.insert(*ip, port.clone());
                            }
                            None => note_problem(
                                h,
                                *ip,
                                format!("no bridge of this host leads to {ip} (network {net})"),
                            ),
                        }
                    }
                }
                Err(e) => {
                    for (ip, _) in &unknown {
                        note_problem(h, *ip, format!("cannot find the bridge port of {ip}: {e}"));
                    }
                }
            }
        }
        let mut filtered: HashMap<(u32, Family), bool> = HashMap::new();
        let mut wanted: BTreeMap<u32, BridgePort> = BTreeMap::new();
        for (ip, _, family) in &targets {
            let Some(port) = h.ports.get(ip) else {
                continue;
            };
            let needs = *filtered
                .entry((port.ifindex, *family))
                .or_insert_with(|| port.filtered(*family, global));
            if needs {
                wanted.insert(port.ifindex, port.clone());
            }
        }
        h.on.retain(|i| wanted.contains_key(i) && !verify);
        for (index, port) in &wanted {
            if h.on.contains(index) {
                continue;
            }
            match port.hairpin() {
                // Natmap's, or someone else's: either way it is on.
                Ok(true) => {}
                Ok(false) => match port.set_hairpin(true) {
                    Ok(()) if h.owned.insert(*index, port.clone()).is_some() => {
                        self.upkeep.repairs += 1;
                        let reason = format!(
                            "hairpin mode of bridge port {port} was switched off by something else"
                        );
                        tracing::warn!(
                            repairs = self.upkeep.repairs,
                            "{reason}; switched on again"
                        );
                        self.upkeep.last_repair = Some((std::time::Instant::now(), vec![reason]));
                    }
                    Ok(()) => tracing::info!(
                        "hairpin mode on for bridge port {port}: its container reaches its own \
                         published ports through the host's address"
                    ),
                    Err(e) => {
                        tracing::warn!("cannot switch hairpin mode on for {port}: {e}");
                        continue;
                    }
                },
                Err(e) => {
                    tracing::warn!("cannot read the hairpin mode of {port}: {e}");
                    continue;
                }
            }
            h.on.insert(*index);
        }
        let done: Vec<u32> = h
            .owned
            .keys()
            .filter(|i| !wanted.contains_key(i))
            .copied()
            .collect();
        for index in done {
            if let Some(port) = h.owned.remove(&index) {
                switch_off(&port);
            }
        }
    }

    /// At teardown (`clear`, shutdown): every port natmap switched on is
    /// switched off again.
    pub(super) fn release_hairpin(&mut self) {
        self.host.hairpin.on.clear();
        for (_, port) in std::mem::take(&mut self.host.hairpin.owned) {
            switch_off(&port);
        }
    }
}

/// Logs why an address has no port, once per address and reason (not every
/// tick). Informational: hairpin mode only matters for a container on a
/// bridge whose traffic passes iptables.
fn note_problem(h: &mut Hairpin, ip: IpAddr, problem: String) {
    if h.problems.get(&ip) != Some(&problem) {
        tracing::info!(
            "{problem}: no hairpin mode for it (needed only for a container on a bridge whose \
             traffic passes iptables, to reach its own published ports through the host's address)"
        );
        h.problems.insert(ip, problem);
    }
}

/// Switches off hairpin mode natmap switched on, if the port still exists.
fn switch_off(port: &BridgePort) {
    if !port.still_there() {
        return;
    }
    match port.set_hairpin(false) {
        Ok(()) => tracing::info!("hairpin mode off again for bridge port {port}"),
        Err(e) => tracing::warn!("cannot switch hairpin mode off for {port}: {e}"),
    }
}
