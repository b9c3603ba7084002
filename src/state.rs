//! `state.json`: the daemon's durable record of every rule it owns.
//!
//! Every acknowledged change is on disk before the client hears about it,
//! as one line appended to `state.json.journal` (one `write`, one
//! `fdatasync`: the cost does not grow with the number of rules; see
//! `journal`). Now and then the journal is folded into a new `state.json`:
//! write a temporary file, fsync it, rename it over the old one, fsync the
//! directory. A file that does not parse is moved aside, never overwritten.
//!
//! The file is not trusted: every rule in it passes the checks of a request
//! and of the file as a whole (`vet`) before it starts; one that fails is
//! quarantined: not installed, shown by `ls` and `status`, and written back
//! verbatim after the good rules on every save, so the operator can fix it.
//! The directory and the files beside the state are handled by `dir`
//! (owned by the daemon's user, no links followed).

mod dir;
mod journal;
mod vet;

use std::ffi::{OsStr, OsString};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::ser::SerializeSeq;
use serde::{Deserialize, Serialize, Serializer};

use crate::model::{Rule, RuleId};
use dir::StateDir;

/// The schema version this build writes and reads.
pub const SCHEMA_VERSION: u32 = 1;

/// Everything natmap must remember across restarts.
///
/// Its serde form is the file's when no entry is quarantined (tests read
/// files with it); the daemon reads the file only through [`load`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct State {
    /// Schema of this file; a newer one than the build knows is refused.
    pub schema_version: u32,
    /// The id the next rule gets; ids are never reused.
    pub next_id: RuleId,
    /// Whether the operator asked for IP forwarding (`fwd`), so it is set again at start.
    #[serde(default)]
    pub forwarding: bool,
    /// Whether `fwd` also enabled IPv6 forwarding (not with `--no-ipv6`).
    #[serde(default = "yes")]
    pub forwarding_ipv6: bool,
    /// The rules, in id order.
    pub rules: Vec<Rule>,
    /// Entries of the file's `rules` that failed the checks: never
    /// installed, written back after `rules` as they were read.
    #[serde(skip)]
    pub quarantined: Vec<Quarantined>,
}

/// An entry of the state file's `rules` that natmap will not install.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quarantined {
    /// Its position in the file's `rules` when it was loaded.
    pub index: usize,
    /// Its `id`, if it has a numeric one.
    pub id: Option<RuleId>,
    /// The entry exactly as read (written back as it is).
    pub entry: serde_json::Value,
    /// The rule, if the entry parses as one (then `ls` can show it).
    pub rule: Option<Rule>,
    /// Why it is not installed.
    pub reason: String,
}

/// A change to the rules, as a commit makes it: rules put (added, or
/// replacing the rule of their id), ids taken out, and the id counter
/// after it. A request's change is planned as one, so committing it costs
/// what the change holds, not what the state holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Delta {
    /// Rules added, or replacing the rule with their id.
    pub put: Vec<Rule>,
    /// Ids of rules taken out.
    pub del: Vec<RuleId>,
    /// [`State::next_id`] after the change.
    pub next_id: RuleId,
}

impl Delta {
    /// Whether it changes nothing of `state`.
    pub fn is_empty_on(&self, state: &State) -> bool {
        self.put.is_empty() && self.del.is_empty() && self.next_id == state.next_id
    }
}

impl State {
    /// Applies `delta` in place, keeping `rules` in id order: a binary
    /// search per rule it names (a new rule, whose id is the highest, is
    /// appended).
    pub fn apply(&mut self, delta: &Delta) {
        for id in &delta.del {
            if let Some(i) = self.position(*id) {
                self.rules.remove(i);
            }
        }
        for rule in &delta.put {
            match self.rules.binary_search_by_key(&rule.id, |r| r.id) {
                Ok(i) => self.rules[i] = rule.clone(),
                Err(_) => match self.position(rule.id) {
                    Some(i) => self.rules[i] = rule.clone(),
                    None if self.rules.last().is_none_or(|l| l.id < rule.id) => {
                        self.rules.push(rule.clone());
                    }
                    None => {
                        let i = self.rules.partition_point(|r| r.id < rule.id);
                        self.rules.insert(i, rule.clone());
                    }
                },
            }
        }
        self.next_id = delta.next_id;
    }

    /// What undoes `delta` once applied to this state (taken before it):
    /// the rules it replaced or took out put back, the ones it added taken
    /// out.
    pub fn undo_of(&self, delta: &Delta) -> Delta {
        let mut undo = Delta {
            next_id: self.next_id,
            ..Delta::default()
        };
        for rule in &delta.put {
            match self.rule(rule.id) {
                Some(old) => undo.put.push(old.clone()),
                None => undo.del.push(rule.id),
            }
        }
        undo.put
            .extend(delta.del.iter().filter_map(|id| self.rule(*id)).cloned());
        undo
    }

    /// The index of the rule with this id (see [`State::rule`]).
    fn position(&self, id: RuleId) -> Option<usize> {
        match self.rules.binary_search_by_key(&id, |r| r.id) {
            Ok(i) => Some(i),
            Err(_) => self.rules.iter().position(|r| r.id == id),
        }
    }

