//! Following the manifests directory: inotify says at once which files changed, and a poll
//! (`--manifests-poll-ms`) catches what inotify can't see (a symlink to a file elsewhere
//! edited in place) or when inotify is not available. Every look is cheap (names and
//! metadata); each changed file is read and parsed by a blocking task of its own, so a huge
//! or hostile file never holds up the event loop, and the files that parse first reach the
//! model first.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::BoxStream;
use inotify::{Inotify, WatchMask};
use tokio::task::JoinSet;
use tokio::time::Interval;
use tracing::{debug, error, info, warn};

use super::{FileReadResult, FileToRead, ManifestSource, ParseLimits};
use crate::model::Model;

/// The manifests directory, followed.
pub struct ManifestWatcher {
    source: ManifestSource,
    /// Names of changed entries; `None` when only polling works.
    events: Option<BoxStream<'static, std::io::Result<OsString>>>,
    poll: Interval,
    reads: JoinSet<(FileToRead, FileReadResult)>,
    in_flight: BTreeSet<PathBuf>,
    /// Files an event named since the last look (read whatever their metadata says), or
    /// that changed again while being read.
    named: BTreeSet<PathBuf>,
    /// A look is due (an event came, or a read ended that must be repeated).
    look_due: bool,
    /// Whether the first look's files have all been read and applied.
    loaded: bool,
    /// The first load completed and [`changed`](ManifestWatcher::changed) has not returned
    /// since.
    newly_loaded: bool,
    /// The last error reading the directory, so it is logged once.
    dir_error: Option<std::io::ErrorKind>,
}

impl ManifestWatcher {
    /// Follows `dir`; the first look happens on the first [`changed`](Self::changed).
    pub fn new(dir: PathBuf, limits: ParseLimits, poll_interval: Duration) -> Self {
        let events = match watch(&dir) {
            Ok(events) => Some(events),
            Err(error) => {
                warn!(dir = %dir.display(), %error, "inotify unavailable; polling the manifests directory");
                None
            }
        };
        ManifestWatcher {
            source: ManifestSource::new(dir, limits),
            events,
            // The first tick is immediate: the initial load.
            poll: tokio::time::interval(poll_interval),
            reads: JoinSet::new(),
            in_flight: BTreeSet::new(),
            named: BTreeSet::new(),
            look_due: false,
            loaded: false,
            newly_loaded: false,
            dir_error: None,
        }
    }

    /// Whether every file found at start-up has been read: before that, programming the
    /// model would delete the frontends of files not read yet.
    pub fn has_synced(&self) -> bool {
        self.loaded
    }

    /// Waits until the model changed (a file read, one removed). Cancel safe: every state
    /// lives in `self` between awaits.
    pub async fn changed(&mut self, model: &mut Model) {
        let start = model.revision();
        loop {
            if self.look_due {
                self.look_due = false;
                self.look(model);
            }
            let loaded_now = std::mem::take(&mut self.newly_loaded);
            if model.revision() != start || loaded_now {
                return;
            }
            tokio::select! {
                Some(joined) = self.reads.join_next(), if !self.reads.is_empty() => {
                    let (file, read) = match joined {
                        Ok(done) => done,
                        Err(error) => {
                            error!(%error, "reading a manifest failed");
                            continue;
                        }
                    };
                    self.in_flight.remove(&file.path);
                    self.source.apply(&file, read, model);
                    if self.named.contains(&file.path) {
                        self.look_due = true;
                    }
                    self.note_loaded();
                }
                Some(event) = next_event(&mut self.events) => {
                    match event {
                        Ok(name) => {
                            self.named.insert(self.source.dir().join(name));
                        }
                        Err(error) => {
                            warn!(%error, "inotify failed; polling the manifests directory");
                            self.events = None;
                        }
                    }
                    self.look_due = true;
                }
                _ = self.poll.tick() => self.look_due = true,
            }
        }
    }

