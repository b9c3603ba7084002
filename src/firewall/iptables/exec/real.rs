//! The real executor: `iptables-restore` / `iptables-save` processes.

use crate::model::Family;

use super::Netfilter;
use crate::firewall::FirewallError;

/// How long an iptables process waits for the xtables lock held by another
/// tool (Docker, firewalld) before it gives up: a bounded wait, never a hang.
pub const LOCK_WAIT_SECS: u32 = 10;

/// The kernel interface an iptables binary drives. Both are iptables (the
/// same rule syntax and tools); neither is natmap's native nftables driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IptablesFlavor {
    /// `iptables-nft`, the nf_tables compatibility layer.
    Nft,
    /// `iptables-legacy`, the old xtables interface.
    Legacy,
}

/// Runs the iptables binaries found on `PATH`.
#[derive(Debug, Clone, Default)]
pub struct IptablesExecutor;

impl IptablesExecutor {
    /// Detects which flavor `iptables` on PATH is, from `iptables --version`.
    pub fn flavor(&self) -> Result<IptablesFlavor, FirewallError> {
        let out = run("iptables", &["--version"], None)?;
        if out.contains("nf_tables") {
            Ok(IptablesFlavor::Nft)
        } else {
            Ok(IptablesFlavor::Legacy)
        }
    }

    /// If Docker's chains exist only in the backend natmap does not use,
    /// natmap's rules would never see Docker's traffic: says so. `None` when
    /// Docker's rules are in natmap's backend, absent, or the other backend
    /// cannot be read.
    pub fn docker_backend_mismatch(&self, flavor: IptablesFlavor) -> Option<String> {
        let (other, other_name, this_name) = match flavor {
            IptablesFlavor::Nft => ("iptables-legacy-save", "iptables-legacy", "iptables-nft"),
            IptablesFlavor::Legacy => ("iptables-nft-save", "iptables-nft", "iptables-legacy"),
        };
        let has_docker = |text: &str| text.lines().any(|l| l.starts_with(":DOCKER "));
        // Without `-t`: asking for a table would create it (an empty legacy
        // nat table makes every later `iptables` listing warn about it).
        let theirs = run(other, &[], None).ok()?;
        let ours = run("iptables-save", &[], None).unwrap_or_default();
        (has_docker(&theirs) && !has_docker(&ours)).then(|| {
            format!(
                "Docker's rules are in {other_name} but `iptables` is {this_name}: natmap's rules would never \
                 match Docker's traffic. Point iptables at the same backend as Docker \
                 (update-alternatives --set iptables /usr/sbin/{other_name}) and restart Docker and natmap"
            )
        })
    }
}

impl IptablesFlavor {
    /// `nft` or `legacy`.
    pub fn name(self) -> &'static str {
        match self {
            IptablesFlavor::Nft => "nft",
            IptablesFlavor::Legacy => "legacy",
        }
    }
}

fn tool(family: Family, base: &str) -> String {
    match family {
        Family::V4 => format!("ip{base}"),
        Family::V6 => format!("ip6{base}"),
    }
}

fn run(program: &str, args: &[&str], stdin: Option<&str>) -> Result<String, FirewallError> {
    crate::firewall::run_tool(program, "iptables", args, stdin).map_err(|e| match e {
        // iptables says so only in words ("Another app is currently holding
        // the xtables lock"); this is the one place that reads them.
        FirewallError::Refused { program, message } if message.contains("xtables lock") => {
            FirewallError::Locked { program, message }
        }
        other => other,
    })
}

impl Netfilter for IptablesExecutor {
    fn restore(&self, family: Family, payload: &str) -> Result<(), FirewallError> {
        let wait = LOCK_WAIT_SECS.to_string();
        run(
            &tool(family, "tables-restore"),
            &["--noflush", "-w", &wait],
            Some(payload),
        )
        .map(drop)
    }

    fn save(&self, family: Family) -> Result<String, FirewallError> {
        run(&tool(family, "tables-save"), &[], None)
    }

    fn save_counters(&self, family: Family) -> Result<String, FirewallError> {
        run(&tool(family, "tables-save"), &["-c"], None)
    }
}
