// The state store from JS, against the built addon, on both backends: the
// embedded one (a real SQLite file in a temporary directory) and PostgreSQL
// (NANOKIT_TEST_PG_URL, from scripts/pg-test-cluster.sh; when unset, skipped
// with a "SKIPPED:" reason outside CI and failed in CI, helpers/services.mjs). Multi-process cases use real child
// processes (helpers/kv-child.mjs); nothing asserts on wall-clock time.
import { test, describe, before, after } from 'node:test'
import assert from 'node:assert/strict'
import { spawn, spawnSync } from 'node:child_process'
import { mkdtempSync, rmSync, readFileSync, mkdirSync, existsSync, readdirSync } from 'node:fs'
import { createServer } from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { createRequire } from 'node:module'
import { randomUUID } from 'node:crypto'

import { needsPg, requirePg } from './helpers/services.mjs'
import { CLIS } from './helpers/clis.mjs'

const require = createRequire(import.meta.url)
const { openState, openStateSync } = require('../kv-wrapper.js')

const ROOT = fileURLToPath(new URL('..', import.meta.url))
const CHILD = fileURLToPath(new URL('./helpers/kv-child.mjs', import.meta.url))

async function rejectsWith(promiseOrFn, code) {
  let err
  try {
    await (typeof promiseOrFn === 'function' ? promiseOrFn() : promiseOrFn)
  } catch (e) {
    err = e
  }
  assert.ok(err, `expected an error with code ${code}`)
  assert.equal(err.code, code, `expected ${code}, got ${err.code}: ${err.message}`)
  assert.doesNotMatch(err.message, /^ENK[A-Z]+: /, 'the code prefix is moved to err.code')
  return err
}

function children(mode, n, perChild, options, extra = {}) {
  const dir = mkdtempSync(join(tmpdir(), 'nk-kv-cs-'))
  const runs = []
  for (let id = 0; id < n; id++) {
    const job = { mode, id, n: perChild, options, dir, ...extra }
    runs.push(
      new Promise((resolve, reject) => {
        const child = spawn(process.execPath, [CHILD, JSON.stringify(job)], { stdio: ['ignore', 'pipe', 'pipe'] })
        let out = ''
        let err = ''
        child.stdout.on('data', (d) => (out += d))
        child.stderr.on('data', (d) => (err += d))
        child.on('exit', (code) => {
          if (code !== 0) reject(new Error(`child ${id} exited ${code}: ${err}`))
          else resolve(JSON.parse(out.trim().split('\n').pop()))
        })
      }),
    )
  }
  return Promise.all(runs).then((results) => ({ results, dir }))
}

const backends = [
  {
    name: 'embedded',
    skip: false,
    async make() {
      const dir = mkdtempSync(join(tmpdir(), 'nk-kv-'))
      const options = { stateDir: dir, url: '' }
      return { options, dir, cleanup: () => rmSync(dir, { recursive: true, force: true }) }
    },
  },
  {
    name: 'postgres',
    skip: needsPg().skip,
    async make() {
      const dir = mkdtempSync(join(tmpdir(), 'nk-kv-'))
      const options = { url: requirePg(), agent: `js-${randomUUID().slice(0, 8)}` }
      return { options, dir, cleanup: () => rmSync(dir, { recursive: true, force: true }) }
    },
  },
]

