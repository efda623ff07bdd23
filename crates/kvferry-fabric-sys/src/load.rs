//! libfabric opened at run time: `dlopen` when the fabric transport starts, never at process start.
//!
//! The functions libfabric exports are resolved with `dlvsym` at the symbol versions a build-time
//! link against libfabric 1.17 would record (`fi_getinfo@FABRIC_1.3`, ...): later libraries make
//! newer versions the default, with larger structures than the ones in `bindings.rs`.

use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::fmt;
use std::ptr;
use std::sync::OnceLock;

use crate::{FI_ENOSYS, fi_fabric_attr, fi_info, fi_version_of, fid_fabric};

/// The environment variable naming the libfabric to open instead of `libfabric.so.1` (a path, or
/// a name the dynamic linker looks up). Read once, at the first [`load`].
pub const LIBRARY_ENV: &str = "KVFERRY_LIBFABRIC";

const DEFAULT_LIBRARY: &str = "libfabric.so.1";

/// The oldest libfabric the bindings hold for: the headers they are generated from.
const MIN_VERSION: u32 = fi_version_of(1, 17);

type GetInfo = unsafe extern "C" fn(u32, *const c_char, *const c_char, u64, *const fi_info, *mut *mut fi_info) -> c_int;
type FreeInfo = unsafe extern "C" fn(*mut fi_info);
type DupInfo = unsafe extern "C" fn(*const fi_info) -> *mut fi_info;
type Fabric = unsafe extern "C" fn(*mut fi_fabric_attr, *mut *mut fid_fabric, *mut c_void) -> c_int;
type StrError = unsafe extern "C" fn(c_int) -> *const c_char;
type Version = unsafe extern "C" fn() -> u32;

/// An opened libfabric. Never closed: providers keep threads and objects for the whole process.
#[derive(Debug)]
pub struct Libfabric {
    library: String,
    version: u32,
    getinfo: GetInfo,
    freeinfo: FreeInfo,
    dupinfo: DupInfo,
    fabric: Fabric,
    strerror: StrError,
}

impl Libfabric {
    /// What was opened: the value of [`LIBRARY_ENV`], or `libfabric.so.1`.
    pub fn library(&self) -> &str {
        &self.library
    }

    /// `fi_version()`: `major << 16 | minor`.
    pub fn version(&self) -> u32 {
        self.version
    }
}

/// Why libfabric could not be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadError {
    /// The library asked for.
    pub library: String,
    pub reason: String,
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "libfabric could not be loaded from {}: {}", self.library, self.reason)
    }
}

impl std::error::Error for LoadError {}

static LIBFABRIC: OnceLock<Result<Libfabric, LoadError>> = OnceLock::new();

/// Opens libfabric (the first call; later calls return the same answer): the library named by
/// [`LIBRARY_ENV`] or `libfabric.so.1`, which must export the functions below and be 1.17 or
/// later. Loading it leaves the process's signal handlers as they were.
pub fn load() -> Result<&'static Libfabric, LoadError> {
    LIBFABRIC
        .get_or_init(|| {
            let library = std::env::var(LIBRARY_ENV).ok().filter(|v| !v.is_empty());
            open(&library.unwrap_or_else(|| DEFAULT_LIBRARY.to_string()))
        })
        .as_ref()
        .map_err(Clone::clone)
}

fn loaded() -> Option<&'static Libfabric> {
    LIBFABRIC.get().and_then(|r| r.as_ref().ok())
}

