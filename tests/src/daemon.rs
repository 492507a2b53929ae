//! The real `ebpf-proxy daemon`, run inside a lab's node namespace with a private bpffs.
//!
//! It is spawned with `setns` in `pre_exec` rather than `ip netns exec`, which remounts
//! /sys and would hide bpffs from the daemon. Its stdout and stderr are collected into a
//! log that tests can wait on (`sync complete`) and that is printed when the handle drops,
//! so a failing test shows what the daemon said (libtest captures it otherwise).

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};

use crate::bpffs::PrivateBpffs;
use crate::cgroup::Cgroup;
use crate::manifest::Manifest;
use crate::netns::{Netns, enter};
use crate::scratch::{ScratchDir, unique_prefix};

/// The line the daemon logs after every successful sync of the maps.
const SYNC_MARKER: &str = "sync complete";
/// Subdirectories of the daemon's scratch directory: what the daemon reads, and where
/// files are written before being renamed into it.
const MANIFESTS_DIR: &str = "manifests";
const STAGING_DIR: &str = "staging";
/// How long a SIGTERM may take before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// The daemon's pin directory inside its private bpffs mount.
const PIN_DIR: &str = "ebpf-proxy";

/// Where the daemon binary is: `$EBPF_PROXY_BIN`, else `ebpf-proxy` in the cargo target
/// profile directory that holds the running executable (tests live one level down, in
/// `deps/`). A missing binary is an error that says how to build it.
pub fn daemon_binary() -> Result<PathBuf> {
    let path = match std::env::var_os("EBPF_PROXY_BIN") {
        Some(path) => PathBuf::from(path),
        None => {
            let exe = std::env::current_exe().context("locating the running executable")?;
            let mut dir = exe.parent().context("executable has no directory")?;
            if dir.ends_with("deps") {
                dir = dir.parent().context("deps/ has no parent")?;
            }
            dir.join("ebpf-proxy")
        }
    };
    if !path.is_file() {
        bail!(
            "ebpf-proxy binary not found at {}: build it with `cargo build -p proxy-userspace` \
             or point EBPF_PROXY_BIN at it",
            path.display()
        );
    }
    Ok(path)
}

/// Configures and starts a [`Daemon`] for one node of a lab; see [`crate::Lab::daemon`]
/// and [`crate::Cluster::daemon`].
#[derive(Debug)]
pub struct DaemonBuilder<'lab> {
    node: &'lab Netns,
    node_name: String,
    manifests: Vec<Manifest>,
    /// The API server to watch instead of a manifests directory.
    api_server: Option<String>,
    /// Whether the lab mounts the daemon's bpffs (else the daemon must).
    mount_bpffs: bool,
    /// Run as root with only these capabilities (`setpriv`), if given.
    capabilities: Option<Vec<String>>,
    extra_args: Vec<String>,
    echo_log_on_drop: bool,
    /// Start this binary of the previous release first (see [`Daemon::upgrade`]).
    previous_release: Option<PathBuf>,
}

impl<'lab> DaemonBuilder<'lab> {
    /// A daemon in the `node` namespace that runs as Kubernetes node `node_name`.
    pub(crate) fn new(node: &'lab Netns, node_name: &str) -> Self {
        Self {
            node,
            node_name: node_name.to_owned(),
            manifests: Vec::new(),
            api_server: None,
            mount_bpffs: true,
            capabilities: None,
            extra_args: Vec::new(),
            echo_log_on_drop: true,
            previous_release: None,
        }
    }

    /// Starts `binary`, the previous release (see
    /// [`previous_release_binary`](crate::previous_release_binary)), with the command line
    /// it knows (it has no `--cgroup-root`); [`Daemon::upgrade`] replaces it with this one.
    pub fn previous_release(mut self, binary: PathBuf) -> Self {
        self.previous_release = Some(binary);
        self
    }

    /// A manifest present in the directory before the daemon starts.
    pub fn manifest(mut self, manifest: Manifest) -> Self {
        self.manifests.push(manifest);
        self
    }

    /// Watch the API server at `url` (a [`FakeApiServer`](crate::fake_apiserver) in the
    /// node's namespace) through a kubeconfig, instead of the manifests directory.
    pub fn api_server(mut self, url: &str) -> Self {
        self.api_server = Some(url.to_owned());
        self
    }

    /// No bpffs under the pin root: its parent is a plain empty directory, as on a node
    /// where bpffs was never mounted, so the daemon has to mount one (unmounted on drop).
    pub fn without_bpffs(mut self) -> Self {
        self.mount_bpffs = false;
        self
    }

