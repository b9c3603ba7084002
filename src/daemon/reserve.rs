//! Port reservations: a bound socket per forwarded host port, so no other
//! service can take a port natmap forwards.
//!
//! A reservation holds the port and nothing else: it is bound but never
//! listens (TCP) and drops every datagram it is given (UDP, a socket filter
//! that accepts nothing). So a connection that reaches the host's address
//! without being translated by natmap's rules (another ingress interface, a
//! flushed chain, a down mapping) is refused like a closed port: TCP gets a
//! reset at the handshake, UDP gets no answer. The daemon never forwards what
//! the rules would not (design §4).
//!
//! Neither `SO_REUSEADDR` nor a listen is needed to keep others out: a bound
//! socket without `SO_REUSEADDR` conflicts with every later bind of an
//! overlapping address, whatever its options. Reservations set
//! `SO_REUSEPORT` only so the daemon's own loopback relay (see
//! `daemon::relay`) can listen on 127.0.0.1/::1 of a wildcard reservation;
//! the kernel lets a `SO_REUSEPORT` socket share a port only with sockets of
//! the same user (root), so other services still get "address in use".
//!
//! Order matters: bind before the rules go in, serve loopback only after they
//! are in and the state is on disk.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use nix::sys::socket::{self, AddressFamily, Backlog, SockFlag, SockType, SockaddrStorage};

use crate::model::{PortClaim, Proto};

/// One reserved port and the socket holding it.
#[derive(Debug)]
pub struct Reservation {
    /// What is reserved.
    pub claim: PortClaim,
    /// Bound, never listening (TCP) or reading (UDP).
    socket: OwnedFd,
}

impl Reservation {
    /// The reserving socket, e.g. to name its inode.
    pub fn fd(&self) -> &OwnedFd {
        &self.socket
    }

    /// The reservation of a UDP port on a loopback address, opened for the
    /// relay to serve: the same socket, not a second one beside it.
    ///
    /// Two UDP sockets bound to the same address and port with
    /// `SO_REUSEPORT` form one group, and the kernel spreads datagrams
    /// over the group: a relay socket beside the reservation would get
    /// only some of them, the reservation's filter dropping the rest. So
    /// the relay reads the reservation itself, through a duplicate of its
    /// descriptor: datagrams queued while nobody served the port are
    /// dropped, then the drop-everything filter comes off. When the relay
    /// stops it must call [`refilter`] on the socket, so the port answers
    /// nothing again (fail closed) while it stays reserved.
    pub fn open_udp_for_relay(&self) -> io::Result<UdpSocket> {
        let fd = self.socket.try_clone()?;
        drain(fd.as_fd());
        let detach = 0i32;
        set_int_option(&fd, libc::SOL_SOCKET, libc::SO_DETACH_FILTER, detach).or_else(|e| {
            // ENOENT: no filter attached (already detached).
            if e.raw_os_error() == Some(libc::ENOENT) {
                Ok(())
            } else {
                Err(e)
            }
        })?;
        let socket = UdpSocket::from(fd);
        socket.set_nonblocking(true)?;
        Ok(socket)
    }
}

/// Puts a UDP reservation's drop-everything filter back and drops what it
/// queued, once its relay stops: see [`Reservation::open_udp_for_relay`].
pub fn refilter(socket: BorrowedFd<'_>) {
    if let Err(e) = attach_drop_filter(socket.as_raw_fd()) {
        tracing::error!("cannot close a loopback UDP port again after its relay: {e}");
    }
    drain(socket);
}

