#!/usr/bin/env node
// The floor of a deploy lock's round trip on S3 (SeaweedFS), whatever the
// design: each design's requests for one no-change `up` replayed by a
// minimal client (a keep-alive connection, raw HTTP/1.1, unsigned: the
// test bucket takes anonymous requests), in the shape of a real run (what
// comes first, see the shapes below; take the lock; read the state; IDLE_MS
// of planning; release), against Terraform's
// `use_lockfile` round trip from its own log in the same run. What the
// server costs is a lower bound of what any client pays for that design.
//
//   now           the lock object `<key>.nklock`: a conditional write to
//                 take it (on the version remembered at the last release),
//                 a conditional write of a free record (keeping the epoch)
//                 to release it;
//   create+delete the lock object created only if absent and deleted on
//                 the version written (If-Match on DELETE): Terraform's
//                 shape, made safe; it forgets the epoch at every release;
//   in-state      the lock kept in the state object, whose version this
//                 host remembers: taking it writes the whole state (and
//                 spares the read), releasing it too (a no-change run has
//                 no state write to fold the release into);
//   in-state+read the same, reading the state first;
//   terraform     Terraform's own requests: create `<key>.tflock`, HEAD the
//                 state, GET the lock to check its id, DELETE it;
//   per-epoch     one lock object per epoch, `<key>.nklock.<epoch>`, taken by
//                 creating the next one only if absent (If-None-Match: *),
//                 released by creating `<key>.nklock.<epoch>.released` only if
//                 absent; the previous epoch's two objects deleted after the
//                 release, off the lock's round trip (timed apart as `gc`);
//   per-epoch-empty  the same without the deletions, each object created
//                 with no data and the holder in its user metadata
//                 (x-amz-meta-*), which spares the store a data chunk: what
//                 nanokit does (it collects epochs a day old, rarely).
//
// Each design in three shapes: `cold` (a new connection after BEFORE_MS of
// the store idle, as a CLI run now starts: the probe's pass is remembered),
// `idle` (the same connection after the same idle) and `warm` (the probe's
// burst just before, on the same connection). Terraform's own gap between
// taking and releasing its lock is ~2 ms (an empty configuration), so its
// replay here with IDLE_MS between pays the idle store at release too.
//
// Usage: node bench/state-lock-designs.mjs (stores as bench/state.mjs);
// STATE_BYTES (default: the 200-service project's state, 117 kB), IDLE_MS
// (default 20: the no-change up's time between lock and release),
// BEFORE_MS (default 20), BENCH_RUNS.
import { spawnSync } from 'node:child_process'
import net from 'node:net'
import { randomUUID } from 'node:crypto'
import { join, dirname } from 'node:path'
import { fileURLToPath } from 'node:url'
import { median, terraformLock } from './lib/terraform-s3.mjs'

const root = join(dirname(fileURLToPath(import.meta.url)), '..')
const RUNS = Number(process.env.BENCH_RUNS || 25)
const STATE_BYTES = Number(process.env.STATE_BYTES || 117000)
const IDLE_MS = Number(process.env.IDLE_MS || 20)
const BEFORE_MS = Number(process.env.BEFORE_MS || 20)

const env = { ...process.env }
if (!env.NANOKIT_TEST_S3_ENDPOINT) {
  const r = spawnSync('bash', [join(root, 'scripts', 'state-test-servers.sh')], { cwd: root, encoding: 'utf8' })
  if (r.status !== 0) throw new Error(`scripts/state-test-servers.sh failed: ${r.stderr.slice(-2000)}`)
  for (const line of r.stdout.split('\n')) {
    const m = /^export (\w+)=(.*)$/.exec(line.trim())
    if (m) env[m[1]] = m[2]
  }
}
const endpoint = new URL(env.NANOKIT_TEST_S3_ENDPOINT)

// The least a client can add: one TCP connection (no Nagle), each request
// written whole at once, its answer parsed just enough to find its end.
let sock = null
let pending = null
let buf = Buffer.alloc(0)
function onData(d) {
  buf = Buffer.concat([buf, d])
  const end = buf.indexOf('\r\n\r\n')
  if (!pending || end < 0) return
  const head = buf.subarray(0, end).toString('latin1')
  const status = Number(head.split(' ')[1])
  const len = pending.head || status === 204 || status === 304 ? 0 : Number(/\r\ncontent-length: *(\d+)/i.exec(head)?.[1] ?? 0)
  if (buf.length < end + 4 + len) return
  buf = buf.subarray(end + 4 + len)
  const etag = /\r\netag: *([^\r]*)/i.exec(head)?.[1]
  const p = pending
  pending = null
  p.resolve([Number(process.hrtime.bigint() - p.t) / 1e6, status, etag])
}
/** A new connection (the previous one closed): the ms it took. */
async function connect() {
  sock?.destroy()
  buf = Buffer.alloc(0)
  const t = process.hrtime.bigint()
  sock = net.connect({ host: endpoint.hostname, port: Number(endpoint.port), noDelay: true })
  await new Promise((resolve, reject) => sock.once('connect', resolve).once('error', reject))
  sock.on('data', onData)
  return Number(process.hrtime.bigint() - t) / 1e6
}
await connect()

