//! One compiled form for every placement syntax.
//!
//! Swarm-mode `deploy.placement`, classic Swarm / Alibaba `constraint:` / `affinity:` /
//! `availability:` entries (in `environment` or `labels`), the `com.docker.swarm.*` labels and
//! `x-flotilla.placement` all compile to the same [`CompiledPlacement`], so the filters and the
//! scorer only ever see one shape. Values everywhere accept an exact string, a glob (`web-*`) or a
//! `/regex/` (unanchored, as classic Swarm matched them).

use flotilla_types::{
    AffinitySpec, DriverKind, FieldError, Node, NodeRole, PlacementStrategy, PortProtocol,
    PortSpec, ResourceAmounts, ServiceSpec, SpreadSpec,
};

/// Highest `x-flotilla.placement.priority`.
pub const MAX_PRIORITY: u32 = 1000;
/// Largest magnitude of an `x-flotilla.placement.affinities[].weight`.
pub const MAX_AFFINITY_WEIGHT: i32 = 100;
/// Weight given to a classic soft affinity (`affinity:service==~db`), i.e. the strongest.
const CLASSIC_SOFT_WEIGHT: u32 = MAX_AFFINITY_WEIGHT.unsigned_abs();

/// A node property a constraint or spread rule reads.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum NodeAttr {
    /// `node.id`.
    Id,
    /// `node.hostname`.
    Hostname,
    /// Classic `node`: matches the id or the hostname.
    IdOrHostname,
    /// `node.role`.
    Role,
    /// `node.labels.K`.
    Label(String),
    /// `engine.labels.K`.
    EngineLabel(String),
    /// Classic `K`: the node label `K`, else the engine label `K`.
    AnyLabel(String),
    /// `node.zone`, else the node label `zone`.
    Zone,
}

impl NodeAttr {
    /// The attribute's value(s) on `node`; an id-or-hostname attribute has two.
    fn values<'n>(&self, node: &'n Node) -> [Option<&'n str>; 2] {
        match self {
            NodeAttr::Id => [Some(&node.id), None],
            NodeAttr::Hostname => [Some(&node.hostname), None],
            NodeAttr::IdOrHostname => [Some(&node.id), Some(&node.hostname)],
            NodeAttr::Role => [
                Some(match node.role {
                    NodeRole::Manager => "manager",
                    NodeRole::Worker => "worker",
                }),
                None,
            ],
            NodeAttr::Label(k) => [node.labels.get(k).map(String::as_str), None],
            NodeAttr::EngineLabel(k) => [node.engine_labels.get(k).map(String::as_str), None],
            NodeAttr::AnyLabel(k) => [
                node.labels
                    .get(k)
                    .or_else(|| node.engine_labels.get(k))
                    .map(String::as_str),
                None,
            ],
            NodeAttr::Zone => [node_zone(node), None],
        }
    }

    /// The single value used to group nodes into spread domains.
    pub(crate) fn domain<'n>(&self, node: &'n Node) -> Option<&'n str> {
        self.values(node)[0]
    }
}

/// A node's zone: `node.zone`, else its `zone` label.
pub fn node_zone(node: &Node) -> Option<&str> {
    node.zone
        .as_deref()
        .or_else(|| node.labels.get("zone").map(String::as_str))
}

/// How a constraint value is compared.
#[derive(Debug, Clone)]
pub enum ValueMatcher {
    Exact(String),
    Glob(glob::Pattern),
    Regex(regex::Regex),
}

impl ValueMatcher {
    /// `/re/` is a regex, a value with `*`, `?` or `[` is a glob, anything else is exact.
    pub fn parse(value: &str) -> Result<Self, String> {
        if value.is_empty() {
            return Err("the value is empty".to_string());
        }
        if value.len() >= 2 && value.starts_with('/') && value.ends_with('/') {
            let inner = &value[1..value.len() - 1];
            return regex::Regex::new(inner)
                .map(ValueMatcher::Regex)
                .map_err(|e| format!("{value:?} is not a valid regular expression: {e}"));
        }
        if value.contains(['*', '?', '[']) {
            return glob::Pattern::new(value)
                .map(ValueMatcher::Glob)
                .map_err(|e| format!("{value:?} is not a valid glob: {e}"));
        }
        Ok(ValueMatcher::Exact(value.to_string()))
    }

