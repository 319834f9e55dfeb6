//! Bad inputs: each must be rejected with an error naming the right field and reason.

use flotilla_compose::{parse_str, ComposeError};
use std::path::Path;

/// Wraps a service body (already indented for `services.web`) into a file.
fn web(body: &str) -> String {
    format!("services:\n  web:\n{body}")
}

const PROCESS: &str = "    command: [\"sleep\", \"100\"]\n";

fn with_process(extra: &str) -> String {
    web(&format!("{PROCESS}{extra}"))
}

/// (name, yaml, expected field, substring of the reason)
fn cases() -> Vec<(&'static str, String, &'static str, &'static str)> {
    vec![
        ("replicas as string", with_process("    deploy:\n      replicas: \"three\"\n"), "services.web.deploy.replicas", "expected a non-negative integer, got a string"),
        ("negative replicas", with_process("    deploy:\n      replicas: -1\n"), "services.web.deploy.replicas", "must be >= 0, got -1"),
        ("float replicas", with_process("    deploy:\n      replicas: 1.5\n"), "services.web.deploy.replicas", "whole number"),
        ("environment is a number", with_process("    environment: 5\n"), "services.web.environment", "got a number"),
        ("ports is a mapping", with_process("    ports: {}\n"), "services.web.ports", "expected a list of ports, got a mapping"),
        ("unknown driver", with_process("    x-flotilla:\n      driver: qemu\n"), "services.web.x-flotilla.driver", "unknown driver \"qemu\""),
        ("memory lots", with_process("    deploy:\n      resources:\n        limits:\n          memory: lots\n"), "services.web.deploy.resources.limits.memory", "\"lots\" is not a byte size"),
        ("cpus many", with_process("    deploy:\n      resources:\n        reservations:\n          cpus: many\n"), "services.web.deploy.resources.reservations.cpus", "\"many\" is not a cpu count"),
        ("port 70000", with_process("    ports: [\"70000:80\"]\n"), "services.web.ports[0]", "port 70000 is out of range"),
        ("port abc", with_process("    ports: [\"abc\"]\n"), "services.web.ports[0]", "\"abc\" is not a port number"),
        ("long port out of range", with_process("    ports:\n      - target: 70000\n"), "services.web.ports[0].target", "out of range"),
        ("port range", with_process("    ports: [\"8000-8010:80\"]\n"), "services.web.ports[0]", "ranges are not supported"),
        ("host port without published", with_process("    ports:\n      - {target: 80, mode: host}\n"), "services.web.ports[0].published", "required with mode: host"),
        ("port bad mode", with_process("    ports:\n      - {target: 80, published: 8080, mode: bridge}\n"), "services.web.ports[0].mode", "not a port mode"),
        ("port bad protocol", with_process("    ports: [\"80/sctp\"]\n"), "services.web.ports[0]", "not a protocol"),
        ("depends_on cycle", "services:\n  a:\n    command: x\n    depends_on: [b]\n  b:\n    command: x\n    depends_on: [a]\n".to_string(), "services.a.depends_on", "dependency cycle"),
        ("depends_on unknown", with_process("    depends_on: [db]\n"), "services.web.depends_on.db", "not defined"),
        ("self dependency", with_process("    depends_on: [web]\n"), "services.web.depends_on.web", "cannot depend on itself"),
        ("depends_on completed", "services:\n  a:\n    command: x\n  web:\n    command: x\n    depends_on:\n      a:\n        condition: service_completed_successfully\n".to_string(), "services.web.depends_on.a.condition", "not supported"),
        ("unknown top-level key", format!("{}bogus: 1\n", with_process("")), "bogus", "unknown key"),
        ("unknown service key", with_process("    imagee: nginx\n"), "services.web.imagee", "unknown key"),
        ("duplicate target ports", with_process("    ports: [\"8080:80\", \"8081:80\"]\n"), "services.web.ports[1].target", "listed twice"),
        ("bad duration", with_process("    stop_grace_period: 10 parsecs\n"), "services.web.stop_grace_period", "\"10 parsecs\" is not a duration"),
        ("placement strategy", with_process("    x-flotilla:\n      placement:\n        strategy: random\n"), "services.web.x-flotilla.placement.strategy", "unknown strategy"),
        ("placement priority", with_process("    x-flotilla:\n      placement:\n        priority: 5000\n"), "services.web.x-flotilla.placement.priority", "outside 0..=1000"),
        ("priority", with_process("    x-flotilla:\n      priority: 1001\n"), "services.web.x-flotilla.priority", "outside 0..=1000"),
        ("two priorities", with_process("    x-flotilla:\n      priority: 5\n      placement:\n        priority: 6\n"), "services.web.x-flotilla.priority", "contradicts"),
        ("spread without label", with_process("    x-flotilla:\n      placement:\n        spread: [{hard: true}]\n"), "services.web.x-flotilla.placement.spread[0]", "needs a label"),
        ("affinity weight", with_process("    x-flotilla:\n      placement:\n        affinities: [{service: db, weight: 500}]\n"), "services.web.x-flotilla.placement.affinities[0].weight", "outside -100..=100"),
        ("bad constraint", with_process("    deploy:\n      placement:\n        constraints: [\"node.labels.zone=>a\"]\n"), "services.web.deploy.placement.constraints[0]", ""),
        ("negative duration", with_process("    healthcheck:\n      test: [\"CMD\", \"true\"]\n      interval: -5s\n"), "services.web.healthcheck.interval", "negative"),
        ("healthcheck test FOO", with_process("    healthcheck:\n      test: [\"FOO\"]\n"), "services.web.healthcheck.test[0]", "\"FOO\" is not a test kind"),
        ("healthcheck without test", with_process("    healthcheck:\n      interval: 5s\n"), "services.web.healthcheck.test", "is required"),
        ("http healthcheck without ports", with_process("    x-flotilla:\n      healthcheck:\n        http: /health\n"), "services.web.x-flotilla.healthcheck", "need at least one entry in ports"),
        ("http healthcheck no slash", with_process("    ports: [\"80\"]\n    x-flotilla:\n      healthcheck:\n        http: no-slash\n"), "services.web.x-flotilla.healthcheck.http", "must be an absolute path"),
        ("both healthchecks", with_process("    ports: [\"80\"]\n    healthcheck:\n      test: [\"CMD\", \"true\"]\n    x-flotilla:\n      healthcheck:\n        tcp: true\n"), "services.web.x-flotilla.healthcheck", "conflicts with services.web.healthcheck"),
        ("x-flotilla healthcheck without kind", with_process("    x-flotilla:\n      healthcheck:\n        interval: 1s\n"), "services.web.x-flotilla.healthcheck", "needs `http: /path` or `tcp: true`"),
        ("bad service name", "services:\n  Web!:\n    command: x\n".to_string(), "services.Web!", "lowercase letters"),
        ("deploy mode sometimes", with_process("    deploy:\n      mode: sometimes\n"), "services.web.deploy.mode", "\"sometimes\" is not a deploy mode"),
        ("global with replicas", with_process("    deploy:\n      mode: global\n      replicas: 2\n"), "services.web.deploy.replicas", "global"),
        ("restart condition sometimes", with_process("    deploy:\n      restart_policy:\n        condition: sometimes\n"), "services.web.deploy.restart_policy.condition", "not a restart condition"),
        ("restart shorthand bad", with_process("    restart: sometimes\n"), "services.web.restart", "not a restart policy"),
        ("env_file missing", with_process("    env_file: ./definitely-missing.env\n"), "services.web.env_file", "cannot read"),
        ("memory reservation above limit", with_process("    deploy:\n      resources:\n        limits:\n          memory: 64m\n        reservations:\n          memory: 128m\n"), "services.web.deploy.resources.reservations.memory", "larger than the limit"),
        ("empty services", "services: {}\n".to_string(), "services", "is empty"),
        ("missing services", "name: demo\n".to_string(), "services", "is required"),
        ("document is a list", "- a\n- b\n".to_string(), "(top level)", "got a list"),
        ("empty document", "# nothing here\n".to_string(), "(top level)", "empty"),
        ("service is a string", "services:\n  web: nginx\n".to_string(), "services.web", "expected a mapping, got a string"),
        ("process without command", web("    x-flotilla:\n      driver: process\n"), "services.web.command", "needs a command"),
        ("docker without image", web("    command: x\n    x-flotilla:\n      driver: docker\n"), "services.web.image", "needs an image"),
        ("command unterminated quote", web("    command: echo 'oops\n"), "services.web.command", "unterminated single quote"),
        ("command list of numbers", web("    command: [sleep, [1]]\n"), "services.web.command[1]", "expected a string, got a list"),
        ("labels is a string", with_process("    labels: nope\n"), "services.web.labels", "expected a mapping or a list"),
        ("retries negative", with_process("    healthcheck:\n      test: [\"CMD\", \"true\"]\n      retries: -2\n"), "services.web.healthcheck.retries", "must be >= 0, got -2"),
        ("healthcheck test boolean", with_process("    healthcheck:\n      test: true\n"), "services.web.healthcheck.test", "expected a string or a list of strings, got a boolean"),
        ("bad stop signal", with_process("    stop_signal: SIGBOGUS\n"), "services.web.stop_signal", "not a known signal"),
        ("max_attempts zero", with_process("    deploy:\n      restart_policy:\n        max_attempts: 0\n"), "services.web.deploy.restart_policy.max_attempts", "ambiguous"),
        ("project name invalid", format!("name: My Project\n{}", with_process("")), "name", "lowercase letters"),
        ("placement constraints not a list", with_process("    deploy:\n      placement:\n        constraints: node.role==manager\n"), "services.web.deploy.placement.constraints", "expected a list of strings"),
        ("unknown resources key", with_process("    deploy:\n      resources:\n        limit:\n          memory: 1g\n"), "services.web.deploy.resources.limit", "unknown key"),
        ("long port unknown key", with_process("    ports:\n      - target: 80\n        publish: 8080\n"), "services.web.ports[0].publish", "unknown key"),
        ("depends_on bad condition", "services:\n  a:\n    command: x\n  web:\n    command: x\n    depends_on:\n      a:\n        condition: whenever\n".to_string(), "services.web.depends_on.a.condition", "not a condition"),
        ("preference not a node label", with_process("    deploy:\n      placement:\n        preferences:\n          - spread: zone\n"), "services.web.deploy.placement.preferences[0].spread", "must name a node label"),
        ("disruption zero", with_process("    x-flotilla:\n      disruption:\n        max_unavailable: 0\n"), "services.web.x-flotilla.disruption.max_unavailable", "must be at least 1, got 0"),
        ("disruption percent too big", with_process("    x-flotilla:\n      disruption:\n        max_unavailable: 150%\n"), "services.web.x-flotilla.disruption.max_unavailable", "not a percentage in 1%..=100%"),
        ("disruption words", with_process("    x-flotilla:\n      disruption:\n        max_unavailable: some\n"), "services.web.x-flotilla.disruption.max_unavailable", "percentage like \"25%\", got \"some\""),
        ("disruption list", with_process("    x-flotilla:\n      disruption:\n        max_unavailable: [1]\n"), "services.web.x-flotilla.disruption.max_unavailable", "got a list"),
        ("disruption unknown key", with_process("    x-flotilla:\n      disruption:\n        min_available: 1\n"), "services.web.x-flotilla.disruption.min_available", "unknown key"),
        ("unknown capability", with_process("    cap_add: [NET_ADMIN, NET_MAGIC]\n"), "services.web.cap_add[1]", "\"NET_MAGIC\" is not a Linux capability"),
        ("unknown ulimit", with_process("    ulimits:\n      filez: 10\n"), "services.web.ulimits.filez", "is not a ulimit"),
        ("ulimit soft above hard", with_process("    ulimits:\n      nofile: {soft: 20, hard: 10}\n"), "services.web.ulimits.nofile", "soft limit 20 is larger than hard limit 10"),
        ("ulimit missing hard", with_process("    ulimits:\n      nofile: {soft: 20}\n"), "services.web.ulimits.nofile.hard", "is required"),
        ("volume bad mode", with_process("    volumes: [\"data:/data:rx\"]\n"), "services.web.volumes[0]", "not a mount mode"),
        ("volume relative target", with_process("    volumes: [\"data:data\"]\n"), "services.web.volumes[0].target", "must be an absolute path"),
        ("volume long without target", with_process("    volumes:\n      - type: volume\n        source: data\n"), "services.web.volumes[0].target", "is required"),
        ("bind with volume name", with_process("    volumes:\n      - type: bind\n        source: data\n        target: /d\n"), "services.web.volumes[0].source", "is not a host path"),
        ("tmpfs relative", with_process("    tmpfs: [run]\n"), "services.web.tmpfs[0]", "must be an absolute path"),
        ("pull policy unknown", with_process("    pull_policy: sometimes\n"), "services.web.pull_policy", "not a pull policy"),
        ("gpu without capability", with_process("    deploy:\n      resources:\n        reservations:\n          devices:\n            - count: 1\n"), "services.web.deploy.resources.reservations.devices[0].capabilities", "only GPU devices"),
        ("gpu count and ids", with_process("    deploy:\n      resources:\n        reservations:\n          devices:\n            - capabilities: [gpu]\n              count: 1\n              device_ids: [\"0\"]\n"), "services.web.deploy.resources.reservations.devices[0]", "mutually exclusive"),
        ("devices as a limit", with_process("    deploy:\n      resources:\n        limits:\n          devices: []\n"), "services.web.deploy.resources.limits.devices", "can only be reserved"),
        ("runtime bad name", with_process("    x-flotilla:\n      runtime: \"run sc\"\n"), "services.web.x-flotilla.runtime", "not a runtime name"),
        ("memory too small", with_process("    deploy:\n      resources:\n        limits:\n          memory: 1k\n"), "services.web.deploy.resources.limits.memory", "below the 4MiB minimum"),
    ]
}

