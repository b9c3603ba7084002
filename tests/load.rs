//! Load: 50 concurrent clients × 100 requests (mixed dnat add, delete and
//! ls, one connection per request like the CLI) against one daemon in a
//! network namespace. Asserts zero lost acknowledgements (every add
//! answered ok is in the final state unless its client deleted it later,
//! every acknowledged delete is absent), that the kernel holds exactly what
//! the state renders, and a clean daemon log; prints p50/p99 latency and
//! throughput for docs/reliability.md without asserting on timing.
//!
//! `cargo test --test load -- --nocapture` shows the figures.

pub mod common;

use std::io::Write;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::json;

use common::*;

const CLIENTS: usize = 50;
const REQUESTS_PER_CLIENT: usize = 100;
const PORTS_PER_CLIENT: u16 = 20;
/// The whole run stops sending after this, whatever is left (bounded run).
const RUN_LIMIT: Duration = Duration::from_secs(240);

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Op {
    Add,
    Delete,
    Ls,
}

fn report(line: &str) {
    let _ = writeln!(std::io::stderr(), "[load] {line}");
}

#[test]
fn fifty_clients_times_one_hundred_requests_lose_no_acknowledgement() {
    if !privileged() {
        return;
    }
    let ns = bare_router();
    let d = Daemon::start_with_options(&ns, &StateDir::new(), DaemonOptions::isolated());
    let socket = d.socket_path();
    let mut rng = TestRng::from_env("load");
    let mut rngs: Vec<TestRng> = (0..CLIENTS).map(|_| rng.fork()).collect();
    let mut ledgers = vec![AckLedger::default(); CLIENTS];
    let samples = Mutex::new(Vec::<(Op, Duration)>::new());
    let problems = Mutex::new(Vec::<String>::new());
    let started = Instant::now();
    let deadline = started + RUN_LIMIT;

    std::thread::scope(|s| {
        for (c, (ledger, rng)) in ledgers.iter_mut().zip(rngs.iter_mut()).enumerate() {
            let (socket, samples, problems) = (&socket, &samples, &problems);
            s.spawn(move || {
                let proto = if c % 2 == 0 { "tcp" } else { "udp" };
                let mut mine = Vec::with_capacity(REQUESTS_PER_CLIENT);
                for _ in 0..REQUESTS_PER_CLIENT {
                    if Instant::now() > deadline {
                        break;
                    }
                    let port = 40000
                        + c as u16 * PORTS_PER_CLIENT
                        + rng.below(PORTS_PER_CLIENT as u64) as u16;
                    let roll = rng.below(10);
                    let op = match (roll, ledger.expect(port, proto)) {
                        (0..=2, _) => Op::Ls,
                        (_, Presence::Present) if roll < 8 => Op::Delete,
                        (_, Presence::Absent) if roll < 5 => Op::Delete,
                        _ => Op::Add,
                    };
                    let request = match op {
                        Op::Ls => json!({"cmd": "ls"}),
                        Op::Add => dnat_request(
                            "192.0.2.1",
                            "198.51.100.2",
                            &port.to_string(),
                            proto,
                            false,
                        ),
                        Op::Delete => dnat_request(
                            "192.0.2.1",
                            "198.51.100.2",
                            &port.to_string(),
                            proto,
                            true,
                        ),
                    };
                    let t = Instant::now();
                    let answer =
                        SocketClient::connect(socket).and_then(|mut conn| conn.call(&request));
                    let took = t.elapsed();
                    mine.push((op, took));
                    let answer = match answer {
                        Ok(a) => a,
                        Err(e) => {
                            problems
                                .lock()
                                .unwrap()
                                .push(format!("client {c}: {op:?} {port}: {e}"));
                            break;
                        }
                    };
                    let outcome = match op {
                        Op::Ls => {
                            if answer["ok"] != true {
                                Err(format!("ls failed: {answer}"))
                            } else {
                                Ok(())
                            }
                        }
                        _ => ledger.record(port, proto, op == Op::Delete, Some(&answer)),
                    };
                    if let Err(e) = outcome {
                        problems.lock().unwrap().push(format!("client {c}: {e}"));
                    }
                }
                samples.lock().unwrap().extend(mine);
            });
        }
    });
    let elapsed = started.elapsed();
    let problems = problems.into_inner().unwrap();
    assert!(
        problems.is_empty(),
        "{} problems: {:#?}",
        problems.len(),
        &problems[..problems.len().min(20)]
    );

    // Zero lost acknowledgements: the final state is exactly what the
    // answers said, and the kernel holds exactly what the state renders.
    // state.json with its journal replayed: what the daemon committed.
    let state = natmap::state::read_current(&d.state_path()).unwrap();
    let keys = state_dnat_keys(&state);
    let mut lost = Vec::new();
    for (c, ledger) in ledgers.iter_mut().enumerate() {
        let lo = 40000 + c as u16 * PORTS_PER_CLIENT;
        let theirs = keys
            .keys()
            .filter(|(p, _)| (lo..lo + PORTS_PER_CLIENT).contains(p))
            .cloned()
            .collect();
        lost.extend(
            ledger
                .reconcile(&theirs)
                .into_iter()
                .map(|m| format!("client {c}: {m}")),
        );
    }
    assert!(lost.is_empty(), "{lost:#?}");
    // `save` folds the journal into state.json, which the check reads.
    assert_eq!(d.call(json!({"cmd": "save"}))["ok"], true);
    assert_eq!(
        read_state(&d.state_path()),
        state,
        "save wrote what was journaled"
    );
    assert_kernel_matches_state(&ns, &d, "iptables", "ip6tables");
    d.assert_clean_log();

    let samples = samples.into_inner().unwrap();
    let total = samples.len();
    let acks: u64 = ledgers.iter().map(|l| l.acks).sum();
    let refusals: u64 = ledgers.iter().map(|l| l.refusals).sum();
    report(&format!(
        "{CLIENTS} clients x {REQUESTS_PER_CLIENT} requests: {total} requests in {:.2} s = {:.0} req/s; \
         {acks} changes acknowledged, {refusals} answered not_found, 0 lost; {} rules at the end",
        elapsed.as_secs_f64(),
        total as f64 / elapsed.as_secs_f64(),
        state.rules.len()
    ));
    for (name, filter) in [
        ("all", None),
        ("add", Some(Op::Add)),
        ("delete", Some(Op::Delete)),
        ("ls", Some(Op::Ls)),
    ] {
        let mut lat: Vec<Duration> = samples
            .iter()
            .filter(|(op, _)| filter.is_none_or(|f| *op == f))
            .map(|(_, d)| *d)
            .collect();
        lat.sort();
        report(&format!(
            "{name:>6}: n={:>5} p50={:>8.2?} p99={:>8.2?} max={:>8.2?}",
            lat.len(),
            percentile(&lat, 50.0),
            percentile(&lat, 99.0),
            lat.last().copied().unwrap_or_default()
        ));
    }
    assert!(total > 0);
}
