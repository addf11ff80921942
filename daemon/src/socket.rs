//! The daemon's socket: bound at a path in a private directory ([`bind`]), or
//! passed by systemd or launchd (socket activation, [`activated`]).
//!
//! The socket's directory is created or checked without following links that
//! another user could re-point.
//!
//! Clients find the daemon by path, so nobody else may be able to change what
//! that path leads to, or they could listen in the daemon's place and read the
//! prompts. [`private_dir`] therefore walks the path from `/` one entry at a
//! time, never letting the system follow a link for it, and requires:
//! - every directory on the way belongs to root or to this user (an owner can
//!   always rename what their directory holds);
//! - a directory that others can write is sticky, like /tmp, so that only the
//!   owner of an entry may rename or remove it, and the entry taken in it
//!   belongs to root or to this user;
//! - a link on the way passes the same checks (then only root or this user can
//!   re-point it) and is followed by hand: macOS reaches /tmp and $TMPDIR
//!   through such links (/tmp -> private/tmp, /var -> private/var);
//! - the socket's own directory is a real directory, not a link, belongs to
//!   this user and is closed to everyone else (mode 700).
//!
//! Once the whole path passes, only root or this user can change it, so the
//! socket bound by path afterwards lands in the directory that was checked.

use std::collections::VecDeque;
use std::fs::{self, Metadata};
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::UnixListener as StdUnixListener;
use std::path::{Component, Path, PathBuf};

use anyhow::{Context, bail};
use tracing::{info, warn};

/// A socket bound at a path, with the file that goes away with it, or a
/// socket handed over by the service manager.
#[derive(Debug)]
pub struct BoundSocket {
    /// The listening socket, not yet registered with a runtime (so it can be
    /// bound before the daemon detaches).
    listener: StdUnixListener,
    /// The socket file, removed on drop; `None` when the service manager owns it.
    file: Option<SocketFile>,
}

impl BoundSocket {
    /// The socket's path, when this daemon bound it.
    pub fn path(&self) -> Option<&Path> {
        self.file.as_ref().map(SocketFile::path)
    }

    /// The listening socket, and the file to drop once it no longer accepts.
    pub fn into_parts(self) -> (StdUnixListener, Option<SocketFile>) {
        (self.listener, self.file)
    }
}

/// Removes the socket file on drop, if it is still the one this daemon bound
/// (another daemon may have replaced it meanwhile).
#[derive(Debug)]
pub struct SocketFile {
    /// Where the socket file is.
    path: PathBuf,
    /// Device and inode of the file at bind time.
    id: (u64, u64),
}

impl SocketFile {
    /// Where the socket file is.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        let ours =
            fs::symlink_metadata(&self.path).is_ok_and(|meta| (meta.dev(), meta.ino()) == self.id);
        if ours && let Err(error) = fs::remove_file(&self.path) {
            warn!(path = %self.path.display(), %error, "cannot remove the socket file");
        }
    }
}

