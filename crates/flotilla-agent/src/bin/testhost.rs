//! Test host for the shim: a minimal stand-in for the `flotilla` binary that dispatches only the
//! `shim` and `shim-exec` subcommands, so this crate's integration tests can run real shims
//! (`env!("CARGO_BIN_EXE_flotilla-agent-testhost")`). Not shipped; the flotilla binary wires the
//! same two functions.
#![forbid(unsafe_code)]

use flotilla_agent::shim::{run_shim, ShimArgs, SHIM_SUBCOMMAND};
use flotilla_agent::trampoline::{
    run_exec_trampoline, ExecTrampolineArgs, EXEC_FAILED_STATUS, EXEC_SUBCOMMAND,
};
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.split_first() {
        Some((cmd, rest)) if cmd == SHIM_SUBCOMMAND => {
            match ShimArgs::parse(rest).and_then(run_shim) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("shim: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Some((cmd, rest)) if cmd == EXEC_SUBCOMMAND => {
            let err = match ExecTrampolineArgs::parse(rest) {
                Ok(parsed) => run_exec_trampoline(parsed),
                Err(e) => e,
            };
            eprintln!("shim-exec: {err}");
            ExitCode::from(EXEC_FAILED_STATUS as u8)
        }
        _ => {
            eprintln!("usage: flotilla-agent-testhost (shim --task-dir DIR | shim-exec [...] -- PROGRAM [ARGS...])");
            ExitCode::from(2)
        }
    }
}
