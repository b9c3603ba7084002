//! Reading (and, for test setup, writing) iptables in a namespace,
//! natmap's own chains included.

use super::*;

/// `"iptables"` or `"ip6tables"`.
pub fn iptables_bin(v6: bool) -> &'static str {
    if v6 {
        "ip6tables"
    } else {
        "iptables"
    }
}

/// Runs `iptables -w 10 args…` (ip6tables for `v6`) in `ns`; panics on
/// failure, returns stdout. E.g. `iptables(&topo.router, false, &["-A", "FORWARD", "-j", "ACCEPT"])`.
pub fn iptables(ns: &Netns, v6: bool, args: &[&str]) -> String {
    let mut argv = vec![iptables_bin(v6), "-w", "10"];
    argv.extend_from_slice(args);
    ns.run_ok(&argv)
}

/// The lines of `iptables -w -t TABLE -S CHAIN` (policy line `-P …` or
/// `-N CHAIN` first, then the `-A` rules in order). Panics if the chain does
/// not exist; see [`try_iptables_rules`] / [`chain_exists`].
pub fn iptables_rules(ns: &Netns, v6: bool, table: &str, chain: &str) -> Vec<String> {
    try_iptables_rules(ns, v6, table, chain).unwrap_or_else(|e| panic!("{e}"))
}

