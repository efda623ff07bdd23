//! `Agent`, `Registration`, `Prepared` and `Transfer`.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Mutex, PoisonError};

use kvferry_core::metadata::AgentMetadata;
use kvferry_core::transport::tcp::TcpConfig;
use kvferry_core::{
    AgentConfig, MemKind, MemRegion, Op, PreparedDescs, Registration as CoreRegistration, Transfer as CoreTransfer,
    TransferRequest, TransferStatus,
};
use pyo3::exceptions::{PyTimeoutError, PyValueError};
use pyo3::prelude::*;
use pyo3::pybacked::PyBackedBytes;
use pyo3::types::{PyBytes, PyTuple};

use crate::closable::Closable;
use crate::convert::{Span, deadline, describe_memory, device_name, kind_at, parse_device};
use crate::errors::OrRaise;

/// One engine rank's endpoint: registered memory, transports, peers, transfers.
#[pyclass(frozen, module = "kvferry._kvferry")]
pub struct Agent {
    name: String,
    agent: Closable<kvferry_core::Agent>,
}

impl Agent {
    fn agent(&self) -> PyResult<kvferry_core::Agent> {
        self.agent.get()
    }

    fn prepare(
        &self,
        py: Python<'_>,
        peer: Option<&str>,
        regions: Vec<Span>,
        device: Option<&str>,
    ) -> PyResult<Prepared> {
        let agent = self.agent()?;
        let kinds: Box<dyn Fn(u64, u64) -> MemKind> = match device {
            Some(device) => {
                let kind = parse_device(device)?;
                Box::new(move |_, _| kind)
            }
            // Only addresses given: the registration (ours, or the peer's as published) holding
            // each region says what memory it is.
            None => {
                let known = match peer {
                    None => AgentMetadata::decode(&agent.metadata()).map(|m| m.regions).unwrap_or_default(),
                    Some(peer) => agent.peer_metadata(peer).map(|m| m.regions).unwrap_or_default(),
                };
                Box::new(move |addr, len| kind_at(&known, addr, len))
            }
        };
        let regions: Vec<MemRegion> =
            regions.into_iter().map(|[addr, len]| MemRegion { addr, len, kind: kinds(addr, len) }).collect();
        let descs = py.detach(|| match peer {
            None => agent.prepare_local(&regions),
            Some(peer) => agent.prepare_remote(peer, &regions),
        });
        Ok(Prepared { descs: descs.or_raise()? })
    }

    #[allow(clippy::too_many_arguments, reason = "read's and write's Python arguments, passed through")]
    fn post(
        &self,
        py: Python<'_>,
        op: Op,
        local: &Prepared,
        local_indices: Vec<usize>,
        remote: &Prepared,
        remote_indices: Vec<usize>,
        notification: Option<PyBackedBytes>,
        timeout: f64,
    ) -> PyResult<Transfer> {
        let agent = self.agent()?;
        let deadline = deadline(timeout)?;
        let transfer = py.detach(|| {
            let mut request =
                TransferRequest::new(op, (&local.descs, &local_indices), (&remote.descs, &remote_indices), deadline);
            request.notification = notification.as_deref();
            agent.post(request)
        });
        Ok(Transfer { transfer: transfer.or_raise()? })
    }
}

