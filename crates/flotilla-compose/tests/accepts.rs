//! Good inputs: what each supported Compose key turns into.

use flotilla_compose::{load, parse_str};
use flotilla_types::{
    DependencyCondition, DriverKind, HealthCheck, HealthTest, PlacementSpec, PortMode,
    PortProtocol, PortSpec, ResourceAmounts, Resources, RestartCondition, RestartPolicy,
    ServiceMode, ServiceSpec,
};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

const FULL: &str = r#"
name: shop
version: "3.9"
x-common: &common
  FROM_ANCHOR: yes-really
services:
  db:
    image: postgres:16
    healthcheck:
      test: ["CMD-SHELL", "pg_isready -U postgres"]
      interval: 5s
      timeout: 2s
      retries: 5
      start_period: 1m30s
      start_interval: 2s
    deploy:
      mode: global
  web:
    image: nginx:1.27
    command: nginx -g 'daemon off;'
    entrypoint: ["/docker-entrypoint.sh"]
    environment:
      <<: *common
      FROM_BOTH: environment
      NUMBER: 42
      FLAG: true
    env_file:
      - web.env
      - path: optional.env
        required: false
    working_dir: /srv
    user: "1000:1000"
    labels:
      - com.example.tier=front
      - com.example.empty
    ports:
      - "8080:80"
      - "127.0.0.1:9090:9090/udp"
      - 81
      - target: 443
        published: "8443"
        protocol: tcp
        mode: ingress
    depends_on:
      db:
        condition: service_healthy
    stop_grace_period: 1m
    stop_signal: SIGQUIT
    restart: always
    deploy:
      replicas: 4
      labels:
        owner: team-a
      resources:
        limits:
          cpus: "1.5"
          memory: 512m
          pids: 100
        reservations:
          cpus: 0.25
          memory: 128M
      restart_policy:
        condition: on-failure
        delay: 500ms
        max_attempts: 3
        window: 2m
      placement:
        constraints: ["node.labels.zone==a"]
        max_replicas_per_node: 2
        preferences:
          - spread: node.labels.rack
    x-flotilla:
      driver: docker
"#;

#[test]
fn full_example_maps_every_supported_key() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("web.env"),
        "# defaults\nFROM_FILE=file\nFROM_BOTH=file\n",
    )
    .unwrap();
    let file = parse_str(FULL, "compose.yaml", dir.path()).unwrap();
    assert_eq!(file.project.as_deref(), Some("shop"));
    let names: Vec<&str> = file.services.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["db", "web"], "document order is kept");

    let db = &file.services[0];
    assert_eq!(db.driver, DriverKind::Docker);
    assert_eq!(db.mode, ServiceMode::Global);
    assert_eq!(
        db.healthcheck,
        Some(HealthCheck {
            test: HealthTest::Shell {
                script: "pg_isready -U postgres".into()
            },
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(2),
            retries: 5,
            start_period: Duration::from_secs(90),
            start_interval: Duration::from_secs(2),
        })
    );

    let want = ServiceSpec {
        name: "web".into(),
        driver: DriverKind::Docker,
        image: Some("nginx:1.27".into()),
        command: Some(strings(&["nginx", "-g", "daemon off;"])),
        entrypoint: Some(strings(&["/docker-entrypoint.sh"])),
        environment: map(&[
            ("FROM_ANCHOR", "yes-really"),
            ("FROM_BOTH", "environment"),
            ("FROM_FILE", "file"),
            ("NUMBER", "42"),
            ("FLAG", "true"),
        ]),
        working_dir: Some("/srv".into()),
        user: Some("1000:1000".into()),
        labels: map(&[("com.example.tier", "front"), ("com.example.empty", "")]),
        ports: vec![
            PortSpec {
                target: 80,
                published: Some(8080),
                protocol: PortProtocol::Tcp,
                mode: Default::default(),
            },
            PortSpec {
                target: 9090,
                published: Some(9090),
                protocol: PortProtocol::Udp,
                mode: Default::default(),
            },
            PortSpec {
                target: 81,
                published: None,
                protocol: PortProtocol::Tcp,
                mode: Default::default(),
            },
            PortSpec {
                target: 443,
                published: Some(8443),
                protocol: PortProtocol::Tcp,
                mode: Default::default(),
            },
        ],
        healthcheck: None,
        depends_on: [("db".to_string(), DependencyCondition::ServiceHealthy)].into(),
        mode: ServiceMode::Replicated { replicas: 4 },
        resources: Resources {
            limits: ResourceAmounts {
                cpu_millis: Some(1500),
                memory_bytes: Some(512 << 20),
                pids: Some(100),
            },
            reservations: ResourceAmounts {
                cpu_millis: Some(250),
                memory_bytes: Some(128 << 20),
                pids: None,
            },
        },
        restart_policy: RestartPolicy {
            condition: RestartCondition::OnFailure,
            delay: Duration::from_millis(500),
            max_attempts: Some(3),
            window: Some(Duration::from_secs(120)),
        },
        deploy_labels: map(&[("owner", "team-a")]),
        placement: PlacementSpec {
            constraints: strings(&["node.labels.zone==a"]),
            max_replicas_per_node: Some(2),
            preferences: strings(&["spread=node.labels.rack"]),
            ..PlacementSpec::default()
        },
        stop_grace_period: Duration::from_secs(60),
        stop_signal: Some("SIGQUIT".into()),
        container: Default::default(),
        mesh: Default::default(),
        rollout: Default::default(),
    };
    assert_eq!(file.services[1], want);

    let warned: Vec<&str> = file.warnings.iter().map(|w| w.field.as_str()).collect();
    assert_eq!(
        warned,
        ["version", "services.web.ports[1]", "services.web.restart"],
        "{:?}",
        file.warnings
    );
}

