//! Rule changes in batches: every queued add and delete is planned against
//! one working copy of the state, then committed with one transaction per
//! family and one state write, and each client is answered after that.
//! Concurrent clients thus cost one firewall transaction and one fsync per batch,
//! not per request (kube-proxy's min-sync-period idea, without the delay:
//! a batch is whatever queued while the previous one was being applied).

use std::collections::{BTreeMap, BTreeSet};

use tokio::sync::oneshot;

use crate::model::{DnatRule, HairpinRule, PortClaim, Proto, Rule, RuleId, RuleSpec, SnatRule};
use crate::proto::{ChangeKind, ChangeResult, ErrorCode, Request, Response};
use crate::state::{Delta, State};

use super::identity::Identities;

use super::super::reserve::{self, Reservation};
use super::{forget_flows, Engine, Failure, Outcome, Peer};

/// One rule change.
pub(crate) enum Change {
    /// Add a rule (or report it already present).
    Add(RuleSpec),
    /// Delete the rule equal to this one.
    Delete(RuleSpec),
    /// Delete the rule with this id.
    DeleteId(RuleId),
}

/// A change, planned against the working copy of the state.
enum Planned {
    Added {
        rule: Rule,
        held: Vec<Reservation>,
    },
    /// A `dnat` rule that became a `hairpin` in place: same id, same ports,
    /// so its reservations stay as they are.
    Upgraded(Rule),
    Deleted(Rule),
    Done(Outcome<Response>),
}

/// What runs on the engine thread with each change's outcome, once the
/// changes are committed or refused.
pub(super) type ChangesDone = Box<dyn FnOnce(&mut Engine, Vec<Outcome<Response>>) + Send>;

/// Most requests folded into one transaction.
pub const MAX_BATCH: usize = 256;

impl Engine {
    /// Whether a request can join a batch of rule changes.
    pub fn batchable(request: &Request) -> bool {
        matches!(
            request,
            Request::Dnat(_) | Request::Snat(_) | Request::Hairpin(_) | Request::PolicyRoute(_)
        )
    }

    /// Handles queued batchable requests together; answers in order.
    pub fn handle_batch(&mut self, requests: Vec<(Request, Peer)>) -> Vec<Response> {
        let (mut results, slots, changes) = self.prepare_batch(requests);
        for (slot, outcome) in slots.into_iter().zip(self.apply_changes(changes)) {
            results[slot] = Some(outcome);
        }
        self.batch_answers(results)
    }

    /// Like [`Engine::handle_batch`], with the batch's firewall transaction
    /// off this thread ([`super::offload`]); each reply is sent when the
    /// batch is committed (or refused).
    pub fn handle_batch_later(&mut self, batch: Vec<(Request, Peer, oneshot::Sender<Response>)>) {
        let (requests, replies): (Vec<_>, Vec<_>) = batch
            .into_iter()
            .map(|(request, peer, reply)| ((request, peer), reply))
            .unzip();
        let (mut results, slots, changes) = self.prepare_batch(requests);
        self.apply_changes_later(
            changes,
            Box::new(
                move |engine: &mut Engine, outcomes: Vec<Outcome<Response>>| {
                    for (slot, outcome) in slots.into_iter().zip(outcomes) {
                        results[slot] = Some(outcome);
                    }
                    for (reply, response) in replies.into_iter().zip(engine.batch_answers(results))
                    {
                        let _ = reply.send(response);
                    }
                },
            ),
        );
    }

    /// Plans `changes` and commits them with the firewall transaction off
    /// this thread ([`super::offload`]); `then` gets each change's outcome
    /// on the engine thread once the commit has its own.
    pub(super) fn apply_changes_later(&mut self, changes: Vec<Change>, then: ChangesDone) {
        let started = std::time::Instant::now();
        let (next, plans) = self.plan_changes(changes);
        let planned = started.elapsed();
        let finish = move |engine: &mut Engine, committed: Outcome<()>| {
            let outcomes = engine.finish_changes(plans, committed, planned);
            then(engine, outcomes);
        };
        match next {
            Some(delta) => self.commit_delta_off_thread(delta, Box::new(finish)),
            None => finish(self, Ok(())),
        }
    }