/** One request: [ms, status, etag]. */
function req(method, key, body, headers = {}) {
  return new Promise((resolve) => {
    const lines = [`${method} /nanokit/${key} HTTP/1.1`, `host: ${endpoint.host}`, `content-length: ${body ? body.length : 0}`]
    for (const [k, v] of Object.entries(headers)) lines.push(`${k}: ${v}`)
    const bytes = Buffer.concat([Buffer.from(lines.join('\r\n') + '\r\n\r\n', 'latin1'), body ?? Buffer.alloc(0)])
    pending = { resolve, head: method === 'HEAD', t: process.hrtime.bigint() }
    sock.write(bytes)
  })
}
const sleep = (ms) => new Promise((r) => setTimeout(r, ms))
const body = (n, i) => Buffer.alloc(n, `${i}-${randomUUID()}|`)
async function ok(p, ...want) {
  const [ms, status, etag] = await p
  if (!want.includes(status)) throw new Error(`unexpected HTTP ${status}`)
  return [ms, etag]
}

// What comes before the lock is taken, per shape:
//   cold  a new process: a new connection (its time counted in the take),
//         after BEFORE_MS of the store idle (the previous run's end, this
//         one's start); no probe (a store's pass is remembered for a day);
//   idle  the same connection as the round before, after BEFORE_MS of the
//         store idle (tells the idle store's cost from the new connection's);
//   warm  the precondition probe's burst of requests on the same connection
//         just before (how every CLI run began before the probe was
//         remembered).
let shape = 'cold'
let connMs = 0
async function start() {
  if (shape === 'warm') {
    connMs = 0
    return burst()
  }
  await sleep(BEFORE_MS)
  if (shape === 'idle') {
    connMs = 0
    return
  }
  connMs = await connect()
  connects.push(connMs)
}
const connects = []

const pre = `designs-${process.pid}`
const stateKey = `${pre}/state.json`
const lockKey = `${pre}/state.json.nklock`
async function burst() {
  const k = `${pre}/probe`
  await ok(req('PUT', k, body(16, 1), { 'if-none-match': '*' }), 200)
  await ok(req('PUT', k, body(16, 2), { 'if-none-match': '*' }), 412)
  await ok(req('DELETE', k), 204)
}

let [, stateV] = await ok(req('PUT', stateKey, body(STATE_BYTES, 0)), 200)
let [, lockV] = await ok(req('PUT', lockKey, body(229, 0)), 200)
const designs = {
  async now(i) {
    await start()
    const [a, v1] = await ok(req('PUT', lockKey, body(408, i), { 'if-match': lockV }), 200)
    const [g] = await ok(req('GET', stateKey), 200)
    await sleep(IDLE_MS)
    const [b, v2] = await ok(req('PUT', lockKey, body(229, i), { 'if-match': v1 }), 200)
    lockV = v2
    return { lock: connMs + a + b, take: connMs + a, release: b, run: connMs + a + g + b, requests: 2 }
  },
  async 'create+delete'(i) {
    const k = `${lockKey}-cd`
    await start()
    const [a, v] = await ok(req('PUT', k, body(408, i), { 'if-none-match': '*' }), 200)
    const [g] = await ok(req('GET', stateKey), 200)
    await sleep(IDLE_MS)
    const [b] = await ok(req('DELETE', k, null, { 'if-match': v }), 204)
    return { lock: connMs + a + b, take: connMs + a, release: b, run: connMs + a + g + b, requests: 2 }
  },
  async 'in-state'(i) {
    await start()
    const [a, v1] = await ok(req('PUT', stateKey, body(STATE_BYTES, i), { 'if-match': stateV }), 200)
    await sleep(IDLE_MS)
    const [b, v2] = await ok(req('PUT', stateKey, body(STATE_BYTES, -i), { 'if-match': v1 }), 200)
    stateV = v2
    // The read it spares is what a run without the lock pays.
    const [g] = await ok(req('GET', stateKey), 200)
    return { lock: connMs + a + b - g, take: connMs + a - g, release: b, run: connMs + a + b, requests: 2 }
  },
  async 'in-state+read'(i) {
    await start()
    const [g, v0] = await ok(req('GET', stateKey), 200)
    const [a, v1] = await ok(req('PUT', stateKey, body(STATE_BYTES, i), { 'if-match': v0 }), 200)
    await sleep(IDLE_MS)
    const [b, v2] = await ok(req('PUT', stateKey, body(STATE_BYTES, -i), { 'if-match': v1 }), 200)
    stateV = v2
    return { lock: connMs + g + a + b, take: connMs + g + a, release: b, run: connMs + g + a + b, requests: 3 }
  },
  async 'per-epoch'(i) {
    await start()
    const k = `${lockKey}-pe.${i}`
    const [a] = await ok(req('PUT', k, body(408, i), { 'if-none-match': '*' }), 200)
    const [g] = await ok(req('GET', stateKey), 200)
    await sleep(IDLE_MS)
    const [b] = await ok(req('PUT', `${k}.released`, body(229, i), { 'if-none-match': '*' }), 200)
    let gc = 0
    if (i > 1) {
      gc += (await ok(req('DELETE', `${lockKey}-pe.${i - 1}.released`), 204))[0]
      gc += (await ok(req('DELETE', `${lockKey}-pe.${i - 1}`), 204))[0]
    }
    return { lock: connMs + a + b, take: connMs + a, release: b, run: connMs + a + g + b, requests: 2, gc }
  },
  async 'per-epoch-empty'(i) {
    // per-epoch, each object empty (the store keeps no data chunk), the
    // holder in the object's user metadata.
    await start()
    const k = `${lockKey}-pz.${String(i).padStart(20, '0')}`
    const meta = { 'x-amz-meta-nanokit-lock': Buffer.from(body(300, i)).toString('base64') }
    const [a] = await ok(req('PUT', k, null, { 'if-none-match': '*', ...meta }), 200)
    const [g] = await ok(req('GET', stateKey), 200)
    await sleep(IDLE_MS)
    const [b] = await ok(req('PUT', `${k}.released`, null, { 'if-none-match': '*' }), 200)
    return { lock: connMs + a + b, take: connMs + a, release: b, run: connMs + a + g + b, requests: 2 }
  },
  async terraform(i) {
    const k = `${lockKey}-tf`
    await start()
    const [a] = await ok(req('PUT', k, body(204, i), { 'if-none-match': '*' }), 200)
    const [h] = await ok(req('HEAD', stateKey), 200)
    await sleep(IDLE_MS)
    const [b] = await ok(req('GET', k), 200)
    const [c] = await ok(req('DELETE', k), 204)
    return { lock: connMs + a + b + c, take: connMs + a, release: b + c, run: connMs + a + h + b + c, requests: 3 }
  },
}

