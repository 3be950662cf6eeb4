#!/usr/bin/env node
// `nanokit watch` against the tools users keep things alive with, measured
// in one run and printed as figures and ratios (never asserted):
//
//   process   a local process SIGKILLed → its replacement process exists.
//             nanokit (`nanokit watch`, local-process provider) against pm2
//             (`pm2 start` of the same script). The new process is seen by
//             the kernel's process events (the proc connector, through
//             bench/lib/proc-events.py; root), with the kernel's timestamp
//             of its fork, the same way for both; without them (or with
//             BENCH_SEE=poll) by polling the supervisor's children in /proc
//             every 0.25 ms. Each trial kills another service/app, so
//             every one is a first restart (pm2 restarts at once; nanokit's
//             first restart after a healthy run is immediate too).
//             Target: ≤ 0.5× pm2. Also printed: the floor under both,
//             SIGKILL → the process dead as its parent is told (a zombie
//             with no thread left, after the kernel freed its memory: what
//             wakes a waitpid, a pidfd or SIGCHLD), for the same idle node
//             process, and each supervisor's time above it.
//   container a container's main process SIGKILLed (from the host) → a
//             container of that service runs again (its `start` event on
//             Docker's event stream, for both). nanokit (restart policy
//             `no` on its containers) against Docker's own
//             `--restart=always` on the same image, command and init.
//             Target: ≤ 1.0× Docker (moonshot 0.7×).
//   rm -f     `docker rm -f` of a container → nanokit reports the
//             replacement healthy; against the create + start + first
//             passing probe of that very replacement (the `create` and
//             `health` spans of the pass's own trace). Target: overhead
//             ≤ 300 ms.
//   idle      CPU of the supervisor over 60 s with 20 idle services: the
//             `nanokit watch` process against the pm2 daemon, both at once.
//             Target: ≤ 0.5 % of a core and ≤ pm2's.
//
// pm2 comes from npm (pm2@7.0.4, installed once into bench/.work/pm2; its
// daemon runs with its own PM2_HOME and is killed at the end). nanokit runs
// as users run it: `node bin/nanokit.js watch` (the napi addon; build it
// first: npm run build). Docker parts need a Docker engine and the local
// nk-busybox image (eval "$(bash scripts/docker-test-env.sh)"); without
// them they are skipped with a note.
//
// Usage: node bench/watch.mjs [process|container|idle]…   (all by default;
//        BENCH_TRIALS=n per latency figure, default 9; BENCH_IDLE_S=seconds, default 60;
//        BENCH_NANOKIT=target/release/nanokit to run the standalone executable)
import { spawn, spawnSync } from 'node:child_process'
import { existsSync, mkdirSync, readFileSync, readdirSync, rmSync, writeFileSync } from 'node:fs'
import { dirname, join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { createInterface } from 'node:readline'

const root = join(dirname(fileURLToPath(import.meta.url)), '..')
const work = join(root, 'bench', '.work', 'watch')
const BIN = join(root, 'bin', 'nanokit.js')
// BENCH_NANOKIT=<path>: run the watcher as that standalone executable
// (e.g. target/release/nanokit) instead of `node bin/nanokit.js`.
const STANDALONE = process.env.BENCH_NANOKIT || null
const TRIALS = Number(process.env.BENCH_TRIALS || 9)
const IDLE_S = Number(process.env.BENCH_IDLE_S || 60)
const IMAGE = 'nk-busybox:latest'
const PM2_VERSION = '7.0.4'
const TICK = Number(spawnSync('getconf', ['CLK_TCK'], { encoding: 'utf8' }).stdout.trim() || 100)

function run(cmd, args, opts = {}) {
  const r = spawnSync(cmd, args, { encoding: 'utf8', maxBuffer: 1 << 26, ...opts })
  if (r.error) throw r.error
  if (r.status !== 0 && !opts.allowFail) {
    throw new Error(`${cmd} ${args.join(' ')} exited ${r.status}:\n${(r.stderr || '').slice(-3000)}`)
  }
  return r
}

const now = () => Number(process.hrtime.bigint()) / 1e6
const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]
const fmt = (xs) => `median ${median(xs).toFixed(1)} ms (min ${Math.min(...xs).toFixed(1)}, max ${Math.max(...xs).toFixed(1)}, n=${xs.length})`
const sleep = (ms) => new Promise((r) => setTimeout(r, ms))

