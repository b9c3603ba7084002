//! `iptables-restore --noflush` transactions.
//!
//! Declaring a chain (`:NAME - [0:0]`) in `--noflush` input creates it or
//! flushes it, and the whole input commits atomically, on iptables-nft and
//! iptables-legacy alike. So rewriting natmap's chains is one transaction, and
//! nothing outside them is flushed, reordered or looked up by line number.

use std::borrow::Cow;
use std::fmt::Write;

use super::saved::{jump_line, SavedTables};
use super::{Chain, FamilyRules, KernelChain, DOCKER_USER, TABLES};

/// Rewrites natmap's chains with `rules`, leaving hooks as they are.
/// The steady-state path once the hooks are known to be in place.
pub fn rewrite_chains(rules: &FamilyRules) -> String {
    build(rules, None)
}

/// Rewrites natmap's chains and puts every hook jump back in place: exactly one,
/// first in its hook chain. `saved` is what `iptables-save` showed just before.
/// Used at start, for recovery and for drift repair.
pub fn full(rules: &FamilyRules, saved: &SavedTables) -> String {
    build(rules, Some(saved))
}

fn build(rules: &FamilyRules, saved: Option<&SavedTables>) -> String {
    let kernel = rules.kernel();
    let mut out = String::new();
    for table in TABLES {
        let chains = table_chains(table);
        let here: Vec<&KernelChain<'_>> = kernel.iter().filter(|c| c.table == table).collect();
        // Shards the kernel has and `rules` no longer fill: declared (so
        // flushed) with the rest, and deleted once their parent, flushed
        // too, no longer jumps to them.
        let stale: Vec<String> = saved
            .map(|saved| {
                saved
                    .shard_chains(table)
                    .into_iter()
                    .filter(|name| !here.iter().any(|c| c.name == *name))
                    .collect()
            })
            .unwrap_or_default();
        let _ = writeln!(out, "*{table}");
        for chain in &here {
            let _ = writeln!(out, ":{} - [0:0]", chain.name);
        }
        for name in &stale {
            let _ = writeln!(out, ":{name} - [0:0]");
        }
        let docker_user_missing = table == "filter" && saved.is_some_and(creates_docker_user);
        if docker_user_missing {
            // Docker is absent: create its user chain ourselves so the layout is
            // the same on every host. Docker adopts an existing DOCKER-USER.
            let _ = writeln!(out, ":{DOCKER_USER} - [0:0]");
        }
        for chain in &here {
            for line in &chain.lines {
                let _ = writeln!(out, "-A {} {line}", chain.name);
            }
        }
        if let Some(saved) = saved {
            for chain in &chains {
                fix_jump(&mut out, saved, table, chain.hook(), chain.name());
            }
            if table == "filter" {
                fix_docker_user_hook(&mut out, saved);
            }
        }
        for name in &stale {
            let _ = writeln!(out, "-X {name}");
        }
        out.push_str("COMMIT\n");
    }
    out
}

/// natmap's logical chains in `table`.
fn table_chains(table: &str) -> Vec<Chain> {
    Chain::ALL
        .into_iter()
        .filter(|c| c.table() == table)
        .collect()
}

/// Makes `hook` jump to `target` exactly once, as its first rule.
fn fix_jump(out: &mut String, saved: &SavedTables, table: &str, hook: &str, target: &str) {
    let state = saved.jump_state(table, hook, target);
    if state.first && state.count == 1 {
        return;
    }
    let jump = jump_line(target);
    // `-D` by full spec deletes the first match: once per copy.
    for _ in 0..state.count {
        let _ = writeln!(out, "-D {hook} {jump}");
    }
    let _ = writeln!(out, "-I {hook} 1 {jump}");
}

/// FORWARD must reach DOCKER-USER. Docker keeps this jump itself; natmap only
/// adds it when nobody has, and never moves Docker's. A direct
/// `FORWARD -j NATMAP` left by an [`export`] fragment restored at boot is
/// replaced by the hook in DOCKER-USER.
fn fix_docker_user_hook(out: &mut String, saved: &SavedTables) {
    if saved.jump_state("filter", "FORWARD", DOCKER_USER).count == 0 {
        let _ = writeln!(out, "-I FORWARD 1 {}", jump_line(DOCKER_USER));
    }
    remove_boot_hook(out, saved);
}

/// Deletes every `FORWARD -j NATMAP` (the boot fragment's filter hook).
fn remove_boot_hook(out: &mut String, saved: &SavedTables) {
    let filter = Chain::FilterForward.name();
    for _ in 0..saved.jump_state("filter", "FORWARD", filter).count {
        let _ = writeln!(out, "-D FORWARD {}", jump_line(filter));
    }
}

/// The line of an [`export`] fragment that names one hook:
/// `# natmap-hook: TABLE HOOK CHAIN`.
pub const HOOK_MARK: &str = "# natmap-hook:";