#[test]
fn host_mode_ports_are_read_without_a_warning() {
    let file = parse_str(
        "services:\n  web:\n    command: x\n    ports:\n      - {target: 80, published: 8080, mode: host}\n      - {target: 81, published: 8081, mode: ingress}\n      - {target: 82, published: 8082}\n",
        "c.yaml",
        Path::new("."),
    )
    .unwrap();
    assert!(file.warnings.is_empty(), "{:?}", file.warnings);
    let modes: Vec<(u16, PortMode)> = file.services[0]
        .ports
        .iter()
        .map(|p| (p.target, p.mode))
        .collect();
    assert_eq!(
        modes,
        [
            (80, PortMode::Host),
            (81, PortMode::Ingress),
            (82, PortMode::Ingress)
        ]
    );
    assert_eq!(
        file.services[0].ports[0].host_port(),
        Some((8080, PortProtocol::Tcp))
    );
    assert_eq!(file.services[0].ports[1].host_port(), None);
}

#[test]
fn defaults_for_a_minimal_process_service() {
    let file = parse_str(
        "services:\n  worker:\n    command: [\"sleep\", \"60\"]\n",
        "c.yaml",
        Path::new("."),
    )
    .unwrap();
    assert_eq!(
        file.services,
        [ServiceSpec::process("worker", strings(&["sleep", "60"]))]
    );
    assert!(file.warnings.is_empty());
    assert_eq!(file.project, None);
}

#[test]
fn unsupported_keys_become_warnings() {
    let yaml = r#"
networks: {front: {}}
volumes: {data: {}}
x-anchors: {a: 1}
services:
  web:
    command: x
    networks: [front]
    volumes: ["data:/data"]
    cap_add: [NET_ADMIN]
    build: .
    x-custom: 1
    deploy:
      update_config: {parallelism: 1}
      placement:
        platforms: [linux/amd64]
    x-flotilla:
      strategy: canary
      routes: []
      colour: blue
"#;
    let file = parse_str(yaml, "c.yaml", Path::new(".")).unwrap();
    let warned: Vec<(&str, &str)> = file
        .warnings
        .iter()
        .map(|w| (w.field.as_str(), w.message.as_str()))
        .collect();
    assert_eq!(
        warned,
        [
            ("networks", "not supported yet; ignored"),
            ("volumes", "not supported yet; ignored"),
            ("services.web.networks", "not supported yet; ignored"),
            ("services.web.build", "not supported yet; ignored"),
            ("services.web.x-custom", "unknown extension; ignored"),
            (
                "services.web.deploy.placement.platforms",
                "not supported yet; ignored"
            ),
            (
                "services.web.x-flotilla.colour",
                "unknown x-flotilla key; ignored"
            ),
        ]
    );
}

