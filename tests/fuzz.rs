//! Property-based fuzzing (proptest) of every parser that sees user input:
//! the argument types (`PortList`, `HostIp`, `Network`, `IfName`,
//! `PortSpec`, `ContainerRef`, `Proto`) and the daemon's request parser
//! `natmap::daemon::server::parse_request`, over arbitrary bytes and over
//! structurally valid requests with one field mutated.
//!
//! Properties: no input panics; every error names the field (the CLI flag
//! or request field the value came from); every accepted value is safe to
//! put into an iptables line where that applies; valid values round-trip
//! (`parse(display(x)) == x`). cargo-fuzz needs a nightly toolchain, which
//! cannot be installed here, so this is the fuzzer (see docs/reliability.md).
//!
//! Cases per property: `NATMAP_FUZZ_CASES` (default 4096); each test prints
//! how many cases it ran. Inputs that once found a bug are kept as plain
//! regression tests at the end of this file.

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{AtomicU64, Ordering};

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::{json, Value};

use natmap::daemon::server::parse_request;
use natmap::model::{ContainerRef, HostIp, IfName, Network, PortList, PortSpec, Proto};
use natmap::proto::{Envelope, ErrorCode, PROTOCOL_VERSION};

// ───────────────────────────── runner ─────────────────────────────

fn cases() -> u32 {
    std::env::var("NATMAP_FUZZ_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(4096)
}

/// Runs `test` on `cases()` values of `strategy`, shrinking a failure to a
/// minimal input (the panic shows it), and prints how many cases ran.
fn fuzz<S: Strategy>(name: &str, strategy: S, test: impl Fn(S::Value) -> Result<(), TestCaseError>)
where
    S::Value: std::fmt::Debug,
{
    let config = Config {
        cases: cases(),
        failure_persistence: None,
        // Shrinking a failure may take a while; bound it.
        max_shrink_iters: 10_000,
        ..Config::default()
    };
    let ran = AtomicU64::new(0);
    let mut runner = TestRunner::new(config);
    let result = runner.run(&strategy, |v| {
        ran.fetch_add(1, Ordering::Relaxed);
        test(v)
    });
    if let Err(e) = result {
        panic!("{name}: {e}");
    }
    let _ = writeln!(
        std::io::stderr(),
        "[fuzz] {name}: {} executions (incl. shrinking), 0 failures",
        ran.load(Ordering::Relaxed)
    );
}

// ───────────────────────────── strategies ─────────────────────────────

/// Arbitrary text, biased towards the characters parsers care about.
fn hostile_string() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[0-9,\\-: ./\\[\\]a-fA-F%\n\r\t\u{0}]{0,40}",
        "[ -~]{0,40}",
        Just(String::new()),
        proptest::collection::vec(
            prop_oneof![
                Just("\n-A INPUT -j ACCEPT".to_string()),
                Just("\u{0}".to_string()),
                Just("\u{2028}".to_string()),
                Just("\"".to_string()),
                Just("-".to_string()),
                Just(":".to_string()),
                Just("/".to_string()),
                Just("[".to_string()),
                Just("]".to_string()),
                Just("65535".to_string()),
                Just("65536".to_string()),
                Just("0".to_string()),
                Just("::".to_string()),
                Just("192.0.2.1".to_string()),
                Just("eth0".to_string()),
                Just("tcp".to_string()),
                "[0-9]{1,6}",
            ],
            0..8
        )
        .prop_map(|parts| parts.concat()),
    ]
}

fn host_ipv4() -> impl Strategy<Value = Ipv4Addr> {
    any::<Ipv4Addr>().prop_filter("a host address", |ip| {
        HostIp::parse_field("ip", &ip.to_string()).is_ok()
    })
}

fn host_ipv6() -> impl Strategy<Value = Ipv6Addr> {
    any::<Ipv6Addr>().prop_filter("a host address", |ip| {
        HostIp::parse_field("ip", &ip.to_string()).is_ok()
    })
}

