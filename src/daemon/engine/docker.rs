//! Docker mappings in the engine: add, rm, remap, and following containers
//! as they stop, start, move or are recreated.
//!
//! A mapping's current target is part of the state, so the ruleset stays a
//! pure function of the state and a re-point is an ordinary change: apply,
//! persist, then point the loopback relay at the new address.
//!
//! Fail closed (design §9): a mapping has rules only while Docker has
//! confirmed that its container runs with that address. Docker hands a
//! stopped container's address to another container within a second (an
//! engine restart with restart policies), so a `die`, `kill`, `stop`,
//! `destroy` or `disconnect` withdraws the rules at once, from the event
//! alone, before any inspect; losing Docker withdraws every container
//! mapping; and at start they wait for Docker to confirm them.

use crate::docker::{DockerClient, Event, Lookup};
use crate::model::{DockerRule, Endpoint, Family, Proto, Rule, RuleId, RuleSpec};
use crate::proto::{
    ChangeKind, ChangeResult, DockerAddRequest, DockerRemapRequest, DockerRmRequest, ErrorCode,
    Response,
};

use super::super::reserve;
use super::{forget_flows, Engine, Failure, Outcome};

/// `docker_error` before the first connection attempt finished.
pub(super) const NOT_CONNECTED_YET: &str = "not connected to Docker yet";

/// Events after which the container's address may be another's any moment.
fn ends_confirmation(action: &str) -> bool {
    matches!(action, "die" | "kill" | "stop" | "destroy" | "disconnect")
}

/// Where a mapping should point, per Docker.
struct Observed {
    /// The container's name now (it follows the container through a rename).
    name: Option<String>,
    id: Option<String>,
    v4: Option<Endpoint>,
    v6: Option<Endpoint>,
    /// Why it is down, if it is.
    reason: Option<String>,
}

impl Engine {
    /// Docker answers (again): remember the client and re-check every mapping.
    pub fn docker_connected(&mut self, client: DockerClient) {
        tracing::info!(endpoint = %client.endpoint, "connected to Docker");
        self.docker = Some(client);
        self.refresh_docker(|_| true);
    }

    /// Docker went away: nothing confirms any container now, so every
    /// container mapping is withdrawn until Docker answers again.
    pub fn docker_lost(&mut self, reason: String) {
        if self.docker.is_some() {
            tracing::warn!(
                "lost Docker: {reason}; container mappings are withdrawn until Docker confirms them again"
            );
        } else if self.docker_error == NOT_CONNECTED_YET {
            tracing::info!(
                "Docker is not reachable ({reason}); static rules work, and Docker commands answer \
                 docker_unavailable until it is back (natmap keeps trying)"
            );
        }
        self.docker = None;
        self.docker_error = reason;
        self.withdraw(follows_container, "Docker is unreachable");
    }

    /// Why a container mapping is not confirmed (for `ls`).
    pub(super) fn unconfirmed_reason(&self) -> String {
        if self.docker_error == NOT_CONNECTED_YET {
            "waiting for Docker to confirm the container; no rules until it does".to_owned()
        } else {
            format!(
                "Docker unreachable ({}); no rules until Docker confirms the container",
                self.docker_error
            )
        }
    }

    /// Whether the mapping is down because Docker cannot confirm it.
    pub(super) fn unconfirmed(&self, rule: &DockerRule) -> bool {
        follows_container(rule) && self.docker.is_none()
    }

    /// At start: container mappings are not rendered before Docker confirms
    /// them (leftover rules of a killed daemon could reach whichever
    /// container holds the old address now).
    pub(super) fn withhold_unconfirmed_containers(&mut self) {
        for rule in &mut self.state.rules {
            // Container addresses only: a remote node's published port
            // (`external`) cannot be handed to another container.
            if let RuleSpec::Docker(d) = &mut rule.spec {
                if !d.external {
                    d.target_v4 = None;
                    d.target_v6 = None;
                }
            }
        }
    }

    /// Withdraws the rules of the selected mappings that point at a
    /// container's own address (not a fixed target or a remote node) now,
    /// without asking Docker, and cuts their flows and relayed connections.
    pub(super) fn withdraw(&mut self, select: impl Fn(&DockerRule) -> bool, why: &str) {
        let mut next = self.state.clone();
        let mut withdrawn: Vec<(RuleId, RuleSpec)> = Vec::new();
        for rule in next.rules.iter_mut() {
            let RuleSpec::Docker(d) = &mut rule.spec else {
                continue;
            };
            if d.external || !d.is_up() || !select(d) {
                continue;
            }
            withdrawn.push((rule.id, RuleSpec::Docker(d.clone())));
            d.target_v4 = None;
            d.target_v6 = None;
        }
        if withdrawn.is_empty() {
            return;
        }
        if let Err(f) = self.commit(next) {
            tracing::error!("cannot withdraw Docker mappings ({why}): {}", f.message);
            return;
        }
        for (id, old) in withdrawn {
            self.down_reason.insert(
                id,
                format!("{why}; waiting for Docker to confirm the container"),
            );
            self.repointed(id, &old);
            tracing::info!(rule = id, "mapping withdrawn: {why}");
        }
    }

