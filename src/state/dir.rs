//! The state directory, used through one open descriptor.
//!
//! natmap runs as root and writes beside `state.json`: a temporary file, a
//! lock file, moved-aside copies of a corrupt state. If someone else could
//! write in that directory, they could plant `state.json.tmp -> /etc/shadow`
//! and have root overwrite the target. So the directory must be owned by
//! the daemon's user and writable by nobody else (checked on every open),
//! and every file in it is opened relative to the directory's descriptor
//! with `O_NOFOLLOW` (and `O_EXCL` where natmap creates it), so a path
//! swapped between a check and a use cannot redirect a write either.

use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{openat, renameat, OFlag};
use nix::sys::stat::Mode;
use nix::unistd::{unlinkat, UnlinkatFlags};

use super::StateError;

/// How many suffixed names (`…-1`, `…-2`) a new unique file may try.
const UNIQUE_TRIES: u32 = 1000;

/// An open, checked state directory.
pub(super) struct StateDir {
    fd: File,
    path: PathBuf,
}

/// The directory `state_path` lives in (`.` for a bare file name).
pub(super) fn dir_of(state_path: &Path) -> &Path {
    match state_path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

impl StateDir {
    /// Opens the directory of `state_path`, creating it (mode 0700) if
    /// needed, and refuses it unless it is owned by the daemon's user and
    /// not writable by group or others.
    pub(super) fn open(state_path: &Path) -> Result<StateDir, StateError> {
        let path = dir_of(state_path).to_owned();
        let io = |action: &'static str| {
            let path = path.clone();
            move |source| StateError::Io {
                action,
                path,
                source,
            }
        };
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&path)
            .map_err(io("creating directory"))?;
        let fd = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
            .open(&path)
            .map_err(io("opening directory"))?;
        let meta = fd.metadata().map_err(io("inspecting directory"))?;
        check_owner_and_mode(&path, meta.uid(), meta.mode())?;
        Ok(StateDir { fd, path })
    }

    /// The directory's path, for messages.
    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    fn raw(&self) -> Option<RawFd> {
        Some(self.fd.as_raw_fd())
    }

    fn open_at(&self, name: &OsStr, flags: OFlag, mode: u32) -> io::Result<File> {
        let fd = openat(
            self.raw(),
            name,
            flags | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(mode),
        )
        .map_err(|e| match e {
            Errno::ELOOP => io::Error::new(
                io::ErrorKind::InvalidInput,
                "it is a symbolic link, which natmap never follows beside its state file: remove it",
            ),
            other => other.into(),
        })?;
        // SAFETY: `openat` just returned this descriptor; nothing else owns it.
        Ok(unsafe { File::from_raw_fd(fd) })
    }

    /// Reads `name`, or `None` if it does not exist. A symbolic link is
    /// refused (`ELOOP`): the next write would replace it anyway.
    pub(super) fn read(&self, name: &OsStr) -> io::Result<Option<Vec<u8>>> {
        let mut file = match self.open_at(name, OFlag::O_RDONLY | OFlag::O_NONBLOCK, 0) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        regular_file(&file)?;
        let mut text = Vec::new();
        io::Read::read_to_end(&mut file, &mut text)?;
        Ok(Some(text))
    }

    /// Creates `name` (mode 0600), which must not exist yet: `O_EXCL`, so
    /// neither a file nor a link planted under that name is opened.
    pub(super) fn create_new(&self, name: &OsStr) -> io::Result<File> {
        self.open_at(
            name,
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL,
            0o600,
        )
    }

    /// [`Self::create_new`], first removing a stale `name` (a temporary
    /// file left by a crash, or a planted link: unlinking a link removes
    /// the link, never its target).
    pub(super) fn replace_new(&self, name: &OsStr) -> io::Result<File> {
        match self.create_new(name) {
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                unlinkat(self.raw(), name, UnlinkatFlags::NoRemoveDir)?;
                self.create_new(name)
            }
            other => other,
        }
    }

    /// Writes `bytes` durably to a new file named `base`, or `base-1`,
    /// `base-2`, … if that exists: never over an existing file.
    pub(super) fn write_unique(&self, base: &OsStr, bytes: &[u8]) -> io::Result<PathBuf> {
        for n in 0..UNIQUE_TRIES {
            let mut name = base.to_owned();
            if n > 0 {
                name.push(format!("-{n}"));
            }
            let mut file = match self.create_new(&name) {
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                other => other?,
            };
            file.write_all(bytes)?;
            file.sync_all()?;
            return Ok(self.path.join(name));
        }
        Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{UNIQUE_TRIES} files named {base:?}[-N] exist already"),
        ))
    }

    /// Opens the existing regular file `name` for writing (the journal,
    /// appended to), never through a link.
    pub(super) fn open_write(&self, name: &OsStr) -> io::Result<File> {
        let file = self.open_at(name, OFlag::O_WRONLY | OFlag::O_NONBLOCK, 0)?;
        regular_file(&file)?;
        Ok(file)
    }

    /// Opens (creating if needed) the lock file `name` for `flock`: never
    /// through a link, and only a regular file (a FIFO would block).
    pub(super) fn open_lock(&self, name: &OsStr) -> io::Result<File> {
        let file = self.open_at(
            name,
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_NONBLOCK,
            0o600,
        )?;
        regular_file(&file)?;
        Ok(file)
    }

    /// Renames `from` over `to`, both in this directory.
    pub(super) fn rename(&self, from: &OsStr, to: &OsStr) -> io::Result<()> {
        Ok(renameat(self.raw(), from, self.raw(), to)?)
    }

    /// Removes `name` (a link itself, never its target).
    pub(super) fn remove(&self, name: &OsStr) -> io::Result<()> {
        Ok(unlinkat(self.raw(), name, UnlinkatFlags::NoRemoveDir)?)
    }

    /// Makes renames and removals in the directory durable.
    pub(super) fn sync(&self) -> io::Result<()> {
        self.fd.sync_all()
    }
}

