//! `apply` and `export`: the whole rule set as one declarative document.
//!
//! `apply` computes keep / add / remove against the current rules, reserves
//! every new port (all or nothing), then commits the new state with one
//! transaction per family and one state write, whatever the number of rules.

use std::collections::{HashMap, HashSet};

use tokio::sync::oneshot;

use crate::model::{IfName, Network, PortClaim, Proto, Rule, RuleId, RuleSpec};
use crate::proto::{
    ApplyReport, ApplyRequest, Document, ErrorCode, Response, RuleStatus, RuleView,
    DOCUMENT_VERSION,
};

use crate::state::State;

use super::super::reserve::{self, Reservation};
use super::{forget_all_flows, respond, Engine, Failure, Outcome};

impl Engine {
    pub(super) fn export(&self) -> Document {
        let rules = self
            .state
            .rules
            .iter()
            // Auto-discovered mappings follow labels; they are not declared.
            .filter(|r| !matches!(&r.spec, RuleSpec::Docker(d) if d.auto.is_some()))
            .map(|r| match &r.spec {
                // A container's id and address are looked up when applied.
                RuleSpec::Docker(d) if !d.external => {
                    let mut d = d.clone();
                    d.container_id = None;
                    d.target_v4 = None;
                    d.target_v6 = None;
                    RuleSpec::Docker(d)
                }
                other => other.clone(),
            })
            .collect();
        Document {
            schema_version: DOCUMENT_VERSION,
            rules,
        }
    }

    /// Applies a document on this thread (unit tests, and the engine's
    /// synchronous [`Engine::handle`]).
    pub(super) fn apply_document(&mut self, req: ApplyRequest) -> Outcome<Response> {
        match self.plan_document(req)? {
            DocumentPlan::Answer(response) => Ok(response),
            DocumentPlan::Commit(commit) => {
                let DocumentCommit { next, applied } = *commit;
                self.commit(next)?;
                Ok(self.document_applied(applied))
            }
        }
    }

    /// Applies a document with its firewall transaction off this thread
    /// (see [`super::offload`]); `reply` gets the answer when it is done.
    pub(super) fn apply_document_later(
        &mut self,
        req: ApplyRequest,
        reply: oneshot::Sender<Response>,
    ) {
        let commit = match self.plan_document(req) {
            Ok(DocumentPlan::Commit(commit)) => commit,
            Ok(DocumentPlan::Answer(response)) => {
                let _ = reply.send(response);
                return;
            }
            Err(f) => {
                let _ = reply.send(respond(Err(f)));
                return;
            }
        };
        let DocumentCommit { next, applied } = *commit;
        self.commit_off_thread(
            next,
            Box::new(move |engine: &mut Engine, outcome: Outcome<()>| {
                // A failed commit drops `applied`: its new reservations close.
                let response = respond(outcome.map(|()| engine.document_applied(applied)));
                if response.ok {
                    // The operator acted on the state: the corrupt-file warning was seen.
                    engine.persist.warning = None;
                }
                let _ = reply.send(response);
            }),
        );
    }

