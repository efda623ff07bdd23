//! The intra-node GPU transport: peers on one host exchange CUDA IPC handles in their metadata, map
//! each other's device memory once, and copy device to device on the local device's copy stream
//! (over NVLink where the GPUs have it, PCIe otherwise).
//!
//! - **Key**: a registered region's key is its exported IPC handle (vendor handle and offset).
//! - **Endpoint**: `host-id@notifier`, where host-id is the kernel's boot id, so that peers on other
//!   hosts (which cannot open the handles) are told apart and reached by another transport; and
//!   the notifier is a loopback TCP transport that carries notifications only.
//! - **Data**: a batch becomes one `copy_batch` on the device (one `cuMemcpyBatchAsync` where the
//!   driver has it); the link's lane of the transport's completion threads waits for its event,
//!   then sends the notification, so a notification never overtakes its data.
//! - **Trust**: an IPC handle opens the whole allocation to whoever holds it, so the owner cannot
//!   check each access as the TCP target does. Handles travel only in metadata, to peers the agent
//!   added; ranges are checked on the initiator against the regions the owner published.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use crate::auth::Auth;
use crate::deadline::Deadline;
use crate::error::{Error, Result};
use crate::memory::cuda::CudaDevice;
use crate::memory::{CopyFence, CopyOp, Device, IpcHandle, MemKind, MemRegion, Memory};
use crate::sync::Locked;
use crate::transport::host::boot_id;
use crate::transport::progress::{Lane, LaneWork, Progress};
use crate::transport::staging::ABANDON_AFTER;
use crate::transport::tcp::{TcpConfig, TcpTransport};
use crate::transport::{
    Batch, Completion, Endpoint, MemoryOwner, NotificationQueue, Op, PeerLink, RejectReason, RemoteRegion,
    TransferError, Transport, TransportKind, XferOp, no_key_on_link,
};

/// The `cuda-ipc` transport's settings.
#[derive(Clone)]
pub struct CudaIpcConfig {
    /// The GPU whose memory this agent registers and whose copy stream moves the data.
    pub device: CudaDevice,
}

impl std::fmt::Debug for CudaIpcConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaIpcConfig").field("device", &self.device.name()).finish()
    }
}

/// Threads waiting for every link's copies to finish, whatever the number of peers: the copies
/// themselves run on the device.
const COMPLETION_THREADS: usize = 2;

pub struct CudaIpcTransport {
    device: CudaDevice,
    host_id: String,
    endpoint: Endpoint,
    /// Carries notifications between peers on this host (no memory is registered with it).
    notifier: TcpTransport,
    completions: Progress<InOrder>,
}

impl CudaIpcTransport {
    pub fn start(
        local_name: &str,
        config: CudaIpcConfig,
        auth: Auth,
        notifications: Arc<NotificationQueue>,
    ) -> Result<Self> {
        let loopback = TcpConfig { listen: SocketAddr::from(([127, 0, 0, 1], 0)), ..TcpConfig::default() };
        let notifier = TcpTransport::start(local_name, loopback, auth, notifications)?;
        // This boot of this host: processes that share it can open each other's IPC handles.
        let host_id = boot_id()?;
        let address = format!("{host_id}@{}", notifier.endpoint().address);
        Ok(CudaIpcTransport {
            device: config.device,
            host_id,
            endpoint: Endpoint { kind: TransportKind::CudaIpc, address },
            notifier,
            completions: Progress::new(&format!("kvf-ipc-{local_name}"), COMPLETION_THREADS, None),
        })
    }
}

/// Splits a `host-id@notifier` endpoint address.
pub(crate) fn parse_address(address: &str) -> Result<(&str, &str)> {
    address
        .split_once('@')
        .filter(|(host, notifier)| !host.is_empty() && !notifier.is_empty())
        .ok_or_else(|| Error::InvalidArgument(format!("malformed cuda-ipc endpoint {address:?}")))
}

impl Transport for CudaIpcTransport {
    fn kind(&self) -> TransportKind {
        TransportKind::CudaIpc
    }

    fn endpoint(&self) -> Endpoint {
        self.endpoint.clone()
    }

