//! Following a deploy or a scale over the watch stream until every service has converged (the
//! shared definition in `flotilla_types::convergence`) and every node's mesh routes its ready
//! tasks, or until the controller gives up on one. A release shows its phase, weights, counts
//! and canary analysis; a rollback or abort is a failure.

use anyhow::{bail, Context};
use flotilla_client::{Client, ClientError, Mirror};
use flotilla_types::convergence::{
    desired_tasks, is_live, meshes_route_only, restart_attempt, routed_by_mesh, Convergence,
    Settle, Surplus,
};
use flotilla_types::{NodeState, ServiceSpec, Task};
use futures::StreamExt;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// How often the meshes' routing is checked while a converged service waits for it.
const ROUTING_POLL: Duration = Duration::from_millis(100);

/// How one service's rollout stands.
#[derive(Debug, PartialEq)]
pub(crate) enum Progress {
    Waiting {
        ready: u64,
        desired: u64,
        note: String,
    },
    /// Every task is ready; not every node's mesh routes them yet.
    Routing {
        ready: u64,
    },
    Done {
        ready: u64,
    },
    Failed(String),
}

/// The service's tasks against what it wants, from the CLI's mirror of the store. `started_ms`:
/// failures of tasks created before it belong to an earlier change.
pub(crate) fn progress(mirror: &Mirror, name: &str, started_ms: i64) -> Progress {
    let Some(svc) = mirror.services.get(name) else {
        return Progress::Waiting {
            ready: 0,
            desired: 0,
            note: "waiting for the service to appear".into(),
        };
    };
    let spec = &svc.spec;
    let tasks: Vec<&Task> = mirror
        .tasks
        .values()
        .filter(|t| t.service == name)
        .collect();
    let counts = Convergence::count(
        desired_tasks(spec, mirror.nodes.values()),
        tasks.iter().copied(),
        |t| t.spec.task_template_eq(spec),
        Settle::Immediately,
    );
    let failures: Vec<&Task> = tasks
        .iter()
        .copied()
        .filter(|t| {
            t.meta.created_at >= started_ms
                && t.spec.task_template_eq(spec)
                && t.status.state.is_terminal()
                && !(t.status.state == flotilla_types::TaskState::Exited
                    && t.status.exit_code == Some(0))
        })
        .collect();
    if let Some(stuck) = given_up(spec, &tasks, started_ms) {
        return Progress::Failed(format!(
            "{} {} and will not be restarted: {}",
            stuck.name(),
            if stuck.status.state == flotilla_types::TaskState::Exited {
                "exited"
            } else {
                "failed"
            },
            stuck.status.message
        ));
    }
    if counts.converged(Surplus::Blocks) {
        return Progress::Done {
            ready: counts.ready,
        };
    }
    Progress::Waiting {
        ready: counts.ready,
        desired: counts.desired,
        note: waiting_note(&tasks, &failures),
    }
}

/// A task of this deploy that ended and that the controller will not replace: it keeps desired
/// `running` and its restart policy leaves the slot empty ("Restart decisions"). A dead task
/// the policy restarts is being replaced, whether or not the replacement is visible yet.
fn given_up<'a>(spec: &ServiceSpec, tasks: &[&'a Task], started_ms: i64) -> Option<&'a Task> {
    tasks.iter().copied().find(|t| {
        t.meta.created_at >= started_ms
            && t.spec.task_template_eq(spec)
            && t.status.state.is_terminal()
            && t.desired_state == flotilla_types::DesiredState::Running
            && restart_attempt(spec, t).is_none()
    })
}