/** Every child pid of `pid` (all its threads'). */
function children(pid) {
  const out = new Set()
  let tasks = []
  try {
    tasks = readdirSync(`/proc/${pid}/task`)
  } catch {
    return out
  }
  for (const t of tasks) {
    try {
      for (const c of readFileSync(`/proc/${pid}/task/${t}/children`, 'latin1').split(' ')) if (c) out.add(Number(c))
    } catch {}
  }
  return out
}

const NAP = new Int32Array(new SharedArrayBuffer(4))

/**
 * The kernel's process events (bench/lib/proc-events.py, the netlink proc
 * connector; needs root), or null where they cannot be had: then the
 * supervisor's children are polled instead.
 */
async function procEvents() {
  if (process.env.BENCH_SEE === 'poll') return null
  const child = spawn('python3', [join(root, 'bench', 'lib', 'proc-events.py')], { stdio: ['pipe', 'pipe', 'pipe'] })
  let stderr = ''
  child.stderr.on('data', (d) => (stderr += d))
  const lines = []
  let wake = () => {}
  let exited = false
  createInterface({ input: child.stdout }).on('line', (line) => {
    lines.push(line)
    wake()
  })
  child.once('exit', () => {
    exited = true
    wake()
  })
  const next = async () => {
    while (lines.length === 0) {
      if (exited) return null
      await new Promise((r) => (wake = r))
    }
    return lines.shift()
  }
  if ((await next()) !== 'ready') {
    console.log(`  (no kernel process events: ${stderr.trim() || 'proc-events.py failed'}; polling /proc instead)`)
    return null
  }
  return {
    /** Reports forks by and exits of `pids` only, from now on. */
    async watch(pids) {
      child.stdin.write(`watch ${pids.join(' ')}\n`)
      for (let l; (l = await next()) !== 'ok'; ) if (l === null) throw new Error(`proc-events.py died: ${stderr}`)
    },
    async event() {
      const l = await next()
      if (l === null) throw new Error(`proc-events.py died: ${stderr}`)
      return JSON.parse(l)
    },
    close() {
      child.stdin.end()
      child.kill()
    },
  }
}

/**
 * Kills `victim` and waits until `supervisor` has a new child. Returns ms
 * from the SIGKILL: `total` until the new process exists and, where the
 * kernel's events are had, `exec` until it has exec'd its program and
 * `dead` until the victim's last thread exited (the floor: before it no
 * supervisor can know). With `events` they are the kernel's own
 * timestamps (CLOCK_MONOTONIC, as process.hrtime); without, the children
 * are polled and `exec` and `dead` are null.
 */
async function killUntilNewChild(supervisor, victim, events) {
  if (events) {
    await events.watch([supervisor, victim])
    const t0 = now()
    process.kill(victim, 'SIGKILL')
    let dead = null
    let total = null
    for (;;) {
      const e = await Promise.race([events.event(), sleep(30_000).then(() => Promise.reject(new Error(`no new process of ${supervisor} within 30 s`)))])
      if (e.what === 'exit' && e.pid === victim) dead = Math.max(dead ?? 0, e.ts / 1e6 - t0)
      if (e.what === 'fork' && e.parent === supervisor && e.pid !== victim && total === null) total = e.ts / 1e6 - t0
      if (e.what === 'exec' && total !== null) return { total, exec: e.ts / 1e6 - t0, dead }
    }
  }
  const before = children(supervisor)
  const t0 = now()
  process.kill(victim, 'SIGKILL')
  for (;;) {
    for (const c of children(supervisor)) if (!before.has(c) && c !== victim) return { total: now() - t0, exec: null, dead: null }
    if (now() - t0 > 30_000) throw new Error(`no new child of ${supervisor} within 30 s`)
    // A quarter millisecond between looks, sleeping (not spinning: on a
    // loaded machine a spinning poller would take the CPU the supervisors
    // need). A timer would add its own latency.
    Atomics.wait(NAP, 0, 0, 0.25)
  }
}