for (const backend of backends) {
  describe(`state store: ${backend.name}`, { skip: backend.skip }, () => {
    let ctx
    let s
    before(async () => {
      ctx = await backend.make()
      s = await openState(ctx.options)
      assert.equal(s.backend, backend.name)
    })
    after(() => ctx?.cleanup())

    test('set / get / exists / delete with strings and JSON', async () => {
      assert.equal(await s.get('nope'), null)
      assert.equal(await s.exists('nope'), false)
      await s.set('package:installed:nginx', '1.25')
      assert.equal(await s.get('package:installed:nginx'), '1.25')
      assert.equal(await s.exists('package:installed:nginx'), true)
      const doc = { hash: 'abc', n: 3, list: [1, 2, { x: null }], ok: true }
      await s.set('doc', doc)
      assert.deepEqual(await s.get('doc'), doc)
      await s.set('num', 42)
      assert.equal(await s.get('num'), 42)
      await s.set('str42', '42')
      assert.equal(await s.get('str42'), '42')
      const other = await openState(ctx.options)
      assert.deepEqual(await other.get('doc'), doc)
      assert.equal(await s.delete('doc'), true)
      assert.equal(await s.delete('doc'), false)
      assert.equal(await other.get('doc'), null)
    })

    test('list by prefix, sorted, with values', async () => {
      for (const k of ['l:b', 'l:a', 'l:c', 'lx', 'l%']) await s.set(k, `v-${k}`)
      const got = await s.list('l:')
      assert.deepEqual(
        got.map((e) => [e.key, e.value]),
        [
          ['l:a', 'v-l:a'],
          ['l:b', 'v-l:b'],
          ['l:c', 'v-l:c'],
        ],
      )
      assert.ok(got.every((e) => typeof e.updatedAt === 'number' && e.updatedAt > 1.6e12))
      assert.deepEqual((await s.list('l%')).map((e) => e.key), ['l%'])
      assert.ok((await s.list()).length >= 5)
    })

    test('increment is atomic arithmetic with coded errors', async () => {
      assert.equal(await s.increment('ctr'), 1)
      assert.equal(await s.increment('ctr', 41), 42)
      assert.equal(await s.increment('ctr', -2), 40)
      assert.equal(await s.get('ctr'), 40)
      await s.set('word', 'hello')
      await rejectsWith(s.increment('word', 1), 'ENKNOTINTEGER')
      assert.equal(await s.get('word'), 'hello')
      await rejectsWith(s.increment('ctr', 1.5), 'ENKARG')
    })

    test('increment never returns an inexact number: past 2^53 - 1 it is refused and nothing changes', async () => {
      const max = Number.MAX_SAFE_INTEGER
      assert.equal(await s.increment('near', max - 1), max - 1)
      assert.equal(await s.increment('near'), max)
      const e = await rejectsWith(s.increment('near'), 'ENKNOTINTEGER')
      assert.match(e.message, /MAX_SAFE_INTEGER/)
      assert.equal(await s.get('near'), max)
      await rejectsWith(s.increment('low', -max - 1), 'ENKARG') // the delta itself is not a safe integer
      assert.equal(await s.increment('low', -max), -max)
      await rejectsWith(s.increment('low', -1), 'ENKNOTINTEGER')
      assert.equal(await s.get('low'), -max)
      // A counter already beyond it (written as text by another client): even
      // reading it through increment(0) would be inexact.
      await s.set('huge', '9007199254740993')
      await rejectsWith(s.increment('huge', 0), 'ENKNOTINTEGER')
      assert.equal(await s.get('huge'), '9007199254740993')
      await rejectsWith(s.increment('fresh', max + 1), 'ENKARG')
      assert.equal(await s.exists('fresh'), false)
    })

    test('lock is exclusive; ENKLOCKED names the holder; isLocked reports it', async () => {
      const other = await openState(ctx.options)
      const got = await s.lock('deploy', 'worker-a', 60)
      assert.equal(got.holder, 'worker-a')
      assert.ok(got.expiresAt > Date.now() - 60_000)
      const err = await rejectsWith(other.lock('deploy', 'worker-b', 60), 'ENKLOCKED')
      assert.match(err.message, /worker-a/)
      await rejectsWith(other.lock('deploy', 'worker-b', 60, { waitMs: 50 }), 'ENKLOCKED')
      const info = await other.isLocked('deploy')
      assert.equal(info.locked, true)
      assert.equal(info.holder, 'worker-a')
      assert.equal(typeof info.expiresAt, 'number')
      await s.unlock('deploy', 'worker-a')
      const free = await other.isLocked('deploy')
      assert.equal(free.locked, false)
      assert.equal(free.holder ?? null, null)
      assert.equal(free.expiresAt ?? null, null)
      await other.lock('deploy', 'worker-b', 60)
      await other.unlock('deploy', 'worker-b')
    })

    test('unlock by a non-holder is refused', async () => {
      await s.lock('job', 'alice', 60)
      const err = await rejectsWith(s.unlock('job', 'mallory'), 'ENKNOTHOLDER')
      assert.match(err.message, /alice/)
      assert.equal((await s.isLocked('job')).holder, 'alice')
      await s.unlock('job', 'alice')
      await rejectsWith(s.unlock('job', 'alice'), 'ENKNOTHOLDER')
      await s.lock('job', 'bob', 60)
      assert.equal(await s.forceUnlock('job'), 'bob')
      assert.equal((await s.isLocked('job')).locked, false)
    })

    test('a lock expires after its timeout', async () => {
      await s.lock('lease', 'short-lived', 1.1)
      const other = await openState(ctx.options)
      const got = await other.lock('lease', 'successor', 60, { waitMs: 60_000 })
      assert.equal(got.holder, 'successor')
      const err = await rejectsWith(s.unlock('lease', 'short-lived'), 'ENKNOTHOLDER')
      assert.match(err.message, /successor/)
      await other.unlock('lease', 'successor')
    })

    test('withLock releases the lock when fn throws or rejects, and returns its value', async () => {
      await assert.rejects(
        s.withLock('wl', 'me', 60, () => {
          throw new Error('boom')
        }),
        /boom/,
      )
      assert.equal((await s.isLocked('wl')).locked, false)
      await assert.rejects(
        s.withLock('wl', 'me', 60, async () => {
          assert.equal((await s.isLocked('wl')).holder, 'me')
          throw new Error('async boom')
        }),
        /async boom/,
      )
      assert.equal((await s.isLocked('wl')).locked, false)
      assert.equal(await s.withLock('wl', 'me', 60, async () => 7), 7)
      assert.equal((await s.isLocked('wl')).locked, false)
      await s.lock('wl', 'other', 60)
      let ran = false
      await rejectsWith(
        s.withLock('wl', 'me', 60, () => {
          ran = true
        }),
        'ENKLOCKED',
      )
      assert.equal(ran, false)
      await s.unlock('wl', 'other')
    })

    test('clear and stats', async () => {
      const ns = await openState({ ...ctx.options, agent: `${ctx.options.agent ?? 'local'}-clr` })
      await ns.set('a', 'xyz')
      await ns.set('b', [1, 2])
      await ns.lock('held', 'me', 60)
      const st = await ns.stats()
      assert.equal(st.backend, backend.name)
      assert.equal(st.keys, 2)
      assert.equal(st.valueBytes, 8)
      assert.equal(st.locks, 1)
      assert.equal(await ns.clear(), 2)
      assert.deepEqual(await ns.list(), [])
      assert.equal((await ns.stats()).locks, 1)
      // Other namespaces are untouched.
      assert.equal(await s.get('package:installed:nginx'), '1.25')
    })

    test('bad input gives coded errors and writes nothing', async () => {
      const ns = await openState({ ...ctx.options, agent: `${ctx.options.agent ?? 'local'}-bad` })
      await rejectsWith(ns.set('', 'x'), 'ENKKEY')
      await rejectsWith(ns.set('k'.repeat(1025), 'x'), 'ENKKEY')
      await rejectsWith(ns.set('big', 'v'.repeat(1024 * 1024 + 1)), 'ENKKEY')
      await rejectsWith(ns.set('empty', ''), 'ENKKEY')
      await rejectsWith(ns.get(''), 'ENKKEY')
      await rejectsWith(ns.lock('', 'h', 1), 'ENKKEY')
      await rejectsWith(ns.lock('n', '', 1), 'ENKARG')
      await rejectsWith(ns.lock('n', 'h', 0), 'ENKARG')
      await rejectsWith(ns.lock('n', 'h', 1, { waitMs: -1 }), 'ENKARG')
      for (const agent of ['../etc', 'a/b', '..', '.x', 'a b', '']) {
        await rejectsWith(openState({ ...ctx.options, agent }), 'ENKAGENT')
      }
      assert.deepEqual(await ns.list(), [])
      assert.equal((await ns.stats()).locks, 0)
    })

    test('8 processes x 1,000 increments = exactly 8,000', async () => {
      const options = { ...ctx.options, agent: `${ctx.options.agent ?? 'local'}-incr` }
      const { results, dir } = await children('incr', 8, 1000, options, { sync: true })
      rmSync(dir, { recursive: true, force: true })
      assert.equal(results.length, 8)
      const st = await openState(options)
      assert.equal(await st.get('counter'), 8000)
    })

    test('8 processes opening a brand-new namespace at once all work', async () => {
      const options = { ...ctx.options, agent: `${ctx.options.agent ?? 'local'}-fresh-${randomUUID().slice(0, 6)}` }
      const { results, dir } = await children('incr', 8, 50, options, { sync: true })
      rmSync(dir, { recursive: true, force: true })
      assert.equal(results.length, 8)
      assert.equal(await (await openState(options)).get('counter'), 400)
    })

    test('8 processes contending for one lock never overlap', async () => {
      const options = { ...ctx.options, agent: `${ctx.options.agent ?? 'local'}-cs` }
      const per = 25
      const { results, dir } = await children('lock', 8, per, options)
      const counter = Number(readFileSync(join(dir, 'counter'), 'utf8'))
      rmSync(dir, { recursive: true, force: true })
      assert.equal(results.reduce((a, r) => a + r.overlaps, 0), 0)
      assert.equal(results.reduce((a, r) => a + r.acquired, 0), 8 * per)
      assert.equal(counter, 8 * per)
      const st = await openState(options)
      assert.equal((await st.isLocked('critical')).locked, false)
    })
  })
}

