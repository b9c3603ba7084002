//! A client's ledger of acknowledged changes, to prove no acknowledged
//! change was lost across a daemon crash.

/// What a client may conclude about one of its rules from the answers it got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Presence {
    /// Acknowledged absent (deleted, never added, or `not_found`).
    Absent,
    /// Acknowledged present (`added` or `already_present`).
    Present,
    /// A request was sent but never answered (the daemon died): either.
    Unknown,
}

/// One client's ledger of acknowledged changes, keyed by `(port, proto)` of
/// its dnat rules. Every answer is checked against what the earlier answers
/// imply (a rule acknowledged as added that a later add reports as `added`
/// again was lost), and [`AckLedger::reconcile`] checks the daemon's state.
#[derive(Debug, Clone, Default)]
pub struct AckLedger {
    rules: std::collections::BTreeMap<(u16, String), Presence>,
    /// Requests answered ok=true.
    pub acks: u64,
    /// Requests answered ok=false.
    pub refusals: u64,
    /// Requests sent but not answered.
    pub unanswered: u64,
}

impl AckLedger {
    /// What the answers so far say about the rule (absent if never touched).
    pub fn expect(&self, port: u16, proto: &str) -> Presence {
        self.rules
            .get(&(port, proto.to_string()))
            .copied()
            .unwrap_or(Presence::Absent)
    }

    /// Records the answer to an add (`delete` false) or delete; `answer`
    /// `None`: sent, but no answer came. Returns a description of any
    /// contradiction with earlier acknowledgements, or of an error answer
    /// other than `not_found`.
    pub fn record(
        &mut self,
        port: u16,
        proto: &str,
        delete: bool,
        answer: Option<&serde_json::Value>,
    ) -> Result<(), String> {
        let key = (port, proto.to_string());
        let before = self.expect(port, proto);
        let what = format!(
            "{} {port}/{proto} (ledger said {before:?})",
            if delete { "delete" } else { "add" }
        );
        let Some(answer) = answer else {
            self.unanswered += 1;
            let unchanged = if delete {
                Presence::Absent
            } else {
                Presence::Present
            };
            if before != unchanged {
                self.rules.insert(key, Presence::Unknown);
            }
            return Ok(());
        };
        let (after, contradiction) = if answer["ok"] == true {
            self.acks += 1;
            match answer["data"]["result"].as_str() {
                Some("added") if !delete => (Presence::Present, before == Presence::Present),
                Some("already_present") if !delete => {
                    (Presence::Present, before == Presence::Absent)
                }
                Some("deleted") if delete => (Presence::Absent, before == Presence::Absent),
                _ => return Err(format!("{what}: unexpected answer {answer}")),
            }
        } else {
            self.refusals += 1;
            match answer["error"]["code"].as_str() {
                Some("not_found") if delete => (Presence::Absent, before == Presence::Present),
                _ => return Err(format!("{what}: unexpected error {answer}")),
            }
        };
        self.rules.insert(key, after);
        if contradiction {
            return Err(format!(
                "{what}: answer {answer} contradicts an earlier acknowledgement"
            ));
        }
        Ok(())
    }

    /// Compares the ledger with the rules the daemon has (`actual`, the
    /// `(port, proto)` of this client's rules in state): every rule
    /// acknowledged present must be there, every one acknowledged absent
    /// must not. Unknown entries take the actual value. Returns the mismatches.
    pub fn reconcile(&mut self, actual: &std::collections::BTreeSet<(u16, String)>) -> Vec<String> {
        let mut problems = Vec::new();
        for (key, presence) in self.rules.iter_mut() {
            let there = actual.contains(key);
            match presence {
                Presence::Present if !there => problems.push(format!(
                    "{}/{}: acknowledged as present, missing from state (lost acknowledgement)",
                    key.0, key.1
                )),
                Presence::Absent if there => problems.push(format!(
                    "{}/{}: acknowledged as absent, but in state",
                    key.0, key.1
                )),
                _ => {}
            }
            *presence = if there {
                Presence::Present
            } else {
                Presence::Absent
            };
        }
        for key in actual {
            if !self.rules.contains_key(key) {
                problems.push(format!(
                    "{}/{}: in state, but never requested",
                    key.0, key.1
                ));
            }
        }
        problems
    }
}
