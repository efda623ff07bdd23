//! The libfabric transport: RDMA on InfiniBand/RoCE (`verbs`), AWS EFA (`efa`), HPE Slingshot
//! (`cxi`), and libfabric's software providers (`tcp`, `shm`) through the same code.
//!
//! Each *rail* is one libfabric domain (a NIC, or an interface for `tcp`) with an RDM endpoint and
//! its own progress thread. Regions are registered with every rail; a batch is posted as
//! `fi_readmsg`/`fi_writemsg` (`FI_MORE` between ops), and large batches are striped across rails.
//! The target's provider checks every access against the key and range of a registration, so a
//! forged descriptor is refused by the NIC (or provider), not trusted. A notification follows the
//! batch's data as a message.
// Every unsafe block of the fabric transport (libfabric calls, its objects and registrations)
// says why it is sound; the lint keeps it so.
#![deny(clippy::undocumented_unsafe_blocks)]

pub(crate) mod error;
mod rail;
mod session;

use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::ffi::{CStr, CString};
use std::ptr;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use kvferry_fabric_sys as sys;

pub use self::error::FabricError;
use self::rail::{CONFIRMED, Check, Part, Rail, RailLimits, RailOp, UNCHECKED};
use crate::auth::Auth;
use crate::error::{Error, Result};
use crate::memory::{MemKind, MemRegion};
use crate::sync::ReadWriteLocked;
use crate::transport::{
    Batch, Endpoint, MemoryOwner, NotificationQueue, Op, PeerLink, RejectReason, RemoteRegion, TransferError,
    Transport, TransportKind, no_key_on_link, remote_keys,
};

/// The largest notification the fabric transport carries (it lands in a posted receive buffer).
pub const MAX_NOTIFICATION: u64 = 64 * 1024;

/// Rails per transport at most (a key holds one `u64` per rail).
pub const MAX_RAILS: usize = 16;

/// The environment variable naming the libfabric to open instead of `libfabric.so.1` (a path, or
/// a name for the dynamic linker); read when the first fabric transport starts.
pub const LIBRARY_ENV: &str = sys::LIBRARY_ENV;

/// Providers in the order "best available" tries them: hardware first, then TCP. `shm` only
/// reaches the same host, so it is used only when named.
const PREFERRED: &[&str] = &["cxi", "efa", "verbs", "psm3", "opx", "tcp"];

#[derive(Debug, Clone)]
pub struct FabricConfig {
    /// Provider by name (`verbs`, `efa`, `cxi`, `tcp`, `shm`, ...); `None` picks the best available.
    pub provider: Option<String>,
    /// Use at most this many domains (NICs) of the provider (up to [`MAX_RAILS`]); large batches
    /// are striped across them.
    pub rails: usize,
    /// Use only these domains (e.g. `mlx5_0`, `lo`), in this order; empty means any.
    pub domains: Vec<String>,
    /// Ask for `FI_HMEM` so device memory can be registered (needs a provider that supports it).
    pub hmem: bool,
    /// Batches of at least this many bytes are striped across rails; smaller ones use one rail.
    pub stripe_min_bytes: u64,
    /// Answers (to peers' checks and notifications) a rail keeps in flight: a peer that floods it
    /// gets no answer beyond them, and its batches time out.
    pub max_answers: usize,
    /// Bytes of staging buffers a rail keeps for reuse (see `rail.rs`); beyond, a returned buffer
    /// is freed.
    pub staging_kept_bytes: usize,
}

impl Default for FabricConfig {
    fn default() -> Self {
        FabricConfig {
            provider: None,
            rails: 1,
            domains: Vec::new(),
            hmem: false,
            stripe_min_bytes: 1 << 20,
            max_answers: 256,
            staging_kept_bytes: 64 << 20,
        }
    }
}

pub(crate) fn fi_error_text(code: i32) -> String {
    // SAFETY: any code is allowed; the answer is null or a static C string.
    let text = unsafe { sys::fi_strerror(code.abs()) };
    if text.is_null() {
        return format!("error {code}");
    }
    // SAFETY: a static C string (above).
    format!("{} ({code})", unsafe { CStr::from_ptr(text) }.to_string_lossy())
}

pub(crate) fn check(call: &'static str, ret: i32) -> Result<()> {
    match ret {
        0 => Ok(()),
        code => Err(FabricError::Call { call, code, detail: fi_error_text(code) }.into()),
    }
}

