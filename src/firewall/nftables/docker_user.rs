//! The nftables backend's one rule in iptables: beside Docker ≤ 28 (or
//! 29 on its default iptables firewall), forwarded traffic passes
//! `FORWARD` only if `DOCKER-USER` accepts it, so natmap keeps
//!
//! ```text
//! -A DOCKER-USER -m connmark --mark 0x10000000/0x10000000 -m comment --comment natmap-nftables -j ACCEPT
//! ```
//!
//! first in that chain, in each family whose iptables has the chain. The
//! mark is on natmap's own connections only (its DNAT, `snat --forward`),
//! so every other forwarded packet still meets Docker's DROP.
//!
//! Run through `iptables`/`ip6tables` on `PATH` (the host's flavor, which
//! is the one Docker uses on a standard install), with `-w`, never a
//! shell. natmap never creates `DOCKER-USER` on this backend: without it
//! there is no Docker DROP for natmap's traffic to pass.

use crate::firewall::FirewallError;
use crate::model::Family;

use super::marks::Mark;

/// The comment that makes the rule natmap's (and findable whatever its mark).
pub const COMMENT: &str = "natmap-nftables";

const CHAIN: &str = "DOCKER-USER";
const WAIT: &str = "10";

/// What `DOCKER-USER` of one family holds of natmap's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Accept {
    /// No `DOCKER-USER` (no Docker on iptables) or no iptables at all.
    NoChain,
    /// The chain exists and natmap's accept is its first rule, as applied.
    InPlace,
    /// The chain exists without natmap's accept first (or with an accept
    /// of another mark): `lines` are natmap's lines in it, to delete.
    Missing {
        /// natmap's lines (`-A DOCKER-USER …`) found, any mark.
        lines: Vec<String>,
    },
}

/// The rule's arguments after `-A DOCKER-USER`, as `iptables -S` prints them.
pub fn rule(mark: Mark) -> String {
    format!(
        "-m connmark --mark {} -m comment --comment {COMMENT} -j ACCEPT",
        mark.iptables()
    )
}

fn program(family: Family) -> &'static str {
    match family {
        Family::V4 => "iptables",
        Family::V6 => "ip6tables",
    }
}

fn run(family: Family, args: &[&str]) -> Result<String, FirewallError> {
    crate::firewall::run_tool(program(family), "iptables", args, None)
}

/// Reads `DOCKER-USER` of `family`.
pub fn read(family: Family, mark: Mark) -> Result<Accept, FirewallError> {
    let text = match run(family, &["-w", WAIT, "-S", CHAIN]) {
        Ok(text) => text,
        // No such chain (Docker absent), or no iptables/table for the family.
        Err(FirewallError::Refused { .. }) | Err(FirewallError::Unavailable { .. }) => {
            return Ok(Accept::NoChain)
        }
        Err(e) => return Err(e),
    };
    Ok(parse(&text, mark))
}

/// [`read`] on `iptables -S DOCKER-USER` output.
pub fn parse(text: &str, mark: Mark) -> Accept {
    let prefix = format!("-A {CHAIN} ");
    let rules: Vec<&str> = text.lines().filter(|l| l.starts_with(&prefix)).collect();
    let want = format!("{prefix}{}", rule(mark));
    let ours: Vec<String> = rules
        .iter()
        .filter(|l| l.contains(&format!("--comment {COMMENT} ")))
        .map(|l| l.to_string())
        .collect();
    if rules.first() == Some(&want.as_str()) && ours.len() == 1 {
        Accept::InPlace
    } else {
        Accept::Missing { lines: ours }
    }
}

/// Puts natmap's accept first in `DOCKER-USER` of `family` if the chain
/// exists (taking out any other line of natmap's there); returns whether
/// it did anything.
pub fn ensure(family: Family, mark: Mark) -> Result<bool, FirewallError> {
    match read(family, mark)? {
        Accept::NoChain | Accept::InPlace => Ok(false),
        Accept::Missing { lines } => {
            delete(family, &lines)?;
            let r = rule(mark);
            let mut args = vec!["-w", WAIT, "-I", CHAIN, "1"];
            args.extend(r.split(' '));
            run(family, &args)?;
            Ok(true)
        }
    }
}