/// A fragment for hosts that restore rules at boot without the daemon:
/// natmap's chains and their rules, and nothing else. Restoring it any
/// number of times gives the same tables: every chain it declares is
/// flushed and refilled by the declaration.
///
/// The hooks (one jump per built-in chain) are not restore lines, because
/// `iptables-restore --noflush` cannot insert a rule only when it is
/// missing: a built-in chain's declaration does not flush it, `-I` adds a
/// copy each time, and a `-D` of a missing rule fails the whole
/// transaction (checked on iptables-nft 1.8.9). So the fragment lists its
/// hooks as comment lines ([`HOOK_MARK`], ignored by iptables-restore),
/// and the boot plugin (`packaging/netfilter-persistent/25-natmap`) adds
/// each one with `iptables -C … || iptables -I … 1 …`. DOCKER-USER may not
/// exist at boot (and declaring it would flush Docker's), so the filter
/// chain is hooked from FORWARD; the daemon moves that hook under
/// DOCKER-USER when it starts.
pub fn export(rules: &FamilyRules) -> String {
    let mut out = String::from(
        "# natmap: its chains only, for iptables-restore --noflush (restoring twice changes nothing).\n\
         # natmap: the hooks below are added once each by natmap's netfilter-persistent plugin.\n",
    );
    for chain in Chain::ALL {
        let _ = writeln!(
            out,
            "{HOOK_MARK} {} {} {}",
            chain.table(),
            boot_hook(chain),
            chain.name()
        );
    }
    out.push_str(&build(rules, None));
    out
}

/// The chain that jumps to `chain` on a host restored without the daemon.
pub fn boot_hook(chain: Chain) -> &'static str {
    match chain {
        Chain::FilterForward => "FORWARD",
        other => other.hook(),
    }
}

/// Docker's own filter chains: when one exists, Docker runs here and has
/// adopted DOCKER-USER, so natmap leaves that chain alone.
const DOCKER_CHAINS: [&str; 3] = ["DOCKER", "DOCKER-FORWARD", "DOCKER-ISOLATION-STAGE-1"];

/// Removes natmap's hooks and chains, and nothing else. DOCKER-USER and its
/// FORWARD jump go too only when natmap created them (`own_docker_user`)
/// and nobody has used them since: no rule in it but natmap's jump, one
/// jump to it, and no Docker chain beside it (Docker adopts an existing
/// DOCKER-USER when it starts, and then owns it).
pub fn teardown(saved: &SavedTables, own_docker_user: bool) -> String {
    let mut out = String::new();
    for table in TABLES {
        if !saved.has_table(table) {
            continue;
        }
        let chains = table_chains(table);
        let shards = saved.shard_chains(table);
        let _ = writeln!(out, "*{table}");
        // Declaring flushes: no parent jumps to a shard any more.
        for name in chains
            .iter()
            .map(|c| c.name())
            .chain(shards.iter().map(String::as_str))
        {
            let _ = writeln!(out, ":{name} - [0:0]");
        }
        for chain in &chains {
            let state = saved.jump_state(table, chain.hook(), chain.name());
            for _ in 0..state.count {
                let _ = writeln!(out, "-D {} {}", chain.hook(), jump_line(chain.name()));
            }
        }
        if table == "filter" {
            remove_boot_hook(&mut out, saved);
        }
        for name in chains
            .iter()
            .map(|c| c.name())
            .chain(shards.iter().map(String::as_str))
        {
            let _ = writeln!(out, "-X {name}");
        }
        if table == "filter" && own_docker_user && docker_user_unused(saved) {
            let _ = writeln!(out, "-D FORWARD {}", jump_line(DOCKER_USER));
            let _ = writeln!(out, "-X {DOCKER_USER}");
        }
        out.push_str("COMMIT\n");
    }
    out
}

/// Whether DOCKER-USER holds nothing but natmap's jump, is reached only by
/// one FORWARD jump, and Docker is absent (see [`teardown`]).
fn docker_user_unused(saved: &SavedTables) -> bool {
    let natmap_jump = jump_line(Chain::FilterForward.name());
    saved.has_chain("filter", DOCKER_USER)
        && saved
            .chain_rules("filter", DOCKER_USER)
            .iter()
            .all(|l| *l == natmap_jump)
        && saved.jump_state("filter", "FORWARD", DOCKER_USER).count == 1
        && saved.references("filter", DOCKER_USER) == 1
        && !DOCKER_CHAINS.iter().any(|c| saved.has_chain("filter", c))
}

/// Whether a full apply onto `saved` creates DOCKER-USER (Docker has not).
pub fn creates_docker_user(saved: &SavedTables) -> bool {
    !saved.has_chain("filter", DOCKER_USER)
}