/// A transfer failure from a positive libfabric error code.
pub(crate) fn classify(peer: &str, op: Op, endpoint: &str, code: i32, cause: String) -> TransferError {
    let peer = peer.to_string();
    match code as u32 {
        sys::FI_ECONNREFUSED | sys::FI_EHOSTUNREACH | sys::FI_ENETUNREACH | sys::FI_EADDRNOTAVAIL => {
            TransferError::PeerUnreachable { peer, endpoint: endpoint.to_string(), cause }
        }
        sys::FI_ECONNRESET
        | sys::FI_ECONNABORTED
        | sys::FI_ENOTCONN
        | sys::FI_EIO
        | sys::FI_ESHUTDOWN
        | sys::FI_ENETDOWN
        | sys::FI_EHOSTDOWN => TransferError::PeerDisconnected { peer, op, cause },
        sys::FI_EACCES | sys::FI_EPERM | sys::FI_EKEYREJECTED | sys::FI_EINVAL | sys::FI_EFAULT | sys::FI_EREMOTEIO => {
            TransferError::RemoteAccess { peer, op, cause }
        }
        sys::FI_ETIMEDOUT => TransferError::Timeout { peer, op },
        // This transport never cancels an operation it posted: the provider aborted it because
        // the connection closed (tcp;ofi_rxm also closes it when the target refuses an access).
        sys::FI_ECANCELED => TransferError::PeerDisconnected { peer, op, cause },
        _ => TransferError::Fabric { peer, op, cause },
    }
}

fn transfer_error(part: &Part, code: i32, cause: String) -> TransferError {
    classify(part.completion.peer(), part.op, &part.endpoint, code, cause)
}

/// One entry of `fi_getinfo`'s answer, duplicated so it owns its memory: valid while the `Info`
/// lives, with every attribute `fi_getinfo` fills (fabric, domain, endpoint, transmit, ...).
pub(crate) struct Info(*mut sys::fi_info);

// SAFETY: the entry is never modified after construction and libfabric only reads it, so it may
// be read from any thread, and freed from any.
unsafe impl Send for Info {}
// SAFETY: as above.
unsafe impl Sync for Info {}

impl Clone for Info {
    fn clone(&self) -> Info {
        // SAFETY: a valid entry (see `Info`).
        unsafe { Info::dup(self.0) }.expect("fi_dupinfo: out of memory")
    }
}

impl Drop for Info {
    fn drop(&mut self) {
        // SAFETY: the entry this `Info` alone owns, freed once; `fi_dupinfo` made it without a
        // next entry, so nothing else is freed.
        unsafe { sys::fi_freeinfo(self.0) };
    }
}

/// The text of a C string; empty for null.
///
/// # Safety
/// `s` is null or a NUL-terminated string valid for reads.
unsafe fn c_text(s: *const libc::c_char) -> String {
    if s.is_null() {
        return String::new();
    }
    // SAFETY: a NUL-terminated string (the caller's guarantee).
    unsafe { CStr::from_ptr(s) }.to_string_lossy().into_owned()
}

impl Info {
    /// A copy of `entry` alone (not the entries after it); `None` when out of memory.
    ///
    /// # Safety
    /// `entry` is a valid entry with the attributes `fi_getinfo` fills.
    unsafe fn dup(entry: *const sys::fi_info) -> Option<Info> {
        // SAFETY: a valid entry (the caller's guarantee).
        let copy = unsafe { sys::fi_dupinfo(entry) };
        (!copy.is_null()).then_some(Info(copy))
    }

    fn raw(&self) -> *mut sys::fi_info {
        self.0
    }

    fn entry(&self) -> &sys::fi_info {
        // SAFETY: valid, and never modified, while the `Info` lives (see `Info`).
        unsafe { &*self.0 }
    }

    fn fabric_attr(&self) -> &sys::fi_fabric_attr {
        // SAFETY: an attribute of the entry, set (see `Info`) and as long-lived.
        unsafe { &*self.entry().fabric_attr }
    }

    fn domain_attr(&self) -> &sys::fi_domain_attr {
        // SAFETY: as in `fabric_attr`.
        unsafe { &*self.entry().domain_attr }
    }

    fn tx_attr(&self) -> &sys::fi_tx_attr {
        // SAFETY: as in `fabric_attr`.
        unsafe { &*self.entry().tx_attr }
    }

    /// `tcp;ofi_rxm`, `shm`, `verbs;ofi_rxm`, `efa`, ...
    pub fn provider(&self) -> String {
        // SAFETY: libfabric's names are null or C strings the entry owns.
        unsafe { c_text(self.fabric_attr().prov_name) }
    }

