//! Builds small local images without a registry or a Dockerfile: a root filesystem holding
//! `busybox` (with its applets as symlinks) and optionally the running `flotilla` binary with the
//! shared libraries it needs, imported into the engine as a tar (like `docker import`).
//!
//! `flotilla demo-image` uses it to make `flotilla-demo:latest`, whose entrypoint is `/flotilla`,
//! so a Compose service with `command: ["demo-app", "--version", "v1"]` runs the demo app.
//!
//! Images carry the SHA-256 of everything they are built from ([`RECIPE_LABEL`]): building a
//! tag that already holds the same content does nothing, and an image a rebuild leaves without
//! any tag is removed.

use bollard::query_parameters::CreateImageOptionsBuilder;
use bollard::Docker;
use futures::StreamExt;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use thiserror::Error;

/// The image `flotilla demo-image` builds.
pub const DEMO_IMAGE: &str = "flotilla-demo:latest";

/// The image label holding the SHA-256 (hex) of the recipe: its files' bytes and settings.
pub const RECIPE_LABEL: &str = "io.flotilla.recipe-sha256";

#[derive(Debug, Error)]
pub enum ImageError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("busybox is not installed and `apt-get install busybox-static` failed: {0}")]
    NoBusybox(String),
    #[error("`{command}` failed: {reason}")]
    Tool { command: String, reason: String },
    #[error("tag {0:?} must look like name[:tag]")]
    BadTag(String),
    #[error("docker engine: {0}")]
    Engine(#[from] bollard::errors::Error),
}

/// What goes into an image.
#[derive(Debug, Clone)]
pub struct ImageRecipe {
    /// `name:tag` of the result.
    pub tag: String,
    /// Copied to `/flotilla` with its shared libraries, if set.
    pub flotilla: Option<PathBuf>,
    /// The image's `ENTRYPOINT` (exec form); empty for none.
    pub entrypoint: Vec<String>,
    /// The image's `CMD` (exec form); empty for none.
    pub cmd: Vec<String>,
}