    /// Logs each request and turns it into a change; a request that is no
    /// valid change has its answer already. Returns the answers so far (by
    /// request), which answer slot each change fills, and the changes.
    fn prepare_batch(
        &mut self,
        requests: Vec<(Request, Peer)>,
    ) -> (Vec<Option<Outcome<Response>>>, Vec<usize>, Vec<Change>) {
        self.refresh_addresses();
        let mut results: Vec<Option<Outcome<Response>>> = Vec::with_capacity(requests.len());
        let mut changes = Vec::new();
        let mut slots = Vec::new();
        for (i, (request, peer)) in requests.into_iter().enumerate() {
            self.log_change(&request, peer);
            match self.static_change(request) {
                Ok(change) => {
                    changes.push(change);
                    slots.push(i);
                    results.push(None);
                }
                Err(f) => results.push(Some(Err(f))),
            }
        }
        if changes.len() > 1 {
            tracing::debug!(
                changes = changes.len(),
                "applying queued changes as one transaction"
            );
        }
        (results, slots, changes)
    }

    /// Every request's answer, in order.
    fn batch_answers(&mut self, results: Vec<Option<Outcome<Response>>>) -> Vec<Response> {
        let responses: Vec<Response> = results
            .into_iter()
            .map(|r| super::respond(r.expect("every slot answered")))
            .collect();
        if responses.iter().any(|r| r.ok) {
            // The operator acted on the state: the corrupt-file warning was seen.
            self.persist.warning = None;
        }
        responses
    }

    /// Plans every change on one copy of the state, commits once, then
    /// installs reservations and releases deleted ones.
    pub(super) fn apply_changes(&mut self, changes: Vec<Change>) -> Vec<Outcome<Response>> {
        let started = std::time::Instant::now();
        let (next, plans) = self.plan_changes(changes);
        let planned = started.elapsed();
        let committed = match next {
            Some(delta) => self.commit_delta(delta),
            None => Ok(()),
        };
        self.finish_changes(plans, committed, planned)
    }

    /// Plans every change over the state without copying it ([`Working`]):
    /// the batch's [`Delta`] (`None` when nothing changes) and each change's
    /// plan.
    fn plan_changes(&self, changes: Vec<Change>) -> (Option<Delta>, Vec<Planned>) {
        let mut next = Working::new(&self.state, &self.identities);
        let mut plans: Vec<Planned> = Vec::with_capacity(changes.len());
        for change in changes {
            let planned = match change {
                Change::Add(spec) => self
                    .plan_add(&mut next, &plans, spec)
                    .unwrap_or_else(|f| Planned::Done(Err(f))),
                Change::Delete(spec) => plan_delete(&mut next, &spec),
                Change::DeleteId(id) => next.take_id(id).map_or_else(
                    || {
                        Planned::Done(Err(Failure::new(
                            ErrorCode::NotFound,
                            format!("no rule #{id}; `lab-ops natmap ls` lists them"),
                        )))
                    },
                    Planned::Deleted,
                ),
            };
            plans.push(planned);
        }
        let changed = plans.iter().any(|p| !matches!(p, Planned::Done(_)));
        (changed.then(|| next.into_delta()), plans)
    }

    /// Each change's answer once the batch's commit has its outcome: a
    /// failed commit fails every planned change (their reservations are
    /// dropped with the plans); a committed one finishes each.
    fn finish_changes(
        &mut self,
        plans: Vec<Planned>,
        committed: Outcome<()>,
        planned: std::time::Duration,
    ) -> Vec<Outcome<Response>> {
        let finishing = std::time::Instant::now();
        if let Err(f) = committed {
            return plans
                .into_iter()
                .map(|p| match p {
                    Planned::Done(r) => r,
                    _ => Err(f.clone()),
                })
                .collect();
        }
        let answers = plans.into_iter().map(|p| self.finish(p)).collect();
        // Where a change's time goes (docs/reliability.md, item 8); the
        // commit's own share is in "change committed".
        tracing::debug!(
            clone_and_plan_ms = planned.as_secs_f64() * 1e3,
            finish_ms = finishing.elapsed().as_secs_f64() * 1e3,
            "changes done"
        );
        answers
    }

