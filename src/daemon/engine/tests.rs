//! Engine tests against the recording firewall driver: which applies a
//! change asks for, and rollback on failure. What the iptables driver sends
//! for them (the incremental transaction, the fallback to a full rewrite)
//! is tested with the driver (`firewall::iptables::driver`).

use crate::firewall::recording::Call;
use crate::firewall::{Mode, RecordingDriver};
use crate::model::Family;
use crate::proto::{DnatRequest, Request};

use super::super::relay::Relays;
use super::{Engine, Peer};

fn dnat(port: u16) -> Request {
    Request::Dnat(DnatRequest {
        ext_ip: "192.0.2.1".parse().unwrap(),
        int_ip: "198.51.100.2".parse().unwrap(),
        ports: crate::model::PortList::single(port),
        proto: Default::default(),
        ext_if: None,
        allow_nonlocal: false,
        delete: false,
    })
}

fn engine(dir: &tempfile::TempDir) -> (Engine, RecordingDriver) {
    let fw = RecordingDriver::default();
    let engine = Engine::open(
        dir.path().join("state.json"),
        Box::new(fw.clone()),
        Relays::disabled(),
        crate::daemon::local::AddressSource::AssumeAllLocal,
    )
    .unwrap();
    (engine, fw)
}

/// The applies the driver saw: (families, mode, rule ids).
fn applies(fw: &RecordingDriver) -> Vec<(Vec<Family>, Mode, Vec<u64>)> {
    fw.calls()
        .into_iter()
        .filter_map(|c| match c {
            Call::Apply {
                families,
                mode,
                rules,
            } => Some((families, mode, rules)),
            Call::Change {
                families, rules, ..
            } => Some((families, Mode::Change, rules)),
            Call::Teardown(_) => None,
        })
        .collect()
}

#[test]
fn a_change_sends_one_incremental_transaction() {
    let dir = tempfile::tempdir().unwrap();
    let (mut engine, fw) = engine(&dir);
    let at_start = applies(&fw);
    // The IPv6 probe, then a full apply of each family.
    assert_eq!(
        at_start,
        [
            (vec![Family::V6], Mode::Full, vec![]),
            (vec![Family::V4], Mode::Full, vec![]),
            (vec![Family::V6], Mode::Full, vec![]),
        ],
        "full applies at start"
    );
    let response = engine.handle(dnat(47011), Peer::default());
    assert!(response.ok, "{response:?}");
    let sent = applies(&fw);
    assert_eq!(sent.len(), at_start.len() + 1, "one apply for the change");
    let last = sent.last().unwrap();
    assert_eq!(last.1, Mode::Change, "an incremental apply: {last:?}");
    assert_eq!(last.2, [1], "with the new rule: {last:?}");
    // The driver got the change alone, not the whole set to diff: its
    // work follows the change (issue 13, flat in N).
    assert!(
        matches!(fw.calls().last(), Some(Call::Change { put, remove, .. }) if put == &[1] && remove.is_empty()),
        "{:?}",
        fw.calls().last()
    );
    let response = engine.handle(dnat(47012), Peer::default());
    assert!(response.ok, "{response:?}");
    let mut delete = dnat(47011);
    if let Request::Dnat(d) = &mut delete {
        d.delete = true;
    }
    let response = engine.handle(delete, Peer::default());
    assert!(response.ok, "{response:?}");
    assert!(
        matches!(fw.calls().last(), Some(Call::Change { put, remove, rules, .. })
            if put.is_empty() && remove == &[1] && rules == &[2]),
        "a delete removes its id alone: {:?}",
        fw.calls().last()
    );
}

#[test]
fn a_failed_apply_changes_nothing_and_frees_the_port() {
    let dir = tempfile::tempdir().unwrap();
    let (mut engine, fw) = engine(&dir);
    let state_before = std::fs::read(dir.path().join("state.json")).ok();
    fw.fail_next(1);
    let response = engine.handle(dnat(47013), Peer::default());
    let error = response.error.expect("the change fails");
    assert_eq!(error.code, crate::proto::ErrorCode::ApplyFailed);
    assert_eq!(
        std::fs::read(dir.path().join("state.json")).ok(),
        state_before
    );
    // The reserved port was released again.
    std::net::TcpListener::bind("0.0.0.0:47013").expect("port free after the failure");
    // And the next change works and gets the next id, not a skipped one.
    let ok = engine.handle(dnat(47014), Peer::default());
    assert_eq!(ok.data_json()["rule"]["id"], 1);
}