    /// The core provider's name, without the utility layers (`tcp` for `tcp;ofi_rxm`).
    pub fn core_provider(&self) -> String {
        self.provider().split(';').next().unwrap_or_default().to_string()
    }

    pub fn fabric(&self) -> String {
        // SAFETY: as in `provider`.
        unsafe { c_text(self.fabric_attr().name) }
    }

    pub fn domain(&self) -> String {
        // SAFETY: as in `provider`.
        unsafe { c_text(self.domain_attr().name) }
    }

    pub fn caps(&self) -> u64 {
        self.entry().caps
    }

    pub fn mr_mode(&self) -> i32 {
        self.domain_attr().mr_mode
    }

    /// How many ops one RMA message may carry: the smaller of the local and remote scatter-gather
    /// limits.
    pub fn max_iov(&self) -> usize {
        let tx = self.tx_attr();
        tx.iov_limit.min(tx.rma_iov_limit).max(1)
    }

    /// Whether the provider applies RMA writes to the same target in the order they were posted.
    pub fn ordered_writes(&self) -> bool {
        let order = self.tx_attr().msg_order;
        order & (sys::FI_ORDER_WAW as u64 | sys::FI_ORDER_RMA_WAW) != 0
    }

    pub fn mr_local(&self) -> bool {
        self.mr_mode() & sys::FI_MR_LOCAL as i32 != 0
    }

    /// Whether the rail stages host transfers (see `rail.rs`): the provider moves bytes with the
    /// processes' CPUs (`tcp`, `shm`, `sockets`, `udp`), so a stalled peer can make an operation
    /// land long after its batch stopped, and the copy that staging adds is small beside the
    /// provider's own. Not with `FI_HMEM`: device memory is moved directly.
    pub fn staged(&self) -> bool {
        matches!(self.core_provider().as_str(), "tcp" | "shm" | "sockets" | "udp") && self.caps() & sys::FI_HMEM == 0
    }

    fn mr_flag_names(&self) -> Vec<&'static str> {
        let mode = self.mr_mode();
        [
            (sys::FI_MR_LOCAL, "local"),
            (sys::FI_MR_VIRT_ADDR, "virt_addr"),
            (sys::FI_MR_PROV_KEY, "prov_key"),
            (sys::FI_MR_ALLOCATED, "allocated"),
            (sys::FI_MR_ENDPOINT, "endpoint"),
            (sys::FI_MR_HMEM, "hmem"),
        ]
        .into_iter()
        .filter(|(bit, _)| mode & *bit as i32 != 0)
        .map(|(_, name)| name)
        .collect()
    }
}

/// The libfabric this process uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Libfabric {
    /// What was opened: `libfabric.so.1`, or the value of [`LIBRARY_ENV`].
    pub library: String,
    pub major: u32,
    pub minor: u32,
}

/// Opens libfabric, the first time it is called in the process (the fabric transport's start and
/// [`providers`] call it): `libfabric.so.1`, or the library [`LIBRARY_ENV`] names. Nothing
/// maps libfabric before. A missing library, one that is not libfabric, or one older than 1.17 is
/// [`FabricError::Unavailable`] (code 522), the same answer each time.
pub fn libfabric() -> Result<Libfabric> {
    let lib = sys::load().map_err(|e| FabricError::Unavailable(e.to_string()))?;
    Ok(Libfabric { library: lib.library().to_string(), major: lib.version() >> 16, minor: lib.version() & 0xffff })
}

