//! Which boot of which host this process runs in, for the transports that reach only peers sharing
//! its kernel (shm, cuda-ipc).

use crate::error::{Error, Result};

/// This host's boot id: peers with the same one share the kernel, so shared memory and device IPC
/// handles can reach them.
pub fn boot_id() -> Result<String> {
    let path = "/proc/sys/kernel/random/boot_id";
    let id = std::fs::read_to_string(path).map_err(|e| Error::io(format!("reading {path}"), e))?;
    Ok(id.trim().to_string())
}
