//! Running iptables: a small trait with the real implementation and a
//! recording one for fast tests of everything above it.

mod real;
mod recording;

pub use real::{IptablesExecutor, IptablesFlavor, LOCK_WAIT_SECS};
pub use recording::RecordingExecutor;

use crate::firewall::FirewallError;
use crate::model::Family;

/// The two operations natmap needs from the kernel's packet filter.
pub trait Netfilter: Send + Sync {
    /// Applies one `iptables-restore --noflush` transaction (all or nothing).
    fn restore(&self, family: Family, payload: &str) -> Result<(), FirewallError>;

    /// Returns `iptables-save` output of every table of the family.
    fn save(&self, family: Family) -> Result<String, FirewallError>;

    /// Returns `iptables-save -c` output (with `[packets:bytes]` counters).
    fn save_counters(&self, family: Family) -> Result<String, FirewallError> {
        self.save(family)
    }
}
