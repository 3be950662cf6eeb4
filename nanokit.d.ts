// Types of nanokit's public JS API (nanokit.js, `require('nanokit-engine')`). The native binding's own
// types are generated into index.d.ts by @napi-rs/cli.
import type {
  InstallOptions as NativeInstallOptions,
  InstallResult,
  LockHolder,
  LockInspection,
  ProvisionResult,
  InfraOptions,
  InfraEvent,
  ConfigInfo,
  PlanResult,
  RunResult,
  ServiceStatus,
  DriftResult,
  HubOptions,
  WatchResult,
} from './index'

export type { InstallResult, LockHolder, LockInspection, ProvisionResult }
export type { InfraOptions, InfraEvent, ConfigInfo, PlanResult, RunResult, ServiceStatus, DriftResult, HubOptions, WatchResult }

/** Stable error codes carried in `err.code`. */
export type NanokitErrorCode =
  | 'ENKLOCKED'
  | 'ENKLOCKLOST'
  | 'ENKABORTED'
  | 'ENKSPEC'
  | 'ENKIO'
  | 'ENKINSTALL'
  | 'ENKREPO'
  | 'ENKFOREIGN'
  | 'ENKPROVISION'
  | 'ENKCONFIG'
  | 'ENKDEP'
  | 'ENKCYCLE'
  | 'ENKFORCE'
  | 'ENKFAILED'
  | 'ENKCANCELLED'
  | 'ENKTARGET'
  | 'ENKSTATE'
  | 'ENKPROVIDER'
  | 'ENKTRACE'
  | 'ENKHUBPORT'
  | (string & {})

export interface NanokitError extends Error {
  code: NanokitErrorCode
}

/** Options of `acquireLock` / `tryAcquireLock` / `withLock`. */
export interface LockOptions {
  /** A lease not renewed for this long (as observed by the waiter) may be taken over. Default 30000; must be positive (else `ENKSPEC`). */
  staleMs?: number
  /** Give up with `ENKLOCKED` after this long; 0 tries once. Default (or `Infinity`): wait as long as it takes. */
  timeoutMs?: number
  /** A label shown to others who find the lock held. */
  holder?: string
  /** Aborts a wait with `ENKABORTED`. */
  signal?: AbortSignal
}

/** A held lock. */
export declare class LockHandle {
  /** Unique token of this acquisition. */
  readonly token: string
  /** The lock file's path. */
  readonly path: string
  /** True once the lease was found taken over or broken. */
  readonly lost: boolean
  /** True once released. */
  readonly released: boolean
  /** Aborted (reason: an `ENKLOCKLOST` error) if the lease is lost while held. Never keeps the event loop alive. */
  readonly signal: AbortSignal
  /** Releases the lock; throws `ENKLOCKLOST` if the lease had been lost. Idempotent. */
  release(): void
}

/** Waits for the lock at `path` and takes it. */
export declare function acquireLock(path: string, options?: LockOptions): Promise<LockHandle>
/** Takes the lock if it is free now (or its holder on this host is dead); null otherwise. Never waits. */
export declare function tryAcquireLock(path: string, options?: Omit<LockOptions, 'signal' | 'timeoutMs'>): LockHandle | null
/** Runs `fn` holding the lock; releases it afterwards, also when `fn` throws. */
export declare function withLock<T>(path: string, fn: (lock: LockHandle) => T | Promise<T>, options?: LockOptions): Promise<T>
/** Who holds the lock at `path`, or null if it is free. */
export declare function inspectLock(path: string): LockInspection | null
/** Clears the lock at `path` whoever holds it; returns the removed holder or null. */
export declare function breakLock(path: string): LockHolder | null

/** OpenFn-style logger: any of these methods may be present. */
export interface Logger {
  info?(message: string): void
  debug?(message: string): void
  log?(message: string): void
  warn?(message: string): void
  error?(message: string): void
}

/** Installs `specifier` into `dir`, producing `<dir>/node_modules/<name>_<version>`. */
export type Installer = (specifier: string, dir: string, logger?: Logger) => Promise<void>

export interface InstallOptions extends NativeInstallOptions {
  /** Replaces nanokit's npm installer; it is given a private staging directory. */
  install?: Installer
  logger?: Logger
  /** Aborts waiting for another installer with `ENKABORTED`. */
  signal?: AbortSignal
}