/// Every RDM provider entry with RMA and messages, as `fi_getinfo` lists them: of `provider` only
/// when named, so no other provider is asked (libfabric 1.17 still runs every built-in provider's
/// initialisation, which only reads its parameters, except verbs and efa, which list devices).
fn get_infos(hmem: bool, provider: Option<&str>) -> Result<Vec<Info>> {
    libfabric()?;
    let provider = provider
        .map(CString::new)
        .transpose()
        .map_err(|_| Error::InvalidArgument("the fabric provider's name has a NUL byte".into()))?;
    let out_of_memory = |call| FabricError::Call { call, code: 0, detail: "out of memory".into() };
    // SAFETY: libfabric is loaded (above).
    let hints = unsafe { sys::kvferry_fi_allocinfo() };
    if hints.is_null() {
        return Err(out_of_memory("fi_allocinfo").into());
    }
    // SAFETY: a new entry only this function holds, with every attribute allocated, until it is
    // freed below; the attributes are allocations of their own, so the references do not overlap.
    let (h, fabric_attr, ep_attr, domain_attr) =
        unsafe { (&mut *hints, &mut *(*hints).fabric_attr, &mut *(*hints).ep_attr, &mut *(*hints).domain_attr) };
    if let Some(name) = &provider {
        // SAFETY: `name` is a C string. fi_freeinfo frees the copy.
        fabric_attr.prov_name = unsafe { libc::strdup(name.as_ptr()) };
        if fabric_attr.prov_name.is_null() {
            // SAFETY: the entry, freed once, as this returns.
            unsafe { sys::fi_freeinfo(hints) };
            return Err(out_of_memory("strdup").into());
        }
    }
    h.caps = (sys::FI_MSG | sys::FI_RMA) as u64 | if hmem { sys::FI_HMEM } else { 0 };
    // Contexts are `fi_context2`-sized, so providers that need either may use them.
    h.mode = sys::FI_CONTEXT | sys::FI_CONTEXT2;
    ep_attr.type_ = sys::FI_EP_RDM;
    // The registration modes this transport honours; FI_MR_RAW (keys over 8 bytes) is not one.
    let mut mr_mode =
        sys::FI_MR_LOCAL | sys::FI_MR_VIRT_ADDR | sys::FI_MR_PROV_KEY | sys::FI_MR_ALLOCATED | sys::FI_MR_ENDPOINT;
    if hmem {
        mr_mode |= sys::FI_MR_HMEM;
    }
    domain_attr.mr_mode = mr_mode as i32;
    domain_attr.threading = sys::FI_THREAD_DOMAIN;
    let mut list: *mut sys::fi_info = ptr::null_mut();
    // SAFETY: `hints` is a complete entry, only read; `list` receives the answer.
    let ret = unsafe { sys::fi_getinfo(sys::fi_version_of(1, 17), ptr::null(), ptr::null(), 0, hints, &mut list) };
    // SAFETY: the entry, freed once; the references to it are not used again.
    unsafe { sys::fi_freeinfo(hints) };
    if ret == -(sys::FI_ENODATA as i32) {
        return Ok(Vec::new());
    }
    check("fi_getinfo", ret)?;
    let mut infos = Vec::new();
    let mut cur = list;
    while !cur.is_null() {
        // SAFETY: an entry of the answer, which is ours until it is freed below; unlinked for the
        // copy, so only it is copied, then linked back.
        let (copy, next) = unsafe {
            let next = (*cur).next;
            (*cur).next = ptr::null_mut();
            let copy = Info::dup(cur);
            (*cur).next = next;
            (copy, next)
        };
        infos.push(copy);
        cur = next;
    }
    // SAFETY: the answer, freed once; the copies own their memory.
    unsafe { sys::fi_freeinfo(list) };
    infos.into_iter().collect::<Option<_>>().ok_or_else(|| out_of_memory("fi_dupinfo").into())
}

/// The core providers the loaded libfabric has, usable here or not; asks none of them.
fn provider_names() -> Vec<String> {
    let mut names = BTreeSet::new();
    let mut list: *mut sys::fi_info = ptr::null_mut();
    let flags = sys::FI_PROV_ATTR_ONLY;
    // SAFETY: no hints; `list` receives the answer.
    if unsafe { sys::fi_getinfo(sys::fi_version_of(1, 17), ptr::null(), ptr::null(), flags, ptr::null(), &mut list) }
        != 0
    {
        return Vec::new();
    }
    let mut cur = list;
    while !cur.is_null() {
        // SAFETY: an entry of the answer, which has a fabric attribute (FI_PROV_ATTR_ONLY fills
        // that one), whose name is null or a C string.
        let (name, next) = unsafe { (c_text((*(*cur).fabric_attr).prov_name), (*cur).next) };
        names.insert(name);
        cur = next;
    }
    // SAFETY: the answer, freed once.
    unsafe { sys::fi_freeinfo(list) };
    // Utility and hook providers (`ofi_rxm`, `ofi_hook_perf`, ...) layer over core ones.
    names.into_iter().filter(|n| !n.is_empty() && !n.starts_with("ofi_")).collect()
}

/// A provider entry as `kvferry info` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderInfo {
    pub provider: String,
    pub fabric: String,
    pub domain: String,
    /// The capabilities kvferry uses that the entry has: `rma`, `msg`, `remote_cq_data`, `hmem`.
    pub caps: Vec<&'static str>,
    /// The registration modes the provider requires (`local`, `virt_addr`, `prov_key`, ...).
    pub mr_mode: Vec<&'static str>,
}

