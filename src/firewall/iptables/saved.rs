//! What `iptables-save` showed: parsed just enough to find natmap's chains and
//! the jumps to them, never to edit anyone else's rules.

use std::collections::{BTreeMap, BTreeSet};

use super::{Chain, FamilyRules, KernelChain, DOCKER_USER};

/// One table of an `iptables-save` dump.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SavedTable {
    /// Every chain declared in the table.
    pub chains: BTreeSet<String>,
    /// The policy of each built-in chain (`ACCEPT`, `DROP`).
    pub policies: BTreeMap<String, String>,
    /// The lines of each chain (what follows `-A <chain> `), in order.
    pub rules: BTreeMap<String, Vec<String>>,
}

/// A parsed `iptables-save` (or `ip6tables-save`) dump of every table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SavedTables {
    tables: BTreeMap<String, SavedTable>,
}

impl SavedTables {
    /// Parses `iptables-save` output. Unknown lines are ignored: this reads
    /// iptables' own output, and only natmap's chains and hooks matter.
    pub fn parse(text: &str) -> SavedTables {
        let mut tables: BTreeMap<String, SavedTable> = BTreeMap::new();
        let mut current: Option<String> = None;
        for line in text.lines() {
            let line = line.trim_end();
            if let Some(name) = line.strip_prefix('*') {
                current = Some(name.to_owned());
                tables.entry(name.to_owned()).or_default();
                continue;
            }
            let Some(table) = current.as_ref().and_then(|t| tables.get_mut(t)) else {
                continue;
            };
            if let Some(decl) = line.strip_prefix(':') {
                let mut words = decl.split_whitespace();
                if let Some(chain) = words.next() {
                    table.chains.insert(chain.to_owned());
                    if let Some(policy) = words.next().filter(|p| *p != "-") {
                        table.policies.insert(chain.to_owned(), policy.to_owned());
                    }
                }
            } else if let Some(rest) = line.strip_prefix("-A ") {
                let (chain, args) = rest.split_once(' ').unwrap_or((rest, ""));
                table
                    .rules
                    .entry(chain.to_owned())
                    .or_default()
                    .push(normalize(args));
            } else if line == "COMMIT" {
                current = None;
            }
        }
        SavedTables { tables }
    }

    /// Whether the table exists in the dump (IPv6 `nat` may be missing).
    pub fn has_table(&self, table: &str) -> bool {
        self.tables.contains_key(table)
    }

    /// The policy of built-in `chain` in `table` (`ACCEPT`, `DROP`), if
    /// the dump shows one.
    pub fn policy(&self, table: &str, chain: &str) -> Option<&str> {
        self.tables
            .get(table)
            .and_then(|t| t.policies.get(chain))
            .map(String::as_str)
    }

    /// Whether `chain` exists in `table`.
    pub fn has_chain(&self, table: &str, chain: &str) -> bool {
        self.tables
            .get(table)
            .is_some_and(|t| t.chains.contains(chain))
    }