/**
 * Whether `pid` has died as its parent is told: gone, or a zombie whose
 * other threads have all exited too (the kernel tells the parent, and
 * wakes a pidfd, only once the whole thread group is dead; node has
 * several threads, and the leader turns zombie first).
 */
function dead(pid) {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'latin1')
    return stat[stat.lastIndexOf(')') + 2] === 'Z' && readdirSync(`/proc/${pid}/task`).length <= 1
  } catch {
    return true
  }
}

/**
 * The floor under both supervisors: from SIGKILL until the kernel reports
 * the process dead (it is a zombie: what wakes a waitpid, a pidfd or
 * SIGCHLD, after the kernel freed its memory), for the same idle node
 * process, polled the same way; ms.
 */
async function killUntilDead(dir) {
  const child = spawn(process.execPath, [join(dir, 'idle.js')], { stdio: 'ignore' })
  await sleep(500)
  const t0 = now()
  process.kill(child.pid, 'SIGKILL')
  for (;;) {
    if (dead(child.pid)) {
      const ms = now() - t0
      await new Promise((r) => (child.exitCode !== null || child.signalCode !== null ? r() : child.once('exit', r)))
      return ms
    }
    if (now() - t0 > 30_000) throw new Error(`${child.pid} not dead within 30 s`)
    Atomics.wait(NAP, 0, 0, 0.25)
  }
}

/** CPU seconds (user + system) that process `pid` has used. */
function cpuSeconds(pid) {
  const stat = readFileSync(`/proc/${pid}/stat`, 'latin1')
  const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ')
  return (Number(f[11]) + Number(f[12])) / TICK
}

/** A `nanokit watch` process with its JSON events. */
function startWatch(dir, args = []) {
  const argv = ['watch', '-f', join(dir, 'nanokit.yml'), '--output', 'json', ...args]
  const child = STANDALONE ? spawn(STANDALONE, argv, { stdio: ['ignore', 'pipe', 'pipe'] }) : spawn(process.execPath, [BIN, ...argv], { stdio: ['ignore', 'pipe', 'pipe'] })
  const waiting = []
  const seen = []
  createInterface({ input: child.stdout }).on('line', (line) => {
    let e
    try {
      e = JSON.parse(line)
    } catch {
      return
    }
    e.receivedAt = now()
    seen.push(e)
    for (const w of [...waiting]) if (w.pred(e)) waiting.splice(waiting.indexOf(w), 1) && w.resolve(e)
  })
  let stderr = ''
  child.stderr.on('data', (d) => (stderr = (stderr + d).slice(-4000)))
  return {
    child,
    seen,
    next(pred, what) {
      return new Promise((resolve, reject) => {
        const t = setTimeout(() => reject(new Error(`watch: no ${what}\n${stderr}`)), 120_000)
        waiting.push({ pred, resolve: (e) => (clearTimeout(t), resolve(e)) })
      })
    },
    async stop() {
      child.kill('SIGTERM')
      await new Promise((r) => child.once('exit', r))
    },
  }
}

function statePid(dir, service) {
  const s = JSON.parse(readFileSync(join(dir, '.nanokit', 'state.json'), 'utf8'))
  return s.resources[service].provider_id
}

// ---- pm2 ------------------------------------------------------------------

const pm2Dir = join(root, 'bench', '.work', 'pm2')
const PM2 = join(pm2Dir, 'node_modules', '.bin', 'pm2')
const PM2_HOME = join(work, 'pm2-home')

function pm2(args, opts = {}) {
  return run(PM2, args, { env: { ...process.env, PM2_HOME }, ...opts })
}

function ensurePm2() {
  if (existsSync(PM2)) return
  mkdirSync(pm2Dir, { recursive: true })
  run('npm', ['install', '--no-audit', '--no-fund', '--prefix', pm2Dir, `pm2@${PM2_VERSION}`], { stdio: 'inherit' })
}

function pm2Pids() {
  const list = JSON.parse(pm2(['jlist']).stdout)
  return Object.fromEntries(list.map((p) => [p.name, p.pid]))
}

// ---- the measurements ------------------------------------------------------