fn regular_file(file: &File) -> io::Result<()> {
    if file.metadata()?.file_type().is_file() {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file; remove it",
        ))
    }
}

/// Refuses a directory that someone other than the daemon's user could
/// write in, saying how to fix it.
fn check_owner_and_mode(path: &Path, uid: u32, mode: u32) -> Result<(), StateError> {
    let me = nix::unistd::geteuid().as_raw();
    let owner = if me == 0 {
        "root".to_owned()
    } else {
        me.to_string()
    };
    let shown = path.display();
    let fix = format!("chown {owner}: {shown} && chmod 0700 {shown}");
    let problem = if uid != me {
        format!("is owned by uid {uid}, not {owner}")
    } else if mode & 0o022 != 0 {
        format!(
            "is writable by group or others (mode {:04o})",
            mode & 0o7777
        )
    } else {
        return Ok(());
    };
    Err(StateError::UnsafeDir {
        path: path.to_owned(),
        problem,
        fix,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{symlink, PermissionsExt};

    #[test]
    fn refuses_directories_others_can_write() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state.json");
        assert!(StateDir::open(&state).is_ok());
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o777)).unwrap();
        let err = StateDir::open(&state).err().unwrap().to_string();
        assert!(err.contains("writable by group or others"), "{err}");
        assert!(err.contains("chmod 0700"), "{err}");
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o700)).unwrap();
    }

    #[test]
    fn never_writes_through_a_planted_link() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("target");
        fs::write(&target, b"precious").unwrap();
        symlink(&target, dir.path().join("f.tmp")).unwrap();
        let d = StateDir::open(&dir.path().join("f")).unwrap();
        assert_eq!(
            d.create_new(OsStr::new("f.tmp")).unwrap_err().kind(),
            io::ErrorKind::AlreadyExists
        );
        d.replace_new(OsStr::new("f.tmp"))
            .unwrap()
            .write_all(b"new")
            .unwrap();
        assert_eq!(fs::read(&target).unwrap(), b"precious");
        symlink(&target, dir.path().join("f.lock")).unwrap();
        assert!(d.open_lock(OsStr::new("f.lock")).is_err());
        assert_eq!(fs::read(&target).unwrap(), b"precious");
    }

    #[test]
    fn unique_copies_never_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let d = StateDir::open(&dir.path().join("f")).unwrap();
        let a = d.write_unique(OsStr::new("f.corrupt-1"), b"a").unwrap();
        let b = d.write_unique(OsStr::new("f.corrupt-1"), b"b").unwrap();
        assert_ne!(a, b);
        assert_eq!(fs::read(a).unwrap(), b"a");
        assert_eq!(fs::read(b).unwrap(), b"b");
    }
}