#[test]
fn every_bad_input_names_its_field_and_reason() {
    let mut failures = Vec::new();
    let cases = cases();
    assert!(cases.len() >= 25);
    for (name, yaml, field, reason) in &cases {
        match parse_str(yaml, "compose.yaml", Path::new(".")) {
            Err(ComposeError::Invalid { file, errors }) => {
                assert_eq!(file, "compose.yaml");
                if !errors
                    .iter()
                    .any(|e| e.field == *field && e.reason.contains(reason))
                {
                    failures.push(format!(
                        "{name}: wanted {field}: …{reason}…, got {errors:?}"
                    ));
                }
            }
            other => failures.push(format!("{name}: wanted Invalid, got {other:?}")),
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

#[test]
fn all_errors_are_collected_not_just_the_first() {
    let yaml = with_process(
        "    deploy:\n      replicas: -1\n      resources:\n        limits:\n          memory: lots\n    ports: [\"70000\"]\n    depends_on: [ghost]\n",
    );
    let Err(ComposeError::Invalid { errors, .. }) = parse_str(&yaml, "c.yaml", Path::new("."))
    else {
        panic!("expected Invalid");
    };
    let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
    for want in [
        "services.web.deploy.replicas",
        "services.web.deploy.resources.limits.memory",
        "services.web.ports[0]",
        "services.web.depends_on.ghost",
    ] {
        assert!(fields.contains(&want), "{want} missing from {fields:?}");
    }
}

#[test]
fn invalid_display_lists_every_error_with_the_file() {
    let yaml = with_process("    deploy:\n      replicas: -1\n    stop_grace_period: soon\n");
    let err = parse_str(&yaml, "stack.yaml", Path::new(".")).unwrap_err();
    let text = err.to_string();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(
        lines.contains(&"stack.yaml: services.web.deploy.replicas: must be >= 0, got -1"),
        "{text}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("stack.yaml: services.web.stop_grace_period: ")),
        "{text}"
    );
}

#[test]
fn yaml_syntax_error_reports_line() {
    let yaml = "services:\n  web:\n    command: [a, b\n    image: x\n";
    match parse_str(yaml, "broken.yaml", Path::new(".")) {
        Err(ComposeError::Syntax {
            file,
            line,
            message,
            ..
        }) => {
            assert_eq!(file, "broken.yaml");
            let line = line.expect("syntax errors carry a line");
            assert!((3..=5).contains(&line), "line {line}: {message}");
            assert!(!message.is_empty());
        }
        other => panic!("expected Syntax, got {other:?}"),
    }
}

#[test]
fn duplicate_keys_are_a_syntax_error() {
    let yaml = "services:\n  web:\n    command: x\n    command: y\n";
    let err = parse_str(yaml, "dup.yaml", Path::new(".")).unwrap_err();
    assert!(
        matches!(err, ComposeError::Syntax { line: Some(4), .. }),
        "{err:?}"
    );
}

#[test]
fn missing_file_is_an_io_error_naming_the_path() {
    let err = flotilla_compose::load(Path::new("/nonexistent/dir/compose.yaml")).unwrap_err();
    assert!(matches!(err, ComposeError::Io { .. }));
    assert!(
        err.to_string().contains("/nonexistent/dir/compose.yaml"),
        "{err}"
    );
}

#[test]
fn malformed_env_file_names_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("app.env"), "OK=1\nBAD KEY=2\n").unwrap();
    let yaml = with_process("    env_file: [app.env]\n");
    let Err(ComposeError::Invalid { errors, .. }) = parse_str(&yaml, "c.yaml", dir.path()) else {
        panic!("expected Invalid");
    };
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0].field, "services.web.env_file[0]");
    assert!(errors[0].reason.contains("app.env: line 2"), "{errors:?}");
}