/// Binds the socket at `path`: in a private directory that no other user can
/// enter or swap for their own (see [`private_dir`]), no second daemon on the
/// same path, a stale socket left by a killed daemon replaced, the socket
/// itself 0600.
pub fn bind(path: &Path) -> anyhow::Result<BoundSocket> {
    let dir = path
        .parent()
        .filter(|dir| !dir.as_os_str().is_empty())
        .with_context(|| format!("socket path {} has no directory", path.display()))?;
    private_dir(dir)?;
    remove_stale_socket(path)?;
    let listener = StdUnixListener::bind(path)
        .with_context(|| format!("cannot listen on {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600))
        .with_context(|| format!("cannot make {} private", path.display()))?;
    let meta = fs::symlink_metadata(path)?;
    Ok(BoundSocket {
        listener,
        file: Some(SocketFile {
            path: path.to_owned(),
            id: (meta.dev(), meta.ino()),
        }),
    })
}

/// The listening socket systemd or launchd passed to this process (socket
/// activation), if any. Call it before any thread starts: on Linux it clears
/// the `LISTEN_*` variables so that children do not take the socket for theirs.
pub fn activated() -> anyhow::Result<Option<BoundSocket>> {
    let listener = activated_listener()?;
    Ok(listener.map(|listener| BoundSocket {
        listener,
        file: None,
    }))
}

/// systemd: `LISTEN_PID` names this process and `LISTEN_FDS` counts the
/// sockets passed from fd 3 (`SD_LISTEN_FDS_START`) on; the first is ours.
#[cfg(target_os = "linux")]
fn activated_listener() -> anyhow::Result<Option<StdUnixListener>> {
    use std::os::fd::FromRawFd;
    let var = |name| std::env::var(name).ok().and_then(|v| v.parse::<u32>().ok());
    if var("LISTEN_PID") != Some(std::process::id()) || var("LISTEN_FDS").unwrap_or(0) < 1 {
        return Ok(None);
    }
    // SAFETY: called while the process is single-threaded (see `activated`).
    unsafe {
        std::env::remove_var("LISTEN_PID");
        std::env::remove_var("LISTEN_FDS");
        std::env::remove_var("LISTEN_FDNAMES");
    }
    // SAFETY: systemd passes the listening socket as fd 3, and nothing else in
    // this process owns it.
    Ok(Some(unsafe { StdUnixListener::from_raw_fd(3) }))
}

/// launchd: the socket named `Listeners` in the job's plist.
#[cfg(target_os = "macos")]
fn activated_listener() -> anyhow::Result<Option<StdUnixListener>> {
    use std::ffi::{c_char, c_int, c_void};
    use std::os::fd::FromRawFd;
    unsafe extern "C" {
        fn launch_activate_socket(
            name: *const c_char,
            fds: *mut *mut c_int,
            count: *mut usize,
        ) -> c_int;
        fn free(pointer: *mut c_void);
    }
    // <sys/errno.h>: not started by launchd; started without a `Listeners` socket.
    const ESRCH: c_int = 3;
    const ENOENT: c_int = 2;
    let mut fds: *mut c_int = std::ptr::null_mut();
    let mut count = 0usize;
    // SAFETY: launchd fills `fds` with a malloc'ed array of `count` descriptors.
    let status = unsafe { launch_activate_socket(c"Listeners".as_ptr(), &mut fds, &mut count) };
    if status == ESRCH || status == ENOENT {
        return Ok(None);
    }
    if status != 0 {
        bail!(
            "launchd did not pass the `Listeners` socket: {} (launch_activate_socket error {status}); \
             check the Sockets entry of the service's plist",
            std::io::Error::from_raw_os_error(status)
        );
    }
    // SAFETY: `fds` holds `count` descriptors that are now ours; the array is freed once read.
    let first = (count > 0).then(|| unsafe { *fds });
    unsafe { free(fds.cast()) };
    Ok(first.map(|fd| unsafe { StdUnixListener::from_raw_fd(fd) }))
}

#[cfg(not(any(target_os = "linux", target_os = "macos")))]
fn activated_listener() -> anyhow::Result<Option<StdUnixListener>> {
    Ok(None)
}

/// Refuses to start when a daemon already answers at `path`; removes a socket
/// file nobody listens on (left by a daemon that was killed).
fn remove_stale_socket(path: &Path) -> anyhow::Result<()> {
    let meta = match fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(error) => bail!("cannot inspect {}: {error}", path.display()),
    };
    if !meta.file_type().is_socket() {
        bail!(
            "{} exists and is not a socket; remove it or choose another --socket",
            path.display()
        );
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => bail!("odmoed is already running on {}", path.display()),
        Err(error) if error.kind() == io::ErrorKind::ConnectionRefused => {
            info!(path = %path.display(), "removing a stale socket");
            fs::remove_file(path)
                .with_context(|| format!("cannot remove stale socket {}", path.display()))
        }
        Err(error) => bail!("cannot check socket {}: {error}", path.display()),
    }
}

/// Most links followed on the way to the socket directory: Linux's own limit
/// before it gives up with ELOOP.
const MAX_LINKS: usize = 40;

/// Permission bits that let the group or others add, remove and rename entries.
const WRITABLE_BY_OTHERS: u32 = 0o022;

/// Sticky bit: only an entry's owner (or the directory's, or root) may remove
/// or rename it.
const STICKY: u32 = 0o1000;

/// Creates `dir` and its missing parents with mode 700, or checks the existing
/// ones, as the module documentation says. The errors name the path and what
/// is wrong with it.
pub fn private_dir(dir: &Path) -> anyhow::Result<()> {
    let uid = nix::unistd::geteuid().as_raw();
    let dir = std::path::absolute(dir)
        .with_context(|| format!("cannot make socket directory {} absolute", dir.display()))?;
    let mut at = Checked::root(uid)?;
    let mut ahead: VecDeque<Step> = steps(&dir).collect();
    let mut links = 0;
    while let Some(step) = ahead.pop_front() {
        let name = match step {
            Step::Root => {
                at = Checked::root(uid)?;
                continue;
            }
            Step::Up => {
                at = at.parent()?;
                continue;
            }
            Step::Down(name) => name,
        };
        let path = at.path.join(&name);
        at.ensure_entries_stay(&path)?;
        let meta = existing_or_created(&path)?;
        let kind = meta.file_type();
        if kind.is_symlink() && ahead.is_empty() {
            bail!(
                "socket directory {} is a symbolic link: odmoed takes only a real directory, \
                 since the link could be re-pointed at another user's directory after it \
                 starts; give --socket a path in the directory the link leads to, or another \
                 one",
                path.display()
            );
        }
        ensure_trusted_owner(&path, &meta, uid)?;
        if kind.is_symlink() {
            links += 1;
            if links > MAX_LINKS {
                bail!(
                    "too many symbolic links on the way to socket directory {}",
                    dir.display()
                );
            }
            let target =
                fs::read_link(&path).with_context(|| format!("cannot read {}", path.display()))?;
            // A relative target goes on from the link's directory, `at`.
            for step in steps(&target).rev() {
                ahead.push_front(step);
            }
        } else if kind.is_dir() {
            at = Checked { path, meta };
        } else {
            bail!(
                "{} is not a directory, so the socket cannot go in it; choose another --socket",
                path.display()
            );
        }
    }
    at.ensure_private(uid)
}

/// One move of the walk down a path.
enum Step {
    /// Back to `/` (an absolute link target).
    Root,
    /// To the parent directory (`..`).
    Up,
    /// Into the entry with this name.
    Down(std::ffi::OsString),
}

/// The moves that `path` makes.
fn steps(path: &Path) -> impl DoubleEndedIterator<Item = Step> + '_ {
    path.components().filter_map(|component| match component {
        Component::RootDir => Some(Step::Root),
        Component::ParentDir => Some(Step::Up),
        Component::Normal(name) => Some(Step::Down(name.to_owned())),
        // Only a Windows path has a prefix; `.` changes nothing.
        Component::Prefix(_) | Component::CurDir => None,
    })
}

