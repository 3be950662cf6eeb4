//! Plain Node-API callbacks for the three calls on hot paths:
//! `probeInstalled` (every `handleIsInstalled`, which the engine asks before
//! each job) and `tryAcquireLock` / `releaseLock` (every uncontended lock).
//!
//! The wrapper `#[napi]` generates around a function with arguments opens a
//! borrow scope per call, with allocations: about 0.25 µs, which is 7 % of a
//! cache-hit install check (two `statx` calls are the rest) and 4 % of an
//! acquire + release. Here each callback reads its arguments, calls the same
//! Rust function the `#[napi]` one would, and converts the result, nothing
//! else. Everything else stays `#[napi]`.

use std::ffi::CStr;
use std::ptr;

use napi::sys;
use napi::{check_status, Env, JsValue, Result};
use napi_derive::napi;

use crate::error::ErrorCode;

/// The arguments of one call (at most `N`; missing ones read as undefined).
struct Args<const N: usize> {
    env: sys::napi_env,
    argv: [sys::napi_value; N],
    argc: usize,
}

impl<const N: usize> Args<N> {
    /// # Safety
    /// `env` and `info` are those Node passed to the running callback.
    unsafe fn new(env: sys::napi_env, info: sys::napi_callback_info) -> Args<N> {
        let mut args = Args {
            env,
            argv: [ptr::null_mut(); N],
            argc: N,
        };
        // SAFETY: `argv` has room for `argc` values.
        let status = unsafe {
            sys::napi_get_cb_info(
                env,
                info,
                &mut args.argc,
                args.argv.as_mut_ptr(),
                ptr::null_mut(),
                ptr::null_mut(),
            )
        };
        if status != sys::Status::napi_ok {
            args.argc = 0;
        }
        args.argc = args.argc.min(N);
        args
    }

    fn get(&self, i: usize) -> Option<sys::napi_value> {
        (i < self.argc).then(|| self.argv[i])
    }

    fn type_of(&self, i: usize) -> sys::napi_valuetype {
        let Some(v) = self.get(i) else {
            return sys::ValueType::napi_undefined;
        };
        let mut t = sys::ValueType::napi_undefined;
        // SAFETY: a value of this call.
        unsafe { sys::napi_typeof(self.env, v, &mut t) };
        t
    }

    /// Whether argument `i` is absent, undefined or null.
    fn is_nullish(&self, i: usize) -> bool {
        matches!(
            self.type_of(i),
            sys::ValueType::napi_undefined | sys::ValueType::napi_null
        )
    }

    /// Argument `i` as a string; `Err` (a pending TypeError) if it is not one.
    fn string(&self, i: usize, name: &str) -> std::result::Result<String, Thrown> {
        let v = self
            .get(i)
            .ok_or_else(|| self.type_error(name, "a string"))?;
        // Most strings here (paths, tokens) fit: one call instead of two.
        let mut buf = [0u8; 512];
        let mut len = 0usize;
        // SAFETY: `buf` is writable for its length.
        let status = unsafe {
            sys::napi_get_value_string_utf8(
                self.env,
                v,
                buf.as_mut_ptr().cast(),
                buf.len(),
                &mut len,
            )
        };
        if status != sys::Status::napi_ok {
            return Err(self.type_error(name, "a string"));
        }
        if len < buf.len() - 1 {
            return Ok(utf8(buf[..len].to_vec()));
        }
        // Possibly cut short: ask for the length, then the whole of it.
        // SAFETY: a null buffer asks for the length only.
        unsafe { sys::napi_get_value_string_utf8(self.env, v, ptr::null_mut(), 0, &mut len) };
        let mut long = vec![0u8; len + 1];
        // SAFETY: `long` is writable for its length.
        unsafe {
            sys::napi_get_value_string_utf8(
                self.env,
                v,
                long.as_mut_ptr().cast(),
                long.len(),
                &mut len,
            )
        };
        long.truncate(len);
        Ok(utf8(long))
    }

    /// Argument `i` as an optional string (undefined or null: `None`).
    fn opt_string(&self, i: usize, name: &str) -> std::result::Result<Option<String>, Thrown> {
        if self.is_nullish(i) {
            return Ok(None);
        }
        self.string(i, name).map(Some)
    }

    /// Argument `i` as an optional number (undefined or null: `None`).
    fn opt_f64(&self, i: usize, name: &str) -> std::result::Result<Option<f64>, Thrown> {
        if self.is_nullish(i) {
            return Ok(None);
        }
        let mut n = 0f64;
        // SAFETY: argument `i` exists (it is not nullish).
        let status = unsafe { sys::napi_get_value_double(self.env, self.argv[i], &mut n) };
        if status != sys::Status::napi_ok {
            return Err(self.type_error(name, "a number"));
        }
        Ok(Some(n))
    }

    /// Argument `i` as a u32; anything else is `None`.
    fn u32(&self, i: usize) -> Option<u32> {
        let v = self.get(i)?;
        let mut n = 0u32;
        // SAFETY: a value of this call.
        let status = unsafe { sys::napi_get_value_uint32(self.env, v, &mut n) };
        (status == sys::Status::napi_ok).then_some(n)
    }

    fn type_error(&self, name: &str, expected: &str) -> Thrown {
        let message = std::ffi::CString::new(format!("{name} must be {expected}"))
            .unwrap_or_else(|_| c"invalid argument".into());
        // SAFETY: NUL-terminated message; a null code.
        unsafe { sys::napi_throw_type_error(self.env, ptr::null(), message.as_ptr()) };
        Thrown
    }

