//! Linux: PSI triggers, and the memory left on the machine and in the daemon's
//! cgroups.
//!
//! Pressure events come from PSI triggers written to the `memory.pressure`
//! file of the daemon's own cgroup v2 when it has one, else to
//! `/proc/pressure/memory`, and polled for `POLLPRI`: a warning when some task
//! stalled on memory for 150 ms of a second, critical when all did. Without
//! CAP_SYS_RESOURCE the kernel takes only windows that are whole multiples of
//! 2 s, so a refused trigger is armed again over 2 s with the same share of
//! stall. A kernel without PSI (or a file that cannot be written) leaves the
//! headroom alone to tell pressure, which is said once in the log.
//!
//! Headroom is the least of `MemAvailable` and, for every cgroup from the
//! daemon's own up to the root of its hierarchy that has a memory limit, that
//! limit less what the cgroup holds beyond reclaimable page cache (usage less
//! inactive file pages): cgroup v2 `memory.max`/`memory.current`, or v1
//! `memory.limit_in_bytes`/`memory.usage_in_bytes`, whichever this machine has.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use tracing::{info, warn};

use super::{Headroom, Level, PressureSource};

/// The warning trigger: some task stalled on memory for 150 ms in 1 s.
const WARN_TRIGGER: Trigger = Trigger {
    kind: "some",
    stall_us: 150_000,
    window_us: 1_000_000,
};
/// The critical trigger: every task stalled on memory for 150 ms in 1 s.
const CRITICAL_TRIGGER: Trigger = Trigger {
    kind: "full",
    stall_us: 150_000,
    window_us: 1_000_000,
};
/// The window the kernel requires of triggers armed without CAP_SYS_RESOURCE.
const UNPRIVILEGED_WINDOW_US: u64 = 2_000_000;
/// A memory limit this large means none (cgroup v1 writes "unlimited" as a
/// page-counter maximum near 2^63).
const UNLIMITED: u64 = 1 << 62;

/// One PSI trigger: `<kind> <stall> <window>` in microseconds.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Trigger {
    kind: &'static str,
    stall_us: u64,
    window_us: u64,
}

impl Trigger {
    /// The same share of stall over the window unprivileged triggers need.
    fn unprivileged(self) -> Trigger {
        let scale = UNPRIVILEGED_WINDOW_US.div_ceil(self.window_us);
        Trigger {
            stall_us: self.stall_us * scale,
            window_us: self.window_us * scale,
            ..self
        }
    }

    fn describe(self) -> String {
        format!(
            "{} {}ms/{}s",
            self.kind,
            self.stall_us / 1000,
            self.window_us as f64 / 1e6
        )
    }
}

/// Armed PSI triggers.
struct Psi {
    path: PathBuf,
    /// Fires on a warning; `None` when it could not be armed.
    warn: Option<(File, Trigger)>,
    /// Fires on critical pressure; `None` when it could not be armed.
    critical: Option<(File, Trigger)>,
    /// Set when the kernel dropped the triggers (their cgroup went away).
    lost: AtomicBool,
}

/// A cgroup whose limit bounds the daemon.
#[derive(Clone, Debug, PartialEq)]
enum Scope {
    /// A cgroup v1 memory-controller directory.
    V1(PathBuf),
    /// A cgroup v2 directory with the memory controller enabled.
    V2(PathBuf),
}

/// PSI triggers and headroom readings for this process.
pub struct LinuxSource {
    psi: Option<Psi>,
    /// The daemon's cgroups that may carry a memory limit, innermost first.
    scopes: Vec<Scope>,
    /// Where the triggers and limits are read, for `stats`.
    description: String,
}