    /// Runs the daemon the way a container runtime starts a container that drops every
    /// capability and adds back `capabilities` (names as in a securityContext: `BPF`,
    /// `NET_ADMIN`, …): still uid 0, but with exactly those, and no new privileges
    /// (`allowPrivilegeEscalation: false`), through `setpriv`.
    pub fn capabilities(mut self, capabilities: &[&str]) -> Self {
        self.capabilities = Some(capabilities.iter().map(|c| c.to_lowercase()).collect());
        self
    }

    /// Extra command-line arguments after the lab's own (`--devices`, …).
    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.extra_args.push(arg.into());
        self
    }

    /// Several extra command-line arguments.
    pub fn args<'a>(mut self, args: impl IntoIterator<Item = &'a str>) -> Self {
        self.extra_args.extend(args.into_iter().map(str::to_owned));
        self
    }

    /// Whether dropping the handle prints the daemon's log (default: yes, for tests).
    pub fn echo_log_on_drop(mut self, echo: bool) -> Self {
        self.echo_log_on_drop = echo;
        self
    }

    /// Writes the manifests and spawns `ebpf-proxy daemon` in the node namespace. The
    /// daemon is tied to the calling thread: it gets SIGTERM if that thread ends, so start
    /// and drop it on the same thread.
    pub fn start(self) -> Result<Daemon<'lab>> {
        let binary = daemon_binary()?;
        let scratch = ScratchDir::create(&format!("{}-daemon", unique_prefix()))?;
        std::fs::create_dir(scratch.path().join(MANIFESTS_DIR))?;
        std::fs::create_dir(scratch.path().join(STAGING_DIR))?;
        let bpffs_root = scratch.path().join("bpffs").join(PIN_DIR);
        let bpffs = if self.mount_bpffs {
            let bpffs = PrivateBpffs::mount_at(scratch.path().join("bpffs"))?;
            std::fs::create_dir(&bpffs_root).context("creating the bpffs root")?;
            bpffs
        } else {
            PrivateBpffs::expect_at(scratch.path().join("bpffs"))?
        };

        let mut daemon = Daemon {
            node: self.node,
            child: Mutex::new(None),
            log: Arc::default(),
            readers: Vec::new(),
            echo_log_on_drop: self.echo_log_on_drop,
            bpffs,
            cgroup: Cgroup::create("daemon")?,
            scratch,
            argv: Vec::new(),
            upgrade_argv: None,
        };
        for manifest in &self.manifests {
            daemon.apply(manifest)?;
        }

        let mut argv: Vec<OsString> = match &self.capabilities {
            Some(capabilities) => {
                let bounding: String = capabilities
                    .iter()
                    .map(|capability| format!(",+{capability}"))
                    .collect();
                vec![
                    "setpriv".into(),
                    format!("--bounding-set=-all{bounding}").into(),
                    "--inh-caps=-all".into(),
                    "--no-new-privs".into(),
                    "--".into(),
                    binary.clone().into(),
                ]
            }
            None => vec![binary.clone().into()],
        };
        argv.push("daemon".into());
        match &self.api_server {
            Some(url) => {
                ensure!(
                    self.manifests.is_empty(),
                    "a daemon watching an API server reads no manifests"
                );
                let kubeconfig = daemon.scratch.path().join("kubeconfig");
                std::fs::write(&kubeconfig, kubeconfig_for(url))
                    .with_context(|| format!("writing {}", kubeconfig.display()))?;
                argv.extend(["--kubeconfig".into(), kubeconfig.into()]);
            }
            None => {
                argv.extend(["--manifests".into(), daemon.manifests_dir().into()]);
            }
        }
        argv.extend([
            "--node-name".into(),
            self.node_name.into(),
            "--bpffs-root".into(),
            bpffs_root.into(),
            // Never the machine's root cgroup: the lab's own (see `Daemon::cgroup`).
            "--cgroup-root".into(),
            daemon.cgroup.path().into(),
        ]);
        argv.extend(self.extra_args.into_iter().map(OsString::from));
        match self.previous_release {
            Some(previous) => {
                let binary_at = argv.iter().position(|arg| *arg == *binary.as_os_str());
                let mut first = argv.clone();
                if let Some(at) = binary_at {
                    first[at] = previous.into();
                }
                if let Some(at) = first.iter().position(|arg| arg == "--cgroup-root") {
                    first.drain(at..at + 2);
                }
                daemon.argv = first;
                daemon.upgrade_argv = Some(argv);
            }
            None => daemon.argv = argv,
        }
        daemon.spawn()?;
        Ok(daemon)
    }
}

