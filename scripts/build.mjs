#!/usr/bin/env node
// Contributor build (never run by a consumer's `npm install`: consumers get
// the prebuilt `.node` from the platform package). Builds with @napi-rs/cli
// when the output is missing or older than any of its sources; `--force`
// always builds (cargo still skips what is up to date).
//
//   node scripts/build.mjs            the native addon, nanokit.linux-x64-gnu.node
//                                     (npm run build; npm test and npm run bench call it too)
//   node scripts/build.mjs --bin      the standalone `nanokit` executable (npm run build:bin),
//                                     at $CARGO_TARGET_DIR/x86_64-unknown-linux-gnu/release/nanokit
//   --native                          build with the host's own C toolchain and glibc instead
//                                     (faster to set up; the output then needs this host's glibc
//                                     and the packaging test rejects it)
//
// By default both build with napi-rs' cross toolchain (`--use-napi-cross`: gcc
// and a glibc 2.17 sysroot from the npm packages @napi-rs/cross-toolchain-*,
// fetched once into ~/.napi-rs), so what ships loads on glibc ≥ 2.17 (RHEL/
// CentOS 7, Amazon Linux 2, Debian 11, Ubuntu 20.04, …).
import { spawnSync } from 'node:child_process'
import { existsSync, readdirSync, statSync } from 'node:fs'
import { dirname, join, resolve } from 'node:path'
import { fileURLToPath } from 'node:url'

const root = join(dirname(fileURLToPath(import.meta.url)), '..')
const args = process.argv.slice(2)
const force = args.includes('--force')
const native = args.includes('--native')
const bin = args.includes('--bin')
const TRIPLE = 'x86_64-unknown-linux-gnu'

function newestMtime(path) {
  const st = statSync(path)
  if (!st.isDirectory()) return st.mtimeMs
  let newest = st.mtimeMs
  for (const entry of readdirSync(path)) newest = Math.max(newest, newestMtime(join(path, entry)))
  return newest
}

/** Where cargo puts the standalone binary built by `--bin`. */
export function standaloneBinaryPath() {
  const targetDir = resolve(root, process.env.CARGO_TARGET_DIR || 'target')
  return join(targetDir, TRIPLE, 'release', 'nanokit')
}

function addonPath() {
  const addons = readdirSync(root).filter((f) => /^nanokit\..+\.node$/.test(f))
  return addons.length ? join(root, addons[0]) : null
}

if (process.argv[1] === fileURLToPath(import.meta.url)) main()

function main() {
  if (bin && !existsSync(join(root, 'src', 'bin', 'nanokit.rs'))) {
    console.error('nanokit: this tree has no standalone binary target (src/bin/nanokit.rs); nothing to build.')
    process.exit(0)
  }
  const output = bin ? standaloneBinaryPath() : addonPath()
  const sources = ['src', 'Cargo.toml', 'Cargo.lock', 'build.rs']
    .map((p) => join(root, p))
    .filter((p) => existsSync(p))
  const stale = !output || !existsSync(output) || sources.some((p) => newestMtime(p) > statSync(output).mtimeMs)
  if (!force && !stale) process.exit(0)

  const napi = join(root, 'node_modules', '.bin', 'napi')
  if (!existsSync(napi)) {
    console.error('nanokit: @napi-rs/cli is not installed; run `npm install` first.')
    process.exit(1)
  }
  if (!native && (process.platform !== 'linux' || process.arch !== 'x64')) {
    console.error(
      `nanokit: the release build uses napi-rs' cross toolchain for ${TRIPLE}, which runs on Linux x64 only; ` +
        'on this host build for yourself with `npm run build:native` (not a supported platform, see the README).',
    )
    process.exit(1)
  }
  const napiArgs = bin
    ? ['build', '--release', '--bin', 'nanokit', '--output-dir', join(dirname(standaloneBinaryPath()), 'standalone')]
    : ['build', '--platform', '--release', '--features', 'node', '--js', 'index.js', '--dts', 'index.d.ts']
  if (!native) napiArgs.push('--target', TRIPLE, '--use-napi-cross')
  // The addon is the library alone: built with the `node` feature, the
  // `nanokit` bin target would overwrite the standalone binary at the same
  // path with one that only tells you to build the standalone one.
  if (!bin) napiArgs.push('--', '--lib')
  const what = bin ? 'the standalone nanokit binary' : 'the native addon'
  const why = force ? 'requested' : output && existsSync(output) ? 'sources changed' : 'not built yet'
  console.error(`nanokit: building ${what} (${why}${native ? ', host toolchain' : ', glibc 2.17 cross toolchain'})…`)
  const r = spawnSync(napi, napiArgs, { cwd: root, stdio: 'inherit' })
  process.exit(r.status ?? 1)
}
