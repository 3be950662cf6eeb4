// The reconciliation engine from JS and from the CLI, with real processes:
// JS API (loadConfig/plan/up/status/drift/down, coded errors, events), the
// README's main command on the example, a second concurrent `up` refused,
// `infra unlock`, and the crash-safety test (`nanokit up` SIGKILLed at random
// moments: state.json always parses, the next `up` converges, no orphans).
import { test } from 'node:test'
import assert from 'node:assert/strict'
import { cpSync, mkdtempSync, readFileSync, readdirSync, existsSync, writeFileSync, rmSync } from 'node:fs'
import { createServer } from 'node:net'
import { tmpdir } from 'node:os'
import { join, dirname } from 'node:path'
import { fileURLToPath } from 'node:url'
import { createRequire } from 'node:module'

import { CLIS, runSync, start } from './helpers/clis.mjs'

const require = createRequire(import.meta.url)
const root = join(dirname(fileURLToPath(import.meta.url)), '..')
const nk = require(join(root, 'nanokit.js'))

function tmp(prefix) {
  return mkdtempSync(join(tmpdir(), prefix))
}

/** Runs CLI `c` (npm or standalone, helpers/clis.mjs) to completion. */
const cli = runSync

async function freePort() {
  return new Promise((resolve) => {
    const s = createServer().listen(0, '127.0.0.1', () => {
      const { port } = s.address()
      s.close(() => resolve(port))
    })
  })
}

/** Group leaders labelled with project `name` (NK_PROJECT), by service. */
function labelled(name) {
  const out = []
  for (const d of readdirSync('/proc')) {
    if (!/^\d+$/.test(d)) continue
    let env, stat
    try {
      env = readFileSync(`/proc/${d}/environ`, 'latin1').split('\0')
      stat = readFileSync(`/proc/${d}/stat`, 'latin1')
    } catch {
      continue
    }
    if (!env.includes(`NK_PROJECT=${name}`) || !env.some((e) => e.startsWith('NK_STATE_ID='))) continue
    const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ')
    if (f[0] === 'Z' || Number(f[2]) !== Number(d)) continue
    const svc = env.find((e) => e.startsWith('NK_SERVICE='))?.slice(11)
    out.push({ pid: Number(d), service: svc, start: f[19] })
  }
  return out
}

async function exampleCopy() {
  const dir = tmp('nk-example-')
  cpSync(join(root, 'examples', 'basic'), dir, { recursive: true, filter: (p) => !p.includes('.nanokit') })
  return { dir, file: join(dir, 'nanokit.yml'), vars: { ...process.env, API_PORT: String(await freePort()), DB_PORT: String(await freePort()) } }
}