fn open(library: &str) -> Result<Libfabric, LoadError> {
    let error = |reason: String| LoadError { library: library.to_string(), reason };
    let name = CString::new(library).map_err(|_| error("the name has a NUL byte".into()))?;
    // SAFETY: a valid C string; RTLD_NOW reports a missing dependency here rather than at a call;
    // RTLD_LOCAL keeps libfabric's symbols from resolving anyone else's.
    let handle = keeping_signal_handlers(|| unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) });
    if handle.is_null() {
        return Err(error(dl_error()));
    }
    let symbol = |name: &CStr, version: &CStr| {
        // SAFETY: a live handle and valid C strings.
        let ptr = unsafe { libc::dlvsym(handle, name.as_ptr(), version.as_ptr()) };
        match ptr.is_null() {
            true => Err(error(format!("it does not export {}@{}", name.to_string_lossy(), version.to_string_lossy()))),
            false => Ok(ptr),
        }
    };
    // SAFETY: each symbol has the C signature of its declaration in the 1.17 headers at that
    // version; function and data pointers have the same size here.
    let lib = unsafe {
        let version: Version = std::mem::transmute(symbol(c"fi_version", c"FABRIC_1.0")?);
        Libfabric {
            library: library.to_string(),
            version: version(),
            getinfo: std::mem::transmute::<*mut c_void, GetInfo>(symbol(c"fi_getinfo", c"FABRIC_1.3")?),
            freeinfo: std::mem::transmute::<*mut c_void, FreeInfo>(symbol(c"fi_freeinfo", c"FABRIC_1.3")?),
            dupinfo: std::mem::transmute::<*mut c_void, DupInfo>(symbol(c"fi_dupinfo", c"FABRIC_1.3")?),
            fabric: std::mem::transmute::<*mut c_void, Fabric>(symbol(c"fi_fabric", c"FABRIC_1.1")?),
            strerror: std::mem::transmute::<*mut c_void, StrError>(symbol(c"fi_strerror", c"FABRIC_1.0")?),
        }
    };
    if lib.version < MIN_VERSION {
        return Err(error(format!(
            "it is version {}.{}; 1.17 or later is needed",
            lib.version >> 16,
            lib.version & 0xffff
        )));
    }
    Ok(lib)
}

fn dl_error() -> String {
    // SAFETY: dlerror returns null or a NUL-terminated string valid until the next dl* call on
    // this thread.
    let message = unsafe { libc::dlerror() };
    match message.is_null() {
        true => "unknown dlopen error".into(),
        false => unsafe { CStr::from_ptr(message) }.to_string_lossy().into_owned(),
    }
}

/// Runs `f`, then puts back every signal handler it replaced. Libraries libfabric pulls in, and
/// providers it starts, install handlers of their own (libinfinipath's calls `exit` from inside
/// the handler, which crashes a process stopped with SIGTERM); the process's handlers are its own.
/// A handler another thread sets while `f` runs, for a signal `f` also changes, is lost.
fn keeping_signal_handlers<T>(f: impl FnOnce() -> T) -> T {
    let current = |signal: c_int| {
        // SAFETY: a query only; the struct is plain data.
        let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
        (unsafe { libc::sigaction(signal, ptr::null(), &mut action) } == 0).then_some(action)
    };
    let signals = 1..=libc::SIGRTMAX();
    let before: Vec<_> = signals.clone().map(current).collect();
    let out = f();
    for (signal, old) in signals.zip(before) {
        if let (Some(old), Some(now)) = (old, current(signal))
            && (now.sa_sigaction, now.sa_flags) != (old.sa_sigaction, old.sa_flags)
        {
            // SAFETY: restores an action read from the kernel above.
            unsafe { libc::sigaction(signal, &old, ptr::null_mut()) };
        }
    }
    out
}

const NOT_LOADED: c_int = -(FI_ENOSYS as c_int);

/// `fi_getinfo`; `-FI_ENOSYS` before [`load`] succeeded. The first call initialises libfabric's
/// providers, keeping the process's signal handlers as they were.
///
/// # Safety
/// As libfabric's `fi_getinfo`.
pub unsafe fn fi_getinfo(
    version: u32,
    node: *const c_char,
    service: *const c_char,
    flags: u64,
    hints: *const fi_info,
    info: *mut *mut fi_info,
) -> c_int {
    match loaded() {
        Some(lib) => keeping_signal_handlers(|| unsafe { (lib.getinfo)(version, node, service, flags, hints, info) }),
        None => NOT_LOADED,
    }
}

