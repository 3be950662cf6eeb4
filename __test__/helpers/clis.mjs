// The two nanokit command lines every CLI test runs against, from one list:
//   npm         node bin/nanokit.js (the npm package's bin → napi `cli()`)
//   standalone  the Rust executable (`npm run build:bin`: the cross-built release binary)
// Tests loop over CLIS and put `c.name` in their titles. The standalone
// binary is built here when missing or older than the sources (cargo decides;
// a no-op when fresh). NANOKIT_STANDALONE_BIN names a binary built elsewhere
// (the release cross build); it must exist. Never skipped: if the binary
// cannot be had (in CI, CI=true, or not), importing this module throws.
import { spawn, spawnSync } from 'node:child_process'
import { existsSync } from 'node:fs'
import { dirname, join } from 'node:path'
import { fileURLToPath } from 'node:url'

import { standaloneBinaryPath } from '../../scripts/build.mjs'

export const ROOT = join(dirname(fileURLToPath(import.meta.url)), '..', '..')
export const NPM_BIN = join(ROOT, 'bin', 'nanokit.js')

function standaloneBinary() {
  const given = process.env.NANOKIT_STANDALONE_BIN
  if (given) {
    if (!existsSync(given)) throw new Error(`NANOKIT_STANDALONE_BIN=${given} does not exist`)
    return given
  }
  // The shipped build: glibc 2.17 cross toolchain (scripts/build.mjs --bin,
  // a no-op when the binary is newer than the sources).
  const bin = standaloneBinaryPath()
  const r = spawnSync(process.execPath, [join(ROOT, 'scripts', 'build.mjs'), '--bin'], {
    cwd: ROOT,
    stdio: ['ignore', 'inherit', 'inherit'],
  })
  if (r.status !== 0 || !existsSync(bin)) {
    const why = r.error ? r.error.message : `exit ${r.status}`
    throw new Error(
      `the standalone CLI ${bin} could not be built (node scripts/build.mjs --bin: ${why})${process.env.CI ? ' [CI: never skipped]' : ''}`,
    )
  }
  // A binary built with the `node` feature sits at the same path and only
  // says so: never test that one as the standalone CLI.
  const v = spawnSync(bin, ['--version'], { encoding: 'utf8' })
  if (v.status !== 0) {
    throw new Error(`${bin} is not a working standalone CLI (--version: exit ${v.status}): ${v.stderr}`)
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