const IDLE_JS = 'setInterval(() => {}, 1 << 30)\n'

function processProject(name, n) {
  const dir = join(work, name)
  rmSync(dir, { recursive: true, force: true })
  mkdirSync(dir, { recursive: true })
  writeFileSync(join(dir, 'idle.js'), IDLE_JS)
  let yml = `name: ${name}\nservices:\n`
  for (let i = 0; i < n; i++) yml += `  s${i}:\n    start: "exec node idle.js"\n`
  writeFileSync(join(dir, 'nanokit.yml'), yml)
  return dir
}

async function processRestart() {
  const dir = processProject('bwproc', TRIALS)
  const events = await procEvents()
  try {
    const w = startWatch(dir)
    await w.next((e) => e.type === 'passFinished', 'initial pass')
    const nk = []
    for (let i = 0; i < TRIALS; i++) {
      const victim = Number(statePid(dir, `s${i}`).split('@')[0])
      const done = w.next((e) => e.type === 'passFinished', 'restart pass')
      nk.push(await killUntilNewChild(w.child.pid, victim, events))
      await done
    }
    await w.stop()
    run(process.execPath, [BIN, 'down', '-f', join(dir, 'nanokit.yml')])

    ensurePm2()
    const apps = Array.from({ length: TRIALS }, (_, i) => ({ name: `b${i}`, script: join(dir, 'idle.js') }))
    writeFileSync(join(dir, 'ecosystem.config.js'), `module.exports = { apps: ${JSON.stringify(apps)} }\n`)
    pm2(['start', join(dir, 'ecosystem.config.js')])
    const daemon = Number(readFileSync(join(PM2_HOME, 'pm2.pid'), 'utf8'))
    const pids = pm2Pids()
    const pm = []
    for (let i = 0; i < TRIALS; i++) {
      pm.push(await killUntilNewChild(daemon, pids[`b${i}`], events))
      await sleep(300) // let pm2 record it before the next trial
    }
    pm2(['delete', 'all'])
    // The floor: with the kernel's events, each trial's own victim's death;
    // else separate kills of the same idle process, polled.
    const floor = events ? [...nk, ...pm].map((t) => t.dead) : []
    if (!events) for (let i = 0; i < TRIALS; i++) floor.push(await killUntilDead(dir))
    return { nk, pm, floor, seenBy: events ? "the kernel's process events (proc connector)" : 'polling /proc every 0.25 ms' }
  } finally {
    events?.close()
  }
}

async function idleCpu() {
  const n = 20
  const dir = processProject('bwidle', n)
  const w = startWatch(dir)
  await w.next((e) => e.type === 'passFinished', 'initial pass')
  ensurePm2()
  const apps = Array.from({ length: n }, (_, i) => ({ name: `i${i}`, script: join(dir, 'idle.js') }))
  writeFileSync(join(dir, 'ecosystem.config.js'), `module.exports = { apps: ${JSON.stringify(apps)} }\n`)
  pm2(['start', join(dir, 'ecosystem.config.js')])
  const daemon = Number(readFileSync(join(PM2_HOME, 'pm2.pid'), 'utf8'))
  await sleep(2000) // both settled
  const a = [cpuSeconds(w.child.pid), cpuSeconds(daemon), now()]
  await sleep(IDLE_S * 1000)
  const b = [cpuSeconds(w.child.pid), cpuSeconds(daemon), now()]
  const secs = (b[2] - a[2]) / 1000
  await w.stop()
  run(process.execPath, [BIN, 'down', '-f', join(dir, 'nanokit.yml')])
  pm2(['delete', 'all'])
  return { nk: (100 * (b[0] - a[0])) / secs, pm: (100 * (b[1] - a[1])) / secs, secs }
}