    /// The last steps of one committed change (listen on an added rule's
    /// ports, release a deleted one's) and its answer.
    fn finish(&mut self, planned: Planned) -> Outcome<Response> {
        let answer = |result, rule, notes| {
            Ok(Response::ok(ChangeResult {
                result,
                rule,
                notes,
            }))
        };
        match planned {
            Planned::Done(r) => r,
            Planned::Added { rule, held } => {
                self.ports.held.insert(rule.id, held);
                if let Err(f) = self.start_listening(rule.id) {
                    self.remove_rule_after_failure(rule.id);
                    return Err(f);
                }
                tracing::info!(rule = rule.id, kind = rule.spec.kind(), "rule added");
                let notes = self.change_notes(&rule.spec);
                answer(ChangeKind::Added, self.view(&rule), notes)
            }
            Planned::Upgraded(rule) => {
                tracing::info!(rule = rule.id, "dnat rule upgraded to hairpin");
                answer(ChangeKind::Upgraded, self.view(&rule), Vec::new())
            }
            Planned::Deleted(rule) => {
                let view = self.view(&rule);
                self.release(rule.id);
                let t = std::time::Instant::now();
                forget_flows(&rule.spec);
                tracing::debug!(
                    conntrack_ms = t.elapsed().as_secs_f64() * 1e3,
                    "flows forgotten"
                );
                tracing::info!(rule = rule.id, kind = rule.spec.kind(), "rule deleted");
                answer(ChangeKind::Deleted, view, Vec::new())
            }
        }
    }

    fn plan_add(
        &self,
        next: &mut Working,
        pending: &[Planned],
        spec: RuleSpec,
    ) -> Outcome<Planned> {
        spec.check_consistent()
            .map_err(|m| Failure::new(ErrorCode::InvalidArgument, m))?;
        if spec.needs_v6_nat() && !self.host.v6_nat {
            return Err(Failure::new(
                ErrorCode::Ipv6Unavailable,
                "IPv6 NAT is not available in this kernel (load ip6table_nat); IPv4 rules keep working",
            ));
        }
        if let Some(existing) = next.find_same(&spec) {
            return Ok(self.already_present(existing, self.change_notes(&spec)));
        }
        self.check_addresses(&spec)?;
        if let RuleSpec::PolicyRoute(route) = &spec {
            self.check_policy_route(&super::routes::named_routes(next.rules()), route)?;
        }
        if let Some(planned) = self.plan_overlap(next, &spec)? {
            return Ok(planned);
        }
        let claims = spec.port_claims();
        self.check_own_claims(&claims)?;
        for p in pending {
            if let Planned::Added { rule, held } = p {
                if let Some(c) = claims
                    .iter()
                    .find(|c| held.iter().any(|h| reserve::claims_collide(c, &h.claim)))
                {
                    return Err(port_taken(c, rule.id, Some(&rule.spec)));
                }
            }
        }
        super::super::fds::check(&claims).map_err(|m| Failure::new(ErrorCode::FdLimit, m))?;
        let held = reserve::bind_all(&claims)
            .map_err(|busy| Failure::new(ErrorCode::PortInUse, busy.message))?;
        let rule = Rule {
            id: next.next_id,
            spec,
        };
        next.next_id += 1;
        next.put(rule.clone());
        Ok(Planned::Added { rule, held })
    }
}

impl Engine {
    /// A change that needs nothing done: `rule` already does it.
    fn already_present(&self, rule: &Rule, notes: Vec<String>) -> Planned {
        Planned::Done(Ok(Response::ok(ChangeResult {
            result: ChangeKind::AlreadyPresent,
            rule: self.view(rule),
            notes,
        })))
    }