#[pymethods]
impl Agent {
    #[new]
    #[pyo3(signature = (name, *, host = "127.0.0.1", port = 0, tcp = true, shm = true, fabric_provider = None, advertise_host = None, cuda_device = None, secret = None, auth = "env", tls_cert = None, tls_key = None, tls_ca = None, tls_require_client_cert = false, tls_server_name = None))]
    #[allow(clippy::too_many_arguments, reason = "the constructor's keyword arguments")]
    fn new(
        py: Python<'_>,
        name: String,
        host: &str,
        port: u16,
        tcp: bool,
        shm: bool,
        fabric_provider: Option<String>,
        advertise_host: Option<String>,
        cuda_device: Option<u32>,
        secret: Option<&Bound<'_, PyAny>>,
        auth: &str,
        tls_cert: Option<std::path::PathBuf>,
        tls_key: Option<std::path::PathBuf>,
        tls_ca: Option<std::path::PathBuf>,
        tls_require_client_cert: bool,
        tls_server_name: Option<String>,
    ) -> PyResult<Self> {
        let ip: IpAddr =
            host.parse().map_err(|_| PyValueError::new_err(format!("host must be an IP address, got {host:?}")))?;
        let auth = crate::auth::auth_config(secret, auth)?;
        let tls = match (tls_cert, tls_key, tls_ca) {
            (Some(cert), Some(key), Some(ca)) => Some(kvferry_core::TlsConfig {
                require_client_cert: tls_require_client_cert,
                server_name: tls_server_name,
                ..kvferry_core::TlsConfig::new(cert, key, ca)
            }),
            (None, None, None) if !tls_require_client_cert && tls_server_name.is_none() => None,
            _ => return Err(PyValueError::new_err("TLS needs all three of tls_cert, tls_key and tls_ca")),
        };
        let defaults = AgentConfig { auth, tls, ..AgentConfig::new(name.clone()) };
        let tcp_config = TcpConfig { listen: SocketAddr::new(ip, port), advertise_host, ..TcpConfig::default() };
        #[allow(unused_mut, reason = "only the fabric and cuda features add to the config")]
        let mut config = AgentConfig { tcp: tcp.then_some(tcp_config), shm: defaults.shm.filter(|_| shm), ..defaults };
        let agent = py.detach(|| {
            match fabric_provider {
                #[cfg(feature = "fabric")]
                Some(provider) => {
                    use kvferry_core::transport::fabric::FabricConfig;
                    config.fabric = Some(FabricConfig { provider: Some(provider), ..FabricConfig::default() });
                }
                #[cfg(not(feature = "fabric"))]
                Some(_) => return Err(missing_feature("the fabric transport", "fabric")),
                None => {}
            }
            match cuda_device {
                // Device memory then moves over cuda-ipc to peers on this host and is staged
                // through pinned host buffers over TCP to the others.
                #[cfg(feature = "cuda")]
                Some(ordinal) => {
                    use kvferry_core::StagingConfig;
                    use kvferry_core::transport::cuda_ipc::CudaIpcConfig;
                    let device = kvferry_core::CudaDevice::open(ordinal)?;
                    config.staging = Some(StagingConfig::new(vec![std::sync::Arc::new(device.clone())]));
                    config.cuda_ipc = Some(CudaIpcConfig { device });
                }
                #[cfg(not(feature = "cuda"))]
                Some(_) => return Err(missing_feature("CUDA memory", "cuda")),
                None => {}
            }
            kvferry_core::Agent::new(config)
        });
        Ok(Agent { name, agent: Closable::new("agent", agent.or_raise()?) })
    }

    #[getter]
    fn name(&self) -> &str {
        &self.name
    }

    /// What a peer needs to reach this agent, for its `add_peer`.
    fn metadata<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyBytes>> {
        Ok(PyBytes::new(py, &self.agent()?.metadata()))
    }

    fn add_peer(&self, py: Python<'_>, metadata: PyBackedBytes) -> PyResult<String> {
        let agent = self.agent()?;
        py.detach(|| agent.add_peer(&metadata)).or_raise()
    }

    fn remove_peer(&self, name: &str) -> PyResult<()> {
        self.agent()?.remove_peer(name).or_raise()
    }

    fn peers(&self) -> PyResult<Vec<String>> {
        Ok(self.agent()?.peers())
    }

    #[pyo3(signature = (host = "127.0.0.1", port = 0))]
    fn serve_side_channel(&self, py: Python<'_>, host: &str, port: u16) -> PyResult<(String, u16)> {
        let ip: IpAddr =
            host.parse().map_err(|_| PyValueError::new_err(format!("host must be an IP address, got {host:?}")))?;
        let agent = self.agent()?;
        let bound = py.detach(|| agent.serve_side_channel(SocketAddr::new(ip, port))).or_raise()?;
        Ok((bound.ip().to_string(), bound.port()))
    }

    #[pyo3(signature = (addr, timeout = 10.0))]
    fn connect_peer(&self, py: Python<'_>, addr: &str, timeout: f64) -> PyResult<String> {
        let (agent, deadline) = (self.agent()?, deadline(timeout)?);
        py.detach(|| agent.connect_peer(addr, deadline)).or_raise()
    }

    /// Register a torch tensor or a writable, C-contiguous buffer; the registration keeps it alive.
    #[pyo3(signature = (obj, *, device = None))]
    fn register(&self, py: Python<'_>, obj: &Bound<'_, PyAny>, device: Option<&str>) -> PyResult<Registration> {
        let (region, owner) = describe_memory(obj, device)?;
        // SAFETY: the registration holds `owner`, which keeps the memory where it is, until the
        // core registration is dropped (it is dropped first, and waits for transfers using it).
        self.register_region(py, region, Some(owner.unbind()))
    }

    /// Register raw memory the caller keeps valid until the registration is deregistered.
    #[pyo3(signature = (addr, length, device = "cpu"))]
    fn register_ptr(&self, py: Python<'_>, addr: u64, length: u64, device: &str) -> PyResult<Registration> {
        let region = MemRegion { addr, len: length, kind: parse_device(device)? };
        self.register_region(py, region, None)
    }