/// Whether iptables' filter `FORWARD` of `family` drops what no rule
/// accepts (policy DROP, no blanket `-j ACCEPT`), as the iptables backend
/// reads it: forwarded traffic natmap does not mark (a `snat` without
/// `--forward`) meets that DROP whatever natmap's table does. Unknown (no
/// iptables, no table) counts as not dropped.
pub fn forward_drops(family: Family) -> bool {
    run(family, &["-w", WAIT, "-S", "FORWARD"]).is_ok_and(|text| forward_drops_in(&text))
}

/// [`forward_drops`] on `iptables -S FORWARD` output.
pub fn forward_drops_in(text: &str) -> bool {
    let mut lines = text.lines().map(str::trim);
    lines.clone().any(|l| l == "-P FORWARD DROP") && !lines.any(|l| l == "-A FORWARD -j ACCEPT")
}

/// Takes natmap's accept (any mark) out of `DOCKER-USER` of `family`.
pub fn remove(family: Family) -> Result<(), FirewallError> {
    // The mark does not matter: every line with natmap's comment goes.
    let lines = match read(family, Mark::new(1, 1))? {
        Accept::NoChain => return Ok(()),
        Accept::InPlace => vec![format!("-A {CHAIN} {}", rule(Mark::new(1, 1)))],
        Accept::Missing { lines } => lines,
    };
    delete(family, &lines)
}

fn delete(family: Family, lines: &[String]) -> Result<(), FirewallError> {
    for line in lines {
        // `-A DOCKER-USER <args>` → `-D DOCKER-USER <args>`; natmap's line
        // holds no quoted words, so splitting on spaces is exact.
        let Some(rest) = line.strip_prefix("-A ") else {
            continue;
        };
        let mut args = vec!["-w", WAIT, "-D"];
        args.extend(rest.split(' '));
        run(family, &args)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MARK: Mark = Mark::new(0x1000_0000, 0x1000_0000);

    #[test]
    fn forward_drops_on_a_drop_policy_without_a_blanket_accept() {
        let docker = "-P FORWARD DROP\n-A FORWARD -j DOCKER-USER\n-A FORWARD -j DOCKER-FORWARD\n";
        assert!(forward_drops_in(docker));
        assert!(!forward_drops_in(&format!(
            "{docker}-A FORWARD -j ACCEPT\n"
        )));
        assert!(!forward_drops_in("-P FORWARD ACCEPT\n"));
        // A narrower accept still leaves the rest dropped.
        assert!(forward_drops_in(
            "-P FORWARD DROP\n-A FORWARD -s 198.51.100.2/32 -j ACCEPT\n"
        ));
        assert!(!forward_drops_in(""));
    }

    #[test]
    fn the_accept_must_be_first_and_alone() {
        let ours = format!("-A DOCKER-USER {}", rule(MARK));
        assert_eq!(
            ours,
            "-A DOCKER-USER -m connmark --mark 0x10000000/0x10000000 -m comment --comment natmap-nftables -j ACCEPT"
        );
        let first = format!("-N DOCKER-USER\n{ours}\n-A DOCKER-USER -j RETURN\n");
        assert_eq!(parse(&first, MARK), Accept::InPlace);
        let below = format!("-N DOCKER-USER\n-A DOCKER-USER -j RETURN\n{ours}\n");
        assert_eq!(
            parse(&below, MARK),
            Accept::Missing {
                lines: vec![ours.clone()]
            }
        );
        let other_mark = Mark::new(0x2, 0x2);
        assert_eq!(
            parse(&first, other_mark),
            Accept::Missing { lines: vec![ours] }
        );
        assert_eq!(
            parse("-N DOCKER-USER\n-A DOCKER-USER -j RETURN\n", MARK),
            Accept::Missing { lines: vec![] }
        );
    }
}
