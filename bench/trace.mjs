#!/usr/bin/env node
// Tracing overhead (issue 6), measured in one run and printed as ratios:
// the same workloads in child processes with tracing
//   off     NANOKIT_TRACE=off (no spans recorded anywhere, no trace files)
//   on      the default: spans compiled in, no OTLP endpoint set (export off)
//   export  OTEL_EXPORTER_OTLP_ENDPOINT pointing at a loopback OTLP sink
// Workloads: `plan` of 1,000 services (JS API, in-process), the lock hot
// path (uncontended acquire+release), cache-hit isInstalled, and a no-change
// `up` of 100 running services (which records and writes a trace when on).
// Children alternate between modes; each figure is the median over rounds.
//
//   node bench/trace.mjs      (BENCH_ROUNDS=9 by default; on a shared machine
//   compare the best-of-rounds line too: medians move by ±30 % under load)
import { spawnSync } from 'node:child_process'
import { createServer } from 'node:http'
import { mkdirSync, rmSync, writeFileSync } from 'node:fs'
import { join, dirname } from 'node:path'
import { fileURLToPath } from 'node:url'

const root = join(dirname(fileURLToPath(import.meta.url)), '..')
const work = join(root, 'bench', '.work', 'trace')
const ROUNDS = Number(process.env.BENCH_ROUNDS || 9)
const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]

if (process.argv[2] === '--child') {
  // ---- measuring child ----------------------------------------------------
  const nk = (await import('node:module')).createRequire(import.meta.url)(join(root, 'nanokit.js'))
  const [, , , what, arg] = process.argv
  const timeOps = async (n, op) => {
    const t = performance.now()
    for (let i = 0; i < n; i++) await op()
    return ((performance.now() - t) * 1000) / n // µs/op
  }
  let out
  if (what === 'plan') {
    await nk.plan({ file: arg })
    const xs = []
    for (let i = 0; i < 5; i++) {
      const t = performance.now()
      await nk.plan({ file: arg })
      xs.push(performance.now() - t)
    }
    out = median(xs) // ms
  } else if (what === 'lock') {
    const p = join(arg, `l-${process.pid}.lock`)
    for (let i = 0; i < 500; i++) (await nk.acquireLock(p)).release()
    const xs = []
    for (let i = 0; i < 5; i++) xs.push(await timeOps(4000, async () => (await nk.acquireLock(p)).release()))
    out = median(xs)
  } else if (what === 'installed') {
    const xs = []
    for (let i = 0; i < 5; i++) xs.push(await timeOps(20000, () => nk.isInstalled(arg, '@openfn/language-http@7.2.0')))
    out = median(xs)
  } else if (what === 'up') {
    await nk.up({ file: arg })
    const xs = []
    for (let i = 0; i < 3; i++) {
      const t = performance.now()
      const r = await nk.up({ file: arg })
      xs.push(performance.now() - t)
      if (r.services.some((s) => s.outcome !== 'unchanged')) throw new Error('not a no-change up')
    }
    out = median(xs) // ms
  }
  if (typeof nk.flushTraces === 'function') await nk.flushTraces()
  console.log(JSON.stringify(out))
  process.exit(0)
}

// ---- driver -----------------------------------------------------------------
rmSync(work, { recursive: true, force: true })
mkdirSync(work, { recursive: true })

// A loopback OTLP sink: accepts and discards export requests.
let exports = 0
const sink = createServer((req, res) => {
  req.resume()
  req.on('end', () => {
    exports++
    res.writeHead(200, { 'content-type': 'application/x-protobuf' }).end()
  })
})
await new Promise((r) => sink.listen(0, '127.0.0.1', r))
const endpoint = `http://127.0.0.1:${sink.address().port}`

const base = { ...process.env }
for (const k of ['NANOKIT_TRACE', 'OTEL_EXPORTER_OTLP_ENDPOINT', 'OTEL_EXPORTER_OTLP_TRACES_ENDPOINT']) delete base[k]
const MODES = {
  off: { ...base, NANOKIT_TRACE: 'off' },
  on: base,
  export: { ...base, OTEL_EXPORTER_OTLP_ENDPOINT: endpoint },
}

function child(mode, what, arg) {
  return new Promise((resolve, reject) => {
    // spawnSync would block the sink's event loop: run the child async.
    import('node:child_process').then(({ execFile }) => {
      execFile(process.execPath, [fileURLToPath(import.meta.url), '--child', what, arg], { env: MODES[mode], maxBuffer: 1 << 24 }, (err, stdout, stderr) => {
        if (err) reject(new Error(`${what} (${mode}) failed: ${stderr.slice(-2000)}`))
        else resolve(JSON.parse(stdout.trim().split('\n').pop()))
      })
    })
  })
}

