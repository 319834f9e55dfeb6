//! NDJSON streams: `events` (what happened) and `watch` (objects as they change).
//!
//! Each stream subscribes to the store *before* reading the starting point, so nothing falls in
//! between; items at or below the starting revision are skipped.

use crate::error::ApiError;
use crate::query::Query;
use crate::AppState;
use axum::body::Body;
use axum::extract::State;
use axum::response::Response;
use bytes::Bytes;
use flotilla_store::{Change, ClusterState};
use flotilla_types::api::{WatchChange, WatchMessage, WATCH_KINDS};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::convert::Infallible;
use std::time::Duration;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::mpsc;

/// Idle watch streams get a heartbeat line this often.
const WATCH_HEARTBEAT: Duration = Duration::from_secs(5);

fn ndjson_response(rx: mpsc::Receiver<Bytes>) -> Result<Response, ApiError> {
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx).map(Ok::<_, Infallible>);
    Response::builder()
        .header("content-type", "application/x-ndjson")
        .body(Body::from_stream(stream))
        .map_err(|e| ApiError::Internal(e.to_string()))
}

use tokio_stream::StreamExt as _;

fn line<T: Serialize>(item: &T) -> Option<Bytes> {
    let mut v = serde_json::to_vec(item).ok()?;
    v.push(b'\n');
    Some(Bytes::from(v))
}

#[derive(Debug, Deserialize)]
pub struct EventQuery {
    #[serde(default)]
    pub since: u64,
    #[serde(default)]
    pub follow: bool,
}

pub async fn events(
    State(app): State<AppState>,
    Query(q): Query<EventQuery>,
) -> Result<Response, ApiError> {
    let mut sub = q.follow.then(|| app.store.subscribe());
    let past = app.store.events(q.since, 10_000)?;
    let (tx, rx) = mpsc::channel::<Bytes>(256);
    let store = app.store.clone();
    tokio::spawn(async move {
        let mut last = q.since;
        for e in past {
            last = e.revision;
            let Some(l) = line(&e) else { continue };
            if tx.send(l).await.is_err() {
                return;
            }
        }
        let Some(sub) = sub.as_mut() else { return };
        loop {
            let batch = match sub.recv().await {
                Ok(b) => b,
                Err(RecvError::Lagged(_)) => {
                    // Fell behind the broadcast: catch up from the persisted events.
                    match store.events(last, 10_000) {
                        Ok(evs) => {
                            for e in evs {
                                last = e.revision;
                                let Some(l) = line(&e) else { continue };
                                if tx.send(l).await.is_err() {
                                    return;
                                }
                            }
                        }
                        Err(err) => tracing::warn!(%err, "event stream catch-up failed"),
                    }
                    continue;
                }
                Err(RecvError::Closed) => return,
            };
            let since = last;
            for e in batch.events.iter().filter(|e| e.revision > since) {
                last = e.revision;
                let Some(l) = line(e) else { continue };
                if tx.send(l).await.is_err() {
                    return;
                }
            }
        }
    });
    ndjson_response(rx)
}

#[derive(Debug, Deserialize)]
pub struct WatchQuery {
    /// One of [`WATCH_KINDS`] (`task`, `service`, `node`, `namespace`, `config`), or absent or
    /// `all` for every kind.
    pub kind: Option<String>,
    /// Only tasks assigned to this node.
    pub node: Option<String>,
}

struct WatchFilter {
    /// The watch kinds sent (see [`WatchChange::watch_kind`]).
    kinds: BTreeSet<&'static str>,
    node: Option<String>,
    /// Tasks the watcher has been told about, so it also hears of their deletion or move.
    known_tasks: BTreeSet<String>,
}

impl WatchFilter {
    fn new(q: WatchQuery) -> Result<Self, ApiError> {
        let kinds = match q.kind.as_deref() {
            None | Some("") | Some("all") => WATCH_KINDS.into_iter().collect(),
            Some(kind) => match WATCH_KINDS.into_iter().find(|k| *k == kind) {
                Some(k) => BTreeSet::from([k]),
                None => {
                    return Err(ApiError::invalid(
                        format!("unknown watch kind {kind:?}"),
                        vec![flotilla_types::FieldError::new(
                            "kind",
                            format!("expected one of {} or all", WATCH_KINDS.join(", ")),
                        )],
                    ))
                }
            },
        };
        Ok(WatchFilter {
            kinds,
            node: q.node,
            known_tasks: BTreeSet::new(),
        })
    }

