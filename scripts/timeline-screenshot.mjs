#!/usr/bin/env node
// Makes docs/timeline.png for the README: a real `up` of examples/basic (in
// a temp copy, on free ports), its trace rendered by `nanokit timeline`, and
// the page captured by headless Chromium.
//   node scripts/timeline-screenshot.mjs   (needs the built addon and chromium)
import { spawnSync } from 'node:child_process'
import { cpSync, mkdtempSync, rmSync } from 'node:fs'
import { createServer } from 'node:net'
import { tmpdir } from 'node:os'
import { join, dirname } from 'node:path'
import { fileURLToPath } from 'node:url'
import { createRequire } from 'node:module'

const root = join(dirname(fileURLToPath(import.meta.url)), '..')
const nk = createRequire(import.meta.url)(join(root, 'nanokit.js'))
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium'
const freePort = () =>
  new Promise((resolve) => {
    const s = createServer().listen(0, '127.0.0.1', () => {
      const { port } = s.address()
      s.close(() => resolve(port))
    })
  })

const dir = mkdtempSync(join(tmpdir(), 'nk-shot-'))
cpSync(join(root, 'examples', 'basic'), dir, { recursive: true, filter: (p) => !p.includes('.nanokit') })
const file = join(dir, 'nanokit.yml')
const vars = { ...process.env, DB_PORT: String(await freePort()), API_PORT: String(await freePort()) }
const up = await nk.up({ file, vars })
await nk.down({ file, vars })
const page = join(dir, 'timeline.html')
const r = spawnSync(process.execPath, [join(root, 'bin', 'nanokit.js'), 'timeline', up.run, '-f', file, '-o', page], { stdio: 'inherit' })
if (r.status !== 0) process.exit(r.status ?? 1)
const profile = mkdtempSync(join(tmpdir(), 'nk-chromium-'))
const shot = spawnSync(CHROMIUM, ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync', `--user-data-dir=${profile}`, '--hide-scrollbars', `--screenshot=${join(root, 'docs', 'timeline.png')}`, '--window-size=1400,760', `file://${page}`], { stdio: 'inherit' })
rmSync(profile, { recursive: true, force: true })
rmSync(dir, { recursive: true, force: true })
process.exit(shot.status ?? 1)