// Rounds interleave the designs, so that the machine's load hits all alike;
// each shape in turn.
const SHAPES = ['cold', 'idle', 'warm']
const results = Object.fromEntries(SHAPES.map((sh) => [sh, Object.fromEntries(Object.keys(designs).map((d) => [d, []]))]))
let round = 0
for (const sh of SHAPES) {
  shape = sh
  for (let i = 1; i <= RUNS; i++) {
    round++
    for (const [name, design] of Object.entries(designs)) results[sh][name].push(await design(round))
  }
}
for (const k of [stateKey, lockKey, `${lockKey}-pe.${round}`, `${lockKey}-pe.${round}.released`]) await req('DELETE', k)
sock.destroy()

const tf = terraformLock({
  dir: join(root, 'bench', '.work', 'state-lock-designs', 'terraform'),
  s3: endpoint.origin,
  key: `${pre}/terraform.tfstate`,
  env: { ...env, AWS_ACCESS_KEY_ID: 'nanokit-bench', AWS_SECRET_ACCESS_KEY: 'nanokit-bench-secret', AWS_REGION: 'us-east-1' },
  runs: 11,
  pairs: 0,
})

const f = (x) => `${x.toFixed(2)} ms`
console.log(`deploy lock round trip on S3 (SeaweedFS), each design's requests replayed by a minimal client`)
console.log(`(median of ${RUNS} rounds per shape; state ${STATE_BYTES} bytes; ${IDLE_MS} ms between taking and releasing the lock)`)
for (const sh of SHAPES) {
  console.log('')
  console.log({
    cold: `cold: each round a new connection (median ${f(median(connects))} to connect, in the take), after ${BEFORE_MS} ms of the store idle, no probe (a CLI run now):`,
    idle: `idle: the same connection, after ${BEFORE_MS} ms of the store idle, no probe:`,
    warm: 'warm: the precondition probe\'s requests just before, on the same connection (a CLI run while every process probed):',
  }[sh])
  for (const [name, rs] of Object.entries(results[sh])) {
    const lock = median(rs.map((r) => r.lock))
    const ratio = tf ? ` = ${(lock / tf.logMs).toFixed(2)}x Terraform's round trip from its log` : ''
    const gc = rs.some((r) => r.gc !== undefined) ? `; off the round trip: gc ${f(median(rs.map((r) => r.gc ?? 0)))}` : ''
    const parts = `take ${f(median(rs.map((r) => r.take)))}, release ${f(median(rs.map((r) => r.release)))}`
    console.log(`  ${name.padEnd(14)} lock ${f(lock)}${ratio} (${parts}); whole run's requests ${f(median(rs.map((r) => r.run)))}${gc}`)
  }
}
if (tf) console.log(`\n  terraform use_lockfile, same bucket, from its log: ${f(tf.logMs)} (${f(tf.gapMs)} between holding and releasing)`)
else console.log('\n  terraform not found: no ratios')
