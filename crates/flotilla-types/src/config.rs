//! Configs: named, non-secret data (configuration files) that tasks can be given.

use crate::namespace::name_and_labels_errors;
use crate::spec::FieldError;
use crate::state::Meta;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The largest config the store accepts, like Swarm's limit: configs are replicated to every
/// manager and kept in memory, so they are meant for configuration files, not for payloads.
pub const CONFIG_MAX_BYTES: usize = 500 * 1024;

/// Named configuration data, stored in plain text (secrets are a separate, encrypted kind).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Config {
    pub name: String,
    /// The contents, as UTF-8 text.
    pub data: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub meta: Meta,
}

impl Config {
    pub fn new(name: &str, data: &str) -> Self {
        Config {
            name: name.to_string(),
            data: data.to_string(),
            labels: BTreeMap::new(),
            meta: Meta::default(),
        }
    }

    /// Every problem with the config, each naming its field.
    pub fn validate(&self) -> Result<(), Vec<FieldError>> {
        let mut errs = name_and_labels_errors(&self.name, &self.labels);
        if self.data.len() > CONFIG_MAX_BYTES {
            errs.push(FieldError::new(
                "data",
                format!(
                    "config data is {} bytes, more than the {CONFIG_MAX_BYTES} allowed",
                    self.data.len()
                ),
            ));
        }
        if errs.is_empty() {
            Ok(())
        } else {
            Err(errs)
        }
    }
}

crate::object_keyed_by!(Config, "config", name);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_names_the_field() {
        assert_eq!(
            Config::new("nginx-conf", "worker_processes 1;").validate(),
            Ok(())
        );
        let big = "x".repeat(CONFIG_MAX_BYTES + 1);
        let errs = Config::new("", &big).validate().unwrap_err();
        let fields: Vec<_> = errs.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["name", "data"]);
    }
}