    /// The rule with this id: a binary search, since `rules` is in id order
    /// (a bulk `apply` of 8,000 rules looked each one up by a scan). A state
    /// file edited out of order is still searched whole when that misses.
    pub fn rule(&self, id: RuleId) -> Option<&Rule> {
        match self.rules.binary_search_by_key(&id, |r| r.id) {
            Ok(i) => Some(&self.rules[i]),
            Err(_) => self.rules.iter().find(|r| r.id == id),
        }
    }
}

impl Default for State {
    fn default() -> State {
        State {
            schema_version: SCHEMA_VERSION,
            next_id: 1,
            forwarding: false,
            forwarding_ipv6: true,
            rules: Vec::new(),
            quarantined: Vec::new(),
        }
    }
}

fn yes() -> bool {
    true
}

/// The file as read: rules stay raw JSON until each is vetted.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredState {
    schema_version: u32,
    next_id: RuleId,
    #[serde(default)]
    forwarding: bool,
    #[serde(default = "yes")]
    forwarding_ipv6: bool,
    rules: Vec<serde_json::Value>,
}

/// Only the version, read before anything else.
#[derive(Deserialize)]
struct VersionPeek {
    schema_version: Option<u64>,
}

/// The file as written: [`State`]'s fields in the same order, the
/// quarantined entries after the rules.
#[derive(Serialize)]
struct OnDisk<'a> {
    schema_version: u32,
    next_id: RuleId,
    forwarding: bool,
    forwarding_ipv6: bool,
    rules: Entries<'a>,
}

struct Entries<'a>(&'a [Rule], &'a [Quarantined]);

impl Serialize for Entries<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(self.0.len() + self.1.len()))?;
        for rule in self.0 {
            seq.serialize_element(rule)?;
        }
        for q in self.1 {
            seq.serialize_element(&q.entry)?;
        }
        seq.end()
    }
}

/// Why the state could not be loaded or saved.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Reading or writing failed.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The file is from a newer natmap.
    #[error("{path} has schema version {found}, this natmap understands up to {SCHEMA_VERSION}: upgrade natmap")]
    TooNew {
        /// The state file.
        path: PathBuf,
        /// Its version.
        found: u64,
    },
    /// The file claims a version natmap never wrote (0, or below 1).
    #[error("{path} has schema version {found}, which no natmap writes; this natmap reads version {SCHEMA_VERSION}: \
             fix the file (or move it away to start empty)")]
    UnknownVersion {
        /// The state file.
        path: PathBuf,
        /// Its version.
        found: u64,
    },
    /// Someone other than the daemon's user could write in the directory.
    #[error(
        "unsafe state directory {path}: it {problem}, so another user could plant files \
             natmap (as root) would write through; fix: {fix}"
    )]
    UnsafeDir {
        /// The directory.
        path: PathBuf,
        /// What is wrong.
        problem: String,
        /// The commands that fix it.
        fix: String,
    },
    /// Another daemon holds the lock.
    #[error("another natmap daemon is using {path}; stop it first")]
    Locked {
        /// The state file.
        path: PathBuf,
    },
    /// The state file or its journal does not parse (read-only readers;
    /// the daemon moves such files aside instead).
    #[error("{path}: {error} (a daemon would move it aside and start with no rules)")]
    Corrupt {
        /// The state file.
        path: PathBuf,
        /// What does not parse.
        error: String,
    },
}

/// How loading went.
#[derive(Debug)]
pub enum Loaded {
    /// No state file yet: start empty.
    Fresh(State),
    /// The file was read (quarantined entries are in [`State::quarantined`]).
    Existing(State),
    /// The file did not parse; it was copied to `moved_to`, removed, and
    /// natmap starts empty.
    Corrupt {
        /// The empty state to start with.
        state: State,
        /// Where the bad file now is.
        moved_to: PathBuf,
        /// The parse error.
        error: String,
    },
}

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StateError + 'a {
    move |source| StateError::Io {
        action,
        path: path.to_owned(),
        source,
    }
}

/// The state file's name inside its directory.
fn file_name(path: &Path) -> OsString {
    path.file_name()
        .map(|n| n.to_owned())
        .unwrap_or_else(|| path.as_os_str().to_owned())
}

/// `state.json` + `suffix`: the name of a file beside the state.
fn beside(path: &Path, suffix: &str) -> OsString {
    let mut name = file_name(path);
    name.push(suffix);
    name
}

/// `state.json.journal`: the changes committed since `state.json`.
fn journal_name(path: &Path) -> OsString {
    beside(path, ".journal")
}

/// A journal this much larger than its `state.json` is folded into a new
/// one; below `COMPACT_MIN` it never is (small states would otherwise be
/// rewritten every few changes).
const COMPACT_MIN: u64 = 1 << 20;

/// What was found on disk, before any side effect.
struct Found {
    /// `state.json`'s bytes.
    text: Option<Vec<u8>>,
    /// `state.json.journal`'s bytes.
    journal: Option<Vec<u8>>,
    /// `state.json.journal.tmp`'s bytes: a compaction stopped between
    /// renaming the new `state.json` and its new journal into place.
    journal_tmp: Option<Vec<u8>>,
}

