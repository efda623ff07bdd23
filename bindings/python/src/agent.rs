//! `Agent`, `Registration`, `Prepared` and `Transfer`.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError, Weak};

use kvferry_core::metadata::AgentMetadata;
use kvferry_core::{
    AgentConfig, MemKind, MemRegion, Op, PreparedList, Transfer as CoreTransfer, TransferRequest, TransferStatus,
};
use pyo3::exceptions::{PyTimeoutError, PyValueError};
use pyo3::prelude::*;
use pyo3::pybacked::PyBackedBytes;
use pyo3::types::{PyBytes, PyDict, PyTuple};

use crate::closable::Closable;
use crate::convert::{Span, deadline, describe_memory, kind_at, parse_device};
use crate::errors::OrRaise;
use crate::registration::{Held, Keep, Registration};

/// One engine rank's endpoint: registered memory, transports, peers, transfers.
#[pyclass(frozen, module = "kvferry._kvferry")]
pub struct Agent {
    name: String,
    agent: Closable<kvferry_core::Agent>,
    /// The registrations made here, checked before the agent publishes or uses them.
    registrations: Mutex<Vec<Weak<Held>>>,
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
        // The registrations a local list uses, checked now and on every post through it.
        let held = match peer {
            None => self.holding(&regions),
            Some(_) => Vec::new(),
        };
        check_all(py, &held, true)?;
        let descs = py.detach(|| match peer {
            None => agent.prepare_local(&regions).map(PreparedList::Local),
            Some(peer) => agent.prepare_remote(peer, &regions).map(PreparedList::Remote),
        });
        let held = held.iter().map(Arc::downgrade).collect();
        Ok(Prepared { descs: descs.or_raise()?, held })
    }

    /// The live registrations holding any of `regions`.
    fn holding(&self, regions: &[MemRegion]) -> Vec<Arc<Held>> {
        let mut holding: Vec<Arc<Held>> = Vec::new();
        for held in self.live() {
            let holds = |d: &MemRegion| held.region.kind == d.kind && held.region.contains(d.addr, d.len);
            if regions.iter().any(holds) {
                holding.push(held);
            }
        }
        holding
    }

    fn live(&self) -> Vec<Arc<Held>> {
        let registrations = self.registrations.lock().unwrap_or_else(PoisonError::into_inner);
        registrations.iter().filter_map(Weak::upgrade).filter(|held| held.is_live()).collect()
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
        let held: Vec<Arc<Held>> = local.held.iter().filter_map(Weak::upgrade).collect();
        check_all(py, &held, true)?;
        let (local_descs, remote_descs) = (local.descs.local().or_raise()?, remote.descs.remote().or_raise()?);
        let transfer = py.detach(|| {
            let mut request =
                TransferRequest::new(op, (local_descs, &local_indices), (remote_descs, &remote_indices), deadline);
            request.notification = notification.as_deref();
            agent.post(request)
        });
        Ok(Transfer { transfer: transfer.or_raise()? })
    }
}

