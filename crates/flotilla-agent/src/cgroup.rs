//! Task cgroups on cgroup v1 or v2, chosen at runtime.
//!
//! Every task gets `flotilla/<task_id>` under each hierarchy it uses. On v1 that is one directory
//! per controller mount (memory, cpu, cpuacct, pids); on v2 it is one directory in the unified
//! tree. The root can be overridden with `FLOTILLA_CGROUP_ROOT`: a directory holding
//! `cgroup.controllers` is treated as a v2 root, anything else as a directory of v1 controller
//! mounts (`<root>/memory`, `<root>/cpu`, ...).

use flotilla_types::Resources;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use thiserror::Error;

/// Environment variable overriding where cgroup hierarchies are looked for.
pub const CGROUP_ROOT_ENV: &str = "FLOTILLA_CGROUP_ROOT";
/// Directory under each hierarchy that holds all task cgroups.
const PARENT_DIR: &str = "flotilla";
/// CFS period used for cpu limits, in microseconds (the kernel default).
const CPU_PERIOD_US: u64 = 100_000;
/// v1 controllers a task cgroup joins. cpuacct is only joined for accounting.
const V1_CONTROLLERS: [&str; 4] = ["memory", "cpu", "cpuacct", "pids"];

#[derive(Debug, Error)]
pub enum CgroupError {
    #[error("no usable cgroup hierarchy found: {0}")]
    Unavailable(String),
    #[error("cannot create cgroup directory {path}: {source}")]
    Create { path: PathBuf, source: io::Error },
    #[error("cannot write {value:?} to {path}: {source}")]
    Write {
        path: PathBuf,
        value: String,
        source: io::Error,
    },
    #[error("cannot set {field} to {value}: the kernel refused ({source}); current usage may be above the new limit")]
    LimitRefused {
        field: &'static str,
        value: String,
        source: io::Error,
    },
    #[error("{field}: the {controller} controller is not available on this node")]
    ControllerMissing {
        field: &'static str,
        controller: &'static str,
    },
    #[error("cannot remove cgroup {path}: {source}")]
    Remove { path: PathBuf, source: io::Error },
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
}

/// Which cgroup version the node runs and where its hierarchies are mounted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CgroupLayout {
    /// One unified hierarchy.
    V2 { root: PathBuf },
    /// controller name -> mount point. Co-mounted controllers share a path.
    V1 { mounts: BTreeMap<String, PathBuf> },
}

impl CgroupLayout {
    /// Finds the hierarchies: `FLOTILLA_CGROUP_ROOT` if set, else `/sys/fs/cgroup` for v2, else
    /// the v1 mounts listed in `/proc/self/mountinfo`.
    pub fn detect() -> Result<Self, CgroupError> {
        if let Some(root) = std::env::var_os(CGROUP_ROOT_ENV) {
            return Ok(Self::from_root(PathBuf::from(root)));
        }
        let unified = Path::new("/sys/fs/cgroup");
        if unified.join("cgroup.controllers").exists() {
            return Ok(CgroupLayout::V2 {
                root: unified.to_path_buf(),
            });
        }
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").map_err(|e| {
            CgroupError::Unavailable(format!("cannot read /proc/self/mountinfo: {e}"))
        })?;
        let mounts = parse_v1_mounts(&mountinfo);
        if mounts.is_empty() {
            return Err(CgroupError::Unavailable(
                "neither cgroup v2 at /sys/fs/cgroup nor any cgroup v1 controller mount".into(),
            ));
        }
        Ok(CgroupLayout::V1 { mounts })
    }

    fn from_root(root: PathBuf) -> Self {
        if root.join("cgroup.controllers").exists() {
            return CgroupLayout::V2 { root };
        }
        let mounts = V1_CONTROLLERS
            .iter()
            .map(|c| (c.to_string(), root.join(c)))
            .filter(|(_, p)| p.is_dir())
            .collect();
        CgroupLayout::V1 { mounts }
    }

    /// The cgroup of one task (not created yet).
    pub fn task(&self, task_id: &str) -> TaskCgroup {
        match self {
            CgroupLayout::V2 { root } => TaskCgroup::V2 {
                parent: root.join(PARENT_DIR),
                root: root.clone(),
                dir: root.join(PARENT_DIR).join(task_id),
            },
            CgroupLayout::V1 { mounts } => TaskCgroup::V1 {
                dirs: V1_CONTROLLERS
                    .iter()
                    .filter_map(|c| {
                        mounts
                            .get(*c)
                            .map(|m| (c.to_string(), m.join(PARENT_DIR).join(task_id)))
                    })
                    .collect(),
            },
        }
    }
}