/// The providers usable by this transport on this machine, one entry per (provider, fabric,
/// domain).
pub fn providers() -> Result<Vec<ProviderInfo>> {
    let mut list: Vec<ProviderInfo> = Vec::new();
    let entries = get_infos(false, None)?
        .iter()
        .map(|i| ProviderInfo {
            provider: i.provider(),
            fabric: i.fabric(),
            domain: i.domain(),
            caps: [
                (sys::FI_RMA as u64, "rma"),
                (sys::FI_MSG as u64, "msg"),
                (sys::FI_REMOTE_CQ_DATA as u64, "remote_cq_data"),
                (sys::FI_HMEM, "hmem"),
            ]
            .into_iter()
            .filter(|(bit, _)| i.caps() & bit != 0)
            .map(|(_, name)| name)
            .collect(),
            mr_mode: i.mr_flag_names(),
        })
        .collect::<Vec<_>>();
    for entry in entries {
        let same = |p: &&mut ProviderInfo| {
            (&p.provider, &p.fabric, &p.domain) == (&entry.provider, &entry.fabric, &entry.domain)
        };
        match list.iter_mut().find(same) {
            Some(known) => entry.caps.iter().for_each(|c| {
                if !known.caps.contains(c) {
                    known.caps.push(c)
                }
            }),
            None => list.push(entry),
        }
    }
    Ok(list)
}

/// The entries to open as rails: the named (or best) provider, one entry per domain.
fn choose_rails(config: &FabricConfig) -> Result<Vec<Info>> {
    let infos = get_infos(config.hmem, config.provider.as_deref())?;
    let wanted = match &config.provider {
        Some(p) => p.clone(),
        None => PREFERRED
            .iter()
            .find(|p| infos.iter().any(|i| i.core_provider() == **p))
            .map(|p| p.to_string())
            .unwrap_or_default(),
    };
    let mut rails: Vec<Info> = Vec::new();
    for info in infos.iter().filter(|i| i.core_provider() == wanted || i.provider() == wanted) {
        let domain = info.domain();
        let listed = config.domains.is_empty() || config.domains.contains(&domain);
        if listed && rails.iter().all(|r| r.domain() != domain) {
            rails.push(info.clone());
        }
    }
    if !config.domains.is_empty() {
        rails.sort_by_key(|r| config.domains.iter().position(|d| *d == r.domain()));
    }
    rails.truncate(config.rails.clamp(1, MAX_RAILS));
    if rails.is_empty() {
        // A named provider was the only one asked, so name the others without asking them.
        let found = match &config.provider {
            Some(_) => format!(
                " (this libfabric has providers {}; `kvferry info` lists those usable here)",
                provider_names().join(", ")
            ),
            None => match infos.iter().map(Info::provider).collect::<BTreeSet<_>>() {
                found if found.is_empty() => String::new(),
                found => format!(" (available: {})", found.into_iter().collect::<Vec<_>>().join(", ")),
            },
        };
        let mut wanted = if wanted.is_empty() { "(any)".to_string() } else { format!("`{wanted}`") };
        if !config.domains.is_empty() {
            wanted += &format!(" on domains {:?}", config.domains);
        }
        return Err(FabricError::NoProvider { wanted, found }.into());
    }
    Ok(rails)
}

/// A region registered with every rail.
struct LocalMr {
    region: MemRegion,
    /// Per rail: the registration id on that rail, and its local descriptor.
    rails: Vec<(u64, usize)>,
    /// Per rail: the key peers use.
    keys: Vec<u64>,
}

/// The key a peer needs: `version u8 | flags u8 | rails u8 | rails × key u64`. Flag bit 0: remote
/// addresses are virtual addresses (`FI_MR_VIRT_ADDR`), otherwise offsets into the region.
const KEY_VERSION: u8 = 1;
const KEY_VIRT_ADDR: u8 = 1;

struct RemoteKey {
    virt_addr: bool,
    keys: Vec<u64>,
}

fn encode_key(virt_addr: bool, keys: &[u64]) -> Vec<u8> {
    let mut out = vec![KEY_VERSION, if virt_addr { KEY_VIRT_ADDR } else { 0 }, keys.len() as u8];
    keys.iter().for_each(|k| out.extend_from_slice(&k.to_le_bytes()));
    out
}