    /// A container event: re-check the mappings of that container.
    pub fn docker_event(&mut self, event: &Event) {
        if !event.matters() {
            return;
        }
        tracing::debug!(action = %event.action, id = %event.container_id, "docker event");
        let concerns = |r: &DockerRule| {
            r.container_id.as_deref() == Some(event.container_id.as_str())
                || event.name.as_deref() == Some(r.name.as_str())
        };
        if ends_confirmation(&event.action) {
            let why = format!("container {}", event.action);
            self.withdraw(concerns, &why);
        }
        self.refresh_docker(concerns);
    }

    fn docker_client(&self) -> Outcome<DockerClient> {
        self.docker.clone().ok_or_else(|| {
            Failure::new(
                ErrorCode::DockerUnavailable,
                format!(
                    "Docker is not reachable ({}); static rules keep working. Start Docker \
                     (systemctl start docker) and retry; natmap reconnects by itself",
                    self.docker_error
                ),
            )
        })
    }

    /// Asks Docker where the mapping should point: its container by id
    /// (through a rename), else a container under its name (a recreate).
    fn observe(&self, client: &DockerClient, rule: &DockerRule) -> Result<Observed, String> {
        let by_id = match &rule.container_id {
            Some(id) => client.inspect_blocking(id)?,
            None => Lookup::NotFound,
        };
        let found = match by_id {
            Lookup::NotFound => client.inspect_blocking(&rule.name)?,
            found => found,
        };
        let name = match &found {
            Lookup::Found(info) => Some(info.name.clone()),
            _ => None,
        };
        let mut seen = self.observed(found, rule);
        seen.name = name;
        Ok(seen)
    }

    fn observed(&self, found: Lookup, rule: &DockerRule) -> Observed {
        match found {
            Lookup::Ambiguous(candidates) => Observed {
                name: None,
                id: rule.container_id.clone(),
                v4: None,
                v6: None,
                reason: Some(format!(
                    "{} names several containers ({}); the mapping waits",
                    rule.name,
                    candidates.join(", ")
                )),
            },
            Lookup::NotFound => Observed {
                name: None,
                id: rule.container_id.clone(),
                v4: None,
                v6: None,
                reason: Some(format!(
                    "container {} does not exist; the mapping waits for a container of that name",
                    rule.name
                )),
            },
            Lookup::Found(info) if !info.running => Observed {
                name: None,
                id: Some(info.id),
                v4: None,
                v6: None,
                reason: Some(format!("container {} is not running", info.name)),
            },
            Lookup::Found(info) => match info.pick_network(rule.network.as_deref()) {
                Ok(net) => Observed {
                    name: None,
                    id: Some(info.id.clone()),
                    v4: net.v4,
                    v6: net.v6,
                    reason: None,
                },
                Err(e) => Observed {
                    name: None,
                    id: Some(info.id.clone()),
                    v4: None,
                    v6: None,
                    reason: Some(e),
                },
            },
        }
    }

    /// Re-inspects the containers of the selected mappings and re-points those
    /// that moved, in one transaction.
    pub fn refresh_docker(&mut self, select: impl Fn(&DockerRule) -> bool) {
        let Some(client) = self.docker.clone() else {
            return;
        };
        let mut next = self.state.clone();
        let mut moved: Vec<(RuleId, RuleSpec)> = Vec::new();
        for rule in next.rules.iter_mut() {
            let RuleSpec::Docker(d) = &mut rule.spec else {
                continue;
            };
            // Auto-discovered mappings follow their engine's snapshots instead.
            if !follows_container(d) || !select(d) {
                continue;
            }
            let seen = match self.observe(&client, d) {
                Ok(seen) => seen,
                Err(e) => {
                    tracing::warn!(rule = rule.id, "cannot inspect container {}: {e}", d.name);
                    continue;
                }
            };
            match &seen.reason {
                Some(reason) => self.down_reason.insert(rule.id, reason.clone()),
                None => self.down_reason.remove(&rule.id),
            };
            let renamed = seen.name.as_ref().is_some_and(|n| *n != d.name);
            if renamed
                || (d.target_v4, d.target_v6, &d.container_id) != (seen.v4, seen.v6, &seen.id)
            {
                moved.push((rule.id, RuleSpec::Docker(d.clone())));
                d.target_v4 = seen.v4;
                d.target_v6 = seen.v6;
                d.container_id = seen.id;
                if let Some(name) = seen.name {
                    d.name = name;
                }
            }
        }
        if moved.is_empty() {
            return;
        }
        if let Err(f) = self.commit(next) {
            tracing::error!("cannot re-point Docker mappings: {}", f.message);
            return;
        }
        for (id, old) in moved {
            let target = self.repointed(id, &old);
            match target {
                Some(ip) => tracing::info!(rule = id, target = %ip, "mapping re-pointed"),
                None => tracing::info!(
                    rule = id,
                    "mapping down: {}",
                    self.down_reason.get(&id).map_or("", |s| s)
                ),
            }
        }
    }