#[test]
fn an_unwritable_state_rolls_the_rules_back() {
    let dir = tempfile::tempdir().unwrap();
    let (mut engine, fw) = engine(&dir);
    // Make the state file's directory unwritable by replacing the temp path
    // with a directory: the write fails, the rules must be put back.
    std::fs::create_dir(dir.path().join("state.json.tmp")).unwrap();
    let response = engine.handle(dnat(47015), Peer::default());
    assert_eq!(
        response.error.unwrap().code,
        crate::proto::ErrorCode::StateWriteFailed
    );
    let sent = applies(&fw);
    let (add, undo) = (&sent[sent.len() - 2], &sent[sent.len() - 1]);
    assert_eq!(add.2, [1], "the rule goes in: {add:?}");
    assert!(undo.2.is_empty(), "the rule is taken out again: {undo:?}");
}

#[test]
fn queued_changes_share_one_transaction_and_one_state_write() {
    let dir = tempfile::tempdir().unwrap();
    let (mut engine, fw) = engine(&dir);
    let peer = Peer::default();
    // A first change: the state file and its journal exist from here on.
    engine.handle_batch(vec![(dnat(47020), peer)]);
    let journal = dir.path().join("state.json.journal");
    let lines = |p: &std::path::Path| std::fs::read_to_string(p).unwrap().lines().count();
    let journal_before = lines(&journal);
    let state_json_before = std::fs::read(dir.path().join("state.json")).unwrap();
    let before = applies(&fw).len();
    let mut delete = dnat(47021);
    if let Request::Dnat(d) = &mut delete {
        d.delete = true;
    }
    let responses = engine.handle_batch(vec![
        (dnat(47021), peer),
        (dnat(47022), peer),
        (dnat(47021), peer), // same rule again in the same batch
        (delete, peer),      // and gone again
        (dnat(47023), peer),
    ]);
    let results: Vec<String> = responses
        .iter()
        .map(|r| {
            r.data.as_ref().map_or("error".into(), |d| {
                d.to_json()["result"].as_str().unwrap().to_owned()
            })
        })
        .collect();
    assert_eq!(
        results,
        ["added", "added", "already_present", "deleted", "added"]
    );
    assert_eq!(
        applies(&fw).len(),
        before + 1,
        "one transaction for the batch"
    );
    // One state write for the batch: one journal line (group commit).
    assert_eq!(lines(&journal), journal_before + 1, "one journal line");
    assert_eq!(
        std::fs::read(dir.path().join("state.json")).unwrap(),
        state_json_before,
        "state.json is not rewritten"
    );
    let state = crate::state::read_current(&dir.path().join("state.json")).unwrap();
    let state = serde_json::to_value(&state).unwrap();
    let ports: Vec<&str> = state["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["ports"].as_str().unwrap())
        .collect();
    assert_eq!(ports, ["47020", "47022", "47023"]);
    // The deleted rule's port is free, the others are held.
    assert!(
        std::net::TcpListener::bind("192.0.2.1:47021").is_ok()
            || std::net::TcpListener::bind("0.0.0.0:47021").is_ok()
    );
    assert!(std::net::TcpListener::bind("0.0.0.0:47022").is_err());
}

/// `docker add --name LABEL SPEC` of a fixed (non-Docker) target: nothing
/// to look up, so the engine handles it without Docker.
fn fixed(spec: &str) -> Request {
    Request::DockerAdd(crate::proto::DockerAddRequest {
        container: None,
        name: Some("nas".parse().unwrap()),
        mapping: spec.parse().unwrap(),
        network: None,
        allow_nonlocal: false,
    })
}

fn port_free(port: u16) -> bool {
    std::net::TcpListener::bind(("0.0.0.0", port)).is_ok()
}

/// A range mapping is one rule reserved as a whole (every port or none),
/// names its holder when another range overlaps it, is removed as a whole
/// by any of its ports, and moves as a whole.
#[test]
fn a_range_is_reserved_removed_and_moved_as_a_whole() {
    let dir = tempfile::tempdir().unwrap();
    let (mut engine, nf) = engine(&dir);
    let base = 47100 + (std::process::id() % 200) as u16 * 4;
    let range = format!("{base}-{}:192.0.2.50:80-81", base + 1);
    let added = engine.handle(fixed(&range), Peer::default());
    assert!(added.ok, "{added:?}");
    let rule = &added.data_json()["rule"];
    let id = rule["id"].as_u64().unwrap();
    assert_eq!(
        (rule["host_port"].as_u64(), rule["port_count"].as_u64()),
        (Some(base.into()), Some(2))
    );
    assert!(!port_free(base) && !port_free(base + 1), "both ports held");
    let last = applies(&nf).pop().unwrap();
    assert!(
        last.2.contains(&id),
        "the range is applied as one rule: {last:?}"
    );

    // Overlapping one port: refused, naming the mapping and its range.
    let other = format!("{}-{}:192.0.2.51:90-91", base + 1, base + 2);
    let refused = engine.handle(fixed(&other), Peer::default());
    let message = refused.error.as_ref().unwrap().message.clone();
    assert!(!refused.ok);
    assert!(
        message.contains(&format!("rule #{id} (docker nas {base}-{}/tcp)", base + 1)),
        "{message}"
    );
    assert!(
        port_free(base + 2),
        "nothing of the refused range stays held"
    );

    // Remapped as a whole: a range of another length is refused.
    let remap = |old: u16, new: u16, new_last: Option<u16>| {
        Request::DockerRemap(crate::proto::DockerRemapRequest {
            container: "nas".parse().unwrap(),
            old_port: old,
            new_port: new,
            old_port_last: None,
            new_port_last: new_last,
            proto: None,
        })
    };
    let bad = engine.handle(remap(base, base + 2, Some(base + 4)), Peer::default());
    assert!(!bad.ok && bad.error.unwrap().message.contains("same length"));
    let inner = engine.handle(remap(base + 1, base + 2, None), Peer::default());
    assert!(!inner.ok && inner.error.unwrap().message.contains("as a whole"));
    let moved = engine.handle(remap(base, base + 2, Some(base + 3)), Peer::default());
    assert!(moved.ok, "{moved:?}");
    assert!(port_free(base) && port_free(base + 1), "old range released");
    assert!(
        !port_free(base + 2) && !port_free(base + 3),
        "new range held"
    );

    // Removed by any of its ports: every port is free again.
    let rm = engine.handle(
        Request::DockerRm(crate::proto::DockerRmRequest {
            container: Some("nas".parse().unwrap()),
            name: None,
            host_port: Some(base + 3),
            host_port_last: None,
            proto: None,
            id: None,
        }),
        Peer::default(),
    );
    assert!(rm.ok, "{rm:?}");
    assert!(port_free(base + 2) && port_free(base + 3));
}

/// A duplicate is found by identity, not by a scan: the index follows
/// every add, delete and failed change, and sees the batch's own adds.
#[test]
fn duplicates_are_found_by_identity_through_adds_deletes_and_failures() {
    let dir = tempfile::tempdir().unwrap();
    let (mut engine, fw) = engine(&dir);
    let peer = Peer::default();
    let result = |r: &crate::proto::Response| r.data_json()["result"].clone();
    let delete = |port| {
        let mut d = dnat(port);
        if let Request::Dnat(d) = &mut d {
            d.delete = true;
        }
        d
    };
    assert_eq!(result(&engine.handle(dnat(47031), peer)), "added");
    assert_eq!(result(&engine.handle(dnat(47031), peer)), "already_present");
    assert_eq!(result(&engine.handle(delete(47031), peer)), "deleted");
    assert_eq!(result(&engine.handle(dnat(47031), peer)), "added");
    // A duplicate in the same batch as its original.
    let answers = engine.handle_batch(vec![
        (delete(47031), peer),
        (dnat(47032), peer),
        (dnat(47032), peer),
    ]);
    let results: Vec<_> = answers.iter().map(result).collect();
    assert_eq!(results, ["deleted", "added", "already_present"]);
    assert_eq!(result(&engine.handle(dnat(47031), peer)), "added");
    // A failed firewall change leaves the index as the state: the rule it
    // would have added is not there, so the next add adds it.
    fw.fail_next(1);
    assert!(engine.handle(dnat(47033), peer).error.is_some());
    assert_eq!(result(&engine.handle(dnat(47033), peer)), "added");
    assert_eq!(result(&engine.handle(dnat(47033), peer)), "already_present");
    assert_eq!(
        result(&engine.handle(delete(47099), peer)),
        serde_json::Value::Null
    );
}
