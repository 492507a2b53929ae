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

/// The `*.yaml` files directly in `dir`, sorted.
fn yaml_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|ext| ext == "yaml") {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
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
    // Every resource file on its own, and the examples.
    let mut files = yaml_files(&deploy)?;
    files.retain(|path| !path.ends_with("kustomization.yaml"));
    files.extend(yaml_files(&deploy.join("examples"))?);
    // And the kustomization as kubectl renders it (its built-in kustomize works offline),
    // where kubectl is installed; the resources above are validated either way.
    let rendered_file =
        std::env::temp_dir().join(format!("epx-deploy-{}.yaml", std::process::id()));
    match Command::new("kubectl")
        .arg("kustomize")
        .arg(&deploy)
        .output()
    {
        Ok(output) if output.status.success() => {
            std::fs::write(&rendered_file, &output.stdout)?;
            files.push(rendered_file.clone());
        }
        Ok(output) => bail!(
            "kubectl kustomize deploy/ failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        ),
        Err(error) => {
            println!("kubectl not available ({error}): the kustomization itself is not rendered")
        }
    }
    let report = validate(&files);
    let _ = std::fs::remove_file(&rendered_file);
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
    // Refused for the field, not because the validator could not run at all.
    let error = verdict
        .err()
        .context("an unknown container field passed validation")?;
    ensure!(
        format!("{error:#}").contains("notAField"),
        "refused, but not for the unknown field: {error:#}"
    );
    Ok(())
}