impl ImageRecipe {
    /// `flotilla-demo:latest`: busybox plus this flotilla binary as the entrypoint.
    pub fn demo(flotilla: PathBuf) -> Self {
        ImageRecipe {
            tag: DEMO_IMAGE.to_string(),
            flotilla: Some(flotilla),
            entrypoint: vec!["/flotilla".into()],
            cmd: vec!["demo-app".into()],
        }
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ImageError + '_ {
    move |source| ImageError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Runs a command to completion, returning its stdout.
fn run(cmd: &mut Command) -> Result<String, ImageError> {
    let command = format!("{cmd:?}");
    let out = cmd.output().map_err(|e| ImageError::Tool {
        command: command.clone(),
        reason: e.to_string(),
    })?;
    if !out.status.success() {
        return Err(ImageError::Tool {
            command,
            reason: format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Finds busybox, installing Debian's static build when it is missing.
pub fn find_or_install_busybox() -> Result<PathBuf, ImageError> {
    let candidates = ["/bin/busybox", "/usr/bin/busybox", "/sbin/busybox"];
    let find = || candidates.iter().map(PathBuf::from).find(|p| p.is_file());
    if let Some(found) = find() {
        return Ok(found);
    }
    tracing::info!("busybox missing; installing busybox-static with apt-get");
    let install = || {
        run(Command::new("apt-get")
            .args(["install", "-y", "-q", "busybox-static"])
            .env("DEBIAN_FRONTEND", "noninteractive"))
    };
    if install().is_err() {
        // A fresh machine may not have package lists yet.
        run(Command::new("apt-get").args(["update", "-q"]))
            .map_err(|e| ImageError::NoBusybox(e.to_string()))?;
        install().map_err(|e| ImageError::NoBusybox(e.to_string()))?;
    }
    find().ok_or_else(|| ImageError::NoBusybox("installed, but no busybox binary found".into()))
}

/// The shared libraries (and loader) a dynamic executable needs, as absolute host paths; empty
/// for a static one.
fn shared_libraries(exe: &Path) -> Result<Vec<PathBuf>, ImageError> {
    let out = Command::new("ldd")
        .arg(exe)
        .output()
        .map_err(|e| ImageError::Tool {
            command: format!("ldd {}", exe.display()),
            reason: e.to_string(),
        })?;
    // ldd exits non-zero for "not a dynamic executable".
    if !out.status.success() {
        return Ok(Vec::new());
    }
    Ok(parse_ldd(&String::from_utf8_lossy(&out.stdout)))
}

/// Library paths of `ldd` output: `name => /path (addr)` or `/path (addr)` lines.
fn parse_ldd(text: &str) -> Vec<PathBuf> {
    text.lines()
        .filter_map(|line| {
            let line = line.trim();
            let path = match line.split_once("=>") {
                Some((_, right)) => right.split_whitespace().next()?,
                None => line.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

/// Copies a host file to the same absolute path under `root`, keeping its mode.
fn copy_into(root: &Path, host_path: &Path, inside: &Path) -> Result<(), ImageError> {
    let dest = root.join(inside.strip_prefix("/").unwrap_or(inside));
    if let Some(parent) = dest.parent() {
        std::fs::create_dir_all(parent).map_err(io_err(parent))?;
    }
    // Follow symlinks (libc.so.6 -> libc-2.36.so): the image needs the bytes under this name.
    std::fs::copy(host_path, &dest).map_err(io_err(&dest))?;
    Ok(())
}

/// The executables of an image: (host path, path inside).
fn binaries(recipe: &ImageRecipe, busybox: &Path) -> Vec<(PathBuf, PathBuf)> {
    let mut binaries = vec![(busybox.to_path_buf(), PathBuf::from("/bin/busybox"))];
    if let Some(exe) = &recipe.flotilla {
        binaries.push((exe.clone(), PathBuf::from("/flotilla")));
    }
    binaries
}

/// Feeds a file's bytes to `digest`.
fn hash_file(digest: &mut ring::digest::Context, path: &Path) -> Result<(), ImageError> {
    let mut file = std::fs::File::open(path).map_err(io_err(path))?;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = file.read(&mut buf).map_err(io_err(path))?;
        if n == 0 {
            return Ok(());
        }
        digest.update(&buf[..n]);
    }
}

/// SHA-256 (hex) of what the image of `recipe` holds: every file copied in (binaries and their
/// shared libraries, with the paths they get) and the image settings.
fn recipe_digest(recipe: &ImageRecipe, busybox: &Path) -> Result<String, ImageError> {
    let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
    for change in image_changes(recipe) {
        digest.update(change.as_bytes());
        digest.update(b"\0");
    }
    for (host, inside) in binaries(recipe, busybox) {
        digest.update(inside.as_os_str().as_bytes());
        hash_file(&mut digest, &host)?;
        for lib in shared_libraries(&host)? {
            digest.update(lib.as_os_str().as_bytes());
            hash_file(&mut digest, &lib)?;
        }
    }
    Ok(digest
        .finish()
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// The id and recipe label of the image `reference` names, `None` when there is none.
async fn existing_image(
    docker: &Docker,
    reference: &str,
) -> Result<Option<(String, Option<String>)>, ImageError> {
    match docker.inspect_image(reference).await {
        Ok(image) => Ok(Some((
            image.id.unwrap_or_default(),
            image
                .config
                .and_then(|c| c.labels)
                .and_then(|mut labels| labels.remove(RECIPE_LABEL)),
        ))),
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        }) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Removes the image `id` if a rebuild left it without any tag; one still in use by a
/// container stays (logged).
async fn remove_if_untagged(docker: &Docker, id: &str) {
    let untagged = match docker.inspect_image(id).await {
        Ok(image) => image.repo_tags.unwrap_or_default().is_empty(),
        Err(_) => false,
    };
    if !untagged {
        return;
    }
    match docker
        .remove_image(
            id,
            None::<bollard::query_parameters::RemoveImageOptions>,
            None,
        )
        .await
    {
        Ok(_) => tracing::info!(image = %id, "removed the image this build replaced"),
        Err(e) => tracing::warn!(image = %id, error = %e, "cannot remove the replaced image"),
    }
}

/// Lays out the root filesystem of `recipe` in `root`.
fn build_rootfs(root: &Path, recipe: &ImageRecipe, busybox: &Path) -> Result<(), ImageError> {
    for dir in ["bin", "tmp", "etc", "proc", "sys", "dev", "root", "var/tmp"] {
        let d = root.join(dir);
        std::fs::create_dir_all(&d).map_err(io_err(&d))?;
    }
    for (host, inside) in &binaries(recipe, busybox) {
        copy_into(root, host, inside)?;
        for lib in shared_libraries(host)? {
            copy_into(root, &lib, &lib)?;
        }
    }
    let applets = run(Command::new(busybox).arg("--list"))?;
    for applet in applets.lines().map(str::trim).filter(|a| !a.is_empty()) {
        if applet.contains('/') || applet == "busybox" {
            continue;
        }
        let link = root.join("bin").join(applet);
        if !link.exists() {
            std::os::unix::fs::symlink("busybox", &link).map_err(io_err(&link))?;
        }
    }
    let etc = root.join("etc");
    for (name, text) in [
        (
            "passwd",
            "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
        ),
        ("group", "root:x:0:\nnogroup:x:65534:\n"),
    ] {
        let p = etc.join(name);
        std::fs::write(&p, text).map_err(io_err(&p))?;
    }
    Ok(())
}

/// Dockerfile `changes` for the import, in JSON exec form.
fn image_changes(recipe: &ImageRecipe) -> Vec<String> {
    let json = |v: &[String]| serde_json::to_string(v).unwrap_or_else(|_| "[]".into());
    let mut changes = vec!["ENV PATH=/bin".to_string()];
    if !recipe.entrypoint.is_empty() {
        changes.push(format!("ENTRYPOINT {}", json(&recipe.entrypoint)));
    }
    if !recipe.cmd.is_empty() {
        changes.push(format!("CMD {}", json(&recipe.cmd)));
    }
    changes
}

/// Builds the image and returns its tag. Does nothing when the tag already holds an image of the
/// same recipe digest; otherwise replaces it, removing the old image if that leaves it untagged.
pub async fn build_image(docker: &Docker, recipe: &ImageRecipe) -> Result<String, ImageError> {
    let (repo, tag) = match recipe.tag.rsplit_once(':') {
        Some((r, t)) if !t.contains('/') => (r, t),
        _ => (recipe.tag.as_str(), "latest"),
    };
    if repo.is_empty() || tag.is_empty() {
        return Err(ImageError::BadTag(recipe.tag.clone()));
    }
    let busybox = find_or_install_busybox()?;
    let reference = format!("{repo}:{tag}");
    let digest = recipe_digest(recipe, &busybox)?;
    let previous = existing_image(docker, &reference).await?;
    if let Some((id, Some(label))) = &previous {
        if *label == digest {
            tracing::info!(image = %reference, %id, "image is up to date");
            return Ok(reference);
        }
    }
    let mut changes = image_changes(recipe);
    changes.push(format!("LABEL {RECIPE_LABEL}={digest}"));
    let dir = std::env::temp_dir().join(format!("flotilla-image-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
    let result = async {
        build_rootfs(&dir, recipe, &busybox)?;
        let tar = Command::new("tar")
            .arg("-C")
            .arg(&dir)
            .args(["--numeric-owner", "-cf", "-", "."])
            .output()
            .map_err(|e| ImageError::Tool {
                command: "tar".into(),
                reason: e.to_string(),
            })?;
        if !tar.status.success() {
            return Err(ImageError::Tool {
                command: "tar".into(),
                reason: String::from_utf8_lossy(&tar.stderr).into_owned(),
            });
        }
        let options = CreateImageOptionsBuilder::default()
            .from_src("-")
            .repo(repo)
            .tag(tag)
            .changes(changes)
            .build();
        let mut progress = docker.create_image(
            Some(options),
            Some(bollard::body_full(tar.stdout.into())),
            None,
        );
        while let Some(step) = progress.next().await {
            step?;
        }
        Ok(reference)
    }
    .await;
    let _ = std::fs::remove_dir_all(&dir);
    let built = result?;
    if let Some((id, _)) = previous {
        remove_if_untagged(docker, &id).await;
    }
    tracing::info!(image = %built, "image built");
    Ok(built)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_lines_parsed() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n\t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n";
        assert_eq!(
            parse_ldd(text),
            [
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2")
            ]
        );
    }

    #[test]
    fn changes_in_exec_form() {
        let r = ImageRecipe::demo(PathBuf::from("/x"));
        assert_eq!(
            image_changes(&r),
            [
                "ENV PATH=/bin",
                "ENTRYPOINT [\"/flotilla\"]",
                "CMD [\"demo-app\"]"
            ]
        );
    }
}