/// A pair of distinct host addresses of one family, as strings.
fn host_pair() -> impl Strategy<Value = (String, String)> {
    prop_oneof![
        (host_ipv4(), host_ipv4()).prop_map(|(a, b)| (a.to_string(), b.to_string())),
        (host_ipv6(), host_ipv6()).prop_map(|(a, b)| (a.to_string(), b.to_string())),
    ]
    .prop_filter("distinct", |(a, b)| a != b)
}

/// Ranges of ports (first, last) whose union has at most 1024 ports.
fn port_ranges() -> impl Strategy<Value = Vec<(u16, u16)>> {
    proptest::collection::vec((1u16..=65535, 0u16..50), 1..20).prop_map(|v| {
        v.into_iter()
            .map(|(first, len)| (first, first.saturating_add(len)))
            .collect()
    })
}

/// A port list in any valid spelling: any order, duplicates, spaces.
fn port_list_text() -> impl Strategy<Value = (String, Vec<(u16, u16)>)> {
    (port_ranges(), any::<bool>()).prop_map(|(ranges, spaces)| {
        let sep = if spaces { ", " } else { "," };
        let text = ranges
            .iter()
            .map(|(a, b)| {
                if a == b {
                    a.to_string()
                } else {
                    format!("{a}-{b}")
                }
            })
            .collect::<Vec<_>>()
            .join(sep);
        (text, ranges)
    })
}

fn if_name() -> impl Strategy<Value = String> {
    "[A-Za-z0-9_@+][A-Za-z0-9._@+-]{0,14}"
}

fn container_ref() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9][a-zA-Z0-9_.-]{0,60}"
}

fn proto_name() -> impl Strategy<Value = &'static str> {
    prop_oneof![Just("tcp"), Just("udp")]
}

fn network_text() -> impl Strategy<Value = String> {
    prop_oneof![
        (any::<Ipv4Addr>(), 0u8..=32).prop_map(|(ip, p)| format!("{ip}/{p}")),
        (any::<Ipv6Addr>(), 0u8..=128).prop_map(|(ip, p)| format!("{ip}/{p}")),
        any::<IpAddr>().prop_map(|ip| ip.to_string()),
    ]
}

/// A `docker add` mapping in one of its valid forms.
fn port_spec_text() -> impl Strategy<Value = String> {
    let port = 1u16..=65535;
    let proto = prop_oneof![Just(""), Just("/tcp"), Just("/udp"), Just("/UDP")];
    prop_oneof![
        (port.clone(), proto.clone()).prop_map(|(p, pr)| format!("{p}{pr}")),
        (port.clone(), port.clone(), proto.clone()).prop_map(|(h, c, pr)| format!("{h}:{c}{pr}")),
        (host_ipv4(), port.clone(), port.clone(), proto.clone())
            .prop_map(|(ip, h, c, pr)| format!("{ip}:{h}:{c}{pr}")),
        (host_ipv6(), port.clone(), port.clone(), proto.clone())
            .prop_map(|(ip, h, c, pr)| format!("[{ip}]:{h}:{c}{pr}")),
        (port.clone(), host_ipv4(), port.clone(), proto.clone())
            .prop_map(|(h, ip, c, pr)| format!("{h}:{ip}:{c}{pr}")),
        (port.clone(), host_ipv6(), port, proto)
            .prop_map(|(h, ip, c, pr)| format!("{h}:[{ip}]:{c}{pr}")),
    ]
}

