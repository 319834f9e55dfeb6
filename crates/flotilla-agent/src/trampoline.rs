//! `shim-exec`: the trampoline that puts itself into a task's cgroup, drops privileges and then
//! becomes the workload.
//!
//! Joining the cgroup from inside the new process (instead of a `pre_exec` hook, which needs
//! unsafe code) guarantees the workload's first instruction already runs under its limits, while
//! the shim itself stays outside the cgroup so an OOM kill cannot take the supervisor down.
//!
//! Command line: `shim-exec [--cgroup-procs FILE]... [--uid N] [--gid N] -- PROGRAM [ARGS]...`

use nix::unistd::{setgid, setgroups, setuid, Gid, Uid};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Command;
use thiserror::Error;

/// The subcommand name a host binary dispatches to [`run_exec_trampoline`].
pub const EXEC_SUBCOMMAND: &str = "shim-exec";
/// Exit status when the program could not be executed (the shell's convention).
pub const EXEC_FAILED_STATUS: i32 = 127;

#[derive(Debug, Error)]
pub enum TrampolineError {
    #[error("shim-exec arguments: {0}")]
    BadArgs(String),
    #[error("cannot join cgroup via {path}: {source}")]
    JoinCgroup {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot switch to {what} {id}: {source}")]
    Identity {
        what: &'static str,
        id: u32,
        source: nix::Error,
    },
    #[error("cannot execute {program:?}: {source}")]
    Exec {
        program: String,
        source: std::io::Error,
    },
}

/// Parsed `shim-exec` arguments.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ExecTrampolineArgs {
    pub cgroup_procs: Vec<PathBuf>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub argv: Vec<String>,
}

impl ExecTrampolineArgs {
    /// Parses the arguments after the subcommand name.
    pub fn parse(args: &[String]) -> Result<Self, TrampolineError> {
        let mut out = ExecTrampolineArgs::default();
        let mut it = args.iter();
        while let Some(arg) = it.next() {
            let mut value = |name: &str| {
                it.next()
                    .cloned()
                    .ok_or_else(|| TrampolineError::BadArgs(format!("{name} needs a value")))
            };
            match arg.as_str() {
                "--cgroup-procs" => out
                    .cgroup_procs
                    .push(PathBuf::from(value("--cgroup-procs")?)),
                "--uid" => out.uid = Some(parse_id("--uid", &value("--uid")?)?),
                "--gid" => out.gid = Some(parse_id("--gid", &value("--gid")?)?),
                "--" => {
                    out.argv = it.cloned().collect();
                    break;
                }
                other => {
                    return Err(TrampolineError::BadArgs(format!(
                        "unknown argument {other:?}"
                    )))
                }
            }
        }
        if out.argv.is_empty() {
            return Err(TrampolineError::BadArgs("no program given after --".into()));
        }
        Ok(out)
    }

    /// The command line [`ExecTrampolineArgs::parse`] reads back.
    pub fn to_args(&self) -> Vec<String> {
        let mut args = Vec::new();
        for p in &self.cgroup_procs {
            args.push("--cgroup-procs".to_string());
            args.push(p.display().to_string());
        }
        if let Some(uid) = self.uid {
            args.extend(["--uid".to_string(), uid.to_string()]);
        }
        if let Some(gid) = self.gid {
            args.extend(["--gid".to_string(), gid.to_string()]);
        }
        args.push("--".to_string());
        args.extend(self.argv.iter().cloned());
        args
    }
}

fn parse_id(name: &str, value: &str) -> Result<u32, TrampolineError> {
    value
        .parse()
        .map_err(|_| TrampolineError::BadArgs(format!("{name} {value:?} is not a numeric id")))
}

/// Joins the cgroups, switches user, and replaces this process with the workload. Returns only on
/// failure; the caller should print the error and exit with [`EXEC_FAILED_STATUS`].
pub fn run_exec_trampoline(args: ExecTrampolineArgs) -> TrampolineError {
    match prepare_and_exec(args) {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

fn prepare_and_exec(args: ExecTrampolineArgs) -> Result<std::convert::Infallible, TrampolineError> {
    let pid = std::process::id().to_string();
    for path in &args.cgroup_procs {
        std::fs::write(path, &pid).map_err(|source| TrampolineError::JoinCgroup {
            path: path.clone(),
            source,
        })?;
    }
    // Group first: once the uid is dropped we may no longer change groups.
    if let Some(gid) = args.gid {
        setgroups(&[Gid::from_raw(gid)]).map_err(|source| TrampolineError::Identity {
            what: "supplementary group",
            id: gid,
            source,
        })?;
        setgid(Gid::from_raw(gid)).map_err(|source| TrampolineError::Identity {
            what: "group",
            id: gid,
            source,
        })?;
    }
    if let Some(uid) = args.uid {
        setuid(Uid::from_raw(uid)).map_err(|source| TrampolineError::Identity {
            what: "user",
            id: uid,
            source,
        })?;
    }
    let (program, rest) = args
        .argv
        .split_first()
        .ok_or_else(|| TrampolineError::BadArgs("no program given after --".into()))?;
    let source = Command::new(program).args(rest).exec();
    Err(TrampolineError::Exec {
        program: program.clone(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args_round_trip() {
        let a = ExecTrampolineArgs {
            cgroup_procs: vec!["/x/cgroup.procs".into()],
            uid: Some(1000),
            gid: Some(100),
            argv: vec!["sh".into(), "-c".into(), "--uid".into()],
        };
        assert_eq!(ExecTrampolineArgs::parse(&a.to_args()).unwrap(), a);
    }

    #[test]
    fn bad_args_are_named() {
        let s = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let e = ExecTrampolineArgs::parse(&s(&["--uid", "bob", "--", "x"])).unwrap_err();
        assert!(e.to_string().contains("--uid"), "{e}");
        let e = ExecTrampolineArgs::parse(&s(&["--uid"])).unwrap_err();
        assert!(e.to_string().contains("--uid needs a value"), "{e}");
        let e = ExecTrampolineArgs::parse(&s(&["--"])).unwrap_err();
        assert!(e.to_string().contains("no program"), "{e}");
    }
}
