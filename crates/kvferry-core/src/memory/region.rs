//! Where bytes live, as plain data every layer names: a leaf below memory's devices and the
//! transports.

/// Where a region lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MemKind {
    Host,
    Cuda { device: u32 },
    Rocm { device: u32 },
}

impl MemKind {
    /// Wire encoding: (tag, device ordinal).
    pub fn to_wire(self) -> (u8, u32) {
        match self {
            MemKind::Host => (0, 0),
            MemKind::Cuda { device } => (1, device),
            MemKind::Rocm { device } => (2, device),
        }
    }

    pub fn from_wire(tag: u8, device: u32) -> Option<MemKind> {
        match tag {
            0 => Some(MemKind::Host),
            1 => Some(MemKind::Cuda { device }),
            2 => Some(MemKind::Rocm { device }),
            _ => None,
        }
    }
}

impl std::fmt::Display for MemKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MemKind::Host => write!(f, "host"),
            MemKind::Cuda { device } => write!(f, "cuda:{device}"),
            MemKind::Rocm { device } => write!(f, "rocm:{device}"),
        }
    }
}

/// A span of bytes in some memory. Plain data: holding one does not keep the memory alive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MemRegion {
    pub addr: u64,
    pub len: u64,
    pub kind: MemKind,
}

impl MemRegion {
    pub fn host(ptr: *const u8, len: usize) -> Self {
        MemRegion { addr: ptr as u64, len: len as u64, kind: MemKind::Host }
    }

    /// One past the last byte, or `None` when `addr + len` overflows.
    pub fn end(&self) -> Option<u64> {
        self.addr.checked_add(self.len)
    }

    /// Whether `[addr, addr + len)` lies inside this region (same kind assumed by the caller).
    pub fn contains(&self, addr: u64, len: u64) -> bool {
        match (addr.checked_add(len), self.end()) {
            (Some(end), Some(self_end)) => addr >= self.addr && end <= self_end,
            _ => false,
        }
    }
}