/// A structurally valid request that changes something (what `dry_run` wraps).
fn valid_change_request() -> BoxedStrategy<Value> {
    let delete = any::<bool>();
    prop_oneof![
        (host_pair(), port_list_text(), proto_name(), proptest::option::of(if_name()), delete)
            .prop_map(|((e, i), (ports, _), proto, ext_if, delete)| {
                json!({"cmd":"dnat","ext_ip":e,"int_ip":i,"ports":ports,"proto":proto,"ext_if":ext_if,"delete":delete})
            }),
        (host_pair(), if_name(), delete).prop_map(|((e, i), ext_if, delete)| {
            json!({"cmd":"snat","int_ip":i,"ext_if":ext_if,"ext_ip":e,"delete":delete})
        }),
        (host_pair(), port_list_text(), proto_name(), proptest::option::of(network_text()), delete)
            .prop_map(|((e, i), (ports, _), proto, int_net, delete)| {
                json!({"cmd":"hairpin","ext_ip":e,"int_ip":i,"ports":ports,"proto":proto,"int_net":int_net,"delete":delete})
            }),
        (host_pair(), any::<u32>(), delete).prop_map(|((src, via), table, delete)| {
            json!({"cmd":"policy_route","src_ip":src,"via":via,"table":table,"delete":delete})
        }),
        any::<bool>().prop_map(|ipv6| json!({"cmd":"fwd","ipv6":ipv6})),
        Just(json!({"cmd":"clear"})),
        (proptest::option::of(container_ref()), proptest::option::of(container_ref()), port_spec_text(), proptest::option::of(container_ref()))
            .prop_map(|(container, name, mapping, network)| {
                json!({"cmd":"docker_add","container":container,"name":name,"mapping":mapping,"network":network})
            }),
        (proptest::option::of(container_ref()), proptest::option::of(container_ref()), proptest::option::of(1u16..), proptest::option::of(proto_name()), proptest::option::of(any::<u64>()))
            .prop_map(|(container, name, host_port, proto, id)| {
                json!({"cmd":"docker_rm","container":container,"name":name,"host_port":host_port,"proto":proto,"id":id})
            }),
        (container_ref(), any::<u16>(), any::<u16>(), proptest::option::of(proto_name()))
            .prop_map(|(container, old_port, new_port, proto)| {
                json!({"cmd":"docker_remap","container":container,"old_port":old_port,"new_port":new_port,"proto":proto})
            }),
    ]
    .boxed()
}

/// A rule of an `apply` document (the stored form of a rule).
fn document_rule() -> BoxedStrategy<Value> {
    prop_oneof![
        (host_pair(), port_list_text(), proto_name(), proptest::option::of(if_name()))
            .prop_map(|((e, i), (ports, _), proto, ext_if)| {
                json!({"kind":"dnat","ext_ip":e,"int_ip":i,"ports":ports,"proto":proto,"ext_if":ext_if})
            }),
        (host_pair(), if_name()).prop_map(|((e, i), ext_if)| {
            json!({"kind":"snat","source":i,"ext_if":ext_if,"ext_ip":e})
        }),
    ]
    .boxed()
}

/// A structurally valid request object of any kind.
fn valid_request() -> BoxedStrategy<Value> {
    prop_oneof![
        4 => valid_change_request(),
        1 => valid_change_request().prop_map(|inner| json!({"cmd":"dry_run","request":inner})),
        1 => (proptest::option::of("[ -~]{0,128}"), any::<bool>())
            .prop_map(|(filter, counters)| json!({"cmd":"ls","filter":filter,"counters":counters})),
        1 => (proptest::collection::vec(document_rule(), 0..4), any::<bool>())
            .prop_map(|(rules, dry_run)| json!({"cmd":"apply","document":{"schema_version":1,"rules":rules},"dry_run":dry_run})),
        1 => prop_oneof![
            Just("ping"), Just("status"), Just("export"), Just("save"), Just("reload")
        ]
        .prop_map(|cmd| json!({ "cmd": cmd })),
    ]
    .boxed()
}