    pub fn matches(&self, value: &str) -> bool {
        match self {
            ValueMatcher::Exact(s) => s == value,
            ValueMatcher::Glob(p) => p.matches(value),
            ValueMatcher::Regex(r) => r.is_match(value),
        }
    }

    /// The exact string, when the matcher is one; lets lookups skip scanning.
    pub fn exact(&self) -> Option<&str> {
        match self {
            ValueMatcher::Exact(s) => Some(s),
            _ => None,
        }
    }
}

/// A filter (hard) or preference (soft) on a node attribute.
#[derive(Debug, Clone)]
pub struct Constraint {
    pub attr: NodeAttr,
    /// `!=` rather than `==`.
    pub negate: bool,
    pub value: ValueMatcher,
    /// `==~` / `!=~`: only steers the score, never rejects a node.
    pub soft: bool,
    /// The expression as written, used in failure explanations.
    pub expr: String,
}

impl Constraint {
    /// Whether `node` satisfies the constraint. A missing attribute never equals anything, so it
    /// satisfies `!=` (Swarm's behaviour).
    pub fn matches(&self, node: &Node) -> bool {
        let hit = self
            .attr
            .values(node)
            .iter()
            .flatten()
            .any(|v| self.value.matches(v));
        hit != self.negate
    }
}

/// What an affinity is about.
#[derive(Debug, Clone)]
pub enum AffinityTarget {
    /// Tasks of a service (classic `container` is treated the same: tasks are named by service).
    Service(ValueMatcher),
    /// Tasks running an image.
    Image(ValueMatcher),
}

/// Attraction to, or repulsion from, nodes already running something.
#[derive(Debug, Clone)]
pub struct Affinity {
    pub target: AffinityTarget,
    /// Attract (co-locate) rather than repel.
    pub attract: bool,
    pub hard: bool,
    /// Strength of a soft affinity, 1..=100.
    pub weight: u32,
    pub expr: String,
}

/// Spread over the values of a node attribute.
#[derive(Debug, Clone)]
pub struct SpreadRule {
    pub attr: NodeAttr,
    /// Hard rules reject placements exceeding `max_skew`; soft ones (including every
    /// `deploy.placement.preferences` entry) only steer the score.
    pub hard: bool,
    pub max_skew: u32,
    pub expr: String,
}

/// `availability:az==N`: the service's tasks must cover at least `zones` zones.
#[derive(Debug, Clone)]
pub struct ZoneRequirement {
    pub zones: usize,
    pub hard: bool,
    pub expr: String,
}

/// CPU and memory a task takes from a node.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Demand {
    pub reserved_cpu: u64,
    pub reserved_memory: u64,
    /// Limits fall back to the reservation when unset: a task with no limit is assumed to use
    /// what it reserved.
    pub limit_cpu: u64,
    pub limit_memory: u64,
}

impl Demand {
    pub fn of(spec: &ServiceSpec) -> Self {
        let ResourceAmounts {
            cpu_millis: rc,
            memory_bytes: rm,
            ..
        } = spec.resources.reservations;
        let ResourceAmounts {
            cpu_millis: lc,
            memory_bytes: lm,
            ..
        } = spec.resources.limits;
        Demand {
            reserved_cpu: rc.unwrap_or(0),
            reserved_memory: rm.unwrap_or(0),
            limit_cpu: lc.or(rc).unwrap_or(0),
            limit_memory: lm.or(rm).unwrap_or(0),
        }
    }
}

/// Everything the scheduler needs from a service spec, in one checked form.
#[derive(Debug, Clone)]
pub struct CompiledPlacement {
    pub service: String,
    pub driver: DriverKind,
    pub image: Option<String>,
    pub demand: Demand,
    /// Hard and soft node constraints, in source order.
    pub constraints: Vec<Constraint>,
    pub affinities: Vec<Affinity>,
    pub spreads: Vec<SpreadRule>,
    pub zones: Option<ZoneRequirement>,
    /// The tighter of `max_replicas_per_node` and `x-flotilla.placement.max_per_node`.
    pub max_per_node: Option<u64>,
    pub strategy: PlacementStrategy,
    pub priority: u32,
    /// Host-mode published ports: each is held exclusively on the node a task runs on.
    pub host_ports: Vec<(u16, PortProtocol)>,
}

