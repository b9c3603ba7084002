//! Checks a loaded state file as strictly as requests are checked.
//!
//! Each entry of `rules` must parse into a [`Rule`] (the typed values a
//! request parses into) and pass [`RuleSpec::check_consistent`] (what
//! `dnat`, `apply` and friends check), and the file as a whole must hold
//! together: one rule per id, no rule twice, no port forwarded twice
//! (the collision rule of requests, [`reserve::claims_collide`]). An entry
//! that fails is quarantined, not installed, and kept verbatim; the rules
//! before it in the file win.

use std::collections::{HashMap, HashSet};

use serde::Deserialize;
use serde_json::Value;

use crate::daemon::reserve;
use crate::model::{PortClaim, Proto, Rule, RuleId};

use super::Quarantined;

/// The rules that may start, the quarantined entries, and the smallest
/// `next_id` above every id in the file.
pub(super) struct Vetted {
    pub rules: Vec<Rule>,
    pub quarantined: Vec<Quarantined>,
    pub min_next_id: RuleId,
}

/// What the rules admitted so far claim.
#[derive(Default)]
struct Admitted {
    ids: HashSet<RuleId>,
    identities: HashMap<String, RuleId>,
    /// Claims grouped by protocol and port: only those can collide.
    ports: HashMap<(Proto, u16), Vec<(PortClaim, RuleId)>>,
}

impl Admitted {
    /// Admits `rule` if it passes a request's checks and conflicts with no
    /// rule admitted before; otherwise says why not.
    fn admit(&mut self, rule: &Rule) -> Result<(), String> {
        rule.spec.check_consistent()?;
        if self.ids.contains(&rule.id) {
            return Err(format!("id {} is used by an earlier rule", rule.id));
        }
        let key = rule.spec.identity_key();
        if let Some(other) = self.identities.get(&key) {
            return Err(format!("the same rule as #{other}"));
        }
        let claims = rule.spec.port_claims();
        for c in &claims {
            let same = self.ports.get(&(c.proto, c.bind.port()));
            if let Some((_, other)) =
                same.and_then(|s| s.iter().find(|(o, _)| reserve::claims_collide(o, c)))
            {
                return Err(format!(
                    "port {} is already forwarded by rule #{other}",
                    reserve::describe(c)
                ));
            }
        }
        self.ids.insert(rule.id);
        self.identities.insert(key, rule.id);
        for c in claims {
            self.ports
                .entry((c.proto, c.bind.port()))
                .or_default()
                .push((c, rule.id));
        }
        Ok(())
    }
}