impl LinuxSource {
    /// Finds the daemon's cgroups and arms the PSI triggers; says in the log
    /// what it watches, and when PSI is unavailable, why.
    pub fn open() -> LinuxSource {
        let membership = fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let (v1, v2) = own_cgroups(&membership, &mounts);
        let mut scopes = Vec::new();
        if let Some(dir) = &v2
            && dir.join("memory.max").exists()
        {
            scopes.extend(ancestors(dir, &mounts, Scope::V2));
        }
        if let Some(dir) = &v1
            && dir.join("memory.limit_in_bytes").exists()
        {
            scopes.extend(ancestors(dir, &mounts, Scope::V1));
        }
        // The daemon's own cgroup v2 pressure file when it has one (not the
        // root), else the whole machine's.
        let psi_path = v2
            .as_ref()
            .map(|dir| dir.join("memory.pressure"))
            .filter(|path| path.exists() && !is_mount_point(path.parent(), &mounts))
            .unwrap_or_else(|| PathBuf::from("/proc/pressure/memory"));
        let psi = arm(&psi_path);
        let cgroup = match scopes.first() {
            Some(Scope::V1(dir)) => format!("; headroom of cgroup v1 {}", dir.display()),
            Some(Scope::V2(dir)) => format!("; headroom of cgroup v2 {}", dir.display()),
            None => String::new(),
        };
        let description = match &psi {
            Some(psi) => {
                let triggers: Vec<String> = [&psi.warn, &psi.critical]
                    .into_iter()
                    .flatten()
                    .map(|(_, trigger)| trigger.describe())
                    .collect();
                format!(
                    "PSI triggers ({}) on {}; MemAvailable{cgroup}",
                    triggers.join(", "),
                    psi.path.display()
                )
            }
            None => format!("polling MemAvailable{cgroup}"),
        };
        info!(source = %description, "watching memory pressure");
        LinuxSource {
            psi,
            scopes,
            description,
        }
    }
}

impl PressureSource for LinuxSource {
    fn describe(&self) -> String {
        self.description.clone()
    }

    fn wait(&self, timeout: Duration) -> Option<(Level, String)> {
        let Some(psi) = self
            .psi
            .as_ref()
            .filter(|psi| !psi.lost.load(Ordering::Relaxed))
        else {
            std::thread::sleep(timeout);
            return None;
        };
        let armed: Vec<(Level, &(File, Trigger))> = [
            (Level::Warn, psi.warn.as_ref()),
            (Level::Critical, psi.critical.as_ref()),
        ]
        .into_iter()
        .filter_map(|(level, armed)| armed.map(|armed| (level, armed)))
        .collect();
        let mut fds: Vec<PollFd<'_>> = armed
            .iter()
            .map(|(_, (file, _))| PollFd::new(file.as_fd(), PollFlags::POLLPRI))
            .collect();
        let timeout = PollTimeout::try_from(timeout).unwrap_or(PollTimeout::MAX);
        match poll(&mut fds, timeout) {
            Ok(0) | Err(nix::errno::Errno::EINTR) => return None,
            Ok(_) => {}
            Err(error) => {
                warn!(%error, "polling the PSI triggers failed; reading the headroom alone");
                psi.lost.store(true, Ordering::Relaxed);
                return None;
            }
        }
        let mut fired = None;
        for ((level, (_, trigger)), fd) in armed.iter().zip(&fds) {
            let revents = fd.revents().unwrap_or(PollFlags::empty());
            if revents.contains(PollFlags::POLLERR) {
                warn!(
                    path = %psi.path.display(),
                    "the PSI triggers went away; reading the headroom alone"
                );
                psi.lost.store(true, Ordering::Relaxed);
                return None;
            }
            if revents.contains(PollFlags::POLLPRI) {
                fired = Some((
                    *level,
                    format!("PSI {} on {}", trigger.describe(), psi.path.display()),
                ));
            }
        }
        fired
    }

    fn headroom(&self) -> Option<Headroom> {
        let meminfo = fs::read_to_string("/proc/meminfo").ok()?;
        let field = |name: &str| -> Option<u64> {
            let line = meminfo.lines().find(|line| line.starts_with(name))?;
            let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kib * 1024)
        };
        let mut headroom = Headroom {
            available: field("MemAvailable:")?,
            limit: field("MemTotal:")?,
            scope: "the machine".to_owned(),
        };
        for scope in &self.scopes {
            if let Some((limit, held)) = cgroup_usage(scope) {
                let available = limit.saturating_sub(held);
                let dir = match scope {
                    Scope::V1(dir) | Scope::V2(dir) => dir,
                };
                if available < headroom.available {
                    headroom.available = available;
                    headroom.scope = format!("cgroup {}", dir.display());
                }
                headroom.limit = headroom.limit.min(limit);
            }
        }
        Some(headroom)
    }
}