    pub(super) fn docker_add(&mut self, req: DockerAddRequest) -> Outcome<Response> {
        let invalid = |m: &str| Failure::new(ErrorCode::InvalidArgument, m);
        let mapping = req.mapping;
        let rule = if let Some(target) = mapping.target_ip {
            // A fixed, non-Docker target: the name is only a label.
            let Some(label) = req.name else {
                return Err(invalid(
                    "a HOST_PORT:TARGET_IP:PORT mapping needs --name LABEL",
                ));
            };
            if req.container.is_some() {
                return Err(invalid(
                    "give either a container or a HOST_PORT:TARGET_IP:PORT mapping, not both",
                ));
            }
            let endpoint = Endpoint {
                ip: target,
                subnet: None,
            };
            DockerRule {
                name: label.to_string(),
                container_id: None,
                network: None,
                host_ip: mapping.host_ip,
                host_port: mapping.host_port,
                container_port: mapping.target_port,
                proto: mapping.proto,
                external: true,
                target_v4: (target.family() == Family::V4).then_some(endpoint),
                target_v6: (target.family() == Family::V6).then_some(endpoint),
                auto: None,
                allow_nonlocal: req.allow_nonlocal,
            }
        } else {
            let reference = match (req.container, req.name) {
                (Some(c), None) | (None, Some(c)) => c,
                (Some(_), Some(_)) => {
                    return Err(invalid(
                        "give the container either as an argument or with --name, not both",
                    ))
                }
                (None, None) => {
                    return Err(invalid("name the container: docker add CONTAINER MAPPING"))
                }
            };
            self.resolve_container(DockerRule {
                name: reference.to_string(),
                container_id: None,
                network: req.network.map(|n| n.to_string()),
                host_ip: mapping.host_ip,
                host_port: mapping.host_port,
                container_port: mapping.target_port,
                proto: mapping.proto,
                external: false,
                target_v4: None,
                target_v6: None,
                auto: None,
                allow_nonlocal: req.allow_nonlocal,
            })?
        };
        let name = rule.name.clone();
        let response = self.add(RuleSpec::Docker(rule))?;
        if let Some(rule) = self
            .state
            .rules
            .iter()
            .rev()
            .find(|r| matches!(&r.spec, RuleSpec::Docker(d) if d.name == name))
        {
            if let RuleSpec::Docker(d) = &rule.spec {
                if !d.is_up() && !d.external {
                    self.down_reason
                        .insert(rule.id, format!("container {name} is not running"));
                }
            }
        }
        Ok(response)
    }

    /// After a committed re-point of rule `id` (whose previous form was
    /// `old`): the relay follows, and flows to the old target are cut.
    pub(super) fn repointed(&mut self, id: RuleId, old: &RuleSpec) -> Option<std::net::IpAddr> {
        let target = self
            .state
            .rules
            .iter()
            .find(|r| r.id == id)
            .and_then(|r| r.spec.relay_target());
        // A new relay: connections to the old target are cut, as the
        // conntrack entries below are.
        if let Err(f) = self.start_listening(id) {
            tracing::warn!(rule = id, "{}", f.message);
        }
        forget_flows(old);
        target
    }

    /// Looks the mapping's container up (by the reference in `rule.name`) and
    /// fills in its canonical name, id, network and current addresses.
    pub(super) fn resolve_container(&self, mut rule: DockerRule) -> Outcome<DockerRule> {
        let invalid = |m: &str| Failure::new(ErrorCode::InvalidArgument, m);
        let client = self.docker_client()?;
        let info = match client
            .inspect_blocking(&rule.name)
            .map_err(|e| Failure::new(ErrorCode::DockerUnavailable, e))?
        {
            Lookup::Found(info) => info,
            Lookup::NotFound => {
                return Err(Failure::new(
                    ErrorCode::ContainerNotFound,
                    format!("no container {}; `docker ps -a` lists them", rule.name),
                ))
            }
            Lookup::Ambiguous(candidates) => {
                return Err(invalid(&format!(
                    "{} matches several containers: {}; give more of the id, or the name",
                    rule.name,
                    candidates.join(", ")
                )))
            }
        };
        let net = info
            .pick_network(rule.network.as_deref())
            .map_err(|e| invalid(&e))?;
        let (v4, v6) = if info.running {
            (net.v4, net.v6)
        } else {
            (None, None)
        };
        if info.running && rule.host_ip.is_some_and(|h| h.family() == Family::V6) && v6.is_none() {
            return Err(invalid(&format!(
                "container {} has no IPv6 address on network {}",
                info.name, net.network
            )));
        }
        rule.name = info.name.clone();
        rule.container_id = Some(info.id.clone());
        rule.network = Some(net.network.clone());
        rule.target_v4 = v4;
        rule.target_v6 = v6;
        Ok(rule)
    }

