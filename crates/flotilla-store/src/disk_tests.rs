//! A really full disk (a small tmpfs filled to the last block) under a running store.

use crate::tests::{open_leader, service};
use crate::{Command, Expect, Op, Store};
use flotilla_types::tmpfs::Tmpfs;
use std::path::{Path, PathBuf};
use std::process::Command as Process;
use std::time::Duration;

fn put(name: &str) -> Command {
    Command::new(vec![Op::PutService {
        service: service(name, 1, 1),
        expect: Expect::Any,
    }])
}

/// Fills the filesystem of `dir` to its last block.
fn fill(dir: &Path) -> PathBuf {
    let file = dir.join("fill");
    for bs in ["1M", "4k"] {
        let _ = Process::new("dd")
            .args([
                "if=/dev/zero",
                "oflag=append",
                "conv=notrunc",
                &format!("bs={bs}"),
            ])
            .arg(format!("of={}", file.display()))
            .output();
    }
    file
}

async fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..600 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for {what}");
}

/// A write refused up front says "disk full"; a log append that got past that check (it
/// raced the disk filling up) waits for space instead of stopping raft, and completes once
/// space is freed; the store then takes writes again without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_on_a_full_disk_waits_for_space_and_raft_carries_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some(_fs) = Tmpfs::mount(&dir.path().join("mnt"), "48m") else {
        return;
    };
    let store: Store = open_leader(&dir.path().join("mnt")).await;
    store.write(put("before")).await.expect("a write with room");

    let filler = fill(&dir.path().join("mnt"));
    let refused = store.write(put("refused")).await.expect_err("a full disk");
    assert!(refused.to_string().contains("disk full"), "{refused}");
    assert_eq!(store.degraded(), vec!["disk full".to_string()]);

    // Straight to raft, as a write that passed the check just before the disk filled.
    let raft = store.raft().clone();
    let raced = tokio::spawn(async move { raft.client_write(put("raced")).await });
    wait_until("the append to wait for space", || {
        store.shared().has_unflushed()
    })
    .await;

    std::fs::remove_file(&filler).expect("free the space");
    raced
        .await
        .expect("join")
        .expect("the raced append completes once space is back");
    store.write(put("after")).await.expect("writes work again");
    assert!(store.degraded().is_empty(), "{:?}", store.degraded());
    let names = store.read(|s| s.services.keys().cloned().collect::<Vec<_>>());
    assert_eq!(names, ["after", "before", "raced"]);
    store.shutdown().await.expect("shutdown");
}
