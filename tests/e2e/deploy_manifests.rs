//! The manifests in deploy/ are valid Kubernetes objects: the rendered kustomization and the
//! examples are checked offline against the Kubernetes schemas with `kubernetes-validate`
//! (from PyPI, installed into a venv under the target directory on first use).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, PoisonError};

use anyhow::{Context, Result, bail, ensure};

/// Pinned so a schema update can't change the verdict under us.
const VALIDATOR: &str = "kubernetes-validate==1.37.0";
const KUBERNETES_VERSION: &str = "1.37.0";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The validator's executable, installing it into `target/kubernetes-validate-venv` if needed.
fn validator() -> Result<PathBuf> {
    // Tests run in parallel: one installs, the others wait for it.
    static INSTALL: Mutex<()> = Mutex::new(());
    let _installing = INSTALL.lock().unwrap_or_else(PoisonError::into_inner);
    let venv = repo_root().join("target/kubernetes-validate-venv");
    let executable = venv.join("bin/kubernetes-validate");
    if executable.exists() {
        return Ok(executable);
    }
    run(Command::new("python3").arg("-m").arg("venv").arg(&venv))?;
    run(Command::new(venv.join("bin/pip")).args(["install", "--quiet", VALIDATOR]))
        .context("installing kubernetes-validate from PyPI")?;
    Ok(executable)
}

fn run(command: &mut Command) -> Result<String> {
    let output = command
        .output()
        .with_context(|| format!("running {command:?}"))?;
    if !output.status.success() {
        bail!(
            "{command:?} failed:\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn validate(files: &[PathBuf]) -> Result<String> {
    run(Command::new(validator()?)
        .args(["--strict", "--kubernetes-version", KUBERNETES_VERSION])
        .args(files))
}

#[test]
fn deploy_manifests_validate_against_the_kubernetes_schemas() -> Result<()> {
    let deploy = repo_root().join("deploy");
    // The kustomization as kubectl renders it (kubectl's built-in kustomize works offline).
    let rendered = run(Command::new("kubectl").arg("kustomize").arg(&deploy))?;
    let rendered_file =
        std::env::temp_dir().join(format!("epx-deploy-{}.yaml", std::process::id()));
    std::fs::write(&rendered_file, &rendered)?;
    let mut files = vec![rendered_file.clone()];
    for entry in std::fs::read_dir(deploy.join("examples"))? {
        let path = entry?.path();
        if path.extension().is_some_and(|ext| ext == "yaml") {
            files.push(path);
        }
    }
    let report = validate(&files);
    std::fs::remove_file(&rendered_file)?;
    let report = report?;
    for kind in [
        "daemonset/ebpf-proxy",
        "clusterrole/ebpf-proxy",
        "serviceaccount/ebpf-proxy",
    ] {
        ensure!(
            report.contains(&format!("passed for resource {kind}")),
            "{kind} not validated:\n{report}"
        );
    }
    Ok(())
}

#[test]
fn the_validator_rejects_an_invalid_daemonset() -> Result<()> {
    let file = std::env::temp_dir().join(format!("epx-invalid-{}.yaml", std::process::id()));
    std::fs::write(
        &file,
        "apiVersion: apps/v1\nkind: DaemonSet\nmetadata: {name: broken}\nspec:\n  selector: {}\n  \
         template:\n    spec:\n      containers:\n      - name: a\n        notAField: 1\n",
    )?;
    let verdict = validate(std::slice::from_ref(&file));
    std::fs::remove_file(&file)?;
    ensure!(
        verdict.is_err(),
        "an unknown container field passed validation"
    );
    Ok(())
}