/** Whether `specifier` (name@version) is completely installed. Synchronous, lock-free. */
export declare function isInstalled(repoDir: string, specifier: string): boolean
/** Installs `specifier` exactly once across every process sharing `repoDir`. */
export declare function install(repoDir: string, specifier: string, options?: InstallOptions): Promise<InstallResult>

/** The `autoinstall` option of `@openfn/engine-multi`. */
export interface LockedHandlers {
  handleInstall(specifier: string, repoDir?: string, logger?: Logger): Promise<void>
  handleIsInstalled(specifier: string, repoDir?: string, logger?: Logger): Promise<boolean>
}
export declare function createLockedHandlers(repoDir: string, options?: InstallOptions): LockedHandlers

export interface ProvisionOptions {
  /** The install command: an argument vector, or a string run with `sh -c`. */
  command: string | string[]
  /** Files whose contents decide whether to install again. */
  manifests?: string[]
  /** Working directory of the command (default: `dir`). */
  cwd?: string
  staleMs?: number
  timeoutMs?: number
  holder?: string
  /** Capture output into the result (default true) instead of inheriting stdout/stderr. */
  capture?: boolean
  signal?: AbortSignal
}
/** Runs `options.command` in `dir` once per manifest hash, under `<dir>/.nk-install-lock`. */
export declare function provision(dir: string, options: ProvisionOptions): Promise<ProvisionResult>

/** One installed package in `repo.status`. */
export interface RepoInstalledPackage {
  alias: string
  specifier: string
  /** `sha256:<hex>` of its package.json as installed. */
  hash: string
  installedAtMs: number
  /** Its package.json still matches `hash`. */
  verified: boolean
  /** Last use: a worker asked whether it is installed (recorded at most hourly per process), or it was installed. */
  lastUsedMs: number
}
/** A staging directory of an install attempt. */
export interface RepoStagingEntry {
  path: string
  owner: { hostId: string; hostname: string; pid: number; pidStart?: number; token: string; installerPid?: number; installerStart?: number; createdAtMs: number } | null
  ownerAlive: boolean | null
  installerRunning: boolean | null
  /** The attempt is over (dead owner, or lock passed on): removed by the next install of any package, or gc. */
  orphaned: boolean
  trash: boolean
}
export interface RepoStatus {
  dir: string
  installed: RepoInstalledPackage[]
  locks: LockInspection[]
  /** Packages in node_modules without a sentinel and no install in progress (staging trees are in `staging`). */
  leftovers: string[]
  staging: RepoStagingEntry[]
  /** The content-addressed store; null before the first install. */
  store: {
    files: number
    bytes: number
    unreferencedFiles: number
    unreferencedBytes: number
    /** Every file of every package counted as a copy of its own. */
    packageBytes: number
    /** What they take on disk. */
    diskBytes: number
    /** packageBytes / diskBytes. */
    sharingRatio: number
  } | null
  /** What `repo.gc` would remove. */
  gc: { storeFiles: number; storeBytes: number; orphanedStaging: string[]; unused: string[]; olderThanMs: number }
}
export interface GcOptions {
  /** Also remove installed versions not used for this long. */
  olderThanMs?: number
  /** Report what would be removed; remove nothing. */
  dryRun?: boolean
}
export interface GcReport {
  dryRun: boolean
  /** Versions removed (unpublished, then deleted). */
  removed: string[]
  /** Old versions kept, and why (being installed, used meanwhile). */
  kept: { specifier: string; reason: string }[]
  /** Staging trees of finished or dead installs. */
  staging: string[]
  /** Store files no package linked to. */
  store: { files: number; bytes: number }
}
export interface AdoptReport {
  /** Specifiers adopted now (no npm run). */
  adopted: string[]
  /** Already installed by nanokit. */
  already: string[]
  /** Left as they are (installed again on first use), and why. */
  skipped: { alias: string; reason: string }[]
}
/** The shared package repository as a whole. */
export declare const repo: {
  /** What is installed, locks, leftovers, staging trees, store size and sharing, gc candidates. */
  status(repoDir: string, options?: { olderThanMs?: number }): Promise<RepoStatus>
  /** Removes unreferenced store files, orphaned staging trees and (with `olderThanMs`) unused versions. */
  gc(repoDir: string, options?: GcOptions): Promise<GcReport>
  /** Takes over a repo populated by plain `npm install` of aliases or by the PR #1416 lock, without reinstalling. */
  adopt(repoDir: string): Promise<AdoptReport>
}