    /// Rules that overlap without being the same rule: a `hairpin` upgrades
    /// the `dnat` of exactly its ports and target; a `dnat` that a `hairpin`
    /// already includes is present; a second `snat` of the same traffic is
    /// a conflict. `None`: no such overlap, plan the add as usual.
    fn plan_overlap(&self, next: &mut Working, spec: &RuleSpec) -> Outcome<Option<Planned>> {
        match spec {
            RuleSpec::Hairpin(h) => {
                let near = self.near(next, h.proto, h.ports.iter());
                upgrade_dnat(next, &near, h)
            }
            RuleSpec::Dnat(d) => Ok(self
                .near(next, d.proto, d.ports.iter().take(1))
                .into_iter()
                .find(|r| matches!(&r.spec, RuleSpec::Hairpin(h) if h.includes(d)))
                .map(|r| {
                    let note = format!(
                        "hairpin rule #{} already forwards these ports to {} (a hairpin includes \
                         the dnat); nothing was added",
                        r.id, d.int_ip
                    );
                    self.already_present(&r, vec![note])
                })),
            RuleSpec::Snat(s) => snat_conflict(next, s).map(|()| None),
            _ => Ok(None),
        }
    }

    /// What the operator should know about adding `spec`: today, that a
    /// `snat` without `--forward` on a host that drops forwarded traffic
    /// changes addresses of packets that never leave.
    fn change_notes(&self, spec: &RuleSpec) -> Vec<String> {
        match spec {
            RuleSpec::Snat(s) if !s.forward && self.forward_drops(s.ext_ip.family()) => {
                vec![snat_dropped_note(s)]
            }
            RuleSpec::Docker(d) if d.loopback_only() => {
                let host = d.host_ip.map(|h| h.ip());
                let shown = match host {
                    Some(std::net::IpAddr::V6(v6)) => format!("[{v6}]"),
                    Some(ip) => ip.to_string(),
                    None => String::new(),
                };
                vec![format!(
                    "published on {shown}:{} only, by natmap's loopback relay (no kernel rule): \
                     reachable from this host on that address, not on its other addresses or \
                     from other machines; the container sees the relay's connections coming \
                     from the host",
                    d.host_ports()
                )]
            }
            // docker-proxy would answer there (hiding the client); natmap
            // forwards only to an address of the same family.
            RuleSpec::Docker(d) if d.host_ip.is_none() && d.is_up() && d.target_v6.is_none() => {
                vec![format!(
                    "{} has no IPv6 address: it is not reachable over the host's IPv6 addresses \
                     or [::1] (give it an IPv6 network to publish it there)",
                    d.name
                )]
            }
            _ => Vec::new(),
        }
    }
}

/// Why the traffic of a `snat` without `--forward` goes nowhere here.
pub(super) fn snat_dropped_note(s: &SnatRule) -> String {
    format!(
        "the FORWARD policy is DROP: traffic from {} out of {} is dropped unless another \
         firewall rule accepts it; add --forward to let natmap accept it and its replies",
        s.source, s.ext_if
    )
}

/// A `hairpin` whose ports a `dnat` to the same host already forwards.
/// Exactly the same ports (and no `--ext-if` on the dnat): the dnat becomes
/// the hairpin, keeping its id. Only some of them: refused, naming the
/// ports that would upgrade it, because turning the whole rule into a
/// hairpin would masquerade ports the operator did not name, and splitting
/// it would change ids. Another target: left to the port check (a conflict).
fn upgrade_dnat(next: &mut Working, near: &[Rule], h: &HairpinRule) -> Outcome<Option<Planned>> {
    let same_host = |d: &DnatRule| {
        d.ext_ip == h.ext_ip
            && d.int_ip == h.int_ip
            && d.proto == h.proto
            && d.ports.overlaps(&h.ports)
    };
    let Some(mut rule) = near
        .iter()
        .find(|r| matches!(&r.spec, RuleSpec::Dnat(d) if same_host(d)))
        .cloned()
    else {
        return Ok(None);
    };
    let RuleSpec::Dnat(d) = &rule.spec else {
        unreachable!("found as a dnat rule")
    };
    let id = rule.id;
    if !h.includes(d) {
        return Err(Failure::new(
            ErrorCode::PortInUse,
            format!(
                "dnat rule #{id} forwards ports {} of {} to {}; a hairpin upgrades it only \
                 for exactly its ports (--ports {}); otherwise delete rule #{id} first",
                d.ports, d.ext_ip, d.int_ip, d.ports
            ),
        ));
    }
    if let Some(iface) = &d.ext_if {
        return Err(Failure::new(
            ErrorCode::PortInUse,
            format!(
                "dnat rule #{id} forwards these ports only from interface {iface}; a hairpin \
                 forwards them from every interface, so it does not upgrade that rule: \
                 delete rule #{id} first"
            ),
        ));
    }
    // A VIP guard on the dnat stays on the hairpin that replaces it.
    let allow_nonlocal = h.allow_nonlocal || d.allow_nonlocal;
    rule.spec = RuleSpec::Hairpin(HairpinRule {
        allow_nonlocal,
        ..h.clone()
    });
    next.put(rule.clone());
    Ok(Some(Planned::Upgraded(rule)))
}

