#!/usr/bin/env node
// nanokit's Docker provider against Docker Compose, measured in one run on
// the same Docker engine and printed as figures and ratios (never asserted).
//
// Two projects, each of 12 services in 3 layers of 4. Every service of a
// layer depends on every service of the previous layer with
// `condition: service_healthy`; each has a Docker healthcheck with a 1 s
// interval. Both tools run identical containers (the local nk-busybox image,
// a shell that exits on SIGTERM, the same healthcheck).
//
//   ready     every service is healthy as soon as it runs (check: `true`).
//   late      every service becomes ready 0.5 s after it starts (it touches
//             /tmp/ready then; check: `test -f /tmp/ready`), as a real
//             service that needs a moment does.
//
// For each project:
//   up        from nothing until all 12 containers are healthy. nanokit's
//             `up` returns then; for compose, `up -d` returns once the last
//             layer is started, so the bench then polls `docker inspect`
//             until the last layer is healthy too (what a user waits for).
//   no-change `up` again with everything running and unchanged.
//   down      everything removed (containers and the network).
//   floor     (ready) the same removal done straight over the Docker socket
//             by a small node script, unordered and with no grace period:
//             what the daemon itself needs, printed against both tools.
//
// Targets: ready (issue #16): up ≤ 0.6× (moonshot 0.4×), no-change up ≤
// 0.2×, down ≤ 0.5× of compose's wall time; late (issue #26): up ≤ 0.7×
// (the floor there is about 0.65×: start plus 0.5 s per layer), and each
// service released (its dependents free to start) within 100 ms of its
// readiness (when its container touched /tmp/ready). After
// the figures, the per-layer breakdown of nanokit's median `up`, from its
// own trace file: when the layer's first container was created, when its
// last start returned, when its last health check passed, and the gap to
// the next layer's first create. Both CLIs are started as processes each
// time (node for nanokit, python for docker-compose), so start-up costs
// count for both.
//
// Usage: node bench/docker.mjs [ready|late]   (BENCH_RUNS=n, default 3; median)
// Needs: a running Docker engine, docker-compose, and the nk-busybox image
// (`eval "$(bash scripts/docker-test-env.sh)"` provides all three).
import { spawnSync } from 'node:child_process'
import { mkdirSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs'
import { dirname, join } from 'node:path'
import { fileURLToPath } from 'node:url'

const root = join(dirname(fileURLToPath(import.meta.url)), '..')
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

// The same containers for both tools: they exit at once on SIGTERM (a shell
// as PID 1 ignores signals it has no trap for, which would make every stop
// wait out the grace period).
const PROJECTS = [
  {
    key: 'ready',
    nk: 'nkbench',
    title: 'ready at once',
    command: 'trap "exit 0" TERM; sleep 86400 & wait',
    check: ['CMD', 'true'],
    readyAfterMs: 0,
    targets: { up: 0.6, noop: 0.2, down: 0.5 },
    floor: true,
  },
  {
    key: 'late',
    nk: 'nkbenchlate',
    title: 'ready 0.5 s after start',
    command: 'trap "exit 0" TERM; sleep 0.5; touch /tmp/ready; sleep 86400 & wait',
    check: ['CMD', 'test', '-f', '/tmp/ready'],
    readyAfterMs: 500,
    targets: { up: 0.7 },
    floor: false,
  },
].filter((p) => process.argv.length <= 2 || process.argv.slice(2).includes(p.key))

const names = []
for (let l = 0; l < LAYERS; l++) for (let i = 0; i < WIDTH; i++) names.push({ name: `l${l}s${i}`, layer: l })
const deps = (layer) => (layer === 0 ? [] : names.filter((n) => n.layer === layer - 1).map((n) => n.name))

/** Nanokit's and Compose's files of `p`, in their own folders; returns the folders. */
function writeProject(p) {
  const work = join(root, 'bench', '.work', 'docker', p.key)
  rmSync(work, { recursive: true, force: true })
  const nkDir = join(work, 'nanokit')
  const dcDir = join(work, 'compose')
  mkdirSync(nkDir, { recursive: true })
  mkdirSync(dcDir, { recursive: true })
  const check = JSON.stringify(p.check)
  let nkYml = `name: ${p.nk}\ninfra:\n  provider: docker\nservices:\n`
  for (const { name, layer } of names) {
    nkYml += `  ${name}:\n    image: ${IMAGE}\n    start: ${JSON.stringify(p.command)}\n`
    nkYml += `    healthcheck:\n      test: ${check}\n      interval: 1s\n      timeout: 1s\n      retries: 3\n`
    const d = deps(layer)
    if (d.length) nkYml += `    depends_on: [${d.join(', ')}]\n`
  }
  writeFileSync(join(nkDir, 'nanokit.yml'), nkYml)
  let dcYml = 'version: "2.4"\nservices:\n'
  for (const { name, layer } of names) {
    dcYml += `  ${name}:\n    image: ${IMAGE}\n    command: ["sh", "-c", ${JSON.stringify(p.command)}]\n`
    dcYml += `    healthcheck:\n      test: ${check}\n      interval: 1s\n      timeout: 1s\n      retries: 3\n`
    const d = deps(layer)
    if (d.length) {
      dcYml += '    depends_on:\n'
      for (const dep of d) dcYml += `      ${dep}:\n        condition: service_healthy\n`
    }
  }
  writeFileSync(join(dcDir, 'docker-compose.yml'), dcYml)
  return { nkDir, dcDir }
}

/** `docker ps -q` of the containers labelled `label`, running or (with `all`) not. */
function containers(label, all = true) {
  return run('docker', ['ps', ...(all ? ['-aq'] : ['-q']), '--filter', `label=${label}`]).stdout.split(/\s+/).filter(Boolean)
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

/** Docker's RFC 3339 time with nanoseconds → ns since the epoch (as a Number). */
function unixNanos(rfc3339) {
  const m = rfc3339.match(/^(.*T\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)$/)
  const frac = (m[2] || '').padEnd(9, '0').slice(0, 9)
  return Date.parse(m[1] + m[3]) * 1e6 + Number(frac)
}

/**
 * Per service of a trace of `up`: how long after its readiness it was
 * released (its `service` span ended: its dependents may start), in ms.
 * Readiness is when the container touched /tmp/ready (the file's mtime, read
 * in the container's upper layer on this host), else its start as Docker
 * records it + `readyAfterMs`.
 */
function releaseLags(trace, project, readyAfterMs) {
  const ids = containers(`nk-project=${project}`, false)
  const format = '{{index .Config.Labels "nk-service"}} {{.State.StartedAt}} {{.GraphDriver.Data.UpperDir}}'
  const info = new Map(
    run('docker', ['inspect', '-f', format, ...ids])
      .stdout.split('\n')
      .filter(Boolean)
      .map((l) => l.split(' '))
      .map(([service, started, upper]) => [service, { started, upper }]),
  )
  return names.map(({ name }) => {
    const span = trace.spans.find((s) => s.name === 'service' && s.attributes['nanokit.service'] === name)
    const { started, upper } = info.get(name)
    let ready = unixNanos(started) + readyAfterMs * 1e6
    try {
      ready = Number(statSync(join(upper, 'tmp', 'ready'), { bigint: true }).mtimeNs)
    } catch {}
    return { name, layer: names.find((n) => n.name === name).layer, lag: (span.end_unix_nano - ready) / 1e6 }
  })
}

/** What release lag added to an `up`: per layer, its last release after its last readiness. */
function lost(lags) {
  let ms = 0
  for (let l = 0; l < LAYERS; l++) {
    const mine = lags.filter((x) => x.layer === l)
    ms += Math.max(0, Math.max(...mine.map((x) => x.lag)))
  }
  return ms
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

/** Runs project `p` RUNS times with both tools and prints its figures. */
function bench(p) {
  const { nkDir, dcDir } = writeProject(p)
  const dcName = `${p.nk}dc`
  const nk = (...args) => run(process.execPath, [BIN, ...args, '-f', join(nkDir, 'nanokit.yml')], { cwd: nkDir })
  const dc = (...args) => run('docker-compose', ['-p', dcName, ...args], { cwd: dcDir })
  const nkContainers = () => containers(`nk-project=${p.nk}`).length

  /** Containers of the compose project that are not yet healthy. */
  function composeUnhealthy() {
    const ids = containers(`com.docker.compose.project=${dcName}`)
    if (ids.length < names.length) return names.length
    const states = run('docker', ['inspect', '-f', '{{.State.Health.Status}}', ...ids]).stdout.split(/\s+/).filter(Boolean)
    return states.filter((s) => s !== 'healthy').length
  }
  function composeUpHealthy() {
    dc('up', '-d', '--quiet-pull')
    while (composeUnhealthy() > 0) spawnSync('sleep', ['0.05'])
  }

  /** The newest trace file of nanokit's runs in the project. */
  function lastTrace() {
    const dir = join(nkDir, '.nanokit', 'traces')
    const files = readdirSync(dir).filter((f) => f.endsWith('.json')).sort()
    return JSON.parse(readFileSync(join(dir, files[files.length - 1]), 'utf8'))
  }

  function floorDown() {
    const ids = containers(`nk-project=${p.nk}`, false)
    if (ids.length !== names.length) throw new Error(`floor: expected ${names.length} running containers, found ${ids.length}`)
    const ms = timed(() => run(process.execPath, ['-e', FLOOR, 'nanokit-net-local', ...ids]))
    nk('down') // forgets what the floor removed behind nanokit's back
    return ms
  }

  // Leftovers of an interrupted earlier run.
  nk('down', '--yes', '--volumes')
  dc('down', '--remove-orphans', '-t', '10')

  const t = { nk: { up: [], noop: [], down: [] }, dc: { up: [], noop: [], down: [] }, floor: [] }
  const traces = []
  const lags = []
  for (let r = 0; r < RUNS; r++) {
    // Alternate which tool goes first, so neither always gets the warmer daemon.
    const order = r % 2 === 0 ? ['nk', 'dc'] : ['dc', 'nk']
    for (const tool of order) {
      if (tool === 'nk') {
        t.nk.up.push(timed(() => nk('up')))
        const trace = lastTrace()
        traces.push(layers(trace))
        lags.push(releaseLags(trace, p.nk, p.readyAfterMs))
        if (nkContainers() !== names.length) throw new Error(`nanokit: expected ${names.length} containers, found ${nkContainers()}`)
        t.nk.noop.push(timed(() => nk('up')))
        t.nk.down.push(timed(() => nk('down')))
        if (nkContainers() !== 0) throw new Error('nanokit down left containers behind')
        if (p.floor && floorPossible) {
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

  const row = (what, key) => {
    const a = median(t.nk[key])
    const b = median(t.dc[key])
    const ratio = a / b
    const target = p.targets[key]
    const verdict = target === undefined ? '' : `  (target ≤ ${target}×: ${ratio <= target ? 'met' : 'NOT MET'})`
    console.log(`${what.padEnd(30)} nanokit ${a.toFixed(0).padStart(6)} ms   compose ${b.toFixed(0).padStart(6)} ms   ${ratio.toFixed(2)}×${verdict}`)
  }
  console.log(`\n${p.key}: 12 services (${p.title}), 3 layers of 4, service_healthy dependencies, 1 s health interval`)
  row('up (until all healthy)', 'up')
  row('no-change up', 'noop')
  row('down', 'down')
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
  if (p.readyAfterMs) {
    const all = lags.flat().map((l) => l.lag)
    const worst = Math.max(...all)
    console.log(
      `released after readiness (all ${all.length} services of ${RUNS} run(s)): median ${median(all).toFixed(0)} ms, ` +
        `max ${worst.toFixed(0)} ms  (target ≤ 100 ms: ${worst <= 100 ? 'met' : 'NOT MET'})`,
    )
    console.log(`  median run, per service: ${lags[mid].map((l) => `${l.name} ${l.lag.toFixed(0)}`).join(', ')}`)
    const floor = t.nk.up[mid] - lost(lags[mid])
    console.log(
      `  median run without that lag (each layer released at its readiness): ${floor.toFixed(0)} ms, ` +
        `${(floor / median(t.dc.up)).toFixed(2)}× compose: the floor of this run's container starts`,
    )
  }
}

const composeVersion = run('docker-compose', ['version', '--short']).stdout.trim()
const engine = run('docker', ['version', '-f', '{{.Server.Version}} (API {{.Server.APIVersion}})']).stdout.trim()
console.log(`docker engine ${engine}, docker-compose ${composeVersion}; median of ${RUNS} run(s)`)
for (const p of PROJECTS) bench(p)