/// How the journal relates to `state.json`.
enum JournalUse {
    /// None, or one without records: nothing to replay.
    Nothing,
    /// Records to replay on `state.json` (`torn`: an unfinished last line
    /// was dropped).
    Replay {
        records: Vec<journal::Record>,
        torn: bool,
    },
    /// Records of another `state.json` (replaced while natmap was stopped,
    /// or already folded into it): not replayed, kept aside.
    Stale(usize),
    /// Unreadable before its last line.
    Corrupt(String),
    /// A compaction stopped before its new journal was renamed into place:
    /// that one (header only) is the journal.
    FinishCompaction,
}

/// Reads `state.json`, its journal and a leftover new journal through
/// `read` (a file name in the state directory to its bytes, `None` if
/// absent).
fn read_found(
    path: &Path,
    read: impl Fn(&OsStr) -> io::Result<Option<Vec<u8>>>,
) -> Result<Found, StateError> {
    let dir = dir::dir_of(path);
    let get = |name: OsString| read(&name).map_err(|e| io_err("reading", &dir.join(&name))(e));
    Ok(Found {
        text: get(file_name(path))?,
        journal: get(journal_name(path))?,
        // Only ever a finished compaction's journal if readable: a link or
        // other leftover under that name is removed by the next compaction.
        journal_tmp: read(&beside(path, ".journal.tmp")).ok().flatten(),
    })
}

fn journal_use(found: &Found) -> JournalUse {
    let base = journal::fingerprint(found.text.as_deref());
    let tmp_matches = found.journal_tmp.as_deref().is_some_and(|t| {
        matches!(journal::parse(t), journal::Parsed::Ok { header, records, .. }
            if header.base == base && records.is_empty())
    });
    if tmp_matches {
        return JournalUse::FinishCompaction;
    }
    let Some(text) = found.journal.as_deref() else {
        return JournalUse::Nothing;
    };
    match journal::parse(text) {
        journal::Parsed::NoHeader => JournalUse::Nothing,
        journal::Parsed::Corrupt(e) => JournalUse::Corrupt(e),
        journal::Parsed::Ok { records, .. } if records.is_empty() => JournalUse::Nothing,
        journal::Parsed::Ok {
            header, records, ..
        } if header.base != base => JournalUse::Stale(records.len()),
        journal::Parsed::Ok { records, torn, .. } => JournalUse::Replay { records, torn },
    }
}

/// The state of `state.json` (`stored`) with `records` replayed, vetted
/// again as a whole: the file a compaction would write, read back.
fn replayed(path: &Path, state: State, records: Vec<journal::Record>) -> State {
    let entries: Vec<serde_json::Value> = state
        .rules
        .iter()
        .map(|r| serde_json::to_value(r).expect("rule serializes"))
        .collect();
    let (mut entries, scalars) = journal::replay(entries, records);
    // Quarantined entries stay after the rules, where every write puts them.
    entries.extend(state.quarantined.into_iter().map(|q| q.entry));
    let (next_id, forwarding, forwarding_ipv6) =
        scalars.unwrap_or((state.next_id, state.forwarding, state.forwarding_ipv6));
    vetted(
        path,
        StoredState {
            schema_version: state.schema_version,
            next_id,
            forwarding,
            forwarding_ipv6,
            rules: entries,
        },
    )
}

/// The current state, read only: `state.json` with its journal replayed
/// and every entry vetted, as the daemon would load it (for tools and
/// tests; nothing is written, moved or locked). A missing file is the
/// empty state; a corrupt one is an error.
pub fn read_current(path: &Path) -> Result<State, StateError> {
    // Read only, so plain reads do (the daemon's checks are about writes),
    // and a user may read a state they could not write.
    let found = read_found(path, |name| {
        match std::fs::read(dir::dir_of(path).join(name)) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    })?;
    let corrupt = |error: String| StateError::Corrupt {
        path: path.to_owned(),
        error,
    };
    let base = match found.text.as_deref() {
        None => State::default(),
        Some(text) => parse_base(path, text)?.map_err(corrupt)?,
    };
    match journal_use(&found) {
        JournalUse::Replay { records, .. } => Ok(replayed(path, base, records)),
        JournalUse::Corrupt(e) => Err(corrupt(format!(
            "{}: {e}",
            journal_name(path).to_string_lossy()
        ))),
        _ => Ok(base),
    }
}

/// `state.json`'s text parsed and vetted; `Err(Ok(parse error))` when it
/// does not parse. A schema version other than this build's is refused
/// first, so such a file is not mistaken for corruption and moved aside.
fn parse_base(path: &Path, text: &[u8]) -> Result<Result<State, String>, StateError> {
    if let Ok(VersionPeek {
        schema_version: Some(found),
    }) = serde_json::from_slice::<VersionPeek>(text)
    {
        check_version(path, found)?;
    }
    Ok(crate::proto::strict::from_slice::<StoredState>(text).map(|s| vetted(path, s)))
}