/// Of two `snat` rules for the same source out of the same interface only
/// the first ever matches: a second one (another address, or the same one
/// with `--forward` changed) is refused, naming the first.
fn snat_conflict(next: &Working, s: &SnatRule) -> Outcome<()> {
    let Some((id, first)) = next.rules().find_map(|r| match &r.spec {
        RuleSpec::Snat(o) if o.same_traffic(s) => Some((r.id, o)),
        _ => None,
    }) else {
        return Ok(());
    };
    let message = if first.ext_ip != s.ext_ip {
        format!(
            "snat rule #{id} already rewrites traffic from {} out of {} to {}; a second snat of \
             the same traffic to {} could never match. Delete rule #{id} first to change the address",
            s.source, s.ext_if, first.ext_ip, s.ext_ip
        )
    } else {
        format!(
            "snat rule #{id} already rewrites traffic from {} out of {} to {} {} --forward; \
             delete rule #{id} first to change --forward",
            s.source,
            s.ext_if,
            s.ext_ip,
            if first.forward { "with" } else { "without" }
        )
    };
    Err(Failure::new(ErrorCode::RuleConflict, message))
}

/// Takes out the rule a `--delete` names. A `snat` is named by its source,
/// interface and address (`--forward` is one of its settings, not part of
/// its name). A `dnat --delete` of a dnat that became a hairpin says so.
fn plan_delete(next: &mut Working, spec: &RuleSpec) -> Planned {
    let taken = match spec {
        RuleSpec::Snat(b) => next.take(
            |r| matches!(&r.spec, RuleSpec::Snat(a) if a.same_traffic(b) && a.ext_ip == b.ext_ip),
        ),
        _ => next.take_same(spec),
    };
    if let Some(rule) = taken {
        return Planned::Deleted(rule);
    }
    let hairpin = next.rules().find_map(|r| match (&r.spec, spec) {
        (RuleSpec::Hairpin(h), RuleSpec::Dnat(d)) if h.includes(d) => Some(r.id),
        _ => None,
    });
    let message = match hairpin {
        Some(id) => format!(
            "no such dnat rule: hairpin rule #{id} forwards these ports (a hairpin includes the \
             dnat; a dnat upgraded to hairpin is deleted with `lab-ops natmap hairpin --delete`)"
        ),
        None => format!(
            "no such {} rule; `lab-ops natmap ls` lists the rules natmap has",
            spec.kind()
        ),
    };
    Planned::Done(Err(Failure::new(ErrorCode::NotFound, message)))
}

/// The error for a port another natmap rule holds.
pub(super) fn port_taken(claim: &PortClaim, id: RuleId, owner: Option<&RuleSpec>) -> Failure {
    // A Docker mapping is named by its container and ports, so the
    // operator sees which range or container holds the port.
    let what = match owner {
        Some(RuleSpec::Docker(d)) => format!(" (docker {} {}/{})", d.name, d.host_ports(), d.proto),
        Some(other) => format!(" ({})", other.kind().replace('_', "-")),
        None => String::new(),
    };
    Failure::new(
        ErrorCode::PortInUse,
        format!(
            "port {} is already forwarded by natmap rule #{id}{what}; delete that rule first",
            reserve::describe(claim),
        ),
    )
}

