// The lease lock primitive from JS, with real processes.
import assert from 'node:assert/strict'
import { mkdtempSync, readFileSync, writeFileSync } from 'node:fs'
import { createRequire } from 'node:module'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterEach, describe, it } from 'node:test'
import { setTimeout as sleep } from 'node:timers/promises'

import { ev, killAll, worker } from './helpers/spawn.mjs'

const require = createRequire(import.meta.url)
const nk = require('../nanokit.js')

afterEach(killAll)

const tmp = (prefix) => mkdtempSync(join(tmpdir(), `nk-${prefix}-`))

function thisHostId(dir) {
  const h = nk.tryAcquireLock(join(dir, 'probe.lock'))
  const id = nk.inspectLock(h.path).holder.hostId
  h.release()
  return id
}

function deadPid() {
  const r = require('node:child_process').spawnSync('true')
  return r.pid
}

function writeRecord(path, { hostId, pid, label = 'ghost' }) {
  writeFileSync(
    path,
    JSON.stringify({ token: `t${Math.random()}`, hostId, hostname: 'ghost-host', pid, holder: label, acquiredAtMs: 0, staleMs: 1000 }),
  )
}

describe('lock API', () => {
  it('acquires, excludes, reports the holder, releases', async () => {
    const dir = tmp('api')
    const path = join(dir, 'a.lock')
    const h = await nk.acquireLock(path, { holder: 'api-test' })
    assert.match(h.token, /^[0-9a-f]{32}$/)
    assert.equal(h.path, path)
    assert.equal(h.lost, false)
    assert.equal(nk.tryAcquireLock(path), null)
    const info = nk.inspectLock(path)
    assert.equal(info.holder.pid, process.pid)
    assert.equal(info.holder.label, 'api-test')
    assert.equal(info.sameHost, true)
    assert.equal(info.holderAlive, true)
    assert.equal(info.stale, false)
    await assert.rejects(nk.acquireLock(path, { timeoutMs: 30 }), (e) => e.code === 'ENKLOCKED' && /api-test/.test(e.message))
    h.release()
    h.release() // idempotent
    assert.equal(nk.inspectLock(path), null)
  })

  it('withLock releases when fn throws and returns fn value', async () => {
    const path = join(tmp('with'), 'w.lock')
    await assert.rejects(
      nk.withLock(path, async () => {
        assert.notEqual(nk.inspectLock(path), null)
        throw new Error('inside')
      }),
      /inside/,
    )
    assert.equal(nk.inspectLock(path), null)
    assert.equal(await nk.withLock(path, async (h) => h.token.length), 32)
    assert.equal(nk.inspectLock(path), null)
  })

  it('an AbortSignal cancels a wait with ENKABORTED', async () => {
    const path = join(tmp('abort'), 'a.lock')
    const h = nk.tryAcquireLock(path)
    const ac = new AbortController()
    setTimeout(() => ac.abort(), 30)
    await assert.rejects(nk.acquireLock(path, { signal: ac.signal }), (e) => e.code === 'ENKABORTED')
    await assert.rejects(nk.acquireLock(path, { signal: AbortSignal.abort() }), (e) => e.code === 'ENKABORTED')
    h.release()
  })

  it('a lost lease is reported through lost, signal and release()', async () => {
    const path = join(tmp('lost'), 'l.lock')
    const h = await nk.acquireLock(path, { staleMs: 100 })
    const signal = h.signal
    const broken = nk.breakLock(path)
    assert.equal(broken.token, h.token)
    // The watcher is unref'd by design; keep this test's loop alive meanwhile.
    const keepAlive = setInterval(() => {}, 1000)
    await new Promise((resolve) => signal.addEventListener('abort', resolve, { once: true }))
    clearInterval(keepAlive)
    assert.equal(signal.reason.code, 'ENKLOCKLOST')
    assert.equal(h.lost, true)
    const other = nk.tryAcquireLock(path)
    assert.throws(() => h.release(), (e) => e.code === 'ENKLOCKLOST')
    assert.equal(nk.inspectLock(path).holder.token, other.token, 'a lost holder never removes the new lock')
    other.release()
  })

  it('rejects unusable paths with ENKSPEC', () => {
    for (const bad of ['', 'dir/', 'a\0b']) {
      assert.throws(() => nk.tryAcquireLock(bad), (e) => e.code === 'ENKSPEC', JSON.stringify(bad))
    }
  })

  it('wrong argument types are TypeErrors, unusable staleMs is ENKSPEC, timeoutMs Infinity waits; long and non-ASCII paths work', async () => {
    const dir = tmp('args')
    const path = join(dir, 'a.lock')
    assert.throws(() => nk.tryAcquireLock(5), TypeError)
    assert.throws(() => nk.tryAcquireLock(path, { staleMs: 'soon' }), TypeError)
    assert.throws(() => nk.tryAcquireLock(path, { holder: 5 }), TypeError)
    await assert.rejects(nk.acquireLock(path, { holder: 5 }), TypeError)
    // A stale period that is not positive would let any waiter take over at once.
    for (const staleMs of [0, -1, NaN]) {
      assert.throws(() => nk.tryAcquireLock(path, { staleMs }), (e) => e.code === 'ENKSPEC', String(staleMs))
      await assert.rejects(nk.acquireLock(path, { staleMs }), (e) => e.code === 'ENKSPEC', String(staleMs))
    }
    await assert.rejects(nk.install(dir, 'x@1.0.0', { staleMs: 0, install: async () => {} }), (e) => e.code === 'ENKSPEC')
    // Nothing was taken by those calls.
    nk.tryAcquireLock(path).release()
    // timeoutMs: Infinity waits for the holder (it used to be read as 0: try once).
    const held = nk.tryAcquireLock(path)
    setTimeout(() => held.release(), 100)
    ;(await nk.acquireLock(path, { timeoutMs: Infinity, staleMs: 1e300 })).release()
    // Longer than the native fast path's buffer, and UTF-8 of several bytes.
    const long = join(dir, 'ü'.repeat(100), `${'€'.repeat(80)}.lock`)
    const h = nk.tryAcquireLock(long, { holder: 'ünïcode' })
    assert.equal(readFileSync(long, 'utf8').includes(h.token), true)
    assert.equal(nk.inspectLock(long).holder.label, 'ünïcode')
    assert.equal(nk.tryAcquireLock(long), null)
    h.release()
    nk.tryAcquireLock(long).release()
  })
})

