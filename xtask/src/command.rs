//! Running commands with a visible header and a clear error on failure.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

/// Prints the command, runs it with inherited output, and fails if it fails.
pub fn run_step(mut command: Command) -> Result<()> {
    let shown = describe(&command);
    println!("\n==> {shown}");
    let status = command
        .status()
        .with_context(|| format!("starting `{shown}`"))?;
    if !status.success() {
        bail!("`{shown}` failed ({status})");
    }
    Ok(())
}

/// A command's standard output, or None if it could not run or failed.
pub fn output_of(program: &str, args: &[&str]) -> Option<String> {
    let output = Command::new(program)
        .args(args)
        .stderr(Stdio::null())
        .output()
        .ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The command line as a person would type it: the program by name, not by full path.
fn describe(command: &Command) -> String {
    let program = Path::new(command.get_program());
    let name = program.file_name().unwrap_or(program.as_os_str());
    let mut parts = vec![name.to_string_lossy().into_owned()];
    parts.extend(
        command
            .get_args()
            .map(|arg| arg.to_string_lossy().into_owned()),
    );
    parts.join(" ")
}

/// The cargo that runs this xtask, in the workspace root.
pub struct Cargo {
    program: PathBuf,
    root: PathBuf,
}

impl Cargo {
    pub fn new(root: PathBuf) -> Self {
        let program = std::env::var_os("CARGO").map_or_else(|| "cargo".into(), PathBuf::from);
        Self { program, root }
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(&self.program);
        command.args(args).current_dir(&self.root);
        command
    }

    /// Builds one binary of a package with `profile` and returns its path, as cargo
    /// reports it (so any target directory works).
    pub fn build_binary(&self, package: &str, binary: &str, profile: Profile) -> Result<PathBuf> {
        let mut build = self.command(&[
            "build",
            "--package",
            package,
            "--bin",
            binary,
            "--message-format=json-render-diagnostics",
        ]);
        build.args(profile.flags());
        let flags: String = profile
            .flags()
            .iter()
            .map(|flag| format!(" {flag}"))
            .collect();
        println!("\n==> cargo build --package {package} --bin {binary}{flags}");
        let output = build
            .stderr(Stdio::inherit())
            .output()
            .context("starting cargo build")?;
        if !output.status.success() {
            bail!("building {binary} failed ({})", output.status);
        }
        let messages = String::from_utf8_lossy(&output.stdout);
        executable_in(&messages, binary)
            .with_context(|| format!("cargo reported no executable named {binary}"))
    }
}

/// A cargo build profile.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Profile {
    Debug,
    Release,
}

impl Profile {
    /// The cargo flags that select it.
    fn flags(self) -> &'static [&'static str] {
        match self {
            Profile::Debug => &[],
            Profile::Release => &["--release"],
        }
    }
}

/// Finds the executable of `binary` in cargo's JSON messages.
fn executable_in(messages: &str, binary: &str) -> Option<PathBuf> {
    messages
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|message| message["reason"] == "compiler-artifact")
        .filter(|message| message["target"]["name"] == binary)
        .find_map(|message| message["executable"].as_str().map(PathBuf::from))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_executable_among_cargo_messages() {
        let messages = concat!(
            r#"{"reason":"compiler-artifact","target":{"name":"proxy_common"},"executable":null}"#,
            "\n",
            r#"{"reason":"compiler-artifact","target":{"name":"ebpf-proxy"},"executable":"/t/debug/ebpf-proxy"}"#,
            "\n",
            r#"{"reason":"build-finished","success":true}"#,
        );
        assert_eq!(
            executable_in(messages, "ebpf-proxy"),
            Some(PathBuf::from("/t/debug/ebpf-proxy"))
        );
        assert_eq!(executable_in(messages, "lab-demo"), None);
    }
}
