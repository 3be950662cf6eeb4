#!/usr/bin/env node
// Benchmark of the state store from JS, printed from one run, each figure
// next to the same operation done the obvious way in Node: a JSON file
// rewritten under proper-lockfile (4.1.2), as a ratio.
//
//   node bench/kv.mjs                 embedded backend (+ PostgreSQL when
//                                     NANOKIT_TEST_PG_URL or NANOKIT_BENCH_PG_URL is set)
//
// Measured: get and set latency (embedded, sync and Promise calls),
// increment throughput from 4 processes, lock acquire+release latency on both
// backends. The addon must be built (npm run build).
import { spawn } from 'node:child_process'
import { existsSync, mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { createRequire } from 'node:module'
import { join } from 'node:path'
import { createInterface } from 'node:readline'
import { fileURLToPath } from 'node:url'
import { randomUUID } from 'node:crypto'

const require = createRequire(import.meta.url)
const ROOT = fileURLToPath(new URL('..', import.meta.url))
const { openState, openStateSync } = require(join(ROOT, 'kv-wrapper.js'))
const lockfile = require('proper-lockfile')

const KEYS = 100 // the size of the shared state both ways
const PROCS = 4
const PG_URL = process.env.NANOKIT_BENCH_PG_URL || process.env.NANOKIT_TEST_PG_URL || ''

// ---- the obvious way: a JSON file rewritten under proper-lockfile ----
class JsonFileStore {
  constructor(file) {
    this.file = file
    if (!existsSync(file)) writeFileSync(file, '{}')
  }
  #read() {
    return JSON.parse(readFileSync(this.file, 'utf8'))
  }
  #write(data) {
    writeFileSync(this.file, JSON.stringify(data))
  }
  // The file is rewritten in place, so readers take the lock too.
  #locked(fn) {
    const release = lockfile.lockSync(this.file, { stale: 10_000 })
    try {
      return fn()
    } finally {
      release()
    }
  }
  async #lockedAsync(fn) {
    const release = await lockfile.lock(this.file, {
      stale: 10_000,
      retries: { retries: 100_000, minTimeout: 1, maxTimeout: 10, factor: 1.2 },
    })
    try {
      return fn()
    } finally {
      await release()
    }
  }
  get(key) {
    return this.#locked(() => this.#read()[key] ?? null)
  }
  getUnlocked(key) {
    return this.#read()[key] ?? null
  }
  set(key, value) {
    this.#locked(() => {
      const d = this.#read()
      d[key] = value
      this.#write(d)
    })
  }
  incrementAsync(key, delta) {
    return this.#lockedAsync(() => {
      const d = this.#read()
      d[key] = (d[key] ?? 0) + delta
      this.#write(d)
      return d[key]
    })
  }
  lock(name, holder, timeoutSeconds) {
    this.#locked(() => {
      const d = this.#read()
      const locks = (d.__locks ??= {})
      const l = locks[name]
      if (l && l.expiresAt > Date.now() && l.holder !== holder) throw new Error(`locked by ${l.holder}`)
      locks[name] = { holder, expiresAt: Date.now() + timeoutSeconds * 1000 }
      this.#write(d)
    })
  }
  unlock(name, holder) {
    this.#locked(() => {
      const d = this.#read()
      if (d.__locks?.[name]?.holder !== holder) throw new Error('not the holder')
      delete d.__locks[name]
      this.#write(d)
    })
  }
}

// ---- child mode: increments for the throughput figure ----
if (process.argv[2] === '--child') {
  const job = JSON.parse(process.argv[3])
  let op
  if (job.kind === 'json') {
    const js = new JsonFileStore(job.file)
    op = () => js.incrementAsync('counter', 1)
  } else {
    const s = job.kind === 'embedded' ? openStateSync(job.options) : await openState(job.options)
    op = job.kind === 'embedded' ? async () => s.incrementSync('counter', 1) : () => s.increment('counter', 1)
  }
  console.log('ready')
  await new Promise((resolve) => createInterface({ input: process.stdin }).once('line', resolve))
  for (let i = 0; i < job.n; i++) await op()
  console.log('done')
  process.exit(0)
}

function timeLoop(n, fn) {
  for (let i = 0; i < Math.min(1000, n / 10); i++) fn(i) // warm up
  const t0 = process.hrtime.bigint()
  for (let i = 0; i < n; i++) fn(i)
  return Number(process.hrtime.bigint() - t0) / 1e3 / n // µs per op
}

