//! Forwarding only for addresses this host has (design §9, fail closed).
//!
//! A rule's external address (a Docker mapping's HOST_IP) must be local when
//! it is added, unless the operator said `--allow-nonlocal` (a VIP); such
//! rules carry an `addrtype LOCAL` guard, so the kernel skips them while the
//! peer holds the address. A rule without the flag whose address goes away
//! (at boot before the network is up, or later) is withdrawn and shown
//! `waiting for address`, and comes back when the address does.

use std::net::{IpAddr, SocketAddr};

use crate::model::{Rule, RuleId, RuleSpec};
use crate::proto::{ErrorCode, RuleStatus};

use super::super::reserve;
use super::{Engine, Failure, Inactive, Outcome};

use super::held::HeldByPort;

impl Engine {
    /// Reads the host's addresses again (every request and tick).
    pub(super) fn refresh_addresses(&mut self) {
        if let Some(now) = self.host.addresses.snapshot() {
            self.host.local = now;
        }
    }

    /// Refuses a rule whose address is not this host's (without
    /// `--allow-nonlocal`), or whose target is one of natmap's own reserved
    /// ports (the relay would forward to itself).
    pub(super) fn check_addresses(&self, spec: &RuleSpec) -> Outcome<()> {
        self.check_addresses_in(spec, self.ports.held.by_port())
    }

    /// [`Engine::check_addresses`] against a prepared [`Engine::held_by_port`].
    pub(super) fn check_addresses_in(&self, spec: &RuleSpec, held: &HeldByPort) -> Outcome<()> {
        if let Some((ip, false)) = spec.ingress_address() {
            if !self.host.local.contains(ip) {
                return Err(Failure::new(
                    ErrorCode::AddressNotLocal,
                    not_local_message(spec, ip),
                ));
            }
        }
        let claims = spec.port_claims();
        for claim in &claims {
            let Some(target) = relay_target_of(spec, claim.target) else {
                continue;
            };
            if target.ip().is_unspecified() {
                continue; // no target of this family
            }
            let same_port = held
                .get(&(claim.proto, target.port()))
                .map(Vec::as_slice)
                .unwrap_or(&[]);
            let own = same_port
                .iter()
                .map(|(id, c)| (Some(*id), *c))
                .chain(claims.iter().map(|c| (None, *c)));
            for (id, reserved) in own {
                if reserved.proto == claim.proto && self.reaches(target, reserved.bind) {
                    let whose = id.map_or("this rule's own port".to_owned(), |id| {
                        format!("the port of natmap rule #{id}")
                    });
                    return Err(Failure::new(
                        ErrorCode::InvalidArgument,
                        format!(
                            "target {target} is {whose} ({}): it would forward to itself; \
                             choose the real target's address and port",
                            reserve::describe(&reserved)
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Whether a connection to `target` lands on a socket bound to `bind`.
    fn reaches(&self, target: SocketAddr, bind: SocketAddr) -> bool {
        target.port() == bind.port()
            && target.is_ipv4() == bind.is_ipv4()
            && (target.ip() == bind.ip()
                || (bind.ip().is_unspecified()
                    && (target.ip().is_loopback() || self.host.local.contains(target.ip()))))
    }

    /// The status of a rule whose address may be missing: `None` when its
    /// address is here (or it has none).
    pub(super) fn address_status(&self, rule: &Rule) -> Option<(RuleStatus, String)> {
        let (ip, true) = rule.spec.ingress_address()? else {
            return None;
        };
        (!self.host.local.contains(ip)).then(|| {
            (
                RuleStatus::WaitingForAddress,
                format!("{ip} is not on this host now; the rule matches once it is"),
            )
        })
    }

    /// At start: whether the rule must wait for its address.
    pub(super) fn missing_address(&self, rule: &Rule) -> Option<Inactive> {
        match rule.spec.ingress_address() {
            Some((ip, false)) if !self.host.local.contains(ip) => Some(waiting(ip)),
            _ => None,
        }
    }

    /// The tick's address upkeep: withdraws rules whose address went away
    /// and installs those whose address came back.
    pub(super) fn follow_addresses(&mut self) {
        self.refresh_addresses();
        let (lost, back) = self.address_changes();
        if lost.is_empty() && back.is_empty() {
            return;
        }
        for (id, ip) in lost {
            tracing::warn!(rule = id, address = %ip, "address left this host; rule withdrawn");
            self.release(id);
            self.inactive.insert(id, waiting(ip));
        }
        let mut installed = Vec::new();
        for id in back {
            let Some(rule) = self.state.rule(id).cloned() else {
                continue;
            };
            if self.reserve_or_wait(&rule) {
                installed.push(id);
            }
        }
        let desired = self.desired(&self.state);
        if let Err(e) = self.apply(&desired) {
            tracing::error!("cannot follow address changes: {e}");
            return;
        }
        for id in installed {
            match self.start_listening(id) {
                Ok(()) => tracing::info!(rule = id, "address is back; rule installed"),
                Err(f) => tracing::warn!(rule = id, "{}", f.message),
            }
        }
    }

    /// Active rules (without `--allow-nonlocal`) whose address is gone, and
    /// waiting rules whose address is back.
    fn address_changes(&self) -> (Vec<(RuleId, IpAddr)>, Vec<RuleId>) {
        let mut lost = Vec::new();
        let mut back = Vec::new();
        for rule in &self.state.rules {
            let Some((ip, false)) = rule.spec.ingress_address() else {
                continue;
            };
            let waiting = self
                .inactive
                .get(&rule.id)
                .is_some_and(|i| i.status == RuleStatus::WaitingForAddress);
            match (self.host.local.contains(ip), waiting) {
                (false, false) if self.ports.held.contains(rule.id) => lost.push((rule.id, ip)),
                (true, true) => back.push(rule.id),
                _ => {}
            }
        }
        (lost, back)
    }
}

/// Where a claim's traffic goes, for the self-loop check: a fixed target
/// (dnat, hairpin, a non-Docker mapping). A container's address is never
/// the host's own.
fn relay_target_of(spec: &RuleSpec, target: SocketAddr) -> Option<SocketAddr> {
    match spec {
        RuleSpec::Docker(d) if !d.external => None,
        _ => Some(target),
    }
}

fn waiting(ip: IpAddr) -> Inactive {
    Inactive {
        status: RuleStatus::WaitingForAddress,
        reason: format!("{ip} is not on this host now; the rule is installed when it is"),
    }
}

fn not_local_message(spec: &RuleSpec, ip: IpAddr) -> String {
    let flag = match spec {
        RuleSpec::Docker(_) => "HOST_IP",
        _ => "--ext-ip",
    };
    format!(
        "{flag} {ip} is not an address of this host (`ip -br addr` lists them): a rule for it \
         would capture traffic meant for another machine. Add the address first, or, for an \
         address that moves between hosts (a VRRP/keepalived VIP), pass --allow-nonlocal: the \
         rule then matches only while the address is here"
    )
}