test('JS API: loadConfig, plan, up with events, status, drift, down', async () => {
  const ex = await exampleCopy()
  const opts = { file: ex.file, vars: ex.vars }
  const cfg = await nk.loadConfig(opts)
  assert.equal(cfg.name, 'basic')
  assert.deepEqual(cfg.order, ['db', 'api', 'worker'])
  assert.deepEqual(cfg.layers, [['db'], ['api'], ['worker']])
  assert.equal(cfg.services.find((s) => s.name === 'api').port, Number(ex.vars.API_PORT))
  assert.ok(cfg.services.find((s) => s.name === 'api').envKeys.includes('DB_URL'))

  const p = await nk.plan(opts)
  assert.equal(p.hasChanges, true)
  assert.deepEqual(p.actions.map((a) => [a.service, a.action]), [['db', 'create'], ['api', 'create'], ['worker', 'create']])
  assert.ok(existsSync(join(ex.dir, '.nanokit/plans/latest.json')))

  const events = []
  const r = await nk.up({ ...opts, onEvent: (e) => events.push(e) })
  try {
    assert.deepEqual(r.services.map((s) => [s.service, s.outcome]), [['db', 'healthy'], ['api', 'healthy'], ['worker', 'healthy']])
    // Events arrive on the JS thread; give the queue a tick.
    await new Promise((res) => setTimeout(res, 50))
    const healthy = events.filter((e) => e.phase === 'healthy').map((e) => e.service)
    assert.deepEqual(healthy, ['db', 'api', 'worker'])
    assert.ok(events.some((e) => e.phase === 'hook' && e.message.includes('migrate.js')))
    const res = await fetch(`http://127.0.0.1:${ex.vars.API_PORT}/count`)
    assert.equal((await res.json()).count >= 1, true)

    const st = await nk.status(opts)
    assert.deepEqual(st.map((s) => [s.service, s.status, s.alive]), [['api', 'healthy', true], ['db', 'healthy', true], ['worker', 'healthy', true]])
    assert.equal((await nk.drift(opts)).drifted, false)
    assert.equal((await nk.plan(opts)).hasChanges, false)
    // kill -9 the worker: drift says so.
    const w = st.find((s) => s.service === 'worker')
    process.kill(-w.pid, 'SIGKILL')
    await new Promise((res) => setTimeout(res, 100))
    const d = await nk.drift(opts)
    assert.deepEqual(d.items.map((i) => [i.service, i.kind]), [['worker', 'gone']])
    await nk.up(opts)
    assert.equal((await nk.drift(opts)).drifted, false)
  } finally {
    const down = await nk.down(opts)
    assert.deepEqual(down.services.map((s) => s.outcome), ['deleted', 'deleted', 'deleted'])
  }
  assert.deepEqual(await nk.status(opts), [])
  assert.deepEqual(labelled('basic').filter((p) => existsSync(`/proc/${p.pid}/cwd`) && readFileSync(`/proc/${p.pid}/environ`, 'latin1').includes(ex.dir)), [])
})

test('JS API: coded errors', async () => {
  const dir = tmp('nk-bad-')
  const file = join(dir, 'nanokit.yml')
  writeFileSync(file, 'name: x\nservices:\n  a: { start: r, depends_on: [b] }\n  b: { start: r, depends_on: [a] }\n')
  await assert.rejects(nk.loadConfig({ file }), (e) => e.code === 'ENKCYCLE' && /a → b → a/.test(e.message))
  writeFileSync(file, 'name: x\nservices:\n  a:\n    start: r\n    port: [1]\n')
  await assert.rejects(nk.loadConfig({ file }), (e) => e.code === 'ENKCONFIG' && e.message.includes('nanokit.yml:5:11'))
  writeFileSync(file, 'name: x\nservices:\n  a: { start: r, depends_on: [zz] }\n')
  await assert.rejects(nk.plan({ file }), (e) => e.code === 'ENKDEP' && /`a` depends on `zz`/.test(e.message))
  writeFileSync(file, 'name: x\nservices:\n  a: { start: "exit 1" }\n')
  await assert.rejects(nk.up({ file }), (e) => e.code === 'ENKFAILED' && /a failed/.test(e.message))
  await nk.down({ file })
  await assert.rejects(nk.loadConfig({ file: join(dir, 'missing.yml') }), (e) => e.code === 'ENKCONFIG')
})