/// A running daemon. Dropping it stops the daemon (SIGTERM, then SIGKILL after 5 s),
/// unmounts its bpffs and removes its directories. Borrows its node's namespace, so it
/// always goes before the lab's namespaces do.
#[derive(Debug)]
pub struct Daemon<'lab> {
    node: &'lab Netns,
    /// In a mutex only so `wait_synced(&self)` can report the exit status.
    child: Mutex<Option<Child>>,
    log: Arc<Log>,
    readers: Vec<JoinHandle<()>>,
    echo_log_on_drop: bool,
    // Drop order: unmount before the scratch directory that holds the mount point goes;
    // the cgroup goes once the links pinned there are released with the bpffs.
    bpffs: PrivateBpffs,
    cgroup: Cgroup,
    scratch: ScratchDir,
    /// The command line, for [`Daemon::restart`].
    argv: Vec<OsString>,
    /// This release's command line while the previous release runs.
    upgrade_argv: Option<Vec<OsString>>,
}

impl Daemon<'_> {
    /// Spawns `argv` in the node namespace, its output collected into the log.
    fn spawn(&mut self) -> Result<()> {
        let (program, args) = self.argv.split_first().context("no command line")?;
        let mut command = Command::new(program);
        command
            .args(args)
            .env("NO_COLOR", "1")
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let node_namespace = self.node.open()?;
        // SAFETY: the closure runs between fork and exec and only makes two syscalls on
        // values prepared before the fork (no allocation, no locks).
        unsafe {
            command.pre_exec(move || {
                enter(&node_namespace)?;
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = command
            .spawn()
            .with_context(|| format!("spawning {}", program.to_string_lossy()))?;
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        *self.child.get_mut().expect("child lock") = Some(child);
        self.readers.push(collect_lines(stdout, self.log.clone()));
        self.readers.push(collect_lines(stderr, self.log.clone()));
        Ok(())
    }

    /// Stops the daemon (SIGTERM) and starts it again with the same command line, pins and
    /// cgroup: how a node upgrades or restarts it. Its log goes on; wait for the next sync
    /// with [`Daemon::wait_for_syncs`] (one more than [`Daemon::syncs`] before).
    pub fn restart(&mut self) -> Result<()> {
        let status = self.terminate()?;
        ensure!(
            status.success(),
            "the daemon exited with {status} when stopped"
        );
        self.spawn()
    }

    /// Sets `flag`'s value on the command line of the next [`Daemon::restart`] (replacing
    /// the one given, or adding it).
    pub fn set_arg(&mut self, flag: &str, value: &str) {
        match self.argv.iter().position(|arg| arg == flag) {
            Some(at) if at + 1 < self.argv.len() => self.argv[at + 1] = value.into(),
            _ => self.argv.extend([flag.into(), value.into()]),
        }
    }

    /// Stops the previous release (SIGTERM) and starts this release's daemon on its pins:
    /// how a DaemonSet's rolling update replaces it. Wait for the next sync as after
    /// [`Daemon::restart`].
    pub fn upgrade(&mut self) -> Result<()> {
        let argv = self
            .upgrade_argv
            .take()
            .context("not started with DaemonBuilder::previous_release")?;
        let status = self.terminate()?;
        ensure!(
            status.success(),
            "the previous release exited with {status} when stopped"
        );
        self.argv = argv;
        self.spawn()
    }

    /// Stops the daemon (SIGTERM) but keeps its pins, bpffs and cgroup until the handle
    /// drops: what `cleanup` finds on a node whose daemon was stopped.
    pub fn stop_in_place(&mut self) -> Result<ExitStatus> {
        self.terminate()
    }

    /// Writes (or replaces) a manifest atomically: the daemon never sees half a file.
    pub fn apply(&self, manifest: &Manifest) -> Result<()> {
        let staged = self
            .scratch
            .path()
            .join(STAGING_DIR)
            .join(&manifest.file_name);
        std::fs::write(&staged, &manifest.yaml)
            .with_context(|| format!("writing {}", staged.display()))?;
        std::fs::rename(&staged, self.manifests_dir().join(&manifest.file_name))
            .with_context(|| format!("installing manifest {}", manifest.file_name))
    }

    /// Writes (or replaces) a file of any contents atomically, as [`apply`](Self::apply)
    /// does: for files that are not text (a manifest that is not UTF-8).
    pub fn apply_bytes(&self, file_name: &str, contents: &[u8]) -> Result<()> {
        let staged = self.scratch.path().join(STAGING_DIR).join(file_name);
        std::fs::write(&staged, contents)
            .with_context(|| format!("writing {}", staged.display()))?;
        std::fs::rename(&staged, self.manifests_dir().join(file_name))
            .with_context(|| format!("installing {file_name}"))
    }

    /// Removes a manifest file by name.
    pub fn delete(&self, file_name: &str) -> Result<()> {
        std::fs::remove_file(self.manifests_dir().join(file_name))
            .with_context(|| format!("removing manifest {file_name}"))
    }

    /// The directory the daemon reads manifests from.
    pub fn manifests_dir(&self) -> PathBuf {
        self.scratch.path().join(MANIFESTS_DIR)
    }

    /// The private bpffs mount this daemon pins under.
    pub fn bpffs(&self) -> &Path {
        self.bpffs.path()
    }

    /// Whether a bpffs is mounted at [`bpffs`](Self::bpffs) (after
    /// [`DaemonBuilder::without_bpffs`]: whether the daemon mounted one).
    pub fn bpffs_mounted(&self) -> bool {
        self.bpffs.is_mounted()
    }

    /// The daemon's process id until it is stopped, for reading its `/proc` entries.
    pub fn pid(&self) -> Option<u32> {
        self.child
            .lock()
            .expect("child lock")
            .as_ref()
            .map(Child::id)
    }

    /// The daemon's `--cgroup-root`, a private cgroup: its socket programs see the sockets
    /// made there ([`Netns::place_in`]).
    pub fn cgroup(&self) -> &Cgroup {
        &self.cgroup
    }

    /// The daemon's `--bpffs-root` (inside [`bpffs`](Self::bpffs)): where the CLI looks.
    pub fn bpffs_root(&self) -> PathBuf {
        self.bpffs.path().join(PIN_DIR)
    }

    /// Runs the node-admin CLI, `ebpf-proxy ARGS --bpffs-root <this daemon's>`, in the
    /// node's namespace, as an admin on the node would (it reads the pins; `trace` runs
    /// programs with BPF_PROG_TEST_RUN, which send nothing anywhere, as arriving on the
    /// node's devices; `trace --connect` traces a process of the node).
    pub fn cli_output(&self, args: &[&str]) -> Result<std::process::Output> {
        let node_namespace = self.node.open()?;
        let mut command = Command::new(daemon_binary()?);
        command
            .args(args)
            .arg("--bpffs-root")
            .arg(self.bpffs_root())
            .env("NO_COLOR", "1");
        // SAFETY: setns is a plain syscall on a descriptor opened before the fork.
        unsafe { command.pre_exec(move || enter(&node_namespace)) };
        command
            .output()
            .with_context(|| format!("running ebpf-proxy {}", args.join(" ")))
    }

    /// [`cli_output`](Self::cli_output)'s stdout; a failure carries its stderr.
    pub fn cli(&self, args: &[&str]) -> Result<String> {
        stdout_of(args, self.cli_output(args)?)
    }

    /// Waits until the daemon has logged its first `sync complete`. Fails early, with the
    /// log, if the daemon exits or the timeout passes.
    pub fn wait_synced(&self, timeout: Duration) -> Result<()> {
        self.wait_for_syncs(1, timeout)
    }

    /// How many `sync complete` lines the daemon has logged.
    pub fn syncs(&self) -> usize {
        let state = self.log.state.lock().expect("log lock");
        state
            .lines
            .iter()
            .filter(|line| line.contains(SYNC_MARKER))
            .count()
    }

    /// Waits until the daemon has logged `count` `sync complete` lines (so one more than
    /// [`Daemon::syncs`] returned: the sync after a change). Fails early, with the log, if
    /// the daemon exits or the timeout passes.
    pub fn wait_for_syncs(&self, count: usize, timeout: Duration) -> Result<()> {
        self.wait_for_matching_syncs(count, "", timeout)
    }

    /// Waits until the daemon logs a `sync complete` line that contains `text` (e.g.
    /// `frontends=0 `). Fails early, with the log, if the daemon exits or the timeout passes.
    pub fn wait_for_sync_line(&self, text: &str, timeout: Duration) -> Result<()> {
        self.wait_for_matching_syncs(1, text, timeout)
    }

    /// Waits until the daemon has logged `count` `sync complete` lines that contain `text`.
    fn wait_for_matching_syncs(&self, count: usize, text: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut state = self.log.state.lock().expect("log lock");
        loop {
            let synced = |line: &&String| line.contains(SYNC_MARKER) && line.contains(text);
            if state.lines.iter().filter(synced).count() >= count {
                return Ok(());
            }
            if state.open_streams == 0 {
                drop(state);
                bail!(
                    "ebpf-proxy exited before `{SYNC_MARKER}` in netns {}: {}\n{}",
                    self.node.name(),
                    self.exit_status_text(),
                    self.log()
                );
            }
            let now = Instant::now();
            if now >= deadline {
                drop(state);
                bail!(
                    "no `{SYNC_MARKER}` #{count} with {text:?} from ebpf-proxy within \
                     {timeout:?} in netns {}\n{}",
                    self.node.name(),
                    self.log()
                );
            }
            state = self
                .log
                .changed
                .wait_timeout(state, deadline - now)
                .expect("log lock")
                .0;
        }
    }

    /// Everything the daemon printed so far.
    pub fn log(&self) -> String {
        self.log.state.lock().expect("log lock").lines.join("\n")
    }

    /// The last `sync complete` line, if any (it carries the frontend and backend counts).
    pub fn last_sync_line(&self) -> Option<String> {
        let state = self.log.state.lock().expect("log lock");
        state
            .lines
            .iter()
            .rev()
            .find(|line| line.contains(SYNC_MARKER))
            .cloned()
    }

    /// Stops the daemon with SIGTERM (SIGKILL after 5 s) and returns how it exited.
    pub fn stop(mut self) -> Result<ExitStatus> {
        self.terminate()
    }

    fn terminate(&mut self) -> Result<ExitStatus> {
        let mut child = self
            .child
            .get_mut()
            .expect("child lock")
            .take()
            .ok_or_else(|| anyhow!("already stopped"))?;
        if let Some(status) = child.try_wait()? {
            self.join_readers();
            return Ok(status);
        }
        // SAFETY: signalling our own child, which has not been reaped yet.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + STOP_GRACE;
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break status;
            }
            if Instant::now() >= deadline {
                eprintln!("proxy-lab: ebpf-proxy ignored SIGTERM for {STOP_GRACE:?}; killing it");
                child.kill()?;
                break child.wait()?;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        self.join_readers();
        Ok(status)
    }

    fn join_readers(&mut self) {
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
    }

    /// How the daemon ended, once its output streams have closed.
    fn exit_status_text(&self) -> String {
        let mut child = self.child.lock().expect("child lock");
        let Some(child) = child.as_mut() else {
            return "stopped".to_owned();
        };
        // The streams close when the process exits; give the kernel a moment to reap it.
        for _ in 0..50 {
            match child.try_wait() {
                Ok(Some(status)) => return status.to_string(),
                Ok(None) => std::thread::sleep(Duration::from_millis(10)),
                Err(error) => return format!("status unknown: {error}"),
            }
        }
        "closed its output but is still running".to_owned()
    }
}

impl Drop for Daemon<'_> {
    fn drop(&mut self) {
        let running = self.child.get_mut().is_ok_and(|child| child.is_some());
        let exit = if running {
            match self.terminate() {
                Ok(status) => status.to_string(),
                Err(error) => format!("could not be stopped: {error:#}"),
            }
        } else {
            "stopped".to_owned()
        };
        if self.echo_log_on_drop {
            eprintln!(
                "---- ebpf-proxy log (netns {}, {exit}) ----\n{}\n---- end of ebpf-proxy log ----",
                self.node.name(),
                self.log()
            );
        }
    }
}

/// A kubeconfig whose current context is `url`, without credentials (the test server
/// asks for none).
pub fn kubeconfig_for(url: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: lab\n  cluster:\n    server: {url}\n\
         users:\n- name: lab\n  user: {{}}\ncontexts:\n- name: lab\n  context:\n    \
         cluster: lab\n    user: lab\ncurrent-context: lab\n"
    )
}

/// The daemon's output, line by line, and how many of its streams are still open.
#[derive(Debug, Default)]
struct Log {
    state: Mutex<LogState>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct LogState {
    lines: Vec<String>,
    open_streams: usize,
}

fn collect_lines(stream: impl Read + Send + 'static, log: Arc<Log>) -> JoinHandle<()> {
    log.state.lock().expect("log lock").open_streams += 1;
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            log.state.lock().expect("log lock").lines.push(line);
            log.changed.notify_all();
        }
        log.state.lock().expect("log lock").open_streams -= 1;
        log.changed.notify_all();
    })
}

/// The stdout of a CLI run with `args`; a failed run is an error that carries its stderr.
fn stdout_of(args: &[&str], output: std::process::Output) -> Result<String> {
    let stdout = String::from_utf8(output.stdout)?;
    if !output.status.success() {
        bail!(
            "ebpf-proxy {} failed ({}): {}{stdout}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(stdout)
}