/// A directory on the way that passed the checks, reached without links:
/// each of its ancestors passed them too.
struct Checked {
    /// Its path, free of links and of `..`.
    path: PathBuf,
    /// Its own metadata (not a link's).
    meta: Metadata,
}

impl Checked {
    /// `/`.
    fn root(uid: u32) -> anyhow::Result<Checked> {
        let path = PathBuf::from("/");
        let meta = lstat(&path)?;
        ensure_trusted_owner(&path, &meta, uid)?;
        Ok(Checked { path, meta })
    }

    /// The directory holding this one: checked on the way down, since a
    /// checked path holds no links.
    fn parent(mut self) -> anyhow::Result<Checked> {
        if self.path.pop() {
            self.meta = lstat(&self.path)?;
        }
        Ok(self)
    }

    /// Refuses to go on to `entry` when others can write this directory and it
    /// is not sticky: any of them could rename `entry` and put their own in
    /// its place.
    fn ensure_entries_stay(&self, entry: &Path) -> anyhow::Result<()> {
        if others_can_replace_entries(&self.meta) {
            bail!(
                "{} can be written by other users and is not sticky, so any of them could \
                 replace {} with their own; give --socket a path whose directories only you or \
                 root can write (a sticky one such as /tmp will do)",
                self.path.display(),
                entry.display()
            );
        }
        Ok(())
    }

    /// Refuses the socket directory unless it belongs to this user and nobody
    /// else may enter it.
    fn ensure_private(&self, uid: u32) -> anyhow::Result<()> {
        let dir = self.path.display();
        let owner = self.meta.uid();
        if owner != uid {
            bail!(
                "socket directory {dir} belongs to uid {owner}, not to this user (uid {uid}); \
                 choose another --socket"
            );
        }
        let mode = self.meta.mode() & 0o777;
        if mode & 0o077 != 0 {
            // Never suggest changing the mode: the directory may be shared,
            // and closing it would break everyone else's use of it.
            let advice = if others_can_replace_entries(&self.meta) {
                "a path in a directory only you can write".to_owned()
            } else {
                format!(
                    "a path in a new directory, such as {}, which odmoed creates with mode 700",
                    self.path
                        .join(format!("odmoe-{uid}"))
                        .join("odmoed.sock")
                        .display()
                )
            };
            bail!(
                "socket directory {dir} has mode {mode:03o}: other users can enter it, and the \
                 socket must live in a directory only you can enter; give --socket {advice}"
            );
        }
        Ok(())
    }
}

/// Whether users other than the owner may rename or remove any entry of the
/// directory `meta` describes.
fn others_can_replace_entries(meta: &Metadata) -> bool {
    meta.mode() & WRITABLE_BY_OTHERS != 0 && meta.mode() & STICKY == 0
}

/// Refuses `path` unless root or this user owns it: its owner could move
/// whatever it holds, or re-point it if it is a link.
fn ensure_trusted_owner(path: &Path, meta: &Metadata, uid: u32) -> anyhow::Result<()> {
    let owner = meta.uid();
    if owner != 0 && owner != uid {
        bail!(
            "{} belongs to uid {owner}, who could put their own socket where clients look for \
             odmoed's; every directory on the socket path must belong to root or to this user \
             (uid {uid}); choose another --socket",
            path.display()
        );
    }
    Ok(())
}