#[pymethods]
impl Agent {
    #[new]
    #[pyo3(signature = (name, *, host = "127.0.0.1", port = 0, tcp = true, shm = true, fabric_provider = None, advertise_host = None, cuda_device = None, secret = None, auth = "env", tls_cert = None, tls_key = None, tls_ca = None, tls_require_client_cert = false, tls_server_name = None, options = None))]
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
        options: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<Self> {
        let ip: IpAddr =
            host.parse().map_err(|_| PyValueError::new_err(format!("host must be an IP address, got {host:?}")))?;
        #[cfg(not(feature = "fabric"))]
        if fabric_provider.is_some() {
            return Err(missing_feature("the fabric transport", "fabric")).or_raise();
        }
        // The keyword arguments are agent options under other names; `options` gives any of them
        // (`kvferry info` lists them), after the keywords, so it wins.
        let switch = |on: bool| if on { "on" } else { "off" }.to_string();
        let path = |p: std::path::PathBuf| {
            p.into_os_string().into_string().map_err(|p| PyValueError::new_err(format!("{p:?} is not UTF-8")))
        };
        let mut settings: Vec<(String, String)> = vec![
            ("tcp".into(), switch(tcp)),
            ("tcp.listen".into(), SocketAddr::new(ip, port).to_string()),
            ("shm".into(), switch(shm)),
            ("tls.require_client_cert".into(), switch(tls_require_client_cert)),
        ];
        let optional = [
            ("tcp.advertise_host", advertise_host),
            ("fabric", fabric_provider),
            ("tls.cert", tls_cert.map(path).transpose()?),
            ("tls.key", tls_key.map(path).transpose()?),
            ("tls.ca", tls_ca.map(path).transpose()?),
            ("tls.server_name", tls_server_name),
        ];
        settings.extend(optional.into_iter().filter_map(|(key, value)| Some((key.to_string(), value?))));
        for (key, value) in options.into_iter().flat_map(|d| d.iter()) {
            settings.push((key.extract()?, option_value(&value)?));
        }
        let base = AgentConfig { auth: crate::auth::auth_config(secret, auth)?, ..AgentConfig::new(name.clone()) };
        #[allow(unused_mut, reason = "only the cuda feature adds to the config")]
        let mut config = base.with_options(settings.iter().map(|(k, v)| (k.as_str(), v.as_str()))).or_raise()?;
        let agent = py.detach(|| {
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
        Ok(Agent { name, agent: Closable::new("agent", agent.or_raise()?), registrations: Mutex::default() })
    }

    #[getter]
    fn name(&self) -> &str {
        &self.name
    }

    /// What a peer needs to reach this agent, for its `add_peer`. Raises NotRegistered (having
    /// revoked it) for a registered tensor whose memory moved.
    fn metadata<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyBytes>> {
        let agent = self.agent()?;
        check_all(py, &self.live(), false)?;
        Ok(PyBytes::new(py, &agent.metadata()))
    }

    /// Check every registration: one of a tensor whose memory moved is revoked, and NotRegistered
    /// raised. kvferry checks on every use and periodically too.
    fn check(&self, py: Python<'_>) -> PyResult<()> {
        check_all(py, &self.live(), false)
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

    /// The agent's transfer counters since it started, one dict per transport and direction it
    /// used: what its Prometheus rendering shows (`kvferry_transfer_*`).
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyDict>>> {
        let metrics = self.agent()?.metrics();
        metrics
            .transfer_stats()
            .into_iter()
            .map(|s| {
                let dict = PyDict::new(py);
                dict.set_item("transport", s.transport.name())?;
                dict.set_item("direction", s.direction.to_string())?;
                dict.set_item("transfers", s.transfers)?;
                dict.set_item("bytes", s.bytes)?;
                dict.set_item("failures", s.failures)?;
                dict.set_item("in_flight", s.in_flight)?;
                dict.set_item("duration_seconds", s.duration.as_secs_f64())?;
                dict.set_item("duration_buckets", s.duration_buckets.to_vec())?;
                Ok(dict)
            })
            .collect()
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

    /// Register a torch tensor (its storage is kept, and pinned where torch allows) or a writable,
    /// C-contiguous buffer (kept, and exported so that it cannot be resized).
    #[pyo3(signature = (obj, *, device = None))]
    fn register<'py>(
        &self,
        py: Python<'py>,
        obj: &Bound<'py, PyAny>,
        device: Option<&str>,
    ) -> PyResult<Bound<'py, Registration>> {
        let (region, keep) = describe_memory(obj, device)?;
        let tensor = matches!(keep, Keep::Tensor(_));
        // SAFETY: the registration holds `keep`, which keeps the memory where it is, until the
        // core registration is dropped (it is dropped first, and waits for transfers using it).
        let registration = self.register_region(py, region, Some(keep))?;
        if tensor {
            py.import("kvferry._memory")?.getattr("WATCHER")?.call_method1("add", (&registration,))?;
        }
        Ok(registration)
    }

    /// Register raw memory the caller keeps valid until the registration is deregistered.
    #[pyo3(signature = (addr, length, device = "cpu"))]
    fn register_ptr<'py>(
        &self,
        py: Python<'py>,
        addr: u64,
        length: u64,
        device: &str,
    ) -> PyResult<Bound<'py, Registration>> {
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

/// An option's value as the parser takes it: `True`/`False` as on/off, numbers and text as written.
fn option_value(value: &Bound<'_, PyAny>) -> PyResult<String> {
    if let Ok(on) = value.extract::<bool>() {
        return Ok(if on { "on" } else { "off" }.to_string());
    }
    if let Ok(n) = value.extract::<i64>() {
        return Ok(n.to_string());
    }
    value.extract::<String>().map_err(|_| {
        pyo3::exceptions::PyTypeError::new_err(format!("an agent option is a bool, an int or a str, not {value}"))
    })
}

#[cfg(not(all(feature = "fabric", feature = "cuda")))]
fn missing_feature(what: &str, feature: &str) -> kvferry_core::Error {
    kvferry_core::Error::Unsupported {
        what: what.into(),
        why: format!("this build of kvferry has no {feature} feature"),
    }
}

impl Agent {
    fn register_region<'py>(
        &self,
        py: Python<'py>,
        region: MemRegion,
        keep: Option<Keep>,
    ) -> PyResult<Bound<'py, Registration>> {
        let agent = self.agent()?;
        // SAFETY: `register` keeps the memory alive through `keep`; for `register_ptr` the caller
        // promised to keep it valid until deregistering, as documented.
        let registration = match py.detach(|| unsafe { agent.register_raw(region) }).or_raise() {
            Ok(registration) => registration,
            Err(e) => {
                if let Some(keep) = keep {
                    keep.release(py);
                }
                return Err(e);
            }
        };
        let held = Held::new(region, registration, keep);
        let mut registrations = self.registrations.lock().unwrap_or_else(PoisonError::into_inner);
        registrations.retain(|r| r.strong_count() > 0);
        registrations.push(Arc::downgrade(&held));
        drop(registrations);
        Bound::new(py, Registration { held })
    }
}

/// Check each registration; all are checked, the first failure raised. `revoked_too` raises for
/// registrations revoked before as well (those a call is about to use).
fn check_all(py: Python<'_>, held: &[Arc<Held>], revoked_too: bool) -> PyResult<()> {
    let mut first = None;
    for held in held {
        if !revoked_too && !held.is_live() {
            continue;
        }
        if let Err(e) = held.check(py) {
            first.get_or_insert(e);
        }
    }
    first.map_or(Ok(()), Err)
}

/// Regions checked once (against this agent's registrations, or a peer's published regions);
/// transfers pick entries by index.
#[pyclass(frozen, module = "kvferry._kvferry")]
pub struct Prepared {
    descs: PreparedList,
    /// For a local list, the registrations it uses (weak: a list keeps nothing registered).
    held: Vec<Weak<Held>>,
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