/// Sorts the file's entries into rules that start and quarantined ones.
pub(super) fn vet(entries: Vec<Value>) -> Vetted {
    let mut admitted = Admitted::default();
    let mut rules = Vec::with_capacity(entries.len());
    let mut quarantined = Vec::new();
    let mut max_id: Option<RuleId> = None;
    for (index, entry) in entries.into_iter().enumerate() {
        let id = entry.get("id").and_then(Value::as_u64);
        max_id = max_id.max(id);
        let (rule, reason) = match Rule::deserialize(&entry) {
            Err(e) => (None, format!("does not parse: {e}")),
            Ok(rule) => match admitted.admit(&rule) {
                Ok(()) => {
                    rules.push(rule);
                    continue;
                }
                Err(reason) => (Some(rule), reason),
            },
        };
        quarantined.push(Quarantined {
            index,
            id,
            entry,
            rule,
            reason,
        });
    }
    Vetted {
        rules,
        quarantined,
        min_next_id: max_id.map_or(1, |m| m.saturating_add(1)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn dnat(id: u64, ext: &str, int: &str, ports: &str) -> Value {
        json!({"id": id, "kind": "dnat", "ext_ip": ext, "int_ip": int,
               "ports": ports, "proto": "tcp", "ext_if": null})
    }

    fn reasons(v: &Vetted) -> Vec<String> {
        v.quarantined.iter().map(|q| q.reason.clone()).collect()
    }

    #[test]
    fn good_rules_pass_and_bad_ones_are_quarantined_verbatim() {
        let docker_port_0 = json!({"id": 4, "kind": "docker", "name": "web",
            "host_port": 0, "container_port": 80, "proto": "tcp"});
        let entries = vec![
            dnat(1, "192.0.2.1", "198.51.100.2", "25"),
            dnat(2, "192.0.2.1", "192.0.2.1", "26"),
            dnat(3, "192.0.2.1", "2001:db8::2", "27"),
            docker_port_0.clone(),
            dnat(5, "192.0.2.1", "198.51.100.2", "0"),
            dnat(1, "192.0.2.1", "198.51.100.3", "28"),
            dnat(7, "192.0.2.1", "198.51.100.3", "20-30"),
            dnat(8, "192.0.2.1", "198.51.100.2", "25"),
            json!("not an object"),
        ];
        let v = vet(entries);
        assert_eq!(v.rules.iter().map(|r| r.id).collect::<Vec<_>>(), [1]);
        let r = reasons(&v);
        assert!(r[0].contains("same address"), "{r:?}");
        assert!(r[1].contains("both be IPv4 or both be IPv6"), "{r:?}");
        assert!(r[2].contains("host_port"), "{r:?}");
        assert!(
            r[3].contains("does not parse") && r[3].contains("ports"),
            "{r:?}"
        );
        assert!(r[4].contains("id 1 is used"), "{r:?}");
        assert!(r[5].contains("already forwarded by rule #1"), "{r:?}");
        assert!(r[6].contains("same rule as #1"), "{r:?}");
        assert!(r[7].contains("does not parse"), "{r:?}");
        assert_eq!(v.quarantined[2].entry, docker_port_0);
        assert_eq!(v.quarantined[2].index, 3);
        assert_eq!(v.min_next_id, 9);
    }

    #[test]
    fn a_wildcard_docker_port_collides_with_a_specific_one() {
        let entries = vec![
            dnat(1, "192.0.2.1", "198.51.100.2", "8080"),
            json!({"id": 2, "kind": "docker", "name": "web", "host_port": 8080,
                   "container_port": 80, "proto": "tcp"}),
            json!({"id": 3, "kind": "docker", "name": "web", "host_port": 8080,
                   "container_port": 80, "proto": "udp"}),
        ];
        let v = vet(entries);
        assert_eq!(v.rules.iter().map(|r| r.id).collect::<Vec<_>>(), [1, 3]);
        assert!(reasons(&v)[0].contains("8080"), "{:?}", reasons(&v));
    }

    /// The figure in docs/reliability.md (debug build): `cargo test --lib
    /// vetting_20000_rules -- --ignored --nocapture`.
    #[test]
    #[ignore = "a measurement, not a check"]
    fn vetting_20000_rules() {
        let entries: Vec<Value> = (0..20_000u64)
            .map(|i| {
                let ext = format!("192.0.{}.{}", 2 + i / 60_000, 1 + (i / 250) % 250);
                dnat(i + 1, &ext, "198.51.100.2", &(1024 + i % 250).to_string())
            })
            .collect();
        let text = serde_json::to_vec(&json!({"schema_version": 1, "next_id": 20_001,
            "rules": entries}))
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        std::fs::write(&path, &text).unwrap();
        let started = std::time::Instant::now();
        let loaded = crate::state::load(&path).unwrap().0;
        let took = started.elapsed();
        let crate::state::Loaded::Existing(state) = loaded else {
            panic!("not loaded")
        };
        assert_eq!(state.rules.len(), 20_000, "{:?}", state.quarantined.first());
        let started = std::time::Instant::now();
        let typed: crate::state::State = serde_json::from_slice(&text).unwrap();
        let typed_took = started.elapsed();
        assert_eq!(typed.rules, state.rules);
        eprintln!(
            "[state] 20,000 rules ({} KiB): load + vet {took:?}; typed parse alone (the \
             unchecked load before) {typed_took:?}",
            text.len() / 1024
        );
    }
}
