//! A client's local copy of the objects a watch stream reports.

use flotilla_types::api::{WatchChange, WatchMessage};
use flotilla_types::{Config, Namespace, Node, Object, Rollout, Service, Task};
use std::collections::BTreeMap;

/// A local copy of the objects a watch stream reports, kept current by [`Mirror::apply`]. One
/// map per watched kind, by key; revisions are not kept (services carry their spec).
#[derive(Debug, Default, Clone)]
pub struct Mirror {
    pub revision: u64,
    pub tasks: BTreeMap<String, Task>,
    pub services: BTreeMap<String, Service>,
    pub nodes: BTreeMap<String, Node>,
    /// The latest release of each service, by service name.
    pub rollouts: BTreeMap<String, Rollout>,
    pub namespaces: BTreeMap<String, Namespace>,
    pub configs: BTreeMap<String, Config>,
}

impl Mirror {
    /// Folds one watch message in. A snapshot replaces everything.
    pub fn apply(&mut self, msg: WatchMessage) {
        match msg {
            WatchMessage::Snapshot {
                revision,
                tasks,
                services,
                nodes,
                rollouts,
                namespaces,
                configs,
            } => {
                self.revision = revision;
                self.tasks = by_key(tasks);
                self.services = by_key(services);
                self.nodes = by_key(nodes);
                self.rollouts = by_key(rollouts);
                self.namespaces = by_key(namespaces);
                self.configs = by_key(configs);
            }
            WatchMessage::Change { revision, changes } => {
                self.revision = revision;
                for change in changes {
                    self.fold(change);
                }
            }
            WatchMessage::Heartbeat { revision } => self.revision = self.revision.max(revision),
        }
    }

    fn fold(&mut self, change: WatchChange) {
        match change {
            WatchChange::Task { id, object } => upsert(&mut self.tasks, id, object),
            WatchChange::Service { name, object } => upsert(&mut self.services, name, object),
            WatchChange::Node { id, object } => upsert(&mut self.nodes, id, object),
            WatchChange::Revision { .. } => {}
            WatchChange::Rollout { service, object } => upsert(&mut self.rollouts, service, object),
            WatchChange::Namespace { name, object } => upsert(&mut self.namespaces, name, object),
            WatchChange::Config { name, object } => upsert(&mut self.configs, name, object),
        }
    }
}

fn by_key<K: Object>(objects: Vec<K>) -> BTreeMap<K::Key, K> {
    objects.into_iter().map(|o| (o.key(), o)).collect()
}

fn upsert<K: Object>(map: &mut BTreeMap<K::Key, K>, key: K::Key, object: Option<K>) {
    match object {
        Some(o) => {
            map.insert(key, o);
        }
        None => {
            map.remove(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(namespaces: Vec<Namespace>, configs: Vec<Config>) -> WatchMessage {
        WatchMessage::Snapshot {
            revision: 3,
            tasks: Vec::new(),
            services: Vec::new(),
            nodes: Vec::new(),
            rollouts: Vec::new(),
            namespaces,
            configs,
        }
    }

    #[test]
    fn folds_snapshots_and_changes_of_every_kind() {
        let mut mirror = Mirror::default();
        mirror.apply(snapshot(
            vec![Namespace::new("a"), Namespace::new("b")],
            vec![Config::new("c1", "x")],
        ));
        assert_eq!(mirror.namespaces.keys().collect::<Vec<_>>(), ["a", "b"]);
        mirror.apply(WatchMessage::Change {
            revision: 4,
            changes: vec![
                WatchChange::Namespace {
                    name: "a".into(),
                    object: None,
                },
                WatchChange::Config {
                    name: "c1".into(),
                    object: Some(Config::new("c1", "y")),
                },
                WatchChange::Config {
                    name: "c2".into(),
                    object: Some(Config::new("c2", "z")),
                },
            ],
        });
        assert_eq!(mirror.revision, 4);
        assert_eq!(mirror.namespaces.keys().collect::<Vec<_>>(), ["b"]);
        assert_eq!(mirror.configs["c1"].data, "y");
        assert_eq!(mirror.configs["c2"].data, "z");
        // A snapshot replaces everything, including kinds it no longer lists.
        mirror.apply(snapshot(Vec::new(), Vec::new()));
        assert!(mirror.namespaces.is_empty() && mirror.configs.is_empty());
    }

    #[test]
    fn a_snapshot_from_before_namespaces_and_configs_still_decodes() {
        let old = r#"{"type":"snapshot","revision":7,"tasks":[],"services":[],"nodes":[]}"#;
        let msg: WatchMessage = match serde_json::from_str(old) {
            Ok(msg) => msg,
            Err(e) => panic!("old snapshot line: {e}"),
        };
        let mut mirror = Mirror::default();
        mirror.apply(msg);
        assert_eq!(mirror.revision, 7);
    }

    #[test]
    fn existing_kinds_keep_their_wire_form() {
        let line = |msg: &WatchMessage| serde_json::to_string(msg).expect("encode");
        assert_eq!(
            line(&snapshot(Vec::new(), Vec::new())),
            r#"{"type":"snapshot","revision":3,"tasks":[],"services":[],"nodes":[],"rollouts":[]}"#
        );
        let change = WatchMessage::Change {
            revision: 4,
            changes: vec![WatchChange::Task {
                id: "t1".into(),
                object: None,
            }],
        };
        assert_eq!(
            line(&change),
            r#"{"type":"change","revision":4,"changes":[{"kind":"task","id":"t1","object":null}]}"#
        );
    }
}