/**
 * Exports the spans still buffered for OpenTelemetry (installs, lock waits)
 * when `OTEL_EXPORTER_OTLP_ENDPOINT` / `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is
 * set; `up` and `down` flush their own before resolving. Never rejects.
 */
export declare function flushTraces(): Promise<void>

/** Runs the nanokit command line; resolves to the exit code. */
export declare function cli(args: string[]): Promise<number>

// ---- Reconciliation engine (nanokit.yml → plan → up/down) ----------------
// Errors carry `err.code`: ENKCONFIG, ENKDEP, ENKCYCLE (configuration),
// ENKLOCKED (another run holds the deploy lock), ENKFORCE (volume deletion
// without `force`), ENKFAILED (a service failed or was skipped),
// ENKCANCELLED, ENKTARGET, ENKSTATE, ENKPROVIDER.
// Every `up` / `down` is traced (OpenTelemetry; `.nanokit/traces/<run>.json`):
// the result carries `traceId`, `run` and `traceFile`, and a rejection
// `err.traceId` / `err.traceFile`. `NANOKIT_TRACE=off` turns tracing off.

/** An `up` / `down` rejection. */
export interface RunError extends Error {
  code: NanokitErrorCode
  /** The failed run's trace id (W3C), unless tracing is off. */
  traceId?: string
  /** Its local trace file (`nanokit timeline` renders it). */
  traceFile?: string
}

export interface RunOptions extends InfraOptions {
  /** Progress of each service: waiting, starting, hook, provisioning, health, healthy, failed, … */
  onEvent?: (event: InfraEvent) => void
}
/** Loads, interpolates, merges and validates a nanokit.yml and its dependency graph. */
export declare function loadConfig(options?: InfraOptions): Promise<ConfigInfo>
/** What `up` would do; saved to `.nanokit/plans/latest.json`. */
export declare function plan(options?: InfraOptions): Promise<PlanResult>
/** Brings services up, each as soon as its dependencies are healthy. `signal` stops it gracefully. */
export declare function up(options?: RunOptions & { signal?: AbortSignal }): Promise<RunResult>
/** Stops and removes services, dependents first. */
export declare function down(options?: RunOptions): Promise<RunResult>
/** Recorded status of each service and whether its process is alive. */
export declare function status(options?: InfraOptions): Promise<(Omit<ServiceStatus, 'watch'> & { watch?: ServiceWatch })[]>
/** Compares state with the running world. */
export declare function drift(options?: InfraOptions): Promise<DriftResult>

/** A running hub (the live dashboard). */
export interface Hub {
  /** The page's URL on 127.0.0.1, with its token. */
  readonly url: string
  readonly port: number
  /** Stops serving. */
  close(): Promise<void>
  /** Lets the process exit while the hub runs (as net.Server's unref). */
  unref(): Hub
  ref(): Hub
}
/**
 * Serves the live dashboard of services, runs, logs, locks, the shared repo
 * and state on 127.0.0.1 (`nanokit hub`). Rejects with ENKHUBPORT when the
 * port is taken, ENKCONFIG…
 */
export declare function hub(options?: HubOptions): Promise<Hub>

// ---- The reconciliation loop (`nanokit watch`) ----------------------------
// The JSON of the watcher's status file and event log (.nanokit/watch/), as
// src/engine/watch/status.rs defines them.

/** How an instance ended. */
export interface Exit {
  kind: 'exited' | 'stopped' | 'removed' | 'unhealthy' | 'gone' | 'failed'
  code?: number
  signal?: string
}

/** What the watcher keeps about one service. */
export interface ServiceWatch {
  /** `always`, `on-failure`, `on-failure:3`, `unless-stopped`, `no`. */
  policy: string
  /** Restarts this watcher made. */
  restarts: number
  lastExit: (Exit & { at: string; text: string }) | null
  /** While backing off: when the next attempt is due (RFC 3339). */
  nextAttempt: string | null
  backoffMs: number | null
  health: 'healthy' | 'starting' | 'unhealthy' | 'backingOff' | 'down' | 'unknown'
  /** Why it is not restarted, when it is not. */
  held: string | null
  instances: string[]
}