/// Loads the state at `path`, creating its directory (mode 0700) if needed:
/// `state.json`, then the journal's records replayed on it, then every
/// entry vetted; a journal that had records is folded into a new
/// `state.json` at once (so it never grows across restarts).
/// Refuses an unsafe directory and any schema version but this build's.
/// Returns the store through which the daemon writes every later change.
pub fn load(path: &Path) -> Result<(Loaded, Store), StateError> {
    let dir = StateDir::open(path)?;
    let found = read_found(path, |name| dir.read(name))?;
    let mut store = Store {
        path: path.to_owned(),
        journal: None,
    };
    let use_ = journal_use(&found);
    let base = match found.text.as_deref() {
        None => None,
        Some(text) => match parse_base(path, text)? {
            Ok(state) => Some(state),
            Err(error) => {
                let moved_to = move_aside(&dir, path, &file_name(path), text)?;
                let error = match (&use_, found.journal.as_deref()) {
                    (
                        JournalUse::Replay { .. } | JournalUse::Stale(_) | JournalUse::Corrupt(_),
                        Some(j),
                    ) => {
                        let j_to = move_aside(&dir, path, &journal_name(path), j)?;
                        format!("{error} (its journal was moved to {})", j_to.display())
                    }
                    _ => error,
                };
                return Ok((
                    Loaded::Corrupt {
                        state: State::default(),
                        moved_to,
                        error,
                    },
                    store,
                ));
            }
        },
    };
    let state = match use_ {
        JournalUse::Corrupt(error) => {
            // The journal continues state.json: one without the other is
            // no state natmap acknowledged. Both are kept for the operator.
            let journal = found.journal.as_deref().unwrap_or_default();
            let moved_to = move_aside(&dir, path, &journal_name(path), journal)?;
            let mut error = format!("{}: {error}", journal_name(path).to_string_lossy());
            if let Some(text) = found.text.as_deref() {
                let base_to = move_aside(&dir, path, &file_name(path), text)?;
                error.push_str(&format!(
                    "; the state file it continues was moved to {}",
                    base_to.display()
                ));
            }
            return Ok((
                Loaded::Corrupt {
                    state: State::default(),
                    moved_to,
                    error,
                },
                store,
            ));
        }
        JournalUse::Replay { records, torn } => {
            if torn {
                tracing::info!(
                    path = %dir.path().join(journal_name(path)).display(),
                    "dropped an unfinished last journal line (a change that was never acknowledged)"
                );
            }
            let state = replayed(path, base.unwrap_or_default(), records);
            store.compact(&state)?;
            return Ok((Loaded::Existing(state), store));
        }
        JournalUse::Stale(records) => {
            let journal = found.journal.as_deref().unwrap_or_default();
            let kept = move_aside_as(&dir, path, &journal_name(path), ".stale", journal)?;
            tracing::warn!(
                path = %path.display(),
                kept = %kept.display(),
                "the state journal does not continue this state file (was the state file \
                 replaced while natmap was stopped?); its {records} change(s) were NOT applied \
                 and the journal was moved aside"
            );
            base
        }
        JournalUse::FinishCompaction => {
            let tmp = beside(path, ".journal.tmp");
            dir.rename(&tmp, &journal_name(path))
                .and_then(|()| dir.sync())
                .map_err(io_err("renaming into place", &dir.path().join(&tmp)))?;
            store.journal = Some(Journal::open(
                &dir,
                path,
                found.journal_tmp.as_deref().unwrap_or_default(),
                found.text.as_deref(),
            )?);
            base
        }
        JournalUse::Nothing => {
            if let (Some(text), Some(_)) = (found.journal.as_deref(), base.as_ref()) {
                // Header only (or nothing committed yet): append to it, if
                // it continues this state file.
                if matches!(journal::parse(text), journal::Parsed::Ok { header, torn: false, .. }
                    if header == journal::Header::for_base(found.text.as_deref()))
                {
                    store.journal = Some(Journal::open(&dir, path, text, found.text.as_deref())?);
                }
            }
            base
        }
    };
    Ok(match state {
        Some(state) => (Loaded::Existing(state), store),
        None => (Loaded::Fresh(State::default()), store),
    })
}

fn check_version(path: &Path, found: u64) -> Result<(), StateError> {
    let path = path.to_owned();
    match found {
        f if f == u64::from(SCHEMA_VERSION) => Ok(()),
        f if f > u64::from(SCHEMA_VERSION) => Err(StateError::TooNew { path, found }),
        _ => Err(StateError::UnknownVersion { path, found }),
    }
}

/// The state of a parsed file: good rules, quarantined entries, and a
/// `next_id` above every id in the file (raised if it was not).
fn vetted(path: &Path, stored: StoredState) -> State {
    let v = vet::vet(stored.rules);
    let mut next_id = stored.next_id;
    if next_id < v.min_next_id {
        tracing::warn!(
            path = %path.display(),
            "next_id {next_id} is not above every rule id; using {}",
            v.min_next_id
        );
        next_id = v.min_next_id;
    }
    State {
        schema_version: stored.schema_version,
        next_id,
        forwarding: stored.forwarding,
        forwarding_ipv6: stored.forwarding_ipv6,
        rules: v.rules,
        quarantined: v.quarantined,
    }
}

/// Copies a corrupt file `name` to a new `<name>.corrupt-<secs>[-N]`
/// (never over an earlier copy), then removes it.
fn move_aside(
    dir: &StateDir,
    path: &Path,
    name: &OsStr,
    text: &[u8],
) -> Result<PathBuf, StateError> {
    move_aside_as(dir, path, name, ".corrupt", text)
}

