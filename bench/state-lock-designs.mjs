#!/usr/bin/env node
// The floor of a deploy lock's round trip on S3 (SeaweedFS), whatever the
// design: each design's requests for one no-change `up` replayed by a
// minimal client (one keep-alive connection, raw HTTP/1.1, unsigned: the
// test bucket takes anonymous requests), in the shape of a real run (a
// burst of requests first, as the precondition probe makes; take the lock;
// read the state; IDLE_MS of planning; release), against Terraform's
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
//                 state, GET the lock to check its id, DELETE it.
//
// Usage: node bench/state-lock-designs.mjs (stores as bench/state.mjs);
// STATE_BYTES (default: the 200-service project's state, 117 kB), IDLE_MS
// (default 20: the no-change up's time between lock and release), BENCH_RUNS.
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
const sock = net.connect({ host: endpoint.hostname, port: Number(endpoint.port), noDelay: true })
await new Promise((resolve, reject) => sock.once('connect', resolve).once('error', reject))
let pending = null
let buf = Buffer.alloc(0)
sock.on('data', (d) => {
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
})

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
    await burst()
    const [a, v1] = await ok(req('PUT', lockKey, body(408, i), { 'if-match': lockV }), 200)
    const [g] = await ok(req('GET', stateKey), 200)
    await sleep(IDLE_MS)
    const [b, v2] = await ok(req('PUT', lockKey, body(229, i), { 'if-match': v1 }), 200)
    lockV = v2
    return { lock: a + b, run: a + g + b, requests: 2 }
  },
  async 'create+delete'(i) {
    const k = `${lockKey}-cd`
    await burst()
    const [a, v] = await ok(req('PUT', k, body(408, i), { 'if-none-match': '*' }), 200)
    const [g] = await ok(req('GET', stateKey), 200)
    await sleep(IDLE_MS)
    const [b] = await ok(req('DELETE', k, null, { 'if-match': v }), 204)
    return { lock: a + b, run: a + g + b, requests: 2 }
  },
  async 'in-state'(i) {
    await burst()
    const [a, v1] = await ok(req('PUT', stateKey, body(STATE_BYTES, i), { 'if-match': stateV }), 200)
    await sleep(IDLE_MS)
    const [b, v2] = await ok(req('PUT', stateKey, body(STATE_BYTES, -i), { 'if-match': v1 }), 200)
    stateV = v2
    // The read it spares is what a run without the lock pays.
    const [g] = await ok(req('GET', stateKey), 200)
    return { lock: a + b - g, run: a + b, requests: 2 }
  },
  async 'in-state+read'(i) {
    await burst()
    const [g, v0] = await ok(req('GET', stateKey), 200)
    const [a, v1] = await ok(req('PUT', stateKey, body(STATE_BYTES, i), { 'if-match': v0 }), 200)
    await sleep(IDLE_MS)
    const [b, v2] = await ok(req('PUT', stateKey, body(STATE_BYTES, -i), { 'if-match': v1 }), 200)
    stateV = v2
    return { lock: a + b, run: g + a + b, requests: 3 }
  },
  async terraform(i) {
    const k = `${lockKey}-tf`
    await burst()
    const [a] = await ok(req('PUT', k, body(204, i), { 'if-none-match': '*' }), 200)
    const [h] = await ok(req('HEAD', stateKey), 200)
    await sleep(IDLE_MS)
    const [b] = await ok(req('GET', k), 200)
    const [c] = await ok(req('DELETE', k), 204)
    return { lock: a + b + c, run: a + h + b + c, requests: 3 }
  },
}

// Rounds interleave the designs, so that the machine's load hits all alike.
const results = Object.fromEntries(Object.keys(designs).map((d) => [d, []]))
for (let i = 1; i <= RUNS; i++) {
  for (const [name, design] of Object.entries(designs)) results[name].push(await design(i))
}
for (const k of [stateKey, lockKey]) await req('DELETE', k)
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
console.log(`(median of ${RUNS} rounds; state ${STATE_BYTES} bytes; ${IDLE_MS} ms between taking and releasing the lock)`)
console.log('')
for (const [name, rs] of Object.entries(results)) {
  const lock = median(rs.map((r) => r.lock))
  const ratio = tf ? ` = ${(lock / tf.logMs).toFixed(2)}x Terraform's round trip from its log` : ''
  console.log(`  ${name.padEnd(14)} lock ${f(lock)}${ratio}; whole run's requests ${f(median(rs.map((r) => r.run)))}`)
}
if (tf) console.log(`\n  terraform use_lockfile, same bucket, from its log: ${f(tf.logMs)}`)
else console.log('\n  terraform not found: no ratios')