/** `docker events` start events, each with when it arrived here. */
function dockerStarts() {
  const child = spawn('docker', ['events', '--format', '{{json .}}', '--filter', 'type=container', '--filter', 'event=start'], {
    stdio: ['ignore', 'pipe', 'ignore'],
  })
  const waiting = []
  createInterface({ input: child.stdout }).on('line', (line) => {
    const t = now()
    let e
    try {
      e = JSON.parse(line)
    } catch {
      return
    }
    for (const w of [...waiting]) if (w.pred(e)) waiting.splice(waiting.indexOf(w), 1) && w.resolve(t)
  })
  return {
    next: (pred) =>
      new Promise((resolve, reject) => {
        const t = setTimeout(() => reject(new Error('no start event within 60 s')), 60_000)
        waiting.push({ pred, resolve: (v) => (clearTimeout(t), resolve(v)) })
      }),
    close: () => child.kill(),
  }
}

function containerPid(id) {
  return Number(run('docker', ['inspect', '-f', '{{.State.Pid}}', id]).stdout.trim())
}

async function containerRestart() {
  const name = `bwdock${process.pid}`
  const dir = join(work, 'docker')
  rmSync(dir, { recursive: true, force: true })
  mkdirSync(dir, { recursive: true })
  let yml = `name: ${name}\ninfra: { provider: docker }\nservices:\n`
  for (let i = 0; i < TRIALS; i++) yml += `  c${i}:\n    image: ${IMAGE}\n    start: "exec sleep 600"\n`
  yml += `  h:\n    image: ${IMAGE}\n    start: "exec sleep 600"\n    healthcheck: { test: "true", interval: 1h }\n`
  writeFileSync(join(dir, 'nanokit.yml'), yml)
  const starts = dockerStarts()
  const w = startWatch(dir)
  await w.next((e) => e.type === 'passFinished', 'initial pass')
  const nk = []
  for (let i = 0; i < TRIALS; i++) {
    const id = statePid(dir, `c${i}`)
    const after = BigInt(Date.now()) * 1_000_000n
    const started = starts.next(
      (e) => e.Actor?.Attributes?.['nk-service'] === `c${i}` && e.Actor?.Attributes?.['nk-project'] === name && BigInt(e.timeNano) > after,
    )
    const done = w.next((e) => e.type === 'passFinished', 'restart pass')
    const pid = containerPid(id)
    const t0 = now()
    process.kill(pid, 'SIGKILL')
    nk.push((await started) - t0)
    await done
  }
  // rm -f → healthy replacement, against its own create + start + first probe.
  const rm = []
  for (let i = 0; i < Math.min(TRIALS, 5); i++) {
    const id = statePid(dir, 'h')
    const healthy = w.next((e) => e.type === 'progress' && e.service === 'h' && e.phase === 'healthy', 'h healthy')
    const done = w.next((e) => e.type === 'passFinished', 'rm pass')
    const t0 = now()
    run('docker', ['rm', '-f', id])
    const total = (await healthy).receivedAt - t0
    const finished = await done
    const trace = JSON.parse(readFileSync(finished.traceFile, 'utf8'))
    const span = (name) => trace.spans.filter((s) => s.name === name && s.attributes['nanokit.service'] === 'h')
    const ms = (s) => (s.end_unix_nano - s.start_unix_nano) / 1e6
    const work = span('create').reduce((a, s) => a + ms(s), 0) + span('health').reduce((a, s) => a + ms(s), 0)
    rm.push({ total, work, overhead: total - work })
    // Its restarts back off: let it stay healthy past the reset.
    await w.next((e) => e.type === 'backoffReset' && e.service === 'h', 'backoff reset')
  }
  await w.stop()
  run(process.execPath, [BIN, 'down', '-f', join(dir, 'nanokit.yml')])

  // Docker's own restarts, of containers set up as nanokit's are: the same
  // image, command and init, on a user-defined bridge network with an alias.
  const dk = []
  const ids = []
  const net = `bwbench-${process.pid}`
  run('docker', ['network', 'create', net])
  try {
    for (let i = 0; i < TRIALS; i++) {
      ids.push(
        run('docker', ['run', '-d', '--init', '--restart=always', '--network', net, '--network-alias', `d${i}`, '--label', `bwbench=${name}`, IMAGE, 'sh', '-c', 'exec sleep 600']).stdout.trim(),
      )
    }
    for (const id of ids) {
      const after = BigInt(Date.now()) * 1_000_000n
      const started = starts.next((e) => e.id === id && BigInt(e.timeNano) > after)
      const pid = containerPid(id)
      const t0 = now()
      process.kill(pid, 'SIGKILL')
      dk.push((await started) - t0)
    }
  } finally {
    if (ids.length) run('docker', ['rm', '-f', ...ids], { allowFail: true })
    run('docker', ['network', 'rm', net], { allowFail: true })
    starts.close()
  }
  return { nk, dk, rm }
}

