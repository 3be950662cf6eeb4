#!/usr/bin/env node
// The hub (issue 30), one run, against its targets (there is no anchor to run
// beside it here: Tilt's UI is not installable offline):
//   1. SIGKILL of a service → the change on the page (headless Chromium,
//      the time the page's DOM changed, on the same clock as the kill):
//      without a watcher (the hub's own 400 ms liveness poll), and under
//      `nanokit watch` when this build has it (the watcher's status and
//      event files, noticed through inotify). Target ≤ 300 ms with watch.
//   2. The hub process's CPU while idle with 20 services and one page open,
//      over 60 s (utime+stime from /proc), with and without a watcher.
//      Target ≤ 0.5 % of a core. And with no page open.
//   3. The standalone binary's size with and without the hub (cargo
//      features `hub` on and off, release, same toolchain). Target ≤ 500 KB.
//
//   node bench/hub.mjs            (BENCH_KILLS=10, BENCH_IDLE_S=60;
//                                  BENCH_SKIP_SIZE=1 skips the two builds)
import { spawn, spawnSync } from 'node:child_process'
import { mkdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs'
import { createServer } from 'node:net'
import { join, dirname } from 'node:path'
import { fileURLToPath } from 'node:url'
import { createRequire } from 'node:module'

import { standaloneBinaryPath } from '../scripts/build.mjs'

const root = join(dirname(fileURLToPath(import.meta.url)), '..')
const require = createRequire(import.meta.url)
const work = join(root, 'bench', '.work', 'hub')
const KILLS = Number(process.env.BENCH_KILLS || 10)
const IDLE_S = Number(process.env.BENCH_IDLE_S || 60)
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium'
const TICK = 100 // clock ticks per second (/proc/<pid>/stat)
const sleep = (ms) => new Promise((r) => setTimeout(r, ms))
const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]
const pct = (xs, p) => [...xs].sort((a, b) => a - b)[Math.min(xs.length - 1, Math.floor(xs.length * p))]

function sh(cmd, args, opts = {}) {
  const r = spawnSync(cmd, args, { encoding: 'utf8', ...opts })
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')}: exit ${r.status}\n${r.stderr}`)
  return r.stdout
}

const freePort = () =>
  new Promise((resolve) => {
    const s = createServer().listen(0, '127.0.0.1', () => {
      const { port } = s.address()
      s.close(() => resolve(port))
    })
  })

// ---- the nanokit executable (the shipped standalone build) ---------------------
sh(process.execPath, [join(root, 'scripts', 'build.mjs'), '--bin'], { stdio: 'inherit' })
const NK = standaloneBinaryPath()
const hasWatch = spawnSync(NK, ['watch', '--help'], { encoding: 'utf8' }).status === 0

function project(name, services) {
  const dir = join(work, name)
  rmSync(dir, { recursive: true, force: true })
  mkdirSync(dir, { recursive: true })
  let yml = `name: ${name}\nservices:\n`
  for (let i = 0; i < services; i++) yml += `  s${String(i).padStart(2, '0')}:\n    start: "exec sleep 100000"\n`
  writeFileSync(join(dir, 'nanokit.yml'), yml)
  return join(dir, 'nanokit.yml')
}

const env = { ...process.env, NANOKIT_STATE_URL: '', NANOKIT_LOG: '' }

async function startHub(file) {
  const child = spawn(NK, ['hub', '-f', file, '--port', '0'], { stdio: ['ignore', 'pipe', 'pipe'], env })
  let out = ''
  const url = await new Promise((resolve, reject) => {
    child.stdout.on('data', (d) => {
      out += d
      const m = out.match(/^(http:\/\/\S+)\n/)
      if (m) resolve(m[1])
    })
    child.on('exit', (c) => reject(new Error(`hub exited ${c}`)))
  })
  return { child, url }
}

function startWatch(file) {
  const child = spawn(NK, ['watch', '-f', file], { stdio: ['ignore', 'ignore', 'pipe'], env })
  return child
}

// Its initial pass done (a pass with nothing to do is told in the event
// log only: `lastPass` names the last pass that changed something).
async function waitWatcher(file) {
  const events = join(dirname(file), '.nanokit', 'watch', 'events.jsonl')
  for (let i = 0; i < 1200; i++) {
    try {
      const lines = readFileSync(events, 'utf8').split('\n').filter(Boolean).map((l) => JSON.parse(l))
      if (lines.some((e) => e.type === 'passFinished')) return
    } catch {}
    await sleep(50)
  }
  throw new Error('the watcher never finished its first pass')
}

function cpuTicks(pid) {
  const f = readFileSync(`/proc/${pid}/stat`, 'utf8')
  const rest = f.slice(f.lastIndexOf(')') + 2).split(' ')
  return Number(rest[11]) + Number(rest[12]) // utime + stime
}

async function browserPage(url) {
  const { chromium } = require('playwright-core')
  const browser = await chromium.launch({
    executablePath: CHROMIUM,
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  })
  const page = await browser.newPage({ viewport: { width: 1400, height: 900 } })
  await page.goto(url)
  await page.waitForSelector('body[data-connected="1"]')
  return { browser, page }
}

async function rows(page) {
  return page.evaluate(() => Object.fromEntries([...document.querySelectorAll('table.services tr[data-service]')].map((r) => [r.dataset.service, { ...r.dataset }])))
}

async function waitFor(page, pred, what, ms = 30000) {
  const deadline = Date.now() + ms
  while (Date.now() < deadline) {
    const r = await rows(page)
    if (pred(r)) return r
    await sleep(20)
  }
  throw new Error(`timed out: ${what}`)
}

// ---- 1. SIGKILL → the page ---------------------------------------------------------

