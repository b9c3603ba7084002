//! Drift by events: the kernel tells natmap when its nftables state may
//! have changed, instead of natmap listing its tables every 2 s.
//!
//! A [`Watcher`] thread holds a `NETLINK_NETFILTER` socket in the daemon's
//! network namespace, joined to the multicast group `NFNLGRP_NFTABLES`.
//! Every committed nf_tables transaction sends, in the committing task's
//! context, one message per object it touched (`NFT_MSG_NEW*`/`DEL*` of
//! tables, chains, rules, sets, elements, …) and then one
//! `NFT_MSG_NEWGEN` carrying the committing task's pid
//! (`NFTA_GEN_PROC_PID`) and name. The watcher collects which families of
//! natmap's state the objects touched — natmap's tables (`ip natmap`,
//! `ip6 natmap`) and the `DOCKER-USER` chain of iptables-nft's `filter`
//! table, where natmap keeps its connmark accept — and at the generation
//! reports each such family once ([`Change`]), unless the generation is
//! natmap's own ([`is_own`]): its own batches (a thread of the daemon), or
//! an `nft`/`iptables` it ran ([`spawned`]). Reporting its own changes
//! would make every repair trigger another check.
//!
//! A report waits in the engine until the engine takes it
//! ([`Change::take`]); until then further changes of that family are
//! folded into it (a burst of outside changes is one check).
//!
//! When the socket overruns (`ENOBUFS`: more notifications than its
//! buffer, e.g. a 20,000-element table rebuilt) some messages are lost, so
//! both families are reported: it fails toward checking.
//!
//! Not seen here: a `DOCKER-USER` of iptables-legacy (not nf_tables); the
//! engine's slow periodic check ([`safety_net`]) still covers it.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::model::Family;

use super::render::TABLE;

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNLGRP_NFTABLES: u32 = 7;
const NFT_MSG_DELTABLE: u16 = 2;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_DELCHAIN: u16 = 5;
const NFT_MSG_NEWRULE: u16 = 6;
const NFT_MSG_DELRULE: u16 = 8;
const NFT_MSG_NEWGEN: u16 = 15;
/// The table's name: attribute 1 of every object message (`NFTA_TABLE_NAME`,
/// `NFTA_CHAIN_TABLE`, `NFTA_RULE_TABLE`, `NFTA_SET_TABLE`,
/// `NFTA_SET_ELEM_LIST_TABLE`, `NFTA_OBJ_TABLE`, `NFTA_FLOWTABLE_TABLE`).
const ATTR_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_GEN_ID: u16 = 1;
const NFTA_GEN_PROC_PID: u16 = 2;
const NFTA_GEN_PROC_NAME: u16 = 3;
const NFPROTO_IPV4: u8 = 2;
const NFPROTO_IPV6: u8 = 10;
/// iptables-nft's table of `DOCKER-USER`, and the chain.
const FILTER: &str = "filter";
const DOCKER_USER: &str = "DOCKER-USER";
/// Room for bursts: a table rebuilt with thousands of elements sends one
/// notification per element (the kernel grants root more than rmem_max).
const RECEIVE_BUFFER: libc::c_int = 8 << 20;

/// How often the engine still lists natmap's tables while a watcher
/// reports changes: a safety net for what events cannot show (an
/// iptables-legacy `DOCKER-USER`, a watcher that died). 30 s by default;
/// `NATMAP_NFT_SAFETY_NET_SECS` sets it (tests make it long, to see that
/// events alone repair).
pub fn safety_net() -> Duration {
    static SECS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    Duration::from_secs(*SECS.get_or_init(|| {
        std::env::var("NATMAP_NFT_SAFETY_NET_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(30)
    }))
}

/// Pids of the firewall tools natmap ran lately, with when: their changes
/// are natmap's own. Kept a minute (a notification is read after the tool
/// has exited), so pid reuse within a minute is the only confusion left.
static SPAWNED: Mutex<VecDeque<(u32, Instant)>> = Mutex::new(VecDeque::new());
/// Netlink port ids of natmap's own sockets that write nftables.
static OWN_PORTS: Mutex<Vec<u32>> = Mutex::new(Vec::new());
const SPAWNED_KEPT: Duration = Duration::from_secs(60);
/// At most this many (the iptables backend runs a tool per change).
const SPAWNED_MAX: usize = 1024;

/// Notes a firewall tool natmap started (`nft`, `iptables`): its
/// transactions are natmap's own.
pub fn spawned(pid: u32) {
    let mut list = SPAWNED.lock().unwrap_or_else(|p| p.into_inner());
    let now = Instant::now();
    while list.len() >= SPAWNED_MAX
        || list
            .front()
            .is_some_and(|(_, at)| now.duration_since(*at) > SPAWNED_KEPT)
    {
        list.pop_front();
    }
    list.push_back((pid, now));
}

/// Notes the port id of a netlink socket natmap writes nftables with.
pub fn own_socket(port: u32) {
    let mut ports = OWN_PORTS.lock().unwrap_or_else(|p| p.into_inner());
    if !ports.contains(&port) {
        ports.push(port);
    }
}

/// Whether a generation committed by task `pid` (the kernel's pid: a
/// thread id) through netlink port `port` is natmap's own: a thread of
/// this process, a tool it ran, or one of its sockets. The port catches
/// the same in a pid namespace, where the kernel's pid is not ours (a
/// tool's port id is its pid as we see it).
pub fn is_own(pid: Option<u32>, port: u32) -> bool {
    if let Some(pid) = pid {
        if pid == std::process::id()
            || std::path::Path::new(&format!("/proc/self/task/{pid}")).exists()
        {
            return true;
        }
    }
    let spawned = SPAWNED.lock().unwrap_or_else(|p| p.into_inner());
    if spawned
        .iter()
        .any(|&(p, _)| Some(p) == pid || (port != 0 && p == port))
    {
        return true;
    }
    port != 0
        && OWN_PORTS
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&port)
}

