// Shared package repository coordination with real processes and real npm.
import assert from 'node:assert/strict'
import { execFile, execFileSync } from 'node:child_process'
import { promisify } from 'node:util'
import { chmodSync, existsSync, mkdirSync, mkdtempSync, readFileSync, readdirSync, writeFileSync } from 'node:fs'
import { createRequire } from 'node:module'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { after, afterEach, before, describe, it } from 'node:test'

import { startRegistry } from './helpers/registry.mjs'
import { ev, killAll, worker } from './helpers/spawn.mjs'
import { CLIS } from './helpers/clis.mjs'

const require = createRequire(import.meta.url)
const nk = require('../nanokit.js')
// Async: the registry these tests use is served from this very process.
const cli = async (c, ...args) => (await promisify(execFile)(c.cmd, [...c.pre, ...args], { encoding: 'utf8' })).stdout
const cliSync = (c, args, opts = {}) => execFileSync(c.cmd, [...c.pre, ...args], { encoding: 'utf8', ...opts })

afterEach(killAll)

const tmp = (prefix) => mkdtempSync(join(tmpdir(), `nk-${prefix}-`))
const lines = (file) => (existsSync(file) ? readFileSync(file, 'utf8').trim().split('\n').filter(Boolean) : [])

/** Every file under `dir`, relative. */
function tree(dir) {
  const out = []
  const walk = (d, rel) => {
    for (const e of readdirSync(d, { withFileTypes: true })) {
      const r = rel ? `${rel}/${e.name}` : e.name
      out.push(r)
      if (e.isDirectory()) walk(join(d, e.name), r)
    }
  }
  if (existsSync(dir)) walk(dir, '')
  return out.sort()
}

