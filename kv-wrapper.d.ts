// Types of kv-wrapper.js (the JS face of the state store). Errors thrown or
// rejected by every method carry `code` (ENKLOCKED, ENKNOTHOLDER, ENKKEY,
// ENKARG, ENKAGENT, ENKNOTINTEGER, ENKSTATECORRUPT, ENKSTATEUNAVAILABLE,
// ENKSTATEURL, ENKUNSUPPORTED, ENKSTATE; on PostgreSQL over TLS also
// ENKTLSREFUSED, ENKTLSREQUIRED, ENKTLSCERT, ENKTLSHOSTNAME, ENKTLSCLIENTCERT,
// ENKTLSFILE, ENKTLS).
import type { LockAcquired, StateLockOptions, LockState, OpenStateOptions, StateEntry, StateStats } from './index'

export type { LockAcquired, StateLockOptions, LockState, OpenStateOptions, StateEntry, StateStats }

export interface StateError extends Error {
  code: string
  /** Set by withLock when fn threw and the release failed too. */
  unlockError?: StateError
}

export declare class State {
  /** `embedded` or `postgres`. */
  readonly backend: string
  /** The namespace of this store. */
  readonly agent: string
  /** Stores a string, or any other JSON value (keys 1–1024 bytes, values ≤ 1 MiB, non-empty). */
  set(key: string, value: unknown): Promise<void>
  /** The value, or `null` when missing. */
  get(key: string): Promise<unknown>
  exists(key: string): Promise<boolean>
  delete(key: string): Promise<boolean>
  list(prefix?: string): Promise<StateEntry[]>
  /**
   * Atomically adds `delta` (default 1, a safe integer); missing = 0. The result stays exact: one beyond
   * ±Number.MAX_SAFE_INTEGER is refused with ENKNOTINTEGER and nothing changes.
   */
  increment(key: string, delta?: number): Promise<number>
  /** Acquires (or, for the same holder, renews) a named lock; ENKLOCKED names the holder. */
  lock(name: string, holder: string, timeoutSeconds: number, options?: StateLockOptions): Promise<LockAcquired>
  /** Only the holder may unlock (ENKNOTHOLDER otherwise). */
  unlock(name: string, holder: string): Promise<void>
  /** Removes a lock whoever holds it; resolves to the holder it had. */
  forceUnlock(name: string): Promise<string | null>
  /** Runs fn under the lock and releases it afterwards, also when fn throws. */
  withLock<T>(name: string, holder: string, timeoutSeconds: number, fn: () => T | Promise<T>, options?: StateLockOptions): Promise<T>
  isLocked(name: string): Promise<LockState>
  /** Deletes every key of the agent (locks are kept). */
  clear(): Promise<number>
  stats(): Promise<StateStats>

  // Synchronous twins: embedded backend only (ENKUNSUPPORTED on PostgreSQL).
  setSync(key: string, value: unknown): void
  getSync(key: string): unknown
  existsSync(key: string): boolean
  deleteSync(key: string): boolean
  listSync(prefix?: string): StateEntry[]
  incrementSync(key: string, delta?: number): number
  lockSync(name: string, holder: string, timeoutSeconds: number, options?: StateLockOptions): LockAcquired
  unlockSync(name: string, holder: string): void
  withLockSync<T>(name: string, holder: string, timeoutSeconds: number, fn: () => T, options?: StateLockOptions): T
  isLockedSync(name: string): LockState
  clearSync(): number
  statsSync(): StateStats
}

/** PostgreSQL when `options.url` (or NANOKIT_STATE_URL) is postgres://…, else the embedded file of `options.agent`. */
export declare function openState(options?: OpenStateOptions): Promise<State>
/** The embedded backend, synchronously. */
export declare function openStateSync(options?: OpenStateOptions): State
