//! `flotilla snapshot save|restore`: back up the store of a running manager, and restore a
//! backup into a stopped node's data dir as a new one-manager cluster (like `etcdctl snapshot
//! save` and `etcdutl snapshot restore`).

use crate::node_dir;
use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use flotilla_client::Client;
use flotilla_store::{Store, StoreBackup, StoreConfig};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Write a backup of the manager's store (at --addr) to FILE.
    Save(SaveArgs),
    /// Restore a backup into the data dir of a stopped node, whose store must be missing or
    /// empty; started again (`up` or `init`), it is the only manager of the restored cluster.
    Restore(RestoreArgs),
}

#[derive(Debug, Args)]
pub struct SaveArgs {
    /// Where to write the backup (a JSON document holding every secret of the cluster: keep
    /// it as safe as the managers' data dirs).
    pub file: PathBuf,
}

#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// A backup written by `flotilla snapshot save`.
    pub file: PathBuf,
    /// The stopped node's data dir.
    #[arg(long, env = "FLOTILLA_DATA_DIR", default_value_os_t = node_dir::default_data_dir())]
    pub data_dir: PathBuf,
    /// Where the restored manager serves raft: `flotilla up`'s --api-addr, or `init`'s
    /// --advertise-addr.
    #[arg(long, default_value = "127.0.0.1:7450")]
    pub advertise_addr: String,
}

pub async fn run(client: &Client, cmd: &SnapshotCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        SnapshotCommand::Save(args) => save(client, &args.file).await,
        SnapshotCommand::Restore(args) => restore(args).await,
    }
}

async fn save(client: &Client, file: &Path) -> anyhow::Result<ExitCode> {
    let backup = client.store_backup().await?;
    let revision = backup["meta"]["last_log_id"]["index"].as_u64().unwrap_or(0);
    let tmp = file.with_extension("partial");
    let text = serde_json::to_string(&backup).context("encoding the backup")?;
    // It holds the CA key and every token: readable by its owner only, like the data dir.
    crate::private_files::write_private(&tmp, &text)?;
    std::fs::rename(&tmp, file).with_context(|| format!("writing {}", file.display()))?;
    println!(
        "saved the store at revision {revision} to {}",
        file.display()
    );
    Ok(ExitCode::SUCCESS)
}

async fn restore(args: &RestoreArgs) -> anyhow::Result<ExitCode> {
    let text =
        std::fs::read(&args.file).with_context(|| format!("reading {}", args.file.display()))?;
    let backup: StoreBackup = serde_json::from_slice(&text).with_context(|| {
        format!(
            "{}: not a backup from `flotilla snapshot save`",
            args.file.display()
        )
    })?;
    // A running node holds the lock; its store must not change under it.
    let _lock = node_dir::lock(&args.data_dir)?;
    let raft_id = if args.data_dir.join("raft-id").exists() {
        node_dir::read_raft_id(&args.data_dir)?
    } else {
        1
    };
    if raft_id == 0 {
        bail!("{}: raft id 0 is not valid", args.data_dir.display());
    }
    let restored = Store::restore_backup(
        &StoreConfig {
            data_dir: args.data_dir.join("store"),
            node_id: raft_id,
            advertise_addr: args.advertise_addr.clone(),
        },
        backup,
    )
    .await
    .context("restoring the store")?;
    println!(
        "restored revision {} into {} as the only manager (raft id {raft_id}; the backup's \
         managers were {:?}: the others must join again with fresh data dirs). Start the node \
         with `flotilla up` or `flotilla init`",
        restored.revision,
        args.data_dir.display(),
        restored.previous_members
    );
    Ok(ExitCode::SUCCESS)
}