describe('repo: custom installer, many processes', () => {
  it('8 processes, one package, cold repo: exactly one install; all resolve; all see it installed', async () => {
    const repo = tmp('eight')
    const counter = join(repo, '..', `counter-${process.pid}-${Date.now()}`)
    const spec = '@openfn/language-http@7.2.0'
    const ws = Array.from({ length: 8 }, () =>
      worker({ op: 'install', repo, spec, custom: { sleepMs: 400, counter } }),
    )
    const done = await Promise.all(ws.map((w) => w.next((e) => e.event === 'done' || e.event === 'error')))
    assert.deepEqual(done.map((d) => d.event), Array(8).fill('done'), JSON.stringify(done))
    assert.equal(lines(counter).length, 1, 'exactly one install ran')
    assert.equal(done.filter((d) => d.result.installed).length, 1)
    assert.ok(done.every((d) => d.installed), 'every process sees it installed')
    assert.equal(nk.isInstalled(repo, spec), true)
    const alias = '@openfn/language-http_7.2.0'
    const manifest = JSON.parse(readFileSync(join(repo, 'package.json'), 'utf8'))
    assert.equal(manifest.dependencies[alias], 'npm:@openfn/language-http@7.2.0')
    assert.equal(require(join(repo, 'node_modules', alias)), spec)
    assert.ok(existsSync(join(repo, '.sentinels', '@openfn+language-http_7.2.0.done')))
    assert.equal(nk.inspectLock(join(repo, '.locks', '@openfn+language-http_7.2.0.lock')), null, 'the lock is free')
    assert.deepEqual(readdirSync(join(repo, '.staging')), [], 'no staging left behind')
  })

  it('installer SIGKILLed mid-install: a waiter takes over and completes; never visible half-installed; package.json always valid', async () => {
    const repo = tmp('kill')
    const spec = 'slowpkg@1.0.0'
    const alias = 'slowpkg_1.0.0'
    writeFileSync(join(repo, 'package.json'), JSON.stringify({ name: 'repo', dependencies: { other_1: 'npm:other@1' } }))
    // Watch the repo continuously while the drama unfolds.
    const violations = []
    let watching = true
    const watch = (async () => {
      while (watching) {
        if (nk.isInstalled(repo, spec) && !existsSync(join(repo, 'node_modules', alias, 'complete.txt'))) {
          violations.push('looked installed while incomplete')
        }
        try {
          JSON.parse(readFileSync(join(repo, 'package.json'), 'utf8'))
        } catch (e) {
          violations.push(`package.json unreadable: ${e.message}`)
        }
        await new Promise((r) => setImmediate(r))
      }
    })()
    // staleMs of a minute: only dead-holder detection can make the waiter go on.
    const first = worker({ op: 'install', repo, spec, staleMs: 60000, custom: { sleepMs: 4000 } })
    await first.next(ev('installing'))
    const waiter = worker({ op: 'install', repo, spec, staleMs: 60000, custom: { sleepMs: 300 } })
    await waiter.next(ev('start'))
    await new Promise((r) => setTimeout(r, 300))
    const killedAt = Date.now()
    first.child.kill('SIGKILL')
    await first.exited
    const took = await waiter.next(ev('installing'))
    const done = await waiter.next((e) => e.event === 'done' || e.event === 'error')
    watching = false
    await watch
    assert.equal(done.event, 'done', JSON.stringify(done))
    assert.equal(done.result.installed, true)
    assert.deepEqual(violations, [])
    assert.equal(nk.isInstalled(repo, spec), true)
    assert.ok(existsSync(join(repo, 'node_modules', alias, 'complete.txt')))
    const deps = JSON.parse(readFileSync(join(repo, 'package.json'), 'utf8')).dependencies
    assert.deepEqual(Object.keys(deps).sort(), ['other_1', alias])
    assert.deepEqual(readdirSync(join(repo, '.staging')), [], 'the dead attempt was cleaned up')
    // Only the dead-holder check lets the waiter in before the 60 s stale
    // window: without it this takes a minute.
    console.log(`# takeover after SIGKILL: ${took.t - killedAt} ms (staleMs 60000)`)
    assert.ok(took.t - killedAt < 10000, `the waiter took over ${took.t - killedAt} ms after the kill: far below the stale window`)
  })

  it('a failing install reaches the caller with its message and code; no sentinel; the next call retries', async () => {
    const repo = tmp('fail')
    const spec = 'flaky@1.0.0'
    const failing = worker({ op: 'install', repo, spec, custom: { fail: 'disk on fire' } })
    const err = await failing.next(ev('error'))
    assert.equal(err.code, 'EBOOM')
    assert.match(err.message, /disk on fire/)
    assert.equal(nk.isInstalled(repo, spec), false)
    assert.equal(existsSync(join(repo, '.sentinels', 'flaky_1.0.0.done')), false)
    assert.equal(nk.inspectLock(join(repo, '.locks', 'flaky_1.0.0.lock')), null, 'the lock was released')
    const ok = await nk.install(repo, spec, {
      install: async (s, dir) => {
        mkdirSync(join(dir, 'node_modules', 'flaky_1.0.0'), { recursive: true })
        writeFileSync(join(dir, 'node_modules', 'flaky_1.0.0', 'package.json'), '{"name":"flaky","version":"1.0.0"}')
      },
    })
    assert.equal(ok.installed, true)
    assert.equal(nk.isInstalled(repo, spec), true)
    // An installer that produces nothing is a failure too, not a fake success.
    await assert.rejects(nk.install(repo, 'empty@1.0.0', { install: async () => {} }), (e) => e.code === 'ENKINSTALL')
    assert.equal(nk.isInstalled(repo, 'empty@1.0.0'), false)
  })

  it('bad specifiers → ENKSPEC and nothing written; an unusable repoDir → a clear error', async () => {
    const parent = tmp('bad')
    const repo = join(parent, 'repo')
    mkdirSync(repo)
    const bad = [
      '../../etc/x@1.0.0',
      '/etc/passwd@1.0.0',
      '@scope/../../x@1.0.0',
      'lodash',
      'lodash@',
      '@1.0.0',
      'x@../../1',
      'x; rm -rf /@1.0.0',
      'x@1.0.0 && touch pwned',
      'x@$(touch pwned)',
      'x`id`@1.0.0',
      'x\0y@1.0.0',
      'x@1.0.0\0',
      '',
    ]
    const { handleInstall, handleIsInstalled } = nk.createLockedHandlers(repo)
    for (const spec of bad) {
      assert.throws(() => nk.isInstalled(repo, spec), (e) => e.code === 'ENKSPEC', JSON.stringify(spec))
      await assert.rejects(nk.install(repo, spec), (e) => e.code === 'ENKSPEC', JSON.stringify(spec))
      await assert.rejects(handleInstall(spec, repo), (e) => e.code === 'ENKSPEC', JSON.stringify(spec))
      await assert.rejects(handleIsInstalled(spec, repo), (e) => e.code === 'ENKSPEC', JSON.stringify(spec))
      await assert.rejects(nk.install(repo, spec, { install: async () => {} }), (e) => e.code === 'ENKSPEC')
    }
    assert.deepEqual(tree(parent), ['repo'], 'nothing was written anywhere')
    // A repoDir that cannot be created (its parent is a file).
    const file = join(parent, 'a-file')
    writeFileSync(file, '')
    await assert.rejects(nk.install(join(file, 'repo'), 'x@1.0.0', { install: async () => {} }), (e) => {
      return e.code === 'ENKIO' && e.message.includes(join(file, 'repo')) && /Not a directory/.test(e.message)
    })
    if (process.getuid() !== 0) {
      const ro = join(parent, 'ro')
      mkdirSync(ro)
      chmodSync(ro, 0o555)
      await assert.rejects(nk.install(ro, 'x@1.0.0', { install: async () => {} }), (e) => e.code === 'ENKIO' && /ermission denied/.test(e.message))
    }
  })

  it('createLockedHandlers follows the OpenFn autoinstall contract', async () => {
    const repo = tmp('openfn')
    const other = tmp('openfn-other')
    const calls = []
    const handlers = nk.createLockedHandlers(repo, {
      install: async (spec, dir, logger) => {
        calls.push(spec)
        const [name, version] = [spec.slice(0, spec.lastIndexOf('@')), spec.slice(spec.lastIndexOf('@') + 1)]
        mkdirSync(join(dir, 'node_modules', `${name}_${version}`), { recursive: true })
        writeFileSync(join(dir, 'node_modules', `${name}_${version}`, 'package.json'), JSON.stringify({ name, version }))
      },
    })
    const messages = []
    const logger = { info: (m) => messages.push(m), debug: (m) => messages.push(m) }
    assert.equal(await handlers.handleIsInstalled('@openfn/language-common@2.0.0', repo, logger), false)
    assert.equal(await handlers.handleInstall('@openfn/language-common@2.0.0', repo, logger), undefined)
    assert.equal(await handlers.handleIsInstalled('@openfn/language-common@2.0.0', repo, logger), true)
    // The engine may pass its own repoDir: it wins.
    assert.equal(await handlers.handleIsInstalled('@openfn/language-common@2.0.0', other, logger), false)
    await handlers.handleInstall('@openfn/language-common@2.0.0', other, logger)
    assert.equal(nk.isInstalled(other, '@openfn/language-common@2.0.0'), true)
    assert.deepEqual(calls, ['@openfn/language-common@2.0.0', '@openfn/language-common@2.0.0'])
    assert.ok(messages.some((m) => /installed @openfn\/language-common@2.0.0/.test(m)))
  })

  it('Node exits promptly after handlers finish', async () => {
    const w = worker({ op: 'handlers-and-exit', repo: tmp('exit'), spec: 'quick@1.0.0' })
    const done = await w.next(ev('done'))
    assert.equal(done.installed, true)
    assert.equal((await w.exited).code, 0)
  })
})

