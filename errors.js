'use strict'
// Native errors arrive with their stable code in front of the message
// (`ENKLOCKED: lock … is held by …`): napi-rs rejects promises with a fixed
// status. `withCode` moves that code to `err.code`, the one place callers
// match on. The codes are listed in the README ("Lease locks"); ENKFOREIGN
// means a symlink, FIFO, device or hard link was found where nanokit expects
// its own file or directory (in a shared repo, a volume, or at a lock path).

const CODE_PREFIX = /^(ENK[A-Z]+): /
// `up` / `down` rejections end with the run's trace: `\n[trace <id> <file>]`.
const TRACE_SUFFIX = /\n\[trace ([0-9a-f]{32})(?: (.+))?\]$/

function withCode(err) {
  if (err && typeof err.message === 'string') {
    const m = CODE_PREFIX.exec(err.message)
    if (m) {
      try {
        err.code = m[1]
        err.message = err.message.slice(m[0].length)
        const t = TRACE_SUFFIX.exec(err.message)
        if (t) {
          err.traceId = t[1]
          if (t[2]) err.traceFile = t[2]
          err.message = err.message.slice(0, t.index)
        }
      } catch {
        // A frozen error keeps its prefixed message.
      }
    }
  }
  return err
}

module.exports = { withCode }
