//! Printing responses: comfy-table tables for people, the response line
//! itself for `--json`.

use std::io::IsTerminal;
use std::net::IpAddr;

use comfy_table::{presets, Attribute, Cell, Color, ContentArrangement, Table};
use serde::de::DeserializeOwned;

use crate::model::{PortList, RuleSpec};
use crate::proto::{
    ApplyReport, ChangeKind, ChangeResult, ClearReport, Document, DryRunReport, ErrorCode,
    ForwardingReport, Pong, Request, Response, RuleList, RuleStatus, RuleView, SaveReport,
    StatusReport,
};

use super::{ColorChoice, EXIT_REQUEST_FAILED, EXIT_UNREACHABLE};

/// Restores the default action of SIGPIPE, which Rust's runtime ignores, so
/// that writing to a pipe whose reader has gone (`ls | head -1`) ends the
/// process quietly (status 141 in a shell) instead of a panic in `println!`.
/// Only for client commands: the daemon must survive a client that hangs up,
/// and `install` must not stop half-way because nobody reads its progress.
pub fn exit_quietly_on_closed_pipe() {
    // SAFETY: setting a signal disposition to its default; no handler runs.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// The exit code of a response: 0, or why it failed (the daemon could not
/// be asked, or it refused).
fn exit_code(response: &Response) -> u8 {
    match &response.error {
        None => 0,
        Some(e)
            if matches!(
                e.code,
                ErrorCode::DaemonUnreachable | ErrorCode::BadResponse
            ) =>
        {
            EXIT_UNREACHABLE
        }
        Some(_) => EXIT_REQUEST_FAILED,
    }
}

/// `status`'s rules row: `dnat: 2 active, 1 down; snat: 1 active`, or `none`.
fn rule_counts(s: &StatusReport) -> String {
    let rules: Vec<String> = s
        .rules
        .iter()
        .map(|(kind, by)| {
            let parts: Vec<String> = by
                .iter()
                .map(|(st, n)| format!("{n} {}", status_text(st)))
                .collect();
            format!("{}: {}", kind.replace('_', "-"), parts.join(", "))
        })
        .collect();
    if rules.is_empty() {
        "none".to_owned()
    } else {
        rules.join("; ")
    }
}

/// `status`'s repairs row: how many, and the last one's age and reasons.
fn repairs(s: &StatusReport) -> String {
    match &s.last_repair {
        None => s.repairs.to_string(),
        Some(l) => format!(
            "{} (last {}s ago: {})",
            s.repairs,
            l.secs_ago,
            l.reasons.join("; ")
        ),
    }
}

/// Prints one line on stdout.
pub fn print_line(line: &str) {
    println!("{line}");
}

/// A rule kind as the command that makes it is spelled (`policy-route`);
/// JSON keeps the protocol's snake_case (`policy_route`).
pub fn kind_text(spec: &RuleSpec) -> String {
    spec.kind().replace('_', "-")
}

/// A rule status in text, one spelling everywhere (`port conflict`); JSON
/// keeps the protocol's snake_case (`port_conflict`).
pub fn status_text(status: &str) -> String {
    status.replace('_', " ")
}

/// Prints responses in the chosen format.
pub struct Printer {
    json: bool,
    color: bool,
    dry_run: bool,
}

impl Printer {
    /// A printer for `--json` or tables, with colour resolved from the
    /// choice; `dry_run` marks every answer as changing nothing.
    pub fn new(json: bool, color: ColorChoice, dry_run: bool) -> Printer {
        let color = match color {
            ColorChoice::Always => true,
            ColorChoice::Never => false,
            ColorChoice::Auto => {
                std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none()
            }
        };
        Printer {
            json,
            color,
            dry_run,
        }
    }

    /// Prints the response to `request` and returns the exit code.
    pub fn print(&self, request: &Request, response: &Response) -> u8 {
        let code = exit_code(response);
        // Only `status` reports problems; they turn success into EXIT_ATTENTION.
        let attention = matches!(request, Request::Status(_))
            && response
                .data_json()
                .get("problems")
                .and_then(|p| p.as_array())
                .is_some_and(|p| !p.is_empty());
        let code = if self.json {
            self.print_json(response);
            code
        } else if let Some(e) = &response.error {
            eprintln!("error: {} [{}]", e.message, e.code);
            return code;
        } else {
            self.show(request, response.data_json())
        };
        if code == 0 && attention {
            super::EXIT_ATTENTION
        } else {
            code
        }
    }

    /// Prints the response line itself (`--json`), marked `dry_run` under
    /// `--dry-run`.
    fn print_json(&self, response: &Response) {
        let mut response = response.clone();
        if let Some(serde_json::Value::Object(data)) = response.data.as_mut().map(|d| d.json_mut())
        {
            if self.dry_run {
                data.insert("dry_run".into(), serde_json::Value::Bool(true));
            }
        }
        print_line(&serde_json::to_string(&response).expect("response serializes"));
    }

    /// Prints the answer to `request` for people; returns the exit code
    /// (non-zero when the answer is not the type the request expects).
    fn show(&self, request: &Request, data: serde_json::Value) -> u8 {
        match request {
            Request::Dnat(_)
            | Request::Snat(_)
            | Request::Hairpin(_)
            | Request::PolicyRoute(_)
            | Request::DockerAdd(_)
            | Request::DockerRm(_)
            | Request::DockerRemap(_) => self.with(data, |c: ChangeResult| self.change(&c)),
            Request::Ls(_) => self.with(data, |l: RuleList| self.rule_list(&l)),
            Request::Fwd(_) => self.with(data, |f: ForwardingReport| self.forwarding(&f)),
            Request::Clear(_) => self.with(data, |c: ClearReport| {
                println!(
                    "removed {} rule(s); natmap's chains are gone until the next change",
                    c.removed
                )
            }),
            Request::Apply(_) => self.with(data, |r: ApplyReport| self.applied(&r)),
            Request::DryRun(_) => {
                if data.get("transactions").is_some() {
                    self.with(data, |r: DryRunReport| dry_run(&r))
                } else {
                    // Nothing to change (e.g. the rule is already present).
                    self.with(data, |c: ChangeResult| self.change(&c))
                }
            }
            Request::Export(_) => self.with(data, |d: Document| {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&d).expect("document serializes")
                )
            }),
            Request::Status(_) => self.with(data, |s: StatusReport| self.status(&s)),
            Request::Reload(_) => self.with(data, |v: serde_json::Value| {
                println!(
                    "config reloaded; auto-discover: {}, engines: {}",
                    v["auto_discover"], v["engines"]
                )
            }),
            Request::Save(_) => self.with(data, |r: SaveReport| saved(&r)),
            Request::Ping(_) => self.with(data, |p: Pong| {
                println!("natmap daemon {} is running", p.daemon_version)
            }),
        }
    }

    /// `ls`: the rules' table, then the quarantined entries.
    fn rule_list(&self, l: &RuleList) {
        self.list(&l.rules);
        for u in &l.unreadable {
            let id = u.id.map(|id| format!(" (id {id})")).unwrap_or_default();
            println!("quarantined{id}: {}", printable(&u.reason));
        }
    }

    /// Prints a plan made without the daemon (`daemon --dry-run`).
    pub fn dry_run_report(&self, report: &DryRunReport) {
        if self.json {
            print_line(
                &serde_json::to_string(&Response::ok(report.clone())).expect("report serializes"),
            );
        } else {
            dry_run(report);
        }
    }

    fn with<T: DeserializeOwned>(&self, data: serde_json::Value, show: impl FnOnce(T)) -> u8 {
        match serde_json::from_value::<T>(data) {
            Ok(v) => {
                show(v);
                0
            }
            Err(e) => {
                eprintln!("error: unexpected answer from the daemon: {e}");
                EXIT_UNREACHABLE
            }
        }
    }

    fn change(&self, c: &ChangeResult) {
        let (id, kind) = (c.rule.rule.id, kind_text(&c.rule.rule.spec));
        match c.result {
            ChangeKind::Added => println!("added {kind} rule #{id}"),
            ChangeKind::AlreadyPresent => {
                println!("{kind} rule #{id} is already present; nothing changed")
            }
            ChangeKind::Deleted => {
                println!("deleted {kind} rule #{id}");
                return;
            }
            ChangeKind::Remapped => println!("remapped {kind} rule #{id}"),
            ChangeKind::Upgraded => println!("upgraded dnat rule #{id} to {kind}"),
        }
        self.list(std::slice::from_ref(&c.rule));
        // After the table, on stderr: what needs the operator's attention.
        for note in &c.notes {
            eprintln!("note: {}", printable(note));
        }
    }

    fn table(&self, headers: &[&str]) -> Table {
        let mut table = Table::new();
        table
            .load_preset(presets::UTF8_BORDERS_ONLY)
            .set_content_arrangement(ContentArrangement::Dynamic);
        if self.color {
            table.enforce_styling();
        } else {
            table.force_no_tty();
        }
        table.set_header(headers.iter().map(|h| {
            let cell = Cell::new(h);
            if self.color {
                cell.fg(Color::Cyan).add_attribute(Attribute::Bold)
            } else {
                cell
            }
        }));
        table
    }

    fn list(&self, rules: &[RuleView]) {
        if rules.is_empty() {
            println!("no rules");
            return;
        }
        let with_counters = rules.iter().any(|r| r.counters.is_some());
        let mut headers = vec!["ID", "KIND", "MATCH", "TARGET", "PROTO", "STATUS"];
        if with_counters {
            headers.extend(["CONNS", "PKTS", "BYTES"]);
        }
        let mut table = self.table(&headers);
        for view in rules {
            let (matches, target, proto) = describe(&view.rule.spec);
            let status = status_text(
                serde_json::to_value(view.status)
                    .expect("status serializes")
                    .as_str()
                    .unwrap_or("?"),
            );
            let mut status_cell = Cell::new(match &view.detail {
                Some(d) => printable(&format!("{status}: {d}")),
                None => status.to_owned(),
            });
            if self.color {
                status_cell = status_cell.fg(if view.status == RuleStatus::Active {
                    Color::Green
                } else {
                    Color::Red
                });
            }
            let mut row = vec![
                Cell::new(view.rule.id),
                Cell::new(kind_text(&view.rule.spec)),
                Cell::new(printable(&matches)),
                Cell::new(printable(&target)),
                Cell::new(proto),
                status_cell,
            ];
            if let Some(c) = view.counters {
                row.extend([
                    Cell::new(c.connections),
                    Cell::new(c.packets),
                    Cell::new(c.bytes),
                ]);
            }
            table.add_row(row);
        }
        println!("{table}");
    }

    fn applied(&self, r: &ApplyReport) {
        let verb = if r.dry_run { "would" } else { "did" };
        println!(
            "{verb} add {}, remove {}, keep {} rule(s){}",
            r.added.len(),
            r.removed.len(),
            r.kept,
            if r.dry_run {
                " (dry run: nothing changed)"
            } else {
                ""
            }
        );
        if !r.added.is_empty() {
            println!("add:");
            self.list(&r.added);
        }
        if !r.removed.is_empty() {
            println!("remove:");
            self.list(&r.removed);
        }
    }

    fn status(&self, s: &StatusReport) {
        println!("{}", self.status_table(s));
        for w in &s.warnings {
            println!("note: {w}");
        }
        if s.problems.is_empty() {
            println!("all good");
        } else {
            for p in &s.problems {
                println!("needs attention: {p}");
            }
        }
    }

    /// `status`'s table: one row per check.
    fn status_table(&self, s: &StatusReport) -> Table {
        let mut table = self.table(&["CHECK", "STATE"]);
        let yes_no = |b: bool| if b { "yes" } else { "no" };
        table.add_row(vec![
            "daemon".to_owned(),
            format!("natmap {}, up {}s", s.daemon_version, s.uptime_secs),
        ]);
        // A daemon older than the driver seam sends no driver name: it was iptables.
        let firewall = if s.firewall.is_empty() {
            "iptables"
        } else {
            &s.firewall
        };
        table.add_row(vec![format!("{firewall} backend"), s.backend.clone()]);
        table.add_row(vec!["IPv6 NAT".to_owned(), yes_no(s.ipv6_nat).to_owned()]);
        table.add_row(vec![
            "ip_forward".to_owned(),
            s.ipv4_forwarding.map_or("unknown", yes_no).to_owned(),
        ]);
        table.add_row(vec![
            "Docker".to_owned(),
            match &s.docker.error {
                None => "reachable".to_owned(),
                Some(e) => format!("unreachable: {e}"),
            },
        ]);
        table.add_row(vec!["rules".to_owned(), rule_counts(s)]);
        table.add_row(vec!["repairs".to_owned(), repairs(s)]);
        if let Some(f) = &s.open_files {
            table.add_row(vec![
                "open files".to_owned(),
                format!(
                    "{} of {} (LimitNOFILE; {} kept free for clients, relays and the firewall)",
                    f.open, f.limit, f.reserve
                ),
            ]);
        }
        for c in &s.conflicts {
            table.add_row(vec!["conflict".to_owned(), c.clone()]);
        }
        table
    }

    fn forwarding(&self, f: &ForwardingReport) {
        let mut table = self.table(&["SYSCTL", "BEFORE", "AFTER"]);
        for s in &f.sysctls {
            table.add_row(vec![s.name.as_str(), s.before.as_str(), s.after.as_str()]);
        }
        println!("{table}");
    }
}

