//! One error type for the core; the Python bindings map each variant to a Python exception class.

use std::path::{Path, PathBuf};

/// Everything that can go wrong in the core. Messages name the file (and tensor) involved.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The path does not exist.
    #[error("{path}: no such file or directory")]
    NotFound { path: PathBuf },

    /// The operating system refused a read or write.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A dump, safetensors or .npy file that is malformed or unsupported.
    #[error("{path}{}: {msg}", tensor.as_ref().map(|t| format!(" [{t}]")).unwrap_or_default())]
    Dump {
        path: PathBuf,
        tensor: Option<String>,
        msg: String,
    },

    /// An argument that makes no sense (an unknown site, folds = 0, a vector of the wrong size).
    #[error("{0}")]
    Invalid(String),

    /// The work would need more memory than is available (or allowed); the message says how
    /// much, and which option makes it fit.
    #[error("{0}")]
    Memory(String),

    /// The work was cancelled (Ctrl-C from Python).
    #[error("cancelled")]
    Cancelled,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn dump(path: &Path, tensor: Option<&str>, msg: impl Into<String>) -> Self {
        Error::Dump {
            path: path.to_path_buf(),
            tensor: tensor.map(str::to_owned),
            msg: msg.into(),
        }
    }

    pub fn io(path: &Path, source: std::io::Error) -> Self {
        if source.kind() == std::io::ErrorKind::NotFound {
            Error::NotFound {
                path: path.to_path_buf(),
            }
        } else {
            Error::Io {
                path: path.to_path_buf(),
                source,
            }
        }
    }
}
