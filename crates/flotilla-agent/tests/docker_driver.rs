//! The docker driver against the real local Docker Engine, with a busybox image built by
//! [`flotilla_agent::docker_image`]. Skipped (visibly) without an engine, unless
//! `FLOTILLA_REQUIRE_DOCKER=1` makes that a failure.
// Test helpers outside #[test] fns: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use bollard::models::{ContainerConfig, ContainerCreateBody, HealthConfig, NetworkCreateRequest};
use bollard::query_parameters::{
    CommitContainerOptionsBuilder, KillContainerOptionsBuilder, ListContainersOptionsBuilder,
    ListNetworksOptionsBuilder, RemoveContainerOptionsBuilder,
};
use flotilla_agent::docker::{
    DockerDriver, LABEL_NODE, LABEL_OWNER, LABEL_SERVICE, LABEL_SLOT, LABEL_TASK,
};
use flotilla_agent::docker_image::{build_image, ImageRecipe};
use flotilla_agent::driver::{Driver, DriverError};
use flotilla_types::container::PullPolicy;
use flotilla_types::{
    DriverKind, Health, PortBinding, PortSpec, ServiceSpec, Task, TaskState, TaskStatus,
};
use futures::StreamExt;
use std::collections::HashMap;
use std::time::Duration;
use tokio::sync::OnceCell;

const IMAGE: &str = "flotilla-test-busybox:latest";
const NODE: &str = "docker-driver-test";

static IMAGE_BUILT: OnceCell<()> = OnceCell::const_new();

/// The driver, or `None` (after saying so) when the node has no engine.
async fn driver() -> Option<DockerDriver> {
    match DockerDriver::detect(NODE, NODE).await {
        Ok(Some(d)) => {
            IMAGE_BUILT
                .get_or_init(|| async {
                    let recipe = ImageRecipe {
                        tag: IMAGE.into(),
                        flotilla: None,
                        entrypoint: Vec::new(),
                        cmd: vec!["sh".into()],
                    };
                    build_image(d.client(), &recipe).await.unwrap();
                })
                .await;
            Some(d)
        }
        other => {
            let why = match other {
                Err(e) => e.to_string(),
                _ => "nothing answers at DOCKER_HOST or /var/run/docker.sock".into(),
            };
            assert!(
                std::env::var("FLOTILLA_REQUIRE_DOCKER").as_deref() != Ok("1"),
                "FLOTILLA_REQUIRE_DOCKER=1 but there is no Docker Engine: {why}"
            );
            eprintln!("SKIP: no Docker Engine: {why}");
            None
        }
    }
}