    /// Throws `e` as the `Error` [`super::js_err`] makes of it.
    fn throw<E: ErrorCode + std::fmt::Display>(&self, e: E) -> Thrown {
        let message = super::js_err(e).reason.replace('\0', " ");
        let message = std::ffi::CString::new(message).expect("NUL bytes replaced");
        // SAFETY: NUL-terminated message; a null code.
        unsafe { sys::napi_throw_error(self.env, ptr::null(), message.as_ptr()) };
        Thrown
    }

    fn boolean(&self, b: bool) -> sys::napi_value {
        let mut v = ptr::null_mut();
        // SAFETY: out-pointer to a local.
        unsafe { sys::napi_get_boolean(self.env, b, &mut v) };
        v
    }

    fn null(&self) -> sys::napi_value {
        let mut v = ptr::null_mut();
        // SAFETY: out-pointer to a local.
        unsafe { sys::napi_get_null(self.env, &mut v) };
        v
    }

    fn undefined(&self) -> sys::napi_value {
        let mut v = ptr::null_mut();
        // SAFETY: out-pointer to a local.
        unsafe { sys::napi_get_undefined(self.env, &mut v) };
        v
    }

    fn string_value(&self, s: &str) -> sys::napi_value {
        let mut v = ptr::null_mut();
        // SAFETY: `s` is valid UTF-8 of the given length.
        unsafe {
            sys::napi_create_string_utf8(self.env, s.as_ptr().cast(), s.len() as isize, &mut v)
        };
        v
    }
}

/// Node-API writes UTF-8 (lone surrogates become U+FFFD).
fn utf8(bytes: Vec<u8>) -> String {
    String::from_utf8(bytes).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

/// A JS exception is pending; the callback returns null to let it throw.
struct Thrown;

/// Runs a callback's `body` with its (at most `N`) arguments; returns its
/// value, or null with the exception pending.
///
/// # Safety
/// `env` and `info` are those Node passed to the running callback.
unsafe fn callback<const N: usize>(
    env: sys::napi_env,
    info: sys::napi_callback_info,
    body: impl FnOnce(&Args<N>) -> std::result::Result<sys::napi_value, Thrown>,
) -> sys::napi_value {
    // SAFETY: the caller's.
    let args = unsafe { Args::<N>::new(env, info) };
    body(&args).unwrap_or(ptr::null_mut())
}

/// `probeInstalled(id) → boolean`: whether the package of install probe `id`
/// is completely installed now. A missing or non-number id is no probe.
unsafe extern "C" fn probe_installed(
    env: sys::napi_env,
    info: sys::napi_callback_info,
) -> sys::napi_value {
    // SAFETY: Node's own arguments for this callback.
    unsafe {
        callback::<1>(env, info, |args| {
            let installed = args.u32(0).is_some_and(super::repo::probe_installed);
            Ok(args.boolean(installed))
        })
    }
}

/// `tryAcquireLock(path, staleMs?, holder?) → token | null`.
unsafe extern "C" fn try_acquire_lock(
    env: sys::napi_env,
    info: sys::napi_callback_info,
) -> sys::napi_value {
    // SAFETY: Node's own arguments for this callback.
    unsafe {
        callback::<3>(env, info, |args| {
            let path = args.string(0, "path")?;
            let stale_ms = args.opt_f64(1, "staleMs")?;
            let holder = args.opt_string(2, "holder")?;
            match super::lock::try_acquire(&path, stale_ms, holder) {
                Ok(Some(token)) => Ok(args.string_value(&token)),
                Ok(None) => Ok(args.null()),
                Err(e) => Err(args.throw(e)),
            }
        })
    }
}

/// `releaseLock(token)`: throws `ENKLOCKLOST` if the lease had been lost; an
/// unknown (already released) token does nothing.
unsafe extern "C" fn release_lock(
    env: sys::napi_env,
    info: sys::napi_callback_info,
) -> sys::napi_value {
    // SAFETY: Node's own arguments for this callback.
    unsafe {
        callback::<1>(env, info, |args| {
            let token = args.string(0, "token")?;
            super::lock::release(&token)
                .map(|()| args.undefined())
                .map_err(|e| args.throw(e))
        })
    }
}

type Callback = unsafe extern "C" fn(sys::napi_env, sys::napi_callback_info) -> sys::napi_value;

const CALLBACKS: [(&CStr, Callback); 3] = [
    (c"probeInstalled", probe_installed),
    (c"tryAcquireLock", try_acquire_lock),
    (c"releaseLock", release_lock),
];

/// Adds the callbacks above to the module's exports.
#[napi(module_exports)]
pub fn raw_exports(exports: napi::bindgen_prelude::Object, env: Env) -> Result<()> {
    for (name, callback) in CALLBACKS {
        let mut function = ptr::null_mut();
        // SAFETY: a function made from a callback with Node-API's signature,
        // set on the module's exports object, in the module's own env.
        unsafe {
            check_status!(sys::napi_create_function(
                env.raw(),
                name.as_ptr(),
                name.count_bytes() as isize,
                Some(callback),
                ptr::null_mut(),
                &mut function,
            ))?;
            check_status!(sys::napi_set_named_property(
                env.raw(),
                exports.raw(),
                name.as_ptr(),
                function
            ))?;
        }
    }
    Ok(())
}