    /// Validates a document and plans it against the current rules: the
    /// answer itself (a dry run, nothing to do, a refusal), or the next
    /// state with the new rules' ports already reserved.
    fn plan_document(&mut self, req: ApplyRequest) -> Outcome<DocumentPlan> {
        let invalid = |m: String| Failure::new(ErrorCode::InvalidArgument, m);
        let doc = req.document;
        if doc.schema_version != DOCUMENT_VERSION {
            return Err(invalid(format!(
                "document schema_version {} is not supported; this natmap reads {DOCUMENT_VERSION}",
                doc.schema_version
            )));
        }
        // Validate and resolve every rule before touching anything. Matching
        // uses identity keys in hash maps: documents hold thousands of rules.
        let mut wanted: Vec<RuleSpec> = Vec::with_capacity(doc.rules.len());
        let mut wanted_at: HashMap<String, usize> = HashMap::with_capacity(doc.rules.len());
        let mut seen: HashMap<String, usize> = HashMap::with_capacity(doc.rules.len());
        let mut snat_traffic: HashMap<(Network, IfName), usize> = HashMap::new();
        for (i, spec) in doc.rules.into_iter().enumerate() {
            spec.check_consistent()
                .map_err(|m| invalid(format!("rules[{i}]: {m}")))?;
            if matches!(&spec, RuleSpec::Docker(d) if d.auto.is_some()) {
                return Err(invalid(format!(
                    "rules[{i}]: auto-discovered mappings come from container labels, not documents"
                )));
            }
            if spec.needs_v6_nat() && !self.host.v6_nat {
                return Err(Failure::new(
                    ErrorCode::Ipv6Unavailable,
                    format!("rules[{i}]: IPv6 NAT is not available in this kernel"),
                ));
            }
            // Identity keys agree with `same_rule`, so one hash lookup
            // replaces comparing with every earlier rule (a 54,000-rule
            // document took 16 s).
            let key = spec.identity_key();
            if let Some(j) = seen.get(&key) {
                return Err(invalid(format!(
                    "rules[{i}] is the same rule as rules[{j}]"
                )));
            }
            if let RuleSpec::Snat(s) = &spec {
                // Only the first of two snat rules of the same traffic
                // matches. Looked up by the traffic (`SnatRule::same_traffic`),
                // not compared with every earlier rule: 12,000 snat rules
                // held the engine seconds.
                let traffic = (s.source, s.ext_if.clone());
                if let Some(&j) = snat_traffic.get(&traffic) {
                    return Err(Failure::new(
                        ErrorCode::RuleConflict,
                        format!(
                            "rules[{i}] rewrites the same traffic as rules[{j}] (snat of {} out of {}); \
                             only the first could ever match",
                            s.source, s.ext_if
                        ),
                    ));
                }
                snat_traffic.insert(traffic, i);
            }
            let spec = match spec {
                RuleSpec::Docker(d) if !d.external => RuleSpec::Docker(
                    self.resolve_container(d)
                        .map_err(|f| Failure::new(f.code, format!("rules[{i}]: {}", f.message)))?,
                ),
                other => other,
            };
            seen.insert(key, i);
            wanted_at.insert(spec.identity_key(), i);
            wanted.push(spec);
        }
        // Plan.
        let mut kept: Vec<Rule> = Vec::new();
        let mut removed: Vec<Rule> = Vec::new();
        let mut kept_keys: HashSet<String> = HashSet::new();
        for rule in &self.state.rules {
            // Auto-discovered mappings follow labels, not documents: kept as they are.
            if matches!(&rule.spec, RuleSpec::Docker(d) if d.auto.is_some()) {
                continue;
            }
            let key = rule.spec.identity_key();
            if wanted_at.contains_key(&key) {
                kept_keys.insert(key);
                kept.push(rule.clone());
            } else {
                removed.push(rule.clone());
            }
        }
        let added: Vec<RuleSpec> = wanted
            .into_iter()
            .filter(|w| !kept_keys.contains(&w.identity_key()))
            .collect();
        let held = self.ports.held.by_port();
        for spec in &added {
            self.check_addresses_in(spec, held)?;
        }
        // Policy routes sharing a table must agree on the gateway, and
        // tables the operator uses are refused.
        let mut routes_so_far = super::routes::named_routes(&kept);
        for spec in &added {
            if let RuleSpec::PolicyRoute(route) = spec {
                self.check_policy_route(&routes_so_far, route)?;
                let who = format!("the document's policy route from {}", route.src_ip);
                routes_so_far.push((who, *route));
            }
        }
        // New ports must not collide with each other or with kept rules'
        // ports. Claims collide only on the same protocol and port, so they
        // are grouped by that.
        let mut by_port: HashMap<(Proto, u16), Vec<PortClaim>> = HashMap::new();
        for spec in &added {
            for c in spec.port_claims() {
                let same = by_port.entry((c.proto, c.bind.port())).or_default();
                if let Some(other) = same.iter().find(|o| reserve::claims_collide(o, &c)) {
                    return Err(Failure::new(
                        ErrorCode::PortInUse,
                        format!(
                            "port {} is forwarded twice in the document (also {})",
                            reserve::describe(&c),
                            reserve::describe(other)
                        ),
                    ));
                }
                same.push(c);
            }
        }
        let removed_ids: HashSet<RuleId> = removed.iter().map(|r| r.id).collect();
        for (id, held) in self
            .ports
            .held
            .iter()
            .filter(|(id, _)| !removed_ids.contains(id))
        {
            for r in held {
                let same = by_port.get(&(r.claim.proto, r.claim.bind.port()));
                if let Some(c) =
                    same.and_then(|s| s.iter().find(|c| reserve::claims_collide(c, &r.claim)))
                {
                    return Err(Failure::new(
                        ErrorCode::PortInUse,
                        format!(
                            "port {} is already forwarded by kept rule #{id}",
                            reserve::describe(c)
                        ),
                    ));
                }
            }
        }
        let view = |rule: &Rule| RuleView {
            rule: rule.clone(),
            status: RuleStatus::Active,
            detail: None,
            counters: None,
        };
        if req.dry_run {
            return Ok(DocumentPlan::Answer(Response::ok(ApplyReport {
                dry_run: true,
                added: added
                    .iter()
                    .map(|s| {
                        view(&Rule {
                            id: 0,
                            spec: s.clone(),
                        })
                    })
                    .collect(),
                removed: removed.iter().map(|r| self.view(r)).collect(),
                kept: kept.len(),
            })));
        }
        if added.is_empty() && removed.is_empty() {
            return Ok(DocumentPlan::Answer(Response::ok(ApplyReport {
                dry_run: false,
                added: Vec::new(),
                removed: Vec::new(),
                kept: kept.len(),
            })));
        }
        // Reserve every new port first (all or nothing); ports of removed
        // rules are still held, so a document may not move a port from one
        // rule to another in one step (remove, then add).
        let claims: Vec<_> = added.iter().flat_map(|s| s.port_claims()).collect();
        super::super::fds::check(&claims).map_err(|m| Failure::new(ErrorCode::FdLimit, m))?;
        let mut held_new: Vec<(usize, Vec<Reservation>)> = Vec::new();
        for (i, spec) in added.iter().enumerate() {
            let held = reserve::bind_all(&spec.port_claims())
                .map_err(|busy| Failure::new(ErrorCode::PortInUse, busy.message))?;
            held_new.push((i, held));
        }
        let mut next = self.state.clone();
        next.rules.retain(|r| !removed_ids.contains(&r.id));
        let mut new_rules = Vec::with_capacity(added.len());
        for spec in added {
            let rule = Rule {
                id: next.next_id,
                spec,
            };
            next.next_id += 1;
            new_rules.push(rule.clone());
            next.rules.push(rule);
        }
        Ok(DocumentPlan::Commit(Box::new(DocumentCommit {
            next,
            applied: Applied {
                held_new,
                new_rules,
                removed,
                kept: kept.len(),
            },
        })))
    }

