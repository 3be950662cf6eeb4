#!/usr/bin/env node
// Builds the native addon with @napi-rs/cli when it is missing or older than
// any of its sources. `--force` always builds. Used by `npm install`
// (prepare), `npm test` and `npm run bench`.
import { spawnSync } from 'node:child_process'
import { existsSync, readdirSync, statSync } from 'node:fs'
import { dirname, join } from 'node:path'
import { fileURLToPath } from 'node:url'

const root = join(dirname(fileURLToPath(import.meta.url)), '..')
const force = process.argv.includes('--force')

function newestMtime(path) {
  const st = statSync(path)
  if (!st.isDirectory()) return st.mtimeMs
  let newest = st.mtimeMs
  for (const entry of readdirSync(path)) newest = Math.max(newest, newestMtime(join(path, entry)))
  return newest
}

function addonPath() {
  const addons = readdirSync(root).filter((f) => /^nanokit\..+\.node$/.test(f))
  return addons.length ? join(root, addons[0]) : null
}

const sources = ['src', 'Cargo.toml', 'Cargo.lock', 'build.rs']
  .map((p) => join(root, p))
  .filter((p) => existsSync(p))
const addon = addonPath()
const stale = !addon || sources.some((p) => newestMtime(p) > statSync(addon).mtimeMs)

if (!force && !stale) process.exit(0)

const napi = join(root, 'node_modules', '.bin', 'napi')
if (!existsSync(napi)) {
  console.error('nanokit: @napi-rs/cli is not installed; run `npm install` first.')
  process.exit(1)
}
console.error(`nanokit: building the native addon (${addon ? 'sources changed' : 'not built yet'})…`)
const r = spawnSync(napi, ['build', '--platform', '--release', '--features', 'node', '--js', 'index.js', '--dts', 'index.d.ts'], {
  cwd: root,
  stdio: 'inherit',
})
process.exit(r.status ?? 1)