/// "natmap's nftables state of `family` may have changed": the engine
/// checks it and repairs what differs.
#[derive(Debug)]
pub struct Change {
    family: Family,
    /// Set while this report waits in the engine (further changes of the
    /// family fold into it).
    waiting: Arc<AtomicBool>,
}

impl Change {
    /// The family to check.
    pub fn family(&self) -> Family {
        self.family
    }

    /// The engine takes the report: a change from now on is reported
    /// again. Call before reading the kernel.
    pub fn take(&self) {
        self.waiting.store(false, Ordering::SeqCst);
    }
}

/// What one generation touched, gathered from its object messages.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Touched([bool; 2]);

impl Touched {
    fn families(&self) -> Vec<Family> {
        Family::ALL
            .into_iter()
            .filter(|&f| self.0[index(f)])
            .collect()
    }
}

fn index(f: Family) -> usize {
    match f {
        Family::V4 => 0,
        Family::V6 => 1,
    }
}

/// A generation that touched natmap's state, as the watcher reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Generation {
    families: Vec<Family>,
    id: u32,
    pid: Option<u32>,
    name: String,
    port: u32,
}

/// Reads a stream of nf_tables notifications.
#[derive(Debug, Default)]
struct Reader {
    touched: Touched,
}

impl Reader {
    /// Reads one buffer of netlink messages; the generations in it that
    /// touched natmap's state, in order.
    fn read(&mut self, mut buf: &[u8]) -> Vec<Generation> {
        let mut out = Vec::new();
        while buf.len() >= 16 {
            let len = u32::from_ne_bytes(buf[0..4].try_into().expect("4 bytes")) as usize;
            if len < 16 || len > buf.len() {
                break;
            }
            let ty = u16::from_ne_bytes(buf[4..6].try_into().expect("2 bytes"));
            let port = u32::from_ne_bytes(buf[12..16].try_into().expect("4 bytes"));
            if let Some(g) = self.message(ty, port, &buf[16..len]) {
                out.push(g);
            }
            buf = &buf[crate::netlink::align(len).min(buf.len())..];
        }
        out
    }

    /// One message (after its netlink header).
    fn message(&mut self, ty: u16, port: u32, body: &[u8]) -> Option<Generation> {
        if ty >> 8 != NFNL_SUBSYS_NFTABLES || body.len() < 4 {
            return None;
        }
        let msg = ty & 0xff;
        let attrs = Attrs(&body[4..]);
        if msg == NFT_MSG_NEWGEN {
            let touched = std::mem::take(&mut self.touched);
            if touched == Touched::default() {
                return None;
            }
            let be32 = |a: Option<&[u8]>| {
                a.and_then(|v| v.get(..4))
                    .map(|v| u32::from_be_bytes(v.try_into().expect("4 bytes")))
            };
            return Some(Generation {
                families: touched.families(),
                id: be32(attrs.get(NFTA_GEN_ID)).unwrap_or(0),
                pid: be32(attrs.get(NFTA_GEN_PROC_PID)),
                name: attrs.string(NFTA_GEN_PROC_NAME).unwrap_or_default(),
                port,
            });
        }
        let family = match body[0] {
            NFPROTO_IPV4 => Family::V4,
            NFPROTO_IPV6 => Family::V6,
            _ => return None,
        };
        let table = attrs.string(ATTR_TABLE)?;
        let ours = if table == TABLE {
            true
        } else if table == FILTER {
            let chain = match msg {
                NFT_MSG_NEWCHAIN | NFT_MSG_DELCHAIN => attrs.string(NFTA_CHAIN_NAME),
                NFT_MSG_NEWRULE | NFT_MSG_DELRULE => attrs.string(NFTA_RULE_CHAIN),
                _ => None,
            };
            msg == NFT_MSG_DELTABLE || chain.as_deref() == Some(DOCKER_USER)
        } else {
            false
        };
        if ours {
            self.touched.0[index(family)] = true;
        }
        None
    }