for (const c of CLIS)
test(`${c.name} CLI: README main command, status, second up refused with holder, infra unlock, down`, async () => {
  const ex = await exampleCopy()
  const env = ex.vars
  let r = cli(c, ['up', '-f', ex.file], { env })
  assert.equal(r.status, 0, r.stderr)
  assert.match(r.stderr, /worker\s+healthy/)
  try {
    r = cli(c, ['status', '-f', ex.file, '--output', 'json'], { env })
    assert.equal(r.status, 0, r.stderr)
    assert.deepEqual(JSON.parse(r.stdout).map((s) => s.status), ['healthy', 'healthy', 'healthy'])

    // Someone else holds the deploy lock: a second up fails fast naming it.
    const lockPath = join(ex.dir, '.nanokit', 'state.json.lock')
    const held = await nk.acquireLock(lockPath, { holder: 'deploy from laptop-7' })
    r = cli(c, ['up', '-f', ex.file], { env })
    assert.equal(r.status, 1)
    assert.match(r.stderr, /error\[ENKLOCKED\].*deploy from laptop-7.*pid \d+/s)
    assert.doesNotMatch(r.stderr, /panicked|RUST_BACKTRACE/)
    // unlock without --yes refuses when it cannot ask; with --yes clears it.
    r = cli(c, ['infra', 'unlock', '-f', ex.file], { env, stdio: ['ignore', 'pipe', 'pipe'] })
    assert.equal(r.status, 1)
    assert.match(r.stdout, /held by .*deploy from laptop-7/)
    r = cli(c, ['infra', 'unlock', '-f', ex.file, '--yes'], { env })
    assert.equal(r.status, 0, r.stderr)
    assert.throws(() => held.release(), (e) => e.code === 'ENKLOCKLOST')
    r = cli(c, ['up', '-f', ex.file], { env })
    assert.equal(r.status, 0, r.stderr)
    assert.match(r.stderr, /up: 3 service\(s\), 0 changed/)

    // A concurrent up (two processes at once): exactly one proceeds at a time;
    // the other is refused with the holder's details or finds nothing to do.
    const [a, b] = await Promise.all([run(c, ['up', '-f', ex.file], env), run(c, ['up', '-f', ex.file], env)])
    assert.ok([a, b].every((x) => x.code === 0 || /ENKLOCKED/.test(x.stderr)), a.stderr + b.stderr)

    r = cli(c, ['plan', '-f', ex.file, '--detailed-exitcode'], { env })
    assert.equal(r.status, 0, r.stdout + r.stderr)
    r = cli(c, ['logs', 'api', '-f', ex.file, '-n', '50'], { env })
    assert.equal(r.status, 0)
    assert.match(r.stdout, /api listening on/)
  } finally {
    r = cli(c, ['down', '-f', ex.file], { env })
    assert.equal(r.status, 0, r.stderr)
  }
  r = cli(c, ['status', '-f', ex.file], { env })
  assert.match(r.stdout, /Nothing deployed/)
})

for (const c of CLIS)
test(`${c.name} CLI: validate, graph --format dot, --help`, () => {
  let r = cli(c, ['validate', '-f', join(root, 'examples/basic/nanokit.yml')])
  assert.equal(r.status, 0, r.stderr)
  r = cli(c, ['graph', '-f', join(root, 'examples/basic/nanokit.yml'), '--format', 'dot'])
  assert.equal(r.status, 0)
  assert.match(r.stdout, /"api" -> "db";/)
  r = cli(c, ['up', '--help'])
  assert.equal(r.status, 0)
  assert.match(r.stdout, /as soon as its dependencies are healthy/)
  r = cli(c, ['validate', '-f', join(root, 'tests/fixtures/broken/22-cycle-3.yml')])
  assert.equal(r.status, 1)
  assert.match(r.stderr, /^error\[ENKCYCLE\]: .*22-cycle-3\.yml:\d+:\d+: dependency cycle a → b → c → a/)
})

function run(c, args, env) {
  return new Promise((resolve) => {
    const child = start(c, args, { env, stdio: ['ignore', 'pipe', 'pipe'] })
    let stderr = ''
    child.stderr.on('data', (d) => (stderr += d))
    child.stdout.resume()
    child.on('exit', (code, signal) => resolve({ code, signal, stderr }))
  })
}