/// Reads the v1 controller mounts out of a mountinfo text.
fn parse_v1_mounts(mountinfo: &str) -> BTreeMap<String, PathBuf> {
    let mut mounts = BTreeMap::new();
    for line in mountinfo.lines() {
        // Format: id parent maj:min root mountpoint opts [optional...] - fstype source superopts
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let mut right = right.split_whitespace();
        if right.next() != Some("cgroup") {
            continue;
        }
        let super_opts = right.nth(1).unwrap_or("");
        let Some(mount_point) = left.split_whitespace().nth(4) else {
            continue;
        };
        for opt in super_opts.split(',') {
            if V1_CONTROLLERS.contains(&opt) {
                mounts.insert(opt.to_string(), PathBuf::from(mount_point));
            }
        }
    }
    mounts
}

/// What a task's cgroup has used, read by [`TaskCgroup::usage`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CgroupUsage {
    pub cpu_nanos: u64,
    pub memory_bytes: u64,
    pub memory_limit_bytes: Option<u64>,
}

/// The cgroup directories of one task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskCgroup {
    V2 {
        root: PathBuf,
        parent: PathBuf,
        dir: PathBuf,
    },
    /// controller -> directory. Co-mounted controllers appear once per name, same path.
    V1 { dirs: BTreeMap<String, PathBuf> },
}

impl TaskCgroup {
    /// Every distinct directory of this cgroup.
    pub fn dirs(&self) -> Vec<PathBuf> {
        let mut dirs: Vec<PathBuf> = match self {
            TaskCgroup::V2 { dir, .. } => vec![dir.clone()],
            TaskCgroup::V1 { dirs } => dirs.values().cloned().collect(),
        };
        dirs.sort();
        dirs.dedup();
        dirs
    }