    /// Messages were lost: whatever was gathered is unreliable.
    fn overrun(&mut self) {
        self.touched = Touched::default();
    }
}

/// The attributes of one message.
struct Attrs<'a>(&'a [u8]);

impl<'a> Attrs<'a> {
    fn get(&self, want: u16) -> Option<&'a [u8]> {
        crate::netlink::attrs(self.0)
            .find(|(ty, _)| *ty == want)
            .map(|(_, v)| v)
    }

    fn string(&self, want: u16) -> Option<String> {
        let v = self.get(want)?;
        let v = v.split(|&b| b == 0).next().unwrap_or(v);
        Some(String::from_utf8_lossy(v).into_owned())
    }
}

/// The watcher thread; stops (and is joined) when dropped.
pub struct Watcher {
    /// Closing it wakes the thread, which then ends.
    stop: Option<OwnedFd>,
    thread: Option<std::thread::JoinHandle<()>>,
    running: Arc<AtomicBool>,
}

impl Watcher {
    /// Opens the socket (in the caller's network namespace) and starts
    /// the thread. `report` gets each change; once it returns false (the
    /// engine is gone) the thread ends.
    pub fn start(report: impl Fn(Change) -> bool + Send + 'static) -> io::Result<Watcher> {
        Watcher::start_on(subscribe(RECEIVE_BUFFER)?, report)
    }

