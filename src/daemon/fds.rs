//! The file-descriptor budget.
//!
//! Every reserved port is a socket, and where the loopback relay serves it
//! (a wildcard or loopback bind) the relay's socket is another, so a rule
//! of 1,024 such ports costs up to 2,048 descriptors. Left unchecked, rules
//! could take every descriptor up to the limit: then the control socket
//! cannot accept, the firewall's programs cannot be started (drift repair fails
//! every tick) and the state file cannot be written. So a [`reserve`] is
//! kept for those, and a change whose ports would eat into it is refused
//! with `fd_limit`, naming the limit and how to raise it.

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::model::PortClaim;

#[cfg(doc)]
use crate::proto::ErrorCode;

use super::server::MAX_CONNECTIONS;

/// Descriptors kept free for the daemon's own work: every control
/// connection and the listener, two firewall program runs (three pipes
/// each, plus the exec check), the state file, its temporary file, its
/// directory and lock, `/proc` reads and Docker connections, with room to
/// spare. Relayed connections come on top ([`reserve`]).
pub const BASE_RESERVE: usize = MAX_CONNECTIONS + 1 + 128;

/// Descriptors one reserved port costs, at most, where the relay serves
/// it: the reservation and the relay's loopback socket beside it (a UDP
/// port published on loopback only is one socket, which the relay reads
/// through a duplicate descriptor; counted as two, to be safe). A port on
/// any other address is its reservation alone ([`cost`]). A range mapping
/// claims one port per port of the range, so its whole cost is checked
/// before any of it is bound.
pub const PER_PORT: usize = 2;

/// Descriptors reserving `claims` costs: [`PER_PORT`] for a port the
/// loopback relay serves (a wildcard or loopback bind), one otherwise.
pub fn cost(claims: &[PortClaim]) -> usize {
    claims
        .iter()
        .map(|c| {
            let ip = c.bind.ip();
            if ip.is_loopback() || ip.is_unspecified() {
                PER_PORT
            } else {
                1
            }
        })
        .sum()
}

/// How long a count of `/proc/self/fd` stands for the daemon's use.
/// Listing it costs time in proportion to what is open (10,000
/// reservations: milliseconds), so a change does not list it again within
/// this; what changes checked meanwhile add is counted on top, and what
/// they released is not subtracted (the estimate only errs high).
const RECOUNT_AFTER: Duration = Duration::from_secs(1);

/// The last count, when it was taken, and what checks added since.
static ESTIMATE: Mutex<Option<(Instant, FdUse)>> = Mutex::new(None);

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
    let limit = limit()?;
    // The directory handle itself is one of the entries: not counted.
    let open = std::fs::read_dir("/proc/self/fd")?
        .count()
        .saturating_sub(1);
    Ok(FdUse { open, limit })
}

/// The soft `RLIMIT_NOFILE`.
fn limit() -> io::Result<usize> {
    use nix::sys::resource::{getrlimit, Resource};
    let (soft, _) = getrlimit(Resource::RLIMIT_NOFILE).map_err(io::Error::from)?;
    Ok(usize::try_from(soft).unwrap_or(usize::MAX))
}

/// Whether reserving `claims` keeps [`reserve`] descriptors free; if not,
/// the message for [`ErrorCode::FdLimit`], naming the limit and how to
/// raise it. If the count cannot be read, the change goes ahead (binding
/// then fails by itself with the OS error).
pub fn check(claims: &[PortClaim]) -> Result<(), String> {
    check_cost(claims.len(), cost(claims))
}

/// [`check`] of `new_ports` ports costing `needed` descriptors.
pub fn check_cost(new_ports: usize, needed: usize) -> Result<(), String> {
    if needed == 0 {
        return Ok(());
    }
    let Some(now) = estimate(needed) else {
        return Ok(());
    };
    let reserve = reserve();
    if now.open + needed + reserve <= now.limit {
        return Ok(());
    }
    // Refused on an estimate: count again before saying no.
    let Some(now) = recount(needed) else {
        return Ok(());
    };
    if now.open + needed + reserve <= now.limit {
        return Ok(());
    }
    let free = now.limit.saturating_sub(now.open + reserve);
    Err(format!(
        "{new_ports} more port(s) need {needed} file descriptors, but only {free} of the \
             daemon's open-file limit of {} are free ({} open, {reserve} kept for clients, \
             relayed connections, the firewall and the state file; one per port, {PER_PORT} \
             where the loopback relay serves it): nothing was changed. Raise \
             LimitNOFILE in the natmap unit (`systemctl edit natmap`, then restart), or \
             `ulimit -n` before starting the daemon by hand",
        now.limit, now.open
    ))
}

/// The daemon's use before adding `needed`: the last count if it is
/// recent, plus what was added since; counts anew otherwise. Counts
/// `needed` as added.
fn estimate(needed: usize) -> Option<FdUse> {
    let mut last = ESTIMATE.lock().unwrap_or_else(|p| p.into_inner());
    match last.as_mut() {
        Some((at, used)) if at.elapsed() < RECOUNT_AFTER => {
            let before = used.open;
            used.open += needed;
            // The limit is one cheap call, and can change under the
            // daemon (`prlimit`): read it every time.
            Some(FdUse {
                open: before,
                limit: limit().ok()?,
            })
        }
        _ => {
            drop(last);
            recount(needed)
        }
    }
}

/// Counts `/proc/self/fd` anew; records the count plus `needed`.
fn recount(needed: usize) -> Option<FdUse> {
    let now = usage().ok()?;
    let mut after = now;
    after.open += needed;
    *ESTIMATE.lock().unwrap_or_else(|p| p.into_inner()) = Some((Instant::now(), after));
    Some(now)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_beyond_the_limit_is_refused_naming_it() {
        let now = usage().unwrap();
        assert!(now.open > 0 && now.limit >= now.open, "{now:?}");
        assert_eq!(check(&[]), Ok(()));
        let err = check_cost(now.limit, now.limit).unwrap_err();
        assert!(err.contains(&now.limit.to_string()), "{err}");
        assert!(err.contains("LimitNOFILE"), "{err}");
    }

    #[test]
    fn a_port_costs_two_descriptors_only_where_the_relay_serves_it() {
        use crate::model::Proto;
        let claim = |bind: &str| PortClaim {
            proto: Proto::Tcp,
            bind: bind.parse().unwrap(),
            target: "10.0.0.2:80".parse().unwrap(),
        };
        assert_eq!(cost(&[claim("192.0.2.1:8080")]), 1);
        assert_eq!(cost(&[claim("0.0.0.0:8080")]), PER_PORT);
        assert_eq!(cost(&[claim("127.0.0.1:8080")]), PER_PORT);
        assert_eq!(
            cost(&[claim("[::]:8080"), claim("[2001:db8::1]:8080")]),
            PER_PORT + 1
        );
    }
}