/// The three classic prefixes.
#[derive(Clone, Copy)]
enum ClassicKind {
    Constraint,
    Affinity,
    Availability,
}

fn classic_kind(key: &str) -> Option<(ClassicKind, &str)> {
    [
        ("constraint:", ClassicKind::Constraint),
        ("affinity:", ClassicKind::Affinity),
        ("availability:", ClassicKind::Availability),
    ]
    .into_iter()
    .find_map(|(prefix, kind)| key.strip_prefix(prefix).map(|rest| (kind, rest)))
}

/// An expression split at its operator.
struct Split<'a> {
    key: &'a str,
    negate: bool,
    soft: bool,
    value: &'a str,
}

/// Splits `K==V`, `K!=V`, `K==~V`, `K!=~V`.
fn split_expr(expr: &str) -> Result<Split<'_>, String> {
    let eq = expr.find("==");
    let ne = expr.find("!=");
    let (pos, negate) = match (eq, ne) {
        (Some(e), Some(n)) if n < e => (n, true),
        (Some(e), _) => (e, false),
        (None, Some(n)) => (n, true),
        (None, None) => {
            return Err(format!(
                "{expr:?} has no operator (expected KEY==VALUE or KEY!=VALUE, '~' after the operator for a soft rule)"
            ))
        }
    };
    let key = expr[..pos].trim();
    let rest = &expr[pos + 2..];
    let (soft, value) = match rest.strip_prefix('~') {
        Some(v) => (true, v.trim()),
        None => (false, rest.trim()),
    };
    if key.is_empty() {
        return Err(format!("{expr:?} has no key before the operator"));
    }
    if value.is_empty() {
        return Err(format!("{expr:?} has no value after the operator"));
    }
    Ok(Split {
        key,
        negate,
        soft,
        value,
    })
}

/// Swarm-mode attribute names.
fn swarm_attr(key: &str) -> Result<NodeAttr, String> {
    match key {
        "node.id" => Ok(NodeAttr::Id),
        "node.hostname" => Ok(NodeAttr::Hostname),
        "node.role" => Ok(NodeAttr::Role),
        "node.zone" => Ok(NodeAttr::Zone),
        _ => {
            if let Some(k) = key.strip_prefix("node.labels.") {
                if !k.is_empty() {
                    return Ok(label_attr(k));
                }
            }
            if let Some(k) = key.strip_prefix("engine.labels.") {
                if !k.is_empty() {
                    return Ok(NodeAttr::EngineLabel(k.to_string()));
                }
            }
            Err(format!(
                "unknown attribute {key:?} (expected node.id, node.hostname, node.role, node.zone, node.labels.KEY or engine.labels.KEY)"
            ))
        }
    }
}

/// A node-label attribute; the label `zone` is the node's zone.
fn label_attr(k: &str) -> NodeAttr {
    if k == "zone" {
        NodeAttr::Zone
    } else {
        NodeAttr::Label(k.to_string())
    }
}

fn constraint_from(expr: &str, shown: String, classic: bool) -> Result<Constraint, String> {
    let s = split_expr(expr)?;
    let attr = if classic && !(s.key.starts_with("node.") || s.key.starts_with("engine.")) {
        match s.key {
            "node" => NodeAttr::IdOrHostname,
            "zone" => NodeAttr::Zone,
            k => NodeAttr::AnyLabel(k.to_string()),
        }
    } else {
        swarm_attr(s.key)?
    };
    if attr == NodeAttr::Role && !matches!(s.value, "manager" | "worker") {
        return Err(format!(
            "node.role is \"manager\" or \"worker\", not {:?}",
            s.value
        ));
    }
    Ok(Constraint {
        attr,
        negate: s.negate,
        value: ValueMatcher::parse(s.value)?,
        soft: s.soft,
        expr: shown,
    })
}

fn classic_affinity(expr: &str, shown: String) -> Result<Affinity, String> {
    let s = split_expr(expr)?;
    let value = ValueMatcher::parse(s.value)?;
    let target = match s.key {
        "service" | "container" => AffinityTarget::Service(value),
        "image" => AffinityTarget::Image(value),
        other => {
            return Err(format!(
                "unknown affinity key {other:?} (expected service, container or image)"
            ))
        }
    };
    Ok(Affinity {
        target,
        attract: !s.negate,
        hard: !s.soft,
        weight: CLASSIC_SOFT_WEIGHT,
        expr: shown,
    })
}

