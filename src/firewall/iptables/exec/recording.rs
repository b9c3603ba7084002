//! A fake executor that records every transaction, for tests of the engine.

use std::sync::Mutex;

use crate::model::Family;

use super::Netfilter;
use crate::firewall::FirewallError;

/// Records restore payloads and answers `save` with a fixed dump. Can be told
/// to fail the next restore, to test rollback.
#[derive(Debug, Default)]
pub struct RecordingExecutor {
    /// Every `(family, payload)` passed to `restore`, in order.
    pub restores: Mutex<Vec<(Family, String)>>,
    /// What `save` returns.
    pub saved: Mutex<String>,
    /// How many of the next `restore` calls fail.
    pub fail_next: Mutex<u32>,
}

impl Netfilter for RecordingExecutor {
    fn restore(&self, family: Family, payload: &str) -> Result<(), FirewallError> {
        let mut failing = self.fail_next.lock().expect("lock");
        if *failing > 0 {
            *failing -= 1;
            return Err(FirewallError::Refused {
                program: "iptables-restore".into(),
                message: "injected failure".into(),
            });
        }
        self.restores
            .lock()
            .expect("lock")
            .push((family, payload.to_owned()));
        Ok(())
    }

    fn save(&self, _family: Family) -> Result<String, FirewallError> {
        Ok(self.saved.lock().expect("lock").clone())
    }
}
