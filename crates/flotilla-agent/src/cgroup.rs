//! Task cgroups on cgroup v1 or v2, chosen at runtime.
//! (Hand-written, not `cgroups-rs` or youki's `libcgroups`: Flotilla writes about ten limit
//! files, needs errors that name the Compose field, and a relocatable root for tempdir tests;
//! both crates bring their own host detection, error types and far more surface than that.)
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
        match self {
            TaskCgroup::V2 { dir, .. } => {
                v2_memory(dir, resources)?;
                v2_cpu(dir, resources)?;
                pids_limit(dir, resources)
            }
            TaskCgroup::V1 { dirs } => {
                let (limits, reservations) = (resources.limits, resources.reservations);
                if let Some(dir) = v1_dir(dirs, &MEMORY_LIMIT, limits.memory_bytes.is_some())? {
                    v1_memory(dir, resources)?;
                }
                let cpu_requested =
                    limits.cpu_millis.is_some() || reservations.cpu_millis.is_some();
                if let Some(dir) = v1_dir(dirs, &CPU_LIMIT, cpu_requested)? {
                    v1_cpu(dir, resources)?;
                }
                if let Some(dir) = v1_dir(dirs, &PIDS_LIMIT, limits.pids.is_some())? {
                    pids_limit(dir, resources)?;
                }
                Ok(())
            }
        }
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

/// A setting of a Compose service and the controller that enforces it, named in errors.
struct Setting {
    controller: &'static str,
    field: &'static str,
}

const MEMORY_LIMIT: Setting = Setting {
    controller: "memory",
    field: "deploy.resources.limits.memory",
};
const MEMORY_RESERVATION: Setting = Setting {
    controller: "memory",
    field: "deploy.resources.reservations.memory",
};
const CPU_LIMIT: Setting = Setting {
    controller: "cpu",
    field: "deploy.resources.limits.cpus",
};
const CPU_RESERVATION: Setting = Setting {
    controller: "cpu",
    field: "deploy.resources.reservations.cpus",
};
const PIDS_LIMIT: Setting = Setting {
    controller: "pids",
    field: "deploy.resources.limits.pids",
};

/// `amount`, or the controller's word for "no limit".
fn or_unlimited(amount: Option<u64>, unlimited: &str) -> String {
    amount.map_or(unlimited.to_string(), |v| v.to_string())
}

/// v2 memory: `memory.max` (limit) and `memory.low` (reservation).
fn v2_memory(dir: &Path, r: &Resources) -> Result<(), CgroupError> {
    let limit = r.limits.memory_bytes;
    write_limit(
        dir,
        "memory.max",
        &MEMORY_LIMIT,
        &or_unlimited(limit, "max"),
        limit.is_some(),
    )?;
    let low = r.reservations.memory_bytes;
    let value = low.unwrap_or(0).to_string();
    write_limit(
        dir,
        "memory.low",
        &MEMORY_RESERVATION,
        &value,
        low.is_some(),
    )
}

/// v2 cpu: `cpu.max` (quota per period) and `cpu.weight` (reservation).
fn v2_cpu(dir: &Path, r: &Resources) -> Result<(), CgroupError> {
    let limit = r.limits.cpu_millis;
    let max = match limit {
        Some(m) => format!("{} {CPU_PERIOD_US}", cpu_quota_us(m)),
        None => format!("max {CPU_PERIOD_US}"),
    };
    write_limit(dir, "cpu.max", &CPU_LIMIT, &max, limit.is_some())?;
    let reserved = r.reservations.cpu_millis;
    let weight = reserved.map_or(100, cpu_weight).to_string();
    write_limit(
        dir,
        "cpu.weight",
        &CPU_RESERVATION,
        &weight,
        reserved.is_some(),
    )
}

/// pids: `pids.max`, the same file on v1 and v2.
fn pids_limit(dir: &Path, r: &Resources) -> Result<(), CgroupError> {
    let limit = r.limits.pids;
    write_limit(
        dir,
        "pids.max",
        &PIDS_LIMIT,
        &or_unlimited(limit, "max"),
        limit.is_some(),
    )
}

/// The task's directory in a v1 controller's hierarchy; `None` when the controller is not
/// mounted and nothing needs it, an error naming the setting when something does.
fn v1_dir<'a>(
    dirs: &'a BTreeMap<String, PathBuf>,
    setting: &Setting,
    requested: bool,
) -> Result<Option<&'a Path>, CgroupError> {
    match dirs.get(setting.controller) {
        Some(d) => Ok(Some(d)),
        None if requested => Err(missing(setting)),
        None => Ok(None),
    }
}