    #[pyo3(signature = (regions, *, device = None))]
    fn prepare_local(&self, py: Python<'_>, regions: Vec<Span>, device: Option<&str>) -> PyResult<Prepared> {
        self.prepare(py, None, regions, device)
    }

    #[pyo3(signature = (peer, regions, *, device = None))]
    fn prepare_remote(
        &self,
        py: Python<'_>,
        peer: &str,
        regions: Vec<Span>,
        device: Option<&str>,
    ) -> PyResult<Prepared> {
        self.prepare(py, Some(peer), regions, device)
    }

    #[pyo3(signature = (local, local_indices, remote, remote_indices, *, notification = None, timeout = 30.0))]
    #[allow(clippy::too_many_arguments, reason = "the Python signature")]
    fn read(
        &self,
        py: Python<'_>,
        local: &Bound<'_, Prepared>,
        local_indices: Vec<usize>,
        remote: &Bound<'_, Prepared>,
        remote_indices: Vec<usize>,
        notification: Option<PyBackedBytes>,
        timeout: f64,
    ) -> PyResult<Transfer> {
        self.post(py, Op::Read, local.get(), local_indices, remote.get(), remote_indices, notification, timeout)
    }

    #[pyo3(signature = (local, local_indices, remote, remote_indices, *, notification = None, timeout = 30.0))]
    #[allow(clippy::too_many_arguments, reason = "the Python signature")]
    fn write(
        &self,
        py: Python<'_>,
        local: &Bound<'_, Prepared>,
        local_indices: Vec<usize>,
        remote: &Bound<'_, Prepared>,
        remote_indices: Vec<usize>,
        notification: Option<PyBackedBytes>,
        timeout: f64,
    ) -> PyResult<Transfer> {
        self.post(py, Op::Write, local.get(), local_indices, remote.get(), remote_indices, notification, timeout)
    }

    #[pyo3(signature = (peer, data, timeout = 30.0))]
    fn notify(&self, py: Python<'_>, peer: &str, data: PyBackedBytes, timeout: f64) -> PyResult<Transfer> {
        let (agent, deadline) = (self.agent()?, deadline(timeout)?);
        let transfer = py.detach(|| agent.notify(peer, &data, deadline)).or_raise()?;
        Ok(Transfer { transfer })
    }

    fn take_notifications<'py>(&self, py: Python<'py>) -> PyResult<Vec<(String, Bound<'py, PyBytes>)>> {
        let taken = self.agent()?.take_notifications();
        Ok(taken.into_iter().map(|n| (n.from, PyBytes::new(py, &n.data))).collect())
    }

    fn wait_notifications<'py>(&self, py: Python<'py>, timeout: f64) -> PyResult<Vec<(String, Bound<'py, PyBytes>)>> {
        let (agent, deadline) = (self.agent()?, deadline(timeout)?);
        let taken = py.detach(|| agent.wait_notifications(deadline));
        Ok(taken.into_iter().map(|n| (n.from, PyBytes::new(py, &n.data))).collect())
    }

    /// Stop serving; registrations and transfers made from the agent stay valid objects, but peers
    /// can no longer reach this agent through it. Closing twice is harmless.
    fn close(&self, py: Python<'_>) {
        self.agent.close(py);
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    #[pyo3(signature = (*_exc_info))]
    fn __exit__(&self, py: Python<'_>, _exc_info: &Bound<'_, PyTuple>) -> bool {
        self.agent.close(py);
        false
    }

    fn __repr__(&self) -> String {
        let state = self.agent.peek(|agent| match agent {
            Some(agent) => format!("peers={:?}", agent.peers()),
            None => "closed".to_string(),
        });
        format!("Agent(name={:?}, {state})", self.name)
    }
}

#[cfg(not(all(feature = "fabric", feature = "cuda")))]
fn missing_feature(what: &str, feature: &str) -> kvferry_core::Error {
    kvferry_core::Error::Unsupported {
        what: what.into(),
        why: format!("this build of kvferry has no {feature} feature"),
    }
}

impl Agent {
    fn register_region(&self, py: Python<'_>, region: MemRegion, owner: Option<Py<PyAny>>) -> PyResult<Registration> {
        let agent = self.agent()?;
        // SAFETY: `register` keeps the memory alive through `owner`; for `register_ptr` the caller
        // promised to keep it valid until deregistering, as documented.
        let registration = py.detach(|| unsafe { agent.register_raw(region) }).or_raise()?;
        Ok(Registration { region, registration: Mutex::new(Some(registration)), owner: Mutex::new(owner) })
    }
}

