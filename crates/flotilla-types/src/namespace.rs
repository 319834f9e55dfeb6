//! Namespaces: named scopes that group a cluster's objects.

use crate::spec::{validate_name, FieldError};
use crate::state::Meta;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A named scope for a cluster's objects. Its name follows the same DNS label rules as service
/// names, since it becomes part of names the mesh resolves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Namespace {
    pub name: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub meta: Meta,
}

impl Namespace {
    pub fn new(name: &str) -> Self {
        Namespace {
            name: name.to_string(),
            labels: BTreeMap::new(),
            meta: Meta::default(),
        }
    }

    /// Every problem with the namespace, each naming its field.
    pub fn validate(&self) -> Result<(), Vec<FieldError>> {
        let errs = name_and_labels_errors(&self.name, &self.labels);
        if errs.is_empty() {
            Ok(())
        } else {
            Err(errs)
        }
    }
}

/// The problems with a kind's `name` (DNS label rules) and `labels`.
pub(crate) fn name_and_labels_errors(
    name: &str,
    labels: &BTreeMap<String, String>,
) -> Vec<FieldError> {
    let mut errs = Vec::new();
    if let Err(reason) = validate_name(name) {
        errs.push(FieldError::new("name", reason));
    }
    validate_labels(labels, &mut errs);
    errs
}

/// Label keys are 1 to 253 characters without whitespace or `=`; values at most 4096 characters.
fn validate_labels(labels: &BTreeMap<String, String>, errs: &mut Vec<FieldError>) {
    for (key, value) in labels {
        let field = format!("labels.{key}");
        if key.is_empty() || key.len() > 253 {
            errs.push(FieldError::new(
                &field,
                "label keys must be 1 to 253 characters",
            ));
        } else if key.chars().any(|c| c.is_whitespace() || c == '=') {
            errs.push(FieldError::new(
                &field,
                "label keys may not hold whitespace or '='",
            ));
        }
        if value.len() > 4096 {
            errs.push(FieldError::new(
                &field,
                "label values must be at most 4096 characters",
            ));
        }
    }
}

crate::object_keyed_by!(Namespace, "namespace", name);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_names_the_field() {
        assert_eq!(Namespace::new("team-a").validate(), Ok(()));
        let mut ns = Namespace::new("Team A");
        ns.labels.insert("bad key".into(), "v".into());
        let errs = ns.validate().unwrap_err();
        let fields: Vec<_> = errs.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["name", "labels.bad key"]);
    }
}
