//! Host memory device (placeholder: the full implementation replaces this file).
pub struct HostAllocOptions;
pub struct HostBuffer;
pub struct HostDevice;