async function killLatency(watched) {
  const file = project(watched ? 'kill-watched' : 'kill-polled', 3)
  sh(NK, ['up', '-f', file], { env })
  const watcher = watched ? startWatch(file) : null
  if (watcher) await waitWatcher(file)
  const hub = await startHub(file)
  const { browser, page } = await browserPage(hub.url)
  const times = []
  try {
    for (let i = 0; i < KILLS; i++) {
      const before = await waitFor(page, (r) => Object.values(r).every((x) => x.status === 'healthy' && x.pid), 'all healthy')
      const pid = Number(before.s01.pid)
      // The page notes when s01's row stops being healthy (a MutationObserver,
      // Date.now(): the same clock as the kill's).
      await page.evaluate(() => {
        window.__changed = null
        const obs = new MutationObserver(() => {
          const r = document.querySelector('table.services tr[data-service="s01"]')
          if (r && r.dataset.status !== 'healthy' && window.__changed == null) window.__changed = Date.now()
        })
        obs.observe(document.getElementById('view-services'), { subtree: true, childList: true, attributes: true })
      })
      await sleep(300 + Math.random() * 200) // not in step with the poll
      const t0 = Date.now()
      process.kill(-pid, 'SIGKILL')
      let changed = null
      for (let k = 0; k < 500 && changed == null; k++) {
        changed = await page.evaluate(() => window.__changed)
        if (changed == null) await sleep(10)
      }
      if (changed == null) throw new Error('the page never showed the kill')
      times.push(changed - t0)
      if (!watched) sh(NK, ['up', '-f', file], { env })
    }
  } finally {
    await browser.close()
    hub.child.kill('SIGINT')
    if (watcher) {
      watcher.kill('SIGTERM')
      await new Promise((r) => watcher.on('exit', r))
    }
    spawnSync(NK, ['down', '-f', file], { env })
  }
  return times
}

// ---- 2. idle CPU ------------------------------------------------------------------

async function idleCpu(watched, withPage) {
  const file = project(`idle-${watched ? 'w' : 'p'}-${withPage ? 'page' : 'none'}`, 20)
  sh(NK, ['up', '-f', file], { env })
  const watcher = watched ? startWatch(file) : null
  if (watcher) await waitWatcher(file)
  const hub = await startHub(file)
  const b = withPage ? await browserPage(hub.url) : null
  try {
    if (b) await waitFor(b.page, (r) => Object.keys(r).length === 20 && Object.values(r).every((x) => x.status === 'healthy'), '20 healthy')
    await sleep(2000)
    const c0 = cpuTicks(hub.child.pid)
    const t0 = performance.now()
    await sleep(IDLE_S * 1000)
    const c1 = cpuTicks(hub.child.pid)
    const wall = (performance.now() - t0) / 1000
    return ((c1 - c0) / TICK / wall) * 100
  } finally {
    await b?.browser.close()
    hub.child.kill('SIGINT')
    if (watcher) {
      watcher.kill('SIGTERM')
      await new Promise((r) => watcher.on('exit', r))
    }
    spawnSync(NK, ['down', '-f', file], { env })
  }
}

// ---- 3. binary size ------------------------------------------------------------------

function binarySizes() {
  // The project's own target folder (its dependencies are built there).
  const target = process.env.CARGO_TARGET_DIR || join(root, 'target')
  const build = (features) => {
    sh('cargo', ['build', '--release', '--bin', 'nanokit', ...features], { cwd: root, stdio: ['ignore', 'ignore', 'inherit'] })
    return statSync(join(target, 'release', 'nanokit')).size
  }
  const without = build(['--no-default-features'])
  const withHub = build([])
  return { without, withHub }
}

// ---- run ---------------------------------------------------------------------------

mkdirSync(work, { recursive: true })
console.log(`nanokit ${sh(NK, ['--version']).trim()}, watch ${hasWatch ? 'available' : 'NOT in this build'}; ${KILLS} kills, idle over ${IDLE_S} s`)
const show = (label, xs) => console.log(`${label.padEnd(46)} median ${median(xs).toFixed(0)} ms, p90 ${pct(xs, 0.9).toFixed(0)} ms, min ${Math.min(...xs)} ms, max ${Math.max(...xs)} ms`)

const polled = await killLatency(false)
show('SIGKILL → page, no watcher (400 ms poll)', polled)
let watchedTimes = null
if (hasWatch) {
  watchedTimes = await killLatency(true)
  show('SIGKILL → page, under nanokit watch', watchedTimes)
  console.log(`  target ≤ 300 ms with watch: ${median(watchedTimes) <= 300 ? 'met' : 'NOT met'} (median)`)
}
const idleNone = await idleCpu(false, false)
console.log(`hub idle CPU, 20 services, no page open:       ${idleNone.toFixed(3)} % of a core`)
const idlePolled = await idleCpu(false, true)
console.log(`hub idle CPU, 20 services, one page, no watch:  ${idlePolled.toFixed(3)} % of a core (target ≤ 0.5 %: ${idlePolled <= 0.5 ? 'met' : 'NOT met'})`)
if (hasWatch) {
  const idleWatched = await idleCpu(true, true)
  console.log(`hub idle CPU, 20 services, one page, watched:   ${idleWatched.toFixed(3)} % of a core (target ≤ 0.5 %: ${idleWatched <= 0.5 ? 'met' : 'NOT met'})`)
}
if (!process.env.BENCH_SKIP_SIZE) {
  const { without, withHub } = binarySizes()
  const added = (withHub - without) / 1024
  console.log(`standalone binary: ${(without / 1048576).toFixed(2)} MiB without the hub, ${(withHub / 1048576).toFixed(2)} MiB with it: +${added.toFixed(0)} KiB (target ≤ 500 KB: ${added * 1.024 <= 500 ? 'met' : 'NOT met'})`)
}
