#!/usr/bin/env node
// nanokit's Docker provider against Docker Compose, measured in one run on
// the same Docker engine and printed as figures and ratios (never asserted).
//
// The project: 12 services in 3 layers of 4. Every service of a layer
// depends on every service of the previous layer with
// `condition: service_healthy`; each has a Docker healthcheck with a 1 s
// interval. Both tools run identical containers (the local nk-busybox image,
// a shell that exits on SIGTERM, the same healthcheck).
//
//   up        from nothing until all 12 containers are healthy. nanokit's
//             `up` returns then; for compose, `up -d` returns once the last
//             layer is started, so the bench then polls `docker inspect`
//             until the last layer is healthy too (what a user waits for).
//   no-change `up` again with everything running and unchanged.
//   down      everything removed (containers and the network).
//   floor     the same removal done straight over the Docker socket by a
//             small node script, unordered and with no grace period: what
//             the daemon itself needs, printed against both tools.
//
// Targets (issue #16): up ≤ 0.6× (moonshot 0.4×), no-change up ≤ 0.2×,
// down ≤ 0.5× of compose's wall time. After the figures, the per-layer
// breakdown of nanokit's median `up`, from its own trace file: when the
// layer's first container was created, when its last start returned, when
// its last health check passed, and the gap to the next layer's first
// create. Both CLIs are started as processes each time (node
// for nanokit, python for docker-compose), so start-up costs count for both.
//
// Usage: node bench/docker.mjs       (BENCH_RUNS=n, default 3; median)
// Needs: a running Docker engine, docker-compose, and the nk-busybox image
// (`eval "$(bash scripts/docker-test-env.sh)"` provides all three).
import { spawnSync } from 'node:child_process'
import { mkdirSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { dirname, join } from 'node:path'
import { fileURLToPath } from 'node:url'

const root = join(dirname(fileURLToPath(import.meta.url)), '..')
const work = join(root, 'bench', '.work', 'docker')
const BIN = join(root, 'bin', 'nanokit.js')
const RUNS = Number(process.env.BENCH_RUNS || 3)
const IMAGE = 'nk-busybox:latest'
const LAYERS = 3
const WIDTH = 4

function skip(why) {
  console.log(`SKIPPED: bench/docker.mjs: ${why}`)
  process.exit(0)
}

function run(cmd, args, opts = {}) {
  const r = spawnSync(cmd, args, { encoding: 'utf8', maxBuffer: 1 << 26, ...opts })
  if (r.error) throw r.error
  if (r.status !== 0 && !opts.allowFail) {
    throw new Error(`${cmd} ${args.join(' ')} exited ${r.status}:\n${(r.stderr || '').slice(-3000)}`)
  }
  return r
}

function timed(fn) {
  const t = process.hrtime.bigint()
  fn()
  return Number(process.hrtime.bigint() - t) / 1e6
}

function median(xs) {
  const s = [...xs].sort((a, b) => a - b)
  return s[Math.floor(s.length / 2)]
}

if (spawnSync('docker', ['info'], { encoding: 'utf8' }).status !== 0) skip('no Docker engine (docker info failed)')
if (spawnSync('docker-compose', ['version'], { encoding: 'utf8' }).status !== 0) skip('docker-compose is not installed')
if (spawnSync('docker', ['image', 'inspect', IMAGE], { encoding: 'utf8' }).status !== 0) {
  skip(`image ${IMAGE} is missing (run: bash scripts/docker-test-env.sh)`)
}

rmSync(work, { recursive: true, force: true })
const nkDir = join(work, 'nanokit')
const dcDir = join(work, 'compose')
mkdirSync(nkDir, { recursive: true })
mkdirSync(dcDir, { recursive: true })

// The same container for both tools: exits at once on SIGTERM (a shell as
// PID 1 ignores signals it has no trap for, which would make every stop wait
// out the grace period), healthy when `true` runs.
const COMMAND = 'trap "exit 0" TERM; sleep 86400 & wait'
const names = []
for (let l = 0; l < LAYERS; l++) for (let i = 0; i < WIDTH; i++) names.push({ name: `l${l}s${i}`, layer: l })
const deps = (layer) => (layer === 0 ? [] : names.filter((n) => n.layer === layer - 1).map((n) => n.name))

let nkYml = 'name: nkbench\ninfra:\n  provider: docker\nservices:\n'
for (const { name, layer } of names) {
  nkYml += `  ${name}:\n    image: ${IMAGE}\n    start: ${JSON.stringify(COMMAND)}\n`
  nkYml += '    healthcheck:\n      test: ["CMD", "true"]\n      interval: 1s\n      timeout: 1s\n      retries: 3\n'
  const d = deps(layer)
  if (d.length) nkYml += `    depends_on: [${d.join(', ')}]\n`
}
writeFileSync(join(nkDir, 'nanokit.yml'), nkYml)

let dcYml = 'version: "2.4"\nservices:\n'
for (const { name, layer } of names) {
  dcYml += `  ${name}:\n    image: ${IMAGE}\n    command: ["sh", "-c", ${JSON.stringify(COMMAND)}]\n`
  dcYml += '    healthcheck:\n      test: ["CMD", "true"]\n      interval: 1s\n      timeout: 1s\n      retries: 3\n'
  const d = deps(layer)
  if (d.length) {
    dcYml += '    depends_on:\n'
    for (const dep of d) dcYml += `      ${dep}:\n        condition: service_healthy\n`
  }
}
writeFileSync(join(dcDir, 'docker-compose.yml'), dcYml)

const nk = (...args) => run(process.execPath, [BIN, ...args, '-f', join(nkDir, 'nanokit.yml')], { cwd: nkDir })
const dc = (...args) => run('docker-compose', ['-p', 'nkbenchdc', ...args], { cwd: dcDir })

/** Containers of a compose project that are not yet healthy. */
function composeUnhealthy() {
  const ids = run('docker', ['ps', '-aq', '--filter', 'label=com.docker.compose.project=nkbenchdc']).stdout.split(/\s+/).filter(Boolean)
  if (ids.length < names.length) return names.length
  const states = run('docker', ['inspect', '-f', '{{.State.Health.Status}}', ...ids]).stdout.split(/\s+/).filter(Boolean)
  return states.filter((s) => s !== 'healthy').length
}

function composeUpHealthy() {
  dc('up', '-d', '--quiet-pull')
  while (composeUnhealthy() > 0) spawnSync('sleep', ['0.05'])
}

function nkContainers() {
  return run('docker', ['ps', '-aq', '--filter', 'label=nk-project=nkbench']).stdout.split(/\s+/).filter(Boolean).length
}

// Leftovers of an interrupted earlier run.
nk('down', '--yes', '--volumes')
dc('down', '--remove-orphans', '-t', '10')

/** The newest trace file of nanokit's runs in the bench project. */
function lastTrace() {
  const dir = join(nkDir, '.nanokit', 'traces')
  const files = readdirSync(dir).filter((f) => f.endsWith('.json')).sort()
  return JSON.parse(readFileSync(join(dir, files[files.length - 1]), 'utf8'))
}

/** Per layer, from a trace of `up`: ms since the run's start. */
function layers(trace) {
  const t0 = trace.start_unix_nano
  const ms = (ns) => (ns - t0) / 1e6
  const out = []
  for (let l = 0; l < LAYERS; l++) {
    const mine = new Set(names.filter((n) => n.layer === l).map((n) => n.name))
    const spans = (name) => trace.spans.filter((s) => s.name === name && mine.has(s.attributes['nanokit.service']))
    const create = spans('create')
    const health = spans('health')
    out.push({
      created: Math.min(...create.map((s) => ms(s.start_unix_nano))),
      started: Math.max(...create.map((s) => ms(s.end_unix_nano))),
      healthy: Math.max(...health.map((s) => ms(s.end_unix_nano))),
      probes: health.map((s) => Number(s.attributes['nanokit.probes'] || 0)),
    })
  }
  return out
}

// The daemon's own floor for `down`, with no tool's logic in the way: a
// fresh node process that, over the Docker socket, inspects the 12
// containers, SIGTERMs all their processes at once (no order, and each
// exits on SIGTERM at once), waits until the daemon reports each not
// running, then deletes them all and the network together. Only where the
// daemon is on this host's unix socket (the signals are sent from here).
const FLOOR = `
const http = require('node:http')
const [net, ...ids] = process.argv.slice(1)
const req = (method, path) => new Promise((ok, fail) => {
  const r = http.request({ socketPath: '/var/run/docker.sock', method, path: '/v1.41' + path }, (m) => {
    let b = ''
    m.on('data', (d) => (b += d))
    m.on('end', () => (m.statusCode < 300 ? ok(b) : fail(new Error(method + ' ' + path + ': ' + m.statusCode + ' ' + b))))
  })
  r.on('error', fail)
  r.end()
})
;(async () => {
  const pids = (await Promise.all(ids.map((id) => req('GET', '/containers/' + id + '/json')))).map((b) => JSON.parse(b).State.Pid)
  const stopped = ids.map((id) => req('POST', '/containers/' + id + '/wait?condition=not-running'))
  for (const p of pids) process.kill(p, 'SIGTERM')
  await Promise.all(stopped)
  await Promise.all([...ids.map((id) => req('DELETE', '/containers/' + id + '?force=1')), req('DELETE', '/networks/' + net)])
})().catch((e) => { console.error(e.message); process.exit(1) })
`
const floorPossible = !process.env.DOCKER_HOST || process.env.DOCKER_HOST === 'unix:///var/run/docker.sock'
function floorDown() {
  const ids = run('docker', ['ps', '-q', '--filter', 'label=nk-project=nkbench']).stdout.split(/\s+/).filter(Boolean)
  if (ids.length !== names.length) throw new Error(`floor: expected ${names.length} running containers, found ${ids.length}`)
  const ms = timed(() => run(process.execPath, ['-e', FLOOR, 'nanokit-net-local', ...ids]))
  nk('down') // forgets what the floor removed behind nanokit's back
  return ms
}

const t = { nk: { up: [], noop: [], down: [] }, dc: { up: [], noop: [], down: [] }, floor: [] }
const traces = []
for (let r = 0; r < RUNS; r++) {
  // Alternate which tool goes first, so neither always gets the warmer daemon.
  const order = r % 2 === 0 ? ['nk', 'dc'] : ['dc', 'nk']
  for (const tool of order) {
    if (tool === 'nk') {
      t.nk.up.push(timed(() => nk('up')))
      traces.push(layers(lastTrace()))
      if (nkContainers() !== names.length) throw new Error(`nanokit: expected ${names.length} containers, found ${nkContainers()}`)
      t.nk.noop.push(timed(() => nk('up')))
      t.nk.down.push(timed(() => nk('down')))
      if (nkContainers() !== 0) throw new Error('nanokit down left containers behind')
      if (floorPossible) {
        nk('up')
        t.floor.push(floorDown())
      }
    } else {
      t.dc.up.push(timed(composeUpHealthy))
      t.dc.noop.push(timed(() => dc('up', '-d')))
      t.dc.down.push(timed(() => dc('down', '-t', '10')))
    }
  }
}

const row = (what, key, target) => {
  const a = median(t.nk[key])
  const b = median(t.dc[key])
  const ratio = a / b
  const verdict = ratio <= target ? 'met' : 'NOT MET'
  console.log(
    `${what.padEnd(30)} nanokit ${a.toFixed(0).padStart(6)} ms   compose ${b.toFixed(0).padStart(6)} ms   ${ratio.toFixed(2)}×  (target ≤ ${target}×: ${verdict})`,
  )
}
const composeVersion = run('docker-compose', ['version', '--short']).stdout.trim()
const engine = run('docker', ['version', '-f', '{{.Server.Version}} (API {{.Server.APIVersion}})']).stdout.trim()
console.log(`12 services, 3 layers of 4, service_healthy dependencies, 1 s health interval`)
console.log(`docker engine ${engine}, docker-compose ${composeVersion}; median of ${RUNS} run(s)`)
row('up (until all healthy)', 'up', 0.6)
row('no-change up', 'noop', 0.2)
row('down', 'down', 0.5)
if (t.floor.length) {
  const f = median(t.floor)
  console.log(
    `${'down, daemon floor (raw API)'.padEnd(30)}   floor ${f.toFixed(0).padStart(6)} ms   compose ${median(t.dc.down).toFixed(0).padStart(6)} ms   ${(f / median(t.dc.down)).toFixed(2)}×   nanokit/floor ${(median(t.nk.down) / f).toFixed(2)}×`,
  )
}
const mid = t.nk.up.indexOf(median(t.nk.up))
console.log(`nanokit's median up (${t.nk.up[mid].toFixed(0)} ms), per layer from its trace (ms since the run's start):`)
traces[mid].forEach((l, i) => {
  const next = traces[mid][i + 1]
  console.log(
    `  layer ${i}: first create ${l.created.toFixed(0).padStart(5)}   last started ${l.started.toFixed(0).padStart(5)}` +
      `   last healthy ${l.healthy.toFixed(0).padStart(5)} (probes ${l.probes.join(',')})` +
      (next ? `   → next layer's first create +${(next.created - l.healthy).toFixed(0)}` : ''),
  )
})