/// A tiny deterministic LCG so the mutations are reproducible without extra dependencies.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        self.0 >> 33
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

#[test]
fn random_mutations_never_panic() {
    let original = include_str!("../../../examples/demo/compose.yaml")
        .as_bytes()
        .to_vec();
    let alphabet = b" :-[]{}\"'#\n\t0123456789abcxyz&*!|>%@`,.";
    let mut rng = Lcg(0x5eed);
    for round in 0..200 {
        let mut bytes = original.clone();
        for _ in 0..=rng.below(4) {
            match rng.below(4) {
                0 => {
                    let at = rng.below(bytes.len());
                    bytes[at] = alphabet[rng.below(alphabet.len())];
                }
                1 => {
                    let at = rng.below(bytes.len());
                    bytes.truncate(at);
                }
                2 => {
                    let at = rng.below(bytes.len() + 1);
                    bytes.insert(at, alphabet[rng.below(alphabet.len())]);
                }
                _ => {
                    if !bytes.is_empty() {
                        let at = rng.below(bytes.len());
                        bytes.remove(at);
                    }
                }
            }
            if bytes.is_empty() {
                break;
            }
        }
        let text = String::from_utf8_lossy(&bytes);
        let outcome = std::panic::catch_unwind(|| parse_str(&text, "fuzz.yaml", Path::new(".")));
        assert!(outcome.is_ok(), "round {round} panicked on:\n{text}");
    }
}