    /// Looks at the directory: removed files leave the model now, changed ones are read
    /// off the loop.
    fn look(&mut self, model: &mut Model) {
        let scan = match self.source.scan(&self.named) {
            Ok(scan) => {
                self.dir_error = None;
                scan
            }
            Err(error) => {
                if self.dir_error != Some(error.kind()) {
                    error!(
                        dir = %self.source.dir().display(),
                        %error,
                        "reading the manifests directory failed; keeping the last good state"
                    );
                    self.dir_error = Some(error.kind());
                }
                // The first look counts as done: the daemon keeps what is pinned.
                self.note_loaded();
                return;
            }
        };
        for path in &scan.removed {
            if !self.in_flight.contains(path) {
                self.source.remove(path, model);
            }
        }
        for file in scan.to_read {
            if self.in_flight.contains(&file.path) {
                // Read again once the read under way ends.
                self.named.insert(file.path);
                continue;
            }
            self.named.remove(&file.path);
            self.in_flight.insert(file.path.clone());
            let limits = *self.source.limits();
            self.reads.spawn_blocking(move || {
                yield_to_the_event_loop();
                let read = ManifestSource::read(&limits, &file);
                (file, read)
            });
        }
        self.note_loaded();
    }

    /// The first load is complete once no read is under way.
    fn note_loaded(&mut self) {
        if self.reads.is_empty() && !self.loaded {
            self.loaded = true;
            self.newly_loaded = true;
            info!(dir = %self.source.dir().display(), "manifests loaded");
        }
    }
}

/// How much less a thread that parses manifests counts for the scheduler than the event
/// loop (nice 10: a tenth of its weight). On a node of two cores a 50 MB manifest keeps
/// both busy for seconds; syncs must not wait for it.
const PARSER_NICE: libc::c_int = 10;

/// Lowers the calling thread's priority to [`PARSER_NICE`] (the threads it starts to parse
/// in parts inherit it). Only manifest reads run on the blocking pool, so the pool's
/// threads all keep it.
fn yield_to_the_event_loop() {
    // SAFETY: setpriority on the calling thread (who = 0; Linux's nice is per thread) only
    // changes its scheduling weight. Raising nice needs no privilege.
    let failed = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, PARSER_NICE) } != 0;
    if failed {
        debug!(error = %std::io::Error::last_os_error(), "could not lower the parser's priority");
    }
}

/// The next changed name, or never without inotify.
async fn next_event(
    events: &mut Option<BoxStream<'static, std::io::Result<OsString>>>,
) -> Option<std::io::Result<OsString>> {
    match events {
        Some(events) => events.next().await,
        None => std::future::pending().await,
    }
}

/// The names of entries of `dir` that are written, created, renamed or removed.
fn watch(dir: &std::path::Path) -> std::io::Result<BoxStream<'static, std::io::Result<OsString>>> {
    let inotify = Inotify::init()?;
    inotify.watches().add(
        dir,
        WatchMask::CREATE
            | WatchMask::CLOSE_WRITE
            | WatchMask::MOVED_TO
            | WatchMask::MOVED_FROM
            | WatchMask::DELETE
            | WatchMask::ATTRIB,
    )?;
    let stream = inotify.into_event_stream(vec![0; 16 * 1024])?;
    Ok(stream
        .map(|event| event.map(|event| event.name.unwrap_or_default()))
        .boxed())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The nice value of each thread of this process (field 19 of its stat).
    fn thread_nices() -> Vec<i32> {
        let tasks = std::fs::read_dir("/proc/self/task").unwrap();
        tasks
            .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("stat")).ok())
            .filter_map(|stat| {
                // The command name may hold spaces: fields count from after its ')'.
                let after_name = &stat[stat.rfind(')')? + 2..];
                after_name.split_whitespace().nth(16)?.parse().ok()
            })
            .collect()
    }

    #[tokio::test]
    async fn manifests_are_parsed_at_a_lower_priority_than_the_event_loop() {
        let dir =
            std::env::temp_dir().join(format!("ebpf-proxy-watch-nice-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("a.yaml"),
            "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {clusterIP: 198.19.0.1}\n",
        )
        .unwrap();
        let mut watcher = ManifestWatcher::new(
            dir.clone(),
            ParseLimits::default(),
            Duration::from_millis(10),
        );
        let mut model = Model::default();
        let loaded =
            tokio::time::timeout(Duration::from_secs(5), watcher.changed(&mut model)).await;
        let nices = thread_nices();
        std::fs::remove_dir_all(&dir).unwrap();
        loaded.expect("the directory is loaded");
        assert_eq!(model.services().count(), 1);
        assert!(
            nices.contains(&PARSER_NICE),
            "no parser thread at nice {PARSER_NICE}: {nices:?}"
        );
        // SAFETY: getpriority only reads the calling thread's nice value.
        let own = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
        assert_eq!(own, 0, "the event loop's thread keeps its priority");
    }
}