/// Copies `name` to a new `<name><kind>-<secs>[-N]` (never over an earlier
/// copy), then removes it.
fn move_aside_as(
    dir: &StateDir,
    path: &Path,
    name: &OsStr,
    kind: &str,
    text: &[u8],
) -> Result<PathBuf, StateError> {
    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut copy = name.to_owned();
    copy.push(format!("{kind}-{stamp}"));
    let moved_to = dir
        .write_unique(&copy, text)
        .map_err(io_err("moving aside", path))?;
    dir.remove(name)
        .and_then(|()| dir.sync())
        .map_err(io_err("moving aside", path))?;
    Ok(moved_to)
}

/// Takes the daemon's lock beside the state file (`state.json.lock`),
/// after checking the directory; held as long as the file is open.
pub fn lock(path: &Path) -> Result<std::fs::File, StateError> {
    use std::os::fd::AsRawFd;
    let dir = StateDir::open(path)?;
    let name = beside(path, ".lock");
    let file = dir
        .open_lock(&name)
        .map_err(io_err("opening", &dir.path().join(&name)))?;
    // SAFETY: flock on a file descriptor we own.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        return Err(StateError::Locked {
            path: path.to_owned(),
        });
    }
    Ok(file)
}

/// Crash injection for tests of crash consistency: with
/// `NATMAP_CRASH_AT=<point>` in the daemon's environment, the process
/// aborts at that point of the next state write, as a power cut or
/// `kill -9` would stop it there. Points of a journal append:
/// `before-append`, `after-append`; of a compaction (a whole new
/// `state.json`): `before-write`, `after-write`, `after-rename`,
/// `after-journal-rename`.
///
/// Only with the `crash-points` cargo feature (the tests turn it on through
/// the package's dev-dependency on itself); without it this is an empty
/// function, so a release binary has no environment variable that aborts it.
#[cfg(feature = "crash-points")]
fn crash_point(point: &str) {
    static AT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    if AT
        .get_or_init(|| std::env::var("NATMAP_CRASH_AT").ok())
        .as_deref()
        == Some(point)
    {
        eprintln!("NATMAP_CRASH_AT={point}: aborting");
        std::process::abort();
    }
}

/// Without the `crash-points` feature a crash point is nothing at all.
#[cfg(not(feature = "crash-points"))]
#[inline(always)]
fn crash_point(_point: &str) {}

/// The open journal a store appends to.
struct Journal {
    file: std::fs::File,
    /// Bytes committed (header and whole records): a failed append is cut
    /// back to this.
    len: u64,
    /// Size of the `state.json` it continues.
    base_len: u64,
    /// Bytes of the header: a journal this long holds no change.
    header_len: u64,
}

impl Journal {
    /// Opens an existing journal of `text` for appending.
    fn open(
        dir: &StateDir,
        path: &Path,
        text: &[u8],
        base: Option<&[u8]>,
    ) -> Result<Journal, StateError> {
        let name = journal_name(path);
        let file = dir
            .open_write(&name)
            .map_err(io_err("opening", &dir.path().join(&name)))?;
        // Only journals without records are opened: all of it is header.
        Ok(Journal {
            file,
            len: text.len() as u64,
            base_len: base.map_or(0, |b| b.len() as u64),
            header_len: text.len() as u64,
        })
    }

    /// Appends `line` with one write and makes it durable. On failure the
    /// file is cut back, so no partial record stays in front of later ones
    /// (and a record whose sync failed is not committed by a later one);
    /// the flag says whether cutting back worked.
    fn append(&mut self, line: &[u8]) -> Result<(), (io::Error, bool)> {
        use std::os::unix::fs::FileExt;
        let result = self
            .file
            .write_all_at(line, self.len)
            .and_then(|()| self.file.sync_data());
        match result {
            Ok(()) => {
                self.len += line.len() as u64;
                Ok(())
            }
            Err(e) => {
                let cut = self
                    .file
                    .set_len(self.len)
                    .and_then(|()| self.file.sync_data())
                    .is_ok();
                Err((e, cut))
            }
        }
    }
}

/// Where the daemon writes the state: `state.json` plus the journal of the
/// changes committed since it was written.
pub struct Store {
    path: PathBuf,
    /// `None`: the next write is a compaction (no journal yet, or the last
    /// one may not continue `state.json` after a failed write).
    journal: Option<Journal>,
}

impl Store {
    /// The state file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Makes the change from `old` to `new` durable: one journal line
    /// (one write, one `fdatasync`), or a compaction when there is no
    /// journal to append to, the change is as large as the state, or the
    /// journal has outgrown `state.json`. Returns once it is on disk.
    pub fn commit(&mut self, old: &State, new: &State) -> Result<(), StateError> {
        if old.quarantined != new.quarantined {
            return self.compact(new);
        }
        let line = journal::record(old, new);
        self.append_or_compact(line, new)
    }

    /// Writes `delta`, which made `new`, as one journal line: its cost
    /// follows the change's size, not the state's (a compaction now and
    /// then writes the whole state, when the journal outgrew it).
    pub fn commit_delta(&mut self, delta: &Delta, new: &State) -> Result<(), StateError> {
        let line = journal::record_delta(delta, new);
        self.append_or_compact(line, new)
    }

