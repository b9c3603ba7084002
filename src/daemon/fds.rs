//! The file-descriptor budget.
//!
//! Every reserved port is a socket, and its relay holds a copy (`dup`), so
//! a rule of 1,024 ports costs 2,048 descriptors. Left unchecked, rules
//! could take every descriptor up to the limit: then the control socket
//! cannot accept, `iptables-restore` cannot be started (drift repair fails
//! every tick) and the state file cannot be written. So a [`RESERVE`] is
//! kept for those, and a change whose ports would eat into it is refused
//! with `fd_limit`, naming the limit and how to raise it.

use std::io;

#[cfg(doc)]
use crate::proto::ErrorCode;

use super::server::MAX_CONNECTIONS;

/// Descriptors kept free for the daemon's own work: every control
/// connection and the listener, two `iptables-restore` runs (three pipes
/// each, plus the exec check), the state file, its temporary file, its
/// directory and lock, `/proc` reads, Docker connections and the relayed
/// loopback connections in flight, with room to spare.
pub const RESERVE: usize = MAX_CONNECTIONS + 1 + 128;

/// Descriptors one reserved port costs: the socket and the relay's copy.
/// Counted for TCP and UDP alike (conservative: a UDP relay's per-client
/// sockets and a TCP relay's connections come out of [`RESERVE`]).
pub const PER_PORT: usize = 2;

/// How many descriptors the daemon has open, and its limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdUse {
    /// Open now (entries of `/proc/self/fd`).
    pub open: usize,
    /// The soft `RLIMIT_NOFILE` (`LimitNOFILE=` under systemd).
    pub limit: usize,
}

/// The daemon's descriptors now.
pub fn usage() -> io::Result<FdUse> {
    use nix::sys::resource::{getrlimit, Resource};
    let (soft, _) = getrlimit(Resource::RLIMIT_NOFILE).map_err(io::Error::from)?;
    // The directory handle itself is one of the entries: not counted.
    let open = std::fs::read_dir("/proc/self/fd")?
        .count()
        .saturating_sub(1);
    Ok(FdUse {
        open,
        limit: usize::try_from(soft).unwrap_or(usize::MAX),
    })
}

/// Whether reserving `new_ports` more ports keeps [`RESERVE`] descriptors
/// free; if not, the message for [`ErrorCode::FdLimit`], naming the limit
/// and how to raise it. If the count cannot be read, the change goes ahead
/// (binding then fails by itself with the OS error).
pub fn check(new_ports: usize) -> Result<(), String> {
    if new_ports == 0 {
        return Ok(());
    }
    let Ok(now) = usage() else { return Ok(()) };
    let needed = new_ports * PER_PORT;
    if now.open + needed + RESERVE <= now.limit {
        return Ok(());
    }
    let free = now.limit.saturating_sub(now.open + RESERVE);
    Err(format!(
        "{new_ports} more port(s) need {needed} file descriptors, but only {free} of the \
             daemon's open-file limit of {} are free ({} open, {RESERVE} kept for clients, \
             iptables and the state file; {PER_PORT} per port): nothing was changed. Raise \
             LimitNOFILE in the natmap unit (`systemctl edit natmap`, then restart), or \
             `ulimit -n` before starting the daemon by hand",
        now.limit, now.open
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_beyond_the_limit_is_refused_naming_it() {
        let now = usage().unwrap();
        assert!(now.open > 0 && now.limit >= now.open, "{now:?}");
        assert_eq!(check(0), Ok(()));
        let err = check(now.limit).unwrap_err();
        assert!(err.contains(&now.limit.to_string()), "{err}");
        assert!(err.contains("LimitNOFILE"), "{err}");
    }
}