    /// Every object of `all` when the watcher asked for `kind`.
    fn list<K: Clone, I: Ord>(&self, kind: &str, all: &BTreeMap<I, K>) -> Vec<K> {
        if self.kinds.contains(kind) {
            all.values().cloned().collect()
        } else {
            Vec::new()
        }
    }

    fn snapshot(&mut self, s: &ClusterState) -> WatchMessage {
        let tasks: Vec<_> = if self.kinds.contains("task") {
            s.tasks
                .values()
                .filter(|t| self.node.is_none() || t.node == self.node)
                .cloned()
                .collect()
        } else {
            Vec::new()
        };
        self.known_tasks = tasks.iter().map(|t| t.id.clone()).collect();
        WatchMessage::Snapshot {
            revision: s.revision,
            tasks,
            services: self.list("service", &s.services),
            nodes: self.list("node", &s.nodes),
            rollouts: self.list("service", &s.rollouts),
            namespaces: self.list("namespace", &s.namespaces),
            configs: self.list("config", &s.configs),
        }
    }

    fn change(&mut self, c: &Change) -> Option<WatchChange> {
        let change = c.to_watch()?;
        if !self.kinds.contains(change.watch_kind()) {
            return None;
        }
        let WatchChange::Task { id, object } = &change else {
            return Some(change);
        };
        let matches = self.node.is_none() || object.as_ref().is_some_and(|t| t.node == self.node);
        if matches {
            self.known_tasks.insert(id.clone());
            Some(change)
        } else if self.known_tasks.remove(id) {
            // Deleted, or moved off the watched node: tell the watcher it is gone.
            Some(WatchChange::Task {
                id: id.clone(),
                object: None,
            })
        } else {
            None
        }
    }
}

pub async fn watch(
    State(app): State<AppState>,
    Query(q): Query<WatchQuery>,
) -> Result<Response, ApiError> {
    let mut filter = WatchFilter::new(q)?;
    let mut sub = app.store.subscribe();
    let first = app.store.read(|s| filter.snapshot(s));
    // Small on purpose: once the watcher stops reading, changes wait in `Pending`, where a newer
    // version of an object replaces the older one, rather than as serialised lines.
    let (tx, rx) = mpsc::channel::<Bytes>(WATCH_BUFFER);
    let store = app.store.clone();
    tokio::spawn(async move {
        let mut last = match &first {
            WatchMessage::Snapshot { revision, .. } => *revision,
            _ => 0,
        };
        let Some(l) = line(&first) else { return };
        if tx.send(l).await.is_err() {
            return;
        }
        let mut pending = Pending::default();
        // A deadline, not a per-iteration sleep: a stream of changes this watcher filters out
        // would otherwise restart the timer forever, and the watcher, hearing nothing, would
        // take the manager for dead.
        let mut heartbeat_due = tokio::time::Instant::now() + WATCH_HEARTBEAT;
        loop {
            // Keep receiving while the watcher is busy: a watcher that lets the store's
            // broadcast run more than its capacity ahead must be sent a whole new snapshot,
            // and at 100k tasks it falls behind again while reading that one.
            let msg = tokio::select! {
                r = sub.recv() => match r {
                    Ok(batch) if batch.revision > last => {
                        last = batch.revision;
                        for c in &batch.changes {
                            if let Some(change) = filter.change(c) {
                                pending.push(batch.revision, change);
                            }
                        }
                        continue;
                    }
                    Ok(_) => continue,
                    Err(RecvError::Lagged(_)) => {
                        // The snapshot holds everything pending, and more.
                        pending = Pending::default();
                        let snap = store.read(|s| filter.snapshot(s));
                        if let WatchMessage::Snapshot { revision, .. } = &snap { last = *revision; }
                        snap
                    }
                    Err(RecvError::Closed) => return,
                },
                permit = tx.reserve(), if !pending.is_empty() => {
                    let Ok(permit) = permit else { return };
                    if let Some(l) = line(&pending.take()) {
                        permit.send(l);
                        heartbeat_due = tokio::time::Instant::now() + WATCH_HEARTBEAT;
                    }
                    continue;
                }
                _ = tokio::time::sleep_until(heartbeat_due), if pending.is_empty() => {
                    WatchMessage::Heartbeat { revision: last }
                }
            };
            let Some(l) = line(&msg) else { continue };
            if tx.send(l).await.is_err() {
                return;
            }
            heartbeat_due = tokio::time::Instant::now() + WATCH_HEARTBEAT;
        }
    });
    ndjson_response(rx)
}

