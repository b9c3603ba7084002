//! `state.json`: the daemon's durable record of every rule it owns.
//!
//! Every acknowledged change is on disk before the client hears about it:
//! write a temporary file, fsync it, rename it over the old one, fsync the
//! directory. A file that does not parse is moved aside, never overwritten.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::model::{Rule, RuleId};

/// The schema version this build writes and reads.
pub const SCHEMA_VERSION: u32 = 1;

/// Everything natmap must remember across restarts.
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
}

impl Default for State {
    fn default() -> State {
        State {
            schema_version: SCHEMA_VERSION,
            next_id: 1,
            forwarding: false,
            forwarding_ipv6: true,
            rules: Vec::new(),
        }
    }
}

fn yes() -> bool {
    true
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
        found: u32,
    },
}

/// How loading went.
#[derive(Debug)]
pub enum Loaded {
    /// No state file yet: start empty.
    Fresh(State),
    /// The file was read.
    Existing(State),
    /// The file did not parse; it was renamed to `moved_to` and natmap starts empty.
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

/// Loads the state at `path`, creating its directory (mode 0700) if needed.
pub fn load(path: &Path) -> Result<Loaded, StateError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io_err("creating directory", dir))?;
    }
    let text = match fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Ok(Loaded::Fresh(State::default()))
        }
        Err(e) => return Err(io_err("reading", path)(e)),
    };
    // Peek at the version first so a newer schema is refused rather than
    // mistaken for corruption and moved aside.
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&text) {
        if let Some(found) = v.get("schema_version").and_then(|s| s.as_u64()) {
            if found > u64::from(SCHEMA_VERSION) {
                return Err(StateError::TooNew {
                    path: path.to_owned(),
                    found: found as u32,
                });
            }
        }
    }
    match serde_json::from_slice::<State>(&text) {
        Ok(state) => Ok(Loaded::Existing(state)),
        Err(parse) => {
            let stamp = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            let mut moved_to = path.as_os_str().to_owned();
            moved_to.push(format!(".corrupt-{stamp}"));
            let moved_to = PathBuf::from(moved_to);
            fs::rename(path, &moved_to).map_err(io_err("moving aside", path))?;
            Ok(Loaded::Corrupt {
                state: State::default(),
                moved_to,
                error: parse.to_string(),
            })
        }
    }
}

/// Crash injection for tests of crash consistency: with
/// `NATMAP_CRASH_AT=before-write|after-write|after-rename` in the daemon's
/// environment, the process aborts at that point of the next state write,
/// as a power cut or `kill -9` would stop it there.
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

/// Writes `state` to `path` atomically and durably.
pub fn save(path: &Path, state: &State) -> Result<(), StateError> {
    crash_point("before-write");
    let mut json = serde_json::to_vec_pretty(state).expect("state serializes");
    json.push(b'\n');
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let write = || -> io::Result<()> {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(&json)?;
        f.sync_all()
    };
    if let Err(e) = write() {
        let _ = fs::remove_file(&tmp);
        return Err(io_err("writing", &tmp)(e));
    }
    crash_point("after-write");
    fs::rename(&tmp, path).map_err(io_err("renaming into place", path))?;
    crash_point("after-rename");
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("syncing directory", dir))
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
