//! Checked conversions of C arguments: NULL, misaligned and oversized arguments become error codes
//! before anything is read or written.

use std::ffi::{CStr, c_char};
use std::time::Duration;

use kvferry_core::Deadline;

use crate::status::{CResult, Failure, KVFERRY_ERR_BUFFER_TOO_SMALL};

fn aligned<T>(ptr: *const T, name: &str) -> CResult {
    if !ptr.is_aligned() {
        return Err(Failure::invalid_argument(format!("{name} is not aligned for its type")));
    }
    Ok(())
}

/// A NUL-terminated UTF-8 string argument.
///
/// # Safety
/// A non-NULL `ptr` must point to a NUL-terminated string that outlives `'a`.
pub(crate) unsafe fn str_arg<'a>(ptr: *const c_char, name: &str) -> CResult<&'a str> {
    if ptr.is_null() {
        return Err(Failure::null(name));
    }
    // SAFETY: non-NULL and NUL-terminated by the caller's contract.
    let text = unsafe { CStr::from_ptr(ptr) };
    text.to_str().map_err(|_| Failure::invalid_argument(format!("{name} is not valid UTF-8")))
}

/// An array argument of `len` elements; NULL is accepted for an empty array.
///
/// # Safety
/// A non-NULL `ptr` must point to `len` initialized elements that outlive `'a`.
pub(crate) unsafe fn slice_arg<'a, T>(ptr: *const T, len: usize, name: &str) -> CResult<&'a [T]> {
    if len == 0 {
        return Ok(&[]);
    }
    if ptr.is_null() {
        return Err(Failure::null(name));
    }
    aligned(ptr, name)?;
    if len.checked_mul(size_of::<T>()).is_none_or(|bytes| bytes > isize::MAX as usize) {
        return Err(Failure::invalid_argument(format!("{name}: a length of {len} elements is impossible")));
    }
    // SAFETY: non-NULL, aligned, of a possible size, and `len` elements long by the caller's contract.
    Ok(unsafe { std::slice::from_raw_parts(ptr, len) })
}

/// One `"key=value"` creation option, as the option parsers of kvferry-core take it.
pub(crate) type KeyValue<'a> = (&'a str, &'a str);

/// An array of `count` `"key=value"` strings (NULL when `count` is 0).
///
/// # Safety
/// As for [`slice_arg`], and every element must be valid for [`str_arg`].
pub(crate) unsafe fn options_arg<'a>(options: *const *const c_char, count: usize) -> CResult<Vec<KeyValue<'a>>> {
    let pointers = unsafe { slice_arg(options, count, "options") }?;
    let mut parsed = Vec::with_capacity(pointers.len());
    for (i, &pointer) in pointers.iter().enumerate() {
        let option = unsafe { str_arg(pointer, &format!("options[{i}]")) }?;
        let (key, value) = option
            .split_once('=')
            .ok_or_else(|| Failure::invalid_argument(format!("option {option:?} is not of the form key=value")))?;
        parsed.push((key, value));
    }
    Ok(parsed)
}

/// Where a function stores its result; checked before the function does any work, so a bad
/// output pointer never leaves a created object behind.
pub(crate) struct Out<T>(*mut T);

impl<T> Out<T> {
    /// # Safety
    /// A non-NULL `ptr` must be valid for writing one `T`.
    pub unsafe fn new(ptr: *mut T, name: &str) -> CResult<Self> {
        if ptr.is_null() {
            return Err(Failure::null(name));
        }
        aligned(ptr, name)?;
        Ok(Out(ptr))
    }

    /// Like [`Out::new`], for outputs the caller may decline with NULL.
    ///
    /// # Safety
    /// As for [`Out::new`].
    pub unsafe fn optional(ptr: *mut T, name: &str) -> CResult<Option<Self>> {
        if ptr.is_null() { Ok(None) } else { unsafe { Out::new(ptr, name) }.map(Some) }
    }

    pub fn set(self, value: T) {
        // SAFETY: checked non-NULL and aligned in `new`; valid for writes by the caller's contract.
        unsafe { self.0.write(value) }
    }
}

/// A caller's output array (`buf`, `capacity` elements) and where to store the number of elements
/// that go in it.
pub(crate) struct OutBuf<T = u8> {
    buf: *mut T,
    capacity: usize,
    len: Out<usize>,
    name: &'static str,
}

impl<T: Copy> OutBuf<T> {
    /// # Safety
    /// A non-NULL `buf` must be valid for writing `capacity` elements; `len` as for [`Out::new`].
    pub unsafe fn new(buf: *mut T, capacity: usize, len: *mut usize, name: &'static str) -> CResult<Self> {
        if buf.is_null() && capacity > 0 {
            return Err(Failure::null(name));
        }
        if capacity > 0 {
            aligned(buf, name)?;
        }
        // SAFETY: forwarded contract.
        let len = unsafe { Out::new(len, "the length output") }?;
        Ok(OutBuf { buf, capacity, len, name })
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Whether `needed` elements fit; if not, the error tells the size to retry with.
    pub fn check(&self, needed: usize) -> CResult {
        if needed > self.capacity {
            let unit = if size_of::<T>() == 1 { "bytes" } else { "entries" };
            return Err(Failure::new(
                KVFERRY_ERR_BUFFER_TOO_SMALL,
                format!("{} needs {needed} {unit} but has room for {}", self.name, self.capacity),
            ));
        }
        Ok(())
    }

    /// Store `items`, or, when they do not fit, only their number in the length output.
    pub fn fill_items(self, items: &[T]) -> CResult {
        if let Err(too_small) = self.check(items.len()) {
            self.len.set(items.len());
            return Err(too_small);
        }
        // SAFETY: `items.len() <= capacity`, and `buf` is non-NULL and aligned whenever capacity > 0.
        unsafe { self.write(items) };
        self.len.set(items.len());
        Ok(())
    }

    /// # Safety
    /// `items.len()` must not exceed the capacity.
    unsafe fn write(&self, items: &[T]) {
        if !items.is_empty() {
            unsafe { std::ptr::copy_nonoverlapping(items.as_ptr(), self.buf, items.len()) };
        }
    }

    /// Store the required capacity after a failed [`OutBuf::check`].
    pub fn report_needed(self, needed: usize) {
        self.len.set(needed);
    }
}

impl OutBuf<u8> {
    /// Store `text` followed by a NUL (not counted in the stored length). When they do not fit,
    /// only the required capacity (NUL included) is stored, in the length output.
    pub fn fill_c_str(self, text: &str) -> CResult {
        let bytes = text.as_bytes();
        let needed = bytes.len() + 1;
        if let Err(too_small) = self.check(needed) {
            self.len.set(needed);
            return Err(too_small);
        }
        // SAFETY: `needed <= capacity`, and `buf` is non-NULL whenever capacity > 0.
        unsafe {
            self.write(bytes);
            self.buf.add(bytes.len()).write(0);
        }
        self.len.set(bytes.len());
        Ok(())
    }
}

pub(crate) fn deadline_ms(timeout_ms: u32) -> Deadline {
    Deadline::after(Duration::from_millis(timeout_ms.into()))
}