fn shell_task(service: &str, script: &str) -> Task {
    let mut spec = ServiceSpec::process(service, vec!["sh".into(), "-c".into(), script.into()]);
    spec.driver = DriverKind::Docker;
    spec.image = Some(IMAGE.into());
    spec.stop_grace_period = Duration::from_secs(2);
    let mut t = Task::new(&spec, 4, Some(1), 0);
    t.node = Some(NODE.into());
    t.status = TaskStatus::new(TaskState::Assigned, 0, "");
    t
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Removes every container and network a test service left behind.
async fn cleanup(d: &DockerDriver, service: &str) {
    let docker = d.client();
    let list = labelled(d, &format!("{LABEL_SERVICE}={service}")).await;
    for c in list {
        let _ = docker
            .remove_container(
                c.id.as_deref().unwrap_or_default(),
                Some(RemoveContainerOptionsBuilder::default().force(true).build()),
            )
            .await;
    }
    for id in networks_named(d, service).await {
        let _ = docker.remove_network(&id).await;
    }
}

/// The containers (running or not) carrying `label` (`KEY=VALUE`).
async fn labelled(d: &DockerDriver, label: &str) -> Vec<bollard::models::ContainerSummary> {
    let filters = HashMap::from([("label", vec![label.to_string()])]);
    d.client()
        .list_containers(Some(
            ListContainersOptionsBuilder::default()
                .all(true)
                .filters(&filters)
                .build(),
        ))
        .await
        .unwrap()
}

/// The ids of the networks named `flotilla-<service>` (an engine may hold several).
async fn networks_named(d: &DockerDriver, service: &str) -> Vec<String> {
    let filters = HashMap::from([("name", vec![format!("flotilla-{service}")])]);
    let nets = d
        .client()
        .list_networks(Some(
            ListNetworksOptionsBuilder::default()
                .filters(&filters)
                .build(),
        ))
        .await
        .unwrap();
    nets.into_iter()
        .filter(|n| n.name.as_deref() == Some(&format!("flotilla-{service}")))
        .filter_map(|n| n.id)
        .collect()
}

async fn network_exists(d: &DockerDriver, service: &str) -> bool {
    !networks_named(d, service).await.is_empty()
}

/// The network a task's container runs on (`HostConfig.NetworkMode`).
async fn network_of(d: &DockerDriver, task_id: &str) -> String {
    let list = labelled(d, &format!("{LABEL_TASK}={task_id}")).await;
    let id = list[0].id.clone().unwrap();
    let c = d.client().inspect_container(&id, None).await.unwrap();
    c.host_config.unwrap().network_mode.unwrap()
}

/// Two agents on one engine (#21): with two networks of the service's name already there (an
/// engine before API 1.44 creates both when two creates race), both agents' first starts of the
/// service at the same moment succeed on the same network, the duplicate is removed, and
/// removing the last container removes the network.
#[tokio::test]
async fn agents_sharing_an_engine_share_one_service_network() {
    let Some(a) = driver().await else {
        return;
    };
    let b = DockerDriver::with_client(a.client().clone(), "docker-driver-test-b", "owner-b");
    let service = "dupnet";
    cleanup(&a, service).await;
    for _ in 0..2 {
        a.client()
            .create_network(NetworkCreateRequest {
                name: format!("flotilla-{service}"),
                driver: Some("bridge".into()),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let before = networks_named(&a, service).await;
    if before.len() < 2 {
        // Engines from API 1.44 on refuse namesakes; then there is nothing to heal.
        eprintln!("the engine refuses duplicate network names; only the shared start is tested");
    }
    let (ta, tb) = (
        shell_task(service, "exec sleep 1000"),
        shell_task(service, "exec sleep 1000"),
    );
    let (ra, rb) = tokio::join!(a.start(&ta, &[]), b.start(&tb, &[]));
    ra.unwrap();
    rb.unwrap();
    let after = networks_named(&a, service).await;
    assert_eq!(after.len(), 1, "one network left of {before:?}");
    assert_eq!(network_of(&a, &ta.id).await, after[0]);
    assert_eq!(network_of(&b, &tb.id).await, after[0]);

    a.stop(&ta.id, 9, Duration::from_secs(2)).await.unwrap();
    a.remove(&ta.id).await.unwrap();
    assert!(network_exists(&a, service).await, "b still uses it");
    b.stop(&tb.id, 9, Duration::from_secs(2)).await.unwrap();
    b.remove(&tb.id).await.unwrap();
    assert!(
        !network_exists(&a, service).await,
        "the last one out removes it"
    );
}

/// The last agent out does not remove a service network another agent has just created a
/// container on (not started yet): the engine would let it, and that start would fail.
#[tokio::test]
async fn release_keeps_a_network_with_a_created_container() {
    let Some(a) = driver().await else {
        return;
    };
    let service = "netheld";
    cleanup(&a, service).await;
    let task = shell_task(service, "exec sleep 1000");
    a.start(&task, &[]).await.unwrap();
    let network = network_of(&a, &task.id).await;
    let other = a
        .client()
        .create_container(
            None::<bollard::query_parameters::CreateContainerOptions>,
            ContainerCreateBody {
                image: Some(IMAGE.into()),
                cmd: Some(vec!["sleep".into(), "1000".into()]),
                labels: Some(HashMap::from([(
                    LABEL_SERVICE.to_string(),
                    service.to_string(),
                )])),
                host_config: Some(bollard::models::HostConfig {
                    network_mode: Some(network.clone()),
                    ..Default::default()
                }),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    a.stop(&task.id, 9, Duration::from_secs(2)).await.unwrap();
    a.remove(&task.id).await.unwrap();
    let kept = network_exists(&a, service).await;
    let _ = a
        .client()
        .remove_container(
            &other.id,
            Some(RemoveContainerOptionsBuilder::default().force(true).build()),
        )
        .await;
    cleanup(&a, service).await;
    assert!(kept, "the network went while a created container was on it");
}

/// Start with labels, name, ports and env; wait resolves on an external SIGKILL; recover finds
/// it; remove takes the container and, with the last one, the network.
#[tokio::test]
async fn lifecycle_labels_ports_kill_recover_remove() {
    let Some(d) = driver().await else { return };
    let service = "dt-life";
    cleanup(&d, service).await;
    // A tiny HTTP answer on the target port, with the environment in the body.
    let mut task = shell_task(
        service,
        "while true; do env | nc -l -p 8080 >/dev/null 2>&1 || sleep 0.1; done",
    );
    task.spec.ports = vec![PortSpec {
        target: 8080,
        published: None,
        protocol: Default::default(),
        mode: Default::default(),
    }];
    let host_port = free_port();
    let ports = [PortBinding {
        target: 8080,
        host_port,
    }];
    let running = d.start(&task, &ports).await.unwrap();
    let id = running.container_id.clone().unwrap();
    let c = d.client().inspect_container(&id, None).await.unwrap();
    assert_eq!(
        c.name.as_deref(),
        Some(format!("/flotilla-{service}-1-{}", task.id).as_str())
    );
    let labels = c.config.as_ref().unwrap().labels.clone().unwrap();
    assert_eq!(labels[LABEL_TASK], task.id);
    assert_eq!(labels[LABEL_SERVICE], service);
    assert_eq!(labels[LABEL_NODE], NODE);
    assert_eq!(labels[LABEL_OWNER], NODE);
    assert_eq!(labels[LABEL_SLOT], "1");
    assert_eq!(labels["io.flotilla.revision"], "4");
    let env = c.config.as_ref().unwrap().env.clone().unwrap();
    assert!(env.contains(&"PORT=8080".to_string()), "{env:?}");
    assert!(
        env.contains(&format!("FLOTILLA_TASK_ID={}", task.id)),
        "{env:?}"
    );
    assert!(network_exists(&d, service).await);
    assert!(matches!(
        d.start(&task, &ports).await,
        Err(DriverError::AlreadyExists(_))
    ));

    // The published port reaches the container.
    let mut answered = false;
    for _ in 0..100 {
        if let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", host_port)).await {
            let mut buf = Vec::new();
            let _ = tokio::io::AsyncReadExt::read_to_end(&mut s, &mut buf).await;
            if String::from_utf8_lossy(&buf).contains("FLOTILLA_SERVICE=dt-life") {
                answered = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(answered, "the container answered on host port {host_port}");

    let recovered = d.recover().await.unwrap();
    let mine = recovered.iter().find(|r| r.task_id == task.id).unwrap();
    assert_eq!(mine.container_id.as_deref(), Some(id.as_str()));
    assert_eq!(mine.ports, ports);
    assert!(mine.exited.is_none());

    // An agent of another cluster on this engine whose node has the same name neither adopts
    // nor removes the container: ownership is the owner key, not the node name.
    let stranger = DockerDriver::detect(NODE, "another-cluster")
        .await
        .unwrap()
        .unwrap();
    let theirs = stranger.recover().await.unwrap();
    assert!(
        theirs.iter().all(|r| r.task_id != task.id),
        "a same-named node of another owner adopted {}",
        task.id
    );
    stranger.remove(&task.id).await.unwrap();
    let c = d.client().inspect_container(&id, None).await.unwrap();
    assert_eq!(c.state.and_then(|s| s.running), Some(true));

    // wait() resolves from the die event of a kill done behind the driver's back.
    let waiting = tokio::spawn({
        let d = DockerDriver::detect(NODE, NODE).await.unwrap().unwrap();
        let task_id = task.id.clone();
        async move { d.wait(&task_id).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    d.client()
        .kill_container(
            &id,
            Some(
                KillContainerOptionsBuilder::default()
                    .signal("KILL")
                    .build(),
            ),
        )
        .await
        .unwrap();
    let exit = waiting.await.unwrap().unwrap();
    assert_eq!(exit.code, Some(137));
    assert!(exit.message.contains("signal 9"), "{}", exit.message);

    d.remove(&task.id).await.unwrap();
    d.remove(&task.id).await.unwrap();
    assert!(matches!(
        d.client().inspect_container(&id, None).await,
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404,
            ..
        })
    ));
    assert!(
        !network_exists(&d, service).await,
        "last container gone, network gone"
    );
    cleanup(&d, service).await;
}

/// Raising the memory limit of a running container keeps its id and start time; exec runs in
/// it; logs and stats come from the engine; stop honours the signal.
#[tokio::test]
async fn update_exec_logs_stats_stop() {
    let Some(d) = driver().await else { return };
    let service = "dt-update";
    cleanup(&d, service).await;
    let mut task = shell_task(
        service,
        "echo hello-from-container; trap 'exit 7' TERM; while true; do sleep 0.2; done",
    );
    task.spec.resources.limits.memory_bytes = Some(64 << 20);
    let running = d.start(&task, &[]).await.unwrap();
    let id = running.container_id.unwrap();
    let before = d.client().inspect_container(&id, None).await.unwrap();
    assert_eq!(before.host_config.as_ref().unwrap().memory, Some(64 << 20));

    let mut limits = task.spec.resources;
    limits.limits.memory_bytes = Some(128 << 20);
    limits.limits.cpu_millis = Some(500);
    d.update_resources(&task.id, &limits).await.unwrap();
    let after = d.client().inspect_container(&id, None).await.unwrap();
    assert_eq!(after.id, before.id);
    assert_eq!(
        after.state.as_ref().unwrap().started_at,
        before.state.as_ref().unwrap().started_at
    );
    assert_eq!(after.host_config.as_ref().unwrap().memory, Some(128 << 20));
    assert_eq!(
        after.host_config.as_ref().unwrap().nano_cpus,
        Some(500_000_000)
    );

    let out = d
        .exec(
            &task.id,
            &["sh".into(), "-c".into(), "echo out; exit 3".into()],
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    assert_eq!(out.exit_code, Some(3));
    assert!(out.output.contains("out"), "{out:?}");

    let mut logs = d.logs(&task.id, Some(10), false).await.unwrap();
    let mut text = String::new();
    while let Some(chunk) = logs.next().await {
        text.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
    }
    assert!(text.contains("hello-from-container"), "{text}");

    let stats = d.stats(&task.id).await.unwrap();
    assert!(stats.memory_bytes > 0, "{stats:?}");
    assert_eq!(stats.memory_limit_bytes, Some(128 << 20));

    let exit = d.stop(&task.id, 15, Duration::from_secs(10)).await.unwrap();
    assert_eq!(exit.code, Some(7), "{exit:?}");
    d.remove(&task.id).await.unwrap();
    cleanup(&d, service).await;
}

/// A missing image and a refused setting fail the start fast with a reason, and leave nothing.
#[tokio::test]
async fn bad_starts_fail_with_reasons() {
    let Some(d) = driver().await else { return };
    let service = "dt-bad";
    cleanup(&d, service).await;

    let mut missing = shell_task(service, "true");
    missing.spec.image = Some("flotilla-no-such-image:never".into());
    missing.spec.container.pull_policy = PullPolicy::Never;
    let e = d.start(&missing, &[]).await.unwrap_err().to_string();
    assert!(
        e.contains("image flotilla-no-such-image:never not present on node docker-driver-test"),
        "{e}"
    );

    let mut bad_cap = shell_task(service, "true");
    bad_cap.spec.container.cap_add = vec!["NET_MAGIC".into()];
    let e = d.start(&bad_cap, &[]).await.unwrap_err().to_string();
    assert!(e.contains("services.dt-bad.cap_add[0]"), "{e}");

    let mut bad_runtime = shell_task(service, "true");
    bad_runtime.spec.container.runtime = Some("no-such-runtime".into());
    let e = d.start(&bad_runtime, &[]).await.unwrap_err().to_string();
    assert!(e.contains("no-such-runtime"), "{e}");
    assert!(matches!(d.remove(&bad_runtime.id).await, Ok(())));
    let left = d.recover().await.unwrap();
    assert!(
        !left.iter().any(|r| r.task_id == bad_runtime.id),
        "a failed start leaves no container"
    );
    cleanup(&d, service).await;
}

/// An image's own HEALTHCHECK is followed through `native_health` when the service has none,
/// and disabled when the service brings its own check.
#[tokio::test]
async fn image_healthcheck_is_followed() {
    let Some(d) = driver().await else { return };
    let service = "dt-health";
    cleanup(&d, service).await;
    // `docker import` cannot set HEALTHCHECK, but a commit can.
    let base = d
        .client()
        .create_container(
            None::<bollard::query_parameters::CreateContainerOptions>,
            ContainerCreateBody {
                image: Some(IMAGE.into()),
                cmd: Some(vec!["sh".into()]),
                labels: Some(HashMap::from([(
                    LABEL_SERVICE.to_string(),
                    service.to_string(),
                )])),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    d.client()
        .commit_container(
            CommitContainerOptionsBuilder::default()
                .container(&base.id)
                .repo("flotilla-test-health")
                .tag("latest")
                .build(),
            ContainerConfig {
                healthcheck: Some(HealthConfig {
                    test: Some(vec!["CMD-SHELL".into(), "test -f /tmp/ok".into()]),
                    interval: Some(200_000_000),
                    timeout: Some(2_000_000_000),
                    retries: Some(1),
                    ..Default::default()
                }),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let mut task = shell_task(service, "touch /tmp/ok; sleep 600");
    task.spec.image = Some("flotilla-test-health:latest".into());
    d.start(&task, &[]).await.unwrap();
    let mut health = d
        .native_health(&task.id)
        .await
        .expect("the image has a check");
    let wait_for = |want: Health| {
        let mut rx = health.clone();
        async move {
            tokio::time::timeout(Duration::from_secs(30), rx.wait_for(|h| *h == want))
                .await
                .unwrap_or_else(|_| panic!("health never became {want:?}"))
                .unwrap();
        }
    };
    wait_for(Health::Healthy).await;
    d.exec(
        &task.id,
        &["rm".into(), "/tmp/ok".into()],
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    wait_for(Health::Unhealthy).await;
    assert_eq!(*health.borrow_and_update(), Health::Unhealthy);
    d.remove(&task.id).await.unwrap();

    // With a check of its own, the image's is switched off.
    let mut own = shell_task(service, "sleep 600");
    own.spec.image = Some("flotilla-test-health:latest".into());
    own.spec.healthcheck = Some(flotilla_types::HealthCheck::with_defaults(
        flotilla_types::HealthTest::Cmd {
            argv: vec!["true".into()],
        },
    ));
    d.start(&own, &[]).await.unwrap();
    assert!(d.native_health(&own.id).await.is_none());
    d.remove(&own.id).await.unwrap();
    cleanup(&d, service).await;
}

/// The image list a node advertises follows the engine: a new tag appears and a removed one
/// disappears without the agent re-listing by hand.
#[tokio::test]
async fn image_list_follows_engine_events() {
    let Some(d) = driver().await else { return };
    let tag = format!("flotilla-test-image-watch-{}", std::process::id());
    let full = format!("{tag}:latest");
    let mut images = d.watch_images().await;
    assert!(images.borrow().iter().any(|t| t == IMAGE));
    assert!(!images.borrow().contains(&full));

    d.client()
        .tag_image(
            IMAGE,
            Some(
                bollard::query_parameters::TagImageOptionsBuilder::default()
                    .repo(&tag)
                    .tag("latest")
                    .build(),
            ),
        )
        .await
        .unwrap();
    let appeared = tokio::time::timeout(
        Duration::from_secs(30),
        images.wait_for(|tags| tags.contains(&full)),
    )
    .await
    .map(|_| ());
    assert!(appeared.is_ok(), "the new tag never reached the watch");

    d.client()
        .remove_image(
            &full,
            None::<bollard::query_parameters::RemoveImageOptions>,
            None,
        )
        .await
        .unwrap();
    let gone = tokio::time::timeout(
        Duration::from_secs(30),
        images.wait_for(|tags| !tags.contains(&full)),
    )
    .await
    .map(|_| ());
    assert!(gone.is_ok(), "the removed tag stayed in the watch");
}
