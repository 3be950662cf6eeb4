//! Ctrl-C (and SIGTERM, for `watch`) for one command: a token cancelled by
//! the first signal, after which the default action is back, so a second
//! one ends the process at once. Not tokio's `ctrl_c`: inside Node, signal-hook chains to Node's own
//! SIGINT handler, which re-raises the signal and loops. This installs a
//! plain handler that writes to a pipe, and a thread reading it cancels the
//! token. Dropping the guard restores the previous handler.

use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

use tokio_util::sync::CancellationToken;

static PIPE_W: AtomicI32 = AtomicI32::new(-1);
/// A signal was caught since `install_on`.
static CAUGHT: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(sig: libc::c_int) {
    if CAUGHT.swap(true, Ordering::SeqCst) {
        // A second signal before the first was taken up: its default
        // action now (both calls are async-signal-safe).
        // SAFETY: a zeroed sigaction with SIG_DFL is valid.
        unsafe {
            let mut dfl: libc::sigaction = std::mem::zeroed();
            dfl.sa_sigaction = libc::SIG_DFL;
            libc::sigaction(sig, &dfl, std::ptr::null_mut());
            libc::raise(sig);
        }
        return;
    }
    let fd = PIPE_W.load(Ordering::SeqCst);
    if fd >= 0 {
        // SAFETY: write(2) is async-signal-safe.
        unsafe {
            libc::write(fd, b"x".as_ptr().cast(), 1);
        }
    }
}

/// Restores the previous handlers when dropped.
pub struct Guard {
    old: Vec<(libc::c_int, libc::sigaction)>,
    write_fd: libc::c_int,
}

/// A close-on-exec pipe, as raw fds (the signal handler needs a plain fd).
/// On Linux atomically (`pipe2`); elsewhere `pipe` then `FD_CLOEXEC`, so a
/// child forked by another thread in between could inherit the pipe.
fn cloexec_pipe() -> std::io::Result<[libc::c_int; 2]> {
    use std::os::fd::IntoRawFd;
    #[cfg(target_os = "linux")]
    let (r, w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
    #[cfg(not(target_os = "linux"))]
    let (r, w) = {
        let (r, w) = rustix::pipe::pipe()?;
        for fd in [&r, &w] {
            rustix::io::fcntl_setfd(fd, rustix::io::FdFlags::CLOEXEC)?;
        }
        (r, w)
    };
    Ok([r.into_raw_fd(), w.into_raw_fd()])
}

/// Cancels `token` at the first SIGINT (printing `notice` on stderr), and
/// gives the next SIGINT its default action.
pub fn install(token: CancellationToken, notice: &'static str) -> Guard {
    install_on(&[libc::SIGINT], token, notice)
}

/// Cancels `token` at the first of `signals` (printing `notice` on
/// stderr), and gives the next one its default action (for SIGINT and
/// SIGTERM: the process ends at once).
pub fn install_on(
    signals: &[libc::c_int],
    token: CancellationToken,
    notice: &'static str,
) -> Guard {
    let Ok(fds) = cloexec_pipe() else {
        return Guard {
            old: Vec::new(),
            write_fd: -1,
        };
    };
    let signals = signals.to_vec();
    // SAFETY: plain libc calls on valid pointers.
    unsafe {
        CAUGHT.store(false, Ordering::SeqCst);
        PIPE_W.store(fds[1], Ordering::SeqCst);
        let mut new: libc::sigaction = std::mem::zeroed();
        new.sa_sigaction = on_sigint as *const () as usize;
        new.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut new.sa_mask);
        let mut olds = Vec::new();
        for &sig in &signals {
            let mut old: libc::sigaction = std::mem::zeroed();
            libc::sigaction(sig, &new, &mut old);
            olds.push((sig, old));
        }
        let read_fd = fds[0];
        std::thread::spawn(move || {
            let mut b = [0u8; 1];
            if libc::read(read_fd, b.as_mut_ptr().cast(), 1) == 1 {
                use std::io::Write;
                let _ = writeln!(std::io::stderr(), "{notice}");
                let mut dfl: libc::sigaction = std::mem::zeroed();
                dfl.sa_sigaction = libc::SIG_DFL;
                for &sig in &signals {
                    libc::sigaction(sig, &dfl, std::ptr::null_mut());
                }
                token.cancel();
            }
            libc::close(read_fd);
        });
        Guard {
            old: olds,
            write_fd: fds[1],
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if self.old.is_empty() {
            return;
        }
        PIPE_W.store(-1, Ordering::SeqCst);
        // SAFETY: restoring the handlers we replaced; closing our pipe end.
        unsafe {
            for (sig, old) in self.old.drain(..) {
                libc::sigaction(sig, &old, std::ptr::null_mut());
            }
            libc::close(self.write_fd);
        }
    }
}