describe('embedded only', () => {
  let dir
  before(() => {
    dir = mkdtempSync(join(tmpdir(), 'nk-kv-sync-'))
  })
  after(() => rmSync(dir, { recursive: true, force: true }))

  test('sync twins do everything the Promise methods do', () => {
    const s = openStateSync({ stateDir: dir, url: '' })
    s.setSync('a', 'x')
    s.setSync('b', { n: 1 })
    assert.equal(s.getSync('a'), 'x')
    assert.deepEqual(s.getSync('b'), { n: 1 })
    assert.equal(s.getSync('zz'), null)
    assert.equal(s.existsSync('a'), true)
    assert.deepEqual(s.listSync().map((e) => e.key), ['a', 'b'])
    assert.equal(s.incrementSync('c'), 1)
    assert.equal(s.incrementSync('c', 4), 5)
    assert.equal(s.incrementSync('c', Number.MAX_SAFE_INTEGER - 5), Number.MAX_SAFE_INTEGER)
    assert.throws(() => s.incrementSync('c'), (e) => e.code === 'ENKNOTINTEGER')
    assert.equal(s.getSync('c'), Number.MAX_SAFE_INTEGER)
    s.lockSync('L', 'me', 60)
    assert.throws(() => s.lockSync('L', 'you', 60), (e) => e.code === 'ENKLOCKED' && /me/.test(e.message))
    assert.throws(() => s.unlockSync('L', 'you'), (e) => e.code === 'ENKNOTHOLDER')
    assert.equal(s.isLockedSync('L').holder, 'me')
    s.unlockSync('L', 'me')
    assert.throws(
      () =>
        s.withLockSync('W', 'me', 60, () => {
          throw new Error('boom')
        }),
      /boom/,
    )
    assert.equal(s.isLockedSync('W').locked, false)
    assert.equal(s.withLockSync('W', 'me', 60, () => 3), 3)
    assert.equal(s.deleteSync('a'), true)
    assert.equal(s.statsSync().keys, 2)
    assert.equal(s.clearSync(), 2)
    assert.throws(() => s.setSync('', 'x'), (e) => e.code === 'ENKKEY')
    assert.throws(() => openStateSync({ stateDir: dir, agent: '../x' }), (e) => e.code === 'ENKAGENT')
  })

  for (const c of CLIS)
  test(`getSync sees a write by another process (${c.name} CLI) as soon as that returned`, () => {
    const d = mkdtempSync(join(tmpdir(), 'nk-kv-fresh-'))
    const s = openStateSync({ stateDir: d, url: '' })
    s.setSync('x', 'start')
    for (let i = 0; i < 5; i++) {
      // Two gets in a row, so that the second may reuse a read snapshot.
      s.getSync('x')
      s.getSync('x')
      const r = spawnSync(c.cmd, [...c.pre, 'state', 'set', 'x', `v${i}`], {
        env: { ...process.env, NANOKIT_STATE_DIR: d, NANOKIT_STATE_URL: '' },
        stdio: ['ignore', 'pipe', 'pipe'],
      })
      assert.equal(r.status, 0, String(r.stderr))
      assert.equal(s.getSync('x'), `v${i}`)
    }
    rmSync(d, { recursive: true, force: true })
  })

  test('a corrupt database file is reported, never reset', async () => {
    const d = mkdtempSync(join(tmpdir(), 'nk-kv-corrupt-'))
    const file = join(d, 'local.db')
    const junk = 'not a database\n'.repeat(500)
    require('node:fs').writeFileSync(file, junk)
    await rejectsWith(openState({ stateDir: d, url: '' }), 'ENKSTATECORRUPT')
    assert.throws(() => openStateSync({ stateDir: d, url: '' }), (e) => e.code === 'ENKSTATECORRUPT')
    assert.equal(readFileSync(file, 'utf8'), junk)
    rmSync(d, { recursive: true, force: true })
  })

  test('a database URL that does not answer gives ENKSTATEUNAVAILABLE', async () => {
    // Accepts the TCP connection and never answers.
    const sockets = []
    const server = createServer((sock) => sockets.push(sock))
    await new Promise((r) => server.listen(0, '127.0.0.1', r))
    const { port } = server.address()
    const err = await rejectsWith(
      openState({ url: `postgres://u:hunter2@127.0.0.1:${port}/db?connect_timeout=1` }),
      'ENKSTATEUNAVAILABLE',
    )
    assert.doesNotMatch(err.message, /hunter2/)
    for (const s of sockets) s.destroy()
    server.close()
    // Nothing listening at all.
    await rejectsWith(openState({ url: `postgres://u@127.0.0.1:${port}/db` }), 'ENKSTATEUNAVAILABLE')
    await rejectsWith(openState({ url: 'mysql://u@127.0.0.1/db' }), 'ENKSTATEURL')
    assert.throws(() => openStateSync({ url: 'postgres://u@127.0.0.1/db' }), (e) => e.code === 'ENKUNSUPPORTED')
  })
})