for (const c of CLIS)
test(`${c.name} CLI: crash safety: up SIGKILLed at random moments, 24 trials`, { timeout: 600_000 }, async (t) => {
  const dir = tmp('nk-crash-')
  const file = join(dir, 'nanokit.yml')
  const name = `crash${c.name}${process.pid}`
  const port = await freePort()
  writeFileSync(
    file,
    `name: ${name}
services:
  db:
    start: "exec node -e \\"require('net').createServer().listen(${port}, '127.0.0.1')\\""
    port: ${port}
  api:
    start: "sleep 0.1; exec sleep 600"
    depends_on: [db]
    hooks:
      prestart: "sleep 0.2"
      poststart: "sleep 0.2"
  worker:
    start: "exec sleep 600"
    depends_on: [api]
    healthcheck: { test: "sleep 0.05", interval: 20ms }
  cron:
    start: "exec sleep 600"
`,
  )
  const statePath = join(dir, '.nanokit', 'state.json')
  const env = { ...process.env }
  let killedMidway = 0
  const toggle = () => {
    const src = readFileSync(file, 'utf8')
    writeFileSync(file, src.replace(/exec sleep 60\d/g, (m) => (m.endsWith('600') ? 'exec sleep 601' : 'exec sleep 600')))
  }
  try {
    // How long an up that restarts services takes here: kills are spread over it.
    assert.equal(cli(c, ['up', '-f', file], { env }).status, 0)
    toggle()
    const t0 = Date.now()
    assert.equal(cli(c, ['up', '-f', file], { env }).status, 0)
    const span = Date.now() - t0
    for (let trial = 0; trial < 24; trial++) {
      // Every trial changes the config (start command toggles), so each up
      // stops and restarts services: kills land in create, hook, health and
      // stop paths alike.
      toggle()
      const child = start(c, ['up', '-f', file], { env, stdio: 'ignore' })
      const delay = Math.floor(Math.random() * span)
      await new Promise((res) => setTimeout(res, delay))
      const wasRunning = child.exitCode === null
      child.kill('SIGKILL')
      await new Promise((res) => (child.exitCode !== null || child.signalCode !== null ? res() : child.on('exit', res)))
      if (wasRunning) killedMidway++
      if (existsSync(statePath)) {
        const st = JSON.parse(readFileSync(statePath, 'utf8')) // must always parse
        assert.equal(typeof st.serial, 'number')
      }
      // A killed holder on this host does not block the next run.
      const r = cli(c, ['up', '-f', file], { env })
      assert.equal(r.status, 0, `trial ${trial} (killed after ${delay} ms): ${r.stderr}`)
      const st = JSON.parse(readFileSync(statePath, 'utf8'))
      const live = labelled(name)
      assert.deepEqual(live.map((p) => p.service).sort(), ['api', 'cron', 'db', 'worker'], `trial ${trial}: orphans or missing: ${JSON.stringify(live)}`)
      for (const p of live) {
        assert.equal(st.resources[p.service].provider_id, `${p.pid}@${p.start}`, `trial ${trial}: ${p.service} runs untracked`)
        assert.equal(st.resources[p.service].status, 'healthy')
      }
    }
    t.diagnostic(`${killedMidway} of 24 kills landed while up was running`)
    assert.ok(killedMidway >= 8, `only ${killedMidway} kills landed while up was running`)
  } finally {
    const r = cli(c, ['down', '-f', file], { env })
    assert.equal(r.status, 0, r.stderr)
  }
  assert.deepEqual(labelled(name), [])
  rmSync(dir, { recursive: true, force: true })
})

for (const c of CLIS)
test(`${c.name} CLI: Ctrl-C (SIGINT) during up: nothing new starts, state saved, exit 130`, async () => {
  const dir = tmp('nk-sigint-')
  const file = join(dir, 'nanokit.yml')
  writeFileSync(
    file,
    `name: sigint${c.name}${process.pid}
services:
  a:
    start: "exec sleep 600"
    healthcheck: { test: "test -f ready", interval: 50ms, retries: 10000 }
  b:
    start: "exec sleep 600"
    depends_on: [a]
`,
  )
  const child = start(c, ['up', '-f', file], { stdio: ['ignore', 'pipe', 'pipe'] })
  let stderr = ''
  await new Promise((resolve) => {
    child.stderr.on('data', (d) => {
      stderr += d
      if (/a\s+health/.test(stderr)) resolve()
    })
  })
  child.kill('SIGINT')
  const code = await new Promise((res) => child.on('exit', (c) => res(c)))
  child.stdout.resume()
  assert.equal(code, 130, stderr)
  assert.match(stderr, /ENKCANCELLED/)
  const st = JSON.parse(readFileSync(join(dir, '.nanokit', 'state.json'), 'utf8'))
  assert.equal(st.resources.a.status, 'starting')
  assert.equal(st.resources.b, undefined, 'b must not start after Ctrl-C')
  writeFileSync(join(dir, 'ready'), '')
  let r = cli(c, ['up', '-f', file])
  assert.equal(r.status, 0, r.stderr)
  r = cli(c, ['down', '-f', file])
  assert.equal(r.status, 0, r.stderr)
  assert.deepEqual(labelled(`sigint${c.name}${process.pid}`), [])
})
