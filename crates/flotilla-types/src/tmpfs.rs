//! Fault-injection tests' small disk: a tmpfs mounted over a directory for a test's lifetime
//! (needs root; behind the `test-support` feature).

use std::path::{Path, PathBuf};
use std::process::Command;

/// A mounted tmpfs, lazily unmounted when dropped.
pub struct Tmpfs(PathBuf);

impl Tmpfs {
    /// Mounts a tmpfs of `size` (e.g. "48m") on `dir`. `None`, and the test skips visibly,
    /// where mounting is not allowed; with `FLOTILLA_REQUIRE_FAULTS` set it panics instead.
    pub fn mount(dir: &Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(dir).expect("mount point");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .expect("run mount");
        if !out.status.success() {
            let why = String::from_utf8_lossy(&out.stderr);
            assert!(
                std::env::var("FLOTILLA_REQUIRE_FAULTS").is_err(),
                "cannot mount a tmpfs: {why}"
            );
            eprintln!("SKIPPED: cannot mount a tmpfs (needs root): {why}");
            return None;
        }
        Some(Tmpfs(dir.to_path_buf()))
    }

    /// Bytes still free on it.
    pub fn available(&self) -> u64 {
        let out = Command::new("df")
            .args(["-B1", "--output=avail"])
            .arg(&self.0)
            .output()
            .expect("run df");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .and_then(|l| l.trim().parse().ok())
            .expect("df avail")
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}
