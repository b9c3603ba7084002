//! `state.json`: the daemon's durable record of every rule it owns.
//!
//! Every acknowledged change is on disk before the client hears about it:
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
mod vet;

use std::ffi::OsString;
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

/// Loads the state at `path`, creating its directory (mode 0700) if needed.
/// Refuses an unsafe directory and any schema version but this build's.
pub fn load(path: &Path) -> Result<Loaded, StateError> {
    let dir = StateDir::open(path)?;
    let Some(text) = dir
        .read(&file_name(path))
        .map_err(io_err("reading", path))?
    else {
        return Ok(Loaded::Fresh(State::default()));
    };
    // The version first, so a file of another schema is refused rather
    // than mistaken for corruption and moved aside.
    if let Ok(VersionPeek {
        schema_version: Some(found),
    }) = serde_json::from_slice::<VersionPeek>(&text)
    {
        check_version(path, found)?;
    }
    match crate::proto::strict::from_slice::<StoredState>(&text) {
        Ok(stored) => Ok(Loaded::Existing(vetted(path, stored))),
        Err(parse) => {
            let moved_to = move_aside(&dir, path, &text)?;
            Ok(Loaded::Corrupt {
                state: State::default(),
                moved_to,
                error: parse,
            })
        }
    }
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

/// Copies a corrupt file to a new `.corrupt-<secs>[-N]` name (never over
/// an earlier copy), then removes it.
fn move_aside(dir: &StateDir, path: &Path, text: &[u8]) -> Result<PathBuf, StateError> {
    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let moved_to = dir
        .write_unique(&beside(path, &format!(".corrupt-{stamp}")), text)
        .map_err(io_err("moving aside", path))?;
    dir.remove(&file_name(path))
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
/// `NATMAP_CRASH_AT=before-write|after-write|after-rename` in the daemon's
/// environment, the process aborts at that point of the next state write,
/// as a power cut or `kill -9` would stop it there.
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

/// Writes `state` to `path` atomically and durably, quarantined entries
/// after the rules, as they were read.
pub fn save(path: &Path, state: &State) -> Result<(), StateError> {
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
    let dir = StateDir::open(path)?;
    let tmp = beside(path, ".tmp");
    let tmp_path = dir.path().join(&tmp);
    let write = || -> io::Result<()> {
        let mut f = dir.replace_new(&tmp)?;
        f.write_all(&json)?;
        f.sync_all()
    };
    if let Err(e) = write() {
        let _ = dir.remove(&tmp);
        return Err(io_err("writing", &tmp_path)(e));
    }
    crash_point("after-write");
    dir.rename(&tmp, &file_name(path))
        .map_err(io_err("renaming into place", path))?;
    crash_point("after-rename");
    dir.sync().map_err(io_err("syncing directory", dir.path()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn round_trips_and_moves_corrupt_files_aside() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/state.json");
        assert!(matches!(load(&path).unwrap(), Loaded::Fresh(_)));
        let state = State {
            next_id: 3,
            ..State::default()
        };
        save(&path, &state).unwrap();
        match load(&path).unwrap() {
            Loaded::Existing(s) => assert_eq!(s, state),
            other => panic!("{other:?}"),
        }
        fs::write(&path, b"{not json").unwrap();
        match load(&path).unwrap() {
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
            load(&path),
            Err(StateError::TooNew { found: 99, .. })
        ));
        assert!(path.exists(), "a newer file must not be moved");
    }

    #[test]
    fn refuses_version_zero_and_keeps_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        fs::write(&path, br#"{"schema_version":0,"next_id":1,"rules":[]}"#).unwrap();
        let err = load(&path).unwrap_err();
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
        let Loaded::Existing(state) = load(&path).unwrap() else {
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
        let Loaded::Existing(again) = load(&path).unwrap() else {
            panic!("not loaded")
        };
        assert_eq!(again, state);
    }
}
