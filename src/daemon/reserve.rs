//! Port reservations: a bound socket per forwarded host port, so no other
//! service can take a port natmap forwards.
//!
//! Order matters (design §4): bind before the rules go in, listen only after
//! they are in and the state is on disk. TCP sockets are listening while
//! reserved because a merely bound socket does not stop another process that
//! sets `SO_REUSEADDR`. TCP reservations set `SO_REUSEADDR` themselves so a
//! port whose relayed loopback connections linger in TIME-WAIT can be
//! reserved again at once; a listening socket still keeps every other binder
//! out. UDP reservations do not set it: for UDP it would let others share
//! the port.

use std::fs;
use std::io;
use std::net::{TcpListener, UdpSocket};
use std::os::fd::{AsRawFd, OwnedFd};

use nix::sys::socket::{self, AddressFamily, Backlog, SockFlag, SockType, SockaddrStorage};

use crate::model::{PortClaim, Proto};

/// A socket holding one host port.
#[derive(Debug)]
pub enum HeldSocket {
    /// TCP, bound but not yet listening.
    TcpBound(OwnedFd),
    /// TCP, listening (connections that reach it are relayed to the target).
    TcpListening(TcpListener),
    /// UDP, bound.
    Udp(UdpSocket),
}

/// One reserved port and its socket.
#[derive(Debug)]
pub struct Reservation {
    /// What is reserved.
    pub claim: PortClaim,
    /// The socket holding it.
    pub socket: HeldSocket,
}

/// Why a port could not be reserved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortBusy {
    /// The claim that failed.
    pub claim: PortClaim,
    /// What the OS said and, where `/proc` tells, who holds the port.
    pub message: String,
}

impl std::fmt::Display for PortBusy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// Describes a claim for messages: `25/tcp on 192.0.2.1`.
pub fn describe(claim: &PortClaim) -> String {
    format!(
        "{}/{} on {}",
        claim.bind.port(),
        claim.proto,
        claim.bind.ip()
    )
}

/// Binds every claim, or none: on the first failure the sockets bound so far
/// are closed and the failure names the port.
pub fn bind_all(claims: &[PortClaim]) -> Result<Vec<Reservation>, PortBusy> {
    let mut held = Vec::with_capacity(claims.len());
    for claim in claims {
        match bind_one(claim) {
            Ok(socket) => held.push(Reservation {
                claim: *claim,
                socket,
            }),
            Err(e) => {
                let owner = find_owner(claim.proto, claim.bind.port())
                    .map(|o| format!(" by {o}"))
                    .unwrap_or_default();
                let message = if e.kind() == io::ErrorKind::AddrInUse {
                    format!(
                        "port {} is in use{owner}; stop that service or choose another port",
                        describe(claim)
                    )
                } else {
                    format!("cannot reserve port {}: {e}", describe(claim))
                };
                return Err(PortBusy {
                    claim: *claim,
                    message,
                });
            }
        }
    }
    Ok(held)
}

fn bind_one(claim: &PortClaim) -> io::Result<HeldSocket> {
    let v6 = claim.bind.is_ipv6();
    let family = if v6 {
        AddressFamily::Inet6
    } else {
        AddressFamily::Inet
    };
    let kind = match claim.proto {
        Proto::Tcp => SockType::Stream,
        Proto::Udp => SockType::Datagram,
    };
    let fd = socket::socket(family, kind, SockFlag::SOCK_CLOEXEC, None)?;
    if claim.proto == Proto::Tcp {
        set_int_option(&fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
    }
    if v6 {
        set_int_option(&fd, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 1)?;
        // The external address of a rule may be a routed, non-local one.
        let _ = set_int_option(&fd, libc::IPPROTO_IPV6, libc::IPV6_FREEBIND, 1);
    } else {
        let _ = set_int_option(&fd, libc::IPPROTO_IP, libc::IP_FREEBIND, 1);
    }
    socket::bind(fd.as_raw_fd(), &SockaddrStorage::from(claim.bind))?;
    Ok(match claim.proto {
        Proto::Tcp => HeldSocket::TcpBound(fd),
        Proto::Udp => HeldSocket::Udp(UdpSocket::from(fd)),
    })
}

fn set_int_option(fd: &OwnedFd, level: i32, name: i32, value: i32) -> io::Result<()> {
    // SAFETY: `fd` is a valid open socket and `value` outlives the call.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&value as *const i32).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

impl Reservation {
    /// Starts listening (TCP). After this, no process can take the port even
    /// with `SO_REUSEADDR`.
    pub fn listen(&mut self) -> io::Result<()> {
        if let HeldSocket::TcpBound(fd) = &self.socket {
            socket::listen(fd, Backlog::new(128).map_err(io::Error::from)?)?;
            let fd = fd.try_clone()?;
            let listener = TcpListener::from(fd);
            listener.set_nonblocking(true)?;
            self.socket = HeldSocket::TcpListening(listener);
        }
        Ok(())
    }
}

/// Finds which process holds `port` for `proto` (any address), from
/// `/proc/net/*` and `/proc/*/fd`: `pid 123 (nginx)`. Best effort.
pub fn find_owner(proto: Proto, port: u16) -> Option<String> {
    let inodes = socket_inodes(proto, port);
    if inodes.is_empty() {
        return None;
    }
    owner_of(&inodes).or_else(|| Some("another process".into()))
}

/// `socket:[inode]` names of sockets holding `port` for `proto`: TCP
/// listeners (only they keep binders out) and bound UDP sockets.
fn socket_inodes(proto: Proto, port: u16) -> Vec<String> {
    let tables: &[&str] = match proto {
        Proto::Tcp => &["/proc/net/tcp", "/proc/net/tcp6"],
        Proto::Udp => &["/proc/net/udp", "/proc/net/udp6"],
    };
    let mut inodes = Vec::new();
    for table in tables {
        let Ok(text) = fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(state), Some(inode)) = (cols.get(1), cols.get(3), cols.get(9))
            else {
                continue;
            };
            let Some(hex_port) = local.rsplit(':').next() else {
                continue;
            };
            let holds = proto == Proto::Udp || *state == "0A";
            if holds && u16::from_str_radix(hex_port, 16).ok() == Some(port) && *inode != "0" {
                inodes.push(format!("socket:[{inode}]"));
            }
        }
    }
    inodes
}