/// The smallest transaction that turns natmap's chains from `applied` into
/// `desired`, keeping `desired`'s order: `-D` by full spec for every line
/// that goes, then `-I CHAIN POS` for every line that comes, in ascending
/// position. Lines that stay are not touched, so a change costs O(change)
/// in the kernel instead of a rewrite of every chain, and touches only the
/// shards ([`FamilyRules::kernel`]) of the lines it adds or removes (and
/// their parent, when a shard comes or goes). `None` when nothing differs.
///
/// Hooks are not touched: the caller uses this only while it knows they are
/// in place, and falls back to [`full`] if the transaction fails (someone
/// changed the chains under natmap).
pub fn diff(applied: &FamilyRules, desired: &FamilyRules) -> Option<String> {
    use std::collections::BTreeSet;
    // Chains pair up by name: a shard exists only while it holds a line,
    // so a change may create one (declared, filled, jumped to from its
    // parent) or empty one (its jump deleted, the chain declared, which
    // flushes it without fetching its rules, and deleted). Chains whose
    // lines did not change are not touched.
    // Logical chains whose lines did not change are not laid out at all
    // (at 20,000 rules, laying out every chain cost more than the
    // transaction it sends).
    let changed: Vec<Chain> = Chain::ALL
        .into_iter()
        .filter(|c| applied.chain(*c) != desired.chain(*c))
        .collect();
    fn lay_out<'a>(rules: &'a FamilyRules, changed: &[Chain], table: &str) -> Vec<KernelChain<'a>> {
        changed
            .iter()
            .filter(|c| c.table() == table)
            .flat_map(|c| rules.kernel_of(*c))
            .collect()
    }
    let mut out = String::new();
    for table in TABLES {
        let (applied, desired) = (
            lay_out(applied, &changed, table),
            lay_out(desired, &changed, table),
        );
        let had: BTreeSet<&str> = applied.iter().map(|c| c.name.as_str()).collect();
        let wants: BTreeSet<&str> = desired.iter().map(|c| c.name.as_str()).collect();
        let mut body = String::new();
        for name in wants.difference(&had).chain(had.difference(&wants)) {
            let _ = writeln!(body, ":{name} - [0:0]");
        }
        for d in &desired {
            let before = applied
                .iter()
                .find(|a| a.name == d.name)
                .map_or(&[][..], |a| &a.lines[..]);
            if before != &d.lines[..] {
                chain_diff(&mut body, &d.name, before, &d.lines);
            }
        }
        for name in had.difference(&wants) {
            // Its jumps were deleted by its parent's diff above.
            let _ = writeln!(body, "-X {name}");
        }
        if !body.is_empty() {
            let _ = write!(out, "*{table}\n{body}COMMIT\n");
        }
    }
    (!out.is_empty()).then_some(out)
}

fn chain_diff(out: &mut String, name: &str, applied: &[Cow<'_, str>], desired: &[Cow<'_, str>]) {
    let kept = delete_unwanted(out, name, applied, desired);
    // `kept` is a subsequence of `desired` only if the order agrees; if a
    // kept line is out of order, delete and re-insert the lines from the
    // first disagreement on (rare: ids only grow, so new lines go last).
    let (k, mut inserts) = missing_around(&kept, desired);
    let mut len = kept.len();
    if k < kept.len() {
        // Order disagrees: fall back to delete-all-kept-after-k and insert.
        for line in &kept[k..] {
            let _ = writeln!(out, "-D {name} {line}");
        }
        len = k;
        inserts = missing_around(&kept[..k], desired).1;
    }
    for (pos, line) in inserts {
        // Appending is cheaper than inserting at a position (iptables-nft
        // need not look up the rule at that position), and new rules, whose
        // ids are the highest, always go last.
        if pos == len {
            let _ = writeln!(out, "-A {name} {line}");
        } else {
            let _ = writeln!(out, "-I {name} {} {line}", pos + 1);
        }
        len += 1;
    }
}

/// Writes a `-D` for each applied line that `desired` has no (further)
/// copy of, and returns the applied lines that stay, in order.
fn delete_unwanted<'a>(
    out: &mut String,
    name: &str,
    applied: &'a [Cow<'_, str>],
    desired: &[Cow<'_, str>],
) -> Vec<&'a str> {
    use std::collections::HashMap;
    // Multiset of desired lines, to tell which applied lines stay.
    let mut wanted: HashMap<&str, usize> = HashMap::new();
    for line in desired {
        *wanted.entry(line).or_default() += 1;
    }
    let mut kept: Vec<&str> = Vec::with_capacity(applied.len());
    for line in applied {
        match wanted.get_mut(line.as_ref()) {
            Some(n) if *n > 0 => {
                *n -= 1;
                kept.push(line.as_ref());
            }
            _ => {
                let _ = writeln!(out, "-D {name} {line}");
            }
        }
    }
    kept
}

/// Walks `desired` matching `kept` in order: how many of `kept` matched,
/// and the desired lines (with their positions) to insert around them.
fn missing_around<'a>(
    kept: &[&str],
    desired: &'a [Cow<'_, str>],
) -> (usize, Vec<(usize, &'a str)>) {
    let mut k = 0;
    let mut inserts: Vec<(usize, &str)> = Vec::new();
    for (pos, line) in desired.iter().enumerate() {
        if k < kept.len() && kept[k] == line.as_ref() {
            k += 1;
        } else {
            inserts.push((pos, line.as_ref()));
        }
    }
    (k, inserts)
}