// ---- main ------------------------------------------------------------------

rmSync(work, { recursive: true, force: true })
mkdirSync(work, { recursive: true })
if (!existsSync(join(root, 'index.js'))) throw new Error('build the addon first: npm run build')
const only = process.argv.slice(2)
const part = (name) => only.length === 0 || only.includes(name)
try {
  if (part('process')) {
  const p = await processRestart()
  const total = (xs) => xs.map((t) => t.total)
  console.log(`local process SIGKILLed → new process exists (seen by ${p.seenBy})`)
  console.log(`  nanokit watch${STANDALONE ? ' (standalone)' : ''}  ${fmt(total(p.nk))}`)
  console.log(`  pm2 ${PM2_VERSION}      ${fmt(total(p.pm))}`)
  console.log(`  ratio nanokit/pm2 (medians): ${(median(total(p.nk)) / median(total(p.pm))).toFixed(2)}×   target ≤ 0.5×`)
  if (p.nk[0].exec !== null) {
    const ex = (xs) => xs.map((t) => t.exec)
    console.log(`  … and has exec'd its program: nanokit ${fmt(ex(p.nk))}; pm2 ${fmt(ex(p.pm))}; ratio ${(median(ex(p.nk)) / median(ex(p.pm))).toFixed(2)}×`)
  }
  console.log(`  floor: SIGKILL → dead (the kernel's exit, before any supervisor can know)  ${fmt(p.floor)}`)
  // Above the floor: per trial where each trial has its own victim's death,
  // else the difference of the medians.
  const over = (xs) => (xs[0].dead === null ? [median(total(xs)) - median(p.floor)] : xs.map((t) => t.total - t.dead))
  const nkOver = median(over(p.nk))
  const pmOver = median(over(p.pm))
  console.log(`  above the floor (medians): nanokit ${nkOver.toFixed(2)} ms, pm2 ${pmOver.toFixed(2)} ms, ratio ${(nkOver / Math.max(pmOver, 1e-9)).toFixed(2)}×`)
  }

  const dockerOk = spawnSync('docker', ['image', 'inspect', IMAGE], { encoding: 'utf8' }).status === 0
  if (!part('container')) {
    // not asked for
  } else if (!dockerOk) {
    console.log(`container figures SKIPPED: no Docker engine or no ${IMAGE} image (bash scripts/docker-test-env.sh)`)
  } else {
    const c = await containerRestart()
    console.log('container main process SIGKILLed → running again (its start event)')
    console.log(`  nanokit watch (policy no)  ${fmt(c.nk)}`)
    console.log(`  docker --restart=always    ${fmt(c.dk)}`)
    console.log(`  ratio nanokit/docker (medians): ${(median(c.nk) / median(c.dk)).toFixed(2)}×   target ≤ 1.0× (moonshot 0.7×)`)
    console.log('docker rm -f → healthy replacement')
    console.log(`  total                      ${fmt(c.rm.map((r) => r.total))}`)
    console.log(`  create + start + 1st probe ${fmt(c.rm.map((r) => r.work))}`)
    console.log(`  overhead                   ${fmt(c.rm.map((r) => r.overhead))}   target ≤ 300 ms`)
  }

  if (part('idle')) {
    const idle = await idleCpu()
    console.log(`idle CPU over ${idle.secs.toFixed(0)} s, 20 services (supervisor process only)`)
    console.log(`  nanokit watch  ${idle.nk.toFixed(3)} % of a core   target ≤ 0.5 % and ≤ pm2`)
    console.log(`  pm2 daemon     ${idle.pm.toFixed(3)} % of a core`)
    console.log(`  ratio nanokit/pm2: ${(idle.nk / Math.max(idle.pm, 1e-9)).toFixed(2)}×`)
  }
} finally {
  if (existsSync(PM2)) pm2(['kill'], { allowFail: true })
}
