//! Collecting problems while walking the document, and reading typed values out of [`Node`]s.
//!
//! Every reader takes the field path it is reading so that a wrong type is reported as
//! `services.web.deploy.replicas: expected a non-negative integer, got a string`. Readers return
//! `None` after recording an error, so the walk carries on and finds the next problem too.

use crate::document::Node;
use crate::duration::parse_duration;
use crate::Warning;
use flotilla_types::FieldError;
use std::collections::BTreeMap;
use std::time::Duration;

#[derive(Debug, Default)]
pub(crate) struct Report {
    pub(crate) errors: Vec<FieldError>,
    pub(crate) warnings: Vec<Warning>,
}

impl Report {
    pub(crate) fn error(&mut self, field: &str, reason: impl Into<String>) {
        self.errors.push(FieldError::new(field, reason));
    }

    pub(crate) fn warn(&mut self, field: &str, message: impl Into<String>) {
        self.warnings.push(Warning {
            field: field.to_string(),
            message: message.into(),
        });
    }

    /// Reports that `field` holds the wrong kind of value: `expected X, got Y`.
    pub(crate) fn wrong_type(&mut self, field: &str, expected: &str, got: &Node) {
        self.error(field, format!("expected {expected}, got {}", got.kind()));
    }

    /// A list whose entries are read by `entry`; bad entries are reported and left out.
    pub(crate) fn list_of<T>(
        &mut self,
        field: &str,
        node: &Node,
        entry: impl Fn(&mut Report, &str, &Node) -> Option<T>,
    ) -> Vec<T> {
        self.list_described(field, node, "a list", entry)
    }

    /// A list of mappings, each read by `entry(report, path, entries)`; entries that are no
    /// mapping or that `entry` rejects are reported and left out. `expected` describes the
    /// list when `node` is none.
    pub(crate) fn list_of_mappings<T>(
        &mut self,
        field: &str,
        node: &Node,
        expected: &str,
        entry: impl Fn(&mut Report, &str, &[(String, Node)]) -> Option<T>,
    ) -> Vec<T> {
        self.list_described(field, node, expected, |r, at, item| {
            let entries = r.mapping(at, item)?;
            entry(r, at, entries)
        })
    }

    /// [`Report::list_of`], saying what the list should hold when `node` is none.
    fn list_described<T>(
        &mut self,
        field: &str,
        node: &Node,
        expected: &str,
        entry: impl Fn(&mut Report, &str, &Node) -> Option<T>,
    ) -> Vec<T> {
        let Node::List(items) = node else {
            self.wrong_type(field, expected, node);
            return Vec::new();
        };
        items
            .iter()
            .enumerate()
            .filter_map(|(i, item)| entry(self, &format!("{field}[{i}]"), item))
            .collect()
    }

