// The reconciliation loop from JS: `watch()` returns a handle with `stop()`,
// `onEvent` and `done`; a killed service is restarted; `status()` and
// `watchStatus()` show the watcher; `stop()` releases the lease and leaves
// services running; a second `stop()` stops at once; `reload()` reads
// nanokit.yml again. Waits are for events.
import { test } from 'node:test'
import assert from 'node:assert/strict'
import { mkdtempSync, readFileSync, writeFileSync, existsSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join, dirname } from 'node:path'
import { fileURLToPath } from 'node:url'
import { createRequire } from 'node:module'

const require = createRequire(import.meta.url)
const root = join(dirname(fileURLToPath(import.meta.url)), '..')
const nk = require(join(root, 'nanokit.js'))

function project(yml) {
  const dir = mkdtempSync(join(tmpdir(), 'nk-watch-'))
  const file = join(dir, 'nanokit.yml')
  writeFileSync(file, yml)
  return { dir, file }
}

function pidOf(dir, service) {
  const s = JSON.parse(readFileSync(join(dir, '.nanokit', 'state.json'), 'utf8'))
  return Number(s.resources[service].provider_id.split('@')[0])
}

function alive(pid) {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'latin1')
    return stat.slice(stat.lastIndexOf(')') + 2)[0] !== 'Z'
  } catch {
    return false
  }
}

/** Resolves with the first event matching `pred` (the ones seen before included). */
function eventWaiter(handle) {
  const seen = []
  const waiting = []
  handle.onEvent = (e) => {
    seen.push(e)
    for (const w of [...waiting]) {
      if (w.pred(e)) {
        waiting.splice(waiting.indexOf(w), 1)
        w.resolve(e)
      }
    }
  }
  return {
    seen,
    next(pred, what) {
      return new Promise((resolve, reject) => {
        const t = setTimeout(() => reject(new Error(`no ${what} event; seen: ${JSON.stringify(seen.slice(-20))}`)), 90_000)
        waiting.push({
          pred,
          resolve: (e) => {
            clearTimeout(t)
            resolve(e)
          },
        })
      })
    },
  }
}

test('JS watch(): restart, status, graceful stop with the lease freed and services running', async () => {
  const { dir, file } = project('name: jswatch\nservices:\n  a:\n    start: "exec sleep 600"\n  b:\n    start: "exec sleep 600"\n    depends_on: { a: { restart: true } }\n')
  const w = nk.watch({ file })
  const ev = eventWaiter(w)
  await ev.next((e) => e.type === 'passFinished', 'initial passFinished')
  const [a, b] = [pidOf(dir, 'a'), pidOf(dir, 'b')]
  process.kill(a, 'SIGKILL')
  const exited = await ev.next((e) => e.type === 'serviceExited' && e.service === 'a', 'serviceExited')
  assert.equal(exited.exit.signal, 'SIGKILL')
  const released = await ev.next((e) => e.type === 'dependentsReleased', 'dependentsReleased')
  assert.deepEqual(released.dependents, ['b'])
  await ev.next((e) => e.type === 'restarted' && e.service === 'a', 'restarted')
  await ev.next((e) => e.type === 'passFinished', 'passFinished')
  assert.notEqual(pidOf(dir, 'a'), a)
  assert.notEqual(pidOf(dir, 'b'), b)

  const rows = await nk.status({ file })
  const row = rows.find((r) => r.service === 'a')
  assert.equal(row.watch.restarts, 1)
  assert.equal(row.watch.lastExit.signal, 'SIGKILL')
  assert.equal(row.watch.health, 'healthy')
  let ws = await nk.watchStatus({ file })
  assert.equal(ws.running, true)
  assert.equal(ws.role, 'leader')
  assert.equal(ws.leader.pid, process.pid)
  assert.equal(ws.lastPass.reason, 'restart')

  const result = await w.stop()
  assert.equal(result.reason, 'stopped')
  assert.equal(result.leaderships, 1)
  assert.equal(result.passes, 2)
  assert.equal(nk.inspectLock(join(dir, '.nanokit', 'state.json.lock')), null, 'the lease is free')
  assert.ok(alive(pidOf(dir, 'a')) && alive(pidOf(dir, 'b')), 'services keep running')
  ws = await nk.watchStatus({ file })
  assert.equal(ws.role, 'stopped')
  assert.equal(ws.running, false)
  assert.ok(ev.seen.some((e) => e.type === 'stopped'))
  await nk.down({ file })
})

test('JS watch(): reload() reads nanokit.yml again and applies it, every time it is called', async () => {
  const { dir, file } = project('name: jsreload\nservices:\n  a:\n    start: "exec sleep 600"\n')
  const w = nk.watch({ file })
  const ev = eventWaiter(w)
  try {
    await ev.next((e) => e.type === 'passFinished', 'initial passFinished')
    const a = pidOf(dir, 'a')
    w.reload()
    const first = await ev.next((e) => e.type === 'configReloaded', 'configReloaded')
    assert.equal(first.error, null)
    // Twice: every call is taken up, not the first only.
    w.reload()
    await ev.next((e) => e.type === 'configReloaded', 'a second configReloaded')
    assert.ok(alive(a), 'the service keeps running')
  } finally {
    await w.stop()
    await nk.down({ file })
  }
})

test('JS watch(): a second stop() stops at once, mid-step', async () => {
  const { dir, file } = project(
    'name: jswatch2\nservices:\n  a:\n    start: "exec sleep 600"\n    hooks:\n      prestart: "touch in-hook; while [ ! -f go ]; do sleep 0.05; done"\n',
  )
  const w = nk.watch({ file })
  const ev = eventWaiter(w)
  await ev.next((e) => e.type === 'progress' && e.service === 'a' && e.phase === 'starting', 'starting')
  while (!existsSync(join(dir, 'in-hook'))) await new Promise((r) => setTimeout(r, 20))
  w.stop()
  // The step goes on (the hook waits): nothing has settled yet.
  let settled = false
  w.done.then(() => (settled = true))
  await new Promise((r) => setTimeout(r, 200))
  assert.equal(settled, false, 'the first stop() lets the step finish')
  const result = await w.stop()
  assert.equal(result.reason, 'killed')
  assert.equal(nk.inspectLock(join(dir, '.nanokit', 'state.json.lock')), null, 'the lease is free')
  const ws = await nk.watchStatus({ file })
  assert.equal(ws.running, false)
  writeFileSync(join(dir, 'go'), '')
  // The state is consistent: the next up finishes the job.
  const up = await nk.up({ file })
  assert.equal(up.services[0].outcome, 'healthy')
  await nk.down({ file })
})

test('JS watch(): an invalid configuration rejects done with its code', async () => {
  const { file } = project('name: jswatch3\nservices:\n  a:\n    depends_on: [zz]\n    start: x\n')
  const w = nk.watch({ file })
  await assert.rejects(w.done, (e) => e.code === 'ENKDEP')
})