fn decode_key(bytes: &[u8]) -> Option<RemoteKey> {
    let (&[version, flags, count], rest) = bytes.split_first_chunk::<3>()?;
    if version != KEY_VERSION || count == 0 || rest.len() != count as usize * 8 {
        return None;
    }
    let keys = rest.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap())).collect();
    Some(RemoteKey { virt_addr: flags & KEY_VIRT_ADDR != 0, keys })
}

/// The endpoint string: `provider|hex(rail 0 name),hex(rail 1 name),...`.
fn encode_endpoint(provider: &str, addresses: &[&[u8]]) -> String {
    let hex: Vec<String> = addresses.iter().map(|a| a.iter().map(|b| format!("{b:02x}")).collect()).collect();
    format!("{provider}|{}", hex.join(","))
}

fn decode_endpoint(address: &str) -> Option<(&str, Vec<Vec<u8>>)> {
    let (provider, rails) = address.split_once('|')?;
    let rails = rails
        .split(',')
        .map(|h| {
            (h.len() % 2 == 0 && !h.is_empty())
                .then(|| (0..h.len()).step_by(2).map(|i| u8::from_str_radix(&h[i..i + 2], 16).ok()).collect())
                .flatten()
        })
        .collect::<Option<Vec<Vec<u8>>>>()?;
    Some((provider, rails))
}

/// Regions registered with every rail, by (start address, rail 0 key).
type LocalRegistry = Arc<RwLock<BTreeMap<(u64, u64), Arc<LocalMr>>>>;

pub struct FabricTransport {
    local_name: Arc<str>,
    provider: String,
    stripe_min_bytes: u64,
    rails: Vec<Arc<Rail>>,
    endpoint: Endpoint,
    local: LocalRegistry,
}

impl FabricTransport {
    /// Messages between rails are authenticated with `auth` (see `session`).
    pub fn start(
        local_name: &str,
        config: FabricConfig,
        auth: Auth,
        notifications: Arc<NotificationQueue>,
    ) -> Result<Self> {
        let infos = choose_rails(&config)?;
        let provider = infos[0].provider();
        let local = LocalRegistry::default();
        let rails = infos
            .into_iter()
            .enumerate()
            .map(|(i, info)| {
                let limits = RailLimits { max_answers: config.max_answers, staging_kept: config.staging_kept_bytes };
                Rail::open(info, i, limits, notifications.clone(), local.clone(), auth.clone()).map(Arc::new)
            })
            .collect::<Result<Vec<_>>>()?;
        let addresses: Vec<&[u8]> = rails.iter().map(|r| &r.address[..]).collect();
        let endpoint = Endpoint { kind: TransportKind::Fabric, address: encode_endpoint(&provider, &addresses) };
        let stripe_min_bytes = config.stripe_min_bytes;
        Ok(FabricTransport { local_name: local_name.into(), provider, stripe_min_bytes, rails, endpoint, local })
    }

    /// The provider in use, e.g. `tcp;ofi_rxm`.
    pub fn provider(&self) -> &str {
        &self.provider
    }

    /// The domains in use, one per rail.
    pub fn domains(&self) -> Vec<String> {
        self.rails.iter().map(|r| r.info.domain()).collect()
    }

    /// Bytes of remote accesses posted so far, per rail.
    pub fn rail_bytes(&self) -> Vec<u64> {
        self.rails.iter().map(|r| r.bytes.load(Ordering::Relaxed)).collect()
    }

    fn virt_addr(&self) -> bool {
        self.rails[0].info.mr_mode() & sys::FI_MR_VIRT_ADDR as i32 != 0
    }
}

impl Transport for FabricTransport {
    fn kind(&self) -> TransportKind {
        TransportKind::Fabric
    }

    fn endpoint(&self) -> Endpoint {
        self.endpoint.clone()
    }

    fn supports(&self, kind: MemKind) -> bool {
        kind == MemKind::Host || (self.rails[0].info.caps() & sys::FI_HMEM != 0)
    }