    fn supports(&self, kind: MemKind) -> bool {
        kind == self.device.kind()
    }

    fn register(&self, region: MemRegion, _owner: MemoryOwner) -> Result<Vec<u8>> {
        // The exported handle names memory the registration keeps alive; peers' mappings stay valid
        // until they close them, as CUDA defines.
        Ok(self.device.export_ipc(region)?.bytes)
    }

    fn deregister(&self, _key: &[u8]) {
        // A CUDA IPC handle cannot be revoked: peers that mapped it keep the mapping until they
        // drop their link. Deregistration removes the region from metadata, so new peers never see
        // it and peers that refresh their view replace their link.
    }

    fn link(&self, peer: &str, endpoint: &Endpoint, regions: Vec<RemoteRegion>) -> Result<Arc<dyn PeerLink>> {
        let (host, notifier) = parse_address(&endpoint.address)?;
        if host != self.host_id {
            return Err(Error::Unsupported {
                what: format!("cuda-ipc to peer {peer}"),
                why: "the peer runs on another host".into(),
            });
        }
        let notify = self.notifier.link(
            peer,
            &Endpoint { kind: TransportKind::Tcp, address: notifier.to_string() },
            Vec::new(),
        )?;
        let regions = regions.into_iter().map(|r| (r, None)).collect();
        Ok(Arc::new(CudaIpcLink {
            peer: peer.to_string(),
            device: self.device.clone(),
            regions: Mutex::new(regions),
            completions: self.completions.lane(InOrder { notify }),
        }))
    }
}

/// A peer's region and, once used, where it is mapped in this process.
type PeerRegion = (RemoteRegion, Option<Arc<dyn Memory>>);

/// A posted batch waiting for its copies.
struct Job {
    fence: Option<CopyFence>,
    batch: Batch,
}

struct CudaIpcLink {
    peer: String,
    device: CudaDevice,
    /// The peer's regions and, once used, their mapping here (imported on first use, kept).
    regions: Mutex<Vec<PeerRegion>>,
    completions: Lane<InOrder>,
}

impl CudaIpcLink {
    /// Where the peer's side of op `index` of a batch is mapped in this process; `regions` is the
    /// locked [`regions`](Self::regions).
    fn mapped(&self, regions: &mut [PeerRegion], index: usize, x: &XferOp, op: Op) -> Result<u64> {
        let (addr, len) = (x.remote_addr, x.len);
        let rejected =
            |reason| Error::from(TransferError::Rejected { peer: self.peer.clone(), op, index: index as u32, reason });
        let Some((remote, mapping)) = regions.get_mut(x.remote_region as usize).filter(|(r, _)| !r.key.is_empty())
        else {
            return Err(no_key_on_link(&self.peer, index, x));
        };
        if !remote.region.contains(addr, len) {
            return Err(rejected(RejectReason::OutOfRange));
        }
        let memory = match mapping {
            Some(m) => m.clone(),
            None => {
                let handle = IpcHandle { kind: remote.region.kind, len: remote.region.len, bytes: remote.key.clone() };
                let m = self.device.import_ipc(&handle)?;
                mapping.insert(m).clone()
            }
        };
        Ok(memory.region().addr + (addr - remote.region.addr))
    }
}

impl PeerLink for CudaIpcLink {
    /// Notifications travel over the TCP transport the link starts for them.
    fn max_notification(&self) -> u64 {
        crate::transport::frame::MAX_NOTIFICATION
    }

    fn post(&self, batch: Batch) -> Result<()> {
        let op = batch.completion.op();
        let mut copies = Vec::with_capacity(batch.ops.len());
        let mut regions = self.regions.locked();
        for (index, x) in batch.ops.iter().enumerate() {
            let remote = self.mapped(&mut regions, index, x, op)?;
            copies.push(match op {
                Op::Read => CopyOp { src: remote, dst: x.local_addr, len: x.len },
                Op::Write | Op::Notify => CopyOp { src: x.local_addr, dst: remote, len: x.len },
            });
        }
        drop(regions);
        batch.completion.set_parts(1);
        let fence = match copies.is_empty() {
            true => None,
            // SAFETY: local ranges lie in registrations the batch keeps alive; remote ranges were
            // checked against the peer's published regions and map memory the link keeps open.
            false => Some(unsafe { self.device.copy_batch(&copies) }?),
        };
        if let Err(job) = self.completions.submit(Job { fence, batch }) {
            // Its copies may still run: the memory stays held until they are done.
            job.batch.completion.refuse_part();
            job.drain();
        }
        Ok(())
    }
}