describe('lock across processes', () => {
  it('inspect counts the processes waiting; a waiter killed is no longer counted', async () => {
    const path = join(tmp('waiters'), 'w.lock')
    const h = nk.tryAcquireLock(path, { holder: 'test' })
    const waiters = () => nk.inspectLock(path)?.waiters ?? 0
    const until = async (n, what) => {
      const deadline = Date.now() + 15000
      while (waiters() !== n) {
        assert.ok(Date.now() < deadline, `${what}: ${waiters()} waiters, expected ${n}`)
        await sleep(10)
      }
    }
    assert.equal(waiters(), 0)
    const ws = Array.from({ length: 3 }, () => worker({ op: 'hold', path, staleMs: 60000, holder: 'waiter' }))
    await until(3, 'three processes wait')
    ws[0].child.kill('SIGKILL')
    await ws[0].exited
    await until(2, 'the killed waiter is not counted')
    h.release()
    await Promise.race([ws[1].next(ev('acquired')), ws[2].next(ev('acquired'))])
    await until(1, 'one took the lock, one still waits')
  })

  it('a holder killed on this host is taken over at once, without waiting for staleMs', async () => {
    const path = join(tmp('dead'), 'd.lock')
    const holder = worker({ op: 'hold', path, staleMs: 60000, holder: 'doomed' })
    await holder.next(ev('acquired'))
    holder.child.kill('SIGKILL')
    await holder.exited
    const info = nk.inspectLock(path)
    assert.equal(info.holderAlive, false)
    assert.equal(info.stale, true)
    // staleMs is a minute: only dead-holder detection can let this through.
    const h = await nk.acquireLock(path, { staleMs: 60000, timeoutMs: 20000 })
    h.release()
  })

  it('a holder on another host whose heartbeat stopped is taken over after staleMs, not before', async () => {
    const path = join(tmp('foreign'), 'f.lock')
    const staleMs = 800
    const holder = worker({ op: 'hold', path, staleMs, holder: 'far away' }, { env: { NANOKIT_HOST_ID: 'another-host' } })
    await holder.next(ev('acquired'))
    // While it is alive and renewing, it is never taken over.
    await assert.rejects(nk.acquireLock(path, { staleMs, timeoutMs: staleMs * 3 }), (e) => e.code === 'ENKLOCKED')
    holder.child.kill('SIGKILL')
    await holder.exited
    assert.equal(nk.inspectLock(path).sameHost, false)
    const start = performance.now()
    const h = await nk.acquireLock(path, { staleMs, timeoutMs: 20000 })
    const waited = performance.now() - start
    h.release()
    assert.ok(waited >= staleMs, `taken over after ${waited} ms, before the stale period of ${staleMs} ms`)
  })

  it('16 processes racing to take over one stale lock, 200 rounds: never two holders', { timeout: 900_000 }, async () => {
    const dir = tmp('race')
    const path = join(dir, 'r.lock')
    const hostId = thisHostId(dir)
    const dead = deadPid()
    const racers = Array.from({ length: 16 }, () => worker({ op: 'race', path }))
    await Promise.all(racers.map((r) => r.next(ev('ready'))))
    // Three takeover paths:
    // - 'killed': the previous round's winner was SIGKILLed while holding the
    //   lock; its real record is left behind (taken at once: dead holder);
    // - 'dead': a record of an exited process on this host (taken at once);
    // - 'foreign': a silent holder on another host (taken after staleMs).
    // The racers' staleMs is also the lease of whoever wins: a winner whose
    // heartbeat stalls that long may rightly be taken over by a racer still
    // trying. So the stale window is far longer than any stall of a loaded
    // 2-core machine (60 s where takeover does not depend on it, 2 s for the
    // foreign path), and the racers keep trying against the live winner for
    // a while (GRACE_MS, well inside that window) before they are stopped.
    // A second winner is then a broken lock, never a legitimate takeover; the
    // winner's own lease must also be intact when it releases.
    const FOREIGN_STALE_MS = 2000
    const ROUNDS = 200
    let killedLast = false
    const counts = { killed: 0, dead: 0, foreign: 0 }
    for (let round = 0; round < ROUNDS; round++) {
      const kind = killedLast ? 'killed' : round % 8 === 7 ? 'foreign' : 'dead'
      counts[kind]++
      if (kind === 'dead') writeRecord(path, { hostId, pid: dead })
      if (kind === 'foreign') writeRecord(path, { hostId: 'another-host', pid: 1 })
      if (kind === 'killed') assert.equal(nk.inspectLock(path).holderAlive, false, `round ${round}: the killed winner's record`)
      const staleMs = kind === 'foreign' ? FOREIGN_STALE_MS : 60_000
      const graceMs = kind === 'foreign' ? FOREIGN_STALE_MS / 4 : 50
      for (const r of racers) r.send(`go ${round} ${staleMs}`)
      const mine = (e) => e.event === 'round' && e.round === round
      await Promise.race(racers.map((r) => r.next((e) => mine(e) && e.won)))
      await sleep(graceMs)
      for (const r of racers) r.send(`stop ${round}`)
      const results = await Promise.all(racers.map((r) => r.next(mine)))
      const winners = results.filter((r) => r.won)
      assert.equal(winners.length, 1, `round ${round} (${kind}): ${winners.length} holders`)
      const at = racers.findIndex((r) => r.child.pid === winners[0].pid)
      const winner = racers[at]
      killedLast = round % 10 === 4
      if (killedLast) {
        // Killed while holding: the next round takes over a real dead holder.
        winner.child.kill('SIGKILL')
        await winner.exited
        racers[at] = worker({ op: 'race', path })
        await racers[at].next(ev('ready'))
      } else {
        const before = winner.events.filter(ev('released')).length
        winner.send('release')
        const rel = await winner.next((e) => e.event === 'released' && winner.events.filter(ev('released')).indexOf(e) === before)
        assert.equal(rel.lost, false, `round ${round} (${kind}): the winner's lease was taken over while it held it`)
      }
    }
    assert.deepEqual(counts, { killed: 20, dead: 160, foreign: 20 })
    for (const r of racers) r.send('quit')
    await Promise.all(racers.map((r) => r.exited))
  })

  it('8 processes × 300 acquire/release cycles: zero overlaps, no deadlock', { timeout: 300_000 }, async () => {
    const dir = tmp('cycles')
    const path = join(dir, 'c.lock')
    const log = join(dir, 'log')
    writeFileSync(log, '')
    const cmd = { op: 'cycles', path, marker: join(dir, 'inside'), log, cycles: 300 }
    const ws = Array.from({ length: 8 }, () => worker(cmd))
    const done = await Promise.all(ws.map((w) => w.next(ev('done'))))
    assert.deepEqual(
      done.map((d) => d.overlaps),
      Array(8).fill(0),
    )
    assert.equal(readFileSync(log, 'utf8').trim().split('\n').length, 2400)
  })

  it('Node exits promptly after locks are released, and even when one is still held', async () => {
    const dir = tmp('exit')
    for (const release of [true, false]) {
      const path = join(dir, `e-${release}.lock`)
      const w = worker({ op: 'lock-and-exit', path, release })
      await w.next(ev('done'))
      // A heartbeat that kept the event loop alive would hang here until the
      // test's timeout.
      const { code } = await w.exited
      assert.equal(code, 0)
      if (!release) {
        // Left behind by an exited process: the next taker does not wait.
        const h = await nk.acquireLock(path, { staleMs: 60000, timeoutMs: 20000 })
        h.release()
      }
    }
  })
})