/// Like [`iptables_rules`], but a missing chain (or any failure) is an `Err`
/// with iptables' message. A sharded natmap chain reads as one chain
/// ([`expand_shards`]).
pub fn try_iptables_rules(
    ns: &Netns,
    v6: bool,
    table: &str,
    chain: &str,
) -> Result<Vec<String>, String> {
    let out = ns.exec(&[iptables_bin(v6), "-w", "10", "-t", table, "-S", chain]);
    if out.status.success() {
        let lines = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect();
        Ok(expand_shards(table, chain, lines, || {
            read_whole_table(ns, iptables_bin(v6), table)
        }))
    } else {
        Err(format!(
            "[netns {}] {} -t {table} -S {chain}: {}",
            ns.name,
            iptables_bin(v6),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// The lines of a sharded natmap chain (nat `NATMAP`, `NATMAP-OUTPUT`,
/// filter `NATMAP`) as if its shards were one chain: each jump to one of
/// its shards is replaced by that shard's `-A` lines, renamed to the
/// parent (a shard jumped to twice, or a line in two shards because its
/// ports span both, counts once), and the lines are put back in rule id
/// order (the renderer's; each shard keeps its lines in that order, so a
/// stable sort by id restores it). A jump to a missing shard brings
/// nothing, so a lost shard or jump shows as missing lines. Any other
/// chain is returned as read. `read_table` gives `iptables -S` of the
/// whole table (one read, not one per shard).
pub fn expand_shards(
    table: &str,
    chain: &str,
    lines: Vec<String>,
    read_table: impl FnOnce() -> Vec<String>,
) -> Vec<String> {
    use natmap::firewall::iptables::Chain;
    let Some(parent) = Chain::ALL
        .into_iter()
        .find(|c| c.is_sharded() && c.table() == table && c.name() == chain)
    else {
        return lines;
    };
    let prefix = format!("-A {chain} ");
    let shard_of = |line: &str| -> Option<String> {
        let target = line.strip_prefix(&prefix)?.rsplit_once(" -j ")?.1;
        parent.is_shard_name(target).then(|| target.to_owned())
    };
    if !lines.iter().any(|l| shard_of(l).is_some()) {
        return lines;
    }
    let mut by_chain: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for l in read_table() {
        if let Some((name, rest)) = l.strip_prefix("-A ").and_then(|r| r.split_once(' ')) {
            if parent.is_shard_name(name) {
                by_chain
                    .entry(name.to_owned())
                    .or_default()
                    .push(rest.to_owned());
            }
        }
    }
    let (mut head, mut rules) = (Vec::new(), Vec::<String>::new());
    let mut seen = std::collections::BTreeSet::new();
    for line in lines {
        if !line.starts_with(&prefix) {
            head.push(line);
            continue;
        }
        match shard_of(&line) {
            Some(shard) => {
                for rest in by_chain.remove(&shard).into_iter().flatten() {
                    let folded = format!("{prefix}{rest}");
                    if seen.insert(folded.clone()) {
                        rules.push(folded);
                    }
                }
            }
            None => rules.push(line),
        }
    }
    rules.sort_by_key(|l| natmap_id(l));
    head.extend(rules);
    head
}

/// `PROGRAM -t TABLE -S`: every line of the table (empty on failure).
pub fn read_whole_table(ns: &Netns, program: &str, table: &str) -> Vec<String> {
    let out = ns.exec(&[program, "-w", "10", "-t", table, "-S"]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

/// The rule id in a line's `natmap:<kind>:<id>` comment (0 if none).
fn natmap_id(line: &str) -> u64 {
    line.split_once("natmap:")
        .and_then(|(_, rest)| rest.split_once(':'))
        .and_then(|(_, rest)| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// True if `chain` exists in `table`.
pub fn chain_exists(ns: &Netns, v6: bool, table: &str, chain: &str) -> bool {
    try_iptables_rules(ns, v6, table, chain).is_ok()
}

/// Only the `-A CHAIN …` lines of [`iptables_rules`] (no `-N`/`-P` line).
pub fn iptables_appended_rules(ns: &Netns, v6: bool, table: &str, chain: &str) -> Vec<String> {
    iptables_rules(ns, v6, table, chain)
        .into_iter()
        .filter(|l| l.starts_with("-A "))
        .collect()
}

/// The full `iptables-save` (`ip6tables-save`) output of `ns`.
pub fn iptables_save(ns: &Netns, v6: bool) -> String {
    ns.run_ok(&[if v6 {
        "ip6tables-save"
    } else {
        "iptables-save"
    }])
}

/// natmap's four chains, as `(table, chain)`, in the order the renderer uses.
pub const NATMAP_TABLE_CHAINS: [(&str, &str); 4] = [
    ("nat", "NATMAP"),
    ("nat", "NATMAP-OUTPUT"),
    ("nat", "NATMAP-POSTROUTING"),
    ("filter", "NATMAP"),
];

/// The `-A` lines of natmap's chains in `ns`, each prefixed with its table
/// (`nat -A NATMAP …`), shards folded into their parents
/// ([`expand_shards`]), read with `program` (`iptables`, `ip6tables`,
/// `iptables-legacy`, …). A missing chain contributes nothing.
pub fn natmap_lines_with(ns: &Netns, program: &str) -> Vec<String> {
    let mut lines = Vec::new();
    for (table, chain) in NATMAP_TABLE_CHAINS {
        let out = ns.exec(&[program, "-w", "10", "-t", table, "-S", chain]);
        if !out.status.success() {
            continue;
        }
        let found = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect();
        for line in expand_shards(table, chain, found, || read_whole_table(ns, program, table)) {
            if line.starts_with("-A ") {
                lines.push(format!("{table} {line}"));
            }
        }
    }
    lines
}

/// [`natmap_lines_with`] using `iptables` (or `ip6tables` for `v6`).
pub fn natmap_lines(ns: &Netns, v6: bool) -> Vec<String> {
    natmap_lines_with(ns, iptables_bin(v6))
}

/// natmap's rules in `ns` as `iptables -S` prints them: the `-A` lines of its
/// four chains, each prefixed with its table (`nat -A NATMAP …`). Chains that
/// do not exist contribute nothing. The same as [`natmap_lines`]; both names
/// are used by the tests.
pub fn natmap_rules(ns: &Netns, v6: bool) -> Vec<String> {
    natmap_lines(ns, v6)
}