/// The process holding one of `inodes`, from `/proc/*/fd`.
fn owner_of(inodes: &[String]) -> Option<String> {
    for proc_entry in fs::read_dir("/proc").ok()?.flatten() {
        let pid = proc_entry.file_name().to_string_lossy().into_owned();
        if !pid.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(fds) = fs::read_dir(proc_entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Ok(link) = fs::read_link(fd.path()) {
                if inodes.iter().any(|i| link.as_os_str() == i.as_str()) {
                    let comm =
                        fs::read_to_string(proc_entry.path().join("comm")).unwrap_or_default();
                    return Some(format!("pid {pid} ({})", comm.trim()));
                }
            }
        }
    }
    None
}

/// Another process's socket on `port` (any address, either family), not
/// one of `own` (socket inodes of this process): `pid 123 (nginx)`.
pub fn other_holder(
    proto: Proto,
    port: u16,
    own: &std::collections::HashSet<String>,
) -> Option<String> {
    let inodes: Vec<String> = socket_inodes(proto, port)
        .into_iter()
        .filter(|i| !own.contains(i))
        .collect();
    if inodes.is_empty() {
        return None;
    }
    owner_of(&inodes).or_else(|| Some("another process".into()))
}

/// Whether two claims would fight over the same port: same protocol and
/// port, and the same address or either one a wildcard.
pub fn claims_collide(a: &PortClaim, b: &PortClaim) -> bool {
    a.proto == b.proto
        && a.bind.port() == b.bind.port()
        && a.bind.is_ipv4() == b.bind.is_ipv4()
        && (a.bind.ip() == b.bind.ip()
            || a.bind.ip().is_unspecified()
            || b.bind.ip().is_unspecified())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(bind: &str, proto: Proto) -> PortClaim {
        PortClaim {
            proto,
            bind: bind.parse().unwrap(),
            target: "192.0.2.99:1".parse().unwrap(),
        }
    }

    #[test]
    fn binding_is_all_or_nothing_and_names_the_busy_port() {
        let blocker = TcpListener::bind("127.0.0.1:0").unwrap();
        let busy = blocker.local_addr().unwrap();
        let free = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        // `free` was released when its listener dropped above.
        let claims = [
            claim(&free.to_string(), Proto::Tcp),
            claim(&busy.to_string(), Proto::Tcp),
        ];
        let err = bind_all(&claims).unwrap_err();
        assert_eq!(err.claim, claims[1]);
        assert!(
            err.message.contains(&format!("port {}/tcp", busy.port())),
            "{}",
            err.message
        );
        assert!(err.message.contains("pid"), "owner named: {}", err.message);
        // The first socket was released again.
        TcpListener::bind(free).expect("free port was released after the failure");
    }

    #[test]
    fn a_listening_reservation_keeps_reuseaddr_binders_out() {
        let probe = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = probe.local_addr().unwrap();
        drop(probe);
        let mut held = bind_all(&[claim(&addr.to_string(), Proto::Tcp)]).unwrap();
        held[0].listen().unwrap();
        assert!(TcpListener::bind(addr).is_err());
        drop(held);
        TcpListener::bind(addr).expect("released on drop");
    }

    #[test]
    fn wildcard_claims_collide_with_specific_ones() {
        let a = claim("0.0.0.0:80", Proto::Tcp);
        assert!(claims_collide(&a, &claim("192.0.2.1:80", Proto::Tcp)));
        assert!(!claims_collide(&a, &claim("192.0.2.1:80", Proto::Udp)));
        assert!(!claims_collide(&a, &claim("192.0.2.1:81", Proto::Tcp)));
        assert!(!claims_collide(
            &claim("192.0.2.2:80", Proto::Tcp),
            &claim("192.0.2.1:80", Proto::Tcp)
        ));
    }
}