fn classic_availability(expr: &str, shown: String) -> Result<ZoneRequirement, String> {
    let s = split_expr(expr)?;
    if !matches!(s.key, "az" | "zone") {
        return Err(format!(
            "unknown availability key {:?} (expected az)",
            s.key
        ));
    }
    if s.negate {
        return Err("availability takes == (or ==~ for best effort), not !=".to_string());
    }
    let zones: usize = s.value.parse().ok().filter(|n| *n >= 1).ok_or_else(|| {
        format!(
            "{:?} is not a zone count (expected an integer >= 1)",
            s.value
        )
    })?;
    Ok(ZoneRequirement {
        zones,
        hard: !s.soft,
        expr: shown,
    })
}

/// The rule being built, collecting every error rather than stopping at the first.
struct Builder<'s> {
    spec: &'s ServiceSpec,
    out: CompiledPlacement,
    errors: Vec<FieldError>,
}

impl Builder<'_> {
    fn field(&self, path: &str) -> String {
        format!("services.{}.{path}", self.spec.name)
    }

    fn fail(&mut self, path: &str, reason: String) {
        let field = self.field(path);
        self.errors.push(FieldError::new(field, reason));
    }

    /// One classic expression such as `constraint:zone==a`, found at `path`.
    fn classic(&mut self, path: &str, full: &str) {
        let Some((kind, expr)) = classic_kind(full) else {
            return;
        };
        let shown = full.to_string();
        let result = match kind {
            ClassicKind::Constraint => {
                constraint_from(expr, shown, true).map(|c| self.out.constraints.push(c))
            }
            ClassicKind::Affinity => {
                classic_affinity(expr, shown).map(|a| self.out.affinities.push(a))
            }
            ClassicKind::Availability => classic_availability(expr, shown).and_then(|z| {
                if self.out.zones.is_some() {
                    Err("only one availability:az requirement is allowed".to_string())
                } else {
                    self.out.zones = Some(z);
                    Ok(())
                }
            }),
        };
        if let Err(reason) = result {
            self.fail(path, reason);
        }
    }

    /// A `com.docker.swarm.constraints` / `.affinities` label: a JSON list of expressions.
    fn swarm_label_list(&mut self, key: &str, raw: &str, prefix: &str) {
        match serde_json::from_str::<Vec<String>>(raw) {
            Ok(list) => {
                for (i, expr) in list.iter().enumerate() {
                    self.classic(&format!("labels.{key}[{i}]"), &format!("{prefix}{expr}"));
                }
            }
            Err(e) => self.fail(
                &format!("labels.{key}"),
                format!("expected a JSON list of strings such as '[\"zone==a\"]': {e}"),
            ),
        }
    }
}

/// Rebuilds a classic entry split by Compose at its first `=`: `constraint:zone==a` may arrive as
/// key `constraint:zone==a` with no value, or as key `constraint:zone` with value `=a`.
fn rejoin(key: &str, value: &str) -> String {
    if value.is_empty() {
        key.to_string()
    } else {
        format!("{key}={value}")
    }
}

