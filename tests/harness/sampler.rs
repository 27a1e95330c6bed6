//! Watches one ref in several bare repositories from background threads, to
//! catch a value that is there for a moment only (SPEC §3: a replica's ref
//! never steps back, "not even for a millisecond").
//!
//! Each repository gets its own thread, which reads the ref every 0.6 ms or
//! so (a read plus a 0.5 ms pause; on a loaded 2-core machine the mean was
//! 0.63 ms and the longest gap 15 ms; [`History::summary`] reports both). A sample reads the files git
//! keeps (`<repo>/<ref>`, else `<repo>/packed-refs`) instead of running git,
//! which would take milliseconds per sample. Git and libgit2 replace a loose
//! ref by renaming a lock file over it, so a sample never sees half a value.
//!
//! ```ignore
//! let sampler = RefSampler::start(&repos, "refs/heads/main");
//! // ... push, kill, restart ...
//! for h in sampler.stop() {
//!     assert!(h.violations(&repo_with_all_objects).is_empty());
//! }
//! ```

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::git;

/// The pause between two samples of one repository.
const PAUSE: Duration = Duration::from_micros(500);

/// One observed change: when, and the value from then on (None: absent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub at: Instant,
    pub value: Option<String>,
}

/// Everything one thread saw in one repository.
#[derive(Debug, Clone)]
pub struct History {
    pub repo: PathBuf,
    pub ref_name: String,
    /// When sampling began (the reference point of the offsets in messages).
    pub started: Instant,
    /// The first sample, then one entry per change of value.
    pub changes: Vec<Change>,
    /// How many times the ref was read.
    pub samples: u64,
    /// The longest time between two consecutive samples.
    pub max_gap: Duration,
    /// When sampling stopped.
    pub ended: Instant,
}

/// Background threads sampling `ref_name` in each repository until [`RefSampler::stop`].
pub struct RefSampler {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<History>>,
}

impl RefSampler {
    /// Starts one sampling thread per repository. The first sample of each
    /// is taken before this returns, so a change made afterwards is seen.
    pub fn start(repos: &[PathBuf], ref_name: &str) -> RefSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = repos
            .iter()
            .map(|repo| {
                let first = read_ref(repo, ref_name);
                let (repo, ref_name, stop) = (repo.clone(), ref_name.to_string(), stop.clone());
                std::thread::spawn(move || sample(repo, ref_name, first, &stop))
            })
            .collect();
        RefSampler { stop, threads }
    }

    /// Stops the threads; returns one history per repository, in the order given to `start`.
    pub fn stop(mut self) -> Vec<History> {
        self.stop.store(true, Ordering::Relaxed);
        std::mem::take(&mut self.threads)
            .into_iter()
            .map(|t| t.join().expect("a sampler thread panicked"))
            .collect()
    }
}

impl Drop for RefSampler {
    /// A test that panics before `stop` must not leave threads spinning.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn sample(repo: PathBuf, ref_name: String, first: Option<String>, stop: &AtomicBool) -> History {
    let started = Instant::now();
    let mut h = History {
        repo,
        ref_name,
        started,
        changes: vec![Change {
            at: started,
            value: first,
        }],
        samples: 1,
        max_gap: Duration::ZERO,
        ended: started,
    };
    let mut last = started;
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(PAUSE);
        let value = read_ref(&h.repo, &h.ref_name);
        let now = Instant::now();
        h.samples += 1;
        h.max_gap = h.max_gap.max(now - last);
        last = now;
        if h.changes.last().map(|c| &c.value) != Some(&value) {
            h.changes.push(Change { at: now, value });
        }
    }
    h.ended = last;
    h
}

/// The value of a full ref name in a bare repository, read from the loose
/// ref file, else from `packed-refs`; None if neither has it.
pub fn read_ref(repo: &Path, ref_name: &str) -> Option<String> {
    if let Ok(s) = std::fs::read_to_string(repo.join(ref_name)) {
        return Some(s.trim().to_string());
    }
    let packed = std::fs::read_to_string(repo.join("packed-refs")).ok()?;
    packed
        .lines()
        .filter(|l| !l.starts_with('#') && !l.starts_with('^'))
        .filter_map(|l| l.split_once(' '))
        .find(|(_, name)| *name == ref_name)
        .map(|(id, _)| id.to_string())
}

impl History {
    /// One line on how well the ref was watched: changes, samples, mean and longest gap.
    pub fn summary(&self) -> String {
        let span = self.ended - self.started;
        format!(
            "{}: {} changes in {} samples over {:?} (every {:?} on average, longest gap {:?})",
            self.repo.display(),
            self.changes.len(),
            self.samples,
            span,
            span / (self.samples.max(1) as u32),
            self.max_gap
        )
    }

    /// Every change that was not a step forward, one line each: a value
    /// replaced by one that does not descend from it (checked with `git
    /// merge-base --is-ancestor` in `objects`, a repository that has every
    /// commit involved), or the ref disappearing. Creation is a step forward.
    pub fn violations(&self, objects: &Path) -> Vec<String> {
        let mut found = Vec::new();
        for (i, pair) in self.changes.windows(2).enumerate() {
            let (old, new) = (&pair[0], &pair[1]);
            let wrong = match (&old.value, &new.value) {
                (None, _) => None,
                (Some(_), None) => Some("the ref disappeared".to_string()),
                (Some(o), Some(n)) => {
                    let out = git::git(objects, &["merge-base", "--is-ancestor", o, n]);
                    match out.status.code() {
                        Some(0) => None,
                        Some(1) => Some(format!("{n} does not descend from {o}")),
                        _ => Some(format!(
                            "cannot compare {o} with {n} in {}: {}",
                            objects.display(),
                            super::stderr(&out).trim()
                        )),
                    }
                }
            };
            if let Some(why) = wrong {
                // How long the bad value stood tells a blip from a real regression.
                let stood = self
                    .changes
                    .get(i + 2)
                    .map(|next| format!("{} ms", (next.at - new.at).as_millis()))
                    .unwrap_or_else(|| "until the end".to_string());
                found.push(format!(
                    "{} {} at +{} ms: {why} (it stood {stood})",
                    self.repo.display(),
                    self.ref_name,
                    (new.at - self.started).as_millis()
                ));
            }
        }
        found
    }
}