/// v1 memory: the limit (with memory+swap) and `memory.soft_limit_in_bytes` (reservation).
fn v1_memory(dir: &Path, r: &Resources) -> Result<(), CgroupError> {
    // -1 means unlimited in v1.
    set_v1_memory_limit(dir, &or_unlimited(r.limits.memory_bytes, "-1"))?;
    let soft = r.reservations.memory_bytes;
    let value = or_unlimited(soft, "-1");
    write_limit(
        dir,
        "memory.soft_limit_in_bytes",
        &MEMORY_RESERVATION,
        &value,
        soft.is_some(),
    )
}

/// v1 cpu: CFS period and quota (limit) and `cpu.shares` (reservation).
fn v1_cpu(dir: &Path, r: &Resources) -> Result<(), CgroupError> {
    let limit = r.limits.cpu_millis;
    let period = CPU_PERIOD_US.to_string();
    write_limit(
        dir,
        "cpu.cfs_period_us",
        &CPU_LIMIT,
        &period,
        limit.is_some(),
    )?;
    let quota = or_unlimited(limit.map(cpu_quota_us), "-1");
    write_limit(dir, "cpu.cfs_quota_us", &CPU_LIMIT, &quota, limit.is_some())?;
    let reserved = r.reservations.cpu_millis;
    let shares = reserved.map_or(1024, cpu_shares).to_string();
    write_limit(
        dir,
        "cpu.shares",
        &CPU_RESERVATION,
        &shares,
        reserved.is_some(),
    )
}

/// v1 memory limit and the matching memory+swap limit. memsw must stay >= the memory limit,
/// so the order depends on whether the limit grows or shrinks; trying both orders is simpler
/// than reading the current values and equally correct.
fn set_v1_memory_limit(dir: &Path, value: &str) -> Result<(), CgroupError> {
    let memsw = dir.join("memory.memsw.limit_in_bytes");
    if !memsw.exists() {
        return write_limit(dir, "memory.limit_in_bytes", &MEMORY_LIMIT, value, true);
    }
    // Raising: memsw first. Lowering: memory first. Unknown: try memsw, then memory, then memsw again.
    let memsw_first = std::fs::write(&memsw, value);
    write_limit(dir, "memory.limit_in_bytes", &MEMORY_LIMIT, value, true)?;
    if memsw_first.is_err() {
        if let Err(e) = std::fs::write(&memsw, value) {
            // Swap accounting may be disabled or busy; the memory limit itself is in place.
            tracing::warn!(path = %memsw.display(), error = %e, "cannot set memory+swap limit; swap may exceed the memory limit");
        }
    }
    Ok(())
}

fn missing(setting: &Setting) -> CgroupError {
    CgroupError::ControllerMissing {
        field: setting.field,
        controller: setting.controller,
    }
}