    /// [`Watcher::start`] on a socket from [`subscribe`].
    fn start_on(
        socket: OwnedFd,
        report: impl Fn(Change) -> bool + Send + 'static,
    ) -> io::Result<Watcher> {
        let mut pipe = [0; 2];
        // SAFETY: pipe2 fills the two descriptors on success, checked.
        if unsafe { libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both fresh descriptors, owned by nobody else.
        let (wake, stop) =
            unsafe { (OwnedFd::from_raw_fd(pipe[0]), OwnedFd::from_raw_fd(pipe[1])) };
        let running = Arc::new(AtomicBool::new(true));
        let alive = running.clone();
        let thread = std::thread::Builder::new()
            .name("natmap-nft-events".into())
            .spawn(move || {
                watch(&socket, &wake, &report);
                alive.store(false, Ordering::SeqCst);
            })?;
        Ok(Watcher {
            stop: Some(stop),
            thread: Some(thread),
            running,
        })
    }

    /// True while the thread reports changes (false once it ended, e.g.
    /// on a socket error): the engine then checks every tick again.
    pub fn running(&self) -> Arc<AtomicBool> {
        self.running.clone()
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        // The thread sees the pipe's other end hang up.
        self.stop.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A `NETLINK_NETFILTER` socket joined to `NFNLGRP_NFTABLES`, non-blocking.
fn subscribe(buffer: libc::c_int) -> io::Result<OwnedFd> {
    use crate::netlink::set_int_option;
    let fd = crate::netlink::open_netfilter(None)?;
    crate::netlink::set_nonblocking(&fd)?;
    set_int_option(
        &fd,
        libc::SOL_NETLINK,
        libc::NETLINK_ADD_MEMBERSHIP,
        NFNLGRP_NFTABLES as libc::c_int,
    )?;
    // Force (root) past rmem_max; without the privilege, what is allowed.
    if set_int_option(&fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, buffer).is_err() {
        let _ = set_int_option(&fd, libc::SOL_SOCKET, libc::SO_RCVBUF, buffer);
    }
    Ok(fd)
}

/// The thread: waits for notifications or the stop, reads them, reports.
fn watch(socket: &OwnedFd, stop: &OwnedFd, report: &dyn Fn(Change) -> bool) {
    let waiting = [
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
    ];
    // One report per family until the engine takes it.
    let send = |family: Family| -> bool {
        let flag = &waiting[index(family)];
        if flag.swap(true, Ordering::SeqCst) {
            return true;
        }
        report(Change {
            family,
            waiting: flag.clone(),
        })
    };
    let mut reader = Reader::default();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let mut fds = [
            libc::pollfd {
                fd: socket.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: two valid pollfds of our own descriptors.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            tracing::error!(
                "nftables events: poll failed ({e}); natmap's rules are checked every tick instead"
            );
            return;
        }
        if fds[1].revents != 0 {
            return;
        }
        // Everything queued, then back to poll.
        loop {
            // SAFETY: receiving into our own buffer of the given length.
            let n = unsafe {
                libc::recv(
                    socket.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EAGAIN) => break,
                    Some(libc::EINTR) => continue,
                    Some(libc::ENOBUFS) => {
                        tracing::debug!(
                            "nftables events overran the socket; checking both families"
                        );
                        reader.overrun();
                        for family in Family::ALL {
                            if !send(family) {
                                return;
                            }
                        }
                        continue;
                    }
                    _ => {
                        tracing::error!(
                            "nftables events: reading failed ({e}); natmap's rules are checked every tick instead"
                        );
                        return;
                    }
                }
            }
            for g in reader.read(&buf[..n as usize]) {
                if is_own(g.pid, g.port) {
                    tracing::trace!(generation = g.id, pid = ?g.pid, "natmap's own nftables change");
                    continue;
                }
                for family in g.families {
                    tracing::info!(
                        generation = g.id,
                        "natmap's {family} nftables state changed by pid {} ({}); checking it",
                        g.pid.map_or_else(|| "?".to_owned(), |p| p.to_string()),
                        g.name
                    );
                    if !send(family) {
                        return;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::netlink::{attr, message};
    use super::*;

    const NEWSETELEM: u16 = 12;
    const NEWTABLE: u16 = 0;

    fn object(buf: &mut Vec<u8>, msg: u16, nfproto: u8, port: u32, attrs: &[(u16, &str)]) {
        let start = buf.len();
        message(buf, (NFNL_SUBSYS_NFTABLES << 8) | msg, 0, 0, nfproto, |b| {
            for (ty, v) in attrs {
                let mut s = v.as_bytes().to_vec();
                s.push(0);
                attr(b, *ty, &s);
            }
        });
        buf[start + 12..start + 16].copy_from_slice(&port.to_ne_bytes());
    }

    fn generation(buf: &mut Vec<u8>, id: u32, pid: u32, name: &str, port: u32) {
        let start = buf.len();
        message(
            buf,
            (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWGEN,
            0,
            0,
            0,
            |b| {
                attr(b, NFTA_GEN_ID, &id.to_be_bytes());
                attr(b, NFTA_GEN_PROC_PID, &pid.to_be_bytes());
                let mut s = name.as_bytes().to_vec();
                s.push(0);
                attr(b, NFTA_GEN_PROC_NAME, &s);
            },
        );
        buf[start + 12..start + 16].copy_from_slice(&port.to_ne_bytes());
    }

    #[test]
    fn a_generation_touching_natmaps_tables_is_one_report_per_family() {
        let mut b = Vec::new();
        object(
            &mut b,
            NEWSETELEM,
            NFPROTO_IPV4,
            77,
            &[(1, "natmap"), (2, "dnat_port")],
        );
        object(
            &mut b,
            NEWSETELEM,
            NFPROTO_IPV4,
            77,
            &[(1, "natmap"), (2, "fwd_port")],
        );
        object(
            &mut b,
            NFT_MSG_DELRULE,
            NFPROTO_IPV6,
            77,
            &[(1, "natmap"), (2, "prerouting")],
        );
        generation(&mut b, 9, 4242, "nft", 77);
        let g = Reader::default().read(&b);
        assert_eq!(
            g,
            [Generation {
                families: vec![Family::V4, Family::V6],
                id: 9,
                pid: Some(4242),
                name: "nft".into(),
                port: 77,
            }]
        );
    }

    #[test]
    fn only_docker_user_of_iptables_filter_counts() {
        let mut r = Reader::default();
        let mut b = Vec::new();
        object(
            &mut b,
            NFT_MSG_NEWRULE,
            NFPROTO_IPV4,
            5,
            &[(1, "filter"), (2, "FORWARD")],
        );
        object(&mut b, NEWTABLE, NFPROTO_IPV4, 5, &[(1, "filter")]);
        object(
            &mut b,
            NFT_MSG_NEWRULE,
            NFPROTO_IPV4,
            5,
            &[(1, "nat"), (2, "DOCKER-USER")],
        );
        object(&mut b, NEWSETELEM, 1, 5, &[(1, "natmap")]); // inet: not natmap's
        generation(&mut b, 1, 100, "iptables", 5);
        assert!(r.read(&b).is_empty(), "nothing of natmap's");

        let mut b = Vec::new();
        object(
            &mut b,
            NFT_MSG_DELRULE,
            NFPROTO_IPV6,
            5,
            &[(1, "filter"), (2, "DOCKER-USER")],
        );
        generation(&mut b, 2, 100, "ip6tables", 5);
        let g = r.read(&b);
        assert_eq!(g.len(), 1);
        assert_eq!(g[0].families, [Family::V6]);

        let mut b = Vec::new();
        object(
            &mut b,
            NFT_MSG_DELCHAIN,
            NFPROTO_IPV4,
            5,
            &[(1, "filter"), (3, "DOCKER-USER")],
        );
        generation(&mut b, 3, 100, "iptables", 5);
        assert_eq!(r.read(&b)[0].families, [Family::V4]);
    }

    #[test]
    fn an_overrun_drops_what_was_gathered() {
        let mut r = Reader::default();
        let mut b = Vec::new();
        object(&mut b, NEWSETELEM, NFPROTO_IPV4, 5, &[(1, "natmap")]);
        assert!(r.read(&b).is_empty());
        r.overrun();
        let mut b = Vec::new();
        generation(&mut b, 4, 100, "nft", 5);
        assert!(r.read(&b).is_empty());
    }

    #[test]
    fn a_watcher_stops_at_once_when_dropped() {
        let watcher = match Watcher::start(|_| true) {
            Ok(w) => w,
            // Joining the group needs CAP_NET_ADMIN; root must get it.
            // SAFETY: geteuid(2) has no preconditions.
            Err(e) if unsafe { libc::geteuid() } != 0 => {
                eprintln!("not root, no nftables events: {e}");
                return;
            }
            Err(e) => panic!("cannot watch nftables events as root: {e}"),
        };
        let running = watcher.running();
        assert!(running.load(Ordering::SeqCst));
        let t = Instant::now();
        drop(watcher);
        assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
        assert!(!running.load(Ordering::SeqCst), "the thread ended");
    }

    /// An overrun (thousands of notifications into a tiny buffer) reports
    /// both families, even though the change was not natmap's: the
    /// watcher cannot know what it lost. In a network namespace of its own
    /// (this thread's), with `nft`; root only.
    #[test]
    fn an_overrun_socket_reports_both_families() {
        // SAFETY: geteuid(2) has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("not root: no network namespace of our own");
            return;
        }
        let reports = std::thread::spawn(|| {
            // SAFETY: unshare(2) of this thread's network namespace only.
            assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0);
            // The socket overruns before the thread reads anything.
            let socket = subscribe(4096).expect("subscribe");
            // Someone else's table: no natmap table is touched.
            let elements: Vec<String> = (1..=3000).map(|p| p.to_string()).collect();
            let input = format!(
                "table ip other {{\n set s {{\n type inet_service\n elements = {{ {} }}\n }}\n}}\n",
                elements.join(", ")
            );
            crate::firewall::run_tool("nft", "nftables", &["-f", "-"], Some(&input))
                .expect("nft -f - in a fresh namespace");
            let seen = Arc::new(Mutex::new(Vec::new()));
            let sink = seen.clone();
            let watcher = Watcher::start_on(socket, move |c| {
                c.take();
                sink.lock().unwrap().push(c.family());
                true
            })
            .expect("watch");
            let deadline = Instant::now() + Duration::from_secs(2);
            while seen.lock().unwrap().len() < 2 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            drop(watcher);
            let got = seen.lock().unwrap().clone();
            got
        })
        .join()
        .unwrap();
        assert!(
            reports.contains(&Family::V4) && reports.contains(&Family::V6),
            "{reports:?}"
        );
    }

    #[test]
    fn natmaps_own_threads_tools_and_sockets_are_its_own() {
        assert!(is_own(Some(std::process::id()), 0));
        // SAFETY: gettid(2) has no preconditions.
        let tid = unsafe { libc::gettid() } as u32;
        assert!(is_own(Some(tid), 0), "a thread of ours");
        assert!(!is_own(Some(1), 0), "init is not natmap");
        spawned(3_999_001);
        assert!(is_own(Some(3_999_001), 0));
        assert!(is_own(None, 3_999_001), "a tool's port id is its pid");
        own_socket(3_999_002);
        assert!(is_own(Some(1), 3_999_002));
    }
}