/// The metadata of `path` itself (a link's own, not its target's), creating
/// `path` as a directory with mode 700 when it does not exist.
fn existing_or_created(path: &Path) -> anyhow::Result<Metadata> {
    match fs::symlink_metadata(path) {
        Err(error) if error.kind() == io::ErrorKind::NotFound => {
            match fs::DirBuilder::new().mode(0o700).create(path) {
                // Someone else created it meanwhile: it is checked like any other.
                Err(error) if error.kind() != io::ErrorKind::AlreadyExists => {
                    bail!("cannot create socket directory {}: {error}", path.display())
                }
                _ => lstat(path),
            }
        }
        other => other.with_context(|| format!("cannot inspect {}", path.display())),
    }
}

/// The metadata of `path` itself, never of a link's target.
fn lstat(path: &Path) -> anyhow::Result<Metadata> {
    fs::symlink_metadata(path).with_context(|| format!("cannot inspect {}", path.display()))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{PermissionsExt, symlink};

    use super::*;

    fn mode(path: &Path) -> u32 {
        fs::symlink_metadata(path).unwrap().mode() & 0o7777
    }

    fn set_mode(path: &Path, mode: u32) {
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
    }

    fn refusal(dir: &Path) -> String {
        format!("{:#}", private_dir(dir).unwrap_err())
    }

    #[test]
    fn missing_directories_are_created_closed() {
        let temp = tempfile::tempdir().unwrap();
        let dir = temp.path().join("a/b");
        private_dir(&dir).unwrap();
        assert_eq!(mode(&temp.path().join("a")), 0o700);
        assert_eq!(mode(&dir), 0o700);
        // Checking it again finds it as it was made.
        private_dir(&dir).unwrap();
    }

    #[test]
    fn a_link_as_the_socket_directory_is_refused() {
        let temp = tempfile::tempdir().unwrap();
        let real = temp.path().join("real");
        fs::DirBuilder::new().mode(0o700).create(&real).unwrap();
        let link = temp.path().join("link");
        symlink(&real, &link).unwrap();
        let error = refusal(&link);
        assert!(error.contains("is a symbolic link"), "{error}");
        assert!(error.contains(&link.display().to_string()), "{error}");
    }

    #[test]
    fn links_on_the_way_are_followed_when_nobody_else_can_change_them() {
        let temp = tempfile::tempdir().unwrap();
        fs::create_dir(temp.path().join("real")).unwrap();
        symlink("real", temp.path().join("relative")).unwrap();
        symlink(temp.path().join("real"), temp.path().join("absolute")).unwrap();
        private_dir(&temp.path().join("relative/run")).unwrap();
        private_dir(&temp.path().join("absolute/run")).unwrap();
        private_dir(&temp.path().join("real/../relative/other")).unwrap();
        assert_eq!(mode(&temp.path().join("real/run")), 0o700);
        assert_eq!(mode(&temp.path().join("real/other")), 0o700);
    }

    #[test]
    fn a_directory_others_can_write_must_be_sticky() {
        let temp = tempfile::tempdir().unwrap();
        let shared = temp.path().join("shared");
        fs::create_dir(&shared).unwrap();
        set_mode(&shared, 0o777);
        let error = refusal(&shared.join("sub"));
        assert!(
            error.contains(&format!(
                "{} can be written by other users",
                shared.display()
            )),
            "{error}"
        );
        assert!(!shared.join("sub").exists(), "nothing is created there");
        // Like /tmp: entries stay with their owners.
        set_mode(&shared, 0o1777);
        private_dir(&shared.join("sub")).unwrap();
    }

    #[test]
    fn an_existing_directory_others_can_enter_is_refused() {
        let temp = tempfile::tempdir().unwrap();
        let open = temp.path().join("open");
        fs::create_dir(&open).unwrap();
        set_mode(&open, 0o755);
        let error = refusal(&open);
        assert!(error.contains("has mode 755"), "{error}");
        assert!(error.contains("open/odmoe-"), "{error}");
        // A shared directory is never to be closed, nor offered for a new one.
        set_mode(&open, 0o777);
        let error = refusal(&open);
        assert!(error.contains("a directory only you can write"), "{error}");
    }

    #[test]
    fn a_file_on_the_way_is_refused() {
        let temp = tempfile::tempdir().unwrap();
        let file = temp.path().join("file");
        fs::write(&file, "").unwrap();
        let error = refusal(&file.join("run"));
        assert!(error.contains("is not a directory"), "{error}");
    }
}