/// What a waiting service shows: why a live task is not ready, and the failures so far (their
/// tasks are being replaced).
fn waiting_note(tasks: &[&Task], failures: &[&Task]) -> String {
    let mut note = tasks
        .iter()
        .filter(|t| is_live(t) && !t.status.message.is_empty() && !t.is_ready())
        .map(|t| format!("{}: {}", t.name(), t.status.message))
        .next()
        .unwrap_or_default();
    if let Some(last) = failures.iter().max_by_key(|t| t.status.since) {
        if !note.is_empty() {
            note.push_str("; ");
        }
        note.push_str(&format!(
            "{} failure(s) so far, restarting; last {}: {}",
            failures.len(),
            last.name(),
            last.status.message
        ));
    }
    note
}

/// The release of `revision` as the deploy reports it, while one is under way or once it
/// failed; `None` defers to the task counts.
fn release_progress(mirror: &Mirror, name: &str, revision: u64) -> Option<Progress> {
    let r = mirror.rollouts.get(name)?;
    let mine = r.to_revision == revision
        || (r.kind == flotilla_types::RolloutKind::AutoRollback && r.from_revision == revision);
    if !mine {
        return None;
    }
    let line = crate::rollout_cmd::describe(r);
    match crate::rollout_cmd::outcome(r, revision) {
        Some(code) if code == ExitCode::FAILURE => Some(Progress::Failed(line)),
        Some(_) => None,
        None => Some(Progress::Waiting {
            ready: r.updated,
            desired: match mirror.services.get(name).map(|s| &s.spec.mode) {
                Some(flotilla_types::ServiceMode::Replicated { replicas }) => *replicas,
                _ => r.updated,
            },
            note: line,
        }),
    }
}

/// Follows `names` until each has converged and is routed, one has failed, or `timeout`.
/// `updated`: services whose template changed, by the revision that is being released.
pub(crate) async fn follow(
    c: &Client,
    names: &[String],
    updated: &BTreeMap<String, u64>,
    timeout: Duration,
) -> anyhow::Result<ExitCode> {
    let mut f = Follower::new(c, names, updated)?;
    let started = Instant::now();
    let mut stream = c.watch(None, None).await?;
    loop {
        let remaining = timeout.saturating_sub(started.elapsed());
        if remaining.is_zero() {
            f.abandon();
            bail!(
                "did not converge within {}",
                humantime::format_duration(timeout)
            );
        }
        // Routing is not on the watch stream: while a service waits for it, look again soon.
        let wait = if f.routing() {
            remaining.min(ROUTING_POLL)
        } else {
            remaining
        };
        match tokio::time::timeout(wait, stream.next()).await {
            Ok(Some(m)) => f.mirror.apply(m?),
            Ok(None) => bail!("the manager closed the watch stream"),
            Err(_) => {}
        }
        if let Some(code) = f.pass().await? {
            return Ok(code);
        }
    }
}

/// The state of one `follow`: the mirror, the bars and what each service last showed.
struct Follower<'a> {
    c: &'a Client,
    names: &'a [String],
    updated: &'a BTreeMap<String, u64>,
    started_ms: i64,
    mirror: Mirror,
    multi: MultiProgress,
    bars: BTreeMap<&'a str, ProgressBar>,
    outcome: BTreeMap<&'a str, Progress>,
    /// The live task ids each service's meshes were last seen routing (and nothing else).
    routed: BTreeMap<&'a str, Vec<String>>,
}

impl<'a> Follower<'a> {
    fn new(
        c: &'a Client,
        names: &'a [String],
        updated: &'a BTreeMap<String, u64>,
    ) -> anyhow::Result<Self> {
        let multi = MultiProgress::new();
        let style = ProgressStyle::with_template("{prefix:>16} [{bar:20}] {pos}/{len} {msg}")
            .context("progress template")?
            .progress_chars("=> ");
        let bars = names
            .iter()
            .map(|n| {
                let bar = multi.add(ProgressBar::new(0));
                bar.set_style(style.clone());
                bar.set_prefix(n.clone());
                (n.as_str(), bar)
            })
            .collect();
        Ok(Follower {
            c,
            names,
            updated,
            started_ms: flotilla_types::now_ms() - 1000,
            mirror: Mirror::default(),
            multi,
            bars,
            outcome: BTreeMap::new(),
            routed: BTreeMap::new(),
        })
    }

