//! Progress of a long job — a snapshot's tables, a replay's messages: a bar on stderr when
//! it is a terminal, otherwise a log line every [`LOG_EVERY`] (a connector in a container
//! has no terminal, and its operator reads logs). Counts only, never values.

use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tracing::info;

pub const LOG_EVERY: Duration = Duration::from_secs(10);

/// One part of a job at a time (a table, the topics), each with its own count and total.
#[derive(Debug)]
pub struct Progress {
    job: &'static str,
    bar: ProgressBar,
    part: Mutex<Part>,
}

#[derive(Debug)]
struct Part {
    name: String,
    done: u64,
    /// What the job expects: an estimate (a table's statistics) or exact (a partition's end).
    total: Option<u64>,
    logged: Instant,
}

impl Progress {
    /// Progress of `job` (`snapshot`, `replay`).
    pub fn new(job: &'static str) -> Self {
        let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix} {msg:24} [{bar:30}] {human_pos}/{human_len} ({elapsed}, {eta} left)",
            )
            .expect("a valid template")
            .progress_chars("=> "),
        );
        bar.set_prefix(job);
        Self {
            job,
            bar,
            part: Mutex::new(Part {
                name: String::new(),
                done: 0,
                total: None,
                logged: Instant::now(),
            }),
        }
    }

    /// Begin the part `name`, expecting about `total` items when known, `done` of them
    /// already (a part resumed after a restart).
    pub fn start(&self, name: &str, total: Option<u64>, done: u64) {
        let mut part = self.part();
        *part = Part {
            name: name.to_owned(),
            done,
            total: total.map(|total| total.max(done)),
            logged: Instant::now(),
        };
        self.bar.reset();
        self.bar.set_length(part.total.unwrap_or(0));
        self.bar.set_position(done);
        self.bar.set_message(name.to_owned());
        if done == 0 {
            info!(job = %self.job, part = %name, expected = total, "started");
        } else {
            info!(job = %self.job, part = %name, done, expected = total, "resumed");
        }
    }

    /// Whether the part under way is `name`.
    pub fn is_on(&self, name: &str) -> bool {
        self.part().name == name
    }

    /// `n` more items of the current part done.
    pub fn advance(&self, n: u64) {
        let mut part = self.part();
        part.done += n;
        if part.total.is_some_and(|total| part.done > total) {
            // An estimate that fell short.
            part.total = Some(part.done);
            self.bar.set_length(part.done);
        }
        self.bar.inc(n);
        if self.bar.is_hidden() && part.logged.elapsed() >= LOG_EVERY {
            part.logged = Instant::now();
            info!(job = %self.job, part = %part.name, done = part.done, expected = part.total, "in progress");
        }
    }

    /// The current part is done (and none is under way until the next starts).
    pub fn finish(&self) {
        let mut part = self.part();
        self.bar.finish_and_clear();
        info!(job = %self.job, part = %part.name, done = part.done, "done");
        part.name.clear();
    }

    fn part(&self) -> std::sync::MutexGuard<'_, Part> {
        self.part
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}