/// Arms the warning and critical triggers on `path`, logging why when PSI
/// cannot be used.
fn arm(path: &Path) -> Option<Psi> {
    let open = |trigger: Trigger| -> io::Result<(File, Trigger)> {
        match write_trigger(path, trigger) {
            Err(error) if error.raw_os_error() == Some(nix::libc::EINVAL) => {
                let wider = trigger.unprivileged();
                write_trigger(path, wider).map(|file| (file, wider))
            }
            other => other.map(|file| (file, trigger)),
        }
    };
    let warn = open(WARN_TRIGGER);
    let critical = open(CRITICAL_TRIGGER);
    match (warn, critical) {
        (Err(error), Err(_)) => {
            warn!(
                path = %path.display(),
                %error,
                "PSI triggers cannot be armed (no PSI in this kernel, or no permission); \
                 memory pressure is read from the headroom alone, polled"
            );
            None
        }
        (warn, critical) => {
            if let Err(error) = &warn {
                warn!(path = %path.display(), %error, "the PSI warning trigger cannot be armed");
            }
            if let Err(error) = &critical {
                warn!(path = %path.display(), %error, "the PSI critical trigger cannot be armed");
            }
            Some(Psi {
                path: path.to_owned(),
                warn: warn.ok(),
                critical: critical.ok(),
                lost: AtomicBool::new(false),
            })
        }
    }
}

/// Opens `path` and writes `trigger` to it; the trigger lives as long as the file.
fn write_trigger(path: &Path, trigger: Trigger) -> io::Result<File> {
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(nix::libc::O_NONBLOCK)
        .open(path)?;
    // The kernel reads the text up to its last byte, which it overwrites with
    // a NUL: the terminator must be written too.
    let text = format!(
        "{} {} {}\0",
        trigger.kind, trigger.stall_us, trigger.window_us
    );
    file.write_all(text.as_bytes())?;
    Ok(file)
}

/// The memory limit of `scope` and what it holds beyond reclaimable page
/// cache, when it has a limit.
fn cgroup_usage(scope: &Scope) -> Option<(u64, u64)> {
    let number = |path: PathBuf| -> Option<u64> {
        let text = fs::read_to_string(path).ok()?;
        text.trim().parse().ok()
    };
    let stat = |dir: &Path, key: &str| -> u64 {
        fs::read_to_string(dir.join("memory.stat"))
            .ok()
            .and_then(|text| {
                text.lines()
                    .find_map(|line| line.strip_prefix(key)?.strip_prefix(' ')?.parse().ok())
            })
            .unwrap_or(0)
    };
    let (limit, usage, inactive) = match scope {
        Scope::V1(dir) => (
            number(dir.join("memory.limit_in_bytes"))?,
            number(dir.join("memory.usage_in_bytes"))?,
            stat(dir, "total_inactive_file"),
        ),
        // "max" reads as no number: no limit.
        Scope::V2(dir) => (
            number(dir.join("memory.max"))?,
            number(dir.join("memory.current"))?,
            stat(dir, "inactive_file"),
        ),
    };
    (limit < UNLIMITED).then(|| (limit, usage.saturating_sub(inactive)))
}

/// The daemon's cgroup v1 memory directory and cgroup v2 directory, from
/// `/proc/self/cgroup` and `/proc/self/mountinfo`.
fn own_cgroups(membership: &str, mounts: &str) -> (Option<PathBuf>, Option<PathBuf>) {
    let mut v1 = None;
    let mut v2 = None;
    for line in membership.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        if controllers.is_empty() {
            v2 = mount_of(mounts, |fstype, _| fstype == "cgroup2")
                .map(|(root, point)| within(&point, &root, path));
        } else if controllers.split(',').any(|c| c == "memory") {
            v1 = mount_of(mounts, |fstype, options| {
                fstype == "cgroup" && options.split(',').any(|o| o == "memory")
            })
            .map(|(root, point)| within(&point, &root, path));
        }
    }
    (v1, v2)
}

/// The (root within the hierarchy, mount point) of the first mount that
/// `matches` (fstype, super options).
fn mount_of(mounts: &str, matches: impl Fn(&str, &str) -> bool) -> Option<(String, PathBuf)> {
    mounts.lines().find_map(|line| {
        let (fields, tail) = line.split_once(" - ")?;
        let fields: Vec<&str> = fields.split(' ').collect();
        let tail: Vec<&str> = tail.split(' ').collect();
        let (root, point) = (fields.get(3)?, fields.get(4)?);
        let (fstype, options) = (tail.first()?, tail.get(2).unwrap_or(&""));
        matches(fstype, options).then(|| ((*root).to_owned(), PathBuf::from(point)))
    })
}