    /// The lines of `chain` in `table` (empty if it has none or does not exist).
    pub fn chain_rules(&self, table: &str, chain: &str) -> &[String] {
        self.tables
            .get(table)
            .and_then(|t| t.rules.get(chain))
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    /// The shard chains of natmap's sharded chains that `table` holds, by
    /// name (whether natmap wants them now or not).
    pub fn shard_chains(&self, table: &str) -> Vec<String> {
        self.tables.get(table).map_or_else(Vec::new, |t| {
            t.chains
                .iter()
                .filter(|name| {
                    Chain::ALL
                        .iter()
                        .any(|c| c.table() == table && c.is_shard_name(name))
                })
                .cloned()
                .collect()
        })
    }

    /// How many rules of `table`, in any chain, jump or go to `target`.
    pub fn references(&self, table: &str, target: &str) -> usize {
        let (jump, goto) = (format!("-j {target}"), format!("-g {target}"));
        self.tables.get(table).map_or(0, |t| {
            t.rules
                .values()
                .flatten()
                .filter(|l| l.ends_with(&jump) || l.ends_with(&goto))
                .count()
        })
    }

    /// How many times `hook` jumps to `target`, and whether the first line of
    /// `hook` is such a jump.
    pub fn jump_state(&self, table: &str, hook: &str, target: &str) -> JumpState {
        let jump = jump_line(target);
        let lines = self.chain_rules(table, hook);
        JumpState {
            count: lines.iter().filter(|l| **l == jump).count(),
            first: lines.first().is_some_and(|l| *l == jump),
        }
    }

    /// Why the kernel's natmap chains differ from `expected`, one reason a
    /// line; empty when they match exactly (rules, order, hooks).
    pub fn drift(&self, expected: &FamilyRules) -> Vec<String> {
        self.drift_kinds(expected)
            .into_iter()
            .map(|(_, reason)| reason)
            .collect()
    }

    /// Whether the only difference from `expected` is that another
    /// program put rules above natmap's hooks (each hook still there,
    /// once): the chains themselves are intact.
    pub fn hooks_displaced_only(&self, expected: &FamilyRules) -> bool {
        let kinds = self.drift_kinds(expected);
        !kinds.is_empty() && kinds.iter().all(|(displaced, _)| *displaced)
    }

    /// [`SavedTables::drift`], each reason marked `true` when it is a hook
    /// that is no longer first (and nothing else about it is wrong).
    fn drift_kinds(&self, expected: &FamilyRules) -> Vec<(bool, String)> {
        let mut reasons = self.chain_drift(&expected.kernel());
        reasons.extend(self.hook_drift());
        reasons
    }

    /// How natmap's chains (parents and shards) differ from `kernel`, what
    /// they should be: missing, different, or a shard left over.
    fn chain_drift(&self, kernel: &[KernelChain<'_>]) -> Vec<(bool, String)> {
        let mut reasons: Vec<(bool, String)> = Vec::new();
        // Missing shards are one reason per parent: after `iptables -X`
        // of a table they are all gone at once.
        let mut missing: BTreeMap<(&str, &str), (usize, String)> = BTreeMap::new();
        for kc in kernel {
            let (table, name) = (kc.table, kc.name.as_str());
            if !self.has_chain(table, name) {
                if kc.parent {
                    reasons.push((false, format!("{table} chain {name} is missing")));
                } else {
                    missing
                        .entry((table, kc.chain.name()))
                        .or_insert_with(|| (0, name.to_owned()))
                        .0 += 1;
                }
            } else if !same_lines(self.chain_rules(table, name), &kc.lines) {
                reasons.push((
                    false,
                    format!("{table} chain {name} differs from natmap's rules"),
                ));
            }
        }
        for ((table, parent), (n, first)) in missing {
            reasons.push((
                false,
                format!("{n} shard(s) of {table} chain {parent} are missing (first {first})"),
            ));
        }
        for table in super::TABLES {
            for name in self.shard_chains(table) {
                if !kernel.iter().any(|c| c.table == table && c.name == name) {
                    reasons.push((false, format!("{table} chain {name} is left over")));
                }
            }
        }
        reasons
    }

    /// How the hooks into natmap's chains differ from one first jump each
    /// (marked `true` when a single jump is only no longer first), and
    /// FORWARD's jump to DOCKER-USER.
    fn hook_drift(&self) -> Vec<(bool, String)> {
        let mut reasons: Vec<(bool, String)> = Vec::new();
        for chain in Chain::ALL {
            let (table, name) = (chain.table(), chain.name());
            if !self.has_chain(table, name) {
                continue;
            }
            let hook = chain.hook();
            let jump = self.jump_state(table, hook, name);
            if jump.count == 0 {
                reasons.push((false, format!("{table} {hook} lost its jump to {name}")));
            } else if !jump.first {
                reasons.push((
                    jump.count == 1,
                    format!("{table} {hook}'s jump to {name} is no longer its first rule"),
                ));
            } else if jump.count > 1 {
                reasons.push((
                    false,
                    format!("{table} {hook} has {} jumps to {name}", jump.count),
                ));
            }
        }
        if self.has_chain("filter", DOCKER_USER)
            && self.jump_state("filter", "FORWARD", DOCKER_USER).count == 0
        {
            reasons.push((false, "filter FORWARD does not jump to DOCKER-USER".into()));
        }
        if self
            .jump_state("filter", "FORWARD", Chain::FilterForward.name())
            .count
            > 0
        {
            reasons.push((
                false,
                "filter FORWARD jumps to NATMAP directly (a boot fragment)".into(),
            ));
        }
        reasons
    }
}

impl SavedTables {
    /// What the kernel holds of natmap's chains and of the chains that hook
    /// them, without counters: two dumps with equal fingerprints show the
    /// same natmap rules and hooks. Used to tell "nobody changed anything
    /// since natmap's last repair" from a new outside change.
    pub fn fingerprint(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut chains: Vec<(&str, String)> = Vec::new();
        for chain in Chain::ALL {
            chains.push((chain.table(), chain.name().to_owned()));
            chains.push((chain.table(), chain.hook().to_owned()));
        }
        for table in super::TABLES {
            chains.extend(self.shard_chains(table).into_iter().map(|n| (table, n)));
        }
        chains.push(("filter", "FORWARD".to_owned()));
        chains.sort_unstable();
        chains.dedup();
        for (table, name) in chains {
            let present = self.has_chain(table, &name);
            out.push(format!("{table} {name} present={present}"));
            out.extend(self.chain_rules(table, &name).iter().cloned());
        }
        out
    }

    /// The first line where natmap's chains in the kernel differ from
    /// `expected`, for a message an operator can act on: `nat chain
    /// NATMAP-POSTROUTING line 1: natmap wrote "…", iptables prints "…"`.
    pub fn first_difference(&self, expected: &FamilyRules) -> Option<String> {
        let kernel = expected.kernel();
        for kc in &kernel {
            let (table, name) = (kc.table, kc.name.as_str());
            let found = self.chain_rules(table, name);
            let wanted = &kc.lines;
            let n = found.len().max(wanted.len());
            for i in 0..n {
                let (w, f) = (
                    wanted.get(i).map(|l| l.as_ref()),
                    found.get(i).map(String::as_str),
                );
                if w != f {
                    let show =
                        |l: Option<&str>| l.map_or("nothing".to_owned(), |l| format!("\"{l}\""));
                    return Some(format!(
                        "{table} chain {name} line {}: natmap wrote {}, iptables prints {}",
                        i + 1,
                        show(w),
                        show(f)
                    ));
                }
            }
        }
        for table in super::TABLES {
            for name in self.shard_chains(table) {
                if !kernel.iter().any(|c| c.table == table && c.name == name) {
                    return Some(format!(
                        "{table} chain {name}: natmap wrote no such chain, iptables has it"
                    ));
                }
            }
        }
        None
    }
}

/// Whether the lines `iptables-save` showed are exactly `expected`.
fn same_lines(found: &[String], expected: &[std::borrow::Cow<'_, str>]) -> bool {
    found.len() == expected.len() && found.iter().zip(expected).all(|(f, e)| f == e)
}

/// Where a hook's jump stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JumpState {
    /// Number of identical jumps in the hook chain.
    pub count: usize,
    /// Whether the hook's first line is the jump.
    pub first: bool,
}

/// The line of a plain jump to `target`.
pub fn jump_line(target: &str) -> String {
    format!("-j {target}")
}

/// iptables quotes a comment in some versions and not in others; natmap's
/// comments never contain spaces, so dropping quotes makes them comparable.
fn normalize(args: &str) -> String {
    if args.contains("--comment \"natmap:") {
        args.replace('"', "")
    } else {
        args.to_owned()
    }
}