    /// After the commit: the new rules' ports listen, the removed rules'
    /// ports are released and their flows cut.
    fn document_applied(&mut self, applied: Applied) -> Response {
        let Applied {
            held_new,
            new_rules,
            removed,
            kept,
        } = applied;
        let started = std::time::Instant::now();
        for (i, held) in held_new {
            let id = new_rules[i].id;
            self.ports.held.insert(id, held);
            if let Err(f) = self.start_listening(id) {
                tracing::error!(rule = id, "applied, but {}", f.message);
            }
        }
        let view = |rule: &Rule| RuleView {
            rule: rule.clone(),
            status: RuleStatus::Active,
            detail: None,
            counters: None,
        };
        let listening = started.elapsed();
        let removed_views: Vec<RuleView> = removed.iter().map(view).collect();
        for rule in &removed {
            self.release(rule.id);
        }
        forget_all_flows(removed.iter().map(|r| &r.spec));
        let released = started.elapsed();
        let added = new_rules.iter().map(|r| self.view(r)).collect();
        tracing::info!(
            added = new_rules.len(),
            removed = removed.len(),
            kept,
            "document applied"
        );
        // Where the finish of a large document goes (docs/reliability.md, item 8).
        tracing::debug!(
            listen_ms = listening.as_secs_f64() * 1e3,
            release_and_flows_ms = (released - listening).as_secs_f64() * 1e3,
            views_ms = (started.elapsed() - released).as_secs_f64() * 1e3,
            "document finished"
        );
        Response::ok(ApplyReport {
            dry_run: false,
            added,
            removed: removed_views,
            kept,
        })
    }
}

/// What [`Engine::plan_document`] decided.
enum DocumentPlan {
    /// Answer at once; nothing to commit.
    Answer(Response),
    /// Commit this, then finish with [`Engine::document_applied`].
    Commit(Box<DocumentCommit>),
}

/// A planned document: the next state and what to do once it is committed.
struct DocumentCommit {
    next: State,
    applied: Applied,
}

/// The aftermath of a document's commit.
struct Applied {
    /// Reservations of the new rules, by their index in `new_rules`.
    held_new: Vec<(usize, Vec<Reservation>)>,
    new_rules: Vec<Rule>,
    removed: Vec<Rule>,
    kept: usize,
}