    /// Appends `line` (a transaction that made `new`; `None`: nothing
    /// changed) to the journal, or writes `new` whole when there is no
    /// journal or the line is larger than half of it would be worth.
    fn append_or_compact(&mut self, line: Option<Vec<u8>>, new: &State) -> Result<(), StateError> {
        let Some(j) = self.journal.as_mut() else {
            return self.compact(new);
        };
        let Some(line) = line else {
            return Ok(());
        };
        let limit = j.base_len.max(COMPACT_MIN);
        if line.len() as u64 > limit / 2 {
            return self.compact(new);
        }
        crash_point("before-append");
        if let Err((e, cut)) = j.append(&line) {
            if !cut {
                // A partial record may remain: the next write starts anew.
                self.journal = None;
            }
            let at = self.path.with_file_name(journal_name(&self.path));
            return Err(io_err("appending to", &at)(e));
        }
        crash_point("after-append");
        if j.len > limit {
            // The change is durable already; a failed compaction is retried
            // at the next one.
            if let Err(e) = self.compact(new) {
                tracing::warn!("cannot compact the state journal (will retry): {e}");
            }
        }
        Ok(())
    }

    /// Writes `state` as a new `state.json` and starts an empty journal for
    /// it (`save`, `clear`, start, shutdown, and when the journal is large).
    /// A crash at any point leaves the old or the new pair: the new journal
    /// is written before the new `state.json` is renamed into place and
    /// names it by hash, and an old journal that does not name the
    /// `state.json` beside it is never replayed.
    pub fn compact(&mut self, state: &State) -> Result<(), StateError> {
        let path = self.path.clone();
        crash_point("before-write");
        let on_disk = OnDisk {
            schema_version: state.schema_version,
            next_id: state.next_id,
            forwarding: state.forwarding,
            forwarding_ipv6: state.forwarding_ipv6,
            rules: Entries(&state.rules, &state.quarantined),
        };
        let mut json = serde_json::to_vec_pretty(&on_disk).expect("state serializes");
        json.push(b'\n');
        let header = journal::Header::for_base(Some(&json)).line();
        let dir = StateDir::open(&path)?;
        let tmp = beside(&path, ".tmp");
        let jtmp = beside(&path, ".journal.tmp");
        let write = |name: &OsString, bytes: &[u8]| -> io::Result<std::fs::File> {
            let mut f = dir.replace_new(name)?;
            f.write_all(bytes)?;
            f.sync_all()?;
            Ok(f)
        };
        if let Err(e) = write(&tmp, &json) {
            let _ = dir.remove(&tmp);
            return Err(io_err("writing", &dir.path().join(&tmp))(e));
        }
        let jfile = match write(&jtmp, &header) {
            Ok(f) => f,
            Err(e) => {
                let _ = dir.remove(&tmp);
                let _ = dir.remove(&jtmp);
                return Err(io_err("writing", &dir.path().join(&jtmp))(e));
            }
        };
        crash_point("after-write");
        // From the rename on, the old journal no longer continues state.json.
        self.journal = None;
        dir.rename(&tmp, &file_name(&path))
            .map_err(io_err("renaming into place", &path))?;
        crash_point("after-rename");
        dir.sync()
            .map_err(io_err("syncing directory", dir.path()))?;
        dir.rename(&jtmp, &journal_name(&path))
            .map_err(io_err("renaming into place", &dir.path().join(&jtmp)))?;
        crash_point("after-journal-rename");
        dir.sync()
            .map_err(io_err("syncing directory", dir.path()))?;
        self.journal = Some(Journal {
            file: jfile,
            len: header.len() as u64,
            base_len: json.len() as u64,
            header_len: header.len() as u64,
        });
        Ok(())
    }

    /// Folds the journal into `state.json` if it holds any change, so a
    /// stopped daemon leaves one file an operator can read or edit.
    pub fn compact_if_journaled(&mut self, state: &State) -> Result<(), StateError> {
        if self.journal.as_ref().is_some_and(|j| j.len == j.header_len) {
            return Ok(());
        }
        self.compact(state)
    }
}

