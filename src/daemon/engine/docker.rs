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

use std::collections::HashMap;

use crate::docker::{DockerClient, Event, Lookup};
use crate::model::{DockerRule, Endpoint, Family, Proto, Rule, RuleId, RuleSpec};
use tokio::sync::oneshot;

use crate::proto::{
    ChangeKind, ChangeResult, DockerAddRequest, DockerRemapRequest, DockerRmRequest, ErrorCode,
    Request, Response,
};

use super::super::reserve;
use super::super::EngineMsg;
use super::batch::Change;
use super::{forget_flows, respond, Engine, Failure, Outcome, Peer};

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
        self.docker.client = Some(client);
        self.refresh_docker(|_| true);
    }

    /// Docker went away: nothing confirms any container now, so every
    /// container mapping is withdrawn until Docker answers again.
    pub fn docker_lost(&mut self, reason: String) {
        if self.docker.client.is_some() {
            tracing::warn!(
                "lost Docker: {reason}; container mappings are withdrawn until Docker confirms them again"
            );
        } else if self.docker.error == NOT_CONNECTED_YET {
            tracing::info!(
                "Docker is not reachable ({reason}); static rules work, and Docker commands answer \
                 docker_unavailable until it is back (natmap keeps trying)"
            );
        }
        self.docker.client = None;
        self.docker.error = reason;
        self.withdraw(follows_container, "Docker is unreachable");
    }

    /// Why a container mapping is not confirmed (for `ls`).
    pub(super) fn unconfirmed_reason(&self) -> String {
        if self.docker.error == NOT_CONNECTED_YET {
            "waiting for Docker to confirm the container; no rules until it does".to_owned()
        } else {
            format!(
                "Docker unreachable ({}); no rules until Docker confirms the container",
                self.docker.error
            )
        }
    }

    /// Whether the mapping is down because Docker cannot confirm it.
    pub(super) fn unconfirmed(&self, rule: &DockerRule) -> bool {
        follows_container(rule) && self.docker.client.is_none()
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
            self.docker.down_reason.insert(
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
        // Answers asked before this event may describe the container as it
        // was before it (running, at its address): they no longer count.
        let concerned: Vec<RuleId> = self
            .state
            .rules
            .iter()
            .filter(|r| matches!(&r.spec, RuleSpec::Docker(d) if concerns(d)))
            .map(|r| r.id)
            .collect();
        self.docker.event_order.event_about(&concerned);
        if ends_confirmation(&event.action) {
            let why = format!("container {}", event.action);
            self.withdraw(concerns, &why);
        }
        self.refresh_docker(concerns);
    }

    fn docker_client(&self) -> Outcome<DockerClient> {
        self.docker.client.clone().ok_or_else(|| {
            Failure::new(
                ErrorCode::DockerUnavailable,
                format!(
                    "Docker is not reachable ({}); static rules keep working. Start Docker \
                     (systemctl start docker) and retry; natmap reconnects by itself",
                    self.docker.error
                ),
            )
        })
    }

    /// Asks Docker, off the engine thread, where the selected container
    /// mappings should point; the answers come back as one
    /// `EngineMsg::DockerObserved` and are applied in one transaction. At
    /// most `INSPECTS_AT_ONCE` inspects run at a time, and a slow Docker
    /// never holds the engine: other clients are served meanwhile.
    pub fn refresh_docker(&mut self, select: impl Fn(&DockerRule) -> bool) {
        let Some(client) = self.docker.client.clone() else {
            return;
        };
        let Some(tx) = self.messages() else {
            return;
        };
        let asked: Vec<(RuleId, DockerRule)> = self
            .state
            .rules
            .iter()
            .filter_map(|r| match &r.spec {
                // Auto-discovered mappings follow their engine's snapshots instead.
                RuleSpec::Docker(d) if follows_container(d) && select(d) => Some((r.id, d.clone())),
                _ => None,
            })
            .collect();
        if asked.is_empty() {
            return;
        }
        let asked_after = self.docker.event_order.now();
        let runtime = client.runtime().clone();
        runtime.spawn(async move {
            let limit = std::sync::Arc::new(tokio::sync::Semaphore::new(INSPECTS_AT_ONCE));
            let mut calls = tokio::task::JoinSet::new();
            for (id, rule) in asked {
                let (client, limit) = (client.clone(), limit.clone());
                calls.spawn(async move {
                    let _permit = limit.acquire_owned().await;
                    let seen = observe(&client, &rule).await;
                    Observation {
                        id,
                        asked: rule,
                        asked_after,
                        seen,
                    }
                });
            }
            let mut answers = Vec::with_capacity(calls.len());
            while let Some(done) = calls.join_next().await {
                if let Ok(answer) = done {
                    answers.push(answer);
                }
            }
            let _ = tx.send(EngineMsg::DockerObserved(answers));
        });
    }

    /// Applies Docker's answers: re-points the mappings that moved (one
    /// transaction) and records why the others are down. An answer about a
    /// mapping that changed since it was asked is dropped (a newer one comes).
    pub fn docker_observed(&mut self, answers: Vec<Observation>) {
        let mut next = self.state.clone();
        let mut moved: Vec<(RuleId, RuleSpec)> = Vec::new();
        for answer in answers {
            // An event about this mapping came after the question: the
            // answer may predate it (a container that has since stopped
            // was still running); the event asked again.
            if self
                .docker
                .event_order
                .event_since(answer.id, answer.asked_after)
            {
                continue;
            }
            let Some(rule) = next.rules.iter_mut().find(|r| r.id == answer.id) else {
                continue;
            };
            let RuleSpec::Docker(d) = &mut rule.spec else {
                continue;
            };
            // Changed since (withdrawn by an event, re-pointed by a newer
            // answer): this answer may be older than what natmap knows.
            if *d != answer.asked {
                continue;
            }
            let seen = match answer.seen {
                Ok(seen) => seen,
                Err(e) => {
                    tracing::warn!(rule = rule.id, "cannot inspect container {}: {e}", d.name);
                    continue;
                }
            };
            match &seen.reason {
                Some(reason) => self.docker.down_reason.insert(rule.id, reason.clone()),
                None => self.docker.down_reason.remove(&rule.id),
            };
            let renamed = seen.name.as_ref().is_some_and(|n| *n != d.name);
            let target = (seen.v4, seen.v6, &seen.id);
            if renamed || (d.target_v4, d.target_v6, &d.container_id) != target {
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
            match self.repointed(id, &old) {
                Some(ip) => tracing::info!(rule = id, target = %ip, "mapping re-pointed"),
                None => tracing::info!(
                    rule = id,
                    "mapping down: {}",
                    self.docker.down_reason.get(&id).map_or("", |s| s)
                ),
            }
        }
    }

    /// `docker add`, answered at once (dry runs; the daemon's loop uses
    /// [`Engine::docker_add_begin`] so the inspect runs off this thread).
    pub(super) fn docker_add(&mut self, req: DockerAddRequest) -> Outcome<Response> {
        match add_plan(req)? {
            AddPlan::Fixed(rule) => self.finish_add(rule),
            AddPlan::Container(rule) => {
                let lookup = self.docker_client()?.inspect_blocking(&rule.name);
                self.finish_add(settle(rule, lookup)?)
            }
        }
    }

    /// `docker add` from a client: a fixed target is added now; a container
    /// is looked up off the engine thread, and [`Engine::docker_add_finish`]
    /// adds it and answers once Docker has answered. Other clients are
    /// served meanwhile.
    pub(crate) fn docker_add_begin(
        &mut self,
        req: DockerAddRequest,
        peer: Peer,
        reply: oneshot::Sender<Response>,
    ) {
        self.log_change(&Request::DockerAdd(req.clone()), peer);
        self.refresh_addresses();
        let rule = match add_plan(req) {
            Ok(AddPlan::Container(rule)) => rule,
            Ok(AddPlan::Fixed(rule)) => {
                let _ = reply.send(respond(self.finish_add(rule)));
                return;
            }
            Err(f) => {
                let _ = reply.send(respond(Err(f)));
                return;
            }
        };
        let client = match self.docker_client() {
            Ok(client) => client,
            Err(f) => {
                let _ = reply.send(respond(Err(f)));
                return;
            }
        };
        let Some(tx) = self.messages() else {
            let lookup = client.inspect_blocking(&rule.name);
            let _ = reply.send(respond(
                settle(rule, lookup).and_then(|r| self.finish_add(r)),
            ));
            return;
        };
        client.runtime().clone().spawn(async move {
            let lookup = client.inspect(&rule.name).await;
            let pending = PendingAdd {
                rule,
                lookup,
                reply,
            };
            let _ = tx.send(EngineMsg::DockerResolved(Box::new(pending)));
        });
    }

    /// Completes a [`Engine::docker_add_begin`] with Docker's answer.
    pub(crate) fn docker_add_finish(&mut self, pending: Box<PendingAdd>) {
        let PendingAdd {
            rule,
            lookup,
            reply,
        } = *pending;
        self.refresh_addresses();
        let rule = match settle(rule, lookup) {
            Ok(rule) => rule,
            Err(f) => {
                let _ = reply.send(respond(Err(f)));
                return;
            }
        };
        let name = rule.name.clone();
        self.apply_changes_later(
            vec![Change::Add(RuleSpec::Docker(rule))],
            Box::new(
                move |engine: &mut Engine, mut outcomes: Vec<Outcome<Response>>| {
                    let outcome = outcomes.pop().expect("one change, one outcome");
                    if outcome.is_ok() {
                        engine.note_stopped_container(&name);
                        engine.persist.warning = None;
                    }
                    let _ = reply.send(respond(outcome));
                },
            ),
        );
    }

    /// Looks the mapping's container up (by the reference in `rule.name`)
    /// for `apply` documents: from the answers [`Engine::apply_begin`]
    /// fetched off this thread, or now when there are none (dry runs
    /// nested in tests, a daemon without a message channel).
    pub(super) fn resolve_container(&self, rule: DockerRule) -> Outcome<DockerRule> {
        let lookup = match self.docker.prefetched.get(&rule.name) {
            Some(answer) => answer.clone(),
            None => self.docker_client()?.inspect_blocking(&rule.name),
        };
        settle(rule, lookup)
    }

    /// `apply` (or a dry-run `apply`) from a client: the containers the
    /// document names are inspected off the engine thread, at most
    /// `INSPECTS_AT_ONCE` at a time, and [`Engine::apply_finish`] applies
    /// the document once Docker has answered for all of them. A document
    /// naming 50 containers on a slow Docker held every other client for
    /// up to 50 × 5 s before.
    pub(crate) fn apply_begin(
        &mut self,
        request: Request,
        peer: Peer,
        reply: oneshot::Sender<Response>,
    ) {
        let refs = containers_named(&request);
        let (Some(client), Some(tx)) = (self.docker.client.clone(), self.messages()) else {
            self.handle_later(request, peer, reply);
            return;
        };
        if refs.is_empty() {
            self.handle_later(request, peer, reply);
            return;
        }
        client.runtime().clone().spawn(async move {
            let limit = std::sync::Arc::new(tokio::sync::Semaphore::new(INSPECTS_AT_ONCE));
            let mut calls = tokio::task::JoinSet::new();
            for reference in refs {
                let (client, limit) = (client.clone(), limit.clone());
                calls.spawn(async move {
                    let _permit = limit.acquire_owned().await;
                    let lookup = client.inspect(&reference).await;
                    (reference, lookup)
                });
            }
            let mut lookups = HashMap::new();
            while let Some(done) = calls.join_next().await {
                if let Ok((reference, lookup)) = done {
                    lookups.insert(reference, lookup);
                }
            }
            let pending = PendingApply {
                request,
                peer,
                lookups,
                reply,
            };
            let _ = tx.send(EngineMsg::ApplyResolved(Box::new(pending)));
        });
    }

    /// Completes an [`Engine::apply_begin`]: applies the document with
    /// Docker's answers, which serve this request only.
    pub(crate) fn apply_finish(&mut self, pending: PendingApply) {
        let PendingApply {
            request,
            peer,
            lookups,
            reply,
        } = pending;
        self.docker.prefetched = lookups;
        self.handle_later(request, peer, reply);
        self.docker.prefetched.clear();
    }

    /// Adds a resolved Docker mapping (the same path as every rule change).
    fn finish_add(&mut self, rule: DockerRule) -> Outcome<Response> {
        let name = rule.name.clone();
        let response = self.add(RuleSpec::Docker(rule))?;
        self.note_stopped_container(&name);
        Ok(response)
    }

    /// A mapping just added for a container that is not running is down,
    /// and says why.
    fn note_stopped_container(&mut self, name: &str) {
        if let Some(rule) = self
            .state
            .rules
            .iter()
            .rev()
            .find(|r| matches!(&r.spec, RuleSpec::Docker(d) if d.name == name))
        {
            if let RuleSpec::Docker(d) = &rule.spec {
                if !d.is_up() && !d.external {
                    self.docker
                        .down_reason
                        .insert(rule.id, format!("container {name} is not running"));
                }
            }
        }
    }

    /// After a committed re-point of rule `id` (whose previous form was
    /// `old`): the relay follows, and flows to the old target are cut.
    pub(super) fn repointed(&mut self, id: RuleId, old: &RuleSpec) -> Option<std::net::IpAddr> {
        let rule = self.state.rule(id).cloned();
        let target = rule.as_ref().and_then(|r| r.spec.relay_target());
        if let Some(rule) = rule.filter(holds_port_only_while_up) {
            self.hold_while_up(&rule);
        }
        // A new relay: connections to the old target are cut, as the
        // conntrack entries below are.
        if let Err(f) = self.start_listening(id) {
            tracing::warn!(rule = id, "{}", f.message);
        }
        forget_flows(old);
        target
    }

    /// A labelled local container holds its host port only while it runs
    /// (so `docker start` of another container publishing that port with
    /// `-p` works): released when it goes down, reserved again when it comes
    /// back; if someone took the port meanwhile, the mapping waits as a port
    /// conflict (retried every tick) and installs nothing.
    fn hold_while_up(&mut self, rule: &Rule) {
        let up = matches!(&rule.spec, RuleSpec::Docker(d) if d.is_up());
        if !up {
            self.ports.relays.stop(rule.id);
            self.ports.held.remove(rule.id);
            return;
        }
        if self.ports.held.contains(rule.id) {
            return;
        }
        if !self.reserve_or_wait(rule) {
            let desired = self.desired(&self.state);
            if let Err(e) = self.apply(&desired) {
                tracing::error!(rule = rule.id, "cannot withdraw the mapping: {e}");
            }
        }
    }

    /// The one Docker mapping of `reference` on `host_port` (and `proto`).
    /// Any port of a range names its mapping; with `last`, the request
    /// names a range (`8160-8161`), which must be the mapping's exactly.
    fn find_mapping(
        &self,
        reference: &str,
        host_port: u16,
        last: Option<u16>,
        proto: Option<Proto>,
    ) -> Outcome<Rule> {
        let found: Vec<&Rule> = self
            .state
            .rules
            .iter()
            .filter(|r| match &r.spec {
                RuleSpec::Docker(d) => {
                    d.refers_to(reference)
                        && d.has_host_port(host_port)
                        && proto.is_none_or(|p| p == d.proto)
                }
                _ => false,
            })
            .collect();
        let shown = match last {
            Some(last) if last != host_port => format!("{host_port}-{last}"),
            _ => host_port.to_string(),
        };
        if let (Some(last), [one]) = (last, found.as_slice()) {
            if let RuleSpec::Docker(d) = &one.spec {
                if d.host_port != host_port || d.last_host_port() != last {
                    return Err(Failure::new(
                        ErrorCode::NotFound,
                        format!(
                            "{reference} has no mapping on host ports {shown}: rule #{} maps {}; \
                             name it by that range or by one of its ports",
                            one.id,
                            d.host_ports()
                        ),
                    ));
                }
            }
        }
        match found.as_slice() {
            [one] => Ok((*one).clone()),
            [] => Err(Failure::new(
                ErrorCode::NotFound,
                format!("{reference} has no mapping on host port {shown}; `lab-ops natmap ls {reference}` lists its mappings"),
            )),
            _ => Err(Failure::new(
                ErrorCode::InvalidArgument,
                format!("{reference} maps host port {host_port} for tcp and udp; add /tcp or /udp"),
            )),
        }
    }

    pub(super) fn docker_rm(&mut self, req: DockerRmRequest) -> Outcome<Response> {
        let rule = self.docker_rm_target(req)?;
        self.delete_rule(rule)
    }

    /// `docker rm` with the firewall transaction off this thread
    /// ([`super::offload`]); `reply` gets the answer.
    pub(super) fn docker_rm_later(
        &mut self,
        req: DockerRmRequest,
        reply: oneshot::Sender<Response>,
    ) {
        let rule = match self.docker_rm_target(req) {
            Ok(rule) => rule,
            Err(f) => {
                let _ = reply.send(respond(Err(f)));
                return;
            }
        };
        self.apply_changes_later(
            vec![Change::DeleteId(rule.id)],
            Box::new(
                move |engine: &mut Engine, mut outcomes: Vec<Outcome<Response>>| {
                    let response = respond(outcomes.pop().expect("one change, one outcome"));
                    if response.ok {
                        engine.persist.warning = None;
                    }
                    let _ = reply.send(response);
                },
            ),
        );
    }

    /// The Docker mapping a `docker rm` names.
    fn docker_rm_target(&mut self, req: DockerRmRequest) -> Outcome<Rule> {
        let invalid = |m: &str| Failure::new(ErrorCode::InvalidArgument, m);
        let rule = match (req.id, req.container.or(req.name), req.host_port) {
            (Some(id), None, None) => self
                .state
                .rule(id)
                .cloned()
                .ok_or_else(|| Failure::new(ErrorCode::NotFound, format!("no rule #{id}; `lab-ops natmap ls` lists them")))?,
            (None, Some(reference), Some(port)) if port > 0 => {
                self.find_mapping(reference.as_str(), port, req.host_port_last, req.proto)?
            }
            _ => {
                return Err(invalid(
                    "use: docker rm CONTAINER HOST_PORT[/proto] | docker rm --name NAME HOST_PORT | docker rm --id N",
                ))
            }
        };
        // `docker rm` removes Docker mappings only: an id typed from the
        // wrong line of `ls` must not delete a static rule.
        if !matches!(rule.spec, RuleSpec::Docker(_)) {
            let kind = rule.spec.kind().replace('_', "-");
            return Err(invalid(&format!(
                "rule #{} is a {kind} rule, not a Docker mapping; remove it with \
                 `lab-ops natmap {kind} … --delete` (the arguments `lab-ops natmap ls {}` shows) \
                 or with `apply`",
                rule.id, rule.id
            )));
        }
        Ok(rule)
    }

    pub(super) fn docker_remap(&mut self, req: DockerRemapRequest) -> Outcome<Response> {
        if req.old_port == 0 || req.new_port == 0 {
            return Err(Failure::new(
                ErrorCode::InvalidArgument,
                "ports are 1-65535",
            ));
        }
        let rule = self.find_mapping(
            req.container.as_str(),
            req.old_port,
            req.old_port_last,
            req.proto,
        )?;
        let RuleSpec::Docker(old) = &rule.spec else {
            unreachable!("find_mapping returns Docker mappings");
        };
        // A range moves as a whole, to a range of the same length starting
        // at NEW (`remap web 8160:9160` or `remap web 8160-8161:9160-9161`).
        if old.port_count > 1 && req.old_port != old.host_port {
            return Err(Failure::new(
                ErrorCode::InvalidArgument,
                format!(
                    "rule #{} maps the range {}; remap it as a whole from its first port \
                     ({}:NEW or {}:NEW-LAST, a range of the same length)",
                    rule.id,
                    old.host_ports(),
                    old.host_port,
                    old.host_ports()
                ),
            ));
        }
        let new_last = u32::from(req.new_port) + u32::from(old.port_count) - 1;
        if new_last > 65535 || req.new_port_last.is_some_and(|l| u32::from(l) != new_last) {
            return Err(Failure::new(
                ErrorCode::InvalidArgument,
                format!(
                    "rule #{} maps {} port(s) ({}); the new host ports must be a range of the \
                     same length within 1-65535, e.g. {}:{}-{}",
                    rule.id,
                    old.port_count,
                    old.host_ports(),
                    old.host_ports(),
                    req.new_port.min(65535 - (old.port_count - 1)),
                    req.new_port.min(65535 - (old.port_count - 1)) + (old.port_count - 1)
                ),
            ));
        }
        if req.old_port == req.new_port {
            return Ok(Response::ok(ChangeResult {
                result: ChangeKind::AlreadyPresent,
                rule: self.view(&rule),
                notes: Vec::new(),
            }));
        }
        let mut moved = old.clone();
        moved.host_port = req.new_port;
        let new_spec = RuleSpec::Docker(moved);
        // Reserve the new port first; on any failure the old mapping stays as it was.
        let claims = new_spec.port_claims();
        self.check_own_claims_except(&claims, rule.id)?;
        super::super::fds::check(&claims).map_err(|m| Failure::new(ErrorCode::FdLimit, m))?;
        let held = reserve::bind_all(&claims)
            .map_err(|busy| Failure::new(ErrorCode::PortInUse, busy.message))?;
        let mut next = self.state.clone();
        if let Some(r) = next.rules.iter_mut().find(|r| r.id == rule.id) {
            r.spec = new_spec;
        }
        self.commit(next)?;
        self.ports.relays.stop(rule.id);
        self.ports.held.insert(rule.id, held);
        if let Err(f) = self.start_listening(rule.id) {
            tracing::error!(rule = rule.id, "remapped, but {}", f.message);
        }
        forget_flows(&rule.spec);
        let updated = self.state.rule(rule.id).cloned().unwrap_or(rule);
        tracing::info!(
            rule = updated.id,
            from = req.old_port,
            to = req.new_port,
            "mapping remapped"
        );
        Ok(Response::ok(ChangeResult {
            result: ChangeKind::Remapped,
            rule: self.view(&updated),
            notes: Vec::new(),
        }))
    }
}

/// Whether a mapping points at a container natmap follows through Docker
/// events (not a fixed target, not an auto-discovered mapping).
fn follows_container(rule: &DockerRule) -> bool {
    !rule.external && rule.auto.is_none()
}

/// Inspects that run at once when the engine re-checks many mappings.
const INSPECTS_AT_ONCE: usize = 8;

/// Docker's answer about one mapping, for the engine thread.
pub struct Observation {
    /// The mapping.
    id: RuleId,
    /// The mapping as it was when Docker was asked.
    asked: DockerRule,
    /// The last container event before Docker was asked ([`EventOrder`]).
    asked_after: u64,
    /// What Docker said.
    seen: Result<Observed, String>,
}

/// Asks Docker where the mapping should point: its container by id
/// (through a rename), else a container under its name (a recreate).
async fn observe(client: &DockerClient, rule: &DockerRule) -> Result<Observed, String> {
    let by_id = match &rule.container_id {
        Some(id) => client.inspect(id).await?,
        None => Lookup::NotFound,
    };
    let found = match by_id {
        Lookup::NotFound => client.inspect(&rule.name).await?,
        found => found,
    };
    let name = match &found {
        Lookup::Found(info) => Some(info.name.clone()),
        _ => None,
    };
    let mut seen = observed(found, rule);
    seen.name = name;
    Ok(seen)
}

/// Where a mapping should point, from Docker's lookup of its container.
fn observed(found: Lookup, rule: &DockerRule) -> Observed {
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

/// A `docker add` that still needs its container looked up.
/// An `apply` waiting for Docker's answers about the containers it names.
pub struct PendingApply {
    /// `apply`, or a dry run of one.
    request: Request,
    /// Who asked.
    peer: Peer,
    /// Docker's answer per container reference.
    lookups: HashMap<String, Result<Lookup, String>>,
    /// Where the answer goes.
    reply: oneshot::Sender<Response>,
}

impl PendingApply {
    /// Whether it only reads the rules (a dry run changes nothing).
    pub fn is_dry_run(&self) -> bool {
        matches!(&self.request, Request::Apply(a) if a.dry_run)
    }
}

/// The container references of an `apply` document's Docker mappings (a
/// dry run's too), each once; empty for any other request.
fn containers_named(request: &Request) -> Vec<String> {
    let apply = match request {
        Request::Apply(apply) => apply,
        Request::DryRun(dry) => match dry.request.as_ref() {
            Request::Apply(apply) => apply,
            _ => return Vec::new(),
        },
        _ => return Vec::new(),
    };
    let mut refs: Vec<String> = apply
        .document
        .rules
        .iter()
        .filter_map(|spec| match spec {
            RuleSpec::Docker(d) if !d.external => Some(d.name.clone()),
            _ => None,
        })
        .collect();
    refs.sort();
    refs.dedup();
    refs
}

pub struct PendingAdd {
    /// The mapping, `name` holding the reference the client gave.
    rule: DockerRule,
    /// Docker's answer.
    lookup: Result<Lookup, String>,
    /// Where the answer goes.
    reply: oneshot::Sender<Response>,
}

/// What a `docker add` asks for.
enum AddPlan {
    /// A fixed, non-Docker target: nothing to look up.
    Fixed(DockerRule),
    /// A container, by the reference in `name`: look it up first.
    Container(DockerRule),
}

/// Checks the request's form and builds the mapping it asks for.
fn add_plan(req: DockerAddRequest) -> Outcome<AddPlan> {
    let invalid = |m: &str| Failure::new(ErrorCode::InvalidArgument, m);
    let mapping = req.mapping;
    Ok(if let Some(target) = mapping.target_ip {
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
        AddPlan::Fixed(DockerRule {
            name: label.to_string(),
            container_id: None,
            network: None,
            host_ip: mapping.host_ip,
            host_port: mapping.host_port,
            container_port: mapping.target_port,
            port_count: mapping.port_count,
            proto: mapping.proto,
            external: true,
            target_v4: (target.family() == Family::V4).then_some(endpoint),
            target_v6: (target.family() == Family::V6).then_some(endpoint),
            auto: None,
            allow_nonlocal: req.allow_nonlocal,
        })
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
        AddPlan::Container(DockerRule {
            name: reference.to_string(),
            container_id: None,
            network: req.network.map(|n| n.to_string()),
            host_ip: mapping.host_ip,
            host_port: mapping.host_port,
            container_port: mapping.target_port,
            port_count: mapping.port_count,
            proto: mapping.proto,
            external: false,
            target_v4: None,
            target_v6: None,
            auto: None,
            allow_nonlocal: req.allow_nonlocal,
        })
    })
}

/// Fills in the container's canonical name, id, network and current
/// addresses from Docker's answer about the reference in `rule.name`.
fn settle(mut rule: DockerRule, lookup: Result<Lookup, String>) -> Outcome<DockerRule> {
    let invalid = |m: &str| Failure::new(ErrorCode::InvalidArgument, m);
    let info = match lookup.map_err(|e| Failure::new(ErrorCode::DockerUnavailable, e))? {
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
    // A loopback HOST_IP is relayed, to the other family if need be.
    let needs_v6 = rule
        .host_ip
        .is_some_and(|h| h.family() == Family::V6 && !h.is_loopback());
    if info.running && needs_v6 && v6.is_none() {
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

/// Whether a mapping holds its port only while its container runs: a
/// labelled container of a local engine.
fn holds_port_only_while_up(rule: &Rule) -> bool {
    matches!(&rule.spec, RuleSpec::Docker(d) if d.auto.is_some() && !d.external)
}

/// Orders container events against Docker's answers. An answer is only as
/// new as the moment it was asked: a `kill` that leaves the container
/// running, then its `die`, can see the inspect asked after the `kill`
/// answer "running at 172.17.0.2" after the `die`. Counting events per
/// mapping lets the engine drop such an answer (the `die` asked again).
#[derive(Debug, Default)]
pub(super) struct EventOrder {
    /// Container events seen so far.
    seq: u64,
    /// The last event about each mapping.
    last: HashMap<RuleId, u64>,
}

impl EventOrder {
    /// The current position, to stamp a question with.
    fn now(&self) -> u64 {
        self.seq
    }

    /// One more event, about these mappings.
    fn event_about(&mut self, rules: &[RuleId]) {
        self.seq += 1;
        for id in rules {
            self.last.insert(*id, self.seq);
        }
        // Ids of deleted mappings go once the map outgrows what events
        // touch (a mapping is deleted at most once; its entry is small).
        if self.last.len() > 4096 {
            let keep = self.seq.saturating_sub(1024);
            self.last.retain(|_, at| *at > keep);
        }
    }

    /// Whether an event about `id` came after a question asked at `asked_after`.
    fn event_since(&self, id: RuleId, asked_after: u64) -> bool {
        self.last.get(&id).is_some_and(|at| *at > asked_after)
    }
}

#[cfg(test)]
mod event_order_tests {
    use super::EventOrder;

    #[test]
    fn an_answer_asked_before_an_event_about_its_mapping_no_longer_counts() {
        let mut order = EventOrder::default();
        order.event_about(&[1, 2]); // kill: both asked again after it
        let asked_after_kill = order.now();
        order.event_about(&[2]); // die of rule 2's container
        assert!(order.event_since(2, asked_after_kill), "stale answer kept");
        assert!(
            !order.event_since(1, asked_after_kill),
            "fresh answer dropped"
        );
        assert!(
            !order.event_since(2, order.now()),
            "answer to the die dropped"
        );
        assert!(!order.event_since(3, 0), "a mapping without events");
    }
}
