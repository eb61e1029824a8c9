//! rank1fast-core: streaming statistics of activation dumps, the least-squares constant
//! direction per site, the tensors of rank-1 LoRA adapters, and merging adapters into
//! checkpoints. Pure Rust, no Python.

pub mod adapter;
pub mod analyze;
pub mod dtype;
pub mod error;
pub mod gram;
pub mod krylov;
pub mod merge;
pub mod rowstats;
pub mod solve;
pub mod source;
pub mod stats;

pub use analyze::{analyze, AnalyzeOptions, Progress};
pub use dtype::DType;
pub use error::{Error, Result};
pub use solve::{
    best_onehot, constant_direction, constant_direction_with, default_ridges, DirectionFit,
    OneHotFit, Solver,
};
pub use stats::SiteStats;