/// The directory of cgroup `path` under a mount of the hierarchy's `root` at `point`.
fn within(point: &Path, root: &str, path: &str) -> PathBuf {
    let relative = Path::new(path)
        .strip_prefix(root)
        .unwrap_or(Path::new(path))
        .to_owned();
    let relative = relative.strip_prefix("/").unwrap_or(&relative);
    point.join(relative)
}

/// Whether `dir` is a mount point listed in `mounts` (the root of a cgroup hierarchy).
fn is_mount_point(dir: Option<&Path>, mounts: &str) -> bool {
    dir.is_some_and(|dir| {
        mounts.lines().any(|line| {
            line.split(' ')
                .nth(4)
                .is_some_and(|point| Path::new(point) == dir)
        })
    })
}

/// `dir` and its parents up to the mount point holding it, each as a scope.
fn ancestors(dir: &Path, mounts: &str, scope: fn(PathBuf) -> Scope) -> Vec<Scope> {
    let mut scopes = Vec::new();
    let mut current = Some(dir);
    while let Some(dir) = current {
        scopes.push(scope(dir.to_owned()));
        if is_mount_point(Some(dir), mounts) {
            break;
        }
        current = dir.parent();
    }
    scopes
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTS: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    #[test]
    fn own_cgroups_come_from_membership_and_mounts() {
        let membership = "4:memory:/jobs/odmoe\n1:cpu:/\n0::/user.slice/odmoed.service\n";
        let (v1, v2) = own_cgroups(membership, MOUNTS);
        assert_eq!(v1.unwrap(), Path::new("/sys/fs/cgroup/memory/jobs/odmoe"));
        assert_eq!(
            v2.unwrap(),
            Path::new("/sys/fs/cgroup/unified/user.slice/odmoed.service")
        );
        // A cgroup namespace mounts the hierarchy from the daemon's own cgroup.
        let mounts = "30 1 0:26 /user.slice /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        let (v1, v2) = own_cgroups("0::/user.slice/odmoed\n", mounts);
        assert_eq!(v1, None);
        assert_eq!(v2.unwrap(), Path::new("/sys/fs/cgroup/odmoed"));
    }

    #[test]
    fn ancestors_stop_at_the_mount_point() {
        let dir = Path::new("/sys/fs/cgroup/memory/jobs/odmoe");
        let scopes = ancestors(dir, MOUNTS, Scope::V1);
        assert_eq!(
            scopes,
            [
                Scope::V1(dir.to_owned()),
                Scope::V1("/sys/fs/cgroup/memory/jobs".into()),
                Scope::V1("/sys/fs/cgroup/memory".into()),
            ]
        );
    }

    #[test]
    fn unprivileged_triggers_keep_the_share_over_two_seconds() {
        let wider = WARN_TRIGGER.unprivileged();
        assert_eq!((wider.stall_us, wider.window_us), (300_000, 2_000_000));
        assert_eq!(wider.describe(), "some 300ms/2s");
    }

    #[test]
    fn a_cgroup_limit_reads_less_its_inactive_page_cache() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| fs::write(dir.path().join(name), text).unwrap();
        write("memory.limit_in_bytes", "1000000\n");
        write("memory.usage_in_bytes", "900000\n");
        write(
            "memory.stat",
            "cache 5\ninactive_file 1\ntotal_inactive_file 300000\n",
        );
        let scope = Scope::V1(dir.path().to_owned());
        assert_eq!(cgroup_usage(&scope), Some((1_000_000, 600_000)));
        write("memory.limit_in_bytes", "9223372036854771712\n");
        assert_eq!(cgroup_usage(&scope), None);
        write("memory.max", "max\n");
        write("memory.current", "10\n");
        assert_eq!(cgroup_usage(&Scope::V2(dir.path().to_owned())), None);
    }

    #[test]
    fn this_machine_gives_a_headroom() {
        let source = LinuxSource::open();
        let headroom = source.headroom().expect("/proc/meminfo");
        assert!(headroom.available <= headroom.limit || headroom.scope != "the machine");
        assert!(headroom.limit > 0);
    }
}
