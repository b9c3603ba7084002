//! `apply` and `export` on a real kernel: declarative documents, plans,
//! idempotence, and export → apply round trips.

pub mod common;

use common::*;
use serde_json::{json, Value};

fn write_doc(d: &Daemon, name: &str, doc: &Value) -> String {
    let path = d.dir().join(name);
    std::fs::write(&path, serde_json::to_vec_pretty(doc).unwrap()).unwrap();
    path.to_string_lossy().into_owned()
}

fn dnat(port: u16) -> Value {
    json!({"kind":"dnat","ext_ip":"192.0.2.1","int_ip":"198.51.100.2","ports":port.to_string(),"proto":"tcp","ext_if":null})
}

#[test]
fn apply_adds_removes_keeps_and_is_idempotent() {
    if !privileged() {
        return;
    }
    let topo = Topology::new();
    let _web = TcpEcho::start(
        &topo.server,
        std::net::SocketAddr::new(SERVER_V4.into(), 8001),
    );
    let d = Daemon::start(&topo.router);
    let snat =
        json!({"kind":"snat","source":"198.51.100.0/24","ext_if":"ext0","ext_ip":"192.0.2.1"});
    let doc1 = json!({"schema_version":1,"rules":[dnat(8001), dnat(8002), snat]});
    let f1 = write_doc(&d, "doc1.json", &doc1);
    let out = d.cli_json(&["apply", &f1]);
    assert_eq!(out["data"]["added"].as_array().unwrap().len(), 3, "{out}");
    expect_tcp(
        &topo.client,
        std::net::SocketAddr::new(ROUTER_EXT_V4.into(), 8001),
        CLIENT_V4,
        8001,
    );
    let lines1 = natmap_installed(&topo.router, false);

    let again = d.cli_json(&["apply", &f1]);
    assert_eq!(again["data"]["added"].as_array().unwrap().len(), 0);
    assert_eq!(again["data"]["removed"].as_array().unwrap().len(), 0);
    assert_eq!(again["data"]["kept"], 3);
    assert_eq!(
        natmap_installed(&topo.router, false),
        lines1,
        "re-applying changes nothing"
    );

    let doc2 =
        json!({"schema_version":1,"rules":[dnat(8001), dnat(8003), doc1["rules"][2].clone()]});
    let f2 = write_doc(&d, "doc2.json", &doc2);
    let state_before = state_files(&d.state_path());
    let plan = d.cli_json(&["apply", "--dry-run", &f2]);
    assert_eq!(plan["data"]["dry_run"], true);
    assert_eq!(plan["data"]["added"][0]["ports"], "8003", "{plan}");
    assert_eq!(plan["data"]["removed"][0]["ports"], "8002", "{plan}");
    assert_eq!(
        natmap_installed(&topo.router, false),
        lines1,
        "a dry run changes no rule"
    );
    assert_eq!(state_files(&d.state_path()), state_before, "nor the state");

    let applied = d.cli_json(&["apply", &f2]);
    assert_eq!(applied["data"]["added"][0]["id"], 4, "{applied}");
    let ls = d.cli_json(&["ls"]);
    let ids: Vec<u64> = ls["data"]["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, [1, 3, 4], "kept rules keep their ids");
    assert!(
        in_netns(&topo.router, || std::net::TcpListener::bind(
            "192.0.2.1:8002"
        )
        .is_ok()),
        "removed port released"
    );
    expect_tcp(
        &topo.client,
        std::net::SocketAddr::new(ROUTER_EXT_V4.into(), 8001),
        CLIENT_V4,
        8001,
    );
}

#[test]
fn bad_documents_change_nothing_and_name_the_problem() {
    if !privileged() {
        return;
    }
    let topo = Topology::new();
    let d = Daemon::start(&topo.router);
    d.cli_ok(&dnat_args("192.0.2.1", "198.51.100.2", "9000"));
    let before = natmap_installed(&topo.router, false);
    let cases = [
        (json!({"schema_version":2,"rules":[]}), "schema_version"),
        (
            json!({"schema_version":1,"rules":[dnat(9001), dnat(9001)]}),
            "same rule",
        ),
        (
            json!({"schema_version":1,"rules":[{"kind":"dnat","ext_ip":"192.0.2.1","int_ip":"198.51.100.2","ports":"0","proto":"tcp","ext_if":null}]}),
            "ports",
        ),
        (
            json!({"schema_version":1,"rules":[{"kind":"dnat","ext_ip":"192.0.2.1","int_ip":"198.51.100.2","ports":"1","proto":"tcp","ext_if":null,"extra":1}]}),
            "extra",
        ),
        (
            json!({"schema_version":1,"rules":[{"kind":"dnat","ext_ip":"192.0.2.1","int_ip":"2001:db8::2","ports":"1","proto":"tcp","ext_if":null}]}),
            "rules[0]",
        ),
    ];
    for (i, (doc, needle)) in cases.iter().enumerate() {
        let f = write_doc(&d, &format!("bad{i}.json"), doc);
        let (status, out) = d.cli_json_output(&["apply", &f]);
        assert_ne!(status.code(), Some(0), "{doc}");
        let message = out["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(needle), "{doc}: {out}");
        assert_eq!(natmap_installed(&topo.router, false), before);
    }
    // A busy port fails the whole document, with nothing half-applied.
    let blocker = in_netns(&topo.router, || {
        std::net::TcpListener::bind("192.0.2.1:9102").unwrap()
    });
    let f = write_doc(
        &d,
        "busy.json",
        &json!({"schema_version":1,"rules":[dnat(9101), dnat(9102)]}),
    );
    let (_, out) = d.cli_json_output(&["apply", &f]);
    assert_eq!(out["error"]["code"], "port_in_use", "{out}");
    assert_eq!(natmap_installed(&topo.router, false), before);
    assert!(in_netns(&topo.router, || std::net::TcpListener::bind(
        "192.0.2.1:9101"
    )
    .is_ok()));
    drop(blocker);
}

#[test]
fn export_then_apply_on_an_empty_daemon_gives_identical_rules() {
    if !privileged() {
        return;
    }
    let source = Topology::new();
    let d = Daemon::start(&source.router);
    d.cli_ok(&dnat_args("192.0.2.1", "198.51.100.2", "25,465").proto("tcp"));
    d.cli_ok(
        &dnat_args("192.0.2.1", "198.51.100.2", "53")
            .proto("udp")
            .ext_if("ext0"),
    );
    d.cli_ok(&hairpin_args("192.0.2.1", "198.51.100.3", "80,443"));
    d.cli_ok(&snat_args("198.51.100.0/24", "ext0", "192.0.2.1"));
    d.cli_ok(&dnat_args("2001:db8:1::1", "2001:db8:2::2", "8080"));
    let exported = d.cli_ok(&["export"]);
    let doc: Value = serde_json::from_str(&exported).unwrap();
    assert_eq!(doc["rules"].as_array().unwrap().len(), 5);

    let target = Topology::new();
    let d2 = Daemon::start(&target.router);
    let f = write_doc(&d2, "exported.json", &doc);
    d2.cli_ok(&["apply", &f]);
    assert_eq!(
        natmap_installed(&target.router, false),
        natmap_installed(&source.router, false)
    );
    let strip = |s: String| {
        s.lines()
            .filter(|l| l.contains("NATMAP"))
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    assert_eq!(
        strip(iptables_save(&target.router, true)),
        strip(iptables_save(&source.router, true))
    );
    assert_eq!(
        natmap_installed(&target.router, true),
        natmap_installed(&source.router, true)
    );
    assert_eq!(d2.cli_ok(&["export"]), exported, "export is stable");
}

#[test]
fn bulk_apply_of_a_thousand_rules() {
    if !privileged() {
        return;
    }
    let topo = Topology::new();
    let d = Daemon::start(&topo.router);
    let dnat_entries = || natmap_dnat_entries(&topo.router);
    let rules: Vec<Value> = (20000..21000).map(dnat).collect();
    let f = write_doc(&d, "bulk.json", &json!({"schema_version":1,"rules":rules}));
    let start = std::time::Instant::now();
    let out = d.cli_json(&["apply", &f]);
    eprintln!("apply of 1000 rules: {:?}", start.elapsed());
    assert_eq!(out["data"]["added"].as_array().unwrap().len(), 1000);
    assert_eq!(dnat_entries(), 1000);
    let empty = write_doc(&d, "empty.json", &json!({"schema_version":1,"rules":[]}));
    let out = d.cli_json(&["apply", &empty]);
    assert_eq!(out["data"]["removed"].as_array().unwrap().len(), 1000);
    assert_eq!(dnat_entries(), 0);
}

/// `state.json` and its journal, byte for byte (`None` for a missing one).
fn state_files(path: &std::path::Path) -> (Option<Vec<u8>>, Option<Vec<u8>>) {
    let journal = path.with_file_name(format!(
        "{}.journal",
        path.file_name().unwrap().to_string_lossy()
    ));
    (std::fs::read(path).ok(), std::fs::read(journal).ok())
}