/// Compiles every placement syntax of `spec`. Errors name the field and the expression.
pub fn compile(spec: &ServiceSpec) -> Result<CompiledPlacement, Vec<FieldError>> {
    let p = &spec.placement;
    let mut b = Builder {
        spec,
        out: CompiledPlacement {
            service: spec.name.clone(),
            driver: spec.driver,
            image: spec.image.clone(),
            demand: Demand::of(spec),
            constraints: Vec::new(),
            affinities: Vec::new(),
            spreads: Vec::new(),
            zones: None,
            max_per_node: None,
            strategy: p.strategy,
            priority: p.priority,
            host_ports: spec.ports.iter().filter_map(PortSpec::host_port).collect(),
        },
        errors: Vec::new(),
    };

    for (i, expr) in p.constraints.iter().enumerate() {
        match constraint_from(expr, expr.clone(), false) {
            Ok(c) => b.out.constraints.push(c),
            Err(reason) => b.fail(&format!("deploy.placement.constraints[{i}]"), reason),
        }
    }
    for (key, value) in &spec.environment {
        b.classic(&format!("environment.{key}"), &rejoin(key, value));
    }
    for (key, value) in &spec.labels {
        match key.as_str() {
            "com.docker.swarm.constraints" => b.swarm_label_list(key, value, "constraint:"),
            "com.docker.swarm.affinities" => b.swarm_label_list(key, value, "affinity:"),
            _ => b.classic(&format!("labels.{key}"), &rejoin(key, value)),
        }
    }

    b.preferences(&p.preferences);
    b.spreads(&p.spread);
    b.affinities(&p.affinities);

    // Docker treats max_replicas_per_node 0 as "no limit"; our own field has no such legacy.
    let swarm_max = p.max_replicas_per_node.filter(|n| *n > 0);
    if p.max_per_node == Some(0) {
        b.fail(
            "x-flotilla.placement.max_per_node",
            "must be at least 1 (leave it out for no limit)".to_string(),
        );
    }
    b.out.max_per_node = match (swarm_max, p.max_per_node.filter(|n| *n > 0)) {
        (Some(a), Some(c)) => Some(a.min(c)),
        (a, c) => a.or(c),
    };
    if p.priority > MAX_PRIORITY {
        b.fail(
            "x-flotilla.placement.priority",
            format!("{} is above the maximum of {MAX_PRIORITY}", p.priority),
        );
    }

    if b.errors.is_empty() {
        Ok(b.out)
    } else {
        Err(b.errors)
    }
}

impl Builder<'_> {
    /// Swarm `spread=node.labels.KEY` preferences: soft spreads.
    fn preferences(&mut self, preferences: &[String]) {
        for (i, pref) in preferences.iter().enumerate() {
            let path = format!("deploy.placement.preferences[{i}]");
            match pref.strip_prefix("spread=").map(str::trim) {
                Some(key) => match swarm_attr(key) {
                    Ok(attr) => self.out.spreads.push(SpreadRule {
                        attr,
                        hard: false,
                        max_skew: 1,
                        expr: pref.clone(),
                    }),
                    Err(reason) => self.fail(&path, reason),
                },
                None => self.fail(
                    &path,
                    format!("{pref:?} is not a preference (expected spread=node.labels.KEY)"),
                ),
            }
        }
    }

    /// `x-flotilla.placement.spread`: soft or hard spreads with a skew.
    fn spreads(&mut self, spread: &[SpreadSpec]) {
        for (i, s) in spread.iter().enumerate() {
            let label = s.label.trim();
            if label.is_empty() {
                self.fail(
                    &format!("x-flotilla.placement.spread[{i}].label"),
                    "must name a node label (or zone)".to_string(),
                );
                continue;
            }
            if s.max_skew == 0 {
                self.fail(
                    &format!("x-flotilla.placement.spread[{i}].max_skew"),
                    "must be at least 1".to_string(),
                );
                continue;
            }
            let attr = label_attr(label.strip_prefix("node.labels.").unwrap_or(label));
            self.out.spreads.push(SpreadRule {
                attr,
                hard: s.hard,
                max_skew: s.max_skew,
                expr: format!("spread over {label} (max_skew {})", s.max_skew),
            });
        }
    }

    /// `x-flotilla.placement.affinities`: weighted service (anti-)affinities.
    fn affinities(&mut self, affinities: &[AffinitySpec]) {
        for (i, a) in affinities.iter().enumerate() {
            let path = format!("x-flotilla.placement.affinities[{i}]");
            if a.weight == 0 || a.weight.abs() > MAX_AFFINITY_WEIGHT {
                self.fail(
                    &format!("{path}.weight"),
                    format!(
                        "{} must be non-zero and within ±{MAX_AFFINITY_WEIGHT} (positive attracts, negative repels)",
                        a.weight
                    ),
                );
                continue;
            }
            match ValueMatcher::parse(a.service.trim()) {
                Ok(m) => {
                    let attract = a.weight > 0;
                    let op = if attract { "==" } else { "!=" };
                    let soft = if a.hard { "" } else { "~" };
                    self.out.affinities.push(Affinity {
                        target: AffinityTarget::Service(m),
                        attract,
                        hard: a.hard,
                        weight: a.weight.unsigned_abs(),
                        expr: format!("affinity:service{op}{soft}{}", a.service.trim()),
                    });
                }
                Err(reason) => self.fail(&format!("{path}.service"), reason),
            }
        }
    }
}
