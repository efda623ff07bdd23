//! placeholder
use crate::error::ErrorCode;
#[derive(Debug, Clone, thiserror::Error)]
pub enum TransferError { #[error("x")] X }
impl TransferError { pub fn code(&self) -> ErrorCode { ErrorCode::Protocol } }
pub enum Op { Read }
pub enum TransportKind { Tcp }