    /// The `cgroup.procs` files a process writes its pid into to join this cgroup.
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs()
            .into_iter()
            .map(|d| d.join("cgroup.procs"))
            .collect()
    }

    /// Whether the directories exist (the cgroup was created and not yet removed).
    pub fn exists(&self) -> bool {
        let dirs = self.dirs();
        !dirs.is_empty() && dirs.iter().all(|d| d.is_dir())
    }

    /// Creates the directories. On v2 it first enables the cpu, memory and pids controllers for
    /// the `flotilla` subtree where the kernel offers them; missing ones only matter once a limit
    /// needs them, and [`TaskCgroup::apply`] then says so.
    pub fn create(&self) -> Result<(), CgroupError> {
        if let TaskCgroup::V2 { root, parent, .. } = self {
            mkdir_all(parent)?;
            let offered =
                std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
            let wanted: Vec<String> = ["cpu", "memory", "pids"]
                .iter()
                .filter(|c| offered.split_whitespace().any(|o| o == **c))
                .map(|c| format!("+{c}"))
                .collect();
            if wanted.len() < 3 {
                tracing::warn!(offered = %offered.trim(), "cgroup v2 root lacks some of cpu/memory/pids; limits needing them will fail");
            }
            for dir in [root, parent] {
                for ctl in &wanted {
                    if let Err(e) = std::fs::write(dir.join("cgroup.subtree_control"), ctl) {
                        tracing::warn!(dir = %dir.display(), controller = %ctl, error = %e, "cannot enable cgroup controller");
                    }
                }
            }
        }
        let dirs = self.dirs();
        if dirs.is_empty() {
            return Err(CgroupError::Unavailable(
                "no controller hierarchy to create the task cgroup in".into(),
            ));
        }
        for dir in dirs {
            mkdir_all(&dir)?;
        }
        Ok(())
    }

    /// Writes the limits and reservations of `resources`. Unset amounts reset the limit to
    /// "unlimited", so the same call serves the initial setup and later updates.
    pub fn apply(&self, resources: &Resources) -> Result<(), CgroupError> {
        let limits = resources.limits;
        let reservations = resources.reservations;
        match self {
            TaskCgroup::V2 { dir, .. } => {
                let mem_max = limits
                    .memory_bytes
                    .map_or("max".to_string(), |b| b.to_string());
                self.write_limit(
                    dir,
                    "memory.max",
                    "memory",
                    "deploy.resources.limits.memory",
                    &mem_max,
                    limits.memory_bytes.is_some(),
                )?;
                let mem_low = reservations.memory_bytes.unwrap_or(0).to_string();
                self.write_limit(
                    dir,
                    "memory.low",
                    "memory",
                    "deploy.resources.reservations.memory",
                    &mem_low,
                    reservations.memory_bytes.is_some(),
                )?;
                let cpu_max = match limits.cpu_millis {
                    Some(m) => format!("{} {CPU_PERIOD_US}", cpu_quota_us(m)),
                    None => format!("max {CPU_PERIOD_US}"),
                };
                self.write_limit(
                    dir,
                    "cpu.max",
                    "cpu",
                    "deploy.resources.limits.cpus",
                    &cpu_max,
                    limits.cpu_millis.is_some(),
                )?;
                let weight = reservations.cpu_millis.map_or(100, cpu_weight).to_string();
                self.write_limit(
                    dir,
                    "cpu.weight",
                    "cpu",
                    "deploy.resources.reservations.cpus",
                    &weight,
                    reservations.cpu_millis.is_some(),
                )?;
                let pids = limits.pids.map_or("max".to_string(), |p| p.to_string());
                self.write_limit(
                    dir,
                    "pids.max",
                    "pids",
                    "deploy.resources.limits.pids",
                    &pids,
                    limits.pids.is_some(),
                )?;
            }
            TaskCgroup::V1 { dirs } => {
                let need =
                    |controller: &'static str, field: &'static str, requested: bool| match dirs
                        .get(controller)
                    {
                        Some(d) => Ok(Some(d.clone())),
                        None if requested => {
                            Err(CgroupError::ControllerMissing { field, controller })
                        }
                        None => Ok(None),
                    };
                if let Some(mem) = need(
                    "memory",
                    "deploy.resources.limits.memory",
                    limits.memory_bytes.is_some(),
                )? {
                    // -1 means unlimited in v1.
                    let value = limits
                        .memory_bytes
                        .map_or("-1".to_string(), |b| b.to_string());
                    self.set_v1_memory_limit(&mem, &value)?;
                    let soft = reservations
                        .memory_bytes
                        .map_or("-1".to_string(), |b| b.to_string());
                    self.write_limit(
                        &mem,
                        "memory.soft_limit_in_bytes",
                        "memory",
                        "deploy.resources.reservations.memory",
                        &soft,
                        reservations.memory_bytes.is_some(),
                    )?;
                }
                if let Some(cpu) = need(
                    "cpu",
                    "deploy.resources.limits.cpus",
                    limits.cpu_millis.is_some() || reservations.cpu_millis.is_some(),
                )? {
                    self.write_limit(
                        &cpu,
                        "cpu.cfs_period_us",
                        "cpu",
                        "deploy.resources.limits.cpus",
                        &CPU_PERIOD_US.to_string(),
                        limits.cpu_millis.is_some(),
                    )?;
                    let quota = limits
                        .cpu_millis
                        .map_or("-1".to_string(), |m| cpu_quota_us(m).to_string());
                    self.write_limit(
                        &cpu,
                        "cpu.cfs_quota_us",
                        "cpu",
                        "deploy.resources.limits.cpus",
                        &quota,
                        limits.cpu_millis.is_some(),
                    )?;
                    let shares = reservations.cpu_millis.map_or(1024, cpu_shares).to_string();
                    self.write_limit(
                        &cpu,
                        "cpu.shares",
                        "cpu",
                        "deploy.resources.reservations.cpus",
                        &shares,
                        reservations.cpu_millis.is_some(),
                    )?;
                }
                if let Some(pids) = need(
                    "pids",
                    "deploy.resources.limits.pids",
                    limits.pids.is_some(),
                )? {
                    let value = limits.pids.map_or("max".to_string(), |p| p.to_string());
                    self.write_limit(
                        &pids,
                        "pids.max",
                        "pids",
                        "deploy.resources.limits.pids",
                        &value,
                        limits.pids.is_some(),
                    )?;
                }
            }
        }
        Ok(())
    }

    /// v1 memory limit and the matching memory+swap limit. memsw must stay >= the memory limit,
    /// so the order depends on whether the limit grows or shrinks; trying both orders is simpler
    /// than reading the current values and equally correct.
    fn set_v1_memory_limit(&self, dir: &Path, value: &str) -> Result<(), CgroupError> {
        let field = "deploy.resources.limits.memory";
        let memsw = dir.join("memory.memsw.limit_in_bytes");
        if !memsw.exists() {
            return self.write_limit(dir, "memory.limit_in_bytes", "memory", field, value, true);
        }
        // Raising: memsw first. Lowering: memory first. Unknown: try memsw, then memory, then memsw again.
        let memsw_first = std::fs::write(&memsw, value);
        self.write_limit(dir, "memory.limit_in_bytes", "memory", field, value, true)?;
        if memsw_first.is_err() {
            if let Err(e) = std::fs::write(&memsw, value) {
                // Swap accounting may be disabled or busy; the memory limit itself is in place.
                tracing::warn!(path = %memsw.display(), error = %e, "cannot set memory+swap limit; swap may exceed the memory limit");
            }
        }
        Ok(())
    }

    /// Writes one limit file. A missing file is fine when the value is a reset (nothing was
    /// requested), and an error naming the field otherwise.
    fn write_limit(
        &self,
        dir: &Path,
        file: &str,
        controller: &'static str,
        field: &'static str,
        value: &str,
        requested: bool,
    ) -> Result<(), CgroupError> {
        let path = dir.join(file);
        if !path.exists() {
            return if requested {
                Err(CgroupError::ControllerMissing { field, controller })
            } else {
                Ok(())
            };
        }
        std::fs::write(&path, value).map_err(|source| match source.raw_os_error() {
            Some(libc::EBUSY) | Some(libc::EINVAL) if requested => CgroupError::LimitRefused {
                field,
                value: value.to_string(),
                source,
            },
            _ => CgroupError::Write {
                path: path.clone(),
                value: value.to_string(),
                source,
            },
        })
    }

    /// Pids of every process in the cgroup (all hierarchies, deduplicated).
    pub fn pids(&self) -> Vec<i32> {
        let mut pids: Vec<i32> = self
            .procs_files()
            .iter()
            .filter_map(|f| std::fs::read_to_string(f).ok())
            .flat_map(|s| {
                s.lines()
                    .filter_map(|l| l.trim().parse().ok())
                    .collect::<Vec<i32>>()
            })
            .collect();
        pids.sort_unstable();
        pids.dedup();
        pids
    }

    /// SIGKILLs every process in the cgroup, including ones that left the task's process group.
    pub fn kill_all(&self) {
        for pid in self.pids() {
            // ESRCH just means it exited in between.
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }

    /// Cpu time used so far (ns), memory in use and the memory limit (`None`: unlimited).
    pub fn usage(&self) -> Result<CgroupUsage, CgroupError> {
        let read = |path: PathBuf| {
            std::fs::read_to_string(&path)
                .map_err(|e| CgroupError::Unavailable(format!("{}: {e}", path.display())))
        };
        let number = |path: PathBuf| -> Result<Option<u64>, CgroupError> {
            Ok(read(path)?.trim().parse::<u64>().ok())
        };
        // Limits at or above 2^62 are the kernel's way of writing "unlimited" on v1.
        let limited = |v: Option<u64>| v.filter(|l| *l < 1 << 62);
        match self {
            TaskCgroup::V2 { dir, .. } => {
                let stat = read(dir.join("cpu.stat"))?;
                let usec = stat
                    .lines()
                    .find_map(|l| l.strip_prefix("usage_usec "))
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .unwrap_or(0);
                Ok(CgroupUsage {
                    cpu_nanos: usec.saturating_mul(1000),
                    memory_bytes: number(dir.join("memory.current"))?.unwrap_or(0),
                    // memory.max reads "max" when unlimited, which does not parse.
                    memory_limit_bytes: number(dir.join("memory.max"))?,
                })
            }
            TaskCgroup::V1 { dirs } => {
                let dir = |c: &str| {
                    dirs.get(c).cloned().ok_or_else(|| {
                        CgroupError::Unavailable(format!("the {c} controller is not mounted"))
                    })
                };
                Ok(CgroupUsage {
                    cpu_nanos: number(dir("cpuacct")?.join("cpuacct.usage"))?.unwrap_or(0),
                    memory_bytes: number(dir("memory")?.join("memory.usage_in_bytes"))?
                        .unwrap_or(0),
                    memory_limit_bytes: limited(number(
                        dir("memory")?.join("memory.limit_in_bytes"),
                    )?),
                })
            }
        }
    }

    /// How many times the kernel OOM-killed a process in this cgroup.
    pub fn oom_kills(&self) -> u64 {
        let (file, dir) = match self {
            TaskCgroup::V2 { dir, .. } => ("memory.events", dir.clone()),
            TaskCgroup::V1 { dirs } => match dirs.get("memory") {
                Some(d) => ("memory.oom_control", d.clone()),
                None => return 0,
            },
        };
        let text = std::fs::read_to_string(dir.join(file)).unwrap_or_default();
        let counter = |key: &str| {
            text.lines().find_map(|l| {
                l.strip_prefix(key)
                    .and_then(|v| v.trim().parse::<u64>().ok())
            })
        };
        match counter("oom_kill ") {
            Some(n) => n,
            // Kernels before 4.13 have no v1 oom_kill counter; under_oom is the best remaining hint.
            None => counter("under_oom ").unwrap_or(0),
        }
    }

    /// Kills what is left in the cgroup and removes its directories. Retries for a while because
    /// rmdir fails with EBUSY until killed processes are fully gone. Missing directories are fine.
    pub fn remove(&self) -> Result<(), CgroupError> {
        let deadline = Instant::now() + Duration::from_secs(10);
        for dir in self.dirs() {
            loop {
                self.kill_all();
                match std::fs::remove_dir(&dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                    Err(e)
                        if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline =>
                    {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(source) => return Err(CgroupError::Remove { path: dir, source }),
                }
            }
        }
        Ok(())
    }
}

fn mkdir_all(path: &Path) -> Result<(), CgroupError> {
    std::fs::create_dir_all(path).map_err(|source| CgroupError::Create {
        path: path.to_path_buf(),
        source,
    })
}

/// CFS quota for a cpu limit in millicores: 1000 millis = one full period.
fn cpu_quota_us(millis: u64) -> u64 {
    // The kernel rejects quotas below 1ms.
    (millis * CPU_PERIOD_US / 1000).max(1000)
}

/// v1 shares: 1024 per cpu, at least 2 (the kernel minimum).
fn cpu_shares(millis: u64) -> u64 {
    (millis * 1024 / 1000).max(2)
}

/// v2 weight: the default 100 corresponds to one cpu (1024 shares), clamped to 1..=10000.
fn cpu_weight(millis: u64) -> u64 {
    (millis * 100 / 1000).clamp(1, 10_000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_v1_mounts_with_separate_cpu_and_cpuacct() {
        let info = "32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n\
                    33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct\n\
                    35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n\
                    41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";
        let m = parse_v1_mounts(info);
        assert_eq!(m.get("cpu"), Some(&PathBuf::from("/sys/fs/cgroup/cpu")));
        assert_eq!(
            m.get("cpuacct"),
            Some(&PathBuf::from("/sys/fs/cgroup/cpuacct"))
        );
        assert_eq!(
            m.get("memory"),
            Some(&PathBuf::from("/sys/fs/cgroup/memory"))
        );
        assert!(!m.contains_key("pids"));
    }

    #[test]
    fn comounted_controllers_share_one_dir() {
        let info = "32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n";
        let layout = CgroupLayout::V1 {
            mounts: parse_v1_mounts(info),
        };
        let cg = layout.task("t1");
        assert_eq!(
            cg.dirs(),
            vec![PathBuf::from("/sys/fs/cgroup/cpu,cpuacct/flotilla/t1")]
        );
    }

    #[test]
    fn cpu_conversions() {
        assert_eq!(cpu_quota_us(500), 50_000);
        assert_eq!(cpu_quota_us(2000), 200_000);
        assert_eq!(cpu_quota_us(1), 1000);
        assert_eq!(cpu_shares(1000), 1024);
        assert_eq!(cpu_shares(1), 2);
        assert_eq!(cpu_weight(1000), 100);
        assert_eq!(cpu_weight(1), 1);
        assert_eq!(cpu_weight(1_000_000), 10_000);
    }
}