impl Engine {
    /// The rules (as the batch leaves them) that may overlap a rule of
    /// `proto` on `ports`: those holding one of the ports, those not
    /// installed (a rule waiting for its address holds nothing), and the
    /// batch's own. Lookups in the port index, not a scan of every rule.
    fn near(&self, next: &Working, proto: Proto, ports: impl Iterator<Item = u16>) -> Vec<Rule> {
        let mut ids: BTreeSet<RuleId> = BTreeSet::new();
        for port in ports {
            ids.extend(self.ports.held.at(proto, port).iter().map(|(id, _)| *id));
        }
        ids.extend(self.inactive.keys().copied());
        ids.extend(next.put.keys().copied());
        ids.into_iter()
            .filter_map(|id| next.rule(id).cloned())
            .collect()
    }
}

/// The state as a batch's changes planned so far leave it, without a copy
/// of it: the engine's state, the rules the batch put and the ids it took
/// out. What a batch costs thus follows the batch, not the state (the
/// lookups still read every rule, without copying one).
struct Working<'a> {
    base: &'a State,
    /// `base`'s rules by identity.
    identities: &'a Identities,
    put: BTreeMap<RuleId, Rule>,
    del: BTreeSet<RuleId>,
    next_id: RuleId,
}

impl<'a> Working<'a> {
    fn new(base: &'a State, identities: &'a Identities) -> Working<'a> {
        Working {
            base,
            identities,
            put: BTreeMap::new(),
            del: BTreeSet::new(),
            next_id: base.next_id,
        }
    }

    /// The rules as the batch leaves them: the state's, except those
    /// replaced or taken out, then those put.
    fn rules(&self) -> impl Iterator<Item = &Rule> {
        self.base
            .rules
            .iter()
            .filter(|r| !self.del.contains(&r.id) && !self.put.contains_key(&r.id))
            .chain(self.put.values())
    }

    /// Adds `rule`, or replaces the rule of its id.
    fn put(&mut self, rule: Rule) {
        self.del.remove(&rule.id);
        self.put.insert(rule.id, rule);
    }

    /// The rule with this id as the batch leaves it.
    fn rule(&self, id: RuleId) -> Option<&Rule> {
        if let Some(r) = self.put.get(&id) {
            return Some(r);
        }
        if self.del.contains(&id) {
            return None;
        }
        self.base.rule(id)
    }

    /// The rule that is the same rule as `spec` ([`RuleSpec::same_rule`]):
    /// among the batch's, then by identity among the state's (a lookup).
    fn find_same(&self, spec: &RuleSpec) -> Option<&Rule> {
        if let Some(r) = self.put.values().find(|r| r.spec.same_rule(spec)) {
            return Some(r);
        }
        let id = self.identities.get(spec)?;
        if self.put.contains_key(&id) {
            return None;
        }
        self.rule(id).filter(|r| r.spec.same_rule(spec))
    }

    /// Takes out the same rule as `spec`.
    fn take_same(&mut self, spec: &RuleSpec) -> Option<Rule> {
        let id = self.find_same(spec)?.id;
        self.take_id(id)
    }

    /// Takes out the rule with this id.
    fn take_id(&mut self, id: RuleId) -> Option<Rule> {
        let rule = self.rule(id)?.clone();
        self.put.remove(&id);
        if self.base.rule(id).is_some() {
            self.del.insert(id);
        }
        Some(rule)
    }

    /// Takes out the first rule `pick` picks (a scan: for what has no
    /// index, `snat` by its traffic).
    fn take(&mut self, pick: impl Fn(&Rule) -> bool) -> Option<Rule> {
        let rule = self.rules().find(|r| pick(r))?.clone();
        self.put.remove(&rule.id);
        if self.base.rule(rule.id).is_some() {
            self.del.insert(rule.id);
        }
        Some(rule)
    }

    /// What the batch changes.
    fn into_delta(self) -> Delta {
        Delta {
            put: self.put.into_values().collect(),
            del: self.del.into_iter().collect(),
            next_id: self.next_id,
        }
    }
}