/// Memory registered with an agent; `deregister()` (or garbage collection) ends it.
#[pyclass(frozen, module = "kvferry._kvferry")]
pub struct Registration {
    region: MemRegion,
    /// Declared before `owner`: it is dropped first, and its drop waits for local transfers that
    /// still use the memory, which `owner` keeps alive until then.
    registration: Mutex<Option<CoreRegistration>>,
    owner: Mutex<Option<Py<PyAny>>>,
}

#[pymethods]
impl Registration {
    #[getter]
    fn addr(&self) -> u64 {
        self.region.addr
    }

    #[getter]
    fn length(&self) -> u64 {
        self.region.len
    }

    #[getter]
    fn device(&self) -> String {
        device_name(self.region.kind)
    }

    /// Peers lose access; returns once no local transfer touches the memory. Idempotent.
    fn deregister(&self, py: Python<'_>) {
        let registration = self.registration.lock().unwrap_or_else(PoisonError::into_inner).take();
        py.detach(move || drop(registration));
        self.owner.lock().unwrap_or_else(PoisonError::into_inner).take();
    }

    fn __repr__(&self) -> String {
        let live = self.registration.lock().unwrap_or_else(PoisonError::into_inner).is_some();
        format!(
            "Registration(addr={:#x}, length={}, device={:?}{})",
            self.region.addr,
            self.region.len,
            self.device(),
            if live { "" } else { ", deregistered" }
        )
    }
}

/// Regions checked once (against this agent's registrations, or a peer's published regions);
/// transfers pick entries by index.
#[pyclass(frozen, module = "kvferry._kvferry")]
pub struct Prepared {
    descs: PreparedDescs,
}

#[pymethods]
impl Prepared {
    fn __len__(&self) -> usize {
        self.descs.len()
    }

    #[getter]
    fn peer(&self) -> Option<&str> {
        self.descs.peer()
    }

    fn __repr__(&self) -> String {
        match self.descs.peer() {
            Some(peer) => format!("Prepared(len={}, peer={peer:?})", self.descs.len()),
            None => format!("Prepared(len={}, local)", self.descs.len()),
        }
    }
}

/// A posted transfer or notification. Dropping one that is still running lets it run to the end.
#[pyclass(frozen, module = "kvferry._kvferry")]
pub struct Transfer {
    transfer: CoreTransfer,
}

#[pymethods]
impl Transfer {
    /// True once done, False while running; raises the error it failed with.
    fn poll(&self) -> PyResult<bool> {
        match self.transfer.poll() {
            TransferStatus::Done => Ok(true),
            TransferStatus::InProgress => Ok(false),
            TransferStatus::Failed(e) => Err(kvferry_core::Error::from(e)).or_raise(),
        }
    }

    /// Wait for completion (up to the transfer's own deadline when `timeout` is None); raises the
    /// transfer's error, or builtins.TimeoutError when `timeout` passes first (it goes on).
    #[pyo3(signature = (timeout = None))]
    fn wait(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<()> {
        let outcome = match timeout {
            None => Some(py.detach(|| self.transfer.wait())),
            Some(timeout) => {
                let until = deadline(timeout)?;
                py.detach(|| self.transfer.wait_until(until))
            }
        };
        match outcome {
            Some(result) => result.or_raise(),
            None => Err(PyTimeoutError::new_err(format!(
                "the transfer with {} was still running after {} s",
                self.transfer.peer(),
                timeout.unwrap_or_default()
            ))),
        }
    }

    /// Stop the transfer; returns once it no longer touches local memory.
    fn cancel(&self, py: Python<'_>) {
        py.detach(|| self.transfer.cancel());
    }

    #[getter]
    fn peer(&self) -> &str {
        self.transfer.peer()
    }

    #[getter]
    fn bytes(&self) -> u64 {
        self.transfer.bytes()
    }

    #[getter]
    fn ops(&self) -> usize {
        self.transfer.ops()
    }

    #[getter]
    fn transport(&self) -> &'static str {
        self.transfer.transport().name()
    }

    /// Seconds from post to completion, once completed.
    #[getter]
    fn elapsed(&self) -> Option<f64> {
        self.transfer.elapsed().map(|d| d.as_secs_f64())
    }

    fn __repr__(&self) -> String {
        let status = match self.transfer.poll() {
            TransferStatus::Done => "done".to_string(),
            TransferStatus::InProgress => "running".to_string(),
            TransferStatus::Failed(e) => format!("failed: {e}"),
        };
        format!(
            "Transfer(peer={:?}, transport={:?}, bytes={}, ops={}, {status})",
            self.transfer.peer(),
            self.transport(),
            self.transfer.bytes(),
            self.transfer.ops()
        )
    }
}