    pub(crate) fn mapping<'n>(
        &mut self,
        field: &str,
        node: &'n Node,
    ) -> Option<&'n [(String, Node)]> {
        match node {
            Node::Map(entries) => Some(entries),
            other => {
                self.wrong_type(field, "a mapping", other);
                None
            }
        }
    }

    /// Reads the mapping at `field` one key at a time: `read(report, key, path, value)`, where
    /// `path` is `field.key`, the name every error about that value carries. `None` (after
    /// reporting it) when `node` is not a mapping.
    pub(crate) fn keys(
        &mut self,
        field: &str,
        node: &Node,
        mut read: impl FnMut(&mut Self, &str, &str, &Node),
    ) -> Option<()> {
        for (key, value) in self.mapping(field, node)? {
            read(self, key, &format!("{field}.{key}"), value);
        }
        Some(())
    }

    pub(crate) fn string(&mut self, field: &str, node: &Node) -> Option<String> {
        match node {
            Node::Str(s) => Some(s.clone()),
            other => {
                self.wrong_type(field, "a string", other);
                None
            }
        }
    }

    pub(crate) fn boolean(&mut self, field: &str, node: &Node) -> Option<bool> {
        match node {
            Node::Bool(b) => Some(*b),
            other => {
                self.wrong_type(field, "true or false", other);
                None
            }
        }
    }

    /// A non-negative integer. Negative and fractional numbers get their own reasons because
    /// "expected an integer, got a number" would be confusing for `-1` or `1.5`.
    pub(crate) fn uint(&mut self, field: &str, node: &Node) -> Option<u64> {
        match node {
            Node::Int(i) if *i < 0 => {
                self.error(field, format!("must be >= 0, got {i}"));
                None
            }
            Node::Int(i) => match u64::try_from(*i) {
                Ok(v) => Some(v),
                Err(_) => {
                    self.error(field, format!("{i} is too large"));
                    None
                }
            },
            Node::Float(f) => {
                self.error(field, format!("must be a whole number, got {f}"));
                None
            }
            other => {
                self.wrong_type(field, "a non-negative integer", other);
                None
            }
        }
    }

    pub(crate) fn uint32(&mut self, field: &str, node: &Node) -> Option<u32> {
        let value = self.uint(field, node)?;
        match u32::try_from(value) {
            Ok(v) => Some(v),
            Err(_) => {
                self.error(
                    field,
                    format!("{value} is too large (at most {})", u32::MAX),
                );
                None
            }
        }
    }

    /// A Compose duration string, or a plain number of seconds.
    pub(crate) fn duration(&mut self, field: &str, node: &Node) -> Option<Duration> {
        let parsed = match node {
            Node::Str(s) => parse_duration(s),
            Node::Int(_) | Node::Float(_) => {
                parse_duration(&node.scalar_text().unwrap_or_default())
            }
            other => {
                self.wrong_type(field, "a duration such as \"10s\"", other);
                return None;
            }
        };
        parsed.map_err(|reason| self.error(field, reason)).ok()
    }

    /// A list of strings; every element that is not a string is reported.
    pub(crate) fn string_list(&mut self, field: &str, node: &Node) -> Option<Vec<String>> {
        let Node::List(items) = node else {
            self.wrong_type(field, "a list of strings", node);
            return None;
        };
        let mut out = Vec::with_capacity(items.len());
        let mut ok = true;
        for (i, item) in items.iter().enumerate() {
            match self.string(&format!("{field}[{i}]"), item) {
                Some(s) => out.push(s),
                None => ok = false,
            }
        }
        ok.then_some(out)
    }

    /// A Compose "dictionary or list": `{K: V}` or `["K=V", "K"]`. Scalar values are taken as their
    /// text. `K` alone (or `K:` with no value) is passed to `bare` so each caller can decide what it
    /// means (labels: empty string; environment: look it up).
    pub(crate) fn dict_or_list(
        &mut self,
        field: &str,
        node: &Node,
        mut bare: impl FnMut(&mut Report, &str, &str) -> Option<String>,
    ) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        match node {
            Node::Map(entries) => {
                for (key, value) in entries {
                    let at = format!("{field}.{key}");
                    let value = match value {
                        Node::Null => bare(self, &at, key),
                        Node::List(_) | Node::Map(_) => {
                            self.wrong_type(&at, "a string, number or boolean", value);
                            None
                        }
                        scalar => scalar.scalar_text(),
                    };
                    if let Some(value) = value {
                        out.insert(key.clone(), value);
                    }
                }
            }
            Node::List(items) => {
                for (i, item) in items.iter().enumerate() {
                    let at = format!("{field}[{i}]");
                    let Some(entry) = self.string(&at, item) else {
                        continue;
                    };
                    match entry.split_once('=') {
                        Some((key, value)) => {
                            out.insert(key.to_string(), value.to_string());
                        }
                        None => {
                            if let Some(value) = bare(self, &at, &entry) {
                                out.insert(entry, value);
                            }
                        }
                    }
                }
            }
            other => self.wrong_type(field, "a mapping or a list of \"KEY=VALUE\" strings", other),
        }
        out
    }
}
