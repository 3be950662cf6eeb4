#!/usr/bin/env node
// Issue 2's benchmark: nanokit's lock and repo coordination against the
// anchors, measured in this one run on this machine. Prints ratios.
//
//   node bench/locks.mjs            (npm run bench runs every benchmark)
import { spawn } from 'node:child_process'
import { access, mkdir } from 'node:fs/promises'
import { mkdtempSync, writeFileSync } from 'node:fs'
import { createRequire } from 'node:module'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { createInterface } from 'node:readline'
import { fileURLToPath } from 'node:url'

const require = createRequire(import.meta.url)
const nk = require('../nanokit.js')
const lockfile = require('proper-lockfile')
const WORKER = fileURLToPath(new URL('../__test__/helpers/worker.mjs', import.meta.url))

const work = mkdtempSync(join(tmpdir(), 'nk-bench-'))
const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]
const fmt = (x, d = 1) => x.toFixed(d)

async function timeOps(n, op) {
  const t0 = performance.now()
  for (let i = 0; i < n; i++) await op()
  return ((performance.now() - t0) * 1000) / n // µs/op
}

/** Median of `rounds` measurements of µs/op, anchors and candidates interleaved. */
async function compare(rounds, variants) {
  const results = Object.fromEntries(Object.keys(variants).map((k) => [k, []]))
  for (let r = 0; r < rounds; r++) {
    for (const [name, { n, op }] of Object.entries(variants)) results[name].push(await timeOps(n, op))
  }
  return Object.fromEntries(Object.entries(results).map(([k, v]) => [k, median(v)]))
}

function runWorker(command) {
  const child = spawn(process.execPath, [WORKER, JSON.stringify(command)], { stdio: ['ignore', 'pipe', 'inherit'] })
  const events = []
  const rl = createInterface({ input: child.stdout })
  rl.on('line', (l) => events.push(JSON.parse(l)))
  const exited = new Promise((resolve) => child.on('exit', resolve))
  const waitFor = (pred) =>
    new Promise((resolve, reject) => {
      const seen = events.find(pred)
      if (seen) return resolve(seen)
      rl.on('line', () => {
        const e = events.find(pred)
        if (e) resolve(e)
      })
      exited.then(() => reject(new Error(`worker exited: ${JSON.stringify(events)}`)))
    })
  return { child, events, exited, waitFor }
}

const rows = []
const row = (what, nanokit, anchor, ratio, target) => rows.push({ what, nanokit, anchor, ratio, target })

// 1. Uncontended acquire+release from JS.
{
  const nkPath = join(work, 'uncontended.lock')
  const plFile = join(work, 'pl-target')
  writeFileSync(plFile, '')
  // Warm up both.
  for (let i = 0; i < 200; i++) (await nk.acquireLock(nkPath)).release()
  for (let i = 0; i < 50; i++) await (await lockfile.lock(plFile))()
  const r = await compare(5, {
    nanokit: { n: 4000, op: async () => (await nk.acquireLock(nkPath)).release() },
    properLockfile: { n: 200, op: async () => await (await lockfile.lock(plFile))() },
  })
  row('uncontended acquire+release (µs/op)', fmt(r.nanokit), fmt(r.properLockfile), `${fmt(r.properLockfile / r.nanokit)}× faster`, '≥ 30× faster')
}

// 2. Cache-hit handleIsInstalled vs the PR's check (two parallel fs.promises.access).
{
  const repo = join(work, 'repo-hit')
  await mkdir(repo, { recursive: true })
  const spec = '@openfn/language-http@7.2.0'
  await nk.install(repo, spec, {
    install: async (_s, dir) => {
      const pkg = join(dir, 'node_modules', '@openfn', 'language-http_7.2.0')
      await mkdir(pkg, { recursive: true })
      writeFileSync(join(pkg, 'package.json'), JSON.stringify({ name: '@openfn/language-http', version: '7.2.0' }))
    },
  })
  const { handleIsInstalled } = nk.createLockedHandlers(repo)
  const pkgJson = join(repo, 'node_modules', '@openfn', 'language-http_7.2.0', 'package.json')
  const sentinel = join(repo, '.sentinels', '@openfn+language-http_7.2.0.done')
  const prCheck = () => Promise.all([access(pkgJson), access(sentinel)])
  const r = await compare(5, {
    nanokit: { n: 20000, op: () => handleIsInstalled(spec, repo) },
    pr: { n: 5000, op: prCheck },
  })
  row('cache-hit handleIsInstalled (µs/op)', fmt(r.nanokit, 2), fmt(r.pr, 2), `${fmt(r.pr / r.nanokit)}× faster`, '≤ 10 µs and ≥ 8× faster')
}

// 3. 8 processes, one package, 1 s install: how long after the install ends
//    does the last waiter return?
{
  const lags = []
  for (let trial = 0; trial < 5; trial++) {
    const repo = join(work, `eight-${trial}`)
    const ws = Array.from({ length: 8 }, () => runWorker({ op: 'install', repo, spec: 'slow@1.0.0', custom: { sleepMs: 1000 } }))
    const done = await Promise.all(ws.map((w) => w.waitFor((e) => e.event === 'done')))
    const installer = done.find((d) => d.result.installed)
    const lastWaiter = Math.max(...done.filter((d) => d !== installer).map((d) => d.t))
    // The install has ended once any process returns (a waiter sees the
    // sentinel as soon as it is written, possibly before the installer's own
    // process gets to report): measure from the first return, never less.
    const ended = Math.min(...done.map((d) => d.t))
    lags.push(lastWaiter - ended)
    await Promise.all(ws.map((w) => w.exited))
  }
  row('8 procs, 1 s install: last waiter after install end (ms, median of 5)', fmt(median(lags), 0), '—', `trials: ${lags.join(', ')}`, '≤ 50 ms')
}

// 4. SIGKILLed holder on the same host: how soon is it taken over?
{
  const takeovers = []
  for (let trial = 0; trial < 5; trial++) {
    const path = join(work, `killed-${trial}.lock`)
    const holder = runWorker({ op: 'hold', path, staleMs: 30000 })
    await holder.waitFor((e) => e.event === 'acquired')
    const waiting = nk.acquireLock(path, { staleMs: 30000 })
    await new Promise((r) => setTimeout(r, 100))
    const killedAt = performance.now()
    holder.child.kill('SIGKILL')
    const h = await waiting
    takeovers.push(performance.now() - killedAt)
    h.release()
    await holder.exited
  }
  row('SIGKILLed holder on this host: taken over after (ms, median of 5)', fmt(median(takeovers), 0), '300000 (PR: 5-min stale window)', `${fmt(300000 / median(takeovers), 0)}× sooner`, '≤ 1000 ms')
}

console.log(`\nnanokit lock & repo benchmark (${new Date().toISOString()}, node ${process.version}, proper-lockfile 4.1.2)\n`)
const widths = ['what', 'nanokit', 'anchor', 'ratio', 'target'].map((k) => Math.max(k.length, ...rows.map((r) => String(r[k]).length)))
const line = (r) => ['what', 'nanokit', 'anchor', 'ratio', 'target'].map((k, i) => String(r[k]).padEnd(widths[i])).join('  ')
console.log(line({ what: 'what', nanokit: 'nanokit', anchor: 'anchor', ratio: 'ratio', target: 'target' }))
for (const r of rows) console.log(line(r))