/// Serialised watch lines buffered per watcher.
const WATCH_BUFFER: usize = 16;

/// Changes not yet sent to a watcher, at most one per object (the newest), in the order objects
/// were first touched. Watchers mirror objects, so skipping versions they never saw loses
/// nothing, and a slow watcher's backlog is bounded by the number of objects, not of changes.
#[derive(Default)]
struct Pending {
    revision: u64,
    changes: Vec<WatchChange>,
    index: HashMap<(&'static str, String, u64), usize>,
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }

    fn push(&mut self, revision: u64, change: WatchChange) {
        self.revision = revision;
        let (kind, name, number) = change.object_key();
        let key = (kind, name.to_string(), number);
        match self.index.get(&key) {
            Some(&i) => self.changes[i] = change,
            None => {
                self.index.insert(key, self.changes.len());
                self.changes.push(change);
            }
        }
    }

    fn take(&mut self) -> WatchMessage {
        let taken = std::mem::take(self);
        WatchMessage::Change {
            revision: taken.revision,
            changes: taken.changes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_types::{Config, Namespace};

    fn filter(kind: &str) -> WatchFilter {
        let q = WatchQuery {
            kind: Some(kind.to_string()),
            node: None,
        };
        match WatchFilter::new(q) {
            Ok(f) => f,
            Err(e) => panic!("watch kind {kind}: {e:?}"),
        }
    }

    fn state() -> ClusterState {
        let mut s = ClusterState::default();
        s.namespaces.insert("a".into(), Namespace::new("a"));
        s.configs.insert("c".into(), Config::new("c", "data"));
        s
    }

    #[test]
    fn unknown_kinds_are_refused_naming_the_field() {
        let q = WatchQuery {
            kind: Some("secret".into()),
            node: None,
        };
        match WatchFilter::new(q) {
            Err(ApiError::Invalid { fields, .. }) => {
                assert_eq!(fields[0].field, "kind");
                assert!(fields[0].reason.contains("namespace, config"), "{fields:?}");
            }
            Err(other) => panic!("expected invalid, got {other:?}"),
            Ok(_) => panic!("an unknown kind was accepted"),
        }
    }

    /// The namespaces and configs of a snapshot for a watch of `kind`.
    fn snapshot_of(kind: &str) -> (Vec<Namespace>, Vec<Config>) {
        match filter(kind).snapshot(&state()) {
            WatchMessage::Snapshot {
                namespaces,
                configs,
                ..
            } => (namespaces, configs),
            other => panic!("not a snapshot: {other:?}"),
        }
    }

    #[test]
    fn snapshots_and_changes_carry_only_the_asked_kinds() {
        assert_eq!(
            snapshot_of("config"),
            (vec![], vec![Config::new("c", "data")])
        );
        let (namespaces, configs) = snapshot_of("all");
        assert_eq!((namespaces.len(), configs.len()), (1, 1));

        let deleted = Change::Config {
            key: "c".into(),
            object: None,
        };
        assert_eq!(
            filter("config").change(&deleted),
            Some(WatchChange::Config {
                name: "c".into(),
                object: None
            })
        );
        assert_eq!(filter("namespace").change(&deleted), None);
        let record = Change::Record {
            key: "pki".into(),
            object: None,
        };
        assert_eq!(filter("all").change(&record), None);
    }

    #[test]
    fn pending_keeps_the_newest_change_per_object_across_kinds() {
        let mut pending = Pending::default();
        let config = |data: &str| WatchChange::Config {
            name: "x".into(),
            object: Some(Config::new("x", data)),
        };
        let namespace = WatchChange::Namespace {
            name: "x".into(),
            object: None,
        };
        pending.push(1, config("old"));
        pending.push(2, namespace.clone());
        pending.push(3, config("new"));
        let WatchMessage::Change { revision, changes } = pending.take() else {
            panic!("not a change")
        };
        assert_eq!(revision, 3);
        assert_eq!(changes, [config("new"), namespace]);
    }
}
