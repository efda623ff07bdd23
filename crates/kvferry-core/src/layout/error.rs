//! Layout errors.

use crate::error::code::ErrorCode;

#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum LayoutError {
    #[error("invalid layout: {0}")]
    Invalid(String),
    #[error("block {block} is out of range (the cache has {num_blocks} blocks)")]
    BlockOutOfRange { block: u32, num_blocks: u32 },
    #[error("layouts are incompatible: {0}")]
    Incompatible(String),
    #[error("layout size overflows 64 bits")]
    Overflow,
}

impl LayoutError {
    pub fn code(&self) -> ErrorCode {
        match self {
            LayoutError::Invalid(_) => ErrorCode::LayoutInvalid,
            LayoutError::BlockOutOfRange { .. } => ErrorCode::BlockOutOfRange,
            LayoutError::Incompatible(_) => ErrorCode::LayoutIncompatible,
            LayoutError::Overflow => ErrorCode::LayoutOverflow,
        }
    }
}
