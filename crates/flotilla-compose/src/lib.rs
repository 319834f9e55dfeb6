//! Reads Compose files and turns them into validated Flotilla [`ServiceSpec`]s, reporting every
//! problem at once with the path of the field it is about.
//!
//! The YAML is first read into a plain value tree and then walked by hand: serde's derive would
//! stop at the first problem and lose the field path, and Compose's "string or list or mapping"
//! fields need per-field handling anyway. Keys Compose defines but Flotilla does not act on yet
//! become [`Warning`]s; keys that are neither Compose nor `x-*` are errors.
#![forbid(unsafe_code)]

mod container;
mod document;
mod duration;
mod env_file;
mod mesh;
mod ports;
mod read;
mod report;
mod rollout;
mod service;
mod shell_words;

use document::Node;
use flotilla_scheduler::validate_stack;
use flotilla_types::{validate_name, FieldError, ServiceSpec};
pub use read::MAX_FILE_BYTES;
use report::Report;
use std::path::{Path, PathBuf};

/// A parsed and validated Compose file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ComposeFile {
    /// The top-level `name`, if given.
    pub project: Option<String>,
    /// Services in the order the file lists them.
    pub services: Vec<ServiceSpec>,
    /// Things that were accepted but have no effect (unsupported keys, ignored host IPs, …).
    pub warnings: Vec<Warning>,
}

/// Something in the file that Flotilla ignores.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warning {
    /// Dotted path, e.g. `services.web.networks`.
    pub field: String,
    pub message: String,
}

impl std::fmt::Display for Warning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// Why a Compose file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ComposeError {
    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}", describe_syntax(file, *line, *column, message))]
    Syntax {
        file: String,
        line: Option<usize>,
        column: Option<usize>,
        message: String,
    },
    #[error("{}", describe_invalid(file, errors))]
    Invalid {
        file: String,
        errors: Vec<FieldError>,
    },
}

fn describe_syntax(
    file: &str,
    line: Option<usize>,
    column: Option<usize>,
    message: &str,
) -> String {
    match (line, column) {
        (Some(l), Some(c)) => format!("{file}:{l}:{c}: invalid YAML: {message}"),
        (Some(l), None) => format!("{file}:{l}: invalid YAML: {message}"),
        _ => format!("{file}: invalid YAML: {message}"),
    }
}

fn describe_invalid(file: &str, errors: &[FieldError]) -> String {
    errors
        .iter()
        .map(|e| format!("{file}: {e}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The field used for problems with the document as a whole.
const DOCUMENT_FIELD: &str = "(top level)";

/// Top-level keys Compose defines for resources Flotilla does not manage yet.
const UNSUPPORTED_TOP_LEVEL_KEYS: &[&str] = &[
    "networks", "volumes", "secrets", "configs", "include", "models",
];

/// Parses Compose text. `file` names the source in messages; relative `env_file` paths are
/// resolved against `base_dir`.
pub fn parse_str(text: &str, file: &str, base_dir: &Path) -> Result<ComposeFile, ComposeError> {
    let root = document::parse_yaml(text).map_err(|e| syntax_error(file, &e))?;
    let mut r = Report::default();
    let ctx = service::Context { base_dir };
    let mut project = None;
    let mut services = Vec::new();

    match &root {
        Node::Map(entries) => {
            let mut saw_services = false;
            for (key, value) in entries {
                match key.as_str() {
                    "name" => {
                        if let Some(name) = r.string("name", value) {
                            match validate_name(&name) {
                                Ok(()) => project = Some(name),
                                Err(reason) => r.error("name", reason),
                            }
                        }
                    }
                    "version" => r.warn("version", "obsolete and ignored"),
                    "services" => {
                        saw_services = true;
                        services = read_services(&mut r, &ctx, value);
                    }
                    k if UNSUPPORTED_TOP_LEVEL_KEYS.contains(&k) => {
                        r.warn(k, "not supported yet; ignored")
                    }
                    // Compose ignores top-level extensions: they are anchors for reuse.
                    k if k.starts_with("x-") => {}
                    k => r.error(k, "unknown key"),
                }
            }
            if !saw_services {
                r.error("services", "is required: the file defines no services");
            }
        }
        Node::Null => r.error(
            DOCUMENT_FIELD,
            "the document is empty; expected a mapping with a `services` key",
        ),
        other => r.wrong_type(DOCUMENT_FIELD, "a mapping with a `services` key", other),
    }

    if let Err(stack_errors) = validate_stack(&services) {
        // A field that already failed to parse was replaced by a default, and the cross-checks
        // would only repeat that problem in other words.
        let fresh: Vec<FieldError> = stack_errors
            .into_iter()
            .filter(|e| {
                !r.errors
                    .iter()
                    .any(|seen| paths_overlap(&seen.field, &e.field))
            })
            .collect();
        r.errors.extend(fresh);
    }

    if r.errors.is_empty() {
        Ok(ComposeFile {
            project,
            services,
            warnings: r.warnings,
        })
    } else {
        Err(ComposeError::Invalid {
            file: file.to_string(),
            errors: r.errors,
        })
    }
}

/// Reads and parses a Compose file; `env_file` paths are relative to the file's directory.
pub fn load(path: &Path) -> Result<ComposeFile, ComposeError> {
    let text =
        read::read_capped(path, read::MAX_FILE_BYTES).map_err(|source| ComposeError::Io {
            path: path.to_path_buf(),
            source,
        })?;
    let base_dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    parse_str(&text, &path.display().to_string(), base_dir)
}

fn read_services(r: &mut Report, ctx: &service::Context<'_>, node: &Node) -> Vec<ServiceSpec> {
    let Some(entries) = r.mapping("services", node) else {
        return Vec::new();
    };
    if entries.is_empty() {
        r.error("services", "is empty: define at least one service");
    }
    entries
        .iter()
        .map(|(name, body)| service::read_service(r, ctx, name, body))
        .collect()
}

/// True when one path is the other or contains it (`services.web` and `services.web.ports[0]`).
fn paths_overlap(a: &str, b: &str) -> bool {
    let (short, long) = if a.len() <= b.len() { (a, b) } else { (b, a) };
    long.strip_prefix(short)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('.') || rest.starts_with('['))
}

fn syntax_error(file: &str, err: &serde_saphyr::Error) -> ComposeError {
    let location = err.location();
    let known = |n: u64| usize::try_from(n).ok().filter(|n| *n > 0);
    ComposeError::Syntax {
        file: file.to_string(),
        line: location.and_then(|l| known(l.line())),
        column: location.and_then(|l| known(l.column())),
        message: err.without_snippet().to_string(),
    }
}