async function timeLoopAsync(n, fn) {
  for (let i = 0; i < Math.min(200, n / 10); i++) await fn(i)
  const t0 = process.hrtime.bigint()
  for (let i = 0; i < n; i++) await fn(i)
  return Number(process.hrtime.bigint() - t0) / 1e3 / n
}

/** Ops/s of PROCS processes doing `n` increments each, from "go" to the last "done". */
async function throughput(kind, n, extra) {
  const kids = []
  for (let i = 0; i < PROCS; i++) {
    const child = spawn(process.execPath, [fileURLToPath(import.meta.url), '--child', JSON.stringify({ kind, n, ...extra })], {
      stdio: ['pipe', 'pipe', 'inherit'],
    })
    // Queue lines so that none is lost between two awaits.
    const queue = []
    const waiting = []
    createInterface({ input: child.stdout }).on('line', (l) => (waiting.length ? waiting.shift()(l) : queue.push(l)))
    const next = () => (queue.length ? Promise.resolve(queue.shift()) : new Promise((resolve) => waiting.push(resolve)))
    kids.push({ child, next, exited: new Promise((r) => child.on('exit', r)) })
  }
  for (const k of kids) await k.next() // ready
  const t0 = process.hrtime.bigint()
  const done = kids.map((k) => k.next())
  for (const k of kids) k.child.stdin.write('go\n')
  await Promise.all(done)
  const secs = Number(process.hrtime.bigint() - t0) / 1e9
  await Promise.all(kids.map((k) => k.exited))
  return (PROCS * n) / secs
}

const fmtUs = (us) => (us >= 1000 ? `${(us / 1000).toFixed(2)} ms` : `${us.toFixed(2)} µs`)
const fmtOps = (ops) => `${Math.round(ops).toLocaleString('en-US')} ops/s`
const rows = []
function row(what, ours, theirs, ratio) {
  rows.push([what, ours, theirs, `${ratio >= 10 ? ratio.toFixed(0) : ratio.toFixed(1)}×`])
}

const work = join(ROOT, 'bench', '.work', `kv-${process.pid}`)
rmSync(work, { recursive: true, force: true })
mkdirSync(work, { recursive: true })

