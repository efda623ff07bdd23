//! The pieces of the `kvferry` command, also used by its tests.

pub mod bench;
pub mod cli;
pub mod gpu_bench;
pub mod info;
pub mod pattern;
pub mod serve;
pub mod soak;
pub mod tier_bench;
pub mod units;