/// Reads and discards every datagram queued on a UDP socket, without
/// waiting.
fn drain(fd: BorrowedFd<'_>) {
    let mut buf = [0u8; 1];
    loop {
        // SAFETY: `fd` is a valid socket and `buf` outlives the call.
        let n = unsafe {
            libc::recv(
                fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT | libc::MSG_TRUNC,
            )
        };
        if n < 0 {
            break;
        }
    }
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
            // The IPv6 half of a mapping published on every address, on a
            // host without IPv6: nothing to hold there.
            Err(e) if is_v6_wildcard(claim) && ipv6_missing(&e) => {}
            Err(e) => {
                let owner = find_owner(claim.proto, claim.bind.port())
                    .map(|o| format!(" by {o}"))
                    .unwrap_or_default();
                let message = if e.kind() == io::ErrorKind::AddrInUse
                    && owner.is_empty()
                    && claim.proto == Proto::Tcp
                    && in_time_wait(claim.bind.port())
                {
                    // A reservation cannot set SO_REUSEADDR (another
                    // binder could then share the never-listening port),
                    // so the closed connections of the port's previous
                    // user keep it for up to a minute.
                    format!(
                        "port {} was closed moments ago by the service that used it and its \
                         connections still hold it (TCP TIME-WAIT, up to 60 s); retry in a minute \
                         or choose another port",
                        describe(claim)
                    )
                } else if e.kind() == io::ErrorKind::AddrInUse {
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

/// Whether a TCP connection in TIME-WAIT has `port` as its local port
/// (`/proc/net/tcp{,6}`, state 06).
fn in_time_wait(port: u16) -> bool {
    let local = format!(":{port:04X}");
    ["/proc/net/tcp", "/proc/net/tcp6"].iter().any(|file| {
        fs::read_to_string(file).is_ok_and(|text| {
            text.lines().skip(1).any(|line| {
                let cols: Vec<&str> = line.split_whitespace().collect();
                cols.get(1).is_some_and(|l| l.ends_with(&local)) && cols.get(3) == Some(&"06")
            })
        })
    })
}

fn is_v6_wildcard(claim: &PortClaim) -> bool {
    claim.bind.is_ipv6() && claim.bind.ip().is_unspecified()
}

/// Errors that mean "this host has no IPv6", not "the port is taken".
fn ipv6_missing(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EAFNOSUPPORT) | Some(libc::EADDRNOTAVAIL) | Some(libc::EPROTONOSUPPORT)
    )
}

fn bind_one(claim: &PortClaim) -> io::Result<OwnedFd> {
    let fd = new_socket(claim.proto, claim.bind)?;
    set_int_option(&fd, libc::SOL_SOCKET, libc::SO_REUSEPORT, 1)?;
    // The address may be one that arrives later (--allow-nonlocal: a VIP);
    // whether it must be local now is the engine's check, not bind's.
    match claim.bind {
        SocketAddr::V4(_) => set_int_option(&fd, libc::IPPROTO_IP, libc::IP_FREEBIND, 1)?,
        SocketAddr::V6(_) => set_int_option(&fd, libc::IPPROTO_IPV6, libc::IPV6_FREEBIND, 1)?,
    }
    if claim.proto == Proto::Udp {
        drop_every_datagram(&fd)?;
    }
    socket::bind(fd.as_raw_fd(), &SockaddrStorage::from(claim.bind))?;
    Ok(fd)
}

/// A close-on-exec socket of `proto`'s type and `addr`'s family; IPv6
/// sockets are IPv6-only, so `[::]` never takes the IPv4 port as well.
fn new_socket(proto: Proto, addr: SocketAddr) -> io::Result<OwnedFd> {
    let family = match addr {
        SocketAddr::V4(_) => AddressFamily::Inet,
        SocketAddr::V6(_) => AddressFamily::Inet6,
    };
    let kind = match proto {
        Proto::Tcp => SockType::Stream,
        Proto::Udp => SockType::Datagram,
    };
    let fd = socket::socket(family, kind, SockFlag::SOCK_CLOEXEC, None)?;
    if addr.is_ipv6() {
        set_int_option(&fd, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 1)?;
    }
    Ok(fd)
}

/// Attaches a classic BPF program that accepts no packet: a UDP
/// reservation then never queues (or answers) what reaches it.
fn drop_every_datagram(fd: &OwnedFd) -> io::Result<()> {
    attach_drop_filter(fd.as_raw_fd())
}

fn attach_drop_filter(fd: std::os::fd::RawFd) -> io::Result<()> {
    let mut reject_all = [libc::sock_filter {
        code: (libc::BPF_RET | libc::BPF_K) as u16,
        jt: 0,
        jf: 0,
        k: 0,
    }];
    let program = libc::sock_fprog {
        len: 1,
        filter: reject_all.as_mut_ptr(),
    };
    // SAFETY: `program` points at a valid one-instruction filter that lives
    // across the call; the kernel copies it.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ATTACH_FILTER,
            (&program as *const libc::sock_fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A loopback socket for the relay on a reserved port: `addr` is 127.0.0.1
/// or ::1 with the reservation's port. It shares the port with the
/// reservation (`SO_REUSEPORT`, same user); TCP sets `SO_REUSEADDR` too so
/// the relayed connections it leaves in TIME-WAIT never keep the port from
/// being reserved again. Non-blocking, ready for tokio.
///
/// Beside a reservation on the same loopback address (a mapping published
/// on 127.0.0.1 only), only TCP may use a socket of its own: a TCP
/// connection goes to the listening socket, never to the bound-only
/// reservation. UDP would split datagrams between the two (see
/// [`Reservation::open_udp_for_relay`]).
pub enum LoopbackSocket {
    /// A listening TCP socket.
    Tcp(TcpListener),
    /// A bound UDP socket.
    Udp(UdpSocket),
}

/// Binds (and for TCP, listens on) the loopback side of a reserved port.
pub fn bind_loopback(proto: Proto, addr: SocketAddr) -> io::Result<LoopbackSocket> {
    let fd = new_socket(proto, addr)?;
    set_int_option(&fd, libc::SOL_SOCKET, libc::SO_REUSEPORT, 1)?;
    if proto == Proto::Tcp {
        set_int_option(&fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
    }
    socket::bind(fd.as_raw_fd(), &SockaddrStorage::from(addr))?;
    Ok(match proto {
        Proto::Tcp => {
            socket::listen(&fd, Backlog::new(128).map_err(io::Error::from)?)?;
            let listener = TcpListener::from(fd);
            listener.set_nonblocking(true)?;
            LoopbackSocket::Tcp(listener)
        }
        Proto::Udp => {
            let socket = UdpSocket::from(fd);
            socket.set_nonblocking(true)?;
            LoopbackSocket::Udp(socket)
        }
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

/// Finds which process holds `port` for `proto` (any address), from
/// `/proc/net/*` and `/proc/*/fd`: `pid 123 (nginx)`. Best effort.
pub fn find_owner(proto: Proto, port: u16) -> Option<String> {
    let inodes = SocketTable::read(&[proto]).inodes(proto, port).to_vec();
    if inodes.is_empty() {
        return None;
    }
    owners_of(&inodes)
        .into_values()
        .next()
        .or_else(|| Some("another process".into()))
}

/// The sockets that hold ports, read from `/proc/net/{tcp,tcp6,udp,udp6}`
/// once and indexed by protocol and port: TCP listeners (only they keep
/// binders out) and bound UDP sockets, as `socket:[inode]` names.
///
/// Reading the tables once per question made `status` quadratic: each read
/// holds every reserved socket, and `status` asked once per reserved port
/// (1,000 rules took 17 s).
#[derive(Debug, Default)]
pub struct SocketTable {
    by_port: HashMap<(Proto, u16), Vec<String>>,
}

impl SocketTable {
    /// Reads the tables of the given protocols.
    pub fn read(protos: &[Proto]) -> SocketTable {
        let mut table = SocketTable::default();
        for proto in protos {
            let files: &[&str] = match proto {
                Proto::Tcp => &["/proc/net/tcp", "/proc/net/tcp6"],
                Proto::Udp => &["/proc/net/udp", "/proc/net/udp6"],
            };
            for file in files {
                if let Ok(text) = fs::read_to_string(file) {
                    table.add_lines(*proto, &text);
                }
            }
        }
        table
    }

    fn add_lines(&mut self, proto: Proto, text: &str) {
        for line in text.lines().skip(1) {
            let mut cols = line.split_whitespace();
            let (Some(local), Some(state), Some(inode)) = (cols.nth(1), cols.nth(1), cols.nth(5))
            else {
                continue;
            };
            let Some(port) = local
                .rsplit(':')
                .next()
                .and_then(|hex| u16::from_str_radix(hex, 16).ok())
            else {
                continue;
            };
            let holds = proto == Proto::Udp || state == "0A";
            if holds && inode != "0" {
                self.by_port
                    .entry((proto, port))
                    .or_default()
                    .push(format!("socket:[{inode}]"));
            }
        }
    }

    /// The sockets holding `port` for `proto`.
    pub fn inodes(&self, proto: Proto, port: u16) -> &[String] {
        self.by_port
            .get(&(proto, port))
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }
}

/// The processes holding any of `inodes`, from one pass over `/proc/*/fd`:
/// inode → `pid 123 (nginx)`.
fn owners_of(inodes: &[String]) -> HashMap<String, String> {
    let wanted: HashSet<&str> = inodes.iter().map(String::as_str).collect();
    let mut found = HashMap::new();
    let Ok(procs) = fs::read_dir("/proc") else {
        return found;
    };
    for proc_entry in procs.flatten() {
        let pid = proc_entry.file_name().to_string_lossy().into_owned();
        if !pid.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(fds) = fs::read_dir(proc_entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(link) = fs::read_link(fd.path()) else {
                continue;
            };
            let link = link.to_string_lossy();
            if wanted.contains(link.as_ref()) && !found.contains_key(link.as_ref()) {
                let comm = fs::read_to_string(proc_entry.path().join("comm")).unwrap_or_default();
                found.insert(link.into_owned(), format!("pid {pid} ({})", comm.trim()));
            }
        }
        if found.len() == wanted.len() {
            break;
        }
    }
    found
}

/// For each of `ports`, another process's socket on it (any address,
/// either family) that is not one of `own` (socket inodes of this
/// process): `pid 123 (nginx)`, or "another process" when `/proc` does not
/// tell. Reads the socket tables once and `/proc/*/fd` at most once.
pub fn other_holders(ports: &[(Proto, u16)], own: &HashSet<String>) -> Vec<((Proto, u16), String)> {
    let table = SocketTable::read(&[Proto::Tcp, Proto::Udp]);
    let foreign: Vec<((Proto, u16), Vec<String>)> = ports
        .iter()
        .map(|&(proto, port)| {
            let inodes = table.inodes(proto, port);
            let others = inodes.iter().filter(|i| !own.contains(*i)).cloned();
            ((proto, port), others.collect::<Vec<_>>())
        })
        .filter(|(_, inodes)| !inodes.is_empty())
        .collect();
    if foreign.is_empty() {
        return Vec::new();
    }
    let all: Vec<String> = foreign.iter().flat_map(|(_, i)| i.clone()).collect();
    let owners = owners_of(&all);
    foreign
        .into_iter()
        .map(|(key, inodes)| {
            let owner = inodes.iter().find_map(|i| owners.get(i).cloned());
            (key, owner.unwrap_or_else(|| "another process".into()))
        })
        .collect()
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
        let free: SocketAddr = format!("127.0.0.1:{}", free_port(Proto::Tcp))
            .parse()
            .unwrap();
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
        assert_tcp_port_released(free);
    }

    /// Asserts that this process holds no socket on `addr`'s port: a fresh
    /// bind succeeds, or, when it fails, none of our own descriptors is
    /// bound there (on a busy machine another process may take a released
    /// port at once; that still proves ours let go). Our descriptors are
    /// asked directly with getsockname: a bound socket that never listened
    /// is in no `/proc/net` table.
    fn assert_tcp_port_released(addr: SocketAddr) {
        let Err(e) = TcpListener::bind(addr) else {
            return;
        };
        for entry in fs::read_dir("/proc/self/fd").unwrap() {
            let Ok(fd) = entry.unwrap().file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let Ok(local) = socket::getsockname::<SockaddrStorage>(fd) else {
                continue;
            };
            let port = local
                .as_sockaddr_in()
                .map(|a| a.port())
                .or_else(|| local.as_sockaddr_in6().map(|a| a.port()));
            assert_ne!(
                port,
                Some(addr.port()),
                "fd {fd} still holds port {} after release ({e})",
                addr.port()
            );
        }
    }

    /// A port that is free now and that the kernel never hands out on its
    /// own. Ports from `bind(:0)` and outgoing connections come from the
    /// ephemeral range (32768–60999), so a port picked there can be taken by
    /// a concurrent test's client socket between our release and re-bind
    /// (seen once in CI: "released on drop: Address already in use").
    fn free_port(proto: Proto) -> u16 {
        use std::sync::atomic::{AtomicU16, Ordering};
        static NEXT: AtomicU16 = AtomicU16::new(0);
        let base = 20_000 + (std::process::id() % 1_000) as u16 * 10;
        loop {
            let port = base + NEXT.fetch_add(1, Ordering::Relaxed) % 2_000;
            let free = match proto {
                Proto::Tcp => TcpListener::bind(("0.0.0.0", port)).is_ok(),
                Proto::Udp => UdpSocket::bind(("0.0.0.0", port)).is_ok(),
            };
            if free {
                return port;
            }
        }
    }

    #[test]
    fn a_reservation_keeps_binders_out_and_refuses_connections() {
        let port = free_port(Proto::Tcp);
        let held = bind_all(&[claim(&format!("0.0.0.0:{port}"), Proto::Tcp)]).unwrap();
        // std sets SO_REUSEADDR: still refused, on any address of the port.
        assert!(TcpListener::bind(("0.0.0.0", port)).is_err());
        assert!(TcpListener::bind(("127.0.0.1", port)).is_err());
        // Nothing listens: a connection is reset at the handshake.
        let err = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused, "{err}");
        drop(held);
        assert_tcp_port_released(SocketAddr::from(([0, 0, 0, 0], port)));
    }

    #[test]
    fn a_port_held_by_time_wait_says_so_and_when_it_frees() {
        use std::io::Read;
        let port = free_port(Proto::Tcp);
        let listener = TcpListener::bind(("127.0.0.1", port)).unwrap();
        let client = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (server, _) = listener.accept().unwrap();
        // The server side closes first: its end (local port `port`) waits.
        drop(server);
        let mut buf = [0u8; 1];
        let _ = (&client).read(&mut buf);
        drop(client);
        drop(listener);
        let err = bind_all(&[claim(&format!("0.0.0.0:{port}"), Proto::Tcp)]).unwrap_err();
        assert!(err.message.contains("TIME-WAIT"), "{}", err.message);
        assert!(
            !err.message.contains("stop that service"),
            "{}",
            err.message
        );
    }

    #[test]
    fn a_udp_reservation_answers_nothing_and_keeps_binders_out() {
        let port = free_port(Proto::Udp);
        let held = bind_all(&[claim(&format!("0.0.0.0:{port}"), Proto::Udp)]).unwrap();
        assert!(UdpSocket::bind(("127.0.0.1", port)).is_err());
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        client
            .set_read_timeout(Some(std::time::Duration::from_millis(200)))
            .unwrap();
        client.send_to(b"ping", ("127.0.0.1", port)).unwrap();
        let mut buf = [0u8; 16];
        assert!(client.recv_from(&mut buf).is_err(), "no answer, no echo");
        drop(held);
    }

    #[test]
    fn the_loopback_relay_shares_a_wildcard_reservation_and_others_do_not() {
        for proto in [Proto::Tcp, Proto::Udp] {
            let port = free_port(proto);
            let held = bind_all(&[claim(&format!("0.0.0.0:{port}"), proto)]).unwrap();
            let lo = bind_loopback(proto, format!("127.0.0.1:{port}").parse().unwrap())
                .expect("the relay binds loopback beside the reservation");
            let other = match proto {
                Proto::Tcp => TcpListener::bind(("127.0.0.2", port)).map(|_| ()),
                Proto::Udp => UdpSocket::bind(("127.0.0.2", port)).map(|_| ()),
            };
            assert!(other.is_err(), "{proto}: another process got the port");
            drop((lo, held));
        }
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
