//! The reserved sockets of active rules, indexed by protocol and port.
//!
//! A change checks its ports against every port natmap holds: by a lookup
//! in the index, so the check costs the same with 10 rules or 10,000
//! (rebuilding the index per request, or scanning every reservation, grew
//! with N).

use std::collections::{BTreeMap, HashMap};

use crate::model::{PortClaim, Proto, RuleId};

use super::super::reserve::Reservation;

/// natmap's reserved ports by protocol and port, each list in rule order.
pub(super) type HeldByPort = HashMap<(Proto, u16), Vec<(RuleId, PortClaim)>>;

/// Reservations by rule, and the same claims by protocol and port.
#[derive(Default)]
pub(super) struct Held {
    by_rule: BTreeMap<RuleId, Vec<Reservation>>,
    by_port: HeldByPort,
}

impl Held {
    /// Holds `held` for rule `id` (replacing what it held).
    pub fn insert(&mut self, id: RuleId, held: Vec<Reservation>) {
        self.unindex(id);
        for r in &held {
            let at = self
                .by_port
                .entry((r.claim.proto, r.claim.bind.port()))
                .or_default();
            let i = at.partition_point(|(other, _)| *other <= id);
            at.insert(i, (id, r.claim));
        }
        self.by_rule.insert(id, held);
    }

    /// Takes rule `id`'s reservations out (dropping them closes the sockets).
    pub fn remove(&mut self, id: RuleId) -> Option<Vec<Reservation>> {
        self.unindex(id);
        self.by_rule.remove(&id)
    }

    fn unindex(&mut self, id: RuleId) {
        let Some(old) = self.by_rule.get(&id) else {
            return;
        };
        for r in old {
            let key = (r.claim.proto, r.claim.bind.port());
            if let Some(at) = self.by_port.get_mut(&key) {
                at.retain(|(other, _)| *other != id);
                if at.is_empty() {
                    self.by_port.remove(&key);
                }
            }
        }
    }

    /// Rule `id`'s reservations.
    pub fn get(&self, id: RuleId) -> Option<&Vec<Reservation>> {
        self.by_rule.get(&id)
    }

    /// Whether rule `id` holds its ports.
    pub fn contains(&self, id: RuleId) -> bool {
        self.by_rule.contains_key(&id)
    }

    /// How many rules hold ports.
    pub fn len(&self) -> usize {
        self.by_rule.len()
    }

    /// The rules holding ports, in id order.
    pub fn ids(&self) -> impl Iterator<Item = RuleId> + '_ {
        self.by_rule.keys().copied()
    }

    /// Every rule's reservations, in id order.
    pub fn iter(&self) -> impl Iterator<Item = (&RuleId, &Vec<Reservation>)> {
        self.by_rule.iter()
    }

    /// The claims by protocol and port.
    pub fn by_port(&self) -> &HeldByPort {
        &self.by_port
    }

    /// The claims held on `proto`/`port`, in rule order.
    pub fn at(&self, proto: Proto, port: u16) -> &[(RuleId, PortClaim)] {
        self.by_port
            .get(&(proto, port))
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }
}
