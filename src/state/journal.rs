//! `state.journal`: the changes committed since `state.json` was written.
//!
//! Rewriting the whole state per change costs a write and fsync of every
//! rule (2.5 MB at 20,000 rules); appending what changed costs one short
//! line. The journal's first line names the `state.json` it continues
//! (length and FNV-1a hash of its bytes), every further line is one
//! committed transaction:
//!
//! ```text
//! {"journal":1,"base":"2563042-9f3c0d1e2a4b5c6d"}
//! {"next_id":8,"forwarding":false,"forwarding_ipv6":true,"put":[{"id":7,"kind":"dnat",…}]}
//! {"next_id":8,"forwarding":false,"forwarding_ipv6":true,"del":[3]}
//! ```
//!
//! `put` replaces the rule with that id (or adds it), `del` removes ids;
//! the scalar fields are the state's after the transaction. A line is
//! written with one `write` and made durable with `fdatasync` before the
//! change is acknowledged, so a crash leaves at most a torn LAST line,
//! which was never acknowledged and is dropped. Anything unreadable before
//! the last line is corruption.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::model::{Rule, RuleId};

use super::State;

/// The journal format this build writes and reads.
pub(super) const JOURNAL_VERSION: u32 = 1;

/// The first line: which `state.json` the records continue.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub(super) struct Header {
    pub journal: u32,
    pub base: String,
}

impl Header {
    /// The header of a journal continuing a `state.json` of these bytes.
    pub fn for_base(state_json: Option<&[u8]>) -> Header {
        Header {
            journal: JOURNAL_VERSION,
            base: fingerprint(state_json),
        }
    }

    /// The header line, newline included.
    pub fn line(&self) -> Vec<u8> {
        let mut line = serde_json::to_vec(self).expect("header serializes");
        line.push(b'\n');
        line
    }
}

/// `<length>-<FNV-1a 64 in hex>` of a state file's bytes (`none` when
/// there is none): cheap, and enough to tell the file a journal was
/// started for from any other.
pub(super) fn fingerprint(bytes: Option<&[u8]>) -> String {
    let Some(bytes) = bytes else {
        return "none".into();
    };
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{}-{h:016x}", bytes.len())
}

/// One committed transaction, as read back: rules stay raw JSON, so an
/// entry that fails the checks is quarantined verbatim like one of
/// `state.json`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Record {
    pub next_id: RuleId,
    pub forwarding: bool,
    pub forwarding_ipv6: bool,
    #[serde(default)]
    pub put: Vec<Value>,
    #[serde(default)]
    pub del: Vec<RuleId>,
}

/// One transaction as written.
#[derive(Serialize)]
struct RecordOut<'a> {
    next_id: RuleId,
    forwarding: bool,
    forwarding_ipv6: bool,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    put: Vec<&'a Rule>,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    del: Vec<RuleId>,
}

/// The line recording the change from `old` to `new`, newline included, or
/// `None` when nothing differs. Quarantined entries are not part of it:
/// only `clear` drops them, and that compacts.
pub(super) fn record(old: &State, new: &State) -> Option<Vec<u8>> {
    let (put, del) = rule_changes(&old.rules, &new.rules);
    if put.is_empty()
        && del.is_empty()
        && old.next_id == new.next_id
        && old.forwarding == new.forwarding
        && old.forwarding_ipv6 == new.forwarding_ipv6
    {
        return None;
    }
    let out = RecordOut {
        next_id: new.next_id,
        forwarding: new.forwarding,
        forwarding_ipv6: new.forwarding_ipv6,
        put,
        del,
    };
    let mut line = serde_json::to_vec(&out).expect("record serializes");
    line.push(b'\n');
    Some(line)
}

/// The line recording `delta`, which made `new`, newline included, or
/// `None` when it changes nothing.
pub(super) fn record_delta(delta: &super::Delta, new: &State) -> Option<Vec<u8>> {
    if delta.put.is_empty() && delta.del.is_empty() {
        // Ids are only taken by rules put: a delta without rules changed
        // nothing the journal keeps.
        return None;
    }
    let out = RecordOut {
        next_id: new.next_id,
        forwarding: new.forwarding,
        forwarding_ipv6: new.forwarding_ipv6,
        put: delta.put.iter().collect(),
        del: delta.del.clone(),
    };
    let mut line = serde_json::to_vec(&out).expect("record serializes");
    line.push(b'\n');
    Some(line)
}

