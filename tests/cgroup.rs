//! Memory cgroups for the tests that run odmoed under a real memory limit (v2 at
//! /sys/fs/cgroup, else v1 at /sys/fs/cgroup/memory).

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Memory cgroups a test can create: v2 when /sys/fs/cgroup is the unified hierarchy with
/// the memory controller, else the v1 memory controller.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Version {
    V1,
    V2,
}

impl Version {
    pub fn root(self) -> &'static Path {
        match self {
            Version::V1 => Path::new("/sys/fs/cgroup/memory"),
            Version::V2 => Path::new("/sys/fs/cgroup"),
        }
    }

    pub fn limit_file(self) -> &'static str {
        match self {
            Version::V1 => "memory.limit_in_bytes",
            Version::V2 => "memory.max",
        }
    }

    pub fn usage_file(self) -> &'static str {
        match self {
            Version::V1 => "memory.usage_in_bytes",
            Version::V2 => "memory.current",
        }
    }

    /// The memory.stat keys of inactive page cache and of all page cache.
    pub fn stat_keys(self) -> (&'static str, &'static str) {
        match self {
            Version::V1 => ("total_inactive_file", "total_cache"),
            Version::V2 => ("inactive_file", "file"),
        }
    }

    pub fn detect() -> Option<Version> {
        let v2 = fs::read_to_string("/sys/fs/cgroup/cgroup.controllers")
            .is_ok_and(|controllers| controllers.split_whitespace().any(|c| c == "memory"));
        if v2 {
            Some(Version::V2)
        } else if Path::new("/sys/fs/cgroup/memory/memory.limit_in_bytes").exists() {
            Some(Version::V1)
        } else {
            None
        }
    }
}

/// A memory cgroup made for a test, with two children: `daemon` and `hog`. Removed on drop,
/// after killing whatever is left in it.
pub struct Cgroup {
    pub version: Version,
    pub dir: PathBuf,
}

impl Cgroup {
    /// Creates the cgroup with a memory limit of `limit` bytes, or says why it cannot.
    pub fn create(version: Version, name: &str, limit: u64) -> Result<Cgroup, String> {
        let dir = version
            .root()
            .join(format!("odmoe-{name}-{}", std::process::id()));
        fs::create_dir(&dir).map_err(|error| format!("mkdir {}: {error}", dir.display()))?;
        let cgroup = Cgroup { version, dir };
        let write = |path: PathBuf, text: &str| {
            fs::write(&path, text).map_err(|error| format!("{}: {error}", path.display()))
        };
        if version == Version::V2 {
            write(cgroup.dir.join("cgroup.subtree_control"), "+memory")?;
        }
        write(cgroup.dir.join(version.limit_file()), &limit.to_string())?;
        for child in ["daemon", "hog"] {
            fs::create_dir(cgroup.dir.join(child))
                .map_err(|error| format!("mkdir {child}: {error}"))?;
        }
        Ok(cgroup)
    }

    /// A shell command line that moves itself into `child`, then runs `"$@"`.
    pub fn wrapper(&self, child: &str) -> String {
        format!(
            "echo $$ > '{}' && exec \"$@\"",
            self.dir.join(child).join("cgroup.procs").display()
        )
    }

    pub fn read(&self, child: Option<&str>, file: &str) -> String {
        let dir = child.map_or(self.dir.clone(), |child| self.dir.join(child));
        fs::read_to_string(dir.join(file)).unwrap_or_default()
    }

    /// OOM kills in the cgroup (v1 `memory.oom_control`, v2 `memory.events`).
    pub fn oom_kills(&self) -> u64 {
        let file = match self.version {
            Version::V1 => "memory.oom_control",
            Version::V2 => "memory.events",
        };
        self.read(None, file)
            .lines()
            .find_map(|line| line.strip_prefix("oom_kill ")?.trim().parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        for child in ["daemon", "hog"] {
            let dir = self.dir.join(child);
            for _ in 0..100 {
                let procs = fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
                let pids: Vec<i32> = procs.lines().filter_map(|p| p.parse().ok()).collect();
                if pids.is_empty() {
                    break;
                }
                for pid in pids {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = fs::remove_dir(&dir);
        }
        if let Err(error) = fs::remove_dir(&self.dir) {
            eprintln!("cannot remove {}: {error}", self.dir.display());
        }
    }
}
