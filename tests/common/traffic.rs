//! Real traffic: echo servers in a namespace, TCP/UDP probes from another,
//! and the `expect_*` assertions on what got through (after NAT).

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::*;

/// Default time a positive probe (connect + read the reply) may take.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// Time a negative probe ([`expect_no_tcp`], [`expect_no_udp`]) waits before
/// concluding that traffic does not get through.
pub const NEGATIVE_TIMEOUT: Duration = Duration::from_secs(1);

/// The reply line an echo server sends: `"<peer_ip> <local_port>"`, where
/// peer_ip is how the server sees the client (after any SNAT/MASQUERADE)
/// and local_port the port it was reached on (after any DNAT).
pub fn echo_reply(peer_ip: IpAddr, local_port: u16) -> String {
    format!("{} {local_port}", peer_ip.to_canonical())
}

/// A TCP server in a namespace: for every connection it writes one line
/// `"<peer_ip> <local_port>\n"` and closes. Runs on a background thread
/// until dropped; drop stops the thread and closes the listener (later
/// connections are refused).
///
/// Bind to a concrete address or to `0.0.0.0` / `[::]` (dual stack); port 0
/// picks a free port, see [`TcpEcho::addr`].
pub struct TcpEcho {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    connections: Arc<AtomicUsize>,
    thread: Option<JoinHandle<()>>,
}

impl TcpEcho {
    /// Listens on `bind` inside `ns`; panics if the bind fails.
    pub fn start(ns: &Netns, bind: SocketAddr) -> TcpEcho {
        let listener = in_netns(ns, || TcpListener::bind(bind))
            .unwrap_or_else(|e| panic!("[netns {}] TcpEcho bind {bind}: {e}", ns.name));
        listener.set_nonblocking(true).expect("set_nonblocking");
        let addr = listener.local_addr().expect("local_addr");
        let stop = Arc::new(AtomicBool::new(false));
        let connections = Arc::new(AtomicUsize::new(0));
        let thread = {
            let stop = stop.clone();
            let connections = connections.clone();
            let ns_name = ns.name.clone();
            std::thread::Builder::new()
                .name(format!("tcp-echo-{addr}"))
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        match listener.accept() {
                            Ok((mut stream, peer)) => {
                                let _ = stream.set_nonblocking(false);
                                let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
                                let port = stream.local_addr().map(|a| a.port()).unwrap_or(0);
                                let line = format!("{}\n", echo_reply(peer.ip(), port));
                                let _ = stream.write_all(line.as_bytes());
                                connections.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                                std::thread::sleep(Duration::from_millis(5))
                            }
                            Err(e) => {
                                eprintln!("[netns {ns_name}] TcpEcho {addr} accept: {e}");
                                std::thread::sleep(Duration::from_millis(20));
                            }
                        }
                    }
                })
                .expect("spawn TcpEcho thread")
        };
        TcpEcho {
            addr,
            stop,
            connections,
            thread: Some(thread),
        }
    }

    /// The bound address (with the real port if 0 was asked for).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The bound port.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// How many connections were answered so far.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }
}