/// Writes `state` to `path` atomically and durably (a compaction: a new
/// `state.json` and an empty journal), quarantined entries after the
/// rules, as they were read.
pub fn save(path: &Path, state: &State) -> Result<(), StateError> {
    Store {
        path: path.to_owned(),
        journal: None,
    }
    .compact(state)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn round_trips_and_moves_corrupt_files_aside() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/state.json");
        assert!(matches!(load(&path).unwrap().0, Loaded::Fresh(_)));
        let state = State {
            next_id: 3,
            ..State::default()
        };
        save(&path, &state).unwrap();
        match load(&path).unwrap().0 {
            Loaded::Existing(s) => assert_eq!(s, state),
            other => panic!("{other:?}"),
        }
        fs::write(&path, b"{not json").unwrap();
        match load(&path).unwrap().0 {
            Loaded::Corrupt { moved_to, .. } => {
                assert_eq!(fs::read(&moved_to).unwrap(), b"{not json");
                assert!(!path.exists());
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn refuses_newer_schema() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        fs::write(&path, br#"{"schema_version":99,"next_id":1,"rules":[]}"#).unwrap();
        assert!(matches!(
            load(&path).map(|l| l.0),
            Err(StateError::TooNew { found: 99, .. })
        ));
        assert!(path.exists(), "a newer file must not be moved");
    }

    #[test]
    fn refuses_version_zero_and_keeps_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        fs::write(&path, br#"{"schema_version":0,"next_id":1,"rules":[]}"#).unwrap();
        let err = load(&path).map(|l| l.0).unwrap_err();
        assert!(matches!(err, StateError::UnknownVersion { found: 0, .. }));
        assert!(err.to_string().contains("reads version 1"), "{err}");
        assert!(path.exists());
    }

    #[test]
    fn quarantined_entries_are_written_back_verbatim() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let text = r#"{"schema_version":1,"next_id":2,"rules":[
            {"id":1,"kind":"snat","source":"198.51.100.0/24","ext_if":"eth0","ext_ip":"192.0.2.1"},
            {"id":1,"kind":"bogus","weird":[1,2]}]}"#;
        fs::write(&path, text).unwrap();
        let Loaded::Existing(state) = load(&path).unwrap().0 else {
            panic!("not loaded")
        };
        assert_eq!(state.rules.len(), 1);
        assert_eq!(state.quarantined.len(), 1);
        assert_eq!(state.next_id, 2);
        save(&path, &state).unwrap();
        let written: serde_json::Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
        assert_eq!(
            written["rules"][1],
            serde_json::json!({"id":1,"kind":"bogus","weird":[1,2]})
        );
        let Loaded::Existing(again) = load(&path).unwrap().0 else {
            panic!("not loaded")
        };
        assert_eq!(again, state);
    }

    fn rule(id: u64, port: u16) -> Rule {
        serde_json::from_value(serde_json::json!({"id": id, "kind": "dnat",
            "ext_ip": "192.0.2.1", "int_ip": "198.51.100.2", "ports": port.to_string(),
            "proto": "tcp", "ext_if": null}))
        .unwrap()
    }

    fn with_rules(ids: &[u64]) -> State {
        State {
            next_id: ids.iter().max().map_or(1, |m| m + 1),
            rules: ids.iter().map(|&i| rule(i, 1000 + i as u16)).collect(),
            ..State::default()
        }
    }

    #[test]
    fn a_delta_applies_in_id_order_and_its_undo_restores_the_state() {
        let before = with_rules(&[1, 3, 5]);
        let delta = Delta {
            put: vec![rule(3, 2000), rule(7, 2001), rule(4, 2002)],
            del: vec![1, 9],
            next_id: 8,
        };
        let undo = before.undo_of(&delta);
        let mut after = before.clone();
        after.apply(&delta);
        let ids: Vec<u64> = after.rules.iter().map(|r| r.id).collect();
        assert_eq!(ids, [3, 4, 5, 7]);
        assert_eq!(after.rule(3), Some(&rule(3, 2000)));
        assert_eq!(after.next_id, 8);
        after.apply(&undo);
        assert_eq!(after, before);
    }

    #[test]
    fn a_delta_is_one_journal_line_and_replays() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let (Loaded::Fresh(mut state), mut store) = load(&path).unwrap() else {
            panic!("a new state dir")
        };
        store.compact(&state).unwrap();
        let delta = Delta {
            put: vec![rule(1, 1001)],
            del: vec![],
            next_id: 2,
        };
        state.apply(&delta);
        store.commit_delta(&delta, &state).unwrap();
        let journal = String::from_utf8(journal_of(&path)).unwrap();
        assert_eq!(
            journal.lines().count(),
            2,
            "header and one record: {journal}"
        );
        assert_eq!(loaded(&path).0, state);
    }

    fn journal_of(path: &Path) -> Vec<u8> {
        fs::read(path.with_file_name("state.json.journal")).unwrap()
    }

    fn loaded(path: &Path) -> (State, Store) {
        match load(path).unwrap() {
            (Loaded::Existing(s), store) => (s, store),
            (other, _) => panic!("{other:?}"),
        }
    }

    #[test]
    fn changes_are_appended_to_the_journal_and_replayed_at_load() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let (Loaded::Fresh(s0), mut store) = load(&path).unwrap() else {
            panic!("not fresh")
        };
        // The first write has no journal to append to: a compaction.
        let s1 = with_rules(&[1, 2]);
        store.commit(&s0, &s1).unwrap();
        let base = fs::read(&path).unwrap();
        let s2 = with_rules(&[2, 3]);
        store.commit(&s1, &s2).unwrap();
        let s3 = State {
            forwarding: true,
            ..s2.clone()
        };
        store.commit(&s2, &s3).unwrap();
        assert_eq!(
            fs::read(&path).unwrap(),
            base,
            "state.json is not rewritten"
        );
        let journal = String::from_utf8(journal_of(&path)).unwrap();
        let lines: Vec<&str> = journal.lines().collect();
        assert_eq!(lines.len(), 3, "{journal}");
        assert!(lines[1].contains("\"del\":[1]") && lines[1].contains("\"id\":3"));
        assert!(
            !lines[1].contains("\"id\":2"),
            "unchanged rules are not written"
        );
        assert_eq!(read_current(&path).unwrap(), s3);
        drop(store);
        let (state, _store) = loaded(&path);
        assert_eq!(state, s3);
        // Loading folded the journal into a new state.json.
        assert_eq!(
            serde_json::from_slice::<State>(&fs::read(&path).unwrap()).unwrap(),
            s3
        );
        assert_eq!(journal_of(&path).iter().filter(|b| **b == b'\n').count(), 1);
    }

    #[test]
    fn a_torn_last_line_is_an_uncommitted_change() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let (_, mut store) = load(&path).unwrap();
        let s1 = with_rules(&[1]);
        store.compact(&s1).unwrap();
        let s2 = with_rules(&[1, 2]);
        store.commit(&s1, &s2).unwrap();
        drop(store);
        let whole = journal_of(&path);
        let mut torn = whole.clone();
        torn.extend(
            b"{\"next_id\":4,\"forwarding\":false,\"forwarding_ipv6\":true,\"put\":[{\"id\":3",
        );
        fs::write(path.with_file_name("state.json.journal"), &torn).unwrap();
        let (state, mut store) = loaded(&path);
        assert_eq!(state, s2);
        // Appending goes on after a torn tail was dropped.
        let s3 = with_rules(&[2]);
        store.commit(&s2, &s3).unwrap();
        drop(store);
        assert_eq!(loaded(&path).0, s3);
    }

    #[test]
    fn a_bad_line_before_the_last_moves_both_files_aside() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let (_, mut store) = load(&path).unwrap();
        let s1 = with_rules(&[1]);
        store.compact(&s1).unwrap();
        store.commit(&s1, &with_rules(&[1, 2])).unwrap();
        drop(store);
        let mut text = journal_of(&path);
        let base = fs::read(&path).unwrap();
        let header_end = text.iter().position(|b| *b == b'\n').unwrap() + 1;
        text.splice(
            header_end..header_end,
            b"{\"next_id\":9,\"oops\n".iter().copied(),
        );
        fs::write(path.with_file_name("state.json.journal"), &text).unwrap();
        assert!(matches!(
            read_current(&path),
            Err(StateError::Corrupt { .. })
        ));
        match load(&path).unwrap().0 {
            Loaded::Corrupt {
                state,
                moved_to,
                error,
            } => {
                assert_eq!(state, State::default());
                assert_eq!(fs::read(&moved_to).unwrap(), text);
                assert!(error.contains("line 2"), "{error}");
                assert!(error.contains("state.json.corrupt-"), "{error}");
            }
            other => panic!("{other:?}"),
        }
        assert!(!path.exists());
        let copy = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .find(|n| n.starts_with("state.json.corrupt-"))
            .unwrap();
        assert_eq!(fs::read(dir.path().join(copy)).unwrap(), base);
    }

    #[test]
    fn a_bad_journal_entry_is_quarantined_verbatim() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let (_, mut store) = load(&path).unwrap();
        let s1 = with_rules(&[1]);
        store.compact(&s1).unwrap();
        drop(store);
        let bad = serde_json::json!({"id": 2, "kind": "dnat", "ext_ip": "192.0.2.1",
            "int_ip": "192.0.2.1", "ports": "80", "proto": "tcp", "ext_if": null});
        let mut text = journal_of(&path);
        text.extend(
            serde_json::to_vec(&serde_json::json!({"next_id": 3, "forwarding": false,
                "forwarding_ipv6": true, "put": [bad.clone()]}))
            .unwrap(),
        );
        text.push(b'\n');
        fs::write(path.with_file_name("state.json.journal"), &text).unwrap();
        let (state, _store) = loaded(&path);
        assert_eq!(state.rules, s1.rules);
        assert_eq!(state.next_id, 3);
        assert_eq!(state.quarantined.len(), 1);
        assert_eq!(state.quarantined[0].entry, bad);
        assert!(state.quarantined[0].reason.contains("same address"));
        // Kept in the compacted file for the operator.
        let written: serde_json::Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
        assert_eq!(written["rules"][1], bad);
    }

    #[test]
    fn compaction_starts_a_new_journal_and_old_journals_are_never_replayed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let (_, mut store) = load(&path).unwrap();
        let mut state = with_rules(&[1]);
        store.compact(&state).unwrap();
        // Past the threshold the journal is folded into state.json.
        let mut compactions = 0;
        let mut last_len = journal_of(&path).len();
        for id in 2..8000u64 {
            let mut next = state.clone();
            next.rules.retain(|r| r.id + 5 > id);
            next.rules.push(rule(id, 1000 + (id % 60000) as u16));
            next.next_id = id + 1;
            store.commit(&state, &next).unwrap();
            state = next;
            let len = journal_of(&path).len();
            if len < last_len {
                compactions += 1;
            }
            last_len = len;
        }
        assert!(compactions >= 1, "the journal was never compacted");
        assert!(last_len as u64 <= COMPACT_MIN + 1024);
        drop(store);
        assert_eq!(read_current(&path).unwrap(), state);
        // A journal that does not continue this state.json (replaced while
        // stopped) is moved aside, never replayed.
        let (_, mut store) = loaded(&path);
        let mut next = state.clone();
        next.rules.push(rule(9000, 9000));
        store.commit(&state, &next).unwrap();
        drop(store);
        let replaced = with_rules(&[1]);
        fs::write(&path, serde_json::to_vec(&replaced).unwrap()).unwrap();
        let (got, _store) = loaded(&path);
        assert_eq!(got, replaced);
        assert!(fs::read_dir(dir.path()).unwrap().any(|e| e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with("state.json.journal.stale-")));
    }
}
