//! The crate's error type for workloads, transports and runs; the testbed has its own
//! [`crate::testbed::TestbedError`], wrapped here.

use std::net::SocketAddr;
use std::path::PathBuf;

use crate::testbed::TestbedError;

/// Everything that can stop a load-generation run.
#[derive(Debug, thiserror::Error)]
pub enum LoadgenError {
    /// A flag or file value could not be parsed.
    #[error("cannot parse {what} from {input:?}")]
    Parse {
        /// What was expected ("duration", "number", ...).
        what: &'static str,
        /// The text given.
        input: String,
    },
    /// The workload is inconsistent (e.g. keys too short for the key count).
    #[error("invalid workload: {field}: {reason}")]
    Workload {
        /// The offending field, as named in the TOML file.
        field: &'static str,
        /// Why it is rejected.
        reason: String,
    },
    /// The workload file could not be read.
    #[error("cannot read workload file {path}: {source}")]
    ReadWorkload {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The workload file is not valid TOML for a workload.
    #[error("cannot parse workload file {path}: {source}")]
    ParseWorkload {
        /// The file.
        path: PathBuf,
        /// The TOML error, with line and column.
        source: Box<toml::de::Error>,
    },
    /// A socket to a server could not be opened or configured.
    #[error("cannot {op} {proto} socket to {server}: {source}")]
    Connect {
        /// What failed ("connect", "bind", "configure").
        op: &'static str,
        /// "udp" or "tcp".
        proto: &'static str,
        /// The server.
        server: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The populate phase failed.
    #[error("populate failed on {server}: {reason}")]
    Populate {
        /// The server.
        server: SocketAddr,
        /// What went wrong.
        reason: String,
    },
    /// A worker thread failed.
    #[error("worker {worker} failed: {reason}")]
    Worker {
        /// Worker index.
        worker: usize,
        /// What went wrong.
        reason: String,
    },
    /// Joining a network namespace failed.
    #[error("cannot enter network namespace {netns}: {source}")]
    Netns {
        /// The namespace name or path.
        netns: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// Writing a result file failed.
    #[error("cannot write {path}: {reason}")]
    Output {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// SIGINT or SIGTERM arrived; the run stopped early (see [`crate::interrupt`]).
    #[error("interrupted by {}", crate::interrupt::signal_name(*signal))]
    Interrupted {
        /// The signal number.
        signal: i32,
    },
    /// Not one request was answered.
    #[error(
        "no replies: is memcached reachable at {servers}? ({sent} requests sent, {timeouts} timed \
         out after --timeout {timeout})"
    )]
    NoReplies {
        /// The servers, comma-separated.
        servers: String,
        /// Requests sent in the measurement window.
        sent: u64,
        /// Of those, timed out.
        timeouts: u64,
        /// The loss deadline, as written on the command line.
        timeout: String,
    },
    /// A testbed operation failed (boxed: testbed errors carry log excerpts).
    #[error(transparent)]
    Testbed(Box<TestbedError>),
}

impl From<TestbedError> for LoadgenError {
    fn from(e: TestbedError) -> Self {
        match e {
            // One kind of interruption, whichever layer noticed it.
            TestbedError::Interrupted { signal } => Self::Interrupted { signal },
            e => Self::Testbed(Box::new(e)),
        }
    }
}
