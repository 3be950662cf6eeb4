'use strict'
// The JS face of nanokit's key/value state store: a thin wrapper over the
// native `StateStore` (src/node/kv.rs) that
//  - gives every error a stable `err.code` (ENKLOCKED, ENKNOTHOLDER, ENKKEY,
//    ENKAGENT, ENKSTATECORRUPT, ENKSTATEUNAVAILABLE, …): napi-rs rejects
//    promises with a fixed status, so the native side puts the code in front
//    of the message and this wrapper moves it to `err.code`;
//  - implements `withLock(name, holder, timeoutSeconds, fn, options?)`, which
//    releases the lock even when `fn` throws (calling a JS callback from an
//    async Rust method is awkward in napi-rs 3, and this is four lines here).
const native = require('./binding.js')

const { withCode } = require('./errors.js')

function rethrow(err) {
  throw withCode(err)
}

// Runs a synchronous native call and returns its outcome as a settled promise.
function settled(fn) {
  try {
    return Promise.resolve(fn())
  } catch (e) {
    return Promise.reject(withCode(e))
  }
}

class State {
  #n
  #embedded

  constructor(nativeStore) {
    this.#n = nativeStore
    // On the embedded backend (SQLite in WAL mode) readers never wait for
    // writers, so reads run on the calling thread and return a settled
    // promise (a few µs instead of a thread hop). Writes and lock waits run
    // off the JS thread.
    this.#embedded = nativeStore.backend === 'embedded'
  }

  /** `embedded` or `postgres`. */
  get backend() {
    return this.#n.backend
  }

  /** The namespace of this store. */
  get agent() {
    return this.#n.agent
  }

  set(key, value) {
    return this.#n.set(key, value).catch(rethrow)
  }
  get(key) {
    if (this.#embedded) return settled(() => this.#n.getSync(key))
    return this.#n.get(key).catch(rethrow)
  }
  exists(key) {
    if (this.#embedded) return settled(() => this.#n.existsSync(key))
    return this.#n.exists(key).catch(rethrow)
  }
  delete(key) {
    return this.#n.delete(key).catch(rethrow)
  }
  list(prefix) {
    if (this.#embedded) return settled(() => this.#n.listSync(prefix))
    return this.#n.list(prefix).catch(rethrow)
  }
  increment(key, delta) {
    return this.#n.increment(key, delta).catch(rethrow)
  }
  lock(name, holder, timeoutSeconds, options) {
    return this.#n.lock(name, holder, timeoutSeconds, options).catch(rethrow)
  }
  unlock(name, holder) {
    return this.#n.unlock(name, holder).catch(rethrow)
  }
  forceUnlock(name) {
    return this.#n.forceUnlock(name).catch(rethrow)
  }
  isLocked(name) {
    if (this.#embedded) return settled(() => this.#n.isLockedSync(name))
    return this.#n.isLocked(name).catch(rethrow)
  }
  clear() {
    return this.#n.clear().catch(rethrow)
  }
  stats() {
    if (this.#embedded) return settled(() => this.#n.statsSync())
    return this.#n.stats().catch(rethrow)
  }

  /**
   * Runs `fn` while holding the lock `name` and releases it afterwards, also
   * when `fn` throws (the error of `fn` wins over a failed release; that one
   * is attached as `err.unlockError`). Resolves to what `fn` returns.
   */
  async withLock(name, holder, timeoutSeconds, fn, options) {
    if (typeof fn !== 'function') {
      const err = new TypeError('withLock(name, holder, timeoutSeconds, fn): fn must be a function')
      err.code = 'ENKARG'
      throw err
    }
    await this.lock(name, holder, timeoutSeconds, options)
    let result
    try {
      result = await fn()
    } catch (err) {
      try {
        await this.unlock(name, holder)
      } catch (unlockError) {
        if (err && typeof err === 'object') err.unlockError = unlockError
      }
      throw err
    }
    await this.unlock(name, holder)
    return result
  }

  // Synchronous twins (embedded backend only).
  setSync(key, value) {
    try {
      return this.#n.setSync(key, value)
    } catch (e) {
      throw withCode(e)
    }
  }
  getSync(key) {
    try {
      return this.#n.getSync(key)
    } catch (e) {
      throw withCode(e)
    }
  }
  existsSync(key) {
    try {
      return this.#n.existsSync(key)
    } catch (e) {
      throw withCode(e)
    }
  }
  deleteSync(key) {
    try {
      return this.#n.deleteSync(key)
    } catch (e) {
      throw withCode(e)
    }
  }
  listSync(prefix) {
    try {
      return this.#n.listSync(prefix)
    } catch (e) {
      throw withCode(e)
    }
  }
  incrementSync(key, delta) {
    try {
      return this.#n.incrementSync(key, delta)
    } catch (e) {
      throw withCode(e)
    }
  }
  lockSync(name, holder, timeoutSeconds, options) {
    try {
      return this.#n.lockSync(name, holder, timeoutSeconds, options)
    } catch (e) {
      throw withCode(e)
    }
  }
  unlockSync(name, holder) {
    try {
      return this.#n.unlockSync(name, holder)
    } catch (e) {
      throw withCode(e)
    }
  }
  isLockedSync(name) {
    try {
      return this.#n.isLockedSync(name)
    } catch (e) {
      throw withCode(e)
    }
  }
  clearSync() {
    try {
      return this.#n.clearSync()
    } catch (e) {
      throw withCode(e)
    }
  }
  statsSync() {
    try {
      return this.#n.statsSync()
    } catch (e) {
      throw withCode(e)
    }
  }

  /** Like `withLock` for a synchronous `fn` on the embedded backend. */
  withLockSync(name, holder, timeoutSeconds, fn, options) {
    this.lockSync(name, holder, timeoutSeconds, options)
    let result
    try {
      result = fn()
    } catch (err) {
      try {
        this.unlockSync(name, holder)
      } catch (unlockError) {
        if (err && typeof err === 'object') err.unlockError = unlockError
      }
      throw err
    }
    this.unlockSync(name, holder)
    return result
  }
}

/**
 * Opens the state store: PostgreSQL when `options.url` (or
 * NANOKIT_STATE_URL) is a postgres:// URL, else the embedded database of
 * `options.agent` (default `local`) in `options.stateDir` (default
 * NANOKIT_STATE_DIR, then ~/.nanokit/state).
 */
async function openState(options) {
  try {
    return new State(await native.openState(options))
  } catch (e) {
    throw withCode(e)
  }
}

/** Opens the embedded state store synchronously. */
function openStateSync(options) {
  try {
    return new State(native.openStateSync(options))
  } catch (e) {
    throw withCode(e)
  }
}

module.exports = { openState, openStateSync, State }
