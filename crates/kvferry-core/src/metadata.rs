//! placeholder
use crate::error::ErrorCode;
#[derive(Debug, Clone, thiserror::Error)]
pub enum MetadataError { #[error("x")] X }
impl MetadataError { pub fn code(&self) -> ErrorCode { ErrorCode::Protocol } }
