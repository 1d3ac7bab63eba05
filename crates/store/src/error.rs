use thiserror::Error;

/// Why a store could not be created or a queue opened.
#[derive(Debug, Error)]
pub enum StoreError {
    #[error("{what}: {source}")]
    Os {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    TooLarge(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Invalid(String),
}

impl StoreError {
    /// Wraps an OS error (rustix's `Errno` or std's) with what was being done.
    pub fn os(what: impl Into<String>, source: impl Into<std::io::Error>) -> Self {
        StoreError::Os {
            what: what.into(),
            source: source.into(),
        }
    }

    /// Wraps the last OS error with what was being done.
    pub fn last_os(what: impl Into<String>) -> Self {
        StoreError::Os {
            what: what.into(),
            source: std::io::Error::last_os_error(),
        }
    }
}