/// Writes one limit file. A missing file is fine when the value is a reset (nothing was
/// requested), and an error naming the setting otherwise.
fn write_limit(
    dir: &Path,
    file: &str,
    setting: &Setting,
    value: &str,
    requested: bool,
) -> Result<(), CgroupError> {
    let path = dir.join(file);
    if !path.exists() {
        return if requested {
            Err(missing(setting))
        } else {
            Ok(())
        };
    }
    std::fs::write(&path, value).map_err(|source| match source.raw_os_error() {
        Some(libc::EBUSY) | Some(libc::EINVAL) if requested => CgroupError::LimitRefused {
            field: setting.field,
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

    fn resources() -> Resources {
        let mut r = Resources::default();
        r.limits.memory_bytes = Some(64 << 20);
        r.limits.cpu_millis = Some(500);
        r.limits.pids = Some(100);
        r.reservations.memory_bytes = Some(32 << 20);
        r.reservations.cpu_millis = Some(250);
        r
    }

    /// A fake hierarchy in a tempdir: `dirs` are created under `root`, and `files` (the limit
    /// files the kernel would offer) in the task's directories once the cgroup is created.
    fn fake_task(root: &Path, files: &[&str]) -> TaskCgroup {
        let cg = CgroupLayout::from_root(root.to_path_buf()).task("t1");
        cg.create().unwrap();
        for dir in cg.dirs() {
            for f in files {
                std::fs::write(dir.join(f), "").unwrap();
            }
        }
        cg
    }

    fn read(dir: &Path, file: &str) -> String {
        std::fs::read_to_string(dir.join(file)).unwrap()
    }

    #[test]
    fn v2_limits_are_written_and_reset() {
        let root = tempfile::tempdir().unwrap();
        std::fs::write(root.path().join("cgroup.controllers"), "cpu memory pids\n").unwrap();
        let files = [
            "memory.max",
            "memory.low",
            "cpu.max",
            "cpu.weight",
            "pids.max",
        ];
        let cg = fake_task(root.path(), &files);
        let dir = root.path().join("flotilla/t1");
        assert_eq!(cg.dirs(), vec![dir.clone()]);

        cg.apply(&resources()).unwrap();
        assert_eq!(read(&dir, "memory.max"), (64u64 << 20).to_string());
        assert_eq!(read(&dir, "memory.low"), (32u64 << 20).to_string());
        assert_eq!(read(&dir, "cpu.max"), "50000 100000");
        assert_eq!(read(&dir, "cpu.weight"), "25");
        assert_eq!(read(&dir, "pids.max"), "100");

        cg.apply(&Resources::default()).unwrap();
        assert_eq!(read(&dir, "memory.max"), "max");
        assert_eq!(read(&dir, "memory.low"), "0");
        assert_eq!(read(&dir, "cpu.max"), "max 100000");
        assert_eq!(read(&dir, "cpu.weight"), "100");
        assert_eq!(read(&dir, "pids.max"), "max");

        // A controller the kernel does not offer: fine until a limit needs it.
        std::fs::remove_file(dir.join("pids.max")).unwrap();
        cg.apply(&Resources::default()).unwrap();
        let err = cg.apply(&resources()).unwrap_err();
        assert!(
            matches!(
                err,
                CgroupError::ControllerMissing {
                    field: "deploy.resources.limits.pids",
                    controller: "pids"
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn v1_limits_are_written_per_controller() {
        let root = tempfile::tempdir().unwrap();
        for c in ["memory", "cpu", "pids"] {
            std::fs::create_dir(root.path().join(c)).unwrap();
        }
        let files = [
            "memory.limit_in_bytes",
            "memory.memsw.limit_in_bytes",
            "memory.soft_limit_in_bytes",
            "cpu.cfs_period_us",
            "cpu.cfs_quota_us",
            "cpu.shares",
            "pids.max",
        ];
        let cg = fake_task(root.path(), &files);
        let dir = |c: &str| root.path().join(c).join("flotilla/t1");

        cg.apply(&resources()).unwrap();
        let limit = (64u64 << 20).to_string();
        assert_eq!(read(&dir("memory"), "memory.limit_in_bytes"), limit);
        assert_eq!(read(&dir("memory"), "memory.memsw.limit_in_bytes"), limit);
        assert_eq!(
            read(&dir("memory"), "memory.soft_limit_in_bytes"),
            (32u64 << 20).to_string()
        );
        assert_eq!(read(&dir("cpu"), "cpu.cfs_period_us"), "100000");
        assert_eq!(read(&dir("cpu"), "cpu.cfs_quota_us"), "50000");
        assert_eq!(read(&dir("cpu"), "cpu.shares"), "256");
        assert_eq!(read(&dir("pids"), "pids.max"), "100");

        cg.apply(&Resources::default()).unwrap();
        assert_eq!(read(&dir("memory"), "memory.limit_in_bytes"), "-1");
        assert_eq!(read(&dir("cpu"), "cpu.cfs_quota_us"), "-1");
        assert_eq!(read(&dir("cpu"), "cpu.shares"), "1024");
        assert_eq!(read(&dir("pids"), "pids.max"), "max");
    }

    #[test]
    fn v1_missing_controller_is_named_only_when_needed() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("memory")).unwrap();
        let cg = fake_task(root.path(), &["memory.limit_in_bytes"]);
        cg.apply(&Resources::default()).unwrap();
        let mut cpu = Resources::default();
        cpu.reservations.cpu_millis = Some(100);
        let err = cg.apply(&cpu).unwrap_err();
        assert!(
            matches!(
                err,
                CgroupError::ControllerMissing {
                    field: "deploy.resources.limits.cpus",
                    controller: "cpu"
                }
            ),
            "{err}"
        );
    }
}