/// Rules of `new` that are not in `old` as they are, and ids of `old` that
/// `new` lacks. Both lists are in id order in the engine, so one merge walk
/// finds them (a hash lookup when they are not).
fn rule_changes<'a>(old: &[Rule], new: &'a [Rule]) -> (Vec<&'a Rule>, Vec<RuleId>) {
    let sorted = |r: &[Rule]| r.windows(2).all(|w| w[0].id < w[1].id);
    let (mut put, mut del) = (Vec::new(), Vec::new());
    if sorted(old) && sorted(new) {
        let (mut i, mut j) = (0, 0);
        while i < old.len() || j < new.len() {
            match (old.get(i), new.get(j)) {
                (Some(o), Some(n)) if o.id == n.id => {
                    if o != n {
                        put.push(n);
                    }
                    i += 1;
                    j += 1;
                }
                (Some(o), Some(n)) if o.id < n.id => {
                    del.push(o.id);
                    i += 1;
                }
                (Some(o), None) => {
                    del.push(o.id);
                    i += 1;
                }
                (_, Some(n)) => {
                    put.push(n);
                    j += 1;
                }
                (None, None) => unreachable!("loop condition"),
            }
        }
        return (put, del);
    }
    let before: std::collections::HashMap<RuleId, &Rule> = old.iter().map(|r| (r.id, r)).collect();
    let after: std::collections::HashSet<RuleId> = new.iter().map(|r| r.id).collect();
    put.extend(new.iter().filter(|n| before.get(&n.id) != Some(n)));
    del.extend(old.iter().map(|o| o.id).filter(|id| !after.contains(id)));
    (put, del)
}

/// What a journal file holds.
#[derive(Debug)]
pub(super) enum Parsed {
    /// A readable journal: its header and committed records; `torn` when
    /// an unfinished last line was dropped.
    Ok {
        header: Header,
        records: Vec<Record>,
        torn: bool,
    },
    /// The header itself never made it to disk whole (a crash while the
    /// journal was created): nothing was committed to it.
    NoHeader,
    /// A line before the last one does not parse.
    Corrupt(String),
}

/// Reads a journal's text. Only the last line may be unfinished (no
/// newline, or not JSON): that transaction was never acknowledged.
pub(super) fn parse(text: &[u8]) -> Parsed {
    let mut lines: Vec<&[u8]> = text.split(|b| *b == b'\n').collect();
    // After the last newline: empty, or a line whose write never finished.
    let mut torn = !lines.pop().unwrap_or_default().is_empty();
    // A torn line is JSON-invalid or lacks its newline; garbage past the
    // end (a crash can leave zeros) counts as the same unfinished line.
    let last_good = lines
        .iter()
        .rposition(|l| serde_json::from_slice::<serde::de::IgnoredAny>(l).is_ok());
    let complete = last_good.map_or(0, |i| i + 1);
    if complete < lines.len() {
        torn = true;
    }
    let lines = &lines[..complete];
    let Some((first, rest)) = lines.split_first() else {
        return Parsed::NoHeader;
    };
    let header: Header = match crate::proto::strict::from_slice(first) {
        Ok(h) => h,
        Err(e) => return Parsed::Corrupt(format!("line 1 (header): {e}")),
    };
    if header.journal != JOURNAL_VERSION {
        return Parsed::Corrupt(format!(
            "line 1: journal version {}, this natmap reads {JOURNAL_VERSION}",
            header.journal
        ));
    }
    let mut records = Vec::with_capacity(rest.len());
    for (n, line) in rest.iter().enumerate() {
        match crate::proto::strict::from_slice::<Record>(line) {
            Ok(r) => records.push(r),
            Err(e) => return Parsed::Corrupt(format!("line {}: {e}", n + 2)),
        }
    }
    Parsed::Ok {
        header,
        records,
        torn,
    }
}