/// `fi_freeinfo`; nothing before [`load`] succeeded (no entry can exist then).
///
/// # Safety
/// As libfabric's `fi_freeinfo`.
pub unsafe fn fi_freeinfo(info: *mut fi_info) {
    if let Some(lib) = loaded() {
        unsafe { (lib.freeinfo)(info) }
    }
}

/// `fi_dupinfo`; null before [`load`] succeeded.
///
/// # Safety
/// As libfabric's `fi_dupinfo`.
pub unsafe fn fi_dupinfo(info: *const fi_info) -> *mut fi_info {
    match loaded() {
        Some(lib) => unsafe { (lib.dupinfo)(info) },
        None => ptr::null_mut(),
    }
}

/// `fi_allocinfo()`, the `static inline` `fi_dupinfo(NULL)`; null before [`load`] succeeded.
///
/// # Safety
/// As libfabric's `fi_allocinfo`.
pub unsafe fn kvferry_fi_allocinfo() -> *mut fi_info {
    unsafe { fi_dupinfo(ptr::null()) }
}

/// `fi_fabric`; `-FI_ENOSYS` before [`load`] succeeded.
///
/// # Safety
/// As libfabric's `fi_fabric`.
pub unsafe fn fi_fabric(attr: *mut fi_fabric_attr, fabric: *mut *mut fid_fabric, context: *mut c_void) -> c_int {
    match loaded() {
        Some(lib) => unsafe { (lib.fabric)(attr, fabric, context) },
        None => NOT_LOADED,
    }
}

/// `fi_strerror`; a fixed text before [`load`] succeeded.
///
/// # Safety
/// As libfabric's `fi_strerror`.
pub unsafe fn fi_strerror(errnum: c_int) -> *const c_char {
    match loaded() {
        Some(lib) => unsafe { (lib.strerror)(errnum) },
        None => c"libfabric is not loaded".as_ptr(),
    }
}

/// `fi_version()` of the loaded library; 0 before [`load`] succeeded.
pub fn fi_version() -> u32 {
    loaded().map_or(0, Libfabric::version)
}

#[cfg(test)]
mod tests {
    use super::*;

    // `load` itself is exercised by kvferry-core's tests, each in its own process (its answer is
    // cached per process); `open` can be tried here without touching that cache.

    #[test]
    fn a_missing_library_is_an_error_naming_it() {
        let e = open("/nonexistent/libfabric.so.1").unwrap_err();
        assert_eq!(e.library, "/nonexistent/libfabric.so.1");
        assert!(e.to_string().contains("could not be loaded from /nonexistent/libfabric.so.1"), "{e}");
    }

    #[test]
    fn a_library_that_is_not_libfabric_is_refused() {
        let e = open("libc.so.6").unwrap_err();
        assert!(e.reason.contains("fi_version@FABRIC_1.0"), "{e}");
    }

    #[test]
    fn signal_handlers_replaced_inside_are_put_back() {
        extern "C" fn ignore(_: c_int) {}
        let handler = |signal| {
            let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
            unsafe { libc::sigaction(signal, ptr::null(), &mut action) };
            action.sa_sigaction
        };
        let before = handler(libc::SIGUSR2);
        keeping_signal_handlers(|| {
            unsafe { libc::signal(libc::SIGUSR2, ignore as extern "C" fn(c_int) as libc::sighandler_t) };
            assert_ne!(handler(libc::SIGUSR2), before);
        });
        assert_eq!(handler(libc::SIGUSR2), before);
    }

    #[test]
    fn opening_libfabric_keeps_the_process_signal_handlers() {
        let handlers = || {
            [libc::SIGTERM, libc::SIGINT, libc::SIGSEGV].map(|s| {
                let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
                unsafe { libc::sigaction(s, ptr::null(), &mut action) };
                action.sa_sigaction
            })
        };
        let before = handlers();
        let lib = open(DEFAULT_LIBRARY).unwrap();
        assert!(lib.version() >= MIN_VERSION);
        assert_eq!(handlers(), before);
    }
}
