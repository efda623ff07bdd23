//! What a transfer does and which transport moves it, as plain data that metadata, metrics and
//! errors name: a leaf below the transports.

/// What a transfer does, seen from the initiator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// Remote memory → local memory.
    Read,
    /// Local memory → remote memory.
    Write,
    /// No data, only a notification delivered to the peer.
    Notify,
}

impl std::fmt::Display for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Op::Read => "read",
            Op::Write => "write",
            Op::Notify => "notify",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum TransportKind {
    Tcp,
    /// libfabric (RDMA NICs, or its tcp and shm providers).
    Fabric,
    /// Shared memory between processes of one host.
    Shm,
    /// CUDA IPC between processes on one host (`cuda` feature). Known to every build, so metadata
    /// that offers it can still be read where it is not compiled in.
    CudaIpc,
}

impl TransportKind {
    pub const ALL: &'static [TransportKind] =
        &[TransportKind::Tcp, TransportKind::Fabric, TransportKind::Shm, TransportKind::CudaIpc];

    pub fn name(self) -> &'static str {
        match self {
            TransportKind::Tcp => "tcp",
            TransportKind::Fabric => "fabric",
            TransportKind::Shm => "shm",
            TransportKind::CudaIpc => "cuda-ipc",
        }
    }

    pub fn to_wire(self) -> u8 {
        match self {
            TransportKind::Tcp => 1,
            TransportKind::Fabric => 2,
            TransportKind::Shm => 3,
            TransportKind::CudaIpc => 4,
        }
    }

    pub fn from_wire(tag: u8) -> Option<TransportKind> {
        match tag {
            1 => Some(TransportKind::Tcp),
            2 => Some(TransportKind::Fabric),
            3 => Some(TransportKind::Shm),
            4 => Some(TransportKind::CudaIpc),
            _ => None,
        }
    }
}

impl std::fmt::Display for TransportKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Where a peer reaches one of an agent's transports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub kind: TransportKind,
    pub address: String,
}
