//! Rule changes in batches: every queued add and delete is planned against
//! one working copy of the state, then committed with one transaction per
//! family and one state write, and each client is answered after that.
//! Concurrent clients thus cost one iptables-restore and one fsync per batch,
//! not per request (kube-proxy's min-sync-period idea, without the delay:
//! a batch is whatever queued while the previous one was being applied).

use crate::model::{Family, PortClaim, Rule, RuleId, RuleSpec};
use crate::proto::{ChangeKind, ChangeResult, ErrorCode, Request, Response};
use crate::state::State;

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
    Added { rule: Rule, held: Vec<Reservation> },
    Deleted(Rule),
    Done(Outcome<Response>),
}

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
        for (slot, outcome) in slots.into_iter().zip(self.apply_changes(changes)) {
            results[slot] = Some(outcome);
        }
        let responses: Vec<Response> = results
            .into_iter()
            .map(|r| super::respond(r.expect("every slot answered")))
            .collect();
        if responses.iter().any(|r| r.ok) {
            // The operator acted on the state: the corrupt-file warning was seen.
            self.state_warning = None;
        }
        responses
    }

    /// Plans every change on one copy of the state, commits once, then
    /// installs reservations and releases deleted ones.
    pub(super) fn apply_changes(&mut self, changes: Vec<Change>) -> Vec<Outcome<Response>> {
        let mut next = self.state.clone();
        let mut plans: Vec<Planned> = Vec::with_capacity(changes.len());
        for change in changes {
            let planned = match change {
                Change::Add(spec) => self
                    .plan_add(&mut next, &plans, spec)
                    .unwrap_or_else(|f| Planned::Done(Err(f))),
                Change::Delete(spec) => {
                    let kind = spec.kind();
                    take_rule(&mut next, |r| r.spec.same_rule(&spec)).map_or_else(
                        || {
                            Planned::Done(Err(Failure::new(
                                ErrorCode::NotFound,
                                format!("no such {kind} rule; `lab-ops natmap ls` lists the rules natmap has"),
                            )))
                        },
                        Planned::Deleted,
                    )
                }
                Change::DeleteId(id) => take_rule(&mut next, |r| r.id == id).map_or_else(
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
        if changed {
            if let Err(f) = self.commit(next) {
                // Reservations of planned adds are dropped with the plans.
                return plans
                    .into_iter()
                    .map(|p| match p {
                        Planned::Done(r) => r,
                        _ => Err(f.clone()),
                    })
                    .collect();
            }
        }
        plans
            .into_iter()
            .map(|p| match p {
                Planned::Done(r) => r,
                Planned::Added { rule, held } => {
                    self.held.insert(rule.id, held);
                    if let Err(f) = self.start_listening(rule.id) {
                        self.remove_rule_after_failure(rule.id);
                        return Err(f);
                    }
                    tracing::info!(rule = rule.id, kind = rule.spec.kind(), "rule added");
                    Ok(Response::ok(ChangeResult {
                        result: ChangeKind::Added,
                        rule: self.view(&rule),
                    }))
                }
                Planned::Deleted(rule) => {
                    let view = self.view(&rule);
                    self.release(rule.id);
                    forget_flows(&rule.spec);
                    tracing::info!(rule = rule.id, kind = rule.spec.kind(), "rule deleted");
                    Ok(Response::ok(ChangeResult {
                        result: ChangeKind::Deleted,
                        rule: view,
                    }))
                }
            })
            .collect()
    }

    fn plan_add(&self, next: &mut State, pending: &[Planned], spec: RuleSpec) -> Outcome<Planned> {
        spec.check_consistent()
            .map_err(|m| Failure::new(ErrorCode::InvalidArgument, m))?;
        if spec.family() == Family::V6 && !self.v6_nat {
            return Err(Failure::new(
                ErrorCode::Ipv6Unavailable,
                "IPv6 NAT is not available in this kernel (load ip6table_nat); IPv4 rules keep working",
            ));
        }
        if let Some(existing) = next.rules.iter().find(|r| r.spec.same_rule(&spec)) {
            return Ok(Planned::Done(Ok(Response::ok(ChangeResult {
                result: ChangeKind::AlreadyPresent,
                rule: self.view(existing),
            }))));
        }
        self.check_addresses(&spec)?;
        let claims = spec.port_claims();
        self.check_own_claims(&claims)?;
        for p in pending {
            if let Planned::Added { rule, held } = p {
                if let Some(c) = claims
                    .iter()
                    .find(|c| held.iter().any(|h| reserve::claims_collide(c, &h.claim)))
                {
                    return Err(port_taken(c, rule.id));
                }
            }
        }
        super::super::fds::check(claims.len()).map_err(|m| Failure::new(ErrorCode::FdLimit, m))?;
        let held = reserve::bind_all(&claims)
            .map_err(|busy| Failure::new(ErrorCode::PortInUse, busy.message))?;
        let rule = Rule {
            id: next.next_id,
            spec,
        };
        next.next_id += 1;
        next.rules.push(rule.clone());
        Ok(Planned::Added { rule, held })
    }
}

/// The error for a port another natmap rule holds.
pub(super) fn port_taken(claim: &PortClaim, id: RuleId) -> Failure {
    Failure::new(
        ErrorCode::PortInUse,
        format!(
            "port {} is already forwarded by natmap rule #{id}; delete that rule first",
            reserve::describe(claim)
        ),
    )
}

fn take_rule(state: &mut State, pick: impl Fn(&Rule) -> bool) -> Option<Rule> {
    let i = state.rules.iter().position(pick)?;
    Some(state.rules.remove(i))
}