    fn routing(&self) -> bool {
        self.outcome
            .values()
            .any(|p| matches!(p, Progress::Routing { .. }))
    }

    /// Works out every service's progress; `Some(exit code)` once the follow is over.
    async fn pass(&mut self) -> anyhow::Result<Option<ExitCode>> {
        let mut all_done = true;
        for n in self.names {
            let mut p = self
                .updated
                .get(n)
                .and_then(|rev| release_progress(&self.mirror, n, *rev))
                .unwrap_or_else(|| progress(&self.mirror, n, self.started_ms));
            if let Progress::Done { ready } = p {
                if !self.meshes_route(n).await {
                    p = Progress::Routing { ready };
                }
            }
            let bar = &self.bars[n.as_str()];
            match &p {
                Progress::Waiting {
                    ready,
                    desired,
                    note,
                } => {
                    all_done = false;
                    bar.set_length(*desired);
                    bar.set_position(*ready);
                    bar.set_message(note.clone());
                }
                Progress::Routing { ready } => {
                    all_done = false;
                    bar.set_length(*ready);
                    bar.set_position(*ready);
                    bar.set_message("ready; waiting for every node's mesh to route them");
                }
                Progress::Done { ready } => {
                    bar.set_length(*ready);
                    bar.set_position(*ready);
                    bar.finish_with_message("ready");
                }
                Progress::Failed(why) => {
                    bar.abandon_with_message(why.clone());
                    self.multi.suspend(|| println!("{n}: FAILED: {why}"));
                    return Ok(Some(ExitCode::FAILURE));
                }
            }
            self.outcome.insert(n.as_str(), p);
        }
        if !all_done {
            return Ok(None);
        }
        for n in self.names {
            if let Some(Progress::Done { ready }) = self.outcome.get(n.as_str()) {
                self.multi
                    .suspend(|| println!("{n}: {ready} task(s) ready"));
            }
        }
        Ok(Some(ExitCode::SUCCESS))
    }

    /// Whether every node's mesh routes the service's ready tasks and nothing else, so the next
    /// request on its published port reaches one of them. Services without a port the meshes
    /// route have nothing to wait for; so does a manager without the traffic endpoint.
    async fn meshes_route(&mut self, name: &'a str) -> bool {
        let Some(svc) = self.mirror.services.get(name) else {
            return true;
        };
        if !routed_by_mesh(&svc.spec) {
            return true;
        }
        let ids: Vec<String> = self
            .mirror
            .tasks
            .values()
            .filter(|t| t.service == name && is_live(t) && t.spec.task_template_eq(&svc.spec))
            .map(|t| t.id.clone())
            .collect();
        if self.routed.get(name) == Some(&ids) {
            return true;
        }
        let traffic = match self.c.service_traffic(name).await {
            Ok(t) => t,
            Err(ClientError::Api { status: 404, .. }) => return true,
            // The service is ready; a failed look at the meshes (a manager failing over) is
            // no reason to fail the deploy: look again on the next pass.
            Err(e) => {
                tracing::debug!(service = name, error = %e, "reading the traffic failed");
                return false;
            }
        };
        let ready_nodes = self
            .mirror
            .nodes
            .values()
            .filter(|n| n.state == NodeState::Ready)
            .count();
        let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
        if !meshes_route_only(&traffic, &refs, ready_nodes) {
            return false;
        }
        self.routed.insert(name, ids);
        true
    }

    /// Timed out: leaves the bars as they are and says where each service stood.
    fn abandon(&self) {
        for b in self.bars.values() {
            b.abandon();
        }
        for n in self.names {
            if let Some(p) = self.outcome.get(n.as_str()) {
                eprintln!("{n}: {p:?}");
            }
        }
    }
}
