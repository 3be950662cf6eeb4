#!/usr/bin/env node
// `npm run artifacts`: `napi artifacts --output-dir . --npm-dir npm` (copies
// the built `.node` into the platform package, npm/<platform>/), reporting
// what it changed. napi-rs logs `Write [source] to [destination]` for every
// file it reconciles, also for those whose content is already the same (the
// root entry rewritten from itself, the `.node` onto itself): its logging
// cannot be told apart without patching it. So its output is kept and
// replaced by one line per file: `wrote` when the content changed (or the
// file is new), `unchanged` when it did not.
import { spawnSync } from 'node:child_process'
import { createHash } from 'node:crypto'
import { existsSync, readFileSync, readdirSync, statSync } from 'node:fs'
import { join, relative, resolve } from 'node:path'
import { fileURLToPath } from 'node:url'

const repo = join(fileURLToPath(import.meta.url), '..', '..')
const napi = join(repo, 'node_modules', '.bin', 'napi')
// `--cwd DIR` (the package; default this checkout) and `--output-dir DIR`
// (where the built `.node` is, relative to it; default the package itself).
const args = process.argv.slice(2)
const option = (name, fallback) => {
  const i = args.indexOf(name)
  return i >= 0 && args[i + 1] ? args[i + 1] : fallback
}
const root = resolve(option('--cwd', repo))
const outputDir = option('--output-dir', '.')

/** sha256 of each file under `dir` (not into node_modules, target, .git). */
function snapshot(dir, out = new Map(), depth = 0) {
  for (const e of readdirSync(dir, { withFileTypes: true })) {
    const p = join(dir, e.name)
    if (e.isDirectory()) {
      if (depth < 2 && !['node_modules', 'target', '.git', 'bench', '__test__'].includes(e.name)) snapshot(p, out, depth + 1)
    } else if (e.isFile()) {
      out.set(p, createHash('sha256').update(readFileSync(p)).digest('hex'))
    }
  }
  return out
}

const before = snapshot(root)
const r = spawnSync(napi, ['artifacts', '--cwd', root, '--output-dir', outputDir, '--npm-dir', 'npm'], {
  cwd: root,
  encoding: 'utf8',
  env: { ...process.env, FORCE_COLOR: '0', NO_COLOR: '1' },
})
// eslint-disable-next-line no-control-regex
const output = `${r.stdout || ''}${r.stderr || ''}`.replace(/\x1b\[[0-9;]*m/g, '')
if (r.status !== 0) {
  process.stderr.write(output)
  process.exit(r.status ?? 1)
}
const writes = [...output.matchAll(/Write \[(.+?)\] to \[(.+?)\]/g)].map((m) => ({ source: m[1], destination: m[2] }))
const rest = output
  .split('\n')
  .filter((l) => l.trim() && !/Write \[/.test(l))
  .join('\n')
if (rest) console.error(rest)
for (const { source, destination } of writes) {
  const now = existsSync(destination) && statSync(destination).isFile() ? createHash('sha256').update(readFileSync(destination)).digest('hex') : null
  const changed = before.get(destination) !== now
  const from = source === destination ? '' : ` (from ${relative(root, source)})`
  console.error(`${changed ? 'wrote    ' : 'unchanged'} ${relative(root, destination)}${changed ? from : ''}`)
}