describe('repo: real npm against a local registry', () => {
  let registry
  before(async () => {
    registry = await startRegistry()
  })
  after(async () => {
    await registry?.close()
  })

  it('installs a package with a dependency in the OpenFn layout, loadable with require()', async () => {
    const repo = tmp('npm')
    const counter = join(repo, '..', `npm-counter-${Date.now()}`)
    process.env.NK_INSTALL_COUNTER = counter
    try {
      const r = await nk.install(repo, 'nk-fixture-a@1.0.0', { npmArgs: registry.npmArgs })
      assert.equal(r.installed, true)
      const again = await nk.install(repo, 'nk-fixture-a@1.0.0', { npmArgs: registry.npmArgs })
      assert.equal(again.installed, false)
    } finally {
      delete process.env.NK_INSTALL_COUNTER
    }
    assert.deepEqual(lines(counter), ['nk-fixture-a'], 'npm ran once, with its install scripts')
    assert.equal(require(join(repo, 'node_modules', 'nk-fixture-a_1.0.0')), 'a:dep@1.0.0')
    const manifest = JSON.parse(readFileSync(join(repo, 'package.json'), 'utf8'))
    assert.deepEqual(manifest.dependencies, { 'nk-fixture-a_1.0.0': 'npm:nk-fixture-a@1.0.0' })
    const scoped = await nk.install(repo, '@nkfix/scoped@2.0.0', { npmArgs: registry.npmArgs })
    assert.equal(scoped.installed, true)
    assert.equal(require(join(repo, 'node_modules', '@nkfix', 'scoped_2.0.0')), 'scoped@2.0.0')
  })

  it('4 processes install 4 different packages at once: they overlap, and all 4 end up complete', { timeout: 180_000 }, async () => {
    const repo = tmp('four')
    const counter = join(repo, '..', `four-counter-${Date.now()}`)
    const specs = ['nk-fixture-a@1.0.0', 'nk-fixture-b@1.0.0', 'nk-fixture-c@1.0.0', 'nk-fixture-d@1.0.0']
    const ws = specs.map((spec) => worker({ op: 'install', repo, spec, npmArgs: registry.npmArgs }, { env: { NK_INSTALL_COUNTER: counter } }))
    const done = await Promise.all(ws.map((w) => w.next((e) => e.event === 'done' || e.event === 'error')))
    assert.deepEqual(done.map((d) => d.event), Array(4).fill('done'), JSON.stringify(done))
    const latestStart = Math.max(...done.map((d) => d.start))
    const earliestEnd = Math.min(...done.map((d) => d.t))
    assert.ok(latestStart < earliestEnd, `installs did not overlap: last started at ${latestStart}, first ended at ${earliestEnd}`)
    const manifest = JSON.parse(readFileSync(join(repo, 'package.json'), 'utf8'))
    assert.deepEqual(Object.keys(manifest.dependencies).sort(), specs.map((s) => s.replace('@', '_')).sort())
    for (const spec of specs) {
      const [name] = spec.split('@')
      assert.equal(nk.isInstalled(repo, spec), true)
      assert.equal(require(join(repo, 'node_modules', `${name}_1.0.0`)), `${name.slice(-1)}:dep@1.0.0`)
    }
    assert.equal(lines(counter).length, 4)
  })

  it('a package npm cannot find fails with ENKINSTALL and npm\'s message; nothing recorded', async () => {
    const repo = tmp('npm-missing')
    await assert.rejects(nk.install(repo, 'nk-no-such-package@1.0.0', { npmArgs: registry.npmArgs }), (e) => {
      return e.code === 'ENKINSTALL' && /nk-no-such-package/.test(e.message) && /404|Not Found|E404/i.test(e.message)
    })
    assert.equal(nk.isInstalled(repo, 'nk-no-such-package@1.0.0'), false)
    assert.equal(existsSync(join(repo, 'package.json')), false)
    await assert.rejects(nk.install(repo, 'x@1.0.0', { npmPath: '/nonexistent/npm' }), (e) => e.code === 'ENKINSTALL' && /nonexistent/.test(e.message))
  })

  for (const c of CLIS)
  it(`${c.name} CLI: installs, reports status, and inspects locks`, async () => {
    const repo = tmp('cli')
    const out = await cli(c, 'repo', 'install', repo, 'nk-fixture-dep@1.0.0', '@nkfix/scoped@2.0.0', ...registry.npmArgs.map((a) => `--npm-arg=${a}`), '--output', 'json')
    const results = JSON.parse(out)
    assert.deepEqual(results.map((r) => r.installed), [true, true])
    const status = JSON.parse(cliSync(c, ['repo', 'status', repo, '--output', 'json']))
    assert.deepEqual(status.installed.map((p) => [p.specifier, p.verified]), [
      ['@nkfix/scoped@2.0.0', true],
      ['nk-fixture-dep@1.0.0', true],
    ])
    assert.deepEqual(status.locks, [])
    assert.deepEqual(status.leftovers, [])
    const held = nk.tryAcquireLock(join(repo, '.locks', 'nk-fixture-dep_9.9.9.lock'), { holder: 'cli-test' })
    const text = cliSync(c, ['repo', 'status', repo])
    assert.match(text, /locks held \(1\)/)
    assert.match(text, /'cli-test'/)
    const inspected = JSON.parse(cliSync(c, ['lock', 'inspect', held.path, '-o', 'json']))
    assert.equal(inspected.info.token, held.token)
    // Without a terminal and without --yes, break refuses.
    assert.throws(() => cliSync(c, ['lock', 'break', held.path], { stdio: ['ignore', 'pipe', 'pipe'] }), (e) => e.status === 1 && /--yes/.test(e.stderr))
    assert.match(cliSync(c, ['lock', 'break', held.path, '--yes']), /broke/)
    assert.equal(nk.inspectLock(held.path), null)
    assert.throws(() => held.release(), (e) => e.code === 'ENKLOCKLOST')
    assert.throws(() => cliSync(c, ['repo', 'install', repo, '../evil@1.0.0'], { stdio: 'pipe' }), (e) => e.status === 1 && /error\[ENKSPEC\]/.test(e.stderr))
  })
})