for (const c of CLIS)
describe(`${c.name} CLI: nanokit state`, () => {
  let dir
  const run = (args, opts = {}) =>
    spawnSync(c.cmd, [...c.pre, 'state', ...args], {
      env: { ...process.env, NANOKIT_STATE_DIR: dir, NANOKIT_STATE_URL: '' },
      encoding: 'utf8',
      stdio: ['ignore', 'pipe', 'pipe'],
      ...opts,
    })
  before(() => {
    dir = mkdtempSync(join(tmpdir(), 'nk-kv-cli-'))
  })
  after(() => rmSync(dir, { recursive: true, force: true }))

  test('set, get, show, list, incr, stats, with table and json output', () => {
    assert.equal(run(['set', 'pkg:nginx', '1.25']).status, 0)
    assert.equal(run(['set', 'cfg', '{"replicas":3}', '--json']).status, 0)
    let r = run(['get', 'pkg:nginx'])
    assert.equal(r.status, 0)
    assert.equal(r.stdout, '1.25\n')
    r = run(['get', 'cfg', '--output', 'json'])
    assert.deepEqual(JSON.parse(r.stdout), { replicas: 3 })
    r = run(['show', 'cfg'])
    assert.match(r.stdout, /type:\s+json/)
    r = run(['list', 'pkg:'])
    assert.match(r.stdout, /KEY\s+TYPE\s+UPDATED\s+VALUE/)
    assert.match(r.stdout, /pkg:nginx\s+text/)
    r = run(['list', '-o', 'json'])
    assert.deepEqual(JSON.parse(r.stdout).map((e) => e.key), ['cfg', 'pkg:nginx'])
    assert.equal(run(['incr', 'n']).stdout, '1\n')
    assert.equal(run(['incr', 'n', '-5']).stdout, '-4\n')
    r = run(['stats', '-o', 'json'])
    assert.equal(JSON.parse(r.stdout).keys, 3)
    r = run(['get', 'missing'])
    assert.equal(r.status, 1)
    assert.match(r.stderr, /not found/)
  })

  test('delete and clear refuse without --yes when there is no terminal', () => {
    let r = run(['delete', 'pkg:nginx'])
    assert.equal(r.status, 1)
    assert.match(r.stderr, /--yes/)
    assert.equal(run(['get', 'pkg:nginx']).status, 0, 'nothing was deleted')
    r = run(['clear'])
    assert.equal(r.status, 1)
    assert.match(r.stderr, /--yes/)
    assert.equal(run(['delete', 'pkg:nginx', '--yes']).status, 0)
    assert.equal(run(['get', 'pkg:nginx']).status, 1)
    r = run(['clear', '--yes'])
    assert.equal(r.status, 0)
    assert.deepEqual(JSON.parse(run(['list', '-o', 'json']).stdout), [])
  })

  test('lock, locked, unlock, with coded errors', () => {
    assert.equal(run(['lock', 'deploy', '--holder', 'ci-1', '--timeout', '60']).status, 0)
    let r = run(['lock', 'deploy', '--holder', 'ci-2'])
    assert.equal(r.status, 1)
    assert.match(r.stderr, /ENKLOCKED.*ci-1/)
    r = run(['locked', 'deploy', '-o', 'json'])
    assert.equal(JSON.parse(r.stdout).holder, 'ci-1')
    r = run(['unlock', 'deploy', '--holder', 'ci-2'])
    assert.equal(r.status, 1)
    assert.match(r.stderr, /ENKNOTHOLDER/)
    r = run(['unlock', 'deploy', '--force'])
    assert.equal(r.status, 1, 'force needs --yes without a terminal')
    r = run(['unlock', 'deploy', '--force', '--yes'])
    assert.equal(r.status, 0)
    assert.match(r.stdout, /ci-1/)
    assert.equal(run(['lock', 'deploy', '--holder', 'ci-2']).status, 0)
    assert.equal(run(['unlock', 'deploy', '--holder', 'ci-2']).status, 0)
  })

  test('bad input: agent with path characters, empty key, unreachable URL', () => {
    let r = run(['--agent', '../etc', 'list'])
    assert.equal(r.status, 1)
    assert.match(r.stderr, /ENKAGENT/)
    r = run(['set', '', 'x'])
    assert.equal(r.status, 1)
    assert.match(r.stderr, /ENKKEY/)
    r = run(['list', '--state-url', 'postgres://u@127.0.0.1:1/db'])
    assert.equal(r.status, 1)
    assert.match(r.stderr, /ENKSTATEUNAVAILABLE/)
    assert.deepEqual(
      readdirSync(dir).filter((f) => f.endsWith('.db')),
      ['local.db'],
    )
  })

  test('--help explains backends and codes', () => {
    const r = run(['--help'])
    assert.equal(r.status, 0)
    assert.match(r.stdout, /postgres/)
    assert.match(r.stdout, /ENKLOCKED/)
    assert.match(r.stdout, /--yes/)
  })
})
