//! Running iptables: a small trait with the real implementation and a
//! recording one for fast tests of everything above it.

mod real;
mod recording;

pub use real::{Backend, IptablesExecutor, LOCK_WAIT_SECS};
pub use recording::RecordingExecutor;

use crate::model::Family;

/// An error from iptables, with what it printed.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{program} failed: {message}")]
pub struct NetfilterError {
    /// The program that failed (`iptables-restore`, `ip6tables-save`, …).
    pub program: String,
    /// Its stderr, or why it could not run.
    pub message: String,
}

/// The two operations natmap needs from the kernel's packet filter.
pub trait Netfilter: Send + Sync {
    /// Applies one `iptables-restore --noflush` transaction (all or nothing).
    fn restore(&self, family: Family, payload: &str) -> Result<(), NetfilterError>;

    /// Returns `iptables-save` output of every table of the family.
    fn save(&self, family: Family) -> Result<String, NetfilterError>;

    /// Returns `iptables-save -c` output (with `[packets:bytes]` counters).
    fn save_counters(&self, family: Family) -> Result<String, NetfilterError> {
        self.save(family)
    }
}