#[test]
fn healthcheck_variants() {
    let parse = |hc: &str| {
        let yaml = format!("services:\n  web:\n    command: x\n    ports: [\"80\"]\n{hc}");
        parse_str(&yaml, "c.yaml", Path::new("."))
            .unwrap()
            .services
            .remove(0)
            .healthcheck
    };
    assert_eq!(
        parse("    healthcheck:\n      test: curl -f localhost\n"),
        Some(HealthCheck::with_defaults(HealthTest::Shell {
            script: "curl -f localhost".into()
        }))
    );
    assert_eq!(
        parse("    healthcheck:\n      test: [\"CMD\", \"curl\", \"-f\", \"localhost\"]\n"),
        Some(HealthCheck::with_defaults(HealthTest::Cmd {
            argv: strings(&["curl", "-f", "localhost"])
        }))
    );
    assert_eq!(parse("    healthcheck:\n      test: [\"NONE\"]\n"), None);
    assert_eq!(
        parse("    healthcheck:\n      test: [\"CMD\", \"true\"]\n      disable: true\n"),
        None
    );
    let tcp = parse("    x-flotilla:\n      healthcheck:\n        tcp: true\n        interval: 2s\n        retries: 7\n")
        .unwrap();
    assert_eq!(tcp.test, HealthTest::Tcp);
    assert_eq!(tcp.interval, Duration::from_secs(2));
    assert_eq!(tcp.timeout, Duration::from_secs(30));
    assert_eq!(tcp.retries, 7);
}

#[test]
fn restart_shorthand_and_environment_from_process() {
    let yaml = "services:\n  a:\n    command: x\n    restart: on-failure:4\n    environment: [PATH, FLOTILLA_TEST_SURELY_UNSET, \"EMPTY=\"]\n  b:\n    command: x\n    restart: \"no\"\n";
    let file = parse_str(yaml, "c.yaml", Path::new(".")).unwrap();
    let a = &file.services[0];
    assert_eq!(a.restart_policy.condition, RestartCondition::OnFailure);
    assert_eq!(a.restart_policy.max_attempts, Some(4));
    assert_eq!(a.restart_policy.delay, RestartPolicy::default().delay);
    assert_eq!(
        a.environment.get("PATH"),
        std::env::var("PATH").ok().as_ref()
    );
    assert_eq!(a.environment.get("EMPTY").map(String::as_str), Some(""));
    assert!(!a.environment.contains_key("FLOTILLA_TEST_SURELY_UNSET"));
    assert!(file
        .warnings
        .iter()
        .any(|w| w.field == "services.a.environment[1]" && w.message.contains("not set")));
    assert_eq!(
        file.services[1].restart_policy.condition,
        RestartCondition::None
    );
}

#[test]
fn demo_example_loads() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/demo/compose.yaml");
    let file = load(&path).unwrap();
    assert_eq!(file.project.as_deref(), Some("demo"));
    assert!(file.warnings.is_empty(), "{:?}", file.warnings);
    let demo = &file.services[0];
    assert_eq!(demo.name, "demo");
    assert_eq!(demo.driver, DriverKind::Process);
    assert_eq!(
        demo.command,
        Some(strings(&["flotilla", "demo-app", "--version", "v1"]))
    );
    assert_eq!(demo.mode, ServiceMode::Replicated { replicas: 3 });
    assert_eq!(
        demo.ports,
        [PortSpec {
            target: 8080,
            published: Some(8080),
            protocol: PortProtocol::Tcp,
            mode: Default::default(),
        }]
    );
    assert_eq!(
        demo.healthcheck,
        Some(HealthCheck {
            test: HealthTest::Http {
                path: "/health".into()
            },
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            retries: 3,
            start_period: Duration::ZERO,
            start_interval: Duration::from_secs(5),
        })
    );
    assert_eq!(demo.resources.limits.memory_bytes, Some(64 << 20));
    assert_eq!(
        demo.restart_policy,
        RestartPolicy {
            condition: RestartCondition::Any,
            delay: Duration::from_secs(1),
            max_attempts: None,
            window: None,
        }
    );
}

/// Issue 4's spelling, `x-flotilla.priority`, sets the same field as the placement key.
#[test]
fn flotilla_priority_sets_the_placement_priority() {
    let yaml = "services:\n  web:\n    command: [\"sleep\", \"100\"]\n    x-flotilla:\n      priority: 900\n";
    let file =
        flotilla_compose::parse_str(yaml, "p.yaml", std::path::Path::new(".")).expect("valid");
    assert_eq!(file.services[0].placement.priority, 900);
    assert!(file.warnings.is_empty(), "{:?}", file.warnings);
}

#[test]
fn flotilla_placement_is_merged_into_the_placement_spec() {
    let yaml = r#"
services:
  web:
    command: ["sleep", "100"]
    deploy:
      replicas: 4
      placement:
        constraints: ["node.labels.zone!=c"]
        max_replicas_per_node: 2
    x-flotilla:
      placement:
        max_per_node: 1
        strategy: binpack
        priority: 700
        spread: [{label: zone, hard: true, max_skew: 1}]
        affinities: [{service: cache, weight: 50}, {service: batch, weight: -100, hard: true}]
"#;
    let file =
        flotilla_compose::parse_str(yaml, "p.yaml", std::path::Path::new(".")).expect("valid");
    let p = &file.services[0].placement;
    assert_eq!(p.constraints, vec!["node.labels.zone!=c".to_string()]);
    assert_eq!(p.max_replicas_per_node, Some(2));
    assert_eq!(p.max_per_node, Some(1));
    assert_eq!(p.strategy, flotilla_types::PlacementStrategy::Binpack);
    assert_eq!(p.priority, 700);
    assert_eq!(p.spread.len(), 1);
    assert!(p.spread[0].hard);
    assert_eq!(p.affinities.len(), 2);
    assert_eq!(p.affinities[1].weight, -100);
    assert!(
        file.warnings.iter().all(|w| !w.field.contains("placement")),
        "{:?}",
        file.warnings
    );
}