/// `save`: what was made durable, and the fragments written (or, in a dry
/// run, what would be written where).
fn saved(r: &SaveReport) {
    if r.dry_run {
        println!(
            "dry run: nothing was changed; {} holds {} rule(s)",
            r.state_path, r.rule_count
        );
        for (path, t) in r.exported.iter().zip(&r.fragments) {
            println!("would write {path}:");
            print!("{}", t.restore);
        }
        return;
    }
    println!(
        "saved {} rule(s) to {} (fsynced); the daemon restores them at boot",
        r.rule_count, r.state_path
    );
    for path in &r.exported {
        println!("wrote {path}");
    }
}

fn dry_run(r: &DryRunReport) {
    println!("dry run: nothing was changed.");
    for effect in &r.effects {
        println!("would: {effect}");
    }
    if r.transactions.is_empty() && r.effects.is_empty() {
        println!("no rule would change");
    }
    for t in &r.transactions {
        if t.program.is_empty() {
            // A daemon older than the firewall driver seam names no program.
            println!("would send this {} transaction:", t.family);
        } else {
            println!("would run `{}` with:", t.program);
        }
        print!("{}", t.restore);
    }
}

/// Text from the daemon never reaches the terminal with control characters
/// (an escape sequence in a name could rewrite the operator's screen).
fn printable(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

fn host_ports(ip: IpAddr, ports: &PortList) -> String {
    match ip {
        IpAddr::V4(v4) => format!("{v4}:{ports}"),
        IpAddr::V6(v6) => format!("[{v6}]:{ports}"),
    }
}

/// MATCH, TARGET and PROTO columns of a rule.
fn describe(spec: &RuleSpec) -> (String, String, String) {
    match spec {
        RuleSpec::Dnat(r) => (
            match &r.ext_if {
                Some(i) => format!("{} in {i}", host_ports(r.ext_ip.ip(), &r.ports)),
                None => host_ports(r.ext_ip.ip(), &r.ports),
            },
            host_ports(r.int_ip.ip(), &r.ports),
            r.proto.to_string(),
        ),
        RuleSpec::Hairpin(r) => (
            host_ports(r.ext_ip.ip(), &r.ports),
            format!(
                "{} (masquerade {})",
                host_ports(r.int_ip.ip(), &r.ports),
                r.int_net
            ),
            r.proto.to_string(),
        ),
        RuleSpec::Snat(r) => (
            format!("from {} out {}", r.source, r.ext_if),
            format!("source {}", r.ext_ip),
            "all".to_owned(),
        ),
        RuleSpec::PolicyRoute(r) => (
            format!("from {}", r.src_ip),
            format!("via {} (table {})", r.via, r.table),
            "all".to_owned(),
        ),
        RuleSpec::Docker(r) => {
            let host = match r.host_ip {
                Some(h) => host_ports(h.ip(), &r.host_ports()),
                None => format!("*:{}", r.host_ports()),
            };
            let who = match (&r.container_id, r.external) {
                (_, true) => r.name.clone(),
                (Some(id), false) => format!("{} ({})", r.name, &id[..id.len().min(12)]),
                (None, false) => r.name.clone(),
            };
            let addr = match r.target_v4.or(r.target_v6) {
                Some(t) => host_ports(t.ip.ip(), &r.container_ports()),
                None => format!("-:{}", r.container_ports()),
            };
            let source = r
                .auto
                .as_ref()
                .map(|a| format!(" [auto:{}]", a.engine))
                .unwrap_or_default();
            (host, format!("{who}{source} {addr}"), r.proto.to_string())
        }
    }
}
