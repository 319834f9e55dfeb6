//! The `flotilla` binary: manager, agent and command line in one.
//!
//! `flotilla up` runs a manager (store, API, controllers) and an agent in the foreground; every
//! other subcommand is a client of the API at `--addr` / `FLOTILLA_ADDR`. The hidden `shim` and
//! `shim-exec` subcommands are the per-task supervisor and its exec trampoline, which the agent
//! starts by re-executing this binary.
#![forbid(unsafe_code)]

mod agent_cmd;
mod bench;
mod cli;
mod cluster_admin;
mod cluster_args;
mod deploy;
mod docker_cmd;
mod follow;
mod limit_flags;
mod listing;
mod load;
mod manager;
mod mesh_cmd;
mod node_daemon;
mod node_dir;
mod node_flags;
mod nodes_cmd;
mod output;
mod private_files;
mod rollout_cmd;
mod snapshot_cmd;
mod store_guard;
mod up;

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = cli::Cli::parse();
    // The shim and trampoline must not build a runtime or logging before they exec or daemonise.
    match &cli.command {
        cli::Command::Shim(args) => return cli::run_shim(args),
        cli::Command::ShimExec(args) => return cli::run_shim_exec(args),
        _ => {}
    }
    let server = matches!(
        &cli.command,
        cli::Command::Up(_)
            | cli::Command::Agent(_)
            | cli::Command::Init(_)
            | cli::Command::Join(_)
    );
    if server {
        put_own_dir_on_path();
    }
    init_tracing(cli.verbose);
    if server {
        raise_fd_limit();
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(cli::dispatch(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Process tasks find `flotilla` on their PATH (the demo runs `flotilla demo-app`), even when
/// the binary was started by full path. Done before any thread exists.
fn put_own_dir_on_path() {
    let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|p| p.to_path_buf()))
    else {
        return;
    };
    let current = std::env::var_os("PATH").unwrap_or_default();
    let mut parts: Vec<std::path::PathBuf> = std::env::split_paths(&current).collect();
    if !parts.contains(&dir) {
        parts.insert(0, dir);
        if let Ok(joined) = std::env::join_paths(parts) {
            std::env::set_var("PATH", joined);
        }
    }
}

/// Servers raise the soft RLIMIT_NOFILE to the hard limit (1,024 soft is common and far too
/// few for a node), before any listener sizes its connection cap from it.
fn raise_fd_limit() {
    match flotilla_mesh::conn_limits::raise_fd_limit() {
        Ok((old, new)) if old != new => {
            tracing::info!(old, new, "raised the open-file limit");
        }
        Ok((limit, _)) => tracing::debug!(limit, "open-file limit already at its hard limit"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit"),
    }
    let limit = flotilla_mesh::conn_limits::fd_limit();
    if limit < 4096 {
        tracing::warn!(
            limit,
            "low open-file limit: listeners cap their connections to leave a reserve for the \
             node's own work; raise the hard limit (e.g. LimitNOFILE=) for more"
        );
    }
}

fn init_tracing(verbose: u8) {
    let default = match verbose {
        0 => "warn,flotilla=info,flotilla_store=info,flotilla_controllers=info,flotilla_agent=info",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("FLOTILLA_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .try_init();
}
