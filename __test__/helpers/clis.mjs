// The two nanokit command lines every CLI test runs against, from one list:
//   npm         node bin/nanokit.js (the npm package's bin → napi `cli()`)
//   standalone  the Rust executable (`cargo build --release --bin nanokit`)
// Tests loop over CLIS and put `c.name` in their titles. The standalone
// binary is built here when missing or older than the sources (cargo decides;
// a no-op when fresh). NANOKIT_STANDALONE_BIN names a binary built elsewhere
// (the release cross build); it must exist. Never skipped: if the binary
// cannot be had (in CI, CI=true, or not), importing this module throws.
import { spawn, spawnSync } from 'node:child_process'
import { existsSync } from 'node:fs'
import { dirname, join } from 'node:path'
import { fileURLToPath } from 'node:url'

export const ROOT = join(dirname(fileURLToPath(import.meta.url)), '..', '..')
export const NPM_BIN = join(ROOT, 'bin', 'nanokit.js')

function standaloneBinary() {
  const given = process.env.NANOKIT_STANDALONE_BIN
  if (given) {
    if (!existsSync(given)) throw new Error(`NANOKIT_STANDALONE_BIN=${given} does not exist`)
    return given
  }
  const target = process.env.CARGO_TARGET_DIR || join(ROOT, 'target')
  const bin = join(target, 'release', 'nanokit')
  const r = spawnSync('cargo', ['build', '--release', '--quiet', '--bin', 'nanokit', '--bin', 'nkapp'], {
    cwd: ROOT,
    stdio: ['ignore', 'inherit', 'inherit'],
  })
  if (r.status !== 0 || !existsSync(bin)) {
    const why = r.error ? r.error.message : `exit ${r.status}`
    throw new Error(
      `the standalone CLI ${bin} could not be built (cargo build --release --bin nanokit: ${why})${process.env.CI ? ' [CI: never skipped]' : ''}`,
    )
  }
  return bin
}

export const STANDALONE_BIN = standaloneBinary()

/** Each CLI: `name` for test titles, and the command + leading args. */
export const CLIS = [
  { name: 'npm', cmd: process.execPath, pre: [NPM_BIN] },
  { name: 'standalone', cmd: STANDALONE_BIN, pre: [] },
]

/** Runs `c` with `args` to completion (spawnSync; utf8 unless told). */
export function runSync(c, args, opts = {}) {
  return spawnSync(c.cmd, [...c.pre, ...args], { encoding: 'utf8', ...opts })
}

/** Starts `c` with `args` (a ChildProcess). */
export function start(c, args, opts = {}) {
  return spawn(c.cmd, [...c.pre, ...args], opts)
}