    fn register(&self, region: MemRegion, _owner: MemoryOwner) -> Result<Vec<u8>> {
        if !self.supports(region.kind) {
            return Err(Error::Unsupported {
                what: format!("registering {} memory with the fabric transport", region.kind),
                why: format!("provider {} was not opened with FI_HMEM (FabricConfig::hmem)", self.provider),
            });
        }
        let mut keys = Vec::with_capacity(self.rails.len());
        let mut ids = Vec::with_capacity(self.rails.len());
        for rail in &self.rails {
            // Without FI_MR_PROV_KEY we choose the key: random, so a peer cannot guess another's.
            match rail.register(region, u64::from_le_bytes(crate::transport::random_key()?)) {
                Ok(mr) => {
                    keys.push(mr.key);
                    ids.push((mr.id, mr.desc));
                }
                Err(e) => {
                    ids.iter().zip(&self.rails).for_each(|((id, _), r)| r.deregister(*id));
                    return Err(e);
                }
            }
        }
        let mr = Arc::new(LocalMr { region, rails: ids, keys: keys.clone() });
        self.local.write_locked().insert((region.addr, keys[0]), mr);
        Ok(encode_key(self.virt_addr(), &keys))
    }

    fn deregister(&self, key: &[u8]) {
        let Some(key) = decode_key(key) else { return };
        let mut local = self.local.write_locked();
        let Some(&at) = local.iter().find(|((_, k), _)| *k == key.keys[0]).map(|(at, _)| at) else { return };
        let mr = local.remove(&at).expect("found above");
        drop(local);
        for ((id, _), rail) in mr.rails.iter().zip(&self.rails) {
            rail.deregister(*id);
        }
    }

    fn link(&self, peer: &str, endpoint: &Endpoint, regions: Vec<RemoteRegion>) -> Result<Arc<dyn PeerLink>> {
        let malformed = |what: &str| Error::InvalidArgument(format!("peer {peer} sent a malformed fabric {what}"));
        let (provider, addresses) = decode_endpoint(&endpoint.address).ok_or_else(|| malformed("endpoint"))?;
        if provider != self.provider {
            return Err(FabricError::ProviderMismatch {
                peer: peer.into(),
                ours: self.provider.clone(),
                theirs: provider.into(),
            }
            .into());
        }
        // Local rail i talks to the peer's rail i mod (its rail count).
        let routes = self
            .rails
            .iter()
            .enumerate()
            .map(|(i, rail)| {
                let address = &addresses[i % addresses.len()];
                Ok((rail.clone(), rail.insert(address.clone())?, Arc::from(&address[..])))
            })
            .collect::<Result<Vec<_>>>()?;
        let remote = remote_keys(peer, TransportKind::Fabric, &regions, |r| decode_key(&r.key).map(|k| (r.region, k)))?;
        Ok(Arc::new(FabricLink {
            from: self.local_name.clone(),
            peer: peer.to_string(),
            endpoint: endpoint.address.as_str().into(),
            routes,
            verdicts: (0..remote.len()).map(|_| AtomicU8::new(UNCHECKED)).collect(),
            remote,
            local: self.local.clone(),
            mr_local: self.rails[0].info.mr_local(),
            staged: self.rails[0].info.staged(),
            stripe_min_bytes: self.stripe_min_bytes,
            next_rail: AtomicUsize::new(0),
        }))
    }
}

/// A connection to one peer over every rail.
struct FabricLink {
    from: Arc<str>,
    peer: String,
    endpoint: Arc<str>,
    /// Per local rail: the rail, the peer's address in its address vector, and the address itself.
    routes: Vec<(Arc<Rail>, sys::fi_addr_t, Arc<[u8]>)>,
    /// The peer's regions (by index in its metadata) and their keys; `None` where not open to us.
    remote: Vec<Option<(MemRegion, RemoteKey)>>,
    /// Per remote region: whether its owner confirmed the keys and range (see `rail::Check`).
    verdicts: Arc<[AtomicU8]>,
    local: LocalRegistry,
    mr_local: bool,
    /// The rails stage their transfers, so the batch's parts are guarded (see `rail.rs`).
    staged: bool,
    stripe_min_bytes: u64,
    /// Small batches take turns on the rails.
    next_rail: AtomicUsize,
}

/// The local descriptor of `[addr, addr + len)` on rail `rail`: null without FI_MR_LOCAL (`local`
/// is then `None`), else that of the registration holding the range.
fn local_desc(local: Option<&BTreeMap<(u64, u64), Arc<LocalMr>>>, addr: u64, len: u64, rail: usize) -> Result<usize> {
    let Some(local) = local else { return Ok(0) };
    local
        .range(..=(addr, u64::MAX))
        .rev()
        .find(|(_, mr)| mr.region.contains(addr, len))
        .map(|(_, mr)| mr.rails[rail].1)
        .ok_or_else(|| {
            Error::InvalidArgument(format!("local range {addr:#x}+{len} is not registered with the fabric transport"))
        })
}