async function measure(what, arg) {
  const r = { off: [], on: [], export: [] }
  for (let i = 0; i < ROUNDS; i++) {
    // Rotate the order so no mode always runs first.
    const order = Object.keys(r)
    for (let k = 0; k < i % 3; k++) order.push(order.shift())
    for (const m of order) r[m].push(await child(m, what, arg))
  }
  return {
    ...Object.fromEntries(Object.entries(r).map(([k, v]) => [k, median(v)])),
    min: Object.fromEntries(Object.entries(r).map(([k, v]) => [k, Math.min(...v)])),
  }
}

// 1,000 services, the shape of bench/infra.mjs.
function deps(i) {
  const d = []
  if (i % 10 !== 0) d.push(i - 1)
  if (i >= 10 && i % 10 === 0) d.push(i - 10)
  return d
}
function project(name, n) {
  const dir = join(work, name)
  mkdirSync(dir, { recursive: true })
  let yml = `name: ${name}\nservices:\n`
  for (let i = 0; i < n; i++) {
    yml += `  s${i}:\n    start: "exec sleep 600"\n    env: { INDEX: "${i}" }\n`
    const d = deps(i)
    if (d.length) yml += `    depends_on: [${d.map((j) => `s${j}`).join(', ')}]\n`
  }
  writeFileSync(join(dir, 'nanokit.yml'), yml)
  return join(dir, 'nanokit.yml')
}

const plan1000 = project('plan1000', 1000)
const up100 = project('up100', 100)
const repo = join(work, 'repo')
mkdirSync(repo, { recursive: true })
{
  const { createRequire } = await import('node:module')
  const nk = createRequire(import.meta.url)(join(root, 'nanokit.js'))
  await nk.install(repo, '@openfn/language-http@7.2.0', {
    install: async (_s, dir) => {
      const pkg = join(dir, 'node_modules', '@openfn', 'language-http_7.2.0')
      mkdirSync(pkg, { recursive: true })
      writeFileSync(join(pkg, 'package.json'), JSON.stringify({ name: '@openfn/language-http', version: '7.2.0' }))
    },
  })
}

const rows = []
rows.push(['plan, 1,000 services (ms)', await measure('plan', plan1000)])
rows.push(['lock acquire+release, uncontended (µs/op)', await measure('lock', work)])
rows.push(['isInstalled, cache hit (µs/op)', await measure('installed', repo)])
let upRow
try {
  upRow = ['no-change up, 100 services (ms)', await measure('up', up100)]
  rows.push(upRow)
} finally {
  const { createRequire } = await import('node:module')
  const nk = createRequire(import.meta.url)(join(root, 'nanokit.js'))
  await nk.down({ file: up100 }).catch(() => {})
}
sink.close()

const pct = (a, b) => `${((a / b - 1) * 100).toFixed(1).replace(/^(?!-)/, '+')} %`
console.log(`\nnanokit tracing overhead (median of ${ROUNDS} alternating child processes; ${new Date().toISOString()}, node ${process.version})\n`)
const w = Math.max(...rows.map((r) => r[0].length))
console.log(`${'workload'.padEnd(w)}  ${'off'.padStart(9)}  ${'on'.padStart(9)}  ${'export'.padStart(9)}  on vs off  export vs off`)
for (const [name, r] of rows) {
  const f = (x) => x.toFixed(x < 10 ? 2 : 1).padStart(9)
  console.log(`${name.padEnd(w)}  ${f(r.off)}  ${f(r.on)}  ${f(r.export)}  ${pct(r.on, r.off).padStart(9)}  ${pct(r.export, r.off).padStart(13)}`)
  const m = r.min
  console.log(`${'  best of rounds'.padEnd(w)}  ${f(m.off)}  ${f(m.on)}  ${f(m.export)}  ${pct(m.on, m.off).padStart(9)}  ${pct(m.export, m.off).padStart(13)}`)
}
console.log(`\noff: NANOKIT_TRACE=off; on: default (export off); export: OTLP/HTTP to a loopback sink (${exports} export requests received).`)
console.log('Target: "on" within 2 % of "off" for plan and the lock hot path. `up` with tracing on also writes .nanokit/traces/<run>.json.')