/// Any JSON value, nested a few levels.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        hostile_string().prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::from),
            proptest::collection::btree_map(hostile_string(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn envelope_line(request: &Value) -> Vec<u8> {
    let mut line =
        serde_json::to_vec(&json!({"version": PROTOCOL_VERSION, "request": request})).unwrap();
    line.push(b'\n');
    line
}

/// Text that may safely follow an iptables option: no whitespace, quotes,
/// control characters, `!`, and no leading `-`.
fn iptables_safe(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with('-')
        && s.chars()
            .all(|c| c.is_ascii_graphic() && !matches!(c, '"' | '\'' | '!' | '\\'))
}

// ───────────────────────────── argument parsers ─────────────────────────────

#[test]
fn port_list_never_panics_names_the_field_and_round_trips() {
    fuzz("PortList(arbitrary text)", hostile_string(), |s| {
        match s.parse::<PortList>() {
            Err(e) => prop_assert!(e.to_string().contains("ports"), "{s:?}: {e}"),
            Ok(list) => {
                let shown = list.to_string();
                prop_assert!(
                    shown
                        .chars()
                        .all(|c| c.is_ascii_digit() || c == ',' || c == '-'),
                    "{shown}"
                );
                prop_assert_eq!(shown.parse::<PortList>().unwrap(), list.clone());
                prop_assert!(
                    list.count() >= 1 && list.count() <= natmap::model::MAX_PORTS_PER_RULE
                );
            }
        }
        Ok(())
    });
    fuzz(
        "PortList(valid spellings)",
        port_list_text(),
        |(text, ranges)| {
            let list: PortList = text
                .parse()
                .map_err(|e| TestCaseError::fail(format!("{text}: {e}")))?;
            let mut want: Vec<u16> = ranges.iter().flat_map(|(a, b)| *a..=*b).collect();
            want.sort();
            want.dedup();
            prop_assert_eq!(list.iter().collect::<Vec<_>>(), want, "{}", text);
            prop_assert_eq!(list.to_string().parse::<PortList>().unwrap(), list.clone());
            let json = serde_json::to_string(&list).unwrap();
            prop_assert_eq!(serde_json::from_str::<PortList>(&json).unwrap(), list);
            Ok(())
        },
    );
}

#[test]
fn host_ip_and_network_never_panic_name_the_field_and_round_trip() {
    fuzz("HostIp(arbitrary text)", hostile_string(), |s| {
        match HostIp::parse_field("ext_ip", &s) {
            Err(e) => prop_assert!(e.to_string().contains("ext_ip"), "{e}"),
            Ok(ip) => {
                prop_assert_eq!(ip.to_string().parse::<HostIp>().unwrap(), ip);
                prop_assert!(iptables_safe(&ip.as_match()), "{}", ip.as_match());
            }
        }
        Ok(())
    });
    fuzz("HostIp(any address)", any::<IpAddr>(), |addr| {
        let bad = match addr {
            IpAddr::V4(v4) => {
                v4.is_loopback() || v4.is_multicast() || v4.is_broadcast() || v4.is_unspecified()
            }
            IpAddr::V6(v6) => {
                v6.is_loopback()
                    || v6.is_multicast()
                    || v6.is_unspecified()
                    || v6.to_ipv4_mapped().is_some()
            }
        };
        match HostIp::parse_field("int_ip", &addr.to_string()) {
            Ok(ip) => {
                prop_assert!(!bad, "{addr} accepted");
                prop_assert_eq!(ip.ip(), addr);
                prop_assert_eq!(ip.to_string().parse::<HostIp>().unwrap(), ip);
                let json = serde_json::to_string(&ip).unwrap();
                prop_assert_eq!(serde_json::from_str::<HostIp>(&json).unwrap(), ip);
            }
            Err(e) => {
                prop_assert!(bad, "{addr} refused: {e}");
                prop_assert!(e.to_string().contains("int_ip"));
            }
        }
        Ok(())
    });
    fuzz("Network(arbitrary text)", hostile_string(), |s| {
        match Network::parse_field("int_net", &s) {
            Err(e) => prop_assert!(e.to_string().contains("int_net"), "{e}"),
            Ok(n) => {
                prop_assert_eq!(n.to_string().parse::<Network>().unwrap(), n);
                prop_assert!(iptables_safe(&n.to_string()), "{}", n);
            }
        }
        Ok(())
    });
    fuzz("Network(valid)", network_text(), |s| {
        let n =
            Network::parse_field("int_net", &s).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let addr: IpAddr = s.split('/').next().unwrap().parse().unwrap();
        prop_assert!(n.contains(&addr), "{n} does not contain {addr}");
        prop_assert_eq!(n.to_string().parse::<Network>().unwrap(), n);
        let json = serde_json::to_string(&n).unwrap();
        prop_assert_eq!(serde_json::from_str::<Network>(&json).unwrap(), n);
        Ok(())
    });
}

#[test]
fn interface_names_are_safe_and_round_trip() {
    fuzz(
        "IfName(arbitrary and near-valid text)",
        prop_oneof![hostile_string(), "[A-Za-z0-9._@+!:/ -]{0,17}"],
        |s| {
            match s.parse::<IfName>() {
                Err(e) => prop_assert!(e.to_string().contains("interface"), "{e}"),
                Ok(name) => {
                    let n = name.as_str();
                    prop_assert!((1..=15).contains(&n.len()), "{n:?}");
                    prop_assert!(n != "." && n != "..");
                    prop_assert!(!n.contains(['/', ':']) && iptables_safe(n), "{n:?}");
                    prop_assert_eq!(name.to_string().parse::<IfName>().unwrap(), name.clone());
                }
            }
            Ok(())
        },
    );
    fuzz("IfName(valid)", if_name(), |s| {
        let name: IfName = s
            .parse()
            .map_err(|e: natmap::model::ParseError| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(name.as_str(), s.as_str());
        Ok(())
    });
}

#[test]
fn container_refs_and_port_specs_never_panic_and_round_trip() {
    fuzz(
        "ContainerRef(arbitrary text)",
        prop_oneof![hostile_string(), "/?[a-zA-Z0-9_./ -]{0,130}"],
        |s| {
            match s.parse::<ContainerRef>() {
                Err(e) => prop_assert!(e.to_string().contains("container"), "{e}"),
                Ok(c) => {
                    prop_assert!(
                        iptables_safe(c.as_str()) && c.as_str().len() <= 128,
                        "{c:?}"
                    );
                    prop_assert_eq!(c.to_string().parse::<ContainerRef>().unwrap(), c.clone());
                }
            }
            Ok(())
        },
    );
    fuzz("ContainerRef(valid)", container_ref(), |s| {
        let c: ContainerRef = s
            .parse()
            .map_err(|e: natmap::model::ParseError| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(c.as_str(), s.as_str());
        Ok(())
    });
    fuzz(
        "PortSpec(arbitrary text)",
        prop_oneof![
            hostile_string(),
            "[0-9:./\\[\\]a-f]{0,30}(/(tcp|udp|TCP|x))?"
        ],
        |s| {
            match s.parse::<PortSpec>() {
                Err(e) => prop_assert!(e.to_string().contains("mapping"), "{e}"),
                Ok(spec) => {
                    prop_assert!(spec.host_port >= 1 && spec.target_port >= 1);
                    prop_assert_eq!(spec.to_string().parse::<PortSpec>().unwrap(), spec.clone());
                }
            }
            Ok(())
        },
    );
    fuzz("PortSpec(valid forms)", port_spec_text(), |s| {
        let spec: PortSpec = s
            .parse()
            .map_err(|e: natmap::model::ParseError| TestCaseError::fail(format!("{s}: {e}")))?;
        let shown = spec.to_string();
        prop_assert_eq!(
            shown.parse::<PortSpec>().unwrap(),
            spec.clone(),
            "{} → {}",
            s,
            shown
        );
        let json = serde_json::to_string(&spec).unwrap();
        prop_assert_eq!(serde_json::from_str::<PortSpec>(&json).unwrap(), spec);
        Ok(())
    });
    fuzz("Proto(arbitrary text)", hostile_string(), |s| {
        match s.parse::<Proto>() {
            Err(e) => prop_assert!(e.to_string().contains("proto"), "{e}"),
            Ok(p) => prop_assert_eq!(p.to_string().parse::<Proto>().unwrap(), p),
        }
        Ok(())
    });
}

// ───────────────────────────── the request parser ─────────────────────────────

/// Checks an error response's shape: ok false, a code, a non-empty message.
fn check_error(resp: &natmap::proto::Response) -> Result<ErrorCode, TestCaseError> {
    prop_assert!(!resp.ok);
    let error = resp
        .error
        .as_ref()
        .ok_or_else(|| TestCaseError::fail("error response without error"))?;
    prop_assert!(!error.message.is_empty());
    // The response itself serializes to one line.
    let line = serde_json::to_string(resp).unwrap();
    prop_assert!(!line.contains('\n'));
    Ok(error.code)
}

#[test]
fn parse_request_never_panics_on_arbitrary_bytes() {
    fuzz(
        "parse_request(arbitrary bytes)",
        proptest::collection::vec(any::<u8>(), 0..2048),
        |bytes| {
            if let Err(resp) = parse_request(&bytes) {
                check_error(&resp)?;
            }
            Ok(())
        },
    );
    fuzz(
        "parse_request(JSON-ish bytes)",
        proptest::collection::vec(
            prop_oneof![
                Just(b"{".to_vec()),
                Just(b"}".to_vec()),
                Just(b"[".to_vec()),
                Just(b"]".to_vec()),
                Just(b"\"version\":1,".to_vec()),
                Just(b"\"request\":".to_vec()),
                Just(b"\"cmd\":\"dnat\"".to_vec()),
                Just(b"\"ports\":\"25\"".to_vec()),
                Just(b",".to_vec()),
                Just(b":".to_vec()),
                Just(b"\\u0000".to_vec()),
                Just(b"\\ud800".to_vec()),
                Just(vec![0xff]),
                Just(vec![0]),
                Just(b"1e999".to_vec()),
                Just(b"-0".to_vec()),
            ],
            0..64,
        )
        .prop_map(|parts| parts.concat()),
        |bytes| {
            if let Err(resp) = parse_request(&bytes) {
                check_error(&resp)?;
            }
            Ok(())
        },
    );
    fuzz(
        "parse_request(any JSON envelope)",
        (any_json(), any_json()),
        |(version, request)| {
            let line =
                serde_json::to_vec(&json!({"version": version, "request": request})).unwrap();
            if let Err(resp) = parse_request(&line) {
                check_error(&resp)?;
            }
            Ok(())
        },
    );
}

#[test]
fn valid_requests_parse_and_round_trip() {
    fuzz(
        "parse_request(valid requests)",
        valid_request(),
        |request| {
            let line = envelope_line(&request);
            let parsed = parse_request(&line)
                .map_err(|r| TestCaseError::fail(format!("{request} refused: {:?}", r.error)))?;
            // Serialize what was understood, parse again: the same request.
            let again = serde_json::to_vec(&Envelope {
                version: PROTOCOL_VERSION,
                request: parsed.clone(),
            })
            .unwrap();
            let reparsed = parse_request(&again).map_err(|r| {
                TestCaseError::fail(format!(
                    "{} refused: {:?}",
                    String::from_utf8_lossy(&again),
                    r.error
                ))
            })?;
            prop_assert_eq!(reparsed, parsed);
            Ok(())
        },
    );
}

#[test]
fn a_mutated_field_is_refused_by_name_or_understood() {
    let mutation = prop_oneof![
        3 => any_json().prop_map(Some),
        3 => hostile_string().prop_map(|s| Some(Value::from(s))),
        1 => Just(None), // the field removed
    ];
    fuzz(
        "parse_request(valid request, one field mutated)",
        (valid_request(), any::<prop::sample::Index>(), mutation),
        |(request, which, value)| {
            let mut request = request;
            let fields: Vec<String> = request.as_object().unwrap().keys().cloned().collect();
            let field = fields[which.index(fields.len())].clone();
            match &value {
                Some(v) => request[&field] = v.clone(),
                None => {
                    request.as_object_mut().unwrap().remove(&field);
                }
            }
            match parse_request(&envelope_line(&request)) {
                Ok(parsed) => {
                    // Accepted: it must round-trip like any valid request.
                    let again = serde_json::to_vec(&Envelope {
                        version: PROTOCOL_VERSION,
                        request: parsed.clone(),
                    })
                    .unwrap();
                    prop_assert_eq!(parse_request(&again).ok(), Some(parsed));
                }
                Err(resp) => {
                    let code = check_error(&resp)?;
                    prop_assert!(
                        matches!(code, ErrorCode::InvalidRequest | ErrorCode::InvalidArgument),
                        "{code:?}"
                    );
                    let message = &resp.error.as_ref().unwrap().message;
                    prop_assert!(
                        message.contains(field.as_str()),
                        "mutating {} to {:?} gave an error that does not name it: {}",
                        field,
                        value,
                        message
                    );
                }
            }
            Ok(())
        },
    );
}

// ───────────────────────────── regressions ─────────────────────────────
// Inputs found by the properties above that once showed a bug.
