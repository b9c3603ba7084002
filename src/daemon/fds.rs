//! The file-descriptor budget.
//!
//! Every reserved port is a socket, and its loopback relay another, so a
//! rule of 1,024 ports costs up to 2,048 descriptors. Left unchecked, rules
//! could take every descriptor up to the limit: then the control socket
//! cannot accept, the firewall's programs cannot be started (drift repair fails
//! every tick) and the state file cannot be written. So a [`reserve`] is
//! kept for those, and a change whose ports would eat into it is refused
//! with `fd_limit`, naming the limit and how to raise it.

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};

#[cfg(doc)]
use crate::proto::ErrorCode;

use super::server::MAX_CONNECTIONS;

/// Descriptors kept free for the daemon's own work: every control
/// connection and the listener, two firewall program runs (three pipes
/// each, plus the exec check), the state file, its temporary file, its
/// directory and lock, `/proc` reads and Docker connections, with room to
/// spare. Relayed connections come on top ([`reserve`]).
pub const BASE_RESERVE: usize = MAX_CONNECTIONS + 1 + 128;

/// Descriptors one reserved port costs, at most: the reservation and the
/// relay's loopback socket beside it (only for a wildcard or loopback bind;
/// a UDP port published on loopback only is one socket, which the relay
/// reads through a duplicate descriptor; counted for every port, to be
/// safe). A range mapping claims one port per port of the range, so its
/// whole cost is checked before any of it is bound.
pub const PER_PORT: usize = 2;

/// Two descriptors per relayed connection the relay may hold (client and
/// upstream; one for a UDP client): the relay's global cap, doubled.
static RELAYED: AtomicUsize = AtomicUsize::new(2 * 1024);

/// Sets the relay's cap on connections (`[relay] max_connections`), whose
/// descriptors the reserve keeps free.
pub fn set_relayed_connections(max: usize) {
    RELAYED.store(max.saturating_mul(2), Ordering::Relaxed);
}

/// Descriptors kept free: [`BASE_RESERVE`] plus the relay's connections.
pub fn reserve() -> usize {
    BASE_RESERVE.saturating_add(RELAYED.load(Ordering::Relaxed))
}

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

/// Whether reserving `new_ports` more ports keeps [`reserve`] descriptors
/// free; if not, the message for [`ErrorCode::FdLimit`], naming the limit
/// and how to raise it. If the count cannot be read, the change goes ahead
/// (binding then fails by itself with the OS error).
pub fn check(new_ports: usize) -> Result<(), String> {
    if new_ports == 0 {
        return Ok(());
    }
    let Ok(now) = usage() else { return Ok(()) };
    let needed = new_ports * PER_PORT;
    let reserve = reserve();
    if now.open + needed + reserve <= now.limit {
        return Ok(());
    }
    let free = now.limit.saturating_sub(now.open + reserve);
    Err(format!(
        "{new_ports} more port(s) need {needed} file descriptors, but only {free} of the \
             daemon's open-file limit of {} are free ({} open, {reserve} kept for clients, \
             relayed connections, the firewall and the state file; {PER_PORT} per port): nothing \
             was changed. Raise \
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