describe('provision', () => {
  it('3 concurrent provisions of one directory run the command once; a manifest change runs it exactly once more', async () => {
    const dir = tmp('prov')
    const manifest = join(dir, 'package.json')
    writeFileSync(manifest, '{"dependencies":{"a":"1"}}')
    const log = join(dir, 'runs.log')
    const command = ['sh', '-c', `echo run >> ${log}; sleep 0.5`]
    const run3 = async () => {
      const ws = Array.from({ length: 3 }, () => worker({ op: 'provision', dir, command, manifests: [manifest] }))
      return Promise.all(ws.map((w) => w.next((e) => e.event === 'done' || e.event === 'error')))
    }
    const first = await run3()
    assert.deepEqual(first.map((d) => d.event), ['done', 'done', 'done'], JSON.stringify(first))
    assert.equal(first.filter((d) => d.result.ran).length, 1)
    assert.equal(lines(log).length, 1)
    const hash = first[0].result.hash
    assert.ok(existsSync(join(dir, `.nk-installed-${hash}`)))
    const again = await run3()
    assert.equal(again.filter((d) => d.result.ran).length, 0)
    assert.equal(lines(log).length, 1)
    writeFileSync(manifest, '{"dependencies":{"a":"2"}}')
    const changed = await run3()
    assert.equal(changed.filter((d) => d.result.ran).length, 1)
    assert.equal(lines(log).length, 2)
    const sentinels = readdirSync(dir).filter((f) => f.startsWith('.nk-installed-'))
    assert.deepEqual(sentinels, [`.nk-installed-${changed[0].result.hash}`], 'only the current sentinel remains')
  })

  it('a failing command writes no sentinel and reports its output; the next call retries', async () => {
    const dir = tmp('prov-fail')
    await assert.rejects(nk.provision(dir, { command: 'echo broken-tool >&2; exit 7' }), (e) => e.code === 'ENKPROVISION' && /broken-tool/.test(e.message) && /7/.test(e.message))
    assert.deepEqual(readdirSync(dir).filter((f) => f.startsWith('.nk-installed-')), [])
    const r = await nk.provision(dir, { command: 'true' })
    assert.equal(r.ran, true)
    await assert.rejects(nk.provision(dir, { command: 'true', manifests: [join(dir, 'missing.json')] }), (e) => e.code === 'ENKPROVISION' && /missing\.json/.test(e.message))
  })
})