impl Drop for TcpEcho {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A UDP server in a namespace: every datagram is answered with
/// `"<peer_ip> <local_port>"` sent back to the sender. Runs until dropped.
///
/// Note: a socket bound to a wildcard address answers from whatever source
/// address the routing table picks; on a host with several addresses a
/// client that sent to another one drops the reply. Bind to the concrete
/// address being tested when the namespace has more than one (the router),
/// the servers have one address per family so wildcard is fine there.
pub struct UdpEcho {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    datagrams: Arc<AtomicUsize>,
    thread: Option<JoinHandle<()>>,
}

impl UdpEcho {
    /// Binds `bind` inside `ns`; panics if the bind fails.
    pub fn start(ns: &Netns, bind: SocketAddr) -> UdpEcho {
        let socket = in_netns(ns, || UdpSocket::bind(bind))
            .unwrap_or_else(|e| panic!("[netns {}] UdpEcho bind {bind}: {e}", ns.name));
        socket
            .set_read_timeout(Some(Duration::from_millis(20)))
            .expect("set_read_timeout");
        let addr = socket.local_addr().expect("local_addr");
        let stop = Arc::new(AtomicBool::new(false));
        let datagrams = Arc::new(AtomicUsize::new(0));
        let thread = {
            let stop = stop.clone();
            let datagrams = datagrams.clone();
            let ns_name = ns.name.clone();
            std::thread::Builder::new()
                .name(format!("udp-echo-{addr}"))
                .spawn(move || {
                    let mut buf = [0u8; 2048];
                    while !stop.load(Ordering::Relaxed) {
                        match socket.recv_from(&mut buf) {
                            Ok((_, peer)) => {
                                let reply = echo_reply(peer.ip(), addr.port());
                                if let Err(e) = socket.send_to(reply.as_bytes(), peer) {
                                    eprintln!(
                                        "[netns {ns_name}] UdpEcho {addr} reply to {peer}: {e}"
                                    );
                                }
                                datagrams.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(e)
                                if matches!(
                                    e.kind(),
                                    ErrorKind::WouldBlock | ErrorKind::TimedOut
                                ) => {}
                            // ICMP errors from earlier replies surface here; ignore.
                            Err(e) if e.kind() == ErrorKind::ConnectionRefused => {}
                            Err(e) => {
                                eprintln!("[netns {ns_name}] UdpEcho {addr} recv: {e}");
                                std::thread::sleep(Duration::from_millis(20));
                            }
                        }
                    }
                })
                .expect("spawn UdpEcho thread")
        };
        UdpEcho {
            addr,
            stop,
            datagrams,
            thread: Some(thread),
        }
    }

    /// The bound address (with the real port if 0 was asked for).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The bound port.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// How many datagrams were answered so far.
    pub fn datagrams(&self) -> usize {
        self.datagrams.load(Ordering::Relaxed)
    }
}

impl Drop for UdpEcho {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Connects from inside `ns` to `target` (source address chosen by the
/// kernel), reads the echo line and returns it trimmed, e.g.
/// `"192.0.2.2 25"`. Bounded by [`PROBE_TIMEOUT`].
pub fn tcp_probe(ns: &Netns, target: SocketAddr) -> Result<String, String> {
    tcp_probe_opts(ns, None, target, PROBE_TIMEOUT)
}

/// Like [`tcp_probe`] but binds the client socket to `bind_src` (port 0)
/// first, e.g. to connect from the router's external address.
pub fn tcp_probe_from(ns: &Netns, bind_src: IpAddr, target: SocketAddr) -> Result<String, String> {
    tcp_probe_opts(ns, Some(bind_src), target, PROBE_TIMEOUT)
}

/// The general TCP probe: optional source address, explicit overall timeout
/// (connect + read).
pub fn tcp_probe_opts(
    ns: &Netns,
    bind_src: Option<IpAddr>,
    target: SocketAddr,
    timeout: Duration,
) -> Result<String, String> {
    let ctx = match bind_src {
        Some(src) => format!("tcp from netns {} (src {src}) to {target}", ns.name),
        None => format!("tcp from netns {} to {target}", ns.name),
    };
    let deadline = Instant::now() + timeout;
    let mut stream = in_netns(ns, || match bind_src {
        None => TcpStream::connect_timeout(&target, timeout),
        Some(src) => connect_from(src, target, timeout),
    })
    .map_err(|e| format!("{ctx}: connect: {e}"))?;
    let left = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(10));
    stream
        .set_read_timeout(Some(left))
        .map_err(|e| format!("{ctx}: set_read_timeout: {e}"))?;
    let mut reply = String::new();
    match stream.read_to_string(&mut reply) {
        Ok(_) if !reply.is_empty() => Ok(reply.trim().to_string()),
        Ok(_) => Err(format!(
            "{ctx}: connected, but the peer closed without a reply"
        )),
        Err(e) => Err(format!("{ctx}: read: {e} (got so far: {reply:?})")),
    }
}

/// `connect_timeout` with the local address bound first (std cannot do that).
fn connect_from(src: IpAddr, target: SocketAddr, timeout: Duration) -> std::io::Result<TcpStream> {
    use nix::sys::socket::{
        bind, connect, getsockopt, socket, sockopt, AddressFamily, SockFlag, SockType,
        SockaddrStorage,
    };
    let family = if target.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd = socket(
        family,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    bind(
        fd.as_raw_fd(),
        &SockaddrStorage::from(SocketAddr::new(src, 0)),
    )?;
    match connect(fd.as_raw_fd(), &SockaddrStorage::from(target)) {
        Ok(()) => {}
        Err(nix::errno::Errno::EINPROGRESS) => {
            let mut pfd = libc::pollfd {
                fd: fd.as_raw_fd(),
                events: libc::POLLOUT,
                revents: 0,
            };
            let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
            // SAFETY: one valid pollfd, count 1.
            let n = unsafe { libc::poll(&mut pfd, 1, ms) };
            if n < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if n == 0 {
                return Err(std::io::Error::new(
                    ErrorKind::TimedOut,
                    "connection timed out",
                ));
            }
            let err = getsockopt(&fd, sockopt::SocketError)?;
            if err != 0 {
                return Err(std::io::Error::from_raw_os_error(err));
            }
        }
        Err(e) => return Err(e.into()),
    }
    let stream = TcpStream::from(fd);
    stream.set_nonblocking(false)?;
    Ok(stream)
}

/// Sends one datagram from inside `ns` to `target` and waits (up to
/// [`PROBE_TIMEOUT`]) for the echo reply, returned trimmed.
pub fn udp_probe(ns: &Netns, target: SocketAddr) -> Result<String, String> {
    udp_probe_opts(ns, None, target, PROBE_TIMEOUT)
}

/// Like [`udp_probe`] but sends from `bind_src` (port 0).
pub fn udp_probe_from(ns: &Netns, bind_src: IpAddr, target: SocketAddr) -> Result<String, String> {
    udp_probe_opts(ns, Some(bind_src), target, PROBE_TIMEOUT)
}

/// The general UDP probe. The client socket is `connect`ed to `target`, so
/// a reply from any other address is ignored (as a real client would) and
/// an ICMP port-unreachable shows up as "connection refused".
pub fn udp_probe_opts(
    ns: &Netns,
    bind_src: Option<IpAddr>,
    target: SocketAddr,
    timeout: Duration,
) -> Result<String, String> {
    let ctx = format!("udp from netns {} to {target}", ns.name);
    let src = bind_src.unwrap_or(match target {
        SocketAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        SocketAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    });
    let socket = in_netns(ns, || UdpSocket::bind(SocketAddr::new(src, 0)))
        .map_err(|e| format!("{ctx}: bind {src}: {e}"))?;
    socket
        .connect(target)
        .map_err(|e| format!("{ctx}: connect: {e}"))?;
    socket
        .set_read_timeout(Some(timeout))
        .map_err(|e| format!("{ctx}: set_read_timeout: {e}"))?;
    socket
        .send(b"probe")
        .map_err(|e| format!("{ctx}: send: {e}"))?;
    let mut buf = [0u8; 2048];
    match socket.recv(&mut buf) {
        Ok(n) => Ok(String::from_utf8_lossy(&buf[..n]).trim().to_string()),
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
            Err(format!("{ctx}: no reply within {timeout:?}"))
        }
        Err(e) => Err(format!("{ctx}: recv: {e}")),
    }
}

/// Asserts that a TCP connection from `ns` to `target` is answered by an
/// echo server that saw the client as `expected_peer_ip` and was reached on
/// `expected_port` (both after NAT).
#[track_caller]
pub fn expect_tcp(
    ns: &Netns,
    target: SocketAddr,
    expected_peer_ip: impl Into<IpAddr>,
    expected_port: u16,
) {
    let expected = echo_reply(expected_peer_ip.into(), expected_port);
    check_reply(
        "expect_tcp",
        &ns.name,
        target,
        &expected,
        tcp_probe(ns, target),
    );
}

/// [`expect_tcp`] with the client socket bound to `bind_src`.
#[track_caller]
pub fn expect_tcp_from(
    ns: &Netns,
    bind_src: impl Into<IpAddr>,
    target: SocketAddr,
    expected_peer_ip: impl Into<IpAddr>,
    expected_port: u16,
) {
    let expected = echo_reply(expected_peer_ip.into(), expected_port);
    let got = tcp_probe_from(ns, bind_src.into(), target);
    check_reply("expect_tcp_from", &ns.name, target, &expected, got);
}

/// UDP counterpart of [`expect_tcp`].
#[track_caller]
pub fn expect_udp(
    ns: &Netns,
    target: SocketAddr,
    expected_peer_ip: impl Into<IpAddr>,
    expected_port: u16,
) {
    let expected = echo_reply(expected_peer_ip.into(), expected_port);
    check_reply(
        "expect_udp",
        &ns.name,
        target,
        &expected,
        udp_probe(ns, target),
    );
}

/// UDP counterpart of [`expect_tcp_from`].
#[track_caller]
pub fn expect_udp_from(
    ns: &Netns,
    bind_src: impl Into<IpAddr>,
    target: SocketAddr,
    expected_peer_ip: impl Into<IpAddr>,
    expected_port: u16,
) {
    let expected = echo_reply(expected_peer_ip.into(), expected_port);
    let got = udp_probe_from(ns, bind_src.into(), target);
    check_reply("expect_udp_from", &ns.name, target, &expected, got);
}

#[track_caller]
fn check_reply(
    what: &str,
    ns: &str,
    target: SocketAddr,
    expected: &str,
    got: Result<String, String>,
) {
    match got {
        Ok(reply) if reply == expected => {}
        Ok(reply) => panic!(
            "{what}: from netns {ns} to {target}: reached an echo server, but it replied \
             {reply:?} instead of {expected:?} (\"<peer ip as the server saw it> <port it was \
             reached on>\")"
        ),
        // `e` already names the namespace and the target.
        Err(e) => panic!("{what}: expected reply {expected:?}, but {e}"),
    }
}

/// Asserts that a TCP connection from `ns` to `target` does NOT get an echo
/// reply within [`NEGATIVE_TIMEOUT`] (refused, unreachable or timed out).
#[track_caller]
pub fn expect_no_tcp(ns: &Netns, target: SocketAddr) {
    if let Ok(reply) = tcp_probe_opts(ns, None, target, NEGATIVE_TIMEOUT) {
        panic!("expect_no_tcp: from netns {} to {target}: expected no connection, but got reply {reply:?}", ns.name);
    }
}

/// Asserts that a UDP datagram from `ns` to `target` gets no reply within
/// [`NEGATIVE_TIMEOUT`].
#[track_caller]
pub fn expect_no_udp(ns: &Netns, target: SocketAddr) {
    if let Ok(reply) = udp_probe_opts(ns, None, target, NEGATIVE_TIMEOUT) {
        panic!(
            "expect_no_udp: from netns {} to {target}: expected no reply, but got {reply:?}",
            ns.name
        );
    }
}

/// True if a socket of `proto` ("tcp"/"udp") cannot be bound to `addr` in
/// `ns` because it is in use (natmap holds it); false if the bind works.
/// Panics on any other error (e.g. the address does not exist).
pub fn port_is_held(ns: &Netns, proto: &str, addr: SocketAddr) -> bool {
    let result = in_netns(ns, || match proto {
        "udp" => UdpSocket::bind(addr).map(drop),
        _ => TcpListener::bind(addr).map(drop),
    });
    match result {
        Ok(()) => false,
        Err(e) if e.kind() == ErrorKind::AddrInUse => true,
        Err(e) => panic!("[netns {}] bind {proto} {addr}: {e}", ns.name),
    }
}