    /// The one Docker mapping of `reference` on `host_port` (and `proto`).
    fn find_mapping(&self, reference: &str, host_port: u16, proto: Option<Proto>) -> Outcome<Rule> {
        let found: Vec<&Rule> = self
            .state
            .rules
            .iter()
            .filter(|r| match &r.spec {
                RuleSpec::Docker(d) => {
                    d.refers_to(reference)
                        && d.host_port == host_port
                        && proto.is_none_or(|p| p == d.proto)
                }
                _ => false,
            })
            .collect();
        match found.as_slice() {
            [one] => Ok((*one).clone()),
            [] => Err(Failure::new(
                ErrorCode::NotFound,
                format!("{reference} has no mapping on host port {host_port}; `lab-ops natmap ls {reference}` lists its mappings"),
            )),
            _ => Err(Failure::new(
                ErrorCode::InvalidArgument,
                format!("{reference} maps host port {host_port} for tcp and udp; add /tcp or /udp"),
            )),
        }
    }

    pub(super) fn docker_rm(&mut self, req: DockerRmRequest) -> Outcome<Response> {
        let invalid = |m: &str| Failure::new(ErrorCode::InvalidArgument, m);
        let rule = match (req.id, req.container.or(req.name), req.host_port) {
            (Some(id), None, None) => self
                .state
                .rules
                .iter()
                .find(|r| r.id == id)
                .cloned()
                .ok_or_else(|| Failure::new(ErrorCode::NotFound, format!("no rule #{id}; `lab-ops natmap ls` lists them")))?,
            (None, Some(reference), Some(port)) if port > 0 => self.find_mapping(reference.as_str(), port, req.proto)?,
            _ => {
                return Err(invalid(
                    "use: docker rm CONTAINER HOST_PORT[/proto] | docker rm --name NAME HOST_PORT | docker rm --id N",
                ))
            }
        };
        self.delete_rule(rule)
    }

    pub(super) fn docker_remap(&mut self, req: DockerRemapRequest) -> Outcome<Response> {
        if req.old_port == 0 || req.new_port == 0 {
            return Err(Failure::new(
                ErrorCode::InvalidArgument,
                "ports are 1-65535",
            ));
        }
        let rule = self.find_mapping(req.container.as_str(), req.old_port, req.proto)?;
        let RuleSpec::Docker(old) = &rule.spec else {
            unreachable!("find_mapping returns Docker mappings");
        };
        if req.old_port == req.new_port {
            return Ok(Response::ok(ChangeResult {
                result: ChangeKind::AlreadyPresent,
                rule: self.view(&rule),
            }));
        }
        let mut moved = old.clone();
        moved.host_port = req.new_port;
        let new_spec = RuleSpec::Docker(moved);
        // Reserve the new port first; on any failure the old mapping stays as it was.
        let claims = new_spec.port_claims();
        self.check_own_claims_except(&claims, rule.id)?;
        let held = reserve::bind_all(&claims)
            .map_err(|busy| Failure::new(ErrorCode::PortInUse, busy.message))?;
        let mut next = self.state.clone();
        if let Some(r) = next.rules.iter_mut().find(|r| r.id == rule.id) {
            r.spec = new_spec;
        }
        self.commit(next)?;
        self.relays.stop(rule.id);
        self.held.insert(rule.id, held);
        if let Err(f) = self.start_listening(rule.id) {
            tracing::error!(rule = rule.id, "remapped, but {}", f.message);
        }
        forget_flows(&rule.spec);
        let updated = self
            .state
            .rules
            .iter()
            .find(|r| r.id == rule.id)
            .cloned()
            .unwrap_or(rule);
        tracing::info!(
            rule = updated.id,
            from = req.old_port,
            to = req.new_port,
            "mapping remapped"
        );
        Ok(Response::ok(ChangeResult {
            result: ChangeKind::Remapped,
            rule: self.view(&updated),
        }))
    }
}

/// Whether a mapping points at a container natmap follows through Docker
/// events (not a fixed target, not an auto-discovered mapping).
fn follows_container(rule: &DockerRule) -> bool {
    !rule.external && rule.auto.is_none()
}
