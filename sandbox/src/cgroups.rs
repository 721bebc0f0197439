//! The `namespace` sandbox's limits: memory and process count through a cgroup under the
//! helper's own (v1 or v2, whichever delegates the controller), or rlimits where none does.

use std::fs;
use std::path::{Path, PathBuf};

use crate::isolate::{Isolation, os_error};

/// How a limit ended up being applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Applied {
    CgroupV1,
    CgroupV2,
    Rlimit,
    NotAsked,
}

impl Applied {
    pub fn name(self) -> &'static str {
        match self {
            Applied::CgroupV1 => "cgroup-v1",
            Applied::CgroupV2 => "cgroup-v2",
            Applied::Rlimit => "rlimit",
            Applied::NotAsked => "none",
        }
    }
}

impl Cgroups {
    pub(crate) fn remove(&self) {
        for dir in &self.dirs {
            // The kernel may take a moment to release a cgroup whose last task just exited.
            for _ in 0..50 {
                if fs::remove_dir(dir).is_ok() || !dir.exists() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
    }
}

/// The session's cgroups, one per controller (v1) or one in all (v2).
pub(crate) struct Cgroups {
    dirs: Vec<PathBuf>,
    /// Limits no cgroup could take, applied as rlimits by init instead.
    rlimit_memory: Option<u64>,
    rlimit_processes: Option<u64>,
}

impl Cgroups {
    /// Creates the session's cgroups with their limits; on failure, removes those made.
    pub(crate) fn create(isolation: &Isolation) -> Result<(Cgroups, Applied, Applied), String> {
        let mut cgroups = Cgroups {
            dirs: Vec::new(),
            rlimit_memory: None,
            rlimit_processes: None,
        };
        match cgroups.fill(isolation) {
            Ok((memory, processes)) => Ok((cgroups, memory, processes)),
            Err(message) => {
                cgroups.remove();
                Err(message)
            }
        }
    }

    fn fill(&mut self, isolation: &Isolation) -> Result<(Applied, Applied), String> {
        let own = fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        let name = format!("peerbuild-{}", std::process::id());
        let memory = match isolation.memory_limit_bytes {
            None => Applied::NotAsked,
            Some(bytes) => {
                let limit = bytes.to_string();
                let v1 = [
                    ("memory.limit_in_bytes", limit.as_str()),
                    ("memory.memsw.limit_in_bytes", limit.as_str()),
                ];
                let v2 = [("memory.max", limit.as_str()), ("memory.swap.max", "0")];
                self.limit(&own, &name, "memory", &v1, &v2)?
            }
        };
        if memory == Applied::Rlimit {
            self.rlimit_memory = isolation.memory_limit_bytes;
        }
        let processes = match isolation.process_limit {
            None => Applied::NotAsked,
            Some(count) => {
                let limit = count.to_string();
                let settings = [("pids.max", limit.as_str())];
                self.limit(&own, &name, "pids", &settings, &settings)?
            }
        };
        if processes == Applied::Rlimit {
            self.rlimit_processes = isolation.process_limit;
        }
        Ok((memory, processes))
    }

    /// Puts a limit in a new cgroup under the helper's own (so the machine's own limits still
    /// apply above it), on v1 or v2, whichever has the controller; rlimits otherwise.
    fn limit(
        &mut self,
        own: &str,
        name: &str,
        controller: &str,
        v1: &[(&str, &str)],
        v2: &[(&str, &str)],
    ) -> Result<Applied, String> {
        if let Some(dir) = v1_dir(own, controller, name) {
            self.make(&dir, v1)?;
            return Ok(Applied::CgroupV1);
        }
        if let Some(dir) = v2_dir(own, controller, name) {
            if !self.dirs.contains(&dir) {
                self.make(&dir, &[])?;
            }
            write_settings(&dir, v2)?;
            return Ok(Applied::CgroupV2);
        }
        Ok(Applied::Rlimit)
    }

    fn make(&mut self, dir: &Path, settings: &[(&str, &str)]) -> Result<(), String> {
        match fs::create_dir(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(format!("cannot create the cgroup {}: {e}", dir.display())),
        }
        self.dirs.push(dir.to_owned());
        write_settings(dir, settings)
    }

    /// Whether no cgroup was made (no limit asked, or only rlimits apply).
    pub(crate) fn is_empty(&self) -> bool {
        self.dirs.is_empty()
    }

    /// Moves the process `pid` (in the caller's pid namespace) into every cgroup of the
    /// session. Slow: each move waits for the kernel's cgroup lock, and the first one after a
    /// quiet spell for an RCU grace period (5 to 15 ms), so the helper does it while init
    /// builds the sandbox (see `isolate.rs`).
    pub(crate) fn attach(&self, pid: i32) -> Result<(), String> {
        for dir in &self.dirs {
            fs::write(dir.join("cgroup.procs"), pid.to_string())
                .map_err(|e| format!("cannot move the sandbox into {}: {e}", dir.display()))?;
        }
        Ok(())
    }

    pub(crate) fn apply_rlimits(&self) -> Result<(), String> {
        let set = |resource, value: u64, what: &str| {
            let limit = libc::rlimit {
                rlim_cur: value,
                rlim_max: value,
            };
            // SAFETY: setrlimit reads the struct.
            if unsafe { libc::setrlimit(resource, &limit) } < 0 {
                return Err(os_error(&format!("cannot limit {what}")));
            }
            Ok(())
        };
        if let Some(bytes) = self.rlimit_memory {
            set(libc::RLIMIT_AS, bytes, "memory")?;
        }
        if let Some(count) = self.rlimit_processes {
            set(libc::RLIMIT_NPROC, count, "processes")?;
        }
        Ok(())
    }
}

fn write_settings(dir: &Path, settings: &[(&str, &str)]) -> Result<(), String> {
    for (file, value) in settings {
        let path = dir.join(file);
        // memsw and swap files exist only where swap accounting is on; without them there is
        // no swap to limit.
        if !path.exists() && (file.contains("memsw") || file.contains("swap")) {
            continue;
        }
        fs::write(&path, value).map_err(|e| format!("cannot set {}: {e}", path.display()))?;
    }
    Ok(())
}

/// The file that counts out-of-memory kills in the session cgroup of the helper `helper_pid`
/// (v1 `memory.oom_control`, v2 `memory.events`), found by the node, under whose cgroup the
/// helper makes its own; `None` where there is no such cgroup (`host`, rlimits, or not yet).
pub(crate) fn oom_events_file(helper_pid: u32) -> Option<PathBuf> {
    let own = fs::read_to_string("/proc/self/cgroup").ok()?;
    let name = format!("peerbuild-{helper_pid}");
    let v1 = v1_dir(&own, "memory", &name).map(|dir| dir.join("memory.oom_control"));
    let v2 = || v2_dir(&own, "memory", &name).map(|dir| dir.join("memory.events"));
    v1.filter(|file| file.exists())
        .or_else(|| v2().filter(|file| file.exists()))
}

/// The `oom_kill` count in a file [`oom_events_file`] found.
pub(crate) fn oom_kills(file: &Path) -> Option<u64> {
    fs::read_to_string(file)
        .ok()?
        .lines()
        .find_map(|line| line.strip_prefix("oom_kill "))
        .and_then(|count| count.trim().parse().ok())
}

/// The v1 hierarchy holding `controller`, if it is mounted where systemd and Docker put it.
fn v1_dir(own: &str, controller: &str, name: &str) -> Option<PathBuf> {
    own.lines().find_map(|line| {
        let mut fields = line.splitn(3, ':');
        let (_, controllers, path) = (fields.next()?, fields.next()?, fields.next()?);
        if !controllers.split(',').any(|c| c == controller) {
            return None;
        }
        let mount = Path::new("/sys/fs/cgroup").join(controller);
        mount
            .join("cgroup.procs")
            .exists()
            .then(|| mount.join(path.trim_start_matches('/')).join(name))
    })
}

/// The v2 cgroup under ours, if our cgroup hands `controller` to its children.
fn v2_dir(own: &str, controller: &str, name: &str) -> Option<PathBuf> {
    let path = own.lines().find_map(|line| line.strip_prefix("0::"))?;
    let mount = Path::new("/sys/fs/cgroup");
    if !mount.join("cgroup.controllers").exists() {
        return None;
    }
    let parent = mount.join(path.trim_start_matches('/'));
    let delegated = fs::read_to_string(parent.join("cgroup.subtree_control")).ok()?;
    delegated
        .split_whitespace()
        .any(|c| c == controller)
        .then(|| parent.join(name))
}