/// A link's completions: each batch settled once its copies are done (in posting order, as the
/// stream runs them), then its notification sent through the loopback notifier.
struct InOrder {
    notify: Arc<dyn PeerLink>,
}

impl LaneWork for InOrder {
    type Job = Job;
    type Scratch = ();

    fn run(&mut self, job: Job, _: &mut ()) {
        let completion = &job.batch.completion;
        let copied = match &job.fence {
            Some(f) => f.wait(completion.deadline()).map_err(|e| match e.code() {
                crate::ErrorCode::Timeout => completion.timeout_error(),
                _ => TransferError::DeviceCopy {
                    peer: completion.peer().into(),
                    op: completion.op(),
                    cause: e.to_string(),
                },
            }),
            None => Ok(()),
        };
        completion.settle_part(copied, |data| send_notification(&*self.notify, completion, data));
        job.drain();
    }
}

impl Job {
    /// Release the batch's memory once the device is done with it: a batch past its deadline may
    /// still be copying, and its memory is never released under a copy that does not finish.
    fn drain(self) {
        let drained = self.fence.is_none_or(|f| f.wait(Deadline::after(ABANDON_AFTER)).is_ok());
        if !drained {
            let peer = self.batch.completion.peer();
            tracing::error!(peer, "a cuda-ipc copy did not finish; keeping its memory forever");
            std::mem::forget(self.batch.keep_alive);
        }
    }
}

fn send_notification(notify: &dyn PeerLink, completion: &Completion, data: Vec<u8>) -> Result<(), TransferError> {
    let note = Arc::new(Completion::new(completion.peer(), Op::Notify, 0, Some(data), completion.deadline()));
    let batch = Batch { ops: Vec::new(), completion: note.clone(), keep_alive: Arc::new(()) };
    notify.post(batch).map_err(|e| TransferError::PeerDisconnected {
        peer: completion.peer().into(),
        op: Op::Notify,
        cause: e.to_string(),
    })?;
    note.wait()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn test_auth() -> Auth {
        Auth::resolve(&crate::auth::AuthConfig::default()).unwrap()
    }

    #[test]
    fn endpoints_name_this_boot_of_this_host() {
        let id = boot_id().unwrap();
        assert_eq!(id, boot_id().unwrap(), "stable within a boot");
        assert!(id.len() >= 32, "{id}");
        assert_eq!(parse_address(&format!("{id}@127.0.0.1:9")).unwrap(), (id.as_str(), "127.0.0.1:9"));
        for bad in ["", "@", "no-separator", "@127.0.0.1:9", "host@"] {
            assert!(parse_address(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn notifications_reach_the_peer_through_the_loopback_notifier() {
        // The notifier path needs no GPU: a completion settled by `send_notification` delivers the
        // bytes to the peer's queue with the sender's name.
        let queue = Arc::new(NotificationQueue::default());
        let target = TcpTransport::start("ipc-target", TcpConfig::default(), test_auth(), queue.clone()).unwrap();
        let sender = TcpTransport::start("ipc-sender", TcpConfig::default(), test_auth(), Arc::default()).unwrap();
        let link = sender.link("ipc-target", &target.endpoint(), Vec::new()).unwrap();
        let deadline = Deadline::after(std::time::Duration::from_secs(10));
        let batch = Completion::new("ipc-target", Op::Write, 0, None, deadline);
        send_notification(&*link, &batch, b"blocks 3..9 ready".to_vec()).unwrap();
        let got = queue.wait(deadline);
        assert_eq!(got.len(), 1);
        assert_eq!((got[0].from.as_str(), got[0].data.as_slice()), ("ipc-sender", &b"blocks 3..9 ready"[..]));
    }
}