/// The rule entries of `base` (raw, `state.json`'s good rules) after
/// `records`, and the state's scalars after the last record.
pub(super) fn replay(
    mut entries: Vec<Value>,
    records: Vec<Record>,
) -> (Vec<Value>, Option<(RuleId, bool, bool)>) {
    let id_of = |v: &Value| v.get("id").and_then(Value::as_u64);
    let mut scalars = None;
    for r in records {
        if !r.del.is_empty() {
            let gone: std::collections::HashSet<RuleId> = r.del.into_iter().collect();
            entries.retain(|e| id_of(e).is_none_or(|id| !gone.contains(&id)));
        }
        for put in r.put {
            let id = id_of(&put);
            match id.and_then(|id| entries.iter().position(|e| id_of(e) == Some(id))) {
                Some(at) => entries[at] = put,
                None => {
                    // Keep id order: a new rule goes before the first higher id.
                    let at = id
                        .and_then(|id| entries.iter().position(|e| id_of(e) > Some(id)))
                        .unwrap_or(entries.len());
                    entries.insert(at, put);
                }
            }
        }
        scalars = Some((r.next_id, r.forwarding, r.forwarding_ipv6));
    }
    (entries, scalars)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn header() -> Vec<u8> {
        Header::for_base(Some(b"{}")).line()
    }

    #[test]
    fn a_torn_last_line_is_dropped_and_earlier_ones_kept() {
        let mut text = header();
        text.extend(b"{\"next_id\":2,\"forwarding\":false,\"forwarding_ipv6\":true,\"del\":[1]}\n");
        let whole = text.clone();
        text.extend(b"{\"next_id\":3,\"forwarding\":false,\"put\":[{\"id\":");
        for (case, t) in [
            ("no newline", text.clone()),
            (
                "bad json with newline",
                [text.clone(), b"\n".to_vec()].concat(),
            ),
            ("zeros", [whole.clone(), vec![0; 40]].concat()),
        ] {
            let Parsed::Ok { records, torn, .. } = parse(&t) else {
                panic!("{case}: not parsed")
            };
            assert_eq!(records.len(), 1, "{case}");
            assert!(torn, "{case}");
        }
        let Parsed::Ok { torn, .. } = parse(&whole) else {
            panic!()
        };
        assert!(!torn);
    }

    #[test]
    fn a_bad_line_in_the_middle_is_corruption() {
        let mut text = header();
        text.extend(b"{\"next_id\":2,\"forw\n");
        text.extend(b"{\"next_id\":2,\"forwarding\":false,\"forwarding_ipv6\":true}\n");
        assert!(matches!(parse(&text), Parsed::Corrupt(e) if e.contains("line 2")));
        // A whole line that is JSON but no record is corruption even last.
        let mut text = header();
        text.extend(b"{\"next_id\":2,\"bogus\":1}\n");
        assert!(matches!(parse(&text), Parsed::Corrupt(e) if e.contains("bogus")));
    }

    #[test]
    fn a_missing_or_torn_header_means_nothing_committed() {
        assert!(matches!(parse(b""), Parsed::NoHeader));
        assert!(matches!(parse(b"{\"journal\":1,\"ba"), Parsed::NoHeader));
    }

    #[test]
    fn replay_puts_and_deletes_by_id_in_id_order() {
        let e = |id: u64, x: &str| json!({"id": id, "x": x});
        let records = vec![
            Record {
                next_id: 5,
                forwarding: true,
                forwarding_ipv6: false,
                put: vec![e(4, "new"), e(2, "changed")],
                del: vec![1],
            },
            Record {
                next_id: 6,
                forwarding: true,
                forwarding_ipv6: false,
                put: vec![e(5, "later")],
                del: vec![],
            },
        ];
        let (out, scalars) = replay(vec![e(1, "a"), e(2, "b"), e(3, "c")], records);
        assert_eq!(
            out,
            vec![e(2, "changed"), e(3, "c"), e(4, "new"), e(5, "later")]
        );
        assert_eq!(scalars, Some((6, true, false)));
    }
}