export type PassReason = 'initial' | 'restart' | 'config' | 'fullCheck' | 'request'

export interface PassSummary {
  pass: number
  reason: PassReason
  startedAt: string
  finishedAt: string
  outcome: 'ok' | 'failed' | 'cancelled'
  changed: string[]
  failed: string[]
  run: string | null
  traceId: string | null
}

/** The watcher's status (`.nanokit/watch/status.json`), with `running`. */
export interface WatchStatus {
  version: number
  project: string
  env: string
  file: string
  role: 'leader' | 'stopped'
  leader: { holder: string; pid: number; pidStart: number | null; host: string; hostId: string; epoch: number; since: string }
  startedAt: string
  intervalMs: number
  lastPass: PassSummary | null
  lastCheck: string | null
  nextFullCheck: string | null
  passes: number
  services: Record<string, ServiceWatch>
  updatedAt: string
  /** Whether that watcher still runs (on this host: its process is alive). */
  running: boolean
}

/** One event of the watcher (a line of `.nanokit/watch/events.jsonl`). */
export type WatchEvent = { seq: number; at: string; pid: number; epoch: number } & (
  | { type: 'standby'; holder: string | null }
  | { type: 'leadershipAcquired'; holder: string }
  | { type: 'leadershipLost'; reason: string }
  | { type: 'passStarted'; pass: number; reason: PassReason; services: string[]; request: string | null; traceId: string | null }
  | { type: 'passFinished'; pass: number; outcome: 'ok' | 'failed' | 'cancelled'; changed: string[]; failed: string[]; run: string | null; traceId: string | null; traceFile: string | null; elapsedMs: number }
  | { type: 'progress'; service: string; phase: string; elapsedMs: number; message: string | null }
  | { type: 'serviceExited'; service: string; instance: string; exit: Exit; text: string }
  | { type: 'restartScheduled'; service: string; attempt: number; delayMs: number; dueAt: string }
  | { type: 'restarted'; service: string; attempt: number; instances: string[] }
  | { type: 'restartFailed'; service: string; attempt: number; error: string }
  | { type: 'held'; service: string; reason: string }
  | { type: 'backoffReset'; service: string }
  | { type: 'healthFailed'; service: string; instance: string; failures: number; retries: number; output: string }
  | { type: 'dependentsReleased'; service: string; dependents: string[] }
  | { type: 'driftFound'; items: { service: string; detail: string }[] }
  | { type: 'configReloaded'; error: string | null }
  | { type: 'request'; id: string; command: string; services: string[] }
  | { type: 'problem'; message: string }
  | { type: 'stopped'; reason: string }
)

export interface WatchOptions extends InfraOptions {
  /** Each event the watcher sees or makes. */
  onEvent?: (event: WatchEvent) => void
  /** Aborting it is `stop()`. */
  signal?: AbortSignal
}

/** A running watcher. */
export interface WatchHandle {
  /** Each event (replaceable while it runs). */
  onEvent?: (event: WatchEvent) => void
  /** Settles when the watcher has stopped (rejects with its error: `ENKCONFIG`, …). */
  readonly done: Promise<WatchResult>
  /** Stops gracefully (the step in progress finishes, the lease is released, services keep running); a second call stops at once. Returns `done`. */
  stop(): Promise<WatchResult>
  /** Reads nanokit.yml and `.env` again and applies them now, as the CLI's SIGHUP: a `configReloaded` event, then a pass if anything changed (for an edit no file event tells of, e.g. made from another host on NFS). */
  reload(): void
}

/**
 * Keeps the services at nanokit.yml (`nanokit watch`): an initial `up`, then
 * passes driven by events (exits, Docker events, failed health checks,
 * nanokit.yml changes) and a full drift check every `intervalMs`, until stopped.
 */
export declare function watch(options?: WatchOptions): WatchHandle
/** The watcher of the project, or null when none ever led it. */
export declare function watchStatus(options?: InfraOptions): Promise<WatchStatus | null>

// Shared key/value state with named locks: see kv-wrapper.d.ts.
export { openState, openStateSync, State } from './kv-wrapper'
export type { StateError } from './kv-wrapper'
