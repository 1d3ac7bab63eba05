//! The FFI edge: checked calls into libcuda.

use cudarc::driver::sys;
use std::ffi::CStr;
use vramblk_store::StoreError;

/// Turns a CUresult into a StoreError naming what was being done.
pub(crate) fn check(r: sys::CUresult, what: &str) -> Result<(), StoreError> {
    if r == sys::CUresult::CUDA_SUCCESS {
        return Ok(());
    }
    Err(StoreError::Unavailable(format!("{what}: {}", describe(r))))
}

pub(crate) fn describe(r: sys::CUresult) -> String {
    let mut s: *const std::ffi::c_char = std::ptr::null();
    // SAFETY: cuGetErrorString writes a pointer to a static string or
    // leaves it null.
    let ok = unsafe { sys::cuGetErrorString(r, &mut s) } == sys::CUresult::CUDA_SUCCESS;
    if ok && !s.is_null() {
        // SAFETY: non-null results point at static NUL-terminated strings.
        let text = unsafe { CStr::from_ptr(s) }.to_string_lossy();
        format!("{text} ({r:?})")
    } else {
        format!("{r:?}")
    }
}

/// Loads libcuda and initialises the driver, or says in one sentence why not.
pub(crate) fn init() -> Result<i32, StoreError> {
    // SAFETY: only probes whether the shared library can be opened.
    if !unsafe { sys::is_culib_present() } {
        return Err(StoreError::Unavailable(
            "no CUDA driver: libcuda.so could not be loaded (install the NVIDIA driver, or use --backend host)".into(),
        ));
    }
    // SAFETY: plain driver calls with valid out-pointers.
    unsafe {
        let r = sys::cuInit(0);
        if r != sys::CUresult::CUDA_SUCCESS {
            return Err(StoreError::Unavailable(format!(
                "the CUDA driver found no usable NVIDIA GPU: {}",
                describe(r)
            )));
        }
        let mut version = 0;
        check(sys::cuDriverGetVersion(&mut version), "cuDriverGetVersion")?;
        if version < 11030 {
            return Err(StoreError::Unavailable(format!(
                "the NVIDIA driver supports CUDA {}.{}; vramblk needs 11.3 or newer",
                version / 1000,
                (version % 1000) / 10
            )));
        }
        Ok(version)
    }
}
