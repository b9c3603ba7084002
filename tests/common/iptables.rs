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
/// with iptables' message.
pub fn try_iptables_rules(
    ns: &Netns,
    v6: bool,
    table: &str,
    chain: &str,
) -> Result<Vec<String>, String> {
    let out = ns.exec(&[iptables_bin(v6), "-w", "10", "-t", table, "-S", chain]);
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect())
    } else {
        Err(format!(
            "[netns {}] {} -t {table} -S {chain}: {}",
            ns.name,
            iptables_bin(v6),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
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
/// (`nat -A NATMAP …`), read with `program` (`iptables`, `ip6tables`,
/// `iptables-legacy`, …). A missing chain contributes nothing.
pub fn natmap_lines_with(ns: &Netns, program: &str) -> Vec<String> {
    let mut lines = Vec::new();
    for (table, chain) in NATMAP_TABLE_CHAINS {
        let out = ns.exec(&[program, "-w", "10", "-t", table, "-S", chain]);
        if !out.status.success() {
            continue;
        }
        for line in String::from_utf8_lossy(&out.stdout).lines() {
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
