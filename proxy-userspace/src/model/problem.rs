//! What the sources and the planner report: an object or field not programmed as
//! written, with the sentence that names it, and the labels it is counted under.

use std::fmt;

use super::{ObjectKey, SERVICE_NAME_LABEL};

/// What kind of input a [`Problem`] is about (the `kind` label of
/// `ebpf_proxy_objects_rejected_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ProblemKind {
    Service,
    EndpointSlice,
    /// A whole manifest file (unreadable, too large, not YAML, over a parsing limit).
    File,
}

impl ProblemKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ProblemKind::Service => "Service",
            ProblemKind::EndpointSlice => "EndpointSlice",
            ProblemKind::File => "file",
        }
    }
}

/// Something in the input that is not programmed as written: an object or field skipped,
/// with the sentence that names it and why. Every one is logged and counted
/// (`ebpf_proxy_objects_rejected_total{kind,reason}`); nothing is dropped silently.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Problem {
    pub kind: ProblemKind,
    /// A short snake_case cause, the metric's `reason` label (`invalid`, `frontend_conflict`…).
    pub reason: &'static str,
    /// One sentence naming the object, e.g. `default/foo port sctp-port: SCTP is not
    /// supported, skipped`.
    pub message: String,
}

impl Problem {
    pub fn new(kind: ProblemKind, reason: &'static str, message: String) -> Self {
        Problem {
            kind,
            reason,
            message,
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl PartialEq<&str> for Problem {
    fn eq(&self, other: &&str) -> bool {
        self.message == *other
    }
}

/// Why an object can't enter the model.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ModelError {
    #[error("metadata.name is missing")]
    MissingName,
    #[error("EndpointSlice {slice} has no {SERVICE_NAME_LABEL} label")]
    MissingServiceNameLabel { slice: ObjectKey },
}

impl ModelError {
    /// The same refusal as a [`Problem`], for logging and counting.
    pub fn problem(&self, kind: ProblemKind) -> Problem {
        let reason = match self {
            ModelError::MissingName => "missing_name",
            ModelError::MissingServiceNameLabel { .. } => "missing_service_name",
        };
        Problem::new(kind, reason, self.to_string())
    }
}