#[test]
fn disruption_budget_count_percent_and_default() {
    use flotilla_types::{DisruptionBudget, MaxUnavailable};
    let parse = |ext: &str| {
        let yaml = format!("services:\n  web:\n    command: x\n{ext}");
        let file = parse_str(&yaml, "c.yaml", Path::new(".")).unwrap();
        assert!(file.warnings.is_empty(), "{:?}", file.warnings);
        file.services[0].rollout.disruption
    };
    assert_eq!(parse(""), DisruptionBudget::default());
    assert_eq!(
        parse("    x-flotilla:\n      disruption:\n        max_unavailable: 2\n").max_unavailable,
        Some(MaxUnavailable::Count(2))
    );
    assert_eq!(
        parse("    x-flotilla:\n      disruption:\n        max_unavailable: \"50%\"\n")
            .max_unavailable,
        Some(MaxUnavailable::Percent(50))
    );
}

#[test]
fn container_keys_are_parsed() {
    use flotilla_types::container::{
        GpuCount, GpuRequest, PullPolicy, Ulimit, VolumeKind, VolumeMount,
    };
    let yaml = r#"
services:
  app:
    image: flotilla-demo:latest
    cap_add: [NET_ADMIN, CAP_SYS_PTRACE]
    cap_drop: [ALL]
    ulimits:
      nproc: 512
      nofile: {soft: 1024, hard: 2048}
    read_only: true
    init: true
    tmpfs: /run:size=64m
    pull_policy: never
    volumes:
      - data:/var/lib/data
      - ./conf:/etc/app:ro
      - /cache
      - type: bind
        source: /srv/static
        target: /static
        read_only: true
    deploy:
      resources:
        reservations:
          devices:
            - capabilities: [gpu]
              count: all
            - capabilities: [gpu, utility]
              driver: nvidia
              device_ids: ["0", "1"]
    x-flotilla:
      runtime: runsc
"#;
    let file = parse_str(yaml, "c.yaml", Path::new("/stack")).unwrap();
    assert!(file.warnings.is_empty(), "{:?}", file.warnings);
    let c = &file.services[0].container;
    assert_eq!(c.cap_add, strings(&["NET_ADMIN", "CAP_SYS_PTRACE"]));
    assert_eq!(c.cap_drop, strings(&["ALL"]));
    assert_eq!(
        c.ulimits["nproc"],
        Ulimit {
            soft: 512,
            hard: 512
        }
    );
    assert_eq!(
        c.ulimits["nofile"],
        Ulimit {
            soft: 1024,
            hard: 2048
        }
    );
    assert!(c.read_only);
    assert_eq!(c.init, Some(true));
    assert_eq!(c.tmpfs, strings(&["/run:size=64m"]));
    assert_eq!(c.pull_policy, PullPolicy::Never);
    assert_eq!(c.runtime.as_deref(), Some("runsc"));
    assert_eq!(
        c.volumes,
        [
            VolumeMount {
                kind: VolumeKind::Volume,
                source: Some("data".into()),
                target: "/var/lib/data".into(),
                read_only: false
            },
            VolumeMount {
                kind: VolumeKind::Bind,
                source: Some("/stack/conf".into()),
                target: "/etc/app".into(),
                read_only: true
            },
            VolumeMount {
                kind: VolumeKind::Volume,
                source: None,
                target: "/cache".into(),
                read_only: false
            },
            VolumeMount {
                kind: VolumeKind::Bind,
                source: Some("/srv/static".into()),
                target: "/static".into(),
                read_only: true
            },
        ]
    );
    assert_eq!(
        c.gpus,
        [
            GpuRequest {
                driver: None,
                count: Some(GpuCount::All),
                device_ids: vec![],
                capabilities: strings(&["gpu"])
            },
            GpuRequest {
                driver: Some("nvidia".into()),
                count: None,
                device_ids: strings(&["0", "1"]),
                capabilities: strings(&["gpu", "utility"])
            },
        ]
    );
}