impl PeerLink for FabricLink {
    fn max_notification(&self) -> u64 {
        MAX_NOTIFICATION
    }

    fn post(&self, batch: Batch) -> Result<()> {
        let op = batch.completion.op();
        let rails = self.routes.len();
        let mut checks: Vec<Check> = Vec::new();
        for (index, o) in batch.ops.iter().enumerate() {
            let region = o.remote_region;
            match self.verdicts.get(region as usize).map(|v| v.load(Ordering::Acquire)) {
                Some(CONFIRMED) | None => {}
                Some(UNCHECKED) => {
                    if let (Some(Some((r, key))), false) =
                        (self.remote.get(region as usize), checks.iter().any(|c| c.region == region))
                    {
                        let (addr, len, keys) = (r.addr, r.len, key.keys.clone());
                        checks.push(Check { region, first_op: index as u32, addr, len, keys });
                    }
                }
                Some(refused) => {
                    let reason = rail::refusal(refused).unwrap_or(RejectReason::UnknownKey);
                    let e = TransferError::Rejected { peer: self.peer.clone(), op, index: index as u32, reason };
                    batch.completion.set_parts(1);
                    batch.completion.part_done(Err(e));
                    return Ok(());
                }
            }
        }
        if checks.len() > rail::MAX_CHECKS {
            return Err(Error::InvalidArgument(format!(
                "a batch may touch at most {} remote regions of peer {} not yet used on this link; this one \
                 touches {} (post a smaller batch first)",
                rail::MAX_CHECKS,
                self.peer,
                checks.len()
            )));
        }
        let total: u64 = batch.ops.iter().map(|o| o.len).sum();
        // Split the bytes into one share per rail when the batch is large enough to gain from it;
        // a batch that first checks regions runs on one rail, where the answer arrives.
        let (stripes, share) = match rails > 1 && total >= self.stripe_min_bytes && checks.is_empty() {
            true => (rails, total.div_ceil(rails as u64)),
            false => (1, u64::MAX),
        };
        let first = match stripes {
            1 => self.next_rail.fetch_add(1, Ordering::Relaxed) % rails,
            _ => 0,
        };
        // One look at the registrations for the whole batch, not one per op.
        let registry = self.mr_local.then(|| self.local.read_locked());
        let mut parts: Vec<Vec<RailOp>> = (0..stripes).map(|_| Vec::new()).collect();
        let (mut stripe, mut filled) = (0usize, 0u64);
        for (index, o) in batch.ops.iter().enumerate() {
            let Some(Some((region, key))) = self.remote.get(o.remote_region as usize) else {
                return Err(no_key_on_link(&self.peer, index, o));
            };
            let (mut local_addr, mut remote_addr, mut left) = (o.local_addr, o.remote_addr, o.len);
            while left > 0 {
                if filled >= share && stripe + 1 < stripes {
                    stripe += 1;
                    filled = 0;
                }
                let chunk = left.min(share - filled);
                let rail = (first + stripe) % rails;
                let target_rail = rail % key.keys.len();
                parts[stripe].push(RailOp {
                    local_addr,
                    local_desc: local_desc(registry.as_deref(), local_addr, chunk, rail)?,
                    remote_addr: if key.virt_addr { remote_addr } else { remote_addr - region.addr },
                    remote_key: key.keys[target_rail],
                    len: chunk,
                });
                filled += chunk;
                local_addr += chunk;
                remote_addr += chunk;
                left -= chunk;
            }
        }
        drop(registry);
        // An empty stripe (a batch smaller than the rails) still has to report, so drop it instead.
        let parts: Vec<(usize, Vec<RailOp>)> = parts
            .into_iter()
            .enumerate()
            .filter(|(i, p)| !p.is_empty() || *i == 0)
            .map(|(i, p)| ((first + i) % rails, p))
            .collect();
        match self.staged {
            true => batch.completion.set_guarded_parts(parts.len()),
            false => batch.completion.set_parts(parts.len()),
        }
        for (rail, ops) in parts {
            let (rail_handle, dest, peer_address) = &self.routes[rail];
            rail_handle.post(Part {
                op,
                dest: *dest,
                peer_address: peer_address.clone(),
                ops,
                checks: std::mem::take(&mut checks),
                verdicts: self.verdicts.clone(),
                completion: batch.completion.clone(),
                _keep_alive: batch.keep_alive.clone(),
                from: self.from.clone(),
                endpoint: self.endpoint.clone(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;

#[cfg(feature = "fuzzing")]
pub(crate) use session::Sessions;