try {
  const stateDir = join(work, 'state')
  const embeddedOpts = { stateDir, url: '', agent: 'bench' }
  const s = openStateSync(embeddedOpts)
  const js = new JsonFileStore(join(work, 'state.json'))
  for (let i = 0; i < KEYS; i++) {
    const v = `value-${i}-${'x'.repeat(40)}`
    s.setSync(`key:${i}`, v)
    js.set(`key:${i}`, v)
  }
  const keyNames = Array.from({ length: KEYS }, (_, i) => `key:${i}`)
  const keyOf = (i) => keyNames[i % KEYS]
  const jsonBytes = readFileSync(join(work, 'state.json')).length

  // get
  const ourGet = timeLoop(200_000, (i) => s.getSync(keyOf(i)))
  const ourGetAsync = await timeLoopAsync(20_000, (i) => s.get(keyOf(i)))
  const theirGet = timeLoop(3_000, (i) => js.get(keyOf(i)))
  const theirGetUnlocked = timeLoop(20_000, (i) => js.getUnlocked(keyOf(i)))
  row('get, embedded (getSync)', fmtUs(ourGet), fmtUs(theirGet), theirGet / ourGet)
  row('get, embedded (await get)', fmtUs(ourGetAsync), fmtUs(theirGet), theirGet / ourGetAsync)
  row('get, vs reading the JSON without its lock', fmtUs(ourGet), fmtUs(theirGetUnlocked), theirGetUnlocked / ourGet)

  // set
  const ourSet = timeLoop(20_000, (i) => s.setSync(keyOf(i), `v${i}`))
  const ourSetAsync = await timeLoopAsync(10_000, (i) => s.set(keyOf(i), `v${i}`))
  const theirSet = timeLoop(2_000, (i) => js.set(keyOf(i), `v${i}`))
  row('set, embedded (setSync)', fmtUs(ourSet), fmtUs(theirSet), theirSet / ourSet)
  row('set, embedded (await set)', fmtUs(ourSetAsync), fmtUs(theirSet), theirSet / ourSetAsync)

  // lock acquire + release, uncontended
  const ourLock = timeLoop(10_000, () => {
    s.lockSync('bench-lock', 'me', 30)
    s.unlockSync('bench-lock', 'me')
  })
  const theirLock = timeLoop(1_000, () => {
    js.lock('bench-lock', 'me', 30)
    js.unlock('bench-lock', 'me')
  })
  row('lock+unlock, embedded (sync)', fmtUs(ourLock), fmtUs(theirLock), theirLock / ourLock)
  const ourLockAsync = await timeLoopAsync(5_000, async () => {
    await s.lock('bench-lock', 'me', 30)
    await s.unlock('bench-lock', 'me')
  })
  row('lock+unlock, embedded (await)', fmtUs(ourLockAsync), fmtUs(theirLock), theirLock / ourLockAsync)

  // increment throughput, 4 processes
  const N = 2_000
  const ourIncr = await throughput('embedded', N, { options: { ...embeddedOpts, agent: 'bench-incr' } })
  const theirIncr = await throughput('json', 300, { file: join(work, 'incr.json') })
  const check = openStateSync({ ...embeddedOpts, agent: 'bench-incr' }).getSync('counter')
  const checkJson = JSON.parse(readFileSync(join(work, 'incr.json'), 'utf8')).counter
  if (check !== PROCS * N || checkJson !== PROCS * 300) throw new Error(`lost increments: ${check}, ${checkJson}`)
  row(`increment, ${PROCS} processes, embedded`, fmtOps(ourIncr), fmtOps(theirIncr), ourIncr / theirIncr)

  let pgNote = 'PostgreSQL: SKIPPED (set NANOKIT_TEST_PG_URL, e.g. eval "$(scripts/pg-test-cluster.sh)")'
  if (PG_URL) {
    const agent = `bench-${randomUUID().slice(0, 8)}`
    const pg = await openState({ url: PG_URL, agent })
    pgNote = `PostgreSQL: ${(await pg.stats()).location} (loopback)`
    const pgLock = await timeLoopAsync(2_000, async () => {
      await pg.lock('bench-lock', 'me', 30)
      await pg.unlock('bench-lock', 'me')
    })
    row('lock+unlock, postgres (await)', fmtUs(pgLock), fmtUs(theirLock), theirLock / pgLock)
    const pgGet = await timeLoopAsync(5_000, (i) => pg.get(keyOf(i)))
    row('get, postgres (await get)', fmtUs(pgGet), fmtUs(theirGet), theirGet / pgGet)
    const pgIncr = await throughput('postgres', 1_000, { options: { url: PG_URL, agent: `${agent}-incr` } })
    const pgCheck = await (await openState({ url: PG_URL, agent: `${agent}-incr` })).get('counter')
    if (pgCheck !== PROCS * 1_000) throw new Error(`lost increments on postgres: ${pgCheck}`)
    row(`increment, ${PROCS} processes, postgres`, fmtOps(pgIncr), fmtOps(theirIncr), pgIncr / theirIncr)
    await pg.clear()
    await (await openState({ url: PG_URL, agent: `${agent}-incr` })).clear()
  }

  const header = ['operation', 'nanokit', 'JSON file + proper-lockfile', 'ratio']
  const widths = header.map((h, c) => Math.max(h.length, ...rows.map((r) => r[c].length)))
  const line = (r) => r.map((cell, c) => cell.padEnd(widths[c])).join('  ').trimEnd()
  console.log(`nanokit state store benchmark (node ${process.version}, ${process.platform}-${process.arch})`)
  console.log(`embedded: SQLite (WAL) file; ${pgNote}`)
  console.log(
    `shared state: ${KEYS} keys (JSON file ${jsonBytes} bytes, rewritten in place under proper-lockfile lockSync; readers lock too)`,
  )
  console.log(`ratio = how many times faster nanokit is (higher is better; below 1 means slower)`)
  console.log('')
  console.log(line(header))
  for (const r of rows) console.log(line(r))
  const pass = ourGet <= 5 && theirGet / ourGet >= 50
  console.log('')
  console.log(
    `target: embedded get ≤ 5 µs and ≥ 50× the JSON-file way → ${fmtUs(ourGet)}, ${(theirGet / ourGet).toFixed(0)}× → ${pass ? 'met' : 'NOT met'}`,
  )
} finally {
  rmSync(work, { recursive: true, force: true })
}
